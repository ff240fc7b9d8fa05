"""Least-squares reconstruction: refit the surviving weights of a pruned model, no retraining.

One-shot pruning zeroes units and leaves the surviving weights as training left them, although
they were fitted to inputs that the pruning has just changed. :class:`LeastSquaresReconstruction`
closes that gap in closed form, layer by layer in forward order (Hassibi & Stork's Optimal Brain
Surgeon applied layer-wise, as in OBC / SparseGPT, Frantar & Alistarh 2022/2023):

    for every layer to refit (see below), in forward order:
        X = its input in the *pruned* model (earlier layers already refitted), on calibration data
        Y = its output in the *dense* model on the same data
        W, b = argmin ||X W^T + b - Y||^2 + damping,  pruned entries of W (and b) held at zero

The target is the dense model's output, not the layer's own weights applied to the pruned input,
so each layer also corrects the error that reached it from the layers before. The maths of the
fit (centring, per-weight masks, SparseGPT's OBS update for wide layers) is in
:mod:`bingo.reconstruct.solve`; the layers it can fit (Linear, GPT-2's Conv1D, Conv2d with any
groups, nn.MultiheadAttention's projections) in :mod:`bingo.reconstruct.layers`.

Two paths, one fit:

* a plain ``nn.Sequential`` of Linear / ungrouped Conv2d layers takes the one-pass stream of
  :mod:`bingo.reconstruct.sequential` (every layer after the first change refitted: the recorded
  MNIST results);
* any other model the hook-based path of :mod:`bingo.reconstruct.general`: the layers a mask
  touches and the consumers of every unit group it touches (:mod:`bingo.structure`), each
  captured with a pre-hook, against the dense model's outputs computed alongside, memory bounded
  by one chunk of activations and the largest layer's ``F x F`` statistics.

Device and precision: statistics and solves run on the model's device (``device=`` to choose
another). The per-chunk products are formed in ``dtype`` (``"auto"``: float64 on the CPU, the
exact reference; float32 elsewhere) and accumulated in float64; the ``F^3`` solves are float64.

Cost per reconstruction: sequential path, one forward pass over the calibration data; general
path, two forward passes up to each refitted layer; plus ``samples * F^2`` multiply-adds for
each layer's ``F x F`` Hessian (F = its input features, times kernel area for a convolution) and
an ``F^3`` solve; per-weight masks add the sum over rows of ``|S|^3`` (exact rows) or
``out * F^2`` (OBS update). Everything is deterministic given the calibration samples; the
fit's error on unseen data is a generalisation error, kept small by using many more calibration
samples than features and by the damping.

Not refitted (a refit that reaches them raises, naming the layer and the reason): a layer whose
weight is used more than once per forward (a shared module, a tied weight: see
:func:`bingo.reconstruct.layers.find_layers` for why summing the statistics of the uses is not
the fit in general), a cross-attention in-projection, and layer types without a rule.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bingo.errors import InputMismatchError, InvalidOptionError, NonFiniteError, require_option
from bingo.structure import discover

from .calibration import Calibration
from .general import GeneralPath
from .layers import Layer, find_layers, parameter_names
from .moments import Moments
from .sequential import SequentialPath
from .solve import fit, mean_squared_error, whole_rows

LAYER_POLICIES = ("auto", "touched", "downstream")
"""Which layers a reconstruction refits: ``"touched"``, the layers a mask touches and the
consumers of every unit group from which a mask removes a unit (:mod:`.general`);
``"downstream"``, also every refittable layer after the first touched one; ``"auto"``,
``"downstream"`` for a plain nn.Sequential (the one-pass stream, the recorded behaviour) and
``"touched"`` for any other model."""

DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64}
"""Precision of the per-chunk statistics products (accumulation and solves are float64)."""


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")


def _named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` under every name it has (tied ones too)."""
    return dict([*model.named_parameters(remove_duplicate=False),
                 *model.named_buffers(remove_duplicate=False)])


def _signature(model: nn.Module) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()]


