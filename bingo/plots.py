"""Figures of the demo and experiments, drawn with matplotlib's Agg backend.

Figures are read by people: at most :data:`MAX_CURVES` curves per panel, and within a panel every
method differs from every other in colour *and* line style (and marker), so curves stay apart in
greyscale and for colour-blind readers. The headline methods keep one look in every figure
(:data:`METHOD_STYLES`); any other method takes the first colour and line style its panel has
not used yet. Log axes are labelled with plain numbers (``20``, not ``2×10^1``).

A Figure with an explicit Agg canvas is used instead of pyplot: it needs no display, and it leaves
the process-wide matplotlib backend alone for callers that use pyplot themselves.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

MAX_CURVES = 8
"""Curves per panel, at most (the dense reference line not counted)."""

COLOURS = ("tab:brown", "tab:pink", "tab:cyan", "black", "tab:blue", "tab:red", "tab:purple",
           "tab:green", "tab:orange", "tab:olive", "tab:gray")
"""Colours in the order a panel hands them out to methods without a fixed look: first those no
headline method wears."""
LINESTYLES = ("-", "--", "-.", ":", (0, (6, 1.5)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 1)),
              (0, (8, 2, 2, 2)))
"""Line styles in the order a panel hands them out: as many as :data:`MAX_CURVES`."""
MARKERS = ("d", "*", "h", "D", "o", "X", "P", "v", "s", "^", "x")
"""Markers, one per colour of :data:`COLOURS`."""

METHOD_STYLES: dict[str, dict] = {
    "imp": dict(color="black", linestyle="-", marker="D"),
    "bingo": dict(color="tab:blue", linestyle="--", marker="o"),
    "targeted+ls": dict(color="tab:red", linestyle="-.", marker="X"),
    "targeted-iterative+ls": dict(color="tab:purple", linestyle=":", marker="P"),
    "lamp+ls": dict(color="tab:green", linestyle=LINESTYLES[4], marker="v"),
    "magnitude": dict(color="tab:orange", linestyle=LINESTYLES[5], marker="s"),
    "lamp": dict(color="tab:olive", linestyle=LINESTYLES[6], marker="^"),
    "random": dict(color="tab:gray", linestyle=LINESTYLES[7], marker="x"),
    "wanda": dict(color="tab:red", linestyle="-.", marker="d"),
    # bingo llm bench's name for the targeted search + refit: the look of "targeted+ls".
    "targeted + refit": dict(color="tab:red", linestyle="-.", marker="X"),
}
"""The fixed looks of the headline methods (pairwise distinct in colour and line style)."""


def panel_styles(names: Sequence[str]) -> dict[str, dict]:
    """Plot style of each method of one panel: its fixed look where the panel has not used that
    colour or line style yet, else the first unused ones; every pair differs in both."""
    if len(names) > len(LINESTYLES):
        raise ValueError(f"{len(names)} curves in one panel; at most {len(LINESTYLES)} stay "
                         "readable (split the panel)")
    used_colours: list = []
    used_lines: list = []
    styles = {}
    for name in names:
        wanted = METHOD_STYLES.get(name, {})
        colour = wanted.get("color")
        if colour is None or colour in used_colours:
            colour = next(c for c in COLOURS if c not in used_colours)
        line = wanted.get("linestyle")
        if line is None or line in used_lines:
            line = next(s for s in LINESTYLES if s not in used_lines)
        used_colours.append(colour)
        used_lines.append(line)
        marker = wanted.get("marker") or MARKERS[COLOURS.index(colour) % len(MARKERS)]
        styles[name] = dict(color=colour, linestyle=line, marker=marker, linewidth=1.6)
    return styles


def _figure(size=(6.4, 4.4)) -> Figure:
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plain_log_axis(axis, subs: Optional[tuple[float, ...]] = None) -> None:
    """Label log-scale ``axis`` with plain numbers at ``subs`` times each power of ten (default:
    as many as its range leaves room for; call it after the data is drawn)."""
    if subs is None:
        ax = axis.axes
        low, high = sorted(ax.get_xlim() if axis is ax.xaxis else ax.get_ylim())
        decades = math.log10(high / low) if low > 0 else math.inf
        subs = ((1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if decades < 1.0 else
                (1.0, 2.0, 5.0) if decades < 3.0 else (1.0,))
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10))))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _save(figure: Figure, path: Union[str, os.PathLike]) -> str:
    figure.savefig(os.fspath(path), dpi=120)
    return os.fspath(path)


def _curves_axes(sparsities: Sequence[float], curves: Mapping[str, Sequence[float]],
                 dense: Optional[float]) -> tuple[Figure, Any, dict[str, dict]]:
    """A figure with one line per method over ``sparsities``, the dense value dotted; returns
    the figure, its axes and the methods' styles."""
    figure = _figure()
    ax = figure.add_subplot()
    styles = panel_styles(list(curves))
    for name, values in curves.items():
        ax.plot(sparsities, values, label=name, **styles[name])
    if dense is not None:
        ax.axhline(dense, color="0.6", linewidth=1.0, linestyle=":", label="dense")
    return figure, ax, styles


