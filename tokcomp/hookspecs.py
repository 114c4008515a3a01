"""The hook specifications of tokcomp (pluggy project name ``tokcomp``).

Two kinds of hooks live here.

*Registration hooks* are called once, when the plugin manager is built, on every loaded plugin
(built-in modules, entry points of group ``tokcomp``, local plugin files). They receive a
``register`` callable and add strategy classes or model presets to the registries.

*Hook points* are called by the pipeline while a model runs. Each active strategy instance of a
configuration is registered as a plugin of that configuration's own plugin manager, in the order
the YAML lists them, so hook implementations run in that order. A hook point receives a mutable
*state* object: implementations act through the state's methods (``keep``, ``replace``, ...),
which enforce the invariants (text tokens are never dropped; positions, masks and RoPE tensors are
compacted together; the token ledger is updated). Their return value is ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from tokcomp.state import DecodeState, EncoderState, LLMState, VisualTokens

PROJECT = "tokcomp"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def tokcomp_register_strategies(register: Any) -> None:
    """Register strategy classes.

    Called once per plugin manager. ``register(cls)`` takes a :class:`tokcomp.strategy.Strategy`
    subclass with a unique ``name``; registering a name twice raises ``PluginError``.
    """


@hookspec
def tokcomp_register_models(register: Any) -> None:
    """Register model presets.

    Called once per plugin manager. ``register(preset)`` takes a :class:`tokcomp.models.base.ModelPreset`
    whose ``build(spec)`` returns a model adapter.
    """


@hookspec
def tokcomp_intra_encoder(state: EncoderState) -> None:
    """Intra-encoder hook point: called after vision-encoder layer ``state.layer`` (0-based).

    It is called only at the layers some active strategy asked for: ``state.position`` says where
    exactly, ``"layer"`` after the whole layer (``Strategy.encoder_layers``), ``"input"`` at layer -1
    (after the patch and position embeddings, before layer 0; ``Strategy.encoder_layers``
    containing -1), ``"attention"`` between the layer's attention and its MLP
    (``Strategy.encoder_mid_layers``, ToMe).

    Receives the hidden states of all frames, ``state.hidden`` of shape (frames, tokens, dim), the
    layer index and the token grid, plus this layer's attention statistics when some strategy asked
    for them (``Strategy.statistics``, names from ``tokcomp.statistics``), else None:
    ``state.attention`` (``vision.attention``: mean attention each token receives, (frames, tokens)),
    ``state.keys`` (``vision.keys``: head-averaged keys, (frames, tokens, head_dim)) and
    ``state.saliency`` (``vision.saliency``: per-frame mean-query attention, (frames, tokens)).

    May merge or drop frames (``state.replace(hidden, frame_sources=...)``) or tokens; later
    layers then run on fewer rows and the ledger records it. Setting ``state.sizes`` (through
    ``replace``) turns on proportional attention (log size added to the logits) in later layers.
    Return value ignored.
    """


@hookspec
def tokcomp_pre_llm(state: VisualTokens) -> None:
    """Pre-LLM hook point: called once, after the projector and pooling, on the visual content tokens.

    The model's special tokens (LLaVA's newline, Qwen's vision start/end) are the framework's: a
    strategy never sees them, and they are kept and re-emitted around the video. Receives
    ``state.features`` (N, D) in temporal order with their geometry: ``state.frame`` (the row, frame
    or temporal patch, a token comes from), ``state.row``/``state.col`` (pooled grid position),
    ``state.source`` (index in the uncompressed sequence), and the vision statistics of the highest
    layer they were requested at, pooled like the features: ``state.scores`` (``vision.attention``),
    ``state.keys`` (``vision.keys``), ``state.saliency`` (``vision.saliency``), else None.
    Selection goes through ``state.keep(indices)``; merging through ``state.replace(features, ...)``.
    Kept tokens get contiguous positions on LLaVA unless the strategy sets
    ``state.original_positions``, and always their original (M-RoPE) positions on Qwen2.5-VL.
    Return value ignored.
    """


@hookspec
def tokcomp_inner_llm(state: LLMState) -> None:
    """Inner-LLM hook point: called during prefill, just before decoder layer ``state.layer`` runs.

    Receives the hidden states (1, L, D) entering that layer with ``state.position_ids``,
    ``state.visual_mask`` (which sequence entries are visual tokens) and the LLM statistics
    requested through ``Strategy.statistics``, layer -> one value per entry:
    ``state.last_token_attention`` (``llm.last_token``: head-averaged attention row of the last
    query) and ``state.text_attention`` (``llm.text``: attention from the text after the video, max
    over heads and queries). ``state.keep(indices)`` (or ``state.keep_visual``) drops visual tokens
    from this layer on: hidden states, position ids, RoPE tensors and masks are sliced together,
    kept tokens keep their original positions, and later layers keep a shorter KV cache so decoding
    continues. Never called on decode steps. Return value ignored.
    """


@hookspec
def tokcomp_inner_llm_decode(state: DecodeState) -> None:
    """Inner-LLM hook point, decode phase: called on every decode step before decoder layer ``state.layer``.

    Only for strategies that say so (``Strategy.decode_layers``): the prefill-only inner-LLM hook
    never touches decoding. Receives the newest token's head-averaged attention row in layer
    ``state.layer - 1`` over that layer's KV cache (``state.attention``, with each entry's original
    position and whether it is visual). ``state.select(positions)`` makes layers >= ``state.layer``
    read only those cache entries for this step (a gather; the cache keeps everything). Non-visual
    entries can never be dropped. Return value ignored.
    """
