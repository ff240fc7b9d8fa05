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

Attention heads (``granularity="structured"``) take the fast path too: the q/k/v projections of
a Linear-built block get a neuron-mask ``masked_reset_linear`` over the rows of each subset's
heads, its o-projection a column reset ``y_k = (x_k * keep_k) Wo^T + b + (x_k * reset_k) Wo0^T``,
and an nn.MultiheadAttention (batch_first) is given a whole forward that does the same around
:func:`bingo.attention.attention`.

**Fused LM head.** When the model's output is exactly the output of its last nn.Linear and has a
sequence dimension (``(B, T, V)`` logits of a language model), the fast path never builds the
``(K, B*T, V)`` logits: that Linear returns a zero-stride placeholder, and the per-subset loss
and accuracy come from :func:`bingo_kernels.subset_linear_metrics` on the ``(K, B*T, d)`` hidden
states it received (``fused_head`` option; :attr:`BatchedEvaluator.fused` says whether it is on).

With ``path="auto"`` the first evaluation runs both paths on two subsets and keeps the fast path
only if it agrees with the vmap path; a model that mixes rows across the batch, calls a layer's
weight without calling the layer (``nn.MultiheadAttention``'s ``out_proj`` outside structured
granularity), or uses padding the fast path does not know falls back to vmap with a warning that
names the reason. The chosen path
and reason are in :attr:`BatchedEvaluator.path` and :attr:`BatchedEvaluator.path_reason`.

Both paths are chunked over K so that peak memory stays under ``memory_budget`` bytes.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

import torch.nn.functional as F

import bingo_kernels as bk

from .attention import mha_forward, param_head_masks
from .errors import BingoError, InputMismatchError, InvalidOptionError, require_option
from .units import UnitGroup, UnitLayout

