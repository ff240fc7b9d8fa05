"""``bingo llm bench`` (bingo.llm.compare): the whole bench at its --quick sizes (every method,
every cost, the ceilings, the shrunk model's fresh-process reload, resuming), and its pieces:
the ceiling walk, the summary over seeds."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from bingo.errors import InvalidOptionError
from bingo.llm.compare import QUICK, LlmBenchConfig, run
from bingo.llm.compare_pipeline import _ceiling_walk
from bingo.llm.compare_report import aggregate, markdown, mean_std

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = {"targeted", "targeted+prior", "ticket-search", "magnitude", "wanda-sp", "flap",
           "llm-pruner", "bonsai", "torch-pruning"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not (DATA / "tinyshakespeare").exists():
        pytest.skip("needs ../shared/data/tinyshakespeare")
    pytest.importorskip("torch_pruning")
    config = dataclasses.replace(LlmBenchConfig(), **QUICK, out=str(
        tmp_path_factory.mktemp("bench") / "out"), data_dir=str(DATA), progress=False)
    return config, run(config)


def test_every_method_at_every_fraction_with_and_without_the_refit(quick):
    config, report = quick
    (seed,) = report["seeds"]
    configurations = {(r["method"], r["reconstruct"]) for r in seed["rows"]}
    assert {m for m, _ in configurations} == METHODS
    for method in METHODS - {"torch-pruning"}:
        assert {(method, "none"), (method, "refit")} <= configurations
    assert ("flap", "flap-bias") in configurations
    for row in seed["rows"]:
        assert math.isfinite(row["test_ppl"]) and row["test_ppl"] > 1.0
        # Units are whole: the removed share is the nearest one a method's order reaches.
        assert abs(row["removed"] - row["fraction"]) < 0.1, row
    for name, ceiling in seed["ceilings"].items():
        dense = seed["dense"]["val_ppl"]
        under = [removed for removed, val in ceiling["walk"] if val <= 1.25 * dense]
        assert ceiling["largest"]["1.25"] == (max(under) if under else 0.0), name


def test_costs_are_counted(quick):
    config, report = quick
    costs = report["seeds"][0]["costs"]
    assert set(costs) == METHODS
    targeted = costs["targeted"]["evaluations"]
    assert targeted > 0 and costs["magnitude"]["evaluations"] == 0
    # Bonsai evaluates as many sub-models as the targeted search, spread over its rounds.
    assert costs["bonsai"]["evaluations"] == config.bonsai_rounds * (
        targeted // config.bonsai_rounds)
    # The training-time evidence as a prior spares the elimination units to measure.
    assert costs["targeted+prior"]["evaluations"] < targeted
    assert costs["ticket-search"]["during_training"]
    assert all(c["seconds"] >= 0 for c in costs.values())


def test_batched_and_one_at_a_time_agree_and_the_shrunk_model_reloads(quick):
    _, report = quick
    seed = report["seeds"][0]
    assert seed["batched_vs_sequential"]["max_abs_difference"] < 1e-4
    assert seed["batched_vs_sequential"]["speedup"] > 0
    shrunk = seed["shrunk"]
    assert shrunk["parameters"] < shrunk["dense_parameters"]
    assert shrunk["reload_max_abs_difference"] <= 1e-5
    assert shrunk["dense_tokens_per_second"] > 0 and shrunk["shrunk_tokens_per_second"] > 0


def test_report_files_and_resume(quick):
    config, report = quick
    out = Path(config.out)
    assert json.loads((out / "report.json").read_text())["summary"] == _json(report["summary"])
    table = (out / "table.md").read_text()
    assert "Quick smoke run: not a result" in table
    assert all(f"| {m} |" in table for m in METHODS)
    assert all(Path(p).stat().st_size > 10_000 for p in report["files"]["plots"])
    again = run(config)   # the finished seed is kept, not recomputed
    assert _json(again["seeds"]) == _json(report["seeds"])


def _json(value):
    return json.loads(json.dumps(value))


def test_ceiling_walk_takes_the_largest_fraction_under_each_ceiling():
    curve = {round(0.1 * i, 1): 10.0 + 4 * i for i in range(1, 10)}   # 14, 18, 22, ...
    seen = []

    def evaluate(fraction):
        seen.append(round(fraction, 1))
        return round(fraction, 1), curve[round(fraction, 1)]

    walk = _ceiling_walk(evaluate, [19.0, 26.0], 0.1)
    assert walk["largest"] == {"19": 0.2, "26": 0.4}
    assert seen == [0.1, 0.2, 0.3, 0.4, 0.5]   # stops past the highest ceiling
    assert _ceiling_walk(evaluate, [12.0], 0.1)["largest"] == {"12": 0.0}


def test_summary_is_mean_and_sample_std_over_seeds():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([5.0]) == (5.0, 0.0)
    seeds = []
    for value in (2.0, 4.0):
        seeds.append(dict(
            dense=dict(val_ppl=value, test_ppl=value),
            rows=[dict(method="m", reconstruct="none", fraction=0.5, removed=0.5,
                       test_ppl=value)],
            ceilings={"m/none": dict(largest={"1.1": value / 10})},
            costs={"m": dict(seconds=value, peak_mib=None, evaluations=1, tokens=2)},
            batched_vs_sequential=dict(speedup=value, sequential_per_second=1.0,
                                       batched_per_second=value, max_abs_difference=0.0),
            shrunk=dict(fraction=0.5, parameters=1, dense_parameters=2, speedup=1.0,
                        dense_tokens_per_second=1.0, shrunk_tokens_per_second=1.0,
                        test_ppl=value, reload_max_abs_difference=0.0),
            training=dict(train_seconds=1.0, search_seconds=1.0, final_train_loss=1.0)))
    summary = aggregate(seeds, [0.5], [1.1])
    (entry,) = summary["configurations"]
    assert entry["fractions"]["0.5"]["test_ppl"] == (3.0, math.sqrt(2.0))
    assert entry["ceilings"]["1.1"] == pytest.approx((0.3, math.sqrt(0.02)))
    assert summary["costs"]["m"]["peak_mib"] is None
    config = dict(dataclasses.asdict(LlmBenchConfig()), fractions=[0.5], ceilings=[1.1])
    table = markdown(dict(config=config, summary=summary, seeds=seeds))
    assert "| m | none | **3.00 ± 1.41** | **30.0 ± 14.1%** |" in table


@pytest.mark.parametrize("change, message", [
    (dict(fractions=(0.2, 1.0)), "fractions"), (dict(ceilings=(1.0,)), "ceilings"),
    (dict(seeds=()), "seeds"), (dict(heads=3), "heads"), (dict(steps=0), "steps")])
def test_bad_settings_fail_before_any_work(change, message, tmp_path):
    config = dataclasses.replace(LlmBenchConfig(), out=str(tmp_path / "out"), **change)
    with pytest.raises(InvalidOptionError, match=message):
        run(config)
    assert not (tmp_path / "out").exists()
