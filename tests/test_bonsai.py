"""Bonsai (forward-only regression over randomly masked sub-models), bingo/baselines/bonsai.py.

Sub-model losses: one at a time (Bonsai's loop) and batched agree on fresh random masks (the
zoo's Llama with GQA heads, and an MLP), and both equal a float64 reference computed by zeroing
every parameter slice of the removed units in a model copy by hand. The regression finds
planted importances: units whose consumer columns are zero (provably dead) are removed first.
The run is deterministic under a seed, follows its schedule (the removal order is the score
order), leaves the model unchanged, and rejects bad options with one clear error.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zoo
from bingo.baselines.bonsai import (BonsaiScores, bonsai, compare_evaluation, sample_submodels,
                                    submodel_losses)
from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.models import lenet_300_100
from bingo.units import find_units


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared, oversubscribed 2-core machine two threads made these tiny
    models' linears ~50x slower (as tests/test_prune_structured.py found for convolutions)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _case(name: str, seed: int, dtype=torch.float32):
    """(model, tensor inputs, targets): the zoo's Llama (token ids, (N, T) next-token targets)
    or LeNet-300-100 on 8x8 inputs; fresh data of the seed, more rows than the zoo's."""
    generator = torch.Generator().manual_seed(seed)
    if name == "llama":
        model, _, _ = zoo.build("llama", seed % 1000)
        ids = torch.randint(0, zoo.VOCAB, (4, zoo.TOKENS + 1), generator=generator)
        return model.to(dtype), ids[:, :-1], ids[:, 1:]
    torch.manual_seed(seed)
    model = lenet_300_100(in_features=64).eval().to(dtype)
    x = torch.randn(8, 1, 8, 8, generator=generator, dtype=dtype)
    return model, x, torch.randint(0, 10, (8,), generator=generator)


def _masks(model, x, count: int, seed: int) -> dict[str, torch.Tensor]:
    layout = find_units(model, "structured", example_inputs=x[:1])
    masks = sample_submodels(layout, count, 0.3, seed=seed)
    # Sub-model 0 removes nothing; sub-model 1 every unit of the first group.
    for m in masks.values():
        m[0] = False
    first = next(iter(masks))
    masks[first][1] = True
    return masks


def _hand_zeroed_loss(model, x, y, removed: dict[str, torch.Tensor]) -> float:
    """Loss of a copy of ``model`` with every parameter slice of the ``removed`` units (score key
    -> bool (units,)) zeroed, from the structure layer's element masks."""
    copied = copy.deepcopy(model)
    layout = find_units(copied, "structured", example_inputs=x[:1])
    params = dict(copied.named_parameters())
    with torch.no_grad():
        for g in layout.groups:
            for name, mask in g.param_unit_masks(removed[g.param_name][None]).items():
                params[name].masked_fill_(mask[0], 0.0)
        out = copied(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))


@pytest.mark.parametrize("name", ["llama", "mlp"])
def test_sequential_and_batched_losses_agree_on_the_same_submodels(name):
    seed = _seed()
    model, x, y = _case(name, seed)
    before = copy.deepcopy(model.state_dict())
    masks = _masks(model, x, 10, seed)
    report = compare_evaluation(model, (x, y), masks)
    sequential, batched = report["sequential_losses"], report["batched_losses"]
    assert report["submodels"] == 10 and report["sequential_forward_passes"] == 10
    assert 1 <= report["batched_forward_passes"] < 10
    torch.testing.assert_close(batched, sequential, rtol=1e-5, atol=1e-5,
                               msg=f"seed {seed}")
    assert report["max_abs_difference"] == float((sequential - batched).abs().max())
    with torch.no_grad():
        dense = _hand_zeroed_loss(model, x, y, {k: m[0] for k, m in masks.items()})
    assert abs(float(sequential[0]) - dense) < 1e-5, f"seed {seed}"
    # The masks matter: removing a whole group and random thirds give other losses.
    assert float((sequential[1:] - sequential[0]).abs().min()) > 1e-6, f"seed {seed}"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("name", ["llama", "mlp"])
