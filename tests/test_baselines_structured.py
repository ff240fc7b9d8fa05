"""Baselines on the unit groups of any model (issue #16), and per-layer units beyond nn.Linear.

On every zoo model: each baseline that supports structured units returns one finite float32
score per unit of every structure group, keyed as the search keys them; a "dead" unit (every
parameter slice it owns scaled down 100x) ranks last for magnitude, LAMP, Wanda and Taylor.
Known cases against independent oracles: Wanda on a hand-computed MLP, on depthwise / grouped /
channel-multiplier convolutions (weight, neuron and structured) and on MobileNetV2's depthwise
layers; the structured magnitude against the structure layer's own unit masks; the group Taylor
criterion against the derivative of the loss with respect to a scalar gate on each unit (during
a language model's training too); Conv1D (GPT-2) per-layer scores on axis 1.
"""

from __future__ import annotations

import copy
import pickle
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from bingo.baselines import TaylorAccumulator, UnitScores, baseline_scores
from bingo.errors import InvalidOptionError
from bingo.structure import discover
from bingo.units import find_units

STRUCTURED = ["flap", "lamp", "lamp_taylor", "magnitude", "magnitude_increase", "random",
              "taylor", "wanda"]
"""Baselines that score structured units on any traced model (shapley too, tested apart: it
runs a ticket search per grid point; bonsai in tests/test_bonsai.py: it evaluates sub-models)."""
RANKERS = [("magnitude", {}), ("lamp", {}), ("wanda", {}), ("wanda", {"variant": "wanda-sp"}),
           ("taylor", {}), ("flap", {"standardize": False})]
"""(baseline, options) pairs a dead unit must rank last for (lamp_taylor ranks a group's units
as taylor does: LAMP keeps the order within a group)."""

pytestmark = pytest.mark.filterwarnings("ignore:bingo. shapley:UserWarning")


def _seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def _like(inputs, rows: int, generator: torch.Generator):
    """Fresh inputs shaped like the zoo's example ``inputs`` with ``rows`` examples."""
    if isinstance(inputs, dict):
        return {k: _like(v, rows, generator) for k, v in inputs.items()}
    if inputs.is_floating_point():
        return torch.randn((rows, *inputs.shape[1:]), generator=generator, dtype=inputs.dtype)
    return torch.randint(0, zoo.VOCAB, (rows, *inputs.shape[1:]), generator=generator)


