"""The registry of attention statistics and how a stack collects the strategies' requests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tokcomp.errors import ConfigError
from tokcomp.stack import CompressionStack
from tokcomp.state import EncoderState, LLMState, VisualTokens
from tokcomp.statistics import STATISTICS, statistic
from tokcomp.strategy import ModelInfo, Strategy

INFO = ModelInfo("m", 4, (8, 8), (4, 4), 6, 64)


@dataclass
class Asks(Strategy):
    name = "test.asks"
    wanted: dict | None = None

    def statistics(self, info):
        return self.wanted or {}


def test_every_statistic_names_where_it_is_computed_and_the_field_it_arrives_in():
    assert set(STATISTICS) == {"vision.attention", "vision.keys", "vision.saliency", "llm.last_token", "llm.text"}
    for name, stat in STATISTICS.items():
        assert stat.name == name and name.startswith(f"{stat.where}.") and stat.summary
        if stat.where == "vision":
            assert stat.field in EncoderState.__dataclass_fields__
            assert stat.tokens_field in VisualTokens.__dataclass_fields__
        else:
            assert stat.field in LLMState.__dataclass_fields__ and stat.tokens_field is None


def test_an_unknown_statistic_is_a_config_error_listing_the_known_ones():
    with pytest.raises(ConfigError, match=r"'vision.atention'.*Did you mean 'vision.attention'.*llm.last_token"):
        statistic("vision.atention")
    with pytest.raises(ConfigError, match="unknown attention statistic 'attention_layers'"):
        CompressionStack([Asks({"attention_layers": {1}})], INFO)


def test_the_stack_unites_the_requests_and_wraps_negative_vision_layers():
    stack = CompressionStack([Asks({"vision.attention": {-1}, "llm.last_token": {1}}),
                              Asks({"vision.attention": {3, 0}, "vision.keys": {-4}, "llm.text": {5}})], INFO)
    assert stack.statistics == {"vision.attention": {0, 3}, "vision.keys": {0}, "vision.saliency": set(),
                                "llm.last_token": {1}, "llm.text": {5}}
    assert CompressionStack([], INFO).statistics == {name: set() for name in STATISTICS}


@pytest.mark.parametrize("wanted, bad", [
    ({"vision.keys": {4}}, "vision.keys at layer 4, outside the vision layers -4..3"),
    ({"vision.saliency": {-5}}, "vision.saliency at layer -5, outside the vision layers -4..3"),
    ({"llm.last_token": {-1}}, "llm.last_token at layer -1, outside the llm layers 0..5"),
    ({"llm.text": {6}}, "llm.text at layer 6, outside the llm layers 0..5"),
])
def test_a_layer_the_model_does_not_have_is_a_config_error_naming_the_strategy(wanted, bad):
    with pytest.raises(ConfigError, match=f"strategy 'test.asks' asks for {bad} of model 'm'"):
        CompressionStack([Asks(wanted)], INFO)
