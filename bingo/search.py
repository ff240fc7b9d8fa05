"""TicketSearch: gathers significance evidence during one training run.

Typical use::

    search = bingo.TicketSearch(model, granularity="neuron", subsets=64, fraction=0.05)
    for inputs, targets in loader:
        loss = criterion(model(inputs), targets)
        opt.zero_grad(); loss.backward(); opt.step()
        search.step(inputs, targets)          # no grad; the unreset model + K reset subsets
    scores = search.significance()             # {weight name: per-unit scores in [0, 1]}
    result = bingo.prune(model, scores, floor=0.97, eval_fn=evaluate)

Each search draws K subsets of units from the counter-based hash (seed, search index, subset,
unit), evaluates the model on the batch with each subset reset (simulated; weights never change),
and accumulates per-unit sufficient statistics for the chosen estimator. ``state_dict`` holds
everything needed to resume bit for bit: the configuration, counters, the reset snapshot, the
statistics and the position in ``search_data`` (bit for bit there only when every pass over it
yields the same batches in the same order; see :class:`TicketSearch`), with a checksum of all of
it that loading verifies.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import re
import secrets
import socket
import stat
import time
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

import bingo_kernels as bk

from . import distributed as dist_search
from .errors import (CheckpointError, InputMismatchError, InvalidOptionError, NonFiniteError,
                     require_data, require_option)
from .estimators import (Significance, UnitStatistics, make_estimator, significance_from)
from .executor import PATHS, BatchedEvaluator, Design, Metrics, model_kept
from .units import GRANULARITIES, UnitLayout, find_units

STATE_FORMAT = "bingo.TicketSearch"
STATE_VERSION = 2
"""2 added ``checksum`` and ``search_data_position``; version-1 states still load (see
:meth:`TicketSearch.load_state_dict`)."""
STALE_TEMP_SECONDS = 3600
"""A ``save()`` temporary file untouched this long belongs to no live writer (see ``save``)."""
RESETS = ("init", "zero", "rewind")
BACKENDS = ("auto", "torch", "triton", "cuda")


@dataclass
class SearchConfig:
    """Hyper-parameters of a ticket search. Every field changes which scores come out."""

    granularity: str = "weight"
    """Unit: ``"weight"`` (each weight element), ``"neuron"`` (output row/channel with bias) or
    ``"structured"`` (the unit groups of :mod:`bingo.structure`: heads, MLP neurons, channels)."""
    subsets: int = 64
    """K, the number of random subsets evaluated per search."""
    fraction: Union[float, Mapping[str, Tensor]] = 0.05
    """Inclusion probability of a unit in a subset: a scalar, or per-unit tensors by score key."""
    reset: str = "init"
    """Reset value: ``"init"`` (weights at construction), ``"zero"`` (dropout-style ablation) or
    ``"rewind"`` (weights after ``rewind_step`` calls to ``step``)."""
    metric: str = "accuracy"
    """Metric whose change is measured: ``"accuracy"`` (the paper's) or ``"loss"``."""
    score: str = "seed"
    """Estimator: ``"seed"`` (the paper's formula) or ``"attribution"`` (Banzhaf-style)."""
    every: int = 1
    """Run a search on every ``every``-th call to ``step``."""
    seed: int = 0
    """Seed of the subset hash (uint32)."""
    backend: str = "auto"
    """Kernel backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``."""
    literal: bool = False
    """With ``score="seed"``: keep the formula's own ordering (see SeedEstimator)."""
    rewind_step: Optional[int] = None
    """With ``reset="rewind"``: the call to ``step`` at which the reset snapshot is taken."""
    include: Optional[list] = None
    """Layer names or patterns to search (default: all Linear/Conv2d; see find_units)."""
    exclude: Optional[list] = None
    """Layer names or patterns to leave out."""
    path: str = "auto"
    """Evaluation path: ``"auto"``, ``"fast"`` (batched kernels) or ``"vmap"`` (generic)."""
    memory_budget: int = 512 * 2**20
    """Bytes one batched pass may use; the K subsets are chunked to fit."""

    def validate(self) -> None:
        """Raise InvalidOptionError naming the first bad value."""
        require_option("granularity", self.granularity, GRANULARITIES)
        require_option("reset", self.reset, RESETS)
        require_option("path", self.path, PATHS)
        require_option("backend", self.backend, BACKENDS)
        for name in ("subsets", "every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
        if self.subsets > 2**32:
            raise InvalidOptionError(f"subsets must be <= 2**32, got {self.subsets}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise InvalidOptionError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.fraction, Mapping):
            if not isinstance(self.fraction, (int, float)) or not 0.0 < self.fraction <= 1.0:
                raise InvalidOptionError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.reset == "rewind":
            if not isinstance(self.rewind_step, int) or self.rewind_step < 0:
                raise InvalidOptionError(
                    f"reset='rewind' needs rewind_step, a non-negative integer; got "
                    f"{self.rewind_step!r}")
        elif self.rewind_step is not None:
            raise InvalidOptionError("rewind_step is only used with reset='rewind'")

    def scoring_fields(self) -> dict:
        """The fields a checkpoint must agree on to be resumed (scalars only)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("fraction", "backend", "path", "memory_budget")}
        out["fraction"] = "per-unit" if isinstance(self.fraction, Mapping) else float(self.fraction)
        return out


@dataclass
class ShardDesign(Design):
    """The subsets ``[k_offset, k_offset + num_subsets)`` of a search: one rank's share.

    ``num_subsets`` is the share's size, so the evaluator and ``subset_unit_sums`` see a plain
    K; the offset makes its masks those of the global subset indices (a pure function of k).
    """

    k_offset: int = 0

    def masks(self, layout, group, k_start, num):
        return super().masks(layout, group, self.k_offset + k_start, num)


class TicketSearch:
    """Runs BINGO ticket searches after training steps and accumulates significance evidence.

    Args:
        model: the network being trained. Its nn.Linear / nn.Conv2d layers hold the units.
        search_data: optional iterable of ``(inputs, targets)`` batches to search on instead of the
            training batch (iterated again at the end of each pass, so a shuffling DataLoader
            reshuffles). The state records how many batches of the current pass were used;
            after ``load_state_dict`` a fresh pass skips that many, so a resumed search sees the
            batches an uninterrupted one would only when every pass yields the same batches in
            the same order (a list of batches, a DataLoader without shuffling).
        distributed: ``"auto"`` (default: when torch.distributed is initialised at a search,
            the ranks of the default group split the K subsets and all-reduce the statistics, with
            the same scores as one process), ``False`` (every process searches alone), ``True``
            (require an initialised group) or a ``ProcessGroup``. See :mod:`bingo.distributed`.
        sync_batch: with several ranks, ``"check"`` (default: every rank must pass the same batch;
            a cheap checksum verifies it) or ``"broadcast"`` (rank 0's batch is sent to all).
        timeout: seconds a rank waits in a search's collectives before raising DistributedError.
        example_inputs: ``granularity="structured"`` only: one batch to trace the model's
            structure with (:func:`bingo.structure.discover`); built from a transformers
            model's config, or an MLP's first layer, when None.
        Other keyword arguments: the fields of :class:`SearchConfig`.

    Attributes:
        path: ``"fast"`` or ``"vmap"`` once the first search has run (which evaluation path the
            model takes; ``path_reason`` says why).
        seconds: wall time spent in searches so far (for overhead reports).
        history: one dict per search (step, before/after metrics, seconds).
    """

    def __init__(self, model: nn.Module, granularity: str = "weight", subsets: int = 64,
                 fraction: Union[float, Mapping[str, Tensor]] = 0.05, reset: str = "init",
                 metric: str = "accuracy", score: str = "seed", every: int = 1, seed: int = 0,
                 backend: str = "auto", *, literal: bool = False,
                 rewind_step: Optional[int] = None, include=None, exclude=None,
                 search_data: Optional[Iterable] = None, path: str = "auto",
                 memory_budget: int = 512 * 2**20, distributed="auto",
                 sync_batch: str = "check", timeout: float = 600.0, example_inputs=None):
        if not isinstance(model, nn.Module):
            raise InvalidOptionError(f"model must be an nn.Module, got {type(model).__name__}")
        include = [include] if isinstance(include, str) else include
        exclude = [exclude] if isinstance(exclude, str) else exclude
        self.config = SearchConfig(
            granularity=granularity, subsets=subsets, fraction=fraction, reset=reset,
            metric=metric, score=score, every=every, seed=seed, backend=backend, literal=literal,
            rewind_step=rewind_step, include=list(include) if include else None,
            exclude=list(exclude) if exclude else None, path=path, memory_budget=memory_budget)
        self.config.validate()
        # Not part of SearchConfig: how the work is split changes no score, and a checkpoint must
        # load on any number of ranks.
        dist_search.validate_options(distributed, sync_batch, timeout)
        self.distributed, self.sync_batch, self.timeout = distributed, sync_batch, float(timeout)
        self.estimator = make_estimator(score, metric, literal)
        self.model = model
        require_data("model tensor", model.state_dict(keep_vars=True).items())
        self.layout: UnitLayout = find_units(model, granularity, include, exclude,
                                             example_inputs=example_inputs)
        self._device = self.layout.groups[0].device
        # Fails early, naming the reason, when an explicit backend cannot run here.
        bk.resolve_backend(backend, self._device)
        self.probs = self._inclusion_probabilities(fraction)
        problem = self.estimator.fraction_problem(max(
            float(torch.as_tensor(p, dtype=torch.float32).max()) for p in self.probs.values()))
        if problem is not None:
            raise InvalidOptionError(problem)
        self.evaluator = BatchedEvaluator(model, self.layout, backend=backend, path=path,
                                          memory_budget=memory_budget)
        self.search_data = search_data
        self._search_iter = None
        self._search_position = 0  # batches drawn from the current pass over search_data
        self.calls = 0
        self.searches = 0
        self.skipped = 0
        self.seconds = 0.0
        self.history: list[dict] = []
        self.stats = UnitStatistics(
            {g.param_name: torch.zeros((g.num_units, 3), dtype=torch.float64,
                                       device=self._device) for g in self.layout.groups},
            torch.zeros(3, dtype=torch.float64, device=self._device))
        self.init: Optional[dict[str, Tensor]] = None
        if reset == "init" or (reset == "rewind" and rewind_step == 0):
            self.init = self._snapshot()

    # -- configuration helpers ------------------------------------------------------------------

    def _inclusion_probabilities(self, fraction) -> dict[str, object]:
        if not isinstance(fraction, Mapping):
            return {g.param_name: float(fraction) for g in self.layout.groups}
        keys = {g.param_name for g in self.layout.groups}
        if set(fraction) != keys:
            raise InvalidOptionError(
                f"per-unit fraction must have exactly the keys {sorted(keys)}, got "
                f"{sorted(fraction)}")
        probs = {}
        for g in self.layout.groups:
            p = fraction[g.param_name]
            shape = self.layout.unit_shape(g)
            if not isinstance(p, Tensor) or tuple(p.shape) != tuple(shape):
                raise InvalidOptionError(
                    f"fraction[{g.param_name!r}] must be a tensor of shape {tuple(shape)}")
            if not bool(((p >= 0) & (p <= 1)).all()):
                raise InvalidOptionError(f"fraction[{g.param_name!r}] has values outside [0, 1]")
            # A copy: the caller's tensor may change later; the search's probabilities may not.
            probs[g.param_name] = p.detach().to(self._device, torch.float32).reshape(-1).clone()
        return probs

    def _snapshot(self) -> dict[str, Tensor]:
        snap = {}
        for g in self.layout.groups:
            for name, t in g.tensors().items():  # weight and bias, or every head parameter
                snap[name] = t.detach().clone()
        for name, t in snap.items():
            if not bool(torch.isfinite(t).all()):
                raise NonFiniteError(f"the reset snapshot of {name!r} contains NaN or Inf")
        return snap

    @property
    def path(self) -> Optional[str]:
        """Evaluation path the model takes (``"fast"``/``"vmap"``; None before the first search)."""
        return self.evaluator.path

    @property
    def path_reason(self) -> str:
        """Why that path was chosen."""
        return self.evaluator.path_reason

    @property
    def layers(self) -> list[str]:
        """Score keys (weight parameter names) of the searched layers."""
        return [g.param_name for g in self.layout.groups]

    # -- the search -----------------------------------------------------------------------------

    def step(self, inputs: Optional[Tensor] = None, targets: Optional[Tensor] = None
             ) -> Optional[dict]:
        """Call after ``optimizer.step()``. Runs a search on every ``every``-th call.

        Returns the search's record (also appended to ``history``), or None when this call runs
        no search (not an ``every``-th call, or before the rewind snapshot exists). A call that
        raises leaves the search as it was (counters, snapshot, statistics); only a batch drawn
        from ``search_data`` stays drawn. Any call leaves the model as it came (every module's
        mode, parameter and buffer objects, hooks and forward; see executor.ModelStructure).
        """
        calls, init = self.calls, self.init
        try:
            return self._step(inputs, targets)
        except BaseException:
            self.calls, self.init = calls, init
            raise

    def _step(self, inputs, targets) -> Optional[dict]:
        self.calls += 1
        cfg = self.config
        if cfg.reset == "rewind" and self.init is None and self.calls >= cfg.rewind_step:
            self.init = self._snapshot()
        if (self.calls - 1) % cfg.every != 0 or (cfg.reset == "rewind" and self.init is None):
            return None
        start = time.perf_counter()
        group = dist_search.resolve_group(self.distributed)
        comm = None if group is None else \
            dist_search.Communicator(group, self.timeout, self._device)
        if comm is not None and self.sync_batch == "broadcast":
            # Only rank 0's batch (or search_data) is used; the others receive it.
            if comm.rank == 0:
                inputs, targets = self._search_batch(inputs, targets)
            # With rank 0's position in search_data, so that every rank's state_dict is the same.
            inputs, targets, self._search_position = comm.broadcast_batch(
                inputs, targets, self.searches, self._search_position)
            self._check_batch(inputs, targets)
        else:
            inputs, targets = self._search_batch(inputs, targets)
        with model_kept(self.model):
            self.model.eval()  # searches must be deterministic: no dropout, batch norm frozen
            record = self._search(inputs, targets, comm)
        record["seconds"] = time.perf_counter() - start
        self.seconds += record["seconds"]
        self.history.append(record)
        return record

    def _search_batch(self, inputs, targets) -> tuple[Tensor, Tensor]:
        if self.search_data is not None:
            batch = self._next_search_batch()
            inputs, targets = batch[0], batch[1]
        self._check_batch(inputs, targets)
        return inputs, targets

    def _check_batch(self, inputs, targets) -> None:
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise InputMismatchError(
                "step(inputs, targets) needs two tensors (or search_data given at construction)")
        if inputs.device != self._device or targets.device != self._device:
            raise InputMismatchError(
                f"inputs are on {inputs.device} and targets on {targets.device}, but the model is "
                f"on {self._device}")
        dtype = self.layout.groups[0].dtype
        if inputs.is_floating_point() and inputs.dtype != dtype:
            raise InputMismatchError(f"inputs have dtype {inputs.dtype} but the model has {dtype}")
        if targets.is_floating_point() or targets.is_complex():
            raise InputMismatchError(
                f"targets must be class indices (an integer tensor), got {targets.dtype}")
        if inputs.dim() == 0 or targets.dim() == 0 or inputs.shape[0] != targets.shape[0]:
            raise InputMismatchError(
                f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must share the "
                "batch dimension")
        # Either would be recorded as a search in which no reset changed anything.
        if inputs.shape[0] == 0:
            raise InputMismatchError("the search batch is empty (0 rows): nothing to measure")
        if not bool((targets != bk.ops.IGNORE_INDEX).any()):
            raise InputMismatchError(
                f"every target of the search batch is the ignore index {bk.ops.IGNORE_INDEX} "
                "(padding): nothing to measure")

    def _next_search_batch(self):
        # Re-iterates search_data at the end of each pass rather than replaying stored batches
        # (itertools.cycle would keep every batch in memory and freeze a DataLoader's shuffle).
        if self._search_iter is None and self._search_position:
            self._search_iter = self._resumed_pass(self._search_position)
        for fresh in (False, True):
            if self._search_iter is None or fresh:
                self._search_iter, self._search_position = iter(self.search_data), 0
            try:
                batch = next(self._search_iter)
            except StopIteration:
                continue
            self._search_position += 1
            return batch
        raise InputMismatchError("search_data yielded no batch")

    def _resumed_pass(self, position: int):
        """A fresh pass over search_data, past the ``position`` batches a loaded state used."""
        batches = iter(self.search_data)
        for used in range(position):
            try:
                next(batches)
            except StopIteration:
                raise InputMismatchError(
                    f"the loaded state had used {position} batches of the current pass over "
                    f"search_data, but a pass now yields {used}: this is not the search data the "
                    "state was saved with") from None
        return batches

    def _check_layers_current(self) -> None:
        # The layout holds the modules it found at construction: a layer replaced since (a new
        # head, a shrunk block) would be neither searched nor noticed, while searches went on.
        for g in self.layout.groups:
            for name, t in g.tensors().items():
                owner, _, attr = name.rpartition(".")
                try:
                    current = getattr(self.model.get_submodule(owner), attr)
                except AttributeError:
                    current = None
                if current is not t:
                    raise InputMismatchError(
                        f"layer {g.name!r} is no longer the model's: {name!r} was replaced or "
                        "removed after the TicketSearch was built; build a new TicketSearch for "
                        "the changed model")

    def _check_weights(self) -> None:
        for g in self.layout.groups:
            for name, t in g.tensors().items():
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(f"parameter {name!r} contains NaN or Inf")

    def _search(self, inputs: Tensor, targets: Tensor,
                comm: Optional[dist_search.Communicator] = None) -> dict:
        cfg = self.config
        lo, hi = (0, cfg.subsets) if comm is None else \
            dist_search.shard(cfg.subsets, comm.rank, comm.world)
        design = ShardDesign(cfg.seed, self.searches, hi - lo, self.probs, k_offset=lo)
        try:
            self._check_layers_current()
            self._check_weights()
            before = self.evaluator.baseline(inputs, targets)
            init = None if cfg.reset == "zero" else self.init
            after = self.evaluator.subsets(inputs, targets, design, init) if hi > lo else None
        except Exception:
            if comm is not None:  # peers raise at once, naming this rank, instead of timing out
                try:
                    comm.exchange_headers(dict(failed=1.0), self.searches)
                except dist_search.DistributedError:
                    pass  # the peers are gone too; this rank's own error is the one to report
            raise
        if comm is not None:
            before, after = self._gather(comm, inputs, targets, before, after, lo, hi)
        for name, m in (("before", before), ("after", after)):
            for metric in ("loss", "accuracy"):
                if not bool(torch.isfinite(m.get(metric)).all()):
                    raise NonFiniteError(f"the {metric} {name} reset is NaN or Inf at search "
                                         f"{self.searches} (step call {self.calls})")
        values = self.estimator.subset_values(before, after)
        record = dict(call=self.calls, search=self.searches,
                      before_loss=float(before.loss), before_accuracy=float(before.accuracy),
                      after_loss=float(after.loss.mean()),
                      after_accuracy=float(after.accuracy.mean()), skipped=values is None)
        if values is None:
            self.skipped += 1
        else:
            self._accumulate(design, values, comm)
        self.searches += 1
        return record

    def _gather(self, comm, inputs, targets, before: Metrics, after: Optional[Metrics], lo, hi
                ) -> tuple[Metrics, Metrics]:
        """Every rank's K metrics on every rank, after checking the ranks searched alike."""
        cfg = self.config
        header = dict(failed=0.0, calls=self.calls, searches=self.searches, subsets=cfg.subsets,
                      seed=cfg.seed, units=self.layout.total,
                      before_loss=float(before.loss), before_accuracy=float(before.accuracy))
        for key, t in (("inputs", inputs), ("targets", targets)):
            header[key + "_numel"], header[key + "_sum"], header[key + "_sumsq"] = \
                dist_search.checksum(t)
        header["weights_sum"], header["weights_sumsq"] = dist_search.weights_checksum(
            [t for g in self.layout.groups for t in g.tensors().values() if t is not None])
        headers = comm.exchange_headers(header, self.searches)
        comm.check_headers(headers, self.searches)
        loss, accuracy = comm.gather_metrics(
            lo, hi, cfg.subsets, None if after is None else after.loss,
            None if after is None else after.accuracy, self.searches)
        # Rank 0's unreset metrics on every rank (the checks above make them agree up to
        # summation order), so that every rank derives identical subset values and state.
        ref = dict(zip(dist_search.HEADER, headers[0].tolist()))
        before = Metrics(torch.tensor(ref["before_loss"], dtype=torch.float64),
                         torch.tensor(ref["before_accuracy"], dtype=torch.float64))
        return before, Metrics(loss, accuracy)

    def _accumulate(self, design: "ShardDesign", values: Tensor,
                    comm: Optional[dist_search.Communicator] = None) -> None:
        v = values.to(self._device, torch.float64)
        columns = torch.stack([torch.ones_like(v), v, v * v], dim=1)
        # This process's subsets only (all of them without a process group).
        local = columns[design.k_offset:design.k_offset + design.num_subsets]
        sums = {}
        for g in self.layout.groups:
            # One search's sums are float32 (counts exact up to 2**24 subsets); the running
            # totals over searches are float64 so that long runs do not lose precision.
            sums[g.param_name] = bk.subset_unit_sums(
                local.float(), design.masks(self.layout, g, 0, design.num_subsets),
                g.num_units, backend=self.config.backend).double() \
                if design.num_subsets else torch.zeros((g.num_units, 3), dtype=torch.float64,
                                                       device=self._device)
        if comm is not None:
            # One collective for all layers: flatten, sum across ranks, split back.
            flat = comm.all_reduce(torch.cat([t.reshape(-1) for t in sums.values()]),
                                   "statistics", self.searches)
            sums = dict(zip(sums, flat.split([t.numel() for t in sums.values()])))
        for g in self.layout.groups:
            self.stats.per_unit[g.param_name] += sums[g.param_name].view(g.num_units, 3)
        self.stats.totals += columns.sum(0)

    # -- results --------------------------------------------------------------------------------

    def significance(self) -> Significance:
        """Per-unit significance in [0, 1], keyed by weight parameter name (higher = keep)."""
        shapes = {g.param_name: self.layout.unit_shape(g) for g in self.layout.groups}
        return significance_from(self.stats, self.estimator, shapes, self.config.granularity,
                                 self.searches - self.skipped)

    # -- persistence ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume: config, counters, reset snapshot, statistics, history,
        the position in ``search_data``, and a ``checksum`` of all of it (SHA-256, verified by
        :meth:`load_state_dict`)."""
        cfg = asdict(self.config)
        fraction = self.config.fraction
        cfg["fraction"] = float(fraction) if not isinstance(fraction, Mapping) else None
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": cfg,
            "per_unit_fraction": ({k: v.detach().cpu().clone() for k, v in self.probs.items()}
                                  if isinstance(fraction, Mapping) else None),
            "layout": self.layout.fingerprint(),
            "calls": self.calls,
            "searches": self.searches,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "history": copy.deepcopy(self.history),
            "init": None if self.init is None else {k: v.clone() for k, v in self.init.items()},
            "stats": {k: v.clone() for k, v in self.stats.per_unit.items()},
            "totals": self.stats.totals.clone(),
            "search_data_position": self._search_position,
        }
        state["checksum"] = state_checksum(state)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a state from :meth:`state_dict`, checking it belongs to this model and config.

        Everything is checked before anything is applied, so a refused state (CheckpointError)
        leaves this search as it was: the checksum (a state changed after ``state_dict`` made it,
        by corruption or by hand, is refused), then the configuration and layers, then that the
        content is consistent (shapes, dtypes, finite statistics, counters that fit together, a
        reset snapshot exactly when the configuration has one).

        Version-1 states (before checkpoints carried a checksum) still load, with a warning
        that their content cannot be verified; saving again writes the current version.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise CheckpointError("not a bingo TicketSearch state (missing or wrong 'format')")
        version = state.get("version")
        if type(version) is not int or version not in (1, STATE_VERSION):
            raise CheckpointError(
                f"TicketSearch state version {version!r} is not supported (this bingo reads "
                f"versions 1 and {STATE_VERSION})")
        try:
            self._verify_checksum(state, version)
            loaded = self._checked_state(state)
        except CheckpointError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"TicketSearch state is incomplete or corrupt: {exc!r}") from exc
        for name, value in loaded.items():  # plain assignments: all or nothing
            setattr(self, name, value)

    @staticmethod
    def _verify_checksum(state: Mapping, version: int) -> None:
        if version == 1:
            if "checksum" in state or "search_data_position" in state:
                raise CheckpointError("the state says version 1 but has version-2 fields: corrupt")
            warnings.warn("bingo: this TicketSearch state is version 1, written before states "
                          "carried a checksum, so corruption cannot be ruled out (its content is "
                          "still checked for consistency); save it again to add one",
                          stacklevel=3)
            return
        if "checksum" not in state:
            raise CheckpointError("the TicketSearch state has no checksum: incomplete or corrupt")
        if state["checksum"] != state_checksum(state):
            raise CheckpointError(
                "the TicketSearch state does not match its checksum: it is corrupt, or was "
                "changed after state_dict() made it")

    def _checked_state(self, state: Mapping) -> dict:
        """The attributes ``state`` restores, after checking it fits this search."""
        cfg = self.config
        mine = cfg.scoring_fields()
        theirs = dict(state["config"])
        theirs["fraction"] = "per-unit" if theirs["fraction"] is None else float(theirs["fraction"])
        # Types too: True == 1, but a checkpoint holding literal=1 or subsets=True is not ours.
        differ = [f"{k}: checkpoint {theirs.get(k)!r} vs this search {v!r}"
                  for k, v in mine.items() if type(theirs.get(k)) is not type(v)
                  or theirs.get(k) != v]
        if differ:
            raise CheckpointError("the checkpoint was made with a different search configuration: "
                                  + "; ".join(differ))
        if state["layout"] != self.layout.fingerprint():
            raise CheckpointError(
                "the checkpoint belongs to a different model: its layers "
                f"{[(d['param'], tuple(d['shape'])) for d in state['layout']]} vs this model's "
                f"{[(g.param_name, g.weight_shape) for g in self.layout.groups]}")
        self._check_fraction(state["per_unit_fraction"])
        calls, searches, skipped = (_count(state, k) for k in ("calls", "searches", "skipped"))
        if skipped > searches or searches > -(-calls // cfg.every) or searches > bk.hashing.MASK32:
            raise CheckpointError(
                f"the checkpoint's counters do not fit together: {calls} calls, {searches} "
                f"searches (at most one per {cfg.every} calls, below 2**32), {skipped} skipped")
        totals = state["totals"]
        if not isinstance(totals, Tensor) or tuple(totals.shape) != (3,) or \
                totals.dtype != torch.float64 or not bool(torch.isfinite(totals).all()) or \
                float(totals[0]) != cfg.subsets * (searches - skipped) or float(totals[2]) < 0:
            raise CheckpointError(
                f"the checkpoint's totals are corrupt: {state['totals']!r} for "
                f"{searches - skipped} searches of {cfg.subsets} subsets")
        if set(state["stats"]) != {g.param_name for g in self.layout.groups}:
            raise CheckpointError(f"the checkpoint's statistics are of layers "
                                  f"{sorted(state['stats'])}, not {self.layers}")
        stats = {}
        for g in self.layout.groups:
            t = state["stats"][g.param_name]
            if not isinstance(t, Tensor) or tuple(t.shape) != (g.num_units, 3) or \
                    t.dtype != torch.float64 or not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"statistics of {g.param_name!r} are corrupt")
            counts = t[:, 0]
            if not bool(((counts >= 0) & (counts <= totals[0]) & (counts == counts.round())
                         & (t[:, 2] >= 0)).all()):
                raise CheckpointError(
                    f"statistics of {g.param_name!r} are corrupt: per-unit counts must be whole "
                    f"numbers in [0, {float(totals[0]):g}] and sums of squares non-negative")
            stats[g.param_name] = t.to(self._device).clone()
        seconds = state["seconds"]
        if type(seconds) not in (int, float) or not math.isfinite(seconds) or seconds < 0:
            raise CheckpointError(f"the checkpoint's seconds must be a non-negative number, got "
                                  f"{seconds!r}")
        history = state["history"]
        if not isinstance(history, list) or len(history) != searches or \
                not all(isinstance(r, dict) for r in history):
            raise CheckpointError(f"the checkpoint's history must list one record per search "
                                  f"({searches})")
        return dict(stats=UnitStatistics(stats, totals.to(self._device).clone()),
                    init=self._checked_init(state["init"], calls), calls=calls,
                    searches=searches, skipped=skipped, seconds=float(seconds),
                    history=copy.deepcopy(history), _search_iter=None,
                    _search_position=_count(state, "search_data_position")
                    if "search_data_position" in state else 0)

    def _check_fraction(self, theirs) -> None:
        """A per-unit fraction must be this search's own: it decides every subset."""
        if theirs is None:
            return  # scalar: already compared with the configuration
        if not isinstance(theirs, Mapping) or set(theirs) != set(self.probs):
            raise CheckpointError("the checkpoint's per-unit fraction is of other layers")
        for key, p in self.probs.items():
            t = theirs[key]
            if not isinstance(t, Tensor) or t.dtype != torch.float32 or \
                    not torch.equal(t.to(p.device).reshape(-1), p):
                raise CheckpointError(
                    f"the checkpoint was made with a different per-unit fraction of {key!r}; "
                    "a checkpoint resumes only the search it was made with")

    def _checked_init(self, init, calls: int) -> Optional[dict[str, Tensor]]:
        """The reset snapshot: present exactly when this configuration has taken one by ``calls``
        (like the live tensors in names, shapes and dtypes, and finite)."""
        cfg = self.config
        expected = cfg.reset == "init" or (cfg.reset == "rewind" and calls >= cfg.rewind_step)
        if (init is not None) != expected:
            raise CheckpointError(
                f"the checkpoint {'lacks' if expected else 'has'} a reset snapshot, but "
                f"reset={cfg.reset!r} after {calls} calls {'takes' if expected else 'has no'} one")
        if init is None:
            return None
        live = {name: t for g in self.layout.groups for name, t in g.tensors().items()
                if t is not None}
        if not isinstance(init, Mapping) or set(init) != set(live):
            raise CheckpointError(f"the checkpoint's reset snapshot holds {sorted(init)}, not "
                                  f"{sorted(live)}")
        out = {}
        for name, t in live.items():
            s = init[name]
            if not isinstance(s, Tensor) or tuple(s.shape) != tuple(t.shape) or \
                    s.dtype != t.dtype or not bool(torch.isfinite(s).all()):
                raise CheckpointError(
                    f"reset snapshot of {name!r} must be a finite {t.dtype} tensor of shape "
                    f"{tuple(t.shape)}")
            out[name] = s.to(self._device).clone()
        return out

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (an interrupted write keeps the old).

        A symlink is written through (its target is replaced) and an existing file keeps its
        permission bits (a new one gets the umask's, as ``open`` gives). The state goes to a
        temporary file ``.bingo-<host>.<pid>.<random>.tmp`` beside the target, renamed over it
        when complete; one left behind by a killed writer (its process gone from this host, or
        untouched for ``STALE_TEMP_SECONDS``) is removed by the next ``save`` in that directory.
        """
        state = self.state_dict()
        path = os.path.realpath(os.fspath(path))
        directory = os.path.dirname(path)
        _remove_stale_temporaries(directory)
        tmp = os.path.join(directory, f".bingo-{_temp_owner()}.{secrets.token_hex(4)}.tmp")
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = None
        # 0o666 masked by the umask, as open() would create the file (mkstemp's is 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Load a file written by :meth:`save`; a corrupt or foreign file raises CheckpointError
        (the checksum in the state catches corruption that torch.load does not: it does not check
        the zip's CRCs)."""
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001  (pickle/zip errors vary by torch version)
            raise CheckpointError(f"cannot read ticket-search checkpoint {os.fspath(path)!r}: the "
                                  f"file is corrupt or not a torch checkpoint ({exc})") from exc
        self.load_state_dict(state)

    def __repr__(self) -> str:
        c = self.config
        return (f"TicketSearch(granularity={c.granularity!r}, units={self.layout.total}, "
                f"layers={len(self.layout.groups)}, subsets={c.subsets}, fraction="
                f"{'per-unit' if isinstance(c.fraction, Mapping) else c.fraction}, "
                f"reset={c.reset!r}, metric={c.metric!r}, score={c.score!r}, "
                f"searches={self.searches}, path={self.path!r})")


def state_checksum(state: Mapping) -> str:
    """SHA-256 of a TicketSearch state without its ``checksum`` field, over a canonical encoding
    of everything in it: every tensor's dtype, shape and bytes, every other value with its type,
    every dict's keys (in sorted order) and every list's length."""
    h = hashlib.sha256()
    _digest(h, {k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


def _digest(h, value) -> None:
    if isinstance(value, Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"tensor:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        h.update(f"dict:{len(value)};".encode())
        for key in sorted(value, key=repr):
            _digest(h, key)
            _digest(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"list:{len(value)};".encode())
        for item in value:
            _digest(h, item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value).encode()
        h.update(f"{type(value).__name__}:{len(text)}:".encode() + text)
    else:
        raise CheckpointError(f"a TicketSearch state holds a {type(value).__name__}, which no "
                              "state_dict() writes: corrupt or changed by hand")


def _count(state: Mapping, key: str) -> int:
    value = state[key]
    if type(value) is not int or value < 0:
        raise CheckpointError(f"the checkpoint's {key} must be a non-negative integer, got "
                              f"{value!r}")
    return value


# save()'s temporary files: ".bingo-<host>.<pid>.<8 hex>.tmp"; before the host and pid were in the
# name (bingo <= the version-1 state format): mkstemp's ".bingo-<8 chars>.tmp".
_TEMP_NAME = re.compile(
    r"\.bingo-(?:(?P<host>[\w-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}|[a-z0-9_]{8})\.tmp")


def _temp_owner() -> str:
    host = re.sub(r"[^\w-]", "_", socket.gethostname())
    return f"{host}.{os.getpid()}"


def _process_gone(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) is a liveness probe on POSIX only
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # alive (another user's), or no pid of this system
        return False
    return False


def _remove_stale_temporaries(directory: str) -> None:
    """Remove ``save()`` temporaries left by killed writers: those of a process gone from this
    host, and those untouched for STALE_TEMP_SECONDS (any host; a writer touches its file until
    it renames it). A live writer's file is never removed."""
    host = _temp_owner().rpartition(".")[0]
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return  # the save itself reports an unusable directory
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            stale = (match["pid"] is not None and match["host"] == host
                     and _process_gone(int(match["pid"]))) or \
                time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
            if stale:
                os.unlink(entry.path)
        except OSError:
            continue  # removed meanwhile by another save, or not ours to remove
