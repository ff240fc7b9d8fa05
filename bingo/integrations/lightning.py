"""PyTorch Lightning callback running a ticket search after every optimizer step.

    from bingo.integrations.lightning import TicketSearchCallback
    callback = TicketSearchCallback(granularity="neuron", subsets=64, fraction=0.05)
    trainer = lightning.Trainer(callbacks=[callback], ...)
    trainer.fit(module, loader)
    scores = callback.search.significance()

The search is built when fitting starts (``setup``) from the LightningModule, or from
``module(pl_module)`` when the searched network is an attribute of it; or pass a ready
``TicketSearch`` as ``search``. Its state is saved in every Lightning checkpoint through the
callback's ``state_dict`` and restored by ``trainer.fit(..., ckpt_path=...)``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from ..errors import InputMismatchError
from ..search import TicketSearch
from ._common import SearchHolder, require

Callback = require("lightning.pytorch", "lightning").Callback


class TicketSearchCallback(Callback):
    """Calls ``search.step`` on the training batch after each optimizer step.

    Args:
        search: a ready :class:`bingo.TicketSearch`, or None to build one at ``setup`` with
            ``options`` (then ``sync_batch`` defaults to ``"broadcast"``: under DDP every rank
            searches on rank 0's batch).
        module: ``fn(pl_module) -> nn.Module``, the network to search (default: the
            LightningModule itself; its ``forward`` must return logits or ``{"logits": ...}``).
        batch_to_inputs_targets: ``fn(batch) -> (inputs, targets)`` (default:
            :func:`bingo.integrations.default_batch_to_inputs_targets`).
        options: :class:`bingo.TicketSearch` keyword arguments.
    """

    def __init__(self, search: Optional[TicketSearch] = None, *,
                 module: Optional[Callable[[Any], nn.Module]] = None,
                 batch_to_inputs_targets: Optional[Callable] = None, **options):
        self._holder = SearchHolder(search, batch_to_inputs_targets, options)
        self._module = module
        self._pending: Optional[dict] = None
        self._seen_step: Optional[int] = None

    @property
    def search(self) -> Optional[TicketSearch]:
        """The ticket search (None before fitting starts, unless one was given)."""
        return self._holder.search

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        search = self._holder.build(pl_module if self._module is None else self._module(pl_module))
        if self._pending is not None:  # a checkpoint was restored before the search existed
            search.load_state_dict(self._pending)
            self._pending = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._seen_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # global_step counts optimizer steps: with gradient accumulation (or a skipped step) a
        # batch may end without one, and the search belongs after the weights changed.
        if trainer.global_step == self._seen_step:
            return
        self._seen_step = trainer.global_step
        if self.search is None:
            raise InputMismatchError("TicketSearchCallback has no search: fit() did not run setup")
        self._holder.step(batch)

    def state_dict(self) -> dict:
        if self.search is None:
            return {} if self._pending is None else {"search": self._pending}
        return {"search": self.search.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict.get("search")
        if state is None:
            return
        if self.search is None:
            self._pending = state
        else:
            self.search.load_state_dict(state)
