"""One batched evaluation of a model under K subset resets.

Two paths compute the same thing: the (K,) loss and accuracy of the model with, for each subset
k, the units in subset k replaced by their reset values (initial weights, or zero).

* **fast** — the subset index is folded into the batch dimension. Each unit layer is temporarily
  given a forward that calls :func:`bingo_kernels.masked_reset_linear` (or ``_conv2d``): it takes
  the shared ``(B, ...)`` input of the first layer, or the ``(K*B, ...)`` rows produced upstream,
  and returns ``(K*B, ...)`` rows. Every other module simply sees K*B rows, which is correct for
  any module that treats rows independently (activations, pooling, dropout and batch norm in eval
  mode, reshapes that keep the leading dimension).
* **vmap** — the generic fallback: ``torch.func.functional_call`` of the whole model, vmapped
  over a block of blended parameter sets. It materialises a block of blended weights, so it is
  slower and needs more memory, but it makes no assumption about the model's forward.

Attention heads (``granularity="structured"``) take the fast path too: the q/k/v projections of
a Linear-built block get a neuron-mask ``masked_reset_linear`` over the rows of each subset's
heads, its o-projection a column reset ``y_k = (x_k * keep_k) Wo^T + b + (x_k * reset_k) Wo0^T``,
and an nn.MultiheadAttention (batch_first) is given a whole forward that does the same around
:func:`bingo.attention.attention`.

**Fused LM head.** When the model's output is exactly the output of its last nn.Linear and has a
sequence dimension (``(B, T, V)`` logits of a language model), the fast path never builds the
``(K, B*T, V)`` logits: that Linear returns a zero-stride placeholder, and the per-subset loss
and accuracy come from :func:`bingo_kernels.subset_linear_metrics` on the ``(K, B*T, d)`` hidden
states it received (``fused_head`` option; :attr:`BatchedEvaluator.fused` says whether it is on).

With ``path="auto"`` the first evaluation runs both paths on two subsets and keeps the fast path
only if it agrees with the vmap path; a model that mixes rows across the batch, calls a layer's
weight without calling the layer (``nn.MultiheadAttention``'s ``out_proj`` outside structured
granularity), or uses padding the fast path does not know falls back to vmap with a warning that
names the reason. The chosen path
and reason are in :attr:`BatchedEvaluator.path` and :attr:`BatchedEvaluator.path_reason`.

Both paths are chunked over K so that peak memory stays under ``memory_budget`` bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

import torch.nn.functional as F

import bingo_kernels as bk

from .attention import mha_forward
from .errors import BingoError, InputMismatchError, InvalidOptionError, require_option
from .structure import discover
from .structure.trace import canonical_names
from .units import UnitGroup, UnitLayout

PATHS = ("auto", "fast", "vmap")
FUSED_HEAD_CHOICES = ("auto", True, False)


class _FastPathUnsupported(InputMismatchError):
    """The model cannot take the fast path (with ``path="auto"``: the vmap fallback is used;
    a bingo error, so that nothing internal ever reaches the user raw)."""


@dataclass
class Metrics:
    """Loss and accuracy: scalars for the unreset model, ``(K,)`` tensors for subsets."""

    loss: Tensor
    """Mean cross-entropy."""
    accuracy: Tensor
    """Fraction of correct argmax predictions."""

    def get(self, metric: str) -> Tensor:
        """The named metric (``"loss"`` or ``"accuracy"``)."""
        return getattr(self, metric)


@dataclass
class Design:
    """What one evaluation resets: the hashed subsets of one search."""

    seed: int
    """Seed of the ticket search."""
    search: int
    """Index of this search."""
    num_subsets: int
    """K."""
    probs: dict[str, object]
    """Per score key: inclusion probability, scalar or per-unit tensor."""

    def masks(self, layout: UnitLayout, group: UnitGroup, k_start: int, num: int) -> bk.SubsetMasks:
        """The mask description of subsets ``[k_start, k_start+num)`` for one layer."""
        return bk.SubsetMasks(self.seed, self.search, k_start, num, group.offset,
                              self.probs[group.param_name], layout.mask_granularity)

    def unit_masks(self, layout: UnitLayout, group: UnitGroup, k_start: int, num: int) -> Tensor:
        """Bool ``(num, units)`` masks of a neuron or structured group (True = reset)."""
        return self.masks(layout, group, k_start, num).materialize(group.num_units,
                                                                   group.device)


@dataclass
class ExplicitDesign:
    """What one evaluation resets: explicit unit masks, the same for every call (targeted
    elimination: variant j removes candidate j on top of what the model already lacks)."""

    unit_reset: dict[str, Tensor]
    """Score key -> bool ``(K, units)``: True where variant k resets the unit. Groups of the
    layout missing here reset nothing."""

    @property
    def num_subsets(self) -> int:
        """K."""
        return int(next(iter(self.unit_reset.values())).shape[0])

    def unit_masks(self, layout: UnitLayout, group: UnitGroup, k_start: int, num: int) -> Tensor:
        """Bool ``(num, units)`` rows ``[k_start, k_start+num)`` of the group's masks."""
        masks = self.unit_reset.get(group.param_name)
        if masks is None:
            return torch.zeros(num, group.num_units, dtype=torch.bool, device=group.device)
        return masks[k_start:k_start + num].to(group.device)

    def masks(self, layout: UnitLayout, group: UnitGroup, k_start: int, num: int) -> Tensor:
        """As :meth:`unit_masks` (explicit masks are what the kernels take, too)."""
        if layout.granularity == "weight":
            raise InvalidOptionError("explicit designs reset neurons or structured units, not "
                                     "single weights")
        return self.unit_masks(layout, group, k_start, num)


