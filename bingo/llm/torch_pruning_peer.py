"""Torch-Pruning's own LLM pruner, run as the peer library on a transformers Llama (GQA, SwiGLU).

What Torch-Pruning (TP, https://github.com/VainF/Torch-Pruning, ``pip install torch-pruning``)
does here, following its LLM example ``examples/LLMs/prune_llm.py``
(https://github.com/VainF/Torch-Pruning/blob/master/examples/LLMs/prune_llm.py, as of v1.6.1):

* ``tp.pruner.BasePruner`` with ``tp.importance.GroupMagnitudeImportance(p=2,
  group_reduction="mean")`` (or ``GroupTaylorImportance`` on one calibration backward),
  ``global_pruning=False`` (every layer loses the same share), ``round_to=4``,
  ``ignored_layers=[lm_head]``;
* attention: ``num_heads`` of q_proj (query heads) and of k_proj/v_proj (key/value heads),
  ``prune_num_heads=True``, ``prune_head_dims=False`` (whole heads, so RoPE is untouched) and
  ``head_pruning_ratio`` equal to the channel ratio, as the example passes one ratio for both.
  TP's GQA rule removes *query* heads, ``ceil(ceil(ratio * heads) / kv_heads)`` in every
  key/value group, and keeps every key/value head (k_proj and v_proj never shrink);
* MLP: gate_proj/up_proj output channels with down_proj's input columns, ``pruning_ratio``;
* afterwards the config is written back from the new shapes (num_attention_heads,
  num_key_value_heads, intermediate_size, head_dim, each attention's num_key_value_groups), as
  the example does, so ``save_pretrained``/``from_pretrained`` rebuild the pruned model.

Where this differs from the example, and why:

* the example takes a width ratio; here the caller asks for a fraction of the transformer
  blocks' parameters (everything under ``model.model.layers``), and the ratio that yields it is
  searched (:func:`prune_with_torch_pruning` runs TP once per tried ratio on a fresh copy);
* the example narrows the residual stream too (embedding, every norm, every projection's input,
  lm_head's input, with the same ratio). Here that is ``prune_hidden=True``; by default
  ``model.model.embed_tokens`` joins ``ignored_layers``, which makes TP skip the one group that
  holds the residual width, so TP narrows only the attention and the MLP, as bingo's
  structured pruning does;
* the head ratio is capped so that every key/value group keeps one query head (one head in all
  without GQA): above that TP's rule asks for all of a group's query heads and its
  over-pruning check then drops the whole attention group.

What had to be set for TP to run on transformers 5.25 / torch 2.13, and why:

1. **The hang.** ``DependencyGraph`` builds in milliseconds; what never finishes is grouping
   (``get_all_groups`` -> ``get_pruning_group`` -> ``_fix_dependency_graph_non_recursive``, which
   ``BasePruner.__init__`` calls), in an endless walk round the rotary embedding. ``rotate_half``
   is ``torch.cat((-x2, x1), dim=-1)``, and this torch reports the negative dim of
   ``CatBackward0._saved_dim`` as an unsigned 64-bit number (-1 reads as 2**64 - 1). TP skips
   the channel-offset index mapping of a concat whose dim is not 1, unless the dim is over 100,
   which it takes for an uninitialised value (an old torch bug) and maps as a channel concat.
   So the rotary concat shifts indices by +head_dim/2 on every lap of the loop q -> slice ->
   cat -> mul -> add <- mul(q * cos) <- q, the index sets never repeat, and the walk's
   "already visited with these indices" test never stops it. (TP issue #527, Qwen3 on
   transformers 5.1, is the same infinite loop, open.) Fix: while TP runs,
   ``update_concat_index_mapping`` reads such a dim as the negative number it is, so TP does
   exactly what it does when torch reports -1; nothing else of TP changes.
2. **Eager attention while TP traces.** With no attention mask (causal LM inputs),
   transformers 5.x's sdpa path passes ``enable_gqa=True`` to ``scaled_dot_product_attention``
   instead of calling ``repeat_kv``, so the graph has no expand of the key/value heads, TP's GQA
   index mapping (``_GQAIndexMapping``, keyed on ``repeat_kv``'s 5-D expand) never applies, and
   the sdpa node ties query channel c to key/value channel c: query head 1 to key/value head 1
   instead of 0, query heads past the key/value count to channels k_proj does not have. Head
   importance then sums the wrong k/v weights. The copy is traced and pruned with
   ``attn_implementation="eager"`` (which calls ``repeat_kv``) and gets the caller's
   implementation back afterwards.
3. **TP's GQA check.** After choosing the query heads to remove, ``BasePruner._prune``
   subtracts them from its head counts and *then* asks whether the layer is GQA (query heads !=
   key/value heads) to leave k_proj/v_proj alone. When the pruning leaves one query head per
   key/value group (8 heads over 4 groups -> 4, which is every head pruning this model allows)
   the counts are equal, k_proj/v_proj keep index lists as long as they are wide, and the
   over-pruning check (which refuses to empty a layer) drops the group: no head is removed.
   Fix (GQA models only): the check is wrapped so that a group removing query heads leaves
   k_proj/v_proj out, as TP's own GQA branch does whenever the counts still differ.
4. ``forward_fn`` calls ``model(input_ids=...)``: TP's default call tries
   ``model(*example_inputs)`` first, which unpacks the batch dimension of a tensor.

If TP does not finish within ``time_limit_s`` (another model, another version), the call stops
it and raises :class:`bingo.errors.BackendUnavailableError` naming where TP was.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bingo.errors import BackendUnavailableError, InputMismatchError, InvalidOptionError

IMPORTANCES = ("magnitude", "taylor")
ROUND_TO = 4
"""The example's ``round_to``: TP keeps a multiple of 4 MLP channels."""
FRACTION_TOLERANCE = 0.005
"""The ratio search stops once the removed block fraction is this close to the one asked."""
MAX_TRIALS = 12
"""At most this many TP runs per call (each on a fresh copy)."""
_NEGATIVE_DIMS_AS_UNSIGNED = 2 ** 64 - 64
"""A ``_saved_dim`` at or above this is a negative dim (-1 .. -64) read back as unsigned."""


