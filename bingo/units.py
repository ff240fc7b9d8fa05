"""Which tensors of a model are units, and how units are numbered.

A *unit* is what ticket search resets and pruning removes:

* ``granularity="weight"``: every element of each layer's weight (nn.Linear, nn.Conv2d, and
  transformers' Conv1D, whose weight is stored ``(in, out)``);
* ``granularity="neuron"``: an output unit of one such layer (a row, a conv channel, a Conv1D
  column) with its bias entry, the seed paper's neuron;
* ``granularity="structured"``: the unit groups of :mod:`bingo.structure`, found by tracing the
  model: an attention head or key/value group (its q/k/v rows and o columns), an MLP neuron (its
  rows in every producer and its column in every consumer), a conv channel (with its BatchNorm
  entries and everything coupled to it through residual adds). These are the units a structured
  shrink removes physically, for any model the structure layer understands.

Units are numbered globally, group after group, row-major inside a layer's weight; the global
index is what the subset-mask hash sees (see :func:`bingo_kernels.hashing.subset_mask`). Scores
are keyed by the layer's weight parameter name, or by the structure group's key (``"<attention
block>.heads"``, the first producer's weight name).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from .errors import InputMismatchError, InvalidOptionError, NoPrunableLayersError, require_option
from .scoring import GRANULARITIES
from .structure import HEADS, HEADS_KEY, Slice, StructureGroup, discover
from .structure.trace import canonical_names

# Granularity -> the granularity of the hashed subset masks: a structured unit, like a neuron,
# is one unit however many slices it has.
MASK_GRANULARITY: dict[str, str] = {"weight": "weight", "neuron": "neuron", "structured": "neuron"}
STRUCTURED_KIND = "structured"
"""UnitGroup.kind of a structure group (its ``structure.kind`` says heads, neurons or
channels)."""
HEADS_KIND = HEADS


@dataclass(frozen=True)
class LayerKind:
    """How one layer type stores its units."""

    name: str
    """The executor's name for the layer (a key of its fast-path registry)."""
    out_axis: int
    """Axis of the weight that indexes output units (rows, channels)."""


LAYER_KINDS: dict[str, LayerKind] = {
    "Linear": LayerKind("linear", 0),
    "NonDynamicallyQuantizableLinear": LayerKind("linear", 0),
    "Conv2d": LayerKind("conv2d", 0),
    "Conv1D": LayerKind("conv1d", 1),       # transformers' GPT-2 layer: weight (in, out)
}
"""Layer class name -> how it stores units. Keyed by name so that transformers need not be
imported; a subclass of a listed class counts as that class."""

# Modules an MLP block may hold between its Linears: they act on each feature independently, so a
# removed neuron's constant output can be folded into the next layer's bias. Exact types only: a
# subclass may override forward with something that mixes features.
ELEMENTWISE_MODULES: frozenset[type[nn.Module]] = frozenset(
    {nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus,
     nn.Identity, nn.Dropout})


def layer_kind(module: nn.Module) -> Optional[LayerKind]:
    """The :class:`LayerKind` of a unit-holding layer, or None for any other module."""
    for cls in type(module).__mro__:
        if cls.__name__ in LAYER_KINDS and cls.__module__.split(".")[0] in ("torch",
                                                                         "transformers"):
            return LAYER_KINDS[cls.__name__]
    return None


def _is_plain_flatten(module: nn.Module) -> bool:
    # Other dims would fold the batch or keep extra ones; neither is an MLP input.
    return type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1)


def mlp_problem(model: nn.Module) -> Optional[str]:
    """Why ``model`` is not an MLP block whose hidden neurons can be removed, or None when it is.

    An MLP block is an nn.Sequential of nn.Linear and elementwise modules (``ELEMENTWISE_MODULES``)
    with an optional leading nn.Flatten() and at least one nn.Linear.
    """
    if not isinstance(model, nn.Sequential):
        return f"shrink_mlp needs an nn.Sequential, got {type(model).__name__}"
    supported = ", ".join(sorted(t.__name__ for t in ELEMENTWISE_MODULES))
    for position, (name, child) in enumerate(model.named_children()):
        if type(child) is nn.Linear or type(child) in ELEMENTWISE_MODULES:
            continue
        if position == 0 and _is_plain_flatten(child):
            continue
        return (
            f"shrink_mlp supports an nn.Sequential of nn.Linear and elementwise modules "
            f"({supported}) with an optional leading nn.Flatten(); child '{name}' "
            f"({child.__class__.__name__}) is not supported"
        )
    if not any(type(child) is nn.Linear for child in model):
        return "shrink_mlp needs at least one nn.Linear in the nn.Sequential"
    return None


def linear_names(model: nn.Sequential) -> list[str]:
    """Names of the nn.Linear children of an nn.Sequential, in order."""
    return [name for name, child in model.named_children() if type(child) is nn.Linear]


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


