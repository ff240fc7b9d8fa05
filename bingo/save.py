"""Save a pruned model (masked or shrunk) and load it back, in a fresh process, with the same
outputs: :func:`save_pruned` and :func:`load_pruned`.

A save is one directory:

* ``model.safetensors``: every parameter and persistent buffer under its usual name (a masked
  model's weights with the masks applied: zeros where pruned), each tied tensor once, under its
  canonical name (the first name :meth:`torch.nn.Module.named_parameters` gives it);
* ``bingo_masks.safetensors`` (masked models only): the :mod:`torch.nn.utils.prune` keep-masks,
  one per masked tensor name, re-applied on load so the model is masked again;
* ``config.json`` (transformers models): the model's config, as ``save_pretrained`` writes it (a
  shrink updates it where it can express the result, see :func:`bingo.structure.shrink.shrink`);
* ``bingo_pruned.json``, written last (a directory without it is no save): format and version,
  the model's class, each saved tensor's shape and dtype, tied names, the module tree, the head-
  count attributes a shrink changes (:data:`bingo.structure.shrink.HEAD_ATTRIBUTES`, declared
  heads), and the SHA-256 of each weights file.

Loading starts from the dense architecture, built from ``config.json`` (transformers models, no
model argument needed) or passed in (``model=``: a freshly built dense instance of the same
class), checks that it is the saved architecture, replaces every tensor whose shape or dtype
differs by the saved one (tied names stay one tensor), re-derives the modules' size attributes
from their new shapes (:data:`bingo.structure.shrink.SIZE_ATTRIBUTES`), sets the recorded head
counts, turns nn.MultiheadAttention into the :class:`bingo.attention.PrunedMultiheadAttention`
a shrink left, and re-applies the masks: the same steps the shrink took, replayed.

When the config alone describes the shrunk model (``bingo_pruned.json``'s ``from_pretrained``
is true), the directory also loads with transformers' own ``from_pretrained``.

Writes are atomic: everything goes to a hidden temporary directory beside the target, which is
renamed into place once complete; a failed save leaves no directory that looks like a save.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune

from bingo.errors import CheckpointError, InputMismatchError

FORMAT = "bingo-pruned"
"""The ``format`` field of every manifest."""
VERSION = 1
"""Manifest format version this bingo writes and reads."""
MANIFEST = "bingo_pruned.json"
WEIGHTS = "model.safetensors"
MASKS = "bingo_masks.safetensors"
CONFIG = "config.json"

# Module classes a shrink swaps for another (saved class -> the dense class it replaces).
_REPLACED = {"bingo.attention.PrunedMultiheadAttention":
             "torch.nn.modules.activation.MultiheadAttention"}
_HEAD_SPEC_KEY = "bingo_heads.num_heads"
_OWN_CONFIG_PREFIX = "config."
"""Manifest attribute prefix: a head count of an attention block's own config (see
:func:`bingo.structure.shrink.shrink`), not of the model's shared one."""


