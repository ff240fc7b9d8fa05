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
masked path (MLPs, conv nets, any model whose blocks take the shared batch). A transformer block
adds a residual of its own input, which a shared batch of B > 1 rows cannot broadcast against
the candidates' rows, so there the evaluator repeats the inputs per candidate (a batched full
forward each). For such a group the evidence is then split into single examples, whose one row
does broadcast: upstream of the group runs once per example, the metrics are the token-weighted
mean over the examples, and the split is kept only if it reproduced the batch's metrics on the
group's first chunk and ran faster there (the candidates are MLP neurons of Llama / GPT-2 /
BERT / ViT and residual-coupled channels; attention heads stay full forwards: the attention
block reads the batch size from its input). A model whose forward mixes rows of the batch falls
back to the evaluator's vmap path for the groups downstream of the mixing: still exact, slower.
After each step the current model's loss comes from one plain forward (there is no cache of a
generic model's intermediate values to update from the changed layer on).
"""

from __future__ import annotations

import time
import warnings
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
        always_split: where a group's candidates repeat the inputs, they are evaluated one
            example at a time when that reproduces the batch and is faster; True drops "and is
            faster" (tests of that path).
    """

    def __init__(self, work: nn.Module, layout: UnitLayout, inputs: Tensor, targets: Tensor, *,
                 memory_budget: int, backend: str = "auto", always_split: bool = False):
        if layout.granularity == "weight":
            raise InputMismatchError("unit removal needs neuron or structured unit groups, not "
                                     "single weights")
        self.work, self.layout = work, layout
        self.inputs, self.targets = inputs, targets
        self.memory_budget, self.backend = int(memory_budget), backend
        self.always_split = always_split
        self.groups: list[UnitGroup] = list(layout.groups)
        self.keys = [g.param_name for g in self.groups]
        self.units = [g.num_units for g in self.groups]
        self.removed = {g.param_name: torch.zeros(g.num_units, dtype=torch.bool)
                        for g in self.groups}
        """Score key -> bool (units,): the units zeroed in the working model."""
        self._whole = self._evaluator(self.groups)
        self._per_group: dict[int, _GroupPasses] = {}
        self._macs: Optional[dict[str, float]] = None
        self.refresh()

    def _evaluator(self, groups: list[UnitGroup]) -> BatchedEvaluator:
        return BatchedEvaluator(self.work, UnitLayout(self.layout.granularity, groups),
                                backend=self.backend, memory_budget=self.memory_budget)

    @property
    def path(self) -> dict[str, str]:
        """Score key -> how its candidates were evaluated (the evaluator's path, and whether
        the inputs were repeated per candidate or the evidence split into examples), for the
        groups evaluated so far."""
        return {self.keys[i]: p.describe() for i, p in self._per_group.items()}

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
        passes = self._per_group.get(index)
        if passes is None:
            passes = self._per_group[index] = _GroupPasses(self, group)
        candidates = candidates.to(torch.long)
        losses, accs = [], []
        # One design per pass-sized chunk keeps the (J, units) masks as small as the pass.
        for chunk in torch.split(candidates, passes.chunk_size(candidates.numel())):
            masks = torch.zeros(chunk.numel(), group.num_units, dtype=torch.bool,
                                device=group.device)
            masks[torch.arange(chunk.numel()), chunk.to(group.device)] = True
            loss, acc = passes(ExplicitDesign({group.param_name: masks}))
            losses.append(loss)
            accs.append(acc)
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


class _GroupPasses:
    """The batched passes of one group's candidates: the evidence batch through one
    :class:`BatchedEvaluator`, or, where that evaluator has to repeat the inputs per candidate
    (a transformer block adds a residual of its input, which a shared batch of B > 1 rows cannot
    broadcast against), one example at a time: a single example's rows broadcast against the
    candidates', so everything upstream of the group runs once per example, and the metrics are
    the token-weighted mean over the examples. The split is used only when it gave the
    batch's own metrics on the first chunk (an exact identity for a model that treats examples
    independently; anything else keeps the batch) and took less time than the batch there."""

    def __init__(self, owner: GroupEvaluator, group: UnitGroup):
        self.owner, self.group = owner, group
        self.batch = owner._evaluator([group])
        self.examples: Optional[BatchedEvaluator] = None
        self.decided = False

    def describe(self) -> str:
        ev = self.examples or self.batch
        if ev.path != "fast":
            return str(ev.path)
        how = ("one example at a time, batch shared" if self.examples is not None else
               "inputs repeated per candidate" if ev.expand_inputs else "batch shared")
        return f"fast ({how})"

    def chunk_size(self, count: int) -> int:
        if self.examples is not None:
            return self.examples.chunk_size(self.owner.inputs[:1], count)
        return self.batch.chunk_size(self.owner.inputs, count)

    def __call__(self, design: ExplicitDesign) -> tuple[Tensor, Tensor]:
        inputs, targets = self.owner.inputs, self.owner.targets
        if self.examples is not None:
            return self._by_example(design)
        metrics = self.batch.subsets(inputs, targets, design, None)
        if not self.decided:
            self.decided = True
            self._try_examples(design, metrics.loss, metrics.accuracy)
        return metrics.loss, metrics.accuracy

    def _try_examples(self, design: ExplicitDesign, loss: Tensor, accuracy: Tensor) -> None:
        inputs = self.owner.inputs
        if self.batch.path != "fast" or not self.batch.expand_inputs or inputs.shape[0] < 2:
            return
        self.examples = self.owner._evaluator([self.group])
        try:
            with warnings.catch_warnings():  # a vmap fallback here is discarded, not used
                warnings.simplefilter("ignore")
                started = time.perf_counter()
                split_loss, split_acc = self._by_example(design)
                split_seconds = time.perf_counter() - started
        except Exception:  # noqa: BLE001  (the split is an optimisation: keep the batch)
            self.examples = None
            return
        tol = 1e-4 if loss.dtype in (torch.float32, torch.float64) else 2e-2
        agree = (self.examples.path == "fast" and not self.examples.expand_inputs
                 and torch.allclose(split_loss, loss, rtol=tol, atol=tol)
                 and bool(((split_acc - accuracy).abs() <= 1.5 / self.owner.targets.numel()
                           + 1e-6).all()))
        if not agree:
            self.examples = None
            return
        if self.owner.always_split:
            return
        # Both are exact; which is faster depends on how much of the model lies upstream of the
        # group (a MobileNetV2 channel: one example at a time ran ~100x slower than the batch).
        # The batch is timed again: its first call also probed its path.
        started = time.perf_counter()
        self.batch.subsets(inputs, self.owner.targets, design, None)
        if time.perf_counter() - started <= split_seconds:
            self.examples = None

    def _by_example(self, design: ExplicitDesign) -> tuple[Tensor, Tensor]:
        inputs, targets = self.owner.inputs, self.owner.targets
        loss = accuracy = None
        weight = targets[:1].numel() / targets.numel()   # every example has as many targets
        for n in range(inputs.shape[0]):
            metrics = self.examples.subsets(inputs[n:n + 1], targets[n:n + 1], design, None)
            part_loss, part_acc = metrics.loss.double() * weight, \
                metrics.accuracy.double() * weight
            loss = part_loss if loss is None else loss + part_loss
            accuracy = part_acc if accuracy is None else accuracy + part_acc
        return loss.to(metrics.loss.dtype), accuracy.to(metrics.accuracy.dtype)
