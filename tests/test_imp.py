"""bingo.baselines.imp: IMP with rewinding - per-round counts, masks held through retraining,
rewinding, scores that reproduce every round's mask, neuron granularity, errors."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo.baselines import BASELINES, baseline_scores, imp
from bingo.baselines.imp import units_to_prune
from bingo.errors import InputMismatchError, InvalidOptionError


def _model(seed=0):
    torch.manual_seed(seed)
    # Weights per layer: 160, 200, 30 (output); neurons: 20, 10 (output 3 left out).
    return nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(),
                         nn.Linear(10, 3))


def _data(rows=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _masked_entries_are_zero(model, masks):
    """Every masked unit's weights (and, for neurons, bias) are zero in the forward's weights."""
    for key, keep in masks.items():
        module = model.get_submodule(key.rpartition(".")[0])
        weight = module.weight.detach()
        if keep.shape == weight.shape:
            assert bool((weight[~keep] == 0).all()), key
        else:
            assert bool((weight[~keep] == 0).all()) and bool((module.bias[~keep] == 0).all()), key


def _trainer(steps=5, calls=None, check=True):
    """A fast train_fn: SGD with momentum and weight decay, a fresh optimizer on every call."""
    x, y = _data()

    def train(model):
        if calls is not None:
            calls.append({k: v.detach().clone() for k, v in model.named_parameters()})
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        for _ in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if check:  # masks hold during retraining (the forward recomputes weight from them)
                model(x)
                for name, module in model.named_modules():
                    if hasattr(module, "weight_mask"):
                        assert bool((module.weight[module.weight_mask == 0] == 0).all()), name
                        assert bool((module.weight_orig[module.weight_mask == 0] == 0).all())

    return train


def _accuracy(model):
    x, y = _data(64, 1)
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def test_units_to_prune_is_floor_of_rate_times_remaining():
    assert [units_to_prune(n, 0.2) for n in (160, 128, 103, 15, 4, 1)] == [32, 25, 20, 3, 0, 0]
    assert [units_to_prune(n, 0.1) for n in (30, 27, 25)] == [3, 2, 2]
    assert units_to_prune(2, 0.9) == 1  # never the last unit


def test_weight_rounds_prune_exact_counts_and_keep_masks_through_training():
    model = _model()
    w0 = copy.deepcopy(model.state_dict())
    _trainer(steps=10, check=False)(model)  # the dense training (round 0)
    result = imp(model, _trainer(), rounds=3, rewind_state=w0, eval_fn=_accuracy,
                 progress=False)
    kept = [{k: int(m.sum()) for k, m in r.unit_masks.items()} for r in result.rounds]
    # Hidden layers lose floor(20%) of what remains, the output layer floor(10%).
    assert [k["0.weight"] for k in kept] == [160, 128, 103, 83]
    assert [k["2.weight"] for k in kept] == [200, 160, 128, 103]
    assert [k["4.weight"] for k in kept] == [30, 27, 25, 23]
    assert result.output_layer == "4.weight"
    total = 390
    for r, k in zip(result.rounds, kept):
        assert r.total_units == total and r.pruned_units == total - sum(k.values())
        assert r.sparsity == pytest.approx(r.pruned_units / total)
        assert r.weight_sparsity == pytest.approx(r.sparsity)  # each unit is one weight here
        assert r.training_equivalents == 1 + r.round
        assert isinstance(r.accuracy, float)
    assert [r.round for r in result.rounds] == [0, 1, 2, 3]
    assert result.rounds[0].seconds == 0 and all(r.seconds > 0 for r in result.rounds[1:])
    # Masks are nested, and the final model is plain (no reparametrisation) with zeros.
    for before, after in zip(result.rounds, result.rounds[1:]):
        for key in before.unit_masks:
            assert not bool((after.unit_masks[key] & ~before.unit_masks[key]).any())
    assert not any(hasattr(m, "weight_orig") for m in model.modules())
    assert sorted(dict(model.named_parameters())) == sorted(w0)
    _masked_entries_are_zero(model, result.final.unit_masks)
    json.dumps(result.summary())


def test_rewind_restores_the_rewind_state_for_survivors_before_training():
    model = _model()
    w0 = copy.deepcopy(model.state_dict())
    _trainer(steps=10, check=False)(model)
    trained = copy.deepcopy(model.state_dict())
    calls = []
    result = imp(model, _trainer(steps=0, calls=calls), rounds=2, rewind_state=w0,
                 progress=False)
    assert len(calls) == 2
    for seen, r in zip(calls, result.rounds[1:]):
        for name, value in seen.items():  # names as train_fn sees them (weight_orig)
            base = name.replace("_orig", "")
            mask = r.unit_masks.get(base)
            expected = w0[base] if mask is None else w0[base] * mask
            assert torch.equal(value, expected), name
    # Round 1 pruned by the trained magnitudes; round 2 (no-op training) by |W0| of survivors.
    first = result.rounds[1].unit_masks["0.weight"]
    pruned = ~first
    assert trained["0.weight"].abs()[pruned].max() <= trained["0.weight"].abs()[first].min()
    second = result.rounds[2].unit_masks["0.weight"]
    newly = first & ~second
    assert w0["0.weight"].abs()[newly].max() <= w0["0.weight"].abs()[second].min()


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_scores_reproduce_every_rounds_mask(granularity):
    model = _model()
    w0 = copy.deepcopy(model.state_dict())
    _trainer(steps=10, check=False)(model)
    result = imp(model, _trainer(), rounds=4, granularity=granularity, rate=0.3,
                 rewind_state=w0, progress=False)
    scores = result.scores()
    assert all(s.dtype == torch.float32 for s in scores.values())
    for r in result.rounds:
        pruned = bingo.prune(model, scores, sparsity=r.sparsity, progress=False,
                             structured=False)
        assert pruned.pruned_units == r.pruned_units
        for key, keep in r.unit_masks.items():
            assert torch.equal(pruned.unit_masks[key], keep), (r.round, key)
        assert result.mask_at(r.sparsity) is r.unit_masks
    with pytest.raises(InvalidOptionError, match="no round reaches"):
        result.mask_at(0.99)


def test_neuron_granularity_prunes_rows_and_bias_and_leaves_the_output_layer():
    model = _model()
    w0 = copy.deepcopy(model.state_dict())
    _trainer(steps=10, check=False)(model)
    result = imp(model, _trainer(), rounds=3, granularity="neuron", rewind_state=w0,
                 keep_states=True, progress=False)
    assert result.output_layer is None and list(result.pruned_in) == ["0.weight", "2.weight"]
    kept = [{k: int(m.sum()) for k, m in r.unit_masks.items()} for r in result.rounds]
    assert [k["0.weight"] for k in kept] == [20, 16, 13, 11]
    assert [k["2.weight"] for k in kept] == [10, 8, 7, 6]
    final = result.final
    assert final.weight_sparsity == pytest.approx((9 * 8 + 4 * 20) / (160 + 200))
    _masked_entries_are_zero(model, final.unit_masks)
    # Each round's kept state loads into a fresh model and has that round's zeros.
    for r in result.rounds:
        fresh = _model(1)
        fresh.load_state_dict(r.state)
        _masked_entries_are_zero(fresh, r.unit_masks)
    assert torch.equal(result.final.state["0.weight"], model[0].weight.detach())


def test_registry_entry_needs_its_options_and_leaves_the_model_alone():
    model = _model()
    w0 = copy.deepcopy(model.state_dict())
    assert "imp" in BASELINES
    with pytest.raises(InvalidOptionError, match="train_fn"):
        baseline_scores("imp", model, rewind_state=w0, rounds=1)
    with pytest.raises(InvalidOptionError, match="rewind_state"):
        baseline_scores("imp", model, train_fn=_trainer(), rounds=1)
    scores = baseline_scores("imp", model, "neuron", train_fn=_trainer(), rewind_state=w0,
                             rounds=2)
    assert list(scores) == ["0.weight", "2.weight"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, w0[key])


def test_bad_rewind_state_and_options_are_clear_errors():
    model = _model()
    w0 = copy.deepcopy(model.state_dict())
    with pytest.raises(InvalidOptionError, match="rewind_state is required"):
        imp(model, _trainer(), rounds=1, progress=False)
    with pytest.raises(InputMismatchError, match="no entry '4.bias'"):
        imp(model, _trainer(), rounds=1, rewind_state={k: v for k, v in w0.items()
                                                       if k != "4.bias"}, progress=False)
    with pytest.raises(InputMismatchError, match="shape"):
        imp(model, _trainer(), rounds=1, rewind_state=dict(w0, **{"2.bias": torch.zeros(3)}),
            progress=False)
    with pytest.raises(InputMismatchError, match="live tensor"):
        imp(model, _trainer(), rounds=1, rewind_state=model.state_dict(), progress=False)
    with pytest.raises(InvalidOptionError, match="rate"):
        imp(model, _trainer(), rounds=1, rate=1.0, rewind_state=w0, progress=False)
    with pytest.raises(InvalidOptionError, match="rounds"):
        imp(model, _trainer(), rounds=0, rewind_state=w0, progress=False)
    # Nothing was changed by the refused calls.
    assert not any(hasattr(m, "weight_orig") for m in model.modules())


def test_a_failing_train_fn_leaves_a_plain_model():
    model = _model()
    w0 = copy.deepcopy(model.state_dict())

    def broken(_model):
        raise RuntimeError("out of data")

    with pytest.raises(RuntimeError, match="out of data"):
        imp(model, broken, rounds=1, rewind_state=w0, progress=False)
    assert not any(hasattr(m, "weight_orig") for m in model.modules())