@dataclass
class PeerResult:
    """What :func:`prune_with_torch_pruning` returns."""

    model: nn.Module
    """The pruned copy (physically smaller; its config describes its shapes)."""
    removed_fraction: float
    """Share of the transformer blocks' parameters (``model.model.layers``) removed."""
    requested_fraction: float
    seconds: float
    """Wall time of the whole call, every tried ratio included."""
    library_version: str
    """Torch-Pruning's installed distribution version."""
    options: dict[str, Any] = field(default_factory=dict)
    """What TP was given (pruner, importance, ratios, ...) and what this wrapper added."""
    block_params: tuple[int, int] = (0, 0)
    """Block parameters before and after."""


def prune_with_torch_pruning(model: nn.Module, fraction: float, *, example_inputs,
                             importance: str = "magnitude",
                             calibration: tuple[Tensor, Tensor] | None = None,
                             heads: bool = True, progress: bool = False,
                             prune_hidden: bool = False,
                             time_limit_s: float | None = 300.0) -> PeerResult:
    """Prune a copy of a transformers Llama-style causal LM with Torch-Pruning's LLM pruner so
    that about ``fraction`` of its transformer blocks' parameters is removed.

    ``example_inputs``: token ids (B, T) int64, or a dict with ``input_ids``; TP traces one
    forward on them. ``importance``: ``"magnitude"`` (the example's group L2 norm) or
    ``"taylor"`` (TP's ``GroupTaylorImportance``; needs ``calibration=(input_ids, targets)``
    for one backward of the next-token loss). ``heads=False`` prunes MLP channels only.
    ``prune_hidden=True`` also narrows the residual stream as the example does (embedding and
    lm_head shrink too). The caller's model is never modified. Raises
    :class:`bingo.errors.InvalidOptionError` for a bad option or a missing torch-pruning,
    :class:`bingo.errors.InputMismatchError` for a model that is not Llama-shaped, and
    :class:`bingo.errors.BackendUnavailableError` when TP does not finish in ``time_limit_s``
    seconds (None: no limit) or leaves layers of different widths.
    """
    started = time.perf_counter()
    if not 0.0 < float(fraction) < 1.0:
        raise InvalidOptionError(f"fraction={fraction!r}: must be in (0, 1)")
    if importance not in IMPORTANCES:
        raise InvalidOptionError(f"importance={importance!r} is not supported; choose one of "
                                 + ", ".join(repr(i) for i in IMPORTANCES))
    if importance == "taylor" and calibration is None:
        raise InvalidOptionError("importance='taylor' needs calibration=(input_ids, targets) "
                                 "for one backward pass")
    try:
        import torch_pruning as tp
    except ImportError as exc:
        raise InvalidOptionError("prune_with_torch_pruning needs Torch-Pruning: pip install "
                                 "torch-pruning") from exc

    input_ids = _input_ids(example_inputs)
    layers = _llama_layers(model)
    shape = _shape(model, layers)
    version = _installed_version(tp)

    def search() -> PeerResult:
        return _search_ratio(model, float(fraction), input_ids, shape, tp=tp,
                             importance=importance, calibration=calibration, heads=heads,
                             prune_hidden=prune_hidden, progress=progress, started=started,
                             version=version)

    return _run_bounded(search, time_limit_s)