def _calibration(model, inputs, seed: int, batches: int = 2, rows: int = 2):
    """``batches`` fresh ``(inputs, targets)`` batches; targets fit the model's logits."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = _like(inputs, rows, generator)
        with torch.no_grad():
            logits = zoo.run(model, x)
        out.append((x, torch.randint(0, logits.shape[-1], logits.shape[:-1],
                                     generator=generator)))
    return out


def _options(name, model, inputs, data):
    if name in ("taylor", "lamp_taylor", "wanda", "flap"):
        return {"data": data}
    if name == "magnitude_increase":
        initial = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v.clone()
                   for k, v in model.state_dict().items()}
        return {"initial": initial, "example_inputs": inputs}
    return {"example_inputs": inputs}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_structured_baseline_scores_every_group(name):
    seed = _seed()
    model, inputs, _ = zoo.build(name, seed % 1000)
    layout = find_units(model, "structured", example_inputs=inputs)
    data = _calibration(model, inputs, seed)
    before = copy.deepcopy(model.state_dict())
    for baseline in STRUCTURED:
        scores = baseline_scores(baseline, model, "structured",
                                 **_options(baseline, model, inputs, data))
        assert isinstance(scores, UnitScores) and scores.granularity == "structured"
        assert list(scores) == [g.param_name for g in layout.groups], baseline
        for g in layout.groups:
            score = scores[g.param_name]
            assert score.shape == (g.num_units,) and score.dtype == torch.float32, \
                (baseline, g.param_name)
            assert bool(torch.isfinite(score).all()), (baseline, g.param_name, f"seed {seed}")
    for key, value in model.state_dict().items():  # no baseline changes the model it scores
        assert torch.equal(value, before[key]), key


def _with_dead_units(model, inputs, generator):
    """A copy of ``model`` with one random unit of every structure group scaled down 100x (every
    parameter slice it owns; buffers are data and stay); returns it and the dead unit per key."""
    dead_model = copy.deepcopy(model)
    structure = discover(dead_model, inputs)
    params = dict(dead_model.named_parameters())
    dead = {}
    with torch.no_grad():
        for g in structure.groups:
            unit = int(torch.randint(0, g.num_units, (1,), generator=generator))
            dead[g.key] = unit
            chosen = torch.zeros(g.num_units, dtype=torch.bool)
            chosen[unit] = True
            # param_masks gives keep-masks: False where the unit is chosen for "removal"
            for name, keep in g.param_masks(~chosen, structure.shapes).items():
                if name in params:
                    params[name][~keep] /= 100
    return dead_model, dead


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_a_dead_unit_ranks_last(name):
    seed = _seed()
    model, inputs, _ = zoo.build(name, seed % 1000)
    generator = torch.Generator().manual_seed(seed)
    dead_model, dead = _with_dead_units(model, inputs, generator)
    data = _calibration(dead_model, inputs, seed, batches=2, rows=4)
    for method, extra in RANKERS:
        options = {"data": data} if method in ("wanda", "taylor", "flap") else \
            {"example_inputs": inputs}
        scores = baseline_scores(method, dead_model, "structured", **options, **extra)
        for key, unit in dead.items():
            score = scores[key]
            others = torch.ones_like(score, dtype=torch.bool)
            others[unit] = False
            if method == "taylor" or extra:
                # Criteria that read only activations and gradients (Taylor; Wanda-sp: the
                # consumers' columns times the unit's own activation) rightly score a unit the
                # data hardly uses (a ReLU unit on for one example, a per-step gradient sum that
                # cancels) near 0, and a dead unit upstream can switch such a unit off: the dead
                # unit must fall among the units that carry nothing (below 1% of the group mean,
                # the score's unit: most of a ReLU group can be off), below every unit that
                # carries something.
                others &= score >= 0.01 * score.mean()
            assert others.any() and score[unit] < score[others].min(), \
                (method, extra, key, unit, score, f"seed {seed}")


# -- Wanda known cases ----------------------------------------------------------------------------


def test_wanda_structured_known_case():
    """An MLP neuron: its row of layer 0 with the inputs' norms, plus its column of layer 2 with
    its own activation's norm (``"slices"``); Wanda-sp: the column's row mean only."""
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, 1.0]))
        model[2].weight.copy_(torch.tensor([[2.0, -1.0], [4.0, 3.0]]))
    x = torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 0.0]])  # column norms 5, 1, 1
    h = torch.relu(x @ model[0].weight.T + model[0].bias).detach()  # [[3.5, 0], [2, 2]]
    h_norm = h.pow(2).sum(0).sqrt()
    rows = (model[0].weight.abs() * torch.tensor([5.0, 1.0, 1.0])).sum(1)  # 7.5, 2.0
    columns = (model[2].weight.abs() * h_norm).sum(0)
    scores = baseline_scores("wanda", model, "structured", data=[(x, None)])["0.weight"]
    expected = (rows + columns).detach()
    torch.testing.assert_close(scores, expected / expected.mean())
    sp = baseline_scores("wanda", model, "structured", data=[(x, None)],
                         variant="wanda-sp")["0.weight"]
    expected = (model[2].weight.abs() * h_norm).mean(0).detach()
    torch.testing.assert_close(sp, expected / expected.mean())


def _conv_oracle(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """|W[o, j, :, :]| * ||x[:, c(o, j)]|| with c(o, j) the input channel output o's j-th filter
    plane reads, written out group by group."""
    norms = x.double().pow(2).sum((0, 2, 3)).sqrt()  # float64: deep activations are tiny
    out_per_group = conv.out_channels // conv.groups
    in_per_group = conv.in_channels // conv.groups
    expected = torch.empty_like(conv.weight, dtype=torch.float64)
    for o in range(conv.out_channels):
        group = o // out_per_group
        for j in range(in_per_group):
            expected[o, j] = conv.weight[o, j].detach().abs() * norms[group * in_per_group + j]
    return expected


@pytest.mark.parametrize("in_channels, out_channels, groups", [
    (2, 2, 2),   # depthwise
    (2, 4, 2),   # depthwise with channel multiplier 2
    (4, 2, 2),   # grouped
    (3, 2, 1),   # plain
])
def test_wanda_grouped_and_depthwise_convs(in_channels, out_channels, groups):
    _seed()
    model = nn.Sequential(nn.Conv2d(in_channels, out_channels, (1, 2), groups=groups))
    x = torch.randn(3, in_channels, 2, 3)
    expected = _conv_oracle(model[0], x)
    weight = baseline_scores("wanda", model, "weight", data=[(x, None)])["0.weight"]
    torch.testing.assert_close(weight, expected.float())  # shaped like the weight
    neuron = baseline_scores("wanda", model, "neuron", data=[(x, None)], include=["0"])["0.weight"]
    rows = expected.sum((1, 2, 3))
    torch.testing.assert_close(neuron, (rows / rows.mean()).float())


def test_wanda_depthwise_hand_computed():
    """Depthwise conv (2 channels, 1x2 kernels): channel c reads input channel c only."""
    model = nn.Sequential(nn.Conv2d(2, 2, (1, 2), groups=2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[[[1.0, -2.0]]], [[[0.5, 3.0]]]]))
    x = torch.tensor([[[[3.0, 0.0], [0.0, 4.0]], [[1.0, 0.0], [0.0, 0.0]]]])  # norms 5 and 1
    weight = baseline_scores("wanda", model, "weight", data=[(x, None)])["0.weight"]
    torch.testing.assert_close(weight, torch.tensor([[[[5.0, 10.0]]], [[[0.5, 3.0]]]]))
    neuron = baseline_scores("wanda", model, "neuron", data=[(x, None)], include=["0"])["0.weight"]
    torch.testing.assert_close(neuron, torch.tensor([15.0, 3.5]) / 9.25)


def test_wanda_structured_depthwise_channel():
    """An inverted-residual channel: its expand row, its depthwise filter (reading the expand
    output's own channel) and its reduce column, each with its own input's norm."""
    _seed()
    model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                          nn.ReLU(), nn.Conv2d(4, 3, 1))
    x = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        h1 = model[1](model[0](x))
        h2 = model[3](model[2](h1))
    expected = sum(_conv_oracle(conv, inp).sum((1, 2, 3)) for conv, inp in
                   ((model[0], x), (model[2], h1)))
    expected = expected + _conv_oracle(model[4], h2).sum((0, 2, 3))
    scores = baseline_scores("wanda", model, "structured", data=[(x, None)])
    assert list(scores) == ["0.weight"]
    torch.testing.assert_close(scores["0.weight"], (expected / expected.mean()).float())


def test_wanda_on_mobilenet_depthwise_layers():
    """Every depthwise conv of MobileNetV2, per layer: shaped like its weight (C, 1, 3, 3), equal
    to |W| times the norm of the input channel each filter reads (captured by a hook here)."""
    seed = _seed()
    model, inputs, _ = zoo.build("mobilenet", seed % 1000)
    data = _calibration(model, inputs, seed, batches=1, rows=3)
    depthwise = {n: m for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1}
    assert depthwise
    seen = {}
    handles = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()))
               for n, m in depthwise.items()]
    with torch.no_grad():
        zoo.run(model, data[0][0])
    for h in handles:
        h.remove()
    include = list(depthwise)
    weight = baseline_scores("wanda", model, "weight", data=data, include=include)
    neuron = baseline_scores("wanda", model, "neuron", data=data, include=include)
    for name, conv in depthwise.items():
        expected = _conv_oracle(conv, seen[name])
        torch.testing.assert_close(weight[f"{name}.weight"], expected.float())
        rows = expected.sum((1, 2, 3))
        torch.testing.assert_close(neuron[f"{name}.weight"], (rows / rows.mean()).float())


# -- magnitude against the structure layer's unit masks -------------------------------------------


@pytest.mark.parametrize("name", ["resnet", "llama", "mha"])
def test_structured_magnitude_is_the_group_norm_over_every_slice(name):
    """sqrt of the sum of squares of every parameter element the structure layer's mask removes
    with the unit (BatchNorm entries, consumers' columns, q/k/v rows and o columns), / group
    mean."""
    seed = _seed()
    model, inputs, _ = zoo.build(name, seed % 1000)
    with torch.no_grad():
        for p in model.parameters():  # biases and norms away from their 0 / 1 initial values
            p.add_(0.1 * torch.randn_like(p))
    structure = discover(model, inputs)
    params = dict(model.named_parameters())
    scores = baseline_scores("magnitude", model, "structured", example_inputs=inputs)
    for g in structure.groups:
        norms = torch.zeros(g.num_units, dtype=torch.float64)
        for u in range(g.num_units):
            chosen = torch.zeros(g.num_units, dtype=torch.bool)
            chosen[u] = True
            for pname, keep in g.param_masks(~chosen, structure.shapes).items():
                if pname in params:
                    norms[u] += params[pname].detach().double()[~keep].pow(2).sum()
        norms = norms.sqrt()
        torch.testing.assert_close(scores[g.key], (norms / norms.mean()).float())


# -- Taylor: the group criterion ------------------------------------------------------------------


def _gate_taylor(model, structure, group, inputs, targets):
    """|dL/d alpha_u| at alpha = 1, where alpha_u multiplies every parameter element of unit u:
    the first-order loss change of removing the unit, by autograd on a gate."""
    alpha = torch.ones(group.num_units, dtype=torch.float64, requires_grad=True)
    params = dict(model.named_parameters())
    gated = {}
    for u in range(group.num_units):
        chosen = torch.zeros(group.num_units, dtype=torch.bool)
        chosen[u] = True
        for name, keep in group.param_masks(~chosen, structure.shapes).items():
            if name in params:
                factor = gated.get(name, torch.ones_like(params[name]))
                gated[name] = torch.where(~keep, alpha[u].to(factor.dtype), factor)
    replaced = {n: params[n] * f for n, f in gated.items()}
    if isinstance(inputs, dict):
        out = torch.func.functional_call(model, replaced, (), inputs)
    else:
        out = torch.func.functional_call(model, replaced, (inputs,))
    logits = out if isinstance(out, torch.Tensor) else out.logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return torch.autograd.grad(loss, alpha)[0].abs()


@pytest.mark.parametrize("name", ["gpt2", "resnet"])
def test_structured_taylor_is_the_group_criterion(name):
    seed = _seed()
    model, inputs, _ = zoo.build(name, seed % 1000)
    model = model.double()
    generator = torch.Generator().manual_seed(seed)
    x = _like(inputs, 2, generator)
    if isinstance(x, dict) and x.get("pixel_values") is not None:
        x = {"pixel_values": x["pixel_values"].double()}
    with torch.no_grad():
        logits = zoo.run(model, x)
    y = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=generator)
    structure = discover(model, x)
    accumulator = TaylorAccumulator(model, "structured", example_inputs=x)
    with accumulator, torch.enable_grad():
        out = zoo.run(model, x)
        F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)).backward()
    for g in structure.groups:
        torch.testing.assert_close(accumulator.sums[g.key], _gate_taylor(model, structure, g, x, y),
                                   rtol=1e-6, atol=1e-12, msg=f"{g.key} seed {seed}")


def test_taylor_accumulator_on_a_language_model_during_training():
    """Structured hooks on GPT-2 (dict inputs, (B, T) targets) leave training unchanged and sum
    the group criterion of each step, at that step's weights."""
    seed = _seed()
    plain, inputs, _ = zoo.build("gpt2", seed % 1000)
    plain = plain.double()  # eval mode: no dropout, so both models and the oracle agree
    hooked = copy.deepcopy(plain)
    generator = torch.Generator().manual_seed(seed)
    batches = [(_like(inputs, 2, generator), torch.randint(0, zoo.VOCAB, (2, zoo.TOKENS),
                                                             generator=generator))
               for _ in range(3)]
    accumulator = TaylorAccumulator(hooked, "structured", example_inputs=inputs)
    structure = discover(hooked, inputs)
    expected = {g.key: torch.zeros(g.num_units, dtype=torch.float64) for g in structure.groups}
    models = {"plain": plain, "hooked": hooked}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
                  for k, m in models.items()}
    for x, y in batches:
        for g in structure.groups:
            expected[g.key] += _gate_taylor(hooked, structure, g, x, y)
        for key, m in models.items():
            with accumulator if key == "hooked" else _Nothing():
                loss = F.cross_entropy(zoo.run(m, x).flatten(0, 1), y.flatten())
                optimizers[key].zero_grad()
                loss.backward()
            optimizers[key].step()
    assert accumulator.steps == 3 and not accumulator.attached
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters()):
        assert torch.equal(a, b), name
    for key, value in expected.items():
        torch.testing.assert_close(accumulator.sums[key], value, rtol=1e-6, atol=1e-12,
                                   msg=f"{key} seed {seed}")
    scores = accumulator.scores()
    assert scores.granularity == "structured" and list(scores) == list(expected)


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- Conv1D (GPT-2) and the other per-layer layers ------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "mha"])
def test_per_layer_scores_cover_every_layer_kind(name):
    """Weight and neuron scores for Conv1D (outputs on axis 1) and nn.MultiheadAttention's
    out_proj (used functionally): shaped as the ticket search's units."""
    seed = _seed()
    model, inputs, _ = zoo.build(name, seed % 1000)
    data = _calibration(model, inputs, seed, batches=1)
    for granularity in ("weight", "neuron"):
        layout = find_units(model, granularity)
        for baseline in ("magnitude", "lamp", "random", "taylor", "wanda", "magnitude_increase"):
            scores = baseline_scores(baseline, model, granularity,
                                     **{k: v for k, v in _options(baseline, model, inputs,
                                                                  data).items()
                                        if k != "example_inputs"})
            assert scores.granularity == granularity
            assert list(scores) == [g.param_name for g in layout.groups]
            for g in layout.groups:
                assert scores[g.param_name].shape == layout.unit_shape(g), (baseline, g.name)
                assert bool(torch.isfinite(scores[g.param_name]).all()), (baseline, g.name)


