"""The ops' torch backend against a float64 per-subset loop, plus the custom-op contract.

Later backends (Triton, CUDA) add themselves to ``BACKENDS_UNDER_TEST`` and inherit every test.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import bingo_kernels as bk
from bingo_kernels import BackendUnavailableError, InputMismatchError, InvalidOptionError, SubsetMasks

BACKENDS_UNDER_TEST = ["torch", "auto"]
# An accelerated backend joins where it takes these tests' CPU tensors: triton under
# TRITON_INTERPRET=1 (tests/conftest.py sets it), its kernels then run in Triton's interpreter.
# cuda takes CUDA tensors only, so it never joins here: tests/test_cuda_ext.py runs this suite's
# checks on CUDA tensors against torch and triton (as tests/test_triton_kernels.py does for triton).
for _name in ("triton", "cuda"):
    if bk.unavailable_reason(_name) is None and "cpu" in bk.backends.supported_devices(_name):
        BACKENDS_UNDER_TEST.append(_name)
# fp32 results against a float64 oracle: relative to the output scale.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _oracle_linear(x, w, w0, b, b0, masks_bool, granularity):
    """Blend each subset's weights explicitly in float64 and apply F.linear."""
    x, w = x.double(), w.double()
    w0 = torch.zeros_like(w) if w0 is None else w0.double()
    outs = []
    for k in range(masks_bool.shape[0]):
        xk = x if x.dim() == 2 else x[k]
        if granularity == "neuron":
            m = masks_bool[k]
            wk = torch.where(m[:, None], w0, w)
            bk_ = None if b is None else torch.where(m, torch.zeros_like(b.double()) if b0 is None
                                                     else b0.double(), b.double())
        else:
            wk = torch.where(masks_bool[k].view_as(w), w0, w)
            bk_ = None if b is None else b.double()
        outs.append(F.linear(xk, wk, bk_))
    return torch.stack(outs)


