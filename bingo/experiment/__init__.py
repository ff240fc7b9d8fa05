"""``bingo experiment``: the seed paper's MNIST experiment, reproducible with one command.

BINGO (ticket searches riding along one training run) against IMP with rewinding and the
one-shot criteria of :mod:`bingo.baselines`, at weight and neuron granularity, several seeds;
see docs/results.md for a full run and :class:`ExperimentConfig` for every knob.
:func:`run_experiment` is imported on first use: the configuration and the command line
(:mod:`.config`, :mod:`.command`) do not import torch.
"""

from __future__ import annotations

from typing import Any

from .config import ABLATIONS, MAIN_SEARCH, QUICK, ExperimentConfig, quick
from .criteria import CRITERIA

__all__ = ["ABLATIONS", "CRITERIA", "ExperimentConfig", "MAIN_SEARCH", "QUICK", "quick",
           "run_experiment"]


def __getattr__(name: str) -> Any:
    if name == "run_experiment":
        from .runner import run_experiment

        return run_experiment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
