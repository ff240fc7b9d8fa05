"""The accelerated backends' kernels (``backend="triton"`` and ``"cuda"``), one correctness suite:
vs a float64 oracle and the torch backend, masks bit for bit, TicketSearch == backend="torch".

Every test runs once per backend, each skipping (with the reason) where its backend cannot run:

* triton: without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set
  by tests/conftest.py) on CPU tensors; on a CUDA machine with ``TRITON_INTERPRET=0`` (as
  bench/gpu_validation.sh runs) on CUDA tensors, compiled. bf16 matmuls only on a GPU.
* cuda (the C++/CUDA extension, csrc/): CUDA tensors only, on a CUDA build of torch with a GPU
  of compute capability >= 8.0 (the extension is built on first use). Where triton also runs,
  the cuda results are checked against it too (all three backends must agree), and fp64 is
  tested as well.

Inputs are fresh random numbers on every run; each test's seed is in its assertion messages.
Tolerances are in kernel_helpers (ORACLE_TOL, TORCH_TOL). Cases marked large run only where the
kernels are compiled: the interpreter runs every program instance in Python, so its shapes stay
small. Backend-specific checks (build, registration, interpreter, launch counts, hash programs)
are in test_triton_kernels.py and test_cuda_ext.py.
"""

import pytest
import torch
import torch.nn.functional as F

import bingo_kernels as bk
from bingo_kernels import BackendUnavailableError, SubsetMasks
from kernel_helpers import (ORACLE_TOL, TORCH_TOL, backend_device, close, count_triton_launches,
                            generator, interpreted, mlp, oracle_linear, refuse_reference,
                            run_search, sampler)

ACCELERATED = ("triton", "cuda")
SKIP = {name: pytest.mark.skipif(bk.unavailable_reason(name) is not None,
                                 reason=f"{name} backend unavailable here: "
                                        f"{bk.unavailable_reason(name)}")
        for name in ACCELERATED}
BACKENDS = [pytest.param(name, marks=SKIP[name]) for name in ACCELERATED]


def references(backend):
    """The backends whose results ``backend`` must reproduce: torch, and for cuda also triton where
    it runs (cuda tests run on a GPU only)."""
    return ["torch"] + (["triton"] if backend == "cuda" and "triton" in bk.available_backends()
                        else [])


def _id(value):
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value).removeprefix("torch.")


def per_backend(cases, large=()):
    """pytest params ``(backend, *case)`` for every accelerated backend, each skipping where its
    backend cannot run: ``cases`` everywhere, ``large`` only where the backend runs compiled.
    Both are lists, or functions of the backend returning one; a case is one value, a list of
    values, or a ``pytest.param`` of either (its marks are kept)."""
    params = []
    for backend in ACCELERATED:
        own, big = (c(backend) if callable(c) else c for c in (cases, large))
        for case in [*own, *(() if interpreted(backend) else big)]:
            marks = [SKIP[backend]]
            if hasattr(case, "marks"):  # a pytest.param
                marks += list(case.marks)
                (case,) = case.values
            values = case if isinstance(case, list) else [case]
            params.append(pytest.param(backend, *values, marks=marks,
                                       id="-".join([backend, *map(_id, values)])))
    return params


def _linear_inputs(randn, shape, shared, reset, strided=False, dtype=torch.float32):
    """x (shared (N, in) or per-subset (K, N, in)), W, W0, b, b0 (W0, b0 None for reset="zero");
    ``strided``: every tensor a transposed or sliced view."""
    N, fin, fout, K = shape
    if strided:
        x = randn(fin, N).t() if shared else randn(K, 2 * N, fin + 3)[:, ::2, 1:fin + 1]
        w, w0 = randn(fin, fout).t(), randn(fout, 2 * fin)[:, ::2]
        b, b0 = randn(2 * fout)[::2], randn(fout)
        assert not any(t.is_contiguous() for t in (x, w, w0, b))
    else:
        x = randn(*((N, fin) if shared else (K, N, fin)), dtype=dtype)
        w, b = randn(fout, fin, dtype=dtype), randn(fout, dtype=dtype)
        w0, b0 = randn(fout, fin, dtype=dtype), randn(fout, dtype=dtype)
    return (x, w, w0, b, b0) if reset == "init" else (x, w, None, b, None)


# --- masks bit for bit ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity,shared", [("neuron", True), ("neuron", False),
                                                ("weight", True), ("weight", False)])
