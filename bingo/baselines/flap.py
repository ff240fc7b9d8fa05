"""FLAP: fluctuation-based structured scores, and FLAP's bias compensation.

Paper: Y. An, X. Zhao, T. Yu, M. Tang, J. Wang, "Fluctuation-based Adaptive Structured Pruning for
Large Language Models" (FLAP), AAAI 2024 (arXiv:2312.11983). Code: github.com/CASIA-IVA-Lab/FLAP,
``lib/prune.py`` (``prune_flap`` with metric ``"WIFV"`` and structure ``"AL-AM"``; ``compress``
for the bias) and ``lib/layerwrapper.py`` (``BiasGPT``, the statistics). Where the code and the
paper's prose differ, this module follows the code, except where listed below.

Estimates: how much removing a unit disturbs the layer that reads it (its *consumer*: o_proj
for an attention head, down_proj for an MLP neuron), beyond what a constant can restore. Removing
input channel ``j`` of a consumer with weight ``W`` takes ``W[:, j] x_j`` from its output; the
compensation below puts the constant part ``W[:, j] mean(x_j)`` back as a bias, and what is left,
``W[:, j] (x_j - mean(x_j))``, has the expected squared norm over the calibration rows (WIFV,
weighted input feature variance)::

    S_j = Var(x_j) * ||W[:, j]||^2,      Var(x_j) = 1/(N-1) * sum_n (x_nj - mean(x_j))^2

over all ``N`` rows (tokens, with padding if the batches have any) the dense model's consumer
reads in the calibration data. A unit's channels are its consumer columns, from the structure
layer (:mod:`bingo.structure`): the slices of a weight along the axis its contraction reads the
input with (the trace's ``in_axis``), never module names: o_proj's ``head_dim`` columns for a
head, those of all its query heads for a key/value group (GQA), down_proj's column for an MLP
neuron (SwiGLU or not), GPT-2's Conv1D rows, nn.MultiheadAttention's out-projection columns, a
convolution's input channel (variance over batch and positions, ``||W||`` over the output
channels and the kernel). A unit several layers read (a residual channel) has the channels of
all of them.

Scores, per unit group (the heads of one attention block, the neurons of one MLP):

* the channel metric is ``m_j = S_j``, and ``m_j = S_j^2`` for heads: FLAP's code squares the
  o_proj metric (``metrics[args.metrics](...) ** 2`` in ``prune_flap``), in every structure;
* ``standardize=False``: a unit scores ``sum_{j in unit} m_j``, FLAP's per-layer metric (its
  structures UL-UM and UL-MM: a head the sum of ``S_j^2`` over its columns, a neuron ``S_j``),
  divided by the group's mean (:func:`bingo.baselines._common.layer_normalised`: the order within
  a group, all those structures use, is FLAP's; float32 would flush the tiny metrics of a deep
  conv net's layers to 0);
* ``standardize=True`` (default), FLAP's adaptive structure AL-AM: every channel is
  standardised within its group, ``z_j = (m_j - mean(m)) / std(m)`` (``std`` with ``N - 1``, as
  ``torch.std``; a group whose channels are all equal scores 0), and a unit scores the *mean*
  of its channels' ``z_j`` (``attn_metric.reshape(layers, -1, 128).mean(dim=2)``). A neuron is
  one channel, so a neuron group's scores have mean 0 and standard deviation 1; a head group's
  have mean 0 and a smaller spread. FLAP ranks every head and neuron of the model on this one
  scale, as :func:`bingo.prune` ranks all scored units.

Where this differs from FLAP's code, on purpose:

* the variance is the sample variance over all rows, the paper's formula. ``BiasGPT`` updates it
  per sequence, drops the first sequence's deviations and measures each later one from the
  running mean, scaled by about the tokens per sequence: a constant factor, which
  standardisation removes, and a small difference over FLAP's 1024 sequences;
* how much is cut: FLAP's AL-AM sets its threshold by parameter count (a head weighs as much as
  ``512/3`` neurons at LLaMA-7B's widths); ``bingo.prune(sparsity=)`` counts units. The order is
  FLAP's, the amount at a given sparsity is not;
* any model the structure layer traces, not only LLaMA's o_proj and down_proj; key/value groups
  (FLAP knows multi-head attention only) take the channels of all their query heads.

Compensation, :class:`FlapCompensation` (FLAP's ``compress``): for every consumer that lost input
channels ``R``, ``b <- b + W[:, R] mean(x_R)``, with ``W`` and the means ``mean(x_R)`` over the
calibration rows of the *dense* model. On those rows the consumer's output then differs from the
dense one by ``-W[:, R] (x_R - mean(x_R))`` (when its other inputs are unchanged), zero on
average. A consumer without a bias (transformers' Llama: o_proj and down_proj) gets one:
:meth:`FlapCompensation.prepare` gives each bias-less nn.Linear consumer a zero bias (a new
parameter on the weight's device, in its dtype; :attr:`FlapCompensation.added` names them), so
the model keeps its outputs until a call fills the bias in.

Such a model stays that way when shrunk (``bingo.prune(..., structured=True)``: the bias is
not on a removed axis, so ``result.structured.model`` has it) and is saved with it
(:func:`bingo.save_pruned` writes every parameter). Loading it back needs the same
architecture: ``bingo.load_pruned(directory)`` builds the dense model from its config, which has
no such bias, and raises :class:`bingo.errors.CheckpointError` naming the tensors it lacks
(``'model.layers.0.self_attn.o_proj.bias'``); the manifest's ``from_pretrained`` is false
(transformers' own ``from_pretrained`` would drop the biases, with a warning). Load it with
``bingo.load_pruned(directory, model=add_biases(fresh_dense_model, compensation.added))``.
Never silently without them.

Not compensated (a call whose masks remove such a consumer's input channels raises, naming it
and why): convolutions (zero padding makes a removed channel's contribution depend on the
position), layers used more than once per forward, and layers without a bias that are not an
nn.Linear, or whose outputs are themselves units of a group (a bias added after the structure
was traced would be in no group: give the layer a zero bias with :func:`add_biases` before
scoring and pruning).

Cost: scores, one forward pass per calibration batch with hooks on the consumers, no backward;
memory three float64 vectors per consumer input. Compensation: the same pass in ``prepare``,
plus a copy of every consumer weight (a call needs the dense values of the columns the masks
have zeroed) and a float64 mean vector per consumer; a call costs one ``out x |R|`` product per
consumer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.structure import Structure, discover
from bingo.units import UnitGroup, UnitLayout, find_units

from ._common import (UnitScores, check_unpruned, layer_normalised, peek_inputs, unit_totals,
                      unsupported_granularity)
from ._inputs import input_moments, weight_users


def _check_calibration(owner: str, data: Any, batches: Optional[int]) -> None:
    """Raise unless ``data`` is an iterable of batches and ``batches`` None or positive."""
    if data is None:
        raise InvalidOptionError(f"{owner} needs data=: calibration batches, (inputs, targets) "
                                 "pairs or bare inputs, e.g. a list or a DataLoader")
    if isinstance(data, (Tensor, Mapping, TensorDataset)) or not hasattr(data, "__iter__"):
        raise InvalidOptionError(
            f"{owner}: data must be an iterable of batches ((inputs, targets) pairs or bare "
            f"inputs), got a {type(data).__name__}; wrap one batch in a list: [batch]")
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int)
                                or batches < 1):
        raise InvalidOptionError(f"{owner}: batches must be a positive integer or None, got "
                                 f"{batches!r}")


def consumer_axes(layout: UnitLayout, structure: Structure) -> dict[str, int]:
    """Weight name -> its input axis, for every weight whose input channels are units of a group
    of ``layout``: a slice along the axis the weight's contraction reads its input with (the
    structure trace's ``in_axis``; embeddings, depthwise and grouped convolutions have none)."""
    contracted: dict[str, set[int]] = {}
    for use in structure.contractions:
        if use.in_axis is not None:
            contracted.setdefault(use.name, set()).add(use.in_axis)
    return {s.param: s.axis for g in layout.groups for s in g.slices
            if s.axis in contracted.get(s.param, ())}