SHAPES = [  # (N, in, out, K)
    (7, 5, 3, 4), (1, 1, 1, 1), (16, 33, 17, 9), (3, 64, 1, 2), (5, 1, 12, 3),
]


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("reset", ["init", "zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_reset_linear_matches_oracle(backend, shape, granularity, shared, reset, dtype):
    N, fin, fout, K = shape
    g = torch.Generator().manual_seed(hash((shape, granularity, shared, reset)) % 2**31)
    x = torch.randn((N, fin) if shared else (K, N, fin), generator=g, dtype=dtype)
    w = torch.randn(fout, fin, generator=g, dtype=dtype)
    b = torch.randn(fout, generator=g, dtype=dtype)
    w0 = torch.randn(fout, fin, generator=g, dtype=dtype) if reset == "init" else None
    b0 = torch.randn(fout, generator=g, dtype=dtype) if reset == "init" else None
    spec = SubsetMasks(seed=int(torch.randint(0, 2**32, (1,), generator=g)), search=3,
                       k_start=5, num_subsets=K, unit_offset=17, prob=0.4, granularity=granularity)
    units = fout if granularity == "neuron" else fout * fin
    y = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend=backend)
    ref = _oracle_linear(x, w, w0, b, b0, spec.materialize(units), granularity)
    assert y.shape == (K, N, fout) and y.dtype == dtype
    scale = ref.abs().max().clamp_min(1.0)
    assert (y.double() - ref).abs().max() <= TOL[dtype] * scale


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_explicit_neuron_masks_and_per_unit_probability(backend):
    x, w, w0 = torch.randn(6, 10), torch.randn(8, 10), torch.randn(8, 10)
    b, b0 = torch.randn(8), torch.randn(8)
    masks = torch.rand(5, 8) < 0.5
    y = bk.masked_reset_linear(x, w, w0, b, b0, masks, backend=backend)
    assert torch.allclose(y.double(), _oracle_linear(x, w, w0, b, b0, masks, "neuron"), atol=1e-5)
    p = torch.rand(80)
    spec = SubsetMasks(1, 0, 0, 4, 0, p, "weight")
    y = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend=backend)
    ref = _oracle_linear(x, w, w0, b, b0, spec.materialize(80), "weight")
    assert torch.allclose(y.double(), ref, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("offset", [2**63 - 20, 2**64 - 60])
def test_unit_offsets_past_int64_match_the_spec(backend, offset):
    """Unit indices are uint64 in the spec: offsets at and past 2**63 (beyond int64) reach every
    backend through the ops and regenerate the spec's masks."""
    x, w, w0 = torch.randn(6, 10), torch.randn(6, 10), torch.randn(6, 10)
    b, b0 = torch.randn(6), torch.randn(6)
    for granularity, units in (("neuron", 6), ("weight", 60)):
        spec = SubsetMasks(3, 1, 0, 4, offset, 0.5, granularity)
        y = bk.masked_reset_linear(x, w, w0, b, b0, spec, backend=backend)
        ref = _oracle_linear(x, w, w0, b, b0, spec.materialize(units), granularity)
        assert torch.allclose(y.double(), ref, atol=1e-5), granularity
    values = torch.randn(4, 3)
    spec = SubsetMasks(3, 1, 0, 4, offset, 0.5, "weight")
    sums = bk.subset_unit_sums(values, spec, 60, backend=backend)
    assert torch.allclose(sums.double(), spec.materialize(60).double().t() @ values.double(),
                          atol=1e-5)
    with pytest.raises(InputMismatchError, match="2\\*\\*64"):
        bk.subset_unit_sums(values, SubsetMasks(3, 1, 0, 4, 2**64 - 59, 0.5), 60,
                            backend=backend)


def test_non_contiguous_inputs():
    x = torch.randn(12, 6).t()  # (6, 12), non-contiguous
    w = torch.randn(12, 5).t()  # (5, 12)
    spec = SubsetMasks(0, 0, 0, 3, 0, 0.5, "weight")
    y = bk.masked_reset_linear(x, w, None, None, None, spec)
    ref = _oracle_linear(x, w, None, None, None, spec.materialize(60), "weight")
    assert torch.allclose(y.double(), ref, atol=1e-5)


@pytest.mark.parametrize("granularity", ["neuron", "weight"])
@pytest.mark.parametrize("shared", [True, False])
def test_masked_reset_conv2d_matches_oracle(granularity, shared):
    K, N = 3, 2
    x = torch.randn((N, 4, 9, 7) if shared else (K, N, 4, 9, 7), dtype=torch.float64)
    w, w0 = torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randn(6, 2, 3, 3, dtype=torch.float64)
    b, b0 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    spec = SubsetMasks(2, 1, 0, K, 3, 0.3, granularity)
    y = bk.masked_reset_conv2d(x, w, w0, b, b0, spec, stride=(2, 1), padding=1, groups=2)
    masks = spec.materialize(6 if granularity == "neuron" else w.numel())
    for k in range(K):
        xk = x if shared else x[k]
        if granularity == "neuron":
            wk, bk_ = torch.where(masks[k][:, None, None, None], w0, w), torch.where(masks[k], b0, b)
        else:
            wk, bk_ = torch.where(masks[k].view_as(w), w0, w), b
        ref = F.conv2d(xk, wk, bk_, stride=(2, 1), padding=1, groups=2)
        assert torch.allclose(y[k], ref, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_subset_metrics_matches_cross_entropy(backend):
    K, N, C = 4, 33, 7
    logits, targets = torch.randn(K, N, C), torch.randint(0, C, (N,))
    targets[::5] = -100
    loss, acc = bk.subset_metrics(logits, targets, backend=backend)
    valid = targets != -100
    for k in range(K):
        ref = F.cross_entropy(logits[k].double(), targets, ignore_index=-100)
        assert abs(loss[k].item() - ref.item()) < 1e-5
        ref_acc = (logits[k].argmax(-1) == targets)[valid].double().mean()
        assert abs(acc[k].item() - ref_acc.item()) < 1e-7


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
def test_subset_unit_sums_matches_materialised(backend):
    K, U = 37, 5000
    values = torch.randn(K, 3)
    p = torch.rand(U) * 0.5
    spec = SubsetMasks(4, 9, 0, K, 123, p, "weight")
    sums = bk.subset_unit_sums(values, spec, U, backend=backend)
    ref = spec.materialize(U).double().t() @ values.double()
    assert sums.dtype == torch.float32
    assert torch.allclose(sums.double(), ref, atol=1e-4)
    explicit = torch.rand(K, 20) < 0.3
    assert torch.allclose(bk.subset_unit_sums(values, explicit, 20, backend=backend).double(),
                          explicit.double().t() @ values.double(), atol=1e-4)


def test_opcheck_all_ops():
    x, w, w0, b, b0 = (torch.randn(5, 4), torch.randn(3, 4), torch.randn(3, 4), torch.randn(3),
                       torch.randn(3))
    opcheck(torch.ops.bingo.masked_reset_linear.default,
            (x, w, w0, b, b0, None, None, 0.5, 1, 2, 0, 4, 0, "weight"))
    opcheck(torch.ops.bingo.masked_reset_linear.default,
            (x, w, None, b, None, torch.rand(2, 3) < 0.5, None, -1.0, 0, 0, 0, 2, 0, "neuron"))
    xc, wc = torch.randn(2, 2, 6, 6), torch.randn(3, 2, 3, 3)
    opcheck(torch.ops.bingo.masked_reset_conv2d.default,
            (xc, wc, torch.randn_like(wc), None, None, None, torch.rand(3), -1.0, 0, 0, 0, 2, 0,
             "neuron", [1, 1], [1, 1], [1, 1], 1))
    opcheck(torch.ops.bingo.subset_metrics.default,
            (torch.randn(3, 8, 5), torch.randint(0, 5, (8,)), -100))
    opcheck(torch.ops.bingo.subset_unit_sums.default,
            (torch.randn(6, 3), None, None, 0.2, 0, 0, 0, 0, 50))


def test_torch_compile_traces_the_op():
    x, w, w0 = torch.randn(5, 4), torch.randn(3, 4), torch.randn(3, 4)
    spec = SubsetMasks(0, 0, 0, 6, 0, 0.5, "neuron")

    def f(x, w, w0):
        return bk.masked_reset_linear(x, w, w0, None, None, spec).sum(-1)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x, w, w0), f(x, w, w0))


