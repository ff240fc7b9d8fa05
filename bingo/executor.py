"""One batched evaluation of a model under K subset resets.

Two paths compute the same thing: the (K,) loss and accuracy of the model with, for each subset
k, the units in subset k replaced by their reset values (initial weights, or zero).

* **fast** — the subset index is folded into the batch dimension. Each unit layer is temporarily
  given a forward that calls :func:`bingo_kernels.masked_reset_linear` (or ``_conv2d``): it takes
  the shared ``(B, ...)`` input of the first layer, or the ``(K*B, ...)`` rows produced upstream,
  and returns ``(K*B, ...)`` rows. Every other module simply sees K*B rows, which is correct for
  any module that treats rows independently (activations, pooling, dropout and batch norm in eval
  mode, reshapes that keep the leading dimension).
* **vmap** — the generic fallback: ``torch.func.functional_call`` of the whole model, vmapped
  over a block of blended parameter sets. It materialises a block of blended weights, so it is
  slower and needs more memory, but it makes no assumption about the model's forward.

With ``path="auto"`` the first evaluation runs both paths on two subsets and keeps the fast path
only if it agrees with the vmap path; a model that mixes rows across the batch, calls a layer's
weight without calling the layer (``nn.MultiheadAttention``'s ``out_proj``), or uses padding the
fast path does not know falls back to vmap with a warning that names the reason. The chosen path
and reason are in :attr:`BatchedEvaluator.path` and :attr:`BatchedEvaluator.path_reason`.

Both paths are chunked over K so that peak memory stays under ``memory_budget`` bytes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import bingo_kernels as bk

from .errors import InputMismatchError, InvalidOptionError, require_option
from .units import UnitGroup, UnitLayout

PATHS = ("auto", "fast", "vmap")


class _FastPathUnsupported(Exception):
    """The model cannot take the fast path (internal: triggers the vmap fallback)."""


@dataclass
class Metrics:
    """Loss and accuracy: scalars for the unreset model, ``(K,)`` tensors for subsets."""

    loss: Tensor
    """Mean cross-entropy."""
    accuracy: Tensor
    """Fraction of correct argmax predictions."""

    def get(self, metric: str) -> Tensor:
        """The named metric (``"loss"`` or ``"accuracy"``)."""
        return getattr(self, metric)


@dataclass
class Design:
    """What one evaluation resets: the hashed subsets of one search."""

    seed: int
    """Seed of the ticket search."""
    search: int
    """Index of this search."""
    num_subsets: int
    """K."""
    probs: dict[str, object]
    """Per score key: inclusion probability, scalar or per-unit tensor."""

    def masks(self, layout: UnitLayout, group: UnitGroup, k_start: int, num: int) -> bk.SubsetMasks:
        """The mask description of subsets ``[k_start, k_start+num)`` for one layer."""
        return bk.SubsetMasks(self.seed, self.search, k_start, num, group.offset,
                              self.probs[group.param_name], layout.granularity)


def model_logits(output) -> Tensor:
    """The logits in a model's output: a tensor, or the ``logits`` of a dict/ModelOutput."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise InputMismatchError(
        f"the model returned {type(output).__name__}; ticket search needs a logits tensor")


def flatten_for_metrics(logits: Tensor, targets: Tensor, leading: int) -> tuple[Tensor, Tensor]:
    """``(K*B, *S, C)`` logits and ``(B, *S)`` targets -> ``(K, B*prod(S), C)`` and ``(B*prod(S),)``."""
    if tuple(logits.shape[1:-1]) != tuple(targets.shape[1:]) or \
            logits.shape[0] != leading * targets.shape[0]:
        raise InputMismatchError(
            f"model output of shape {tuple(logits.shape)} does not match targets of shape "
            f"{tuple(targets.shape)}: expected logits (batch, ..., classes) with the targets' "
            "batch and sequence dimensions")
    return logits.reshape(leading, -1, logits.shape[-1]), targets.reshape(-1)


