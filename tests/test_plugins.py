"""Third-party strategies: the README's plugin file, an installed entry point, and the env filter."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import run_info, run_with
from tokcomp.errors import PluginError, UnknownNameError
from tokcomp.plugins import Plugins

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_plugin_source() -> str:
    match = re.search(r"```python\n(# center_crop\.py\n.*?)```", README.read_text(), re.S)
    assert match, "the README's plugin example is missing"
    return match.group(1)


def test_readme_plugin_example_is_about_thirty_lines():
    assert 25 <= len(readme_plugin_source().splitlines()) <= 45


def test_readme_plugin_file_registers_and_runs(tmp_path, tiny, pixels):
    path = tmp_path / "center_crop.py"
    path.write_text(readme_plugin_source())
    plugins = Plugins([path])
    reg = plugins.strategies["center_crop"]
    assert reg.obj.hook_points() == ["pre_llm"] and reg.distribution.startswith("local file")
    crop = plugins.strategy("center_crop").from_params({"ratio": 0.25})
    out = run_with(tiny, pixels, [crop])
    assert out.ledger.visual_tokens_after_pre_llm == 8 * 4
    assert out.ledger.special_tokens == 1  # the framework, not the plugin, keeps the newline
    assert out.ledger.llm_layers[0] == out.ledger.text_tokens + 8 * 4 + 1


def test_readme_plugin_runs_from_experiment_yaml(tmp_path, tracking_uri):
    from tokcomp.config import load_experiment
    from tokcomp.runner import ExperimentRunner

    (tmp_path / "center_crop.py").write_text(readme_plugin_source())
    (tmp_path / "exp.yaml").write_text(textwrap.dedent(f"""
        name: readme-plugin
        input: {{frames: 4, generated: {{length: 8, height: 32, width: 32}}}}
        generation: {{max_new_tokens: 2}}
        timing: {{warmup: 0}}
        tracking: {{uri: "{tracking_uri}"}}
        plugins: [center_crop.py]
        configurations:
          crop: {{strategies: [{{name: center_crop, params: {{ratio: 0.5}}}}]}}
    """))
    result = ExperimentRunner(load_experiment(tmp_path / "exp.yaml")).run(log=lambda _: None)
    baseline, crop = result.configurations
    assert baseline.name == "uncompressed" and baseline.ledger["visual_tokens_after_pre_llm"] == 4 * 16
    assert crop.status == "FINISHED" and crop.ledger["visual_tokens_after_pre_llm"] == 4 * 8
    assert baseline.ledger["special_tokens"] == crop.ledger["special_tokens"] == 1


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution with an entry point in group `tokcomp`, as pip would install it."""
    site = tmp_path / "site"
    (site / "tokcomp_demo_plugin-1.2.dist-info").mkdir(parents=True)
    (site / "tokcomp_demo_plugin-1.2.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: tokcomp-demo-plugin\nVersion: 1.2\n")
    (site / "tokcomp_demo_plugin-1.2.dist-info" / "entry_points.txt").write_text(
        "[tokcomp]\ncenter_crop = tokcomp_demo_center_crop\n")
    (site / "tokcomp_demo_center_crop.py").write_text(readme_plugin_source())
    monkeypatch.syspath_prepend(str(site))
    yield
    sys.modules.pop("tokcomp_demo_center_crop", None)


def test_entry_point_plugin_is_discovered_with_its_distribution(installed_plugin, tiny, pixels, monkeypatch):
    monkeypatch.delenv("TOKCOMP_PLUGINS", raising=False)
    plugins = Plugins()
    reg = plugins.strategies["center_crop"]
    assert reg.plugin == "center_crop" and reg.distribution == "tokcomp-demo-plugin 1.2"
    assert plugins.strategies["fastv"].distribution == "tokcomp"  # built-ins: same manager
    out = run_with(tiny, pixels, [plugins.strategy("center_crop").from_params({"ratio": 0.5})])
    assert out.ledger.visual_tokens_after_pre_llm == 8 * 8 and out.ledger.special_tokens == 1


def test_tokcomp_plugins_env_restricts_external_plugins(installed_plugin, monkeypatch):
    monkeypatch.setenv("TOKCOMP_PLUGINS", "")
    assert "center_crop" not in Plugins().strategies
    assert "fastv" in Plugins().strategies
    monkeypatch.setenv("TOKCOMP_PLUGINS", "tokcomp-demo-plugin")
    assert "center_crop" in Plugins().strategies


def test_plugin_registering_a_taken_name_is_rejected(tmp_path):
    path = tmp_path / "dup.py"
    path.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from tokcomp.hookspecs import hookimpl
        from tokcomp.strategies.pooling import Pooling

        @hookimpl
        def tokcomp_register_strategies(register):
            register(Pooling)
    """))
    with pytest.raises(PluginError, match="'pooling' .* already registered"):
        Plugins([path])


def test_broken_plugin_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import does_not_exist\n")
    with pytest.raises(PluginError, match="broken.py.*failed to import"):
        Plugins([path])
    with pytest.raises(PluginError, match="does not exist"):
        Plugins([tmp_path / "missing.py"])


def test_unknown_strategy_suggests_close_names(plugins):
    with pytest.raises(UnknownNameError, match="'poolin'. Did you mean 'pooling'"):
        plugins.strategy("poolin")
    with pytest.raises(UnknownNameError, match="Did you mean 'llava-onevision-7b'"):
        plugins.model("llava-onevision-7")


def test_hook_tracing_prints_each_call(tiny, pixels, capsys, plugins):
    from tokcomp.pipeline import run
    from tokcomp.stack import CompressionStack

    stack = CompressionStack([plugins.strategy("uniform").from_params({"ratio": 0.5})], run_info(tiny, pixels),
                             trace=True)
    run(tiny, pixels, "hi", stack, max_new_tokens=1)
    lines = capsys.readouterr().err.splitlines()
    call = next(line for line in lines if line.startswith("[hook] tokcomp_pre_llm -> uniform: state=VisualTokens("))
    assert "features=float32[128, 64]" in call and "frame_sources=list[8]" in call
    left = next(line for line in lines if line.startswith("[hook] tokcomp_pre_llm left:"))
    assert "features=float32[64, 64]" in left  # what the strategy left: half the tokens
    assert len(lines) == 2 and "tensor(" not in "".join(lines)  # shapes and counts, never contents


def test_trace_summaries_are_shapes_and_counts():
    import torch

    from tokcomp.plugins import summarize

    assert summarize(torch.zeros(3, 4)) == "float32[3, 4]"
    assert summarize(torch.tensor([True, False, True])) == "bool[3] (2 true)"
    assert summarize({1: torch.zeros(5)}) == "{1: float32[5]}"
    assert summarize(list(range(100))) == "list[100]" and summarize((4, 4)) == "(4, 4)"
    assert summarize("x" * 100).endswith("...") and len(summarize("x" * 100)) == 40
