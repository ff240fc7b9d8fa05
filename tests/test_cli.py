"""The ``bingo`` command line: --version, the demo smoke run, error handling."""

import json
import subprocess
import sys
from dataclasses import fields

import pytest

import bingo
from bingo import cli, demo
from bingo.errors import InvalidOptionError

REPORT_KEYS = {"config", "environment", "data", "model", "dense", "pruned", "baselines_at_floor",
               "search", "timings", "curves", "files"}


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "bingo", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bingo {bingo.__version__}"


def test_python_m_bingo_version():
    done = _run("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"bingo {bingo.__version__}"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    done = _run("demo", "--quick", "--no-progress", "--out", str(out), timeout=180)
    return out, done


def test_demo_quick_writes_report_and_plot(quick_demo):
    out, done = quick_demo
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    png = out / demo.PLOT_NAME
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["files"]["plot"] == str(png)

    config = report["config"]
    assert (config["epochs"], config["subsets"]) == (demo.QUICK["epochs"], demo.QUICK["subsets"])
    assert config["granularity"] == "weight"
    for key in ("val_accuracy", "test_accuracy", "nonzero_parameters"):
        assert key in report["dense"] and key in report["pruned"]
    pruned = report["pruned"]
    assert 0.0 <= pruned["sparsity"] <= 1.0
    assert pruned["val_accuracy"] >= pruned["floor"]
    assert pruned["nonzero_parameters"] <= report["dense"]["nonzero_parameters"]
    timings = report["timings"]
    assert timings["search_seconds"] > 0 and timings["train_seconds"] > 0
    assert timings["overhead_percent"] == pytest.approx(
        100 * timings["search_seconds"] / timings["train_seconds"])
    assert report["search"]["path"] in ("fast", "vmap")
    assert report["search"]["searches"] > 0

    sparsities, curves = report["curves"]["sparsities"], report["curves"]["accuracy"]
    assert sparsities == list(demo.SPARSITY_GRID)
    assert set(curves) == {"bingo", "magnitude", "random"}
    for accuracies in curves.values():
        assert len(accuracies) == len(sparsities)
        assert all(0.0 <= a <= 1.0 for a in accuracies)
    # At sparsity 0 every method is the dense model.
    assert {a[0] for a in curves.values()} == {report["dense"]["test_accuracy"]}

    assert set(report["baselines_at_floor"]) == {"magnitude", "random"}
    for word in ("dense", "pruned", "sparsity", "parameters", "overhead"):
        assert word in done.stdout


def test_bingo_error_exits_2_with_one_line(tmp_path):
    # --literal only applies to the paper's seed score; the search refuses it before any work.
    done = _run("demo", "--quick", "--literal", "--score", "attribution", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "bingo demo: error: literal=True applies only to score='seed' (the paper's formula)")
    assert not (tmp_path / "report.json").exists()


def test_bingo_error_from_main_returns_2(monkeypatch, capsys):
    def fail(config):
        raise InvalidOptionError("fraction must be in (0, 1], got 2.0")

    monkeypatch.setattr(demo, "run", fail)
    assert cli.main(["demo", "--fraction", "2"]) == 2
    assert capsys.readouterr().err == "bingo demo: error: fraction must be in (0, 1], got 2.0\n"


def test_invalid_search_option_is_reported_without_traceback(capsys, tmp_path):
    assert cli.main(["demo", "--fraction", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "fraction must be in (0, 1]" in err and "Traceback" not in err


def test_out_that_is_a_file_is_an_error(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    assert cli.main(["demo", "--quick", "--out", str(target)]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    ([], "required: COMMAND"),
    (["train"], "invalid choice: 'train'"),
    (["demo", "--granularity", "row"], "invalid choice: 'row'"),
    (["demo", "--subsets", "many"], "invalid int value: 'many'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_argparse_errors_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("usage: bingo")


def test_quick_keeps_flags_the_user_set():
    args = cli.build_parser().parse_args(["demo", "--quick", "--subsets", "8", "--granularity",
                                          "neuron"])
    config = demo.config_from_args(args)
    assert (config.subsets, config.granularity, config.epochs) == (8, "neuron",
                                                                   demo.QUICK["epochs"])
    assert demo.config_from_args(cli.build_parser().parse_args(["demo"])) == demo.DemoConfig()


def test_every_demo_config_field_has_a_flag():
    args = cli.build_parser().parse_args(["demo"])
    settable = {f for f in vars(args) if f not in ("command", "quick")}
    missing = {f.name for f in fields(demo.DemoConfig)} - settable - {"sparsities"}
    assert not missing
