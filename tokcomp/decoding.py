"""Per-run decoder hooks: the inner-LLM hook point in prefill and decode, for any adapter.

Forward pre-hooks are registered on this model instance's decoder layers (``adapter.decoder_layers``)
for one run and removed afterwards (no class is patched). Position ids may have any rank (R, L):
1-D RoPE or M-RoPE rows are sliced together, and so are the rotary tensors (sequence on axis -2). They keep track of which entries of the prefill sequence are
still alive at every layer, so that

- prefill: hidden states, position ids, RoPE tensors and masks are sliced together when a strategy
  keeps fewer tokens, and the ``llm.*`` attention statistics strategies asked for
  (``tokcomp.statistics``) are computed beside the layer (never by switching it to eager attention);
- decode: each layer's mask matches its (possibly shorter) KV cache, and strategies that act on
  decode steps (``Strategy.decode_layers``) can restrict what later layers read for one step,
  through ``DecoderCache``'s read index (a gather; the cache keeps everything).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from tokcomp.ledger import TokenLedger
from tokcomp.ops.attention import last_query_attention, text_query_attention
from tokcomp.stack import CompressionStack
from tokcomp.state import DecodeState, LLMState, StrategyContractError
from tokcomp.statistics import STATISTICS


class DecoderCache(DynamicCache):
    """A DynamicCache whose layers can be read through an index for the current decode step."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.read_index: dict[int, Tensor] = {}

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        index = self.read_index.get(layer_idx)
        if index is None:
            return keys, values
        return keys[:, :, index], values[:, :, index]

    def cut(self, layer_idx: int, index: Tensor) -> None:
        """Keep only the entries ``index`` of one layer's cache (PruneVid's pruning of earlier layers)."""
        layer = self.layers[layer_idx]
        layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]


def attach_decoder_hooks(adapter: Any, stack: CompressionStack, cache: DecoderCache, visual_mask: Tensor,
                         visual_group: Tensor, positions: Tensor, ledger: TokenLedger,
                         residuals: dict[int, Tensor] | None = None) -> DecoderHooks | None:
    """Register the hooks on the adapter's decoder layers when a strategy needs them, or when visual
    ``residuals`` must be added to some layers' outputs during prefill (else None).

    ``residuals``: decoder layer -> (N, D), one row per visual entry of the prefill sequence (in
    sequence order), added to that layer's output at the visual entries alive there (Qwen3-VL's
    DeepStack), so the injection follows every inner-LLM drop made at or before that layer."""
    statistics = (layers for name, layers in stack.statistics.items() if STATISTICS[name].where == "llm")
    strategies = bool(stack.llm_layers or stack.decode_layers or any(statistics))
    if not (strategies or residuals):
        return None
    hooks = DecoderHooks(adapter, stack, cache, visual_mask, visual_group, positions, ledger)
    layers = adapter.decoder_layers
    if strategies:
        hooks.handles = [layer.register_forward_pre_hook(hooks.hook_for(i), with_kwargs=True)
                         for i, layer in enumerate(layers)]
    for i, residual in (residuals or {}).items():
        if residual.shape[0] != int(visual_mask.sum()):
            raise StrategyContractError(f"decoder layer {i}: {residual.shape[0]} visual residuals for "
                                        f"{int(visual_mask.sum())} visual entries")
        hooks.handles.append(layers[i].register_forward_hook(hooks.residual_hook(residual)))
    return hooks


def last_token_attention(adapter: Any, layer: Any, hidden: Tensor, position_embeddings: Any,
                         past_keys: Tensor | None = None) -> Tensor:
    """Head-averaged attention row of the last entry over every key (and the cache's, when given)."""
    last = torch.full((1,), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)  # no host-to-device copy
    qk = adapter.decoder_qk(layer, hidden, position_embeddings, last, past_keys)
    return last_query_attention(qk.q[:, 0], qk.k, qk.scale)


def text_attention(adapter: Any, layer: Any, hidden: Tensor, position_embeddings: Any, query_idx: Tensor) -> Tensor:
    """Attention from the entries ``query_idx`` (causal) to every entry, max over heads and queries."""
    qk = adapter.decoder_qk(layer, hidden, position_embeddings, query_idx)
    return text_query_attention(qk.q, qk.k, query_idx, qk.scale)


