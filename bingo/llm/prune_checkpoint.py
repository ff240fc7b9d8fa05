"""``bingo llm prune`` as a function: prune a local ``transformers`` causal language model's
attention heads / key-value groups and MLP neurons with bingo's setting
(:func:`bingo.llm.recipe.targeted_llm_scores`, then the least-squares refit), shrink it and save
the physically smaller model with its tokenizer, so that :func:`bingo.load_pruned` reloads it in
any process.

The calibration text file is tokenized with the checkpoint's tokenizer and cut in two,
contiguously: the first :data:`CALIBRATION_SHARE` of its tokens are the calibration windows
(the search's evidence and the refit's data), the rest is held out for the perplexity before and
after. Every input is checked before any long work (:func:`prune_checkpoint`): the sparsity, the
output directory, the checkpoint, the text, the window length and the architecture each fail
with one line naming the problem.

The output directory is written whole or not at all: everything goes to a hidden directory beside
it, renamed into place at the end; an existing non-empty directory is never written into.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from torch import Tensor, nn
from tqdm.auto import tqdm

from bingo.errors import BingoError, InputMismatchError, InvalidOptionError
from bingo.llm import recipe
from bingo.llm.checkpoint import (CONFIG_FILE, check_checkpoint_dir, encode, load_causal_lm,
                                  transformers_module)

CALIBRATION_SHARE = 0.9
"""Share of the calibration file's tokens (the first ones) used to search and refit; the rest
is held out for the perplexity before and after."""
DEFAULT_BLOCK = 128
"""Window length in tokens when none is given (at most the model's context length)."""
REPORT_FILE = "bingo_llm_prune.json"
"""The run's report, written into the output directory beside the model."""
PERPLEXITY_BATCH = 16
"""Windows per forward when measuring perplexity (one progress-bar step)."""

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Checks that run before any long work
# --------------------------------------------------------------------------------------------


def check_sparsity(sparsity: Any) -> float:
    """``sparsity`` as a float if it lies in (0, 1); raises InvalidOptionError otherwise."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) \
            or not 0.0 < float(sparsity) < 1.0:
        raise InvalidOptionError(f"sparsity must lie in (0, 1) (the fraction of the transformer "
                                 f"blocks' parameters to remove), got {sparsity!r}")
    return float(sparsity)


def check_out(out: PathLike) -> Path:
    """``out`` as a Path if the pruned model can be written there: it does not exist or is an
    empty directory, and its nearest existing ancestor is a writable directory (missing parents
    are created only when the model is saved). Raises InvalidOptionError naming the problem;
    creates nothing and never changes anything in an existing ``out``."""
    path = Path(out).expanduser()
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise InvalidOptionError(f"out={path} exists and is not a directory; pass a new "
                                     "directory")
        if any(path.iterdir()):
            raise InvalidOptionError(f"out={path} exists and is not empty; pass a new or empty "
                                     "directory (bingo llm prune never writes into one with "
                                     "files)")
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidOptionError(f"out={path} cannot be written: {ancestor} is a file, not a "
                                 "directory")
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".probe", dir=ancestor)
        os.rmdir(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InvalidOptionError(f"out={path} cannot be written: {reason}"
                                 f"{f' ({exc.filename})' if exc.filename else ''}") from None
    return path


def read_calibration_text(calibration_file: PathLike) -> str:
    """The text of ``calibration_file``; raises InputMismatchError when it is missing, not a
    file, unreadable, not UTF-8 or empty (whitespace only)."""
    path = Path(calibration_file).expanduser()
    if not path.exists():
        raise InputMismatchError(f"calibration file {path} does not exist")
    if not path.is_file():
        raise InputMismatchError(f"calibration file {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputMismatchError(f"calibration file {path} is not UTF-8 text ({exc.reason} at "
                                 f"byte {exc.start})") from None
    except OSError as exc:
        raise InputMismatchError(f"calibration file {path} cannot be read: "
                                 f"{exc.strerror or type(exc).__name__}") from None
    if not text.strip():
        raise InputMismatchError(f"calibration file {path} is empty")
    return text


def context_length(model_dir: Path) -> Optional[int]:
    """The model's context length as its config.json gives it (None if it does not)."""
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def window_length(block: Optional[int], limit: Optional[int]) -> int:
    """The window length: ``block``, else :data:`DEFAULT_BLOCK` capped at the context length
    ``limit``; raises InvalidOptionError for a non-positive one or one past the context."""
    if block is None:
        return min(DEFAULT_BLOCK, limit) if limit else DEFAULT_BLOCK
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise InvalidOptionError(f"block must be a positive number of tokens, got {block!r}")
    if limit is not None and block > limit:
        raise InvalidOptionError(f"block={block} is longer than the model's context of {limit} "
                                 "tokens")
    return block


def split_tokens(ids: Tensor, block: int, path: PathLike) -> tuple[Tensor, Tensor]:
    """``(calibration ids, held-out ids)``: the first :data:`CALIBRATION_SHARE` of ``ids`` and
    the rest; raises InputMismatchError when either holds no window of ``block`` tokens (a
    window needs ``block + 1`` tokens: its inputs and the next token of the last)."""
    cut = int(CALIBRATION_SHARE * ids.numel())
    parts = (ids[:cut], ids[cut:])
    for part, what in zip(parts, (f"its first {CALIBRATION_SHARE:.0%} (calibration)",
                                  f"its last {1 - CALIBRATION_SHARE:.0%} (held out)")):
        if part.numel() < block + 1:
            need = math.ceil((block + 1) / (1 - CALIBRATION_SHARE))
            raise InputMismatchError(
                f"calibration file {path} is too short: {ids.numel()} tokens, and {what} has "
                f"{part.numel()}, less than one window of {block + 1}; give at least {need} "
                f"tokens of text or a smaller block")
    return parts


def check_architecture(model: nn.Module, example: Tensor) -> Any:
    """The model's :class:`bingo.structure.Structure`, traced on ``example``; raises
    InputMismatchError naming the architecture when bingo's structure layer cannot handle it:
    the trace fails, it finds no removable head or neuron or no stack of blocks, or the model
    cannot be shrunk (tried at once on a copy, one unit fewer in the first group of several
    units only, so that layers keep different widths as a real pruning makes them). Warns
    when no attention head is removable (only MLP neurons will be pruned) and says why."""
    import torch

    from bingo.llm.budget import block_parameter_names
    from bingo.structure import HEADS, discover
    from bingo.structure.shrink import shrink

    name = type(model).__name__
    unsupported = f"architecture {name} is not supported by bingo's structure layer"
    try:
        structure = discover(model, example)
        block_parameter_names(model)
    except BingoError as exc:
        raise InputMismatchError(f"{unsupported}: {' '.join(str(exc).split())}") from exc
    if not structure.groups:
        blocked = ", ".join(sorted(set(structure.unsupported.values()))[:3])
        raise InputMismatchError(
            f"{unsupported}: it finds no removable attention head or MLP neuron"
            + (f" (ops it cannot trace in {blocked})" if blocked else ""))
    first = next((g for g in structure.groups if g.num_units > 1), None)
    if first is not None:
        trial = {first.key: torch.arange(first.num_units) > 0}
        try:
            shrink(model, trial, example_inputs=example, structure=structure)
        except BingoError as exc:
            raise InputMismatchError(f"{unsupported}: it cannot shrink the model "
                                     f"({' '.join(str(exc).split())[:300]})") from exc
    if not any(g.kind == HEADS for g in structure.groups):
        reasons = sorted({f"{param}: {why}" for param, why in structure.blocked.items()
                          if "attn" in param or "attention" in param})
        warnings.warn(f"{name}: no attention head is removable, only MLP neurons will be pruned"
                      + (f" ({reasons[0]})" if reasons else ""), stacklevel=2)
    return structure


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def measured_perplexity(model: nn.Module, data: tuple[Tensor, Tensor], *, desc: str,
                        progress: bool) -> float:
    """:func:`bingo.llm.text.perplexity` of ``model`` on ``data``, measured in chunks of
    :data:`PERPLEXITY_BATCH` windows under a progress bar."""
    from bingo.llm.text import perplexity

    inputs, targets = data
    nll = 0.0
    for i in tqdm(range(0, inputs.shape[0], PERPLEXITY_BATCH), desc=desc, unit="batch",
                  disable=not progress, leave=False):
        chunk = (inputs[i:i + PERPLEXITY_BATCH], targets[i:i + PERPLEXITY_BATCH])
        nll += math.log(perplexity(model, chunk, batch=PERPLEXITY_BATCH)) * chunk[1].numel()
    return math.exp(nll / targets.numel())


def _say(message: str, progress: bool) -> None:
    if progress:
        tqdm.write(f"bingo llm prune: {message}", file=sys.stderr)


def _write_out(model: nn.Module, tokenizer: Any, report: dict, out: Path) -> None:
    """Save ``model``, ``tokenizer`` and ``report`` into ``out`` at once: into a hidden
    directory beside it, renamed to ``out`` when complete (an existing ``out`` must be empty,
    and is replaced only by the rename). A failure before the rename leaves nothing behind."""
    from bingo.save import save_pruned

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        save_pruned(model, staging)
        tokenizer.save_pretrained(str(staging))
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # a temporary directory's 0700 would make OUT private
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.rename(staging, out)  # replaces an empty directory, never one with files
    except OSError as exc:
        raise InvalidOptionError(
            f"out={out} cannot be written ({exc.strerror or type(exc).__name__}: it was "
            f"changed while pruning?); the pruned model is kept in {staging}") from None


def _load(model_dir: Path, progress: bool) -> tuple[nn.Module, Any]:
    """:func:`bingo.llm.checkpoint.load_causal_lm`, with transformers' loading bar only under
    ``progress`` and a failure to build the model as one line."""
    from transformers.utils import logging as transformers_logging

    bar = transformers_logging.is_progress_bar_enabled()
    if not progress:
        transformers_logging.disable_progress_bar()
    try:
        return load_causal_lm(model_dir)
    except BingoError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputMismatchError(f"model directory {model_dir} cannot be loaded as a causal "
                                 f"LM: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                                 ) from exc
    finally:
        if bar:
            transformers_logging.enable_progress_bar()


def prune_checkpoint(model_dir: PathLike, calibration_file: PathLike, sparsity: float,
                     out: PathLike, *, block: Optional[int] = None,
                     evidence: int = recipe.EVIDENCE_WINDOWS, progress: bool = True) -> dict:
    """Prune the causal LM checkpoint in ``model_dir`` to remove ``sparsity`` of its transformer
    blocks' parameters and save the shrunk model with its tokenizer in ``out``.

    Args:
        model_dir: a local ``transformers`` checkpoint of a causal LM with its tokenizer (what
            ``save_pretrained`` writes).
        calibration_file: a UTF-8 text file: its first 90% of tokens calibrate (the
            elimination's evidence and the least-squares refit), its last 10% are held out for
            the perplexity before and after.
        sparsity: fraction of the transformer blocks' parameters to remove, in (0, 1); the
            units removed come as close to it as whole heads / groups and neurons allow.
        out: a new or empty directory for the pruned model (:func:`bingo.load_pruned` loads it,
            tokenizer included via ``AutoTokenizer``), written whole or not at all.
        block: window length in tokens (default: 128, at most the model's context length).
        evidence: calibration windows the targeted elimination measures damages on.
        progress: progress bars and stage lines on stderr.

    Returns the report: perplexity and parameters before and after, the removed fraction of
    block parameters, units, seconds, ``out``; and, not saved in the report file, ``model``
    (the shrunk model) and ``tokenizer``. Raises a :class:`bingo.errors.BingoError` naming the
    problem, before any long work, for a bad input.
    """
    import bingo
    from bingo.llm.budget import count_for_fraction
    from bingo.llm.text import windows

    started = time.perf_counter()
    sparsity = check_sparsity(sparsity)
    if isinstance(evidence, bool) or not isinstance(evidence, int) or evidence < 1:
        raise InvalidOptionError(f"evidence must be a positive number of windows, got "
                                 f"{evidence!r}")
    if block is not None:
        window_length(block, None)
    out = check_out(out)
    model_dir = check_checkpoint_dir(Path(model_dir).expanduser())
    block = window_length(block, context_length(model_dir))
    text = read_calibration_text(calibration_file)
    transformers_module()  # bingo's own install leaves it out: one line, not a traceback

    _say(f"loading {model_dir}", progress)
    model, tokenizer = _load(model_dir, progress)
    ids = encode(tokenizer, text)
    calibration_ids, held_out_ids = split_tokens(ids, block, calibration_file)
    calibration, held_out = windows(calibration_ids, block), windows(held_out_ids, block)
    example = calibration[0][:1]
    structure = check_architecture(model, example)
    units_total = sum(g.num_units for g in structure.groups)
    _say(f"{type(model).__name__}: {units_total} units in {len(structure.groups)} groups; "
         f"{ids.numel()} tokens: {calibration[0].shape[0]} calibration and "
         f"{held_out[0].shape[0]} held-out windows of {block}", progress)

    # Long work from here on.
    ppl_before = measured_perplexity(model, held_out, desc="perplexity before",
                                     progress=progress)
    _say(f"perplexity before: {ppl_before:.4f}; scoring (targeted elimination)", progress)
    scores = recipe.targeted_llm_scores(model, calibration, fraction=sparsity,
                                        example_inputs=example, progress=progress,
                                        evidence=evidence)
    count, removed, units = count_for_fraction(model, scores, sparsity, example_inputs=example)
    _say(f"removing {count} of {units} units ({removed:.1%} of the block parameters); "
         "refitting and shrinking", progress)
    refit = recipe.least_squares_refit(calibration, progress=progress)
    result = bingo.prune(model, scores, sparsity=count / units, granularity="structured",
                         example_inputs=example, reconstruct=refit, structured=True,
                         progress=progress)
    shrunk = result.structured.model.eval()
    ppl_after = measured_perplexity(shrunk, held_out, desc="perplexity after",
                                    progress=progress)
    kept = {key: int(mask.sum()) for key, mask in result.unit_masks.items()}
    report = dict(
        model_dir=str(model_dir), calibration_file=str(calibration_file), out=str(out),
        architecture=type(model).__name__, sparsity=sparsity, block=block,
        tokens=dict(total=int(ids.numel()), calibration=int(calibration_ids.numel()),
                    held_out=int(held_out_ids.numel())),
        windows=dict(calibration=int(calibration[0].shape[0]),
                     held_out=int(held_out[0].shape[0]), evidence=evidence),
        perplexity_before=ppl_before, perplexity_after=ppl_after,
        parameters_before=result.structured.dense_parameters,
        parameters_after=result.structured.parameters,
        removed_block_fraction=removed, units_removed=count, units_total=units,
        units_kept=kept, speedup=result.structured.speedup,
        bingo_version=bingo.__version__)
    _say(f"perplexity after: {ppl_after:.4f}; saving {out}", progress)
    report["seconds"] = time.perf_counter() - started
    _write_out(shrunk, tokenizer, report, out)
    return dict(report, model=shrunk, tokenizer=tokenizer)


__all__ = ["CALIBRATION_SHARE", "DEFAULT_BLOCK", "REPORT_FILE", "prune_checkpoint"]
