"""VisionZip, as ported to LLaVA-OneVision video by HoliTom/EarlyTom (the baseline both compare against).

Pre-LLM, per frame (after the projector and the 2x2 bilinear pooling: 196 tokens on the real
model, 16 on the tiny one), keep S tokens:

1. **Dominant**: ``int(S * 54 / 64)`` tokens with the most received attention (mean over heads
   and queries) in the last vision layer, pooled like the features (``state.scores``). They stay
   in spatial order (the per-frame top-k of ``tokcomp.ops.selection``, as ``topk`` uses).
   Attention concentrates on a few tokens, which carry most of the information.
2. **Contextual**: the other ``S - dominant`` tokens summarise what is left. Among the remaining
   tokens (spatial order), targets sit at a uniform stride ``step = max(1, m // c)`` (positions
   0, step, 2*step, ..., the first c), for m remaining tokens and c contextual ones. Every other remaining
   token joins the target whose key is most cosine-similar. The keys are the head-averaged keys of
   the last vision layer, pooled like the features (``state.keys``), L2-normalised. A contextual
   token is ``target hidden + mean of its members' hidden states``: the target *plus* the mean,
   as the official code does, not their average. A target with no members stays as it is: the
   official code divides by counts clamped to one, so the empty sum adds zero.
3. Output per frame: [dominant (spatial order), contextual (target order)]. Frames stay in order (the
   framework re-emits the newline after the video). A contextual token takes its target's source,
   frame, row and col.
   The optional fields (scores, keys, saliency, group) keep the representative token's values;
   riders (Qwen3-VL's DeepStack features) take the same dominant/contextual merge as the features.

S per frame (``tokens_per_frame`` when set, else from ``ratio``): the port sets ``SPATIAL_TOKENS``
by hand to 20/30/40/50 for 10/15/20/25%. That is not a plain rounding (196 * 0.25 = 49, the
table says 50). So on a 196-token frame those four ratios map to the table. Any other ratio or
token count uses ``round(n * ratio)``. S is then clamped to [2, n], or to n for frames with
fewer than 2 tokens. Always ``dominant = int(S * 54 / 64)``: 20 -> 16 + 4, 30 -> 25 + 5,
40 -> 33 + 7, 50 -> 42 + 8. The counts depend only on the parameters, so the strategy declares
``plan_pre_llm``. The paper's FLOPs column counts int(32 * 196 * r) video tokens, not the 32 * S
actually kept (S = 50 gives 1600, not 1568).

Defaults: ``ratio`` 0.10. The spec does not record the port's default ``SPATIAL_TOKENS``, so this
uses ``RETAIN_RATIO``'s code default in the HoliTom/EarlyTom wrappers, which run the port (methods.md 1.3).
``tokens_per_frame`` None. The split 54/64 is VisionZip's README (54 + 10 of 64) as the port uses it.

Deviations from the official code:
- Ties: dominant top-k breaks score ties by the lower position (the official ``topk`` leaves
  the order unspecified); similarity ties go to the first target, as ``argmax`` does.
- Zero keys: normalisation has an epsilon (``F.normalize``), so a zero key vector gives zero
  similarity instead of NaN.
- The merge sums in float32 and casts back to the feature dtype. The official code sums in the
  model dtype (bf16).
- Frames may have different token counts (after an earlier strategy). Each frame is then treated
  on its own count. The official code assumes 196.
- The ratio-to-S table applies only to 196-token frames. On other grids (LLaVA-Video's 13x13 = 169)
  the port would still keep its hand-set SPATIAL_TOKENS; here ``ratio`` then means round(n * ratio),
  and ``tokens_per_frame`` reproduces the port's absolute count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokcomp.errors import ConfigError
from tokcomp.hookspecs import hookimpl
from tokcomp.ops.contextual import split_budget, visionzip_apply, visionzip_plan
from tokcomp.ops.selection import equal_size_batches, groups
from tokcomp.state import VisualTokens
from tokcomp.strategy import ModelInfo, Strategy, check_ratio

OFFICIAL_GRID_TOKENS = 196  # LLaVA-OV: 27x27 SigLIP patches pooled bilinearly to 14x14
OFFICIAL_SPATIAL_TOKENS = {0.10: 20, 0.15: 30, 0.20: 40, 0.25: 50}  # the port's SPATIAL_TOKENS (methods.md 3.2)


def frame_budget(tokens: int, ratio: float, tokens_per_frame: int | None = None) -> int:
    """S: tokens VisionZip keeps of a frame of ``tokens`` tokens (see the module docstring)."""
    if tokens_per_frame is not None:
        s = tokens_per_frame
    else:
        official = [v for r, v in OFFICIAL_SPATIAL_TOKENS.items() if math.isclose(ratio, r, abs_tol=1e-9)]
        s = official[0] if official and tokens == OFFICIAL_GRID_TOKENS else round(tokens * ratio)
    return min(tokens, max(2, s))


@dataclass
class VisionZip(Strategy):
    name = "visionzip"
    summary = "per frame: top tokens by last-layer vision attention + contextual tokens merged by key similarity"
    ratio: float = 0.10  # RETAIN_RATIO's code default in the HoliTom/EarlyTom wrappers (methods.md 1.3)
    tokens_per_frame: int | None = None  # SPATIAL_TOKENS set directly; overrides ratio

    def __post_init__(self) -> None:
        check_ratio(self.name, "ratio", self.ratio)
        if self.tokens_per_frame is not None and (isinstance(self.tokens_per_frame, bool) or self.tokens_per_frame < 2):
            raise ValueError(f"tokens_per_frame={self.tokens_per_frame!r} must be >= 2 "
                             "(at least one dominant and one contextual token)")

    def check(self, info: ModelInfo) -> None:
        pooled = info.pooled_grid[0] * info.pooled_grid[1]
        if self.tokens_per_frame is not None and self.tokens_per_frame > pooled:
            raise ConfigError(f"strategy {self.name!r}: tokens_per_frame={self.tokens_per_frame} exceeds the "
                              f"{pooled} pooled tokens per frame of model {info.name!r}")

    def statistics(self, info: ModelInfo) -> dict[str, set[int]]:
        return {"vision.attention": {-1}, "vision.keys": {-1}}

    def budget(self, tokens: int) -> int:
        """S for a frame of ``tokens`` tokens."""
        return frame_budget(tokens, self.ratio, self.tokens_per_frame)

    def plan_pre_llm(self, info: ModelInfo, tokens) -> None:
        tokens.per_frame = [self.budget(n) for n in tokens.per_frame]

    @hookimpl
    def tokcomp_pre_llm(self, state: VisualTokens) -> None:
        for field, what in (("scores", "received attention"), ("keys", "keys")):
            if getattr(state, field) is None:
                raise ConfigError(
                    f"strategy {self.name!r} found no {what} of the last vision layer at pre-LLM "
                    f"(state.{field} is None: an earlier pre-LLM strategy replaced the tokens without them)"
                )
        members = groups(state.frame)
        features: list[Tensor | None] = [None] * len(members)
        riders: list[Tensor | None] = [None] * len(members)
        picked: list[Tensor | None] = [None] * len(members)
        for n, which in equal_size_batches(members).items():  # frames with equal token counts run as one batch
            idx = torch.stack([members[i] for i in which]).to(state.features.device)  # (frames, n)
            dominant, contextual = split_budget(self.budget(n))
            plan = visionzip_plan(state.scores.to(idx.device)[idx], state.keys.to(idx.device)[idx], dominant, contextual)
            out, positions = visionzip_apply(state.features[idx], plan), plan.positions
            merged_riders = None if state.riders is None else visionzip_apply(state.riders[idx.to(state.riders.device)], plan)
            for row, i in enumerate(which):
                features[i], picked[i] = out[row], idx[row, positions[row]]
                if merged_riders is not None:
                    riders[i] = merged_riders[row]
        rep = torch.cat(picked)  # representative (input) index of every output token
        feats = torch.cat(features)

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rep.to(t.device)]

        state.replace(feats, take(state.frame), take(state.row), take(state.col), take(state.source), scores=take(state.scores), keys=take(state.keys),
                      saliency=take(state.saliency), group=take(state.group),
                      riders=None if state.riders is None else torch.cat(riders))


VISIONZIP_STRATEGIES = (VisionZip,)
