"""``bingo experiment``: splits, overlap statistics, config checks and the quick run end to end."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from bingo import cli
from bingo.errors import InvalidOptionError
from bingo.experiment import ABLATIONS, CRITERIA, ExperimentConfig, quick, run_experiment
from bingo.experiment.criteria import applies
from bingo.experiment.measure import overlap
from bingo.experiment.runner import IMP, MAIN, Snapshot
from bingo.experiment.splits import experiment_splits

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data"


def _mnist_dir():
    for candidate in (os.environ.get("BINGO_DATA"), SHARED_MNIST):
        if candidate and (Path(candidate) / "mnist" / "t10k-images-idx3-ubyte.gz").exists():
            return str(candidate)
    return None


# -- splits and statistics ------------------------------------------------------------------------


def test_splits_are_disjoint_and_sized_as_documented():
    n = 10_000
    dataset = TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n) % 10)
    splits = experiment_splits(dataset, seed=3)
    assert splits.sizes() == {"train": 5000, "search": 1000, "val": 2000, "test": 2000}
    ids = [set(getattr(splits, k).tensors[0][:, 0].long().tolist())
           for k in ("train", "search", "val", "test")]
    assert sum(map(len, ids)) == n and len(set().union(*ids)) == n
    again = experiment_splits(dataset, seed=3)
    assert torch.equal(again.search.tensors[0], splits.search.tensors[0])
    other = experiment_splits(dataset, seed=4)
    assert not torch.equal(other.test.tensors[0], splits.test.tensors[0])


def test_overlap_exact_values():
    a = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    o = overlap(a, b)
    assert o["share"] == pytest.approx(0.5)            # 2 of a's 4 are in b
    assert o["share_chance"] == pytest.approx(0.4)     # b prunes 4 of 10
    assert o["jaccard"] == pytest.approx(2 / 6)
    expected_both = 4 * 4 / 10
    assert o["jaccard_chance"] == pytest.approx(expected_both / (8 - expected_both))


def test_overlap_chance_levels_match_random_sets():
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    n = 200_000
    a = torch.rand(n, generator=generator) < 0.3
    b = torch.rand(n, generator=generator) < 0.6
    o = overlap(a, b)
    assert o["share"] == pytest.approx(o["share_chance"], abs=0.01)
    assert o["jaccard"] == pytest.approx(o["jaccard_chance"], abs=0.01)


def test_snapshot_keeps_the_weights_of_its_step():
    model = torch.nn.Linear(3, 2)
    snapshot = Snapshot(model, step=2)
    x = torch.zeros(1, 3)
    snapshot(x, x)
    with torch.no_grad():
        model.weight.add_(1.0)
    snapshot(x, x)
    expected = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    snapshot(x, x)
    assert torch.equal(snapshot.state["weight"], expected)


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (dict(ablations=("K=3",)), "unknown ablation"),
    (dict(seeds=()), "seeds"),
    (dict(seeds=(1, 1)), "seeds"),
    (dict(granularities=("channel",)), "granularity"),
    (dict(every={"weight": 0, "neuron": 1}), "every"),
    (dict(report_sparsities=(0.33,)), "report_sparsities"),
    (dict(floor_drops=(1.5,)), "floor_drops"),
    (dict(imp_rewind="late"), "imp_rewind"),
    (dict(epochs=0), "epochs"),
    (dict(model="resnet"), "model"),
    (dict(criteria=("nope",)), "criteria"),
    (dict(speedup_batch=0), "speedup_batch"),
])
def test_bad_config_is_refused_by_name(change, message):
    with pytest.raises(InvalidOptionError, match=message):
        dataclasses.replace(ExperimentConfig(), **change).validate()


def test_every_ablation_changes_a_search_option():
    from bingo.search import SearchConfig

    options = {f.name for f in dataclasses.fields(SearchConfig)} | {"search_data"}
    for name, change in ABLATIONS.items():
        assert change and set(change) <= options, name


def test_cli_reports_bad_options_on_one_line(capsys, tmp_path):
    status = cli.main(["experiment", "mnist", "--quick", "--dataset", "digits", "--seeds", "1",
                       "1", "--out", str(tmp_path / "x")])
    assert status == cli.USAGE_ERROR
    assert "seeds" in capsys.readouterr().err


def test_cli_flags_for_model_criteria_and_imp_rounds():
    from bingo.experiment.command import add_arguments, config_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["mnist", "--model", "lenet5", "--criteria", "targeted", "magnitude",
                              "--imp-rounds", "3"])
    config = config_from_args(args)
    assert config.model == "lenet5" and config.criteria == ("targeted", "magnitude")
    assert config.imp_rounds["weight"] == config.imp_rounds["neuron"] == 3
    config.validate()


# -- end to end -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    # Every criterion and the full sparsity grid (--quick measures a few), on digits.
    defaults = ExperimentConfig()
    config = dataclasses.replace(quick(defaults), dataset="digits", out=str(out), progress=False,
                                 criteria=defaults.criteria, sparsities=defaults.sparsities,
                                 report_sparsities=defaults.report_sparsities)
    return run_experiment(config), out


def test_quick_run_writes_every_output(quick_report):
    report, out = quick_report
    for name in ("results.json", "results.md", "accuracy_vs_sparsity.png", "wall_time.png",
                 "significance_histograms.png", "accuracy_vs_sparsity_more.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["quick"] is True
    text = (out / "results.md").read_text()
    assert "Quick smoke run: not a result" in text
    assert "## weight granularity" in text and "## neuron granularity" in text
    assert "seed paper" in text and "Ticket search (BINGO) against its goals" in text
    assert "issue" not in text.lower()


def test_quick_run_measures_every_method(quick_report):
    report, _ = quick_report
    config = report["config"]
    for granularity in config["granularities"]:
        methods = report["seeds"][0]["granularities"][granularity]["methods"]
        expected = {MAIN, IMP, *(c for c in CRITERIA if applies(c, granularity)),
                    *config["ablations"]}
        assert set(methods) == expected
        for name, m in methods.items():
            assert len(m["curve"]) == len(config["sparsities"]), name
            for floor in m["floors"].values():
                assert 0.0 <= floor["sparsity"] < 1.0, name
            if name != IMP:
                # one-shot pruning to sparsity 0 is the dense model
                assert m["curve"][0] == pytest.approx(report["seeds"][0]["dense"]["test_accuracy"])
                assert all(0.0 <= a <= 1.0 for a in m["curve"]), name
                assert set(m["imp_overlap"]) >= {f"{s:g}" for s in config["report_sparsities"]}
        assert methods[MAIN]["searches"] > 0 and methods[MAIN]["kind"] == "search"
        assert len(methods[MAIN]["finetune"]["0.9"]) == config["finetune_epochs"]
        rounds = methods[IMP]["rounds"]
        assert [r["round"] for r in rounds] == list(range(config["imp_rounds"][granularity] + 1))
        assert all(a["sparsity"] < b["sparsity"] for a, b in zip(rounds, rounds[1:]))
        assert methods[IMP]["training_equivalents"] == config["imp_rounds"][granularity]


def test_quick_run_measures_cost_and_the_shrunk_model(quick_report):
    report, out = quick_report
    for granularity, data in report["seeds"][0]["granularities"].items():
        for name in (c for c in CRITERIA if applies(c, granularity)):
            m = data["methods"][name]
            cost = m["cost_vs_imp"]
            assert cost["seconds"] > 0 and cost["sparsity"] == m["floors"]["0.01"]["sparsity"]
            if cost["ratio"] is not None:
                assert math.isclose(cost["ratio"], cost["seconds"] / cost["imp_seconds"])
            if granularity == "neuron":
                st = m["structured"]
                assert st["parameters"] <= st["dense_parameters"] and st["speedup"] > 0
                # The shrunk model computes what the masked one does.
                assert st["test_accuracy"] == pytest.approx(m["floors"]["0.01"]["test_accuracy"])
        assert data["methods"]["targeted"]["search"]["seconds"] > 0
    granularities = report["config"]["granularities"]
    assert set(report["summary"]["targeted_targets"]) == {
        *granularities, *(f"{g}/{name}" for g in granularities
                          for name in ("targeted+ls", "targeted-iterative+ls"))}
    # Reconstructed criteria are the same masks with the survivors refitted.
    for granularity, data in report["seeds"][0]["granularities"].items():
        assert data["methods"]["targeted+ls"]["search"] == {
            **data["methods"]["targeted"]["search"],
            "seconds": data["methods"]["targeted+ls"]["search"]["seconds"]}
        assert data["methods"]["targeted+ls"]["curve"][0] == data["methods"]["targeted"]["curve"][0]
    weight = report["summary"]["targeted_targets"]["weight/targeted+ls"]["one_shot"]
    assert all({"best", "best_same_refit"} <= set(v) for v in weight.values())
    assert "Targeted pruning against its goals" in (out / "results.md").read_text()


def test_quick_run_lenet5_channels(tmp_path):
    config = dataclasses.replace(quick(ExperimentConfig()), dataset="digits", model="lenet5",
                                 granularities=("neuron",), criteria=("magnitude", "targeted"),
                                 ablations=(), out=str(tmp_path), progress=False)
    report = run_experiment(config)
    methods = report["seeds"][0]["granularities"]["neuron"]["methods"]
    assert set(methods) == {MAIN, IMP, "magnitude", "targeted"}
    st = methods["targeted"]["structured"]
    assert st["parameters"] <= st["dense_parameters"]
    assert st["test_accuracy"] == pytest.approx(methods["targeted"]["floors"]["0.01"]
                                                ["test_accuracy"])
    assert "lenet5" in (tmp_path / "results.md").read_text()


def test_quick_run_floors_respect_validation(quick_report):
    report, _ = quick_report
    seed = report["seeds"][0]
    dense_val = seed["dense"]["val_accuracy"]
    for granularity, data in seed["granularities"].items():
        for name, m in data["methods"].items():
            for drop, floor in m["floors"].items():
                assert floor["val_accuracy"] >= dense_val - float(drop) - 1e-12, (name, drop)


def test_quick_run_summary_is_consistent(quick_report):
    report, _ = quick_report
    summary = report["summary"]
    for granularity, targets in summary["targets"].items():
        methods = summary["granularities"][granularity]["methods"]
        best = targets["best_bingo_setting"]
        assert methods[best]["kind"] == "search"
        sparsity = targets["best_bingo_sparsity"]["mean"]
        assert sparsity == max(r["floors"]["0.01"]["sparsity"]["mean"]
                               for r in methods.values() if r["kind"] == "search")
        assert targets["beats_magnitude"] == (sparsity > targets["magnitude_sparsity"]["mean"])
        compare = methods[MAIN]["compute_vs_imp"][0]
        if compare["ratio"] is not None:
            assert math.isclose(compare["ratio"],
                                compare["imp_matching_seconds"] / compare["bingo_seconds"])


@pytest.mark.skipif(_mnist_dir() is None, reason="MNIST IDX files not found "
                    "($BINGO_DATA or ../shared/data)")
def test_quick_run_on_real_mnist(tmp_path, capsys):
    status = cli.main(["experiment", "mnist", "--quick", "--data-dir", _mnist_dir(),
                       "--granularities", "neuron", "--ablations", "--no-progress",
                       "--out", str(tmp_path)])
    assert status == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["data"]["sizes"] == {"train": 5000, "search": 1000, "val": 2000, "test": 2000}
    assert report["seeds"][0]["dense"]["test_accuracy"] > 0.85
    assert "neuron pruning" in capsys.readouterr().out


def test_summary_without_magnitude_has_no_magnitude_comparison(quick_report):
    report, _ = quick_report
    from bingo.experiment.report import markdown, summarize

    trimmed = copy.deepcopy({k: v for k, v in report.items() if k != "summary"})
    for seed in trimmed["seeds"]:
        for data in seed["granularities"].values():
            del data["methods"]["magnitude"]
    trimmed["summary"] = summarize(trimmed)
    for targets in trimmed["summary"]["targets"].values():
        assert targets["magnitude_sparsity"] is None and targets["beats_magnitude"] is None
    assert "Ticket search (BINGO) against its goals" in markdown(trimmed)


# -- saved as it goes, resumed ----------------------------------------------------------------------


def _tiny(out, **change) -> ExperimentConfig:
    tiny = dict(dataset="digits", granularities=("neuron",), seeds=(0, 1), criteria=("magnitude",),
                ablations=(), imp_rounds={"weight": 1, "neuron": 1}, epochs=1,
                finetune_sparsities=(), out=str(out), progress=False)
    return dataclasses.replace(quick(ExperimentConfig()), **{**tiny, **change})


def test_each_seed_is_saved_when_it_finishes_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    from bingo.experiment import runner

    first = run_experiment(_tiny(tmp_path))
    parts = tmp_path / "parts"
    assert sorted(p.name for p in parts.iterdir()) == ["seed-0.json", "seed-1.json"]
    assert json.loads((tmp_path / "run.json").read_text())["config"]["seeds"] == [0, 1]
    # As if interrupted during seed 1: its file is missing; seed 0 must not run again.
    (parts / "seed-1.json").unlink()
    real = runner.run_seed

    def only_seed_1(config, dataset, seed, with_ablations):
        assert seed == 1, "seed 0 finished in the first run and was run again"
        return real(config, dataset, seed, with_ablations)

    monkeypatch.setattr(runner, "run_seed", only_seed_1)
    capsys.readouterr()
    again = run_experiment(_tiny(tmp_path, threads=2))  # threads may change on resume
    assert "seed-0: finished in an earlier run, kept" in capsys.readouterr().err
    assert again["seeds"][0] == json.loads(json.dumps(first["seeds"][0]))
    assert [s["seed"] for s in again["seeds"]] == [0, 1]
    assert (tmp_path / "results.md").exists()


def test_rerun_with_another_configuration_is_refused_before_any_work(tmp_path, monkeypatch):
    from bingo.experiment import runner

    run_experiment(_tiny(tmp_path, seeds=(0,)))
    monkeypatch.setattr(runner, "load_dataset", lambda *a: pytest.fail("work started"))
    with pytest.raises(InvalidOptionError, match=r"another configuration \(epochs: 2 now, 1 "
                                                 r"there\); pass another directory"):
        run_experiment(_tiny(tmp_path, seeds=(0,), epochs=2))


def test_cli_prints_a_short_summary(tmp_path, capsys):
    status = cli.main(["experiment", "mnist", "--quick", "--dataset", "digits", "--granularities",
                       "neuron", "--criteria", "magnitude", "targeted+ls", "--ablations",
                       "--imp-rounds", "1", "--no-progress", "--out", str(tmp_path)])
    assert status == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < 20 and "Quick smoke run: not a result." in out
    assert "targeted+ls" in out and str(tmp_path / "results.md") in out