@dataclass
class UnitGroup:
    """The units of one layer (weight, neuron) or of one structure group (structured)."""

    name: str
    """Module path of the layer, or of the structure group's key module ("" for the model)."""
    param_name: str
    """The group's score key: the layer's weight name, or the structure group's key."""
    bias_name: Optional[str]
    """Name of the layer's bias parameter (per-layer groups with a bias), else None."""
    module: nn.Module
    """The layer, or the structure group's key module (its parameters give device and dtype)."""
    kind: str
    """``"linear"``, ``"conv2d"``, ``"conv1d"`` (a layer) or ``"structured"``."""
    weight_shape: tuple[int, ...]
    """Shape of the layer's weight; ``(num_units,)`` for a structure group."""
    num_units: int
    """Units in this group at the layout's granularity."""
    offset: int
    """Global index of the group's first unit."""
    slices: list[Slice] = field(default_factory=list, repr=False)
    """Every parameter slice a unit owns (neuron and structured granularity): what a reset of
    the unit replaces and a removal zeroes."""
    out_axis: int = 0
    """Per-layer groups: the weight axis of the output units (1 for Conv1D)."""
    structure: Optional[StructureGroup] = field(default=None, repr=False)
    """The structure group (structured granularity), else None."""
    root: Optional[nn.Module] = field(default=None, repr=False)
    """The model the parameter names are relative to."""

    @property
    def device(self) -> torch.device:
        """Device of the group's parameters."""
        return next(iter(self.tensors().values())).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the group's parameters."""
        return next(iter(self.tensors().values())).dtype

    @property
    def heads(self) -> bool:
        """Whether the group's units are attention heads (or key/value groups)."""
        return self.structure is not None and self.structure.kind == HEADS

    def tensors(self) -> dict[str, Tensor]:
        """Parameter name -> live tensor of every parameter a reset of this group touches (not
        buffers: batch norm's running statistics are data, not weights).

        Looked up by attribute, so a tensor torch.nn.utils.prune re-parametrised is still found.
        """
        if self.structure is None:
            out = {self.param_name: self.module.weight}
            if self.bias_name is not None:
                out[self.bias_name] = self.module.bias
            return out
        out = {}
        for s in self.slices:
            owner, attr = _resolve(self.root, s.param)
            if attr in owner._buffers:
                continue  # running statistics are data, not weights: a reset leaves them
            out[s.param] = getattr(owner, attr)
        return out

    def param_unit_masks(self, unit_masks: Tensor) -> dict[str, Tensor]:
        """Parameter name -> bool ``(K, *shape)`` mask of what units ``unit_masks`` (K, U)
        select (True = selected), over every parameter of a neuron or structured group."""
        out = {}
        for name, live in self.tensors().items():
            out[name] = torch.zeros((unit_masks.shape[0], *live.shape), dtype=torch.bool,
                                    device=live.device)
        for s in self.slices:
            if s.param not in out:
                continue
            live = out[s.param]
            along = torch.zeros((unit_masks.shape[0], live.shape[1 + s.axis]), dtype=torch.bool,
                                device=live.device)
            along[:, s.positions.to(live.device)] = unit_masks[:, s.unit_of.to(
                unit_masks.device)].to(live.device)
            view = [unit_masks.shape[0]] + [1] * (live.dim() - 1)
            view[1 + s.axis] = live.shape[1 + s.axis]
            out[s.param] |= along.view(view)
        return out