class LeastSquaresReconstruction:
    """Refits a pruned model's surviving weights to the dense model's layer outputs (see the
    module docstring). Pass it to :func:`bingo.prune` as ``reconstruct=``: every pruned
    candidate of the floor search is reconstructed before it is evaluated, and so is the result.
    Or use :func:`bingo.refit` on masks of your own.

    Protocol: :meth:`prepare` on the dense model (before any mask is written); then
    ``reconstruction(model, masks)`` refits ``model`` in place, where ``model`` is the prepared
    model (or a copy of it) carrying the pruned weights (zeros where ``masks``, parameter name
    -> bool keep-mask of the parameter's shape, is False); :attr:`refitted` names the layers the
    call refitted; :meth:`parameter_names` every parameter a call may rewrite.

    Args:
        data: calibration data (see :mod:`bingo.reconstruct.calibration`): an input tensor
            (floats or integer token ids), a mapping of keyword inputs (``{"input_ids": ...}``),
            ``(inputs, targets)``, a TensorDataset, or a list of such batches. Targets are not
            used: training data is the natural choice. Floating inputs must have the model's
            dtype (they are not cast).
        samples: use at most this many examples (a seeded random subset). More calibration rows
            than a layer's input features keep the fit from overfitting them.
        damping: ridge term, a fraction of the mean diagonal of each layer's Hessian (SparseGPT's
            ``percdamp``): keeps the solve well posed when features are nearly collinear. A
            ridge fit: where the given weights already were nearly the fit (a producer whose
            input barely changed), its calibration error can end a hair above theirs.
        chunk: examples per forward pass (memory, not results): a chunk's activations of one
            layer are the most the general path holds (an example of a language model is a
            whole sequence).
        exact_features: per-weight masks on layers with at most this many input features are
            fitted exactly, row by row (``sum over rows |S|^3`` work); wider layers use the
            blocked OBS update (``out * F^2``), which is exact only up to its column order.
        block: columns per block of the OBS update (speed, not results).
        seed: seed of the calibration subset.
        layers: which layers to refit, one of :data:`LAYER_POLICIES`.
        dtype: precision of the statistics products, a key of :data:`DTYPES`.
        device: where statistics and solves run; None: the model's device.
        progress: a tqdm bar over the layers of a reconstruction that takes more than a second.
    """

    def __init__(self, data, *, samples: int = 4096, damping: float = 0.01, chunk: int = 1024,
                 block: int = 128, exact_features: int = 1024, seed: int = 0,
                 layers: str = "auto", dtype: str = "auto",
                 device: Union[str, torch.device, None] = None, progress: bool = True):
        for name, value in (("samples", samples), ("chunk", chunk), ("block", block),
                            ("exact_features", exact_features)):
            _positive_int(name, value)
        if isinstance(damping, bool) or not (isinstance(damping, (int, float))
                                             and math.isfinite(damping) and damping > 0):
            raise InvalidOptionError(f"damping must be a positive number, got {damping!r}")
        require_option("layers", layers, LAYER_POLICIES)
        require_option("dtype", dtype, tuple(DTYPES))
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise InvalidOptionError(f"device must be a torch device, got {device!r}") \
                    from exc
        self.calibration = Calibration(data, samples, chunk, seed)
        self.damping, self.block, self.exact_features = float(damping), block, exact_features
        self.layers_policy, self.dtype, self.device = layers, dtype, device
        self.progress = bool(progress)
        self._path: Union[SequentialPath, GeneralPath, None] = None
        self._dense: dict[str, Tensor] = {}
        self._canonical: dict[str, str] = {}
        self._signature: list = []
        self._prepared: Optional[weakref.ref] = None
        self.refitted: list[str] = []
        """Names of the layers the last call refitted, in forward order."""
        self.skipped: dict[str, str] = {}
        """Layers the last call reached but left as they were, and why."""
        self.errors: dict[str, tuple[float, float]] = {}
        """Per refitted layer: its mean squared output error against the dense output on the
        calibration data, with the weights it was given and with the refit (same input)."""
        self.layer_seconds: dict[str, float] = {}
        """Per refitted layer: seconds spent on it (statistics and solve)."""

    # -- what prune() calls ---------------------------------------------------------------

    def parameter_names(self, model: nn.Module) -> list[str]:
        """Every parameter a reconstruction of ``model`` may rewrite (weights and biases of its
        refittable layers), so that a caller can save and restore them."""
        return parameter_names(model)

    @torch.no_grad()
    def prepare(self, model: nn.Module) -> None:
        """Check the model against the calibration data (clear errors before any long work),
        find its layers (:func:`bingo.structure.discover`) and keep what the refits need of the
        dense model: its layer outputs (sequential path) or a copy of every parameter a mask or
        refit may change (general path). Call it on the unpruned model, before any mask is
        written."""
        if not isinstance(model, nn.Module):
            raise InputMismatchError(f"model must be an nn.Module, got {type(model).__name__}")
        if next(model.parameters(), None) is None:
            raise InputMismatchError(f"{type(model).__name__} has no parameters to refit")
        for name, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise NonFiniteError(f"parameter {name!r} of the model to prepare holds NaN or "
                                     "Inf")
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            self.calibration.check_model(model)
            structure = discover(model, self.calibration.example(device))
            layers = find_layers(model, structure)
            tensors = _named_tensors(model)
            if self.layers_policy in ("auto", "downstream") and \
                    SequentialPath.eligible(model, layers, self.calibration):
                path: Union[SequentialPath, GeneralPath] = SequentialPath(layers)
                path.prepare(model, self.calibration, device)
                kept = self._layer_tensors(layers, structure)
            else:
                path = GeneralPath(structure, layers)
                kept = self._layer_tensors(layers, structure) | {
                    s.param for g in structure.groups for s in g.slices}
        finally:
            model.train(was_training)
        self._dense = {name: tensors[name].detach().clone() for name in sorted(kept)}
        self._canonical = {alias: canon for canon, aliases in structure.param_names.items()
                           for alias in aliases}
        self._path = path
        self._signature = _signature(model)
        self._prepared = weakref.ref(model)

    @staticmethod
    def _layer_tensors(layers: list[Layer], structure) -> set[str]:
        return {structure.canonical(n) for l in layers for n in (l.weight, l.bias) if n}

    @torch.no_grad()
    def __call__(self, model: nn.Module, masks: Mapping[str, Tensor], *,
                 same_weights: bool = True) -> None:
        """Refit ``model`` in place: the prepared model, or a copy of it whose parameters equal
        the prepared ones wherever ``masks`` keeps them (see the class docstring). Raises for a
        model of another architecture, or (``same_weights``) another model with other weights;
        ``same_weights=False`` refits any model of the prepared architecture towards the
        prepared model's outputs (what :func:`bingo.refit` does with ``dense=``)."""
        if self._path is None:
            raise InvalidOptionError("call prepare(dense_model) before reconstructing")
        masks = self._checked_masks(model, masks)
        self._check_model(model, masks, same_weights)
        self.refitted, self.skipped, self.errors, self.layer_seconds = [], {}, {}, {}
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            self._path.run(self, model, masks, self.calibration, device)
        finally:
            model.train(was_training)

    # -- checks ---------------------------------------------------------------------------

    def _checked_masks(self, model: nn.Module, masks: Mapping[str, Tensor]
                       ) -> dict[str, Tensor]:
        """``masks`` keyed by canonical names (tied aliases joined), each a bool tensor of its
        parameter's shape."""
        if not isinstance(masks, Mapping):
            raise InputMismatchError(f"masks must map parameter names to bool keep-masks, got "
                                     f"{type(masks).__name__}")
        tensors = _named_tensors(model)
        unknown = sorted(set(masks) - set(tensors))
        if unknown:
            raise InputMismatchError(f"masks name {unknown}, which are not parameters of the "
                                     f"model ({type(model).__name__})")
        out: dict[str, Tensor] = {}
        for name, mask in masks.items():
            shape = tuple(tensors[name].shape)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or \
                    tuple(mask.shape) != shape:
                what = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor)
                        else type(mask).__name__)
                raise InputMismatchError(f"masks[{name!r}] must be a bool tensor of shape "
                                         f"{shape}, got {what}")
            canon = self._canonical.get(name, name)
            out[canon] = mask if canon not in out else out[canon] & mask.to(out[canon].device)
        return out

    def _check_model(self, model: nn.Module, masks: Mapping[str, Tensor],
                     same_weights: bool) -> None:
        signature = _signature(model)
        if signature != self._signature:
            theirs, ours = dict((n, (s, d)) for n, s, d in signature), \
                dict((n, (s, d)) for n, s, d in self._signature)
            diff = next((n for n in list(ours) + list(theirs) if ours.get(n) != theirs.get(n)),
                        None)
            raise InputMismatchError(
                f"this reconstruction was prepared on another architecture: parameter {diff!r} "
                f"is {theirs.get(diff, 'missing')} here, {ours.get(diff, 'missing')} in the "
                "prepared model; call prepare() on the dense version of this model")
        for name, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise NonFiniteError(f"parameter {name!r} of the model to refit holds NaN or Inf")
        if isinstance(self._path, GeneralPath):
            missing = sorted(n for n, m in masks.items() if n not in self._dense and
                             not bool(m.all()))
            if missing:
                raise InputMismatchError(
                    f"masks remove entries of {missing}, which are in no unit group and no "
                    "layer bingo refits: prepare() kept no dense copy of them, so the dense "
                    "outputs cannot be computed")
        prepared = self._prepared() if self._prepared is not None else None
        if not same_weights or prepared is model:
            return
        tensors = _named_tensors(model)
        for name, dense in self._dense.items():
            now = tensors[name].detach()
            keep = masks.get(name)
            differs = now != dense.to(now.device) if keep is None else \
                (now != dense.to(now.device)) & keep.to(now.device)
            if bool(differs.any()):
                raise InputMismatchError(
                    f"this reconstruction was prepared on another model: {name!r} differs from "
                    "the prepared (dense) values where the masks keep it. Call prepare() on the "
                    "dense version of the model you refit (or bingo.refit(model, masks, data, "
                    "dense=...) to refit a changed model towards a dense one)")

    # -- what the paths call --------------------------------------------------------------

    def _device(self, model: nn.Module) -> torch.device:
        return self.device if self.device is not None else next(model.parameters()).device

    def _moments(self, model: nn.Module) -> Moments:
        device = self._device(model)
        dtype = DTYPES[self.dtype] or (torch.float64 if device.type == "cpu" else torch.float32)
        return Moments(device, dtype)

    def _progress(self, layers: Iterable[Layer]):
        return tqdm(layers, desc="least-squares refit", unit="layer", leave=False, delay=1.0,
                    disable=not self.progress)

    @staticmethod
    def _clock() -> float:
        return time.perf_counter()

    def _fit_layer(self, model: nn.Module, layer: Layer, moments: Moments,
                   masks: Mapping[str, Tensor], started: float,
                   dense_features: Optional[Tensor] = None) -> None:
        """Fit ``layer`` to its moments and write it. With ``dense_features`` (per group and
        feature: the dense one on every row), groups whose kept rows already are the exact fit
        are left as they are (see :mod:`bingo.reconstruct.general`)."""
        module = model.get_submodule(layer.module)
        kind = layer.kind
        weight = model.get_parameter(layer.weight)
        bias = model.get_parameter(layer.bias) if layer.bias else None
        device, f64 = moments.device, torch.float64
        current = kind.matrix(module, weight.detach()).to(device, f64)
        groups, outputs = current.shape[:2]
        weight_mask = masks.get(layer.canonical)
        keep = (torch.ones_like(current, dtype=torch.bool) if weight_mask is None
                else kind.matrix(module, weight_mask).to(device))
        rows = keep.any(-1)
        bias_canonical = self._canonical.get(layer.bias, layer.bias) if layer.bias else None
        bias_mask = masks.get(bias_canonical) if bias_canonical else None
        if bias_mask is not None:
            rows &= bias_mask.reshape(groups, outputs).to(device)
        current_bias = bias.detach().reshape(groups, outputs).to(device, f64) \
            if bias is not None else None
        todo = set(range(groups))
        if dense_features is not None:
            exact = whole_rows(keep).all(-1) & \
                (dense_features.to(device) | ~keep.any(1)).all(-1)
            if bool(exact.any()):  # and are its kept weights the dense ones?
                now = kind.matrix(module, weight.detach())
                dense = kind.matrix(module, self._dense[layer.canonical]).to(now.device)
                exact &= ((now == dense) | ~keep.to(now.device)).flatten(1).all(-1).to(device)
                if bias is not None:
                    dense_bias = self._dense[bias_canonical].reshape(groups, outputs)
                    exact &= ((current_bias == dense_bias.to(device, f64)) | ~rows).all(-1)
            todo = set((~exact).nonzero().flatten().tolist())
            if not todo:
                self.skipped[layer.name] = ("its rows are kept or removed whole on dense inputs "
                                            "with dense weights: already the exact fit")
                return
        fitted = current.clone()
        fitted_bias = current_bias.clone() if current_bias is not None else None
        before = after = 0.0
        for g in range(groups):
            stats = moments.statistics(g, centred=bias is not None)
            error = float(mean_squared_error(stats, current[g], None if bias is None
                                             else current_bias[g]))
            before += error
            if g not in todo:
                after += error
                continue
            b = fit(stats, fitted[g], keep[g], rows[g], self.damping, self.exact_features,
                    self.block)
            if b is not None:
                fitted_bias[g] = b
            after += float(mean_squared_error(stats, fitted[g], b))
            del stats
        if not bool(torch.isfinite(fitted).all()) or (
                fitted_bias is not None and not bool(torch.isfinite(fitted_bias).all())):
            raise NonFiniteError(f"least-squares refit of layer {layer.name!r} is not finite")
        weight.copy_(kind.from_matrix(module, fitted).to(weight.dtype))
        if bias is not None:
            bias.copy_(fitted_bias.reshape(bias.shape).to(bias.dtype))
        self.refitted.append(layer.name)
        self.errors[layer.name] = (before / (groups * outputs), after / (groups * outputs))
        self.layer_seconds[layer.name] = time.perf_counter() - started
