"""Shared pieces of the benchmark scripts: CSV schema, environment, timing, memory, tables.

Not a test module and not part of the package; the scripts in ``bench/`` import it by path.

CSV schema (long format, one row per shape x provider x metric; see ``bench/README.md``)::

    kernel, provider, model, in_features, out_features, batch, subsets, dtype, granularity,
    input, metric, value, unit, samples, note,
    device, device_name, cpu_threads, torch_version, triton_version, date, run_id
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# The scripts run as ``python bench/<script>.py``: make the checkout importable even where the
# editable install resolves ``bingo``/``bingo_kernels`` as namespace packages outside the repo root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

COLUMNS = [
    "kernel", "provider", "model", "in_features", "out_features", "batch", "subsets", "dtype",
    "granularity", "input", "metric", "value", "unit", "samples", "note",
    "device", "device_name", "cpu_threads", "torch_version", "triton_version", "date", "run_id",
]
SHAPE_FIELDS = ["kernel", "model", "in_features", "out_features", "batch", "subsets", "dtype",
                "granularity", "input"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# --- environment --------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def triton_version() -> str:
    try:
        import triton  # noqa: PLC0415
        return str(triton.__version__)
    except Exception:  # noqa: BLE001  (absent or broken: both mean "no triton here")
        return "none"


def interpreted_backend_reason(backend: str, device: torch.device, allow: bool) -> Optional[str]:
    """Why not to time ``backend`` here: Triton on CPU tensors runs in its interpreter
    (TRITON_INTERPRET=1), a correctness tool thousands of times slower than a GPU. ``allow`` lets
    a tiny preset run it anyway, which checks the wiring (and its results) but times nothing
    meaningful. None when the backend should be timed."""
    if backend == "triton" and device.type == "cpu" and not allow:
        return ("Triton on CPU runs in its interpreter (TRITON_INTERPRET=1): a correctness tool, "
                "too slow to time beyond the ci preset; time it on a CUDA device")
    return None


def environment(device: torch.device) -> dict:
    """Per-run fields repeated on every CSV row."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({os.cpu_count()} logical cores)"
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "device": device.type,
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"),
    }


def run_header(env: dict) -> dict:
    """Per-run facts for the markdown report only (not CSV columns)."""
    return {"load_start": load_average(), "python": platform.python_version(),
            "platform": platform.platform()}


def start_run(args) -> tuple[torch.device, dict, dict]:
    """Device, environment record and header of a benchmark run, from its ``--device``/``--threads``."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    return device, env, run_header(env)


def run_parser(doc: str, presets, kernel: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes (``--preset``, ``--device``, ``--name``,
    ``--out-dir``, ``--append``, ``--threads``), described by the script's docstring ``doc``
    (its first paragraph; the rest as the epilog); scripts add their own options."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=doc.split("\n\n", 1)[1])
    ap.add_argument("--preset", choices=sorted(presets), default="ci")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", help=f"output base name (default {kernel}-<preset>-<date>)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--append", action="store_true",
                    help="append to an existing <name>.csv / .md")
    ap.add_argument("--threads", type=int)
    return ap


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_description(env: dict, header: dict) -> str:
    lines = [
        f"- device: {env['device']} — {env['device_name']}",
        f"- torch {env['torch_version']}, triton {env['triton_version']}, "
        f"python {header['python']}, torch threads {env['cpu_threads']}",
        f"- date (UTC): {env['date']}",
        f"- host: {header['platform']}; load average (1/5/15 min) at start: "
        f"{header['load_start']}, at end: {load_average()}",
    ]
    return "\n".join(lines)


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


# --- timing -------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times single calls: CUDA events on GPU (after flushing L2), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._flush = None
        if device.type == "cuda":
            # As triton.testing.do_bench: overwrite a buffer larger than L2 before each call.
            self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds one call of ``fn`` takes (its result is dropped)."""
        if self.device.type == "cuda":
            self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def reps_for(seconds_per_call: float, target_s: float, min_reps: int, max_reps: int) -> int:
    """Timed repetitions so that one provider spends about ``target_s`` (within the bounds)."""
    want = math.ceil(target_s / max(seconds_per_call, 1e-7))
    return int(min(max_reps, max(min_reps, want)))


