"""The small training loop shared by ``bingo demo`` and ``bingo experiment``.

It trains with Adam and calls observers (ticket searches, score accumulators) after every
optimizer step, timing the training steps apart from them: overhead figures compare the two.
The plain-loop API (docs/guide.md) stays the primary way to use bingo; this loop only serves the
reproducible commands.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

AfterStep = Callable[[Tensor, Tensor], object]
"""Called with the batch ``(inputs, targets)`` after each optimizer step (e.g. search.step)."""


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset, batch_size: int = 4096) -> float:
    """Top-1 accuracy of ``model`` on the whole of ``dataset`` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    try:
        inputs, targets = dataset.tensors
        correct = 0
        for start in range(0, len(targets), batch_size):
            logits = model(inputs[start:start + batch_size])
            correct += int((logits.argmax(-1) == targets[start:start + batch_size]).sum())
        return correct / len(targets)
    finally:
        model.train(was_training)


@dataclass
class TrainStats:
    """What :func:`train` measured."""

    steps: int
    """Optimizer steps taken."""
    train_seconds: float
    """Wall time of forward, backward and optimizer steps only (observers excluded)."""
    final_loss: float
    """Mean training loss of the last epoch."""
    epoch_end: list = field(default_factory=list)
    """Return values of ``on_epoch_end`` after each epoch (empty without it)."""


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, *,
          after_step: Sequence[AfterStep] = (), on_epoch_end: Optional[Callable[[int], object]]
          = None, progress: bool = True, desc: str = "train") -> TrainStats:
    """Train ``model`` in place with Adam and cross-entropy for ``epochs`` passes over ``loader``.

    The optimizer is built here from ``model.parameters()``, so a model masked with
    torch.nn.utils.prune trains its ``weight_orig`` and the masked entries stay zero.
    ``after_step`` observers run after each optimizer step, outside the timed region.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    steps, seconds, epoch_loss, epoch_end = 0, 0.0, float("nan"), []
    bar = tqdm(total=epochs * len(loader), desc=desc, unit="step", disable=not progress,
               leave=False)
    with bar:
        for epoch in range(epochs):
            losses = []
            for inputs, targets in loader:
                start = time.perf_counter()
                loss = criterion(model(inputs), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seconds += time.perf_counter() - start
                for observer in after_step:
                    observer(inputs, targets)
                losses.append(loss.item())
                steps += 1
                bar.update()
            epoch_loss = sum(losses) / max(len(losses), 1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}")
            if on_epoch_end is not None:
                epoch_end.append(on_epoch_end(epoch + 1))
    return TrainStats(steps=steps, train_seconds=seconds, final_loss=epoch_loss,
                      epoch_end=epoch_end)


@contextlib.contextmanager
def warnings_above_progress_bars():
    """Inside the block, warnings print as one line above the tqdm progress bars instead of
    breaking them (the warning filters are unchanged)."""
    def show(message, category, filename, lineno, file=None, line=None):
        tqdm.write(f"{category.__name__}: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def nonzero_parameters(state: dict, names: Iterable[str]) -> int:
    """Nonzero entries of the tensors ``state[name]`` for ``name`` in ``names``."""
    return sum(int(torch.count_nonzero(state[name])) for name in names)


@contextlib.contextmanager
def torch_threads(threads: Optional[int]):
    """Use ``threads`` intra-op threads inside the block (None: leave torch's setting)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def environment() -> dict:
    """Machine and library versions, for reports."""
    import numpy

    import bingo

    try:  # read from the package metadata: importing scikit-learn takes seconds
        sklearn_version = importlib.metadata.version("scikit-learn")
    except importlib.metadata.PackageNotFoundError:  # only the digits dataset needs it
        sklearn_version = None
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        platform=platform.platform(), machine=platform.machine(),
        processor=platform.processor() or None, cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), python=sys.version.split()[0],
        torch=torch.__version__, numpy=numpy.__version__, sklearn=sklearn_version,
        bingo=bingo.__version__)
