"""Which slices of which parameters form a unit: found by tracing one forward pass.

A *unit* is a set of parameter slices that must be removed together for the model to keep
running and compute exactly what the masked model computes: an MLP neuron (a row of the
up-projection, a row of the gate, a column of the down-projection), an attention head or key/value
group (rows of q, k, v and columns of o), a conv channel (its filter, its BatchNorm entries, every
consumer's input slice, everything coupled to it through a residual add).

How it is found. One forward pass runs under a :class:`~torch.utils._python_dispatch.
TorchDispatchMode` that sees every ATen op. Beside every tensor it keeps an int64 *label* tensor
of the same shape: the id of the channel each element carries, or -1. Channel ids are
*parameter-axis ids*: index ``i`` along axis ``a`` of parameter ``P`` has its own id, allocated
when that axis first produces or consumes a channel. The rules, one per kind of op:

* data movement (view, transpose, slice, cat, expand, pad, ...): the same op moves the labels;
* elementwise ops: labels broadcast; two labelled operands are *coupled* (a residual add, a gated
  product): their ids join one unit. A parameter operand (a bias, a norm's scale) is coupled along
  the axis that carries the channel;
* a contraction with a parameter (linear, conv, embedding): the parameter's contracted axis is
  coupled with the input's channels (the consumer's columns), and its free axis labels the output
  (the producer's rows);
* any other op that mixes values across a labelled dimension (a contraction of two activations
  such as q @ k^T, softmax, layer norm, a mean): every id it mixes joins one unit. That is how a
  head becomes one unit (q @ k^T mixes its channels, attention @ v joins its v channels), and how
  the hidden stream of a transformer (layer-normed) becomes one unit spanning whole axes, which
  no pruning can remove.

Units are the connected components of the coupling graph (:func:`scipy.sparse.csgraph.
connected_components`). A unit whose ids reach the model's logits, or that holds every index of
some parameter axis, cannot be removed (it is *blocked*). An op without a rule is treated as
mixing everything it reads, and is recorded, so that a model it blocks can name it.

This module only records; :mod:`bingo.structure.groups` turns the result into unit groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
NONE = -1
"""Label of an element that carries no channel."""


@dataclass
class ParamAxis:
    """One axis of a parameter or buffer, with the ids of its indices."""

    name: str
    """Parameter (or buffer) name in the model."""
    axis: int
    """The axis."""
    first: int
    """Id of index 0; index ``i`` has id ``first + i``."""
    size: int
    """Length of the axis."""


@dataclass
class ContractionUse:
    """A parameter used as the weight of a contraction (linear, conv, embedding)."""

    name: str
    """Parameter name."""
    in_axis: Optional[int]
    """Axis contracted with the input's channels (None: an embedding, read by index)."""
    out_axis: int
    """Axis that labels the output channels."""
    module: str
    """Module whose forward made the call (the innermost one running)."""
    op: str
    """The ATen op (``aten.addmm``, ``aten.convolution``, ...)."""
    groups: int = 1
    """Convolution groups."""
    bias: Optional[str] = None
    """The bias parameter added to the output in the same op, if any."""


@dataclass
class TraceResult:
    """What one traced forward pass found (see the module docstring)."""

    axes: dict[tuple[str, int], ParamAxis]
    """(parameter name, axis) -> its ids, for every axis that carried a channel."""
    edges: list[np.ndarray]
    """Arrays of shape (n, 2): pairs of ids that belong to one unit."""
    num_ids: int
    """Ids allocated (0 .. num_ids-1)."""
    output_ids: np.ndarray
    """Ids that reach the model's logits."""
    mixed_by: dict[str, np.ndarray] = field(default_factory=dict)
    """Kind of mixing op (``"attention"``, ``"norm"``, ...) -> ids it joined."""
    contractions: list[ContractionUse] = field(default_factory=list)
    """Every parameter used as a contraction weight, in call order."""
    unsupported: dict[str, str] = field(default_factory=dict)
    """ATen op without a rule -> the module that called it first."""
    module_calls: dict[str, int] = field(default_factory=dict)
    """Module name -> how often its forward ran."""
    module_order: list[str] = field(default_factory=list)
    """Module names in the order their forward first started."""
    param_names: dict[str, list[str]] = field(default_factory=dict)
    """Canonical parameter name -> every name it has in the model (tied weights, shared
    modules: the first is canonical)."""
    pinned: list[np.ndarray] = field(default_factory=list)
    """Rows of ids (one row per position, -1 = none) laid along a dim that fixed-width data
    also spans: a unit must take each row whole or not at all."""


# --------------------------------------------------------------------------------------------
# Op tables
# --------------------------------------------------------------------------------------------

def _ops(*packets) -> frozenset:
    return frozenset(p for p in packets if p is not None)


def _packet(name: str):
    return getattr(aten, name, None)


