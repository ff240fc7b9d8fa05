"""Smoke tests of the benchmark scripts in bench/: the ``ci`` presets run, write the CSV schema
with rows for every provider, and refuse to time providers that compute something else.

Nothing here looks at the timings: performance is measured by the benchmarks, never asserted.
"""

import csv
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bingo_kernels as bk

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _module(name):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _values(rows, **match):
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


@pytest.fixture(scope="module")
def op_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("op")
    mrl = _module("bench_masked_reset_linear")
    path = mrl.main(["--preset", "ci", "--out-dir", str(out), "--name", "op"])
    return mrl, path


def test_op_bench_ci_csv(op_run):
    mrl, path = op_run
    bc = _module("bench_common")
    header, rows = _read(path)
    assert header == bc.COLUMNS
    preset = mrl.PRESETS["ci"]
    n_shapes = (len(preset["layers"]) * len(preset["subsets"]) * len(preset["batches"])
                * len(preset["dtypes"]) * len(preset["granularities"]) * len(preset["inputs"]))
    expected = ["naive_loop", "torch_backend", "vmap", "bmm_ceiling", "mask_hash"]
    expected += [f"{b}_backend" for b in bk.available_backends() if b != "torch"]
    for provider in expected:
        timed = _values(rows, provider=provider, metric="time")
        skipped = _values(rows, provider=provider, metric="skipped")
        assert len(timed) + len(skipped) == n_shapes, provider
        assert all(float(r["value"]) > 0 and r["unit"] == "ms" for r in timed)
        assert all(r["note"] for r in skipped), "a skipped provider must say why"
    # The CPU providers of the ci preset all run.
    for provider in ["naive_loop", "torch_backend", "vmap", "bmm_ceiling", "mask_hash"]:
        assert len(_values(rows, provider=provider, metric="time")) == n_shapes
    for r in rows:
        assert r["kernel"] == "masked_reset_linear"
        assert r["device"] == "cpu" and r["torch_version"] == torch.__version__
        assert r["triton_version"] and r["date"] and r["device_name"]
    speedups = _values(rows, provider="naive_loop", metric="speedup_vs_naive_loop")
    assert speedups and all(float(r["value"]) == 1.0 for r in speedups)
    assert path.with_suffix(".md").read_text().count("| provider |") == n_shapes


def test_op_bench_providers_agree(op_run):
    """Every compared provider matched the reference before it was timed."""
    mrl, path = op_run
    _, rows = _read(path)
    for provider in ["torch_backend", "vmap", "bmm_ceiling"]:
        diffs = _values(rows, provider=provider, metric="max_abs_diff_vs_ref")
        assert len(diffs) == len(_values(rows, provider=provider, metric="time"))
        for r in diffs:
            assert float(r["value"]) <= mrl.TOLERANCE[torch.float32]
            assert "naive_loop" in r["note"]


def test_op_bench_refuses_wrong_results(tmp_path, monkeypatch):
    mrl = _module("bench_masked_reset_linear")
    real = bk.masked_reset_linear
    monkeypatch.setattr(bk, "masked_reset_linear", lambda *a, **k: real(*a, **k) + 1e-2)
    with pytest.raises(mrl.MismatchError, match="torch_backend disagrees with naive_loop"):
        mrl.main(["--preset", "ci", "--out-dir", str(tmp_path), "--subsets", "3",
                  "--inputs", "shared", "--granularities", "weight"])
    assert not list(tmp_path.glob("*.csv")), "no results may be written for wrong code"


def test_op_helpers_match_backend():
    """The naive implementation the benchmarks use is itself the op (on a bf16 shape too)."""
    mrl = _module("bench_masked_reset_linear")
    for dtype in (torch.float32, torch.bfloat16):
        for gran in ("neuron", "weight"):
            shape = mrl.Shape(12, 7, 5, 3, dtype, gran, shared=False)
            inp = mrl.make_inputs(shape, torch.device("cpu"))
            args = [inp[k] for k in ("x", "weight", "init_weight", "bias", "init_bias", "masks")]
            ref = bk.masked_reset_linear(*args, backend="torch")
            mrl.check_output("naive", mrl.naive_masked_reset_linear(*args), ref, "torch", shape)


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    bs = _module("bench_search")
    path = bs.main(["--preset", "ci", "--out-dir", str(out), "--name", "search"])
    return bs, path


