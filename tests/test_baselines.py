"""bingo.baselines: score format matches TicketSearch, orderings, seeding, prune accepts them."""

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo.baselines import (BASELINES, TaylorAccumulator, baseline_scores, lamp, magnitude,
                             magnitude_increase, random_scores, shapley, taylor)
from bingo.errors import (CheckpointError, InputMismatchError, InvalidOptionError,
                          NoPrunableLayersError)
from bingo.models import lenet_300_100

GRANULARITIES = ("weight", "neuron")

# The format tests run shapley with very few coalitions on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:bingo. shapley:UserWarning")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return lenet_300_100(in_features=64)


def _conv(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _batch(rows=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, 1, 8, 8, generator=g), torch.randint(0, 10, (rows,), generator=g)


def _options(name, model):
    """The options each baseline needs, cheap enough for the format tests."""
    if name == "magnitude_increase":
        torch.manual_seed(123)
        fresh = copy.deepcopy(model)
        for p in fresh.parameters():
            nn.init.normal_(p, std=0.05)
        return {"initial": fresh.state_dict()}
    if name in ("taylor", "lamp_taylor"):
        return {"data": [_batch(8, 0), _batch(8, 1)]}
    if name == "targeted":
        return {"data": _batch(16)}
    if name == "wanda":
        return {"data": [_batch(8, 0)]}
    if name == "shapley":
        return {"data": _batch(8), "samples": 8, "fractions": 2}
    if name == "imp":
        return {"train_fn": lambda m: None, "rounds": 1,
                "rewind_state": copy.deepcopy(model.state_dict())}
    if name == "flap":
        return {"data": [_batch(8, 0)]}
    if name == "bonsai":
        return {"data": _batch(16), "submodels": 8, "rounds": 2, "progress": False}
    return {}


STRUCTURED_ONLY = {"flap", "bonsai"}
"""Baselines that rank only structured units (their measure needs a unit's consumers)."""


def _scores(name, model, granularity, **options):
    """The baseline's scores, or None after checking that a structured-only baseline refuses
    another granularity with an error naming itself."""
    if name in STRUCTURED_ONLY and granularity != "structured":
        with pytest.raises(InvalidOptionError, match=f"'{name}'.*structured"):
            baseline_scores(name, model, granularity, **_options(name, model), **options)
        return None
    return baseline_scores(name, model, granularity, **_options(name, model), **options)


def _search_scores(model, granularity, **kw):
    search = bingo.TicketSearch(model, granularity=granularity, subsets=8, fraction=0.2,
                                metric="loss", reset="zero", **kw)  # init == current weights here
    g = torch.Generator().manual_seed(0)
    search.step(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g))
    return search.significance()


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_format_matches_ticket_search(name, granularity):
    model = _mlp()
    expected = _search_scores(model, granularity)
    scores = _scores(name, model, granularity)
    if scores is None:
        return
    assert list(scores) == list(expected)
    for key, score in scores.items():
        assert score.shape == expected[key].shape
        assert score.dtype == torch.float32
        assert bool(torch.isfinite(score).all())


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_include_exclude_select_the_same_layers_as_ticket_search(name):
    model = _mlp()
    if name in STRUCTURED_ONLY:
        return  # their include/exclude are unit groups' (test_baselines_structured.py)
    options = _options(name, model)
    expected = _search_scores(model, "neuron", include=["3", "5"])
    assert list(baseline_scores(name, model, "neuron", include=["3", "5"], **options)) == \
        list(expected)
    assert list(baseline_scores(name, model, "weight", exclude="1", **options)) == \
        ["3.weight", "5.weight"]


def test_neuron_granularity_leaves_out_the_output_layer():
    assert list(magnitude(_mlp(), "neuron")) == ["1.weight", "3.weight"]


def test_magnitude_weight_is_absolute_value():
    model = _mlp()
    scores = magnitude(model)
    for key, weight in dict(model.named_parameters()).items():
        if key in scores:
            torch.testing.assert_close(scores[key], weight.detach().abs())
    # Larger |w| ranks higher, whatever the sign.
    with torch.no_grad():
        model[1].weight[0, :3] = torch.tensor([-3.0, 0.001, 2.0])
    s = magnitude(model)["1.weight"][0, :3]
    assert s[0] > s[2] > s[1]