MOVES = _ops(*(_packet(n) for n in (
    "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "unsqueeze",
    "squeeze", "slice", "select", "alias", "clone", "contiguous", "_to_copy", "detach",
    "split", "split_with_sizes", "chunk", "unbind", "cat", "stack", "repeat", "index_select",
    "flatten", "unflatten", "narrow", "lift_fresh", "lift_fresh_copy", "constant_pad_nd",
    "index", "gather", "expand_as", "view_as", "movedim", "_reshape_alias", "copy_",
    "to", "roll", "flip", "repeat_interleave", "masked_fill", "where", "fill_", "zero_",
)))
"""Ops that move, copy or select elements: the same op moves the labels (``where`` and
``masked_fill`` choose elements; a label is kept from the tensor operand)."""

UNARY = _ops(*(_packet(n) for n in (
    "relu", "relu_", "gelu", "silu", "silu_", "tanh", "sigmoid", "hardtanh", "hardtanh_",
    "neg", "exp", "log", "sqrt", "rsqrt", "abs", "clamp", "clamp_min", "clamp_max", "cos",
    "sin", "erf", "leaky_relu", "elu", "softplus", "hardswish", "hardsigmoid", "mish",
    "native_dropout", "dropout", "reciprocal", "square", "sign", "round", "floor", "ceil",
    "log1p", "expm1", "logical_not", "bitwise_not", "isnan", "isinf", "gelu_", "relu6",
)))
"""Elementwise ops of one tensor (a scalar second argument allowed): labels pass through."""

BINARY = _ops(*(_packet(n) for n in (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "bitwise_and",
    "bitwise_or", "rsub", "addcmul", "addcdiv", "lerp", "atan2", "fmod", "remainder",
    "floor_divide",
)))
"""Elementwise ops of several tensors: labels broadcast, labelled operands are coupled."""

REDUCTIONS = _ops(*(_packet(n) for n in (
    "mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean",
    "logsumexp", "norm", "linalg_vector_norm", "prod", "argmax", "argmin", "any", "all",
)))
"""Reductions over dims: ids along the reduced dims are mixed."""

SOFTMAX = _ops(_packet("_softmax"), _packet("_log_softmax"), _packet("softmax"),
               _packet("log_softmax"))

CREATE = _ops(*(_packet(n) for n in (
    "arange", "empty", "zeros", "ones", "full", "empty_like", "zeros_like", "ones_like",
    "full_like", "scalar_tensor", "rand", "randn", "randint", "rand_like", "randn_like",
    "empty_strided", "new_empty", "new_zeros", "new_ones", "new_full", "_local_scalar_dense",
    "tril", "triu", "bernoulli", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset",
    "is_nonzero", "item", "nonzero", "cumsum",
)))
"""Ops whose outputs carry no channel of their (tensor) inputs' labelled dims (factories,
masks built from sizes, shape queries). ``tril``/``triu``/``cumsum`` are applied to masks here."""

MATMUL = _ops(_packet("mm"), _packet("bmm"), _packet("matmul"))
ADDMM = _ops(_packet("addmm"), _packet("baddbmm"))
LINEAR = _ops(_packet("linear"))
CONV = _ops(_packet("convolution"), _packet("_convolution"), _packet("conv2d"),
            _packet("conv1d"))
BATCH_NORM = _ops(_packet("native_batch_norm"), _packet("_native_batch_norm_legit_no_training"),
                  _packet("_native_batch_norm_legit"), _packet("batch_norm"),
                  _packet("_batch_norm_impl_index"), _packet("cudnn_batch_norm"))
LAYER_NORM = _ops(_packet("native_layer_norm"), _packet("layer_norm"), _packet("rms_norm"),
                  _packet("_fused_rms_norm"))
GROUP_NORM = _ops(_packet("native_group_norm"), _packet("group_norm"))
EMBEDDING = _ops(_packet("embedding"))
ATTENTION = _ops(*(_packet(n) for n in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
    "_scaled_dot_product_fused_attention_overrideable",
)))
CHANNEL_SPATIAL = _ops(*(_packet(n) for n in (
    "max_pool2d_with_indices", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d",
    "_adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool1d", "avg_pool1d",
    "upsample_nearest2d", "upsample_bilinear2d", "max_pool3d_with_indices", "avg_pool3d",
    "_adaptive_avg_pool3d", "adaptive_avg_pool1d", "pixel_shuffle",
)))
"""Ops on (N, C, *spatial) that treat each channel separately (pooling, upsampling)."""


# --------------------------------------------------------------------------------------------
# Label arithmetic
# --------------------------------------------------------------------------------------------

def _lift(fn: Callable) -> Callable:
    """``fn`` applied to labels without recording anything (labels are plain int64 tensors)."""
    def run(*args, **kwargs):
        with torch.utils._python_dispatch._disable_current_modes():
            return fn(*args, **kwargs)
    return run


@_lift
def _broadcast(labels: Tensor, shape) -> Tensor:
    return labels.expand(tuple(shape)) if tuple(labels.shape) != tuple(shape) else labels


@_lift
def _none_like(t: Tensor) -> Tensor:
    return torch.full((), NONE, dtype=torch.long).expand(t.shape)