def test_search_bench_ci_csv(search_run):
    bs, path = search_run
    bc = _module("bench_common")
    header, rows = _read(path)
    assert header == bc.COLUMNS
    preset = bs.PRESETS["ci"]
    n_configs = len(preset["subsets"]) * len(preset["batches"]) * len(preset["granularities"])
    for provider in ["naive_loop", "ticket_search", "ticket_search_vmap"]:
        timed = _values(rows, provider=provider, metric="time")
        assert len(timed) == n_configs, provider
        assert all(float(r["value"]) > 0 and r["unit"] == "ms/search" for r in timed)
        assert len(_values(rows, provider=provider, metric="speedup_vs_naive_loop")) == n_configs
    for provider in ["ticket_search", "ticket_search_vmap"]:
        diffs = _values(rows, provider=provider, metric="max_abs_diff_vs_ref")
        assert len(diffs) == n_configs
        assert all(float(r["value"]) <= bs.LOSS_TOL[torch.float32] for r in diffs)
    hashes = _values(rows, provider="mask_hash", metric="time")
    assert len(hashes) == n_configs and all(float(r["value"]) > 0 for r in hashes)
    assert not _values(rows, provider="mask_hash", metric="speedup_vs_naive_loop")
    assert {r["granularity"] for r in rows} == set(preset["granularities"])
    assert all(r["model"] == "lenet_300_100" for r in rows)
    assert _values(rows, provider="ticket_search", metric="time")[0]["note"] == "path=fast"


def test_search_bench_refuses_wrong_results(tmp_path, monkeypatch):
    bs = _module("bench_search")
    real = bs.NaiveSearch._metrics
    monkeypatch.setattr(bs.NaiveSearch, "_metrics",
                        staticmethod(lambda logits, t: (real(logits, t)[0] + 0.1, real(logits, t)[1])))
    with pytest.raises(bs.MismatchError, match="losses differ"):
        bs.main(["--preset", "ci", "--out-dir", str(tmp_path), "--granularities", "neuron"])


def test_plot_and_append(op_run, search_run, tmp_path):
    plot = _module("plot")
    written = plot.main([str(op_run[1]), str(search_run[1]), "--out-dir", str(tmp_path)])
    assert len(written) == 4  # 2 granularities x (op layer, search model)
    assert all(p.stat().st_size > 0 for p in written)


def test_scripts_run_as_commands(tmp_path):
    """The CLI entry point (as documented in bench/README.md), with append into one file."""
    cmd = [sys.executable, str(BENCH / "bench_masked_reset_linear.py"), "--preset", "ci",
           "--subsets", "2", "--inputs", "shared", "--granularities", "neuron",
           "--out-dir", str(tmp_path), "--name", "both"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    cmd = [sys.executable, str(BENCH / "bench_search.py"), "--preset", "ci", "--subsets", "2",
           "--granularities", "neuron", "--providers", "naive_loop", "ticket_search",
           "--out-dir", str(tmp_path), "--name", "both", "--append"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    header, rows = _read(tmp_path / "both.csv")
    assert {r["kernel"] for r in rows} == {"masked_reset_linear", "ticket_search_step"}
    md = (tmp_path / "both.md").read_text()
    assert "# masked_reset_linear" in md and "# ticket_search_step" in md


def test_elimination_bench_ci_csv(tmp_path):
    pytest.importorskip("transformers")
    be = _module("bench_elimination")
    path = be.main(["--preset", "ci", "--out-dir", str(tmp_path), "--name", "elimination"])
    header, rows = _read(path)
    assert header == _module("bench_common").COLUMNS
    for provider in ("batched", "one_at_a_time"):
        for metric, unit in (("time", "ms"), ("candidates_per_s", "1/s")):
            found = _values(rows, provider=provider, metric=metric)
            assert len(found) == 1 and float(found[0]["value"]) > 0 and found[0]["unit"] == unit
    assert len(_values(rows, provider="batched", metric="speedup")) == 1
    assert {r["kernel"] for r in rows} == {"elimination_candidates"}


def test_elimination_bench_refuses_wrong_results(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    be = _module("bench_elimination")
    real = be.one_at_a_time
    monkeypatch.setattr(be, "one_at_a_time",
                        lambda *a: (real(*a)[0] + 0.1, real(*a)[1]))
    with pytest.raises(be.MismatchError, match="disagree"):
        be.main(["--preset", "ci", "--out-dir", str(tmp_path)])
    assert not list(tmp_path.glob("*.csv")), "no results may be written for wrong code"