PATHS = ("auto", "fast", "vmap")
FUSED_HEAD_CHOICES = ("auto", True, False)


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
                              self.probs[group.param_name], layout.mask_granularity)

    def head_masks(self, layout: UnitLayout, group: UnitGroup, k_start: int, num: int) -> Tensor:
        """Bool ``(num, num_heads)`` masks of a head group (True = reset); heads are few."""
        return self.masks(layout, group, k_start, num).materialize(
            group.num_units, group.module.weight.device)


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
                 path: str = "auto", memory_budget: int = 512 * 2**20,
                 fused_head: object = "auto"):
        require_option("path", path, PATHS)
        require_option("fused_head", fused_head, FUSED_HEAD_CHOICES)
        if memory_budget <= 0:
            raise InvalidOptionError(f"memory_budget must be positive bytes, got {memory_budget}")
        self.model = model
        self.layout = layout
        self.backend = backend
        self.memory_budget = int(memory_budget)
        self.path: Optional[str] = None if path == "auto" else path
        self.path_reason = "requested" if path != "auto" else "not chosen yet"
        self._activation_bytes: dict[tuple, int] = {}
        self.expand_inputs = False
        """Whether the fast path repeats the inputs per subset (chosen with the path)."""
        self._expansion_known = False
        self.fused_head = fused_head
        self._lm_head: Optional[tuple[str, nn.Linear]] = None
        self.fused: Optional[bool] = None
        """Whether the fast path fuses the LM head with the loss (None until the first search)."""

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
        elif self.path == "fast" and not self._expansion_known:
            self._choose_expansion(inputs, design, init)
        if self.fused is None:
            self._detect_lm_head(inputs)
        chunk = self.chunk_size(inputs, design.num_subsets)
        losses, accs = [], []
        try:
            for k0 in range(0, design.num_subsets, chunk):
                kc = min(chunk, design.num_subsets - k0)
                if self.path == "fast" and self.fused:
                    loss, acc = self._fused_chunk(inputs, targets, design, init, k0, kc)
                else:
                    run = self._fast_chunk if self.path == "fast" else self._vmap_chunk
                    logits = run(inputs, design, init, k0, kc)
                    flat, flat_targets = flatten_for_metrics(logits, targets, kc)
                    loss, acc = bk.subset_metrics(flat, flat_targets, backend=self.backend)
                losses.append(loss)
                accs.append(acc)
        except _FastPathUnsupported as exc:
            # The path was chosen on an earlier batch or block of subsets; this one does not fit.
            raise InputMismatchError(
                f"the fast path cannot evaluate {kc} subsets of this batch: {exc}; pass "
                "path='vmap'") from exc
        return Metrics(torch.cat(losses), torch.cat(accs))

    def chunk_size(self, inputs: Tensor, num_subsets: int) -> int:
        """Subsets per pass so that one pass stays within ``memory_budget``."""
        skip = self._lm_head[1] if self.fused else None
        key = (tuple(inputs.shape), inputs.dtype, skip is not None)
        if key not in self._activation_bytes:
            self._activation_bytes[key] = self._measure_activation_bytes(inputs, skip)
        per_subset = 2 * self._activation_bytes[key]
        blends_weights = self.path == "vmap" or (
            self.layout.granularity == "weight"
            and bk.resolve_backend(self.backend, inputs.device) == "torch")
        if blends_weights:
            # The reference backend and the vmap path hold a blended copy and a mask per subset.
            per_subset += sum(t.numel() * (t.element_size() + 1)
                              for g in self.layout.groups for t in g.tensors().values())
        return max(1, min(num_subsets, self.memory_budget // max(1, per_subset)))

    # -- path choice ----------------------------------------------------------------------------

    def _choose_path(self, inputs, targets, design, init) -> None:
        probe = min(2, design.num_subsets)
        try:
            reference = self._vmap_chunk(inputs, design, init, 0, probe)
        except Exception as exc:  # noqa: BLE001  (any failure means: this path is unusable)
            reference, vmap_error = None, exc
        # Shared inputs first (the first layer computes once for all subsets); then the inputs
        # repeated per subset, for models whose blocks read the batch size from their input or
        # add a residual of it (a transformer whose first block is searched).
        for expand in (False, True):
            self.expand_inputs = expand
            try:
                fast = self._fast_chunk(inputs, design, init, 0, probe)
            except Exception as exc:  # noqa: BLE001
                fast, fast_error = None, exc
            if fast is None or reference is None:
                if fast is not None:
                    break
                continue
            tol = 1e-4 if fast.dtype in (torch.float32, torch.float64) else 2e-2
            scale = reference.nan_to_num(0.0, 0.0, 0.0).abs().max().clamp_min(1.0)
            if torch.allclose(fast, reference, rtol=tol, atol=tol * float(scale), equal_nan=True):
                how = " (inputs repeated per subset)" if expand else ""
                self.path, self.path_reason = "fast", \
                    f"fast path{how} agrees with the vmap reference"
                self._expansion_known = True
                return
            fast, fast_error = None, "its outputs differ from the vmap reference (the model " \
                "mixes rows across the batch or uses a layer's weight without calling the layer)"
        if reference is None:
            if fast is None:
                raise InputMismatchError(
                    f"ticket search cannot evaluate this model: fast path failed ({fast_error}); "
                    f"vmap fallback failed ({vmap_error})")
            self.path, self.path_reason = "fast", f"vmap unavailable ({vmap_error})"
            self._expansion_known = True
            return
        self.path, self.path_reason = "vmap", f"fast path unusable: {fast_error}"
        warnings.warn(f"bingo: {type(self.model).__name__} uses the vmap fallback for ticket "
                      f"search ({self.path_reason}); it is slower and uses more memory",
                      stacklevel=3)

    def _choose_expansion(self, inputs, design, init) -> None:
        """With ``path="fast"`` requested: shared inputs, unless the model cannot run on them (a
        transformer block adding a residual of its input), then inputs repeated per subset.
        Without the vmap reference only failures can be seen, not silently different outputs,
        which is why ``path="auto"`` compares the two."""
        probe = min(2, design.num_subsets)
        errors = []
        for expand in (False, True):
            self.expand_inputs = expand
            try:
                self._fast_chunk(inputs, design, init, 0, probe)
            except BingoError:
                raise  # bingo's own errors (a backend without this op, bad input) name the cause
            except Exception as exc:  # noqa: BLE001  (a shape failure: try the other layout)
                errors.append(exc)
                continue
            self._expansion_known = True
            return
        raise InputMismatchError(
            f"path='fast' cannot evaluate this model: with inputs shared by the subsets: "
            f"{errors[0]}; with inputs repeated per subset: {errors[1]}")

    # -- helpers --------------------------------------------------------------------------------

    def _plain_forward(self, inputs: Tensor) -> Tensor:
        try:
            return model_logits(self.model(inputs))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InputMismatchError(
                f"the model's forward failed on inputs of shape {tuple(inputs.shape)} and dtype "
                f"{inputs.dtype} on {inputs.device}: {exc}") from exc

    def _measure_activation_bytes(self, inputs: Tensor, skip: Optional[nn.Module] = None) -> int:
        """Bytes of all leaf-module outputs of one plain forward (``skip``'s output left out: the
        fused LM head never materialises it)."""
        total = [0]

        def hook(_module, _inp, out):
            if isinstance(out, Tensor):
                total[0] += out.numel() * out.element_size()

        leaves = [m for m in self.model.modules() if not list(m.children()) and m is not skip]
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

    # -- fused LM head --------------------------------------------------------------------------

    def _detect_lm_head(self, inputs: Tensor) -> None:
        """Turn the fused LM head on when the model's logits are its last Linear's output."""
        self.fused = False
        if self.fused_head is False:
            return
        linears = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        reason = "the model has no nn.Linear"
        if linears:
            name, head = linears[-1]
            seen = {}
            handle = head.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out))
            try:
                with torch.no_grad():
                    logits = self._plain_forward(inputs)
            finally:
                handle.remove()
            if logits is not seen.get("out"):
                reason = f"the model's output is not the output of its last nn.Linear {name!r}"
            elif logits.dim() < 3 and self.fused_head == "auto":
                reason = "the logits have no sequence dimension (auto fuses LM heads only)"
            else:
                self._lm_head, self.fused = (name, head), True
                return
        if self.fused_head is True:
            raise InputMismatchError(f"fused_head=True, but {reason}")

    def _fused_chunk(self, inputs, targets, design, init, k0, kc) -> tuple[Tensor, Tensor]:
        name, head = self._lm_head
        batch = inputs.shape[0]
        seen: dict[str, Tensor] = {}

        def capture(x: Tensor) -> Tensor:
            seen["h"] = x
            # A zero-stride stand-in with the logits' shape: no (K*B, T, V) memory exists.
            seen["out"] = x.new_empty(()).expand(*x.shape[:-1], head.out_features)
            return seen["out"]

        group = next((g for g in self.layout.groups if g.module is head and g.heads is None), None)
        with self._patched(batch, design, init, k0, kc, skip=group):
            head.forward = capture
            try:
                out = model_logits(self.model(self._subset_inputs(inputs, kc)))
            finally:
                del head.forward
        h = seen.get("h")
        if h is None or out is not seen["out"]:
            raise InputMismatchError(
                f"the fused LM head {name!r} did not produce the model's output on this batch; "
                "pass fused_head=False")
        h, shared = self._split_rows(group or _HeadOnly(name), h, batch, kc)
        hin = h.reshape(-1, h.shape[-1]) if shared else h.reshape(kc, -1, h.shape[-1])
        if group is not None:
            masks = design.masks(self.layout, group, k0, kc)
            w0, b0 = self._reset_values(group, init)
        else:  # the head is not searched: an all-keep hashed mask costs no K x V memory
            masks = bk.SubsetMasks(design.seed, design.search, k0, kc, 0, 0.0, "neuron")
            w0 = b0 = None
        return bk.subset_linear_metrics(hin, head.weight, w0, head.bias, b0, masks,
                                        targets.reshape(-1), backend=self.backend)

    # -- fast path ------------------------------------------------------------------------------

    def _subset_inputs(self, inputs: Tensor, kc: int) -> Tensor:
        """The model's input for a fast pass: the shared batch, or one copy per subset."""
        return inputs.repeat(kc, *([1] * (inputs.dim() - 1))) if self.expand_inputs else inputs

    def _fast_chunk(self, inputs, design, init, k0, kc) -> Tensor:
        batch = inputs.shape[0]
        with self._patched(batch, design, init, k0, kc):
            logits = model_logits(self.model(self._subset_inputs(inputs, kc)))
        if logits.shape[0] != kc * batch:
            raise _FastPathUnsupported(
                f"the output has {logits.shape[0]} rows, expected {kc} subsets x {batch}")
        return logits

    @contextlib.contextmanager
    def _patched(self, batch, design, init, k0, kc, skip: Optional[UnitGroup] = None):
        patched = []
        try:
            for group in self.layout.groups:
                if group is skip:
                    continue
                for module, forward in _FAST_FORWARDS[group.kind](self, group, batch, design,
                                                                  init, k0, kc):
                    module.forward = forward
                    patched.append(module)
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

    def _masked_linear(self, group, x, weight, w0, bias, b0, masks, batch, kc) -> Tensor:
        """``masked_reset_linear`` on shared or per-subset rows; returns ``(K*B, ..., out)``."""
        x, shared = self._split_rows(group, x, batch, kc)
        rest = x.shape[1:-1]
        xin = x.reshape(-1, x.shape[-1]) if shared else x.reshape(kc, -1, x.shape[-1])
        y = bk.masked_reset_linear(xin, weight, w0, bias, b0, masks, backend=self.backend)
        return y.reshape(kc * batch, *rest, y.shape[-1])

    def _column_reset_linear(self, group, x, weight, w0, bias, column_masks, batch, kc) -> Tensor:
        """A Linear whose input columns ``column_masks`` (K, in) take ``w0``'s values (None: 0).

        ``x W_k^T = (x * keep) W^T + (x * reset) W0^T`` with ``W_k`` the column blend, so no
        per-subset weight is built; the bias is shared by all columns and stays trained.
        """
        x, shared = self._split_rows(group, x, batch, kc)
        rest = x.shape[1:-1]
        xk = x.reshape(1 if shared else kc, -1, x.shape[-1])
        reset = column_masks[:, None, :].to(x.dtype)
        y = F.linear(xk * (1 - reset), weight, bias)
        if w0 is not None:
            y = y + F.linear(xk * reset, w0)
        return y.expand(kc, *y.shape[1:]).reshape(kc * batch, *rest, y.shape[-1])

    def _linear_forward(self, group, batch, design, init, k0, kc):
        module = group.module
        masks = design.masks(self.layout, group, k0, kc)
        w0, b0 = self._reset_values(group, init)

        def forward(x: Tensor) -> Tensor:
            return self._masked_linear(group, x, module.weight, w0, module.bias, b0, masks, batch,
                                       kc)

        return [(module, forward)]

    def _conv2d_forward(self, group, batch, design, init, k0, kc):
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

        return [(module, forward)]

    def _heads_forward(self, group, batch, design, init, k0, kc):
        heads = design.head_masks(self.layout, group, k0, kc)
        return _HEAD_FAST_FORWARDS[group.heads.kind](self, group, heads, batch, init, kc)

    def _linear_heads_forward(self, group, heads, batch, init, kc):
        """Linear-built attention: row resets on q/k/v (or qkv), a column reset on o."""
        layout = group.heads
        prefix = f"{layout.name}." if layout.name else ""
        rows = heads.repeat_interleave(layout.head_dim, dim=1)  # (K, inner)
        pairs = []
        for role, child in layout.projections.items():
            module = layout.module.get_submodule(child)
            name = prefix + child
            w0 = None if init is None else init[f"{name}.weight"]
            if role == "o":
                pairs.append((module, self._column_forward(group, module, w0, rows, batch, kc)))
                continue
            b0 = None if init is None or module.bias is None else init[f"{name}.bias"]
            masks = rows.repeat(1, 3) if role == "qkv" else rows
            pairs.append((module, self._row_forward(group, module, w0, b0, masks, batch, kc)))
        return pairs

    def _row_forward(self, group, module, w0, b0, masks, batch, kc):
        def forward(x: Tensor) -> Tensor:
            return self._masked_linear(group, x, module.weight, w0, module.bias, b0, masks, batch,
                                       kc)
        return forward

    def _column_forward(self, group, module, w0, column_masks, batch, kc):
        def forward(x: Tensor) -> Tensor:
            return self._column_reset_linear(group, x, module.weight, w0, module.bias,
                                             column_masks, batch, kc)
        return forward

    def _mha_heads_forward(self, group, heads, batch, init, kc):
        """nn.MultiheadAttention: the whole forward, with masked projections around it."""
        layout = group.heads
        module = layout.module
        if not module.batch_first:
            raise _FastPathUnsupported(
                f"attention {layout.name!r} is not batch_first, so the batch is not dim 0")
        if module.training and module.dropout > 0:
            raise _FastPathUnsupported(f"attention {layout.name!r} has dropout in training mode")
        prefix = f"{layout.name}." if layout.name else ""
        rows = heads.repeat_interleave(layout.head_dim, dim=1)
        w0 = None if init is None else init[f"{prefix}in_proj_weight"].chunk(3)
        b0 = None if init is None or module.in_proj_bias is None \
            else init[f"{prefix}in_proj_bias"].chunk(3)
        o0 = None if init is None else init[f"{prefix}out_proj.weight"]

        def project_in(query, key, value):
            w = module.in_proj_weight.chunk(3)
            b = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
            return tuple(self._masked_linear(group, x, w[i], None if w0 is None else w0[i], b[i],
                                             None if b0 is None else b0[i], rows, batch, kc)
                         for i, x in enumerate((query, key, value)))

        def project_out(x):
            return self._column_reset_linear(group, x, module.out_proj.weight, o0,
                                             module.out_proj.bias, rows, batch, kc)

        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            if key_padding_mask is not None and key_padding_mask.shape[0] == batch:
                key_padding_mask = key_padding_mask.repeat(kc, 1)
            if attn_mask is not None and attn_mask.dim() == 3 and \
                    attn_mask.shape[0] == batch * module.num_heads:
                attn_mask = attn_mask.repeat(kc, 1, 1)
            return mha_forward(module, query, key, value, project_in, project_out,
                               key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                               is_causal=is_causal)

        return [(module, forward)]

    # -- vmap fallback --------------------------------------------------------------------------

    def _vmap_chunk(self, inputs, design, init, k0, kc) -> Tensor:
        blended: dict[str, Tensor] = {}
        for group in self.layout.groups:
            if group.heads is not None:
                masks = param_head_masks(group.heads, design.head_masks(self.layout, group, k0, kc))
                for name, live in group.tensors().items():
                    reset = _zero_like_scalar(live) if init is None else init[name]
                    blended[name] = torch.where(masks[name], reset, live)
                continue
            weight, bias = group.module.weight, group.module.bias
            w0, b0 = self._reset_values(group, init)
            w0 = _zero_like_scalar(weight) if w0 is None else w0
            masks = design.masks(self.layout, group, k0, kc).materialize(
                group.num_units, weight.device)
            if self.layout.granularity != "weight":
                m = masks.view(kc, -1, *([1] * (weight.dim() - 1)))
                blended[group.param_name] = torch.where(m, w0, weight)
                if bias is not None:
                    b0 = _zero_like_scalar(bias) if b0 is None else b0
                    blended[group.bias_name] = torch.where(masks, b0, bias)
            else:
                blended[group.param_name] = torch.where(masks.view(kc, *weight.shape), w0, weight)

        def one(params):
            return model_logits(torch.func.functional_call(self.model, params, (inputs,)))

        with model_kept(self.model):  # functional_call can leave a vmapped tensor behind
            out = torch.func.vmap(one, randomness="different")(blended)
        return out.reshape(kc * inputs.shape[0], *out.shape[2:])