def test_argument_errors_name_the_problem():
    x, w = torch.randn(5, 4), torch.randn(3, 4)
    spec = SubsetMasks(0, 0, 0, 2, 0, 0.5, "weight")
    with pytest.raises(InputMismatchError, match="features"):
        bk.masked_reset_linear(torch.randn(5, 6), w, None, None, None, spec)
    with pytest.raises(InputMismatchError, match="dtype"):
        bk.masked_reset_linear(x.double(), w, None, None, None, spec)
    with pytest.raises(InputMismatchError, match="meta"):
        bk.masked_reset_linear(x.to("meta"), w, None, None, None, spec)
    with pytest.raises(InputMismatchError, match="shape"):
        bk.masked_reset_linear(x, w, torch.randn(4, 3), None, None, spec)
    with pytest.raises(InputMismatchError, match="subsets"):
        bk.masked_reset_linear(torch.randn(3, 5, 4), w, None, None, None, spec)
    with pytest.raises(InputMismatchError, match="explicit masks"):
        bk.masked_reset_linear(x, w, None, None, None, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(InputMismatchError, match="per-unit"):
        bk.masked_reset_linear(x, w, None, None, None, SubsetMasks(0, 0, 0, 2, 0, torch.rand(5)))
    with pytest.raises(InputMismatchError, match="init_bias"):
        bk.masked_reset_linear(x, w, torch.randn(3, 4), torch.randn(3), None, spec)
    with pytest.raises(InputMismatchError, match="targets must lie"):
        bk.subset_metrics(torch.randn(2, 4, 3), torch.tensor([0, 1, 2, 3]))


def test_backend_selection_errors():
    x, w = torch.randn(5, 4), torch.randn(3, 4)
    spec = SubsetMasks(0, 0, 0, 2, 0, 0.5, "weight")
    with pytest.raises(InvalidOptionError, match="backend"):
        bk.masked_reset_linear(x, w, None, None, None, spec, backend="tpu")
    for name in ("triton", "cuda"):
        reason = bk.unavailable_reason(name)
        if reason is not None:
            with pytest.raises(BackendUnavailableError, match=name):
                bk.masked_reset_linear(x, w, None, None, None, spec, backend=name)
    assert bk.resolve_backend("auto", "cpu") == "torch"
    assert "torch" in bk.available_backends()