def test_conv1d_neuron_scores_are_per_output_column():
    """GPT-2's Conv1D stores (in, out): a neuron is a column with its bias entry."""
    seed = _seed()
    model, inputs, _ = zoo.build("gpt2", seed % 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    data = _calibration(model, inputs, seed, batches=1)
    layer = model.transformer.h[0].mlp.c_fc
    key = "transformer.h.0.mlp.c_fc.weight"
    assert layer.weight.shape == (32, 128)
    norms = (layer.weight.detach().double().pow(2).sum(0) + layer.bias.detach().double().pow(2)
             ).sqrt()
    magnitude = baseline_scores("magnitude", model, "neuron")[key]
    torch.testing.assert_close(magnitude, (norms / norms.mean()).float())
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].detach()))
    with torch.no_grad():
        zoo.run(model, data[0][0])
    handle.remove()
    x_norm = seen["x"].reshape(-1, 32).pow(2).sum(0).sqrt()
    columns = (layer.weight.detach().abs() * x_norm[:, None]).sum(0)
    wanda = baseline_scores("wanda", model, "neuron", data=data)[key]
    torch.testing.assert_close(wanda, columns / columns.mean())
    # Taylor: Molchanov's sum over tokens of h * dL/dh at the layer's output, per column
    kept = {}

    def keep(_m, _i, out):
        out.retain_grad()
        kept["h"] = out
    x, y = data[0]
    probe = copy.deepcopy(model)
    handle = probe.transformer.h[0].mlp.c_fc.register_forward_hook(keep)
    F.cross_entropy(zoo.run(probe, x).flatten(0, 1), y.flatten()).backward()
    handle.remove()
    criterion = (kept["h"] * kept["h"].grad).reshape(-1, 128).sum(0).abs().detach()
    taylor = baseline_scores("taylor", model, "neuron", data=data)[key]
    # The criterion is |sum over tokens| of terms of both signs: float32 cancellation leaves an
    # absolute error of about 1e-6 of the mean score on columns whose sum nearly cancels (CI saw
    # 1.4e-6 at a score of 1.2e-3), whichever of the two computes it.
    torch.testing.assert_close(taylor, (criterion / criterion.mean()).float(), rtol=1e-4,
                               atol=1e-5)


