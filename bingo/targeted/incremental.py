"""Downstream-only evaluation of "remove unit j" variants of a plain nn.Sequential.

Greedy elimination (:mod:`bingo.targeted.elimination`) asks, at every step, what the loss would be
if each remaining neuron / channel were removed on top of the ones already gone. A full forward
per candidate repeats work the candidates share: removing unit j of layer l changes nothing
upstream of l. :class:`SequentialEvaluator` therefore caches every child's output on the evidence
batch (one forward of the current, partially pruned model) and evaluates a batch of J candidates
of one layer through the downstream children only, J folded into the batch dimension.

Two evaluators (:data:`EVALUATORS`), equal up to float rounding (tests/test_targeted.py checks both
against full forwards):

* ``"rank"`` (default): removing unit j makes its slice of the *next* prunable layer's input take
  the value a zero pre-activation produces (``act(0)``, through pooling: the "zero image") instead
  of its cached value. The next layer is linear in its input, so its pre-activation changes by
  ``next(zero_image - cached)`` restricted to slice j: a rank-one update ``-a_j W_{l+1}[:, j]`` for
  an MLP neuron, a block of ``H*W`` columns after a Flatten, a one-input-channel convolution for a
  conv-to-conv pair (all J at once as a grouped convolution). Cost per candidate: that update
  plus the children after the next layer, instead of the whole network.
* ``"masked"``: the layer itself is re-evaluated for J variants with
  :func:`bingo_kernels.masked_reset_linear` / ``masked_reset_conv2d`` and an explicit (J, units)
  one-hot neuron mask (reset to zero), then everything downstream. Costs the layer plus all later
  children per candidate; works wherever the children between two prunable layers are not
  channel-wise (the rank path's requirement), and runs through the Triton kernels on CUDA.

Per-variant loss and accuracy come from :func:`bingo_kernels.subset_metrics` (Triton on CUDA).
Removing a unit means what :func:`bingo.prune` does at neuron granularity: its weight row (or
filter) and bias entry become zero, so its pre-activation is exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bingo_kernels
from bingo.errors import InputMismatchError, require_option
from bingo.units import find_units

# Modules that act on each channel (or feature) separately, so that a removed unit only changes
# its own slice downstream until the next Linear / Conv2d. BatchNorm counts in eval mode (its
# per-channel affine map of the cached statistics).
CHANNELWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus,
    nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d,
)
PRUNABLE = (nn.Linear, nn.Conv2d)


def _is_plain_flatten(module: nn.Module) -> bool:
    return type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1)


@dataclass
class ScoredLayer:
    """One layer whose output units (neurons / channels) are candidates for removal."""

    key: str
    """Score key: the weight's parameter name (``"1.weight"``)."""
    index: int
    """Position of the layer among the Sequential's children."""
    next_index: Optional[int]
    """Position of the next Linear / Conv2d child (None if the layer is the last one)."""
    rank_ok: bool
    """Whether the children between the layer and the next one are channel-wise (rank path)."""

    def module(self, model: nn.Sequential) -> nn.Module:
        return model[self.index]


def scored_layers(model: nn.Module, include=None, exclude=None) -> list[ScoredLayer]:
    """The neuron-granularity layers of ``model`` (as :func:`bingo.units.find_units` chooses
    them), located among the children of the nn.Sequential; raises for other models."""
    children = list(model.children())
    layout = find_units(model, "neuron", include, exclude)
    out = []
    for g, i in zip(layout.groups, child_positions(model, layout)):
        if isinstance(children[i], nn.Conv2d) and children[i].groups != 1:
            raise InputMismatchError(f"layer {g.name!r}: grouped convolutions are not supported")
        nxt = next((j for j in range(i + 1, len(children))
                    if isinstance(children[j], PRUNABLE)), None)
        between = children[i + 1:nxt if nxt is not None else len(children)]
        rank_ok = nxt is not None and all(
            isinstance(m, CHANNELWISE) or _is_plain_flatten(m) for m in between) and not (
            isinstance(children[nxt], nn.Conv2d) and children[nxt].groups != 1)
        out.append(ScoredLayer(g.param_name, i, nxt, rank_ok))
    return out


def require_sequential(model: nn.Module, search: str) -> None:
    """Raise, naming the model type and the search that works on any model, unless ``model``
    is an nn.Sequential (whose layer order is the data flow these evaluators rely on)."""
    if not isinstance(model, nn.Sequential):
        raise InputMismatchError(
            f"the {search} needs an nn.Sequential (its layer order is the data flow), got "
            f"{type(model).__name__}; use granularity='structured' (greedy elimination over "
            "the model's unit groups: heads, MLP neurons, channels)")