def run_round_robin(fns: dict[str, Callable[[], object]], reps: dict[str, int],
                    timer: Timer) -> dict[str, list[float]]:
    """Time every provider ``reps[name]`` times, interleaved (provider A, B, C, A, B, C, ...).

    Interleaving spreads slow drifts of the machine (other processes, thermal state) over all
    providers instead of charging them to whichever ran during the disturbance.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(reps.values(), default=0)):
        for name, fn in fns.items():
            if r < reps[name]:
                samples[name].append(timer(fn))
    return samples


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile (as Liger-Kernel's y_values_50/20/80)."""
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]


# --- memory -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ logging) for the duration of the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def measure_call(fn: Callable[[], object], device: torch.device
                 ) -> tuple[object, Optional[float], str]:
    """Run ``fn`` once; return its result and the peak bytes it allocated beyond what existed.

    CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation at the start.
    CPU: torch's allocator events from ``torch.profiler(profile_memory=True)`` (tensor memory,
    which tracemalloc cannot see) plus tracemalloc's peak (numpy buffers, e.g. the CPU mask
    hash, which the torch profiler cannot see). The two peaks are added, so where a call uses
    both the figure is an upper bound. Where nothing works the peak is ``None`` and the method
    string says why. The call doubles as the warm-up.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return result, float(torch.cuda.max_memory_allocated(device) - base), \
            "torch.cuda.max_memory_allocated"
    import tracemalloc  # noqa: PLC0415
    try:
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with _quiet_stderr():  # kineto prints profiler_start/stop lines to fd 2
            prof.__enter__()
    except Exception as exc:  # noqa: BLE001  (private profiler API: degrade to "n/a")
        return fn(), None, f"n/a (torch profiler unavailable: {type(exc).__name__})"
    try:
        already = tracemalloc.is_tracing()
        if already:
            tracemalloc.reset_peak()
        else:
            tracemalloc.start()  # after the profiler's own set-up, which it would slow down
        base, _ = tracemalloc.get_traced_memory()
        try:
            result = fn()
            _, py_peak = tracemalloc.get_traced_memory()
            py_peak -= base
        finally:
            if not already:
                tracemalloc.stop()
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]"]
    except Exception as exc:  # noqa: BLE001
        return result, None, f"n/a (profiler memory events unavailable: {type(exc).__name__})"
    events.sort()
    current = torch_peak = 0
    for _t, nbytes in events:
        current += nbytes
        torch_peak = max(torch_peak, current)
    return result, float(torch_peak + py_peak), \
        "torch.profiler allocator peak + tracemalloc peak"


# --- output -------------------------------------------------------------------------------------

class ResultWriter:
    """Collects rows, writes the CSV and the markdown report."""

    def __init__(self, env: dict, out_dir: Path, name: str, append: bool = False):
        self.env = env
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out_dir / f"{name}.csv"
        self.md_path = self.out_dir / f"{name}.md"
        self.rows: list[dict] = []
        self.md: list[str] = []
        self.append = append

    def add(self, shape: dict, provider: str, metric: str, value, unit: str, samples="",
            note: str = "") -> None:
        row = {c: "" for c in COLUMNS}
        row.update(shape)
        row.update(self.env)
        if isinstance(value, float):
            value = f"{value:.6g}"
        note = " ".join(str(note).split())[:300]  # one line, bounded
        row.update(provider=provider, metric=metric, value="" if value is None else value,
                   unit=unit, samples=samples, note=note)
        self.rows.append(row)

    def write(self) -> None:
        new = not (self.append and self.csv_path.exists())
        with open(self.csv_path, "w" if new else "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(self.rows)
        text = "\n".join(self.md) + "\n"
        with open(self.md_path, "w" if new else "a") as f:
            f.write(text if new else "\n" + text)


def fmt(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, str):
        return v
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def markdown_table(header: list[str], rows: Iterable[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(c) for c in r) + " |")
    return "\n".join(out)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
