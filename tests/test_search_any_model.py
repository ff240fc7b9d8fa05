"""Ticket search on the model zoo: the batched evaluation of K reset subsets equals an oracle
that writes each subset's reset into a copy of the model and runs it alone.

Float64 models, reset values far from the weights (the "trained" weights are moved away from
the snapshot), fresh random subsets per run. Structured granularity (heads / key-value groups,
MLP neurons with their consumers' columns, conv channels with BatchNorm and residual partners)
and per-layer neurons (GPT-2's Conv1D included). Then the path check: a layer whose weight
another module uses (nn.MultiheadAttention's out_proj) must never be silently left unreset.
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from bingo.executor import BatchedEvaluator, Design, ExplicitDesign
from bingo.units import find_units

K = 5
RTOL, ATOL = 2e-6, 2e-6
"""The evaluator's losses are float32: a few float32 roundings of a loss of about 2-5."""


def _tensor_input(inputs):
    return next(iter(inputs.values())) if isinstance(inputs, dict) else inputs


def _trained(name, seed):
    """A float64 zoo model whose weights differ from its snapshot (the reset values)."""
    model, inputs, targets = zoo.build(name, seed)
    model = model.double()
    x = _tensor_input(inputs)
    if x.is_floating_point():
        x = x.double()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.detach().std().nan_to_num(1.0).clamp_min(1e-3) *
                   torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model, x, targets, init


def _metrics(logits, targets):
    flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return F.cross_entropy(flat, t), (flat.argmax(-1) == t).double().mean()


def _oracle(model, layout, design, init, x, targets):
    """Each subset's reset written into a copy of the model, run alone."""
    losses, accs = [], []
    for k in range(design.num_subsets):
        blended = copy.deepcopy(model)
        params = dict(blended.named_parameters())
        with torch.no_grad():
            for g in layout.groups:
                chosen = design.unit_masks(layout, g, k, 1)[0].cpu()
                for s in g.slices:
                    if s.param not in params:
                        continue  # buffers are not reset
                    index = [slice(None)] * params[s.param].dim()
                    index[s.axis] = s.positions[chosen[s.unit_of]]
                    index = tuple(index)
                    params[s.param][index] = 0.0 if init is None else init[s.param][index]
            logits = _logits(blended, x)
        loss, acc = _metrics(logits, targets)
        losses.append(loss)
        accs.append(acc)
    return torch.stack(losses), torch.stack(accs)


