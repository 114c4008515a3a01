"""The conformance suite: every registered strategy on every tiny model adapter.

For each (adapter, strategy) pair the strategy either runs, keeping the text, producing a valid
sequence, keeping to its declared schedule (planned ledger == recorded ledger) or its nominal
budget and its retention ratio, and leaving the model bit-exact once removed; or the model lacks a
capability the strategy needs, and that is a clear error naming both before any forward pass.
A new strategy whose defaults do not fit the tiny models must say so here.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import model_spec, run_info, run_with
from tokcomp.errors import ConfigError
from tokcomp.plan import PlannedTokens, ScheduleUnknown, plan_ledger
from tokcomp.plugins import Plugins
from tokcomp.video import generate_video, uniform_frame_indices

# Parameters for the tiny models (4 vision layers, 4 decoder layers) where the official defaults do not fit.
TINY_PARAMS = {
    "earlytom.frame_merge": {"layers": [1, 2]},
    "earlytom.decoupled_select": {"score_layer": -1},
    "holitom.inner_merge": {"layer": 2},
    "prunevid.inner": {"layer": 1},
    "tome": {"merge_total": 15},  # 64 -> 49 tokens per frame, a 7x7 grid the adapter pools to 4x4
}
# Where one tiny model's geometry needs other values: llava-video-tiny has 7x7 = 49 patches per frame.
ADAPTER_PARAMS = {"llava-video-tiny": {"tome": {"merge_total": 13}}}  # 49 -> 36, a 6x6 grid pooled to 3x3
NEW_TOKENS = 4
ALL = sorted(Plugins().strategies)
ADAPTERS = ["tiny", "qwen2.5-vl-tiny", "qwen3-vl-tiny", "llava-video-tiny"]


@pytest.fixture(scope="module", params=ADAPTERS)
def model(request, plugins):
    """(adapter, video, uncompressed reference run) of one tiny model family."""
    adapter = plugins.model(request.param).build(model_spec())
    clip, _ = generate_video(length=48, height=64, width=64, shots=2, seed=1)
    video = adapter.preprocess(clip[uniform_frame_indices(48, 8)])
    return adapter, video, run_with(adapter, video, [], max_new_tokens=NEW_TOKENS)


def test_without_strategies_every_family_is_the_stock_model(model):
    """Exactness first: no strategy means transformers' own forward and ``generate`` on the same input."""
    from tests.test_exactness import stock_outputs

    adapter, video, reference = model
    logits, ids = stock_outputs(adapter, video, NEW_TOKENS)
    assert reference.new_ids == ids
    torch.testing.assert_close(reference.prefill_logits, logits, atol=1e-5, rtol=1e-4)


def test_every_tiny_override_names_a_registered_strategy():
    assert set(TINY_PARAMS) <= set(ALL)
    assert set(ADAPTER_PARAMS) <= set(ADAPTERS) and all(set(p) <= set(ALL) for p in ADAPTER_PARAMS.values())


def tiny_params(name: str, adapter) -> dict:
    """The strategy's tiny-model parameters, with this adapter's own values where it has them."""
    return TINY_PARAMS.get(name, {}) | ADAPTER_PARAMS.get(adapter.info.name, {}).get(name, {})


def _no_hooks_left(adapter) -> bool:
    """No forward (pre-)hook of tokcomp's (the pipeline's or a strategy's) is left on any module.

    Only hooks defined in tokcomp count: transformers' stock ``forward``/``generate`` leave their own
    output-capturing hooks on the layers (transformers.utils.output_capturing), which are not ours."""
    def origin(hook) -> str:
        return getattr(hook, "__module__", None) or getattr(getattr(hook, "func", None), "__module__", None) or ""

    return not [hook for m in adapter.model.modules()
                for hook in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
                if origin(hook).startswith("tokcomp")]


