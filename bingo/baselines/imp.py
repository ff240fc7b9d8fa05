"""Iterative magnitude pruning (IMP) with rewinding: the lottery-ticket procedure.

Papers: J. Frankle and M. Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable
Neural Networks", ICLR 2019 (arXiv:1803.03635); rewinding to an early step: J. Frankle,
G. K. Dziugaite, D. M. Roy, M. Carbin, "Linear Mode Connectivity and the Lottery Ticket
Hypothesis", ICML 2020 (arXiv:1912.05671).

Estimates: which units survive repeated train-prune-rewind cycles. Each round prunes ``rate`` of
the *remaining* units of every layer by magnitude (``output_rate`` for the output layer, as in the
paper's fully connected experiments), rewinds the survivors to ``rewind_state`` (W0, or the
weights at an early step k), and retrains with the same schedule. Cost: one full training per
round (``rounds`` trainings on top of the dense one the caller already ran) - the expensive
reference that one-shot methods such as BINGO try to match.

Conventions of :func:`imp`:

* Layers are those of :func:`bingo.units.find_units` (at neuron granularity the output layer is
  left out by default). The *output layer* is the model's last nn.Linear / nn.Conv2d (the last
  layer of ``find_units`` at weight granularity); it is pruned at ``output_rate`` when selected.
* Per layer and round, ``floor(rate * remaining)`` units are pruned (the product rounded to 9
  decimals first, so 0.2 * 15 is 3), never the last unit of a layer; a layer too small for the
  rate to remove a whole unit is left as it is. Within a layer the units with the smallest
  magnitude of the current (retrained) weights go first: ``|w|`` for weights, the row / channel /
  Conv1D column L2 norm with its bias entry for neurons; ties go to the lower flat index.
* A pruned neuron masks its whole weight row (conv channel, Conv1D column) and its bias entry.
* Weight and neuron granularity only: structured units span parameters of several layers, which
  :mod:`torch.nn.utils.prune`'s per-module masks (and the paper's per-layer rates) do not
  describe; ``granularity="structured"`` raises.
* Masks are enforced during retraining with :mod:`torch.nn.utils.prune`
  (``custom_from_mask``): the module's ``weight`` is recomputed as ``weight_orig * weight_mask``
  before every forward, so masked weights get zero gradient and stay zero; the masked entries of
  ``weight_orig`` are zeroed too, so weight decay or momentum cannot revive them. The
  reparametrisation is removed at the end (also when ``train_fn`` raises), leaving plain
  parameters with zeros where pruned.
* Rewinding copies every parameter of ``rewind_state`` into the model (masked entries then zeroed),
  and every buffer it holds (e.g. batch-norm statistics); buffers it lacks are left as they are.

The ``train_fn`` contract: ``train_fn(model)`` trains the model it is given, in place, for the
same schedule as the dense training, and builds a **fresh optimizer (and LR schedule) from
``model.parameters()`` inside every call**. The parameter objects survive the reparametrisation
(they become ``weight_orig``), but an optimizer kept across rounds would carry momentum and
learning-rate state from the previous training into the rewound network.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune
from tqdm.auto import tqdm

from bingo.errors import InvalidOptionError
from bingo.units import UnitGroup, UnitLayout, find_units

from ._common import (UnitScores, check_unpruned, checked_entry, layer_normalised,
                      require_mapping, unit_norms, unsupported_granularity)

GRANULARITIES = ("weight", "neuron")
"""What :func:`imp` prunes (see the module docstring for why not structured units)."""


@dataclass
class IMPRound:
    """The state of IMP after one round (round 0 = the dense, trained model)."""

    round: int
    """Round index: 0 for the dense model, then 1, 2, ..."""
    sparsity: float
    """Fraction of the scored units pruned so far."""
    weight_sparsity: float
    """Fraction of the elements of the scored weights masked to zero."""
    pruned_units: int
    """Units pruned so far (all layers)."""
    total_units: int
    """Units in all scored layers."""
    unit_masks: dict[str, Tensor] = field(repr=False)
    """Score key -> bool mask in the score's shape, True = kept."""
    accuracy: Optional[float]
    """``eval_fn(model)`` after this round's retraining, or None without eval_fn."""
    seconds: float
    """Wall time of this round's prune + rewind + retrain (0 for round 0)."""
    training_equivalents: int
    """Full trainings spent to reach this round: 1 + round (the dense training counts)."""
    state: Optional[dict[str, Tensor]] = field(default=None, repr=False)
    """With ``keep_states``: a plain state_dict (usual names, zeros where pruned) of the model
    after this round's retraining; None otherwise."""

    def summary(self) -> dict:
        """JSON-ready numbers of this round (kept units per layer, no tensors)."""
        return dict(round=self.round, sparsity=self.sparsity,
                    weight_sparsity=self.weight_sparsity, pruned_units=self.pruned_units,
                    total_units=self.total_units, accuracy=self.accuracy, seconds=self.seconds,
                    training_equivalents=self.training_equivalents,
                    kept={k: int(m.sum()) for k, m in self.unit_masks.items()})