def _class_name(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_transformers(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and \
        hasattr(getattr(model, "config", None), "save_pretrained")


# --------------------------------------------------------------------------------------------
# What is saved
# --------------------------------------------------------------------------------------------


def _model_of(model_or_result: Any) -> nn.Module:
    """The module a save holds: a PruneResult's shrunk model if it has one, else its masked
    model; a StructuredResult's model; a module itself."""
    from bingo.pruning import PruneResult, StructuredResult

    if isinstance(model_or_result, PruneResult):
        structured = model_or_result.structured
        return structured.model if structured is not None else model_or_result.model
    if isinstance(model_or_result, StructuredResult):
        return model_or_result.model
    if isinstance(model_or_result, nn.Module):
        return model_or_result
    raise InputMismatchError(
        f"save_pruned takes an nn.Module, a PruneResult or a StructuredResult; got "
        f"{type(model_or_result).__name__}")


def _tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Canonical name -> value of every parameter and persistent buffer (a tensor that
    torch.nn.utils.prune masks: ``<name>_orig`` * ``<name>_mask``, under ``<name>``), and tied
    alias -> canonical name (the first name of a tensor in state_dict order is canonical)."""
    state = model.state_dict(keep_vars=True)
    canonical: dict[int, str] = {}
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    for name, tensor in state.items():
        base = name[:-len("_orig")] if name.endswith("_orig") else name[:-len("_mask")]
        masked = base + "_orig" in state and base + "_mask" in state
        if masked and name.endswith("_mask"):
            continue
        plain = base if masked else name
        if id(tensor) in canonical:
            tied[plain] = canonical[id(tensor)]
            continue
        canonical[id(tensor)] = plain
        value = tensor.detach()
        tensors[plain] = value * state[base + "_mask"].to(value.dtype) if masked else value
    return tensors, tied


def _attributes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Module -> the head-count attributes a shrink changes, as they are now."""
    from bingo.attention import HEADS_ATTR, HeadSpec
    from bingo.structure.shrink import CONFIG_HEAD_ATTRIBUTES, HEAD_ATTRIBUTES

    out: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        values = {a: getattr(module, a) for a in HEAD_ATTRIBUTES
                  if isinstance(getattr(module, a, None), int)
                  and not isinstance(getattr(module, a), bool)}
        spec = getattr(module, HEADS_ATTR, None)
        if isinstance(spec, HeadSpec):
            values[_HEAD_SPEC_KEY] = spec.num_heads
            if spec.num_heads_attr and isinstance(getattr(module, spec.num_heads_attr, None), int):
                values[spec.num_heads_attr] = getattr(module, spec.num_heads_attr)
        own = getattr(module, "config", None)
        if own is not None and module is not model and own is not getattr(model, "config", None):
            values.update({f"{_OWN_CONFIG_PREFIX}{a}": getattr(own, a)
                           for a in CONFIG_HEAD_ATTRIBUTES
                           if isinstance(getattr(own, a, None), int)})
        if values:
            out[name] = values
    return out


def _config_builds(model: nn.Module, tensors: dict[str, Tensor]) -> bool:
    """Whether ``model``'s config alone builds its shapes (then ``from_pretrained`` loads the
    save): the architecture is built on the meta device (no memory) and compared."""
    try:
        with torch.device("meta"):
            fresh = type(model)(model.config)
        shapes = {n: tuple(t.shape) for n, t in fresh.state_dict().items()}
    except Exception:  # noqa: BLE001  any failure means: not by the config alone
        return False
    return all(shapes.get(n) == tuple(t.shape) for n, t in tensors.items())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _is_save(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def _write_into(directory: Path, model: nn.Module) -> None:
    """Every file of a save of ``model`` into the (new, empty) ``directory``, manifest last."""
    from safetensors.torch import save_file

    from bingo import __version__
    from bingo.pruning import torch_prune_masks

    masks = {n: m.detach().bool().cpu().contiguous() for n, m in torch_prune_masks(model).items()}
    tensors, tied = _tensors(model)
    save_file({n: t.cpu().contiguous() for n, t in tensors.items()}, str(directory / WEIGHTS),
              metadata={"format": "pt"})
    files = [WEIGHTS]
    if masks:
        save_file(masks, str(directory / MASKS))
        files.append(MASKS)
    transformers_model = _is_transformers(model)
    if transformers_model:
        model.config.save_pretrained(str(directory))
    state = model.state_dict(keep_vars=True)
    non_persistent = {n: list(b.shape) for n, b in model.named_buffers() if n not in state}
    manifest = dict(
        format=FORMAT, version=VERSION, bingo_version=__version__,
        torch_version=torch.__version__, model_class=_class_name(model),
        transformers=transformers_model,
        from_pretrained=transformers_model and _config_builds(model, tensors),
        config_note=getattr(model, "bingo_config_note", None),
        training=model.training,
        tensors={n: dict(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
                 for n, t in tensors.items()},
        tied=tied, masked=sorted(masks), not_saved_buffers=non_persistent,
        modules={n: _class_name(m) for n, m in model.named_modules()},
        attributes=_attributes(model),
        files={f: dict(sha256=_sha256(directory / f), bytes=(directory / f).stat().st_size)
               for f in files})
    for f in files:
        _fsync(directory / f)
    with open(directory / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def save_pruned(model_or_result: Any, directory: Union[str, os.PathLike], *,
                overwrite: bool = False) -> Path:
    """Save a pruned model to ``directory`` so that :func:`load_pruned` gives it back, in any
    process, with the same outputs (see the module docstring for the files).

    Args:
        model_or_result: a model (masked with torch.nn.utils.prune, shrunk, or dense), a
            :class:`bingo.PruneResult` (its shrunk ``structured.model`` if it has one, else its
            masked ``model``) or a :class:`bingo.StructuredResult`.
        directory: the save's directory; created with its parents. It must not exist or be
            empty, or (``overwrite=True``) hold an earlier save, which is then replaced.

    Returns the directory. The write is atomic (a temporary directory renamed into place).
    """
    model = _model_of(model_or_result)
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir():
            raise InputMismatchError(f"{directory} exists and is not a directory")
        if any(directory.iterdir()) and not (overwrite and _is_save(directory)):
            raise InputMismatchError(
                f"{directory} is not empty; save into a new directory"
                + (" (overwrite=True replaces only an earlier bingo save)" if overwrite else
                   ", or pass overwrite=True to replace an earlier bingo save"))
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial",
                                      dir=directory.parent))
    old: Optional[Path] = None
    try:
        _write_into(temporary, model)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
            directory.rename(old)
        temporary.rename(directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if old is not None and not directory.exists():
            old.rename(directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (a bingo save is one)")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a bingo save: it has no {MANIFEST} "
                              "(write one with bingo.save_pruned)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a bingo save manifest (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else '?'})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {manifest.get('version')}; this bingo "
                              f"reads version {VERSION}")
    return manifest


def _verified(directory: Path, manifest: dict) -> dict[str, dict[str, Tensor]]:
    """The saved tensor files, each checked against its recorded size and SHA-256 first."""
    from safetensors.torch import load_file

    out = {}
    for name, record in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the save")
        size = path.stat().st_size
        if size != record["bytes"] or _sha256(path) != record["sha256"]:
            raise CheckpointError(
                f"{path} is corrupt or truncated: its checksum differs from the one saved "
                f"({size} bytes, {record['bytes']} saved)")
        out[name] = load_file(str(path))
    return out


def _from_config(directory: Path, manifest: dict) -> nn.Module:
    """The dense architecture of a transformers save, built from its config."""
    if not manifest.get("transformers"):
        raise InputMismatchError(
            f"{directory} holds a {manifest['model_class']}, which bingo cannot build by "
            "itself: pass model= (a freshly built dense instance)")
    try:
        import transformers
    except ImportError as exc:
        raise InputMismatchError(f"{directory} holds a transformers model; install "
                                 "transformers to load it") from exc
    name = manifest["model_class"].rpartition(".")[2]
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InputMismatchError(f"transformers has no model class {name!r}; pass model= (a "
                                 "freshly built dense instance)")
    config = transformers.AutoConfig.from_pretrained(str(directory))
    return cls(config)


# Config fields a save may change besides the widths: not compared with a model given to
# load_pruned.
_CONFIG_FIELDS_CHANGED = {"transformers_version", "_name_or_path", "architectures",
                          "dtype", "torch_dtype", "use_cache"}


def _saved_config(model: nn.Module, directory: Path, manifest: dict) -> Optional[dict]:
    """The saved config's widths a shrink changes, to give a transformers model passed to
    load_pruned; raises if the rest of its configuration differs from the saved one. None for
    other models."""
    from bingo.structure.shrink import CONFIG_HEAD_ATTRIBUTES, CONFIG_WIDTH_ATTRIBUTES

    if not manifest.get("transformers") or not _is_transformers(model):
        return None
    import transformers

    saved = transformers.AutoConfig.from_pretrained(str(directory)).to_dict()
    given = model.config.to_dict()
    widths = {"head_dim", *CONFIG_HEAD_ATTRIBUTES, *CONFIG_WIDTH_ATTRIBUTES}
    differ = sorted(k for k in set(saved) | set(given)
                    if k not in widths | _CONFIG_FIELDS_CHANGED and saved.get(k) != given.get(k))
    if differ:
        shown = ", ".join(f"{k}={given.get(k)!r} (saved {saved.get(k)!r})" for k in differ[:4])
        raise CheckpointError(f"the model given has another configuration than the save: "
                              f"{shown}")
    return {k: saved[k] for k in widths if k in saved}


def _check_architecture(model: nn.Module, manifest: dict, state: dict[str, Tensor]) -> None:
    """Raise unless ``model`` is a dense (or equal) instance of the saved architecture."""
    from bingo.pruning import torch_prune_masks

    saved = manifest["model_class"]
    what = f"the save holds a {saved}; the model given is a {_class_name(model)}"
    if _class_name(model) != saved:
        raise CheckpointError(f"{what}: not the saved architecture")
    if torch_prune_masks(model):
        raise CheckpointError("the model given is masked with torch.nn.utils.prune; pass a "
                              "freshly built dense instance")
    modules = {n: _class_name(m) for n, m in model.named_modules()}
    recorded = manifest["modules"]
    if set(modules) != set(recorded):
        extra = sorted(set(modules) - set(recorded))[:4]
        missing = sorted(set(recorded) - set(modules))[:4]
        raise CheckpointError(f"{what} with other modules (not in the save: {extra}; missing: "
                              f"{missing}): not the saved architecture")
    for name, cls in recorded.items():
        if modules[name] != cls and _REPLACED.get(cls) != modules[name]:
            raise CheckpointError(f"module {name!r} is a {modules[name]}; the save has a {cls}")
    tensors, tied = _tensors(model)
    names = set(tensors) | set(tied)
    if names != set(state) | set(manifest["tied"]):
        extra = sorted(names - set(state) - set(manifest["tied"]))[:4]
        missing = sorted(set(state) - names)[:4]
        raise CheckpointError(f"the model's tensors differ from the save's (not saved: {extra}; "
                              f"not in the model: {missing}): not the saved architecture")
    for alias, canonical in tied.items():
        if manifest["tied"].get(alias) != canonical:
            raise CheckpointError(f"the model ties {alias!r} to {canonical!r}; the save does "
                                  "not (not the saved architecture or configuration)")
    for name, value in state.items():
        have = tuple(tensors[name].shape) if name in tensors else \
            tuple(tensors[tied[name]].shape)
        want = tuple(value.shape)
        if len(have) != len(want) or any(w > h for w, h in zip(want, have)):
            raise CheckpointError(f"{name!r} is {have} in the model and {want} in the save "
                                  "(a pruned tensor is never larger): not the saved "
                                  "architecture or configuration")
    for name, shape in manifest["not_saved_buffers"].items():
        buffer = dict(model.named_buffers()).get(name)
        if buffer is None or list(buffer.shape) != shape:
            raise CheckpointError(f"buffer {name!r} (not saved, rebuilt by the model) has "
                                  f"another shape than the saved model's {shape}")


def _put(model: nn.Module, names: list[str], value: Tensor) -> None:
    """Make every name in ``names`` (one tensor's tied names) hold ``value``: copied in place
    when shape and dtype match, else one new tensor set under every name."""
    from bingo.structure.shrink import _owner

    owner, attr = _owner(model, names[0])
    old = getattr(owner, attr)
    value = value.to(old.device)
    if old.shape == value.shape and old.dtype == value.dtype:
        old.data.copy_(value)
        return
    new = nn.Parameter(value, requires_grad=old.requires_grad) if \
        isinstance(old, nn.Parameter) else value
    for name in names:
        owner, attr = _owner(model, name)
        if isinstance(new, nn.Parameter):
            owner._parameters[attr] = new
        else:
            owner._buffers[attr] = new


def _restore(model: nn.Module, manifest: dict, state: dict[str, Tensor],
             masks: dict[str, Tensor]) -> None:
    """Replay the shrink on the dense ``model``: tensors, size attributes, head counts, the
    pruned nn.MultiheadAttention, then the masks."""
    from bingo.attention import HEADS_ATTR
    from bingo.structure.shrink import _replace_mha, _size_rule

    tensors, tied = _tensors(model)
    aliases: dict[str, list[str]] = {n: [n] for n in state}
    for alias, canonical in {**manifest["tied"], **tied}.items():
        if canonical in aliases and alias not in aliases[canonical]:
            aliases[canonical].append(alias)
    before = {n: tuple(t.shape) for n, t in tensors.items()}
    before.update({a: before[c] for a, c in tied.items()})
    touched = set()
    with torch.no_grad():
        for name, value in state.items():
            _put(model, aliases[name], value)
            if tuple(value.shape) != before[name]:
                touched.update(n.rpartition(".")[0] for n in aliases[name])
    for module_name in sorted(touched):
        module = model.get_submodule(module_name)
        rule = _size_rule(module)
        if rule is not None:
            rule(module)
    for module_name, values in manifest["attributes"].items():
        module = model.get_submodule(module_name)
        for attr, value in values.items():
            if attr == _HEAD_SPEC_KEY:
                spec = getattr(module, HEADS_ATTR)
                setattr(module, HEADS_ATTR, dataclasses.replace(spec, num_heads=value))
            elif attr.startswith(_OWN_CONFIG_PREFIX):
                if module.config is getattr(model, "config", None):
                    module.config = copy.deepcopy(module.config)
                setattr(module.config, attr[len(_OWN_CONFIG_PREFIX):], value)
            else:
                setattr(module, attr, value)
    for module_name, cls in manifest["modules"].items():
        if cls in _REPLACED and _class_name(model.get_submodule(module_name)) != cls:
            _replace_mha(model, module_name)
    shapes = {n: list(t.shape) for n, t in _tensors(model)[0].items()}
    recorded = {n: r["shape"] for n, r in manifest["tensors"].items()}
    if shapes != recorded:
        wrong = sorted(n for n in recorded if shapes.get(n) != recorded[n])[:4]
        raise CheckpointError(f"the loaded model's tensors {wrong} do not have the saved shapes")
    for name, mask in masks.items():
        module_name, _, tensor = name.rpartition(".")
        module = model.get_submodule(module_name)
        torch_prune.custom_from_mask(module, tensor, mask.to(getattr(module, tensor).device))
    model.train(manifest["training"])
    if manifest.get("config_note") is not None or manifest["transformers"]:
        model.bingo_config_note = manifest.get("config_note")


def load_pruned(directory: Union[str, os.PathLike], model: Optional[nn.Module] = None
                ) -> nn.Module:
    """The model :func:`save_pruned` wrote to ``directory``, with the saved outputs.

    Args:
        directory: a directory written by :func:`save_pruned`.
        model: a freshly built dense instance of the saved architecture (same class and
            configuration), resized in place and returned; not needed for transformers models,
            which are built from the saved config. Any other architecture is refused
            (:class:`bingo.errors.CheckpointError`) before the model is changed.

    The weight files are checked against their saved SHA-256 first (a corrupt or truncated
    file raises CheckpointError). A masked save comes back masked (torch.nn.utils.prune), a
    shrunk one shrunk; the train/eval mode is the saved one; tensors keep the devices of the
    model's (the CPU for a model built from the config).
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    files = _verified(directory, manifest)
    state, masks = files[WEIGHTS], files.get(MASKS, {})
    if model is None:
        model = _from_config(directory, manifest)
    elif not isinstance(model, nn.Module):
        raise InputMismatchError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_architecture(model, manifest, state)
    widths = _saved_config(model, directory, manifest)
    _restore(model, manifest, state, masks)
    for name, value in (widths or {}).items():  # the config says what the model now is
        setattr(model.config, name, value)
    return model


__all__ = ["CONFIG", "FORMAT", "MANIFEST", "MASKS", "VERSION", "WEIGHTS", "load_pruned",
           "save_pruned"]
