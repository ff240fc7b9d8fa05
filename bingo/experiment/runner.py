"""Runs the experiment: one training run per seed with every ticket search attached, then every
criterion measured the same way, then IMP; writes results.json, results.md and the plots.

Per seed and granularity, every method gets (see :mod:`bingo.experiment.measure`): the largest
sparsity at each validation floor (grid, then bisection in the first failing cell), test accuracy
at each sparsity of the curve, test accuracy after a short fine-tune with the mask fixed, its
extra wall time and that time in training-equivalents, and the overlap of its pruned set with
IMP's at equal sparsity.
"""

from __future__ import annotations

import copy
import math
import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import bingo
from bingo.baselines.imp import imp
from bingo.baselines.taylor import TaylorAccumulator
from bingo.data import load_dataset, make_loader
from bingo.models import model_for
from bingo.rundir import RunDirectory
from bingo.training import (accuracy, environment, torch_threads, train,
                            warnings_above_progress_bars)

from . import measure
from .config import ABLATIONS, SPLIT_FRACTIONS, ExperimentConfig
from .criteria import CRITERIA, TRAINING_HOOKED, TrainedRun, applies
from .splits import experiment_splits

MAIN = "bingo"
"""Name of the main BINGO setting in every table."""
IMP = "imp"
"""Name of iterative magnitude pruning in every table."""
SHAPLEY_IMAGES = 1000
"""Training images the Shapley baseline evaluates each coalition on (cost grows with them)."""
HOOK_TIMING_STEPS = 40
"""Training steps timed with and without Taylor hooks to measure their overhead."""


class Snapshot:
    """An ``after_step`` observer keeping a copy of the weights after step ``step``."""

    def __init__(self, model: nn.Module, step: int):
        self.model, self.step, self.calls, self.state = model, step, 0, None

    def __call__(self, _inputs: Tensor, _targets: Tensor) -> None:
        self.calls += 1
        if self.calls == self.step:
            self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _searches(model: nn.Module, config: ExperimentConfig, seed: int, ablations, rewind_step: int,
              search_loader) -> dict[str, dict[str, bingo.TicketSearch]]:
    """Granularity -> setting name -> TicketSearch, all on the same model."""
    out = {}
    for granularity in config.granularities:
        out[granularity] = {}
        for name in (MAIN, *ablations):
            kwargs = {**config.search, **ABLATIONS.get(name, {})}
            held_out = kwargs.pop("search_data", None) == "search"
            if kwargs.get("reset") == "rewind":
                kwargs["rewind_step"] = rewind_step
            out[granularity][name] = bingo.TicketSearch(
                model, granularity=granularity, every=config.every[granularity], seed=seed,
                search_data=search_loader if held_out else None, **kwargs)
    return out


