"""The checks a targeted search runs before its long work: one clear error instead of a raw torch
error minutes in, or a silently meaningless ranking (NaN damages sort arbitrarily, so a NaN in a
weight or an input gave a "ranking" in index order)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bingo.errors import InputMismatchError, NonFiniteError
from bingo.executor import flatten_for_metrics, model_logits


def _non_finite(t: Tensor) -> int:
    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() or t.is_complex() else 0


def check_finite_model(model: nn.Module) -> None:
    """Raise NonFiniteError naming the first parameter or buffer that holds NaN or Inf."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            bad = _non_finite(t.detach())
            if bad:
                raise NonFiniteError(f"{kind} {name!r} of the model holds {bad} NaN or Inf "
                                     "value(s); a search on it would rank nothing")


def floating_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (None without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _why_forward_fails(model: nn.Module, inputs: Tensor) -> str:
    """The likely cause of a failed forward, from the inputs and the model's dtype."""
    dtype = floating_dtype(model)
    if inputs.is_floating_point() and dtype is not None and inputs.dtype != dtype:
        return (f"the data's inputs are {inputs.dtype} but the model's parameters are {dtype}; "
                "convert one to the other")
    if not inputs.is_floating_point() and not any(isinstance(m, nn.Embedding)
                                                  for m in model.modules()):
        return (f"the data's inputs are integers ({inputs.dtype}) but the model has no "
                "embedding: it likely needs float features")
    return f"inputs of shape {tuple(inputs.shape[1:])} per example, dtype {inputs.dtype}"


@torch.no_grad()
def check_evidence(model: nn.Module, inputs: Tensor, targets: Tensor) -> None:
    """One clear :class:`bingo.errors.BingoError` if the search cannot run on ``(inputs,
    targets)``: NaN / Inf in the model or the inputs, targets that are not class indices, or a
    forward that fails (or whose logits do not fit the targets) on one example. The model is run
    once in eval mode (its train/eval mode is restored; it is not otherwise changed)."""
    check_finite_model(model)
    bad = _non_finite(inputs)
    if bad:
        raise NonFiniteError(f"the data's inputs hold {bad} NaN or Inf value(s)")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise InputMismatchError(f"the data's targets must be integer class indices, got "
                                 f"{targets.dtype}")
    device = next((p.device for p in model.parameters()), inputs.device)
    example, target = inputs[:1].to(device), targets[:1].to(device)
    was_training = model.training
    model.eval()
    try:
        output = model(example)
    except (RuntimeError, TypeError, ValueError, IndexError, NotImplementedError) as exc:
        raise InputMismatchError(
            f"{type(model).__name__}'s forward fails on one example of the data "
            f"({_why_forward_fails(model, inputs)}): {type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    logits = model_logits(output)
    flat, _ = flatten_for_metrics(logits, target, 1)
    classes = flat.shape[-1]
    if int(targets.min()) < 0 or int(targets.max()) >= classes:
        raise InputMismatchError(f"the data's targets run from {int(targets.min())} to "
                                 f"{int(targets.max())}, but the model has {classes} classes")
    if _non_finite(flat):
        raise NonFiniteError("the model's output on the data holds NaN or Inf")
