"""Least-squares reconstruction: refit the surviving weights of a pruned model, no retraining.

One-shot pruning zeroes units and leaves the surviving weights as training left them, although
they were fitted to inputs that the pruning has just changed. :class:`LeastSquaresReconstruction`
closes that gap in closed form, layer by layer in forward order (Hassibi & Stork's Optimal Brain
Surgeon applied layer-wise, as in OBC / SparseGPT, Frantar & Alistarh 2022/2023):

    for every nn.Linear / nn.Conv2d whose weights are masked or whose input has changed:
        X = its input in the *pruned* model (earlier layers already refitted), on calibration data
        Y = its output in the *dense* model on the same data
        W, b = argmin ||X W^T + b - Y||^2 + damping,  pruned entries of W (and b) held at zero

The target is the dense model's output, not the layer's own weights applied to the pruned input,
so each layer also corrects the error that reached it from the layers before. The first pruned
layer, when its units go whole (neurons, channels), needs no fit: its input is the dense one, so
its kept rows already are the exact fit. Layers that
nothing scored but whose input changed (the output layer, at neuron granularity) are refitted
with every weight free.

How the constrained fit is solved. With a bias the fit is centred (the bias absorbs the means;
features that are constant on the calibration data keep their weights, the bias absorbs them). A
layer whose masks leave the same input features to every kept row (neuron / channel pruning) is
one ridge regression with many right-hand sides. Per-weight masks give every row its own feature
set. Up to ``exact_features`` inputs each row is solved exactly on its own features. Wider layers
(where that costs too much) fit the weights without a mask (W*), then remove the masked entries
from W* column by column, each removal compensated on the columns not yet visited through the
Cholesky factor of the inverse Hessian (SparseGPT's fixed-mask update, blocked): the OBS optimum
for that column order, not the exact one (on strongly correlated inputs it can leave a third more
error than the exact fit; tests/test_reconstruct.py).

Cost per reconstruction: for a plain ``nn.Sequential`` one forward pass over the calibration data
in all (each top-level child runs once, on the inputs the child before produced with its refitted
weights); for any other model one forward pass per refitted layer, stopped at that layer;
``samples * F^2`` multiply-adds for each layer's ``F x F`` Hessian (F = its
inputs, times kernel area for a convolution) and an ``F^3`` solve; per-weight masks add the sum
over rows of ``|S|^3`` (exact rows) or ``out * F^2`` (OBS update). The statistics and solves run in float64 on the CPU whatever the model's
device (exact and simple for the layer widths measured here; a GPU path for wide layers is not
written). Everything is deterministic given the calibration samples (no sampling
variance); the fit's error on unseen data is a generalisation error, kept small by using many more
calibration samples than features and by the damping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bingo.errors import InputMismatchError, InvalidOptionError, NonFiniteError

__all__ = ["LeastSquaresReconstruction"]

RECONSTRUCTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
"""Module types whose weights a reconstruction refits (those :func:`bingo.prune` masks)."""


class _Stop(Exception):
    """Raised by a forward hook once the layer of interest has been seen."""


@dataclass
class _Layer:
    name: str
    module: nn.Module


def _layers_in_forward_order(model: nn.Module, probe: Tensor) -> list[_Layer]:
    """Every Linear / Conv2d of ``model`` in the order one forward pass calls it; each must be
    called exactly once (a shared or repeated layer has no single input to fit)."""
    calls: list[str] = []
    modules = {name: m for name, m in model.named_modules() if isinstance(m, RECONSTRUCTED_MODULES)}
    handles = [m.register_forward_hook(lambda _m, _i, _o, name=name: calls.append(name))
               for name, m in modules.items()]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    repeated = sorted({n for n in calls if calls.count(n) > 1})
    if repeated:
        raise InputMismatchError(f"least-squares reconstruction needs every Linear/Conv2d to be "
                                 f"called once per forward; {repeated} are called more often")
    for name in calls:
        module = modules[name]
        if isinstance(module, nn.Conv2d) and (module.groups != 1
                                              or module.padding_mode != "zeros"):
            raise InputMismatchError(f"least-squares reconstruction supports ungrouped, "
                                     f"zero-padded Conv2d only; layer {name!r} has groups="
                                     f"{module.groups}, padding_mode={module.padding_mode!r}")
    return [_Layer(name, modules[name]) for name in calls]


class _SequentialStream:
    """The calibration inputs of one top-level child of a plain ``nn.Sequential``, as the model's
    current weights produce them. Layers are refitted in forward order and a refit changes
    nothing upstream of it, so the stream only ever moves forward: each child runs once per
    reconstruction, not once per refitted layer after it."""

    def __init__(self, model: nn.Sequential, batches):
        self.model, self.index, self.chunks = model, 0, list(batches)

    @staticmethod
    def child_index(model: nn.Module, layer_name: str) -> int | None:
        """The top-level child of ``model`` holding ``layer_name``; None when ``model`` is not a
        plain nn.Sequential (a subclass may run its children in any order)."""
        if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
            return None
        head = layer_name.partition(".")[0]
        names = [name for name, _ in model.named_children()]
        return names.index(head) if head in names else None

    def inputs_of(self, index: int) -> list[Tensor]:
        if index < self.index:
            raise AssertionError("the stream moves forward only")  # layers come in forward order
        while self.index < index:
            child = self.model[self.index]
            self.chunks = [child(chunk) for chunk in self.chunks]
            self.index += 1
        return self.chunks


def _row_fingerprints(module: nn.Module) -> dict[str, Tensor]:
    """Per tensor of ``module`` (parameters and buffers), one (sum, sum of squares) pair per
    leading-dimension row, in float64: enough to tell whether a row still holds the values
    prepare() saw, without keeping a copy of the weights."""
    out = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        rows = tensor.detach().reshape(tensor.shape[0] if tensor.dim() else 1, -1).double()
        out[name] = torch.stack([rows.sum(1), rows.square().sum(1)], 1).cpu()
    return out


def _as_rows(module: nn.Module, inputs: Tensor) -> Tensor:
    """A layer's input as rows of features: (N, in) for a Linear, the unfolded patches
    (N * positions, C * kh * kw) for a Conv2d (the order of ``weight.reshape(out, -1)``)."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1])
    patches = F.unfold(inputs, module.kernel_size, module.dilation, module.padding,
                       module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _outputs_as_rows(module: nn.Module, outputs: Tensor) -> Tensor:
    """A layer's output in the row order of :func:`_as_rows`: (rows, out)."""
    if isinstance(module, nn.Linear):
        return outputs.reshape(-1, outputs.shape[-1])
    return outputs.flatten(2).transpose(1, 2).reshape(-1, outputs.shape[1])


def _exact_rows(hessian: Tensor, cross: Tensor, keep: Tensor, rows: Tensor) -> Tensor:
    """Each kept row's own constrained least-squares fit: solve ``H[S, S] w = c[S]`` on the
    row's kept features S (float64; zero where not kept)."""
    weight = torch.zeros(keep.shape, dtype=hessian.dtype)
    for row in rows.nonzero().flatten().tolist():
        cols = keep[row].nonzero().flatten()
        if cols.numel():
            weight[row, cols] = torch.linalg.solve(hessian[cols][:, cols], cross[cols, row])
    return weight


def _whole_rows(weight_mask: Tensor) -> bool:
    """Whether every row (output unit) of a weight keep-mask is kept whole or removed whole."""
    rows = weight_mask.reshape(weight_mask.shape[0], -1)
    return bool((rows == rows[:, :1]).all())


def _masked_update(weight: Tensor, keep: Tensor, hessian: Tensor, block: int) -> Tensor:
    """SparseGPT's fixed-mask update: zero ``weight``'s entries where ``keep`` is False, column by
    column, compensating each removal on the columns not yet visited (float64 in, float64 out).
    ``hessian`` is the (damped, positive definite) F x F Hessian of the layer-wise error."""
    weight = weight.clone()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    factor = torch.linalg.cholesky(inverse, upper=True)
    columns = weight.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w = weight[:, start:end].clone()
        errors = torch.zeros_like(w)
        f = factor[start:end, start:end]
        for i in range(end - start):
            err = torch.where(keep[:, start + i], 0.0, w[:, i]) / f[i, i]
            w[:, i:] -= err[:, None] * f[i, i:][None, :]
            errors[:, i] = err
        weight[:, start:end] = torch.where(keep[:, start:end], w, 0.0)
        weight[:, end:] -= errors @ factor[start:end, end:]
    return weight


class LeastSquaresReconstruction:
    """Refits a pruned model's surviving weights to the dense model's layer outputs (see the
    module docstring). Pass it to :func:`bingo.prune` as ``reconstruct=``: every pruned
    candidate of the floor search is reconstructed before it is evaluated, and so is the result.

    Args:
        data: calibration data: an input tensor, ``(inputs, targets)`` or a TensorDataset (targets
            are not used). Training data is the natural choice: the fit needs no labels.
        samples: use at most this many examples (a seeded random subset). More samples than a
            layer's input features keep the fit from overfitting them.
        damping: ridge term, a fraction of the mean diagonal of each layer's Hessian (SparseGPT's
            ``percdamp``): keeps the solve well posed when features are nearly collinear.
        chunk: examples per forward pass while accumulating a Hessian (memory, not results).
        exact_features: per-weight masks on layers with at most this many input features are
            fitted exactly, row by row (``sum over rows |S|^3`` work); wider layers use the
            blocked OBS update (``out * F^2``), which is exact only up to its column order.
        block: columns per block of the OBS update (speed, not results).
        seed: seed of the calibration subset.
    """

    def __init__(self, data, *, samples: int = 4096, damping: float = 0.01, chunk: int = 1024,
                 block: int = 128, exact_features: int = 1024, seed: int = 0):
        for name, value in (("samples", samples), ("chunk", chunk), ("block", block),
                            ("exact_features", exact_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
            raise InvalidOptionError(f"damping must be a positive number, got {damping!r}")
        inputs = getattr(data, "tensors", data)
        if isinstance(inputs, (tuple, list)):
            inputs = inputs[0] if inputs else None
        if not isinstance(inputs, Tensor) or inputs.dim() < 2 or inputs.shape[0] == 0:
            raise InvalidOptionError("reconstruction data must be an input tensor (N, ...), "
                                     "(inputs, targets) or a TensorDataset with N >= 1")
        if not inputs.is_floating_point():
            raise InputMismatchError(f"reconstruction inputs must be floating point, got "
                                     f"{inputs.dtype}")
        if not bool(torch.isfinite(inputs).all()):
            raise NonFiniteError("reconstruction data contains NaN or Inf")
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(inputs.shape[0], generator=generator)[:samples]
        self.inputs = inputs[pick]
        self.damping, self.chunk, self.block = float(damping), chunk, block
        self.exact_features = exact_features
        self._targets: dict[str, Tensor] | None = None
        self._output_shapes: dict[str, tuple[int, ...]] = {}
        self._dense_statistics: dict[str, tuple] = {}
        self._fingerprints: dict[str, dict[str, Tensor]] = {}
        self._layers: list[_Layer] | None = None
        self.refitted: list[str] = []
        """Names of the layers the last call refitted, in forward order."""

    def _batches(self, model: nn.Module):
        """The calibration inputs in chunks, on the model's device and in its dtype."""
        param = next(model.parameters())
        for start in range(0, self.inputs.shape[0], self.chunk):
            yield self.inputs[start:start + self.chunk].to(param.device, param.dtype)

    # -- what prune() calls ---------------------------------------------------------------

    def parameter_names(self, model: nn.Module) -> list[str]:
        """Every parameter a reconstruction of ``model`` may rewrite (weights and biases of its
        Linear / Conv2d layers), so that a caller can save and restore them."""
        return [f"{name}.{p}" if name else p
                for name, m in model.named_modules() if isinstance(m, RECONSTRUCTED_MODULES)
                for p, _ in m.named_parameters(recurse=False)]

    @torch.no_grad()
    def prepare(self, model: nn.Module) -> None:
        """Record the dense model's layer outputs on the calibration data (its targets). Call
        it on the unpruned model, before any mask is written."""
        probe = next(self._batches(model))[:1]
        was_training = model.training
        model.eval()
        try:
            self._layers = _layers_in_forward_order(model, probe)
            outputs: dict[str, list[Tensor]] = {l.name: [] for l in self._layers}
            shapes: dict[str, tuple[int, ...]] = {}

            def record(module, _inputs, out, name):
                shapes[name] = tuple(out.shape[1:])
                # The model's own dtype: these are its outputs, so the float64 statistics
                # convert them exactly on use, at half the memory.
                outputs[name].append(_outputs_as_rows(module, out).cpu())

            handles = [l.module.register_forward_hook(
                lambda m, i, out, name=l.name: record(m, i, out, name)) for l in self._layers]
            try:
                for batch in self._batches(model):
                    model(batch)
            finally:
                for h in handles:
                    h.remove()
        finally:
            model.train(was_training)
        self._targets = {name: torch.cat(chunks) for name, chunks in outputs.items()}
        self._output_shapes = shapes
        self._dense_statistics: dict[str, tuple] = {}
        self._fingerprints = ({name: _row_fingerprints(child)
                               for name, child in model.named_children()}
                              if _SequentialStream.child_index(model, self._layers[0].name)
                              is not None else {})
        for name, target in self._targets.items():
            if not bool(torch.isfinite(target).all()):
                raise NonFiniteError(f"the dense model's output of layer {name!r} is not finite "
                                     "on the calibration data")

    @torch.no_grad()
    def __call__(self, model: nn.Module, masks: Mapping[str, Tensor]) -> None:
        """Refit ``model`` (the prepared model, or one of the same architecture) in place.
        ``model`` already carries the pruned weights (zeros where
        ``masks``, parameter name -> bool keep-mask, is False); the refitted weights keep those
        zeros."""
        if self._targets is None:
            raise InvalidOptionError("call prepare(dense_model) before reconstructing")
        names = {l.name for l in self._layers}
        unknown = sorted({k.rpartition(".")[0] for k in masks} - names)
        if unknown:
            raise InputMismatchError(f"masks name layers {unknown} that are not Linear/Conv2d "
                                     "layers of the prepared model")
        was_training = model.training
        model.eval()
        self.refitted = []
        changed = False
        stream = (_SequentialStream(model, self._batches(model))
                  if _SequentialStream.child_index(model, self._layers[0].name) is not None
                  else None)
        try:
            for layer in self._layers:
                weight_mask = masks.get(f"{layer.name}.weight" if layer.name else "weight")
                bias_mask = masks.get(f"{layer.name}.bias" if layer.name else "bias")
                masked = weight_mask is not None and not bool(weight_mask.all())
                if not (changed or masked):
                    continue  # nothing before it changed and nothing in it is pruned
                if not changed and _whole_rows(weight_mask):
                    # Its input is the dense one and each row is kept whole or removed whole:
                    # the kept rows already are the exact fit of the dense outputs.
                    changed = True
                    if stream is not None:
                        self._skip_whole_rows(model, layer, weight_mask, stream)
                    continue
                self._refit(model, layer, weight_mask, bias_mask, upstream_changed=changed,
                            stream=stream)
                self.refitted.append(layer.name)
                changed = True
        finally:
            model.train(was_training)

    # -- one layer ------------------------------------------------------------------------

    def _skip_whole_rows(self, model: nn.Module, layer: _Layer, weight_mask: Tensor,
                         stream: _SequentialStream) -> None:
        """Move ``stream`` past the first pruned layer without running it (nor anything before
        it), when that layer is a top-level child: on its dense input a row removed whole
        outputs exactly its bias, and a kept row exactly its dense output, which prepare()
        recorded. That holds only while those children carry the prepared values (a model of
        the same architecture with other weights, or NaN weights, may be passed): otherwise the
        stream is left alone and runs them."""
        index = _SequentialStream.child_index(model, layer.name)
        names = [name for name, _ in model.named_children()]
        if names[index] != layer.name or not self._fingerprints:
            return
        module = model.get_submodule(layer.name)
        kept = weight_mask.reshape(weight_mask.shape[0], -1)[:, 0].cpu()
        for name in names[:index + 1]:
            now, then = _row_fingerprints(model.get_submodule(name)), self._fingerprints[name]
            for tensor, prints in then.items():
                rows = kept if name == layer.name and prints.shape[0] == kept.shape[0] else ...
                if tensor not in now or not torch.equal(now[tensor][rows], prints[rows]):
                    return
        shape, dense = self._output_shapes[layer.name], self._targets[layer.name]
        if isinstance(module, nn.Conv2d):  # rows are (N * positions, C): an NCHW view of them
            dense = dense.reshape(-1, shape[1] * shape[2], shape[0]).transpose(1, 2)
        dense = dense.reshape(-1, *shape)
        removed = ~kept
        value = (module.bias.detach()[removed.to(module.bias.device)].cpu()
                 if module.bias is not None else 0.0)
        param = module.weight
        chunks = []
        for chunk in torch.split(dense, self.chunk):
            chunk = chunk.clone(memory_format=torch.contiguous_format)  # never write the targets
            channels = chunk.movedim(1, -1) if isinstance(module, nn.Conv2d) else chunk
            channels[..., removed] = value
            chunks.append(chunk.to(param.device, param.dtype))
        stream.index, stream.chunks = index + 1, chunks

    def _statistics(self, model: nn.Module, layer: _Layer, stream: _SequentialStream | None
                    ) -> tuple[Tensor, ...]:
        """n, sum x, sum x x^T, sum x y^T, sum y over the calibration rows of ``layer`` (float64):
        x its input in ``model``, y the dense output."""
        target = self._targets[layer.name]
        module = model.get_submodule(layer.name)
        seen: list[Tensor] = []
        if stream is None:
            run, chunks = model, self._batches(model)
        else:  # only the top-level child that holds the layer runs, on the stream's inputs
            index = _SequentialStream.child_index(model, layer.name)
            run, chunks = model[index], stream.inputs_of(index)

        def grab(module, args):
            seen.append(_as_rows(module, args[0]).double().cpu())
            raise _Stop

        handle = module.register_forward_pre_hook(grab)
        n, sx, sxx, sxy, row = 0, None, None, None, 0
        try:
            for batch in chunks:
                seen.clear()
                try:
                    run(batch)
                except _Stop:
                    pass
                x = seen[0]
                y = target[row:row + x.shape[0]].double()
                row += x.shape[0]
                if sx is None:
                    sx, sxx = x.sum(0), x.T @ x
                    sxy = x.T @ y
                else:
                    sx += x.sum(0)
                    sxx += x.T @ x
                    sxy += x.T @ y
                n += x.shape[0]
        finally:
            handle.remove()
        if row != target.shape[0]:
            raise InputMismatchError(f"layer {layer.name!r} saw {row} calibration rows, the dense "
                                     f"model {target.shape[0]}: the model changed shape")
        if not bool(torch.isfinite(sxx).all()):
            raise NonFiniteError(f"the input of layer {layer.name!r} is not finite in the pruned "
                                 "model (NaN or Inf weights?)")
        return n, sx, sxx, sxy, target.double().sum(0)

    def _refit(self, model: nn.Module, layer: _Layer, weight_mask: Tensor | None,
               bias_mask: Tensor | None, upstream_changed: bool,
               stream: _SequentialStream | None) -> None:
        module = model.get_submodule(layer.name)
        weight = module.weight
        out = weight.shape[0]
        if upstream_changed:
            n, sx, sxx, sxy, sy = self._statistics(model, layer, stream)
        else:  # the dense input: the same statistics on every call (a floor search makes many)
            if layer.name not in self._dense_statistics:
                self._dense_statistics[layer.name] = self._statistics(model, layer, stream)
            n, sx, sxx, sxy, sy = self._dense_statistics[layer.name]
        current = weight.detach().reshape(out, -1).double().cpu()
        keep = (torch.ones_like(current, dtype=torch.bool) if weight_mask is None
                else weight_mask.reshape(out, -1).cpu())
        rows = keep.any(1)
        if bias_mask is not None:
            rows &= bias_mask.cpu()
        has_bias = module.bias is not None
        if has_bias:  # centred statistics: the bias absorbs every mean
            mean_x, mean_y = sx / n, sy / n
            hessian = sxx / n - torch.outer(mean_x, mean_x)
            cross = sxy / n - torch.outer(mean_x, mean_y)
            varying = torch.diagonal(hessian) > 1e-12 * torch.diagonal(hessian).abs().max().clamp(
                min=1e-300)
        else:
            hessian, cross = sxx / n, sxy / n
            varying = torch.ones(hessian.shape[0], dtype=torch.bool)
        fitted = current.clone()
        idx = varying.nonzero().flatten()
        if idx.numel() and bool(rows.any()):
            h = hessian[idx][:, idx]
            h = h + self.damping * torch.diagonal(h).mean() * torch.eye(idx.numel(),
                                                                        dtype=h.dtype)
            # Constant features keep their current weights (the centred fit cannot see them;
            # the bias absorbs their value).
            c = cross[idx]
            sub_keep = keep[:, idx]
            pattern = sub_keep[rows]
            if bool((pattern == pattern[:1]).all()):  # one feature set for every kept row
                kept_rows = rows.nonzero().flatten()
                pos = pattern[0].nonzero().flatten()
                solution = torch.zeros(kept_rows.numel(), idx.numel(), dtype=h.dtype)
                if pos.numel():
                    solution[:, pos] = torch.linalg.solve(h[pos][:, pos], c[pos][:, rows]).T
                fitted[kept_rows[:, None], idx[None, :]] = solution
            elif idx.numel() <= self.exact_features:
                fitted[:, idx] = _exact_rows(h, c, sub_keep, rows)
            else:
                fitted[:, idx] = _masked_update(torch.linalg.solve(h, c).T, sub_keep, h,
                                                self.block)
        fitted[~rows] = 0.0
        fitted = torch.where(keep, fitted, 0.0)
        if not bool(torch.isfinite(fitted).all()):
            raise NonFiniteError(f"least-squares refit of layer {layer.name!r} is not finite")
        weight.copy_(fitted.reshape(weight.shape).to(weight.dtype))
        if has_bias:
            bias = mean_y - fitted @ mean_x
            bias[~rows] = 0.0
            module.bias.copy_(bias.to(module.bias.dtype))
