"""Declared token schedules equal what a real run records, so `tokcomp flops` needs no forward pass."""

from __future__ import annotations

import pytest

from tests.conftest import run_with
from tokcomp.plan import ScheduleUnknown, plan_ledger

CASES = [
    [],
    [("pooling", {"ratio": 0.25})],
    [("uniform", {"ratio": 0.3})],
    [("random", {"ratio": 0.5})],
    [("topk", {"ratio": 0.1})],
    [("fastv", {"layer": 2, "ratio": 0.5})],
    [("frame_avg", {"layer": 1})],
    [("holitom.inner_merge", {"layer": 2, "merge_ratio": 0.5})],
    [("frame_avg", {"layer": 0}), ("pooling", {"ratio": 0.25}), ("uniform", {"ratio": 0.5}), ("fastv", {"layer": 1, "ratio": 0.3})],
]


@pytest.mark.parametrize("spec", CASES, ids=lambda spec: "+".join(n for n, _ in spec) or "none")
def test_planned_ledger_equals_the_recorded_one(plugins, tiny, pixels, spec):
    strategies = [plugins.strategy(name).from_params(params) for name, params in spec]
    recorded = run_with(tiny, pixels, strategies, max_new_tokens=1).ledger
    planned = plan_ledger(tiny, pixels.frames, recorded.text_tokens, strategies)
    planned.new_tokens = recorded.new_tokens
    assert planned.to_dict() == recorded.to_dict()


def test_data_dependent_strategy_has_no_plan(plugins, tiny, tmp_path):
    from dataclasses import dataclass

    from tokcomp.hookspecs import hookimpl
    from tokcomp.strategy import Strategy

    @dataclass
    class Similarity(Strategy):
        name = "similarity_merge"

        def encoder_layers(self, info):
            return {0}

        @hookimpl
        def tokcomp_intra_encoder(self, state):
            pass

    with pytest.raises(ScheduleUnknown, match="'similarity_merge' has a data-dependent token schedule"):
        plan_ledger(tiny, 8, 10, [Similarity()])
