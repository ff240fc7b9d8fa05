"""Hugging Face ``Trainer`` callback running a ticket search after every optimizer step.

    from bingo.integrations.huggingface import TicketSearchCallback
    callback = TicketSearchCallback(granularity="neuron", subsets=64, fraction=0.05)
    trainer = transformers.Trainer(model=model, args=args, callbacks=[callback], ...)
    trainer.train()
    scores = callback.search.significance()

HF callbacks are not given the training batch, so the callback captures it: a forward pre-hook
on the model keeps the arguments of the last forward call made in training mode with gradients
enabled (the Trainer's ``model(**inputs)``; evaluation and the search's own passes run in eval
mode or without gradients and are ignored). With gradient accumulation that is the last
micro-batch of the step.

State: at every checkpoint the main process writes ``bingo_search.pt`` into the checkpoint's
folder (``output_dir/checkpoint-N``). When training resumes (the Trainer restored a global step
> 0), the callback loads it from ``output_dir/checkpoint-N`` or from ``resume_from``; a missing
file raises CheckpointError rather than silently starting a new search.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Union

import torch

from ..errors import CheckpointError, InputMismatchError
from ..search import TicketSearch
from ._common import SearchHolder, require

TrainerCallback = require("transformers", "hf").TrainerCallback

FILENAME = "bingo_search.pt"


class TicketSearchCallback(TrainerCallback):
    """Calls ``search.step`` on the captured training batch after each optimizer step.

    Args:
        search: a ready :class:`bingo.TicketSearch`, or None to build one from the Trainer's model
            when training begins with ``options`` (``sync_batch`` then defaults to
            ``"broadcast"``: under DDP every rank searches on rank 0's batch).
        batch_to_inputs_targets: ``fn(batch) -> (inputs, targets)``; ``batch`` is the dict of
            keyword arguments the Trainer passed to the model (or the positional ones). Default:
            :func:`bingo.integrations.default_batch_to_inputs_targets` (``input_ids``/``x``/...
            and ``labels``/...). The search calls ``model(inputs)``.
        resume_from: checkpoint folder to restore the search from when resuming; ``False``: start
            a new search even when the Trainer resumes; None (default): the Trainer's
            ``output_dir/checkpoint-<restored global step>``.
        options: :class:`bingo.TicketSearch` keyword arguments.
    """

    def __init__(self, search: Optional[TicketSearch] = None, *,
                 batch_to_inputs_targets: Optional[Callable] = None,
                 resume_from: Union[str, os.PathLike, bool, None] = None, **options):
        self._holder = SearchHolder(search, batch_to_inputs_targets, options)
        self._resume_from = resume_from
        self._hook = None
        self._batch = None

    @property
    def search(self) -> Optional[TicketSearch]:
        """The ticket search (None before training begins, unless one was given)."""
        return self._holder.search

    def _capture(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self._batch = dict(kwargs) if kwargs else args

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        search = self._holder.build(model)
        if self._hook is None:
            self._hook = search.model.register_forward_pre_hook(self._capture, with_kwargs=True)
        folder = self._resume_from
        if folder is None and state.global_step > 0:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if folder:
            path = os.path.join(os.fspath(folder), FILENAME)
            if not os.path.isfile(path):
                raise CheckpointError(
                    f"training resumes at step {state.global_step} but there is no ticket-search "
                    f"state at {path!r}; pass resume_from=<checkpoint folder> to "
                    "TicketSearchCallback, or resume_from=False to start a new search")
            search.load(path)

    def on_step_end(self, args, state, control, **kwargs):
        if self._batch is None:
            raise InputMismatchError(
                "TicketSearchCallback captured no training batch in this step: the model's "
                "forward was not called in training mode on the searched module")
        batch, self._batch = self._batch, None
        self._holder.step(batch)

    def on_save(self, args, state, control, **kwargs):
        # Every rank holds the same search state; the main process writes it (atomically).
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            os.makedirs(folder, exist_ok=True)
            self.search.save(os.path.join(folder, FILENAME))

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
