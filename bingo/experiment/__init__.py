"""``bingo experiment``: the seed paper's MNIST experiment, reproducible with one command.

BINGO (ticket searches riding along one training run) against IMP with rewinding and the
one-shot criteria of :mod:`bingo.baselines`, at weight and neuron granularity, several seeds;
see docs/results.md for a full run and :class:`ExperimentConfig` for every knob.
"""

from .config import ABLATIONS, MAIN_SEARCH, QUICK, ExperimentConfig, quick
from .criteria import CRITERIA
from .runner import run_experiment

__all__ = ["ABLATIONS", "CRITERIA", "ExperimentConfig", "MAIN_SEARCH", "QUICK", "quick",
           "run_experiment"]
