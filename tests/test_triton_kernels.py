"""The triton backend: kernels vs a float64 oracle and the torch backend, masks bit for bit.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py) on CPU tensors; on a CUDA machine run with ``TRITON_INTERPRET=0`` (as
bench/gpu_validation.sh does) and the same tests check the compiled kernels on CUDA tensors,
plus the GPU-only ones (bf16, opcheck of the CUDA registration, ``backend="auto"`` dispatch).

Inputs are fresh random numbers on every run; each test's seed is in its assertion messages.
Tolerances, relative to the oracle's largest magnitude (at least 1): fp32 1e-5 (same order as
the torch backend's own error), fp16 1e-2 and bf16 4e-2 against float64 (the input rounding
dominates); against the torch backend in the same dtype 1e-5 / 5e-3 / 3e-2.
Shapes stay small (<= 64) because the interpreter runs every program instance in Python.
"""

import importlib
import random
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

import bingo  # noqa: E402
import bingo_kernels as bk  # noqa: E402
from bingo_kernels import BackendUnavailableError, SubsetMasks, reference, subset_mask  # noqa: E402
from bingo_kernels import triton as bkt  # noqa: E402

if bk.unavailable_reason("triton") is not None:
    pytest.skip(f"triton backend unavailable: {bk.unavailable_reason('triton')}",
                allow_module_level=True)

INTERPRETED = bkt.interpreter_requested()
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
ORACLE_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2,
              torch.float64: 1e-12}
TORCH_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2,
             torch.float64: 1e-12}
# Triton 3.9's interpreter computes garbage for tl.dot on bf16 tiles (checked with a 16x16
# kernel outside bingo), so bf16 matmuls are tested on a GPU only.
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRETED, reason="the Triton interpreter's tl.dot mis-handles bf16; GPU-only"))
gpu_only = pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(),
                              reason="needs compiled kernels on a CUDA device")


def _generator():
    seed = random.SystemRandom().randrange(2**31)
    return seed, torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def _close(got, ref, tol, what):
    scale = ref.abs().max().clamp_min(1.0).item() if ref.numel() else 1.0
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def _oracle_linear(x, w, w0, b, b0, masks, granularity):
    """float64, one subset at a time, blended weights written out."""
    x, w = x.double().cpu(), w.double().cpu()
    masks = masks.cpu()
    w0 = torch.zeros_like(w) if w0 is None else w0.double().cpu()
    b = None if b is None else b.double().cpu()
    b0 = (None if b is None else torch.zeros_like(b)) if b0 is None else b0.double().cpu()
    outs = []
    for k in range(masks.shape[0]):
        xk = x if x.dim() == 2 else x[k]
        if granularity == "neuron":
            wk = torch.where(masks[k][:, None], w0, w)
            bk_ = None if b is None else torch.where(masks[k], b0, b)
        else:
            wk, bk_ = torch.where(masks[k].view_as(w), w0, w), b
        outs.append(F.linear(xk, wk, bk_))
    return torch.stack(outs)


