"""One generic test over the whole registry: every built-in strategy runs on the tiny model, keeps
the text, produces a valid sequence, keeps to its declared schedule or budget, and leaves the model
bit-exact once removed. A new strategy whose defaults do not fit the tiny model must say so here."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import run_with
from tokcomp.plan import PlannedTokens, ScheduleUnknown, plan_ledger
from tokcomp.plugins import Plugins

# Parameters for the tiny model (4 vision layers, 4 decoder layers) where the official defaults do not fit.
TINY_PARAMS = {
    "earlytom.frame_merge": {"layers": [1, 2]},
    "earlytom.decoupled_select": {"score_layer": -1},
    "holitom.inner_merge": {"layer": 2},
    "prunevid.inner": {"layer": 1},
    "pyramiddrop": {"layers": [1, 3]},
    "tome": {"merge_total": 15},  # 64 -> 49 tokens per frame, a 7x7 grid the adapter pools to 4x4
}
NEW_TOKENS = 4
ALL = sorted(Plugins().strategies)


@pytest.fixture(scope="module")
def reference(tiny, pixels):
    return run_with(tiny, pixels, [], max_new_tokens=NEW_TOKENS)


def test_every_tiny_override_names_a_registered_strategy():
    assert set(TINY_PARAMS) <= set(ALL)


def _no_hooks_left(adapter) -> bool:
    modules = [*adapter.language_model.layers, *adapter._vision().encoder.layers]
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in modules)


@pytest.mark.parametrize("name", ALL)
def test_strategy_runs_keeps_text_and_leaves_no_trace(name, plugins, tiny, pixels, reference):
    strategy = plugins.strategy(name).from_params(TINY_PARAMS.get(name, {}))
    strategy.check(tiny.info)
    out = run_with(tiny, pixels, [strategy], max_new_tokens=NEW_TOKENS)
    ledger = out.ledger

    # a valid sequence: text kept, tokens only ever removed, finite logits, the requested tokens decoded
    assert ledger.text_tokens == reference.ledger.text_tokens
    assert all(n > ledger.text_tokens for n in ledger.llm_layers)
    assert all(a >= b for a, b in zip(ledger.llm_layers, ledger.llm_layers[1:], strict=False))
    assert ledger.llm_layers[0] <= reference.ledger.llm_layers[0]
    assert 0 < ledger.retained_ratio <= 1
    assert torch.isfinite(out.prefill_logits).all()
    assert len(out.new_ids) == NEW_TOKENS

    # its schedule: the declared one exactly, or within the nominal budget (one rounding per frame)
    try:
        planned = plan_ledger(tiny.info, ledger.input_frames, ledger.text_tokens, [strategy])
    except ScheduleUnknown:
        planned = None
    if planned is not None:
        planned.new_tokens = ledger.new_tokens
        assert ledger.to_dict() == planned.to_dict()
    elif callable(getattr(strategy, "nominal_pre_llm", None)):
        budget = PlannedTokens([tiny.info.pooled_grid[0] * tiny.info.pooled_grid[1]] * ledger.input_frames, 1,
                               tiny.info.pooled_grid)
        strategy.nominal_pre_llm(tiny.info, budget)
        assert ledger.visual_tokens_after_pre_llm <= budget.total + ledger.input_frames

    # removal: no hooks left on the model, and the uncompressed run is bit-exact again
    assert _no_hooks_left(tiny)
    after = run_with(tiny, pixels, [], max_new_tokens=NEW_TOKENS)
    assert after.new_ids == reference.new_ids
    assert torch.equal(after.prefill_logits, reference.prefill_logits)


@pytest.mark.parametrize("name", ALL)
def test_strategy_respects_its_retention_ratio(name, plugins, tiny, pixels):
    """Strategies whose ``ratio`` is a retention fraction of the visual tokens keep about that fraction."""
    cls = plugins.strategy(name)
    if "ratio" not in cls.parameters() or name in RATIO_IS_NOT_RETENTION:
        pytest.skip(f"{name} has no parameter that is a retention ratio")
    params = TINY_PARAMS.get(name, {}) | {"ratio": 0.5}
    ledger = run_with(tiny, pixels, [cls.from_params(params)], max_new_tokens=1).ledger
    visual_in = ledger.visual_tokens_before_pre_llm
    alive = [n - ledger.text_tokens for n in ledger.llm_layers]
    frames, per_frame = ledger.input_frames, tiny.info.pooled_grid[0] * tiny.info.pooled_grid[1]
    if cls.hook_points() == ["inner_llm"]:  # acts inside the LLM: the last layer sees about half
        assert alive[-1] <= math.ceil(visual_in * 0.5) + 1
    else:
        assert ledger.visual_tokens_after_pre_llm <= math.ceil(frames * per_frame * 0.5) + frames + 1


# ratio means something else for these: fraction merged away (HoliTom inner), per-stage fraction (PDrop),
RATIO_IS_NOT_RETENTION = {"holitom.inner_merge", "pyramiddrop"}
