"""ToMe (token merging): bipartite soft matching, size-weighted merging and the per-layer r schedule.

Everything here is batched over a leading frame axis: a metric or hidden state is (F, T, C), one
independent sequence of T tokens per frame.

A matching is returned as a *slot map* ``slots`` (F, T) long: the output position (0..T-r-1) each
input token goes to. Unmerged tokens get a slot of their own; a merged token shares its partner's
slot. That one tensor is enough to merge anything aligned with the tokens (hidden states, sizes,
statistics) with a scatter, and to trace sources: composing the slot maps of successive layers
(``compose_slots``) gives, for every ORIGINAL token, the token that stands for it now, and
``source_matrix`` turns that into ToMe's (F, T_out, T_orig) source matrix.

Rules (as ``facebookresearch/ToMe`` ``tome/merge.py`` and ``tome/utils.py`` define them):

- ``bipartite_soft_matching``: r is capped at ``(T - protected) // 2``; nothing happens when the
  capped r is <= 0. The metric is L2-normalised; set A = even token indices, set B = odd ones;
  each A token's score is its best cosine similarity to a B token (ties: the lowest B index); the
  r A tokens with the highest scores merge into their best B partner (several may share one); a
  protected first token (ToMe's class token) gets score -inf and is never merged. Output order:
  the unmerged A tokens in their original order, then every B token in its original order.
- ``merge_wavg``: x <- sum(size * x) / sum(size) over the tokens sharing a slot; sizes are summed
  (sizes start at 1).
- ``parse_r``: a list is used per layer (padded with zeros to the layer count); an int r with an
  inflection ``inflect`` is a linear ramp from ``int(r * (1 - inflect))`` to ``2 r - that`` over the
  layers, each entry truncated with ``int``: inflect 0 gives r everywhere, 1 ramps up from 0 to 2r,
  -1 ramps down from 2r to 0 (total about r * layers).

Differences from the official code (none changes which tokens merge, except in exact ties):
- The unmerged A tokens are always put back in their original order. Official ToMe sorts them
  only when there is a class token; without one it leaves them in descending-score order. In a
  ViT that is a mere permutation (attention and MLP are permutation-equivariant and the position
  embedding was added at the input); here the order reaches the LLM and the optional 2x2 pooling,
  and EarlyTom's SigLIP port (first patch protected) gets the sorted order officially anyway.
- Score ties between A tokens are broken by the lower A index (a stable sort); the official
  ``argsort`` is unstable, so ties there depend on the device.
- Arithmetic is float32 whatever the input dtype (the official merge multiplies and sums in the
  model's dtype, fp16/bf16); results come back in the input dtype, sizes as float32.
- ``parse_r`` with a single layer: the official ramp divides by ``layers - 1`` (zero); here one
  layer gets ``int(r * (1 - inflect))``.
- ``spread_total`` is not ToMe's: it spreads a total number of merged tokens evenly over the layers
  (see there).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Matching(NamedTuple):
    """A bipartite matching: ``slots`` (F, T) long, the output slot of each input token; ``num_out`` = T - r."""

    slots: Tensor
    num_out: int

    @property
    def r(self) -> int:
        return self.slots.shape[1] - self.num_out


def capped_r(r: int, tokens: int, protect_first: bool = False) -> int:
    """The r ToMe actually merges out of ``tokens``: min(r, (tokens - protected) // 2), at least 0."""
    return max(0, min(r, (tokens - int(protect_first)) // 2))


def identity_matching(frames: int, tokens: int, device: torch.device | str | None = None) -> Matching:
    """The matching that merges nothing (every token keeps its own slot, in order)."""
    slots = torch.arange(tokens, device=device).expand(frames, tokens).clone()
    return Matching(slots, tokens)


def bipartite_soft_matching(metric: Tensor, r: int, protect_first: bool = False) -> Matching:
    """Match the r most similar A (even) tokens into B (odd) tokens, per frame.

    ``metric`` (F, T, C): the similarity features (ToMe: the layer's keys averaged over heads; not
    normalised). ``protect_first``: never merge token 0 (ToMe's class token; EarlyTom's SigLIP
    port uses True, treating the first patch as a class-token stand-in, since SigLIP has none).
    Returns the slot map; output order [unmerged A tokens, B tokens], each in original order.
    """
    frames, tokens, _ = metric.shape
    r = capped_r(r, tokens, protect_first)
    if r <= 0:
        return identity_matching(frames, tokens, metric.device)
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    a, b = m[:, ::2], m[:, 1::2]
    scores = a @ b.transpose(-1, -2)  # (F, nA, nB) cosine similarities
    if protect_first:
        scores[:, 0, :] = -math.inf
    best, partner = scores.max(dim=-1)  # (F, nA): best score and its B index (first maximum)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    merged = order[:, :r]  # A-local indices that merge away
    unmerged = torch.sort(order[:, r:], dim=-1).values  # A-local, original order
    num_a, num_b = a.shape[1], b.shape[1]
    kept_a = num_a - r
    slot_a = torch.empty(frames, num_a, dtype=torch.long, device=metric.device)
    slot_a.scatter_(1, unmerged, torch.arange(kept_a, device=metric.device).expand(frames, kept_a))
    slot_a.scatter_(1, merged, kept_a + partner.gather(1, merged))
    slots = torch.empty(frames, tokens, dtype=torch.long, device=metric.device)
    slots[:, ::2] = slot_a
    slots[:, 1::2] = kept_a + torch.arange(num_b, device=metric.device)
    return Matching(slots, tokens - r)


def merge_sum(x: Tensor, matching: Matching) -> Tensor:
    """(F, T_out, ...) float32: the sum of ``x`` (F, T, ...) over the tokens sharing a slot."""
    frames = x.shape[0]
    flat = x.float().reshape(frames, x.shape[1], -1)
    index = matching.slots[..., None].expand(-1, -1, flat.shape[-1])
    out = flat.new_zeros(frames, matching.num_out, flat.shape[-1]).scatter_add_(1, index, flat)
    return out.reshape(frames, matching.num_out, *x.shape[2:])


def merge_wavg(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """Size-weighted average of ``x`` (F, T, D) over each slot: sum(size * x) / sum(size).

    ``size`` (F, T): how many original tokens each token stands for (None: all 1). Returns
    (merged x (F, T_out, D) in x's dtype, summed sizes (F, T_out) float32).
    """
    size = torch.ones(x.shape[:2], device=x.device) if size is None else size.float()
    total = merge_sum(x.float() * size[..., None], matching)
    new_size = merge_sum(size, matching)
    return (total / new_size[..., None]).to(x.dtype), new_size


def compose_slots(sources: Tensor, matching: Matching) -> Tensor:
    """Slots of the ORIGINAL tokens after one more matching.

    ``sources`` (F, T0): the current token each original token belongs to (start: ``arange(T0)``);
    returns (F, T0) the token each belongs to after ``matching``."""
    return matching.slots.gather(1, sources)


def source_matrix(sources: Tensor, num_out: int) -> Tensor:
    """ToMe's source matrix (F, T_out, T0) bool: entry [f, i, j] is True when token i stands for original token j."""
    return torch.nn.functional.one_hot(sources, num_out).transpose(1, 2).bool()


def parse_r(num_layers: int, r: int | list[int], inflect: float = 0.0) -> list[int]:
    """ToMe's per-layer r (``tome.utils.parse_r``): see the module docstring.

    A list is returned as given, padded with zeros to ``num_layers`` (entries past the last layer
    are kept; the caller decides what to do with them); ``inflect`` only applies to an int r.
    """
    if isinstance(r, list | tuple):
        return list(r) + [0] * (num_layers - len(r))
    low = int(r * (1.0 - inflect))
    high = 2 * r - low
    if num_layers == 1:
        return [low]
    step = (high - low) / (num_layers - 1)
    return [int(low + step * i) for i in range(num_layers)]


def spread_total(num_layers: int, total: int) -> list[int]:
    """Spread ``total`` merged tokens evenly over the layers: each gets ``total // num_layers``, and the
    first ``total % num_layers`` layers one more (earlier merges save more compute)."""
    base, extra = divmod(total, num_layers)
    return [base + (1 if i < extra else 0) for i in range(num_layers)]


def square_side(n: int) -> int | None:
    """s when n == s * s (n >= 1), else None."""
    s = math.isqrt(n) if n > 0 else 0
    return s if s > 0 and s * s == n else None