@pytest.fixture
def launches(monkeypatch):
    """Counts the launches of every triton kernel (by name) during a test."""
    counts = {}
    for module, names in (("linear", ["_pair_gemm", "_column_select", "_row_select",
                                       "_weight_blend"]),
                          ("metrics", ["_metrics"]), ("unit_sums", ["_unit_sums"])):
        mod = importlib.import_module(f"bingo_kernels.triton.{module}")
        for name in names:
            def counted(*args, _original=getattr(mod, name), _name=name, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(mod, name, counted)
    return counts


def _refuse_reference(monkeypatch):
    """Make any call of the torch reference ops fail (proves there is no silent fallback)."""
    for op in ("masked_reset_linear", "subset_metrics", "subset_unit_sums"):
        def refuse(*args, _op=op, **kwargs):
            raise AssertionError(f"the triton backend fell back to reference.{_op}")

        monkeypatch.setattr(reference, op, refuse)


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


def test_conv2d_is_not_implemented_and_named():
    x, w = _randn(torch.Generator(), 1, 2, 5, 5), _randn(torch.Generator(), 3, 2, 3, 3)
    with pytest.raises(BackendUnavailableError, match="triton.*masked_reset_conv2d"):
        bk.masked_reset_conv2d(x, w, None, None, None, SubsetMasks(0, 0, 0, 2, 0, 0.5, "neuron"),
                               backend="triton")


def test_kernels_run_not_the_torch_reference(launches, monkeypatch):
    _refuse_reference(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x, w, w0, b, b0 = (_randn(g, 4, 6), _randn(g, 5, 6), _randn(g, 5, 6), _randn(g, 5),
                       _randn(g, 5))
    for granularity in ("neuron", "weight"):
        for xin in (x, _randn(g, 3, 4, 6)):
            bk.masked_reset_linear(xin, w, w0, b, b0, SubsetMasks(1, 2, 0, 3, 0, 0.3, granularity),
                                   backend="triton")
    bk.subset_metrics(_randn(g, 3, 4, 5), torch.tensor([0, 1, 4, -100], device=DEVICE),
                      backend="triton")
    bk.subset_unit_sums(_randn(g, 3, 2), SubsetMasks(1, 2, 0, 3, 0, 0.3), 30, backend="triton")
    assert set(launches) == {"_pair_gemm", "_column_select", "_row_select", "_weight_blend",
                             "_metrics", "_unit_sums"}, launches


# --- masks bit for bit -------------------------------------------------------------------------

MASK_CASES = [  # seed, search, k_start, K, unit_offset, units, prob
    (0, 0, 0, 3, 0, 200, 0.05),
    (123456789, 7, 100, 5, 5_000, 300, 0.5),
    (2**32 - 1, 2**32 - 1, 2**31, 4, 2**40 + 3, 257, 0.3),
    (5, 5, 2**32 - 4, 4, 2**32 - 100, 300, 0.5),        # units cross a 2**32 boundary
    (77, 1, 0, 6, 3 * 2**32 - 1, 129, "per-unit"),       # carry into the high half at unit 1
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


@pytest.mark.parametrize("granularity,shared", [("neuron", True), ("neuron", False),
                                                ("weight", True), ("weight", False)])
@pytest.mark.parametrize("offset", [0, 2**32 - 37, 2**41 + 5])
def test_linear_kernels_regenerate_the_spec_masks(granularity, shared, offset):
    """W = 0, W0 = 1 and one-hot inputs make the output *be* the masks the kernel generated."""
    fin, fout, K = 13, 21, 5
    eye = torch.eye(fin, device=DEVICE)
    x = eye if shared else eye.expand(K, fin, fin).contiguous()
    w, w0 = torch.zeros(fout, fin, device=DEVICE), torch.ones(fout, fin, device=DEVICE)
    spec = SubsetMasks(31, 4, 2**31 + 9, K, offset, 0.35, granularity)
    y = bk.masked_reset_linear(x, w, w0, None, None, spec, backend="triton")
    if granularity == "neuron":
        expected = spec.materialize(fout)[:, None, :].expand(K, fin, fout)
    else:  # y[k, i, j] = mask[k, j * fin + i]
        expected = spec.materialize(fout * fin).view(K, fout, fin).transpose(1, 2)
    assert torch.equal(y.cpu() == 1.0, expected)
    assert bool(((y == 0) | (y == 1)).all())


@pytest.mark.parametrize("offset", [0, 2**32 - 100, 2**40])
def test_unit_sums_kernel_regenerates_the_spec_masks(offset):
    K, U = 7, 333
    p = torch.rand(U)
    spec = SubsetMasks(8, 2, 40, K, offset, p, "weight")
    sums = bk.subset_unit_sums(torch.eye(K, device=DEVICE), spec, U, backend="triton")
    assert torch.equal(sums.cpu().t() == 1.0, spec.materialize(U))


# --- masked_reset_linear -----------------------------------------------------------------------

SHAPES = [  # (batch, in, out, K): tile remainders, K = 1, in = 1, out = 1
    (7, 5, 3, 4), (1, 1, 1, 1), (16, 33, 17, 3), (3, 64, 1, 2), (5, 1, 12, 3), (17, 40, 50, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
@pytest.mark.parametrize("reset", ["init", "zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_masked_reset_linear(shape, granularity, shared, reset, dtype):
    N, fin, fout, K = shape
    seed, g = _generator()
    x = _randn(g, *((N, fin) if shared else (K, N, fin)), dtype=dtype)
    w, b = _randn(g, fout, fin, dtype=dtype), _randn(g, fout, dtype=dtype)
    w0 = _randn(g, fout, fin, dtype=dtype) if reset == "init" else None
    b0 = _randn(g, fout, dtype=dtype) if reset == "init" else None
    spec = SubsetMasks(seed, 3, 5, K, 17 + seed, 0.4, granularity)
    y = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend="triton")
    assert y.shape == (K, N, fout) and y.dtype == dtype and y.device.type == DEVICE.type
    units = fout if granularity == "neuron" else fout * fin
    ref = _oracle_linear(x, w, w0, b, b0, spec.materialize(units), granularity)
    _close(y.cpu(), ref, ORACLE_TOL[dtype], f"vs float64 oracle (seed {seed})")
    if dtype != torch.bfloat16 or DEVICE.type == "cuda":
        torch_y = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend="torch")
        _close(y, torch_y, TORCH_TOL[dtype], f"vs torch backend (seed {seed})")


@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
def test_per_unit_and_extreme_probabilities(granularity, shared):
    seed, g = _generator()
    N, fin, fout, K = 6, 10, 9, 4
    x = _randn(g, *((N, fin) if shared else (K, N, fin)))
    w, w0, b, b0 = _randn(g, fout, fin), _randn(g, fout, fin), _randn(g, fout), _randn(g, fout)
    units = fout if granularity == "neuron" else fout * fin
    p = torch.rand(units, generator=g)
    p[:2], p[2:4] = 0.0, 1.0
    for prob in (p.to(DEVICE), 0.0, 1.0):
        spec = SubsetMasks(seed, 0, 0, K, 3, prob, granularity)
        y = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend="triton")
        ref = _oracle_linear(x, w, w0, b, b0, spec.materialize(units), granularity)
        _close(y.cpu(), ref, 1e-5, f"prob {'per-unit' if isinstance(prob, torch.Tensor) else prob}"
               f" (seed {seed})")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
@pytest.mark.parametrize("reset", ["init", "zero"])
def test_explicit_neuron_masks(shared, reset):
    seed, g = _generator()
    N, fin, fout, K = 5, 12, 19, 6
    x = _randn(g, *((N, fin) if shared else (K, N, fin)))
    w, b = _randn(g, fout, fin), _randn(g, fout)
    w0, b0 = (_randn(g, fout, fin), _randn(g, fout)) if reset == "init" else (None, None)
    masks = torch.rand(fout, K, generator=g).to(DEVICE).t() < 0.5  # non-contiguous
    y = bk.masked_reset_linear(x, w, w0, b, b0, masks, backend="triton")
    _close(y.cpu(), _oracle_linear(x, w, w0, b, b0, masks, "neuron"), 1e-5, f"seed {seed}")


@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
def test_non_contiguous_inputs(granularity, shared):
    """Transposed and sliced views are read through their strides, not copied or misread."""
    seed, g = _generator()
    N, fin, fout, K = 6, 11, 7, 3
    x = (_randn(g, fin, N).t() if shared else _randn(g, K, 2 * N, fin + 3)[:, ::2, 1:fin + 1])
    w = _randn(g, fin, fout).t()
    w0 = _randn(g, fout, 2 * fin)[:, ::2]
    b, b0 = _randn(g, 2 * fout)[::2], _randn(g, fout)
    assert not (x.is_contiguous() or w.is_contiguous() or w0.is_contiguous() or b.is_contiguous())
    spec = SubsetMasks(seed, 1, 0, K, 0, 0.5, granularity)
    y = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend="triton")
    units = fout if granularity == "neuron" else fout * fin
    _close(y.cpu(), _oracle_linear(x, w, w0, b, b0, spec.materialize(units), granularity), 1e-5,
           f"seed {seed}")


# --- subset_metrics ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 33, 7), (3, 17, 100), (2, 40, 33)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_subset_metrics(shape, dtype, ignore_index):
    seed, g = _generator()
    K, N, C = shape
    logits = _randn(g, K, N, C, dtype=dtype) * 3
    targets = torch.randint(0, C, (N,), generator=g)
    targets[::4] = ignore_index
    targets = targets.to(DEVICE)
    if N > 2 and C > 64:  # equal maxima in different class chunks: the first one wins
        logits[0, 1, :] = 0
        logits[0, 1, [5, 40, 90]] = 4
        targets[1] = 40
    loss, acc = bk.subset_metrics(logits, targets, ignore_index=ignore_index, backend="triton")
    ref_loss, ref_acc = reference.subset_metrics(logits.cpu(), targets.cpu(), ignore_index)
    valid = targets.cpu() != ignore_index
    for k in range(K):
        if valid.any():
            oracle = F.cross_entropy(logits[k].cpu().double(), targets.cpu(),
                                     ignore_index=ignore_index)
            _close(loss[k].cpu(), oracle, 1e-5, f"loss of subset {k} vs float64 (seed {seed})")
    _close(loss.cpu(), ref_loss, 1e-5, f"loss vs torch backend (seed {seed})")
    assert torch.equal(acc.cpu(), ref_acc), f"accuracy (seed {seed})"


def test_subset_metrics_non_contiguous_and_all_ignored():
    seed, g = _generator()
    logits = _randn(g, 9, 5, 3).permute(2, 1, 0)  # (3, 5, 9), strides (1, 9, 45)
    targets = torch.randint(0, 9, (5,), generator=g).to(DEVICE)
    loss, acc = bk.subset_metrics(logits, targets, backend="triton")
    ref_loss, ref_acc = reference.subset_metrics(logits.cpu(), targets.cpu(), -100)
    _close(loss.cpu(), ref_loss, 1e-5, f"seed {seed}")
    assert torch.equal(acc.cpu(), ref_acc)
    none = torch.full((5,), -100, device=DEVICE)
    loss, acc = bk.subset_metrics(logits, none, backend="triton")
    assert torch.equal(loss.cpu(), torch.zeros(3)) and torch.equal(acc.cpu(), torch.zeros(3))


# --- subset_unit_sums ----------------------------------------------------------------------------

@pytest.mark.parametrize("K,U,V", [(1, 1, 1), (37, 1500, 3), (5, 70, 20)])
@pytest.mark.parametrize("prob", ["scalar", "per-unit", "explicit"])
def test_subset_unit_sums(K, U, V, prob):
    seed, g = _generator()
    values = _randn(g, K, V)
    if prob == "explicit":
        masks = (torch.rand(U, K, generator=g) < 0.3).to(DEVICE).t()  # non-contiguous
        dense = masks.cpu()
    else:
        p = torch.rand(U, generator=g).to(DEVICE) if prob == "per-unit" else 0.3
        masks = SubsetMasks(seed, 9, 11, K, 2**32 - 7, p, "weight")
        dense = masks.materialize(U)
    sums = bk.subset_unit_sums(values, masks, U, backend="triton")
    assert sums.dtype == torch.float32 and sums.shape == (U, V)
    _close(sums.cpu(), dense.double().t() @ values.double().cpu(), 1e-5, f"seed {seed}")
    torch_sums = bk.subset_unit_sums(values, masks, U, backend="torch")
    _close(sums, torch_sums, 1e-5, f"vs torch backend (seed {seed})")


# --- TicketSearch end to end ---------------------------------------------------------------------

def _search(backend, model, granularity, reset, steps=3, **kwargs):
    torch.manual_seed(0)
    model = model().to(DEVICE)
    search = bingo.TicketSearch(model, granularity=granularity, subsets=6, fraction=0.25,
                                reset=reset, score="attribution", metric="loss", seed=11,
                                backend=backend, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(12, *IN_SHAPE[model[0].__class__], generator=g).to(DEVICE)
        y = torch.randint(0, 5, (12,), generator=g).to(DEVICE)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()  # the weights move away from init, so reset="init" changes something
        search.step(x, y)
    return search


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def _cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 5))


IN_SHAPE = {torch.nn.Linear: (10,), torch.nn.Conv2d: (1, 8, 8)}


@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("reset", ["init", "zero"])
def test_ticket_search_same_significance_as_torch(granularity, reset, launches, monkeypatch):
    with monkeypatch.context() as patch:
        _refuse_reference(patch)
        fast = _search("triton", _mlp, granularity, reset)
    assert fast.path == "fast"
    assert {"_metrics", "_unit_sums"} <= set(launches)
    assert launches.keys() & {"_column_select", "_row_select", "_weight_blend"}
    launches.clear()
    ref = _search("torch", _mlp, granularity, reset)
    assert not launches  # the torch run did not touch the triton kernels
    for a, b in zip(fast.history, ref.history):
        assert abs(a["after_loss"] - b["after_loss"]) < 1e-5
    sig_fast, sig_ref = fast.significance(), ref.significance()
    assert sig_fast.keys() == sig_ref.keys()
    for name in sig_ref:
        assert torch.equal(sig_fast.coverage[name], sig_ref.coverage[name]), name  # same masks
        assert torch.allclose(sig_fast[name], sig_ref[name], atol=1e-4), name


def test_ticket_search_on_a_conv_model_falls_back_to_vmap_with_a_reason():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = _search("triton", _cnn, "neuron", "init")
    assert fast.path == "vmap"
    assert "masked_reset_conv2d" in fast.evaluator.path_reason
    assert any("masked_reset_conv2d" in str(w.message) for w in caught)
    ref = _search("torch", _cnn, "neuron", "init")
    for name, sig in ref.significance().items():
        assert torch.allclose(fast.significance()[name], sig, atol=1e-4), name
    with pytest.raises(BackendUnavailableError, match="masked_reset_conv2d"):
        _search("triton", _cnn, "neuron", "init", steps=1, path="fast")


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
    _refuse_reference(monkeypatch)
    assert bk.resolve_backend("auto", "cuda") == "triton"
    x, w = torch.randn(4, 6, device="cuda"), torch.randn(5, 6, device="cuda")
    y = bk.masked_reset_linear(x, w, None, None, None, SubsetMasks(0, 0, 0, 3, 0, 0.5, "weight"))
    assert y.shape == (3, 4, 5) and launches.get("_weight_blend") == 1
