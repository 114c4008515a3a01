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


def check_riders(where: str, current: Tensor | None, new: Tensor | None, leading: tuple[int, ...]) -> None:
    """Riders (per-token features a model carries beside the hidden states) must be transformed with them."""
    if current is None:
        if new is not None:
            raise StrategyContractError(f"{where}: riders given, but this model carries none")
        return
    if new is None:
        raise StrategyContractError(
            f"{where}: this model carries per-token riders (e.g. Qwen3-VL's DeepStack features); a strategy that "
            "drops or merges tokens must apply the same drop or merge to them (replace(..., riders=...))")
    if tuple(new.shape[:-1]) != tuple(leading) or new.shape[-1] != current.shape[-1]:
        raise StrategyContractError(
            f"{where}: riders must be {(*leading, current.shape[-1])}, got {tuple(new.shape)}")


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
    position: str = "layer"  # "input" (before layer 0), "attention" (between attention and MLP) or "layer"
    keys: Tensor | None = None  # (frames, tokens, head_dim): this layer's head-averaged keys, on request
    saliency: Tensor | None = None  # (frames, tokens): per-frame mean-query attention, on request
    sizes: Tensor | None = None  # (frames, tokens): merged-token sizes; later layers use proportional attention
    riders: Tensor | None = None  # (frames, tokens, C): per-token features that follow every drop and merge
    grid_multiple: int = 1  # ModelInfo.grid_multiple: a changed grid's sides must be multiples of it

    @property
    def num_frames(self) -> int:
        return self.hidden.shape[0]

    def replace(self, hidden: Tensor, frame_sources: list[list[int]] | None = None,
                attention: Tensor | None = None, grid: tuple[int, int] | None = None,
                sizes: Tensor | None = None, riders: Tensor | None = None) -> None:
        """Replace the hidden states (fewer frames and/or tokens); dim and dtype must not change.

        ``attention``: the received-attention statistic merged the same way (else it is dropped).
        ``grid``: (h, w) with h * w tokens when the tokens form a grid again; a token-count change
        without it leaves no grid, and the adapter then skips the 2x2 pooling. ``sizes``: token
        sizes for proportional attention in later layers (else none). Keys and saliency are dropped.
        ``riders``: when the model carries per-token riders (Qwen3-VL's DeepStack states of earlier
        vision layers), the same drop or merge applied to them; required then, so that no strategy
        silently desynchronises them from the hidden states."""
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
        if grid is not None:
            if grid[0] * grid[1] != hidden.shape[1]:
                raise StrategyContractError(f"intra-encoder: grid {grid} does not hold {hidden.shape[1]} tokens")
            self.grid = tuple(grid)
        elif hidden.shape[1] != self.hidden.shape[1]:
            self.grid = (0, 0)  # no longer a grid; pooling must know
        check_riders("intra-encoder", self.riders, riders, hidden.shape[:2])
        for name, value in (("attention", attention), ("sizes", sizes)):
            if value is not None and value.shape != hidden.shape[:2]:
                raise StrategyContractError(
                    f"intra-encoder: {name} must be (frames, tokens) = {tuple(hidden.shape[:2])}, got {tuple(value.shape)}"
                )
        self.hidden = hidden.to(self.hidden.dtype)
        self.frame_sources = [list(s) for s in frame_sources]
        self.attention, self.sizes = attention, sizes
        self.riders = None if riders is None else riders.to(self.riders.dtype)
        self.keys = self.saliency = None


