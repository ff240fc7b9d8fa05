"""The public ops: one signature each, checked once, dispatched to a backend.

Each op is also a ``torch.library.custom_op`` (``torch.ops.bingo.*``) whose default
implementation is the torch reference, with a fake (meta) implementation so it traces under
``torch.compile``. Accelerated backends register their CUDA kernels on these ops; ``backend="auto"``
calls the custom op and lets the dispatcher pick by device, while an explicit backend name calls
that backend directly (how the tests compare backends on the same tensors).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import reference
from .backends import backend_op, resolve_backend
from .errors import InputMismatchError
from .hashing import check_units, offset_arg
from .subsets import SubsetMasks

Masks = Union[SubsetMasks, Tensor]

IGNORE_INDEX = -100
"""Targets left out of the metrics by default (``F.cross_entropy``'s default: padding tokens)."""


# --- custom ops -------------------------------------------------------------------------------

@torch.library.custom_op("bingo::masked_reset_linear", mutates_args=())
def _masked_reset_linear_op(
    x: Tensor, weight: Tensor, init_weight: Optional[Tensor], bias: Optional[Tensor],
    init_bias: Optional[Tensor], explicit_masks: Optional[Tensor], prob: Optional[Tensor],
    prob_scalar: float, seed: int, search: int, k_start: int, num_subsets: int, unit_offset: int,
    granularity: str,
) -> Tensor:
    return reference.masked_reset_linear(
        x, weight, init_weight, bias, init_bias, explicit_masks, prob, prob_scalar, seed, search,
        k_start, num_subsets, unit_offset, granularity)


@_masked_reset_linear_op.register_fake
def _(x, weight, init_weight, bias, init_bias, explicit_masks, prob, prob_scalar, seed, search,
      k_start, num_subsets, unit_offset, granularity):
    K = explicit_masks.shape[0] if explicit_masks is not None else num_subsets
    return x.new_empty((K, x.shape[-2], weight.shape[0]))


@torch.library.custom_op("bingo::masked_reset_conv2d", mutates_args=())
def _masked_reset_conv2d_op(
    x: Tensor, weight: Tensor, init_weight: Optional[Tensor], bias: Optional[Tensor],
    init_bias: Optional[Tensor], explicit_masks: Optional[Tensor], prob: Optional[Tensor],
    prob_scalar: float, seed: int, search: int, k_start: int, num_subsets: int, unit_offset: int,
    granularity: str, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
    groups: int,
) -> Tensor:
    return reference.masked_reset_conv2d(
        x, weight, init_weight, bias, init_bias, explicit_masks, prob, prob_scalar, seed, search,
        k_start, num_subsets, unit_offset, granularity, list(stride), list(padding),
        list(dilation), groups)


@_masked_reset_conv2d_op.register_fake
def _(x, weight, init_weight, bias, init_bias, explicit_masks, prob, prob_scalar, seed, search,
      k_start, num_subsets, unit_offset, granularity, stride, padding, dilation, groups):
    K = explicit_masks.shape[0] if explicit_masks is not None else num_subsets
    h, w = x.shape[-2:]
    kh, kw = weight.shape[-2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((K, x.shape[-4], weight.shape[0], oh, ow))


@torch.library.custom_op("bingo::subset_metrics", mutates_args=())
def _subset_metrics_op(logits: Tensor, targets: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    return reference.subset_metrics(logits, targets, ignore_index)


@_subset_metrics_op.register_fake
def _(logits, targets, ignore_index):
    K = logits.shape[0]
    return (logits.new_empty((K,), dtype=torch.float32),
            logits.new_empty((K,), dtype=torch.float32))


@torch.library.custom_op("bingo::subset_unit_sums", mutates_args=())
def _subset_unit_sums_op(
    values: Tensor, explicit_masks: Optional[Tensor], prob: Optional[Tensor], prob_scalar: float,
    seed: int, search: int, k_start: int, unit_offset: int, num_units: int,
) -> Tensor:
    return reference.subset_unit_sums(values, explicit_masks, prob, prob_scalar, seed, search,
                                      k_start, unit_offset, num_units)


@_subset_unit_sums_op.register_fake
def _(values, explicit_masks, prob, prob_scalar, seed, search, k_start, unit_offset, num_units):
    return values.new_empty((num_units, values.shape[1]), dtype=torch.float32)


@torch.library.custom_op("bingo::subset_linear_metrics", mutates_args=())
def _subset_linear_metrics_op(
    h: Tensor, weight: Tensor, init_weight: Optional[Tensor], bias: Optional[Tensor],
    init_bias: Optional[Tensor], targets: Tensor, explicit_masks: Optional[Tensor],
    prob: Optional[Tensor], prob_scalar: float, seed: int, search: int, k_start: int,
    num_subsets: int, unit_offset: int, granularity: str, ignore_index: int, chunk: int,
) -> tuple[Tensor, Tensor]:
    return reference.subset_linear_metrics(
        h, weight, init_weight, bias, init_bias, targets, explicit_masks, prob, prob_scalar, seed,
        search, k_start, num_subsets, unit_offset, granularity, ignore_index, chunk)


@_subset_linear_metrics_op.register_fake
def _(h, weight, init_weight, bias, init_bias, targets, explicit_masks, prob, prob_scalar, seed,
      search, k_start, num_subsets, unit_offset, granularity, ignore_index, chunk):
    K = explicit_masks.shape[0] if explicit_masks is not None else num_subsets
    return (h.new_empty((K,), dtype=torch.float32), h.new_empty((K,), dtype=torch.float32))


CUSTOM_OPS = {
    "masked_reset_linear": _masked_reset_linear_op,
    "masked_reset_conv2d": _masked_reset_conv2d_op,
    "subset_metrics": _subset_metrics_op,
    "subset_unit_sums": _subset_unit_sums_op,
    "subset_linear_metrics": _subset_linear_metrics_op,
}


def _implementation(op: str, backend: str, device: torch.device):
    name = resolve_backend(backend, device)
    # "auto" goes through the dispatcher so that torch.compile sees one op and CUDA kernels
    # registered on it are used; a named backend is called directly.
    return CUSTOM_OPS[op] if backend == "auto" else backend_op(name, op)


# --- argument checking ------------------------------------------------------------------------

def _check_same(name: str, t: Optional[Tensor], ref: Tensor, ref_name: str, shape=None) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise InputMismatchError(f"{name} must be a tensor or None, got {type(t).__name__}")
    if t.device != ref.device:
        raise InputMismatchError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise InputMismatchError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise InputMismatchError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _mask_args(masks: Masks, num_units: int, out_features: int, device: torch.device):
    """Flatten ``masks`` into the ops' mask arguments, checking it against the layer."""
    if isinstance(masks, SubsetMasks):
        prob = masks.prob_tensor()
        if prob is not None:
            if prob.numel() != num_units:
                raise InputMismatchError(
                    f"per-unit inclusion probability has {prob.numel()} values but the layer has "
                    f"{num_units} {masks.granularity} units")
            prob = prob.to(device)
        check_units(masks.unit_offset, num_units)
        return dict(explicit_masks=None, prob=prob, prob_scalar=masks.scalar_prob(),
                    seed=masks.seed, search=masks.search, k_start=masks.k_start,
                    num_subsets=masks.num_subsets, unit_offset=offset_arg(masks.unit_offset),
                    granularity=masks.granularity)
    if isinstance(masks, Tensor):
        if masks.dtype != torch.bool or masks.dim() != 2 or masks.shape[1] != out_features:
            raise InputMismatchError(
                "explicit masks must be a bool tensor (K, out_features) of neuron masks; got "
                f"{masks.dtype} {tuple(masks.shape)} for out_features={out_features}")
        if masks.shape[0] < 1:
            raise InputMismatchError("explicit masks must hold at least one subset")
        return dict(explicit_masks=masks.to(device), prob=None, prob_scalar=-1.0, seed=0,
                    search=0, k_start=0, num_subsets=int(masks.shape[0]), unit_offset=0,
                    granularity="neuron")
    raise InputMismatchError(
        f"masks must be a SubsetMasks or a bool tensor, got {type(masks).__name__}")


def _check_layer(x: Tensor, weight: Tensor, init_weight, bias, init_bias, masks: Masks,
                 spatial_dims: int, x_name: str = "x") -> dict:
    if not isinstance(x, Tensor) or not isinstance(weight, Tensor):
        raise InputMismatchError(f"{x_name} and weight must be tensors")
    if not weight.is_floating_point():
        raise InputMismatchError(f"weight must be floating point, got {weight.dtype}")
    _check_same(x_name, x, weight, "weight")
    _check_same("init_weight", init_weight, weight, "weight", weight.shape)
    _check_same("bias", bias, weight, "weight", weight.shape[:1])
    _check_same("init_bias", init_bias, weight, "weight", weight.shape[:1])
    if init_weight is not None and (bias is None) != (init_bias is None):
        raise InputMismatchError(
            "reset to initial weights needs init_bias exactly when the layer has a bias")
    units = weight.shape[0] if getattr(masks, "granularity", "neuron") == "neuron" else weight.numel()
    args = _mask_args(masks, units, weight.shape[0], weight.device)
    K = args["num_subsets"]
    feature_dim = 2 + spatial_dims  # (N, in) or (N, C, H, W)
    if x.dim() == feature_dim + 1 and x.shape[0] != K:
        raise InputMismatchError(
            f"per-subset input has {x.shape[0]} subsets in dim 0 but the masks describe {K}")
    if x.dim() not in (feature_dim, feature_dim + 1):
        raise InputMismatchError(
            f"{x_name} must have {feature_dim} dims (shared by all subsets) or {feature_dim + 1} "
            f"(one slice per subset), got shape {tuple(x.shape)}")
    expected_in = weight.shape[1] if spatial_dims == 0 else None
    if expected_in is not None and x.shape[-1] != expected_in:
        raise InputMismatchError(
            f"{x_name} has {x.shape[-1]} features but weight expects {expected_in} (weight shape "
            f"{tuple(weight.shape)})")
    return args


def _check_targets(targets: Tensor, ignore_index: int, rows: int, classes: int, ref: Tensor,
                   ref_name: str) -> None:
    """``targets`` must be ``(rows,)`` class indices in ``[0, classes)`` (or ``ignore_index``)."""
    if not isinstance(targets, Tensor):
        raise InputMismatchError(f"targets must be a tensor, got {type(targets).__name__}")
    if targets.dim() != 1 or targets.shape[0] != rows:
        raise InputMismatchError(
            f"targets must be (N,) with N={rows}, got shape {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise InputMismatchError(f"targets must hold class indices (int64), got {targets.dtype}")
    if targets.device != ref.device:
        raise InputMismatchError(f"targets are on {targets.device}, {ref_name} on {ref.device}")
    valid = targets[targets != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= classes):
        raise InputMismatchError(
            f"targets must lie in [0, {classes}) (number of classes), found "
            f"[{int(valid.min())}, {int(valid.max())}]")


# --- public ops -------------------------------------------------------------------------------

def masked_reset_linear(x: Tensor, weight: Tensor, init_weight: Optional[Tensor],
                        bias: Optional[Tensor], init_bias: Optional[Tensor], masks: Masks, *,
                        backend: str = "auto") -> Tensor:
    """A Linear layer evaluated for K subsets at once, each with its units reset.

    Args:
        x: ``(N, in)``, shared by all subsets, or ``(K, N, in)``, one slice per subset.
        weight, bias: the trained parameters (``bias`` may be None).
        init_weight, init_bias: the values reset units take; None resets to zero.
        masks: a :class:`SubsetMasks` (hashed, neuron or weight units; scalar or per-unit
            probability) or an explicit bool ``(K, out)`` tensor of neuron masks.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``(K, N, out)``: ``y[k] = x[k] @ where(m_k, W0, W).T + where(m_k, b0, b)`` (bias entries
        follow their rows for neuron masks; weight masks leave the bias trained).
    """
    args = _check_layer(x, weight, init_weight, bias, init_bias, masks, spatial_dims=0)
    impl = _implementation("masked_reset_linear", backend, x.device)
    return impl(x, weight, init_weight, bias, init_bias, args["explicit_masks"], args["prob"],
                args["prob_scalar"], args["seed"], args["search"], args["k_start"],
                args["num_subsets"], args["unit_offset"], args["granularity"])


def masked_reset_conv2d(x: Tensor, weight: Tensor, init_weight: Optional[Tensor],
                        bias: Optional[Tensor], init_bias: Optional[Tensor], masks: Masks, *,
                        stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                        backend: str = "auto") -> Tensor:
    """Conv2d analogue of :func:`masked_reset_linear` (units: output channels or elements).

    ``x`` is ``(N, C, H, W)`` or ``(K, N, C, H, W)``; returns ``(K, N, out, H', W')``. Padding
    must be numeric (zeros padding mode).
    """
    args = _check_layer(x, weight, init_weight, bias, init_bias, masks, spatial_dims=2)
    pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]  # noqa: E731
    impl = _implementation("masked_reset_conv2d", backend, x.device)
    return impl(x, weight, init_weight, bias, init_bias, args["explicit_masks"], args["prob"],
                args["prob_scalar"], args["seed"], args["search"], args["k_start"],
                args["num_subsets"], args["unit_offset"], args["granularity"], pair(stride),
                pair(padding), pair(dilation), int(groups))


def subset_metrics(logits: Tensor, targets: Tensor, *, ignore_index: int = IGNORE_INDEX,
                   backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Per-subset mean cross-entropy and accuracy: ``(K, N, C)`` logits, ``(N,)`` targets.

    Returns float32 ``(loss, accuracy)``, each ``(K,)``. Targets equal to ``ignore_index`` are
    left out of both (language-model padding).
    """
    if logits.dim() != 3:
        raise InputMismatchError(f"logits must be (K, N, C), got shape {tuple(logits.shape)}")
    _check_targets(targets, ignore_index, logits.shape[1], logits.shape[2], logits, "logits")
    impl = _implementation("subset_metrics", backend, logits.device)
    return impl(logits, targets.long(), int(ignore_index))


def subset_linear_metrics(h: Tensor, weight: Tensor, init_weight: Optional[Tensor],
                          bias: Optional[Tensor], init_bias: Optional[Tensor], masks: Masks,
                          targets: Tensor, *, ignore_index: int = IGNORE_INDEX,
                          chunk: Optional[int] = None,
                          backend: str = "auto") -> tuple[Tensor, Tensor]:
    """A last Linear layer fused with :func:`subset_metrics`: the ``(K, B, C)`` logits never exist.

    Equals ``subset_metrics(masked_reset_linear(h, weight, init_weight, bias, init_bias, masks),
    targets, ignore_index=ignore_index)`` up to float rounding, with the same first-maximum
    argmax and ``ignore_index`` rules; the layer's ``C`` output units are the classes.

    Args:
        h: ``(B, in)``, shared by all subsets, or ``(K, B, in)``, one slice per subset.
        weight, init_weight, bias, init_bias, masks: as in :func:`masked_reset_linear`
            (``weight`` is ``(C, in)``).
        targets: ``(B,)`` class indices; ``ignore_index`` rows count in neither metric.
        chunk: classes per chunk of the torch implementation, which holds at most a
            ``(K_block, B, chunk)`` tile of logits; None picks it from a 64 MiB budget. The
            triton kernel tiles the classes by its own (tuned) block size and ignores it.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        float32 ``(loss, accuracy)``, each ``(K,)``.
    """
    args = _check_layer(h, weight, init_weight, bias, init_bias, masks, spatial_dims=0,
                        x_name="h")
    _check_targets(targets, ignore_index, h.shape[-2], weight.shape[0], h, "h")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise InputMismatchError(f"chunk must be a positive number of classes or None, got "
                                 f"{chunk!r}")
    impl = _implementation("subset_linear_metrics", backend, h.device)
    return impl(h, weight, init_weight, bias, init_bias, targets.long(), args["explicit_masks"],
                args["prob"], args["prob_scalar"], args["seed"], args["search"], args["k_start"],
                args["num_subsets"], args["unit_offset"], args["granularity"], int(ignore_index),
                0 if chunk is None else int(chunk))


def subset_unit_sums(values: Tensor, masks: Masks, num_units: int, *,
                     backend: str = "auto") -> Tensor:
    """Per-unit sums over the subsets that contain each unit: ``(num_units, V)`` float32.

    ``values`` is ``(K, V)``; ``masks`` describes the same K subsets (hashed or explicit
    ``(K, num_units)`` bool). This is the estimators' score update.
    """
    if values.dim() != 2:
        raise InputMismatchError(f"values must be (K, V), got shape {tuple(values.shape)}")
    if isinstance(masks, Tensor):
        if masks.dtype != torch.bool or tuple(masks.shape) != (values.shape[0], num_units):
            raise InputMismatchError(
                f"explicit masks must be bool ({values.shape[0]}, {num_units}), got "
                f"{masks.dtype} {tuple(masks.shape)}")
        args = dict(explicit_masks=masks.to(values.device), prob=None, prob_scalar=-1.0, seed=0,
                    search=0, k_start=0, unit_offset=0)
    else:
        args = _mask_args(masks, num_units, num_units, values.device)
        if args["num_subsets"] != values.shape[0]:
            raise InputMismatchError(
                f"values describe {values.shape[0]} subsets but masks describe "
                f"{args['num_subsets']}")
        del args["num_subsets"], args["granularity"]
    impl = _implementation("subset_unit_sums", backend, values.device)
    return impl(values.float().contiguous(), args["explicit_masks"], args["prob"],
                args["prob_scalar"], args["seed"], args["search"], args["k_start"],
                args["unit_offset"], int(num_units))


__all__ = ["masked_reset_linear", "masked_reset_conv2d", "subset_metrics", "subset_unit_sums",
           "subset_linear_metrics", "CUSTOM_OPS"]