@pytest.mark.parametrize("offset", [0, 2**32 - 37, 2**41 + 5])
@pytest.mark.parametrize("fout,k_start", [(21, 2**31 + 9), (70, 2**32 - 2)])  # k wraps mod 2**32
def test_kernels_regenerate_the_spec_masks(backend, granularity, shared, offset, fout, k_start):
    """W = 0, W0 = 1 and one-hot inputs make the output *be* the masks the kernel generated; an
    identity of values does the same for subset_unit_sums."""
    device = backend_device(backend)
    fin, K = 13, 5
    eye = torch.eye(fin, device=device)
    x = eye if shared else eye.expand(K, fin, fin).contiguous()
    w, w0 = torch.zeros(fout, fin, device=device), torch.ones(fout, fin, device=device)
    spec = SubsetMasks(31, 4, k_start, K, offset, 0.35, granularity)
    y = bk.masked_reset_linear(x, w, w0, None, None, spec, backend=backend)
    units = fout if granularity == "neuron" else fout * fin
    if granularity == "neuron":
        expected = spec.materialize(fout)[:, None, :].expand(K, fin, fout)
    else:  # y[k, i, j] = mask[k, j * fin + i]
        expected = spec.materialize(units).view(K, fout, fin).transpose(1, 2)
    assert torch.equal(y.cpu() == 1.0, expected)
    assert bool(((y == 0) | (y == 1)).all())
    sums = bk.subset_unit_sums(torch.eye(K, device=device), spec, units, backend=backend)
    assert torch.equal(sums.cpu().t() == 1.0, spec.materialize(units))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("offset", [0, 2**32 - 100, 2**40])
def test_unit_sums_kernel_regenerates_per_unit_masks(backend, offset):
    K, U = 7, 333
    p = torch.rand(U)
    spec = SubsetMasks(8, 2, 40, K, offset, p, "weight")
    sums = bk.subset_unit_sums(torch.eye(K, device=backend_device(backend)), spec, U,
                               backend=backend)
    assert torch.equal(sums.cpu().t() == 1.0, spec.materialize(U))


# --- masked_reset_linear -----------------------------------------------------------------------

SHAPES = [  # (batch, in, out, K): tile remainders, K = 1, in = 1, out = 1
    (7, 5, 3, 4), (1, 1, 1, 1), (16, 33, 17, 3), (3, 64, 1, 2), (5, 1, 12, 3), (17, 40, 50, 1),
]
LARGE_SHAPES = [(70, 130, 150, 3)]  # several 64 x 64 tiles


def _linear_dtypes(backend):
    """pytest params. fp64 in the cuda suite only (there triton's fp64 is checked against cuda's
    where in >= 16: tl.dot needs K >= 16 tiles)."""
    # Triton 3.9's interpreter computes garbage for tl.dot on bf16 tiles (checked with a 16x16
    # kernel outside bingo), so bf16 matmuls are tested on a GPU only.
    bf16 = pytest.mark.skipif(interpreted(backend),
                              reason="the Triton interpreter's tl.dot mis-handles bf16; GPU-only")
    return [pytest.param(torch.float32), pytest.param(torch.float16),
            pytest.param(torch.bfloat16, marks=bf16),
            *([pytest.param(torch.float64)] if backend == "cuda" else [])]


def _linear_cases(backend, shapes):
    return [pytest.param([shape, *dtype.values], marks=dtype.marks)
            for shape in shapes for dtype in _linear_dtypes(backend)]


@pytest.mark.parametrize("backend,shape,dtype",
                         per_backend(lambda b: _linear_cases(b, SHAPES),
                                     large=lambda b: _linear_cases(b, LARGE_SHAPES)))
