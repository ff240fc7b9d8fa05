"""subset_linear_metrics: the last linear layer fused with per-subset cross-entropy and accuracy.

The op must equal ``subset_metrics(masked_reset_linear(...), targets)`` (the unfused composition)
while never holding the ``(K, B, C)`` logits. Checked here: the torch reference (chunked over
classes and subsets) against the composition and a float64 per-subset oracle, with chunks that
do not divide C; the triton kernel (interpreter on CPU, fp32/fp16; bf16 on a GPU only) against
the torch backend; first-maximum ties across class chunks and tiles; ``ignore_index``; the
custom-op contract; argument errors; and that the reference allocates no K x B x C tensor.
"""

import importlib
import random

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import bingo_kernels as bk
from bingo_kernels import InputMismatchError, SubsetMasks, reference
from kernel_helpers import LargestOutput

TRITON = (bk.unavailable_reason("triton") is None
          and "cpu" in bk.backends.supported_devices("triton"))
INTERPRETED = TRITON and bk.triton.interpreter_requested()
needs_triton = pytest.mark.skipif(not TRITON, reason="triton backend cannot take CPU tensors here")
gpu_only = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                              reason="needs compiled kernels on a CUDA device")
# Triton 3.9's interpreter mis-handles tl.dot on bf16 tiles (see test_triton_kernels.py).
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    INTERPRETED or not torch.cuda.is_available(), reason="bf16 tl.dot: GPU only"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu")
# Loss tolerance relative to max(1, |loss|): vs the float64 oracle, and vs torch in the same dtype.
ORACLE_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TORCH_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _generator():
    seed = random.SystemRandom().randrange(2**31)
    return seed, torch.Generator().manual_seed(seed)


def _problem(g, K, B, IN, C, shared, reset, dtype=torch.float32, ignore_index=-100):
    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)

    h = randn(B, IN) if shared else randn(K, B, IN)
    w, b = randn(C, IN), randn(C)
    w0, b0 = (randn(C, IN), randn(C)) if reset == "init" else (None, None)
    targets = torch.randint(0, C, (B,), generator=g)
    targets[::3] = ignore_index
    return h, w, w0, b, b0, targets.to(DEVICE)


def _masks(kind, granularity, g, K, IN, C, seed):
    units = C if granularity == "neuron" else C * IN
    if kind == "explicit":
        return (torch.rand(C, K, generator=g) < 0.4).to(DEVICE).t()  # non-contiguous too
    prob = torch.rand(units, generator=g).to(DEVICE) if kind == "per-unit" else 0.4
    return SubsetMasks(seed, 2, 7, K, 11 + seed % 1000, prob, granularity)


def _dense(masks, granularity, IN, C):
    if isinstance(masks, torch.Tensor):
        return masks.cpu()
    return masks.materialize(C if granularity == "neuron" else C * IN)


def _oracle(h, w, w0, b, b0, dense, granularity, targets, ignore_index):
    """float64, one subset at a time, blended weights written out, F.cross_entropy."""
    h, w, targets = h.double().cpu(), w.double().cpu(), targets.cpu()
    w0 = torch.zeros_like(w) if w0 is None else w0.double().cpu()
    b = None if b is None else b.double().cpu()
    b0 = (None if b is None else torch.zeros_like(b)) if b0 is None else b0.double().cpu()
    valid = targets != ignore_index
    count = max(1, int(valid.sum()))
    losses, accs = [], []
    for k in range(dense.shape[0]):
        if granularity == "neuron":
            wk = torch.where(dense[k][:, None], w0, w)
            bk_ = None if b is None else torch.where(dense[k], b0, b)
        else:
            wk, bk_ = torch.where(dense[k].view_as(w), w0, w), b
        logits = F.linear(h if h.dim() == 2 else h[k], wk, bk_)
        losses.append(F.cross_entropy(logits, targets, ignore_index=ignore_index,
                                      reduction="sum") / count)
        accs.append(((logits.argmax(-1) == targets) & valid).sum() / count)
    return torch.stack(losses), torch.stack(accs).double()


