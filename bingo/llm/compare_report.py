"""The report of ``bingo llm bench``: per-seed records summarised as mean ± std over seeds, the
markdown tables and the plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

BINGO_METHODS = ("ticket-search", "targeted", "targeted+prior")
"""bingo's methods; the rest are the field's."""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _configurations(seeds: list[dict]) -> list[tuple[str, str]]:
    seen = []
    for row in seeds[0]["rows"]:
        key = (row["method"], row["reconstruct"])
        if key not in seen:
            seen.append(key)
    return seen


def aggregate(seeds: list[dict], fractions: Sequence[float], ceilings: Sequence[float]) -> dict:
    """Mean ± std over seeds of every (method, reconstruction): test perplexity and removed
    fraction at each fraction, the largest fraction under each ceiling; each method's cost; the
    batched vs one-at-a-time speed-up; the shrunk model."""
    summary = dict(dense={k: mean_std([s["dense"][k] for s in seeds])
                          for k in ("val_ppl", "test_ppl")}, configurations=[])
    for method, label in _configurations(seeds):
        entry = dict(method=method, reconstruct=label, fractions={}, ceilings={})
        for f in fractions:
            rows = [r for s in seeds for r in s["rows"]
                    if (r["method"], r["reconstruct"], r["fraction"]) == (method, label, f)]
            entry["fractions"][f"{f:g}"] = dict(test_ppl=mean_std([r["test_ppl"] for r in rows]),
                                                removed=mean_std([r["removed"] for r in rows]))
        for c in ceilings:
            entry["ceilings"][f"{c:g}"] = mean_std(
                [s["ceilings"][f"{method}/{label}"]["largest"][f"{c:g}"] for s in seeds])
        summary["configurations"].append(entry)
    summary["costs"] = {}
    for name in seeds[0]["costs"]:
        cost = {}
        for key in ("seconds", "peak_mib", "evaluations", "tokens"):
            values = [s["costs"][name][key] for s in seeds if s["costs"][name][key] is not None]
            cost[key] = mean_std(values) if values else None
        cost["during_training"] = bool(seeds[0]["costs"][name].get("during_training"))
        summary["costs"][name] = cost
    summary["batched_vs_sequential"] = {
        k: mean_std([s["batched_vs_sequential"][k] for s in seeds])
        for k in ("speedup", "sequential_per_second", "batched_per_second",
                  "max_abs_difference")}
    summary["shrunk"] = {k: mean_std([s["shrunk"][k] for s in seeds])
                         for k in ("fraction", "parameters", "dense_parameters", "speedup",
                                   "dense_tokens_per_second", "shrunk_tokens_per_second",
                                   "test_ppl", "reload_max_abs_difference")}
    summary["training"] = {k: mean_std([s["training"][k] for s in seeds])
                           for k in ("train_seconds", "search_seconds", "final_train_loss")}
    return summary


def _pm(value, digits: int = 2, percent: bool = False) -> str:
    if value is None:
        return "-"
    mean, std = value
    if percent:
        return f"{100 * mean:.1f} ± {100 * std:.1f}%"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(report: dict) -> str:
    """The report's tables in markdown."""
    config, summary = report["config"], report["summary"]
    seeds = len(report["seeds"])
    fractions, ceilings = config["fractions"], config["ceilings"]
    dense = summary["dense"]
    lines = [f"Llama (hidden {config['hidden']}, {config['layers']} layers, {config['heads']} "
             f"query / {config['kv_heads']} key-value heads, SwiGLU {config['intermediate']}), "
             f"{config['steps']} training steps, {seeds} seed(s). Dense perplexity: validation "
             f"{_pm(dense['val_ppl'])}, test {_pm(dense['test_ppl'])}. Mean ± std over seeds.",
             "", "Test perplexity with a fraction of the transformer blocks' parameters removed "
             "(no retraining); best of each column in bold:", "",
             "| method | reconstruct | " + " | ".join(f"{f:.0%}" for f in fractions)
             + " | " + " | ".join(f"largest at {c:g}x val" for c in ceilings) + " |",
             "|---|---|" + "---|" * (len(fractions) + len(ceilings))]
    entries = summary["configurations"]
    best = {f"{f:g}": min(e["fractions"][f"{f:g}"]["test_ppl"][0] for e in entries)
            for f in fractions}
    top = {f"{c:g}": max(e["ceilings"][f"{c:g}"][0] for e in entries) for c in ceilings}
    for e in entries:
        cells = []
        for f in fractions:
            cell = _pm(e["fractions"][f"{f:g}"]["test_ppl"])
            cells.append(f"**{cell}**" if e["fractions"][f"{f:g}"]["test_ppl"][0]
                         == best[f"{f:g}"] else cell)
        for c in ceilings:
            cell = _pm(e["ceilings"][f"{c:g}"], percent=True)
            cells.append(f"**{cell}**" if e["ceilings"][f"{c:g}"][0] == top[f"{c:g}"]
                         and top[f"{c:g}"] > 0 else cell)
        lines.append(f"| {e['method']} | {e['reconstruct']} | " + " | ".join(cells) + " |")
    lines += ["", "Cost of each method's scores (mean ± std over seeds; the ticket search's is "
                  "paid during training; Torch-Pruning's is one prune, scores and surgery):", "",
              "| method | seconds | sub-models evaluated | tokens evaluated | peak memory rise "
              "(MiB) |", "|---|---|---|---|---|"]
    for name, cost in summary["costs"].items():
        label = name + (" (during training)" if cost["during_training"] else "")
        lines.append(f"| {label} | {_pm(cost['seconds'], 1)} | {_pm(cost['evaluations'], 0)} | "
                     f"{_pm(cost['tokens'], 0)} | {_pm(cost['peak_mib'], 1)} |")
    speed = summary["batched_vs_sequential"]
    lines += ["", f"Batched vs one at a time on the same {config['compare_submodels']} random "
                  f"sub-models: {_pm(speed['batched_per_second'], 1)} vs "
                  f"{_pm(speed['sequential_per_second'], 1)} sub-models/s, "
                  f"speed-up {_pm(speed['speedup'])}x, largest loss difference "
                  f"{speed['max_abs_difference'][0]:.2e}."]
    shrunk = summary["shrunk"]
    lines += ["", f"Shrunk model (targeted + refit, {_pm(shrunk['fraction'], percent=True)} of "
                  f"block parameters removed): {shrunk['parameters'][0]:,.0f} of "
                  f"{shrunk['dense_parameters'][0]:,.0f} parameters, CPU throughput "
                  f"{_pm(shrunk['shrunk_tokens_per_second'], 0)} vs dense "
                  f"{_pm(shrunk['dense_tokens_per_second'], 0)} tokens/s "
                  f"({_pm(shrunk['speedup'])}x), test perplexity {_pm(shrunk['test_ppl'])}; "
                  f"reloaded in a fresh process, largest logit difference "
                  f"{shrunk['reload_max_abs_difference'][0]:.1e}."]
    training = summary["training"]
    lines += ["", f"Training: {_pm(training['train_seconds'], 0)} s of optimiser steps, "
                  f"{_pm(training['search_seconds'], 0)} s of ticket search."]
    if config.get("quick"):
        lines += ["", "**Quick smoke run: not a result.**"]
    return "\n".join(lines) + "\n"


