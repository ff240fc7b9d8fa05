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
everything needed to resume bit for bit: the configuration, counters, the reset snapshot and the
statistics.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
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
STATE_VERSION = 1
RESETS = ("init", "zero", "rewind")
BACKENDS = ("auto", "torch", "triton", "cuda")


@dataclass
class SearchConfig:
    """Hyper-parameters of a ticket search. Every field changes which scores come out."""

    granularity: str = "weight"
    """Unit: ``"weight"`` (each weight element) or ``"neuron"`` (output row/channel with bias)."""
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
            reshuffles; restarts from its beginning after ``load_state_dict``).
        distributed: ``"auto"`` (default: when torch.distributed is initialised at a search,
            the ranks of the default group split the K subsets and all-reduce the statistics, with
            the same scores as one process), ``False`` (every process searches alone), ``True``
            (require an initialised group) or a ``ProcessGroup``. See :mod:`bingo.distributed`.
        sync_batch: with several ranks, ``"check"`` (default: every rank must pass the same batch;
            a cheap checksum verifies it) or ``"broadcast"`` (rank 0's batch is sent to all).
        timeout: seconds a rank waits in a search's collectives before raising DistributedError.
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
                 sync_batch: str = "check", timeout: float = 600.0):
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
        self.layout: UnitLayout = find_units(model, granularity, include, exclude)
        require_data("model tensor", model.state_dict(keep_vars=True).items())
        self._check_no_shared_parameters()
        self._device = self.layout.groups[0].module.weight.device
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

    def _check_no_shared_parameters(self) -> None:
        # A module used at several places is one group (named_modules lists it once) and one
        # patched forward, so its units are counted once and reset together everywhere. A
        # parameter shared by two searched layers (tied weights) would be two groups whose
        # subsets reset it independently, with two scores for one tensor.
        owners: dict[int, tuple[str, str]] = {}
        for g in self.layout.groups:
            for name, t in g.tensors().items():
                if t is None:
                    continue
                layer, first = owners.setdefault(id(t), (g.name, name))
                if layer != g.name:
                    raise InputMismatchError(
                        f"layers {layer!r} and {g.name!r} share one parameter ({first!r} is "
                        f"{name!r}: tied weights), which ticket search would score twice; leave "
                        "one of them out with exclude=")

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
            probs[g.param_name] = p.detach().to(self._device, torch.float32).reshape(-1)
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
        raises leaves the search as it was (counters, snapshot, statistics) and the model too
        (every module's mode, its parameter and buffer objects); only a batch drawn from
        ``search_data`` stays drawn.
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
            inputs, targets = comm.broadcast_batch(inputs, targets, self.searches)
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
        dtype = self.layout.groups[0].module.weight.dtype
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
        for fresh in (False, True):
            if self._search_iter is None or fresh:
                self._search_iter = iter(self.search_data)
            try:
                return next(self._search_iter)
            except StopIteration:
                continue
        raise InputMismatchError("search_data yielded no batch")

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
        """Everything needed to resume: config, counters, reset snapshot, statistics, history."""
        cfg = asdict(self.config)
        fraction = self.config.fraction
        cfg["fraction"] = float(fraction) if not isinstance(fraction, Mapping) else None
        return {
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
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a state from :meth:`state_dict`, checking it belongs to this model and config."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise CheckpointError("not a bingo TicketSearch state (missing or wrong 'format')")
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"TicketSearch state version {state.get('version')!r} is not supported (this "
                f"bingo reads version {STATE_VERSION})")
        try:
            self._load_checked(state)
        except CheckpointError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"TicketSearch state is incomplete or corrupt: {exc!r}") from exc

    def _load_checked(self, state: Mapping) -> None:
        mine = self.config.scoring_fields()
        theirs = dict(state["config"])
        theirs["fraction"] = "per-unit" if theirs["fraction"] is None else float(theirs["fraction"])
        differ = [f"{k}: checkpoint {theirs.get(k)!r} vs this search {v!r}"
                  for k, v in mine.items() if theirs.get(k) != v]
        if differ:
            raise CheckpointError("the checkpoint was made with a different search configuration: "
                                  + "; ".join(differ))
        if state["layout"] != self.layout.fingerprint():
            raise CheckpointError(
                "the checkpoint belongs to a different model: its layers "
                f"{[(d['param'], tuple(d['shape'])) for d in state['layout']]} vs this model's "
                f"{[(g.param_name, g.weight_shape) for g in self.layout.groups]}")
        stats = {}
        for g in self.layout.groups:
            t = state["stats"][g.param_name]
            if not isinstance(t, Tensor) or tuple(t.shape) != (g.num_units, 3) or \
                    t.dtype != torch.float64 or not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"statistics of {g.param_name!r} are corrupt")
            stats[g.param_name] = t.to(self._device).clone()
        totals = state["totals"]
        if not isinstance(totals, Tensor) or tuple(totals.shape) != (3,):
            raise CheckpointError("the checkpoint's totals are corrupt")
        init = state["init"]
        if init is not None:
            init = {k: v.to(self._device).clone() for k, v in init.items()}
            for g in self.layout.groups:
                for name, t in g.tensors().items():
                    if tuple(init[name].shape) != tuple(t.shape):
                        raise CheckpointError(f"reset snapshot of {name!r} has the wrong shape")
        if state["per_unit_fraction"] is not None:
            self.probs = {k: v.to(self._device, torch.float32)
                          for k, v in state["per_unit_fraction"].items()}
        self.stats = UnitStatistics(stats, totals.to(self._device, torch.float64).clone())
        self.init = init
        self.calls = int(state["calls"])
        self.searches = int(state["searches"])
        self.skipped = int(state["skipped"])
        self.seconds = float(state["seconds"])
        self.history = list(state["history"])
        self._search_iter = None

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (an interrupted write keeps the old)."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bingo-", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(self.state_dict(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Load a file written by :meth:`save`; a corrupt or foreign file raises CheckpointError."""
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
