"""Helpers shared by the kernel test files (imported as ``kernel_helpers``: tests/ has no
``__init__.py``, so pytest's default ``prepend`` import mode puts tests/ on ``sys.path``).

Random inputs, the float64 oracle, the tolerance check, per-backend devices, the proofs that an
accelerated backend ran its own kernels (no silent fallback to the torch reference), a tiny
TicketSearch run, and an allocation probe.
"""

from __future__ import annotations

import importlib
import random

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bingo
import bingo_kernels as bk
from bingo_kernels import reference

# Tolerances, relative to the reference's largest magnitude (at least 1): against the float64
# oracle the input rounding dominates; against the torch backend in the same dtype.
ORACLE_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2,
              torch.float64: 1e-12}
TORCH_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2,
             torch.float64: 1e-12}


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs in Triton's CPU interpreter (on CPU tensors) here."""
    return backend == "triton" and bk.triton.interpreter_requested()


def backend_device(backend: str) -> torch.device:
    """Where a backend's tests put their tensors: CUDA, except triton under the interpreter."""
    return torch.device("cpu" if interpreted(backend) else "cuda")


def generator():
    """A fresh seed (for the assertion messages) and a CPU generator seeded with it."""
    seed = random.SystemRandom().randrange(2**31)
    return seed, torch.Generator().manual_seed(seed)


def sampler(g, device):
    """``randn(*shape, dtype=...)``: float64 normals from ``g``, rounded to dtype on ``device``."""
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)

    return randn


def close(got, ref, tol, what):
    """Max abs error <= tol x max(1, |ref|), compared in float64 on the CPU."""
    scale = ref.abs().max().clamp_min(1.0).item() if ref.numel() else 1.0
    err = (got.double().cpu() - ref.double().cpu()).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def oracle_linear(x, w, w0, b, b0, masks, granularity):
    """masked_reset_linear in float64 on the CPU, one subset at a time, blended weights written
    out."""
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


# --- proof that the accelerated kernels ran ------------------------------------------------------

TRITON_KERNELS = {"linear": ["_pair_gemm", "_column_select", "_row_select", "_weight_blend"],
                  "metrics": ["_metrics"], "unit_sums": ["_unit_sums"]}


def count_triton_launches(monkeypatch) -> dict:
    """Counts the launches of every triton kernel (by name) from now until monkeypatch undoes it."""
    counts = {}
    for module, names in TRITON_KERNELS.items():
        mod = importlib.import_module(f"bingo_kernels.triton.{module}")
        for name in names:
            def counted(*args, _original=getattr(mod, name), _name=name, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(mod, name, counted)
    return counts


def refuse_reference(monkeypatch, backend):
    """Make any call of the torch reference ops fail (proves there is no silent fallback)."""
    for op in ("masked_reset_linear", "subset_metrics", "subset_unit_sums"):
        def refuse(*args, _op=op, **kwargs):
            raise AssertionError(f"the {backend} backend fell back to reference.{_op}")

        monkeypatch.setattr(reference, op, refuse)


# --- a small TicketSearch run ---------------------------------------------------------------------

def mlp():
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))


def cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 5))


IN_SHAPE = {torch.nn.Linear: (10,), torch.nn.Conv2d: (1, 8, 8)}


def run_search(backend, model, granularity, reset, device, steps=3, **kwargs):
    """Train ``model()`` a few SGD steps on fixed random batches, searching after each step."""
    torch.manual_seed(0)
    model = model().to(device)
    search = bingo.TicketSearch(model, granularity=granularity, subsets=6, fraction=0.25,
                                reset=reset, score="attribution", metric="loss", seed=11,
                                backend=backend, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(12, *IN_SHAPE[model[0].__class__], generator=g).to(device)
        y = torch.randint(0, 5, (12,), generator=g).to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()  # the weights move away from init, so reset="init" changes something
        search.step(x, y)
    return search


# --- allocation probe ---------------------------------------------------------------------------

class LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active, in elements: its ``numel``,
    or with ``storage=True`` the elements its whole storage holds (so a view of a big buffer
    counts as the buffer, and an expanded view as what it really allocates)."""

    def __init__(self, storage: bool = False):
        super().__init__()
        self.storage = storage
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            if not self.storage:
                self.largest = max(self.largest, t.numel())
            elif t.untyped_storage().nbytes():
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out