@dataclass
class IMPResult:
    """What :func:`imp` returns; ``rounds[r]`` is round r (``rounds[0]`` the dense model)."""

    model: nn.Module = field(repr=False)
    """The model after the last round (the caller's, trained in place; plain parameters)."""
    rounds: list[IMPRound]
    """Round 0 (dense) to the last round."""
    granularity: str
    """``"weight"`` or ``"neuron"``."""
    rate: float
    """Fraction of the remaining units pruned per round in hidden layers."""
    output_rate: float
    """Fraction of the remaining units pruned per round in the output layer."""
    output_layer: Optional[str]
    """Score key of the output layer when it is scored (pruned at output_rate), else None."""
    pruned_in: dict[str, Tensor] = field(repr=False)
    """Score key -> int64 tensor: the round in which each unit was pruned, 0 if it survived."""
    final_magnitude: dict[str, Tensor] = field(repr=False)
    """Score key -> magnitude of the final weights (``|w|``, or layer-normalised row norm)."""

    @property
    def final(self) -> IMPRound:
        """The last round."""
        return self.rounds[-1]

    def scores(self) -> UnitScores:
        """Baseline-format scores (float32, higher = keep) encoding IMP's pruning order.

        A unit pruned in round r scores r (earlier = lower); a survivor scores ``R + 1 + t``
        (R = number of pruning rounds) with ``t = final magnitude / (2 * largest final
        magnitude)`` in [0, 0.5] (the final magnitude: ``|w|``, or the layer-normalised row norm). Hence ``bingo.prune(model, scores, sparsity=round.sparsity)`` removes exactly
        the units IMP had removed by that round, whatever the model's weights; beyond the last
        round it continues by final magnitude.
        """
        top = max((float(v.max()) for v in self.final_magnitude.values() if v.numel()),
                  default=0.0)
        survivors = float(len(self.rounds))
        out = UnitScores(granularity=self.granularity)
        for key, rounds in self.pruned_in.items():
            tiebreak = self.final_magnitude[key].double() / (2 * top) if top > 0 else 0.0
            out[key] = torch.where(rounds > 0, rounds.double(), survivors + tiebreak).float()
        return out

    def mask_at(self, sparsity: float) -> dict[str, Tensor]:
        """Unit masks (True = kept) of the first round whose sparsity reaches ``sparsity``."""
        for r in self.rounds:
            if r.sparsity >= sparsity - 1e-12:
                return r.unit_masks
        raise InvalidOptionError(
            f"IMP reached sparsity {self.final.sparsity:.4f} after {len(self.rounds) - 1} rounds; "
            f"no round reaches {sparsity}")

    def summary(self) -> dict:
        """JSON-ready description: configuration and every round's numbers."""
        return dict(method="imp", granularity=self.granularity, rate=self.rate,
                    output_rate=self.output_rate, output_layer=self.output_layer,
                    rounds=[r.summary() for r in self.rounds])


# --------------------------------------------------------------------------------------------


def units_to_prune(remaining: int, rate: float) -> int:
    """How many of a layer's ``remaining`` units one round prunes: ``floor(rate * remaining)``,
    keeping at least one."""
    return max(0, min(remaining - 1, math.floor(round(rate * remaining, 9))))