class ModelStructure:
    """Every module's own attributes (mode, parameter, buffer and submodule objects, hooks,
    instance ``forward``), to put back with :meth:`restore`. Not tensor values: whoever uses it
    writes none, or restores them itself."""

    def __init__(self, model: nn.Module):
        # Containers (_parameters, _buffers, _modules, hook dicts, the non-persistent buffer
        # set) are changed in place: their contents are kept too, not only the objects.
        self._kept = [(m, dict(vars(m)), {k: copy.copy(v) for k, v in vars(m).items()
                                          if isinstance(v, (dict, set))})
                      for m in model.modules()]

    def restore(self) -> None:
        """Put every kept module's attributes back as they were (removing any added since)."""
        for m, attributes, contents in self._kept:
            own = vars(m)
            for name in set(own) - set(attributes):
                del own[name]
            own.update(attributes)
            for name, content in contents.items():
                own[name].clear()
                own[name].update(content)


@contextlib.contextmanager
def model_kept(model: nn.Module):
    """On exit, however it is left: ``model``'s structure as on entry (see ModelStructure).

    A search switches the model to eval mode (which must not leave a frozen submodule in train
    mode afterwards) and patches forwards. ``torch.func.functional_call`` (the vmap path) swaps
    tensors in and out, and for a module registered under two names (``nn.Sequential(a, b, a)``,
    ``self.decoder = self.encoder``) it swaps that module's slot twice and "restores" the second
    swap's original, the vmapped tensor, which then breaks forward, state_dict and torch.save.
    """
    structure = ModelStructure(model)
    try:
        yield
    finally:
        structure.restore()


def _zero_like_scalar(t: Tensor) -> Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


@dataclass
class _HeadOnly:
    """Names an unsearched LM head in row-count errors (they expect a group with a name)."""

    name: str


_FAST_FORWARDS = {
    "linear": BatchedEvaluator._linear_forward,
    "conv2d": BatchedEvaluator._conv2d_forward,
    "heads": BatchedEvaluator._heads_forward,
}
"""UnitGroup.kind -> factory of ``[(module, patched forward)]`` for one block of subsets."""

_HEAD_FAST_FORWARDS = {
    "linear": BatchedEvaluator._linear_heads_forward,
    "mha": BatchedEvaluator._mha_heads_forward,
}
"""HeadLayout.kind -> the head group's patched forwards, given ``(K, H)`` head masks."""
