"""Plot benchmark CSVs: median time vs K, one line per provider.

One PNG per (kernel, device, layer or model, dtype, granularity); inside it one panel per
(input kind, batch). Skipped providers simply have no point at that K. When a CSV holds several
runs on the same device, the latest run is plotted (``--all-runs`` plots each run separately).

Usage::

    python bench/plot.py                          # every CSV in bench/results/
    python bench/plot.py bench/results/cpu-2026-11-26.csv --out-dir /tmp/plots
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from bingo.plots import panel_styles, plain_log_axis  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROVIDERS = ("naive_loop", "torch_backend", "vmap", "torch_compile", "bmm_ceiling", "mask_hash",
             "triton_backend", "cuda_backend", "ticket_search", "ticket_search_vmap")
"""Known providers, in legend order; within a figure each gets its own colour and line style."""
COLUMNS = 2
"""Panels per row."""


def read_rows(paths) -> list[dict]:
    """The timing rows of the benchmark CSVs; other CSVs (kernel_resources.py's tables) are
    skipped with a note."""
    rows = []
    for p in paths:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            if "metric" not in (reader.fieldnames or ()):
                print(f"skipped {p}: not a timing table", file=sys.stderr)
                continue
            rows += list(reader)
    return rows


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")[:60]


def plot(rows: list[dict], out_dir: Path, all_runs: bool = False) -> list[Path]:
    rows = [r for r in rows if r["metric"] == "time" and r["value"] != ""]
    if not all_runs:  # keep the latest run per (kernel, device)
        latest = {}
        for r in rows:
            key = (r["kernel"], r["device_name"])
            latest[key] = max(latest.get(key, ""), r["run_id"])
        rows = [r for r in rows if r["run_id"] == latest[(r["kernel"], r["device_name"])]]

    figures = defaultdict(list)
    for r in rows:
        what = r["model"] or f"{r['in_features']}x{r['out_features']}"
        key = (r["kernel"], r["device"], r["device_name"], what, r["dtype"], r["granularity"],
               r["run_id"] if all_runs else "")
        figures[key].append(r)

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (kernel, device, device_name, what, dtype, gran, run), rs in sorted(figures.items()):
        panels = sorted({(r["input"], int(r["batch"])) for r in rs},
                        key=lambda p: (p[0] != "shared", p[1]))
        providers = sorted({r["provider"] for r in rs},
                           key=lambda p: PROVIDERS.index(p) if p in PROVIDERS else len(PROVIDERS))
        styles = panel_styles(providers)
        columns = min(COLUMNS, len(panels))
        rows_ = -(-len(panels) // columns)
        fig, axes = plt.subplots(rows_, columns, figsize=(5.6 * columns, 4.2 * rows_),
                                 squeeze=False, sharey=True)
        for ax in axes.ravel()[len(panels):]:
            ax.set_visible(False)
        for ax, (inp, batch) in zip(axes.ravel(), panels):
            series = defaultdict(list)
            for r in rs:
                if r["input"] == inp and int(r["batch"]) == batch:
                    series[r["provider"]].append((int(r["subsets"]), float(r["value"])))
            for provider in providers:
                pts = sorted(series.get(provider, []))
                if pts:
                    ax.plot([k for k, _ in pts], [v for _, v in pts], label=provider,
                            **styles[provider])
            ax.set_xscale("log", base=2)
            ks = sorted({k for pts in series.values() for k, _ in pts})
            ax.set_xticks(ks)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yscale("log")
            plain_log_axis(ax.yaxis)
            ax.set_xlabel("subsets K")
            ax.set_title(f"{inp} input, batch {batch}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        unit = rs[0]["unit"]
        for row in axes:
            row[0].set_ylabel(f"median time ({unit})")
        fig.suptitle(f"{kernel} {what} {dtype} {gran}\n{device_name}"
                     f" (torch {rs[0]['torch_version']}, {rs[0]['date'][:10]})", fontsize=10)
        fig.tight_layout()
        name = "_".join(slug(s) for s in (kernel, device, what, dtype, gran, run) if s) + ".png"
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="*", help="CSV files (default: bench/results/*.csv)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--all-runs", action="store_true")
    args = ap.parse_args(argv)
    paths = args.csv or sorted(RESULTS_DIR.glob("*.csv"))
    if not paths:
        raise SystemExit(f"no CSV files given and none in {RESULTS_DIR}")
    written = plot(read_rows(paths), Path(args.out_dir), args.all_runs)
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