@pytest.mark.parametrize("evaluation", ["sequential", "batched"])
def test_submodel_losses_equal_a_hand_zeroed_copy_in_float64(name, evaluation):
    seed = _seed()
    model, x, y = _case(name, seed, torch.float64)
    masks = _masks(model, x, 4, seed)
    losses = submodel_losses(model, (x, y), masks, evaluation=evaluation)
    expected = torch.tensor([_hand_zeroed_loss(model, x, y, {k: m[i] for k, m in masks.items()})
                             for i in range(4)], dtype=torch.float64)
    # The model runs in float64; bingo_kernels' metrics return the mean cross-entropy as
    # float32, so agreement is to float32 rounding (a wrong removal moves the loss by >1e-4).
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-6, msg=f"seed {seed}")


def _planted(seed: int, hidden: int = 24, dead: int = 8):
    """An MLP whose hidden units all output 1 and whose correct-class logit is the sum of the
    kept live units' weights (each in [0.02, 0.06]); the other classes' logits are 6, so the
    loss, ``log(exp(z) + 3 exp(6)) - z``, is all but linear in the kept weights (and so is the
    perplexity over sub-models removing a fifth of them): every live unit lowers both when
    kept, by its weight. The ``dead`` units' consumer columns are zero: they change nothing."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 4)).eval()
    dead_units = torch.randperm(hidden, generator=generator)[:dead]
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(1.0)
        model[2].weight.zero_()
        model[2].bias.fill_(6.0)
        model[2].bias[0] = 0.0
        model[2].weight[0] = 0.02 + 0.04 * torch.rand(hidden, generator=generator)
        model[2].weight[:, dead_units] = 0.0
    x = torch.randn(6, 8, generator=generator)
    return model, x, torch.zeros(6, dtype=torch.long), set(dead_units.tolist())


@pytest.mark.parametrize("metric", ["perplexity", "loss"])
def test_dead_units_are_removed_first(metric):
    seed = _seed()
    model, x, y, dead = _planted(seed)
    scores = bonsai(model, data=(x, y), submodels=60, rounds=2, target_fraction=8 / 24,
                    submodel_fraction=0.2, metric=metric, seed=seed % 1000, progress=False)
    ranks = scores["0.weight"]
    lowest = set(torch.argsort(ranks)[:len(dead)].tolist())
    assert lowest == dead, f"seed {seed}: removed first {sorted(lowest)}, dead {sorted(dead)}"
    history = scores.result.history
    removed = set().union(*(set(h.removed["0.weight"].tolist()) for h in history))
    assert removed == dead, f"seed {seed}"
    # Keeping a live unit raises minus the metric; a dead unit's coefficient is near 0 (over
    # 300 seeds at most 0.03 of the smallest live one for the loss, 0.28 for the perplexity,
    # whose exp bends the response).
    first = history[0].importance["0.weight"]
    live = torch.tensor(sorted(set(range(24)) - dead))
    assert bool((first[live] > 0).all()), f"seed {seed}: {first}"
    bound = 0.5 if metric == "perplexity" else 0.1
    assert float(first[sorted(dead)].abs().max()) < bound * float(first[live].min()), \
        f"seed {seed}: {first}"


def test_fixed_count_sampling_ranks_within_a_group_but_centres_its_coefficients():
    """Bonsai's rule (exactly int(p * alive) + 1 removed per group) makes a group's keep
    indicators sum to a constant, so the minimum-norm fit centres the group's coefficients:
    the order inside the group is still found, the level is not (why "independent" is the
    default)."""
    seed = _seed()
    model, x, y, dead = _planted(seed)
    scores = bonsai(model, data=(x, y), submodels=60, rounds=1, target_fraction=8 / 24,
                    submodel_fraction=0.2, sampling="fixed", l1_weights=(0.0,),
                    seed=seed % 1000, progress=False)
    assert set(torch.argsort(scores["0.weight"])[:len(dead)].tolist()) == dead, f"seed {seed}"
    history = scores.result.history[0]
    coefficients = history.importance["0.weight"]
    assert abs(float(coefficients.sum())) < 1e-9 * float(coefficients.abs().max())
    removed_per_submodel = scores.result.removal_counts["0.weight"].sum() / 60
    assert float(removed_per_submodel) == int(0.2 * 24) + 1


def test_schedule_order_result_and_the_model_is_unchanged():
    seed = _seed()
    model, x, y = _case("llama", seed)
    before = copy.deepcopy(model.state_dict())
    scores = bonsai(model, data=(x, y), submodels=12, rounds=3, target_fraction=0.3,
                    l1_weights=(0.0,), calibration_examples=3, seed=seed % 1000,
                    progress=False)
    assert isinstance(scores, BonsaiScores) and scores.granularity == "structured"
    layout = find_units(model, "structured", example_inputs=x[:1])
    assert {k: tuple(v.shape) for k, v in scores.items()} == \
        {g.param_name: (g.num_units,) for g in layout.groups}
    assert all(v.dtype == torch.float32 for v in scores.values())
    flat = torch.cat([scores[g.param_name] for g in layout.groups])
    assert sorted(flat.tolist()) == [float(i) for i in range(layout.total)]  # a total order
    history = scores.result.history
    per_round = [sum(h.removed[k].numel() for k in scores) for h in history]
    assert per_round == [10, 10, 10]  # floor(0.3 * 100) spread over 3 rounds
    # Round r's removals rank below round r+1's, lowest coefficient first; survivors on top.
    previous = -1.0
    for h in history:
        ranks = [float(scores[k][u]) for k in scores for u in h.removed[k].tolist()]
        coefficients = [float(h.importance[k][u]) for k in scores for u in h.removed[k].tolist()]
        assert min(ranks) > previous
        previous = max(ranks)
        by_rank = [c for _, c in sorted(zip(ranks, coefficients))]
        assert by_rank == sorted(by_rank)
    assert previous == 29.0
    for group in scores:  # each group keeps a unit
        assert sum(h.removed[group].numel() for h in history) < scores[group].numel()
    result = scores.result
    assert result.evaluations == 36 and result.forward_passes == 36
    assert result.tokens_evaluated == 36 * 3 * y.shape[1]  # 3 of the 4 sequences
    assert result.mode == "sequential" and result.path is None
    assert result.rounds == 3 and result.total_seconds >= result.evaluation_seconds > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_deterministic_under_a_seed_and_the_same_in_both_modes():
    seed = _seed()
    model, x, y = _case("mlp", seed, torch.float64)
    options = dict(data=(x, y), submodels=20, rounds=2, target_fraction=0.2, progress=False)
    first = bonsai(model, seed=7, **options)
    again = bonsai(model, seed=7, **options)
    other = bonsai(model, seed=8, **options)
    batched = bonsai(model, seed=7, evaluation="batched", **options)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(torch.equal(first[k], batched[k]) for k in first), f"seed {seed}"
    assert any(not torch.equal(first[k], other[k]) for k in first)
    assert batched.result.mode == "batched" and batched.result.evaluations == 40
    assert batched.result.forward_passes < 40
    for a, b in zip(first.result.history, batched.result.history):
        assert a.l1_weight == b.l1_weight
        torch.testing.assert_close(a.importance["1.weight"], b.importance["1.weight"],
                                   equal_nan=True, rtol=1e-6, atol=1e-9)


def test_bad_options_raise_one_clear_error():
    model, x, y = _case("mlp", 0)
    data = (x, y)
    with pytest.raises(InvalidOptionError, match="needs data="):
        bonsai(model, progress=False)
    with pytest.raises(InvalidOptionError, match="'bonsai'.*granularity='neuron'"):
        bonsai(model, "neuron", data=data, progress=False)
    with pytest.raises(InvalidOptionError, match="submodels must be an integer >= 2"):
        bonsai(model, data=data, submodels=1, progress=False)
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(InvalidOptionError, match=r"target_fraction must be .* \(0, 1\)"):
            bonsai(model, data=data, target_fraction=fraction, progress=False)
    with pytest.raises(InvalidOptionError, match="submodel_fraction"):
        bonsai(model, data=data, submodel_fraction=1.0, progress=False)
    with pytest.raises(InvalidOptionError, match="evaluation"):
        bonsai(model, data=data, evaluation="parallel", progress=False)
    with pytest.raises(InvalidOptionError, match="l1_weights"):
        bonsai(model, data=data, l1_weights=(-1.0,), progress=False)
    with pytest.raises(InvalidOptionError, match="keeps one unit"):
        bonsai(model, data=data, target_fraction=0.999, rounds=1, progress=False)
    with pytest.raises(InvalidOptionError, match="fewer than rounds"):
        bonsai(model, data=data, target_fraction=0.001, rounds=2, progress=False)
    with pytest.raises(InputMismatchError, match="unknown score key"):
        compare_evaluation(model, data, {"nope": torch.zeros(2, 3, dtype=torch.bool)})
    with pytest.raises(InputMismatchError, match="bool"):
        compare_evaluation(model, data, {"1.weight": torch.zeros(2, 7, dtype=torch.bool)})
