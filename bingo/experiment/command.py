"""``bingo experiment mnist``: the command-line face of :func:`run_experiment`."""

from __future__ import annotations

import argparse
import dataclasses

from bingo.data import DATASETS
from bingo.models import MODELS
from bingo.units import GRANULARITIES

from .config import ABLATIONS, QUICK, ExperimentConfig, quick
from .criteria import CRITERIA
from .report import RESULTS_JSON, RESULTS_MD
from .runner import run_experiment

EXPERIMENTS = {"mnist": "LeNet-300-100 on MNIST: BINGO vs IMP vs one-shot criteria"}
"""Experiment name -> what it is (the dataset can still be swapped with --dataset)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bingo experiment``; every value defaults to None so that --quick can tell what
    the user set."""
    defaults = ExperimentConfig()
    parser.add_argument("name", choices=tuple(EXPERIMENTS), help="which experiment")
    parser.add_argument("--data-dir", help="directory of the MNIST IDX files "
                                           "(default: $BINGO_DATA, else download)")
    parser.add_argument("--dataset", choices=tuple(DATASETS),
                        help=f"dataset (default: {defaults.dataset}; digits needs no files)")
    parser.add_argument("--model", choices=tuple(MODELS),
                        help=f"architecture (default: {defaults.model})")
    parser.add_argument("--criteria", nargs="+", choices=tuple(CRITERIA),
                        help="one-shot criteria to measure (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help=f"seeds, one full run each (default: {list(defaults.seeds)})")
    parser.add_argument("--granularities", nargs="+", choices=GRANULARITIES,
                        help=f"default: {list(defaults.granularities)}")
    parser.add_argument("--epochs", type=int, help=f"default: {defaults.epochs}")
    parser.add_argument("--ablations", nargs="*", choices=tuple(ABLATIONS),
                        help="ticket-search ablations (default: all)")
    parser.add_argument("--ablation-seeds", type=int,
                        help="run the ablations on the first N seeds only (default: "
                             f"{defaults.ablation_seeds}; 0: none)")
    parser.add_argument("--finetune-epochs", type=int,
                        help=f"fine-tuning epochs (default: {defaults.finetune_epochs})")
    parser.add_argument("--finetune-sparsities", type=float, nargs="+",
                        help=f"default: {list(defaults.finetune_sparsities)}")
    parser.add_argument("--imp-rounds", type=int,
                        help="IMP rounds at every granularity (default: "
                             f"{defaults.imp_rounds})")
    parser.add_argument("--out", help=f"output directory (default: {defaults.out})")
    parser.add_argument("--threads", type=int, help=f"torch threads (default: {defaults.threads})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test of every step: "
                             + ", ".join(f"{k}={v}" for k, v in QUICK.items() if k != "quick"))
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide the progress bars")


_FIELDS = ("data_dir", "dataset", "model", "criteria", "seeds", "granularities", "epochs",
           "finetune_epochs", "finetune_sparsities", "ablations",
           "ablation_seeds", "out", "threads", "progress")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Defaults, then --quick, then every flag the user set."""
    config = quick(ExperimentConfig()) if args.quick else ExperimentConfig()
    given = {}
    for name in _FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            given[name] = tuple(value) if isinstance(value, list) else value
    if getattr(args, "imp_rounds", None) is not None:
        given["imp_rounds"] = {g: args.imp_rounds for g in GRANULARITIES}
    return dataclasses.replace(config, **given)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bingo experiment``."""
    config = config_from_args(args)
    report = run_experiment(config)
    with open(report["files"]["markdown"]) as f:
        print(f.read())
    print(f"wrote {config.out}/{RESULTS_JSON}, {config.out}/{RESULTS_MD} and the plots")
    return 0
