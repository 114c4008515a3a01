"""One configuration's strategies, wired to the hook points through their own plugin manager.

Each strategy instance is registered as a pluggy plugin. pluggy calls implementations in LIFO
order of registration, so they are registered in reverse: the hook point then runs them in the
order the YAML lists them. A strategy is called only at the layers it asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokcomp.plugins import new_plugin_manager
from tokcomp.state import DecodeState, EncoderState, LLMState, VisualTokens
from tokcomp.statistics import collect
from tokcomp.strategy import ModelInfo, Strategy
from tokcomp.timing import StageClock


class CompressionStack:
    def __init__(self, strategies: Sequence[Strategy], info: ModelInfo, trace: bool | None = None):
        self.strategies = list(strategies)
        self.info = info
        # every registered statistic -> the layers some strategy needs it at (vision layers wrapped to 0..n-1)
        self.statistics: dict[str, set[int]] = collect(((s.name, s.statistics(info)) for s in self.strategies), info)
        self.pm = new_plugin_manager(trace)
        for strategy in reversed(self.strategies):
            self.pm.register(strategy)
        self.encoder_layers: set[int] = set()  # -1: at the encoder input
        self.encoder_mid_layers: set[int] = set()
        self.llm_layers: set[int] = set()
        self.decode_layers: set[int] = set()
        for s in self.strategies:
            hooks = s.active_hooks()
            if "intra_encoder" in hooks:
                self.encoder_layers |= s.encoder_layers(info)
                self.encoder_mid_layers |= s.encoder_mid_layers(info)
            if "inner_llm" in hooks:
                self.llm_layers |= s.llm_layers(info)
            if "inner_llm_decode" in hooks:
                self.decode_layers |= s.decode_layers(info)
        self.has_pre_llm = any("pre_llm" in s.active_hooks() for s in self.strategies)
        self.clock = StageClock()  # replaced per run: strategy hooks count as "token_processing"

    @property
    def empty(self) -> bool:
        return not self.strategies

    def _caller(self, hook: str, wanted: str | None = None, layer: int | None = None):
        """The hook restricted to strategies that enabled it (and asked for this layer)."""
        point = hook.removeprefix("tokcomp_")
        others = [
            s for s in self.strategies
            if point not in s.active_hooks() or (wanted is not None and layer not in getattr(s, wanted)(self.info))
        ]
        return self.pm.subset_hook_caller(hook, others)

    def start(self, seed: int, clock: StageClock | None = None) -> None:
        self.clock = clock or StageClock()
        for s in self.strategies:
            s.start(seed)

    def intra_encoder(self, state: EncoderState) -> None:
        wanted = "encoder_mid_layers" if state.position == "attention" else "encoder_layers"
        with self.clock.stage("token_processing"):
            self._caller("tokcomp_intra_encoder", wanted, state.layer)(state=state)

    def pre_llm(self, state: VisualTokens) -> None:
        with self.clock.stage("token_processing"):
            self._caller("tokcomp_pre_llm")(state=state)

    def inner_llm(self, state: LLMState) -> None:
        with self.clock.stage("token_processing"):
            self._caller("tokcomp_inner_llm", "llm_layers", state.layer)(state=state)

    def inner_llm_decode(self, state: DecodeState) -> None:
        # Counted in decode time, not in the TTFT's token-processing stage.
        self._caller("tokcomp_inner_llm_decode", "decode_layers", state.layer)(state=state)

    def close(self) -> None:
        for s in self.strategies:
            if self.pm.is_registered(s):
                self.pm.unregister(s)
