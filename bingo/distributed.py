"""Ticket search across torch.distributed ranks.

When a process group is initialised, :class:`bingo.TicketSearch` splits each search's K subsets
into contiguous, balanced ranges, one per rank (rank r evaluates subsets
``[r*K//W, (r+1)*K//W)``). Subset masks are a pure function of (seed, search, k, unit), so the
union of the ranges is exactly the single-process search. Per search, two collectives run:

1. **header** — an all-reduce (SUM) of a small fixed-size float64 buffer in which every rank
   fills only its own row: failure flag, counters, configuration, batch and weight checksums and
   the unreset metrics. Every rank then checks that the ranks agree (same step count,
   configuration, batch and weights; a mismatch raises :class:`DistributedError` on every rank,
   naming the ranks and the quantity, and leaves the group usable).
2. **metrics** — an all-reduce (SUM) of the ``(2, K)`` losses and accuracies, each rank filling
   its own range. Every rank then computes the subset values of all K subsets itself, so any
   estimator sees exactly what a single process would.
3. **statistics** — one all-reduce (SUM) of this search's per-unit sums of all layers, flattened
   into one float64 buffer (each rank has summed only its own subsets).

The header goes first and alone because the other buffers' sizes depend on the configuration:
gloo aborts the whole process, rather than raising, when ranks pass different sizes.

Everything else (totals, counters, history) is computed from the full metrics on every rank, so
``state_dict()`` is the same on every rank (except the wall-time fields ``seconds``, which are
each rank's own) and saving from rank 0 suffices; it holds nothing about the world size, so it
loads into a search with any number of ranks.

Failures never hang: a rank whose own evaluation raises still joins the header collective with a
failure flag (its peers raise at once, naming it) and then re-raises its own error; every
collective is waited on with a bounded ``timeout``, after which :class:`DistributedError` names the
collective, the search and the likely cause; a peer process that died surfaces as the backend's
connection error, re-raised as :class:`DistributedError`.
"""

from __future__ import annotations

import datetime
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import DistributedError, InvalidOptionError, require_option  # noqa: F401 (re-exported)

SYNC_BATCH = ("check", "broadcast")

# Header fields every rank writes into its slot of the metrics buffer (float64; the integers are
# far below 2**53, so they round-trip exactly). Checked for agreement in ``check_headers``.
HEADER = ("failed", "calls", "searches", "subsets", "seed", "units", "inputs_numel", "inputs_sum",
          "inputs_sumsq", "targets_numel", "targets_sum", "targets_sumsq", "weights_sum",
          "weights_sumsq", "before_loss", "before_accuracy")
_EXACT = ("calls", "searches", "subsets", "seed", "units", "inputs_numel", "targets_numel")
_WHAT = {"calls": "number of step() calls", "searches": "number of searches run",
         "subsets": "subsets (K)", "seed": "seed", "units": "number of searched units",
         "inputs_numel": "search batch's input size", "targets_numel": "search batch's target size"}

# dtypes a broadcast search batch may have (their index travels in the broadcast header).
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)
_MAX_DIMS = 8


def resolve_group(distributed) -> Optional[object]:
    """The process group to split searches over, or None for a single-process search.

    ``distributed``: ``"auto"`` (the default group when torch.distributed is initialised),
    ``False`` (never split: every process runs all K subsets alone), ``True`` (the default group,
    which must be initialised) or a ``ProcessGroup``. A group of one rank counts as None.
    """
    if distributed is False:
        return None
    available = torch.distributed.is_available()
    initialised = available and torch.distributed.is_initialized()
    if distributed == "auto" or distributed is True:
        if not initialised:
            if distributed is True:
                raise DistributedError(
                    "distributed=True but torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group first (or use distributed='auto')")
            return None
        group = torch.distributed.group.WORLD
    else:
        if not initialised:
            raise DistributedError("a process group was given but torch.distributed is not "
                                   "initialised")
        group = distributed
    return group if torch.distributed.get_world_size(group) > 1 else None


def validate_options(distributed, sync_batch: str, timeout: float) -> None:
    """Raise InvalidOptionError naming the first bad distributed option."""
    if not (distributed in ("auto", True, False) or _is_group(distributed)):
        raise InvalidOptionError(
            f"distributed must be 'auto', True, False or a torch.distributed ProcessGroup, got "
            f"{distributed!r}")
    require_option("sync_batch", sync_batch, SYNC_BATCH)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not 0 < timeout < math.inf:
        raise InvalidOptionError(f"timeout must be a positive number of seconds, got {timeout!r}")


