"""The one order of events of a compressed forward pass, for every model family.

video -> vision layers (intra-encoder hook) -> vision-to-LLM tokens (pre-LLM hook) -> splice into
the prompt -> prefill (inner-LLM hooks) -> greedy decode (decode hooks).

The pipeline alone writes the token ledger, runs the stage clock and the decoding loop, builds
the spliced sequence and its position ids, and re-emits the model's special tokens (strategies
never see them). A model is reached only through the primitives of ``tokcomp.adapter``; a
counting adapter (``tokcomp.counting``) runs this same code on shapes alone, so a planned ledger
and a recorded one come from one writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokcomp.adapter import ModelAdapter, VideoInput
from tokcomp.decoding import attach_decoder_hooks
from tokcomp.ledger import TokenLedger, VisionLayerEntry, vision_stat_record
from tokcomp.ops.attention import head_mean, mean_query_saliency, received_attention
from tokcomp.stack import CompressionStack
from tokcomp.state import EncoderState, StrategyContractError, VisualTokens
from tokcomp.statistics import VISION
from tokcomp.timing import StageClock

VISION_STATISTICS = {stat.name: stat.field for stat in VISION}  # registry name -> EncoderState field (adapter key)


@dataclass
class RunOutput:
    """What one forward pass + greedy decode produced."""

    new_ids: list[int]
    text: str
    prefill_logits: Tensor
    ledger: TokenLedger
    timings_ms: dict[str, float] = field(default_factory=dict)
    # with ``logprobs=True``: the log-softmax (vocab,) float32 before each forced id (scoring continuations)
    forced_logprobs: list[Tensor] | None = None


def _log_sizes(sizes: Tensor | None) -> Tensor | None:
    """Proportional attention: log token sizes (rows, tokens) float32, added to the key logits."""
    return None if sizes is None else torch.log(sizes.float())


def vision_statistics(adapter: ModelAdapter, index: int, state: EncoderState, names: set[str],
                      video: VideoInput) -> dict[str, Tensor]:
    """The requested statistics of one vision layer from its input (q/k recomputed, never eager attention),
    each over the attention segments the layer uses (whole rows, or windows). ``names`` and the keys of
    the result are the statistics' EncoderState fields (``attention``, ``keys``, ``saliency``)."""
    qk = adapter.vision_qk(index, state.hidden, bool(names & {"attention", "saliency"}), video, grid=state.grid)
    bias = _log_sizes(state.sizes)
    out = {}
    if "attention" in names:
        out["attention"] = received_attention(qk.q, qk.k, qk.scale, bias=bias, segments=qk.segments)
    if "keys" in names:
        out["keys"] = head_mean(qk.k)
    if "saliency" in names:
        out["saliency"] = mean_query_saliency(qk.q, qk.k, qk.scale, bias=bias)
    return out


def original_sources(video: VideoInput, frame_sources: list[list[int]], grid: tuple[int, int],
                     device: torch.device) -> Tensor:
    """Each token leaving the encoder as an index into the uncompressed video's LLM tokens, for models
    whose kept tokens keep their original positions (M-RoPE). A row stands for the earliest input frame
    it holds (merged rows take the first one's time); a cell of a coarser grid (input pooling) for the
    uncompressed cell under its centre. Unchanged rows and grids map to themselves."""
    (h, w), (H, W) = grid, video.llm_grid
    row_of = {f: r for r, frames in enumerate(video.row_frames) for f in frames}
    rows = torch.tensor([row_of[min(s)] for s in frame_sources], device=device)
    r = ((torch.arange(h, device=device) * 2 + 1) * H) // (2 * h)
    c = ((torch.arange(w, device=device) * 2 + 1) * W) // (2 * w)
    cells = (r[:, None] * W + c[None]).reshape(-1)
    return (rows[:, None] * (H * W) + cells[None]).reshape(-1)