def _close(got, ref, tol, what):
    scale = ref.abs().max().clamp_min(1.0).item()
    err = (got.double().cpu() - ref.double().cpu()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


# --- torch reference: chunked == composition == float64 -------------------------------------------

@pytest.mark.parametrize("shape", [(4, 7, 5, 37), (1, 9, 3, 10), (3, 20, 16, 70)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("granularity,kind", [("neuron", "scalar"), ("neuron", "per-unit"),
                                              ("neuron", "explicit"), ("weight", "scalar"),
                                              ("weight", "per-unit")])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
@pytest.mark.parametrize("reset", ["init", "zero"])
def test_reference_matches_composition_and_float64(shape, granularity, kind, shared, reset):
    K, B, IN, C = shape
    seed, g = _generator()
    h, w, w0, b, b0, targets = _problem(g, K, B, IN, C, shared, reset)
    masks = _masks(kind, granularity, g, K, IN, C, seed)
    unfused = bk.subset_metrics(bk.masked_reset_linear(h, w, w0, b, b0, masks, backend="torch"),
                                targets, backend="torch")
    oracle = _oracle(h, w, w0, b, b0, _dense(masks, granularity, IN, C), granularity, targets,
                     -100)
    for chunk in (None, 1, 8, C - 1, C + 5):
        loss, acc = bk.subset_linear_metrics(h, w, w0, b, b0, masks, targets, chunk=chunk,
                                             backend="torch")
        assert loss.shape == acc.shape == (K,) and loss.dtype == acc.dtype == torch.float32
        what = f"chunk {chunk} (seed {seed})"
        _close(loss, unfused[0], 1e-5, f"loss vs composition, {what}")
        _close(loss, oracle[0], 1e-5, f"loss vs float64, {what}")
        assert torch.equal(acc, unfused[1]), f"accuracy vs composition, {what}"
        assert torch.allclose(acc.double().cpu(), oracle[1]), f"accuracy vs float64, {what}"


def test_reference_blocks_subsets_with_k_start_and_unit_offsets(monkeypatch):
    """A tiny logit budget forces several subset blocks and class chunks picked automatically."""
    monkeypatch.setattr(reference, "_LOGIT_ELEMENTS", 64)
    monkeypatch.setattr(reference, "_MIN_AUTO_CHUNK", 3)
    seed, g = _generator()
    K, B, IN, C = 7, 4, 5, 23
    for granularity in ("neuron", "weight"):
        h, w, w0, b, b0, targets = _problem(g, K, B, IN, C, False, "init")
        masks = SubsetMasks(seed, 1, 2**32 - 3, K, 2**32 - 40, 0.5, granularity)  # wraps both
        got = bk.subset_linear_metrics(h, w, w0, b, b0, masks, targets, backend="torch")
        want = bk.subset_metrics(bk.masked_reset_linear(h, w, w0, b, b0, masks), targets)
        _close(got[0], want[0], 1e-5, f"{granularity} (seed {seed})")
        assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("chunk", [500, None])
def test_reference_never_materialises_the_logits(granularity, chunk, monkeypatch):
    """Every tensor the reference creates is O(K B chunk); the unfused composition's is K B C."""
    monkeypatch.setattr(reference, "_MIN_AUTO_CHUNK", 16)
    monkeypatch.setattr(reference, "_LOGIT_ELEMENTS", 1 << 14)  # chunk=None: 256 classes
    K, B, IN, C = 4, 16, 8, 20_000
    g = torch.Generator().manual_seed(0)
    h, w, w0, b, b0, targets = _problem(g, K, B, IN, C, False, "init")
    masks = SubsetMasks(1, 0, 0, K, 0, 0.3, granularity)
    with LargestOutput() as fused:
        got = bk.subset_linear_metrics(h, w, w0, b, b0, masks, targets, chunk=chunk,
                                       backend="torch")
    bound = K * max(B, IN) * (chunk or 256)  # a logits tile, or a weight-mask tile
    assert fused.largest <= bound < K * B * C // 8, fused.largest
    with LargestOutput() as unfused:  # the detector does see the composition's logits
        want = bk.subset_metrics(bk.masked_reset_linear(h, w, w0, b, b0, masks, backend="torch"),
                                 targets, backend="torch")
    assert unfused.largest >= K * B * C
    _close(got[0], want[0], 1e-5, "loss")
    assert torch.equal(got[1], want[1])


# --- triton vs torch --------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("shape", [(3, 7, 5, 37), (1, 17, 40, 33), (2, 5, 3, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
@pytest.mark.parametrize("reset", ["init", "zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16])
def test_triton_matches_torch(shape, granularity, shared, reset, dtype):
    K, B, IN, C = shape
    seed, g = _generator()
    ignore_index = 2 if C > 2 else -100
    h, w, w0, b, b0, targets = _problem(g, K, B, IN, C, shared, reset, dtype, ignore_index)
    masks = _masks("scalar", granularity, g, K, IN, C, seed)
    loss, acc = bk.subset_linear_metrics(h, w, w0, b, b0, masks, targets,
                                         ignore_index=ignore_index, backend="triton")
    assert loss.dtype == acc.dtype == torch.float32 and loss.device.type == DEVICE.type
    ref_loss, ref_acc = bk.subset_linear_metrics(h, w, w0, b, b0, masks, targets,
                                                 ignore_index=ignore_index, backend="torch")
    oracle = _oracle(h, w, w0, b, b0, _dense(masks, granularity, IN, C), granularity, targets,
                     ignore_index)
    _close(loss, ref_loss, TORCH_TOL[dtype], f"loss vs torch (seed {seed})")
    _close(loss, oracle[0], ORACLE_TOL[dtype], f"loss vs float64 (seed {seed})")
    if dtype == torch.float32:
        assert torch.equal(acc, ref_acc), f"accuracy (seed {seed})"
    else:  # rounded logits can tie, and differently summed products round differently
        count = int((targets != ignore_index).sum())
        assert ((acc - ref_acc).abs() * count).max() <= 1.0, f"accuracy (seed {seed})"


@needs_triton
@pytest.mark.parametrize("granularity,kind", [("neuron", "per-unit"), ("neuron", "explicit"),
                                              ("weight", "per-unit")])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_subset"])
def test_triton_per_unit_and_explicit_masks(granularity, kind, shared):
    K, B, IN, C = 4, 6, 9, 45
    seed, g = _generator()
    h, w, w0, b, b0, targets = _problem(g, K, B, IN, C, shared, "init")
    masks = _masks(kind, granularity, g, K, IN, C, seed)
    got = bk.subset_linear_metrics(h, w, w0, b, b0, masks, targets, backend="triton")
    want = bk.subset_linear_metrics(h, w, w0, b, b0, masks, targets, backend="torch")
    _close(got[0], want[0], 1e-5, f"loss (seed {seed})")
    assert torch.equal(got[1], want[1]), f"accuracy (seed {seed})"


BACKENDS = ["torch"] + (["triton"] if TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_first_maximum_across_chunks(backend):
    """Equal maxima at classes 5, 40, 90 (different reference chunks and kernel tiles)."""
    K, B, IN, C = 2, 4, 3, 100
    h = torch.ones(B, IN, device=DEVICE)
    h[3] = 0.0  # row 3: every logit equal, the first class wins
    w = torch.zeros(C, IN, device=DEVICE)
    w[[5, 40, 90]] = 1.0
    targets = torch.tensor([5, 40, 90, 0], device=DEVICE)
    masks = SubsetMasks(0, 0, 0, K, 0, 0.0, "neuron")  # nothing reset
    loss, acc = bk.subset_linear_metrics(h, w, None, None, None, masks, targets, chunk=32,
                                         backend=backend)
    assert torch.equal(acc.cpu(), torch.full((K,), 0.5))  # rows 0 (class 5) and 3 (class 0)
    want = bk.subset_metrics(bk.masked_reset_linear(h, w, None, None, None, masks), targets)
    _close(loss, want[0], 1e-6, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored_give_zeros(backend):
    g = torch.Generator().manual_seed(0)
    h, w, w0, b, b0, _ = _problem(g, 3, 5, 4, 12, True, "init")
    targets = torch.full((5,), -100, device=DEVICE)
    loss, acc = bk.subset_linear_metrics(h, w, w0, b, b0, SubsetMasks(0, 0, 0, 3, 0, 0.5),
                                         targets, backend=backend)
    assert torch.equal(loss.cpu(), torch.zeros(3)) and torch.equal(acc.cpu(), torch.zeros(3))


@needs_triton
def test_triton_runs_the_fused_kernel_not_the_reference(monkeypatch):
    for op in ("subset_linear_metrics", "masked_reset_linear", "subset_metrics"):
        monkeypatch.setattr(reference, op, lambda *a, _op=op, **k: pytest.fail(f"ran {_op}"))
    module = importlib.import_module("bingo_kernels.triton.linear_metrics")
    calls = []
    original = module._linear_metrics
    monkeypatch.setattr(module, "_linear_metrics", lambda *a, **k: calls.append(1) or
                        original(*a, **k))
    g = torch.Generator().manual_seed(0)
    h, w, w0, b, b0, targets = _problem(g, 2, 5, 4, 9, False, "zero")
    bk.subset_linear_metrics(h, w, w0, b, b0, SubsetMasks(0, 0, 0, 2, 0, 0.5, "weight"),
                             targets, backend="triton")
    assert calls == [1]


# --- the op's contract and its arguments ------------------------------------------------------

def test_opcheck():
    h, w, w0, b, b0 = (torch.randn(6, 4), torch.randn(5, 4), torch.randn(5, 4), torch.randn(5),
                       torch.randn(5))
    targets = torch.tensor([0, 4, -100, 2, 1, 3])
    op = torch.ops.bingo.subset_linear_metrics.default
    opcheck(op, (h, w, w0, b, b0, targets, None, None, 0.5, 1, 2, 0, 3, 0, "weight", -100, 2))
    opcheck(op, (torch.randn(2, 6, 4), w, None, b, None, targets, torch.rand(2, 5) < 0.5, None,
                 -1.0, 0, 0, 0, 2, 0, "neuron", -100, 0))


@gpu_only
def test_opcheck_cuda_registration_and_auto_dispatch(monkeypatch):
    h, w, b = (torch.randn(6, 4, device="cuda"), torch.randn(5, 4, device="cuda"),
               torch.randn(5, device="cuda"))
    targets = torch.tensor([0, 4, -100, 2, 1, 3], device="cuda")
    opcheck(torch.ops.bingo.subset_linear_metrics.default,
            (h, w, None, b, None, targets, None, None, 0.5, 1, 2, 0, 3, 0, "weight", -100, 0))
    monkeypatch.setattr(reference, "subset_linear_metrics", lambda *a: pytest.fail("reference"))
    loss, acc = bk.subset_linear_metrics(h, w, None, b, None, SubsetMasks(0, 0, 0, 3, 0, 0.5),
                                         targets)
    assert loss.shape == acc.shape == (3,) and loss.is_cuda


def test_argument_errors_name_the_problem():
    h, w, targets = torch.randn(5, 4), torch.randn(3, 4), torch.tensor([0, 1, 2, 0, 1])
    spec = SubsetMasks(0, 0, 0, 2, 0, 0.5, "neuron")
    cases = [
        ((torch.randn(5, 6), w, spec, targets), {}, "h has 6 features"),
        ((torch.randn(3, 5, 4), w, spec, targets), {}, "subsets"),
        ((h, w, spec, targets[:4]), {}, r"targets must be \(N,\) with N=5"),
        ((h, w, spec, targets + 1), {}, r"targets must lie in \[0, 3\)"),
        ((h, w, spec, targets.float()), {}, "class indices"),
        ((h, w, torch.ones(2, 4, dtype=torch.bool), targets), {}, "explicit masks"),
        ((h, w, spec, targets), {"chunk": 0}, "chunk"),
    ]
    for (hh, ww, masks, tt), kwargs, message in cases:
        with pytest.raises(InputMismatchError, match=message):
            bk.subset_linear_metrics(hh, ww, None, None, None, masks, tt, **kwargs)
