"""``bingo demo``: BINGO end to end on a small dataset, in about half a minute on 2 CPU cores.

Steps (:mod:`bingo.demo_pipeline`): split the dataset 60/20/20 (train/val/test), train
LeNet-300-100 with a :class:`bingo.TicketSearch` attached, prune the trained model in one shot to
the validation accuracy floor ``dense - floor_drop``, then compare BINGO's ranking with the
magnitude and random baselines at a grid of sparsities on the test split. Writes ``report.json``
(configuration, environment, every number, timings, the search path) and
``accuracy_vs_sparsity.png`` into the output directory, and prints a table.

The default dataset is scikit-learn's bundled 8x8 digits, so the demo needs no download. This
module holds the configuration and the command line and imports torch only to run.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

from bingo import choices, cli
from bingo.rundir import prepare_output_dir

SPARSITY_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
"""Sparsities at which the accuracy curves are measured."""

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
"""Train / validation / test fractions of the dataset."""

REPORT_NAME = "report.json"
PLOT_NAME = "accuracy_vs_sparsity.png"


@dataclass
class DemoConfig:
    """Hyper-parameters of the demo. The defaults take 21-34 s on 2 CPU cores (measured)."""

    granularity: str = "weight"
    """Unit that is searched and pruned: ``"weight"`` or ``"neuron"``."""
    subsets: int = 64
    """K, random subsets evaluated per search."""
    fraction: float = 0.05
    """Probability that a unit is in a subset."""
    score: str = "attribution"
    """Estimator (``"attribution"`` or ``"seed"``). On validation, attribution/loss tied with the
    paper's seed/accuracy at weight granularity and led at neuron granularity (docs/demo.md)."""
    metric: str = "loss"
    """Metric whose change under a reset is measured: ``"loss"`` or ``"accuracy"``."""
    reset: str = "init"
    """Reset value of a unit: ``"init"``, ``"zero"`` or ``"rewind"``."""
    rewind_step: Optional[int] = None
    """With ``reset="rewind"``: the training step whose weights are the reset values."""
    literal: bool = False
    """With ``score="seed"``: keep the paper formula's own ordering (an ablation)."""
    every: int = 1
    """A search runs after every ``every``-th training step (1: 340 searches, about 15 s of search
    on 2 CPU cores with the torch backend)."""
    epochs: int = 20
    """Training epochs."""
    batch_size: int = 64
    """Training (and search) batch size."""
    lr: float = 1e-3
    """Adam learning rate."""
    seed: int = 0
    """Seed of the split, the initial weights, the batch order, the search hash and the random
    baseline."""
    floor_drop: float = 0.01
    """Pruning keeps validation accuracy >= dense validation accuracy - floor_drop."""
    sparsities: tuple[float, ...] = SPARSITY_GRID
    """Sparsities of the accuracy-vs-sparsity curves."""
    dataset: str = "digits"
    """A dataset of :data:`bingo.data.DATASETS` (``"mnist"`` reads IDX files from data_dir)."""
    data_dir: Optional[str] = None
    """Data directory for file-based datasets (default: ``$BINGO_DATA``, else bingo's cache
    directory, where missing MNIST files are downloaded)."""
    out: str = "bingo-demo"
    """Directory that receives report.json and the plot."""
    progress: bool = True
    """Show tqdm progress bars (on stderr)."""
    threads: Optional[int] = 1
    """torch intra-op threads during the run (None: torch's default). One, because these small
    ops gain little from a second thread, while on a 2-core machine a second thread competing
    with any other process slowed our training steps ~60x and searches ~4x."""
    quick: bool = False
    """Set by --quick; recorded so that a smoke run is never mistaken for a result."""

    def validate(self) -> None:
        """Raise InvalidOptionError for a bad demo-only value (TicketSearch checks its own)."""
        from bingo.errors import InvalidOptionError

        optional = ("threads",) if self.threads is not None else ()
        for name in ("epochs", "batch_size", *optional):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise InvalidOptionError(f"lr must be positive, got {self.lr!r}")
        if not 0 <= self.floor_drop < 1:
            raise InvalidOptionError(f"floor_drop must be in [0, 1), got {self.floor_drop!r}")
        if not self.sparsities or any(not 0.0 <= s <= 1.0 for s in self.sparsities):
            raise InvalidOptionError(
                f"sparsities must be a non-empty list of numbers in [0, 1], got {self.sparsities}")


QUICK = dict(epochs=2, subsets=16, every=1, quick=True)
"""What ``--quick`` changes: a smoke test of every step in a few seconds, not a result."""


def quick(config: DemoConfig) -> DemoConfig:
    """``config`` with the :data:`QUICK` settings."""
    return dataclasses.replace(config, **QUICK)