@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
@pytest.mark.parametrize("reset", ["init", "zero"])
def test_masked_reset_linear(backend, shape, dtype, granularity, shared, reset):
    N, fin, fout, K = shape
    device = backend_device(backend)
    seed, g = generator()
    x, w, w0, b, b0 = _linear_inputs(sampler(g, device), shape, shared, reset, dtype=dtype)
    spec = SubsetMasks(seed, 3, 5, K, 17 + seed, 0.4, granularity)
    y = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend=backend)
    assert y.shape == (K, N, fout) and y.dtype == dtype and y.device.type == device.type
    units = fout if granularity == "neuron" else fout * fin
    ref = oracle_linear(x, w, w0, b, b0, spec.materialize(units), granularity)
    close(y, ref, ORACLE_TOL[dtype], f"vs float64 oracle (seed {seed})")
    for other in references(backend):
        if other == "triton" and dtype == torch.float64 and fin < 16:
            continue  # tl.dot needs K >= 16 tiles; fp64 is covered against torch
        y_other = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend=other)
        close(y, y_other, TORCH_TOL[dtype], f"vs {other} backend (seed {seed})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
@pytest.mark.parametrize("reset", ["init", "zero"])
@pytest.mark.parametrize("strided,shape", [(False, (6, 10, 9, 4)), (True, (6, 11, 19, 4))],
                         ids=["contiguous", "strided"])
def test_per_unit_and_extreme_probabilities(backend, granularity, shared, reset, strided, shape):
    seed, g = generator()
    x, w, w0, b, b0 = _linear_inputs(sampler(g, backend_device(backend)), shape, shared, reset,
                                     strided)
    units = shape[2] if granularity == "neuron" else shape[2] * shape[1]
    p = torch.rand(units, generator=g)
    p[:2], p[2:4] = 0.0, 1.0
    for prob in (p.to(x.device), 0.0, 1.0):
        spec = SubsetMasks(seed, 0, 0, shape[3], 3, prob, granularity)
        y = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend=backend)
        ref = oracle_linear(x, w, w0, b, b0, spec.materialize(units), granularity)
        close(y, ref, 1e-5, f"prob {'per-unit' if isinstance(prob, torch.Tensor) else prob}"
              f" (seed {seed})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
@pytest.mark.parametrize("reset", ["init", "zero"])
@pytest.mark.parametrize("strided,shape", [(False, (5, 12, 19, 6)), (True, (6, 11, 19, 4))],
                         ids=["contiguous", "strided"])
def test_explicit_neuron_masks(backend, shared, reset, strided, shape):
    seed, g = generator()
    x, w, w0, b, b0 = _linear_inputs(sampler(g, backend_device(backend)), shape, shared, reset,
                                     strided)
    masks = torch.rand(shape[2], shape[3], generator=g).to(x.device).t() < 0.5  # non-contiguous
    y = bk.masked_reset_linear(x, w, w0, b, b0, masks, backend=backend)
    close(y, oracle_linear(x, w, w0, b, b0, masks, "neuron"), 1e-5, f"seed {seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
def test_non_contiguous_inputs(backend, granularity, shared):
    """Transposed and sliced views are read through their strides, not copied or misread."""
    seed, g = generator()
    shape = (6, 11, 7, 3)
    x, w, w0, b, b0 = _linear_inputs(sampler(g, backend_device(backend)), shape, shared, "init",
                                     strided=True)
    spec = SubsetMasks(seed, 1, 0, shape[3], 0, 0.5, granularity)
    y = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend=backend)
    units = shape[2] if granularity == "neuron" else shape[2] * shape[1]
    close(y, oracle_linear(x, w, w0, b, b0, spec.materialize(units), granularity), 1e-5,
          f"seed {seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_is_not_implemented_and_named(backend):
    device = backend_device(backend)
    x, w = torch.randn(1, 2, 5, 5, device=device), torch.randn(3, 2, 3, 3, device=device)
    with pytest.raises(BackendUnavailableError, match=f"{backend}.*masked_reset_conv2d"):
        bk.masked_reset_conv2d(x, w, None, None, None, SubsetMasks(0, 0, 0, 2, 0, 0.5, "neuron"),
                               backend=backend)


# --- subset_metrics ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,shape", per_backend(
    [(1, 1, 1), (4, 33, 7), (3, 17, 100), (2, 40, 33)], large=[(2, 40, 3000)]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_subset_metrics(backend, shape, dtype, ignore_index):
    device = backend_device(backend)
    seed, g = generator()
    K, N, C = shape
    logits = sampler(g, device)(K, N, C, dtype=dtype) * 3
    targets = torch.randint(0, C, (N,), generator=g)
    targets[::4] = ignore_index
    if N > 2 and C > 64:  # equal maxima in different class chunks / lanes: the first one wins
        logits[0, 1, :] = 0
        logits[0, 1, [5, 40, 90]] = 4
        targets[1] = 40
    valid = targets != ignore_index
    targets = targets.to(device)
    loss, acc = bk.subset_metrics(logits, targets, ignore_index=ignore_index, backend=backend)
    for k in range(K):
        if valid.any():
            oracle = F.cross_entropy(logits[k].cpu().double(), targets.cpu(),
                                     ignore_index=ignore_index)
            close(loss[k], oracle, 1e-5, f"loss of subset {k} vs float64 (seed {seed})")
    for other in references(backend):
        ref_loss, ref_acc = bk.subset_metrics(logits, targets, ignore_index=ignore_index,
                                              backend=other)
        close(loss, ref_loss, 1e-5, f"loss vs {other} backend (seed {seed})")
        assert torch.equal(acc.cpu(), ref_acc.cpu()), f"accuracy vs {other} (seed {seed})"
    none = torch.full((N,), -100, device=device)
    loss, acc = bk.subset_metrics(logits, none, backend=backend)
    assert not loss.any() and not acc.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_subset_metrics_non_contiguous_and_all_ignored(backend):
    device = backend_device(backend)
    seed, g = generator()
    logits = sampler(g, device)(9, 5, 3).permute(2, 1, 0)  # (3, 5, 9), strides (1, 9, 45)
    targets = torch.randint(0, 9, (5,), generator=g).to(device)
    loss, acc = bk.subset_metrics(logits, targets, backend=backend)
    ref_loss, ref_acc = bk.subset_metrics(logits, targets, backend="torch")
    close(loss, ref_loss, 1e-5, f"seed {seed}")
    assert torch.equal(acc.cpu(), ref_acc.cpu())
    none = torch.full((5,), -100, device=device)
    loss, acc = bk.subset_metrics(logits, none, backend=backend)
    assert torch.equal(loss.cpu(), torch.zeros(3)) and torch.equal(acc.cpu(), torch.zeros(3))


# --- subset_unit_sums ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend,K,U,V", per_backend(
    [[1, 1, 1], [37, 1500, 3], [5, 70, 20]], large=[[300, 70, 20]]))
