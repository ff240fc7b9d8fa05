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

Which units. On a plain nn.Sequential at neuron granularity (LeNet-300-100, LeNet-5: the
recorded MNIST numbers) the candidates are each Linear / Conv2d's output units and the variants
run through :class:`bingo.targeted.incremental.SequentialEvaluator`. On any other model (and with
``granularity="structured"``, or ``EliminationConfig(evaluator="batched")`` on an nn.Sequential)
they are the units of the model's unit groups (:func:`bingo.units.find_units`: attention heads /
key-value groups, MLP neurons, conv channels with everything coupled to them), each removal
zeroing every slice of the unit, evaluated by :class:`bingo.targeted.grouped.GroupEvaluator`.
The steps, the stopping rule, the lazy short list, the joint check and the scores are the same.

Cost, in forward-pass equivalents, for U units removed: about ``U / per_step`` steps, each
evaluating every remaining unit once (``~(U_total - removed)`` variants; with ``lazy`` most steps
evaluate only the short list) plus one forward to refresh the current model (and one more after a
back-off). On an nn.Sequential a variant runs through the layers downstream of its own layer only
(:mod:`bingo.targeted.incremental`); with the rank path a variant of a first-layer MLP neuron
costs ``N * (width_2 + width_2 * width_3 ...)`` multiply-adds, far below a full forward. On other
models a variant is downstream-only where the batch can be shared up to the group's first layer
(conv nets, MLPs; a transformer's MLP neurons one evidence example at a time), a batched full
forward where it cannot (attention heads; :mod:`bingo.targeted.grouped`).
Variance: the damages are exact on the evidence batch (no sampling), so the only
randomness is which ``evidence`` training images are drawn (``seed``); it matters most for the
near-zero damages of almost-dead units, whose order is arbitrary but harmless.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bingo.errors import InputMismatchError, InvalidOptionError, NonFiniteError, require_option
from bingo.pruning import PARAM_MASKS
from bingo.reconstruct import LeastSquaresReconstruction
from bingo.units import find_units

from .checks import check_evidence, floating_dtype
from .grouped import GroupEvaluator
from .incremental import EVALUATORS, ScoredLayer, SequentialEvaluator, scored_layers


class Removals(Protocol):
    """What :func:`eliminate` needs of an evaluator: the candidate groups, the current working
    model's loss and accuracy, batched single-unit removals, and removing / restoring units.
    :class:`_SequentialRemovals` (a plain nn.Sequential) and
    :class:`bingo.targeted.grouped.GroupEvaluator` (any model) implement it."""

    keys: list[str]
    """Score key of each group."""
    units: list[int]
    """Units of each group."""
    loss: float
    accuracy: float

    def evaluate(self, index: int, candidates: Tensor) -> tuple[Tensor, Tensor]: ...
    def remove(self, units: list[tuple[int, int]]) -> None: ...
    def restore(self, units: list[tuple[int, int]], reference: nn.Module) -> None: ...
    def refresh(self) -> tuple[float, float]: ...
    def keep_masks(self, alive: dict[str, Tensor]) -> dict[str, Tensor]: ...
    def unit_macs(self, index: int) -> float: ...


def _loss_damage(loss: Tensor, acc: Tensor, ev: Removals) -> Tensor:
    return loss.double() - ev.loss


def _accuracy_damage(loss: Tensor, acc: Tensor, ev: Removals) -> Tensor:
    # Accuracy moves in steps of 1/N: the loss breaks its many ties (at a scale below one image).
    return (ev.accuracy - acc.double()) + 1e-6 * (loss.double() - ev.loss)


METRICS: dict[str, Callable[[Tensor, Tensor, Removals], Tensor]] = {
    "loss": _loss_damage,
    "accuracy": _accuracy_damage,
}
"""Damage measure -> (variant loss, variant accuracy, evaluator) -> damage (higher = worse)."""

COSTS: dict[str, Callable[[Removals, int], float]] = {
    "unit": lambda removals, index: 1.0,
    "macs": lambda removals, index: removals.unit_macs(index),
}
"""What a removal saves, per unit of a group: one unit ("unit": the count of units is what is
minimised), or the multiply-adds per example it removes ("macs": inference cost; a conv channel
saves far more than an fc neuron; :meth:`SequentialEvaluator.unit_macs` on an nn.Sequential,
:mod:`bingo.targeted.macs` on unit groups)."""

EVALUATOR_CHOICES: tuple[str, ...] = ("auto", *EVALUATORS, "batched")
"""``EliminationConfig.evaluator``: ``"auto"`` (the rank path on a plain nn.Sequential at neuron
granularity, the batched unit-group evaluator otherwise), the Sequential evaluators of
:data:`bingo.targeted.incremental.EVALUATORS`, or ``"batched"``
(:class:`bingo.targeted.grouped.GroupEvaluator`, any model)."""


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
    evaluator: str = "auto"
    """How variants are evaluated, one of :data:`EVALUATOR_CHOICES`: ``"auto"`` takes the rank
    path on a plain nn.Sequential at neuron granularity (the recorded MNIST numbers) and the
    batched unit-group evaluator otherwise; ``"rank"`` / ``"masked"`` need a plain
    nn.Sequential; ``"batched"`` works on any model (on an nn.Sequential: its per-layer
    neurons through :class:`bingo.executor.BatchedEvaluator`)."""
    memory_budget: int = 2 ** 25
    """Most elements of one candidate chunk's largest intermediate tensor (float32: x4 bytes);
    the batched evaluator gets this many elements' bytes in the model's dtype per pass."""
    backend: str = "auto"
    """bingo_kernels backend (``"auto"``: Triton on CUDA tensors, else torch)."""
    seed: int = 0
    """Seed of the evidence subset."""
    prior_pool: float = 1.5
    """With a prior ranking (``eliminate(prior=...)``, e.g. the significance a
    :class:`bingo.TicketSearch` gathered during training): a full pass measures only the
    remaining units the prior ranks lowest, this many times as many as are still to be removed;
    units never measured keep the prior's order, above every measured unit. Smaller is cheaper
    and trusts the prior more."""

    def validate(self) -> None:
        """Raise InvalidOptionError naming the first bad value."""
        for name in ("per_step", "evidence", "memory_budget", "full_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
        require_option("metric", self.metric, METRICS)
        require_option("saving", self.saving, COSTS)
        require_option("evaluator", self.evaluator, EVALUATOR_CHOICES)
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
        if not self.prior_pool >= 1.0:
            raise InvalidOptionError(f"prior_pool must be >= 1, got {self.prior_pool}")


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
    """Single-unit removal variants evaluated."""
    refreshes: int = 0
    """Refreshes of the current model's loss: forwards of the evidence batch (on an
    nn.Sequential from the first changed layer on)."""
    backoffs: int = 0
    """Steps the joint check cut back to one unit."""
    refits: int = 0
    """Least-squares refits of the working model (``refit_every``)."""
    stopped: str = ""
    """Why the elimination stopped."""
    seconds: float = 0.0
    """Wall time of the whole elimination."""
    granularity: str = "neuron"
    """What the scores rank: ``"neuron"`` (a plain nn.Sequential's per-layer neurons) or
    ``"structured"`` (the model's unit groups, :func:`bingo.units.find_units`)."""
    evaluator: str = ""
    """The evaluator the variants ran through (``"rank"``, ``"masked"`` or ``"batched"``)."""
    unmeasured: int = 0
    """Units a prior ranking kept out of every pass (their scores are the prior's order)."""


def data_tensors(data) -> tuple[Tensor, Tensor]:
    """The (inputs, targets) tensors of ``data`` ((inputs, targets) or a TensorDataset);
    raises unless they are two tensors with the same, non-zero number of examples."""
    tensors = getattr(data, "tensors", data)
    if not isinstance(tensors, (tuple, list)) or len(tensors) != 2 or \
            not all(isinstance(t, Tensor) for t in tensors):
        raise InvalidOptionError("data must be (inputs, targets) tensors or a TensorDataset")
    inputs, targets = tensors
    if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0] or \
            inputs.shape[0] == 0:
        raise InputMismatchError(f"data has {inputs.shape[0] if inputs.dim() else 0} inputs and "
                                 f"{targets.shape[0] if targets.dim() else 0} targets; they must "
                                 "match and be non-empty")
    return inputs, targets


def evidence_batch(data, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random subset of ``size`` examples of ``data`` ((inputs, targets) or a
    TensorDataset); all of it, in a seeded order, when it is smaller."""
    inputs, targets = data_tensors(data)
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


class _SequentialRemovals:
    """:class:`Removals` of a plain nn.Sequential's neurons through a
    :class:`SequentialEvaluator`: a removal zeroes the unit's weight row and bias entry (what
    :func:`bingo.prune` does at neuron granularity) and re-runs the children from the first
    changed one."""

    def __init__(self, model: nn.Sequential, work: nn.Sequential, layers: list[ScoredLayer],
                 ev: SequentialEvaluator, evaluator: str):
        self.model, self.work, self.layers, self.ev = model, work, layers, ev
        self.evaluator = evaluator
        self.keys = [layer.key for layer in layers]
        self.units = [work[layer.index].weight.shape[0] for layer in layers]

    @property
    def loss(self) -> float:
        return self.ev.loss

    @property
    def accuracy(self) -> float:
        return self.ev.accuracy

    def evaluate(self, index: int, candidates: Tensor) -> tuple[Tensor, Tensor]:
        return self.ev.evaluate(self.layers[index], candidates, self.evaluator)

    def remove(self, units: list[tuple[int, int]]) -> None:
        for i, unit in units:
            _set_unit(self.work, self.model, self.layers[i], unit, removed=True)
        self.ev.refresh(min(self.layers[i].index for i, _ in units))

    def restore(self, units: list[tuple[int, int]], reference: nn.Module) -> None:
        for i, unit in units:
            _set_unit(self.work, reference, self.layers[i], unit, removed=False)
        self.ev.refresh(min(self.layers[i].index for i, _ in units))

    def refresh(self) -> tuple[float, float]:
        return self.ev.refresh()

    def keep_masks(self, alive: dict[str, Tensor]) -> dict[str, Tensor]:
        return _removal_masks(self.work, self.layers, alive)

    def unit_macs(self, index: int) -> float:
        return self.ev.unit_macs(self.layers[index])


def _sequential_layers(model: nn.Module, granularity: str, evaluator: str, include, exclude
                       ) -> Optional[list[ScoredLayer]]:
    """The scored layers when the elimination takes the nn.Sequential path, else None (the
    unit-group path); raises when a Sequential-only evaluator is asked for on anything else."""
    sequential_only = evaluator in EVALUATORS
    if granularity == "structured" or evaluator == "batched":
        if sequential_only:
            raise InvalidOptionError(f"evaluator={evaluator!r} evaluates a plain nn.Sequential's "
                                     "neurons only; use evaluator='auto' or 'batched' for "
                                     "structured unit groups")
        return None
    if not isinstance(model, nn.Sequential):
        if sequential_only:
            raise InputMismatchError(
                f"evaluator={evaluator!r} needs a plain nn.Sequential, got "
                f"{type(model).__name__}; use evaluator='auto' or 'batched' (its unit groups)")
        return None
    try:
        return scored_layers(model, include, exclude)
    except InputMismatchError as exc:
        if sequential_only:
            raise InputMismatchError(f"evaluator={evaluator!r}: {exc}; use evaluator='auto' or "
                                     "'batched' (the model's unit groups)") from exc
        return None  # nested blocks, grouped convolutions: the unit groups handle them


def _removals(model: nn.Module, work: nn.Module, inputs: Tensor, targets: Tensor,
              config: "EliminationConfig", granularity: str, include, exclude,
              example_inputs: Any) -> tuple[Removals, str, str]:
    """The evaluator of the elimination: (removals, granularity of the scores, evaluator)."""
    layers = _sequential_layers(model, granularity, config.evaluator, include, exclude)
    if layers is not None:
        evaluator = "rank" if config.evaluator == "auto" else config.evaluator
        ev = SequentialEvaluator(work, inputs, targets, memory_budget=config.memory_budget,
                                 backend=config.backend)
        return _SequentialRemovals(model, work, layers, ev, evaluator), "neuron", evaluator
    if isinstance(model, nn.Sequential) and granularity == "neuron" and \
            config.evaluator == "batched":
        layout = find_units(work, "neuron", include, exclude)
        granularity = "neuron"
    else:
        layout = find_units(work, "structured", include, exclude,
                            example_inputs=inputs[:1] if example_inputs is None
                            else example_inputs)
        granularity = "structured"
    dtype = floating_dtype(work) or torch.float32
    budget = config.memory_budget * torch.empty((), dtype=dtype).element_size()
    removals = GroupEvaluator(work, layout, inputs, targets, memory_budget=budget,
                              backend=config.backend)
    return removals, granularity, "batched"


def _check_finite(values: Tensor, what: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteError(f"{what} is NaN or Inf: the model's outputs overflow or the data "
                             "holds non-finite values")


@torch.no_grad()
def eliminate(model: nn.Module, data, config: Optional[EliminationConfig] = None, *,
              include=None, exclude=None, progress: bool = True, granularity: str = "neuron",
              example_inputs: Any = None, prior: Optional[dict[str, Tensor]] = None
              ) -> EliminationResult:
    """Greedy backward elimination of ``model``'s neurons / channels / heads on training
    evidence.

    Args:
        model: the trained model (not modified; a copy is pruned): a plain nn.Sequential (its
            Linear / Conv2d neurons) or any model :mod:`bingo.structure` understands (its unit
            groups: heads, MLP neurons, channels).
        data: training data, (inputs, targets) tensors or a TensorDataset; ``config.evidence``
            examples of it are the evidence. Inputs may be token ids (then targets are the next
            tokens, ``(N, T)``, and loss and accuracy are per token).
        config: :class:`EliminationConfig` (defaults when None).
        include, exclude: layers, as for :func:`bingo.units.find_units` (neuron granularity on
            an nn.Sequential: every Linear / Conv2d but the output layer by default; otherwise
            unit groups by module name or score key: every removable group by default).
        progress: tqdm bar over removed units.
        granularity: ``"neuron"`` (an nn.Sequential's neurons; on any other model its unit
            groups) or ``"structured"`` (the unit groups, whatever the model).
        example_inputs: what the structure trace runs (unit groups only); default: one example
            of the evidence.
        prior: score key -> (units,) scores, higher = keep, of every scored group (e.g.
            ``TicketSearch.significance()`` at the same granularity): the elimination measures
            only the units it ranks lowest (``config.prior_pool``) and ranks the others by it.

    Returns:
        :class:`EliminationResult`; ``.scores`` goes to :func:`bingo.prune` like any baseline.
    """
    config = config or EliminationConfig()
    config.validate()
    require_option("granularity", granularity, ("neuron", "structured"))
    started = time.perf_counter()
    inputs, targets = evidence_batch(data, config.evidence, config.seed)
    check_evidence(model, inputs, targets)
    work = copy.deepcopy(model).eval()
    device = next(model.parameters()).device
    inputs, targets = inputs.to(device), targets.to(device)
    removals, granularity, evaluator = _removals(model, work, inputs, targets, config,
                                                 granularity, include, exclude, example_inputs)
    _check_finite(torch.tensor([removals.loss]), "the evidence loss of the model")
    damage_of = METRICS[config.metric]
    dense_accuracy = removals.accuracy
    keys = removals.keys
    units = dict(zip(keys, removals.units))
    macs = [COSTS[config.saving](removals, i) for i in range(len(keys))]
    if config.saving == "macs" and min(macs) <= 0:
        empty = keys[macs.index(min(macs))]
        raise InvalidOptionError(f"saving='macs': removing a unit of {empty!r} saves no "
                                 "multiply-add of a weight; use saving='unit'")
    # Normalised by the mean so that "unit" and "macs" damages stay on the loss's scale.
    saving = {k: torch.full((units[k],), c / (sum(macs) / len(macs)), dtype=torch.float64)
              for k, c in zip(keys, macs)}
    alive = {k: torch.ones(n, dtype=torch.bool) for k, n in units.items()}
    last = {k: torch.zeros(n, dtype=torch.float64) for k, n in units.items()}
    total = sum(units.values())
    limit = min(math.floor(config.max_fraction * total), total - len(keys))
    prior_rank = None if prior is None else _prior_rank(prior, units)
    measured = {k: torch.full((n,), prior is None) for k, n in units.items()}
    result = EliminationResult(scores={}, order=[], refreshes=1, granularity=granularity,
                               evaluator=evaluator)
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
                refit(work, removals.keep_masks(alive))
                reference = copy.deepcopy(work)
                removals.refresh()
                result.refreshes += 1
                result.refits += 1
            shortlist = _shortlist(alive, measured, last, saving, config.lazy) if (
                config.lazy and step % config.full_every) else None
            if shortlist is None and prior_rank is not None:
                shortlist = _prior_pool(alive, prior_rank, math.ceil(
                    config.prior_pool * (limit - len(result.order))))
            step += 1
            for i, key in enumerate(keys):
                candidates = alive[key].nonzero().flatten()
                if candidates.numel() <= 1:
                    continue  # a group keeps its last unit
                if shortlist is not None:
                    candidates = candidates[shortlist[key][candidates]]
                    if candidates.numel() == 0:
                        continue
                if progress:  # a full pass over a large model's units takes a while
                    bar.set_postfix_str(f"{key}: {candidates.numel()} candidates")
                loss, acc = removals.evaluate(i, candidates)
                damage = damage_of(loss.cpu(), acc.cpu(), removals)
                _check_finite(damage, f"the damage of removing units of {key!r}")
                last[key][candidates] = damage
                measured[key][candidates] = True
                damages.append(damage)
                savings.append(saving[key][candidates])
                owners.append(torch.stack([torch.full_like(candidates, i), candidates], 1))
                result.variants += candidates.numel()
            if not damages:
                result.stopped = "every group is down to one unit"
                break
            damage, owner = torch.cat(damages), torch.cat(owners)
            picked = _pick(damage, _priority(damage, torch.cat(savings)), owner, alive, keys,
                           min(config.per_step, limit - len(result.order)))
            before = (removals.loss, removals.accuracy)
            removals.remove([(i, unit) for _, i, unit in picked])
            result.refreshes += 1
            predicted = sum(d for d, _, _ in picked)
            actual = damage_of(torch.tensor([removals.loss]), torch.tensor([removals.accuracy]),
                               _Before(*before))[0].item()
            backoff = (config.joint_check and len(picked) > 1 and actual > predicted
                       + config.joint_tolerance * max(abs(predicted), config.joint_floor))
            if backoff:
                removals.restore([(i, unit) for _, i, unit in picked[1:]], reference)
                picked = picked[:1]
                result.refreshes += 1
                result.backoffs += 1
            for _, i, unit in picked:
                alive[keys[i]][unit] = False
                result.order.append((keys[i], unit))
            result.history.append(dict(removed=len(result.order), loss=removals.loss,
                                       accuracy=removals.accuracy, predicted=predicted,
                                       actual=actual, backoff=bool(backoff)))
            bar.update(len(picked))
            if removals.accuracy < dense_accuracy - config.stop_drop:
                result.stopped = (f"evidence accuracy {removals.accuracy:.4f} fell more than "
                                  f"{config.stop_drop} below dense {dense_accuracy:.4f}")
                break
        else:
            result.stopped = f"removed the maximum of {limit} units"
    result.scores = _scores(result.order, alive, last, saving, units, measured, prior_rank)
    result.unmeasured = sum(int((~m).sum()) for m in measured.values())
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


def _prior_rank(prior: dict[str, Tensor], units: dict[str, int]) -> dict[str, Tensor]:
    """Score key -> each unit's position in the prior's global order, lowest score first."""
    if set(prior) != set(units):
        raise InputMismatchError(
            f"prior: its keys must be the scored groups; missing {sorted(set(units) - set(prior))}"
            f", unknown {sorted(set(prior) - set(units))}")
    for key, n in units.items():
        if tuple(prior[key].shape) != (n,):
            raise InputMismatchError(f"prior[{key!r}]: shape {tuple(prior[key].shape)}, the group "
                                     f"has {n} units")
    keys = list(units)
    flat = torch.cat([prior[k].detach().double().cpu().flatten() for k in keys])
    _check_finite(flat, "the prior scores")
    rank = torch.empty(flat.numel(), dtype=torch.long)
    rank[torch.argsort(flat, stable=True)] = torch.arange(flat.numel())
    return dict(zip(keys, torch.split(rank, [units[k] for k in keys])))


def _prior_pool(alive: dict, prior_rank: dict, count: int) -> dict[str, Tensor]:
    """Per group, a bool mask of the ``count`` remaining units the prior ranks lowest."""
    keys = list(alive)
    rank = torch.cat([torch.where(alive[k], prior_rank[k].double(), torch.inf) for k in keys])
    chosen = torch.zeros(rank.numel(), dtype=torch.bool)
    chosen[torch.argsort(rank, stable=True)[:count]] = True
    chosen &= torch.isfinite(rank)
    return dict(zip(keys, torch.split(chosen, [alive[k].numel() for k in keys])))


def _shortlist(alive: dict, measured: dict, last: dict, saving: dict, count: int
               ) -> dict[str, Tensor]:
    """Per group, a bool mask of the ``count`` remaining measured units of lowest priority (last
    damage per saving)."""
    keys = list(alive)
    damage = torch.cat([torch.where(alive[k] & measured[k], _priority(last[k], saving[k]),
                                    torch.inf) for k in keys])
    chosen = torch.zeros(damage.numel(), dtype=torch.bool)
    chosen[torch.argsort(damage, stable=True)[:count]] = True
    chosen &= torch.isfinite(damage)
    return dict(zip(keys, torch.split(chosen, [alive[k].numel() for k in keys])))


def _pick(damage: Tensor, priority: Tensor, owner: Tensor, alive: dict, keys: list[str],
          count: int) -> list[tuple[float, int, int]]:
    """The ``count`` (damage, group, unit) of lowest priority, never taking a group's last
    unit."""
    left = {i: int(alive[k].sum()) for i, k in enumerate(keys)}
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


def _scores(order: list[tuple[str, int]], alive: dict, last: dict, saving: dict, units: dict,
            measured: dict, prior_rank: Optional[dict]) -> dict[str, Tensor]:
    """Elimination position as the score (higher = removed later = keep); units never removed
    rank above all removed ones, among themselves by their last measured priority, and units
    never measured (a prior kept them out) above those, in the prior's order."""
    scores = {k: torch.zeros(n, dtype=torch.float32) for k, n in units.items()}
    for position, (key, unit) in enumerate(order):
        scores[key][unit] = float(position)
    keys = list(units)
    priority = {k: _priority(last[k], saving[k]) for k in keys}
    survivors = [(not bool(measured[k][u]),
                  int(prior_rank[k][u]) if prior_rank is not None and not measured[k][u]
                  else float(priority[k][u]), keys.index(k), u)
                 for k in keys for u in alive[k].nonzero().flatten().tolist()]
    for rank, (_, _, ki, unit) in enumerate(sorted(survivors)):
        scores[keys[ki]][unit] = float(len(order) + rank)
    return scores
