"""First-order Taylor scores, accumulated during training by gradient hooks.

Papers: P. Molchanov, S. Tyree, T. Karras, T. Aila, J. Kautz, "Pruning Convolutional Neural
Networks for Resource Efficient Inference", ICLR 2017 (arXiv:1611.06440); P. Molchanov, A. Mallya,
S. Tyree, I. Frosio, J. Kautz, "Importance Estimation for Neural Network Pruning", CVPR 2019
(arXiv:1906.10771).

Estimates: the first-order Taylor approximation of the change in the loss when a unit is set to
zero, ``|dL| ~ |theta * dL/dtheta|``, summed over the training steps it is observed on.

* ``granularity="weight"``: ``sum_steps |w * dL/dw|`` per weight element (the weight before the
  optimizer step, the gradient of that step's backward). Compared globally, not normalised.
* ``granularity="neuron"``: Molchanov's criterion ``sum_steps |sum_{batch, spatial} h * dL/dh|``
  per output unit / conv channel / Conv1D column, where ``h`` is the layer's own
  (pre-activation) output, then divided by the layer's mean score. Molchanov et al. 2017
  L2-normalise each layer's scores because raw Taylor scores differ in scale across depth;
  dividing by the layer mean does the same job (scale-free per layer) and matches
  :func:`bingo.baselines.magnitude`'s neuron scores.
* ``granularity="structured"``: Molchanov et al. 2019's group criterion, the first-order change
  of the loss when every parameter of the group is removed at once, ``I_S = (sum_{s in S} g_s
  w_s)**2``: here ``sum_steps |sum_{s in unit} w_s * dL/dw_s|`` over every parameter slice the
  unit owns (:mod:`bingo.structure`: producers' rows and biases, BatchNorm scale and shift,
  consumers' columns, a head's q/k/v rows and o columns), divided by the mean over its group.
  The absolute value instead of the square ranks a group identically and keeps the neuron
  criterion's units (the neuron criterion is this sum over a row and its bias). Torch-Pruning's
  ``GroupTaylorImportance`` takes the absolute value per layer slice before adding them up; the
  sum over the whole unit comes first here, as removing the unit removes all its slices at once.

How it is measured (cheap, and it cannot change training): a gradient hook on each scored layer's
parameters that only reads the gradient and returns nothing, so the gradients autograd accumulates
and the optimizer sees are untouched. For neurons no activation is stored: for ``h = W x + b``
(nn.Linear, and nn.Conv2d, whose output is linear in ``(W, b)`` too)

    sum_{batch, spatial} h_i * dL/dh_i = sum_j W_ij * dL/dW_ij + b_i * dL/db_i

exactly, so the neuron criterion is computed from the weight and bias gradients of the same
backward (one ``torch.autograd.graph.register_multi_grad_hook`` per layer, or per structure
group over all its parameters). This costs one elementwise product and a row sum per layer per
backward, keeps no activation alive, and is immune to in-place activations
(``nn.ReLU(inplace=True)`` overwrites ``h`` before the backward, which would corrupt a
forward-hook copy). Each backward pass counts as one step; with gradient
accumulation over micro-batches every micro-batch is a step (the absolute value is taken per
backward). A layer called several times in one forward gets the sum over its calls.

Cost: no extra forward or backward pass during training; memory one float64 tensor of score shape
per layer. The registry function :func:`taylor` can instead compute the scores at the final
weights: one forward and backward per batch of ``data`` (a dict of keyword arguments for a
transformers model; token targets ``(B, T)`` for a language model).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import register_multi_grad_hook

from bingo.errors import CheckpointError, InputMismatchError, InvalidOptionError
from bingo.executor import model_logits
from bingo.units import UnitGroup, find_units

from ._common import UnitScores, layer_normalised, peek_inputs, run_model, unit_totals

STATE_FORMAT = "bingo.TaylorAccumulator"
STATE_VERSION = 1


class TaylorAccumulator:
    """Accumulates first-order Taylor scores of ``model``'s units over training backward passes.

    Use as a context manager around the training loop, or call :meth:`attach` / :meth:`close`::

        taylor = TaylorAccumulator(model, granularity="neuron")
        with taylor:                         # hooks on while training
            for x, y in loader:
                loss = criterion(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
        scores = taylor.scores()             # {weight name: scores}, higher = keep

    Args:
        model: the network being trained.
        granularity: ``"weight"``, ``"neuron"`` or ``"structured"``.
        include, exclude: layer or group names or patterns, as for
            :func:`bingo.units.find_units`.
        example_inputs: structured granularity: one batch to trace the model with (built from a
            transformers model's config when None).

    Attributes:
        steps: number of backward passes observed (the most any scored layer has seen).
        sums: per score key, the float64 running sums (weights: ``|w * g|``; neurons and
            structured units: ``|sum w * dL/dw|`` over the unit's parameters), before any
            normalisation.
    """

    def __init__(self, model: nn.Module, granularity: str = "weight", include=None,
                 exclude=None, example_inputs: Any = None):
        if not isinstance(model, nn.Module):
            raise InvalidOptionError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.granularity = granularity
        self.layout = find_units(model, granularity, include, exclude,
                                 example_inputs=example_inputs)
        self.sums: dict[str, Tensor] = {
            g.param_name: torch.zeros(self.layout.unit_shape(g), dtype=torch.float64,
                                      device=g.device)
            for g in self.layout.groups}
        self.counts: dict[str, int] = {g.param_name: 0 for g in self.layout.groups}
        self._handles: list = []

    # -- hooks ------------------------------------------------------------------------------------

    @property
    def steps(self) -> int:
        """Backward passes observed so far."""
        return max(self.counts.values(), default=0)

    @property
    def attached(self) -> bool:
        """Whether the hooks are on."""
        return bool(self._handles)

    def attach(self) -> "TaylorAccumulator":
        """Register the gradient hooks (idempotent); returns self."""
        if self.attached:
            return self
        for g in self.layout.groups:
            if self.granularity == "weight":
                self._handles.append(g.module.weight.register_hook(
                    self._weight_hook(g, g.module.weight)))
            else:
                params = {name: t for name, t in g.tensors().items() if t.requires_grad}
                if params:
                    self._handles.append(register_multi_grad_hook(
                        list(params.values()), self._unit_hook(g, params)))
        return self

    def close(self) -> None:
        """Remove the hooks; the accumulated sums stay."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "TaylorAccumulator":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.close()

    def _weight_hook(self, group: UnitGroup, weight: Tensor) -> Callable:
        key = group.param_name

        def hook(grad: Tensor) -> None:
            with torch.no_grad():
                self.sums[key].add_((weight.detach() * grad).abs())
            self.counts[key] += 1

        return hook

    def _unit_hook(self, group: UnitGroup, params: dict[str, Tensor]) -> Callable:
        key = group.param_name

        def hook(grads) -> None:
            if all(g is None for g in grads):
                return
            with torch.no_grad():
                # one product alive at a time (a large model's MLP group spans three matrices)
                products = ((name, param.detach() * grad) for (name, param), grad
                            in zip(params.items(), grads) if grad is not None)
                self.sums[key].add_(unit_totals(group, products).abs())
            self.counts[key] += 1

        return hook

    # -- results ----------------------------------------------------------------------------------

    def scores(self) -> UnitScores:
        """``{score key: float32 scores}`` (higher = keep); see the module docstring."""
        if self.steps == 0:
            warnings.warn("bingo: the Taylor accumulator has seen no backward pass; every score "
                          "is 0 (attach it before training)", stacklevel=2)
        if self.granularity == "weight":
            return UnitScores({k: v.float() for k, v in self.sums.items()}, self.granularity)
        return UnitScores({k: layer_normalised(v) for k, v in self.sums.items()},
                          self.granularity)

    def state_dict(self) -> dict:
        """The running sums and counters (plus what identifies the model), for checkpoints."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION,
                "granularity": self.granularity, "layout": self.layout.fingerprint(),
                "sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()},
                "counts": dict(self.counts)}

    def load_state_dict(self, state) -> None:
        """Restore :meth:`state_dict`; a state of another model or granularity raises."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError("not a bingo TaylorAccumulator state (missing or wrong 'format')")
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"TaylorAccumulator state version {state.get('version')!r} is "
                                  f"not supported (this bingo reads version {STATE_VERSION})")
        if state.get("granularity") != self.granularity or \
                state.get("layout") != self.layout.fingerprint():
            raise CheckpointError(
                "the TaylorAccumulator state belongs to a different model or granularity: "
                f"{state.get('granularity')!r} {[d['param'] for d in state.get('layout') or []]} "
                f"vs {self.granularity!r} {list(self.sums)}")
        sums = {}
        for key, current in self.sums.items():
            value = state["sums"].get(key)
            if not isinstance(value, Tensor) or value.shape != current.shape or \
                    not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"Taylor sums of {key!r} are missing or corrupt")
            sums[key] = value.to(current.device, torch.float64).clone()
        self.sums = sums
        self.counts = {k: int(state["counts"][k]) for k in self.sums}

    def __repr__(self) -> str:
        return (f"TaylorAccumulator(granularity={self.granularity!r}, layers={list(self.sums)}, "
                f"steps={self.steps}, attached={self.attached})")


def default_loss(output, targets: Tensor) -> Tensor:
    """Mean cross-entropy of the model's logits (``(batch, ..., classes)``) against ``targets``
    (``(batch, ...)``: classes, or a language model's next tokens ``(B, T)``)."""
    logits = model_logits(output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _accumulate_over(accumulator: TaylorAccumulator, data: Iterable,
                     loss_fn: Callable) -> None:
    """One forward/backward per batch with the hooks on; the model's state and .grad are kept."""
    model = accumulator.model
    params = list(model.parameters())
    saved = [p.grad for p in params]
    was_training = model.training
    model.eval()  # no dropout; batch norm uses (and does not update) its running statistics
    try:
        with accumulator, torch.enable_grad():
            for batch in data:
                for p in params:
                    p.grad = None
                loss_fn(run_model(model, batch[0]), batch[1]).backward()
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
        model.train(was_training)


def taylor(model: nn.Module, granularity: str = "weight", include=None, exclude=None,
           accumulator: Optional[TaylorAccumulator] = None, data: Optional[Iterable] = None,
           loss_fn: Optional[Callable] = None, example_inputs: Any = None) -> UnitScores:
    """First-order Taylor scores of ``model``'s units (higher = keep); see the module docstring.

    Args:
        model: the trained network.
        granularity: ``"weight"``, ``"neuron"`` or ``"structured"``.
        include, exclude: layer or group names or patterns, as for
            :func:`bingo.units.find_units`.
        accumulator: a :class:`TaylorAccumulator` attached during training; its scores are
            returned (it must cover the same units at the same granularity).
        data: instead, an iterable of ``(inputs, targets)`` batches (inputs: a tensor, or a dict
            of keyword arguments): the scores are computed at the current (final) weights, one
            forward and backward per batch, in eval mode; the model's weights, buffers and
            ``.grad`` are left as they were.
        loss_fn: ``loss_fn(model(inputs), targets) -> scalar``, with ``data``; default the mean
            cross-entropy of the logits.
        example_inputs: structured granularity: one batch to trace the model with; default the
            first batch of ``data``, or the model's own example (transformers' config).

    Returns:
        ``{score key: float32 scores}`` on each group's device (a :class:`UnitScores`).
    """
    if (accumulator is None) == (data is None):
        raise InvalidOptionError("taylor needs exactly one of accumulator= (a TaylorAccumulator "
                                 "attached during training) or data= (batches to score on)")
    if accumulator is not None:
        if not isinstance(accumulator, TaylorAccumulator):
            raise InvalidOptionError(
                f"accumulator must be a TaylorAccumulator, got {type(accumulator).__name__}")
        layout = find_units(model, granularity, include, exclude, example_inputs=example_inputs)
        expected = [g.param_name for g in layout.groups]
        if accumulator.granularity != granularity or list(accumulator.sums) != expected:
            raise InputMismatchError(
                f"the accumulator scores {accumulator.granularity!r} units of "
                f"{list(accumulator.sums)}, but {granularity!r} units of {expected} were asked for")
        return accumulator.scores()
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidOptionError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if granularity == "structured":
        example_inputs, data = peek_inputs(data, example_inputs)
    accumulator = TaylorAccumulator(model, granularity, include, exclude, example_inputs)
    _accumulate_over(accumulator, data, loss_fn or default_loss)
    return accumulator.scores()
