"""A battery of bad inputs through the real command line (``tokcomp.cli.main``, in-process).

For every one: a non-zero exit, exactly one line on stderr that names the bad value, no traceback,
and nothing half-written: no file appears in the working directory (no ``results/`` folder, no
``mlruns``), and the MLflow store the experiments point at gains no run (none left RUNNING). No
weights are built: each error comes from the config, the preset's weight-free description or a
file's header, before any model exists.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tokcomp.cli import main

HEX_RUN_ID = "0123456789abcdef0123456789abcdef"
LONG_PROMPT = "x" * 5000  # the tiny model's byte tokenizer: 5000 tokens, over its 4096 positions

# (id, argv, what the one stderr line must contain). In argv, {store} is the shared MLflow store's
# URI and {shared} its folder (a real short clip lives there); every other path is relative to the
# case's own empty working directory, where `fixture_files` wrote the files below.
CASES = [
    # --- the experiment file -------------------------------------------------------------------
    ("missing-file", ["run", "missing.yaml"], "'missing.yaml' does not exist"),
    ("file-is-a-directory", ["run", "adir"], "'adir' is a directory"),
    ("empty-file", ["run", "empty.yaml"], "'empty.yaml' is empty"),
    ("comments-only-file", ["run", "comments.yaml"], "'comments.yaml' is empty"),
    ("invalid-yaml", ["run", "broken.yaml"], "'broken.yaml' is not valid YAML"),
    ("list-at-top", ["run", "list.yaml"], "'list.yaml' must hold a mapping"),
    ("unknown-top-key", ["run", "typo.yaml"], "'modle'"),
    ("nothing-to-run", ["run", "nothing.yaml"], "nothing to run"),
    # --- overrides -------------------------------------------------------------------------------
    ("override-without-equals", ["run", "exp.yaml", "input.frames"], "'input.frames' is not of the form"),
    ("override-empty-key", ["run", "exp.yaml", "=4"], "'=4' is not of the form"),
    ("override-unknown-key", ["run", "exp.yaml", "input.frame=4"], "'frame'"),
    ("override-bad-yaml", ["run", "exp.yaml", "input.frames=[4"], "'input.frames=[4'"),
    ("override-wrong-type", ["run", "exp.yaml", "input.frames=abc"], "'abc'"),
    ("override-bad-index", ["run", "exp.yaml", "configurations.fastv.strategies.5.params.layer=1"], "'5'"),
    ("override-into-a-value", ["run", "exp.yaml", "input.frames.x=1"], "input.frames.x"),
    ("empty-prompt", ["run", "exp.yaml", "input.prompt="], "input.prompt is empty"),
    ("blank-prompt", ["run", "exp.yaml", "input.prompt='   '"], "input.prompt is empty"),
    ("prompt-over-context", ["run", "exp.yaml", f"input.prompt={LONG_PROMPT}"], "context of model 'tiny' (4096"),
    ("frames-over-context", ["run", "exp.yaml", "input.frames=300", "input.generated.length=300"],
     "input.frames=300"),
    ("zero-repeats", ["run", "exp.yaml", "timing.repeats=0"], "timing.repeats=0"),
    ("negative-warmup", ["run", "exp.yaml", "timing.warmup=-1"], "timing.warmup=-1"),
    ("zero-new-tokens", ["run", "exp.yaml", "generation.max_new_tokens=0"], "max_new_tokens=0"),
    ("min-over-max-tokens", ["run", "exp.yaml", "generation.min_new_tokens=50"], "min_new_tokens=50"),
    ("zero-frames", ["run", "exp.yaml", "input.frames=0"], "got 0"),
    ("negative-frames", ["run", "exp.yaml", "input.frames=-3"], "got -3"),
    ("more-frames-than-generated", ["run", "exp.yaml", "input.frames=500"], "fewer than the 500 requested"),
    ("zero-generated-height", ["run", "exp.yaml", "input.generated.height=0"], "height must be positive, got 0"),
    ("zero-generated-shots", ["run", "exp.yaml", "input.generated.shots=0"], "shots must be positive, got 0"),
    # --- strategies and parameters -----------------------------------------------------------------
    ("unknown-strategy", ["run", "exp.yaml", "configurations.fastv.strategies.0.name=fastvv"], "'fastvv'"),
    ("strategy-without-name", ["run", "exp.yaml", "configurations.x.strategies=[{params: {}}]"],
     "configurations.x.strategies.0 has no name"),
    ("unknown-parameter", ["run", "exp.yaml", "configurations.fastv.strategies.0.params.ratio2=0.5"], "'ratio2'"),
    ("ratio-above-one", ["run", "exp.yaml", "configurations.fastv.strategies.0.params.ratio=1.5"], "1.5"),
    ("ratio-zero", ["run", "exp.yaml", "configurations.p.strategies=[{name: pooling, params: {ratio: 0}}]"],
     "ratio"),
    ("ratio-not-a-number", ["run", "exp.yaml", "configurations.fastv.strategies.0.params.ratio=abc"], "'abc'"),
    ("hook-not-implemented", ["run", "exp.yaml", "configurations.p.strategies=[{name: pooling, hooks: [inner_llm]}]"],
     "inner_llm"),
    ("unknown-hook-point", ["run", "exp.yaml", "configurations.fastv.strategies.0.hooks=[pre_lm]"], "'pre_lm'"),
    # --- layers ----------------------------------------------------------------------------------------
    ("llm-layer-too-deep", ["run", "exp.yaml", "configurations.fastv.strategies.0.params.layer=7"], "layer=7"),
    ("llm-layer-too-negative", ["run", "exp.yaml", "configurations.fastv.strategies.0.params.layer=-9"], "-9"),
    ("llava-video-llm-layer-too-deep", ["run", "exp.yaml", "model.preset=llava-video-7b",
                                        "configurations.fastv.strategies.0.params.layer=28"],
     "model 'llava-video-7b': strategy 'fastv': layer=28 is outside the LLM layers 1..27"),
    ("llava-video-frames-over-context", ["run", "exp.yaml", "model.preset=llava-video-7b", "input.frames=200",
                                         "input.generated.length=200"],
     "context of model 'llava-video-7b' (32768"),
    ("vision-layer-too-deep", ["run", "exp.yaml", "configurations.f.strategies=[{name: frame_avg, params: {layer: 10}}]"],
     "10"),
    ("tome-on-qwen", ["run", "exp.yaml", "model.preset=qwen2.5-vl-tiny",
                      "configurations.f.strategies=[{name: tome, params: {r: 2}}]"], "'tome' needs vision_split"),
    # --- videos --------------------------------------------------------------------------------------------
    ("missing-video", ["run", "exp.yaml", "input.video=missing.mp4"], "'missing.mp4' does not exist"),
    ("video-is-a-directory", ["run", "exp.yaml", "input.video=adir"], "'adir' is a directory"),
    ("video-not-a-video", ["run", "exp.yaml", "input.video=notavideo.mp4"], "'notavideo.mp4'"),
    ("video-too-short", ["run", "exp.yaml", "input.video={shared}/short.mp4", "input.frames=8"],
     "fewer than the 8 requested"),
    ("qwen-one-frame", ["run", "exp.yaml", "model.preset=qwen2.5-vl-tiny", "input.frames=1"], "got 1"),
    ("qwen3-one-frame", ["run", "exp.yaml", "model.preset=qwen3-vl-tiny", "input.frames=1"], "got 1"),
    ("qwen-merge-layer-beyond-tower", ["run", "exp.yaml", "model.preset=qwen2.5-vl-tiny",
                                      "configurations.f.strategies=[{name: earlytom.frame_merge, params: {layers: [1, 9]}}]"],
     "9"),
    # --- models ----------------------------------------------------------------------------------------------
    ("unknown-preset", ["run", "exp.yaml", "model.preset=tiny2"], "'tiny2'"),
    ("pretrained-without-checkpoint", ["run", "exp.yaml", "model.weights=pretrained"], "preset 'tiny' has no public"),
    ("pretrained-offline", ["run", "exp.yaml", "model.preset=llava-onevision-0.5b", "model.weights=pretrained"],
     "'llava-hf/llava-onevision-qwen2-0.5b-ov-hf' is not in the cache"),
    ("hub-id-offline", ["run", "exp.yaml", "model.weights=nobody/no-such-model"], "'nobody/no-such-model'"),
    ("weights-missing-folder", ["run", "exp.yaml", "model.weights=./nowhere"], "'./nowhere'"),
    ("weights-is-a-file", ["run", "exp.yaml", "model.weights=afile"], "'afile' is a file"),
    ("weights-folder-without-config", ["run", "exp.yaml", "model.weights=adir"], "'adir' has no config.json"),
    ("weights-not-an-id", ["run", "exp.yaml", "model.weights=not a hub id!"], "'not a hub id!'"),
    ("image-size-with-checkpoint", ["run", "exp.yaml", "model.weights=ckpt", "model.image_size=112"],
     "image_size=112"),
    ("unknown-dtype", ["run", "exp.yaml", "model.dtype=float8"], "'float8'"),
    ("unknown-attention", ["run", "exp.yaml", "model.attn_implementation=flash9"], "'flash9'"),
    # --- devices ----------------------------------------------------------------------------------------------
    ("device-unknown", ["run", "exp.yaml", "model.device=gpu9"], "'gpu9'"),
    ("device-cuda-index", ["run", "exp.yaml", "model.device=cuda:7"], "'cuda:7'"),
    ("device-meta", ["run", "exp.yaml", "model.device=meta"], "'meta'"),
    # --- plugins ----------------------------------------------------------------------------------------------
    ("plugin-missing", ["run", "exp.yaml", "plugins=[missing_plugin.py]"], "'missing_plugin.py'"),
    ("plugin-syntax-error", ["run", "exp.yaml", "plugins=[syntax_error.py]"], "syntax_error.py"),
    ("plugin-not-python", ["run", "exp.yaml", "plugins=[notes.txt]"], "notes.txt"),
    ("plugin-registers-junk", ["run", "exp.yaml", "plugins=[junk_plugin.py]"], "not a named Strategy subclass"),
    ("plugin-duplicate-name", ["run", "exp.yaml", "plugins=[dup_plugin.py]"], "'fastv'"),
    ("list-plugin-missing", ["list", "strategies", "--plugin", "missing_plugin.py", "f*"], "'missing_plugin.py'"),
    ("list-unknown-kind", ["list", "widgets"], "'widgets'"),
    # --- tracking ----------------------------------------------------------------------------------------------
    ("tracking-unknown-scheme", ["run", "exp.yaml", "tracking.uri=foo://bar"], "'foo'"),
    ("tracking-sqlite-two-slashes", ["run", "exp.yaml", "tracking.uri=sqlite://x.db"], "'sqlite://x.db'"),
    ("tracking-folder-under-a-file", ["run", "exp.yaml", "tracking.uri=sqlite:///afile/sub/m.db"],
     "'afile' is a file"),
    ("tracking-store-is-a-directory", ["run", "exp.yaml", "tracking.uri=sqlite:///adir"], "'sqlite:///adir'"),
    ("tracking-http-without-host", ["run", "exp.yaml", "tracking.uri=http://"], "'http://'"),
    # --- sweeps ------------------------------------------------------------------------------------------------
    ("sweep-missing-file", ["sweep", "missing.yaml", "input.frames=2,4"], "'missing.yaml'"),
    ("sweep-not-key-value", ["sweep", "exp.yaml", "input.frames"], "'input.frames'"),
    ("sweep-empty-value", ["sweep", "exp.yaml", "input.frames=2,"], "'input.frames=2,' has an empty value"),
    ("sweep-unknown-key", ["sweep", "exp.yaml", "input.frame=2,4"], "'frame'"),
    ("sweep-unknown-strategy", ["sweep", "exp.yaml", "configurations.fastv.strategies.0.name=fastv,nope"],
     "'nope'"),
    ("sweep-every-point-bad", ["sweep", "exp.yaml", "model.device=gpu9,gpu8"], "'gpu9'"),
    ("sweep-bad-tracking", ["sweep", "exp.yaml", "input.frames=2,4", "tracking.uri=foo://bar"], "'foo'"),
    # --- --executor ray: refused before connecting to anything -----------------------------------------------
    ("ray-unknown-executor", ["sweep", "exp.yaml", "input.frames=2,4", "--executor", "dask"], "'dask'"),
    ("ray-zero-cpus", ["sweep", "exp.yaml", "input.frames=2,4", "ray.num_cpus=0", "--executor", "ray"],
     "ray.num_cpus=0"),
    ("ray-local-store", ["run", "exp.yaml", "--executor", "ray"], "needs an MLflow tracking server"),
    ("ray-eval-zero-workers", ["eval", "exp.yaml", "--data", "free.jsonl", "ray.workers=0", "--executor", "ray"],
     "ray.workers=0"),
    # --- compare -----------------------------------------------------------------------------------------------
    ("compare-no-store", ["compare"], "no MLflow store at sqlite:///results/mlflow.db"),
    ("compare-missing-yaml", ["compare", "missing.yaml"], "'missing.yaml' does not exist"),
    ("compare-empty-yaml", ["compare", "empty.yaml"], "'empty.yaml' is empty"),
    ("compare-unknown-scheme", ["compare", "--tracking-uri", "foo://bar"], "'foo'"),
    ("compare-unknown-experiment", ["compare", "no-such-experiment", "--tracking-uri", "{store}"],
     "'no-such-experiment'"),
    ("compare-unknown-run-id", ["compare", HEX_RUN_ID, "--tracking-uri", "{store}"], HEX_RUN_ID),
    # --- flops -------------------------------------------------------------------------------------------------
    # --- data synth ------------------------------------------------------------------------------------------
    ("synth-no-samples", ["data", "synth", "--out", "synth", "--n", "0"], "--n must be at least 1, got 0"),
    ("synth-odd-size", ["data", "synth", "--out", "synth", "--size", "57"], "--size must be even and at least 56"),
    ("synth-few-frames", ["data", "synth", "--out", "synth", "--frames", "4"], "--frames must be at least 8"),
    ("synth-out-is-a-file", ["data", "synth", "--out", "nothing.yaml", "--n", "1"], "'nothing.yaml' exists and is not"),
    ("synth-unknown-subcommand", ["data", "sinth"], "'sinth'"),
    # --- eval -----------------------------------------------------------------------------------------------
    ("eval-no-data", ["eval", "exp.yaml"], "--data"),
    ("eval-missing-data", ["eval", "exp.yaml", "--data", "missing.jsonl"], "'missing.jsonl' does not exist"),
    ("eval-data-not-jsonl", ["eval", "exp.yaml", "--data", "notes.txt"], "notes.txt:1: not valid JSON"),
    ("eval-data-missing-field", ["eval", "exp.yaml", "--data", "nofield.jsonl"], "nofield.jsonl:2: field 'question'"),
    ("eval-data-missing-video", ["eval", "exp.yaml", "--data", "novideo.jsonl"], "field 'video' 'nope.mp4'"),
    ("eval-data-undecodable-video", ["eval", "exp.yaml", "--data", "badvideo.jsonl"], "'notavideo.mp4'"),
    ("eval-answer-not-an-option", ["eval", "exp.yaml", "--data", "badanswer.jsonl"], "'purple' is not among"),
    ("eval-loglikelihood-free-form", ["eval", "exp.yaml", "--data", "free.jsonl", "--scoring", "loglikelihood"],
     "sample 'f1'"),
    ("eval-limit-zero", ["eval", "exp.yaml", "--data", "free.jsonl", "--limit", "0"], "--limit must be at least 1"),
    ("eval-unknown-scoring", ["eval", "exp.yaml", "--data", "free.jsonl", "--scoring", "likelihood"], "'likelihood'"),
    ("eval-unknown-strategy", ["eval", "exp.yaml", "--data", "free.jsonl",
                               "configurations.fastv.strategies.0.name=fastvv"], "'fastvv'"),
    ("eval-tiny-synth-image-size", ["eval", "exp.yaml", "--data", "free.jsonl", "model.preset=tiny-synth",
                                    "model.weights=random", "model.image_size=56"], "tiny-synth is trained at 112"),
    ("train-tiny-out-is-a-file", ["train-tiny", "--out", "nothing.yaml", "--steps", "1"], "'nothing.yaml' exists"),
    ("train-tiny-zero-steps", ["train-tiny", "--out", "ckpt-new", "--steps", "0"], "--steps >= 1"),
    ("flops-nothing-given", ["flops"], "give either an experiment YAML or --model"),
    ("flops-from-run-with-model", ["flops", "--model", "tiny", "--from-run", "abc123"], "--from-run 'abc123' goes with"),
    ("flops-unknown-model", ["flops", "--model", "tiny2"], "'tiny2'"),
    ("flops-zero-frames", ["flops", "--model", "tiny", "--frames", "0"], "--frames must be at least 1, got 0"),
    ("flops-frames-not-int", ["flops", "--model", "tiny", "--frames", "abc"], "'abc'"),
    ("flops-llm-stage-layer", ["flops", "--model", "tiny", "--llm-stage", "9:0.5"], "9:0.5"),
    ("flops-llm-stage-form", ["flops", "--model", "tiny", "--llm-stage", "x"], "'x' is not LAYER:VALUE"),
    ("flops-vision-frames-zero", ["flops", "--model", "tiny", "--vision-frames-after", "1:0"], "layer 1"),
    ("flops-negative-visual-tokens", ["flops", "--model", "tiny", "--visual-tokens", "-1"], "-1"),
    ("flops-zero-height", ["flops", "--model", "qwen2.5-vl-tiny", "--height", "0"], "--height must be at least 1"),
    ("flops-negative-text-tokens", ["flops", "--model", "tiny", "--text-tokens", "-5"], "-5"),
    ("flops-schedule-with-yaml", ["flops", "exp.yaml", "--visual-tokens", "5"], "--visual-tokens"),
    ("flops-unknown-protocol", ["flops", "--model", "tiny", "--protocol", "papr"], "'papr'"),
    ("flops-pretrained-offline", ["flops", "--model", "llava-onevision-0.5b", "--weights", "pretrained"],
     "offline mode is on"),
    ("flops-yaml-unknown-preset", ["flops", "exp.yaml", "model.preset=nope"], "'nope'"),
    ("flops-unknown-run", ["flops", "exp.yaml", "--from-run", "nope"], "'nope'"),
    ("flops-empty-yaml", ["flops", "empty.yaml"], "'empty.yaml' is empty"),
    # --- the command line itself ---------------------------------------------------------------------------------
    ("no-subcommand", [], "required"),
    ("unknown-subcommand", ["rn", "exp.yaml"], "'rn'"),
    ("unknown-option", ["run", "exp.yaml", "--frobnicate"], "--frobnicate"),
    ("list-extra-argument", ["list", "strategies", "a*", "b*"], "b*"),
]


def fixture_files(root: Path, store: str) -> None:
    """The files the cases name, in the case's working directory."""
    (root / "exp.yaml").write_text(textwrap.dedent(f"""
        name: bad-inputs
        model: {{preset: tiny}}
        input: {{frames: 4, generated: {{length: 8, height: 32, width: 32}}}}
        generation: {{max_new_tokens: 2}}
        timing: {{warmup: 0, repeats: 1}}
        configurations:
          fastv: {{strategies: [{{name: fastv, params: {{layer: 2, ratio: 0.5}}}}]}}
        tracking: {{uri: "{store}"}}
    """))
    clip = str(Path(store[len("sqlite:///"):]).parent / "short.mp4")  # the shared 4-frame clip
    sample = {"id": "s1", "video": clip, "question": "Which colour?", "options": ["red", "blue"], "answer": "red"}
    (root / "nofield.jsonl").write_text(json.dumps(sample) + "\n" + json.dumps({"id": "s2", "video": clip}) + "\n")
    (root / "novideo.jsonl").write_text(json.dumps({**sample, "video": "nope.mp4"}) + "\n")
    (root / "badvideo.jsonl").write_text(json.dumps({**sample, "video": "notavideo.mp4"}) + "\n")
    (root / "badanswer.jsonl").write_text(json.dumps({**sample, "answer": "purple"}) + "\n")
    (root / "free.jsonl").write_text(json.dumps({"id": "f1", "video": clip, "question": "What?", "answer": "x"}) + "\n")
    (root / "empty.yaml").write_text("")
    (root / "comments.yaml").write_text("# nothing here yet\n\n")
    (root / "broken.yaml").write_text("model: [tiny\n")
    (root / "list.yaml").write_text("- run\n- this\n")
    (root / "typo.yaml").write_text("modle: {preset: tiny}\n")
    (root / "nothing.yaml").write_text(f"baseline: false\ntracking: {{uri: \"{store}\"}}\n")
    (root / "adir").mkdir()
    (root / "afile").write_text("just a file\n")
    (root / "notavideo.mp4").write_bytes(b"not a video" * 50)
    (root / "ckpt").mkdir()
    (root / "ckpt" / "config.json").write_text("{}")
    (root / "notes.txt").write_text("not python\n")
    (root / "syntax_error.py").write_text("def broken(:\n")
    (root / "junk_plugin.py").write_text(textwrap.dedent("""
        from tokcomp.hookspecs import hookimpl

        @hookimpl
        def tokcomp_register_strategies(register):
            register(object)
    """))
    (root / "dup_plugin.py").write_text(textwrap.dedent("""
        from tokcomp.hookspecs import hookimpl
        from tokcomp.strategies.fastv import FastV

        class Again(FastV):
            name = "fastv"

        @hookimpl
        def tokcomp_register_strategies(register):
            register(Again)
    """))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """An existing MLflow store (so store-reading cases read a real one) and a 4-frame clip."""
    from mlflow.tracking import MlflowClient

    from tokcomp.video import generate_video, write_video

    folder = tmp_path_factory.mktemp("bad-inputs-shared")
    clip, _ = generate_video(length=4, height=32, width=32)
    write_video(folder / "short.mp4", clip)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the store's tables now, not inside a case
    return folder, uri


