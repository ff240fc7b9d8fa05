"""The triton backend's own checks: registration, the interpreter, launches, the hash kernel.

The kernels' correctness (vs a float64 oracle and the torch backend, masks regenerated bit for
bit, TicketSearch == backend="torch") is tested with the cuda backend's in
test_accelerated_kernels.py. Without a GPU the kernels run in Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set by tests/conftest.py) on CPU tensors; on a CUDA machine run with
``TRITON_INTERPRET=0`` (as bench/gpu_validation.sh does) and the same tests check the compiled
kernels on CUDA tensors, plus the GPU-only ones (opcheck of the CUDA registration,
``backend="auto"`` dispatch).
"""

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

import bingo_kernels as bk  # noqa: E402
from bingo_kernels import BackendUnavailableError, SubsetMasks, subset_mask  # noqa: E402
from bingo_kernels import triton as bkt  # noqa: E402
from kernel_helpers import (backend_device, cnn, count_triton_launches,  # noqa: E402
                            refuse_reference, run_search, sampler)

if bk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {bk.unavailable_reason('triton')}",
                allow_module_level=True)

INTERPRETED = bkt.interpreter_requested()
DEVICE = backend_device("triton")
gpu_only = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(),
                              reason="needs compiled kernels on a CUDA device")


@pytest.fixture
def launches(monkeypatch):
    """Counts the launches of every triton kernel (by name) during a test."""
    return count_triton_launches(monkeypatch)


# --- registration -------------------------------------------------------------------------------

def test_backend_registered_where_it_can_run():
    assert "triton" in bk.available_backends()
    devices = bk.backends.supported_devices("triton")
    assert ("cpu" in devices) == INTERPRETED and "cuda" in devices
    if INTERPRETED:
        assert bk.resolve_backend("triton", "cpu") == "triton"
        assert type(importlib.import_module("bingo_kernels.triton.linear")._weight_blend_kernel
                    ).__name__ == "InterpretedFunction"
    assert bk.resolve_backend("auto", "cpu") == "torch"


