"""Benchmark ``bingo_kernels.subset_metrics``: per-subset cross-entropy and accuracy of logits.

Providers (all on the same logits; each is checked against ``naive_loop`` before timing):
  naive_loop      for each subset k: F.cross_entropy and argmax accuracy
  torch_backend   bingo_kernels.subset_metrics(..., backend="torch")
  <name>_backend  every accelerated backend (triton, cuda): timed where it can run on the device,
                  else a "skipped" row saying why

Usage::

    python bench/bench_subset_metrics.py --preset ci
    python bench/bench_subset_metrics.py --preset gpu --device cuda --name h200-metrics-$(date +%F)

The op is memory-bound (it reads K x B x C logits once); the CSV has the effective bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (sets up sys.path for the checkout, imports torch)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bingo_kernels as bk  # noqa: E402

KERNEL = "subset_metrics"
PRESETS = {
    "ci": dict(classes=[10], subsets=[1, 4], batches=[16], dtypes=["fp32"], min_reps=2,
               max_reps=5, target_s=0.01),
    # The classifier heads of the demo and image models, and a GPT-2-sized vocabulary.
    "gpu": dict(classes=[10, 1000, 50257], subsets=[16, 64, 256], batches=[256, 1024],
                dtypes=["fp32", "bf16"], min_reps=10, max_reps=200, target_s=0.3),
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-3, torch.float16: 1e-3}
MEM_CAP = 16 * 2**30  # logits larger than this are skipped


def naive(logits, targets):
    losses, accs = [], []
    for k in range(logits.shape[0]):
        lk = logits[k].float()
        losses.append(F.cross_entropy(lk, targets))
        accs.append((lk.argmax(-1) == targets).float().mean())
    return torch.stack(losses), torch.stack(accs)


def bench_shape(K, B, C, dtype, device, args, writer) -> list:
    fields = dict(kernel=KERNEL, model="", in_features="", out_features=C, batch=B, subsets=K,
                  dtype=bc.dtype_name(dtype), granularity="", input="")
    nbytes = K * B * C * torch.finfo(dtype).bits // 8
    if nbytes > MEM_CAP:
        writer.add(fields, "all", "skipped", None, "", note=f"logits of {nbytes / 2**30:.1f} GiB")
        return [], []
    g = torch.Generator().manual_seed(K * 7919 + B * 31 + C)
    logits = torch.randn(K, B, C, generator=g).to(device, dtype)
    targets = torch.randint(0, C, (B,), generator=g).to(device)
    fns = {"naive_loop": lambda: naive(logits, targets),
           "torch_backend": lambda: bk.subset_metrics(logits, targets, backend="torch")}
    for name in bk.backends.AUTO_PREFERENCE:  # the accelerated backends, available or not
        try:
            bk.resolve_backend(name, device)
            why = bc.interpreted_backend_reason(name, device, args.preset == "ci")
        except bk.BackendUnavailableError as exc:
            why = f"backend unavailable on {device.type}: {exc}"
        if why is None:
            fns[f"{name}_backend"] = (lambda n=name: bk.subset_metrics(logits, targets, backend=n))
        else:
            writer.add(fields, f"{name}_backend", "skipped", None, "", note=why)
    ref_loss, ref_acc = fns["naive_loop"]()
    timer = bc.Timer(device)
    warm = {}
    for name, fn in fns.items():
        warm[name] = timer(fn)
        loss, acc = fn()
        err = float((loss.float() - ref_loss).abs().max())
        if err > TOLERANCE[dtype] * max(1.0, float(ref_loss.abs().max())) or \
                float((acc - ref_acc).abs().max()) > 1.5 / B:
            raise AssertionError(f"{name} disagrees with naive_loop on K={K} B={B} C={C}: "
                                 f"loss error {err:.3g}")
        if name != "naive_loop":
            writer.add(fields, name, "max_abs_diff_vs_ref", err, "abs", 1, "loss vs naive_loop")
    reps = {n: bc.reps_for(w, args.target_s, args.min_reps, args.max_reps)
            for n, w in warm.items()}
    samples = bc.run_round_robin(fns, reps, timer)
    row = [K, B, C, bc.dtype_name(dtype)]
    for name, s in samples.items():
        med, p20, p80 = bc.quantiles(s)
        writer.add(fields, name, "time", med * 1e3, "ms", len(s))
        writer.add(fields, name, "bandwidth", nbytes / med / 1e9, "GB/s", len(s),
                   "logits bytes / median time")
        row += [med * 1e3]
    return list(samples), row


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name")
    ap.add_argument("--out-dir", default=str(bc.RESULTS_DIR))
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        setattr(args, key, value)
    device, env, header = bc.start_run(args)
    name = args.name or f"metrics-{args.preset}-{env['date'][:10]}"
    writer = bc.ResultWriter(env, Path(args.out_dir), name)
    started = time.perf_counter()
    rows, providers = [], None
    for d in args.dtypes:
        for C in args.classes:
            for B in args.batches:
                for K in args.subsets:
                    bc.log(f"{KERNEL} K={K} B={B} C={C} {d}")
                    names, row = bench_shape(K, B, C, bc.DTYPES[d], device, args, writer)
                    if row:
                        rows.append(row)
                        providers = providers or names  # the same providers for every shape
    table = bc.markdown_table(["K", "B", "C", "dtype"] + [f"{p} ms" for p in providers or []],
                              rows)
    writer.md += [f"# {KERNEL} — preset `{args.preset}`", "", bc.machine_description(env, header),
                  f"- runtime: {time.perf_counter() - started:.0f} s", "", table]
    writer.write()
    print(table)
    bc.log(f"wrote {writer.csv_path} and {writer.md_path}")
    return writer.csv_path


if __name__ == "__main__":
    main()
