"""Merging dropped tokens into kept ones: nearest-neighbour assignment and two merge rules.

All functions work on one sequence of hidden states ``hidden`` of shape (L, D) and on two
disjoint index vectors into it: ``kept_idx`` (K,), the tokens that survive, and ``other_idx``
(M,), the tokens merged away. ``assignment`` (M,) holds, for each merged-away token, a *position
in* ``kept_idx`` (0..K-1), not a sequence index, so the merge outputs line up with ``kept_idx``.

The mean merge is a scatter-add followed by a division by counts: ``tokcomp.ops.kernels.scatter_mean``,
which has a Triton kernel for CUDA and a torch reference.
Sums are accumulated in float32 whatever the input dtype (bf16 sums of hundreds of tokens lose
digits), and results are returned in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.ops.kernels import scatter_mean


def merged_keep_count(n: int, merge_ratio: float) -> int:
    """Tokens kept out of ``n`` when a fraction ``merge_ratio`` of them is merged away.

    round(n * (1 - merge_ratio)) as HoliTom's inner merge computes it (Python's ``round``: halves
    go to the even neighbour, so 129 tokens at 0.5 keep 64), clamped to at least one kept token
    (merging needs a destination) and at most ``n``. ``n == 0`` keeps 0.
    """
    if n <= 0:
        return 0
    return max(1, min(n, round(n * (1.0 - merge_ratio))))


def nearest_kept(hidden: Tensor, kept_idx: Tensor, other_idx: Tensor) -> Tensor:
    """For each token in ``other_idx``, the position in ``kept_idx`` of its most cosine-similar kept token.

    Cosine, not dot product, so a kept token with a large norm does not attract everything.
    Computed in float32; ties go to the lowest position (``argmax`` returns the first maximum).
    Returns (M,) long on ``hidden``'s device.
    """
    kept = F.normalize(hidden[kept_idx].float(), dim=-1)
    other = F.normalize(hidden[other_idx].float(), dim=-1)
    return (other @ kept.T).argmax(dim=-1)


def merge_mean(hidden: Tensor, kept_idx: Tensor, other_idx: Tensor, assignment: Tensor) -> Tensor:
    """(K, D): each kept token replaced by the true mean of itself and every token assigned to it.

    Runs through the dispatching ``scatter_mean`` (a Triton kernel on CUDA, torch elsewhere)."""
    return scatter_mean(hidden[other_idx], assignment, hidden[kept_idx])


def sequential_weights(assignment: Tensor, num_kept: int) -> tuple[Tensor, Tensor]:
    """Weights of repeated pairwise averaging ``h_dst <- (h_dst + h_src) / 2``, sources in the given order.

    A destination that receives m sources s_1..s_m (in the order they appear in ``assignment``)
    ends as ``h_dst / 2^m + sum_i h_{s_i} / 2^(m - i + 1)``: the last source weighs 1/2, the
    first 1/2^m, the destination itself 1/2^m. Returns (source weights (M,), kept weights (K,)),
    float32; for 2+ sources this differs from the mean, which weighs all 1/(m + 1).
    """
    m = assignment.numel()
    counts = torch.bincount(assignment, minlength=num_kept)
    order = torch.sort(assignment, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(m, dtype=torch.long, device=assignment.device)
    rank[order] = torch.arange(m, device=assignment.device) - starts[assignment[order]]
    source_weights = torch.exp2(-(counts[assignment] - rank).to(torch.float32))
    kept_weights = torch.exp2(-counts.to(torch.float32))
    return source_weights, kept_weights


def merge_sequential(hidden: Tensor, kept_idx: Tensor, other_idx: Tensor, assignment: Tensor) -> Tensor:
    """(K, D): HoliTom's official merge, ``h_dst <- (h_dst + h_src) / 2`` for each source in ``other_idx`` order.

    Vectorised through ``sequential_weights`` (a weighted scatter-add) instead of the official
    Python double loop; equal to the loop up to float rounding.
    """
    source_weights, kept_weights = sequential_weights(assignment, kept_idx.numel())
    out = hidden[kept_idx].float() * kept_weights[:, None]
    out.index_add_(0, assignment, hidden[other_idx].float() * source_weights[:, None])
    return out.to(hidden.dtype)