def child_positions(model: nn.Module, layout, search: str = "targeted search") -> list[int]:
    """Position among ``model``'s children of each group of a :class:`bingo.units.UnitLayout`;
    raises unless ``model`` is an nn.Sequential holding those layers as direct children."""
    require_sequential(model, search)
    position = {name: i for i, (name, _) in enumerate(model.named_children())}
    missing = [g.name for g in layout.groups if g.name not in position]
    if missing:
        raise InputMismatchError(f"layer(s) {missing} are not direct children of the "
                                 "nn.Sequential")
    return [position[g.name] for g in layout.groups]


def _run(children: list[nn.Module], x: Tensor) -> Tensor:
    for module in children:
        x = module(x)
    return x


class SequentialEvaluator:
    """Cached activations of one nn.Sequential on one evidence batch, and batched evaluation of
    unit-removal variants (see the module docstring).

    Args:
        model: the (partially pruned) nn.Sequential, in eval mode; it is read, never modified.
        inputs, targets: the evidence batch.
        memory_budget: most elements of one candidate chunk's largest intermediate tensor.
        backend: bingo_kernels backend for the ops (``"auto"``: Triton on CUDA, else torch).
    """

    def __init__(self, model: nn.Sequential, inputs: Tensor, targets: Tensor, *,
                 memory_budget: int = 2 ** 26, backend: str = "auto"):
        if memory_budget < 1:
            raise InputMismatchError(f"memory_budget must be positive, got {memory_budget}")
        self.model, self.inputs, self.targets = model, inputs, targets
        self.children = list(model.children())
        self.memory_budget, self.backend = int(memory_budget), backend
        self.outputs: list[Tensor] = []
        self.refresh()

    @torch.no_grad()
    def refresh(self, start: int = 0) -> tuple[float, float]:
        """Re-run the model on the evidence after its weights changed; returns (loss, accuracy).
        ``start``: the first child whose weights changed. The cached outputs of the children
        before it are still exact, so only the children from it on run again (removing a unit
        of a late layer then costs a fraction of a forward)."""
        start = min(max(start, 0), len(self.outputs))
        x, self.outputs = self.input_of(start), self.outputs[:start]
        for module in self.children[start:]:
            x = module(x)
            self.outputs.append(x)
        loss, acc = self.metrics(x.unsqueeze(0))
        self.loss, self.accuracy = float(loss[0]), float(acc[0])
        return self.loss, self.accuracy

    def input_of(self, index: int) -> Tensor:
        """Cached input of child ``index``."""
        return self.inputs if index == 0 else self.outputs[index - 1]

    def unit_macs(self, layer: ScoredLayer) -> float:
        """Multiply-adds per example that removing one unit of ``layer`` saves: its own weight
        row (filter) at every output position, and its share of the next layer's weight at every
        position of that layer's output."""
        module = self.children[layer.index]
        out = self.outputs[layer.index]
        units = out.shape[1]
        macs = module.weight[0].numel() * out[0, 0].numel()
        if layer.next_index is not None:
            nxt = self.children[layer.next_index]
            macs += nxt.weight.numel() // units * self.outputs[layer.next_index][0, 0].numel()
        return float(macs)

    def metrics(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, accuracy), each (K,), of (K, N, classes) logits."""
        return bingo_kernels.subset_metrics(logits.float().contiguous(), self.targets,
                                            backend=self.backend)

    def _downstream(self, start: int, z: Tensor) -> tuple[Tensor, Tensor]:
        """Metrics of (J, N, ...) variants of child ``start - 1``'s output, run from ``start``."""
        j, n = z.shape[:2]
        logits = _run(self.children[start:], z.reshape(j * n, *z.shape[2:]))
        return self.metrics(logits.reshape(j, n, -1))

    def _chunks(self, candidates: Tensor, width: int) -> list[Tensor]:
        per = max(1, self.memory_budget // max(1, self.inputs.shape[0] * width))
        return list(torch.split(candidates, per))

    @torch.no_grad()
    def evaluate(self, layer: ScoredLayer, candidates: Tensor, evaluator: str = "rank"
                 ) -> tuple[Tensor, Tensor]:
        """(loss, accuracy) of the model with each single unit of ``candidates`` removed from
        ``layer`` on top of the current model, each (J,)."""
        require_option("evaluator", evaluator, EVALUATORS)
        if evaluator == "rank" and not layer.rank_ok:
            evaluator = "masked"  # the rank update needs channel-wise children in between
        if candidates.numel() == 0:
            empty = torch.empty(0)
            return empty, empty
        return EVALUATORS[evaluator](self, layer, candidates.to(torch.long))

    # -- the two evaluators ---------------------------------------------------------------------

    def _zero_image(self, layer: ScoredLayer) -> Tensor:
        """What a unit with pre-activation 0 feeds the next layer (one sample, next input shape)."""
        zero = torch.zeros_like(self.outputs[layer.index][:1])
        return _run(self.children[layer.index + 1:layer.next_index], zero)

    def _rank(self, layer: ScoredLayer, candidates: Tensor) -> tuple[Tensor, Tensor]:
        units = self.outputs[layer.index].shape[1]
        x_next = self.input_of(layer.next_index)
        delta = (self._zero_image(layer) - x_next)          # (N, ...) next-layer input change
        n = delta.shape[0]
        nxt = self.children[layer.next_index]
        z_next = self.outputs[layer.next_index]
        losses, accs = [], []
        for chunk in self._chunks(candidates, z_next[0].numel()):
            if isinstance(nxt, nn.Linear):
                # After a Flatten unit j owns a contiguous block of S features: variant j is
                # z_next + delta[:, block j] @ W[:, block j].T, all J as one batched GEMM
                # (an outer product for an MLP neuron, S = 1) written straight into a
                # contiguous (J, N, O) tensor.
                d = delta.reshape(n, units, -1)[:, chunk].transpose(0, 1)            # (J, N, S)
                w = nxt.weight.reshape(nxt.out_features, units, -1)[:, chunk].permute(1, 2, 0)
                variants = torch.baddbmm(z_next.unsqueeze(0), d, w)                  # (J, N, O)
            else:  # Conv2d: one single-input-channel convolution per candidate, grouped
                d = delta[:, chunk]                                      # (N, J, H, W)
                w = nxt.weight[:, chunk].transpose(0, 1)                 # (J, O, kh, kw)
                w = w.reshape(-1, 1, *nxt.weight.shape[2:])
                out = F.conv2d(d, w, None, nxt.stride, nxt.padding, nxt.dilation,
                               groups=chunk.numel())
                change = out.reshape(n, chunk.numel(), nxt.out_channels,
                                     *out.shape[2:]).transpose(0, 1)
                variants = z_next.unsqueeze(0) + change
            loss, acc = self._downstream(layer.next_index + 1, variants)
            losses.append(loss)
            accs.append(acc)
        return torch.cat(losses), torch.cat(accs)

    def _masked(self, layer: ScoredLayer, candidates: Tensor) -> tuple[Tensor, Tensor]:
        module = self.children[layer.index]
        x = self.input_of(layer.index)
        units = self.outputs[layer.index].shape[1]
        width = max(o[0].numel() for o in self.outputs[layer.index:])
        losses, accs = [], []
        for chunk in self._chunks(candidates, width):
            masks = torch.zeros(chunk.numel(), units, dtype=torch.bool, device=x.device)
            masks[torch.arange(chunk.numel()), chunk.to(x.device)] = True
            z = LAYER_OPS[type(module)](x, module, masks, self.backend)
            loss, acc = self._downstream(layer.index + 1, z)
            losses.append(loss)
            accs.append(acc)
        return torch.cat(losses), torch.cat(accs)


def _masked_linear(x: Tensor, module: nn.Linear, masks: Tensor, backend: str) -> Tensor:
    return bingo_kernels.masked_reset_linear(x, module.weight, None, module.bias, None, masks,
                                             backend=backend)


def _masked_conv(x: Tensor, module: nn.Conv2d, masks: Tensor, backend: str) -> Tensor:
    return bingo_kernels.masked_reset_conv2d(
        x, module.weight, None, module.bias, None, masks, stride=module.stride,
        padding=module.padding, dilation=module.dilation, groups=module.groups, backend=backend)


LAYER_OPS: dict[type, Callable[..., Tensor]] = {nn.Linear: _masked_linear,
                                                 nn.Conv2d: _masked_conv}
"""Layer type -> its bingo_kernels op with explicit (J, units) zero-reset neuron masks."""

EVALUATORS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "rank": SequentialEvaluator._rank,
    "masked": SequentialEvaluator._masked,
}
"""Evaluator name -> method computing (loss, accuracy) of J single-unit removals."""