def model_logits(output) -> Tensor:
    """The logits in a model's output: a tensor, or the ``logits`` of a dict/ModelOutput."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise InputMismatchError(
        f"the model returned {type(output).__name__}; ticket search needs a logits tensor")


def flatten_for_metrics(logits: Tensor, targets: Tensor, leading: int) -> tuple[Tensor, Tensor]:
    """``(K*B, *S, C)`` logits and ``(B, *S)`` targets -> ``(K, B*prod(S), C)`` and ``(B*prod(S),)``."""
    if tuple(logits.shape[1:-1]) != tuple(targets.shape[1:]) or \
            logits.shape[0] != leading * targets.shape[0]:
        raise InputMismatchError(
            f"model output of shape {tuple(logits.shape)} does not match targets of shape "
            f"{tuple(targets.shape)}: expected logits (batch, ..., classes) with the targets' "
            "batch and sequence dimensions")
    return logits.reshape(leading, -1, logits.shape[-1]), targets.reshape(-1)


def _logits_stand_in(head: nn.Linear, seen: dict) -> Callable[[Tensor], Tensor]:
    """A forward for the LM head that records its input (``seen["h"]``) and returns a
    zero-stride stand-in with the logits' shape (``seen["out"]``): no (K*B, T, V) memory
    exists; the fused kernel computes the metrics from the input."""
    def capture(x: Tensor) -> Tensor:
        seen["h"] = x
        seen["out"] = x.new_empty(()).expand(*x.shape[:-1], head.out_features)
        return seen["out"]
    return capture


class BatchedEvaluator:
    """Evaluates the unreset model and K reset subsets of it on one batch."""

    def __init__(self, model: nn.Module, layout: UnitLayout, *, backend: str = "auto",
                 path: str = "auto", memory_budget: int = 512 * 2**20,
                 fused_head: object = "auto"):
        require_option("path", path, PATHS)
        require_option("fused_head", fused_head, FUSED_HEAD_CHOICES)
        if memory_budget <= 0:
            raise InvalidOptionError(f"memory_budget must be positive bytes, got {memory_budget}")
        self.model = model
        self.layout = layout
        self.backend = backend
        self.memory_budget = int(memory_budget)
        self.path: Optional[str] = None if path == "auto" else path
        self.path_reason = "requested" if path != "auto" else "not chosen yet"
        self._activation_bytes: dict[tuple, int] = {}
        self.expand_inputs = False
        """Whether the fast path repeats the inputs per subset (chosen with the path)."""
        self._expansion_known = False
        self.fused_head = fused_head
        self._lm_head: Optional[tuple[str, nn.Linear]] = None
        self.fused: Optional[bool] = None
        """Whether the fast path fuses the LM head with the loss (None until the first search)."""
        self._plan: Optional[list[tuple[nn.Module, str, "_ModuleHandler"]]] = None
        self.canonical = {id(t): name for name, t in canonical_names(model)[0].values()}

    # -- public ---------------------------------------------------------------------------------

    @torch.no_grad()
    def baseline(self, inputs: Tensor, targets: Tensor) -> Metrics:
        """Loss and accuracy of the unreset model (a plain forward)."""
        logits = self._plain_forward(inputs)
        flat, flat_targets = flatten_for_metrics(logits, targets, 1)
        loss, acc = bk.subset_metrics(flat, flat_targets, backend=self.backend)
        return Metrics(loss[0], acc[0])

    @torch.no_grad()
    def subsets(self, inputs: Tensor, targets: Tensor, design,
                init: Optional[dict[str, Tensor]]) -> Metrics:
        """``(K,)`` loss and accuracy with subset k's units reset to ``init`` (None: zero).

        ``design``: a :class:`Design` (hashed subsets of a search) or an
        :class:`ExplicitDesign` (explicit unit masks)."""
        if self.path is None:
            self._choose_path(inputs, targets, design, init)
        elif self.path == "fast" and not self._expansion_known:
            self._choose_expansion(inputs, design, init)
        if self.fused is None:
            self._detect_lm_head(inputs)
        chunk = self.chunk_size(inputs, design.num_subsets)
        losses, accs = [], []
        try:
            for k0 in range(0, design.num_subsets, chunk):
                kc = min(chunk, design.num_subsets - k0)
                if self.path == "fast" and self.fused:
                    loss, acc = self._fused_chunk(inputs, targets, design, init, k0, kc)
                else:
                    run = self._fast_chunk if self.path == "fast" else self._vmap_chunk
                    logits = run(inputs, design, init, k0, kc)
                    flat, flat_targets = flatten_for_metrics(logits, targets, kc)
                    loss, acc = bk.subset_metrics(flat, flat_targets, backend=self.backend)
                losses.append(loss)
                accs.append(acc)
        except _FastPathUnsupported as exc:
            # The path was chosen on an earlier batch or block of subsets; this one does not fit.
            raise InputMismatchError(
                f"the fast path cannot evaluate {kc} subsets of this batch: {exc}; pass "
                "path='vmap'") from exc
        return Metrics(torch.cat(losses), torch.cat(accs))

    def chunk_size(self, inputs: Tensor, num_subsets: int) -> int:
        """Subsets per pass so that one pass stays within ``memory_budget``."""
        skip = self._lm_head[1] if self.fused else None
        key = (tuple(inputs.shape), inputs.dtype, skip is not None)
        if key not in self._activation_bytes:
            self._activation_bytes[key] = self._measure_activation_bytes(inputs, skip)
        per_subset = 2 * self._activation_bytes[key]
        blends_weights = self.path == "vmap" or (
            self.layout.granularity == "weight"
            and bk.resolve_backend(self.backend, inputs.device) == "torch")
        if blends_weights:
            # The reference backend and the vmap path hold a blended copy and a mask per subset.
            per_subset += sum(t.numel() * (t.element_size() + 1)
                              for g in self.layout.groups for t in g.tensors().values())
        return max(1, min(num_subsets, self.memory_budget // max(1, per_subset)))

    # -- path choice ----------------------------------------------------------------------------

    def _probe_values(self, init) -> dict[str, Tensor]:
        """Reset values for the path check that differ from the weights: with the real initial
        values a check run early in training (reset values still equal to the weights) could not
        see a layer the fast path fails to reset."""
        generator = torch.Generator().manual_seed(0)
        out = {}
        for g in self.layout.groups:
            for name, t in g.tensors().items():
                noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
                out[name] = (noise.to(t.device, t.dtype) * t.detach().float().std().clamp_min(
                    1e-3).to(t.dtype)) + t.detach()
        return out

    def _choose_path(self, inputs, targets, design, init) -> None:
        design, probe = _probe_design(design)
        probe_init = self._probe_values(init)
        static = self._static_problem(inputs)
        try:
            reference = self._vmap_chunk(inputs, design, probe_init, 0, probe)
        except Exception as exc:  # noqa: BLE001  (any failure means: this path is unusable)
            reference, vmap_error = None, exc
        fast, fast_error = None, static
        # Shared inputs first (the first layer computes once for all subsets); then the inputs
        # repeated per subset, for models whose blocks read the batch size from their input or
        # add a residual of it (a transformer whose first block is searched).
        for expand in ((False, True) if static is None else ()):
            self.expand_inputs = expand
            try:
                fast = self._fast_chunk(inputs, design, probe_init, 0, probe)
            except Exception as exc:  # noqa: BLE001  (a layout or module the fast path fails on)
                fast, fast_error = None, exc
                continue
            if reference is None:
                break
            tol = 1e-4 if fast.dtype in (torch.float32, torch.float64) else 2e-2
            scale = reference.nan_to_num(0.0, 0.0, 0.0).abs().max().clamp_min(1.0)
            if torch.allclose(fast, reference, rtol=tol, atol=tol * float(scale), equal_nan=True):
                how = " (inputs repeated per subset)" if expand else ""
                self.path, self.path_reason = "fast", \
                    f"fast path{how} agrees with the vmap reference"
                self._expansion_known = True
                return
            fast, fast_error = None, "its outputs differ from the vmap reference (the model " \
                "mixes rows across the batch or uses a layer's weight without calling the layer)"
        if reference is None:
            if fast is None:
                raise InputMismatchError(
                    f"ticket search cannot evaluate this model: fast path failed ({fast_error}); "
                    f"vmap fallback failed ({vmap_error})")
            self.path, self.path_reason = "fast", f"vmap unavailable ({vmap_error})"
            self._expansion_known = True
            return
        self.path, self.path_reason = "vmap", f"fast path unusable: {fast_error}"
        warnings.warn(f"bingo: {type(self.model).__name__} uses the vmap fallback for ticket "
                      f"search ({self.path_reason}); it is slower and uses more memory",
                      stacklevel=3)

    def _static_problem(self, inputs) -> Optional[str]:
        """Why the fast path cannot work, from the model's structure trace (a layer whose weight
        another module's forward uses, an unpatchable module holding reset parameters), or
        None. A trace that fails leaves the decision to the comparison with vmap."""
        try:
            self._patch_plan(inputs)
        except _FastPathUnsupported as exc:
            return str(exc)
        except BingoError:
            return None
        return None

    def _choose_expansion(self, inputs, design, init) -> None:
        """With ``path="fast"`` requested: shared inputs, unless the model cannot run on them (a
        transformer block adding a residual of its input), then inputs repeated per subset.
        Without the vmap reference only failures can be seen, not silently different outputs,
        which is why ``path="auto"`` compares the two."""
        design, probe = _probe_design(design)
        errors = []
        for expand in (False, True):
            self.expand_inputs = expand
            try:
                self._fast_chunk(inputs, design, init, 0, probe)
            except _FastPathUnsupported as exc:
                raise InputMismatchError(f"path='fast' cannot evaluate this model: {exc}") \
                    from exc
            except BingoError:
                raise  # bingo's own errors (a backend without this op, bad input) name the cause
            except Exception as exc:  # noqa: BLE001  (a shape failure: try the other layout)
                errors.append(exc)
                continue
            self._expansion_known = True
            return
        raise InputMismatchError(
            f"path='fast' cannot evaluate this model: with inputs shared by the subsets: "
            f"{errors[0]}; with inputs repeated per subset: {errors[1]}")

    # -- helpers --------------------------------------------------------------------------------

    def _plain_forward(self, inputs: Tensor) -> Tensor:
        try:
            return model_logits(self.model(inputs))
        except (RuntimeError, TypeError, ValueError) as exc:
            raise InputMismatchError(
                f"the model's forward failed on inputs of shape {tuple(inputs.shape)} and dtype "
                f"{inputs.dtype} on {inputs.device}: {exc}") from exc

    def _measure_activation_bytes(self, inputs: Tensor, skip: Optional[nn.Module] = None) -> int:
        """Bytes of all leaf-module outputs of one plain forward (``skip``'s output left out: the
        fused LM head never materialises it)."""
        total = [0]

        def hook(_module, _inp, out):
            if isinstance(out, Tensor):
                total[0] += out.numel() * out.element_size()

        leaves = [m for m in self.model.modules() if not list(m.children()) and m is not skip]
        handles = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad():
                self._plain_forward(inputs)
        finally:
            for h in handles:
                h.remove()
        return max(total[0], inputs.numel() * inputs.element_size())

    # -- fused LM head --------------------------------------------------------------------------

    def _detect_lm_head(self, inputs: Tensor) -> None:
        """Turn the fused LM head on when the model's logits are its last Linear's output."""
        self.fused = False
        if self.fused_head is False:
            return
        linears = [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        reason = "the model has no nn.Linear"
        if linears:
            name, head = linears[-1]
            seen: dict[str, Tensor] = {}
            # The forward runs on the stand-in the fused pass gives it: a model that computes on
            # the logits after the head (OPT's .contiguous() copies it) cannot be fused.
            head.forward = _logits_stand_in(head, seen)
            try:
                with torch.no_grad():
                    logits = self._plain_forward(inputs)
            except Exception:  # noqa: BLE001  e.g. an in-place op on the zero-stride stand-in
                logits = None  # a model that fails on its own inputs fails again unfused
            finally:
                del head.forward
            if logits is not seen.get("out"):
                reason = (f"the model's output is not the output of its last nn.Linear {name!r} "
                          "as it is (the model computes on it afterwards)")
            elif logits.dim() < 3 and self.fused_head == "auto":
                reason = "the logits have no sequence dimension (auto fuses LM heads only)"
            else:
                self._lm_head, self.fused = (name, head), True
                return
        if self.fused_head is True:
            raise InputMismatchError(f"fused_head=True, but {reason}")

    def _fused_chunk(self, inputs, targets, design, init, k0, kc) -> tuple[Tensor, Tensor]:
        name, head = self._lm_head
        batch = inputs.shape[0]
        seen: dict[str, Tensor] = {}
        group = next((g for g in self.layout.groups if g.module is head and g.structure is None),
                     None)
        with self._patched(inputs, batch, design, init, k0, kc, skip=head):
            head.forward = _logits_stand_in(head, seen)
            try:
                out = model_logits(self.model(self._subset_inputs(inputs, kc)))
            finally:
                del head.forward
        h = seen.get("h")
        if h is None or out is not seen["out"]:
            raise InputMismatchError(
                f"the fused LM head {name!r} did not produce the model's output on this batch; "
                "pass fused_head=False")
        h, shared = _split_rows(name, h, batch, kc)
        hin = h.reshape(-1, h.shape[-1]) if shared else h.reshape(kc, -1, h.shape[-1])
        if group is not None:
            masks = design.masks(self.layout, group, k0, kc)
            w0, b0 = _reset_pair(init, group.param_name, group.bias_name)
        else:  # the head is not searched: an all-keep hashed mask costs no K x V memory
            masks = bk.SubsetMasks(0, 0, 0, kc, 0, 0.0, "neuron")
            w0 = b0 = None
        return bk.subset_linear_metrics(hin, head.weight, w0, head.bias, b0, masks,
                                        targets.reshape(-1), backend=self.backend)

    # -- fast path ------------------------------------------------------------------------------

    def _subset_inputs(self, inputs: Tensor, kc: int) -> Tensor:
        """The model's input for a fast pass: the shared batch, or one copy per subset."""
        return inputs.repeat(kc, *([1] * (inputs.dim() - 1))) if self.expand_inputs else inputs

    def _fast_chunk(self, inputs, design, init, k0, kc) -> Tensor:
        batch = inputs.shape[0]
        with self._patched(inputs, batch, design, init, k0, kc):
            logits = model_logits(self.model(self._subset_inputs(inputs, kc)))
        if logits.shape[0] != kc * batch:
            raise _FastPathUnsupported(
                f"the output has {logits.shape[0]} rows, expected {kc} subsets x {batch}")
        return logits

    def _patch_plan(self, inputs) -> list[tuple[nn.Module, str, "_ModuleHandler"]]:
        """(module, name, handler) of every module whose forward the fast path replaces: the
        module whose forward uses each reset parameter (a layer's own, or e.g. an
        nn.MultiheadAttention that calls its out_proj's weight functionally)."""
        if self._plan is not None:
            return self._plan
        params = {name for g in self.layout.groups for name in g.tensors()}
        users = _parameter_users(self.model, params, self.layout, inputs)
        plan, seen = [], set()
        for param in sorted(params):
            module_name = users[param]
            if module_name in seen:
                continue
            seen.add(module_name)
            module = self.model.get_submodule(module_name) if module_name else self.model
            handler = _handler_for(module)
            if handler is None:
                held = sorted(p for p in params if users[p] == module_name)
                raise _FastPathUnsupported(
                    f"module {module_name or '<model>'!r} ({type(module).__name__}) uses the reset "
                    f"parameters {held}, and the fast path has no rule for it")
            plan.append((module, module_name, handler))
        self._plan = plan
        return plan

    @contextlib.contextmanager
    def _patched(self, inputs, batch, design, init, k0, kc, skip: Optional[nn.Module] = None):
        block = _ResetBlock(self, design, init, k0, kc)
        patched = []
        try:
            for module, name, handler in self._patch_plan(inputs):
                if module is skip:
                    continue
                module.forward = handler(self, module, name, block, batch, kc)
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward  # the instance attribute shadowed the class's forward

    # -- vmap fallback --------------------------------------------------------------------------

    def _vmap_chunk(self, inputs, design, init, k0, kc) -> Tensor:
        block = _ResetBlock(self, design, init, k0, kc)
        blended: dict[str, Tensor] = {}
        for name, (live, reset) in block.param_resets().items():
            value = _zero_like_scalar(live) if reset is None else reset
            blended[name] = torch.where(block.element_masks[name], value, live)

        def one(params):
            return model_logits(torch.func.functional_call(self.model, params, (inputs,)))

        # functional_call can leave a vmapped tensor behind (model_kept puts the model back).
        with model_kept(self.model), warnings.catch_warnings():
            # Fused kernels without a batching rule (nn.MultiheadAttention's) run per subset:
            # slower, which the path choice already reports, but correct.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            out = torch.func.vmap(one, randomness="different")(blended)
        return out.reshape(kc * inputs.shape[0], *out.shape[2:])


