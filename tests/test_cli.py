"""The ``bingo`` command line: --version, the demo smoke run, error handling."""

import json
import os
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
        "bingo demo: error: --literal applies only to --score seed (the paper's formula)")
    assert not (tmp_path / "report.json").exists()


def test_bingo_error_from_main_returns_2(monkeypatch, capsys):
    def fail(config):
        raise InvalidOptionError("fraction must be in (0, 1], got 2.0")

    monkeypatch.setattr(demo, "run", fail)
    assert cli.main(["demo", "--fraction", "2"]) == 2
    assert capsys.readouterr().err == "bingo demo: error: --fraction must be in (0, 1], got 2.0\n"


def test_invalid_search_option_is_reported_without_traceback(capsys, tmp_path):
    assert cli.main(["demo", "--fraction", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "fraction must be in (0, 1]" in err and "Traceback" not in err


def test_out_that_is_a_file_is_an_error(capsys, tmp_path):
    target = tmp_path / "file"
    target.write_text("")
    assert cli.main(["demo", "--quick", "--out", str(target)]) == 2
    assert capsys.readouterr().err == (f"bingo demo: error: --out {target} is a file, not a "
                                       "directory; pass a directory\n")


def _no_work(monkeypatch):
    """Make every command's pipeline fail loudly if it starts."""
    import bingo.demo_pipeline
    import bingo.experiment.runner
    import bingo.gpt_pipeline

    def started(*args, **kwargs):
        raise AssertionError("the run started although its output directory is unusable")

    monkeypatch.setattr(bingo.demo_pipeline, "run_demo", started)
    monkeypatch.setattr(bingo.gpt_pipeline, "run_gpt", started)
    monkeypatch.setattr(bingo.experiment.runner, "load_dataset", started)


@pytest.mark.parametrize("argv", [["demo"], ["gpt", "--quick"],
                                  ["experiment", "mnist", "--quick"]])
@pytest.mark.parametrize("where", ["under a file", "under /proc"])
def test_unusable_out_is_refused_before_any_work(argv, where, tmp_path, monkeypatch, capsys):
    if where == "under /proc" and not os.path.isdir("/proc/self"):
        pytest.skip("no /proc here")
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run" if where == "under a file" else "/proc/bingo-nope"
    _no_work(monkeypatch)
    assert cli.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bingo {argv[0]}: error: --out {out} cannot be used as the output "
                          "directory: ")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_help_and_usage_errors_do_not_import_torch():
    code = ("import sys\n"
            "from bingo import cli\n"
            "for argv in ([], ['--help'], ['demo', '--help'], ['gpt', '--help'],\n"
            "             ['experiment', '--help'], ['demo', '--subsets', 'many'],\n"
            "             ['experiment', 'mnist', '--criteria', 'nope'], ['llm', '--help'],\n"
            "             ['llm', 'prune', '--help'], ['llm', 'bench', '--help'], ['llm'],\n"
            "             ['llm', 'prune', '--sparsity', 'x']):\n"
            "    try:\n"
            "        cli.main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_cli_choices_are_the_registries():
    from bingo import choices, data, estimators, gpt_pipeline, models, search, units

    assert choices.GRANULARITIES == units.GRANULARITIES
    assert choices.SCORES == tuple(estimators.ESTIMATORS)
    assert choices.METRICS == estimators.METRICS
    assert choices.RESETS == search.RESETS
    assert choices.DATASETS == tuple(data.DATASETS)
    assert choices.MODELS == tuple(models.MODELS)
    assert choices.ATTENTIONS == tuple(gpt_pipeline.ATTENTIONS)


@pytest.mark.parametrize("message, expected", [
    ("floor_drop must be in [0, 1), got 1.5", "--floor-drop must be in [0, 1), got 1.5"),
    ("literal=True applies only to score='seed' (the paper's formula)",
     "--literal applies only to --score seed (the paper's formula)"),
    ("pass it as data_dir=... or set BINGO_DATA=/path", "pass it as --data-dir ... or set "
                                                         "BINGO_DATA=/path"),
    ("rewind_step is only used with reset='rewind'", "--rewind-step is only used with --reset "
                                                     "rewind"),
    ("search_data=x and the seed's score", "search_data=x and the seed's score"),
])
def test_library_names_become_flags_on_the_command_line(message, expected):
    flags = {"floor_drop": "--floor-drop", "literal": "--literal", "score": "--score",
             "data_dir": "--data-dir", "rewind_step": "--rewind-step", "reset": "--reset",
             "seed": "--seed", "data": "--data"}
    assert cli.in_flag_words(message, flags) == expected


def test_bad_value_names_the_flag(capsys, tmp_path):
    assert cli.main(["demo", "--floor-drop", "1.5", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("bingo demo: error: --floor-drop must be in [0, 1), "
                                       "got 1.5\n")


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
    settable = {f for f in vars(args) if f not in ("command", "flags")}
    missing = {f.name for f in fields(demo.DemoConfig)} - settable - {"sparsities"}
    assert not missing


def test_gpt_flags_win_over_quick():
    from bingo import gpt

    args = cli.build_parser().parse_args(["gpt", "--quick", "--steps", "5", "--threads", "2"])
    config = gpt.config_from_args(args)
    assert (config.steps, config.threads, config.quick) == (5, 2, True)
    assert config.layers == gpt.QUICK["layers"]
    assert gpt.config_from_args(cli.build_parser().parse_args(["gpt"])) == gpt.GptConfig()


def test_every_command_runs_on_one_thread_by_default():
    from bingo import gpt
    from bingo.experiment import ExperimentConfig

    assert demo.DemoConfig().threads == gpt.GptConfig().threads == ExperimentConfig().threads == 1


@pytest.mark.parametrize("command, resumable", [("demo", False), ("gpt", True)])
def test_interrupt_says_whether_a_rerun_resumes(command, resumable, monkeypatch, capsys):
    module = __import__(cli.COMMANDS[command].module, fromlist=["main"])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "main", interrupted)
    assert cli.main([command]) == cli.INTERRUPTED
    err = capsys.readouterr().err
    assert err.startswith(f"bingo {command}: interrupted")
    assert ("rerun the same command to resume" in err) == resumable
