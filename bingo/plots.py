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
}


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
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for name, accuracies in curves.items():
        ax.plot(sparsities, accuracies, label=name, **METHOD_STYLES.get(name, {}))
    if dense_accuracy is not None:
        ax.axhline(dense_accuracy, color="black", linewidth=0.8, linestyle=":", label="dense")
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