def encode_video(adapter: ModelAdapter, video: VideoInput, stack: CompressionStack,
                 ledger: TokenLedger) -> tuple[VisualTokens, Tensor]:
    """Vision layers with the intra-encoder hook, vision-to-LLM tokens, the pre-LLM hook.

    Returns the visual content tokens and the special-token features to splice after them.
    The statistics strategies asked for are computed from each layer's input; those of the highest
    requested layer, as the hooks left them, are pooled with the features for the pre-LLM stage.
    """
    info = stack.info
    state = EncoderState(layer=-1, num_layers=info.vision_layers, hidden=adapter.embed_video(video), grid=video.grid,
                         frame_sources=[list(f) for f in video.row_frames], position="input",
                         grid_multiple=info.grid_multiple)
    ledger.input_frames = video.frames
    ledger.embedded_tokens = state.hidden.shape[0] * state.hidden.shape[1]
    if -1 in stack.encoder_layers:
        stack.intra_encoder(state)
    wanted = {attr: stack.statistics[name] for name, attr in VISION_STATISTICS.items()}
    last_wanted = {name: max(layers, default=None) for name, layers in wanted.items()}
    kept: dict[str, Tensor] = {}
    # Adapters whose layers run in their own token order (Qwen's windows) keep the states in it
    # between layers that no hook or statistic looks at; ``state.hidden`` is spatial whenever seen.
    in_order = getattr(adapter, "vision_layer_in_order", None)
    # Models that carry states of some vision layers to the LLM (Qwen3-VL's DeepStack) capture them as
    # riders right after those layers, before any hook there, so every later drop or merge applies to them.
    rider_layers = set(getattr(adapter, "vision_rider_layers", ()))
    flat: Tensor | None = None
    for i in range(info.vision_layers):
        rows, tokens = state.hidden.shape[:2]
        grid = state.grid
        pairs = adapter.vision_attention_pairs(i, rows, tokens, video, grid=grid)
        entry = VisionLayerEntry(rows, tokens, attention_pairs=pairs)
        ledger.vision_layers.append(entry)
        names = {name for name, layers in wanted.items() if i in layers}
        if flat is not None and (names or i in stack.encoder_mid_layers):
            state.hidden, flat = adapter.from_layer_order(flat, rows, tokens, video, grid=grid), None
        stats: dict[str, Tensor] = {}
        if names:
            with stack.clock.stage("token_processing"):
                stats = vision_statistics(adapter, i, state, names, video)
            ledger.attention_stats.append(vision_stat_record(names, i, rows, tokens, pairs))
        for attr in VISION_STATISTICS.values():  # this layer's statistics (None where not computed here)
            setattr(state, attr, stats.get(attr))
        if i in stack.encoder_mid_layers:
            state.hidden = adapter.vision_attention_block(i, state.hidden, _log_sizes(state.sizes), video)
            state.layer, state.position = i, "attention"
            stack.intra_encoder(state)
            entry.mlp_tokens_per_frame = state.hidden.shape[1]
            if state.hidden.shape[0] != entry.frames:
                raise StrategyContractError(f"vision layer {i}: frames cannot change between attention and MLP")
            state.hidden = adapter.vision_mlp_block(i, state.hidden, video)
        elif in_order is not None and state.sizes is None and tokens == grid[0] * grid[1] > 0:
            flat = in_order(i, adapter.to_layer_order(state.hidden, video, grid=grid) if flat is None else flat, video,
                            rows=rows, grid=grid)
            if i in stack.encoder_layers or i in rider_layers or i == info.vision_layers - 1:
                state.hidden, flat = adapter.from_layer_order(flat, rows, tokens, video, grid=grid), None
        else:
            state.hidden = adapter.vision_layer(i, state.hidden, _log_sizes(state.sizes), video, grid=grid)
        state.layer, state.position = i, "layer"
        if i in rider_layers:
            state.riders = adapter.vision_riders(i, state.hidden, state.riders, video)
        if i in stack.encoder_layers:
            stack.intra_encoder(state)
        for name, at in last_wanted.items():
            if i == at and getattr(state, name) is not None:
                kept[name] = getattr(state, name)
        for name, value in kept.items():
            if value.shape[:2] != state.hidden.shape[:2]:
                raise StrategyContractError(
                    f"frames or tokens changed after vision layer {last_wanted[name]}, whose {name} a strategy needs")
    ledger.vision_out_frames, ledger.vision_out_tokens_per_frame = state.hidden.shape[:2]
    out = (adapter.vision_to_llm(state.hidden, state.grid, kept, video) if state.riders is None
           else adapter.vision_to_llm(state.hidden, state.grid, kept, video, riders=state.riders))
    tokens = VisualTokens.from_grid(out.features, out.stats, state.frame_sources, state.meta, out.riders)
    if not adapter.contiguous_positions:
        tokens.source = original_sources(video, state.frame_sources, tokens.grid, tokens.source.device)
    ledger.pooled_tokens_per_frame = tokens.grid[0] * tokens.grid[1]
    ledger.uncompressed_visual_tokens = video.rows * video.llm_grid[0] * video.llm_grid[1]
    ledger.visual_tokens_before_pre_llm = tokens.num_tokens
    if stack.has_pre_llm:
        stack.pre_llm(tokens)
    ledger.visual_tokens_after_pre_llm = tokens.num_tokens
    ledger.special_tokens = out.specials.shape[0]
    return tokens, out.specials