@dataclass
class VisualTokens:
    """The visual content tokens about to be spliced into the prompt, with their geometry.

    ``source`` is each token's index in the uncompressed pre-LLM sequence (or that of a
    representative, for merged tokens): the splice takes position ids from it when original
    positions are kept (always on M-RoPE models), so a strategy never handles positions itself.
    ``frame`` is the row (frame, or temporal patch) a token comes from; ``row``/``col`` its place in
    that row's LLM token grid. The model's special tokens (LLaVA's newline) are not here: the
    framework keeps them and re-emits them after the video.
    """

    features: Tensor  # (N, D)
    frame: Tensor  # (N,) row index (frame or temporal patch)
    row: Tensor  # (N,)
    col: Tensor  # (N,)
    source: Tensor  # (N,)
    frame_sources: list[list[int]]
    grid: tuple[int, int]
    scores: Tensor | None = None  # (N,), importance when requested
    meta: dict = field(default_factory=dict)  # carried over from the intra-encoder state
    keys: Tensor | None = None  # (N, head_dim): pooled head-averaged vision keys, on request
    saliency: Tensor | None = None  # (N,): pooled per-frame mean-query attention, on request
    group: Tensor | None = None  # (N,) long labels a strategy sets; reach the LLM as LLMState.visual_group
    original_positions: bool = False  # True: the kept tokens keep their uncompressed position ids (FastVID)
    riders: Tensor | None = None  # (N, C): per-token features that follow every drop and merge (DeepStack)

    OPTIONAL = ("scores", "keys", "saliency", "group", "riders")

    @classmethod
    def from_grid(cls, features: Tensor, stats: dict[str, Tensor], frame_sources: list[list[int]],
                  meta: dict | None = None, riders: Tensor | None = None) -> VisualTokens:
        """Tokens of (rows, h, w, D) grids in raster order, with statistics (rows, h, w[, C]) pooled alike
        and riders (rows, h, w, C) when the model has them."""
        rows, h, w = features.shape[:3]
        dev = features.device if features.device.type != "meta" else torch.device("cpu")  # labels stay real
        cells = torch.arange(h * w, device=dev).repeat(rows)
        flat = {name: v.reshape(rows * h * w, *v.shape[3:]).float() for name, v in stats.items()}
        return cls(features=features.reshape(rows * h * w, -1), frame=torch.arange(rows, device=dev).repeat_interleave(h * w),
                   row=cells // w, col=cells % w, source=torch.arange(rows * h * w, device=dev),
                   frame_sources=[list(f) for f in frame_sources], grid=(h, w), scores=flat.get("attention"),
                   meta=meta if meta is not None else {}, keys=flat.get("keys"), saliency=flat.get("saliency"),
                   riders=None if riders is None else riders.reshape(rows * h * w, -1))

    @property
    def num_tokens(self) -> int:
        return self.features.shape[0]

    @property
    def num_frames(self) -> int:
        return len(self.frame_sources)

    def keep(self, indices: Tensor | list[int]) -> None:
        """Keep the given tokens, in the given order (use ascending order for temporal order)."""
        idx = _as_index(indices, self.num_tokens, "pre-LLM keep").to(self.features.device)
        for name in ("features", "frame", "row", "col", "source"):
            setattr(self, name, getattr(self, name)[idx])
        for name in self.OPTIONAL:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[idx.to(getattr(self, name).device)])

    def replace(
        self,
        features: Tensor,
        frame: Tensor,
        row: Tensor,
        col: Tensor,
        source: Tensor,
        scores: Tensor | None = None,
        keys: Tensor | None = None,
        saliency: Tensor | None = None,
        group: Tensor | None = None,
        riders: Tensor | None = None,
    ) -> None:
        """Replace all tokens at once (for merging strategies); every field must have N entries.

        A merged token takes the geometry (frame, row, col, source) of a representative. ``riders``:
        required when the model carries them (``EncoderState.replace``), merged like the features."""
        n = features.shape[0]
        if features.dim() != 2 or features.shape[1] != self.features.shape[1]:
            raise StrategyContractError(
                f"pre-LLM replace: features must be (N, {self.features.shape[1]}), got {tuple(features.shape)}"
            )
        if n == 0:
            raise StrategyContractError("pre-LLM replace: keeping no visual tokens at all is not allowed")
        named = (("frame", frame), ("row", row), ("col", col), ("source", source),
                 ("scores", scores), ("saliency", saliency), ("group", group))
        for name, t in named:
            if t is not None and t.shape != (n,):
                raise StrategyContractError(f"pre-LLM replace: {name} must have shape ({n},), got {tuple(t.shape)}")
        check_riders("pre-LLM replace", self.riders, riders, (n,))
        if keys is not None and (keys.dim() != 2 or keys.shape[0] != n):
            raise StrategyContractError(f"pre-LLM replace: keys must be ({n}, head_dim), got {tuple(keys.shape)}")
        self.features = features.to(self.features.dtype)
        self.frame, self.row, self.col, self.source = frame.long(), row.long(), col.long(), source.long()
        self.scores, self.keys, self.saliency = scores, keys, saliency
        self.group = None if group is None else group.long()
        self.riders = None if riders is None else riders.to(self.riders.dtype)

    def frame_grid(self, strategy: str) -> Tensor:
        """(frames, h*w) token indices, for strategies that need every frame's full grid in raster order
        (the untouched pre-LLM layout); raises naming ``strategy`` otherwise."""
        from tokcomp.errors import ConfigError

        (h, w), frames = self.grid, self.num_frames
        if h * w == 0 or self.num_tokens != frames * h * w:
            raise ConfigError(f"strategy {strategy!r} needs every frame's full token grid (put it first at pre_llm)")
        grid = torch.arange(self.num_tokens, device=self.features.device).view(frames, h * w)
        raster = torch.arange(h * w, device=grid.device)
        frame_ok = (self.frame[grid] == torch.arange(frames, device=grid.device)[:, None]).all()
        if not (frame_ok and (self.row[grid] * w + self.col[grid] == raster).all()):
            raise ConfigError(f"strategy {strategy!r} needs tokens frame by frame in raster order")
        return grid


