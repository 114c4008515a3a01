"""Shared fixtures: one tiny model, one generated clip and one MLflow store per test session."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from tokcomp.plugins import Plugins
from tokcomp.video import generate_video, uniform_frame_indices

PROMPT = "What happens in the video?"
# Where the tiny models are built: cpu here and in CI; benchmarks/gpu_check.py runs the tiny-model suite
# with TOKCOMP_TEST_DEVICE=cuda (and TOKCOMP_TEST_ATTN=eager as a second pass) on a GPU machine.
TEST_DEVICE = os.environ.get("TOKCOMP_TEST_DEVICE", "cpu")
TEST_ATTN = os.environ.get("TOKCOMP_TEST_ATTN", "sdpa")


def model_spec(**overrides):
    spec = dict(weights="random", dtype="float32", device=TEST_DEVICE, attn_implementation=TEST_ATTN, image_size=None,
                seed=0)
    spec.update(overrides)
    return SimpleNamespace(**spec)


@pytest.fixture(scope="session")
def plugins() -> Plugins:
    return Plugins()


@pytest.fixture(scope="session")
def tiny(plugins):
    return plugins.model("tiny").build(model_spec())


@pytest.fixture(scope="session")
def frames() -> torch.Tensor:
    clip, _ = generate_video(length=48, height=64, width=64, shots=2, seed=1)
    return clip[uniform_frame_indices(48, 8)]


@pytest.fixture(scope="session")
def pixels(tiny, frames) -> torch.Tensor:
    return tiny.preprocess(frames)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    """One sqlite store for the whole session: creating one runs migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def run_info(adapter, video):
    """The model's ModelInfo for this video (grids per run)."""
    return adapter.info.for_video(video.grid, video.llm_grid)


def run_with(adapter, video, strategies, max_new_tokens=6, **kw):
    from tokcomp.pipeline import run
    from tokcomp.stack import CompressionStack

    stack = CompressionStack(strategies, run_info(adapter, video))
    try:
        return run(adapter, video, PROMPT, stack, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kw)
    finally:
        stack.close()


def causal_mask(hidden: torch.Tensor) -> torch.Tensor:
    """An explicit additive causal mask (1, 1, L, L) for calling decoder layers by hand: sdpa treats a
    missing mask as causal, eager attention as no mask at all, so a reference must say it."""
    length = hidden.shape[1]
    blocked = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
    return torch.zeros(length, length, dtype=hidden.dtype, device=hidden.device).masked_fill(
        blocked, torch.finfo(hidden.dtype).min)[None, None]


class ManualPrefill:
    """A hand-written prefill of the uncompressed prompt, for reference checks of inner-LLM strategies:
    ``run_to(k)`` runs decoder layers 0..k-1 on every token; ``finish(keep, k)`` runs the rest on the
    kept sequence entries at their original positions and returns the last position's logits."""

    def __init__(self, adapter, video):
        from tokcomp.ledger import TokenLedger
        from tokcomp.pipeline import encode_video
        from tokcomp.stack import CompressionStack

        self.adapter, self.lm = adapter, adapter.language_model
        tokens, specials = encode_video(adapter, video, CompressionStack([], run_info(adapter, video)), TokenLedger())
        layout = adapter.prompt(PROMPT, video, tokens.num_tokens + specials.shape[0])
        ids, self.start = layout.ids, layout.start
        self.num_visual, self.length = tokens.num_tokens, ids.shape[1]
        self.hidden = self.lm.embed_tokens(ids)
        self.hidden[0, self.start : self.start + self.num_visual] = tokens.features
        self.hidden[0, self.start + self.num_visual : self.start + self.num_visual + specials.shape[0]] = specials
        self.pos = torch.arange(self.length, device=self.hidden.device)[None]
        self.cos, self.sin = self.lm.rotary_emb(self.hidden, self.pos)

    @property
    def visual(self) -> list[int]:
        return list(range(self.start, self.start + self.num_visual))

    def text_around(self, kept_visual: list[int]) -> torch.Tensor:
        """Sorted sequence indices: all text entries plus the given visual ones."""
        after = range(self.start + self.num_visual, self.length)
        return torch.tensor(sorted([*range(self.start), *kept_visual, *after]))

    def run_to(self, k: int) -> torch.Tensor:
        """Runs layers < k; returns the last-token attention row of layer k-1 (the strategies' score)."""
        h = self.hidden
        for layer in self.lm.layers[:k]:
            h_in = h
            h = layer(h, attention_mask=causal_mask(h), position_embeddings=(self.cos, self.sin), position_ids=self.pos)
        self.hidden = h
        from tokcomp.decoding import last_token_attention

        return last_token_attention(self.adapter, self.lm.layers[k - 1], h_in, (self.cos, self.sin))

    def finish(self, keep: torch.Tensor, k: int) -> torch.Tensor:
        h, cos, sin, pos = self.hidden[:, keep], self.cos[:, keep], self.sin[:, keep], self.pos[:, keep]
        for layer in self.lm.layers[k:]:
            h = layer(h, attention_mask=causal_mask(h), position_embeddings=(cos, sin), position_ids=pos)
        return self.adapter.model.lm_head(self.lm.norm(h))[0, -1].cpu()  # where RunOutput.prefill_logits is