def prompt_visual_tokens(adapter: ModelAdapter, ledger: TokenLedger) -> int:
    """Content tokens of the prompt the splice takes ids and positions from: the uncompressed video's on
    models whose kept tokens keep their original positions (M-RoPE; ``source`` indexes that video), the
    tokens leaving the encoder on models that number a shorter prompt contiguously (LLaVA)."""
    return ledger.visual_tokens_before_pre_llm if adapter.contiguous_positions else ledger.uncompressed_visual_tokens


@dataclass
class Splice:
    """The prompt with the kept visual tokens: embeddings, position ids (R, L), which entries are visual.

    ``riders``: the kept tokens' riders (Qwen3-VL's DeepStack features), one row per visual entry in
    sequence order (the order of ``visual_mask``'s True entries); None when the model has none."""

    embeds: Tensor
    positions: Tensor
    visual_mask: Tensor
    visual_group: Tensor
    text_tokens: int
    riders: Tensor | None = None


def _interleaved_order(slots: Tensor, uncompressed: int, source: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where each entry of the spliced sequence comes from, for placeholders interleaved with text.

    The placeholders form runs (one per Qwen3-VL row, between its timestamp and vision markers); every
    text id is kept in place, and a kept token goes into the run that holds its source slot, in the
    tokens' own order within the run, followed by the run's special tokens. Returns the index into the
    prompt ids of every entry, its kind (0 text, 1 visual token, 2 special) and the visual tokens'
    order (token indices as they appear). With one run this is the contiguous splice."""
    device = slots.device
    n, s = source.numel(), slots.numel() - uncompressed
    is_slot = torch.zeros(length, dtype=torch.bool, device=device)
    is_slot[slots] = True
    new_run = torch.ones(slots.numel(), dtype=torch.long, device=device)
    new_run[1:] = (slots[1:] != slots[:-1] + 1).long()
    run = torch.cumsum(new_run, 0) - 1
    run_start = slots[new_run.bool()]
    text = torch.nonzero(~is_slot, as_tuple=False).flatten()
    stride = max(n, s) + 1
    keys = torch.cat([text * 3 * stride,
                      run_start[run[source]] * 3 * stride + stride + torch.arange(n, device=device),
                      run_start[run[uncompressed:]] * 3 * stride + 2 * stride + torch.arange(s, device=device)])
    where = torch.cat([text, slots[source], slots[uncompressed:]])
    kind = torch.cat([torch.zeros_like(text), torch.ones(n, dtype=torch.long, device=device),
                      torch.full((s,), 2, dtype=torch.long, device=device)])
    token = torch.cat([torch.full_like(text, -1), torch.arange(n, device=device), torch.full((s,), -1, device=device)])
    order = torch.argsort(keys)
    kind = kind[order]
    return where[order], kind, token[order][kind == 1]


def splice(adapter: ModelAdapter, video: VideoInput, prompt: str, tokens: VisualTokens, specials: Tensor,
           uncompressed: int) -> Splice:
    """Kept visual tokens and the special tokens into the prompt built for ``uncompressed`` tokens.

    Kept tokens keep their original position ids (columns of the uncompressed prompt's positions)
    when the strategy says so or the model's positions are a grid (M-RoPE); otherwise they are
    numbered contiguously, as LLaVA numbers its (shorter) prompt. When the prompt interleaves text with
    the placeholders (``PromptLayout.slots``), every text id stays and each kept token goes into its
    own row's run (``_interleaved_order``).
    """
    n, s = tokens.num_tokens, specials.shape[0]
    layout = adapter.prompt(prompt, video, uncompressed + s)
    start, full = layout.start, layout.ids.shape[1]
    device = layout.ids.device
    if tokens.original_positions and adapter.contiguous_positions and n > 1 and bool(
            (tokens.source[1:] <= tokens.source[:-1]).any()):
        raise StrategyContractError("pre-LLM: original_positions on a 1-D RoPE model needs the tokens in "
                                    "ascending source order (positions would run backwards)")
    riders = tokens.riders
    if layout.slots is None:
        after = start + uncompressed
        index = torch.cat([torch.arange(start, device=device), start + tokens.source.to(device),
                           torch.arange(after, full, device=device)])
        ids = layout.ids[:, index]
        embeds = adapter.embed_tokens(ids)
        embeds[0, start : start + n] = tokens.features.to(embeds.dtype)
        if s:
            embeds[0, start + n : start + n + s] = specials.to(embeds.dtype)
        visual_mask = torch.zeros(ids.shape[1], dtype=torch.bool, device=device)
        visual_mask[start : start + n] = True
        order = None
    else:
        index, kind, order = _interleaved_order(layout.visual_slots(), uncompressed, tokens.source.to(device), full)
        ids = layout.ids[:, index]
        embeds = adapter.embed_tokens(ids)
        visual_mask = kind == 1
        embeds[0, visual_mask] = tokens.features[order.to(tokens.features.device)].to(embeds.dtype)
        if s:
            embeds[0, kind == 2] = specials.to(embeds.dtype)
        if riders is not None:
            riders = riders[order.to(riders.device)]
    length = ids.shape[1]
    if tokens.original_positions or not adapter.contiguous_positions:
        positions = adapter.full_positions(layout, video)[:, index]
    else:
        positions = torch.arange(length, device=device)[None]
    visual_group = torch.full((length,), -1, dtype=torch.long, device=device)
    if tokens.group is not None:
        group = tokens.group.to(device)
        visual_group[visual_mask] = group if order is None else group[order]
    return Splice(embeds, positions, visual_mask, visual_group, length - n - s, riders)


class _Decoder:
    """Greedy decoding with the KV cache; EOS is suppressed before ``min_new_tokens`` (as transformers does)."""

    def __init__(self, adapter: ModelAdapter, min_new_tokens: int):
        self.adapter, self.min_new_tokens, self.eos = adapter, min_new_tokens, adapter.eos_ids()

    def choose(self, logits: Tensor, step: int) -> int:
        if step < self.min_new_tokens and self.eos:
            logits = logits.float().clone()
            logits[:, sorted(self.eos)] = float("-inf")
        return int(logits.argmax(-1))

    def decode(self, cache, first: int, next_position: int, rank: int, limit: int,
               forced_ids: list[int] | None, record: list[Tensor] | None = None,
               stop: tuple[str, ...] = ()) -> list[int]:
        adapter, new_ids = self.adapter, [first]
        device = adapter.device
        for step in range(1, limit):
            if stop and any(s in adapter.decode_text(new_ids) for s in stop):
                break
            fed = forced_ids[step - 1] if forced_ids is not None else new_ids[-1]
            if forced_ids is None and fed in self.eos:
                break
            embeds = adapter.embed_tokens(torch.tensor([[fed]], device=device))
            positions = torch.full((rank, 1), next_position + step - 1, dtype=torch.long, device=device)
            logits = adapter.forward_llm(embeds, positions, cache)
            if record is not None:
                record.append(torch.log_softmax(logits[0].float(), -1).cpu())
            new_ids.append(self.choose(logits, step))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return new_ids


@dataclass
class Prefilled:
    """The state after prefill: last-position logits, the cache, the spliced prompt, the hooks."""

    logits: Tensor
    cache: object
    spliced: Splice
    hooks: object


def prefill(adapter: ModelAdapter, video: VideoInput, prompt: str, stack: CompressionStack,
            ledger: TokenLedger, clock: StageClock) -> Prefilled:
    """Everything up to the first token's logits: encode, splice, prefill with the inner-LLM hooks.

    The hooks stay attached for decoding; the caller removes them (``hooks.remove()``)."""
    with clock.stage("vision"):
        tokens, specials = encode_video(adapter, video, stack, ledger)
    spliced = splice(adapter, video, prompt, tokens, specials, prompt_visual_tokens(adapter, ledger))
    ledger.text_tokens = spliced.text_tokens
    cache = adapter.new_cache()
    # Riders that re-enter the LLM (Qwen3-VL's DeepStack: added to the output of the first decoder layers
    # at the visual entries still alive there); the adapter says which layer gets which slice.
    residuals = (adapter.decoder_riders(spliced.riders)
                 if spliced.riders is not None and hasattr(adapter, "decoder_riders") else None)
    hooks = attach_decoder_hooks(adapter, stack, cache, spliced.visual_mask, spliced.visual_group,
                                 spliced.positions, ledger, residuals)
    try:
        with clock.stage("prefill"):
            logits = adapter.forward_llm(spliced.embeds, spliced.positions, cache)
            if hooks is not None:
                hooks.end_prefill()
    except BaseException:
        if hooks is not None:
            hooks.remove()
        raise
    if not ledger.llm_layers:
        ledger.llm_layers = [spliced.embeds.shape[1]] * stack.info.llm_layers
    return Prefilled(logits, cache, spliced, hooks)


@torch.no_grad()
def run(adapter: ModelAdapter, video: VideoInput, prompt: str, stack: CompressionStack, *, max_new_tokens: int,
        min_new_tokens: int = 0, seed: int = 0, forced_ids: list[int] | None = None,
        logprobs: bool = False, stop: tuple[str, ...] = ()) -> RunOutput:
    """Encode, prefill and greedily decode; with ``forced_ids``, decode teacher-forced on those ids
    and return the model's own argmax at each step as ``new_ids`` (for fidelity), and with
    ``logprobs`` the log-probabilities each step gave (``RunOutput.forced_logprobs``). Decoding also
    ends once the text holds one of the ``stop`` strings (the text keeps it; callers cut)."""
    if logprobs and forced_ids is None:
        raise ValueError("logprobs=True needs forced_ids: the log-probabilities are those of the forced tokens")
    record: list[Tensor] | None = [] if logprobs else None
    ledger = TokenLedger()
    clock = StageClock(adapter.device)
    stack.start(seed, clock)
    decoder = _Decoder(adapter, min_new_tokens)
    done = None
    try:
        with clock.stage("ttft"):
            done = prefill(adapter, video, prompt, stack, ledger, clock)
            limit = len(forced_ids) if forced_ids is not None else max_new_tokens
            with clock.stage("prefill"):
                first = decoder.choose(done.logits, 0)
        if record is not None:  # outside the clock: scoring is no part of the time to the first token
            record.append(torch.log_softmax(done.logits[0].float(), -1).cpu())
        with clock.stage("decode"):
            positions = done.spliced.positions
            new_ids = decoder.decode(done.cache, first, int(positions.max()) + 1, positions.shape[0], limit, forced_ids,
                                     record, tuple(stop))
    finally:
        if done is not None and done.hooks is not None:
            done.hooks.remove()
    ledger.new_tokens = len(new_ids)
    return RunOutput(new_ids, adapter.decode_text(new_ids), done.logits[0].detach().float().cpu().clone(), ledger,
                     _timings(clock), record)


def _timings(clock: StageClock) -> dict[str, float]:
    """The Figure-3 breakdown: exclusive time per stage, so the TTFT parts sum to the TTFT."""
    exclusive = clock.exclusive_ms()
    timings = {
        "ttft_ms": clock.inclusive_ms("ttft"),
        "vision_ms": exclusive.get("vision", 0.0),
        "token_processing_ms": exclusive.get("token_processing", 0.0),
        "prefill_ms": exclusive.get("prefill", 0.0),
        "other_ms": exclusive.get("ttft", 0.0),
        "decode_ms": exclusive.get("decode", 0.0),
    }
    timings["total_ms"] = timings["ttft_ms"] + timings["decode_ms"]
    return timings