# --- the ratio search -------------------------------------------------------------------------

@dataclass
class _Shape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    hidden: int


def _search_ratio(model, fraction, input_ids, shape: _Shape, *, tp, importance, calibration,
                  heads, prune_hidden, progress, started, version) -> PeerResult:
    """Run TP at successive ratios (regula falsi on a monotone step function, bracketed by
    ratio 0) and keep the run whose removed fraction is closest to ``fraction``."""
    working = copy.deepcopy(model)
    attn_implementation = getattr(working.config, "_attn_implementation", None)
    _set_attention(working, "eager")
    gradients = _calibration_gradients(working, calibration) if importance == "taylor" else None
    before = _block_params(working)

    # The most TP can take from a layer and still keep round_to channels (over that, TP's
    # over-pruning check silently skips the layer, so the fraction would drop).
    widths = [shape.intermediate] + ([shape.hidden] if prune_hidden else [])
    ratio_max = min(1.0 - 1.5 * ROUND_TO / w for w in widths)
    # Heads TP may take: one query head must stay per key/value group (GQA), one head in all
    # (multi-head attention, where k/v heads go with their query heads).
    gqa = shape.heads != shape.kv_heads
    head_ratio_max = (shape.heads - (shape.kv_heads if gqa else 1)) / shape.heads

    tried: list[tuple[float, float, nn.Module, dict]] = []

    def run(ratio: float) -> float:
        head_ratio = min(ratio, head_ratio_max) if heads else 0.0
        pruned, options = _prune_once(working, tp, input_ids, ratio=ratio, head_ratio=head_ratio,
                                      importance=importance, gradients=gradients,
                                      prune_hidden=prune_hidden, gqa=gqa)
        removed = 1.0 - _block_params(pruned) / before
        tried.append((ratio, removed, pruned, options))
        if progress:
            print(f"torch-pruning: ratio {ratio:.4f} (heads {head_ratio:.4f}) removes "
                  f"{removed:.4f} of block parameters", file=sys.stderr, flush=True)
        return removed

    # Below this bracket width no width's channel count can change twice: the fraction jumps
    # over the target there.
    smallest_step = 1.0 / max(widths + [shape.heads])
    low = (0.0, 0.0)
    high: tuple[float, float] | None = None
    last_side, same_side_runs = "", 0
    ratio = min(fraction, ratio_max)
    for _ in range(MAX_TRIALS):
        removed = run(ratio)
        if abs(removed - fraction) <= FRACTION_TOLERANCE:
            break
        side = "low" if removed < fraction else "high"
        if side == "low":
            low = (ratio, removed)
        else:
            high = (ratio, removed)
        same_side_runs = same_side_runs + 1 if side == last_side else 1
        last_side = side
        if high is None:
            if low[0] >= ratio_max:
                break  # even the largest ratio removes too little
            # Extrapolate through the origin; nothing above ratio_max.
            guess = low[0] * fraction / low[1] if low[1] > 0 else 2 * low[0]
            ratio = min(ratio_max, max(guess, low[0] + smallest_step))
            continue
        width = high[0] - low[0]
        if width < smallest_step:
            break
        if same_side_runs >= 3:
            # Interpolation keeps landing on one side (the fraction is a step function, and
            # the first head step makes it jump at ratio 0+): bisect instead.
            ratio = low[0] + width / 2
        else:
            guess = low[0] + (fraction - low[1]) * width / max(high[1] - low[1], 1e-12)
            ratio = min(max(guess, low[0] + 0.05 * width), high[0] - 0.05 * width)

    ratio, removed, pruned, options = min(tried, key=lambda t: abs(t[1] - fraction))
    _write_config(pruned, shape, prune_hidden)
    _set_attention(pruned, attn_implementation)
    pruned.train(model.training)
    with torch.no_grad():
        pruned(input_ids=input_ids)  # the config must describe the new shapes
    options.update(trials=[(round(r, 6), round(f, 6)) for r, f, _, _ in tried],
                   traced_with_attn_implementation="eager",
                   fixes=["rotary concat dim read as signed (module docstring, 1)"]
                   + (["k_proj/v_proj kept in GQA groups (module docstring, 3)"] if gqa else []))
    return PeerResult(model=pruned, removed_fraction=removed, requested_fraction=fraction,
                      seconds=time.perf_counter() - started, library_version=version,
                      options=options, block_params=(before, _block_params(pruned)))


