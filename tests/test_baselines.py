"""bingo.baselines: score format matches TicketSearch, orderings, seeding, prune accepts them."""

import pytest
import torch
from torch import nn

import bingo
from bingo.baselines import BASELINES, baseline_scores, magnitude, random_scores
from bingo.errors import InvalidOptionError, NoPrunableLayersError
from bingo.models import lenet_300_100

GRANULARITIES = ("weight", "neuron")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return lenet_300_100(in_features=64)


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
    scores = baseline_scores(name, model, granularity)
    assert list(scores) == list(expected)
    for key, score in scores.items():
        assert score.shape == expected[key].shape
        assert score.dtype == torch.float32
        assert bool(torch.isfinite(score).all())


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_include_exclude_select_the_same_layers_as_ticket_search(name):
    model = _mlp()
    expected = _search_scores(model, "neuron", include=["3", "5"])
    assert list(baseline_scores(name, model, "neuron", include=["3", "5"])) == list(expected)
    assert list(baseline_scores(name, model, "weight", exclude="1")) == ["3.weight", "5.weight"]


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
    scores = baseline_scores(name, model, granularity)
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
    with pytest.raises(InvalidOptionError, match="baseline='lamp' is not supported"):
        baseline_scores("lamp", _mlp())
    with pytest.raises(InvalidOptionError, match="'magnitude'.*seed"):
        baseline_scores("magnitude", _mlp(), seed=1)
    with pytest.raises(InvalidOptionError, match="granularity='row'"):
        baseline_scores("random", _mlp(), "row")
    with pytest.raises(InvalidOptionError, match="seed must be an integer"):
        random_scores(_mlp(), seed=1.5)


def test_model_without_layers_raises():
    with pytest.raises(NoPrunableLayersError):
        magnitude(nn.Sequential(nn.ReLU()))