@pytest.mark.parametrize("prob", ["scalar", "per-unit", "explicit"])
def test_subset_unit_sums(backend, K, U, V, prob):
    device = backend_device(backend)
    seed, g = generator()
    values = sampler(g, device)(K, V)
    if prob == "explicit":
        masks = (torch.rand(U, K, generator=g) < 0.3).to(device).t()  # non-contiguous
        dense = masks.cpu()
    else:
        p = torch.rand(U, generator=g).to(device) if prob == "per-unit" else 0.3
        masks = SubsetMasks(seed, 9, 11, K, 2**32 - 7, p, "weight")
        dense = masks.materialize(U)
    sums = bk.subset_unit_sums(values, masks, U, backend=backend)
    assert sums.dtype == torch.float32 and sums.shape == (U, V)
    close(sums, dense.double().t() @ values.double().cpu(), 1e-5, f"seed {seed}")
    for other in references(backend):
        close(sums, bk.subset_unit_sums(values, masks, U, backend=other), 1e-5,
              f"vs {other} backend (seed {seed})")


# --- subset_linear_metrics (more cases in test_linear_metrics.py) -----------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
def test_subset_linear_metrics(backend, granularity, shared):
    seed, g = generator()
    device = backend_device(backend)
    K, B, IN, C = 6, 20, 24, 37
    h, w, w0, b, b0 = _linear_inputs(sampler(g, device), (B, IN, C, K), shared, "init")
    targets = torch.randint(0, C, (B,), generator=g).to(device)
    masks = SubsetMasks(seed, 1, 0, K, 5, 0.3, granularity)
    loss, acc = bk.subset_linear_metrics(h, w, w0, b, b0, masks, targets, backend=backend)
    for other in references(backend):
        ref_loss, ref_acc = bk.subset_linear_metrics(h, w, w0, b, b0, masks, targets,
                                                     backend=other)
        close(loss, ref_loss, 1e-5, f"loss vs {other} backend (seed {seed})")
        assert torch.equal(acc.cpu(), ref_acc.cpu()), f"accuracy vs {other} (seed {seed})"


# --- TicketSearch end to end ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("reset", ["init", "zero"])
def test_ticket_search_same_significance_as_torch(backend, granularity, reset, monkeypatch):
    device = backend_device(backend)
    launches = count_triton_launches(monkeypatch) if backend == "triton" else None
    with monkeypatch.context() as patch:
        refuse_reference(patch, backend)
        fast = run_search(backend, mlp, granularity, reset, device)
    assert fast.path == "fast"
    if launches is not None:  # the triton kernels themselves ran
        assert {"_metrics", "_unit_sums"} <= set(launches)
        assert launches.keys() & {"_column_select", "_row_select", "_weight_blend"}
        launches.clear()
    ref = run_search("torch", mlp, granularity, reset, device)
    if launches is not None:
        assert not launches  # the torch run did not touch the triton kernels
    for a, b in zip(fast.history, ref.history):
        assert abs(a["after_loss"] - b["after_loss"]) < 1e-5
    sig_fast, sig_ref = fast.significance(), ref.significance()
    assert sig_fast.keys() == sig_ref.keys()
    for name in sig_ref:
        assert torch.equal(sig_fast.coverage[name], sig_ref.coverage[name]), name  # same masks
        assert torch.allclose(sig_fast[name], sig_ref[name], atol=1e-4), name
