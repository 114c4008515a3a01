"""Frame-level similarity, streaming segmentation and similarity-weighted frame merging.

These are the temporal pieces of EarlyTom's stage 1, with no model knowledge: frames are the
leading dimension of every tensor (hidden states (frames, tokens, dim), attention (frames, tokens)).

Two variants are kept side by side because the paper and its released code disagree:

* ``official`` (what the released code does, shared/specs/methods.md 1.4):
  segmentation compares each frame with the *first frame of the current segment*, resets the EMA
  to 1 at every boundary and forces a boundary before a segment reaches ``max_len`` frames; the
  middle frames of a segment are merged against an *adaptive* threshold, the similarity of the
  segment's head and tail; the last middle pair "merges" with weight 1 (its second frame is
  dropped) and the last middle frame is never emitted on its own, so every segment of four or
  more frames loses at least one frame, however dissimilar its frames are.
* ``paper`` (Eqs. 1-3 and Algorithm 1 as printed): segmentation compares consecutive frames, the
  EMA is never reset and there is no length cap; middle frames are merged against a fixed
  ``tau_merge``, pairs never reach into the tail, and no frame is dropped. Where Algorithm 1's
  pseudocode ("s_i > tau and s_{i+1} > tau") contradicts Eq. 2 ("s_i > tau and s_i > s_{i+1}"),
  Eq. 2 is used: the text defines the rule and the official code agrees with it.

A merge is described as a *plan*: one row per output frame, each row a tuple of (input frame,
weight) pairs. Plans are applied with the same weights to hidden states, to the received-attention
statistic and to frame provenance, so all three stay aligned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from tokcomp.ops.kernels import frame_cosine

Variant = Literal["official", "paper"]
Segment = tuple[int, int]  # (first, last) frame row, both inclusive
MergeRow = tuple[tuple[int, float], ...]  # (input frame row, weight) pairs of one output frame
Similarity = Callable[[int, int], float]  # sim(i, j) for frame rows i < j


class FrameSimilarity:
    """``sim(i, j)``: token-aligned similarity of frame rows i < j, the mean over positions p of
    cos(F_i[p], F_j[p]) (SigLIP adds its position embedding once, at the input, so position p is
    the same place in every frame). Computed for distances 1..``width`` up front, one batched
    ``frame_cosine`` (Triton on CUDA) per distance, and read back to the host once, so the
    streaming loops below cost no device syncs."""

    def __init__(self, hidden: Tensor, width: int):
        self.width = max(0, min(width, hidden.shape[0] - 1))
        rows = [frame_cosine(hidden[:-d], hidden[d:]) for d in range(1, self.width + 1)]
        flat = torch.cat(rows).tolist() if rows else []
        self._band: list[list[float]] = []
        for d in range(1, self.width + 1):
            n = hidden.shape[0] - d
            self._band.append(flat[:n])
            flat = flat[n:]

    def __call__(self, i: int, j: int) -> float:
        if not 0 < j - i <= self.width:
            raise IndexError(f"similarity of frames {i} and {j} not computed (distance 1..{self.width})")
        return self._band[j - i - 1][i]


def segment_official(sim: Similarity, frames: int, tau: float, alpha: float, max_len: int) -> list[Segment]:
    """Streaming segmentation as the official code does it (methods.md 1.4(a)).

    The reference is the segment's first frame; the EMA ``s <- alpha * sim + (1 - alpha) * s``
    starts at 1 and is reset to 1 at each boundary; a boundary falls before frame i when the EMA
    drops below ``tau`` or when the segment would reach ``max_len`` frames (so segments have at
    most ``max_len - 1`` frames)."""
    segments, start, ema = [], 0, 1.0
    for i in range(1, frames):
        ema = alpha * sim(start, i) + (1.0 - alpha) * ema
        if ema < tau or i - start + 1 >= max_len:
            segments.append((start, i - 1))
            start, ema = i, 1.0
    segments.append((start, frames - 1))
    return segments


def segment_paper(sim: Similarity, frames: int, tau: float, alpha: float) -> list[Segment]:
    """Streaming segmentation as the paper writes it (Eq. 1): the similarity of each frame with the
    previous one feeds the EMA (initialised to 1, never reset), a boundary falls where it drops
    below ``tau``; no length cap."""
    segments, start, ema = [], 0, 1.0
    for t in range(1, frames):
        ema = alpha * sim(t - 1, t) + (1.0 - alpha) * ema
        if ema < tau:
            segments.append((start, t - 1))
            start = t
    segments.append((start, frames - 1))
    return segments


def pair_weight(s_i: float, s_next: float) -> float:
    """Eq. 3's weight of the first frame of a merged pair: s_i / (s_i + s_{i+1}).

    The merge condition guarantees s_i > s_{i+1}; only if the sum is not positive (anti-correlated
    frames, which the official code would divide by) the first frame takes all the weight."""
    total = s_i + s_next
    return s_i / total if total > 0 else 1.0


def scan_middle_official(middle: Sequence[int], adjacent: Sequence[float], tau: float) -> list[MergeRow]:
    """The official ``fine_segment`` scan over a segment's middle frames (methods.md 1.4(c)).

    ``adjacent[j]`` is sim(middle[j], middle[j + 1]). Pair (i, i+1) merges with Eq. 3 weights iff
    s_i > tau and s_i > s_{i+1}; the last pair has no s_{i+1} and "merges" iff s_i > tau with
    weight 1, i.e. its second frame is dropped. The loop stops before the last middle frame, so
    that frame is never emitted on its own: it is always dropped when there are two or more."""
    m = len(middle)
    if m < 2:
        return [((f, 1.0),) for f in middle]
    rows: list[MergeRow] = []
    i = 0
    while i < m - 1:
        s = adjacent[i]
        if i + 1 < m - 1:
            if s > tau and s > adjacent[i + 1]:
                w = pair_weight(s, adjacent[i + 1])
                rows.append(((middle[i], w), (middle[i + 1], 1.0 - w)))
                i += 2
                continue
        elif s > tau:
            rows.append(((middle[i], 1.0), (middle[i + 1], 0.0)))
            i += 2
            continue
        rows.append(((middle[i], 1.0),))
        i += 1
    return rows


def scan_middle_paper(middle: Sequence[int], adjacent: Sequence[float], tau: float) -> list[MergeRow]:
    """Algorithm 1's scan over the middle frames with Eq. 2's condition and Eq. 3's weights.

    ``adjacent[j]`` is sim(middle[j], next frame), the last one being the similarity with the tail,
    so every middle pair has its s_{i+1}. A pair never includes the tail; unmerged frames are kept."""
    rows: list[MergeRow] = []
    i, m = 0, len(middle)
    while i < m:
        if i + 1 < m and adjacent[i] > tau and adjacent[i] > adjacent[i + 1]:
            w = pair_weight(adjacent[i], adjacent[i + 1])
            rows.append(((middle[i], w), (middle[i + 1], 1.0 - w)))
            i += 2
        else:
            rows.append(((middle[i], 1.0),))
            i += 1
    return rows


def plan_merge(sim: Similarity, segments: Sequence[Segment], variant: Variant,
               tau_merge: float | None = None) -> list[MergeRow]:
    """Merge plan of all segments: head and tail kept, middle frames scanned, segments of one or two
    frames unchanged. ``official`` uses the adaptive threshold sim(head, tail) per segment;
    ``paper`` the fixed ``tau_merge``."""
    rows: list[MergeRow] = []
    for start, end in segments:
        if end - start + 1 <= 2:
            rows.extend(((f, 1.0),) for f in range(start, end + 1))
            continue
        middle = list(range(start + 1, end))
        if variant == "official":
            scanned = scan_middle_official(middle, [sim(f, f + 1) for f in middle[:-1]], sim(start, end))
        elif variant == "paper":
            if tau_merge is None:
                raise ValueError("the paper variant needs a fixed tau_merge")
            scanned = scan_middle_paper(middle, [sim(f, f + 1) for f in middle], tau_merge)
        else:
            raise ValueError(f"unknown variant {variant!r}")
        rows.extend([((start, 1.0),), *scanned, ((end, 1.0),)])
    return rows


def similarity_width(variant: Variant, max_len: int, frames: int) -> int:
    """Largest frame distance a variant's segmentation and merge ever compare."""
    return max(1, min(max_len - 1, frames - 1)) if variant == "official" else 1


