"""Batched evaluation of "remove unit j" variants on the unit groups of any model.

The counterpart of :class:`bingo.targeted.incremental.SequentialEvaluator` for models that are
not a plain nn.Sequential (and, with ``EliminationConfig(evaluator="batched")``, for those too).
The candidates are the units of a :class:`bingo.units.UnitLayout`: the structure groups of
:func:`bingo.units.find_units` (``"structured"``: attention heads / key-value groups, MLP neurons,
conv channels with everything coupled to them), or an nn.Sequential's per-layer neurons.

Removing a unit zeroes every parameter slice it owns (all its producers' rows, consumers'
columns, norm entries; never buffers such as batch norm's running statistics), which is what
:func:`bingo.structure.shrink.apply_masks` writes and a structured shrink removes. The working
model (a copy) holds the units already removed as zeros; a step evaluates J candidates, each "this
unit removed on top", as one :class:`bingo.executor.ExplicitDesign` of one-hot reset masks
through :class:`bingo.executor.BatchedEvaluator` (reset to zero = removal), J folded into the
batch, chunked so that one pass stays within the memory budget.

What is computed once and what per candidate. Each group has an evaluator of its own that
patches only the modules using that group's parameters, so on the evaluator's shared-input path
everything upstream of the group's first patched module runs once for all J candidates and only
the rest of the network runs per candidate: downstream-only, like the Sequential evaluator's
masked path (MLPs, conv nets, any model whose blocks take the shared batch). Where the shared
batch cannot flow through the model (a transformer block adds a residual of its own input, so
the evaluator repeats the inputs per candidate), every candidate is a full forward, batched. A
model whose forward mixes rows of the batch falls back to the evaluator's vmap path: still exact,
slower. After each step the current model's loss comes from one plain forward (there is no cache
of a generic model's intermediate values to update from the changed layer on).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from bingo.errors import InputMismatchError
from bingo.executor import BatchedEvaluator, ExplicitDesign
from bingo.units import UnitGroup, UnitLayout

from .macs import contraction_macs, unit_macs


class GroupEvaluator:
    """The current (partially pruned) working model, and batched evaluation of single-unit
    removals on top of it (see the module docstring).

    Args:
        work: the working model, in eval mode; :meth:`remove` / :meth:`restore` change it.
        layout: its unit groups (neuron or structured granularity).
        inputs, targets: the evidence batch.
        memory_budget: bytes one batched pass may use (the evaluator's chunking).
        backend: bingo_kernels backend (``"auto"``: Triton on CUDA, else torch).
    """

    def __init__(self, work: nn.Module, layout: UnitLayout, inputs: Tensor, targets: Tensor, *,
                 memory_budget: int, backend: str = "auto"):
        if layout.granularity == "weight":
            raise InputMismatchError("unit removal needs neuron or structured unit groups, not "
                                     "single weights")
        self.work, self.layout = work, layout
        self.inputs, self.targets = inputs, targets
        self.memory_budget, self.backend = int(memory_budget), backend
        self.groups: list[UnitGroup] = list(layout.groups)
        self.keys = [g.param_name for g in self.groups]
        self.units = [g.num_units for g in self.groups]
        self.removed = {g.param_name: torch.zeros(g.num_units, dtype=torch.bool)
                        for g in self.groups}
        """Score key -> bool (units,): the units zeroed in the working model."""
        self._whole = self._evaluator(self.groups)
        self._per_group: dict[int, BatchedEvaluator] = {}
        self._macs: Optional[dict[str, float]] = None
        self.refresh()

    def _evaluator(self, groups: list[UnitGroup]) -> BatchedEvaluator:
        return BatchedEvaluator(self.work, UnitLayout(self.layout.granularity, groups),
                                backend=self.backend, memory_budget=self.memory_budget)

    @property
    def path(self) -> dict[str, str]:
        """Score key -> the evaluator path its candidates took (``"fast"`` / ``"vmap"``), for
        the groups evaluated so far."""
        return {self.keys[i]: f"{ev.path}{' (inputs repeated)' if ev.expand_inputs else ''}"
                for i, ev in self._per_group.items()}

    @torch.no_grad()
    def refresh(self) -> tuple[float, float]:
        """Loss and accuracy of the working model (one plain forward of the evidence)."""
        metrics = self._whole.baseline(self.inputs, self.targets)
        self.loss, self.accuracy = float(metrics.loss), float(metrics.accuracy)
        return self.loss, self.accuracy

    @torch.no_grad()
    def evaluate(self, index: int, candidates: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, accuracy), each (J,), of the working model with each single unit of
        ``candidates`` of group ``index`` removed on top of what it already lacks."""
        group = self.groups[index]
        if candidates.numel() == 0:
            empty = torch.empty(0)
            return empty, empty
        ev = self._per_group.get(index)
        if ev is None:
            ev = self._per_group[index] = self._evaluator([group])
        candidates = candidates.to(torch.long)
        losses, accs = [], []
        # One design per pass-sized chunk keeps the (J, units) masks as small as the pass.
        per = ev.chunk_size(self.inputs, candidates.numel())
        for chunk in torch.split(candidates, per):
            masks = torch.zeros(chunk.numel(), group.num_units, dtype=torch.bool,
                                device=group.device)
            masks[torch.arange(chunk.numel()), chunk.to(group.device)] = True
            metrics = ev.subsets(self.inputs, self.targets,
                                 ExplicitDesign({group.param_name: masks}), None)
            losses.append(metrics.loss)
            accs.append(metrics.accuracy)
        return torch.cat(losses), torch.cat(accs)

    # -- changing the working model -------------------------------------------------------------

    def _unit_masks(self, units: list[tuple[int, int]]) -> dict[str, Tensor]:
        """Parameter -> bool mask of every element the (group, unit) pairs own."""
        chosen: dict[int, Tensor] = {}
        for i, unit in units:
            mask = chosen.setdefault(i, torch.zeros(1, self.units[i], dtype=torch.bool))
            mask[0, unit] = True
        return self._param_masks(chosen)

    def _param_masks(self, unit_masks: dict[int, Tensor]) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i, mask in unit_masks.items():
            for name, m in self.groups[i].param_unit_masks(mask).items():
                out[name] = m[0] if name not in out else out[name] | m[0]
        return out

    def _removed_masks(self) -> dict[str, Tensor]:
        """Parameter -> bool mask of every element a removed unit owns."""
        return self._param_masks({i: self.removed[k].unsqueeze(0) for i, k in
                                  enumerate(self.keys) if bool(self.removed[k].any())})

    @torch.no_grad()
    def remove(self, units: list[tuple[int, int]]) -> None:
        """Zero every slice of the (group, unit) pairs in the working model, then refresh."""
        params = dict(self.work.named_parameters())
        for name, mask in self._unit_masks(units).items():
            params[name].masked_fill_(mask, 0.0)
        for i, unit in units:
            self.removed[self.keys[i]][unit] = True
        self.refresh()

    @torch.no_grad()
    def restore(self, units: list[tuple[int, int]], reference: nn.Module) -> None:
        """Put the (group, unit) pairs back from ``reference`` (same architecture), then
        refresh. Elements that also belong to a unit still removed (a consumer's column of a
        removed channel inside a restored unit's row) stay zero."""
        for i, unit in units:
            self.removed[self.keys[i]][unit] = False
        still = self._removed_masks()
        params = dict(self.work.named_parameters())
        source = dict(reference.named_parameters())
        for name, mask in self._unit_masks(units).items():
            if name in still:
                mask = mask & ~still[name]
            params[name].copy_(torch.where(mask, source[name].to(params[name].dtype),
                                           params[name]))
        self.refresh()

    def keep_masks(self, alive: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameter -> bool keep-mask of the units ``alive`` (score key -> bool (units,)) keeps
        (for a least-squares refit of the working model)."""
        removed = self._param_masks({i: ~alive[k].unsqueeze(0) for i, k in enumerate(self.keys)})
        return {name: ~mask for name, mask in removed.items()}

    def unit_macs(self, index: int) -> float:
        """Multiply-adds per example one unit of group ``index`` accounts for (counted on one
        evidence example, :mod:`bingo.targeted.macs`)."""
        if self._macs is None:
            self._macs = contraction_macs(self.work, self.inputs[:1])
        return unit_macs(self.groups[index], self._macs)
