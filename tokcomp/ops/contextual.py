"""VisionZip's per-frame token budget: dominant tokens by attention, contextual tokens by key similarity.

Everything works on a batch of frames that share one token count: ``hidden`` (frames, n, D),
``scores`` (frames, n) and ``keys`` (frames, n, d). Positions are indices within a frame.

- :func:`split_budget`: S tokens per frame = ``S * 54 // 64`` dominant + the rest contextual.
- ``tokcomp.ops.selection.topk_positions``: each frame's dominant tokens, its top scores, ascending
  (spatial order); the same per-frame top-k as the score-based strategies'.
- :func:`remaining_positions`: the complement of the dominant positions, ascending.
- :func:`stride_targets`: the contextual targets among ``m`` remaining tokens: positions
  0, step, 2*step, ... with ``step = max(1, m // c)``, the first ``c`` of them.
- :func:`contextual_merge`: every non-target token goes to the target with the most cosine-similar
  (L2-normalised) key; a contextual token is ``target hidden + mean of its members' hidden states``
  (target *plus* mean, not their average); a target with no members stays its own hidden state
  (the mean of an empty set counts as zero).
- :func:`visionzip_select`: the whole per-frame rule, dominant tokens then contextual tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.ops.selection import topk_positions

DOMINANT_SHARE = (54, 64)  # VisionZip's README split 54 + 10 of 64 tokens, kept by the LLaVA-OV port


def split_budget(tokens: int) -> tuple[int, int]:
    """(dominant, contextual) for ``tokens`` kept per frame: dominant = int(S * 54 / 64).

    Integer floor division equals the port's ``int(S * 54 / 64)`` (S * 54 / 64 is exact in floats)."""
    if tokens < 0:
        raise ValueError(f"tokens={tokens!r} must be >= 0")
    dominant = tokens * DOMINANT_SHARE[0] // DOMINANT_SHARE[1]
    return dominant, tokens - dominant


def remaining_positions(n: int, taken: Tensor) -> Tensor:
    """(frames, n - k): the positions in ``range(n)`` not in each row of ``taken`` (frames, k), ascending."""
    frames = taken.shape[0]
    free = torch.ones(frames, n, dtype=torch.bool, device=taken.device)
    free.scatter_(1, taken, False)
    return torch.nonzero(free, as_tuple=True)[1].view(frames, n - taken.shape[1])


def stride_targets(m: int, c: int) -> Tensor:
    """(c,) positions of the contextual targets among ``m`` remaining tokens: every ``max(1, m // c)``-th
    from position 0, the first ``c`` of them. Needs ``c <= m``."""
    if not 0 <= c <= m:
        raise ValueError(f"cannot pick {c} contextual targets among {m} remaining tokens")
    if c == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.arange(0, m, max(1, m // c))[:c]


def contextual_merge(hidden: Tensor, keys: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Merge each frame's non-target tokens into its targets.

    ``hidden`` (frames, m, D), ``keys`` (frames, m, d), ``targets`` (c,) positions shared by all
    frames. Each non-target token joins the target whose L2-normalised key has the largest dot
    product with its own (ties: the first target). Returns (contextual (frames, c, D) =
    target hidden + mean of the members' hidden states, accumulated in float32, in ``hidden``'s
    dtype; assignment (frames, m - c), the position in ``targets`` of each non-target token, whose
    positions are the ascending complement of ``targets``).
    """
    frames, m, dim = hidden.shape
    targets = targets.to(hidden.device)
    c = targets.numel()
    is_target = torch.zeros(m, dtype=torch.bool, device=hidden.device)
    is_target[targets] = True
    others = torch.nonzero(~is_target, as_tuple=False).flatten()
    base = hidden[:, targets].float()
    if c == 0 or others.numel() == 0:
        return base.to(hidden.dtype), torch.zeros(frames, others.numel(), dtype=torch.long, device=hidden.device)
    unit = F.normalize(keys.float(), dim=-1)
    assignment = (unit[:, others] @ unit[:, targets].transpose(1, 2)).argmax(dim=-1)  # (frames, m - c)
    slots = (assignment + torch.arange(frames, device=hidden.device)[:, None] * c).flatten()
    sums = torch.zeros(frames * c, dim, dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, slots, hidden[:, others].float().reshape(-1, dim))
    counts = torch.bincount(slots, minlength=frames * c).clamp(min=1).to(torch.float32)
    mean = (sums / counts[:, None]).view(frames, c, dim)
    return (base + mean).to(hidden.dtype), assignment


def visionzip_select(hidden: Tensor, scores: Tensor, keys: Tensor, dominant: int,
                     contextual: int) -> tuple[Tensor, Tensor]:
    """VisionZip on a batch of frames with n tokens each.

    Keeps each frame's ``dominant`` top-scored tokens (in spatial order), then merges the remaining
    n - dominant tokens into ``contextual`` tokens (:func:`stride_targets`, :func:`contextual_merge`).
    Returns (features (frames, dominant + contextual, D), positions (frames, dominant + contextual):
    the frame position of each output token, the target's for a contextual token).
    """
    frames, n, _ = hidden.shape
    if dominant < 0 or contextual < 0 or dominant + contextual > n:
        raise ValueError(f"cannot keep {dominant} dominant + {contextual} contextual of {n} tokens")
    top = topk_positions(scores, dominant).to(hidden.device)
    rest = remaining_positions(n, top)
    targets = stride_targets(n - dominant, contextual)
    gather = rest[:, :, None].expand(-1, -1, hidden.shape[-1])
    rest_hidden = torch.gather(hidden, 1, gather)
    rest_keys = torch.gather(keys, 1, rest[:, :, None].expand(-1, -1, keys.shape[-1]))
    merged, _ = contextual_merge(rest_hidden, rest_keys, targets)
    dominant_hidden = torch.gather(hidden, 1, top[:, :, None].expand(-1, -1, hidden.shape[-1]))
    positions = torch.cat([top, rest[:, targets.to(rest.device)]], dim=1)
    return torch.cat([dominant_hidden, merged], dim=1), positions