def test_magnitude_neuron_is_row_norm_with_bias_over_layer_mean():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([4.0, 0.0, 1.0]))
    norms = torch.tensor([5.0, 1.0, 3 ** 0.5])
    torch.testing.assert_close(magnitude(model, "neuron")["0.weight"], norms / norms.mean())


def test_magnitude_neuron_is_layer_normalised():
    # Layer "1" has tiny weights; raw norms would rank all of its neurons below layer "3"'s.
    model = _mlp()
    with torch.no_grad():
        model[1].weight.mul_(1e-3)
        model[1].bias.mul_(1e-3)
    scores = magnitude(model, "neuron")
    for key in ("1.weight", "3.weight"):
        assert scores[key].mean().item() == pytest.approx(1.0, rel=1e-5)
    # Pruning half of all neurons takes some from both layers, not the whole small layer.
    result = bingo.prune(model, scores, sparsity=0.5, progress=False, structured=False)
    removed = {k: int((~m).sum()) for k, m in result.unit_masks.items()}
    assert 0 < removed["1.weight"] < 300 and removed["3.weight"] > 0


def test_magnitude_of_an_all_zero_layer_is_zero_not_nan():
    model = _mlp()
    with torch.no_grad():
        model[3].weight.zero_()
        model[3].bias.zero_()
    assert bool((magnitude(model, "neuron")["3.weight"] == 0).all())


def test_magnitude_conv_neuron_scores_are_per_channel():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    assert magnitude(model, "neuron")["0.weight"].shape == (4,)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_random_is_reproducible_and_seeded(granularity):
    model = _mlp()
    a = random_scores(model, granularity, seed=3)
    b = random_scores(model, granularity, seed=3)
    c = random_scores(model, granularity, seed=4)
    for key in a:
        assert torch.equal(a[key], b[key])
        assert not torch.equal(a[key], c[key])
        assert bool(((a[key] >= 0) & (a[key] < 1)).all())


def test_random_does_not_touch_the_global_rng():
    model = _mlp()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    random_scores(model)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_prune_accepts_baseline_scores(name, granularity):
    model = _mlp()
    scores = _scores(name, model, granularity)
    if scores is None:
        return
    result = bingo.prune(model, scores, sparsity=0.5, progress=False)
    assert result.granularity == granularity
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)


def test_magnitude_pruning_removes_the_smallest_weights():
    model = _mlp()
    scores = magnitude(model)
    result = bingo.prune(model, scores, sparsity=0.3, progress=False)
    kept = torch.cat([model.get_parameter(k).detach().abs()[m].flatten()
                      for k, m in result.unit_masks.items()])
    removed = torch.cat([model.get_parameter(k).detach().abs()[~m].flatten()
                         for k, m in result.unit_masks.items()])
    assert removed.max() <= kept.min()


def test_unknown_baseline_or_option_is_a_clear_error():
    with pytest.raises(InvalidOptionError, match="baseline='snip' is not supported"):
        baseline_scores("snip", _mlp())
    with pytest.raises(InvalidOptionError, match="'magnitude'.*seed"):
        baseline_scores("magnitude", _mlp(), seed=1)
    with pytest.raises(InvalidOptionError, match="granularity='row'"):
        baseline_scores("random", _mlp(), "row")
    with pytest.raises(InvalidOptionError, match="seed must be an integer"):
        random_scores(_mlp(), seed=1.5)


def test_model_without_layers_raises():
    with pytest.raises(NoPrunableLayersError):
        magnitude(nn.Sequential(nn.ReLU()))


# -- every baseline on conv layers ----------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_scores_conv_layers(name, granularity):
    model = _conv()
    before = copy.deepcopy(model.state_dict())
    scores = _scores(name, model, granularity)
    if scores is None:
        return
    expected_keys = ["0.weight", "3.weight"] if granularity == "weight" else ["0.weight"]
    assert list(scores) == expected_keys
    shape = (4, 1, 3, 3) if granularity == "weight" else (4,)
    assert scores["0.weight"].shape == shape and scores["0.weight"].dtype == torch.float32
    # No baseline changes the model it scores.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    result = bingo.prune(model, scores, sparsity=0.4, progress=False)
    assert result.granularity == granularity


# -- LAMP -----------------------------------------------------------------------------------------


