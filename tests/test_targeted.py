"""Targeted search (bingo.targeted): incremental evaluation, greedy elimination, joint check,
weight allocation, conv shrinking, LAMP+Taylor, and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo.baselines import baseline_scores
from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.targeted import (AllocationConfig, EliminationConfig, allocate, eliminate,
                            targeted_prune, targeted_scores)
from bingo.targeted.elimination import _priority
from bingo.targeted.incremental import SequentialEvaluator, scored_layers
from bingo.targeted.shrink import shrink_sequential


def _mlp(activation=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), activation(), nn.Linear(9, 7),
                         activation(), nn.Linear(7, 4))


def _convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(5, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.ReLU(), nn.Linear(8, 3))


def _full(model: nn.Sequential, index: int, unit: int, x, y) -> tuple[float, float]:
    """Loss and accuracy with the unit removed as bingo.prune removes it: a full forward."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone[index].weight[unit] = 0.0
        clone[index].bias[unit] = 0.0
        logits = clone(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


CASES = {
    "mlp-relu": (lambda: _mlp(), (40, 3, 4)),
    "mlp-sigmoid": (lambda: _mlp(nn.Sigmoid), (40, 3, 4)),  # act(0) = 0.5: a non-zero image
    "convnet": (_convnet, (30, 2, 8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("evaluator", ["rank", "masked"])
def test_incremental_evaluation_equals_full_forwards(case, evaluator):
    seed = int(torch.randint(0, 2 ** 31, ()))
    torch.manual_seed(seed)
    build, shape = CASES[case]
    model = build().eval()
    x = torch.randn(*shape)
    y = torch.randint(0, model[-1].out_features, (shape[0],))
    layers = scored_layers(model)
    # A partially pruned model: the evaluator sees the zeroed units as already gone.
    with torch.no_grad():
        model[layers[0].index].weight[1] = 0.0
        model[layers[0].index].bias[1] = 0.0
    ev = SequentialEvaluator(model, x, y, memory_budget=64)  # tiny budget: many chunks
    for layer in layers:
        units = model[layer.index].weight.shape[0]
        loss, acc = ev.evaluate(layer, torch.arange(units), evaluator)
        for unit in range(units):
            want_loss, want_acc = _full(model, layer.index, unit, x, y)
            assert loss[unit].item() == pytest.approx(want_loss, rel=1e-4, abs=1e-5), (
                seed, layer.key, unit)
            assert acc[unit].item() == pytest.approx(want_acc), (seed, layer.key, unit)


def test_refresh_reports_the_models_own_loss():
    torch.manual_seed(0)
    model = _mlp().eval()
    x, y = torch.randn(20, 12), torch.randint(0, 4, (20,))
    ev = SequentialEvaluator(model, x, y)
    assert ev.loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)


@pytest.mark.parametrize("start", [0, 3, 7])
def test_refresh_from_a_child_equals_a_full_refresh(start):
    torch.manual_seed(int(torch.randint(0, 2 ** 31, ())))
    model = _convnet().eval()
    x, y = torch.randn(16, 2, 8, 8), torch.randint(0, 3, (16,))
    ev = SequentialEvaluator(model, x, y)
    with torch.no_grad():  # a change at child `start` leaves the children before it as cached
        model[start].weight[0] = 0.0
    partial = ev.refresh(start)
    outputs = [o.clone() for o in ev.outputs]
    assert partial == ev.refresh(0)
    assert all(torch.equal(a, b) for a, b in zip(outputs, ev.outputs))
    assert ev.loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-5)


def _data(model: nn.Module, n: int = 256, features: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    with torch.no_grad():
        y = model(x).argmax(-1)
    return x, y


def test_dead_neurons_go_first_and_the_only_useful_one_last():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        dead = [2, 5, 6]
        model[0].weight[dead] = 0.0
        model[0].bias[dead] = -1.0           # ReLU(-1) = 0 on every input: provably dead
        model[2].weight[:, 3] *= 20.0        # neuron 3 dominates the logits
    x, y = _data(model)
    result = eliminate(model, (x, y), EliminationConfig(per_step=1, stop_drop=1.0, lazy=0),
                       progress=False)
    scores = result.scores["0.weight"]
    ev = SequentialEvaluator(model, x, y)
    loss, _ = ev.evaluate(scored_layers(model)[0], torch.arange(8))
    damage = loss.double() - ev.loss
    assert damage[dead].abs().max() < 1e-6      # removing a dead unit changes nothing
    harmful = [u for u in range(8) if damage[u] > 1e-3]
    assert 3 in harmful
    position = {unit: i for i, (_, unit) in enumerate(result.order)}
    # No unit whose removal hurts goes before a dead one (a live unit whose removal *lowers*
    # the loss may, rightly, go first).
    assert max(position[u] for u in dead) < min(position.get(u, 99) for u in harmful)
    assert scores[3] == scores.max()          # removed last (or kept)
    assert result.order[:3] and all(key == "0.weight" for key, _ in result.order)
    assert sorted(scores.tolist()) == [float(i) for i in range(8)]  # a strict ranking


def _redundant_pair() -> tuple[nn.Sequential, tuple]:
    """Hidden a = b = relu(s), e = relu(t); class 1 needs a + b, class 0 needs e. Removing a or b
    alone barely hurts; removing both is as bad as removing e."""
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[0.0, 0.0, 10.0], [10.0, 10.0, 0.0]]))
        model[2].bias.fill_(-5.0)
    x = torch.tensor([[1.0, 0.0]] * 8 + [[-1.0, 1.0]] * 8)
    y = torch.tensor([1] * 8 + [0] * 8)
    return model, (x, y)


