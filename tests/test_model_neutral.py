"""The pipeline is model-neutral: M-RoPE positions survive compression, special tokens are the
framework's, and a strategy or input that does not fit the chosen model is refused before weights."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.conftest import PROMPT, model_spec, run_info, run_with
from tokcomp.config import load_experiment
from tokcomp.errors import ConfigError, InputError
from tokcomp.hookspecs import hookimpl
from tokcomp.runner import AdapterCache, ExperimentRunner
from tokcomp.strategy import Strategy


@pytest.fixture(scope="module")
def qwen(plugins):
    return plugins.model("qwen2.5-vl-tiny").build(model_spec())


@pytest.fixture(scope="module")
def qwen_video(qwen, frames):
    return qwen.preprocess(frames)


@dataclass
class PositionProbe(Strategy):
    """Records the position ids entering one decoder layer (an inner-LLM hook that keeps everything)."""

    name = "test.position_probe"
    layer: int = 1

    def llm_layers(self, info):
        return {self.layer}

    @hookimpl
    def tokcomp_inner_llm(self, state):
        self.seen = (state.position_ids.clone(), state.visual_mask.clone())


def test_pruned_qwen_tokens_keep_their_m_rope_positions_and_decoding_continues_after_the_maximum(
        plugins, qwen, qwen_video):
    uniform = plugins.strategy("uniform").from_params({"ratio": 0.25})
    probe = PositionProbe()
    out = run_with(qwen, qwen_video, [uniform, probe], max_new_tokens=4)

    # the reference: the uncompressed prompt's (3, L) positions, gathered at the kept entries
    full_n = qwen_video.rows * qwen_video.llm_grid[0] * qwen_video.llm_grid[1]
    layout = qwen.prompt(PROMPT, qwen_video, full_n)
    full = qwen.full_positions(layout, qwen_video)
    positions, visual = probe.seen
    kept_visual = positions[:, visual]
    assert positions.shape[0] == 3 and visual.sum() == out.ledger.visual_tokens_after_pre_llm
    video_columns = full[:, layout.start : layout.start + full_n]
    assert all(any(torch.equal(col, video_columns[:, j]) for j in range(full_n)) for col in kept_visual.T)
    assert torch.equal(positions[:, ~visual][:, -5:], full[:, -5:])  # the text after the video: unchanged

    # decoding by hand from the same prefill at max + 1 + step gives the same tokens
    from tokcomp.ledger import TokenLedger
    from tokcomp.pipeline import encode_video, splice
    from tokcomp.stack import CompressionStack

    stack = CompressionStack([plugins.strategy("uniform").from_params({"ratio": 0.25})], run_info(qwen, qwen_video))
    stack.start(0)
    with torch.no_grad():
        tokens, specials = encode_video(qwen, qwen_video, stack, TokenLedger())
        spliced = splice(qwen, qwen_video, PROMPT, tokens, specials, full_n)
        cache, eos = qwen.new_cache(), sorted(qwen.eos_ids())
        logits, ids = qwen.forward_llm(spliced.embeds, spliced.positions, cache), []
        for step in range(4):
            masked = logits.clone()
            masked[:, eos] = float("-inf")
            ids.append(int(masked.argmax()))
            position = torch.full((3, 1), int(full.max()) + 1 + step)
            logits = qwen.forward_llm(qwen.embed_tokens(torch.tensor([[ids[-1]]])), position, cache)
    assert out.new_ids == ids


def test_llava_newline_is_re_emitted_after_the_kept_tokens(plugins, tiny, pixels):
    probe = PositionProbe()
    out = run_with(tiny, pixels, [plugins.strategy("uniform").from_params({"ratio": 0.5}), probe])
    positions, visual = probe.seen
    start = int(torch.nonzero(visual)[0])
    assert out.ledger.special_tokens == 1
    assert not visual[start + int(visual.sum())]  # the entry right after the video: the newline, not visual
    assert torch.equal(positions[0], torch.arange(positions.shape[1]))  # LLaVA: contiguous positions


class NoWeights(AdapterCache):
    def get(self, preset, model_cfg, log):
        raise AssertionError("weights were built before the configuration was checked")


def _runner(tmp_path, model: str, frames: int, strategy: str, params: dict) -> ExperimentRunner:
    text = (f"name: t\nmodel: {{preset: {model}}}\ninput: {{frames: {frames}}}\ntracking: {{enabled: false}}\n"
            f"configurations:\n  c: {{strategies: [{{name: {strategy}, params: {params}}}]}}\n")
    (tmp_path / "e.yaml").write_text(text)
    return ExperimentRunner(load_experiment(tmp_path / "e.yaml"), adapters=NoWeights())


@pytest.mark.parametrize("model, frames, strategy, params, message", [
    ("qwen2.5-vl-7b", 8, "tome", {"r": 2}, "'tome' needs vision_split .* the 2x2 patch merger concatenates"),
    ("qwen3-vl-8b", 8, "tome", {"r": 2}, "'tome' needs vision_split .* DeepStack mergers"),
    ("qwen2.5-vl-7b", 8, "fastv", {"layer": 28}, "on model 'qwen2.5-vl-7b'.*layer=28 is outside the LLM layers 1..27"),
    ("qwen2.5-vl-3b", 8, "pyramiddrop", {"layers": [4, 40]}, "on model 'qwen2.5-vl-3b'.*layers=40"),
    ("llava-onevision-7b", 8, "topk", {"layer": 30}, "on model 'llava-onevision-7b'.*layer=30"),
])
def test_a_strategy_that_does_not_fit_the_model_is_refused_before_weights(tmp_path, model, frames, strategy, params,
                                                                          message):
    with pytest.raises(ConfigError, match=message):
        _runner(tmp_path, model, frames, strategy, params).prepare(log=lambda _: None)


def test_a_video_too_short_for_qwens_temporal_patch_is_refused_before_weights(tmp_path):
    with pytest.raises(InputError, match="qwen2.5-vl-7b needs at least 2 frames .* got 1"):
        _runner(tmp_path, "qwen2.5-vl-7b", 1, "uniform", {}).prepare(log=lambda _: None)


def test_every_presets_declared_capabilities_are_its_adapters(plugins):
    """`tokcomp list` reads the registry without importing transformers; it must say what the adapter does."""
    for name, reg in plugins.models.items():
        info = reg.obj.describe(model_spec()).info
        assert reg.obj.capabilities == info.capabilities, name


def test_pyramiddrop_defaults_fit_every_preset(plugins):
    strategy = plugins.strategy("pyramiddrop")()
    for name in plugins.models:
        info = plugins.model(name).describe(model_spec()).info
        strategy.check(info)
        assert len(strategy.llm_layers(info)) == 3, name


@dataclass
class Backwards(Strategy):
    """Keeps every token in reverse order and asks for original positions."""

    name = "test.backwards"

    @hookimpl
    def tokcomp_pre_llm(self, state):
        state.keep(torch.arange(state.num_tokens - 1, -1, -1))
        state.original_positions = True


def test_original_positions_running_backwards_on_a_1d_rope_model_are_refused(tiny, pixels):
    from tokcomp.state import StrategyContractError

    with pytest.raises(StrategyContractError, match="ascending source order"):
        run_with(tiny, pixels, [Backwards()])


def test_any_token_order_keeps_its_m_rope_positions_on_qwen(qwen, qwen_video):
    assert len(run_with(qwen, qwen_video, [Backwards()], max_new_tokens=2).new_ids) == 2


def test_a_video_files_sampling_rate_spaces_qwens_time_positions(tmp_path, frames):
    from tokcomp.video import sampled_fps, write_video

    clip = frames.repeat(6, 1, 1, 1)  # 48 frames at 24 fps: two seconds
    write_video(tmp_path / "clip.mp4", clip, fps=24)
    fps = sampled_fps(tmp_path / "clip.mp4", 8)
    assert fps == pytest.approx(4.0, rel=0.05)
    text = (f"name: t\nmodel: {{preset: qwen2.5-vl-tiny}}\ninput: {{frames: 8, video: {tmp_path / 'clip.mp4'}}}\n"
            "tracking: {enabled: false}\ntiming: {warmup: 0}\nconfigurations: {}\n")
    (tmp_path / "e.yaml").write_text(text)
    runner = ExperimentRunner(load_experiment(tmp_path / "e.yaml"))
    runner.prepare(log=lambda _: None)
    assert float(runner.video.extra["second_per_grid_ts"][0]) == pytest.approx(2 / fps)


@pytest.mark.parametrize("name, fraction, layer", [
    ("fastv", 0.5, 2), ("holitom.inner_merge", 0.75, 3), ("prunevid.inner", 0.25, 1), ("dycoke.kv_pruning", 0.5, 2),
])
def test_llm_layers_given_as_a_fraction_of_depth_act_where_the_index_would(plugins, tiny, pixels, name, fraction,
                                                                           layer):
    as_fraction = run_with(tiny, pixels, [plugins.strategy(name).from_params({"layer": fraction})])
    as_index = run_with(tiny, pixels, [plugins.strategy(name).from_params({"layer": layer})])
    assert as_fraction.ledger.to_dict() == as_index.ledger.to_dict()
    assert as_fraction.new_ids == as_index.new_ids


class SpatialOnly:
    """The same adapter without its own-order fast path: every vision layer permutes in and out."""

    vision_layer_in_order = None

    def __init__(self, adapter):
        self._adapter = adapter

    def __getattr__(self, name):
        return getattr(self._adapter, name)


@pytest.mark.parametrize("strategies", [[], [("topk", {"ratio": 0.5, "layer": 1})], [("visionzip", {"ratio": 0.5})]])
def test_keeping_qwens_window_order_between_blocks_changes_nothing(plugins, qwen, qwen_video, strategies):
    def run(adapter):
        return run_with(adapter, qwen_video, [plugins.strategy(n).from_params(p) for n, p in strategies])

    fast, spatial = run(qwen), run(SpatialOnly(qwen))
    assert fast.new_ids == spatial.new_ids and fast.ledger.to_dict() == spatial.ledger.to_dict()
    assert torch.equal(fast.prefill_logits, spatial.prefill_logits)