@dataclass
class UnitLayout:
    """All unit groups of a model at one granularity."""

    granularity: str
    """``"weight"``, ``"neuron"`` or ``"structured"``."""
    groups: list[UnitGroup]
    """Groups in global unit order."""

    @property
    def total(self) -> int:
        """Number of units over all groups."""
        return sum(g.num_units for g in self.groups)

    @property
    def mask_granularity(self) -> str:
        """Granularity of the hashed subset masks (``"neuron"`` for neurons and structured)."""
        return MASK_GRANULARITY[self.granularity]

    def unit_shape(self, group: UnitGroup) -> tuple[int, ...]:
        """Shape of ``group``'s score tensor."""
        return group.weight_shape if self.granularity == "weight" else (group.num_units,)

    def fingerprint(self) -> list[dict]:
        """What identifies the layout in a checkpoint (names, kinds, shapes, offsets)."""
        return [dict(param=g.param_name, kind=g.kind, shape=list(g.weight_shape),
                     units=g.num_units, offset=g.offset) for g in self.groups]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(kind: str, patterns, names: list[str], what: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    for p in patterns:
        if not any(_matches(n, [p]) for n in names):
            raise InvalidOptionError(
                f"{kind}={p!r} matches no {what}; candidates are: {', '.join(names)}")
    return patterns


def _layer_groups(model: nn.Module, granularity: str, include, exclude) -> list[UnitGroup]:
    tensors, _ = canonical_names(model)
    canonical = {id(t): name for name, t in tensors.values()}
    candidates = [(n, m, layer_kind(m)) for n, m in model.named_modules()
                  if layer_kind(m) is not None]
    names = [n for n, _, _ in candidates]
    what = "nn.Linear/nn.Conv2d/Conv1D layer"
    if not candidates:
        raise NoPrunableLayersError(
            f"{type(model).__name__} has no {what}: nothing to search or prune")
    include_p = _check_patterns("include", include, names, what)
    exclude_p = _check_patterns("exclude", exclude, names, what)
    if include_p:
        chosen = [c for c in candidates if _matches(c[0], include_p)]
    elif granularity == "neuron" and len(candidates) > 1:
        # The output layer's neurons are the model's outputs (the classes): removing one
        # deletes a class rather than a hidden feature. Name it in include to search it anyway.
        chosen = candidates[:-1]
    else:
        chosen = candidates
    chosen = [c for c in chosen if not _matches(c[0], exclude_p)]
    if not chosen:
        raise NoPrunableLayersError(
            f"include={include!r} / exclude={exclude!r} leave no layer of {type(model).__name__} "
            "to search")
    groups, offset, seen = [], 0, set()
    for name, module, kind in chosen:
        weight = module.weight
        if id(weight) in seen:
            continue  # a weight shared by two layers (tied) is one set of units
        seen.add(id(weight))
        shape = tuple(weight.shape)
        units = shape[kind.out_axis] if granularity != "weight" else math.prod(shape)
        param = canonical[id(weight)]
        bias = canonical.get(id(module.bias)) if getattr(module, "bias", None) is not None \
            else None
        slices = []
        if granularity == "neuron":
            index = torch.arange(units)
            slices.append(Slice(param, kind.out_axis, index, index, 1))
            if bias is not None:
                slices.append(Slice(bias, 0, index, index, 1))
        groups.append(UnitGroup(
            name=name, param_name=param, bias_name=bias, module=module, kind=kind.name,
            weight_shape=shape, num_units=units, offset=offset, slices=slices,
            out_axis=kind.out_axis, root=model))
        offset += units
    return groups


def _structured_groups(model: nn.Module, include, exclude, example_inputs) -> list[UnitGroup]:
    structure = discover(model, example_inputs)
    names = [g.module or "<model>" for g in structure.groups]
    what = "unit group (attention block, MLP or conv layer)"
    if not structure.groups:
        blocked = "; ".join(f"{p}: {why}" for p, why in list(structure.blocked.items())[:4])
        unsupported = "; ".join(f"{op} in {where}" for op, where in
                                list(structure.unsupported.items())[:4])
        raise NoPrunableLayersError(
            f"{type(model).__name__} has no removable unit group"
            + (f" (blocked: {blocked})" if blocked else "")
            + (f"; ops without a structure rule: {unsupported}" if unsupported else ""))
    include_p = _check_patterns("include", include, names + structure.keys(), what)
    exclude_p = _check_patterns("exclude", exclude, names + structure.keys(), what)
    chosen = [g for g in structure.groups
              if (not include_p or _matches(g.module, include_p) or _matches(g.key, include_p))
              and not (_matches(g.module, exclude_p) or _matches(g.key, exclude_p))]
    if not chosen:
        raise NoPrunableLayersError(
            f"include={include!r} / exclude={exclude!r} leave no unit group of "
            f"{type(model).__name__} to search")
    groups, offset = [], 0
    for g in chosen:
        module = model.get_submodule(g.module) if g.module else model
        groups.append(UnitGroup(
            name=g.module, param_name=g.key, bias_name=None, module=module,
            kind=STRUCTURED_KIND, weight_shape=(g.num_units,), num_units=g.num_units,
            offset=offset, slices=g.slices, structure=g, root=model))
        offset += g.num_units
    return groups


def find_units(model: nn.Module, granularity: str = "weight", include=None, exclude=None,
               example_inputs: Any = None) -> UnitLayout:
    """Collect the unit groups of ``model``.

    Args:
        granularity: ``"weight"``, ``"neuron"`` or ``"structured"`` (see the module docstring).
        include: module names or shell-style patterns (``"encoder.*"``) of the layers (weight,
            neuron) or unit groups (structured: the attention block, or the group's first
            producer, or its score key) to use. Default: every layer, except that at neuron
            granularity the output layer (the last layer) is left out: its neurons are the
            model's outputs (the classes), so removing one deletes a class rather than a hidden
            feature. Name it in ``include`` to search it anyway. At structured granularity the
            default is every removable group.
        exclude: names or patterns removed from the selection.
        example_inputs: structured granularity only: one batch (a tensor, or a dict of keyword
            arguments) to trace the model with; built from a transformers model's config or an
            MLP's first layer when None (:func:`bingo.structure.example_inputs_for`).
    """
    require_option("granularity", granularity, GRANULARITIES)
    if not isinstance(model, nn.Module):
        raise InputMismatchError(f"model must be an nn.Module, got {type(model).__name__}")
    if granularity == "structured":
        groups = _structured_groups(model, include, exclude, example_inputs)
    else:
        groups = _layer_groups(model, granularity, include, exclude)
    return UnitLayout(granularity, groups)


__all__ = ["ELEMENTWISE_MODULES", "GRANULARITIES", "HEADS_KEY", "HEADS_KIND", "LAYER_KINDS",
           "LayerKind", "MASK_GRANULARITY", "STRUCTURED_KIND", "UnitGroup", "UnitLayout",
           "find_units", "layer_kind", "linear_names", "mlp_problem"]