def _fluctuations(group: UnitGroup, consumers: Mapping[str, int],
                  variances: Mapping[str, Tensor]):
    """``(name, S)`` for each consumer weight of ``group``, one at a time: ``S_j = Var(x_j) *
    ||W[:, j]||^2``, float64, sized along the input axis and 1 on the others."""
    for name, weight in group.tensors().items():
        if name in consumers and name in variances:
            others = [d for d in range(weight.dim()) if d != consumers[name]]
            variance = variances[name].to(weight.device)
            yield name, (weight.detach().double().pow(2) * variance).sum(others, keepdim=True)


def _group_scores(group: UnitGroup, consumers: Mapping[str, int],
                  variances: Mapping[str, Tensor], standardize: bool) -> Tensor:
    """float32 ``(num_units,)`` FLAP scores of one group (see the module docstring)."""
    metric = {name: s.pow(2) if group.heads else s
              for name, s in _fluctuations(group, consumers, variances)}
    if not metric:
        raise InputMismatchError(
            f"flap: no layer reads the units of group {group.param_name!r} as input channels "
            "(FLAP scores a unit by the layer after it)")

    def consumer(s) -> bool:
        return consumers.get(s.param) == s.axis

    total = unit_totals(group, metric, consumer)
    if not standardize:
        # Per group, like every bingo baseline: deep layers of a conv net can have metrics below
        # float32's range (1e-45), which a plain cast would flush to a tie at 0.
        return layer_normalised(total)
    count = unit_totals(group, {n: torch.ones_like(m) for n, m in metric.items()}, consumer)
    metric_squares = unit_totals(group, {n: m * m for n, m in metric.items()}, consumer)
    channels = count.sum()
    mean = total.sum() / channels
    # Unbiased, as FLAP's torch.std; the unit mean of z_j = (m_j - mean) / std is linear in the
    # unit's channel sum, so no per-channel z is formed.
    std = ((metric_squares.sum() - channels * mean * mean) / (channels - 1).clamp_min(1)
           ).clamp_min(0)
    std = std.sqrt()
    return torch.where(std > 0, (total / count - mean) / std, 0.0).float()