def _logits(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _compare(evaluator, layout, design, init, model, x, targets, seed):
    got = evaluator.subsets(x, targets, design, init)
    want_loss, want_acc = _oracle(model, layout, design, init, x, targets)
    torch.testing.assert_close(got.loss.double(), want_loss, rtol=RTOL, atol=ATOL,
                               msg=f"seed {seed}, path {evaluator.path}")
    assert (got.accuracy.double() - want_acc).abs().max() <= 1.5 / targets.numel(), seed
    return want_loss


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
@pytest.mark.parametrize("reset", ["init", "zero"])
def test_structured_search_equals_oracle(name, reset):
    seed = random.SystemRandom().randrange(2**31)
    model, x, targets, init = _trained(name, seed % 7)
    layout = find_units(model, "structured", example_inputs=x[:1])
    design = Design(seed % 2**32, 0, K, {g.param_name: 0.35 for g in layout.groups})
    evaluator = BatchedEvaluator(model, layout, backend="torch")
    loss = _compare(evaluator, layout, design, None if reset == "zero" else init, model, x,
                    targets, seed)
    assert evaluator.path == "fast", evaluator.path_reason
    # Subsets must differ by far more than _compare's tolerance, or it would not tell them apart.
    tolerance = ATOL + RTOL * loss.abs().max()
    assert loss.max() - loss.min() > 20 * tolerance, f"subsets all alike: {loss.tolist()}"


@pytest.mark.parametrize("name", ["gpt2", "llama", "resnet", "mha", "lenet5"])
def test_neuron_search_equals_oracle(name):
    seed = random.SystemRandom().randrange(2**31)
    model, x, targets, init = _trained(name, seed % 7)
    layout = find_units(model, "neuron")
    if name == "gpt2":  # every Conv1D layer is found, with its outputs on axis 1
        assert any(g.kind == "conv1d" and g.out_axis == 1 for g in layout.groups)
    design = Design(seed % 2**32, 0, K, {g.param_name: 0.2 for g in layout.groups})
    evaluator = BatchedEvaluator(model, layout, backend="torch")
    _compare(evaluator, layout, design, init, model, x, targets, seed)


def test_explicit_designs_remove_chosen_units():
    """What targeted elimination asks: variant j removes exactly unit j of a group."""
    model, x, targets, _ = _trained("llama", 0)
    layout = find_units(model, "structured", example_inputs=x[:1])
    group = layout.groups[1]
    masks = torch.eye(group.num_units, dtype=torch.bool)[:6]
    design = ExplicitDesign({group.param_name: masks})
    evaluator = BatchedEvaluator(model, layout, backend="torch")
    _compare(evaluator, layout, design, None, model, x, targets, 0)


def test_path_check_sees_an_unreset_layer_at_any_step(monkeypatch):
    """nn.MultiheadAttention calls its out_proj's weight itself, so patching out_proj's forward
    resets nothing. Even at step 0, when the reset values still equal the weights, the check
    must see that (it probes with reset values of its own), and the search must not go fast."""
    import bingo.executor as executor

    model, inputs, targets = zoo.build("mha")
    layout = find_units(model, "neuron")
    init = {n: p.detach().clone() for n, p in model.named_parameters()}   # weights == init
    # Hide from the trace who uses out_proj's weight: the comparison alone must catch it.
    real_users = executor._parameter_users

    def blind(model_, params, layout_, inputs_):
        users = real_users(model_, params, layout_, inputs_)
        return {p: (p.rpartition(".")[0] if p.startswith("attn.out_proj") else u)
                for p, u in users.items()}

    monkeypatch.setattr(executor, "_parameter_users", blind)
    design = Design(3, 0, 4, {g.param_name: 0.5 for g in layout.groups})
    evaluator = BatchedEvaluator(model, layout, backend="torch")
    with pytest.warns(UserWarning, match="vmap fallback"):
        evaluator.subsets(inputs, targets, design, init)
    assert evaluator.path == "vmap"
    assert "differ" in evaluator.path_reason


def test_mha_out_proj_is_reset_through_the_attention_block():
    """With the trace, out_proj's user is known: the attention block's forward resets it, and
    the batched losses equal the oracle's."""
    seed = random.SystemRandom().randrange(2**31)
    model, x, targets, init = _trained("mha", seed % 7)
    layout = find_units(model, "neuron")
    assert "attn.out_proj.weight" in [g.param_name for g in layout.groups]
    design = Design(seed % 2**32, 0, K, {g.param_name: 0.3 for g in layout.groups})
    evaluator = BatchedEvaluator(model, layout, backend="torch")
    _compare(evaluator, layout, design, init, model, x, targets, seed)
    assert evaluator.path == "fast", evaluator.path_reason


def test_a_first_call_with_one_subset_still_sees_a_model_that_mixes_rows():
    """The path is chosen on the first call; with one subset there is nothing to mix, so the
    check probes a second one (the complement) and the later calls stay right."""

    class CentresTheBatch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(5, 8)
            self.b = torch.nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h - h.mean(0, keepdim=True))    # mixes the rows of the batch

    torch.manual_seed(0)
    model = CentresTheBatch().double().eval()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    layout = find_units(model, "neuron")
    evaluator = BatchedEvaluator(model, layout, backend="torch")
    first = ExplicitDesign({"a.weight": torch.eye(8, dtype=torch.bool)[:1]})
    with pytest.warns(UserWarning, match="vmap"):
        evaluator.subsets(x, y, first, None)
    assert evaluator.path == "vmap"
    _compare(evaluator, layout, ExplicitDesign({"a.weight": torch.eye(8, dtype=torch.bool)[2:5]}),
             None, model, x, y, 0)


class _MatmulLinear(nn.Linear):
    """x @ W.T + b written out, as Falcon's FalconLinear does."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class _ScaledLinear(nn.Linear):
    """A forward of its own that computes something else than nn.Linear."""

    def forward(self, x):
        return 2.0 * super().forward(x)


@pytest.mark.parametrize("layer, path", [(_MatmulLinear, "fast"), (_ScaledLinear, "vmap")])
def test_linear_subclass_goes_fast_only_when_it_computes_a_linear(layer, path):
    """A subclass of nn.Linear with a forward of its own is reset through the fast path only
    when its forward is checked to equal nn.Linear's; otherwise the general fallback runs it.
    Either way the losses are the oracle's."""
    torch.manual_seed(random.SystemRandom().randrange(2**31))
    model = nn.Sequential(layer(6, 12), nn.ReLU(), nn.Linear(12, 5)).double().eval()
    init = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    x, targets = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 5, (7,))
    layout = find_units(model, "neuron")
    design = Design(5, 0, K, {g.param_name: 0.35 for g in layout.groups})
    evaluator = BatchedEvaluator(model, layout, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the vmap fallback warns
        _compare(evaluator, layout, design, init, model, x, targets, 0)
    assert evaluator.path == path, evaluator.path_reason
