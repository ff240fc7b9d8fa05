"""Calibration data of a least-squares refit: the examples the model is run on.

The fit needs inputs only (no labels). Accepted forms:

* a tensor ``(N, ...)``: the model's one positional input (floats, or integer token ids);
* a mapping of keyword inputs, each ``(N, ...)``: ``{"input_ids": ...}``, ``{"pixel_values":
  ...}``, a transformers ``BatchEncoding`` (values that are not tensors are passed as they are);
* a tuple ``(inputs, targets)`` or ``(inputs,)``, inputs one of the two forms above (targets are
  not used);
* a ``TensorDataset`` (its first tensor);
* a list (or any other iterable, a DataLoader for one) of batches, each one of the forms above:
  they are joined along the batch dimension. A *list* is always a list of batches: pass
  ``(inputs, targets)`` as a tuple.

An example is one index along the batch dimension (a whole sequence for a language model): the
``samples`` and ``chunk`` options count examples.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Union

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from bingo.errors import InputMismatchError, InvalidOptionError, NonFiniteError

Inputs = Union[Tensor, dict[str, Any]]
"""One batch as the model takes it: a positional tensor, or keyword arguments."""

FORMS = ("an input tensor (N, ...), a mapping of keyword inputs, (inputs, targets), a "
         "TensorDataset or a list of such batches")


def _bad(what: str) -> InvalidOptionError:
    return InvalidOptionError(f"reconstruction data must be {FORMS}; got {what}")


def _batch_inputs(batch: Any) -> Inputs:
    """The inputs of one batch (a tensor or keyword mapping; a tuple/list: its first item)."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise _bad("an empty tuple")
        batch = batch[0]
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if not any(isinstance(v, Tensor) for v in batch.values()):
            raise _bad("a mapping without tensors")
        return dict(batch)
    raise _bad(f"a batch of type {type(batch).__name__}")


def _join(batches: list[Inputs]) -> Inputs:
    """Batches joined along the batch dimension."""
    if not batches:
        raise _bad("no batches")
    try:
        if all(isinstance(b, Tensor) for b in batches):
            return torch.cat(batches)
        if all(isinstance(b, dict) for b in batches):
            keys = list(batches[0])
            if any(list(b) != keys for b in batches):
                raise InvalidOptionError("the batches have different keys")
            joined = {}
            for key in keys:
                values = [b[key] for b in batches]
                if isinstance(values[0], Tensor):
                    joined[key] = torch.cat(values)
                elif any(v != values[0] for v in values):
                    raise InvalidOptionError(f"the batches differ in the non-tensor {key!r}")
                else:
                    joined[key] = values[0]
            return joined
    except (RuntimeError, TypeError) as exc:  # torch.cat of different trailing shapes
        raise InvalidOptionError(f"the calibration batches cannot be joined into one set of "
                                 f"examples: {exc}") from exc
    raise _bad("a mix of tensor and keyword batches")


def calibration_inputs(data: Any) -> Inputs:
    """``data`` in one of the forms of the module docstring, as one batch of all its examples."""
    if isinstance(data, TensorDataset):
        return _batch_inputs(data.tensors)
    if isinstance(data, (Tensor, Mapping, tuple)):
        return _batch_inputs(data)
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise _bad(f"{type(data).__name__}")
    return _join([_batch_inputs(b) for b in data])


def _tensors(inputs: Inputs) -> dict[str, Tensor]:
    if isinstance(inputs, Tensor):
        return {"inputs": inputs}
    return {k: v for k, v in inputs.items() if isinstance(v, Tensor)}


class Calibration:
    """A seeded random subset of at most ``samples`` examples of ``data``, served in chunks of
    ``chunk`` examples on a device (never cast: a dtype mismatch with the model is an error,
    see :meth:`check_model`)."""

    def __init__(self, data: Any, samples: int, chunk: int, seed: int):
        inputs = calibration_inputs(data)
        tensors = _tensors(inputs)
        sizes = {k: (t.shape[0] if t.dim() else None) for k, t in tensors.items()}
        if not tensors or None in sizes.values() or len(set(sizes.values())) != 1 or \
                min(sizes.values()) == 0:
            raise InvalidOptionError(
                f"reconstruction data must be {FORMS} with N >= 1 examples along the first "
                f"dimension of every tensor; got first dimensions {sizes}")
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                where = "" if isinstance(inputs, Tensor) else f" ({key!r})"
                raise NonFiniteError(f"reconstruction data contains NaN or Inf{where}")
        count = next(iter(sizes.values()))
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(count, generator=generator)[:samples]
        self.inputs: Inputs = self._index(inputs, pick)
        self.size = int(pick.numel())
        self.chunk = chunk

    @staticmethod
    def _index(inputs: Inputs, rows) -> Inputs:
        if isinstance(inputs, Tensor):
            return inputs[rows]
        return {k: v[rows] if isinstance(v, Tensor) else v for k, v in inputs.items()}

    @staticmethod
    def _to(inputs: Inputs, device) -> Inputs:
        if isinstance(inputs, Tensor):
            return inputs.to(device)
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.inputs, Tensor)

    def chunks(self, device) -> Iterator[Inputs]:
        """The examples in chunks of ``chunk``, on ``device``."""
        for start in range(0, self.size, self.chunk):
            yield self._to(self._index(self.inputs, slice(start, start + self.chunk)), device)

    def example(self, device) -> Inputs:
        """The first example (a batch of one)."""
        return self._to(self._index(self.inputs, slice(0, 1)), device)

    def check_model(self, model: nn.Module) -> None:
        """Clear errors, before any long work, for data the model cannot take: floating inputs
        of another dtype than the model's, and any input the model fails on (integer ids where
        it needs floats, a wrong feature count): one example is run."""
        params = [p for p in model.parameters() if p.is_floating_point()]
        model_dtypes = {p.dtype for p in params}
        for key, t in _tensors(self.inputs).items():
            if t.is_floating_point() and model_dtypes and t.dtype not in model_dtypes:
                raise InputMismatchError(
                    f"the calibration inputs{'' if self.is_tensor else f' ({key!r})'} are "
                    f"{t.dtype} but the model computes in {sorted(map(str, model_dtypes))}: "
                    "convert one of them (bingo does not cast calibration data)")
        device = params[0].device if params else torch.device("cpu")
        example = self.example(device)
        try:
            with torch.no_grad():
                call(model, example)
        except Exception as exc:  # noqa: BLE001  any failure of the user's forward
            kinds = sorted({str(t.dtype) for t in _tensors(example).values()})
            shapes = {k: tuple(t.shape) for k, t in _tensors(example).items()}
            hint = (" (integer inputs: does the model take token ids?)"
                    if all(not t.is_floating_point() for t in _tensors(example).values())
                    else "")
            raise InputMismatchError(
                f"{type(model).__name__} does not run on the calibration data (one example: "
                f"shapes {shapes}, dtypes {kinds}){hint}: {type(exc).__name__}: {exc}") from exc


def call(model: nn.Module, inputs: Inputs) -> Any:
    """``model`` run on one batch: keyword arguments for a mapping, else one positional tensor."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)