def _runs(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


def test_the_battery_has_at_least_sixty_distinct_cases():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) >= 60
    assert len({tuple(case[1]) for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("argv", "named"), [pytest.param(argv, named, id=name) for name, argv, named in CASES])
def test_bad_input_is_one_line_naming_it_before_any_work(argv, named, shared, tmp_path, monkeypatch, capsys):
    folder, store = shared
    fixture_files(tmp_path, store)
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "TOKCOMP_TRACE_HOOKS", "TOKCOMP_PLUGINS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub checkpoint must be refused in seconds, network or not
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache-that-does-not-exist"))
    before, runs_before = _tree(tmp_path), len(_runs(store))
    capsys.readouterr()

    code = main([arg.replace("{store}", store).replace("{shared}", str(folder)) for arg in argv])

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert named in lines[0], lines[0]
    assert lines[0].startswith("tokcomp")
    assert _tree(tmp_path) == before, "files appeared in the working directory"
    runs = _runs(store)
    assert len(runs) == runs_before and not [r for r in runs if r.info.status == "RUNNING"]


def test_a_bad_mlflow_tracking_uri_from_the_environment_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "gopher://old")
    (tmp_path / "exp.yaml").write_text("model: {preset: tiny}\ninput: {frames: 2}\n")
    assert main(["run", "exp.yaml"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "$MLFLOW_TRACKING_URI 'gopher://old'" in lines[0]
    assert _tree(tmp_path) == {"exp.yaml"}