class ModelStructure:
    """Every module's own attributes (mode, parameter, buffer and submodule objects, hooks,
    instance ``forward``), to put back with :meth:`restore`. Not tensor values: whoever uses it
    writes none, or restores them itself."""

    def __init__(self, model: nn.Module):
        # Containers (_parameters, _buffers, _modules, hook dicts, the non-persistent buffer
        # set) are changed in place: their contents are kept too, not only the objects.
        self._kept = [(m, dict(vars(m)), {k: copy.copy(v) for k, v in vars(m).items()
                                          if isinstance(v, (dict, set))})
                      for m in model.modules()]

    def restore(self) -> None:
        """Put every kept module's attributes back as they were (removing any added since)."""
        for m, attributes, contents in self._kept:
            own = vars(m)
            for name in set(own) - set(attributes):
                del own[name]
            own.update(attributes)
            for name, content in contents.items():
                own[name].clear()
                own[name].update(content)


@contextlib.contextmanager
def model_kept(model: nn.Module):
    """On exit, however it is left: ``model``'s structure as on entry (see ModelStructure).

    A search switches the model to eval mode (which must not leave a frozen submodule in train
    mode afterwards) and patches forwards. ``torch.func.functional_call`` (the vmap path) swaps
    tensors in and out, and for a module registered under two names (``nn.Sequential(a, b, a)``,
    ``self.decoder = self.encoder``) it swaps that module's slot twice and "restores" the second
    swap's original, the vmapped tensor, which then breaks forward, state_dict and torch.save.
    """
    structure = ModelStructure(model)
    try:
        yield
    finally:
        structure.restore()