class _Labels:
    """The label tensors of the traced tensors, and the coupling edges found so far."""

    def __init__(self):
        self.by_id: dict[int, tuple[Tensor, Tensor]] = {}
        """id(tensor) -> (tensor, labels); the tensor is held so that its id is not reused."""
        self.edges: list[np.ndarray] = []
        self.next_id = 0
        self.mixed: dict[str, list[np.ndarray]] = {}
        self.pinned: list[np.ndarray] = []

    def get(self, t: Tensor) -> Tensor:
        entry = self.by_id.get(id(t))
        if entry is None or entry[0] is not t or tuple(entry[1].shape) != tuple(t.shape):
            return _none_like(t)
        return entry[1]

    def set(self, t: Tensor, labels: Tensor) -> None:
        if not isinstance(t, Tensor):
            return
        labels = _broadcast(labels, t.shape) if labels.dim() <= t.dim() else labels
        self.by_id[id(t)] = (t, labels)

    def allocate(self, size: int) -> int:
        first = self.next_id
        self.next_id += size
        return first

    @_lift
    def couple(self, a: Tensor, b: Tensor) -> None:
        """Join ids a[i] and b[i] wherever both are labelled (same shapes)."""
        a, b = a.reshape(-1), b.reshape(-1)
        both = (a >= 0) & (b >= 0) & (a != b)
        if bool(both.any()):
            pairs = torch.stack([a[both], b[both]], 1).unique(dim=0)
            self.edges.append(pairs.numpy())

    @_lift
    def mix(self, labels: Tensor, dims: tuple[int, ...], kind: str) -> Tensor:
        """Join all ids along ``dims`` for each position of the other dims; returns one
        representative id per position (-1 where nothing is labelled), keepdim shape."""
        if not dims:
            return labels
        moved = labels.movedim(dims, tuple(range(labels.dim() - len(dims), labels.dim())))
        rest = moved.shape[:labels.dim() - len(dims)]
        rows = moved.reshape(*rest, -1).reshape(-1, math.prod(moved.shape[len(rest):]) or 1)
        big = torch.iinfo(torch.long).max
        rep = torch.where(rows >= 0, rows, big).amin(1)
        has = rep != big
        rep = torch.where(has, rep, NONE)
        labelled = rows >= 0
        if bool(labelled.any()):
            reps = rep[:, None].expand_as(rows)
            distinct = labelled & (rows != reps)
            if bool(distinct.any()):
                pairs = torch.stack([reps[distinct], rows[distinct]], 1).unique(dim=0)
                self.edges.append(pairs.numpy())
                self.mixed.setdefault(kind, []).append(pairs.reshape(-1).numpy())
        shape = list(labels.shape)
        for d in dims:
            shape[d] = 1
        return rep.reshape(shape)


# --------------------------------------------------------------------------------------------
# The tracer
# --------------------------------------------------------------------------------------------

