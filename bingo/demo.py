"""``bingo demo``: BINGO end to end on a small dataset, in about a minute on a laptop CPU.

Steps: split the dataset 60/20/20 (train/val/test), train LeNet-300-100 with a
:class:`bingo.TicketSearch` attached, prune the trained model in one shot to the validation
accuracy floor ``dense - floor_drop``, then compare BINGO's ranking with the magnitude and random
baselines at a grid of sparsities on the test split. Writes ``report.json`` (configuration,
environment, every number, timings, the search path) and ``accuracy_vs_sparsity.png`` into the
output directory, and prints a table.

The default dataset is scikit-learn's bundled 8x8 digits, so the demo needs no download.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

import bingo
from bingo import training
from bingo.baselines import baseline_scores
from bingo.data import DATASETS, load_dataset, make_loader, split_dataset
from bingo.errors import InvalidOptionError
from bingo.estimators import ESTIMATORS, METRICS
from bingo.models import model_for
from bingo.plots import accuracy_vs_sparsity
from bingo.search import RESETS
from bingo.training import (TrainStats, accuracy, environment, nonzero_parameters,
                            torch_threads)
from bingo.units import GRANULARITIES

SPARSITY_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
"""Sparsities at which the accuracy curves are measured."""

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
"""Train / validation / test fractions of the dataset."""

REPORT_NAME = "report.json"
PLOT_NAME = "accuracy_vs_sparsity.png"


@dataclass
class DemoConfig:
    """Hyper-parameters of the demo. The defaults fit a ~1 minute run on 2 CPU cores."""

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
    """A search runs after every ``every``-th training step (1: 340 searches, about 20 s of search
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
    """Data directory for file-based datasets (default: ``$BINGO_DATA``)."""
    out: str = "bingo-demo"
    """Directory that receives report.json and the plot."""
    progress: bool = True
    """Show tqdm progress bars (on stderr)."""
    threads: Optional[int] = 1
    """torch intra-op threads during the run (None: torch's default). One, because these small
    ops gain little from a second thread, while on a 2-core machine a second thread competing
    with any other process slowed our training steps ~60x and searches ~4x."""

    def validate(self) -> None:
        """Raise InvalidOptionError for a bad demo-only value (TicketSearch checks its own)."""
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


QUICK = dict(epochs=2, subsets=16, every=1)
"""What ``--quick`` changes: a smoke test of every step in a few seconds, not a result."""


def quick(config: DemoConfig) -> DemoConfig:
    """``config`` with the :data:`QUICK` settings."""
    return dataclasses.replace(config, **QUICK)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def train(model: nn.Module, search: bingo.TicketSearch, train_set: TensorDataset,
          config: DemoConfig) -> TrainStats:
    """Train with Adam, calling ``search.step`` after every optimizer step; times both apart."""
    loader = make_loader(train_set, config.batch_size, shuffle=True, seed=config.seed)
    return training.train(model, loader, config.epochs, config.lr, after_step=[search.step],
                          progress=config.progress, desc="train + ticket search")


def rankings(model: nn.Module, scores: dict, config: DemoConfig) -> dict[str, dict]:
    """The score dicts compared: BINGO's significance and the baselines, by method name."""
    return {
        "bingo": scores,
        "magnitude": baseline_scores("magnitude", model, config.granularity),
        "random": baseline_scores("random", model, config.granularity, seed=config.seed),
    }


def prune_to_floor(model: nn.Module, ranked: dict[str, dict], splits, floor: float,
                   config: DemoConfig) -> dict[str, bingo.PruneResult]:
    """Each method pruned as far as keeps validation accuracy >= ``floor``."""
    results = {}
    for name, scores in ranked.items():
        main = name == "bingo"  # the baselines give context; only BINGO's is shrunk and timed
        results[name] = bingo.prune(model, scores, floor=floor,
                                    eval_fn=lambda m: accuracy(m, splits.val),
                                    progress=config.progress and main,
                                    structured="auto" if main else False)
    return results


def curves(model: nn.Module, ranked: dict[str, dict], test_set: TensorDataset,
           config: DemoConfig) -> dict[str, list[float]]:
    """Test accuracy of each method's pruned model at each of ``config.sparsities``."""
    out = {name: [] for name in ranked}
    bar = tqdm(total=len(ranked) * len(config.sparsities), desc="accuracy vs sparsity",
               unit="prune", disable=not config.progress)
    with bar, warnings.catch_warnings():
        # Never-sampled units (counted in the report) may go at the highest sparsities.
        warnings.simplefilter("ignore")
        for name, scores in ranked.items():
            for sparsity in config.sparsities:
                result = bingo.prune(model, scores, sparsity=sparsity, progress=False,
                                     allow_unsampled=True, structured=False)
                out[name].append(accuracy(result.model, test_set))
                bar.update()
    return out


def summarize(result: bingo.PruneResult, test_set: TensorDataset, param_names) -> dict:
    """JSON-ready numbers of one floor-pruned model."""
    structured = None
    if result.structured is not None:
        structured = dict(parameters=result.structured.parameters,
                          dense_parameters=result.structured.dense_parameters,
                          speedup=result.structured.speedup,
                          test_accuracy=accuracy(result.structured.model, test_set))
    return dict(floor=result.floor, val_accuracy=result.accuracy,
                test_accuracy=accuracy(result.model, test_set), sparsity=result.sparsity,
                weight_sparsity=result.weight_sparsity, pruned_units=result.pruned_units,
                total_units=result.total_units,
                nonzero_parameters=nonzero_parameters(result.export_state_dict(), param_names),
                structured=structured)


def run(config: DemoConfig) -> dict:
    """Run the demo, write report.json and the plot into ``config.out``; return the report."""
    config.validate()
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise InvalidOptionError(f"--out {out} exists and is not a directory")
    with torch_threads(config.threads):
        return _run(config, out)


def _run(config: DemoConfig, out: Path) -> dict:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = model_for(config.dataset, "lenet_300_100")
    # Built before the data is loaded so a bad option fails at once, and before training so that
    # reset="init" snapshots the initial weights.
    search = bingo.TicketSearch(
        model, granularity=config.granularity, subsets=config.subsets, fraction=config.fraction,
        reset=config.reset, metric=config.metric, score=config.score, every=config.every,
        seed=config.seed, literal=config.literal, rewind_step=config.rewind_step)
    splits = split_dataset(load_dataset(config.dataset, config.data_dir), SPLIT_FRACTIONS,
                           config.seed)

    stats = train(model, search, splits.train, config)
    dense_val, dense_test = accuracy(model, splits.val), accuracy(model, splits.test)
    scores = search.significance()
    ranked = rankings(model, scores, config)

    prune_start = time.perf_counter()
    at_floor = prune_to_floor(model, ranked, splits, dense_val - config.floor_drop, config)
    prune_seconds = time.perf_counter() - prune_start

    curves_start = time.perf_counter()
    curve_values = curves(model, ranked, splits.test, config)
    curves_seconds = time.perf_counter() - curves_start

    param_names = [name for name, _ in model.named_parameters()]
    summaries = {name: summarize(r, splits.test, param_names) for name, r in at_floor.items()}
    pruned = {**summaries.pop("bingo"), "floor_search": at_floor["bingo"].history}
    dense_params = sum(p.numel() for p in model.parameters())

    out.mkdir(parents=True, exist_ok=True)
    plot = accuracy_vs_sparsity(
        out / PLOT_NAME, config.sparsities, curve_values, dense_accuracy=dense_test,
        chosen=(pruned["sparsity"], pruned["test_accuracy"]),
        title=f"LeNet-300-100 on {config.dataset}, {config.granularity} pruning",
        xlabel=f"sparsity (fraction of {config.granularity} units pruned)")
    report = dict(
        config={**asdict(config), "sparsities": list(config.sparsities)},
        environment=environment(),
        data=dict(dataset=config.dataset, split=list(SPLIT_FRACTIONS), split_seed=config.seed,
                  sizes={k: len(getattr(splits, k)) for k in ("train", "val", "test")}),
        model=dict(name="lenet_300_100", parameters=dense_params),
        dense=dict(val_accuracy=dense_val, test_accuracy=dense_test, parameters=dense_params,
                   nonzero_parameters=nonzero_parameters(model.state_dict(), param_names),
                   final_train_loss=stats.final_loss),
        pruned=pruned,
        baselines_at_floor=summaries,
        search=dict(path=search.path, path_reason=search.path_reason, searches=search.searches,
                    skipped=search.skipped, unsampled_units=scores.unsampled(),
                    significance=scores.summary()),
        timings=dict(train_seconds=stats.train_seconds, search_seconds=search.seconds,
                     steps=stats.steps, overhead_percent=100.0 * search.seconds /
                     max(stats.train_seconds, 1e-12),
                     prune_seconds=prune_seconds, curves_seconds=curves_seconds,
                     total_seconds=time.perf_counter() - started),
        curves=dict(split="test", sparsities=list(config.sparsities), accuracy=curve_values),
        files=dict(report=str(out / REPORT_NAME), plot=plot),
    )
    with open(out / REPORT_NAME, "w") as f:
        json.dump(report, f, indent=2)
    return report


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
    "granularity": _Flag(str, "unit searched and pruned", GRANULARITIES),
    "score": _Flag(str, "significance estimator", tuple(ESTIMATORS)),
    "metric": _Flag(str, "metric whose change under a reset is measured", METRICS),
    "reset": _Flag(str, "value a reset unit takes", RESETS),
    "rewind_step": _Flag(int, "with --reset rewind: the step whose weights are the reset values"),
    "subsets": _Flag(int, "K, random subsets per search"),
    "fraction": _Flag(float, "probability that a unit is in a subset"),
    "every": _Flag(int, "search after every N-th training step"),
    "epochs": _Flag(int, "training epochs"),
    "batch_size": _Flag(int, "training and search batch size"),
    "lr": _Flag(float, "Adam learning rate"),
    "seed": _Flag(int, "seed of the split, weights, batch order, search hash, random baseline"),
    "floor_drop": _Flag(float, "prune while val accuracy >= dense val accuracy - this"),
    "dataset": _Flag(str, "dataset (mnist reads IDX files from --data-dir or $BINGO_DATA)",
                     tuple(DATASETS)),
    "data_dir": _Flag(str, "data directory for file-based datasets (None: $BINGO_DATA)"),
    "out": _Flag(str, "output directory for report.json and the plot"),
    "threads": _Flag(int, "torch intra-op threads (a second thread only pays on an idle machine)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bingo demo`` flags; every value defaults to None so that --quick can tell what the
    user set."""
    defaults = DemoConfig()
    for name, flag in _FLAGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=flag.type, choices=flag.choices,
                            default=None,
                            help=f"{flag.help} (default: {getattr(defaults, name)})")
    parser.add_argument("--literal", action="store_true", default=None,
                        help="with --score seed: keep the paper formula's own ordering "
                             "(an ablation; see README)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {', '.join(f'{k}={v}' for k, v in QUICK.items())} "
                             "(explicit flags still win)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide the progress bars")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """DemoConfig from parsed flags: defaults, then --quick, then every flag the user set."""
    config = quick(DemoConfig()) if args.quick else DemoConfig()
    given = {f.name: getattr(args, f.name) for f in fields(DemoConfig)
             if getattr(args, f.name, None) is not None}
    return dataclasses.replace(config, **given)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``bingo demo``."""
    report = run(config_from_args(args))
    print(format_table(report))
    return 0