def _probe_design(design) -> tuple[object, int]:
    """A design of at least two differing subsets, and how many of them to probe: one subset
    alone cannot show a model that mixes rows across subsets (it would take the fast path and be
    wrong from the second subset on) or a block that cannot add a shared batch to the subsets'
    rows. A single explicit subset is probed beside its complement; a hashed design is a pure
    function of the subset index, so it simply describes one more."""
    if design.num_subsets >= 2:
        return design, 2
    if isinstance(design, ExplicitDesign):
        return ExplicitDesign({k: torch.cat([m[:1], ~m[:1]]) for k, m in
                               design.unit_reset.items()}), 2
    return dataclasses.replace(design, num_subsets=2), 2


def _zero_like_scalar(t: Tensor) -> Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


def _reset_pair(init, weight: str, bias: Optional[str]) -> tuple[Optional[Tensor],
                                                                 Optional[Tensor]]:
    if init is None:
        return None, None
    return init[weight], (init[bias] if bias is not None else None)


def _split_rows(name: str, x: Tensor, batch: int, kc: int) -> tuple[Tensor, bool]:
    """Whether ``x`` is the shared batch or K*B rows; reject anything else."""
    lead = x.shape[0]
    if lead == kc * batch:
        return x, False
    if lead == batch:
        return x, True
    raise _FastPathUnsupported(
        f"module {name!r} received {lead} rows; expected {batch} (shared) or {kc}x{batch} (one "
        "block per subset)")


