"""Mutable states handed to the hook points.

Strategies change a state only through its methods, so the framework can enforce the invariants
in one place: text tokens are never dropped, positions and masks move together with the tokens
they belong to, and every shape change is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokcomp.errors import TokcompError


class StrategyContractError(TokcompError):
    """A strategy asked the state for something that would break an invariant."""


def _as_index(indices: Tensor | list[int], length: int, what: str) -> Tensor:
    idx = torch.as_tensor(indices, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise StrategyContractError(f"{what}: keeping no entries at all is not allowed")
    if int(idx.min()) < 0 or int(idx.max()) >= length:
        raise StrategyContractError(f"{what}: index out of range 0..{length - 1}: {idx.tolist()[:8]}...")
    if torch.unique(idx).numel() != idx.numel():
        raise StrategyContractError(f"{what}: indices must be unique")
    return idx


@dataclass
class EncoderState:
    """Hidden states of all frames after one vision-encoder layer.

    ``frame_sources[i]`` lists the original frame indices that row ``i`` now stands for, so that
    merges stay traceable down to the pre-LLM stage.
    """

    layer: int
    num_layers: int
    hidden: Tensor  # (frames, tokens, dim)
    grid: tuple[int, int]
    frame_sources: list[list[int]]
    attention: Tensor | None = None  # (frames, tokens): mean attention each token receives
    meta: dict = field(default_factory=dict)  # strategy results for later hook points (e.g. segments)

    @property
    def num_frames(self) -> int:
        return self.hidden.shape[0]

    def replace(self, hidden: Tensor, frame_sources: list[list[int]] | None = None,
                attention: Tensor | None = None) -> None:
        """Replace the hidden states (fewer frames and/or tokens); dim and dtype must not change.

        ``attention``: the received-attention statistic merged the same way (else it is dropped)."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden.shape[-1]:
            raise StrategyContractError(
                f"intra-encoder: new hidden states must be (frames, tokens, {self.hidden.shape[-1]}), "
                f"got {tuple(hidden.shape)}"
            )
        if frame_sources is None:
            if hidden.shape[0] != self.num_frames:
                raise StrategyContractError("intra-encoder: changing the frame count needs frame_sources")
            frame_sources = self.frame_sources
        if len(frame_sources) != hidden.shape[0]:
            raise StrategyContractError(
                f"intra-encoder: {len(frame_sources)} frame_sources for {hidden.shape[0]} frames"
            )
        if hidden.shape[1] != self.hidden.shape[1]:
            self.grid = (0, 0)  # no longer a square grid; pooling must know
        if attention is not None and attention.shape != hidden.shape[:2]:
            raise StrategyContractError(
                f"intra-encoder: attention must be (frames, tokens) = {tuple(hidden.shape[:2])}, got {tuple(attention.shape)}"
            )
        self.hidden = hidden.to(self.hidden.dtype)
        self.frame_sources = [list(s) for s in frame_sources]
        self.attention = attention


@dataclass
class VisualTokens:
    """The visual tokens about to be spliced into the prompt, with their geometry.

    ``source`` is each token's index in the uncompressed pre-LLM sequence (or that of a
    representative, for merged tokens), which is what "source positions" means downstream.
    """

    features: Tensor  # (N, D)
    frame: Tensor  # (N,) frame row index, -1 for the newline
    row: Tensor  # (N,)
    col: Tensor  # (N,)
    is_newline: Tensor  # (N,) bool
    source: Tensor  # (N,)
    frame_sources: list[list[int]]
    grid: tuple[int, int]
    scores: Tensor | None = None  # (N,), importance when requested
    meta: dict = field(default_factory=dict)  # carried over from the intra-encoder state

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    @property
    def num_frames(self) -> int:
        return len(self.frame_sources)

    def keep(self, indices: Tensor | list[int]) -> None:
        """Keep the given tokens, in the given order (use ascending order for temporal order)."""
        idx = _as_index(indices, self.num_tokens, "pre-LLM keep").to(self.features.device)
        for name in ("features", "frame", "row", "col", "is_newline", "source"):
            setattr(self, name, getattr(self, name)[idx])
        if self.scores is not None:
            self.scores = self.scores[idx]

    def replace(
        self,
        features: Tensor,
        frame: Tensor,
        row: Tensor,
        col: Tensor,
        is_newline: Tensor,
        source: Tensor,
        scores: Tensor | None = None,
    ) -> None:
        """Replace all tokens at once (for merging strategies); every field must have N entries."""
        n = features.shape[0]
        if features.dim() != 2 or features.shape[1] != self.features.shape[1]:
            raise StrategyContractError(
                f"pre-LLM replace: features must be (N, {self.features.shape[1]}), got {tuple(features.shape)}"
            )
        for name, t in (("frame", frame), ("row", row), ("col", col), ("is_newline", is_newline), ("source", source)):
            if t.shape != (n,):
                raise StrategyContractError(f"pre-LLM replace: {name} must have shape ({n},), got {tuple(t.shape)}")
        self.features = features.to(self.features.dtype)
        self.frame, self.row, self.col, self.source = frame.long(), row.long(), col.long(), source.long()
        self.is_newline = is_newline.bool()
        self.scores = scores


@dataclass
class LLMState:
    """Hidden states entering one decoder layer during prefill (batch of one)."""

    layer: int
    num_layers: int
    hidden: Tensor  # (1, L, D)
    position_ids: Tensor  # (1, L)
    visual_mask: Tensor  # (L,) bool
    last_token_attention: dict[int, Tensor] = field(default_factory=dict)  # layer -> (L,)
    kept: Tensor | None = None  # set by keep(): indices into the current sequence

    @property
    def seq_len(self) -> int:
        return self.hidden.shape[1]

    def visual_indices(self) -> Tensor:
        return torch.nonzero(self.visual_mask, as_tuple=False).flatten()

    def keep(self, indices: Tensor | list[int]) -> None:
        """Keep these sequence entries from this layer on; every non-visual entry must be kept."""
        idx = _as_index(indices, self.seq_len, f"inner-LLM keep at layer {self.layer}").to(self.hidden.device)
        idx, _ = torch.sort(idx)
        dropped = torch.ones(self.seq_len, dtype=torch.bool, device=idx.device)
        dropped[idx] = False
        if bool((dropped & ~self.visual_mask.to(idx.device)).any()):
            raise StrategyContractError(f"inner-LLM keep at layer {self.layer}: text tokens must never be dropped")
        self.hidden = self.hidden[:, idx]
        self.position_ids = self.position_ids[:, idx]
        self.visual_mask = self.visual_mask[idx]
        self.last_token_attention = {k: v[idx] for k, v in self.last_token_attention.items()}
        self.kept = idx if self.kept is None else self.kept[idx]

    def set_hidden(self, hidden: Tensor) -> None:
        """Overwrite hidden-state values in place of the current ones (for merges); shape must match."""
        if hidden.shape != self.hidden.shape:
            raise StrategyContractError(
                f"inner-LLM set_hidden at layer {self.layer}: shape {tuple(hidden.shape)} != {tuple(self.hidden.shape)}"
            )
        self.hidden = hidden.to(self.hidden.dtype)