def _is_group(obj) -> bool:
    return torch.distributed.is_available() and isinstance(obj, torch.distributed.ProcessGroup)


def shard(num_subsets: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous range ``[lo, hi)`` of ``num_subsets`` (may be empty if K < W)."""
    return rank * num_subsets // world, (rank + 1) * num_subsets // world


def checksum(t: Tensor) -> tuple[float, float, float]:
    """``(numel, sum, sum of squares)`` in float64: cheap evidence that two ranks hold the same."""
    d = t.detach().double()
    return float(t.numel()), float(d.sum()), float((d * d).sum())


class Communicator:
    """The collectives of one search on one rank, each bounded by ``timeout`` seconds."""

    def __init__(self, group, timeout: float, device: torch.device):
        self.group = group
        self.rank = torch.distributed.get_rank(group)
        self.world = torch.distributed.get_world_size(group)
        self.timeout = datetime.timedelta(seconds=float(timeout))
        self.device = device

    def _wait(self, work, what: str, search: int) -> None:
        try:
            completed = work.wait(self.timeout)
        except Exception as exc:  # noqa: BLE001  (backends raise RuntimeError subclasses)
            text = str(exc)
            if "timed out" in text.lower() or "timeout" in text.lower():
                raise self._timeout_error(what, search) from exc
            raise DistributedError(
                f"ticket search {search}: the {what} collective failed on rank {self.rank} of "
                f"{self.world} ({type(exc).__name__}: {text.strip()[:300]}); a peer rank has "
                "probably exited or crashed (see its log)") from exc
        if completed is False:  # backends that report a timeout by returning False
            raise self._timeout_error(what, search)

    def _timeout_error(self, what: str, search: int) -> DistributedError:
        return DistributedError(
            f"ticket search {search}: rank {self.rank} of {self.world} waited "
            f"{self.timeout.total_seconds():g} s for the {what} collective and not every rank "
            "joined: a peer rank failed, hangs, or did not call TicketSearch.step() (every rank "
            "must call it the same number of times). The process group may now be unusable")

    def all_reduce(self, buffer: Tensor, what: str, search: int) -> Tensor:
        """SUM-reduce ``buffer`` in place across the group, waiting at most ``timeout``."""
        try:
            work = torch.distributed.all_reduce(buffer, group=self.group, async_op=True)
        except Exception as exc:  # noqa: BLE001
            raise DistributedError(f"ticket search {search}: cannot start the {what} collective "
                                   f"on rank {self.rank}: {exc}") from exc
        self._wait(work, what, search)
        return buffer

    def broadcast(self, tensor: Tensor, what: str, search: int) -> Tensor:
        """Rank 0's ``tensor`` on every rank (in place), waiting at most ``timeout``."""
        src = torch.distributed.get_global_rank(self.group, 0) \
            if self.group is not torch.distributed.group.WORLD else 0
        try:
            work = torch.distributed.broadcast(tensor, src=src, group=self.group, async_op=True)
        except Exception as exc:  # noqa: BLE001
            raise DistributedError(f"ticket search {search}: cannot start the {what} broadcast "
                                   f"on rank {self.rank}: {exc}") from exc
        self._wait(work, what, search)
        return tensor

    # -- the search's collectives ---------------------------------------------------------------

    def broadcast_batch(self, inputs: Tensor, targets: Tensor, search: int, position: int = 0
                        ) -> tuple[Tensor, Tensor, int]:
        """Rank 0's search batch and ``position`` (in its search_data) on every rank
        (``sync_batch="broadcast"``)."""
        header = torch.zeros(2 * (_MAX_DIMS + 2) + 1, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            header[-1] = position
            for i, t in enumerate((inputs, targets)):
                if t.dim() > _MAX_DIMS or t.dtype not in _DTYPES:
                    raise DistributedError(
                        f"sync_batch='broadcast' supports tensors of up to {_MAX_DIMS} dims and "
                        f"dtypes {[str(d) for d in _DTYPES]}; got {tuple(t.shape)} {t.dtype}")
                row = header[i * (_MAX_DIMS + 2):(i + 1) * (_MAX_DIMS + 2)]
                row[0], row[1] = t.dim(), _DTYPES.index(t.dtype)
                row[2:2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
        # Non-root ranks contribute zeros, so the sum is rank 0's header.
        self.all_reduce(header, "batch-shape", search)
        out = []
        for i, t in enumerate((inputs, targets)):
            row = header[i * (_MAX_DIMS + 2):(i + 1) * (_MAX_DIMS + 2)].tolist()
            shape, dtype = tuple(row[2:2 + row[0]]), _DTYPES[row[1]]
            buf = t.to(self.device).contiguous() if self.rank == 0 else \
                torch.empty(shape, dtype=dtype, device=self.device)
            out.append(self.broadcast(buf, "search-batch", search))
        return out[0], out[1], int(header[-1])

    def exchange_headers(self, header: dict, search: int) -> Tensor:
        """Every rank's header ``(W, len(HEADER))``; a fixed size whatever the ranks' configs."""
        h = len(HEADER)
        buf = torch.zeros(self.world * h, dtype=torch.float64, device=self.device)
        buf[self.rank * h:(self.rank + 1) * h] = torch.tensor(
            [float(header.get(name, 0.0)) for name in HEADER], dtype=torch.float64)
        return self.all_reduce(buf, "header", search).view(self.world, h).cpu()

    def gather_metrics(self, lo: int, hi: int, num_subsets: int, loss: Optional[Tensor],
                       accuracy: Optional[Tensor], search: int) -> tuple[Tensor, Tensor]:
        """All K subsets' loss and accuracy (float64) from each rank's range ``[lo, hi)``.

        Only after ``check_headers``: the buffer's size depends on K, and gloo aborts the process
        (it does not raise) when ranks pass buffers of different sizes.
        """
        buf = torch.zeros(2, num_subsets, dtype=torch.float64, device=self.device)
        if hi > lo:
            buf[0, lo:hi] = loss.double()
            buf[1, lo:hi] = accuracy.double()
        self.all_reduce(buf, "metrics", search)
        return buf[0], buf[1]

    def check_headers(self, headers: Tensor, search: int) -> None:
        """Raise DistributedError if a rank failed or the ranks disagree on anything searched."""
        rows = [dict(zip(HEADER, r)) for r in headers.tolist()]
        failed = [r for r, row in enumerate(rows) if row["failed"]]
        if failed and self.rank not in failed:
            raise DistributedError(
                f"ticket search {search}: rank(s) {failed} of {self.world} raised an error while "
                "evaluating their subsets (see their log); this rank stops too")
        if failed:
            return  # this rank re-raises its own error
        ref = rows[0]
        for r, row in enumerate(rows[1:], start=1):
            for name in _EXACT:
                if row[name] != ref[name]:
                    raise DistributedError(
                        f"ticket search {search}: ranks disagree on the {_WHAT[name]}: rank 0 has "
                        f"{ref[name]:g}, rank {r} has {row[name]:g}. Every rank must build the same "
                        "TicketSearch and call step() on every training step")
            for what, key in (("search batch's inputs", "inputs"),
                              ("search batch's targets", "targets"),
                              ("searched weights", "weights")):
                if not _close(ref, row, key):
                    hint = ("wrap the model in DistributedDataParallel (or otherwise keep the "
                            "replicas in sync)" if key == "weights" else
                            "pass the same batch on every rank, give every rank the same "
                            "search_data, or use sync_batch='broadcast'")
                    raise DistributedError(
                        f"ticket search {search}: the {what} differ between rank 0 and rank {r} "
                        f"(checksums {ref[key + '_sum']:.9g}/{ref[key + '_sumsq']:.9g} vs "
                        f"{row[key + '_sum']:.9g}/{row[key + '_sumsq']:.9g}); a distributed search "
                        f"equals the single-process one only on one batch and one model: {hint}")


def _close(a: dict, b: dict, key: str) -> bool:
    # Identical tensors give identical checksums up to summation order (thread counts, devices);
    # a different batch or model moves them by far more than 1e-6 relative.
    s_a, s_b = a[key + "_sum"], b[key + "_sum"]
    q_a, q_b = a[key + "_sumsq"], b[key + "_sumsq"]
    scale = math.sqrt(max(q_a, q_b, 0.0) * max(a.get(key + "_numel", 1.0), 1.0)) + 1e-12
    return math.isclose(q_a, q_b, rel_tol=1e-6, abs_tol=1e-12) and \
        abs(s_a - s_b) <= 1e-6 * scale


def weights_checksum(tensors: Sequence[Tensor]) -> tuple[float, float]:
    """``(sum, sum of squares)`` over the searched weights and biases (float64)."""
    s = q = 0.0
    for t in tensors:
        _, ts, tq = checksum(t)
        s, q = s + ts, q + tq
    return s, q

