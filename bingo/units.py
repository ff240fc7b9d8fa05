"""Which tensors of a model are units, and how units are numbered.

A *unit* is what ticket search resets and pruning removes:

* ``granularity="weight"``: every element of each nn.Linear / nn.Conv2d weight;
* ``granularity="neuron"``: an output row of nn.Linear or an output channel of nn.Conv2d, together
  with its bias entry.

Units are numbered globally, layer after layer in ``model.named_modules()`` order, row-major inside
a layer. The global index is what the subset-mask hash sees (see
:func:`bingo_kernels.hashing.subset_mask`). Scores are keyed by the layer's weight parameter name.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Optional

from torch import nn

from .errors import InvalidOptionError, NoPrunableLayersError, require_option

GRANULARITIES = ("weight", "neuron")
# Module types that carry units, and the name the executor uses for each.
LAYER_KINDS: dict[type, str] = {nn.Linear: "linear", nn.Conv2d: "conv2d"}


@dataclass
class UnitGroup:
    """The units of one layer."""

    name: str
    """Module path inside the model ("" when the model is itself the layer)."""
    param_name: str
    """Name of the weight parameter: the key of this layer in score dicts."""
    bias_name: Optional[str]
    """Name of the bias parameter, or None when the layer has no bias."""
    module: nn.Module
    """The layer itself."""
    kind: str
    """``"linear"`` or ``"conv2d"`` (a key of the executor's fast-path registry)."""
    weight_shape: tuple[int, ...]
    """Shape of the weight."""
    num_units: int
    """Units in this layer at the layout's granularity."""
    offset: int
    """Global index of the layer's first unit."""


@dataclass
class UnitLayout:
    """All unit groups of a model at one granularity."""

    granularity: str
    """``"weight"`` or ``"neuron"``."""
    groups: list[UnitGroup]
    """Layers in global unit order."""

    @property
    def total(self) -> int:
        """Number of units over all groups."""
        return sum(g.num_units for g in self.groups)

    def unit_shape(self, group: UnitGroup) -> tuple[int, ...]:
        """Shape of ``group``'s score tensor."""
        return group.weight_shape if self.granularity == "weight" else (group.weight_shape[0],)

    def fingerprint(self) -> list[dict]:
        """What identifies the layout in a checkpoint (names, kinds, shapes, offsets)."""
        return [dict(param=g.param_name, kind=g.kind, shape=list(g.weight_shape),
                     units=g.num_units, offset=g.offset) for g in self.groups]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(kind: str, patterns, names: list[str]) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    for p in patterns:
        if not any(_matches(n, [p]) for n in names):
            raise InvalidOptionError(
                f"{kind}={p!r} matches no nn.Linear/nn.Conv2d layer; layers are: {', '.join(names)}")
    return patterns


def find_units(model: nn.Module, granularity: str = "weight", include=None,
               exclude=None) -> UnitLayout:
    """Collect the unit groups of ``model``.

    Args:
        granularity: ``"weight"`` or ``"neuron"``.
        include: module names or shell-style patterns (``"encoder.*"``) of the layers to use;
            default all nn.Linear / nn.Conv2d layers, except that at neuron granularity the output
            layer (the last such layer) is left out: its neurons are the model's outputs (the
            classes), so removing one deletes a class rather than a hidden feature, and no
            structured shrink could drop it. Name it in ``include`` to search it anyway.
        exclude: names or patterns removed from the selection.
    """
    require_option("granularity", granularity, GRANULARITIES)
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, tuple(LAYER_KINDS))]
    names = [n for n, _ in candidates]
    if not candidates:
        raise NoPrunableLayersError(
            f"{type(model).__name__} has no nn.Linear or nn.Conv2d layer: nothing to search or prune")
    include_p = _check_patterns("include", include, names)
    exclude_p = _check_patterns("exclude", exclude, names)
    if include_p:
        chosen = [(n, m) for n, m in candidates if _matches(n, include_p)]
    elif granularity == "neuron" and len(candidates) > 1:
        chosen = candidates[:-1]
    else:
        chosen = candidates
    chosen = [(n, m) for n, m in chosen if not _matches(n, exclude_p)]
    if not chosen:
        raise NoPrunableLayersError(
            f"include={include!r} / exclude={exclude!r} leave no layer of {type(model).__name__} "
            "to search")
    groups, offset = [], 0
    for name, module in chosen:
        kind = next(k for t, k in LAYER_KINDS.items() if isinstance(module, t))
        prefix = f"{name}." if name else ""
        shape = tuple(module.weight.shape)
        units = shape[0] if granularity == "neuron" else math.prod(shape)
        groups.append(UnitGroup(
            name=name, param_name=f"{prefix}weight",
            bias_name=f"{prefix}bias" if module.bias is not None else None, module=module,
            kind=kind, weight_shape=shape, num_units=units, offset=offset))
        offset += units
    return UnitLayout(granularity, groups)
