"""Errors a user can act on: each names the bad value and, where it helps, the valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TokcompError(Exception):
    """Base class for every error tokcomp raises on purpose (bad input, not bugs)."""


class ConfigError(TokcompError):
    """An experiment, override or strategy parameter is invalid."""


class UnknownNameError(ConfigError):
    """A strategy, model or config key that does not exist; suggests close matches."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known) or '(none)'}.")
        self.name = name
        self.known = known


class InputError(TokcompError):
    """A video that is missing, undecodable or too short for what was asked."""


class PluginError(TokcompError):
    """A plugin file or entry point that cannot be loaded or registers something invalid."""