def segment_frames(hidden: Tensor, variant: Variant, tau: float, alpha: float, max_len: int,
                   sim: Similarity | None = None) -> list[Segment]:
    """Segments of ``hidden`` (frames, tokens, dim) by the variant's streaming rule (no merging):
    the "refine" step run on the merged frames at the last merge layer."""
    frames = hidden.shape[0]
    sim = sim or FrameSimilarity(hidden, similarity_width(variant, max_len, frames))
    if variant == "official":
        return segment_official(sim, frames, tau, alpha, max_len)
    if variant == "paper":
        return segment_paper(sim, frames, tau, alpha)
    raise ValueError(f"unknown variant {variant!r}")


def merge_plan(hidden: Tensor, variant: Variant, tau_seg: float, alpha: float, max_len: int,
               tau_merge: float | None = None) -> list[MergeRow]:
    """Segment ``hidden`` and plan the merge of every segment's middle frames (one similarity batch)."""
    sim = FrameSimilarity(hidden, similarity_width(variant, max_len, hidden.shape[0]))
    segments = segment_frames(hidden, variant, tau_seg, alpha, max_len, sim)
    return plan_merge(sim, segments, variant, tau_merge)


def equal_weights(rows: Sequence[MergeRow]) -> list[MergeRow]:
    """The plan with every merge a plain mean: the frames a row gives a non-zero weight to share it
    equally (the paper's "w/o weighted frame merging" ablation); dropped frames stay dropped."""
    out = []
    for row in rows:
        members = [f for f, w in row if w != 0.0]
        out.append(tuple((f, 1.0 / len(members)) for f in members) if len(members) > 1 else ((members[0], 1.0),))
    return out


