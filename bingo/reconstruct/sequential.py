"""The fast path for a plain ``nn.Sequential`` of Linear / ungrouped Conv2d layers: one forward
pass over the calibration data per reconstruction.

prepare() records every layer's dense output (the targets). A reconstruction then streams the
calibration inputs through the top-level children once: layers are refitted in forward order and
a refit changes nothing upstream of it, so each child runs once, on the inputs the child before
produced with its refitted weights. The first layer that loses whole rows is skipped from its
recorded dense output (on its dense input its kept rows already are the exact fit) while the
layers up to it hold the prepared values; otherwise it is run. Every layer after the first change
is refitted (the ``"downstream"`` policy): the behaviour the recorded MNIST results were made
with. The stream holds one child's outputs for all calibration examples and the targets all
layers' outputs: the memory of small models; any other model takes the general path
(:mod:`bingo.reconstruct.general`), whose memory is bounded by a chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional

import torch
from torch import Tensor, nn

from bingo.errors import InputMismatchError, NonFiniteError

from .calibration import Calibration
from .layers import Layer, StopForward
from .moments import Moments
from .solve import whole_rows

if TYPE_CHECKING:
    from .reconstruction import LeastSquaresReconstruction


class SequentialStream:
    """The calibration inputs of one top-level child of a plain ``nn.Sequential``, as the model's
    current weights produce them. Layers are refitted in forward order and a refit changes
    nothing upstream of it, so the stream only ever moves forward: each child runs once per
    reconstruction, not once per refitted layer after it."""

    def __init__(self, model: nn.Sequential, batches):
        self.model, self.index, self.chunks = model, 0, list(batches)

    @staticmethod
    def child_index(model: nn.Module, layer_name: str) -> Optional[int]:
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


def _is_plain(layer: Layer, model: nn.Module) -> bool:
    if layer.problem is not None or layer.route is not None or layer.kind is None:
        return False
    module = model.get_submodule(layer.module)
    if isinstance(module, nn.Conv2d):
        return type(module).forward is nn.Conv2d.forward and module.groups == 1 and \
            module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class SequentialPath:
    """See the module docstring."""

    @staticmethod
    def eligible(model: nn.Module, layers: list[Layer], calibration: Calibration) -> bool:
        """A plain nn.Sequential run on one tensor, whose layers are all nn.Linear / zero-padded,
        ungrouped nn.Conv2d (their own forward) called once, inside top-level children."""
        return bool(layers) and calibration.is_tensor and all(
            _is_plain(l, model) and SequentialStream.child_index(model, l.module) is not None
            for l in layers)

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.targets: dict[str, Tensor] = {}
        self.output_shapes: dict[str, tuple[int, ...]] = {}
        self.fingerprints: dict[str, dict[str, Tensor]] = {}
        self.dense_statistics: dict[str, Moments] = {}
        self.chunk = 1

    @torch.no_grad()
    def prepare(self, model: nn.Module, calibration: Calibration, device) -> None:
        """Record the dense model's layer outputs on the calibration data (its targets)."""
        outputs: dict[str, list[Tensor]] = {l.name: [] for l in self.layers}

        def record(layer, module, out):
            self.output_shapes[layer.name] = tuple(out.shape[1:])
            # The model's own dtype: these are its outputs, so the statistics convert them
            # exactly on use, at half the memory of float64.
            outputs[layer.name].append(layer.kind.output_rows(module, out)[:, 0].cpu())

        handles = [model.get_submodule(l.module).register_forward_hook(
            lambda m, i, out, l=l: record(l, m, out)) for l in self.layers]
        try:
            for batch in calibration.chunks(device):
                model(batch)
        finally:
            for h in handles:
                h.remove()
        self.targets = {name: torch.cat(chunks) for name, chunks in outputs.items()}
        self.dense_statistics, self.chunk = {}, calibration.chunk
        self.fingerprints = {name: _row_fingerprints(child)
                             for name, child in model.named_children()}
        for name, target in self.targets.items():
            if not bool(torch.isfinite(target).all()):
                raise NonFiniteError(f"the dense model's output of layer {name!r} is not finite "
                                     "on the calibration data")

    @torch.no_grad()
    def run(self, rec: "LeastSquaresReconstruction", model: nn.Module,
            masks: Mapping[str, Tensor], calibration: Calibration, device) -> None:
        """Refit ``model`` in place (see the module docstring)."""
        changed = False
        stream = SequentialStream(model, calibration.chunks(device))
        for layer in rec._progress(self.layers):
            weight_mask = masks.get(layer.weight)
            masked = weight_mask is not None and not bool(weight_mask.all())
            if not (changed or masked):
                continue  # nothing before it changed and nothing in it is pruned
            if not changed and bool(whole_rows(weight_mask.reshape(weight_mask.shape[0], -1))
                                    .all()):
                # Its input is the dense one and each row is kept whole or removed whole:
                # the kept rows already are the exact fit of the dense outputs.
                changed = True
                rec.skipped[layer.name] = "dense input, whole rows: already the exact fit"
                self._skip_whole_rows(model, layer, weight_mask, stream)
                continue
            started = rec._clock()
            if not changed:  # the dense input: the same statistics on every call
                if layer.name not in self.dense_statistics:
                    self.dense_statistics[layer.name] = self._statistics(model, layer, stream,
                                                                         rec)
                moments = self.dense_statistics[layer.name]
            else:
                moments = self._statistics(model, layer, stream, rec)
            rec._fit_layer(model, layer, moments, masks, started)
            changed = True

    def _skip_whole_rows(self, model: nn.Module, layer: Layer, weight_mask: Tensor,
                         stream: SequentialStream) -> None:
        """Move ``stream`` past the first pruned layer without running it (nor anything before
        it), when that layer is a top-level child: on its dense input a row removed whole
        outputs exactly its bias, and a kept row exactly its dense output, which prepare()
        recorded. That holds only while those children carry the prepared values (a model of
        the same architecture with other weights, or NaN weights, may be passed): otherwise the
        stream is left alone and runs them."""
        index = SequentialStream.child_index(model, layer.name)
        names = [name for name, _ in model.named_children()]
        if names[index] != layer.name or not self.fingerprints:
            return
        module = model.get_submodule(layer.name)
        kept = weight_mask.reshape(weight_mask.shape[0], -1)[:, 0].cpu()
        for name in names[:index + 1]:
            now, then = _row_fingerprints(model.get_submodule(name)), self.fingerprints[name]
            for tensor, prints in then.items():
                rows = kept if name == layer.name and prints.shape[0] == kept.shape[0] else ...
                if tensor not in now or not torch.equal(now[tensor][rows], prints[rows]):
                    return
        shape, dense = self.output_shapes[layer.name], self.targets[layer.name]
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

    def _statistics(self, model: nn.Module, layer: Layer, stream: SequentialStream,
                    rec: "LeastSquaresReconstruction") -> Moments:
        """The moments of ``layer``'s input in ``model`` and its dense output: only the
        top-level child that holds the layer runs, on the stream's inputs."""
        target = self.targets[layer.name]
        module = model.get_submodule(layer.name)
        index = SequentialStream.child_index(model, layer.name)
        run, chunks = model[index], stream.inputs_of(index)
        seen: list[Tensor] = []

        def grab(module, args):
            seen.append(layer.kind.rows(module, args[0]))
            raise StopForward

        handle = module.register_forward_pre_hook(grab)
        moments = rec._moments(model)
        row = 0
        try:
            for batch in chunks:
                seen.clear()
                try:
                    run(batch)
                except StopForward:
                    pass
                x = seen[0]
                moments.add(x, target[row:row + x.shape[0]].unsqueeze(1))
                row += x.shape[0]
        finally:
            handle.remove()
        if row != target.shape[0]:
            raise InputMismatchError(f"layer {layer.name!r} saw {row} calibration rows, the dense "
                                     f"model {target.shape[0]}: the model changed shape")
        if not moments.finite():
            raise NonFiniteError(f"the input of layer {layer.name!r} is not finite in the pruned "
                                 "model (NaN or Inf weights?)")
        return moments