class BatchedEvaluator:
    """Evaluates the unreset model and K reset subsets of it on one batch."""

    def __init__(self, model: nn.Module, layout: UnitLayout, *, backend: str = "auto",
                 path: str = "auto", memory_budget: int = 512 * 2**20):
        require_option("path", path, PATHS)
        if memory_budget <= 0:
            raise InvalidOptionError(f"memory_budget must be positive bytes, got {memory_budget}")
        self.model = model
        self.layout = layout
        self.backend = backend
        self.memory_budget = int(memory_budget)
        self.path: Optional[str] = None if path == "auto" else path
        self.path_reason = "requested" if path != "auto" else "not chosen yet"
        self._activation_bytes: dict[tuple, int] = {}

    # -- public ---------------------------------------------------------------------------------

    @torch.no_grad()
    def baseline(self, inputs: Tensor, targets: Tensor) -> Metrics:
        """Loss and accuracy of the unreset model (a plain forward)."""
        logits = self._plain_forward(inputs)
        flat, flat_targets = flatten_for_metrics(logits, targets, 1)
        loss, acc = bk.subset_metrics(flat, flat_targets, backend=self.backend)
        return Metrics(loss[0], acc[0])

    @torch.no_grad()
    def subsets(self, inputs: Tensor, targets: Tensor, design: Design,
                init: Optional[dict[str, Tensor]]) -> Metrics:
        """``(K,)`` loss and accuracy with subset k's units reset to ``init`` (None: zero)."""
        if self.path is None:
            self._choose_path(inputs, targets, design, init)
        run = self._fast_chunk if self.path == "fast" else self._vmap_chunk
        chunk = self.chunk_size(inputs, design.num_subsets)
        losses, accs = [], []
        for k0 in range(0, design.num_subsets, chunk):
            kc = min(chunk, design.num_subsets - k0)
            logits = run(inputs, design, init, k0, kc)
            flat, flat_targets = flatten_for_metrics(logits, targets, kc)
            loss, acc = bk.subset_metrics(flat, flat_targets, backend=self.backend)
            losses.append(loss)
            accs.append(acc)
        return Metrics(torch.cat(losses), torch.cat(accs))

    def chunk_size(self, inputs: Tensor, num_subsets: int) -> int:
        """Subsets per pass so that one pass stays within ``memory_budget``."""
        key = (tuple(inputs.shape), inputs.dtype)
        if key not in self._activation_bytes:
            self._activation_bytes[key] = self._measure_activation_bytes(inputs)
        per_subset = 2 * self._activation_bytes[key]
        blends_weights = self.path == "vmap" or (
            self.layout.granularity == "weight"
            and bk.resolve_backend(self.backend, inputs.device) == "torch")
        if blends_weights:
            # The reference backend and the vmap path hold a blended copy and a mask per subset.
            per_subset += sum(math.prod(g.weight_shape) * (g.module.weight.element_size() + 1)
                              for g in self.layout.groups)
        return max(1, min(num_subsets, self.memory_budget // max(1, per_subset)))

    # -- path choice ----------------------------------------------------------------------------

    def _choose_path(self, inputs, targets, design, init) -> None:
        probe = min(2, design.num_subsets)
        try:
            reference = self._vmap_chunk(inputs, design, init, 0, probe)
        except Exception as exc:  # noqa: BLE001  (any failure means: this path is unusable)
            reference, vmap_error = None, exc
        try:
            fast = self._fast_chunk(inputs, design, init, 0, probe)
        except Exception as exc:  # noqa: BLE001
            fast, fast_error = None, exc
        if fast is not None and reference is not None:
            tol = 1e-4 if fast.dtype in (torch.float32, torch.float64) else 2e-2
            scale = reference.nan_to_num(0.0, 0.0, 0.0).abs().max().clamp_min(1.0)
            if torch.allclose(fast, reference, rtol=tol, atol=tol * float(scale), equal_nan=True):
                self.path, self.path_reason = "fast", "fast path agrees with the vmap reference"
                return
            fast_error = "its outputs differ from the vmap reference (the model mixes rows " \
                         "across the batch or uses a layer's weight without calling the layer)"
        if reference is None:
            if fast is None:
                raise InputMismatchError(
                    f"ticket search cannot evaluate this model: fast path failed ({fast_error}); "
                    f"vmap fallback failed ({vmap_error})")
            self.path, self.path_reason = "fast", f"vmap unavailable ({vmap_error})"
            return
        self.path, self.path_reason = "vmap", f"fast path unusable: {fast_error}"
        warnings.warn(f"bingo: {type(self.model).__name__} uses the vmap fallback for ticket "
                      f"search ({self.path_reason}); it is slower and uses more memory",
                      stacklevel=3)

    # -- helpers --------------------------------------------------------------------------------

    def _plain_forward(self, inputs: Tensor) -> Tensor:
        try:
            return model_logits(self.model(inputs))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InputMismatchError(
                f"the model's forward failed on inputs of shape {tuple(inputs.shape)} and dtype "
                f"{inputs.dtype} on {inputs.device}: {exc}") from exc

    def _measure_activation_bytes(self, inputs: Tensor) -> int:
        total = [0]

        def hook(_module, _inp, out):
            if isinstance(out, Tensor):
                total[0] += out.numel() * out.element_size()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad():
                self._plain_forward(inputs)
        finally:
            for h in handles:
                h.remove()
        return max(total[0], inputs.numel() * inputs.element_size())

    def _reset_values(self, group: UnitGroup, init):
        if init is None:
            return None, None
        return init[group.param_name], (init[group.bias_name] if group.bias_name else None)

    # -- fast path ------------------------------------------------------------------------------

    def _fast_chunk(self, inputs, design, init, k0, kc) -> Tensor:
        batch = inputs.shape[0]
        with self._patched(batch, design, init, k0, kc):
            logits = model_logits(self.model(inputs))
        if logits.shape[0] != kc * batch:
            raise _FastPathUnsupported(
                f"the output has {logits.shape[0]} rows, expected {kc} subsets x {batch}")
        return logits

    @contextlib.contextmanager
    def _patched(self, batch, design, init, k0, kc):
        patched = []
        try:
            for group in self.layout.groups:
                forward = _FAST_FORWARDS[group.kind](self, group, batch, design, init, k0, kc)
                group.module.forward = forward
                patched.append(group.module)
            yield
        finally:
            for module in patched:
                del module.forward  # the instance attribute shadowed the class's forward

    def _split_rows(self, group, x, batch, kc) -> tuple[Tensor, bool]:
        """Whether ``x`` is the shared batch or K*B rows; reject anything else."""
        lead = x.shape[0]
        if lead == kc * batch:
            return x, False
        if lead == batch:
            return x, True
        raise _FastPathUnsupported(
            f"layer {group.name!r} received {lead} rows; expected {batch} (shared) or "
            f"{kc}x{batch} (one block per subset)")

    def _linear_forward(self, group, batch, design, init, k0, kc) -> Callable:
        module = group.module
        masks = design.masks(self.layout, group, k0, kc)
        w0, b0 = self._reset_values(group, init)

        def forward(x: Tensor) -> Tensor:
            x, shared = self._split_rows(group, x, batch, kc)
            rest = x.shape[1:-1]
            xin = x.reshape(-1, x.shape[-1]) if shared else x.reshape(kc, -1, x.shape[-1])
            y = bk.masked_reset_linear(xin, module.weight, w0, module.bias, b0, masks,
                                       backend=self.backend)
            return y.reshape(kc * batch, *rest, y.shape[-1])

        return forward

    def _conv2d_forward(self, group, batch, design, init, k0, kc) -> Callable:
        module = group.module
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise _FastPathUnsupported(
                f"conv layer {group.name!r} uses padding {module.padding!r} / "
                f"{module.padding_mode!r}; the fast path supports numeric zero padding")
        masks = design.masks(self.layout, group, k0, kc)
        w0, b0 = self._reset_values(group, init)

        def forward(x: Tensor) -> Tensor:
            x, shared = self._split_rows(group, x, batch, kc)
            if x.dim() != 4:
                raise _FastPathUnsupported(f"conv layer {group.name!r} got {x.dim()}-d input")
            xin = x if shared else x.reshape(kc, batch, *x.shape[1:])
            y = bk.masked_reset_conv2d(
                xin, module.weight, w0, module.bias, b0, masks, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=module.groups,
                backend=self.backend)
            return y.reshape(kc * batch, *y.shape[2:])

        return forward

    # -- vmap fallback --------------------------------------------------------------------------

    def _vmap_chunk(self, inputs, design, init, k0, kc) -> Tensor:
        blended: dict[str, Tensor] = {}
        for group in self.layout.groups:
            weight, bias = group.module.weight, group.module.bias
            w0, b0 = self._reset_values(group, init)
            w0 = torch.zeros((), dtype=weight.dtype, device=weight.device) if w0 is None else w0
            masks = design.masks(self.layout, group, k0, kc).materialize(
                group.num_units, weight.device)
            if self.layout.granularity == "neuron":
                m = masks.view(kc, -1, *([1] * (weight.dim() - 1)))
                blended[group.param_name] = torch.where(m, w0, weight)
                if bias is not None:
                    b0 = torch.zeros((), dtype=bias.dtype, device=bias.device) if b0 is None else b0
                    blended[group.bias_name] = torch.where(masks, b0, bias)
            else:
                blended[group.param_name] = torch.where(masks.view(kc, *weight.shape), w0, weight)

        def one(params):
            return model_logits(torch.func.functional_call(self.model, params, (inputs,)))

        out = torch.func.vmap(one, randomness="different")(blended)
        return out.reshape(kc * inputs.shape[0], *out.shape[2:])


_FAST_FORWARDS = {
    "linear": BatchedEvaluator._linear_forward,
    "conv2d": BatchedEvaluator._conv2d_forward,
}
