"""Unit groups: the coupled parameter slices a trace found, grouped and named.

A :class:`Unit` (one connected component of the trace's coupling graph) is a set of
``(parameter, axis, index)`` triples. Units with the same *signature* (which parameter axes they
touch and how many indices on each) are the units of one :class:`StructureGroup`: the 128 neurons
of one Llama MLP (a gate row, an up row and a down column each), the key/value groups of one
attention block (with their query heads), the channels of one residual stage of a ResNet.

Each group has a *score key*, the name under which scores, masks and statistics are kept:

* heads: ``"<attention block>.heads"`` (the innermost module holding all its parameters);
* neurons and channels: the weight of the group's first producer in forward order
  (``"model.layers.0.mlp.gate_proj.weight"``, ``"1.weight"`` for the first hidden layer of an MLP
  in an nn.Sequential: the same key a per-layer neuron score has).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .trace import ContractionUse, TraceResult

HEADS = "heads"
NEURONS = "neurons"
CHANNELS = "channels"
KINDS = (HEADS, NEURONS, CHANNELS)
HEADS_KEY = "heads"


@dataclass(frozen=True)
class Slice:
    """The indices of one parameter axis that belong to the units of a group."""

    param: str
    """Canonical parameter (or buffer) name."""
    axis: int
    """The axis the indices run along."""
    positions: Tensor = field(repr=False)
    """int64 (n,): the indices along ``axis``, ascending within each unit."""
    unit_of: Tensor = field(repr=False)
    """int64 (n,): which unit of the group each index belongs to."""
    width: int
    """Indices per unit (every unit of a group has the same number)."""

    def mask(self, keep: Tensor, size: int) -> Tensor:
        """Bool (size,) keep-mask along the axis for the unit keep-mask ``keep`` (U,) (or
        (K, U) for K masks: then (K, size)); indices outside the slice are kept."""
        lead = tuple(keep.shape[:-1])
        out = torch.ones(lead + (size,), dtype=torch.bool, device=keep.device)
        out[..., self.positions.to(keep.device)] = keep[..., self.unit_of.to(keep.device)]
        return out

    def expand(self, per_unit: Tensor) -> Tensor:
        """``(..., U)`` per-unit values -> ``(..., n)`` per index of the slice."""
        return per_unit[..., self.unit_of.to(per_unit.device)]


@dataclass
class StructureGroup:
    """Units of one kind that share their structure (see the module docstring)."""

    key: str
    """Score key."""
    kind: str
    """``"heads"``, ``"neurons"`` or ``"channels"``."""
    num_units: int
    """Number of units."""
    slices: list[Slice] = field(repr=False)
    """Every parameter slice the units own (producers' rows, consumers' columns, norms...)."""
    module: str
    """The module the key names: the first producer (neurons, channels) or the attention
    block (heads)."""
    producers: list[str] = field(default_factory=list)
    """Modules whose outputs carry the units (their weights' rows), in forward order."""
    consumers: list[str] = field(default_factory=list)
    """Modules that read the units (their weights' columns), in forward order."""

    def params(self) -> list[str]:
        """Every parameter (or buffer) with a slice in the group."""
        return list(dict.fromkeys(s.param for s in self.slices))

    def param_masks(self, keep: Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
        """Parameter name -> bool keep-mask of the parameter's shape for the unit keep-mask
        ``keep`` (U,) (leading K dims allowed: then masks are (K, *shape))."""
        out: dict[str, Tensor] = {}
        lead = tuple(keep.shape[:-1])
        for s in self.slices:
            shape = shapes[s.param]
            along = s.mask(keep, shape[s.axis])
            view = [1] * len(shape)
            view[s.axis] = shape[s.axis]
            m = along.reshape(lead + tuple(view)).expand(lead + tuple(shape))
            out[s.param] = m if s.param not in out else out[s.param] & m
        return out


def components(result: TraceResult) -> np.ndarray:
    """Component index of every id (connected components of the coupling edges)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = result.num_ids
    if not result.edges:
        return np.arange(n)
    edges = np.concatenate(result.edges)
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])),
                       shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels


def _lca(names: list[str]) -> str:
    """The innermost module holding every parameter in ``names``."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


@dataclass
class _Unit:
    members: dict[tuple[str, int], list[int]]
    first_id: int


def build_groups(result: TraceResult, extra_edges: Optional[list[np.ndarray]] = None
                 ) -> tuple[list[StructureGroup], dict[str, str]]:
    """The unit groups of a trace, and for every blocked group of units the reason
    (score-key-like name -> why it cannot be removed)."""
    if extra_edges:
        result = TraceResult(**{**result.__dict__, "edges": result.edges + extra_edges})
    comp = components(result)
    owner = np.full(result.num_ids, -1, dtype=np.int64)
    axes = list(result.axes.values())
    for i, pa in enumerate(axes):
        owner[pa.first:pa.first + pa.size] = i
    blocked_comp = set(np.unique(comp[result.output_ids]).tolist()) if \
        len(result.output_ids) else set()
    pinned_comp = _split_rows(comp, result.pinned)
    units: dict[int, _Unit] = {}
    for i, pa in enumerate(axes):
        ids = np.arange(pa.first, pa.first + pa.size)
        for index, c in enumerate(comp[ids].tolist()):
            unit = units.setdefault(c, _Unit({}, pa.first + index))
            unit.members.setdefault((pa.name, pa.axis), []).append(index)
            unit.first_id = min(unit.first_id, pa.first + index)
    sizes = {(pa.name, pa.axis): pa.size for pa in axes}
    attention = set()
    for kind in ("attention", "contraction"):
        if kind in result.mixed_by:
            attention.update(np.unique(comp[result.mixed_by[kind]]).tolist())
    by_signature: dict[tuple, list[tuple[int, _Unit]]] = defaultdict(list)
    blocked: dict[str, str] = {}
    producers_of = _producers(result.contractions)
    for c, unit in units.items():
        whole = [k for k, idx in unit.members.items() if len(idx) == sizes[k]]
        if c in blocked_comp or c in pinned_comp or whole:
            why = ("it reaches the model's output" if c in blocked_comp else
                   "it meets data of a fixed width (a model input or a tensor built in "
                   "forward) in an elementwise op" if c in pinned_comp else
                   f"it spans all of {whole[0][0]} (axis {whole[0][1]})")
            producing = [producers_of[k][1] for k in sorted(unit.members) if k in producers_of]
            name = producing[0] if producing else sorted(unit.members)[0][0]
            blocked.setdefault(name, why)
            continue
        signature = tuple(sorted((k, len(v)) for k, v in unit.members.items()))
        by_signature[signature].append((c, unit))
    order = {name: i for i, name in enumerate(result.module_order)}
    groups = []
    for signature, members in by_signature.items():
        members.sort(key=lambda cu: cu[1].first_id)
        keys = [k for k, _ in signature]
        slices = []
        for (param, axis), width in signature:
            positions = torch.tensor([i for _, u in members for i in sorted(u.members[(param,
                                                                                     axis)])])
            unit_of = torch.arange(len(members)).repeat_interleave(width)
            slices.append(Slice(param, axis, positions, unit_of, width))
        heads = any(c in attention for c, _ in members)
        producing = sorted({producers_of[k] for k in keys if k in producers_of},
                           key=lambda m: order.get(m[0], 1 << 30))
        consuming = sorted({(u.module, u.name) for u in result.contractions
                            if (u.name, u.in_axis) in keys},
                           key=lambda m: order.get(m[0], 1 << 30))
        if heads:
            module = _lca([p for p, _ in keys])
            key = f"{module}.{HEADS_KEY}" if module else HEADS_KEY
            kind = HEADS
        elif producing:
            module, weight = producing[0]
            key = weight
            kind = CHANNELS if any(u.op == "convolution" for u in result.contractions
                                   if u.name == weight) else NEURONS
        else:
            module = _lca([p for p, _ in keys])
            key = f"{keys[0][0]}:{keys[0][1]}"
            kind = NEURONS
        groups.append(StructureGroup(
            key=key, kind=kind, num_units=len(members), slices=slices, module=module,
            producers=[m for m, _ in producing], consumers=[m for m, _ in consuming]))
    groups.sort(key=lambda g: min(order.get(m, 1 << 30) for m in g.producers or [g.module]))
    _unique_keys(groups)
    return groups, blocked


def _split_rows(comp: np.ndarray, pinned: list[np.ndarray]) -> set[int]:
    """Components that own part, not all, of a pinned row (see ``TraceResult.pinned``)."""
    out: set[int] = set()
    for rows in pinned:
        labelled = rows >= 0
        c = np.where(labelled, comp[np.where(labelled, rows, 0)], -1)
        top = np.where(labelled, c, -1).max(1, keepdims=True)
        split = ((c != top) & labelled).any(1)
        out.update(np.unique(c[split][labelled[split]]).tolist())
    return out


def _producers(uses: list[ContractionUse]) -> dict[tuple[str, int], tuple[str, str]]:
    """(weight, out axis) -> (module, weight): the axis a contraction produces channels on."""
    out = {}
    for u in uses:
        if u.out_axis is not None and u.op != "embedding":
            module = u.name.rpartition(".")[0]
            out.setdefault((u.name, u.out_axis), (module, u.name))
    return out


def _unique_keys(groups: list[StructureGroup]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        if g.key in seen:
            seen[g.key] += 1
            g.key = f"{g.key}#{seen[g.key]}"
        else:
            seen[g.key] = 0