def test_unavailable_reasons_name_the_cause(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "TRITON_INTERPRET" in bk.unavailable_reason("triton")
    assert "cpu" not in bk.backends.supported_devices("triton")
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        bk.resolve_backend("triton", "cpu")
    # The import check is cached: fake a fresh one (monkeypatch restores the real cache after).
    monkeypatch.setattr(bkt, "_IMPORT_TRIED", False)
    monkeypatch.setattr(bkt, "_IMPORT_ERROR", None)
    monkeypatch.setattr(bkt.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in bk.unavailable_reason("triton")


def test_importing_bingo_does_not_import_triton():
    """triton is an optional extra and takes seconds to import: only the first kernel call does."""
    code = "import sys, bingo, bingo_kernels; assert 'triton' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernels_run_not_the_torch_reference(launches, monkeypatch):
    refuse_reference(monkeypatch, "triton")
    randn = sampler(torch.Generator().manual_seed(0), DEVICE)
    x, w, w0, b, b0 = randn(4, 6), randn(5, 6), randn(5, 6), randn(5), randn(5)
    for granularity in ("neuron", "weight"):
        for xin in (x, randn(3, 4, 6)):
            bk.masked_reset_linear(xin, w, w0, b, b0, SubsetMasks(1, 2, 0, 3, 0, 0.3, granularity),
                                   backend="triton")
    bk.subset_metrics(randn(3, 4, 5), torch.tensor([0, 1, 4, -100], device=DEVICE),
                      backend="triton")
    bk.subset_unit_sums(randn(3, 2), SubsetMasks(1, 2, 0, 3, 0, 0.3), 30, backend="triton")
    assert set(launches) == {"_pair_gemm", "_column_select", "_row_select", "_weight_blend",
                             "_metrics", "_unit_sums"}, launches


# --- masks bit for bit -------------------------------------------------------------------------

MASK_CASES = [  # seed, search, k_start, K, unit_offset, units, prob
    (0, 0, 0, 3, 0, 200, 0.05),
    (123456789, 7, 100, 5, 5_000, 300, 0.5),
    (2**32 - 1, 2**32 - 1, 2**31, 4, 2**40 + 3, 257, 0.3),
    (5, 5, 2**32 - 4, 4, 2**32 - 100, 300, 0.5),        # units cross a 2**32 boundary
    (77, 1, 0, 6, 3 * 2**32 - 1, 129, "per-unit"),       # carry into the high half at unit 1
    (31, 2, 0, 3, 2**63 - 100, 300, 0.4),                # units cross 2**63 (past int64)
    (31, 2, 0, 3, 2**64 - 129, 129, 0.4),                # the last uint64 unit indices
    (9, 0, 0, 2, 0, 64, 0.0), (9, 0, 0, 2, 0, 64, 1.0),
]


@pytest.mark.parametrize("case", MASK_CASES)
def test_triton_hash_matches_spec_bit_for_bit(case):
    from bingo_kernels.triton.hashing import materialize_masks

    seed, search, k_start, K, offset, U, p = case
    if p == "per-unit":
        p = torch.rand(U)
        p[:10], p[10:20] = 0.0, 1.0
    got = materialize_masks(seed, search, k_start, K, offset, U, p, DEVICE)
    assert torch.equal(got.cpu(), subset_mask(seed, search, k_start, K, offset, U, p))


# --- TicketSearch on a conv model ----------------------------------------------------------------

def test_ticket_search_on_a_conv_model_falls_back_to_vmap_with_a_reason():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = run_search("triton", cnn, "neuron", "init", DEVICE)
    assert fast.path == "vmap"
    assert "masked_reset_conv2d" in fast.evaluator.path_reason
    assert any("masked_reset_conv2d" in str(w.message) for w in caught)
    ref = run_search("torch", cnn, "neuron", "init", DEVICE)
    for name, sig in ref.significance().items():
        assert torch.allclose(fast.significance()[name], sig, atol=1e-4), name
    with pytest.raises(BackendUnavailableError, match="masked_reset_conv2d"):
        run_search("triton", cnn, "neuron", "init", DEVICE, steps=1, path="fast")


# --- GPU only ------------------------------------------------------------------------------------

@gpu_only
def test_opcheck_cuda_registration():
    from torch.library import opcheck

    x, w, w0, b, b0 = (torch.randn(5, 4, device="cuda"), torch.randn(3, 4, device="cuda"),
                       torch.randn(3, 4, device="cuda"), torch.randn(3, device="cuda"),
                       torch.randn(3, device="cuda"))
    opcheck(torch.ops.bingo.masked_reset_linear.default,
            (x, w, w0, b, b0, None, None, 0.5, 1, 2, 0, 4, 0, "weight"))
    opcheck(torch.ops.bingo.masked_reset_linear.default,
            (x, w, None, b, None, torch.rand(2, 3, device="cuda") < 0.5, None, -1.0, 0, 0, 0, 2,
             0, "neuron"))
    opcheck(torch.ops.bingo.subset_metrics.default,
            (torch.randn(3, 8, 5, device="cuda"), torch.randint(0, 5, (8,), device="cuda"), -100))
    opcheck(torch.ops.bingo.subset_unit_sums.default,
            (torch.randn(6, 3, device="cuda"), None, None, 0.2, 0, 0, 0, 0, 50))


@gpu_only
def test_auto_dispatches_cuda_tensors_to_triton(launches, monkeypatch):
    refuse_reference(monkeypatch, "triton")
    assert bk.resolve_backend("auto", "cuda") == "triton"
    x, w = torch.randn(4, 6, device="cuda"), torch.randn(5, 6, device="cuda")
    y = bk.masked_reset_linear(x, w, None, None, None, SubsetMasks(0, 0, 0, 3, 0, 0.5, "weight"))
    assert y.shape == (3, 4, 5) and launches.get("_weight_blend") == 1