def _parameter_users(model: nn.Module, params: set[str], layout: UnitLayout, inputs
                     ) -> dict[str, str]:
    """Reset parameter -> the module whose forward uses it: the module that made the
    contraction (a layer's own forward, or e.g. nn.MultiheadAttention using its out_proj's
    weight functionally), else the module owning it (batch norm's scale). A parameter that two
    modules use (tied weights) cannot be reset by patching one of them."""
    users: dict[str, set[str]] = {}
    try:
        structure = discover(model, inputs)
        contractions = structure.contractions
    except BingoError:
        contractions = []  # the vmap comparison still guards the fast path
    for use in contractions:
        for name in (use.name, use.bias):
            if name in params:
                users.setdefault(name, set()).add(use.module)
    out = {}
    for name in params:
        found = users.get(name) or {name.rpartition(".")[0]}
        if len(found) > 1:
            raise _FastPathUnsupported(
                f"parameter {name!r} is used by several modules ({', '.join(sorted(found))}); "
                "resetting it means patching all of them")
        out[name] = next(iter(found))
    return out


class _ResetBlock:
    """What one block of subsets ``[k0, k0+kc)`` resets, parameter by parameter."""

    def __init__(self, evaluator: "BatchedEvaluator", design, init, k0: int, kc: int):
        self.layout, self.design, self.init, self.k0, self.kc = \
            evaluator.layout, design, init, k0, kc
        self.layer_groups = {g.param_name: g for g in self.layout.groups if g.structure is None}
        self._axis: Optional[dict[tuple[str, int], Tensor]] = None
        self._elements: Optional[dict[str, Tensor]] = None

    def layer_masks(self, weight: str):
        """The kernel masks of a per-layer group whose weight is ``weight`` (hashed, or
        explicit (kc, out)), or None when no per-layer group holds it."""
        group = self.layer_groups.get(weight)
        if group is None:
            return None
        return self.design.masks(self.layout, group, self.k0, self.kc)

    def reset_value(self, name: Optional[str]) -> Optional[Tensor]:
        if name is None or self.init is None:
            return None
        return self.init.get(name)

    def axis_reset(self, name: Optional[str], axis: int) -> Optional[Tensor]:
        """Bool (kc, size) of the indices along ``axis`` of parameter ``name`` that each subset
        resets (None: none)."""
        if name is None:
            return None
        if self._axis is None:
            self._axis = {}
            for g in self.layout.groups:
                if not g.slices:
                    continue  # weight granularity: the layer's kernel masks say it all
                units = self.design.unit_masks(self.layout, g, self.k0, self.kc)
                tensors = g.tensors()
                for s in g.slices:
                    if s.param not in tensors:
                        continue
                    live = tensors[s.param]
                    along = self._axis.get((s.param, s.axis))
                    if along is None:
                        along = torch.zeros(self.kc, live.shape[s.axis], dtype=torch.bool,
                                            device=live.device)
                        self._axis[(s.param, s.axis)] = along
                    along[:, s.positions.to(live.device)] |= units[:, s.unit_of.to(
                        units.device)].to(live.device)
        return self._axis.get((name, axis))

    @property
    def element_masks(self) -> dict[str, Tensor]:
        """Parameter -> bool (kc, *shape): the elements each subset resets (vmap path)."""
        if self._elements is None:
            out: dict[str, Tensor] = {}
            for g in self.layout.groups:
                if self.layout.granularity == "weight":
                    live = g.module.weight
                    masks = self.design.masks(self.layout, g, self.k0, self.kc).materialize(
                        g.num_units, live.device)
                    parts = {g.param_name: masks.view(self.kc, *live.shape)}
                else:
                    units = self.design.unit_masks(self.layout, g, self.k0, self.kc)
                    parts = g.param_unit_masks(units)
                for name, m in parts.items():
                    out[name] = m if name not in out else out[name] | m
            self._elements = out
        return self._elements

    def param_resets(self) -> dict[str, tuple[Tensor, Optional[Tensor]]]:
        """Parameter -> (live tensor, reset value or None for zero) of every reset parameter."""
        lives = {name: t for g in self.layout.groups for name, t in g.tensors().items()}
        return {name: (lives[name], self.reset_value(name)) for name in self.element_masks}


