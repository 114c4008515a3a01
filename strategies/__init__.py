"""Built-in strategies, registered through the same plugin hook as third-party ones."""

from __future__ import annotations

from tokcomp.strategies.earlytom import EARLYTOM_STRATEGIES
from tokcomp.strategies.fastv import FastV
from tokcomp.strategies.frame_avg import FrameAvg
from tokcomp.strategies.holitom import HOLITOM_STRATEGIES
from tokcomp.strategies.pooling import Pooling
from tokcomp.strategies.subsample import Random, TopK, Uniform

from tokcomp.hookspecs import hookimpl

BUILTIN = (Pooling, Uniform, Random, TopK, FastV, FrameAvg, *HOLITOM_STRATEGIES, *EARLYTOM_STRATEGIES)


@hookimpl
def tokcomp_register_strategies(register):
    for cls in BUILTIN:
        register(cls)
