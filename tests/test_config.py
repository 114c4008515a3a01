"""Bad input gets a clear error naming the bad value, before anything runs."""

from __future__ import annotations

import textwrap

import pytest

from tokcomp.config import load_experiment
from tokcomp.errors import ConfigError, InputError, TokcompError, UnknownNameError
from tokcomp.runner import ExperimentRunner


def runner_for(*overrides, path=None):
    return ExperimentRunner(load_experiment(path, ["tracking.enabled=false", "timing.warmup=0",
                                                   "input.frames=4", "generation.max_new_tokens=2", *overrides]))


def with_strategy(spec: str):
    return f"configurations.c.strategies=[{spec}]"


def test_overrides_use_dotted_keys_and_yaml_values():
    cfg = load_experiment(None, ["input.frames=8", "model.dtype=bfloat16", with_strategy("{name: fastv, params: {layer: 1}}"),
                                 "configurations.c.strategies.0.params.ratio=0.25"])
    assert cfg.input.frames == 8 and cfg.model.dtype == "bfloat16"
    assert dict(cfg.configurations.c.strategies[0].params) == {"layer": 1, "ratio": 0.25}


def test_unknown_override_key_lists_the_valid_keys():
    with pytest.raises(UnknownNameError, match="'frame'. Did you mean 'frames'.*Known: frames, generated, prompt, video"):
        load_experiment(None, ["input.frame=3"])


def test_override_with_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="input.frames=many"):
        load_experiment(None, ["input.frames=many"])


def test_unknown_key_in_yaml_file_is_rejected(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("model: {preset: tiny, wieghts: random}\n")
    with pytest.raises(UnknownNameError, match="'wieghts'. Did you mean 'weights'"):
        load_experiment(path)


def test_missing_experiment_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_experiment(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{name: poolng}", "unknown strategy 'poolng'. Did you mean 'pooling'"),
        ("{name: pooling, params: {ratoi: 0.5}}", "'ratoi'. Did you mean 'ratio'"),
        ("{name: pooling, params: {ratio: half}}", "parameter 'ratio': expected float, got str 'half'"),
        ("{name: pooling, params: {ratio: 0}}", r"ratio=0.0 is outside \(0, 1\]"),
        ("{name: uniform, params: {ratio: 1.5}}", r"ratio=1.5 is outside \(0, 1\]"),
        ("{name: fastv, params: {layer: 1.5}}", "parameter 'layer': 1.5 is neither a layer index"),
        ("{name: frame_avg, params: {layer: 0.5}}", "parameter 'layer': expected int, got float 0.5"),
        ("{name: pooling, hooks: [inner_llm]}", "'pooling' does not implement hook point 'inner_llm'"),
        ("{name: pooling, hooks: [pre_lm]}", "unknown hook point .* 'pre_lm'"),
    ],
)
def test_bad_strategy_specs_are_rejected_with_the_bad_value(spec, message):
    with pytest.raises(ConfigError, match=message):
        runner_for(with_strategy(spec))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{name: fastv, params: {layer: 4}}", "layer=4 is outside the LLM layers 1..3"),
        ("{name: fastv, params: {layer: 0}}", "layer=0 is outside the LLM layers 1..3"),
        ("{name: frame_avg, params: {layer: 9}}", "layer=9 is outside the vision layers 0..3"),
        ("{name: topk, params: {layer: -5}}", "layer=-5 is outside the vision layers"),
    ],
)
def test_layers_outside_the_model_are_rejected_before_running(spec, message):
    runner = runner_for(with_strategy(spec))
    with pytest.raises(ConfigError, match=message):
        runner.run(log=lambda _: None)


def test_unknown_model_preset_suggests_close_names():
    with pytest.raises(UnknownNameError, match="'tiney'. Did you mean 'tiny'"):
        runner_for("model.preset=tiney")


def test_video_problems_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="missing.mp4"):
        runner_for(f"input.video={tmp_path / 'missing.mp4'}").run(log=lambda _: None)
    with pytest.raises(InputError, match="fewer than the 500 requested"):
        runner_for("input.frames=500").run(log=lambda _: None)


def test_yaml_paths_resolve_relative_to_the_file(tmp_path):
    (tmp_path / "p.py").write_text("")
    path = tmp_path / "e.yaml"
    path.write_text(textwrap.dedent("""
        plugins: [p.py]
        input: {video: clip.mp4}
    """))
    cfg = load_experiment(path)
    assert cfg.plugins == [str(tmp_path / "p.py")]
    assert cfg.input.video == "clip.mp4"  # does not exist next to the file: left as given


def test_every_error_is_a_tokcomp_error():
    assert issubclass(UnknownNameError, TokcompError) and issubclass(InputError, TokcompError)


# ---- preflight: checks of the resolved config alone, before any weights or files --------------------------
def test_preflight_refuses_what_the_config_alone_shows_is_wrong(tmp_path, monkeypatch):
    from tokcomp.preflight import check_experiment

    def refused(message, *overrides, path=None):
        cfg = load_experiment(path, ["input.frames=4", *overrides])
        with pytest.raises(TokcompError, match=message):
            check_experiment(cfg, experiment_file=path)

    empty = tmp_path / "empty.yaml"
    empty.write_text("# to do\n")
    refused("'.*empty.yaml' is empty", path=empty)
    nothing = tmp_path / "nothing.yaml"
    nothing.write_text("baseline: false\n")
    refused("nothing to run", path=nothing)
    refused("input.prompt is empty", "input.prompt=")
    refused(r"context of model 'tiny' \(4096 positions\)", f"input.prompt={'y' * 5000}")
    refused("'gpu9' is not a device torch knows", "model.device=gpu9")
    refused("unknown scheme 'foo'", "tracking.uri=foo://x")
    (tmp_path / "f").write_text("")
    refused("cannot be created, '.*f' is a file", f"tracking.uri=sqlite:///{tmp_path / 'f' / 'sub' / 'm.db'}")
    refused("is a directory", f"input.video={tmp_path}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache"))
    refused("offline mode is on .* not in the cache", "model.preset=qwen2.5-vl-3b", "model.weights=pretrained")
    assert not (tmp_path / "f").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == [
        "empty.yaml", "f", "nothing.yaml"]  # nothing created


def test_preflight_passes_the_quickstart_and_counts_its_context(tmp_path):
    from pathlib import Path

    from tokcomp.preflight import check_experiment

    quickstart = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"
    description = check_experiment(load_experiment(quickstart, [f"tracking.uri=sqlite:///{tmp_path}/m.db"]),
                                   experiment_file=quickstart)
    assert description.context_length == 4096
    assert not list(tmp_path.iterdir())


def test_the_context_of_real_presets_comes_from_their_configs():
    from tokcomp.config import ModelConfig
    from tokcomp.plugins import Plugins

    plugins = Plugins()
    for preset, context in (("llava-onevision-0.5b", 32768), ("qwen2.5-vl-3b", 128000), ("qwen2.5-vl-tiny", 4096)):
        assert plugins.model(preset).describe(ModelConfig(preset=preset)).context_length == context