def accuracy_vs_sparsity(path: Union[str, os.PathLike], sparsities: Sequence[float],
                         curves: Mapping[str, Sequence[float]], *,
                         dense_accuracy: Optional[float] = None,
                         at_floor: Optional[Mapping[str, float]] = None,
                         title: str = "Accuracy vs sparsity", xlabel: str = "sparsity",
                         ylabel: str = "test accuracy") -> str:
    """Plot one accuracy curve per method over ``sparsities`` and save it as PNG at ``path``.

    Args:
        path: output file (the format follows its extension; ``.png`` for the demo).
        sparsities: the x values, shared by every curve.
        curves: method name -> accuracy at each sparsity.
        dense_accuracy: drawn as a horizontal reference line when given.
        at_floor: method name -> the sparsity it reached when pruned to the validation floor,
            drawn as a vertical line in the method's colour and given in the legend.

    Returns:
        ``path`` as a string.
    """
    figure, ax, styles = _curves_axes(sparsities, curves, dense_accuracy)
    for name, sparsity in (at_floor or {}).items():
        ax.axvline(sparsity, color=styles[name]["color"], linewidth=1.2, alpha=0.8,
                   linestyle=styles[name]["linestyle"],
                   label=f"{name} at the val floor: {100 * sparsity:.1f}% pruned")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(figure, path)


@dataclass
class CurvePanel:
    """One panel of :func:`accuracy_panels`."""

    title: str
    """Panel title."""
    xlabel: str
    """Label of the sparsity axis."""
    series: dict = field(default_factory=dict)
    """Method -> ``{"x": [...], "mean": [...], "std": [...]}`` (None entries are skipped)."""
    dense: Optional[float] = None
    """Dense test accuracy, drawn as a reference line."""
    ylim: tuple[float, float] = (0.0, 1.02)
    """Range of the accuracy axis (a zoom on the top shows where the best methods part)."""
    legend: bool = True
    """Draw the legend (a zoom of a panel with the same methods does without)."""


def accuracy_panels(path: Union[str, os.PathLike], panels: Sequence[Optional[CurvePanel]], *,
                    title: str, columns: int = 2) -> str:
    """Mean test accuracy vs sparsity with a ±1 std band per method, one panel per
    :class:`CurvePanel` (at most :data:`MAX_CURVES` methods each), ``columns`` panels a row,
    left to right; a None leaves its cell empty."""
    return _panels(path, panels, title=title, columns=columns, ylabel="test accuracy",
                   log=False, legend="lower left")


def metric_panels(path: Union[str, os.PathLike], panels: Sequence[Optional[CurvePanel]], *,
                  title: str, ylabel: str, columns: int = 2) -> str:
    """:func:`accuracy_panels` for an unbounded lower-is-better metric (perplexity): a log y
    axis with plain labels, scaled to each panel's curves (its ``ylim`` ignored)."""
    return _panels(path, panels, title=title, columns=columns, ylabel=ylabel, log=True,
                   legend="upper left")


