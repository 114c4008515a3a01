"""The command line as a user types it."""

from __future__ import annotations

from pathlib import Path

from tokcomp.cli import main

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def test_list_strategies_shows_hook_points_and_origin(capsys):
    assert main(["list", "strategies"]) == 0
    out = capsys.readouterr().out
    for name, hook in [("pooling", "pre_llm"), ("fastv", "inner_llm"), ("frame_avg", "intra_encoder")]:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert hook in line and "tokcomp.strategies" in line


def test_list_strategies_filters_by_wildcard(capsys):
    assert main(["list", "strategies", "f*"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert names == ["fastv", "fastvid", "frame_avg"]
    assert main(["list", "strategies", "zzz*"]) == 1


def test_list_models_shows_presets(capsys):
    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "llava-onevision-0.5b" in out and "llava-hf/llava-onevision-qwen2-7b-ov-hf" in out


def test_run_quickstart_prints_the_comparison_table(capsys, tracking_uri):
    code = main(["run", str(QUICKSTART), "input.frames=4", "timing.repeats=1", f"tracking.uri={tracking_uri}"])
    out = capsys.readouterr().out
    assert code == 0
    for name in ("uncompressed", "pooling_25", "topk_25", "fastv", "frame_avg+uniform"):
        assert f"\n{name} " in out
    assert "FAILED" not in out and tracking_uri in out


def test_run_with_bad_override_exits_2_naming_the_key(capsys):
    assert main(["run", str(QUICKSTART), "input.frame=4"]) == 2
    assert "'frame'" in capsys.readouterr().err


def test_print_config_shows_the_resolved_experiment(capsys):
    assert main(["run", str(QUICKSTART), "input.frames=7", "--print-config"]) == 0
    assert "frames: 7" in capsys.readouterr().out


def test_global_options_work_after_the_subcommand(capsys, monkeypatch):
    from tokcomp.cli import build_parser

    monkeypatch.delenv("TOKCOMP_TRACE_HOOKS", raising=False)
    parser = build_parser()
    assert parser.parse_args(["run", "--trace-hooks", "x.yaml"]).trace_hooks is True
    assert parser.parse_args(["--trace-hooks", "run", "x.yaml"]).trace_hooks is True
    assert parser.parse_args(["run", "x.yaml"]).trace_hooks is None  # unset: TOKCOMP_TRACE_HOOKS decides
    assert main(["list", "models", "--trace-hooks", "tiny"]) == 0
    assert "[hook] tokcomp_register_models" in capsys.readouterr().err


def test_positionals_after_an_option_reach_their_argument(tmp_path, capsys):
    plugin = tmp_path / "empty_plugin.py"
    plugin.write_text("")
    assert main(["list", "strategies", "--plugin", str(plugin), "f*"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert names == ["fastv", "fastvid", "frame_avg"]
    assert main(["run", str(QUICKSTART), "--print-config", "input.frames=7", "input.prompt=hi"]) == 0
    out = capsys.readouterr().out
    assert "frames: 7" in out and "prompt: hi" in out


def test_help_and_usage_errors_return_codes_instead_of_exiting(capsys):
    assert main(["--help"]) == 0
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokcomp run: error:") and "experiment" in err[0]


def test_hook_trace_of_a_run_is_short(capsys):
    code = main(["run", "--trace-hooks", str(QUICKSTART), "input.frames=4", "timing.repeats=1", "timing.warmup=0",
                 "generation.max_new_tokens=2", "generation.min_new_tokens=2", "tracking.enabled=false"])
    assert code == 0
    hooks = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[hook]")]
    assert any(line.startswith("[hook] tokcomp_inner_llm -> fastv: state=LLMState(") for line in hooks)
    assert all(len(line) < 600 for line in hooks) and len(hooks) < 60