class _Masked:
    """The reparametrised layers of one IMP run: masks, rewinding, magnitudes."""

    def __init__(self, model: nn.Module, layout: UnitLayout, rewind: dict[str, Tensor]):
        self.model = model
        self.layout = layout
        self.rewind = rewind
        self.keys = list(model.state_dict())
        self.params = dict(model.named_parameters())
        self.buffers = dict(model.named_buffers())
        self.unit_masks = {g.param_name: torch.ones(layout.unit_shape(g), dtype=torch.bool,
                                                    device=g.device)
                           for g in layout.groups}
        self.masked: list[tuple[nn.Module, str, str]] = []  # (module, "weight", full name)
        for g in layout.groups:
            names = [("weight", g.param_name)]
            if layout.granularity == "neuron" and g.bias_name is not None:
                names.append(("bias", g.bias_name))
            for local, full in names:
                torch_prune.custom_from_mask(g.module, local,
                                             torch.ones_like(self.params[full], dtype=torch.bool))
                self.masked.append((g.module, local, full))

    def param_mask(self, full: str) -> Tensor:
        module, local = next((m, n) for m, n, f in self.masked if f == full)
        return getattr(module, local + "_mask")

    def effective(self, full: str) -> Tensor:
        """The parameter as the forward sees it (original * mask), detached."""
        return (self.params[full] * self.param_mask(full)).detach()

    def magnitudes(self, group: UnitGroup) -> Tensor:
        """Flat float64 magnitudes of the layer's units at the current weights."""
        if self.layout.granularity == "weight":
            return self.effective(group.param_name).abs().double().reshape(-1)
        return unit_norms(group, {name: self.effective(name) for name in group.tensors()})

    @torch.no_grad()
    def set_masks(self) -> None:
        for g in self.layout.groups:
            keep = self.unit_masks[g.param_name]
            if self.layout.granularity == "weight":
                masks = {g.param_name: keep}
            else:  # the unit's row (Conv1D: column) and bias entry, from its slices
                masks = {name: m[0] for name, m in g.param_unit_masks(keep[None]).items()}
            for module, local, full in self.masked:
                if module is g.module:
                    getattr(module, local + "_mask").copy_(masks[full])

    @torch.no_grad()
    def rewind_now(self) -> None:
        for name, param in self.params.items():
            param.copy_(self.rewind[name])
        for name, buffer in self.buffers.items():
            if name in self.rewind:
                buffer.copy_(self.rewind[name])
        for _, _, full in self.masked:
            self.params[full].mul_(self.param_mask(full))

    def plain_state(self) -> dict[str, Tensor]:
        """state_dict with the usual names and zeros where pruned (fresh copies)."""
        masked = {full for _, _, full in self.masked}
        state = {}
        for key in self.keys:
            if key in masked:
                state[key] = self.effective(key).clone()
            elif key in self.params:
                state[key] = self.params[key].detach().clone()
            elif key in self.buffers:
                state[key] = self.buffers[key].detach().clone()
        return state

    def remove(self) -> None:
        for module, local, _ in self.masked:
            if hasattr(module, local + "_orig"):
                torch_prune.remove(module, local)


def _checked_rewind(model: nn.Module, rewind_state) -> dict[str, Tensor]:
    require_mapping(rewind_state, "rewind_state", "copy.deepcopy(model.state_dict()) taken at "
                    "initialisation (W0) or at the rewind step k, covering every parameter")
    rewind = {name: checked_entry(rewind_state, "rewind_state", name, p).clone()
              for name, p in model.named_parameters()}
    for name, b in model.named_buffers():
        if name in rewind_state:
            rewind[name] = checked_entry(rewind_state, "rewind_state", name, b).clone()
    return rewind


def _check_granularity(granularity: str) -> None:
    unsupported_granularity("imp", granularity, GRANULARITIES,
                            "structured units span several layers' parameters; IMP masks and "
                            "prunes per layer")


def _check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise InvalidOptionError(f"{name} must be a fraction in [0, 1), got {value!r}")
    return float(value)


def _round_record(state: _Masked, number: int, accuracy, seconds: float,
                  keep_state: bool) -> IMPRound:
    masks = {k: m.clone() for k, m in state.unit_masks.items()}
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    zeroed = elements = 0
    for g in state.layout.groups:
        per_unit = math.prod(g.weight_shape) // masks[g.param_name].numel()
        zeroed += int((~masks[g.param_name]).sum()) * per_unit
        elements += math.prod(g.weight_shape)
    return IMPRound(round=number, sparsity=pruned / total, weight_sparsity=zeroed / elements,
                    pruned_units=pruned, total_units=total, unit_masks=masks,
                    accuracy=None if accuracy is None else float(accuracy), seconds=seconds,
                    training_equivalents=1 + number,
                    state=state.plain_state() if keep_state else None)


