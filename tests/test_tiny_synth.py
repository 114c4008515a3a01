"""The trained tiny model (``tiny-synth``): the bundled checkpoint loads through ``from_pretrained``,
answers the synthetic set well, and compression costs accuracy for the reasons it should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokcomp.models import TINY_SYNTH_CHECKPOINT

from tokcomp.train_tiny import TrainSettings, train

# Held-out clips the model never saw (training draws seeds 10_000_000 + step, the progress line 987_654).
HELD_OUT_SEED = 4242


def accuracy_by_type(tmp_path: Path, configurations: str, n: int) -> dict[str, dict[str, float]]:
    """Run ``tokcomp eval`` on ``n`` fresh synthetic samples; accuracy per configuration and question type."""
    from tokcomp.evaluation import Evaluation
    from tokcomp.synth import write_dataset

    data = write_dataset(tmp_path / "synth", n, seed=HELD_OUT_SEED)
    experiment = tmp_path / "eval.yaml"
    experiment.write_text(f"""
name: tiny-synth-test
model: {{preset: tiny-synth, weights: pretrained, dtype: float32}}
input: {{frames: 8}}
generation: {{max_new_tokens: 3}}
timing: {{warmup: 0}}
tracking: {{enabled: false}}
configurations: {configurations}
""")
    result = Evaluation(str(experiment), str(data)).run(log=lambda m: None, progress=False)
    return {c.name: {k[len("accuracy."):]: v for k, v in c.metrics.items() if k.startswith("accuracy.")}
            | {"all": c.metrics["accuracy"]} for c in result.configurations}


def test_the_bundled_checkpoint_is_small_and_loads_as_a_pretrained_preset():
    from tokcomp.config import load_experiment
    from tokcomp.plugins import Plugins

    folder = Path(TINY_SYNTH_CHECKPOINT)
    assert (folder / "model.safetensors").stat().st_size < 1_200_000
    assert all(t.dtype == torch.float16 for t in load_file(folder / "model.safetensors").values())
    cfg = load_experiment(None, ["model.preset=tiny-synth", "model.weights=pretrained", "input.frames=8"])
    adapter = Plugins().model("tiny-synth").build(cfg.model)
    assert adapter.model.dtype == torch.float32  # upcast on load: the runs are float32 like every tiny run
    assert adapter.info.vision_grid == (8, 8) and adapter.config.text_config.hidden_size == 96
    report = json.loads((folder / "training.json").read_text())
    assert report["settings"]["steps"] >= 1 and "uncompressed" in report["held_out"]


def test_the_trained_model_answers_held_out_clips_well_above_chance(tmp_path):
    scores = accuracy_by_type(tmp_path, "{}", 40)["uncompressed"]  # 8 of each type; chance is 25%
    # measured on 400 samples: corner 100%, order 100%, scenes 97.5%, colour 77.5% (direction: chance)
    assert scores["corner"] >= 0.85 and scores["order"] >= 0.85 and scores["scenes"] >= 0.75, scores
    assert scores["all"] >= 0.6, scores


@pytest.mark.slow
def test_compression_costs_accuracy_where_it_removes_the_information(tmp_path):
    """At 25% of the tokens: keeping 2 of 8 frames loses cuts (scene count) and which object came first,
    pooling each frame's grid keeps both; the corner square (appearance) survives either."""
    configurations = ("{frames_25: {strategies: [{name: input.frame_sampling, params: {ratio: 0.25}}]}, "
                      "pooling_25: {strategies: [{name: pooling, params: {ratio: 0.25}}]}}")
    scores = accuracy_by_type(tmp_path, configurations, 80)
    frames, pooled = scores["frames_25"], scores["pooling_25"]
    assert frames["scenes"] + 0.1 < pooled["scenes"] and frames["order"] + 0.1 < pooled["order"], scores
    assert frames["corner"] >= 0.9 and pooled["corner"] >= 0.9, scores


def test_training_is_deterministic_for_a_seed(tmp_path):
    settings = TrainSettings(steps=2, batch=4, eval_every=2, eval_samples=10, warmup=1, frames=8)
    first = train(tmp_path / "a", settings, log=lambda m: None)
    second = train(tmp_path / "b", settings, log=lambda m: None)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first["history"] == second["history"]
    other = train(tmp_path / "c", TrainSettings(**{**settings.__dict__, "seed": 1}), log=lambda m: None)
    assert other["history"] != first["history"] or not all(
        torch.equal(a[k], load_file(tmp_path / "c" / "model.safetensors")[k]) for k in a)