# -- module handlers ----------------------------------------------------------------------------

def _linear_variants(ev: "BatchedEvaluator", name: str, x: Tensor, weight: Tensor,
                     w0: Optional[Tensor], bias: Optional[Tensor], b0: Optional[Tensor],
                     rows: Optional[Tensor], cols: Optional[Tensor],
                     bias_rows: Optional[Tensor], batch: int, kc: int,
                     layer_masks=None) -> Tensor:
    """``(K*B, ..., out)``: a Linear evaluated for K subsets, each resetting (to ``w0``/``b0``,
    None: zero) the output rows ``rows``, the input columns ``cols`` (K, in) and the bias
    entries ``bias_rows``. An entry is reset when its row or its column is.

    ``x W_k^T = (x * keep) where(rows, W0, W)^T + (x * cols) W0^T``: rows take the masked-reset
    kernel, columns a split of the input, so no per-subset weight is ever built.
    """
    x, shared = _split_rows(name, x, batch, kc)
    rest = x.shape[1:-1]
    width = x.shape[-1]
    if layer_masks is not None:  # one layer's neurons or weights: the kernel does everything
        xin = x.reshape(-1, width) if shared else x.reshape(kc, -1, width)
        y = bk.masked_reset_linear(xin, weight, w0, bias, b0, layer_masks, backend=ev.backend)
        return y.reshape(kc * batch, *rest, y.shape[-1])
    xk = x.reshape(1 if shared else kc, -1, width)
    x_keep = xk if cols is None else xk * (~cols).to(x.dtype)[:, None, :]
    if rows is not None:
        y = bk.masked_reset_linear(x_keep if x_keep.shape[0] == kc else x_keep[0], weight, w0,
                                   None, None, rows, backend=ev.backend)
    else:
        y = F.linear(x_keep, weight)
    if cols is not None and w0 is not None:
        y = y + F.linear(xk * cols.to(x.dtype)[:, None, :], w0)
    if bias is not None:
        if bias_rows is None:
            y = y + bias
        else:
            reset = b0 if b0 is not None else _zero_like_scalar(bias)
            y = y + torch.where(bias_rows, reset, bias)[:, None, :]
    y = y.expand(kc, *y.shape[1:])
    return y.reshape(kc * batch, *rest, y.shape[-1])


