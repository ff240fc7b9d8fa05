"""Figures of the demo and experiments, drawn with matplotlib's Agg backend.

A Figure with an explicit Agg canvas is used instead of pyplot: it needs no display, and it leaves
the process-wide matplotlib backend alone for callers that use pyplot themselves.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Fixed styles so that a method looks the same in every figure; others get matplotlib's cycle.
METHOD_STYLES: dict[str, dict] = {
    "bingo": dict(color="tab:blue", marker="o", linewidth=2.0),
    "magnitude": dict(color="tab:orange", marker="s"),
    "random": dict(color="tab:gray", marker="^", linestyle="--"),
    "imp": dict(color="black", marker="D", linewidth=2.0),
    "lamp": dict(color="tab:green", marker="v"),
    "taylor": dict(color="tab:purple", marker="P"),
    "magnitude-increase": dict(color="tab:brown", marker="x"),
    "shapley": dict(color="tab:pink", marker="*"),
    "wanda": dict(color="tab:red", marker="d"),
    "targeted": dict(color="tab:cyan", marker="X", linewidth=2.0),
    "targeted-iterative": dict(color="tab:olive", marker="*", linewidth=2.0),
}
RECONSTRUCTED_SUFFIX = "+ls"
"""Criteria with least-squares reconstruction (``"lamp+ls"``) are drawn as their base, dashed."""


def method_style(name: str) -> dict:
    """The plot style of method ``name``: its fixed style; a variant (``"targeted-macs"``) that
    of its family with a plain marker; a reconstructed criterion its base's, dashed."""
    base = name[:-len(RECONSTRUCTED_SUFFIX)] if name.endswith(RECONSTRUCTED_SUFFIX) else name
    style = dict(METHOD_STYLES.get(base, {}))
    if not style and base.partition("-")[0] in METHOD_STYLES:
        style = dict(METHOD_STYLES[base.partition("-")[0]], marker=".")
    if base != name:
        style["linestyle"] = "--"
    return style


def _curves_axes(sparsities, curves: Mapping[str, Sequence[float]], dense: Optional[float]):
    """A figure with one line per method over ``sparsities`` and the dense value dotted."""
    figure = _figure()
    ax = figure.add_subplot()
    for name, values in curves.items():
        ax.plot(sparsities, values, label=name, **method_style(name))
    if dense is not None:
        ax.axhline(dense, color="black", linewidth=0.8, linestyle=":", label="dense")
    return figure, ax


def accuracy_vs_sparsity(path: Union[str, os.PathLike], sparsities: Sequence[float],
                         curves: Mapping[str, Sequence[float]], *,
                         dense_accuracy: Optional[float] = None,
                         chosen: Optional[tuple[float, float]] = None,
                         title: str = "Accuracy vs sparsity", xlabel: str = "sparsity",
                         ylabel: str = "test accuracy") -> str:
    """Plot one accuracy curve per method over ``sparsities`` and save it as PNG at ``path``.

    Args:
        path: output file (the format follows its extension; ``.png`` for the demo).
        sparsities: the x values, shared by every curve.
        curves: method name -> accuracy at each sparsity.
        dense_accuracy: drawn as a horizontal reference line when given.
        chosen: ``(sparsity, accuracy)`` of the floor-pruned model, marked with a star.

    Returns:
        ``path`` as a string.
    """
    figure, ax = _curves_axes(sparsities, curves, dense_accuracy)
    if chosen is not None:
        ax.plot(*chosen, marker="*", markersize=14, color="tab:red", linestyle="none",
                label="bingo, pruned to the floor")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    figure.savefig(os.fspath(path), dpi=120)
    return os.fspath(path)


def _figure(size=(6.4, 4.4)) -> Figure:
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def accuracy_bands(path: Union[str, os.PathLike], panels: Mapping[str, Mapping[str, dict]], *,
                   dense_accuracy: Mapping[str, float], title: str) -> str:
    """One panel per granularity: mean test accuracy vs sparsity with a ±1 std band per method.

    ``panels[granularity][method]`` holds ``x`` (sparsities), ``mean`` and ``std`` lists (None
    entries are skipped: IMP has no network beyond its last round).
    """
    figure = _figure((6.0 * len(panels), 4.6))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (granularity, methods) in zip(axes, panels.items()):
        for name, series in methods.items():
            points = [(x, m, s) for x, m, s in zip(series["x"], series["mean"], series["std"])
                      if x is not None and m is not None]
            if not points:
                continue
            xs, means, stds = (list(v) for v in zip(*points))
            style = {**method_style(name), "markersize": 4}
            line, = ax.plot(xs, means, label=name, **style)
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], alpha=0.15,
                            color=line.get_color())
        ax.axhline(dense_accuracy[granularity], color="black", linewidth=0.8, linestyle=":",
                   label="dense")
        ax.set_title(f"{granularity} pruning")
        ax.set_xlabel(f"sparsity (fraction of {granularity} units pruned)")
        ax.set_ylabel("test accuracy")
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left", fontsize=7, ncol=2)
    figure.suptitle(title)
    figure.savefig(os.fspath(path), dpi=120)
    return os.fspath(path)


def grouped_bars(path: Union[str, os.PathLike], groups: Mapping[str, Mapping[str, float]], *,
                 ylabel: str, title: str, log: bool = True) -> str:
    """Bars per method, one colour per group (granularity); log scale by default."""
    figure = _figure((max(6.4, 0.55 * max(len(v) for v in groups.values()) * len(groups)), 4.4))
    ax = figure.add_subplot()
    names = list(dict.fromkeys(n for values in groups.values() for n in values))
    width = 0.8 / len(groups)
    for i, (group, values) in enumerate(groups.items()):
        xs = [j + i * width for j, n in enumerate(names) if n in values]
        ax.bar(xs, [max(values[n], 1e-3) for n in names if n in values], width, label=group)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=45,
                  ha="right", fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    figure.savefig(os.fspath(path), dpi=120)
    return os.fspath(path)


def histograms(path: Union[str, os.PathLike], values: Mapping[str, Sequence[float]], *,
               title: str, xlabel: str, bins: int = 50) -> str:
    """One histogram panel per entry of ``values`` (log-scaled counts)."""
    figure = _figure((5.0 * len(values), 3.8))
    axes = figure.subplots(1, len(values), squeeze=False)[0]
    for ax, (name, data) in zip(axes, values.items()):
        ax.hist(list(data), bins=bins, color="tab:blue", alpha=0.8)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("units")
    figure.suptitle(title)
    figure.savefig(os.fspath(path), dpi=120)
    return os.fspath(path)


def metric_vs_sparsity(path: Union[str, os.PathLike], sparsities: Sequence[float],
                       curves: Mapping[str, Sequence[float]], *, reference: Optional[float] = None,
                       title: str, ylabel: str, xlabel: str = "sparsity (fraction of units)",
                       log: bool = True) -> str:
    """One curve per method of an unbounded metric (perplexity, loss) over ``sparsities``.

    Unlike :func:`accuracy_vs_sparsity` the y axis is not [0, 1]: log-scaled by default, with
    ``reference`` (the dense model) as a dotted line.
    """
    figure, ax = _curves_axes(sparsities, curves, reference)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    figure.savefig(os.fspath(path), dpi=120)
    return os.fspath(path)
