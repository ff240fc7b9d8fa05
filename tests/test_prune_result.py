"""What a user does with a PruneResult: copy it, make the pruning permanent, watch its progress."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import bingo
from bingo import pruning


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


def _pruned(granularity: str = "weight") -> bingo.PruneResult:
    model = _mlp()
    if granularity == "weight":
        scores = {"0.weight": torch.rand(8, 6), "2.weight": torch.rand(4, 8)}
    else:
        scores = {"0.weight": torch.rand(8)}
    return bingo.prune(model, scores, sparsity=0.5, progress=False, structured=False)


def _train_step(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(5, 6)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_pruned_model_deep_copies_before_and_after_training(granularity):
    result = _pruned(granularity)
    x = torch.randn(3, 6)
    twin = copy.deepcopy(result)
    assert torch.equal(twin.model(x), result.model(x))
    _train_step(result.model)  # a forward with gradients: torch's reparametrisation is non-leaf
    clone = copy.deepcopy(result.model)
    assert torch.equal(clone(x), result.model(x))
    pickle.loads(pickle.dumps(result.model))
    torch.save(result.model, io.BytesIO())
    # The copy is still masked and still trains with the mask held.
    _train_step(clone)
    for name, mask in result.masks.items():
        module_name, _, pname = name.rpartition(".")
        assert (getattr(clone.get_submodule(module_name), pname)[~mask] == 0).all()


def test_training_the_masked_model_still_reaches_weight_orig():
    result = _pruned()
    before = result.model[0].weight_orig.detach().clone()
    _train_step(result.model)
    assert not torch.equal(result.model[0].weight_orig, before)


def test_remove_makes_pruning_permanent():
    result = _pruned("neuron")
    x = torch.randn(3, 6)
    expected = result.model(x)
    model = result.remove()
    assert model is result.model
    assert not torch_prune.is_pruned(model)
    assert not any(n.endswith(("_orig", "_mask")) for n in model.state_dict())
    assert isinstance(model[0].weight, nn.Parameter)
    assert not model[0]._forward_hooks
    assert torch.equal(model(x), expected)
    assert set(model.state_dict()) == set(_mlp().state_dict())
    assert (model[0].weight[~result.masks["0.weight"]] == 0).all()
    result.remove()  # twice: nothing left to do
    copy.deepcopy(model)
    fresh = _mlp()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), expected)


def test_torch_remove_on_one_layer_leaves_the_hook_harmless():
    result = _pruned()
    torch_prune.remove(result.model[0], "weight")
    _train_step(result.model)
    copy.deepcopy(result.model)


class _Bar:
    """Stands in for tqdm; records the total at every update."""

    def __init__(self, total=None, **_):
        self.total, self.n, self.totals = total, 0, []

    def update(self, k=1):
        self.n += k
        self.totals.append(self.total)

    def set_postfix(self, **_):
        pass

    def refresh(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("floor", [0.0, 0.5, 0.9])
def test_progress_total_is_fixed_before_the_first_evaluation(monkeypatch, floor):
    bars = []

    def make(**kwargs):
        bars.append(_Bar(**kwargs))
        return bars[-1]

    monkeypatch.setattr(pruning, "tqdm", make)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 3))
    scores = {"0.weight": torch.rand(64)}
    # accuracy falls linearly with the share of neurons pruned
    eval_fn = lambda m: float((m[0].weight != 0).any(1).float().mean())  # noqa: E731
    result = bingo.prune(model, scores, floor=floor, eval_fn=eval_fn, structured=False)
    bar, = bars
    assert len(set(bar.totals)) == 1  # the total never moved while the search ran
    assert bar.totals[0] >= bar.n == len(result.history)
    assert bar.total == bar.n  # and the bar closes at the evaluations made
