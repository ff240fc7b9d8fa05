"""Benchmark ``bingo_kernels.masked_reset_linear`` against naive and ceiling implementations.

For every shape (layer in x out, batch B, subsets K, dtype, granularity, shared or per-subset
input) all providers run on the same tensors. Before anything is timed, each provider's output is
compared with the reference (``naive_loop``, else the first provider that ran); a mismatch aborts
the run. Timings are interleaved across providers (round robin) after one warm-up call each.

Providers:
  naive_loop      SubsetMasks.materialize, then per subset k: torch.where(mask_k, W0, W), F.linear
  torch_backend   bingo_kernels.masked_reset_linear(..., backend="torch")
  <name>_backend  every accelerated backend (triton, cuda): timed where it can run on the device,
                  else a "skipped" row saying why (so the column is always there)
  vmap            materialize, blend all K weight sets, torch.func.vmap(F.linear)
  torch_compile   torch.compile of the torch-backend call (only with --compile)
  bmm_ceiling     torch.bmm on pre-materialised blended weights: only the matmul is timed
  mask_hash       SubsetMasks.materialize alone: the mask-generation share of the providers above

Usage::

    python bench/bench_masked_reset_linear.py --preset ci
    python bench/bench_masked_reset_linear.py --preset cpu --name cpu-$(date +%F)
    python bench/bench_masked_reset_linear.py --preset gpu --device cuda --compile
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (sets up sys.path for the checkout, imports torch)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bingo_kernels as bk  # noqa: E402
from bingo_kernels import SubsetMasks  # noqa: E402

KERNEL = "masked_reset_linear"
PROB = 0.05  # inclusion probability of a unit in a subset (TicketSearch's default fraction)
MASK_SEED = 1234

PRESETS = {
    # Tiny: a smoke run in seconds (the test suite runs it).
    "ci": dict(layers=[(32, 16)], subsets=[1, 5], batches=[8], dtypes=["fp32"],
               granularities=["neuron", "weight"], inputs=["shared", "per_subset"],
               target_s=0.01, min_reps=2, max_reps=5, max_call_s=None),
    # A few minutes on a 2-core CPU. Calls predicted to take longer than max_call_s are skipped
    # (logged, and written to the CSV as "skipped" rows).
    "cpu": dict(layers=[(784, 300), (1024, 1024)], subsets=[1, 16, 64, 256], batches=[64, 256],
                dtypes=["fp32"], granularities=["neuron", "weight"],
                inputs=["shared", "per_subset"], target_s=0.3, min_reps=3, max_reps=20,
                max_call_s=3.0),
    # The full grid for a GPU session (H200 class).
    "gpu": dict(layers=[(784, 300), (4096, 4096), (4096, 11008)], subsets=[1, 16, 64, 256, 512],
                batches=[64, 256], dtypes=["fp32", "bf16"], granularities=["neuron", "weight"],
                inputs=["shared", "per_subset"], target_s=0.3, min_reps=10, max_reps=200,
                max_call_s=30.0),
}

# Agreement with the reference, relative to the reference's largest magnitude (at least 1).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2,
             torch.float16: 5e-3}


NOT_SELECTED = "not selected (--providers)"


class MismatchError(AssertionError):
    """A provider computed something else than the reference: its timings would be worthless."""


@dataclass
class Shape:
    in_f: int
    out_f: int
    batch: int
    subsets: int
    dtype: torch.dtype
    granularity: str
    shared: bool

    @property
    def units(self) -> int:
        return self.out_f if self.granularity == "neuron" else self.out_f * self.in_f

    @property
    def flops(self) -> float:
        return 2.0 * self.subsets * self.batch * self.in_f * self.out_f

    def csv_fields(self) -> dict:
        return dict(kernel=KERNEL, model="", in_features=self.in_f, out_features=self.out_f,
                    batch=self.batch, subsets=self.subsets, dtype=bc.dtype_name(self.dtype),
                    granularity=self.granularity,
                    input="shared" if self.shared else "per_subset")

    def label(self) -> str:
        f = self.csv_fields()
        return (f"{self.in_f}x{self.out_f} B={self.batch} K={self.subsets} {f['dtype']} "
                f"{self.granularity} {f['input']}")


@dataclass
class Provider:
    fn: Callable[[], torch.Tensor]
    est_bytes: float = 0.0          # predicted peak extra memory (skip above --mem-cap-gb)
    est_seconds: float = 0.0        # predicted seconds per call (skip above --max-call-s)
    to_output: Callable[[torch.Tensor], torch.Tensor] = lambda y: y  # for the check, untimed
    check: bool = True              # whether its output is comparable with the reference
    counts_flops: bool = True       # whether GFLOP/s makes sense
    skip_reason: Optional[str] = None
    note: str = ""


@dataclass
class Calibration:
    """Rough per-machine rates, measured once, used only to predict (and skip) slow calls."""

    hash_s_per_elem: float
    gemm_flops: dict = field(default_factory=dict)
    bytes_per_s: float = 1e9


def calibrate(device: torch.device, dtypes) -> Calibration:
    timer = bc.Timer(device)
    masks = SubsetMasks(1, 0, 0, 8, 0, PROB, "weight")
    n = 1 << 17
    masks.materialize(n, device)
    hash_s = min(timer(lambda: masks.materialize(n, device)) for _ in range(2)) / (8 * n)
    cal = Calibration(hash_s_per_elem=hash_s)
    for dt in dtypes:
        a = torch.randn(256, 1024, device=device).to(dt)
        b = torch.randn(1024, 1024, device=device).to(dt)
        a @ b
        t = min(timer(lambda: a @ b) for _ in range(3))
        cal.gemm_flops[dt] = 2 * 256 * 1024 * 1024 / max(t, 1e-9)
    m = torch.rand(1 << 22, device=device) < 0.5
    u, v = torch.randn(1 << 22, device=device), torch.randn(1 << 22, device=device)
    torch.where(m, u, v)
    t = min(timer(lambda: torch.where(m, u, v)) for _ in range(3))
    cal.bytes_per_s = (1 << 22) * 13 / max(t, 1e-9)
    return cal


# --- inputs and providers -----------------------------------------------------------------------

class MaskCache:
    """Materialised masks of the last (layer, K, granularity): shared by the shapes that differ
    only in batch, input kind or dtype, so setting up the ceiling does not rehash every time."""

    def __init__(self):
        self.key = None
        self.value = None
        self.hash_timings: dict = {}  # mask_hash results, measured once per (layer, K, gran)

    @staticmethod
    def hash_key(shape: "Shape", device) -> tuple:
        return (shape.in_f, shape.out_f, shape.subsets, shape.granularity, str(device))

    def get(self, masks: SubsetMasks, shape: Shape, device) -> torch.Tensor:
        key = self.hash_key(shape, device)
        if key != self.key:
            self.key, self.value = None, None
            self.value = masks.materialize(shape.units, device)
            self.key = key
        return self.value


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    dt, K, B = shape.dtype, shape.subsets, shape.batch

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=device) * scale).to(dt)

    x_shape = (B, shape.in_f) if shape.shared else (K, B, shape.in_f)
    w_scale = shape.in_f ** -0.5
    return dict(
        x=randn(*x_shape),
        weight=randn(shape.out_f, shape.in_f, scale=w_scale),
        init_weight=randn(shape.out_f, shape.in_f, scale=w_scale),
        bias=randn(shape.out_f, scale=0.1),
        init_bias=randn(shape.out_f, scale=0.1),
        masks=SubsetMasks(MASK_SEED, 0, 0, K, 0, PROB, shape.granularity),
    )


def naive_masked_reset_linear(x, w, w0, b, b0, masks: SubsetMasks) -> torch.Tensor:
    """The obvious implementation: materialise the masks, then per subset blend and F.linear."""
    fout, fin = w.shape
    neuron = masks.granularity == "neuron"
    m = masks.materialize(fout if neuron else fout * fin, x.device)
    outs = []
    for k in range(masks.num_subsets):
        if neuron:
            wk, bk_ = torch.where(m[k][:, None], w0, w), torch.where(m[k], b0, b)
        else:
            wk, bk_ = torch.where(m[k].view(fout, fin), w0, w), b
        outs.append(F.linear(x if x.dim() == 2 else x[k], wk, bk_))
    return torch.stack(outs)


def blend(m: torch.Tensor, shape: Shape, w, w0, b, b0):
    """Blended weights and biases of all K subsets from materialised (K, units) masks."""
    K = m.shape[0]
    if shape.granularity == "neuron":
        return torch.where(m[:, :, None], w0, w), torch.where(m, b0, b)
    return torch.where(m.view(K, shape.out_f, shape.in_f), w0, w), b


def build_providers(shape: Shape, inp: dict, device: torch.device, args, cal: Calibration,
                    mask_cache: MaskCache) -> dict[str, Provider]:
    x, w, w0, b, b0, masks = (inp[k] for k in ("x", "weight", "init_weight", "bias",
                                               "init_bias", "masks"))
    K, B, fin, fout = shape.subsets, shape.batch, shape.in_f, shape.out_f
    es = torch.tensor([], dtype=shape.dtype).element_size()
    neuron = shape.granularity == "neuron"
    wbytes = fin * fout * es
    out_bytes = K * B * fout * es
    mask_bytes = K * shape.units
    hash_tmp = min(K * shape.units, 1 << 22) * 8 * 4  # int64 blocks of the reference hash

    gemm = cal.gemm_flops.get(shape.dtype, 1e10)
    t_hash = K * shape.units * cal.hash_s_per_elem
    t_mm = shape.flops / gemm
    t_blend = K * fin * fout * (2 * es + 1 + es) / cal.bytes_per_s
    t_overhead = 30e-6 * K

    def naive_loop():
        return naive_masked_reset_linear(x, w, w0, b, b0, masks)

    def backend_call(name):
        return lambda: bk.masked_reset_linear(x, w, w0, b, b0, masks, backend=name)

    def vmap():
        m = masks.materialize(shape.units, device)
        wb, bb = blend(m, shape, w, w0, b, b0)
        in_dims = (None if shape.shared else 0, 0, 0 if neuron else None)
        return torch.func.vmap(F.linear, in_dims=in_dims)(x, wb, bb)

    if neuron:
        t_torch = (K * fout * cal.hash_s_per_elem
                   + 2 * 2 * B * fin * fout * (1 if shape.shared else K) / gemm
                   + 3 * out_bytes / cal.bytes_per_s)
        torch_bytes = mask_bytes + 3 * out_bytes + 2 * B * fout * es * (1 if shape.shared else K)
    else:
        t_torch = t_hash + t_blend + t_mm
        chunk = max(1, min(K, (1 << 24) // max(1, fin * fout)))
        torch_bytes = chunk * (wbytes + fin * fout) + hash_tmp + out_bytes * 2

    providers: dict[str, Provider] = {}
    providers["naive_loop"] = Provider(
        naive_loop, est_bytes=mask_bytes + hash_tmp + 2 * wbytes + 2 * out_bytes,
        est_seconds=t_hash + t_blend + t_mm + t_overhead)
    providers["torch_backend"] = Provider(backend_call("torch"), est_bytes=torch_bytes,
                                          est_seconds=t_torch)
    for name in bk.backends.AUTO_PREFERENCE:  # the accelerated backends, available or not
        p = Provider(backend_call(name), est_bytes=0.0, est_seconds=0.0)
        try:
            bk.resolve_backend(name, device)
            p.skip_reason = bc.interpreted_backend_reason(name, device, args.preset == "ci")
        except bk.BackendUnavailableError as exc:
            p.skip_reason = f"backend unavailable on {device.type}: {exc}"
        providers[f"{name}_backend"] = p
    providers["vmap"] = Provider(
        vmap, est_bytes=mask_bytes + hash_tmp + K * wbytes + 3 * out_bytes,
        est_seconds=t_hash + t_blend + t_mm)
    if args.compile:
        providers["torch_compile"] = Provider(
            _compiled(x, w, w0, b, b0, masks, args.inductor_options), est_bytes=torch_bytes, est_seconds=t_torch,
            note="first call (compile) excluded; see metric compile_time")

    # The ceiling: bmm on pre-materialised blended weights (setup untimed, but it must fit).
    ceiling = Provider(lambda: None, counts_flops=True,
                       est_bytes=K * wbytes + K * B * fin * es + out_bytes + mask_bytes,
                       est_seconds=t_mm, note="matmul only; weights blended before timing")
    providers["bmm_ceiling"] = ceiling
    providers["mask_hash"] = Provider(
        lambda: masks.materialize(shape.units, device), check=False, counts_flops=False,
        est_bytes=mask_bytes + hash_tmp, est_seconds=t_hash,
        note="SubsetMasks.materialize only (included in naive_loop, vmap and torch_backend)")

    selected = set(args.providers) if args.providers else None
    for name, p in providers.items():
        if selected is not None and name not in selected:
            p.skip_reason = NOT_SELECTED
        elif p.skip_reason is None and p.est_bytes > args.mem_cap_bytes:
            p.skip_reason = (f"estimated {p.est_bytes / 2**30:.2f} GiB exceeds the memory cap "
                             f"{args.mem_cap_bytes / 2**30:.2f} GiB")
        elif (p.skip_reason is None and args.max_call_s is not None
              and p.est_seconds > args.max_call_s):
            p.skip_reason = (f"estimated {p.est_seconds:.1f} s per call exceeds --max-call-s "
                             f"{args.max_call_s:g}")

    if ceiling.skip_reason is None:
        if args.max_call_s is not None and t_hash > args.max_call_s:
            # Only the matmul is timed, so any masks of the right density do; hashing these
            # would take longer than the providers this shape skips for the same reason.
            g = torch.Generator(device=device).manual_seed(0)
            m = torch.rand(K, shape.units, generator=g, device=device) < PROB
            ceiling.check = False
            ceiling.note += ("; random masks of the same density (hashing would exceed "
                             "--max-call-s), output not checked")
        else:
            m = mask_cache.get(masks, shape, device)
        wb, bb = blend(m, shape, w, w0, b, b0)
        wt = wb.transpose(1, 2)  # (K, in, out) view; BLAS takes the transposed layout as is
        xk = x.expand(K, B, fin).contiguous() if shape.shared else x
        ceiling.fn = lambda: torch.bmm(xk, wt)
        ceiling.to_output = lambda y: y + (bb[:, None, :] if neuron else bb)
    return providers


def _compiled(x, w, w0, b, b0, masks, options: Optional[dict] = None):
    torch._dynamo.reset()  # a fresh cache per shape: no silent fallback after recompile limits

    def fn(x, w, w0, b, b0):
        return bk.masked_reset_linear(x, w, w0, b, b0, masks, backend="torch")

    # Compilation traces the reference's mask hash, a long chain of integer ops that each read
    # their input several times; inductor can take minutes on it (hence --compile-timeout).
    # --inductor-option realize_reads_threshold=1 helped the int64 torch hash path in one test
    # and hurt the numpy CPU path in another, so nothing is set by default.
    compiled = torch.compile(fn, dynamic=False, options=options or None)
    return lambda: compiled(x, w, w0, b, b0)


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise CompileTimeout after ``seconds`` (main thread on Unix only; else no limit)."""
    usable = (seconds and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(_signum, _frame):
        raise CompileTimeout(f"torch.compile did not finish within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- one shape ----------------------------------------------------------------------------------

def check_output(name: str, out: torch.Tensor, ref: torch.Tensor, ref_name: str,
                 shape: Shape) -> float:
    if tuple(out.shape) != tuple(ref.shape):
        raise MismatchError(f"{shape.label()}: {name} returned shape {tuple(out.shape)}, "
                            f"{ref_name} {tuple(ref.shape)}")
    err = float((out.float() - ref.float()).abs().max()) if out.numel() else 0.0
    scale = max(1.0, float(ref.float().abs().max()) if ref.numel() else 0.0)
    if not math.isfinite(err) or err > TOLERANCE[shape.dtype] * scale:
        raise MismatchError(
            f"{shape.label()}: {name} disagrees with {ref_name}: max |diff| {err:.3g} > "
            f"{TOLERANCE[shape.dtype]:g} x {scale:.3g}. Not timing wrong code.")
    return err


def bench_shape(shape: Shape, device: torch.device, args, cal: Calibration,
                writer: bc.ResultWriter, mask_cache: MaskCache) -> dict:
    inp = make_inputs(shape, device)
    providers = build_providers(shape, inp, device, args, cal, mask_cache)
    fields = shape.csv_fields()
    timer = bc.Timer(device)
    results: dict[str, dict] = {}

    # 1. Warm-up call of every provider: memory, and agreement with the reference.
    ref, ref_name = None, None
    for name, p in providers.items():
        if p.skip_reason == NOT_SELECTED:
            continue
        if p.skip_reason:
            bc.log(f"  skip {name}: {p.skip_reason}")
            writer.add(fields, name, "skipped", None, "", note=p.skip_reason)
            continue
        res = dict(err=None)
        hkey = MaskCache.hash_key(shape, device)
        if name == "mask_hash" and hkey in mask_cache.hash_timings:
            results[name] = dict(mask_cache.hash_timings[hkey], reused=True)
            p.note += "; timed at the first shape with this layer, K and granularity"
            continue
        # Plain warm-up call (compiles torch_compile, within --compile-timeout), then a second
        # call under the memory probes whose output is checked.
        try:
            with time_limit(args.compile_timeout if name == "torch_compile" else None):
                res["warmup_s"] = timer(p.fn)
        except Exception as exc:  # noqa: BLE001
            if name != "torch_compile":
                raise
            # Inductor wraps exceptions raised inside it (our timeout included): unwrap them.
            cause = exc
            while cause is not None and not isinstance(cause, CompileTimeout):
                cause = cause.__cause__ or cause.__context__
            torch._dynamo.reset()
            p.skip_reason = (str(cause).splitlines()[0] if cause is not None else
                             f"torch.compile failed: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}")
            bc.log(f"  skip {name}: {p.skip_reason}")
            writer.add(fields, name, "skipped", None, "", note=p.skip_reason)
            continue
        if name == "torch_compile":
            res["compile_s"] = res["warmup_s"]
        out, peak, mem_note = bc.measure_call(p.fn, device)
        res.update(peak=peak, mem_note=mem_note)
        if p.check:
            out = p.to_output(out)
            if ref is None:
                ref, ref_name = out, name
            else:
                res["err"] = check_output(name, out, ref, ref_name, shape)
            res["ref"] = ref_name
        del out
        results[name] = res
    del ref

    # 2. Timed calls, interleaved across providers.
    fns = {n: providers[n].fn for n, r in results.items() if not r.get("reused")}
    reps = {}
    for n in fns:
        est = results[n]["warmup_s"]
        if n == "torch_compile" or est < 0.05:  # first call of a cheap op: mostly overhead
            est = timer(fns[n])
        reps[n] = bc.reps_for(est, args.target_s, args.min_reps, args.max_reps)
    samples = bc.run_round_robin(fns, reps, timer)

    for n, s in samples.items():
        med, p20, p80 = bc.quantiles(s)
        results[n].update(median=med, p20=p20, p80=p80, samples=len(s))
    if "mask_hash" in samples:
        mask_cache.hash_timings[MaskCache.hash_key(shape, device)] = {
            k: v for k, v in results["mask_hash"].items() if k != "share_of_torch"}

    # 3. Rows.
    naive = results.get("naive_loop", {}).get("median")
    ceiling = results.get("bmm_ceiling", {}).get("median")
    for n, r in results.items():
        p = providers[n]
        ns = r["samples"]
        writer.add(fields, n, "time", r["median"] * 1e3, "ms", ns, p.note)
        writer.add(fields, n, "time_p20", r["p20"] * 1e3, "ms", ns)
        writer.add(fields, n, "time_p80", r["p80"] * 1e3, "ms", ns)
        if p.counts_flops:
            r["gflops"] = shape.flops / r["median"] / 1e9
            writer.add(fields, n, "gflops", r["gflops"], "GFLOP/s", ns,
                       "nominal 2*K*B*in*out FLOPs")
        if naive is not None and p.counts_flops:
            r["speedup"] = naive / r["median"]
            writer.add(fields, n, "speedup_vs_naive_loop", r["speedup"], "x", ns)
        if ceiling is not None and p.counts_flops:
            r["pct_ceiling"] = 100.0 * ceiling / r["median"]
            writer.add(fields, n, "pct_of_bmm_ceiling", r["pct_ceiling"], "%", ns)
        if not p.counts_flops and "torch_backend" in results:
            r["share_of_torch"] = 100.0 * r["median"] / results["torch_backend"]["median"]
            writer.add(fields, n, "pct_of_torch_backend_time", r["share_of_torch"], "%", ns)
        writer.add(fields, n, "peak_memory", None if r["peak"] is None else r["peak"] / 2**20,
                   "MiB", 1, r["mem_note"])
        if r["err"] is not None:
            writer.add(fields, n, "max_abs_diff_vs_ref", r["err"], "abs", 1,
                       f"reference {r['ref']}; tolerance {TOLERANCE[shape.dtype]:g} x max(1,|ref|)")
        if "compile_s" in r:
            writer.add(fields, n, "compile_time", r["compile_s"], "s", 1,
                       "first call, including compilation")
    return dict(shape=shape, results=results,
                skipped={n: p.skip_reason for n, p in providers.items() if p.skip_reason})


def shape_markdown(summary: dict) -> str:
    shape, results, skipped = summary["shape"], summary["results"], summary["skipped"]
    rows = []
    for n, r in results.items():
        rows.append([n, r["median"] * 1e3, r.get("gflops"), r.get("speedup"),
                     r.get("pct_ceiling"), None if r["peak"] is None else r["peak"] / 2**20,
                     r["samples"],
                     "" if r["err"] is None else f"{r['err']:.1e}"])
    for n, why in skipped.items():
        if why != NOT_SELECTED:
            rows.append([n, "skipped", "", "", "", "", "", why])
    table = bc.markdown_table(
        ["provider", "median ms", "GFLOP/s", "x vs naive_loop", "% of bmm_ceiling",
         "peak MiB", "n", "max diff vs ref / note"], rows)
    return f"### {shape.label()}\n\n{table}\n"


def summary_markdown(summaries: list[dict], providers: list[str]) -> str:
    cols = [p for p in providers if p not in ("naive_loop", "mask_hash")]
    header = (["layer", "gran", "input", "B", "K", "naive_loop ms"]
              + [f"{p} x" for p in cols] + ["torch % of ceiling", "hash % of torch"])
    rows = []
    for s in summaries:
        sh, r = s["shape"], s["results"]
        row = [f"{sh.in_f}x{sh.out_f}", sh.granularity, "shared" if sh.shared else "per-subset",
               sh.batch, sh.subsets,
               r["naive_loop"]["median"] * 1e3 if "naive_loop" in r else "skipped"]
        for p in cols:
            row.append(r[p].get("speedup") if p in r else ("skipped" if p in s["skipped"] else ""))
        row.append(r.get("torch_backend", {}).get("pct_ceiling"))
        row.append(r.get("mask_hash", {}).get("share_of_torch"))
        rows.append(row)
    return bc.markdown_table(header, rows)


# --- driver -------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--name", help="output base name (default <preset>-<date>)")
    ap.add_argument("--out-dir", default=str(bc.RESULTS_DIR))
    ap.add_argument("--append", action="store_true",
                    help="append rows to an existing <name>.csv / .md instead of replacing them")
    ap.add_argument("--compile", action="store_true",
                    help="add the torch_compile provider (slow to compile on CPU)")
    ap.add_argument("--compile-timeout", type=float, default=300.0,
                    help="skip torch_compile for a shape whose compilation takes longer (s)")
    ap.add_argument("--inductor-option", action="append", default=[], metavar="KEY=VALUE",
                    help="inductor config option for torch_compile (repeatable; int/float/bool "
                         "values are parsed)")
    ap.add_argument("--providers", nargs="+", help="only these providers")
    ap.add_argument("--layers", nargs="+", help="override: layers as INxOUT, e.g. 784x300")
    ap.add_argument("--subsets", nargs="+", type=int, help="override K values")
    ap.add_argument("--batches", nargs="+", type=int, help="override B values")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(bc.DTYPES), help="override dtypes")
    ap.add_argument("--granularities", nargs="+", choices=["neuron", "weight"])
    ap.add_argument("--inputs", nargs="+", choices=["shared", "per_subset"])
    ap.add_argument("--mem-cap-gb", type=float,
                    help="skip providers predicted to need more (default: half the free memory)")
    ap.add_argument("--max-call-s", type=float,
                    help="skip providers predicted to take longer per call (preset default; "
                         "0 disables)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    args.inductor_options = {}
    for item in args.inductor_option:
        key, _, value = item.partition("=")
        for parse in (int, float, {"true": True, "false": False}.__getitem__):
            try:
                value = parse(value.lower() if parse not in (int, float) else value)
                break
            except (ValueError, KeyError):
                continue
        args.inductor_options[key] = value
    preset = PRESETS[args.preset]
    args.layers = ([tuple(int(v) for v in s.lower().split("x")) for s in args.layers]
                   if args.layers else preset["layers"])
    for key in ("subsets", "batches", "dtypes", "granularities", "inputs"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    for key in ("target_s", "min_reps", "max_reps"):
        setattr(args, key, preset[key])
    if args.max_call_s is None:
        args.max_call_s = preset["max_call_s"]
    elif args.max_call_s <= 0:
        args.max_call_s = None
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    device, env, header = bc.start_run(args)
    args.mem_cap_bytes = (args.mem_cap_gb * 2**30 if args.mem_cap_gb
                          else 0.5 * bc.available_memory_bytes(device))
    name = args.name or f"{args.preset}-{env['date'][:10]}"
    writer = bc.ResultWriter(env, Path(args.out_dir), name, append=args.append)
    dtypes = [bc.DTYPES[d] for d in args.dtypes]
    started = time.perf_counter()
    cal = calibrate(device, dtypes)
    bc.log(f"{KERNEL}: preset {args.preset} on {env['device_name']}; torch {env['torch_version']}"
           f"; hash {cal.hash_s_per_elem * 1e9:.0f} ns/element, fp32 matmul "
           f"{cal.gemm_flops.get(torch.float32, float('nan')) / 1e9:.0f} GFLOP/s")

    shapes = [Shape(fin, fout, B, K, dt, gran, inp == "shared")
              for (fin, fout) in args.layers for dt in dtypes for gran in args.granularities
              for K in args.subsets for B in args.batches for inp in args.inputs]
    mask_cache = MaskCache()
    summaries, sections = [], []
    for i, shape in enumerate(shapes):
        t0 = time.perf_counter()
        bc.log(f"[{i + 1}/{len(shapes)}] {shape.label()}")
        s = bench_shape(shape, device, args, cal, writer, mask_cache)
        summaries.append(s)
        md = shape_markdown(s)
        sections.append(md)
        print(md, flush=True)
        bc.log(f"  ({time.perf_counter() - t0:.1f} s)")
    elapsed = time.perf_counter() - started

    provider_order = []
    for s in summaries:
        for n in list(s["results"]) + list(s["skipped"]):
            if n not in provider_order and s["skipped"].get(n) != NOT_SELECTED:
                provider_order.append(n)
    summary = summary_markdown(summaries, provider_order)
    writer.md += [
        f"# {KERNEL} — preset `{args.preset}`",
        "",
        bc.machine_description(env, header),
        f"- command: `python bench/bench_masked_reset_linear.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- runtime: {elapsed:.0f} s for {len(shapes)} shapes",
        f"- calibration: mask hash {cal.hash_s_per_elem * 1e9:.0f} ns/element; "
        + ", ".join(f"{bc.dtype_name(d)} matmul {v / 1e9:.0f} GFLOP/s"
                    for d, v in cal.gemm_flops.items()),
        f"- mask inclusion probability {PROB}; reset to init weights; layers have a bias",
        "",
        "Ratios: `x` = naive_loop time / provider time (higher is faster); `% of ceiling` = "
        "bmm_ceiling time / provider time; `hash %` = mask_hash time / torch_backend time. "
        + ("CPU timings are only meaningful as ratios within this run." if device.type == "cpu"
           else ""),
        "",
        "## Summary (speedup vs naive_loop)",
        "",
        summary,
        "",
        "## Per shape",
        "",
        *sections,
    ]
    writer.write()
    print(summary)
    bc.log(f"wrote {writer.csv_path} and {writer.md_path} ({elapsed:.0f} s)")
    return writer.csv_path


if __name__ == "__main__":
    main()
