"""Fidelity of a compressed run against the uncompressed one on the same model and input.

With random weights these are a proxy (the distributions are nearly flat); with real checkpoints
they are what a user wants to see before spending hours on benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def next_token_kl(reference_logits: Tensor, logits: Tensor) -> float:
    """KL(P_ref || P) of the next-token distributions at the end of prefill, in nats (float64)."""
    p = torch.log_softmax(reference_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return float(torch.sum(p.exp() * (p - q)).clamp_min(0.0))


def top1_agreement(reference_ids: list[int], predicted_ids: list[int]) -> float:
    """Share of steps where the teacher-forced model's argmax equals the reference token."""
    n = min(len(reference_ids), len(predicted_ids))
    if n == 0:
        return 0.0
    return sum(a == b for a, b in zip(reference_ids[:n], predicted_ids[:n], strict=True)) / len(reference_ids)


def fidelity_metrics(baseline: Any, out: Any, teacher_forced_ids: list[int]) -> dict[str, float]:
    """``baseline`` holds prefill_logits, new_ids, text; ``out`` the compressed run's free generation."""
    return {
        "fidelity.kl": next_token_kl(baseline.prefill_logits, out.prefill_logits),
        "fidelity.top1_agreement": top1_agreement(baseline.new_ids, teacher_forced_ids),
        "fidelity.exact_match": float(out.new_ids == baseline.new_ids and out.text == baseline.text),
    }