def _strategy_for(plugins, name, adapter, video):
    """The strategy with its tiny parameters, or None after checking the model rejects it clearly."""
    strategy = plugins.strategy(name).from_params(tiny_params(name, adapter))
    info = run_info(adapter, video)
    missing = strategy.required_capabilities() - info.capabilities
    if missing:
        with pytest.raises(ConfigError, match=f"{name!r} needs .*which model {info.name!r}"):
            strategy.check_model(info)
        return None
    strategy.check_model(info)
    strategy.check(info)
    return strategy


@pytest.mark.parametrize("name", ALL)
def test_strategy_runs_keeps_text_and_leaves_no_trace(name, plugins, model):
    adapter, video, reference = model
    strategy = _strategy_for(plugins, name, adapter, video)
    if strategy is None:
        return
    out = run_with(adapter, video, [strategy], max_new_tokens=NEW_TOKENS)
    ledger = out.ledger

    # a valid sequence: text and special tokens kept, tokens only ever removed, finite logits, all tokens decoded
    assert ledger.text_tokens == reference.ledger.text_tokens
    assert ledger.special_tokens == reference.ledger.special_tokens
    assert all(n > ledger.text_tokens + ledger.special_tokens for n in ledger.llm_layers)
    assert all(a >= b for a, b in zip(ledger.llm_layers, ledger.llm_layers[1:], strict=False))
    assert ledger.llm_layers[0] <= reference.ledger.llm_layers[0]
    assert 0 < ledger.retained_ratio <= 1
    assert torch.isfinite(out.prefill_logits).all()
    assert len(out.new_ids) == NEW_TOKENS

    # its schedule: the declared one exactly, or within the nominal budget (one rounding per frame)
    try:
        planned = plan_ledger(adapter, video.frames, ledger.text_tokens, [strategy], height=64, width=64)
    except ScheduleUnknown:
        planned = None
    if planned is not None:
        planned.new_tokens = ledger.new_tokens
        assert ledger.to_dict() == planned.to_dict()
    elif callable(getattr(strategy, "nominal_pre_llm", None)):
        per_frame = video.llm_grid[0] * video.llm_grid[1]
        budget = PlannedTokens([per_frame] * video.rows, video.llm_grid)
        strategy.nominal_pre_llm(run_info(adapter, video), budget)
        assert ledger.visual_tokens_after_pre_llm <= budget.total + video.rows

    # removal: no hooks left on the model, and the uncompressed run is bit-exact again
    assert _no_hooks_left(adapter)
    after = run_with(adapter, video, [], max_new_tokens=NEW_TOKENS)
    assert after.new_ids == reference.new_ids
    assert torch.equal(after.prefill_logits, reference.prefill_logits)


@pytest.mark.parametrize("name", ALL)
def test_strategy_respects_its_retention_ratio(name, plugins, model):
    """``ratio`` means one thing everywhere, the fraction of visual tokens kept, and is kept to."""
    adapter, video, _ = model
    cls = plugins.strategy(name)
    if "ratio" not in cls.parameters():
        pytest.skip(f"{name} has no parameter that is a retention ratio")
    if cls.required_capabilities() - run_info(adapter, video).capabilities:
        pytest.skip(f"{adapter.info.name} cannot serve {name}")
    params = tiny_params(name, adapter) | {"ratio": 0.5}
    ledger = run_with(adapter, video, [cls.from_params(params)], max_new_tokens=1).ledger
    visual_in = ledger.visual_tokens_before_pre_llm
    alive = [n - ledger.text_tokens - ledger.special_tokens for n in ledger.llm_layers]
    rows, per_row = video.rows, video.llm_grid[0] * video.llm_grid[1]
    if cls.hook_points() == ["inner_llm"]:  # acts inside the LLM: the last layer sees about half
        assert alive[-1] <= math.ceil(visual_in * 0.5) + 1
    else:
        assert ledger.visual_tokens_after_pre_llm <= math.ceil(rows * per_row * 0.5) + rows