def _series(summary: dict, wanted: Sequence[tuple[str, str]], fractions) -> dict:
    series = {}
    for e in summary["configurations"]:
        if (e["method"], e["reconstruct"]) in wanted:
            name = e["method"] + ("" if e["reconstruct"] == "none" else f" + {e['reconstruct']}")
            points = [e["fractions"][f"{f:g}"] for f in fractions]
            series[name] = dict(x=[p["removed"][0] for p in points],
                                mean=[p["test_ppl"][0] for p in points],
                                std=[p["test_ppl"][1] for p in points])
    return series


def plots(report: dict, directory: Path) -> list[str]:
    """Test perplexity against the fraction removed: bingo's methods, the field without and
    with the refit (a handful of curves a panel); returns the PNG paths."""
    from bingo.plots import CurvePanel, metric_panels

    summary, fractions = report["summary"], report["config"]["fractions"]
    configurations = [(e["method"], e["reconstruct"]) for e in summary["configurations"]]
    field = [m for m, _ in configurations if m not in BINGO_METHODS]
    dense = summary["dense"]["test_ppl"][0]
    xlabel = "fraction of block parameters removed"
    panels = [
        CurvePanel("bingo", xlabel, _series(summary, [c for c in configurations
                                                      if c[0] in BINGO_METHODS], fractions),
                   dense=dense),
        CurvePanel("the field, no refit", xlabel, _series(
            summary, [c for c in configurations if c[0] in field and c[1] != "refit"],
            fractions), dense=dense),
        CurvePanel("the field + bingo's refit, and bingo's best", xlabel, _series(
            summary, [c for c in configurations if c[0] in field and c[1] == "refit"]
            + [("targeted", "refit")], fractions), dense=dense),
    ]
    path = metric_panels(directory / "perplexity_vs_fraction.png", panels,
                         ylabel="test perplexity",
                         title=f"Llama on Tiny Shakespeare, {len(report['seeds'])} seed(s): "
                               "heads / key-value groups and MLP neurons removed, no retraining",
                         columns=3)
    return [path]
