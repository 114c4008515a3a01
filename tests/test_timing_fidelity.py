"""TTFT parts add up, nested stages are exclusive, and fidelity metrics mean what they say."""

from __future__ import annotations

import time

import pytest
import torch

from tests.conftest import PROMPT, run_info, run_with
from tokcomp.fidelity import next_token_kl, top1_agreement
from tokcomp.pipeline import run
from tokcomp.timing import StageClock


def test_stage_clock_reports_exclusive_time_of_nested_stages():
    clock = StageClock()
    with clock.stage("outer"):
        time.sleep(0.02)
        with clock.stage("inner"):
            time.sleep(0.03)
    parts = clock.exclusive_ms()
    assert parts["outer"] >= 15 and parts["inner"] >= 25  # sleeps only ever overshoot
    assert clock.inclusive_ms("outer") == pytest.approx(parts["outer"] + parts["inner"], rel=1e-6)


def test_ttft_parts_add_up_to_the_total(plugins, tiny, pixels):
    out = run_with(tiny, pixels, [plugins.strategy("fastv").from_params({"layer": 1})])
    t = out.timings_ms
    parts = t["vision_ms"] + t["token_processing_ms"] + t["prefill_ms"] + t["other_ms"]
    assert parts == pytest.approx(t["ttft_ms"], rel=1e-6)
    assert t["token_processing_ms"] > 0 and t["decode_ms"] > 0


def test_peak_memory_sees_a_large_allocation():
    """In a fresh process: a long-lived one may serve the block from pages it already holds,
    which the resident-set peak (rightly) does not count as growth."""
    import subprocess
    import sys

    code = ("import torch; from tokcomp.timing import PeakMemory\n"
            "with PeakMemory() as m:\n    b = torch.ones(256 * 2**20 // 4); del b\nprint(m.peak_mb)")
    peak = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 200 < peak < 400


def test_kl_is_zero_for_identical_and_positive_for_different_distributions():
    logits = torch.randn(50)
    assert next_token_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)
    p, q = torch.tensor([0.0, 0.0]), torch.tensor([0.0, 1.0])
    expected = 0.5 * (torch.log(torch.tensor(0.5)) - torch.log_softmax(q, 0)).sum()
    assert next_token_kl(p, q) == pytest.approx(float(expected))


def test_top1_agreement_counts_matching_steps():
    assert top1_agreement([1, 2, 3, 4], [1, 9, 3, 4]) == 0.75
    assert top1_agreement([1, 2], []) == 0.0


def test_teacher_forced_run_of_the_uncompressed_model_agrees_fully(tiny, pixels):
    from tokcomp.stack import CompressionStack

    free = run_with(tiny, pixels, [], max_new_tokens=6)
    forced = run(tiny, pixels, PROMPT, CompressionStack([], run_info(tiny, pixels)), max_new_tokens=6,
                 min_new_tokens=6, forced_ids=free.new_ids)
    assert forced.new_ids == free.new_ids


def test_teacher_forcing_feeds_the_given_tokens_not_its_own(tiny, pixels):
    from tokcomp.stack import CompressionStack

    stack = CompressionStack([], run_info(tiny, pixels))
    free = run(tiny, pixels, PROMPT, stack, max_new_tokens=4, min_new_tokens=4)
    other = [(i + 7) % 200 for i in free.new_ids]
    forced = run(tiny, pixels, PROMPT, stack, max_new_tokens=4, min_new_tokens=4, forced_ids=other)
    assert forced.new_ids[0] == free.new_ids[0]  # the first prediction comes from prefill alone
    assert len(forced.new_ids) == 4
    ids = tiny.prompt(PROMPT, pixels, free.ledger.visual_tokens_after_pre_llm + free.ledger.special_tokens).ids
    with torch.no_grad():  # stock model on prompt + the forced first token predicts the second step
        logits = tiny.model(input_ids=torch.cat([ids, torch.tensor([[other[0]]])], dim=1),
                            pixel_values_videos=pixels.pixels[None]).logits[0, -1]
    eos = sorted(tiny.eos_ids())
    logits[eos] = float("-inf")  # min_new_tokens suppresses EOS
    assert forced.new_ids[1] == int(logits.argmax())
