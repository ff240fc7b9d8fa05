"""The steps of ``bingo demo`` (configuration and command line: :mod:`bingo.demo`).

Split the dataset 60/20/20 (train/val/test), train LeNet-300-100 with a
:class:`bingo.TicketSearch` attached, prune the trained model in one shot to the validation
accuracy floor ``dense - floor_drop``, then compare BINGO's ranking with the magnitude and random
baselines at a grid of sparsities on the test split; write ``report.json`` and the plot.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

import bingo
from bingo import training
from bingo.baselines import baseline_scores
from bingo.data import load_dataset, make_loader, split_dataset
from bingo.demo import PLOT_NAME, REPORT_NAME, SPLIT_FRACTIONS, DemoConfig
from bingo.models import model_for
from bingo.plots import accuracy_vs_sparsity
from bingo.training import (TrainStats, accuracy, environment, nonzero_parameters, torch_threads,
                            warnings_above_progress_bars)


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


def run_demo(config: DemoConfig, out: Path) -> dict:
    """Run the demo with ``config`` (already validated), writing into the existing directory
    ``out``; return the report."""
    with torch_threads(config.threads), warnings_above_progress_bars():
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

    plot = accuracy_vs_sparsity(
        out / PLOT_NAME, config.sparsities, curve_values, dense_accuracy=dense_test,
        at_floor={name: r.sparsity for name, r in at_floor.items()},
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
