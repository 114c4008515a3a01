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
- :func:`visionzip_select`: the whole per-frame rule, dominant tokens then contextual tokens; it is
  :func:`visionzip_plan` (the merge description) then :func:`visionzip_apply`, which applies the
  same merge to any tensor aligned with the tokens (the features, riders).
"""

from __future__ import annotations

from typing import NamedTuple

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


def non_targets(m: int, targets: Tensor) -> Tensor:
    """(m - c,) the positions in ``range(m)`` that are not ``targets``, ascending."""
    is_target = torch.zeros(m, dtype=torch.bool, device=targets.device)
    is_target[targets] = True
    return torch.nonzero(~is_target, as_tuple=False).flatten()


def contextual_assignment(keys: Tensor, targets: Tensor) -> Tensor:
    """(frames, m - c): for each non-target token (ascending complement of ``targets``), the position
    in ``targets`` of the target whose L2-normalised key has the largest dot product with its own
    (ties: the first target). ``keys`` (frames, m, d)."""
    frames, m, _ = keys.shape
    targets = targets.to(keys.device)
    others = non_targets(m, targets)
    if targets.numel() == 0 or others.numel() == 0:
        return torch.zeros(frames, others.numel(), dtype=torch.long, device=keys.device)
    unit = F.normalize(keys.float(), dim=-1)
    return (unit[:, others] @ unit[:, targets].transpose(1, 2)).argmax(dim=-1)


def contextual_sum(hidden: Tensor, targets: Tensor, assignment: Tensor) -> Tensor:
    """(frames, c, D): each target's hidden state plus the mean of the non-target tokens ``assignment``
    gives it (:func:`contextual_assignment`); float32 accumulation, ``hidden``'s dtype out. Separate
    from the assignment so that anything aligned with the tokens (riders) merges the same way."""
    frames, m, dim = hidden.shape
    targets = targets.to(hidden.device)
    c = targets.numel()
    others = non_targets(m, targets)
    base = hidden[:, targets].float()
    if c == 0 or others.numel() == 0:
        return base.to(hidden.dtype)
    slots = (assignment.to(hidden.device) + torch.arange(frames, device=hidden.device)[:, None] * c).flatten()
    sums = torch.zeros(frames * c, dim, dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, slots, hidden[:, others].float().reshape(-1, dim))
    counts = torch.bincount(slots, minlength=frames * c).clamp(min=1).to(torch.float32)
    mean = (sums / counts[:, None]).view(frames, c, dim)
    return (base + mean).to(hidden.dtype)


def contextual_merge(hidden: Tensor, keys: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Merge each frame's non-target tokens into its targets.

    ``hidden`` (frames, m, D), ``keys`` (frames, m, d), ``targets`` (c,) positions shared by all
    frames. Each non-target token joins the target whose L2-normalised key has the largest dot
    product with its own (ties: the first target). Returns (contextual (frames, c, D) =
    target hidden + mean of the members' hidden states, accumulated in float32, in ``hidden``'s
    dtype; assignment (frames, m - c), the position in ``targets`` of each non-target token, whose
    positions are the ascending complement of ``targets``).
    """
    assignment = contextual_assignment(keys, targets).to(hidden.device)
    return contextual_sum(hidden, targets, assignment), assignment


class VisionZipPlan(NamedTuple):
    """Which tokens of a batch of frames VisionZip keeps and merges (:func:`visionzip_plan`), so that
    the features and any tensor aligned with them (riders) take the same merge (:func:`visionzip_apply`)."""

    top: Tensor  # (frames, dominant): dominant positions, ascending
    rest: Tensor  # (frames, n - dominant): the other positions, ascending
    targets: Tensor  # (contextual,): target positions among ``rest``
    assignment: Tensor  # (frames, n - dominant - contextual): each non-target's position in ``targets``

    @property
    def positions(self) -> Tensor:
        """(frames, dominant + contextual): the frame position of each output token (a target's for a
        contextual token)."""
        return torch.cat([self.top, self.rest[:, self.targets.to(self.rest.device)]], dim=1)


def visionzip_plan(scores: Tensor, keys: Tensor, dominant: int, contextual: int) -> VisionZipPlan:
    """VisionZip's choice on a batch of frames with n tokens each: the ``dominant`` top-scored tokens,
    then ``contextual`` stride targets among the rest, each other token assigned by key similarity."""
    frames, n = scores.shape
    if dominant < 0 or contextual < 0 or dominant + contextual > n:
        raise ValueError(f"cannot keep {dominant} dominant + {contextual} contextual of {n} tokens")
    top = topk_positions(scores, dominant).to(keys.device)
    rest = remaining_positions(n, top)
    targets = stride_targets(n - dominant, contextual)
    rest_keys = torch.gather(keys, 1, rest[:, :, None].expand(-1, -1, keys.shape[-1]))
    return VisionZipPlan(top, rest, targets, contextual_assignment(rest_keys, targets))


def visionzip_apply(x: Tensor, plan: VisionZipPlan) -> Tensor:
    """(frames, dominant + contextual, C): the plan applied to ``x`` (frames, n, C): dominant tokens as
    they are, then each target plus the mean of its members (:func:`contextual_sum`)."""
    top, rest = plan.top.to(x.device), plan.rest.to(x.device)
    rest_x = torch.gather(x, 1, rest[:, :, None].expand(-1, -1, x.shape[-1]))
    merged = contextual_sum(rest_x, plan.targets, plan.assignment)
    dominant_x = torch.gather(x, 1, top[:, :, None].expand(-1, -1, x.shape[-1]))
    return torch.cat([dominant_x, merged], dim=1)


def visionzip_select(hidden: Tensor, scores: Tensor, keys: Tensor, dominant: int,
                     contextual: int) -> tuple[Tensor, Tensor]:
    """VisionZip on a batch of frames with n tokens each.

    Keeps each frame's ``dominant`` top-scored tokens (in spatial order), then merges the remaining
    n - dominant tokens into ``contextual`` tokens (:func:`stride_targets`, :func:`contextual_merge`).
    Returns (features (frames, dominant + contextual, D), positions (frames, dominant + contextual):
    the frame position of each output token, the target's for a contextual token).
    """
    plan = visionzip_plan(scores, keys.to(hidden.device), dominant, contextual)
    return visionzip_apply(hidden, plan), plan.positions
