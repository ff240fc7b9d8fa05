"""``bingo experiment mnist``: the command-line face of :func:`run_experiment` (torch-free until
it runs)."""

from __future__ import annotations

import argparse

from bingo import choices, cli

from .config import ABLATIONS, QUICK, ExperimentConfig
from .criteria import CRITERIA

EXPERIMENTS = {"mnist": "MNIST classifiers: BINGO, targeted pruning, one-shot criteria, IMP"}
"""Experiment name -> what it is (the dataset can still be swapped with --dataset)."""


def _names(values) -> str:
    return ", ".join(values)


def _per_granularity(value: dict) -> str:
    return " / ".join(f"{v} ({k})" for k, v in value.items())


def _quick_help() -> str:
    shown = dict(
        seeds=" ".join(map(str, QUICK["seeds"])), epochs=QUICK["epochs"],
        every=_per_granularity(QUICK["every"]), subsets=QUICK["search"]["subsets"],
        imp_rounds=_per_granularity(QUICK["imp_rounds"]), criteria=_names(QUICK["criteria"]),
        ablations=_names(QUICK["ablations"]), sparsities=" ".join(map(str, QUICK["sparsities"])),
        finetune=f"{QUICK['finetune_epochs']} epoch at {QUICK['finetune_sparsities'][0]:g}")
    return ("every step of the experiment in about 75 s of CPU time (2-2.5 min of wall time "
            "measured on 2 shared CPU cores; a smoke test, not a result): " + "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in shown.items())
            + ". Flags you give still win.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bingo experiment``; every value defaults to None so that --quick can tell what
    the user set."""
    defaults = ExperimentConfig()
    parser.add_argument("name", choices=tuple(EXPERIMENTS), help="which experiment: "
                        + "; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()))
    parser.add_argument("--data-dir", help="directory of the MNIST IDX files (default: "
                                           "$BINGO_DATA, else bingo's cache directory, where "
                                           "missing files are downloaded)")
    parser.add_argument("--dataset", choices=choices.DATASETS,
                        help=f"dataset (default: {defaults.dataset}; digits needs no files)")
    parser.add_argument("--model", choices=choices.MODELS,
                        help=f"architecture (default: {defaults.model})")
    parser.add_argument("--criteria", nargs="+", choices=tuple(CRITERIA), metavar="NAME",
                        help="one-shot criteria to measure (default: all): "
                             + _names(CRITERIA))
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="seeds, one full run each (default: "
                             f"{' '.join(map(str, defaults.seeds))})")
    parser.add_argument("--granularities", nargs="+", choices=choices.GRANULARITIES[:2],
                        help=f"default: {' '.join(defaults.granularities)}")
    parser.add_argument("--epochs", type=int, help=f"training epochs (default: {defaults.epochs})")
    parser.add_argument("--ablations", nargs="*", choices=tuple(ABLATIONS), metavar="NAME",
                        help="ticket-search ablations, none without names (default: all): "
                             + _names(ABLATIONS))
    parser.add_argument("--ablation-seeds", type=int, metavar="N",
                        help="run the ablations on the first N seeds only (default: "
                             f"{defaults.ablation_seeds}; 0: none)")
    parser.add_argument("--finetune-epochs", type=int,
                        help=f"fine-tuning epochs (default: {defaults.finetune_epochs})")
    parser.add_argument("--finetune-sparsities", type=float, nargs="+", metavar="S",
                        help="default: "
                             + " ".join(f"{s:g}" for s in defaults.finetune_sparsities))
    parser.add_argument("--imp-rounds", type=int, metavar="N",
                        help="IMP rounds at every granularity (default: "
                             f"{_per_granularity(defaults.imp_rounds)})")
    parser.add_argument("--out", help=f"output directory; rerunning the same command with the "
                                      f"same --out resumes (default: {defaults.out})")
    parser.add_argument("--threads", type=int, help=f"torch threads (default: {defaults.threads})")
    parser.add_argument("--quick", action="store_true", help=_quick_help())
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide the progress bars")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Defaults, then --quick, then every flag the user set."""
    config = cli.config_from_args(args, ExperimentConfig(), QUICK)
    if getattr(args, "imp_rounds", None) is not None:
        config.imp_rounds = {g: args.imp_rounds for g in choices.GRANULARITIES}
    return config


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bingo experiment``: runs, then prints the headline table."""
    from .report import headline
    from .runner import run_experiment

    config = config_from_args(args)
    report = run_experiment(config)
    print(headline(report))
    return 0