def test_lamp_hand_computed_weights_and_ties():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -1.0], [2.0, 0.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 2.0], [0.5, 0.0]]))
    scores = lamp(model)
    # s^2 = 9, 1, 4, 0; ascending 0, 1, 4, 9; suffix sums 14, 14, 13, 9.
    torch.testing.assert_close(scores["0.weight"], torch.tensor([[1.0, 1 / 14], [4 / 13, 0.0]]))
    # s^2 = 1, 1, 1, 4, 0.25, 0; tied 1s in flat order: 1/(1+1+1+4), 1/(1+1+4), 1/(1+4).
    torch.testing.assert_close(scores["2.weight"],
                               torch.tensor([[1 / 7, 1 / 6], [1 / 5, 1.0], [0.25 / 7.25, 0.0]]))


def test_lamp_neuron_uses_row_norms_with_bias():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([4.0, 0.0, 1.0]))
    # squared norms 25, 1, 3: ascending 1, 3, 25 with suffix sums 29, 28, 25.
    torch.testing.assert_close(lamp(model, "neuron")["0.weight"],
                               torch.tensor([1.0, 1 / 29, 3 / 28]))


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_lamp_largest_unit_of_every_layer_scores_one(granularity):
    model = _mlp()
    with torch.no_grad():
        model[1].weight.mul_(1e-3)  # a layer of tiny weights still keeps its top unit at 1
    norms = magnitude(model, granularity)
    for key, score in lamp(model, granularity).items():
        assert float(score.max()) == pytest.approx(1.0)
        assert int(score.argmax()) == int(norms[key].argmax())
        assert bool(((score >= 0) & (score <= 1)).all())
    # Within a layer LAMP orders units as magnitude does.
    s, m = lamp(model, granularity)["3.weight"].flatten(), norms["3.weight"].flatten()
    assert torch.equal(torch.sort(s, stable=True).indices, torch.sort(m, stable=True).indices)


# -- magnitude increase ---------------------------------------------------------------------------


def _trained_pair():
    model = _mlp()
    initial = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, initial


def test_magnitude_increase_weight_is_abs_difference():
    model, initial = _trained_pair()
    scores = magnitude_increase(model, initial=initial)
    for key in ("1.weight", "3.weight", "5.weight"):
        torch.testing.assert_close(
            scores[key], model.get_parameter(key).detach().abs() - initial[key].abs())


def test_magnitude_increase_neuron_hand_computed():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([4.0, 0.0]))
    initial = {"0.weight": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "0.bias": torch.zeros(2)}
    # final norms 5, 1 (mean 3); initial norms 1, 2.
    torch.testing.assert_close(magnitude_increase(model, "neuron", initial=initial)["0.weight"],
                               torch.tensor([4 / 3, -1 / 3]))


def test_magnitude_increase_accepts_a_ticket_search_snapshot():
    model = _mlp()
    initial = copy.deepcopy(model.state_dict())
    search = bingo.TicketSearch(model, granularity="weight", reset="init")  # snapshots all layers
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    for granularity in GRANULARITIES:
        expected = magnitude_increase(model, granularity, initial=initial)
        got = magnitude_increase(model, granularity, initial=search)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key])
    with pytest.raises(InvalidOptionError, match="no snapshot"):
        magnitude_increase(model, initial=bingo.TicketSearch(model, reset="zero"))


def test_magnitude_increase_bad_initial_is_a_clear_error():
    model, initial = _trained_pair()
    with pytest.raises(InvalidOptionError, match="initial is required"):
        magnitude_increase(model)
    partial = {k: v for k, v in initial.items() if k != "3.weight"}
    with pytest.raises(InputMismatchError, match="no entry '3.weight'"):
        magnitude_increase(model, initial=partial)
    with pytest.raises(InputMismatchError, match="no entry '1.bias'"):
        magnitude_increase(model, "neuron", initial={k: v for k, v in initial.items()
                                                     if k != "1.bias"})
    wrong = dict(initial, **{"5.weight": torch.zeros(3, 100)})
    with pytest.raises(InputMismatchError, match=r"'5.weight'.*\(3, 100\).*\(10, 100\)"):
        magnitude_increase(model, initial=wrong)
    with pytest.raises(InputMismatchError, match="live tensor"):
        magnitude_increase(model, initial=model.state_dict())


# -- Taylor ---------------------------------------------------------------------------------------