class _AllowSlowPaths(TorchFunctionMode):
    """Active only so that ``has_torch_function`` is true: fused fast paths such as
    nn.MultiheadAttention's native kernel then step aside for their plain ATen ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _dims(dim, ndim: int) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    return tuple(sorted({d % ndim for d in dim})) if ndim else ()


class _Tracer(TorchDispatchMode):
    def __init__(self, tensors: dict[int, tuple[str, Tensor]], current_module: Callable[[], str]):
        super().__init__()
        self.labels = _Labels()
        self.tensors = tensors          # id -> (name, tensor) of every parameter and buffer
        self.axes: dict[tuple[str, int], ParamAxis] = {}
        self.elem: dict[int, tuple[Tensor, Tensor, str]] = {}
        """id(tensor) -> (tensor, flat element indices into a parameter, its name), for
        tensors that are views or copies of one parameter (weight.t(), in_proj_weight[:E])."""
        self.contractions: list[ContractionUse] = []
        self.unsupported: dict[str, str] = {}
        self.current_module = current_module
        self._pending_bias: Optional[Tensor] = None

    # -- parameters -----------------------------------------------------------------------

    def param_of(self, t: Tensor) -> Optional[tuple[str, Tensor]]:
        """(name, flat element indices shaped like ``t``) when ``t`` is (a view of) a
        parameter or buffer, else None."""
        if not isinstance(t, Tensor):
            return None
        hit = self.tensors.get(id(t))
        if hit is not None and hit[1] is t:
            return hit[0], _lift(lambda: torch.arange(t.numel()).reshape(t.shape))()
        entry = self.elem.get(id(t))
        if entry is not None and entry[0] is t:
            return entry[2], entry[1]
        return None

    def axis_ids(self, name: str, axis: int) -> ParamAxis:
        key = (name, axis)
        if key not in self.axes:
            size = self._param_shape(name)[axis]
            self.axes[key] = ParamAxis(name, axis, self.labels.allocate(size), size)
        return self.axes[key]

    def _param_shape(self, name: str) -> tuple[int, ...]:
        for n, t in self.tensors.values():
            if n == name:
                return tuple(t.shape)
        raise KeyError(name)

    @_lift
    def param_axis_along(self, name: str, flat: Tensor, dim: int) -> Optional[tuple[int, Tensor]]:
        """(axis, index along it per position) of the parameter axis that ``dim`` of a view of
        it walks along (None when the dim walks no single axis, or has size 1)."""
        shape = self._param_shape(name)
        if flat.shape[dim] == 1 or not shape:
            return None
        line = flat.movedim(dim, -1).reshape(-1, flat.shape[dim])[0]
        coords = torch.stack(torch.unravel_index(line, shape), 1)
        varying = [a for a in range(len(shape)) if bool((coords[:, a] != coords[0, a]).any())]
        if len(varying) != 1:
            return None
        return varying[0], coords[:, varying[0]]

    def param_labels_along(self, name: str, flat: Tensor, dim: int) -> Optional[Tensor]:
        """Ids of the parameter axis that ``dim`` of a view of it walks along, one per
        position of ``dim`` (allocated on first use)."""
        found = self.param_axis_along(name, flat, dim)
        if found is None:
            return None
        axis, index = found
        return self.axis_ids(name, axis).first + index

    @_lift
    def couple_param(self, operand: Tensor, labels_out: Tensor, out_shape,
                     dim: Optional[int] = None) -> None:
        """An elementwise parameter operand (bias, scale) coupled with the channels of the
        other operands, along each dim where the parameter walks one axis and the channel is
        the same for every position of the other dims. ``dim``: the output dim a 1-d parameter
        lines up with (batch norm, a conv bias: dim 1), instead of broadcasting's last one."""
        hit = self.param_of(operand)
        if hit is None or not bool((labels_out >= 0).any()):
            return
        name, flat = hit
        if dim is not None and flat.dim() == 1:
            view = [1] * len(out_shape)
            view[dim] = flat.shape[0]
            flat = flat.reshape(view)
        offset = len(out_shape) - flat.dim()
        flat = flat.reshape((1,) * offset + tuple(flat.shape))
        full = _broadcast(labels_out, out_shape)
        for d in range(len(out_shape)):
            if flat.shape[d] == 1:
                continue
            along = full.movedim(d, 0).reshape(full.shape[d], -1)
            labelled = along >= 0
            if not bool(labelled.any()):
                continue
            top = torch.where(labelled, along, NONE).amax(1)
            if not bool(((along == top[:, None]) | ~labelled).all()):
                continue  # the channel changes along the other dims too: not this axis
            ids = self.param_labels_along(name, flat, d)
            if ids is not None:
                self.labels.couple(ids, top)

    # -- dispatch ---------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        try:
            self.rule(packet, func, args, kwargs, out)
        except Exception as exc:  # noqa: BLE001  a rule that cannot read an op: mix all
            self.unknown(packet, args, kwargs, out, f"{type(exc).__name__}: {exc}")
        return out

    def rule(self, packet, func, args, kwargs, out) -> None:
        if packet in CREATE:
            return
        if packet in MOVES:
            return self.move(func, args, kwargs, out)
        if packet in UNARY:
            first = args[0]
            if isinstance(out, (tuple, list)):
                out = out[0]
            if isinstance(first, Tensor) and isinstance(out, Tensor):
                self.labels.set(out, self.labels.get(first))
            return
        if packet in BINARY:
            return self.elementwise(args, out)
        if packet in MATMUL:
            return self.matmul(args[0], args[1], out)
        if packet in ADDMM:
            self._pending_bias = args[0]
            try:
                self.matmul(args[1], args[2], out)
            finally:
                self._pending_bias = None
            return self.elementwise([args[0], out], out, keep=out)
        if packet in LINEAR:
            weight = args[1]
            transposed = self.param_view_t(weight)
            self._pending_bias = args[2] if len(args) > 2 else None
            try:
                self.matmul(args[0], transposed, out)
            finally:
                self._pending_bias = None
            if len(args) > 2 and args[2] is not None:
                self.elementwise([args[2], out], out, keep=out)
            return
        if packet in CONV:
            return self.conv(args, kwargs, out)
        if packet in BATCH_NORM:
            return self.batch_norm(args, out)
        if packet in LAYER_NORM:
            return self.layer_norm(args, out)
        if packet in GROUP_NORM:
            return self.mix_all(args, out, "norm", dims_of=lambda t: tuple(range(1, t.dim())))
        if packet in EMBEDDING:
            return self.embedding(args, out)
        if packet in ATTENTION:
            return self.attention(args, kwargs, out)
        if packet in REDUCTIONS:
            return self.reduction(packet, args, kwargs, out)
        if packet in SOFTMAX:
            x = args[0]
            dim = args[1] % max(x.dim(), 1)
            rep = self.labels.mix(self.labels.get(x), (dim,), "softmax")
            self.labels.set(out, rep)
            return
        if packet in CHANNEL_SPATIAL:
            return self.channel_spatial(args, out)
        self.unknown(packet, args, kwargs, out, "no rule for this op")

    # -- rules ---------------------------------------------------------------------------------

    def unknown(self, packet, args, kwargs, out, why: str) -> None:
        """Mix every id the op reads (safe: nothing it touches can be removed on its own)."""
        name = str(packet)
        if name not in self.unsupported:
            self.unsupported[name] = f"{self.current_module() or '<model>'} ({why})"
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Tensor)]
        reps = [self.labels.mix(self.labels.get(t), tuple(range(t.dim())), "unsupported")
                .reshape(-1) for t in inputs]
        rep = torch.full((), NONE, dtype=torch.long)
        reps = [r for r in reps if bool((r >= 0).any())]
        if reps:
            joined = _lift(torch.cat)(reps)
            rep = self.labels.mix(joined, (0,), "unsupported").reshape(())
        for o in tree_flatten(out)[0]:
            if isinstance(o, Tensor):
                self.labels.set(o, _lift(lambda: rep.expand(*o.shape))())

    def move(self, func, args, kwargs, out) -> None:
        """Run the op on the labels (and on a parameter view's element indices)."""
        tensors_in = [a for a in tree_flatten(args)[0] if isinstance(a, Tensor)]
        if func.overloadpacket in (aten.index, aten.gather, aten.index_select):
            # The index tensors are positions, not data: keep them; move the labels.
            new_args = [a.cpu() if isinstance(a, Tensor) else
                        [i.cpu() if isinstance(i, Tensor) else i for i in a]
                        if isinstance(a, (list, tuple)) else a for a in args]
            new_args[0] = self.labels.get(args[0])
            label_out = _lift(func)(*new_args, **kwargs)
            self._set_out(out, label_out)
            elem = self.param_of(args[0])
            if elem is not None:
                new_args[0] = elem[1]
                self._set_elem(out, _lift(func)(*new_args, **kwargs), elem[0])
            return
        if func.overloadpacket in (aten.where, aten.masked_fill):
            # where(cond, a, b) / masked_fill(x, mask, v): labels of the data operands.
            data = [a for a in args if isinstance(a, Tensor) and a.dtype != torch.bool]
            if func.overloadpacket is aten.masked_fill:
                data = [args[0]]
            self.elementwise(data, out)
            return
        if func.overloadpacket in (aten.fill_, aten.zero_):
            self.labels.set(out, _none_like(out))
            return
        if func.overloadpacket is aten.copy_:
            self.labels.set(out, _broadcast(self.labels.get(args[1]), tuple(out.shape)))
            return

        def relabel(get):
            def convert(a):
                if isinstance(a, Tensor):
                    return get(a)
                return a
            flat, spec = tree_flatten((args, kwargs))
            converted = [convert(a) for a in flat]
            new_args, new_kwargs = torch.utils._pytree.tree_unflatten(converted, spec)
            for k in ("dtype", "device", "layout", "memory_format", "pin_memory",
                      "non_blocking"):
                new_kwargs.pop(k, None)
            if func.overloadpacket is aten._to_copy:
                return new_args[0].clone()
            if func.overloadpacket is aten.constant_pad_nd:
                return _lift(aten.constant_pad_nd)(new_args[0], new_args[1], NONE)
            return _lift(func)(*new_args, **new_kwargs)

        label_out = relabel(lambda t: self.labels.get(t).contiguous()
                            if tuple(self.labels.get(t).stride()) != tuple(t.stride())
                            or t.dim() == 0 else self.labels.get(t))
        self._set_out(out, label_out)
        sources = [self.param_of(t) for t in tensors_in]
        if len(tensors_in) == 1 and sources[0] is not None:
            name, flat = sources[0]
            elem_out = relabel(lambda t: flat if t is tensors_in[0] else t)
            self._set_elem(out, elem_out, name)

    def _set_out(self, out, label_out) -> None:
        outs = tree_flatten(out)[0]
        labels = tree_flatten(label_out)[0]
        for o, l in zip(outs, labels):
            if isinstance(o, Tensor) and isinstance(l, Tensor):
                self.labels.set(o, l)

    def _set_elem(self, out, elem_out, name: str) -> None:
        for o, e in zip(tree_flatten(out)[0], tree_flatten(elem_out)[0]):
            if isinstance(o, Tensor) and isinstance(e, Tensor) and tuple(o.shape) == \
                    tuple(e.shape):
                self.elem[id(o)] = (o, e, name)

    def param_view_t(self, weight: Tensor) -> Tensor:
        """A transposed stand-in for a linear weight: its element indices transposed, so that
        ``matmul`` sees ``x @ W^T``. The returned tensor is a real (transposed) view."""
        t = _lift(lambda: weight.t())()
        hit = self.param_of(weight)
        if hit is not None:
            self.elem[id(t)] = (t, _lift(lambda: hit[1].t())(), hit[0])
        self.labels.set(t, _lift(lambda: self.labels.get(weight).t())())
        return t

    def elementwise(self, operands, out, keep=None) -> None:
        """Broadcast the operands' labels; couple labelled operands; couple parameters."""
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, Tensor):
            return
        shape = tuple(out.shape)
        tensors = [a for a in operands if isinstance(a, Tensor)]
        result = None
        for t in tensors:
            if self.param_of(t) is not None and t is not keep:
                continue
            labels = _broadcast(self.labels.get(t), shape) if t.dim() <= len(shape) else None
            if labels is None:
                continue
            if result is None:
                result = labels
            else:
                self.labels.couple(result, labels)
                result = _lift(torch.where)(result >= 0, result, labels)
        if result is None:
            result = _none_like(out)
        else:
            self._pin_fixed_width(tensors, result, shape, keep)
        for t in tensors:
            if self.param_of(t) is not None and t is not keep:
                self.couple_param(t, result, shape)
                # A parameter that is itself labelled (a learned token concatenated earlier)
                labels = self.labels.get(t)
                if bool(_lift(lambda: (labels >= 0).any())()):
                    self.labels.couple(result, _broadcast(labels, shape))
        self.labels.set(out, result)

    @_lift
    def _pin_fixed_width(self, tensors, result: Tensor, shape, keep) -> None:
        """Data that carries no channel (a model input, a tensor built in forward) combined
        elementwise with channels along a dim where it has its own extent: removing a channel
        there would leave that data one element too wide. Record the channels along each such
        dim; :func:`bingo.structure.groups.build_groups` keeps only units that take such a dim
        whole (a head's channels against a rotary table), and blocks the rest."""
        for t in tensors:
            if self.param_of(t) is not None and t is not keep or t.dim() > len(shape):
                continue
            if bool((self.labels.get(t) >= 0).any()):
                continue
            offset = len(shape) - t.dim()
            for d in range(offset, len(shape)):
                if t.shape[d - offset] == 1:
                    continue
                rows = result.movedim(d, -1).reshape(-1, shape[d])
                labelled = rows >= 0
                top = torch.where(labelled, rows, NONE).amax(1, keepdim=True)
                varies = ((rows != top) & labelled).any(1)
                if bool(varies.any()):
                    self.labels.pinned.append(rows[varies].unique(dim=0).numpy())

    def matmul(self, a: Tensor, b: Tensor, out: Tensor) -> None:
        """``a @ b`` (batched, broadcast). A parameter operand is a consumer (contracted axis)
        and producer (free axis); two activations mix what they contract."""
        pa, pb = self.param_of(a), self.param_of(b)
        la, lb = self.labels.get(a), self.labels.get(b)
        shape = tuple(out.shape)
        if pb is not None and pa is None:
            self._contract_param(a, la, b, pb, out, weight_right=True)
            return
        if pa is not None and pb is None:
            self._contract_param(b, lb, a, pa, out, weight_right=False)
            return
        # Two activations (or two parameters): each output element mixes a's row and b's
        # column; the output carries the joined id.
        a1 = a.dim() == 1
        b1 = b.dim() == 1
        la2 = la.unsqueeze(0) if a1 else la
        lb2 = lb.unsqueeze(-1) if b1 else lb
        row = self.labels.mix(la2, (la2.dim() - 1,), "contraction")      # (..., n, 1)
        col = self.labels.mix(lb2, (lb2.dim() - 2,), "contraction")      # (..., 1, m)
        lead = torch.broadcast_shapes(row.shape[:-2], col.shape[:-2])
        row = _broadcast(row, (*lead, row.shape[-2], 1))
        col = _broadcast(col, (*lead, 1, col.shape[-1]))
        full = (*lead, row.shape[-2], col.shape[-1])
        r, c = _broadcast(row, full), _broadcast(col, full)
        self.labels.couple(r, c)
        joined = _lift(torch.where)(r >= 0, r, c)
        if a1:
            joined = joined.squeeze(-2)
        if b1:
            joined = joined.squeeze(-1)
        self.labels.set(out, _lift(lambda: joined.reshape(shape))())

    def _contract_param(self, x: Tensor, lx: Tensor, w: Tensor, pw, out: Tensor,
                        weight_right: bool) -> None:
        name, flat = pw
        if weight_right:        # x (..., n, k) @ w (..., k, m)
            k_dim, m_dim = w.dim() - 2 if w.dim() > 1 else 0, w.dim() - 1
            x_k = x.dim() - 1
        else:                   # w (..., m, k) @ x (..., k, n)
            k_dim, m_dim = w.dim() - 1, w.dim() - 2
            x_k = x.dim() - 2 if x.dim() > 1 else 0
        # The consumer: the weight's contracted axis takes the input's channel at each index.
        chan = self.labels.mix(lx, tuple(d for d in range(lx.dim()) if d != x_k), "consumer")
        chan = chan.reshape(-1)
        in_ids = None
        if bool(_lift(lambda: (chan >= 0).any())()):
            in_ids = self.param_labels_along(name, flat, k_dim)
            if in_ids is not None:
                self.labels.couple(in_ids, chan)
            else:
                self.labels.mix(chan, (0,), "unsupported")
        out_ids = self.param_labels_along(name, flat, m_dim) if w.dim() > 1 else None
        # The producer: the output's channel dim carries the weight's free axis.
        o = self.labels.get(out)
        if out_ids is not None:
            dim = out.dim() - 1 if weight_right else out.dim() - 2
            view = [1] * out.dim()
            view[dim] = out.shape[dim]
            self.labels.set(out, _broadcast(out_ids.reshape(view), tuple(out.shape)))
            self._record(name, in_ids, out_ids, "matmul", bias=self._pending_bias)
        else:
            self.labels.set(out, o)

    def _axis_of(self, name: str, ids: Optional[Tensor]) -> Optional[int]:
        if ids is None:
            return None
        first = int(ids.min())
        return next((pa.axis for pa in self.axes.values()
                     if pa.name == name and pa.first <= first < pa.first + pa.size), None)

    def _record(self, name, in_ids, out_ids, op, groups=1, bias=None) -> None:
        bias_hit = self.param_of(bias) if isinstance(bias, Tensor) else None
        self.contractions.append(ContractionUse(
            name, self._axis_of(name, in_ids), self._axis_of(name, out_ids),
            self.current_module(), op, groups, None if bias_hit is None else bias_hit[0]))

    def conv(self, args, kwargs, out) -> None:
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        transposed = bool(args[6]) if len(args) > 6 else False
        groups = int(args[8]) if len(args) > 8 else int(kwargs.get("groups", 1))
        hit = self.param_of(weight)
        lx = self.labels.get(x)
        chan = self.labels.mix(lx, (0, *range(2, lx.dim())), "consumer").reshape(-1)
        if hit is None or transposed and groups != 1:
            self.unknown(aten.convolution, args, kwargs, out,
                         "convolution with a computed weight or grouped transposed")
            return
        name, flat = hit
        out_axis, in_axis = (1, 0) if transposed else (0, 1)
        in_channels = x.shape[1]
        if groups == 1:
            in_ids = None
            if bool(_lift(lambda: (chan >= 0).any())()):
                in_ids = self.param_labels_along(name, flat, in_axis)
                self.labels.couple(in_ids, chan)
            out_ids = self.param_labels_along(name, flat, out_axis)
        elif groups == in_channels == out.shape[1]:
            # Depthwise: output channel c reads input channel c only: the same channel.
            out_ids = self.param_labels_along(name, flat, out_axis)
            self.labels.couple(out_ids, chan)
            in_ids = None
        else:
            # Grouped: a channel group mixes inside; both sides join per group.
            per_in, per_out = in_channels // groups, out.shape[1] // groups
            out_ids = self.param_labels_along(name, flat, out_axis)
            for g in range(groups):
                ids = _lift(torch.cat)([chan[g * per_in:(g + 1) * per_in],
                                        out_ids[g * per_out:(g + 1) * per_out]])
                self.labels.mix(ids, (0,), "grouped_conv")
            in_ids = None
        view = [1] * out.dim()
        view[1] = out.shape[1]
        labels = _broadcast(out_ids.reshape(view), tuple(out.shape))
        self.labels.set(out, labels)
        if bias is not None:
            self.couple_param(bias, labels, tuple(out.shape), dim=1)
        self._record(name, in_ids, out_ids, "convolution", groups, bias=bias)

    def batch_norm(self, args, out) -> None:
        x = args[0]
        primary = out[0] if isinstance(out, (tuple, list)) else out
        lx = self.labels.get(x)
        self.labels.set(primary, lx)
        for p in args[1:5]:
            if isinstance(p, Tensor):
                self.couple_param(p, lx, tuple(x.shape), dim=1)

    def layer_norm(self, args, out) -> None:
        x = args[0]
        shape = args[1]
        primary = out[0] if isinstance(out, (tuple, list)) else out
        count = len(shape) if isinstance(shape, (list, tuple)) else 1
        dims = tuple(range(x.dim() - count, x.dim()))
        rep = self.labels.mix(self.labels.get(x), dims, "norm")
        labels = _broadcast(rep, tuple(x.shape))
        self.labels.set(primary, labels)
        for p in args[2:4]:
            if isinstance(p, Tensor):
                self.couple_param(p, labels, tuple(x.shape))

    def mix_all(self, args, out, kind, dims_of) -> None:
        x = args[0]
        primary = out[0] if isinstance(out, (tuple, list)) else out
        rep = self.labels.mix(self.labels.get(x), dims_of(x), kind)
        labels = _broadcast(rep, tuple(x.shape))
        self.labels.set(primary, labels)
        for p in args[1:]:
            if isinstance(p, Tensor):
                self.couple_param(p, labels, tuple(x.shape))

    def embedding(self, args, out) -> None:
        weight = args[0]
        hit = self.param_of(weight)
        if hit is None:
            self.labels.set(out, _none_like(out))
            return
        name, flat = hit
        ids = self.param_labels_along(name, flat, 1)
        if ids is None:
            self.labels.set(out, _none_like(out))
            return
        view = [1] * out.dim()
        view[-1] = out.shape[-1]
        self.labels.set(out, _broadcast(ids.reshape(view), tuple(out.shape)))
        self._record(name, None, ids, "embedding")

    def attention(self, args, kwargs, out) -> None:
        """Fused scaled-dot-product attention: q (B, Hq, L, E), k/v (B, Hk, S, E): each query
        head mixes its q channels with its key/value head's k and v channels (grouped-query
        attention: Hq = r * Hk, query head h reads key/value head h // r)."""
        q, k, v = args[0], args[1], args[2]
        primary = out[0] if isinstance(out, (tuple, list)) else out
        hq, hk = q.shape[-3], k.shape[-3]
        r = hq // hk if hk and hq % hk == 0 else None
        lq = self.labels.mix(self.labels.get(q), (q.dim() - 2, q.dim() - 1), "attention")
        lk = self.labels.mix(self.labels.get(k), (k.dim() - 2, k.dim() - 1), "attention")
        lv = self.labels.mix(self.labels.get(v), (v.dim() - 2, v.dim() - 1), "attention")
        if r is None:
            self.unknown(aten._scaled_dot_product_flash_attention_for_cpu, args, kwargs, out,
                         f"{hq} query heads do not group over {hk} key/value heads")
            return
        expand = _lift(lambda t: t.repeat_interleave(r, dim=-3) if r > 1 else t)
        lk, lv = expand(lk), expand(lv)
        shape = torch.broadcast_shapes(lq.shape, lk.shape, lv.shape)
        lq, lk, lv = (_broadcast(t, shape) for t in (lq, lk, lv))
        self.labels.couple(lq, lk)
        self.labels.couple(lq, lv)
        joined = _lift(torch.where)(lq >= 0, lq, _lift(torch.where)(lk >= 0, lk, lv))
        _record_mix(self.labels, joined, "attention")
        self.labels.set(primary, _broadcast(joined, tuple(primary.shape)))

    def reduction(self, packet, args, kwargs, out) -> None:
        x = args[0]
        if not isinstance(x, Tensor):
            return
        dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], bool)
                         and args[1] is not None and not isinstance(args[1], float) else None)
        if packet in (aten.max, aten.min) and len(args) == 1:
            dim = None
        keepdim = kwargs.get("keepdim", False)
        for a in args[2:3]:
            if isinstance(a, bool):
                keepdim = a
        dims = _dims(dim, x.dim())
        rep = self.labels.mix(self.labels.get(x), dims, "reduction")
        for o in tree_flatten(out)[0]:
            if not isinstance(o, Tensor):
                continue
            labels = rep if keepdim or o.dim() == rep.dim() else \
                _lift(lambda: rep.reshape(tuple(o.shape)) if rep.numel() == o.numel()
                      else rep.expand(*rep.shape))()
            if tuple(labels.shape) != tuple(o.shape):
                labels = _lift(lambda: rep.reshape(-1)[:1].reshape(()).expand(*o.shape))()
            self.labels.set(o, labels)

    def channel_spatial(self, args, out) -> None:
        x = args[0]
        rep = self.labels.mix(self.labels.get(x), tuple(range(2, x.dim())), "spatial")
        for o in tree_flatten(out)[0]:
            if isinstance(o, Tensor) and o.dim() == x.dim() and o.dtype != torch.long:
                self.labels.set(o, _broadcast(rep, tuple(o.shape)))


