"""Loading a local ``transformers`` causal language model the way a user's checkpoint is loaded,
with the checks that must fail before any long work, and the character tokenizer the benchmark
saves beside its model (so that its checkpoint is an ordinary one: ``AutoTokenizer`` and
``AutoModelForCausalLM`` load it, nothing bingo-specific)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bingo.errors import InputMismatchError

CONFIG_FILE = "config.json"


def transformers_module():
    """``transformers`` with its info/warning chatter silenced, or a clear error."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is a test dependency
        raise InputMismatchError("bingo llm needs the transformers package, which bingo's own "
                                 "install leaves out: pip install transformers") from exc
    transformers.logging.set_verbosity_error()
    return transformers


def check_checkpoint_dir(model_dir: str | os.PathLike) -> Path:
    """``model_dir`` as a Path if it holds a transformers checkpoint of a causal language model
    (a ``config.json`` whose architecture is a ...ForCausalLM and weights beside it); raises
    :class:`bingo.errors.InputMismatchError` naming the problem otherwise. Reads only the
    config, so it is instant."""
    path = Path(model_dir)
    if not path.is_dir():
        raise InputMismatchError(f"model directory {path}: not a directory")
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise InputMismatchError(f"model directory {path} is not a transformers checkpoint: it has "
                                 f"no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputMismatchError(f"{config_path}: not readable JSON ({exc})") from exc
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") or str(a).endswith("LMHeadModel")
               for a in architectures):
        raise InputMismatchError(f"{config_path}: architecture {architectures or 'unknown'} is not "
                                 "a causal language model (...ForCausalLM)")
    weights = [p for p in path.iterdir()
               if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
    if not weights:
        raise InputMismatchError(f"model directory {path} has a config but no weights "
                                 "(*.safetensors or *.bin)")
    return path


def load_causal_lm(model_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32
                   ) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of the checkpoint in ``model_dir`` (local files only, eval mode,
    ``use_cache`` off: pruning evaluates whole windows). Raises before loading anything when the
    directory is not a causal LM checkpoint or has no tokenizer."""
    path = check_checkpoint_dir(model_dir)
    transformers = transformers_module()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputMismatchError(f"model directory {path} has no tokenizer transformers can load "
                                 f"({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
                                 ) from exc
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                              dtype=dtype)
    model.config.use_cache = False
    return model.eval(), tokenizer


def char_tokenizer(chars: str):
    """A ``transformers`` fast tokenizer that maps each character of ``chars`` to its index (the
    vocabulary of a character-level model); characters outside ``chars`` are dropped.
    ``save_pretrained`` writes it as any tokenizer, ``AutoTokenizer`` loads it back."""
    transformers = transformers_module()
    from tokenizers import Tokenizer, decoders, models

    # BPE with no merges splits text into its characters, newlines and spaces included.
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def encode(tokenizer, text: str) -> torch.Tensor:
    """int64 token ids of ``text`` (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)