def test_joint_check_backs_off_on_a_jointly_harmful_pair():
    model, data = _redundant_pair()
    config = EliminationConfig(per_step=2, stop_drop=1.0, lazy=0)
    checked = eliminate(model, data, config, progress=False)
    assert checked.backoffs >= 1
    first = checked.history[0]
    assert first["backoff"] and first["actual"] > 100 * first["predicted"]
    assert first["removed"] == 1                  # only the best unit of the step went
    unchecked = eliminate(model, data, EliminationConfig(per_step=2, stop_drop=1.0, lazy=0,
                                                         joint_check=False), progress=False)
    assert unchecked.backoffs == 0
    assert {u for _, u in unchecked.order[:2]} == {0, 1}  # the pair, removed together


def test_scores_go_to_prune_and_shrink():
    torch.manual_seed(2)
    model = _mlp().eval()
    x, y = _data(model)
    scores = baseline_scores("targeted", model, "neuron", data=(x, y), per_step=2)
    assert scores.result.order and set(scores) == {"1.weight", "3.weight"}
    result = bingo.prune(model, scores, sparsity=0.5, structured=True, progress=False)
    small = result.structured.model
    assert sum(m.out_features for m in small if isinstance(m, nn.Linear)) < 9 + 7 + 4
    with torch.no_grad():
        assert torch.allclose(small(x), result.model(x), atol=1e-5)
    # Removed first = lowest score: the first removed unit is pruned at the smallest sparsity.
    key, unit = scores.result.order[0]
    one = bingo.prune(model, scores, sparsity=1 / 16, structured=False, progress=False)
    assert not one.unit_masks[key][unit]


def test_targeted_prune_is_the_search_then_a_reconstructed_prune():
    torch.manual_seed(5)
    model = _mlp().eval()
    x, y = _data(model)
    result = targeted_prune(model, (x, y), sparsity=0.5, per_step=2)
    scores = targeted_scores(model, "neuron", data=(x, y), per_step=2)
    manual = bingo.prune(model, scores, sparsity=0.5, progress=False,
                         reconstruct=bingo.LeastSquaresReconstruction((x, y)))
    assert result.reconstructed == manual.reconstructed == ["3", "5"]
    assert all(torch.equal(result.unit_masks[k], manual.unit_masks[k]) for k in scores)
    # With a sparsity the elimination stops there; what it removed is what the full one did.
    removed = len(result.search.order)
    assert removed == result.pruned_units < len(scores.result.order)
    assert result.search.order == scores.result.order[:removed]
    with torch.no_grad():
        assert torch.allclose(result.model(x), manual.model(x))
        masked = targeted_prune(model, (x, y), sparsity=0.5, per_step=2, reconstruct=False)
        assert masked.reconstructed is None and not torch.allclose(masked.model(x),
                                                                   result.model(x))
    floor = targeted_prune(model, (x, y), floor=0.8, eval_fn=lambda m: float(
        (m(x).argmax(-1) == y).float().mean()), per_step=2)
    assert floor.accuracy >= 0.8