def _prune_once(working: nn.Module, tp, input_ids: Tensor, *, ratio: float, head_ratio: float,
                importance: str, gradients: dict[str, Tensor] | None,
                prune_hidden: bool, gqa: bool) -> tuple[nn.Module, dict]:
    """One TP run, the example's settings, on a fresh copy of ``working``."""
    candidate = copy.deepcopy(working)
    if gradients is not None:
        for name, parameter in candidate.named_parameters():
            if name in gradients:
                parameter.grad = gradients[name].clone()
    num_heads: dict[nn.Module, int] = {}
    query_layers, kv_layers = set(), set()
    for layer in candidate.model.layers:
        attention = layer.self_attn
        num_heads[attention.q_proj] = candidate.config.num_attention_heads
        num_heads[attention.k_proj] = candidate.config.num_key_value_heads
        num_heads[attention.v_proj] = candidate.config.num_key_value_heads
        query_layers.add(attention.q_proj)
        kv_layers.update((attention.k_proj, attention.v_proj))
    if importance == "taylor":
        scorer = tp.importance.GroupTaylorImportance(group_reduction="mean")
        scorer_name = "GroupTaylorImportance(group_reduction='mean')"
    else:
        scorer = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
        scorer_name = "GroupMagnitudeImportance(p=2, group_reduction='mean')"
    ignored = [candidate.lm_head] + ([] if prune_hidden else [candidate.model.embed_tokens])
    options = dict(pruner="BasePruner", importance=scorer_name, global_pruning=False,
                   pruning_ratio=ratio, head_pruning_ratio=head_ratio,
                   prune_num_heads=head_ratio > 0, prune_head_dims=False, round_to=ROUND_TO,
                   ignored_layers=["lm_head"] + ([] if prune_hidden else ["model.embed_tokens"]),
                   prune_hidden=prune_hidden)
    with torch.enable_grad(), _concat_dim_read_as_signed(tp), warnings.catch_warnings():
        # TP lists the RMSNorm weights it found outside nn.LayerNorm; it handles them.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.BasePruner(
            candidate, example_inputs=input_ids, importance=scorer,
            forward_fn=lambda m, ids: m(input_ids=ids).logits,
            global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored,
            num_heads=num_heads, prune_num_heads=head_ratio > 0, prune_head_dims=False,
            head_pruning_ratio=head_ratio, round_to=ROUND_TO)
        if gqa:
            _keep_kv_heads_in_gqa_groups(pruner.DG, query_layers, kv_layers)
        for group in pruner.step(interactive=True):
            group.prune()
    candidate.zero_grad(set_to_none=True)
    return candidate, options