def apply_plan(x: Tensor, rows: Sequence[MergeRow]) -> Tensor:
    """Apply a merge plan to any per-frame tensor (frames, ...) -> (len(rows), ...), in ``x``'s dtype.

    Kept frames are gathered as they are (bit-exact); mixed rows are summed element-wise in float32
    (no matmul, so TF32 settings cannot perturb them): w * a + (1 - w) * b."""
    out = x[torch.tensor([row[0][0] for row in rows], device=x.device)]
    mixed = [r for r, row in enumerate(rows) if len(row) > 1]
    if mixed:
        width = max(len(rows[r]) for r in mixed)
        acc = None
        for k in range(width):
            frames = [rows[r][k][0] if k < len(rows[r]) else rows[r][0][0] for r in mixed]
            weights = torch.tensor([rows[r][k][1] if k < len(rows[r]) else 0.0 for r in mixed], device=x.device)
            term = x[torch.tensor(frames, device=x.device)].float() * weights.view(-1, *(1,) * (x.dim() - 1))
            acc = term if acc is None else acc + term
        out[torch.tensor(mixed, device=x.device)] = acc.to(x.dtype)
    return out


def plan_sources(rows: Sequence[MergeRow], sources: Sequence[Sequence[int]]) -> list[list[int]]:
    """Frame provenance after a merge: each output frame stands for the original frames of every
    input frame it gives a non-zero weight to. Frames the official scan drops appear nowhere."""
    return [sorted({o for f, w in row if w != 0.0 for o in sources[f]}) for row in rows]


def tiles(segments: Sequence[Segment], frames: int) -> bool:
    """Whether ``segments`` cover frame rows 0..frames-1 contiguously, in order, without overlap."""
    expected = 0
    for first, last in segments:
        if first != expected or last < first:
            return False
        expected = last + 1
    return bool(segments) and expected == frames


def segment_ends(segments: Sequence[Segment], frames: int) -> Tensor:
    """(frames,) bool: each segment's head and tail, i.e. every frame of a one- or two-frame segment.

    These are EarlyTom's "dynamic" frames (the most distinct of their segment); the rest are "static"."""
    ends = torch.zeros(frames, dtype=torch.bool)
    for first, last in segments:
        ends[first] = ends[last] = True
    return ends