def flap(model: nn.Module, granularity: str = "structured", include=None, exclude=None, *,
         data: Optional[Iterable] = None, batches: Optional[int] = None,
         example_inputs: Any = None, standardize: bool = True) -> UnitScores:
    """FLAP's fluctuation scores (WIFV) of ``model``'s structured units, higher = keep; see the
    module docstring for the formulas.

    Args:
        model: the trained network (run in eval mode on ``data``, restored after).
        granularity: ``"structured"`` (the only one: FLAP scores a unit by the columns of the
            layer that reads it).
        include, exclude: unit groups to score, as for :func:`bingo.units.find_units`.
        data: calibration batches: ``(inputs, targets)`` pairs or bare inputs (a tensor, or a
            dict of keyword arguments), on the model's device.
        batches: use at most this many batches of ``data`` (None: all).
        example_inputs: one batch to trace the model with; default the first batch of ``data``.
        standardize: FLAP's adaptive structure (AL-AM): standardise each group's channel
            metrics, so that the units of all groups rank on one scale; False: the raw sums.

    Returns:
        ``{score key: float32 (num_units,)}`` on each group's device (a :class:`UnitScores`).
    """
    unsupported_granularity("flap", granularity, ("structured",),
                            "FLAP scores whole heads and neurons by the layer that reads them")
    _check_calibration("flap", data, batches)
    example_inputs, data = peek_inputs(data, example_inputs)
    layout = find_units(model, "structured", include, exclude, example_inputs=example_inputs)
    check_unpruned(model, layout)
    consumers = consumer_axes(layout, discover(model, example_inputs))
    users = weight_users(model, layout, consumers, example_inputs)
    _, variances = input_moments(model, users, data, batches, what="flap")
    scores = UnitScores(granularity="structured")
    for g in layout.groups:
        scores[g.param_name] = _group_scores(g, consumers, variances, bool(standardize))
    return scores


# -- bias compensation ----------------------------------------------------------------------------


def _plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that computes as one (its bias is used as ``self.bias``)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def add_biases(model: nn.Module, modules: Iterable[str]) -> nn.Module:
    """Give every nn.Linear named in ``modules`` that has no bias a zero one (a new parameter on
    its weight's device, in its dtype), and return ``model``: what :class:`FlapCompensation`
    adds, so a fresh dense model can take a save of a compensated one
    (``bingo.load_pruned(directory, model=add_biases(fresh, compensation.added))``)."""
    for name in modules:
        module = model.get_submodule(name)
        if not _plain_linear(module):
            raise InputMismatchError(f"add_biases: {name!r} is a {type(module).__name__}, not an "
                                     "nn.Linear")
        if module.bias is None:
            weight = module.weight
            module.bias = nn.Parameter(
                torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype),
                requires_grad=weight.requires_grad)
    return model


@dataclass
class _Consumer:
    """What a compensation of one consumer weight needs, kept from the dense model."""

    weight: str
    """The weight's (canonical) name."""
    bias: str
    """Its bias's name (added by prepare if it had none)."""
    in_axis: int
    """The axis that reads the input channels (0 for Conv1D, 1 for nn.Linear)."""
    dense_weight: Tensor
    """The dense weight (its device and dtype)."""
    dense_bias: Tensor
    """The dense bias, float64 (zeros for an added one)."""
    mean: Tensor
    """float64 mean of each input channel over the calibration rows, broadcastable to the
    weight (one per row of nn.MultiheadAttention's packed in-projection: q, k and v inputs)."""


