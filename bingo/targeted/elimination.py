"""Targeted ticket search for neurons / channels: batched greedy backward elimination.

What it estimates. Starting from the trained model, every step measures, on a fixed batch of
*training* data (the evidence), the loss of the current model with each remaining unit removed
(one at a time, on top of the units already removed) and removes the ``per_step`` units whose
removal hurts least. The elimination order is the ranking: a unit removed at step t has a lower
score than every unit removed later. This is a greedy minimisation of the evidence loss over
nested masks, i.e. the leave-one-out (not the average-over-random-subsets) effect of each unit *in
the context of the units already removed*: exactly the question a one-shot prune to a larger
sparsity asks next. Uniform random subsets (the seed paper's search) average a unit's effect over
contexts that never occur along the pruning path, which is why they ranked no better than random.

Why training data. A held-out evidence set is what the greedy search optimises, so the search
overfits it (it removes the units that happen not to matter on those few images); the training
split is larger and is already what the weights were fitted to. The validation floor of
:func:`bingo.prune` then picks the final count on separate data.

Jointly harmful units. Two units that are harmless one at a time can be harmful together
(redundant copies of one feature: either can go, not both). After removing the chosen units the
step compares the actual loss increase with the sum of their individual increases; if the actual
one exceeds it by more than ``joint_tolerance``, it keeps only the best unit of the step (whose
damage was measured exactly) and counts a back-off.

Cost, in forward-pass equivalents, for U units removed: about ``U / per_step`` steps, each
evaluating every remaining unit once (``~(U_total - removed)`` variants through the layers
downstream of its own layer only, see :mod:`bingo.targeted.incremental`) plus one full forward to
refresh the cached activations (and one more after a back-off). With the rank path a variant of a
first-layer MLP neuron costs ``N * (width_2 + width_2 * width_3 ...)`` multiply-adds, far below a
full forward. Variance: the damages are exact on the evidence batch (no sampling), so the only
randomness is which ``evidence`` training images are drawn (``seed``); it matters most for the
near-zero damages of almost-dead units, whose order is arbitrary but harmless.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bingo.errors import InputMismatchError, InvalidOptionError, require_option
from bingo.pruning import PARAM_MASKS
from bingo.reconstruct import LeastSquaresReconstruction

from .incremental import EVALUATORS, ScoredLayer, SequentialEvaluator, scored_layers


def _loss_damage(loss: Tensor, acc: Tensor, ev: SequentialEvaluator) -> Tensor:
    return loss.double() - ev.loss


def _accuracy_damage(loss: Tensor, acc: Tensor, ev: SequentialEvaluator) -> Tensor:
    # Accuracy moves in steps of 1/N: the loss breaks its many ties (at a scale below one image).
    return (ev.accuracy - acc.double()) + 1e-6 * (loss.double() - ev.loss)


METRICS: dict[str, Callable[[Tensor, Tensor, SequentialEvaluator], Tensor]] = {
    "loss": _loss_damage,
    "accuracy": _accuracy_damage,
}
"""Damage measure -> (variant loss, variant accuracy, evaluator) -> damage (higher = worse)."""

COSTS: dict[str, Callable[[SequentialEvaluator, ScoredLayer], float]] = {
    "unit": lambda ev, layer: 1.0,
    "macs": SequentialEvaluator.unit_macs,
}
"""What a removal saves, per unit of a layer: one unit ("unit": the count of units is what is
minimised), or the multiply-adds per example it removes ("macs": inference cost; a conv channel
saves far more than an fc neuron)."""


def _priority(damage: Tensor, saving: Tensor) -> Tensor:
    """Order of removal, lowest first: damage per unit of saving. A removal that *lowers* the
    loss (negative damage) ranks higher the more it saves, hence the product there."""
    return torch.where(damage > 0, damage / saving, damage * saving)


@dataclass
class EliminationConfig:
    """Hyper-parameters of :func:`eliminate`; the defaults are the documented neuron default."""

    per_step: int = 4
    """Units removed per step (at most; fewer after a joint-check back-off). Small on purpose:
    removing many units on one evaluation fails because harmless-alone units are harmful
    together."""
    evidence: int = 1024
    """Training examples the damages are measured on (a seeded random subset of ``data``; all
    of it if smaller). On LeNet-300-100 (seed 0) 1024 pruned as far as 2048 at half the cost."""
    metric: str = "loss"
    """Damage measure, a key of :data:`METRICS`: evidence cross-entropy increase ("loss") or
    accuracy drop with the loss as tie-break ("accuracy"). "accuracy" looked better on the seeds
    it was chosen on (LeNet-300-100 seeds 0-2, ``docs/targeted_settings.py``: 65.3% vs 62.4% of
    the neurons at the floor) and worse on unseen seeds 3-5 (54.6% vs 58.1%), so the loss, the
    lower-variance measure, stays the default (docs/results.md)."""
    stop_drop: float = 0.03
    """Stopping rule: stop once the evidence accuracy falls more than this below the dense
    model's. Units not removed by then are ranked above the removed ones, by their last measured
    damage (a one-shot ranking of the rest)."""
    max_fraction: float = 0.98
    """Never remove more than this fraction of all scored units (and never a layer's last unit)."""
    joint_check: bool = True
    """Check each multi-unit step's actual damage against the sum of the single-unit damages and
    back off to one unit when it exceeds it (see the module docstring)."""
    joint_tolerance: float = 0.5
    """Back off when actual > predicted + joint_tolerance * max(|predicted|, joint_floor)."""
    joint_floor: float = 1e-4
    """Smallest damage scale of the joint check (loss units), so that float noise on the
    near-zero damages of dead units never triggers it."""
    lazy: int = 64
    """Lazy greedy (Minoux's accelerator): between full passes, re-measure only the ``lazy``
    units with the smallest last-measured damage and pick among them; 0 re-measures every unit
    every step. Removing units rarely makes another unit *less* damaging, so a stale damage is
    roughly a lower bound and the true best is almost always in the short list."""
    full_every: int = 8
    """With ``lazy``: re-measure every remaining unit every this many steps."""
    saving: str = "unit"
    """What a removal is worth, a key of :data:`COSTS`: units are picked by damage per unit
    ("unit", the default: most units removed at the floor) or by damage per multiply-add saved
    ("macs": a faster shrunk model for the damage, when layers differ in cost per unit, as the
    conv channels and fc neurons of LeNet-5 do)."""
    refit_every: int = 0
    """Every this many steps, refit the working model's surviving weights to the dense layer
    outputs on the evidence (:class:`bingo.LeastSquaresReconstruction`), so that later damages
    are measured on the model a reconstructed prune will be; 0 never refits (the damages are
    those of plain removal). One refit costs about one forward of the evidence per layer plus a
    solve per layer. Measured on LeNet-300-100 (docs/results.md, ``targeted-refit+ls``): it
    did not help, so the default stays 0."""
    evaluator: str = "rank"
    """Downstream evaluator of :data:`bingo.targeted.incremental.EVALUATORS`."""
    memory_budget: int = 2 ** 25
    """Most elements of one candidate chunk's largest intermediate tensor (float32: x4 bytes)."""
    backend: str = "auto"
    """bingo_kernels backend (``"auto"``: Triton on CUDA tensors, else torch)."""
    seed: int = 0
    """Seed of the evidence subset."""

    def validate(self) -> None:
        """Raise InvalidOptionError naming the first bad value."""
        for name in ("per_step", "evidence", "memory_budget", "full_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
        require_option("metric", self.metric, METRICS)
        require_option("saving", self.saving, COSTS)
        require_option("evaluator", self.evaluator, EVALUATORS)
        if not 0.0 <= self.stop_drop <= 1.0:
            raise InvalidOptionError(f"stop_drop must lie in [0, 1], got {self.stop_drop}")
        if not 0.0 < self.max_fraction <= 1.0:
            raise InvalidOptionError(f"max_fraction must lie in (0, 1], got {self.max_fraction}")
        for name in ("lazy", "refit_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidOptionError(f"{name} must be an integer >= 0, got {value!r}")
        if self.joint_tolerance < 0 or self.joint_floor <= 0:
            raise InvalidOptionError("joint_tolerance must be >= 0 and joint_floor > 0")


@dataclass
class EliminationResult:
    """What :func:`eliminate` returns."""

    scores: dict[str, Tensor]
    """Score key -> float32 (units,) scores, higher = keep (= removed later)."""
    order: list[tuple[str, int]]
    """(score key, unit) in the order they were removed."""
    history: list[dict] = field(default_factory=list)
    """One entry per step: removed, evidence loss/accuracy after it, predicted and actual
    damage, whether the joint check backed off."""
    variants: int = 0
    """Single-unit removal variants evaluated (downstream-only passes)."""
    refreshes: int = 0
    """Cache refreshes: forwards of the evidence batch from the first changed layer on."""
    backoffs: int = 0
    """Steps the joint check cut back to one unit."""
    refits: int = 0
    """Least-squares refits of the working model (``refit_every``)."""
    stopped: str = ""
    """Why the elimination stopped."""
    seconds: float = 0.0
    """Wall time of the whole elimination."""


def evidence_batch(data, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random subset of ``size`` examples of ``data`` ((inputs, targets) or a
    TensorDataset); all of it, in a seeded order, when it is smaller."""
    tensors = getattr(data, "tensors", data)
    if not isinstance(tensors, (tuple, list)) or len(tensors) != 2 or \
            not all(isinstance(t, Tensor) for t in tensors):
        raise InvalidOptionError("data must be (inputs, targets) tensors or a TensorDataset")
    inputs, targets = tensors
    if inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise InputMismatchError(f"data has {inputs.shape[0]} inputs and {targets.shape[0]} "
                                 "targets; they must match and be non-empty")
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(inputs.shape[0], generator=generator)[:size]
    return inputs[pick], targets[pick]


def _set_unit(work: nn.Module, source: nn.Module, layer: ScoredLayer, unit: int,
              removed: bool) -> None:
    """Zero unit ``unit`` of ``layer`` in ``work`` (weight row and bias entry), or restore it
    from ``source``."""
    target, original = work[layer.index], source[layer.index]
    with torch.no_grad():
        target.weight[unit] = 0.0 if removed else original.weight[unit]
        if target.bias is not None:
            target.bias[unit] = 0.0 if removed else original.bias[unit]


@torch.no_grad()
def eliminate(model: nn.Module, data, config: Optional[EliminationConfig] = None, *,
              include=None, exclude=None, progress: bool = True) -> EliminationResult:
    """Greedy backward elimination of ``model``'s neurons / channels on training evidence.

    Args:
        model: the trained nn.Sequential (not modified; a copy is pruned).
        data: training data, (inputs, targets) or a TensorDataset; ``config.evidence`` examples
            of it are the evidence.
        config: :class:`EliminationConfig` (defaults when None).
        include, exclude: layers, as for :func:`bingo.units.find_units` (neuron granularity:
            every Linear / Conv2d but the output layer by default).
        progress: tqdm bar over removed units.

    Returns:
        :class:`EliminationResult`; ``.scores`` goes to :func:`bingo.prune` like any baseline.
    """
    config = config or EliminationConfig()
    config.validate()
    started = time.perf_counter()
    layers = scored_layers(model, include, exclude)
    work = copy.deepcopy(model).eval()
    inputs, targets = evidence_batch(data, config.evidence, config.seed)
    device = next(model.parameters()).device
    ev = SequentialEvaluator(work, inputs.to(device), targets.to(device),
                             memory_budget=config.memory_budget, backend=config.backend)
    damage_of = METRICS[config.metric]
    dense_accuracy = ev.accuracy
    units = {l.key: work[l.index].weight.shape[0] for l in layers}
    macs = [COSTS[config.saving](ev, l) for l in layers]
    # Normalised by the mean so that "unit" and "macs" damages stay on the loss's scale.
    saving = {l.key: torch.full((units[l.key],), c / (sum(macs) / len(macs)),
                                dtype=torch.float64) for l, c in zip(layers, macs)}
    alive = {k: torch.ones(n, dtype=torch.bool) for k, n in units.items()}
    last = {k: torch.zeros(n, dtype=torch.float64) for k, n in units.items()}
    total = sum(units.values())
    limit = min(math.floor(config.max_fraction * total), total - len(layers))
    result = EliminationResult(scores={}, order=[], refreshes=1)
    refit = None
    if config.refit_every:
        refit = LeastSquaresReconstruction(inputs, samples=inputs.shape[0])
        refit.prepare(work)
    # Where a backed-off unit's weights come from: the trained model, or the last refit.
    reference = model
    bar = tqdm(total=limit, desc="targeted elimination", unit="unit", disable=not progress)
    with bar:
        step = 0
        while len(result.order) < limit:
            damages, owners, savings = [], [], []
            if refit is not None and step and step % config.refit_every == 0:
                refit(work, _removal_masks(work, layers, alive))
                reference = copy.deepcopy(work)
                ev.refresh()
                result.refreshes += 1
                result.refits += 1
            shortlist = _shortlist(alive, last, saving, config.lazy) if (
                config.lazy and step % config.full_every) else None
            step += 1
            for i, layer in enumerate(layers):
                candidates = alive[layer.key].nonzero().flatten()
                if candidates.numel() <= 1:
                    continue  # a layer keeps its last unit
                if shortlist is not None:
                    candidates = candidates[shortlist[layer.key][candidates]]
                    if candidates.numel() == 0:
                        continue
                loss, acc = ev.evaluate(layer, candidates, config.evaluator)
                damage = damage_of(loss.cpu(), acc.cpu(), ev)
                last[layer.key][candidates] = damage
                damages.append(damage)
                savings.append(saving[layer.key][candidates])
                owners.append(torch.stack([torch.full_like(candidates, i), candidates], 1))
                result.variants += candidates.numel()
            if not damages:
                result.stopped = "every layer is down to one unit"
                break
            damage, owner = torch.cat(damages), torch.cat(owners)
            picked = _pick(damage, _priority(damage, torch.cat(savings)), owner, alive, layers,
                           min(config.per_step, limit - len(result.order)))
            before = (ev.loss, ev.accuracy)
            for d, i, unit in picked:
                _set_unit(work, model, layers[i], unit, removed=True)
            ev.refresh(min(layers[i].index for _, i, _ in picked))
            result.refreshes += 1
            predicted = sum(d for d, _, _ in picked)
            actual = damage_of(torch.tensor([ev.loss]), torch.tensor([ev.accuracy]),
                               _Before(*before))[0].item()
            backoff = (config.joint_check and len(picked) > 1 and actual > predicted
                       + config.joint_tolerance * max(abs(predicted), config.joint_floor))
            if backoff:
                for _, i, unit in picked[1:]:
                    _set_unit(work, reference, layers[i], unit, removed=False)
                ev.refresh(min(layers[i].index for _, i, _ in picked[1:]))
                picked = picked[:1]
                result.refreshes += 1
                result.backoffs += 1
            for _, i, unit in picked:
                alive[layers[i].key][unit] = False
                result.order.append((layers[i].key, unit))
            result.history.append(dict(removed=len(result.order), loss=ev.loss,
                                       accuracy=ev.accuracy, predicted=predicted,
                                       actual=actual, backoff=bool(backoff)))
            bar.update(len(picked))
            if ev.accuracy < dense_accuracy - config.stop_drop:
                result.stopped = (f"evidence accuracy {ev.accuracy:.4f} fell more than "
                                  f"{config.stop_drop} below dense {dense_accuracy:.4f}")
                break
        else:
            result.stopped = f"removed the maximum of {limit} units"
    result.scores = _scores(result.order, alive, last, saving, units)
    result.seconds = time.perf_counter() - started
    return result


def _removal_masks(work: nn.Sequential, layers: list[ScoredLayer], alive: dict
                   ) -> dict[str, Tensor]:
    """Parameter keep-masks of the units still alive, as :func:`bingo.prune` writes them at
    neuron granularity, for the refit."""
    masks = {}
    for layer in layers:
        name = layer.key.rpartition(".")[0]
        for pname, mask in PARAM_MASKS["neuron"](alive[layer.key], work[layer.index]).items():
            masks[f"{name}.{pname}"] = mask
    return masks


class _Before:
    """The loss and accuracy before a step, in the shape METRICS reads from an evaluator."""

    def __init__(self, loss: float, accuracy: float):
        self.loss, self.accuracy = loss, accuracy


def _shortlist(alive: dict, last: dict, saving: dict, count: int) -> dict[str, Tensor]:
    """Per layer, a bool mask of the ``count`` remaining units of lowest priority (last damage
    per saving)."""
    keys = list(alive)
    damage = torch.cat([torch.where(alive[k], _priority(last[k], saving[k]), torch.inf)
                        for k in keys])
    chosen = torch.zeros(damage.numel(), dtype=torch.bool)
    chosen[torch.argsort(damage, stable=True)[:count]] = True
    chosen &= torch.isfinite(damage)
    return dict(zip(keys, torch.split(chosen, [alive[k].numel() for k in keys])))


def _pick(damage: Tensor, priority: Tensor, owner: Tensor, alive: dict,
          layers: list[ScoredLayer], count: int) -> list[tuple[float, int, int]]:
    """The ``count`` (damage, layer, unit) of lowest priority, never taking a layer's last
    unit."""
    left = {i: int(alive[l.key].sum()) for i, l in enumerate(layers)}
    picked = []
    for position in torch.argsort(priority, stable=True).tolist():
        i, unit = owner[position].tolist()
        if left[i] <= 1:
            continue
        left[i] -= 1
        picked.append((float(damage[position]), i, unit))
        if len(picked) == count:
            break
    return picked


def _scores(order: list[tuple[str, int]], alive: dict, last: dict, saving: dict, units: dict
            ) -> dict[str, Tensor]:
    """Elimination position as the score (higher = removed later = keep); units never removed
    rank above all removed ones, among themselves by their last measured priority."""
    scores = {k: torch.zeros(n, dtype=torch.float32) for k, n in units.items()}
    for position, (key, unit) in enumerate(order):
        scores[key][unit] = float(position)
    keys = list(units)
    priority = {k: _priority(last[k], saving[k]) for k in keys}
    survivors = [(float(priority[k][u]), keys.index(k), u) for k in keys
                 for u in alive[k].nonzero().flatten().tolist()]
    for rank, (_, ki, unit) in enumerate(sorted(survivors)):
        scores[keys[ki]][unit] = float(len(order) + rank)
    return scores