def _panels(path, panels, *, title: str, columns: int, ylabel: str, log: bool,
            legend: str) -> str:
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    figure = _figure((6.4 * columns, 4.8 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes, panels):
        if panel is None:
            ax.set_visible(False)
            continue
        styles = panel_styles(list(panel.series))
        for name, series in panel.series.items():
            points = [(x, m, s) for x, m, s in zip(series["x"], series["mean"], series["std"])
                      if x is not None and m is not None]
            if not points:
                continue
            xs, means, stds = (list(v) for v in zip(*points))
            ax.plot(xs, means, label=name, markersize=4, **styles[name])
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)],
                            [m + s for m, s in zip(means, stds)], alpha=0.12,
                            color=styles[name]["color"])
        if panel.dense is not None:
            ax.axhline(panel.dense, color="0.6", linewidth=1.0, linestyle=":", label="dense")
        ax.set_title(panel.title)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
            plain_log_axis(ax.yaxis)
        else:
            ax.set_xlim(0.0, 1.0)
            ax.set_ylim(*panel.ylim)
        ax.grid(True, alpha=0.3)
        if panel.legend:
            ax.legend(loc=legend, fontsize=8)
    _suptitle(figure, title, 6.4 * columns)
    return _save(figure, path)


def _suptitle(figure: Figure, title: str, width_inches: float) -> None:
    """A figure title wrapped to the figure's width (a long one is never cut off)."""
    figure.suptitle(textwrap.fill(title, width=int(width_inches * 11)))


FREE_SECONDS = 0.01
"""Costs below this are written as text ("< 0.01 s") instead of drawn as a bar."""


def cost_bars(path: Union[str, os.PathLike], groups: Mapping[str, Mapping[str, float]], *,
              xlabel: str, title: str) -> str:
    """Horizontal bars of seconds per method (log scale, plain-number labels), one panel per
    group (granularity), methods sorted by cost; each bar carries its value, and costs under
    :data:`FREE_SECONDS` are written, not drawn."""
    figure = _figure((6.4 * len(groups), 1.2 + 0.3 * max(len(v) for v in groups.values())))
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    top = max((s for values in groups.values() for s in values.values()), default=1.0)
    for ax, (group, values) in zip(axes, groups.items()):
        ordered = sorted(values.items(), key=lambda item: item[1])
        names = [n for n, _ in ordered]
        ax.barh(range(len(names)), [max(s, FREE_SECONDS) if s >= FREE_SECONDS else 0.0
                                    for _, s in ordered], color="tab:blue", alpha=0.8)
        for i, (_, seconds) in enumerate(ordered):
            text = f"{seconds:.3g} s" if seconds >= FREE_SECONDS else f"< {FREE_SECONDS:g} s"
            ax.text(max(seconds, FREE_SECONDS) * 1.1, i, text, va="center", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=9)
        ax.set_xscale("log")
        ax.set_xlim(FREE_SECONDS / 2, top * 8)
        plain_log_axis(ax.xaxis, subs=(1.0,))
        ax.set_xlabel(xlabel)
        ax.set_title(group)
        ax.grid(True, axis="x", alpha=0.3)
    _suptitle(figure, title, 6.4 * len(groups))
    return _save(figure, path)


def histograms(path: Union[str, os.PathLike], values: Mapping[str, Sequence[float]], *,
               title: str, xlabel: str, bins: int = 50) -> str:
    """One histogram panel per entry of ``values`` (log-scaled counts)."""
    figure = _figure((5.0 * len(values), 3.8))
    axes = figure.subplots(1, len(values), squeeze=False)[0]
    for ax, (name, data) in zip(axes, values.items()):
        ax.hist(list(data), bins=bins, color="tab:blue", alpha=0.8)
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("units")
    _suptitle(figure, title, 5.0 * len(values))
    return _save(figure, path)


def metric_vs_sparsity(path: Union[str, os.PathLike], sparsities: Sequence[float],
                       curves: Mapping[str, Sequence[float]], *, reference: Optional[float] = None,
                       title: str, ylabel: str, xlabel: str = "sparsity (fraction of units)",
                       log: bool = True) -> str:
    """One curve per method of an unbounded metric (perplexity, loss) over ``sparsities``.

    Unlike :func:`accuracy_vs_sparsity` the y axis is not [0, 1]: log-scaled by default (labelled
    with plain numbers), with ``reference`` (the dense model) as a dotted line.
    """
    figure, ax, _ = _curves_axes(sparsities, curves, reference)
    if log:
        ax.set_yscale("log")
        plain_log_axis(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    return _save(figure, path)
