"""pytest-benchmark CPU micro-benchmarks: masked_reset_linear's torch backend vs the naive loop.

Run explicitly (the main suite's ``testpaths`` is ``tests/``, so plain ``pytest`` never collects
this file)::

    python -m pytest bench/test_micro.py --benchmark-only
    python -m pytest bench/test_micro.py --benchmark-only --benchmark-compare  # vs a saved run

Each benchmark also checks that the two implementations agree, but nothing here asserts a speed:
performance is reported, never tested.
"""

import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_masked_reset_linear as mrl  # noqa: E402  (also puts the checkout on sys.path)

import torch  # noqa: E402

import bingo_kernels as bk  # noqa: E402

# Small enough for a few hundred rounds in seconds on a laptop core.
B, IN, OUT, K = 32, 256, 128, 16


def _inputs(granularity: str, shared: bool) -> dict:
    shape = mrl.Shape(IN, OUT, B, K, torch.float32, granularity, shared)
    return mrl.make_inputs(shape, torch.device("cpu"))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("impl", ["torch_backend", "naive_loop"])
def test_masked_reset_linear(benchmark, impl, granularity, shared):
    inp = _inputs(granularity, shared)
    args = [inp[k] for k in ("x", "weight", "init_weight", "bias", "init_bias", "masks")]
    if impl == "torch_backend":
        def fn():
            return bk.masked_reset_linear(*args, backend="torch")
    else:
        def fn():
            return mrl.naive_masked_reset_linear(*args)
    benchmark.group = f"masked_reset_linear {IN}x{OUT} B={B} K={K} {granularity} " + \
        ("shared" if shared else "per_subset")
    benchmark.extra_info.update(in_features=IN, out_features=OUT, batch=B, subsets=K,
                                torch_version=torch.__version__,
                                threads=torch.get_num_threads())
    out = benchmark(fn)
    ref = mrl.naive_masked_reset_linear(*args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