def test_conv_shrink_matches_the_masked_model():
    torch.manual_seed(3)
    model = _convnet().eval()
    x = torch.randn(16, 2, 8, 8)
    y = torch.randint(0, 3, (16,))
    scores = targeted_scores(model, "neuron", data=(x, y), stop_drop=1.0)
    result = bingo.prune(model, scores, sparsity=0.4, structured=False, progress=False)
    small = shrink_sequential(model, result.unit_masks)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(small(x), result.model(x), atol=1e-5)


def _macs(model: nn.Sequential, x: torch.Tensor) -> int:
    """Multiply-adds per example of ``model``'s Linear / Conv2d layers (counted by hooks)."""
    total = []

    def count(module, _inputs, output):
        if isinstance(module, nn.Linear):
            total.append(module.in_features * module.out_features)
        else:
            total.append(module.weight.numel() * output[0, 0].numel())

    handles = [m.register_forward_hook(count) for m in model
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return sum(total)


def test_macs_saving_is_what_shrinking_one_unit_saves():
    torch.manual_seed(4)
    model = _convnet().eval()
    x = torch.randn(8, 2, 8, 8)
    ev = SequentialEvaluator(model, x, torch.randint(0, 3, (8,)))
    dense = _macs(model, x)
    for layer in scored_layers(model):
        keep = {l.key: torch.ones(model[l.index].weight.shape[0], dtype=torch.bool)
                for l in scored_layers(model)}
        keep[layer.key][1] = False
        saved = dense - _macs(shrink_sequential(model, keep), x)
        assert ev.unit_macs(layer) == saved, layer.key
    # Damage per saving: a harmful removal is cheaper per multiply-add when it saves more, a
    # helpful one (negative damage) ranks first when it saves more.
    damage = torch.tensor([0.2, 0.2, -0.1, -0.1], dtype=torch.float64)
    saving = torch.tensor([1.0, 2.0, 1.0, 2.0], dtype=torch.float64)
    assert torch.argsort(_priority(damage, saving)).tolist() == [3, 2, 1, 0]
    result = eliminate(model, (x, ev.targets), EliminationConfig(saving="macs", stop_drop=1.0),
                       progress=False)
    assert sorted(torch.cat(list(result.scores.values())).tolist()) == [float(i) for i in
                                                                        range(5 + 6 + 8)]
    with pytest.raises(InvalidOptionError, match="saving"):
        eliminate(model, (x, ev.targets), EliminationConfig(saving="flops"), progress=False)


def test_refits_during_elimination_keep_a_strict_ranking():
    torch.manual_seed(6)
    model = _mlp().eval()
    x, y = _data(model)
    before = copy.deepcopy(model.state_dict())
    plain = eliminate(model, (x, y), EliminationConfig(per_step=1, stop_drop=1.0),
                      progress=False)
    refit = eliminate(model, (x, y), EliminationConfig(per_step=1, stop_drop=1.0,
                                                        refit_every=2), progress=False)
    assert plain.refits == 0 and refit.refits >= 5
    assert refit.refreshes == plain.refreshes + refit.refits
    assert sorted(torch.cat(list(refit.scores.values())).tolist()) == [float(i)
                                                                       for i in range(16)]
    # Refits change the model later damages are measured on, hence (here) the order.
    assert refit.order != plain.order
    # The caller's model is never touched.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_iterative_refit_follows_imps_schedule_on_refitted_weights():
    torch.manual_seed(7)
    model = _mlp().eval()
    x, y = _data(model, n=300)
    scores = targeted_scores(model, "weight", data=(x, y), search="iterative", max_sparsity=0.5)
    flat = torch.cat([v.reshape(-1) for v in scores.values()])
    assert flat.unique().numel() == flat.numel()                 # a strict ranking
    assert [round(r["sparsity"], 4) for r in scores.result.rounds] == [0.2, 0.36, 0.488, 0.5]
    lamp = baseline_scores("lamp", model, "weight")
    first = bingo.prune(model, scores, sparsity=0.2, progress=False).unit_masks
    assert all(torch.equal(first[k], bingo.prune(model, lamp, sparsity=0.2, progress=False)
                           .unit_masks[k]) for k in lamp)
    # Round two ranks the weights refitted after round one, what round one removed excluded.
    masks = bingo.prune(model, lamp, sparsity=0.2, progress=False).masks
    refitted = copy.deepcopy(model)
    rec = bingo.LeastSquaresReconstruction((x, y))
    rec.prepare(model)
    with torch.no_grad():
        for name, mask in masks.items():
            dict(refitted.named_parameters())[name].mul_(mask)
    rec(refitted, masks)
    again = baseline_scores("lamp", refitted, "weight")
    again = {k: torch.where(first[k], v, v.min() - 1) for k, v in again.items()}
    second = bingo.prune(refitted, again, sparsity=0.36, progress=False).unit_masks
    mine = bingo.prune(model, scores, sparsity=0.36, progress=False).unit_masks
    assert all(torch.equal(second[k], mine[k]) for k in mine)
    assert not all(torch.equal(mine[k], bingo.prune(model, lamp, sparsity=0.36, progress=False)
                               .unit_masks[k]) for k in mine)
    neurons = targeted_scores(model, "neuron", data=(x, y), search="iterative",
                              ranking="magnitude", max_sparsity=0.6)
    assert sorted(torch.cat(list(neurons.values())).tolist()) == [float(i) for i in range(16)]
    with pytest.raises(InvalidOptionError, match="ranks"):
        targeted_scores(model, "neuron", data=(x, y), search="allocation")
    with pytest.raises(InvalidOptionError, match="rate"):
        targeted_scores(model, "weight", data=(x, y), search="iterative", rate=1.5)


def test_weight_allocation_scores_every_weight_once():
    torch.manual_seed(4)
    model = _mlp().eval()
    x, y = _data(model)
    result = allocate(model, (x, y), AllocationConfig(block=0.1, max_sparsity=0.8),
                      progress=False)
    flat = torch.cat([s.reshape(-1) for s in result.scores.values()])
    assert sorted(flat.tolist()) == [float(i) for i in range(flat.numel())]
    for key, score in result.scores.items():
        assert score.shape == model.get_parameter(key).shape
        # Inside a layer the order is magnitude's.
        weight = model.get_parameter(key).detach().abs().reshape(-1)
        order = torch.argsort(score.reshape(-1))
        assert bool((weight[order].diff() >= 0).all())
    pruned = bingo.prune(model, result.scores, sparsity=0.5, progress=False)
    assert pruned.sparsity == pytest.approx(0.5, abs=0.01)


def test_lamp_taylor_is_lamp_of_taylor_saliency():
    torch.manual_seed(5)
    model = _mlp().eval()
    x, y = _data(model)
    scores = baseline_scores("lamp_taylor", model, "weight", data=[(x, y)])
    for value in scores.values():
        assert float(value.max()) == pytest.approx(1.0) and float(value.min()) >= 0.0
    taylor = baseline_scores("taylor", model, "weight", data=[(x, y)])
    for key in scores:  # same order as Taylor inside each layer
        a, b = scores[key].reshape(-1), taylor[key].reshape(-1)
        assert torch.equal(torch.argsort(a, stable=True)[-5:], torch.argsort(b, stable=True)[-5:])


def test_bad_inputs_raise_clear_errors():
    model = _mlp()
    x, y = _data(model.eval())
    # Any model is searched now (its unit groups); one that cannot run says so before the search.
    with pytest.raises(InputMismatchError, match="forward fails on one example"):
        eliminate(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)]), (x, y), progress=False)
    with pytest.raises(InvalidOptionError, match="per_step"):
        eliminate(model, (x, y), EliminationConfig(per_step=0), progress=False)
    with pytest.raises(InvalidOptionError, match="evaluator"):
        eliminate(model, (x, y), EliminationConfig(evaluator="nope"), progress=False)
    with pytest.raises(InvalidOptionError, match="data="):
        targeted_scores(model, "neuron")
    with pytest.raises(InvalidOptionError, match="unknown option"):
        targeted_scores(model, "neuron", data=(x, y), blocks=3)
    with pytest.raises(InputMismatchError, match="must match"):
        eliminate(model, (x, y[:3]), progress=False)
    with pytest.raises(InvalidOptionError, match="block"):
        allocate(model, (x, y), AllocationConfig(block=0.0), progress=False)
    with pytest.raises(InputMismatchError, match="output layer"):
        shrink_sequential(_convnet(), {"9.weight": torch.tensor([True, False, True])})
