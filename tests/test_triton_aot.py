"""The kernels compiled for Hopper (sm_90) without a GPU: what the interpreter cannot check.

``bench/kernel_resources.py`` compiles every Triton kernel the ops launch (each constexpr
variant and dtype; :mod:`bingo_kernels.triton.aot`) and the cuda backend's kernels, and reads
the cubins back. These tests hold the compiled code to the design: it compiles at all (tl.dot
shape/dtype rules, shared memory), fp16/bf16 matmuls run on tensor cores (Hopper's wgmma where
the tile allows), fp32 never silently becomes TF32 (the torch backend is IEEE fp32), and every
launch has a tile that does not spill. The script runs in a subprocess: this test session
imports the kernels under TRITON_INTERPRET=1, and ``triton.jit`` decides at import.
"""

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("triton")

from bingo_kernels import cubin  # noqa: E402
from bingo_kernels.cuda import build  # noqa: E402
from bingo_kernels.triton import aot  # noqa: E402  (imports no kernel module)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "kernel_resources.py"
GEMMS = {"_pair_gemm_kernel", "_row_select_kernel", "_weight_blend_kernel",
         "_linear_metrics_kernel"}
SHARED_LIMIT_SM90 = 232448  # bytes one block may use on Hopper (opt-in maximum)
SPILL_TOLERANCE = 16  # stack bytes per thread: a few spilled words, not a spilling inner loop
HALF = ("fp16", "bf16")


def _launchers():
    """Kernel name -> its launcher (interpreted in this session, but with the same autotuning
    configurations a compiled one has)."""
    return {launch.kernel.fn.__name__: launch for _, _, launch in aot.launchers()}


def _run(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--out-dir",
                           str(tmp_path), "--name", name, "--json", str(out), *args],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, f"kernel_resources failed:\n{done.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Every launch variant of every dtype with every autotuning configuration, and the cuda
    kernels where nvcc is (the table bench/results/kernel-resources-* records)."""
    try:
        cubin.cuobjdump_path()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    # The script's own lookup (bingo_kernels.cuda.build.cuda_home), not an import of the script:
    # it sets TRITON_INTERPRET=0 for its process.
    providers = ["triton", "cuda"] if build.cuda_home() is not None else ["triton"]
    return _run(tmp_path_factory.mktemp("aot"), "resources", "--providers", *providers)


def _triton(rows):
    return [r for r in rows if r["provider"] == "triton"]


def _largest_tile(rows):
    """The rows compiled with their launcher's largest configuration."""
    largest = {name: aot.config_text(aot.largest_config(launch.configs))
               for name, launch in _launchers().items()}
    return [row for row in rows if row["config"] == largest[row["kernel"]]]


def test_every_launch_variant_and_config_compiles_for_sm90(compiled):
    rows = _triton(compiled)
    assert {r["kernel"] for r in rows} == GEMMS | {
        "_column_select_kernel", "_metrics_kernel", "_unit_sums_kernel"}
    assert {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16"}
    per_launch = Counter((r["kernel"], r["variant"]) for r in rows)
    # Each launch compiled once per configuration of its autotuning space.
    expected = {name: len(launch.configs) for name, launch in _launchers().items()}
    assert all(count == expected[kernel] for (kernel, _), count in per_launch.items()), \
        (per_launch, expected)


def test_shared_memory_fits_one_hopper_block(compiled):
    for row in _triton(compiled):
        assert row["SHARED"] + row["DYNAMIC_SHARED"] <= SHARED_LIMIT_SM90, row


def test_half_precision_matmuls_use_tensor_cores(compiled):
    half = [r for r in _triton(compiled) if r["kernel"] in GEMMS and r["dtype"] in HALF]
    assert half
    for row in half:
        assert row["HGMMA"] + row["HMMA"] > 0, row
    # The largest tiles (>= 64 rows per warpgroup) take Hopper's wgmma, not only mma.sync.
    biggest = _largest_tile(half)
    assert len(biggest) == len({(r["kernel"], r["variant"]) for r in half})
    for row in biggest:
        assert row["HGMMA"] > 0, row


def test_fp32_matmuls_stay_ieee(compiled):
    """No TF32: fp32 results must stay within fp32 tolerances of the torch backend."""
    fp32 = [r for r in _triton(compiled) if r["kernel"] in GEMMS and r["dtype"] == "fp32"]
    assert fp32
    for row in fp32:
        assert row["HGMMA"] == 0 and row["HMMA"] == 0 and row["FFMA"] > 0, row


def test_every_launch_has_a_tile_that_does_not_spill(compiled):
    """The autotuner always has a tile that keeps its registers (spilling at most a few words
    per thread): without one, every choice it could make goes through local memory."""
    least = {}
    for row in _triton(compiled):
        key = (row["kernel"], row["variant"])
        least[key] = min(least.get(key, math.inf), row["STACK"])
    spilling = {key: stack for key, stack in least.items() if stack > SPILL_TOLERANCE}
    assert not spilling, spilling


def test_cuda_backend_gemms_use_tensor_cores(compiled):
    cuda = [r for r in compiled if r["provider"] == "cuda"]
    if not cuda:
        pytest.skip("nvcc not found: the cuda kernels were not compiled")
    linear = [r for r in cuda if r["kernel"].endswith("linear_kernel")]
    assert {r["dtype"] for r in linear} >= {"fp16", "bf16", "fp32"}
    for row in linear:
        if row["dtype"] in HALF:
            assert row["HMMA"] > 0, row
        else:
            assert row["HMMA"] == 0 and row["HGMMA"] == 0, row


def test_capture_refuses_interpreted_kernels():
    """Under the interpreter (as in this test session) there is nothing to compile."""
    from bingo_kernels.triton import interpreter_requested  # noqa: PLC0415

    if not interpreter_requested():
        pytest.skip("the kernels are compiled in this session")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        with aot.capture():
            pass


def test_opcode_counts_read_modifiers_and_predicates():
    listing = """
        /*0100*/                   HGMMA.64x64x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
        /*0110*/              @P0  FFMA R1, R2, R3, R4 ;
        /*0120*/             @!P1  STL [R1+0x4], R5 ;
        /*0130*/                   HMMA.16816.F32.BF16 R8, R12, R14, R8 ;
        /*0140*/                   FFMA R1, R2, R3, R4 ;
    """
    counts = cubin.opcode_counts(listing)
    assert (counts["HGMMA"], counts["HMMA"], counts["FFMA"], counts["STL"]) == (1, 1, 2, 1)
    assert counts["LDG"] == 0


def test_a_failing_cuobjdump_is_reported(monkeypatch):
    monkeypatch.setattr(cubin, "cuobjdump_path",
                        lambda: str(Path(shutil.which("false") or "/bin/false")))
    with pytest.raises(RuntimeError, match="failed"):
        cubin.resource_usage(b"not a cubin")