def _train(model, steps=4, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x, y = _batch(16, seed + step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_taylor_hooks_do_not_change_training(granularity):
    plain, hooked = _mlp(), _mlp()
    accumulator = TaylorAccumulator(hooked, granularity)
    with accumulator:
        _train(hooked)
    _train(plain)
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(a.grad, b.grad), name
    assert accumulator.steps == 4 and not accumulator.attached
    # Detached: later backward passes are not counted.
    _train(hooked, steps=1)
    assert accumulator.steps == 4


def test_taylor_weight_score_is_sum_of_abs_w_times_grad():
    model = _mlp()
    expected = {k: torch.zeros_like(p) for k, p in model.named_parameters() if k.endswith("weight")}
    accumulator = TaylorAccumulator(model).attach()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        x, y = _batch(16, step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        for key in expected:
            p = model.get_parameter(key)
            expected[key] += (p.detach() * p.grad).abs()
        opt.step()
    accumulator.close()
    scores = accumulator.scores()
    for key in expected:
        torch.testing.assert_close(scores[key], expected[key])


def _hand_neuron_taylor(model, layer_index, batches):
    """sum over batches of |sum_{batch, spatial} h * dL/dh| at layer_index's output."""
    total = 0
    for x, y in batches:
        h = None

        def keep(_module, _inputs, output):
            nonlocal h
            output.retain_grad()
            h = output

        handle = model[layer_index].register_forward_hook(keep)
        F.cross_entropy(model(x), y).backward()
        handle.remove()
        dims = [d for d in range(h.dim()) if d != 1]
        total = total + (h * h.grad).sum(dims).abs().detach()
        model.zero_grad()
    return total


@pytest.mark.parametrize("make", [_mlp, _conv])
def test_taylor_neuron_score_is_molchanov_criterion(make):
    batches = [_batch(16, 0), _batch(16, 1)]
    model = make()
    layer = 1 if make is _mlp else 0
    key = f"{layer}.weight"
    expected = _hand_neuron_taylor(copy.deepcopy(model), layer, batches)
    with TaylorAccumulator(model, "neuron") as accumulator:
        for x, y in batches:
            F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(accumulator.sums[key], expected.double(), rtol=1e-5, atol=1e-9)
    # Scores are the sums divided by their layer mean.
    torch.testing.assert_close(accumulator.scores()[key], (expected / expected.mean()).float())
    # The data= form computes the same at the current weights, leaving the model untouched.
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    scores = taylor(model, "neuron", data=batches)
    torch.testing.assert_close(scores[key], (expected / expected.mean()).float())
    for (name, value), grad, p in zip(model.state_dict().items(), grads, model.parameters()):
        assert torch.equal(value, before[name]) and torch.equal(p.grad, grad)


def test_taylor_neuron_is_unaffected_by_inplace_activations():
    model = _mlp()
    inplace = copy.deepcopy(model)
    inplace[2] = nn.ReLU(inplace=True)
    batches = [_batch(16, 0)]
    expected = _hand_neuron_taylor(copy.deepcopy(model), 1, batches)
    with TaylorAccumulator(inplace, "neuron") as accumulator:
        F.cross_entropy(inplace(batches[0][0]), batches[0][1]).backward()
    torch.testing.assert_close(accumulator.sums["1.weight"], expected.double(), rtol=1e-5,
                               atol=1e-9)


def test_taylor_state_dict_resumes_and_rejects_other_models():
    model = _mlp()
    whole = TaylorAccumulator(copy.deepcopy(model), "neuron")
    with whole:
        _train(whole.model, steps=3)
    first = TaylorAccumulator(model, "neuron")
    with first:
        _train(model, steps=2)
    state = first.state_dict()
    resumed = TaylorAccumulator(model, "neuron")
    resumed.load_state_dict(state)
    assert resumed.steps == 2
    # The third backward of the same schedule (at the weights after two steps) completes it.
    with resumed:
        x, y = _batch(16, 2)
        F.cross_entropy(model(x), y).backward()
    for key, value in whole.sums.items():
        torch.testing.assert_close(resumed.sums[key], value)
    assert resumed.steps == 3
    with pytest.raises(CheckpointError, match="different model or granularity"):
        TaylorAccumulator(model, "weight").load_state_dict(state)
    with pytest.raises(CheckpointError):
        TaylorAccumulator(_conv(), "neuron").load_state_dict(state)
    with pytest.raises(CheckpointError, match="format"):
        resumed.load_state_dict({"sums": {}})


def test_taylor_registry_options():
    model = _mlp()
    accumulator = TaylorAccumulator(model)
    with accumulator:
        _train(model, steps=1)
    scores = baseline_scores("taylor", model, "weight", accumulator=accumulator)
    torch.testing.assert_close(scores["1.weight"], accumulator.sums["1.weight"].float())
    with pytest.raises(InvalidOptionError, match="exactly one of accumulator"):
        taylor(model)
    with pytest.raises(InputMismatchError, match="'neuron' units"):
        taylor(model, "neuron", accumulator=accumulator)
    with pytest.warns(UserWarning, match="no backward pass"):
        TaylorAccumulator(model).scores()


# -- Shapley --------------------------------------------------------------------------------------


def _exact_shapley(loss_of, n):
    """Exact Shapley values of the game v(S) = -loss_of(S) over n players."""
    values = []
    for u in range(n):
        others = [v for v in range(n) if v != u]
        total = 0.0
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, size):
                total += weight * (loss_of(set(coalition)) - loss_of(set(coalition) | {u}))
        values.append(total)
    return torch.tensor(values)


def _semivalue(loss_of, n, p):
    """Exact p-semivalue: mean marginal gain of u when every other unit is present w.p. p."""
    values = []
    for u in range(n):
        others = [v for v in range(n) if v != u]
        total = 0.0
        for size in range(n):
            for coalition in itertools.combinations(others, size):
                total += p ** size * (1 - p) ** (n - 1 - size) * \
                    (loss_of(set(coalition)) - loss_of(set(coalition) | {u}))
        values.append(total)
    return torch.tensor(values)


def _small_game():
    """A 4-neuron hidden layer (units) on fixed data, and the exact loss of each coalition."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.mul_(3)
        model[2].weight.mul_(3)
    x = torch.randn(64, 3)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()

    def loss_of(present):
        keep = torch.tensor([float(i in present) for i in range(4)])
        with torch.no_grad():
            h = torch.relu(F.linear(x, model[0].weight * keep[:, None], model[0].bias * keep))
            return F.cross_entropy(model[2](h), y).item()

    return model, x, y, loss_of


def test_shapley_matches_exact_enumeration():
    model, x, y, loss_of = _small_game()
    exact = _exact_shapley(loss_of, 4)
    before = copy.deepcopy(model.state_dict())
    estimate = shapley(model, "neuron", data=[(x[:32], y[:32]), (x[32:], y[32:])], samples=4000,
                       fractions=8, seed=0)["0.weight"]
    # Monte-Carlo standard error ~0.003 per unit at 4000 coalitions (measured over seeds).
    torch.testing.assert_close(estimate.double(), exact.double(), rtol=0, atol=0.012)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_shapley_reset_fraction_q_estimates_the_semivalue_at_presence_1_minus_q():
    model, x, y, loss_of = _small_game()
    present, absent = _semivalue(loss_of, 4, 0.75), _semivalue(loss_of, 4, 0.25)
    assert float((present - absent).abs().sum()) > 0.08  # the two are far apart in this game
    estimate = shapley(model, "neuron", data=(x, y), samples=4000, fractions=[0.25])["0.weight"]
    assert float((estimate.double() - present).abs().sum()) < 0.03
    assert float((estimate.double() - absent).abs().sum()) > 0.06


def test_shapley_of_an_additive_game_ranks_exactly():
    # Unit i (row i of layer 0) only affects sample i, so the loss is a sum over units.
    d = torch.tensor([0.5, 3.0, 1.0, 2.0])
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(d))
        model[1].weight.copy_(torch.stack([torch.ones(4), torch.zeros(4)]))
        model[1].bias.zero_()
    x, y = torch.eye(4), torch.zeros(4, dtype=torch.long)
    contribution = (math.log(2) - F.softplus(-d)) / 4  # loss drop when unit i is present
    values = shapley(model, "neuron", include=["0"], data=(x, y), samples=4096)["0.weight"]
    assert torch.equal(torch.argsort(values), torch.argsort(contribution))
    torch.testing.assert_close(values, contribution, rtol=0, atol=0.01)


def test_shapley_options_are_checked():
    model = _mlp()
    with pytest.raises(InvalidOptionError, match="needs data"):
        shapley(model)
    with pytest.raises(InvalidOptionError, match="samples must be"):
        shapley(model, data=_batch(), samples=3, fractions=2)
    with pytest.raises(InvalidOptionError, match="metric"):
        shapley(model, data=_batch(), metric="f1")
    with pytest.raises(InvalidOptionError, match=r"\(0, 1\)"):
        shapley(model, data=_batch(), fractions=[0.5, 1.0])