# --- the fixes that let TP run (module docstring, 1 and 3) ------------------------------------

@contextlib.contextmanager
def _concat_dim_read_as_signed(tp) -> Iterator[None]:
    """While TP runs, give ``update_concat_index_mapping`` nothing for a concat whose saved dim
    is a negative dim read as unsigned: what TP does for any concat dim other than 1."""
    index_mapping = tp.dependency.index_mapping
    original = index_mapping.update_concat_index_mapping

    def update_concat_index_mapping(graph, cat_node):
        dim = getattr(cat_node.grad_fn, "_saved_dim", None)
        if isinstance(dim, int) and dim >= _NEGATIVE_DIMS_AS_UNSIGNED:
            return None
        return original(graph, cat_node)

    index_mapping.update_concat_index_mapping = update_concat_index_mapping
    try:
        yield
    finally:
        index_mapping.update_concat_index_mapping = original


def _keep_kv_heads_in_gqa_groups(graph, query_layers: set, kv_layers: set) -> None:
    """Wrap ``graph.check_pruning_group`` so that a group removing query heads leaves k_proj and
    v_proj whole (TP's GQA branch, which its head-count update can skip)."""
    check = graph.check_pruning_group

    def check_pruning_group(group) -> bool:
        removes_query_heads = any(
            dep.target.module in query_layers and graph.is_out_channel_pruning_fn(dep.handler)
            and len(idxs) > 0 for dep, idxs in group)
        if removes_query_heads:
            for i, (dep, idxs) in enumerate(group):
                if dep.target.module in kv_layers and graph.is_out_channel_pruning_fn(dep.handler):
                    group[i] = (dep, [])  # as BasePruner._prune writes it
        return check(group)

    graph.check_pruning_group = check_pruning_group


# --- the model --------------------------------------------------------------------------------

def _input_ids(example_inputs) -> Tensor:
    ids = example_inputs.get("input_ids") if isinstance(example_inputs, dict) else example_inputs
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
        raise InputMismatchError("example_inputs must be token ids (B, T) int64 or a dict with "
                                 f"'input_ids'; got {type(ids).__name__} "
                                 f"{tuple(getattr(ids, 'shape', ()))}")
    return ids


