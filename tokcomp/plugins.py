"""The plugin manager: built-ins, entry points and local files, all through one pluggy manager.

``TOKCOMP_PLUGINS`` restricts which *external* entry-point plugins load: a comma-separated list of
entry-point or distribution names (empty string: none). Built-ins always load. Tracing of hook
calls is switched on by ``trace=True`` (CLI ``--trace-hooks``) or ``TOKCOMP_TRACE_HOOKS=1``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from tokcomp import hookspecs
from tokcomp.errors import PluginError, UnknownNameError
from tokcomp.strategy import Strategy

ENTRY_POINT_GROUP = "tokcomp"
BUILTIN_MODULES = ("tokcomp.strategies", "tokcomp.models")


@dataclass(frozen=True)
class Registered:
    """A registered strategy class or model preset and where it came from."""

    name: str
    obj: Any
    plugin: str
    distribution: str


def summarize(value: Any, depth: int = 0) -> str:
    """A one-line description of a hook argument: shapes and counts, never tensor contents."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor (or array)
        dtype = str(value.dtype).removeprefix("torch.")
        text = f"{dtype}{list(value.shape)}"
        if dtype == "bool" and hasattr(value, "sum"):
            text += f" ({int(value.sum())} true)"
        return text
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if depth >= 2:
            return type(value).__name__
        parts = [f"{f.name}={summarize(getattr(value, f.name), depth + 1)}" for f in dataclasses.fields(value)
                 if not (f.default is None and getattr(value, f.name) is None)]
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, dict):
        if not value:
            return "{}"
        if depth >= 2:
            return f"dict[{len(value)}]"
        return "{" + ", ".join(f"{k}: {summarize(v, depth + 1)}" for k, v in list(value.items())[:4]) + (
            ", ..." if len(value) > 4 else "") + "}"
    if isinstance(value, list | tuple) and not (value and all(isinstance(v, int | float) for v in value)
                                                and len(value) <= 4):
        return f"{type(value).__name__}[{len(value)}]"
    if callable(value):
        return getattr(value, "__name__", type(value).__name__)
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _enable_tracing(pm: pluggy.PluginManager) -> None:
    """One line per hook call (the implementations called, each argument's shapes and counts) and one
    more when a call changed an argument (shown as it left) or failed."""
    calls: list[str] = []

    def describe(kwargs) -> str:
        return ", ".join(f"{k}={summarize(v)}" for k, v in kwargs.items())

    def before(hook_name, hook_impls, kwargs) -> None:
        text = describe(kwargs)
        calls.append(text)
        names = ",".join(getattr(i.plugin, "name", None) or i.plugin_name.split(":")[-1] for i in hook_impls)
        sys.stderr.write(f"[hook] {hook_name} -> {names or '(none)'}: {text}\n")

    def after(outcome, hook_name, hook_impls, kwargs) -> None:
        text = calls.pop()
        if outcome.exception is not None:
            sys.stderr.write(f"[hook] {hook_name} raised {type(outcome.exception).__name__}: {outcome.exception}\n")
            return
        now = describe(kwargs)
        if now != text:
            sys.stderr.write(f"[hook] {hook_name} left: {now}\n")

    pm.add_hookcall_monitoring(before, after)


def tracing_requested(trace: bool | None = None) -> bool:
    if trace is not None:
        return trace
    return os.environ.get("TOKCOMP_TRACE_HOOKS", "") not in ("", "0", "false")


def new_plugin_manager(trace: bool | None = None) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if tracing_requested(trace):
        _enable_tracing(pm)
    return pm


def _allowed_entry_points() -> set[str] | None:
    value = os.environ.get("TOKCOMP_PLUGINS")
    if value is None:
        return None
    return {v.strip() for v in value.split(",") if v.strip()}


def load_plugin_file(path: str | Path) -> ModuleType:
    """Import a local ``.py`` file as a plugin module (not added to sys.modules permanently)."""
    path = Path(path)
    if not path.is_file():
        raise PluginError(f"plugin file {str(path)!r} does not exist")
    module_name = f"tokcomp_local_plugin_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {str(path)!r} cannot be imported (not a Python file?)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's file: report any failure as a plugin error
        raise PluginError(f"plugin file {str(path)!r} failed to import: {exc!r}") from exc
    return module


class Plugins:
    """The loaded plugins and the strategy/model registries they filled."""

    def __init__(self, plugin_files: Sequence[str | Path] = (), trace: bool | None = None):
        self.trace = tracing_requested(trace)
        self.pm = new_plugin_manager(self.trace)
        self._dist: dict[str, str] = {}
        for name in BUILTIN_MODULES:
            module = importlib.import_module(name)
            self.pm.register(module, name=name)
            self._dist[name] = "tokcomp"
        self._load_entry_points()
        for path in plugin_files:
            module = load_plugin_file(path)
            name = f"file:{path}"
            if self.pm.get_plugin(name) is None:
                self.pm.register(module, name=name)
                self._dist[name] = f"local file {path}"
        self.strategies: dict[str, Registered] = {}
        self.models: dict[str, Registered] = {}
        self._collect()

    def _load_entry_points(self) -> None:
        allowed = _allowed_entry_points()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist_name = ep.dist.metadata["Name"] if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else ""
            if allowed is not None and ep.name not in allowed and dist_name not in allowed:
                continue
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(f"entry point {ep.name!r} of {dist_name!r} failed to load: {exc!r}") from exc
            self.pm.register(plugin, name=ep.name)
            self._dist[ep.name] = f"{dist_name} {version}".strip()

    def _collect(self) -> None:
        for plugin_name, plugin in self.pm.list_name_plugin():
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            dist = self._dist.get(plugin_name, "?")

            def add_strategy(cls: type, _plugin: str = plugin_name, _dist: str = dist) -> type:
                if not (isinstance(cls, type) and issubclass(cls, Strategy)) or not cls.name:
                    raise PluginError(f"plugin {_plugin!r} registered {cls!r}, which is not a named Strategy subclass")
                if not cls.hook_points():
                    raise PluginError(f"strategy {cls.name!r} from {_plugin!r} implements no hook point")
                if cls.name in self.strategies:
                    raise PluginError(
                        f"strategy {cls.name!r} from {_plugin!r} is already registered by "
                        f"{self.strategies[cls.name].plugin!r}"
                    )
                self.strategies[cls.name] = Registered(cls.name, cls, _plugin, _dist)
                return cls

            def add_model(preset: Any, _plugin: str = plugin_name, _dist: str = dist) -> Any:
                name = getattr(preset, "name", None)
                if not name or not callable(getattr(preset, "build", None)):
                    raise PluginError(f"plugin {_plugin!r} registered {preset!r}, which is not a model preset")
                if name in self.models:
                    raise PluginError(f"model preset {name!r} from {_plugin!r} is already registered")
                self.models[name] = Registered(name, preset, _plugin, _dist)
                return preset

            self.pm.subset_hook_caller("tokcomp_register_strategies", others)(register=add_strategy)
            self.pm.subset_hook_caller("tokcomp_register_models", others)(register=add_model)

    def strategy(self, name: str) -> type[Strategy]:
        if name not in self.strategies:
            raise UnknownNameError("strategy", name, self.strategies)
        return self.strategies[name].obj

    def model(self, name: str) -> Any:
        if name not in self.models:
            raise UnknownNameError("model preset", name, self.models)
        return self.models[name].obj

    @staticmethod
    def matching(names: Iterable[str], pattern: str | None) -> list[str]:
        return sorted(n for n in names if pattern is None or fnmatch.fnmatch(n, pattern))