def _hook_overhead(model: nn.Module, loader, granularity: str, lr: float) -> float:
    """Measured (time with Taylor hooks / time without) - 1 over a few interleaved steps."""
    clone = copy.deepcopy(model)
    optimizer = torch.optim.Adam(clone.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    batches = [b for _, b in zip(range(HOOK_TIMING_STEPS), loader)]
    accumulator = TaylorAccumulator(clone, granularity)
    seconds = {True: 0.0, False: 0.0}
    for i, (inputs, targets) in enumerate(batches * 2):
        hooked = i % 2 == 0
        if hooked:
            accumulator.attach()
        start = time.perf_counter()
        loss = criterion(clone(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds[hooked] += time.perf_counter() - start
        if hooked:
            accumulator.close()
    return seconds[True] / max(seconds[False], 1e-12) - 1.0


def _one_shot(scores, seconds: float, run: TrainedRun, splits, config, dense_val,
              train_seconds: float, imp: measure.IMPPrunedSets, loader, finetune: bool) -> dict:
    model = run.model
    floors = measure.floors(model, scores, dense_val, config.floor_drops, splits.val,
                            splits.test, resolution=config.floor_resolution)
    main_floor = floors[f"{config.floor_drops[0]:g}"]["sparsity"]
    overlap_at = sorted({*config.report_sparsities, main_floor} - {0.0})
    coverage = getattr(scores, "coverage", None)
    return dict(
        kind="search" if coverage is not None else "one-shot",
        extra_seconds=seconds, training_equivalents=seconds / max(train_seconds, 1e-12),
        floors=floors,
        curve=measure.curve(model, scores, config.sparsities, splits.test),
        finetune=(measure.finetuned(model, scores, config.finetune_sparsities, loader,
                                    config.finetune_epochs, config.lr, splits.test)
                  if finetune else None),
        imp_overlap=measure.imp_overlaps(model, scores, imp, overlap_at),
        unsampled=scores.unsampled() if coverage is not None else 0,
    )


def _search_details(result) -> dict:
    """What a targeted search reports beside its scores (JSON-ready)."""
    keep = ("variants", "refreshes", "backoffs", "refits", "stopped", "seconds", "steps",
            "layer_sparsity", "rounds")
    out = {k: getattr(result, k) for k in keep if hasattr(result, k)}
    if hasattr(result, "order"):
        out["removed"] = len(result.order)
    return out


def _cost_vs_imp(method: dict, imp_method: dict, config: ExperimentConfig) -> dict:
    """Wall time of a one-shot method to its -1 pt floor (its scoring + the floor search) next
    to IMP's wall time to the same sparsity (its rounds after the dense run, up to the first
    one at least as sparse). Both start from the same trained model, so training is left out."""
    floor = method["floors"][f"{config.floor_drops[0]:g}"]
    seconds = method["extra_seconds"] + floor["seconds"]
    elapsed, reached = 0.0, None
    for r in imp_method["rounds"]:
        if r["round"] == 0:
            continue
        elapsed += r["seconds"]
        if r["sparsity"] >= floor["sparsity"] - 1e-9:
            reached = r
            break
    return dict(seconds=seconds, sparsity=floor["sparsity"],
                imp_round=reached["round"] if reached else None,
                imp_seconds=elapsed if reached else None,
                ratio=seconds / elapsed if reached and elapsed > 0 else None)


def _imp_method(result, model: nn.Module, config: ExperimentConfig, splits, dense_val: float,
                dense_test: float) -> dict:
    """IMP's rows: its own retrained network at each round, thresholds on validation."""
    rounds = []
    for r in result.rounds:
        rounds.append(dict(round=r.round, sparsity=r.sparsity, weight_sparsity=r.weight_sparsity,
                           val_accuracy=r.accuracy,
                           test_accuracy=measure.state_accuracy(model, r.state, splits.test),
                           seconds=r.seconds, training_equivalents=r.training_equivalents))
    floors = {}
    for drop in config.floor_drops:
        passing = None
        for r in rounds:  # the last round before the first one below the floor
            if r["val_accuracy"] < dense_val - drop:
                break
            passing = r
        floors[f"{drop:g}"] = dict(
            sparsity=passing["sparsity"] if passing else 0.0,
            val_accuracy=passing["val_accuracy"] if passing else dense_val,
            test_accuracy=passing["test_accuracy"] if passing else None,
            round=passing["round"] if passing else 0)
    curve, reached_sparsity = [], []
    for s in config.sparsities:
        # IMP's own network at the first round that reaches s (dense at s = 0; None if no round
        # goes that far).
        reached = next((r for r in rounds if r["sparsity"] >= s - 1e-9), None)
        if s == 0:
            curve.append(dense_test)
            reached_sparsity.append(0.0)
        else:
            curve.append(reached["test_accuracy"] if reached else None)
            reached_sparsity.append(reached["sparsity"] if reached else None)
    seconds = sum(r["seconds"] for r in rounds)
    retrained = [r for r in rounds if r["round"] > 0]  # round 0 is the dense run itself
    return dict(kind="imp", extra_seconds=seconds,
                training_equivalents=float(len(retrained)), floors=floors, curve=curve,
                curve_sparsities=reached_sparsity,
                finetune=None, imp_overlap=None, rounds=rounds)


def _compare_with_imp(methods: dict, model: nn.Module, imp: measure.IMPPrunedSets,
                      config: ExperimentConfig,
                      dense_val: float, train_seconds: float) -> None:
    """The seed paper's comparisons for the main setting, at the first (-1 pt) floor.

    ``seed_overlap``: BINGO's floor-pruned set against IMP's floor-pruned set (their own
    sparsities, as the paper compares them). ``compute_vs_imp``: wall time of BINGO (training +
    search + floor search) against IMP's (training + the rounds up to the first one that is at
    least as sparse and still above the floor).
    """
    key = f"{config.floor_drops[0]:g}"
    main, imp_method = methods[MAIN], methods[IMP]
    bingo_sparsity = main["floors"][key]["sparsity"]
    bingo_pruned = measure.pruned_sets(
        measure.pruned_at(model, main["scores"], bingo_sparsity).unit_masks)
    imp_floor = imp_method["floors"][key]
    main["seed_overlap"] = measure.overlap(
        bingo_pruned, imp.at(imp_floor["sparsity"]))
    bingo_seconds = train_seconds + main["extra_seconds"] + main["floors"][key]["seconds"]
    floor = dense_val - config.floor_drops[0]
    elapsed, matched = train_seconds, None
    for r in imp_method["rounds"]:
        elapsed += r["seconds"]
        if r["sparsity"] >= bingo_sparsity and r["val_accuracy"] >= floor:
            matched = dict(round=r["round"], seconds=elapsed)
            break
    imp_total = train_seconds + sum(r["seconds"] for r in imp_method["rounds"]
                                    if r["round"] <= imp_floor["round"])
    main["compute_vs_imp"] = dict(
        bingo_seconds=bingo_seconds, imp_total_seconds=imp_total,
        imp_matching_round=matched["round"] if matched else None,
        imp_matching_seconds=matched["seconds"] if matched else None,
        ratio=matched["seconds"] / bingo_seconds if matched else None)


def dense_model(config: ExperimentConfig, dataset, seed: int):
    """``(splits, model)``: seed ``seed``'s split and the dense model trained exactly as
    :func:`run_seed` trains it (searches and hooks never change the weights), without them; for
    side studies such as ``docs/targeted_settings.py``."""
    splits = experiment_splits(dataset, seed)
    torch.manual_seed(seed)
    model = model_for(config.dataset, config.model)
    train(model, make_loader(splits.train, config.batch_size, shuffle=True, seed=seed),
          config.epochs, config.lr, progress=False)
    return splits, model


def run_seed(config: ExperimentConfig, dataset, seed: int, with_ablations: bool) -> dict:
    """Everything measured for one seed (JSON-ready); ``seconds`` is its wall time."""
    started = time.perf_counter()
    splits = experiment_splits(dataset, seed)
    torch.manual_seed(seed)
    model = model_for(config.dataset, config.model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    loader = make_loader(splits.train, config.batch_size, shuffle=True, seed=seed)
    search_loader = make_loader(splits.search, config.batch_size, shuffle=True, seed=seed)
    rewind_step = max(1, round(config.rewind_epochs * len(loader)))
    ablations = config.ablations if with_ablations else ()
    searches = _searches(model, config, seed, ablations, rewind_step, search_loader)
    taylor = {g: TaylorAccumulator(model, g).attach() for g in config.granularities}
    snapshot = Snapshot(model, rewind_step)
    observers = [snapshot] + [s.step for by_name in searches.values() for s in by_name.values()]
    stats = train(model, loader, config.epochs, config.lr, after_step=observers,
                  progress=config.progress, desc=f"seed {seed}: train + searches")
    for accumulator in taylor.values():
        accumulator.close()
    dense_val, dense_test = accuracy(model, splits.val), accuracy(model, splits.test)
    run = TrainedRun(model=model, initial_state=initial, taylor=taylor,
                     score_data=_first(splits.train, SHAPLEY_IMAGES), seed=seed,
                     shapley_samples=config.shapley_samples, train_data=splits.train,
                     refit=dict(samples=config.refit_samples,
                                exact_features=config.refit_exact_features))
    rewind_state = initial if config.imp_rewind == "init" else snapshot.state

    def imp_train(m: nn.Module) -> None:
        train(m, make_loader(splits.train, config.batch_size, shuffle=True, seed=seed),
              config.epochs, config.lr, progress=False)

    out = dict(seed=seed, splits=splits.sizes(), dense=dict(val_accuracy=dense_val,
               test_accuracy=dense_test, final_train_loss=stats.final_loss),
               train_seconds=stats.train_seconds, steps=stats.steps, rewind_step=rewind_step,
               granularities={})
    for granularity in config.granularities:
        start = time.perf_counter()
        imp_result = imp(copy.deepcopy(model), imp_train, rounds=config.imp_rounds[granularity],
                         granularity=granularity, rewind_state=rewind_state,
                         eval_fn=lambda m: accuracy(m, splits.val), keep_states=True,
                         progress=config.progress)
        imp_seconds = time.perf_counter() - start
        imp_sets = measure.IMPPrunedSets(model, imp_result.scores())
        methods = {}
        criteria = [name for name in config.criteria if applies(name, granularity)]
        bar = tqdm(total=len(searches[granularity]) + len(criteria), leave=False,
                   desc=f"seed {seed}: {granularity} criteria", disable=not config.progress)
        with bar:
            for name, search in searches[granularity].items():
                scores = search.significance()
                methods[name] = _one_shot(
                    scores, search.seconds, run, splits, config, dense_val,
                    stats.train_seconds, imp_sets, loader, finetune=name == MAIN)
                methods[name].update(searches=search.searches, path=search.path,
                                     config=search.config.scoring_fields())
                if name == MAIN:
                    methods[name]["scores"] = scores
                bar.update()
            hook_seconds = None
            for name in criteria:
                start = time.perf_counter()
                scores = CRITERIA[name](run, granularity)
                seconds = time.perf_counter() - start
                if name in TRAINING_HOOKED:
                    if hook_seconds is None:  # one measurement shared by the hooked criteria
                        hook_seconds = max(0.0, _hook_overhead(
                            model, loader, granularity, config.lr)) * stats.train_seconds
                    seconds += hook_seconds
                methods[name] = _one_shot(scores, seconds, run, splits, config, dense_val,
                                          stats.train_seconds, imp_sets, loader, finetune=True)
                details = getattr(scores, "result", None)
                if details is not None:
                    methods[name]["search"] = _search_details(details)
                if granularity == "neuron":
                    methods[name]["structured"] = measure.structured(
                        model, scores, methods[name]["floors"], config, splits.test)
                bar.update()
        methods[IMP] = _imp_method(imp_result, model, config, splits, dense_val, dense_test)
        methods[IMP]["wall_seconds"] = imp_seconds
        for name in criteria:
            methods[name]["cost_vs_imp"] = _cost_vs_imp(methods[name], methods[IMP], config)
        _compare_with_imp(methods, model, imp_sets, config, dense_val, stats.train_seconds)
        significance = methods[MAIN].pop("scores")
        out["granularities"][granularity] = dict(
            methods=methods,
            significance_values=torch.cat([v.reshape(-1).float().cpu()
                                           for v in significance.values()]).tolist()
            if seed == config.seeds[0] else None)
    out["seconds"] = time.perf_counter() - started
    return out


def _first(dataset, count: int):
    inputs, targets = dataset.tensors
    return torch.utils.data.TensorDataset(inputs[:count], targets[:count])


RESUME_IGNORES = ("data_dir", "out", "progress", "threads")
"""Settings that may change when a run is resumed: they do not change its numbers."""


def run_experiment(config: ExperimentConfig) -> dict:
    """Run every seed, aggregate, write the outputs into ``config.out``; return the report.

    Options and the output directory are checked before any work. Each seed's measurements are
    saved in ``config.out`` as soon as the seed finishes; seeds an earlier run with the same
    configuration finished there are kept, not rerun."""
    from . import report as reporting

    config.validate()
    out = RunDirectory(config.out, reporting.jsonable(config), ignore=RESUME_IGNORES)
    limit = config.ablation_seeds if config.ablation_seeds is not None else math.inf
    with torch_threads(config.threads), warnings_above_progress_bars():
        machine = environment()
        dataset = load_dataset(config.dataset, config.data_dir)
        seeds = []
        for index, seed in enumerate(tqdm(config.seeds, desc="seeds",
                                          disable=not config.progress)):
            seeds.append(out.piece(
                f"seed-{seed}", lambda: run_seed(config, dataset, seed, index < limit)))
    report = dict(config=reporting.jsonable(config), environment=machine,
                  data=dict(dataset=config.dataset, split_fractions=list(SPLIT_FRACTIONS),
                            sizes=seeds[0]["splits"]),
                  seeds=seeds, total_seconds=sum(s["seconds"] for s in seeds))
    report["summary"] = reporting.summarize(report)
    reporting.write(report, out.path)
    return report