@dataclass
class LLMState:
    """Hidden states entering one decoder layer during prefill (batch of one)."""

    layer: int
    num_layers: int
    hidden: Tensor  # (1, L, D)
    position_ids: Tensor  # (R, L): 1-D RoPE (R = 1) or M-RoPE (R = 3) positions of each entry
    visual_mask: Tensor  # (L,) bool
    last_token_attention: dict[int, Tensor] = field(default_factory=dict)  # layer -> (L,)
    kept: Tensor | None = None  # set by keep(): indices into the current sequence
    text_attention: dict[int, Tensor] = field(default_factory=dict)  # layer -> (L,), from the text after the video
    visual_group: Tensor | None = None  # (L,) long labels from VisualTokens.group, -1 for text
    prune_earlier_cache: bool = False  # set by keep(..., prune_earlier_cache=True)

    @property
    def seq_len(self) -> int:
        return self.hidden.shape[1]

    def visual_indices(self) -> Tensor:
        return torch.nonzero(self.visual_mask, as_tuple=False).flatten()

    def keep(self, indices: Tensor | list[int], prune_earlier_cache: bool = False) -> None:
        """Keep these sequence entries from this layer on; every non-visual entry must be kept.

        ``prune_earlier_cache``: also cut the KV caches of the layers before this one to the same
        entries once prefill ends (PruneVid), so decoding reads the pruned cache everywhere."""
        idx = _as_index(indices, self.seq_len, f"inner-LLM keep at layer {self.layer}").to(self.visual_mask.device)
        idx, _ = torch.sort(idx)
        dropped = torch.ones(self.seq_len, dtype=torch.bool, device=idx.device)
        dropped[idx] = False
        if bool((dropped & ~self.visual_mask.to(idx.device)).any()):
            raise StrategyContractError(f"inner-LLM keep at layer {self.layer}: text tokens must never be dropped")
        self.hidden = self.hidden[:, idx]
        self.position_ids = self.position_ids[..., idx]
        self.visual_mask = self.visual_mask[idx]
        self.last_token_attention = {k: v[idx] for k, v in self.last_token_attention.items()}
        self.text_attention = {k: v[idx] for k, v in self.text_attention.items()}
        if self.visual_group is not None:
            self.visual_group = self.visual_group[idx]
        self.kept = idx if self.kept is None else self.kept[idx]
        self.prune_earlier_cache = self.prune_earlier_cache or prune_earlier_cache

    def keep_visual(self, visual: Tensor, prune_earlier_cache: bool = False) -> None:
        """``keep`` these visual entries (sequence indices) and every text entry."""
        text = torch.nonzero(~self.visual_mask, as_tuple=False).flatten()
        self.keep(torch.cat([text, visual.to(text.device)]), prune_earlier_cache)

    def set_hidden(self, hidden: Tensor) -> None:
        """Overwrite hidden-state values in place of the current ones (for merges); shape must match."""
        if hidden.shape != self.hidden.shape:
            raise StrategyContractError(
                f"inner-LLM set_hidden at layer {self.layer}: shape {tuple(hidden.shape)} != {tuple(self.hidden.shape)}"
            )
        self.hidden = hidden.to(self.hidden.dtype)


@dataclass
class DecodeState:
    """One decode step entering decoder layer ``layer`` (strategies that act on decoding, like DyCoke).

    ``attention`` is the newest token's head-averaged attention row in layer ``layer - 1`` over
    that layer's cache entries, ``positions`` their original sequence positions, ``visual`` which
    of them are visual tokens. ``select`` restricts what layers >= ``layer`` read for this step.
    """

    layer: int
    step: int
    attention: Tensor  # (M,)
    positions: Tensor  # (M,) long
    visual: Tensor  # (M,) bool
    selected: Tensor | None = None  # original positions read this step, set by select()

    def select(self, positions_kept: Tensor | list[int]) -> None:
        """Read only the cache entries at these original positions in this step (the cache keeps all)."""
        kept = torch.as_tensor(positions_kept, dtype=torch.long).flatten().to(self.positions.device)
        known = torch.isin(kept, self.positions)
        if not bool(known.all()):
            raise StrategyContractError(f"decode select at layer {self.layer}: unknown positions {kept[~known].tolist()[:8]}")
        if torch.unique(kept).numel() != kept.numel():
            raise StrategyContractError(f"decode select at layer {self.layer}: positions must be unique")
        if not bool(torch.isin(self.positions[~self.visual], kept).all()):
            raise StrategyContractError(f"decode select at layer {self.layer}: non-visual entries must never be dropped")
        self.selected = torch.sort(kept).values