def _names(ev: "BatchedEvaluator", module: nn.Module, *attrs: str) -> list[Optional[str]]:
    out = []
    for attr in attrs:
        t = getattr(module, attr, None)
        out.append(ev.canonical.get(id(t)) if isinstance(t, Tensor) else None)
    return out


def _linear_handler(ev, module, name, block, batch, kc):
    wname, bname = _names(ev, module, "weight", "bias")
    w0, b0 = block.reset_value(wname), block.reset_value(bname)
    masks = block.layer_masks(wname)
    rows, cols, bias_rows = (block.axis_reset(wname, 0), block.axis_reset(wname, 1),
                             block.axis_reset(bname, 0))

    def forward(x: Tensor) -> Tensor:
        return _linear_variants(ev, name, x, module.weight, w0, module.bias, b0, rows, cols,
                                bias_rows, batch, kc, masks)
    return forward


def _conv1d_handler(ev, module, name, block, batch, kc):
    """transformers' Conv1D: ``x @ W + b`` with W stored (in, out): a Linear of W^T."""
    wname, bname = _names(ev, module, "weight", "bias")
    w0, b0 = block.reset_value(wname), block.reset_value(bname)
    masks = block.layer_masks(wname)
    if masks is not None and block.layout.granularity == "weight":
        raise _FastPathUnsupported(f"Conv1D layer {name!r}: weight masks are hashed over the "
                                   "(in, out) layout, which the Linear kernel does not read")
    rows, cols, bias_rows = (block.axis_reset(wname, 1), block.axis_reset(wname, 0),
                             block.axis_reset(bname, 0))

    def forward(x: Tensor) -> Tensor:
        return _linear_variants(ev, name, x, module.weight.t(), None if w0 is None else w0.t(),
                                module.bias, b0, rows, cols, bias_rows, batch, kc, masks)
    return forward


def _conv2d_handler(ev, module, name, block, batch, kc):
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise _FastPathUnsupported(
            f"conv layer {name!r} uses padding {module.padding!r} / {module.padding_mode!r}; "
            "the fast path supports numeric zero padding")
    wname, bname = _names(ev, module, "weight", "bias")
    w0, b0 = block.reset_value(wname), block.reset_value(bname)
    masks = block.layer_masks(wname)
    rows, cols, bias_rows = (block.axis_reset(wname, 0), block.axis_reset(wname, 1),
                             block.axis_reset(bname, 0))
    conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                groups=module.groups)

    def forward(x: Tensor) -> Tensor:
        x, shared = _split_rows(name, x, batch, kc)
        if x.dim() != 4:
            raise _FastPathUnsupported(f"conv layer {name!r} got {x.dim()}-d input")
        xk = x.unsqueeze(0) if shared else x.reshape(kc, batch, *x.shape[1:])
        if masks is not None:
            y = bk.masked_reset_conv2d(xk[0] if shared else xk, module.weight, w0, module.bias,
                                       b0, masks, backend=ev.backend, **conv)
            return y.reshape(kc * batch, *y.shape[2:])
        x_keep = xk if cols is None else xk * (~cols).to(x.dtype)[:, None, :, None, None]
        reset_rows = rows if rows is not None else torch.zeros(
            kc, module.weight.shape[0], dtype=torch.bool, device=x.device)
        inp = x_keep[0] if x_keep.shape[0] == 1 and kc > 1 else x_keep
        if inp.dim() == 5 and inp.shape[0] != kc:
            inp = inp.expand(kc, *inp.shape[1:])
        y = bk.masked_reset_conv2d(inp, module.weight, w0, None, None, reset_rows,
                                   backend=ev.backend, **conv)
        if cols is not None and w0 is not None:
            part = F.conv2d((xk * cols.to(x.dtype)[:, None, :, None, None]).flatten(0, 1), w0,
                            None, **conv)
            y = y + part.reshape(kc, -1, *part.shape[1:])
        if module.bias is not None:
            bias = module.bias if bias_rows is None else torch.where(
                bias_rows, b0 if b0 is not None else _zero_like_scalar(module.bias), module.bias)
            y = y + (bias.view(1, 1, -1, 1, 1) if bias.dim() == 1 else
                     bias.view(kc, 1, -1, 1, 1))
        return y.reshape(kc * batch, *y.shape[2:])
    return forward


def _batch_norm_handler(ev, module, name, block, batch, kc):
    if module.training or not module.track_running_stats:
        raise _FastPathUnsupported(f"batch norm {name!r} normalises with batch statistics")
    wname, bname = _names(ev, module, "weight", "bias")
    w0, b0 = block.reset_value(wname), block.reset_value(bname)
    rows, bias_rows = block.axis_reset(wname, 0), block.axis_reset(bname, 0)

    def forward(x: Tensor) -> Tensor:
        x, shared = _split_rows(name, x, batch, kc)
        xhat = F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0,
                            module.eps)
        channels = x.shape[1]
        view = (-1 if not shared else 1, channels) + (1,) * (x.dim() - 2)
        weight, bias = module.weight, module.bias
        if weight is not None and rows is not None:
            weight = torch.where(rows, w0 if w0 is not None else _zero_like_scalar(weight),
                                 weight)
        if bias is not None and bias_rows is not None:
            bias = torch.where(bias_rows, b0 if b0 is not None else _zero_like_scalar(bias),
                               bias)
        xk = xhat.unsqueeze(0) if shared else xhat.reshape(kc, batch, *x.shape[1:])
        if weight is not None:
            xk = xk * weight.reshape(*((kc,) if weight.dim() == 2 else (1,)), 1, channels,
                                     *(1,) * (x.dim() - 2))
        if bias is not None:
            xk = xk + bias.reshape(*((kc,) if bias.dim() == 2 else (1,)), 1, channels,
                                   *(1,) * (x.dim() - 2))
        del view
        return xk.expand(kc, *xk.shape[1:]).reshape(kc * batch, *x.shape[1:])
    return forward


