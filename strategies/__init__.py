"""Built-in strategies, registered through the same plugin hook as third-party ones."""

from __future__ import annotations

from tokcomp.strategies.dycoke import DYCOKE_STRATEGIES
from tokcomp.strategies.earlytom import EARLYTOM_STRATEGIES
from tokcomp.strategies.fastv import FastV
from tokcomp.strategies.fastvid import FastVID
from tokcomp.strategies.frame_avg import FrameAvg
from tokcomp.strategies.holitom import HOLITOM_STRATEGIES
from tokcomp.strategies.input_baselines import INPUT_STRATEGIES
from tokcomp.strategies.pooling import Pooling
from tokcomp.strategies.prunevid import PRUNEVID_STRATEGIES
from tokcomp.strategies.pyramiddrop import PyramidDrop
from tokcomp.strategies.subsample import Random, TopK, Uniform
from tokcomp.strategies.tome import ToMe
from tokcomp.strategies.visionzip import VISIONZIP_STRATEGIES

from tokcomp.hookspecs import hookimpl

BUILTIN = (
    Pooling, Uniform, Random, TopK, FastV, PyramidDrop, FrameAvg, ToMe, *INPUT_STRATEGIES, *VISIONZIP_STRATEGIES,
    FastVID, *DYCOKE_STRATEGIES, *PRUNEVID_STRATEGIES, *HOLITOM_STRATEGIES, *EARLYTOM_STRATEGIES,
)


@hookimpl
def tokcomp_register_strategies(register):
    for cls in BUILTIN:
        register(cls)