def run(config: DemoConfig) -> dict:
    """Run the demo, write report.json and the plot into ``config.out``; return the report.

    Options and the output directory are checked before any work."""
    config.validate()
    out = prepare_output_dir(config.out)
    from bingo.demo_pipeline import run_demo

    return run_demo(config, out)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    """The demo's summary table and curves as plain text."""
    dense, pruned, t = report["dense"], report["pruned"], report["timings"]
    data = report["data"]
    lines = [
        f"BINGO demo: LeNet-300-100 on {data['dataset']} (train/val/test "
        f"{data['sizes']['train']}/{data['sizes']['val']}/{data['sizes']['test']}), "
        f"{report['config']['granularity']} granularity, search path {report['search']['path']}",
        "",
        f"{'':28}{'dense':>12}{'pruned':>12}",
        f"{'accuracy (val)':28}{dense['val_accuracy']:>12.4f}{pruned['val_accuracy']:>12.4f}",
        f"{'accuracy (test)':28}{dense['test_accuracy']:>12.4f}{pruned['test_accuracy']:>12.4f}",
        f"{'sparsity (units)':28}{0.0:>12.4f}{pruned['sparsity']:>12.4f}",
        f"{'parameters (nonzero)':28}{dense['nonzero_parameters']:>12,}"
        f"{pruned['nonzero_parameters']:>12,}",
    ]
    if pruned["structured"] is not None:
        s = pruned["structured"]
        lines.append(f"{'parameters (shrunk MLP)':28}{s['dense_parameters']:>12,}"
                     f"{s['parameters']:>12,}")
        lines.append(f"{'measured CPU speedup':28}{'1.00x':>12}{s['speedup']:>11.2f}x")
    lines += [
        f"{'ticket-search overhead':28}{t['overhead_percent']:>11.1f}%  (search "
        f"{t['search_seconds']:.1f} s / training {t['train_seconds']:.1f} s, "
        f"{report['search']['searches']} searches)",
        f"{'accuracy floor (val)':28}{pruned['floor']:>12.4f}",
        "",
        "each method pruned to the same validation floor:",
        f"{'method':>10}{'sparsity':>12}{'test acc':>12}{'nonzero':>12}",
    ]
    for name, r in {"bingo": pruned, **report["baselines_at_floor"]}.items():
        lines.append(f"{name:>10}{r['sparsity']:>12.4f}{r['test_accuracy']:>12.4f}"
                     f"{r['nonzero_parameters']:>12,}")
    by_method = report["curves"]["accuracy"]
    lines += [
        "",
        "test accuracy vs sparsity:",
        f"{'sparsity':>10}" + "".join(f"{m:>12}" for m in by_method),
    ]
    for i, sparsity in enumerate(report["curves"]["sparsities"]):
        lines.append(f"{sparsity:>10.2f}" + "".join(f"{a[i]:>12.4f}" for a in by_method.values()))
    lines += ["", f"total {t['total_seconds']:.1f} s; wrote {report['files']['report']} and "
              f"{report['files']['plot']}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Flag:
    """A ``bingo demo`` flag that sets the DemoConfig field of the same name."""

    type: type
    """Converter of the flag's text."""
    help: str
    """Help text; the default is appended."""
    choices: Optional[tuple] = None
    """Allowed values, or None for any."""


_FLAGS: dict[str, _Flag] = {
    "granularity": _Flag(str, "unit searched and pruned", choices.GRANULARITIES),
    "score": _Flag(str, "significance estimator", choices.SCORES),
    "metric": _Flag(str, "metric whose change under a reset is measured", choices.METRICS),
    "reset": _Flag(str, "value a reset unit takes", choices.RESETS),
    "rewind_step": _Flag(int, "with --reset rewind: the step whose weights are the reset values"),
    "subsets": _Flag(int, "K, random subsets per search"),
    "fraction": _Flag(float, "probability that a unit is in a subset"),
    "every": _Flag(int, "search after every N-th training step"),
    "epochs": _Flag(int, "training epochs"),
    "batch_size": _Flag(int, "training and search batch size"),
    "lr": _Flag(float, "Adam learning rate"),
    "seed": _Flag(int, "seed of the split, weights, batch order, search hash, random baseline"),
    "floor_drop": _Flag(float, "prune while val accuracy >= dense val accuracy - this"),
    "dataset": _Flag(str, "dataset (mnist reads IDX files from --data-dir)", choices.DATASETS),
    "data_dir": _Flag(str, "data directory for mnist (default: $BINGO_DATA, else bingo's cache "
                           "directory, where missing files are downloaded)"),
    "out": _Flag(str, "output directory for report.json and the plot"),
    "threads": _Flag(int, "torch intra-op threads (a second thread only pays on an idle machine)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bingo demo`` flags; every value defaults to None so that --quick can tell what the
    user set."""
    defaults = DemoConfig()
    for name, flag in _FLAGS.items():
        default = getattr(defaults, name)
        shown = "" if default is None or name == "data_dir" else f" (default: {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", type=flag.type, choices=flag.choices,
                            default=None, help=flag.help + shown)
    parser.add_argument("--literal", action="store_true", default=None,
                        help="with --score seed: keep the paper formula's own ordering "
                             "(an ablation; see docs/guide.md)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test in about 10 s: "
                             + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()
                                         if k != "quick")
                             + " (flags you give still win)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide the progress bars")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """DemoConfig from parsed flags: defaults, then --quick, then every flag the user set."""
    return cli.config_from_args(args, DemoConfig(), QUICK)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bingo demo``."""
    report = run(config_from_args(args))
    print(format_table(report))
    return 0
