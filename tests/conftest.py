"""Shared fixtures: one tiny model, one generated clip and one MLflow store per test session."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tokcomp.plugins import Plugins
from tokcomp.video import generate_video, uniform_frame_indices

PROMPT = "What happens in the video?"


def model_spec(**overrides):
    spec = dict(weights="random", dtype="float32", device="cpu", attn_implementation="sdpa", image_size=None, seed=0)
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


def run_with(adapter, pixels, strategies, max_new_tokens=6, **kw):
    from tokcomp.stack import CompressionStack

    stack = CompressionStack(strategies, adapter.info)
    try:
        return adapter.run(pixels, PROMPT, stack, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kw)
    finally:
        stack.close()