def _llama_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    ok = (isinstance(layers, nn.ModuleList) and len(layers) > 0
          and isinstance(getattr(model, "lm_head", None), nn.Linear)
          and all(hasattr(getattr(layer, "self_attn", None), p) for layer in layers
                  for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
          and all(hasattr(getattr(layer, "mlp", None), p) for layer in layers
                  for p in ("gate_proj", "up_proj", "down_proj")))
    if not ok:
        raise InputMismatchError(
            f"{type(model).__name__} is not a Llama-style causal LM: Torch-Pruning's LLM example "
            "needs model.model.layers[i].self_attn.{q,k,v,o}_proj, .mlp.{gate,up,down}_proj and "
            "model.lm_head")
    return layers


def _shape(model: nn.Module, layers: nn.ModuleList) -> _Shape:
    config = model.config
    attention = layers[0].self_attn
    head_dim = int(attention.head_dim)
    shape = _Shape(layers=len(layers), heads=attention.q_proj.out_features // head_dim,
                   kv_heads=attention.k_proj.out_features // head_dim, head_dim=head_dim,
                   intermediate=layers[0].mlp.gate_proj.out_features,
                   hidden=model.lm_head.in_features)
    if (shape.heads != config.num_attention_heads or shape.kv_heads != config.num_key_value_heads
            or shape.heads % shape.kv_heads):
        raise InputMismatchError(
            f"the config says {config.num_attention_heads} heads over "
            f"{config.num_key_value_heads} key/value heads but the first layer has "
            f"{shape.heads} over {shape.kv_heads}")
    return shape


def _block_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def _set_attention(model: nn.Module, implementation: str | None) -> None:
    if implementation is None:
        return
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        setter(implementation)
    else:
        model.config._attn_implementation = implementation


def _calibration_gradients(model: nn.Module, calibration) -> dict[str, Tensor]:
    """Gradients of the mean next-token loss on ``calibration=(input_ids, targets)``, by
    parameter name, for TP's Taylor importance (deep copies drop ``.grad``)."""
    input_ids, targets = calibration
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        logits = model(input_ids=input_ids).logits
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).backward()
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()
                 if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return gradients


def _write_config(model: nn.Module, before: _Shape, prune_hidden: bool) -> None:
    """The example's attribute update: the config (and each attention's
    ``num_key_value_groups``) from the pruned shapes, which must agree across layers."""
    head_dim = before.head_dim
    widths = set()
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        widths.add((attention.q_proj.out_features // head_dim,
                    attention.k_proj.out_features // head_dim, mlp.gate_proj.out_features,
                    attention.q_proj.in_features))
    if len(widths) != 1:
        raise BackendUnavailableError(
            f"Torch-Pruning left layers of different widths {sorted(widths)} (heads, key/value "
            "heads, MLP channels, hidden); one transformers config cannot describe them")
    heads, kv_heads, intermediate, hidden = widths.pop()
    if hidden != model.lm_head.in_features or (not prune_hidden and hidden != before.hidden):
        raise BackendUnavailableError(f"Torch-Pruning left a residual width of {hidden} in the "
                                      f"blocks and {model.lm_head.in_features} at lm_head")
    config = model.config
    config.num_attention_heads = heads
    config.num_key_value_heads = kv_heads
    config.intermediate_size = intermediate
    config.hidden_size = hidden
    config.head_dim = head_dim  # explicit: hidden_size // heads is no longer the head width
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = heads // kv_heads
        layer.mlp.intermediate_size = intermediate
        layer.mlp.hidden_size = hidden


def _installed_version(tp) -> str:
    try:
        from importlib.metadata import version
        return version("torch-pruning")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return str(getattr(tp, "__version__", "unknown"))


# --- the time limit ---------------------------------------------------------------------------

class _TimeLimitReached(BaseException):
    """Raised inside the worker thread to stop TP (BaseException: TP's bare excepts keep out)."""


def _run_bounded(work: Callable[[], PeerResult], time_limit_s: float | None) -> PeerResult:
    """``work()`` in a worker thread; past ``time_limit_s`` it is interrupted (an exception
    raised in the thread at its next Python instruction: TP's loops are pure Python) and a
    BackendUnavailableError says where TP was."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="torch-pruning", daemon=True)
    worker.start()
    worker.join(time_limit_s)
    if worker.is_alive():
        frame = sys._current_frames().get(worker.ident)
        where = traceback.format_stack(frame)[-3:] if frame is not None else []
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident),
                                                   ctypes.py_object(_TimeLimitReached))
        worker.join(30)
        raise BackendUnavailableError(
            f"Torch-Pruning did not finish in {time_limit_s:g} s and was stopped. Where it was:\n"
            + "".join(where).rstrip()
            + "\nA loop in DependencyGraph.get_pruning_group (_fix_dependency_graph_non_recursive)"
            " means its index mapping never repeats (see bingo.llm.torch_pruning_peer's "
            "docstring); otherwise raise time_limit_s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]