# -- the rest: shapley, errors, the score dict ----------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "mha"])
def test_shapley_scores_structured_units(name):
    seed = _seed()
    model, inputs, _ = zoo.build(name, seed % 1000)
    (x, y), = _calibration(model, inputs, seed, batches=1, rows=3)
    x = next(iter(x.values())) if isinstance(x, dict) else x
    layout = find_units(model, "structured", example_inputs=x)
    scores = baseline_scores("shapley", model, "structured", data=(x, y), samples=8,
                             fractions=2)
    assert scores.granularity == "structured"
    assert {k: tuple(v.shape) for k, v in scores.items()} == \
        {g.param_name: (g.num_units,) for g in layout.groups}
    assert all(bool(torch.isfinite(v).all()) for v in scores.values())


def test_unsupported_granularity_and_options_raise_naming_them():
    model, inputs, _ = zoo.build("lenet300")
    with pytest.raises(InvalidOptionError, match="'imp'.*granularity='structured'"):
        baseline_scores("imp", model, "structured", train_fn=lambda m: None, rounds=1,
                        rewind_state=copy.deepcopy(model.state_dict()))
    with pytest.raises(InvalidOptionError, match="variant='wanda-sp'.*structured"):
        baseline_scores("wanda", model, "neuron", data=[(inputs, None)], variant="wanda-sp")
    with pytest.raises(InvalidOptionError, match="variant='sp'"):
        baseline_scores("wanda", model, "structured", data=[(inputs, None)], variant="sp")


def test_scores_are_a_plain_dict_that_knows_its_granularity():
    model, inputs, _ = zoo.build("lenet300")
    for granularity in ("weight", "neuron", "structured"):
        scores = baseline_scores("magnitude", model, granularity, example_inputs=inputs)
        assert isinstance(scores, dict) and scores.granularity == granularity
        for copied in (copy.deepcopy(scores), pickle.loads(pickle.dumps(scores))):
            assert copied.granularity == granularity and list(copied) == list(scores)
        assert dict(scores).keys() == scores.keys()