class DecoderHooks:
    """One run's hook state: which prefill entries are alive per layer, statistics, decode step."""

    def __init__(self, adapter: Any, stack: CompressionStack, cache: DecoderCache, visual_mask: Tensor,
                 visual_group: Tensor, positions: Tensor, ledger: TokenLedger):
        self.adapter, self.stack, self.cache, self.ledger = adapter, stack, cache, ledger
        self.visual_mask, self.visual_group, self.positions = visual_mask, visual_group, positions
        self.full_len = visual_mask.numel()
        self.num_layers = len(adapter.decoder_layers)
        self.alive: Tensor | None = None  # indices into the full prefill sequence
        self.alive_at: dict[int, Tensor] = {}
        self.attention: dict[int, Tensor] = {}
        self.text_attention: dict[int, Tensor] = {}
        self.cut_before: tuple[int, Tensor] | None = None  # (layer, alive): prune the caches below layer
        self.prefill = True
        self.step = 0
        self.decode_attention: Tensor | None = None
        self.handles: list = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.cache is not None:
            self.cache.read_index = {}

    def hook_for(self, index: int):
        def hook(module, args, kwargs):
            if self.prefill:
                return self._prefill(index, module, args, kwargs)
            return self._decode(index, module, args, kwargs)
        return hook

    def residual_hook(self, residual: Tensor):
        """A forward hook adding ``residual`` rows to the layer's output at the alive visual entries (prefill only)."""
        token_of = torch.cumsum(self.visual_mask.long(), 0) - 1  # full sequence entry -> visual token row

        def hook(module, args, output):
            if not self.prefill:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            alive = self.alive if self.alive is not None else torch.arange(hidden.shape[1], device=self.visual_mask.device)
            visual = self.visual_mask[alive]
            rows = token_of[alive[visual]]
            hidden = hidden.clone()
            visual = visual.to(hidden.device)
            hidden[0, visual] = hidden[0, visual] + residual[rows.to(residual.device)].to(hidden.device, hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    # ---- prefill ---------------------------------------------------------------------------------
    @staticmethod
    def _slice_kwargs(kwargs: dict, idx: Tensor) -> dict:
        kwargs = dict(kwargs)
        if isinstance(kwargs.get("position_ids"), Tensor):
            kwargs["position_ids"] = kwargs["position_ids"][..., idx]
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cos[..., idx, :], sin[..., idx, :])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor):
            kwargs["attention_mask"] = mask[..., idx, :][..., idx]
        return kwargs

    def _prefill(self, index: int, module, args, kwargs):
        if not args:  # hidden states passed by keyword: move them to the front
            args, kwargs = (kwargs["hidden_states"],), {k: v for k, v in kwargs.items() if k != "hidden_states"}
        hidden = args[0]
        full_kwargs = kwargs
        if self.alive is not None:
            kwargs = self._slice_kwargs(full_kwargs, self.alive)
        if index in self.stack.llm_layers:
            alive = self.alive if self.alive is not None else torch.arange(self.full_len, device=self.visual_mask.device)
            state = LLMState(layer=index, num_layers=self.num_layers, hidden=hidden, position_ids=self.positions[:, alive],
                             visual_mask=self.visual_mask[alive], last_token_attention=dict(self.attention),
                             text_attention=dict(self.text_attention), visual_group=self.visual_group[alive])
            self.stack.inner_llm(state)
            hidden = state.hidden
            self.attention, self.text_attention = state.last_token_attention, state.text_attention
            if state.kept is not None:
                self.alive = alive[state.kept]
                kwargs = self._slice_kwargs(full_kwargs, self.alive)
                if state.prune_earlier_cache:
                    self.cut_before = (index, self.alive)
        self._statistics(index, module, hidden, kwargs["position_embeddings"])
        if self.alive is not None:
            self.alive_at[index] = self.alive
        self.ledger.llm_layers.append(hidden.shape[1])
        return (hidden, *args[1:]), kwargs

    def _statistics(self, index: int, module, hidden: Tensor, position_embeddings) -> None:
        if index in self.stack.statistics["llm.last_token"]:
            with self.stack.clock.stage("token_processing"):
                self.attention[index] = last_token_attention(self.adapter, module, hidden, position_embeddings)
            self.ledger.attention_stats.append({"where": "llm", "layer": index, "seq": hidden.shape[1]})
        if index in self.stack.statistics["llm.text"]:
            alive = self.alive if self.alive is not None else torch.arange(self.full_len, device=self.visual_mask.device)
            visual = torch.nonzero(self.visual_mask[alive], as_tuple=False).flatten()
            if visual.numel() == 0:
                return
            queries = torch.arange(int(visual.max()) + 1, hidden.shape[1], device=hidden.device)
            if queries.numel() == 0:
                raise StrategyContractError(f"decoder layer {index}: no text after the video to score it with")
            with self.stack.clock.stage("token_processing"):
                self.text_attention[index] = text_attention(self.adapter, module, hidden, position_embeddings, queries)
            self.ledger.attention_stats.append({"where": "llm_text", "layer": index, "seq": hidden.shape[1],
                                                "queries": queries.numel()})

    def end_prefill(self) -> None:
        """Apply a requested cut of the earlier layers' caches; from now on the hooks serve decoding."""
        if self.cut_before is not None and self.cache is not None:
            layer, alive = self.cut_before
            for j in range(layer):
                before = self.alive_at.get(j, torch.arange(self.full_len, device=alive.device))
                self.cache.cut(j, _positions_in(before, alive))
                self.alive_at[j] = alive
            self.ledger.cache_lengths = [self.alive_at[j].numel() if j in self.alive_at else n
                                         for j, n in enumerate(self.ledger.llm_layers)]
        self.prefill = False

    # ---- decode ----------------------------------------------------------------------------------
    def _entries(self, index: int, device) -> Tensor:
        """Prefill positions held by layer ``index``'s cache, then the decoded tokens before this step."""
        alive = self.alive_at.get(index, torch.arange(self.full_len, device=device))
        return torch.cat([alive.to(device), torch.arange(self.full_len, self.full_len + self.step - 1, device=device)])

    def _decode(self, index: int, module, args: tuple, kwargs: dict):
        if not args:
            args, kwargs = (kwargs["hidden_states"],), {k: v for k, v in kwargs.items() if k != "hidden_states"}
        hidden = args[0]
        if index == 0:
            self.step += 1
            self.cache.read_index = {}
        if index + 1 in self.stack.decode_layers:
            past = self.cache.layers[index].keys if index < len(self.cache.layers) else None
            self.decode_attention = last_token_attention(self.adapter, module, hidden, kwargs["position_embeddings"], past)
        if index in self.stack.decode_layers:
            self._decode_hook(index, hidden.device)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and (index in self.alive_at or index in self.cache.read_index):
            # built on the device (``torch.tensor(..., device=cuda)`` would be a blocking copy, a sync per layer)
            read = torch.cat([self._entries(index, hidden.device),
                              torch.full((1,), self.full_len + self.step - 1, dtype=torch.long, device=hidden.device)])
            index_read = self.cache.read_index.get(index)
            if index_read is not None:
                read = read[index_read]
            kwargs = dict(kwargs)
            if mask.shape[-1] == self.full_len + self.step:
                kwargs["attention_mask"] = mask[..., read.to(mask.device)]
            else:  # built from a cut layer 0's length; one unpadded sequence, so every key is visible
                kwargs["attention_mask"] = mask[..., -1:].expand(*mask.shape[:-1], read.numel())
        return args, kwargs

    def _decode_hook(self, index: int, device) -> None:
        before = self._entries(index - 1, device)
        current = torch.full((1,), self.full_len + self.step - 1, dtype=torch.long, device=device)
        positions = torch.cat([before, current])
        visual = torch.zeros(positions.numel(), dtype=torch.bool, device=device)
        prompt = positions < self.full_len
        visual[prompt] = self.visual_mask.to(device)[positions[prompt]]
        state = DecodeState(layer=index, step=self.step, attention=self.decode_attention, positions=positions,
                            visual=visual)
        self.stack.inner_llm_decode(state)
        if state.selected is None:
            return
        holds = []  # checked together below: one host sync per step, not one per layer
        for j in range(index, self.num_layers):
            held = torch.cat([self._entries(j, device), current])
            holds.append(torch.isin(state.selected, held).all())
            self.cache.read_index[j] = _positions_in(held, state.selected)
        holds_all = torch.stack(holds)
        if not bool(holds_all.all()):
            self.cache.read_index = {}
            j = index + int(torch.nonzero(~holds_all)[0])
            raise StrategyContractError(f"decode select at layer {index}: layer {j} no longer holds every selected entry")


def _positions_in(held: Tensor, wanted: Tensor) -> Tensor:
    """Indices into ``held`` (ascending unique positions) of the entries ``wanted`` (a subset)."""
    return torch.searchsorted(held.to(wanted.device), wanted)