def imp(model: nn.Module, train_fn: Callable[[nn.Module], object], *, rounds: int,
        granularity: str = "weight", rate: float = 0.2, output_rate: float = 0.1,
        rewind_state: Optional[Mapping[str, Tensor]] = None,
        eval_fn: Optional[Callable[[nn.Module], float]] = None, include=None, exclude=None,
        keep_states: bool = False, progress: bool = True) -> IMPResult:
    """Run ``rounds`` rounds of IMP with rewinding on ``model``, in place (see the module doc).

    Args:
        model: the network, already trained (round 0); pruned and retrained in place.
        train_fn: ``train_fn(model)`` trains the model it is given for the dense schedule,
            building a fresh optimizer from ``model.parameters()`` on every call.
        rounds: number of prune-rewind-retrain rounds (>= 1).
        granularity: ``"weight"`` or ``"neuron"`` (structured units raise).
        rate: fraction of each hidden layer's remaining units pruned per round.
        output_rate: the same for the output layer (when it is scored).
        rewind_state: parameter name -> tensor for every parameter of the model (buffers
            optional): W0, or the weights at the rewind step. Copied at the start.
        eval_fn: ``eval_fn(model) -> accuracy`` evaluated after every round (and on the dense
            model, for round 0); optional.
        include, exclude: layer names or patterns, as for :func:`bingo.units.find_units`.
        keep_states: keep a plain state_dict of the model after each round in ``IMPRound.state``.
        progress: show a progress bar over the rounds.

    Returns:
        An :class:`IMPResult`; ``result.scores()`` is the baseline-format score dict.
    """
    if not callable(train_fn):
        raise InvalidOptionError(f"train_fn must be callable, got {type(train_fn).__name__}")
    if eval_fn is not None and not callable(eval_fn):
        raise InvalidOptionError(f"eval_fn must be callable, got {type(eval_fn).__name__}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InvalidOptionError(f"rounds must be a positive integer, got {rounds!r}")
    rate, output_rate = _check_rate("rate", rate), _check_rate("output_rate", output_rate)
    _check_granularity(granularity)
    layout = find_units(model, granularity, include, exclude)
    check_unpruned(model, layout)
    rewind = _checked_rewind(model, rewind_state)
    last = find_units(model, "weight").groups[-1].param_name
    output_layer = last if any(g.param_name == last for g in layout.groups) else None
    pruned_in = {g.param_name: torch.zeros(layout.unit_shape(g), dtype=torch.int64,
                                           device=g.device) for g in layout.groups}

    dense_accuracy = eval_fn(model) if eval_fn is not None else None
    state = _Masked(model, layout, rewind)
    history = [_round_record(state, 0, dense_accuracy, 0.0, keep_states)]
    bar = tqdm(range(1, rounds + 1), desc="bingo imp", unit="round", disable=not progress)
    try:
        for number in bar:
            start = time.perf_counter()
            for g in layout.groups:
                layer_rate = output_rate if g.param_name == output_layer else rate
                keep = state.unit_masks[g.param_name].view(-1)
                alive = keep.nonzero().view(-1)
                count = units_to_prune(alive.numel(), layer_rate)
                order = torch.sort(state.magnitudes(g)[alive], stable=True).indices
                chosen = alive[order[:count]]
                keep[chosen] = False
                pruned_in[g.param_name].view(-1)[chosen] = number
            state.set_masks()
            state.rewind_now()
            train_fn(model)
            seconds = time.perf_counter() - start
            accuracy = eval_fn(model) if eval_fn is not None else None
            history.append(_round_record(state, number, accuracy, seconds, keep_states))
            bar.set_postfix(sparsity=f"{history[-1].sparsity:.3f}",
                            **({} if accuracy is None else {"accuracy": f"{accuracy:.4g}"}))
    finally:
        state.remove()
        bar.close()

    final = {}
    for g in layout.groups:
        final[g.param_name] = (g.module.weight.detach().abs().float() if granularity == "weight"
                               else layer_normalised(unit_norms(g)))
    return IMPResult(model=model, rounds=history, granularity=granularity, rate=rate,
                     output_rate=output_rate, output_layer=output_layer, pruned_in=pruned_in,
                     final_magnitude=final)


def imp_scores(model: nn.Module, granularity: str = "weight", include=None, exclude=None,
               train_fn: Optional[Callable[[nn.Module], object]] = None,
               rewind_state: Optional[Mapping[str, Tensor]] = None, rounds: Optional[int] = None,
               rate: float = 0.2, output_rate: float = 0.1, inplace: bool = False,
               progress: bool = False) -> UnitScores:
    """Registry entry ``BASELINES["imp"]``: :func:`imp` on a copy of ``model``, then its scores.

    ``train_fn``, ``rewind_state`` and ``rounds`` are required (see :func:`imp`). The caller's
    model is left alone unless ``inplace=True`` (then it ends as IMP's last retrained network).
    The scores encode IMP's pruning order (see :meth:`IMPResult.scores`); pruning the caller's
    dense model with them applies IMP's masks *without* IMP's retraining - to evaluate IMP's own
    retrained networks, call :func:`imp` with ``keep_states=True``.
    """
    _check_granularity(granularity)
    for name, value in (("train_fn", train_fn), ("rewind_state", rewind_state),
                        ("rounds", rounds)):
        if value is None:
            raise InvalidOptionError(
                f"baseline 'imp' needs the option {name}= (train_fn, rewind_state and rounds are "
                "required; see bingo.baselines.imp)")
    work = model if inplace else copy.deepcopy(model)
    return imp(work, train_fn, rounds=rounds, granularity=granularity, rate=rate,
               output_rate=output_rate, rewind_state=rewind_state, include=include,
               exclude=exclude, progress=progress).scores()
