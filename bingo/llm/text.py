"""Text for causal language models: a token stream split into train / calibration / validation /
test, fixed windows of it, and perplexity.

The split is contiguous and in that order (:data:`SPLIT_FRACTIONS`), so calibration text (what
every pruning method measures its scores and refits on) never overlaps validation text (what
the perplexity ceilings are set on) or test text (what is reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.executor import model_logits

SPLIT_FRACTIONS: tuple[float, float, float, float] = (0.85, 0.05, 0.05, 0.05)
"""Train, calibration, validation and test shares of the stream, contiguous, in that order."""


@dataclass
class TextSplits:
    """A token stream cut into the four contiguous parts of :data:`SPLIT_FRACTIONS`."""

    train: Tensor
    """Token ids the model trains on (int64, 1-D)."""
    calibration: Tensor
    """Token ids the pruning methods score and refit on."""
    validation: Tensor
    """Token ids for choices: perplexity ceilings, the largest fraction under them."""
    test: Tensor
    """Token ids of the reported perplexities."""

    @classmethod
    def from_ids(cls, ids: Tensor) -> "TextSplits":
        if ids.dim() != 1 or ids.numel() < 100:
            raise InputMismatchError(f"the token stream must be 1-D with at least 100 tokens, got "
                                     f"shape {tuple(ids.shape)}")
        bounds = [0]
        for share in SPLIT_FRACTIONS:
            bounds.append(bounds[-1] + int(share * ids.numel()))
        bounds[-1] = ids.numel()
        return cls(*(ids[a:b] for a, b in zip(bounds, bounds[1:])))

    def describe(self) -> dict[str, int]:
        """Tokens per part."""
        return {name: int(getattr(self, name).numel())
                for name in ("train", "calibration", "validation", "test")}


def windows(stream: Tensor, block: int, count: int | None = None) -> tuple[Tensor, Tensor]:
    """Consecutive, non-overlapping windows of ``block`` tokens of ``stream`` and their next
    tokens: ``(inputs (N, block), targets (N, block))``; the first ``count`` (all that fit when
    None). Deterministic, so every method is measured on the same tokens."""
    if block < 1:
        raise InvalidOptionError(f"block must be a positive number of tokens, got {block}")
    fit = (stream.numel() - 1) // block
    if fit < 1:
        raise InputMismatchError(f"a text of {stream.numel()} tokens holds no window of "
                                 f"{block + 1} tokens")
    n = fit if count is None else min(count, fit)
    x = stream[:n * block].reshape(n, block)
    y = stream[1:n * block + 1].reshape(n, block)
    return x, y


def random_windows(stream: Tensor, block: int, count: int, generator: torch.Generator
                   ) -> tuple[Tensor, Tensor]:
    """``count`` windows of ``stream`` at random starts (training batches)."""
    starts = torch.randint(0, stream.numel() - block - 1, (count,), generator=generator)
    offsets = starts[:, None] + torch.arange(block + 1)
    tokens = stream[offsets]
    return tokens[:, :-1], tokens[:, 1:]


@torch.no_grad()
def perplexity(model: nn.Module, data: tuple[Tensor, Tensor], batch: int = 64) -> float:
    """``exp`` of the mean next-token cross-entropy of ``model`` on ``data`` (eval mode, restored
    after), on the model's device."""
    inputs, targets = data
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, inputs.shape[0], batch):
            x, y = inputs[i:i + batch].to(device), targets[i:i + batch].to(device)
            logits = model_logits(model(x))
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                           y.reshape(-1), reduction="sum"))
    finally:
        model.train(was)
    return math.exp(total / targets.numel())