def _record_mix(labels: _Labels, joined: Tensor, kind: str) -> None:
    ids = _lift(lambda: joined[joined >= 0].unique())()
    labels.mixed.setdefault(kind, []).append(ids.numpy())


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def _logits(output) -> Optional[Tensor]:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def canonical_names(model: nn.Module) -> tuple[dict[int, tuple[str, Tensor]], dict[str, list[str]]]:
    """id -> (canonical name, tensor) of every parameter and buffer, and canonical name ->
    all its names (a tied or shared tensor has several; the first in ``named_parameters``
    order is canonical)."""
    tensors: dict[int, tuple[str, Tensor]] = {}
    aliases: dict[str, list[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + \
        list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None:
            continue
        if id(t) in tensors:
            aliases[tensors[id(t)][0]].append(name)
            continue
        tensors[id(t)] = (name, t)
        aliases[name] = [name]
    return tensors, aliases


@torch.no_grad()
def trace(model: nn.Module, example_inputs: Any, forward: Optional[Callable] = None
          ) -> TraceResult:
    """Run ``model`` once on ``example_inputs`` (a tensor, a tuple of positional arguments or a
    dict of keyword arguments) in eval mode and record its structure (see the module docstring).
    The model's train/eval mode is restored; nothing else about it changes."""
    tensors, aliases = canonical_names(model)
    stack: list[str] = []
    calls: dict[str, int] = {}
    order: list[str] = []

    def pre(name):
        def hook(_m, _a):
            stack.append(name)
            if name not in calls:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1
        return hook

    def post(_m, _a, _o):
        if stack:
            stack.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post))
    tracer = _Tracer(tensors, lambda: stack[-1] if stack else "")
    was_training = model.training
    model.eval()
    try:
        with _AllowSlowPaths(), tracer:
            if forward is not None:
                output = forward(model, example_inputs)
            elif isinstance(example_inputs, dict):
                output = model(**example_inputs)
            elif isinstance(example_inputs, (tuple, list)):
                output = model(*example_inputs)
            else:
                output = model(example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    logits = _logits(output)
    out_ids = np.zeros(0, dtype=np.int64)
    if logits is not None:
        labels = tracer.labels.get(logits)
        out_ids = _lift(lambda: labels[labels >= 0].unique())().numpy()
    mixed = {k: np.unique(np.concatenate(v)) for k, v in tracer.labels.mixed.items() if v}
    return TraceResult(
        axes=tracer.axes, edges=tracer.labels.edges, num_ids=tracer.labels.next_id,
        output_ids=out_ids, mixed_by=mixed, contractions=tracer.contractions,
        unsupported=tracer.unsupported, module_calls=calls, module_order=order,
        param_names=aliases, pinned=tracer.labels.pinned)
