"""bingo.plots: readable panels (few curves, each distinct in colour and line style), plain log
labels, and the experiment's figures split so that no panel is crowded."""

from __future__ import annotations

import itertools

import pytest
from matplotlib.figure import Figure

from bingo import plots
from bingo.experiment import CRITERIA
from bingo.plots import MAX_CURVES, METHOD_STYLES, panel_styles


def test_headline_methods_keep_their_look_and_differ_pairwise():
    styles = panel_styles(list(METHOD_STYLES)[:MAX_CURVES])
    for name, style in styles.items():
        assert {k: style[k] for k in ("color", "linestyle")} == {
            k: METHOD_STYLES[name][k] for k in ("color", "linestyle")}
    for a, b in itertools.combinations(styles.values(), 2):
        assert a["color"] != b["color"] and a["linestyle"] != b["linestyle"]


@pytest.mark.parametrize("start", range(0, len(CRITERIA), 5))
def test_any_panel_of_up_to_eight_methods_is_pairwise_distinct(start):
    names = ["imp", *list(CRITERIA)[start:start + MAX_CURVES - 1]]
    styles = panel_styles(names)
    for a, b in itertools.combinations(styles.values(), 2):
        assert a["color"] != b["color"] and a["linestyle"] != b["linestyle"]


def test_more_curves_than_a_panel_holds_is_refused():
    with pytest.raises(ValueError, match="split the panel"):
        panel_styles([f"m{i}" for i in range(MAX_CURVES + 1)])


def test_log_axes_read_as_plain_numbers():
    figure = Figure()
    ax = figure.add_subplot()
    ax.plot([0, 1], [6.4, 22.5])
    ax.set_yscale("log")
    ax.set_ylim(6, 25)
    plots.plain_log_axis(ax.yaxis)
    labels = [ax.yaxis.get_major_formatter()(v)
              for v in ax.yaxis.get_majorticklocs() if 6 <= v <= 25]
    assert labels == ["7", "10", "15", "20"]  # not 2.25×10^1


def _experiment_report(methods_per_granularity: dict[str, list[str]]) -> dict:
    sparsities = [0.0, 0.5, 0.9]
    curve = {f"{s:g}": dict(mean=0.9 - s / 2, std=0.01, n=1) for s in sparsities}
    granularities = {}
    for granularity, names in methods_per_granularity.items():
        rows = {}
        for i, name in enumerate(names):
            row = dict(kind="one-shot", curve=curve, extra_seconds=dict(mean=float(i), std=0, n=1))
            if name == "imp":
                row.update(kind="imp", curve_sparsity=curve)
            rows[name] = row
        granularities[granularity] = dict(dense_test=dict(mean=0.95, std=0, n=1), methods=rows)
    return dict(config=dict(sparsities=sparsities, dataset="digits", model="lenet_300_100"),
                summary=dict(granularities=granularities),
                seeds=[dict(seed=0, granularities={g: {} for g in methods_per_granularity})])


def test_experiment_figures_hold_at_most_eight_curves_per_panel(tmp_path, monkeypatch):
    from bingo.experiment import report

    drawn = []
    real = plots.accuracy_panels

    def spy(path, panels, **kwargs):
        drawn.extend(p for p in panels if p is not None)
        return real(path, panels, **kwargs)

    monkeypatch.setattr(plots, "accuracy_panels", spy)
    every = ["imp", "bingo", *CRITERIA]
    files = report._plots(_experiment_report({"weight": every, "neuron": every}), tmp_path)
    assert {"curves", "more_curves", "wall_time"} <= set(files)
    assert all(len(panel.series) <= MAX_CURVES for panel in drawn)
    shown = {name for panel in drawn for name in panel.series}
    assert shown == set(every)  # every method is in some panel
    first = [p for p in drawn if "more" not in p.title]
    assert list(first[0].series)[:3] == ["imp", "bingo", "targeted+ls"]