class FlapCompensation:
    """FLAP's bias compensation, as a reconstruction :func:`bingo.prune` applies
    (``reconstruct=FlapCompensation(data)``): every consumer that lost input channels ``R`` gets
    ``b <- b_dense + W_dense[:, R] mean(x_R)`` (see the module docstring).

    Protocol (that of :class:`bingo.LeastSquaresReconstruction`): :meth:`prepare` on the dense
    model before any mask is written records the means and gives bias-less nn.Linear consumers
    a zero bias; ``compensation(model, masks)`` (``masks``: parameter name -> bool keep-mask)
    rewrites those biases of ``model`` (the prepared model, or a copy of it, with the masked
    weights) in place. Calls are idempotent: each sets ``b_dense + compensation`` (times the
    bias's own keep-mask, if the masks remove some of its entries), so a floor search may call
    it once per count. :attr:`refitted` names the layers the last call compensated.

    :meth:`prepare` changes the model it is given (the zero biases): ``bingo.prune`` prepares
    its working copy, so the caller's model changes only with ``inplace=True`` (and keeps the
    zero biases, outputs unchanged, if the prune then fails).

    Args:
        data: calibration batches as for :func:`flap`, on the model's device (an iterable;
            each :meth:`prepare` runs through it once): FLAP takes the means from the data it
            scores with.
        batches: use at most this many batches of ``data`` (None: all).
    """

    def __init__(self, data: Iterable, batches: Optional[int] = None):
        _check_calibration("FlapCompensation", data, batches)
        self.data, self.batches = data, batches
        self.refitted: list[str] = []
        """Modules whose bias the last call compensated (in the order of their groups)."""
        self.added: list[str] = []
        """Modules :meth:`prepare` gave a zero bias (rebuild them with :func:`add_biases` to
        load a save of the compensated model)."""
        self.unsupported: dict[str, str] = {}
        """Consumer weights not compensated -> why (a call that removes their inputs raises)."""
        self._consumers: Optional[dict[str, _Consumer]] = None
        self._unsupported_axes: dict[str, int] = {}
        self._canonical: dict[str, str] = {}

    def parameter_names(self, model: nn.Module) -> list[str]:
        """Every parameter a call may rewrite (the consumers' biases, the added ones too)."""
        if self._consumers is None:
            raise InvalidOptionError("FlapCompensation: call prepare(dense_model) first")
        return [c.bias for c in self._consumers.values()]

    @torch.no_grad()
    def prepare(self, model: nn.Module) -> None:
        """Record, on the dense ``model``, each consumer's input means, dense weight and bias;
        give bias-less nn.Linear consumers a zero bias (the outputs do not change)."""
        example, data = peek_inputs(self.data, None)
        layout = find_units(model, "structured", example_inputs=example)
        structure = discover(model, example)
        canonical = {alias: canon for canon, aliases in structure.param_names.items()
                     for alias in aliases}
        consumers = consumer_axes(layout, structure)
        users = weight_users(model, layout, consumers, example)
        # The model is changed only once every consumer is known to be fine (or unsupported)
        # and the data has run.
        biases, unsupported = self._biases(model, structure, consumers, users)
        biases = {n: (canonical.get(b, b), added) for n, (b, added) in biases.items()}
        means = input_moments(model, {n: users[n] for n in biases}, data, self.batches,
                              what="FlapCompensation")[0] if biases else {}
        self.added = list(dict.fromkeys(b.rpartition(".")[0] for b, added in biases.values()
                                        if added))
        add_biases(model, self.added)
        params = dict(model.named_parameters())
        self._consumers = {
            name: _Consumer(weight=name, bias=bias, in_axis=consumers[name],
                            dense_weight=params[name].detach().clone(),
                            dense_bias=params[bias].detach().double().clone(),
                            mean=means[name].to(params[name].device))
            for name, (bias, _) in biases.items()}
        self.unsupported = unsupported
        self._unsupported_axes = {name: consumers[name] for name in unsupported}
        self._canonical = canonical
        self.refitted = []

    @staticmethod
    def _biases(model: nn.Module, structure: Structure, consumers: Mapping[str, int],
                users: Mapping[str, list[tuple[str, str]]]
                ) -> tuple[dict[str, tuple[str, bool]], dict[str, str]]:
        """``({weight: (bias name, whether prepare adds it)}, {weight: why not compensated})``."""
        traced = {use.name: use.bias for use in structure.contractions if use.bias}
        output_units = {s.param: g.key for g in structure.groups for s in g.slices
                        if s.param in consumers and s.axis != consumers[s.param]}
        biases, unsupported = {}, {}
        for name in consumers:
            owner_name = name.rpartition(".")[0]
            owner = model.get_submodule(owner_name)
            uses = users.get(name, [])
            if model.get_parameter(name).dim() != 2:
                unsupported[name] = ("not a matrix: FLAP compensates matrix layers (a "
                                     "convolution's zero padding makes a removed channel's "
                                     "contribution depend on the position)")
            elif len(uses) != 1 or structure.module_calls.get(uses[0][0], 1) != 1:
                unsupported[name] = ("used more than once per forward: one bias cannot restore "
                                     "the mean of each use")
            elif name in traced:
                biases[name] = (traced[name], False)
            elif _plain_linear(owner) and owner.bias is not None:
                biases[name] = (f"{owner_name}.bias", False)
            elif not _plain_linear(owner):
                unsupported[name] = (f"no bias, and {owner_name!r} is a "
                                     f"{type(owner).__name__}, not an nn.Linear bingo can give "
                                     "one")
            elif name in output_units:
                unsupported[name] = (
                    f"no bias, and its outputs are units of group {output_units[name]!r}: a "
                    "bias added now would be in no group (give the layer a zero bias with "
                    "bingo.baselines.flap.add_biases before scoring and pruning)")
            else:
                biases[name] = (f"{owner_name}.bias", True)
        return biases, unsupported

    @torch.no_grad()
    def __call__(self, model: nn.Module, masks: Mapping[str, Tensor]) -> None:
        """Set every consumer's bias of ``model`` to ``b_dense + W_dense[:, R] mean(x_R)`` for the
        input channels ``R`` its keep-mask in ``masks`` removes (all of a column)."""
        if self._consumers is None:
            raise InvalidOptionError("FlapCompensation: call prepare(dense_model) before "
                                     "compensating")
        if not isinstance(masks, Mapping):
            raise InputMismatchError(f"masks must map parameter names to bool keep-masks, got "
                                     f"{type(masks).__name__}")
        keep: dict[str, Tensor] = {}
        for name, mask in masks.items():  # tied names are one parameter: both masks hold
            canon = self._canonical.get(name, name)
            keep[canon] = mask if canon not in keep else keep[canon] & mask.to(keep[canon].device)
        for name, why in self.unsupported.items():
            if name in keep and bool(self._removed(keep[name],
                                                   self._unsupported_axes[name]).any()):
                raise InputMismatchError(f"FlapCompensation cannot compensate {name!r}: {why}")
        add_biases(model, self.added)  # a copy of the model taken before prepare has none
        params = dict(model.named_parameters())
        refitted = []
        for c in self._consumers.values():
            weight, bias = params.get(c.weight), params.get(c.bias)
            if weight is None or bias is None or weight.shape != c.dense_weight.shape:
                raise InputMismatchError(
                    f"FlapCompensation was prepared on another architecture: {c.weight!r} is "
                    f"{tuple(weight.shape) if weight is not None else 'missing'} here; call "
                    "prepare() on the dense version of this model")
            value = c.dense_bias.to(bias.device)
            mask = keep.get(c.weight)
            removed = None if mask is None else self._removed(mask, c.in_axis)
            if removed is not None and bool(removed.any()):
                columns = removed.to(c.dense_weight.device).nonzero().flatten()
                # Only the removed columns, in float64 (a product over the weight's whole width
                # would cost a float64 copy of it).
                weight_removed = c.dense_weight.index_select(c.in_axis, columns).double()
                mean_removed = c.mean.index_select(c.in_axis, columns.to(c.mean.device))
                value = value + (weight_removed * mean_removed.to(weight_removed.device)).sum(
                    c.in_axis).to(value.device)
                refitted.append(c.bias.rpartition(".")[0])
            bias_keep = keep.get(c.bias)
            if bias_keep is not None:
                value = value * bias_keep.to(value.device)
            bias.copy_(value.to(bias.dtype))
        self.refitted = refitted

    @staticmethod
    def _removed(mask: Tensor, in_axis: int) -> Tensor:
        """Bool, along ``in_axis``: the input channels whose every weight ``mask`` removes."""
        others = [d for d in range(mask.dim()) if d != in_axis]
        return ~mask.bool().any(others) if others else ~mask.bool()


__all__ = ["FlapCompensation", "add_biases", "consumer_axes", "flap"]
