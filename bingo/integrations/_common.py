"""What both framework callbacks share: batch unpacking, building the search, missing extras."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import Tensor, nn

from ..errors import BingoError, InputMismatchError, InvalidOptionError
from ..search import TicketSearch

INPUT_KEYS = ("input_ids", "inputs", "input", "x", "pixel_values", "input_values", "features")
TARGET_KEYS = ("labels", "label", "targets", "target", "y")


class MissingExtraError(BingoError, ImportError):
    """An integration was imported without the optional packages it needs."""


def require(module: str, extra: str):
    """Import ``module`` or raise MissingExtraError naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"this bingo integration needs {module.split('.')[0]!r}, which is not installed: "
            f'pip install "bingo-prune[{extra}]"') from exc


def default_batch_to_inputs_targets(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of a training batch: a ``(inputs, targets, ...)`` sequence, or a
    mapping with one of :data:`INPUT_KEYS` and one of :data:`TARGET_KEYS` (first match wins).

    Anything else needs a ``batch_to_inputs_targets`` function. Causal language models, whose
    labels are the inputs shifted inside the model, need one too (see docs/integrations.md).
    """
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in TARGET_KEYS if k in batch), None)
        if x is None or y is None:
            raise InputMismatchError(
                f"cannot find inputs and targets in a batch with keys {sorted(map(str, batch))}: "
                f"expected one of {INPUT_KEYS} and one of {TARGET_KEYS}; pass "
                "batch_to_inputs_targets=fn(batch) -> (inputs, targets)")
        return x, y
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise InputMismatchError(
        f"cannot unpack a training batch of type {type(batch).__name__} into (inputs, targets); "
        "pass batch_to_inputs_targets=fn(batch) -> (inputs, targets)")


class SearchHolder:
    """The TicketSearch a callback drives: given, or built from the model when training starts."""

    def __init__(self, search: Optional[TicketSearch], batch_to_inputs_targets: Optional[Callable],
                 options: dict):
        if search is not None and options:
            raise InvalidOptionError(
                f"pass either a TicketSearch or its options, not both (got {sorted(options)})")
        if search is not None and not isinstance(search, TicketSearch):
            raise InvalidOptionError(f"search must be a bingo.TicketSearch, got {type(search)}")
        self.search = search
        self.batch_to_inputs_targets = batch_to_inputs_targets or default_batch_to_inputs_targets
        # Under DDP every rank trains on its own batch; a search split over the ranks must see one
        # batch, so callbacks search on rank 0's (a single process is unaffected).
        self.options = dict(options)
        self.options.setdefault("sync_batch", "broadcast")

    def build(self, model: nn.Module) -> TicketSearch:
        if self.search is None:
            self.search = TicketSearch(model, **self.options)
        return self.search

    def step(self, batch: Any) -> Optional[dict]:
        inputs, targets = self.batch_to_inputs_targets(batch)
        return self.search.step(inputs, targets)