def _mha_handler(ev, module, name, block, batch, kc):
    """nn.MultiheadAttention: the whole forward, with the projections evaluated per subset."""
    if not module.batch_first:
        raise _FastPathUnsupported(
            f"attention {name!r} is not batch_first, so the batch is not dim 0")
    if not module._qkv_same_embed_dim:
        raise _FastPathUnsupported(f"attention {name!r} has separate q/k/v weights")
    if module.training and module.dropout > 0:
        raise _FastPathUnsupported(f"attention {name!r} has dropout in training mode")
    wname, bname = _names(ev, module, "in_proj_weight", "in_proj_bias")
    oname, obname = _names(ev, module.out_proj, "weight", "bias")
    if block.layout.granularity == "weight" and block.layer_masks(oname) is not None:
        raise _FastPathUnsupported(
            f"attention {name!r} uses its out_proj weight functionally; single weights of it "
            "are reset on the vmap path")
    w0, b0 = block.reset_value(wname), block.reset_value(bname)
    o0, ob0 = block.reset_value(oname), block.reset_value(obname)
    rows, cols, bias_rows = (block.axis_reset(wname, 0), block.axis_reset(wname, 1),
                             block.axis_reset(bname, 0))
    o_rows, o_cols, o_bias = (block.axis_reset(oname, 0), block.axis_reset(oname, 1),
                              block.axis_reset(obname, 0))
    inner = module.out_proj.in_features

    def part(t: Optional[Tensor], i: int, axis_dim: int = 0) -> Optional[Tensor]:
        return None if t is None else t.narrow(axis_dim, i * inner, inner)

    def project_in(query, key, value):
        w, b = module.in_proj_weight, module.in_proj_bias
        return tuple(_linear_variants(ev, name, x, part(w, i), part(w0, i), part(b, i),
                                      part(b0, i), part(rows, i, 1), cols,
                                      part(bias_rows, i, 1), batch, kc)
                     for i, x in enumerate((query, key, value)))

    def project_out(x):
        return _linear_variants(ev, name, x, module.out_proj.weight, o0, module.out_proj.bias,
                                ob0, o_rows, o_cols, o_bias, batch, kc)

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None and key_padding_mask.shape[0] == batch:
            key_padding_mask = key_padding_mask.repeat(kc, 1)
        if attn_mask is not None and attn_mask.dim() == 3 and \
                attn_mask.shape[0] == batch * module.num_heads:
            attn_mask = attn_mask.repeat(kc, 1, 1)
        if query.shape[0] == batch and kc > 1:
            # Attention mixes positions, not rows, so the shared batch can be expanded here.
            query, key, value = (t.repeat(kc, *([1] * (t.dim() - 1)))
                                 for t in (query, key, value))
        return mha_forward(module, query, key, value, project_in, project_out,
                           key_padding_mask=key_padding_mask, need_weights=need_weights,
                           attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                           is_causal=is_causal)
    return forward


_ModuleHandler = Callable[..., Callable]

MODULE_HANDLERS: dict[str, _ModuleHandler] = {
    "Linear": _linear_handler,
    "NonDynamicallyQuantizableLinear": _linear_handler,
    "Conv1D": _conv1d_handler,
    "Conv2d": _conv2d_handler,
    "BatchNorm1d": _batch_norm_handler,
    "BatchNorm2d": _batch_norm_handler,
    "MultiheadAttention": _mha_handler,
}
"""Module class name -> factory of its fast-path forward for one block of subsets:
``(evaluator, module, name, reset block, batch, kc) -> forward``. A subclass of a listed class
counts as that class only when it keeps the class's forward."""


def _handler_for(module: nn.Module) -> Optional[_ModuleHandler]:
    for cls in type(module).__mro__:
        if cls.__name__ in MODULE_HANDLERS:
            # A subclass that overrides forward may compute something else: it counts as its
            # base only where that is checked (Falcon's FalconLinear is x @ W.T + b).
            if type(module).forward is not cls.forward and not _linear_as_its_base(module):
                return None
            return MODULE_HANDLERS[cls.__name__]
    return None


@torch.no_grad()
def _linear_as_its_base(module: nn.Module) -> bool:
    """Whether an nn.Linear subclass's own forward equals nn.Linear's on a random input (3-d,
    as a transformer's activations are), at the module's dtype and device."""
    if not isinstance(module, nn.Linear):
        return False
    weight = module.weight
    generator = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(2, 3, module.in_features, generator=generator, device=weight.device,
                    dtype=torch.float32).to(weight.dtype)
    try:
        got = type(module).forward(module, x)  # not module(x): no hooks of the user's run
    except Exception:  # noqa: BLE001  a forward that needs more than one tensor input
        return False
    want = F.linear(x, weight, module.bias)
    tolerance = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return (isinstance(got, Tensor) and got.shape == want.shape and
            torch.allclose(got, want, rtol=tolerance, atol=tolerance * float(
                want.abs().max().clamp_min(1.0))))

