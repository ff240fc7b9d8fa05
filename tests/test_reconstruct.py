"""Least-squares reconstruction (bingo.reconstruct): each refit against an independent float64
least-squares oracle (torch.linalg.lstsq), its use inside bingo.prune, and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo.baselines import baseline_scores
from bingo.errors import InputMismatchError, InvalidOptionError, NonFiniteError
from bingo.reconstruct import LeastSquaresReconstruction
from bingo.reconstruct.solve import masked_update as _masked_update
from bingo.targeted.shrink import shrink_sequential

# With a damping this small the ridge fit is the plain least-squares fit to ~1e-8 relative.
TINY = 1e-12


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10), nn.ReLU(),
                         nn.Linear(10, 4)).double()


def _lstsq_with_intercept(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising ||x W^T + b - y||^2 (float64 oracle)."""
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    solution = torch.linalg.lstsq(design, y, driver="gelsd").solution
    return solution[:-1].T, solution[-1]


def _neuron_masks(model: nn.Sequential, layer: int, pruned: list[int]) -> dict:
    keep = torch.ones(model[layer].weight.shape[0], dtype=torch.bool)
    keep[pruned] = False
    weight = model[layer].weight
    view = keep.view(-1, *([1] * (weight.dim() - 1)))
    return {f"{layer}.weight": view.expand_as(weight).clone(),
            f"{layer}.bias": keep}


def _write(model: nn.Module, masks: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].dtype))


def test_neuron_refit_is_the_least_squares_fit_of_the_dense_outputs():
    model = _mlp(0)
    dense = copy.deepcopy(model)
    x = torch.randn(600, 12, dtype=torch.float64)
    masks = _neuron_masks(model, 0, [1, 4, 5, 9, 13])
    rec = LeastSquaresReconstruction(x, damping=TINY)
    rec.prepare(model)
    _write(model, masks)
    first = model[0].weight.detach().clone()
    rec(model, masks)
    assert rec.refitted == ["2", "4"]
    # Layer 0 loses whole rows of a dense input: its kept rows are already the exact fit.
    assert torch.equal(model[0].weight, first)
    assert torch.all(model[0].weight[[1, 4, 5, 9, 13]] == 0) and torch.all(
        model[0].bias[[1, 4, 5, 9, 13]] == 0)
    with torch.no_grad():
        h1 = torch.relu(model[0](x))
        kept = [j for j in range(16) if j not in (1, 4, 5, 9, 13)]
        w2, b2 = _lstsq_with_intercept(h1[:, kept], dense[2](torch.relu(dense[0](x))))
        assert torch.allclose(model[2].weight[:, kept], w2, atol=1e-6)
        assert torch.allclose(model[2].bias, b2, atol=1e-6)
        # Columns of the pruned units see constant zeros: left as they were.
        assert torch.equal(model[2].weight[:, [1, 4]], dense[2].weight[:, [1, 4]])
        h2 = torch.relu(model[2](h1))
        varying = h2.var(0) > 0
        w3, b3 = _lstsq_with_intercept(h2[:, varying], dense(x))
        assert torch.allclose(model[4].weight[:, varying], w3, atol=1e-6)
        assert torch.allclose(model[4].bias, b3, atol=1e-6)


def test_nothing_masked_changes_nothing():
    model = _mlp(1)
    before = copy.deepcopy(model.state_dict())
    rec = LeastSquaresReconstruction(torch.randn(200, 12, dtype=torch.float64))
    rec.prepare(model)
    rec(model, {"2.weight": torch.ones(10, 16, dtype=torch.bool)})
    assert rec.refitted == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _layer_error(layer: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((layer(x) - y) ** 2).sum())


@pytest.mark.parametrize("bias", [True, False])
def test_weight_masks_keep_zeros_and_reach_the_constrained_optimum(bias):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 6, bias=bias)).double()
    dense = copy.deepcopy(model)
    # Strongly correlated inputs: where a column-order update falls short of the optimum.
    x = torch.randn(500, 20, dtype=torch.float64) @ torch.randn(20, 20, dtype=torch.float64)
    y = dense(x).detach()
    keep = torch.rand(6, 20) > 0.7
    keep[0] = False
    keep[0, 3] = True  # a row that keeps one weight
    masks = {"0.weight": keep}
    _write(model, masks)
    masked_error = _layer_error(model[0], x, y)
    errors = {}
    for name, exact_features in (("exact", 1024), ("obs", 1)):
        work = copy.deepcopy(model)
        rec = LeastSquaresReconstruction(x, damping=TINY, exact_features=exact_features)
        rec.prepare(dense)
        rec(work, masks)
        assert torch.all(work[0].weight[~keep] == 0), name
        errors[name] = _layer_error(work[0], x, y)
    # The exact optimum, row by row: least squares on each row's own kept inputs.
    optimum = 0.0
    for row in range(6):
        cols = keep[row].nonzero().flatten()
        if bias:
            w, b = _lstsq_with_intercept(x[:, cols], y[:, row:row + 1])
            fit = x[:, cols] @ w.T + b
        else:
            fit = x[:, cols] @ torch.linalg.lstsq(x[:, cols], y[:, row:row + 1]).solution
        optimum += float(((fit - y[:, row:row + 1]) ** 2).sum())
    assert errors["exact"] == pytest.approx(optimum, rel=1e-6)
    # The column-order (SparseGPT) update: never below the optimum, always below plain masking.
    assert optimum * (1 - 1e-9) <= errors["obs"] < masked_error


def test_blocked_masked_update_equals_the_column_by_column_one():
    torch.manual_seed(3)
    x = torch.randn(300, 40, dtype=torch.float64)
    hessian = x.T @ x / 300 + 1e-3 * torch.eye(40, dtype=torch.float64)
    weight = torch.randn(7, 40, dtype=torch.float64)
    keep = torch.rand(7, 40) > 0.5
    one = _masked_update(weight, keep, hessian, block=1)
    blocked = _masked_update(weight, keep, hessian, block=16)
    whole = _masked_update(weight, keep, hessian, block=128)
    assert torch.all(one[~keep] == 0)
    assert torch.allclose(one, blocked, atol=1e-10) and torch.allclose(one, whole, atol=1e-10)


def _conv_net(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(5 * 6 * 6, 3)).double()


def test_conv_channel_refit_is_the_least_squares_fit_over_patches_and_shrinks_exactly():
    model = _conv_net(4)
    dense = copy.deepcopy(model)
    x = torch.randn(300, 1, 8, 8, dtype=torch.float64)
    masks = _neuron_masks(model, 0, [2])
    rec = LeastSquaresReconstruction(x, damping=TINY)
    rec.prepare(model)
    _write(model, masks)
    rec(model, masks)
    assert rec.refitted == ["2", "5"]
    with torch.no_grad():
        h1 = torch.relu(model[0](x))
        patches = F.unfold(h1, 3, padding=1).transpose(1, 2).reshape(-1, 36)
        target = dense[2](torch.relu(dense[0](x))).flatten(2).transpose(1, 2).reshape(-1, 5)
        varying = patches.var(0) > 0
        w, b = _lstsq_with_intercept(patches[:, varying], target)
        assert torch.allclose(model[2].weight.reshape(5, 36)[:, varying], w, atol=1e-6)
        assert torch.allclose(model[2].bias, b, atol=1e-6)
        small = shrink_sequential(model, {"0.weight": masks["0.bias"]})
        assert small[0].out_channels == 3
        assert torch.allclose(small(x), model(x), atol=1e-10)


class _Wrapped(nn.Module):
    """The same layers behind a forward of its own: reconstruction takes its general path (a
    prefix forward per refitted layer, no skipped layers) instead of the Sequential stream."""

    def __init__(self, inner: nn.Sequential):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("kind", ["neuron", "weight"])
def test_the_sequential_stream_refits_as_the_general_path_does(kind):
    seed = int(torch.randint(0, 2 ** 31, ()))
    model = _conv_net(seed % 1000)
    x = torch.randn(120, 1, 8, 8, dtype=torch.float64)
    if kind == "neuron":  # the first layer pruned by whole channels: the stream skips it
        masks = {**_neuron_masks(model, 0, [1, 3]), **_neuron_masks(model, 2, [0])}
    else:
        generator = torch.Generator().manual_seed(seed)
        masks = {f"{i}.weight": torch.rand(model[i].weight.shape, generator=generator) > 0.4
                 for i in (0, 2, 5)}
    wrapped = _Wrapped(copy.deepcopy(model))
    for target in (model, wrapped):
        rec = LeastSquaresReconstruction(x, damping=1e-6, chunk=50)
        rec.prepare(target)
        named = masks if target is model else {f"inner.{k}": v for k, v in masks.items()}
        _write(target, named)
        rec(target, named)
    for (name, a), b in zip(model.named_parameters(), wrapped.inner.parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), (seed, name)


def test_a_changed_model_is_run_not_skipped():
    """The stream skips the first pruned layer using the prepared outputs only while the layers
    up to it hold the prepared values; a model with other weights there is run instead."""
    model = _mlp(0)
    x = torch.randn(80, 12, dtype=torch.float64)
    rec = LeastSquaresReconstruction(x, damping=TINY)
    rec.prepare(model)
    masks = _neuron_masks(model, 2, [1, 4])
    with torch.no_grad():
        model[0].weight.mul_(1.5)  # changed after prepare(), upstream of the pruned layer
    _write(model, masks)
    rec(model, masks)
    assert rec.refitted == ["4"]
    with torch.no_grad():
        h = torch.relu(model[2](torch.relu(model[0](x))))
        y = _mlp(0)(x)
    varying = h.var(0) > 0
    w, b = _lstsq_with_intercept(h[:, varying], y)
    assert torch.allclose(model[4].weight[:, varying], w, atol=1e-6)
    assert torch.allclose(model[4].bias, b, atol=1e-6)


def _data(seed: int, n: int = 400):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=generator, dtype=torch.float64)
    teacher = _mlp(seed + 100)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return x, y


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


@pytest.mark.parametrize("granularity,refitted", [("neuron", ["2", "4"]),
                                                   ("weight", ["0", "2", "4"])])
def test_prune_floor_search_evaluates_the_reconstructed_model(granularity, refitted):
    model = _mlp(5)
    x, y = _data(5)
    # Fit the model a little so the floor means something.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    before = copy.deepcopy(model.state_dict())
    scores = baseline_scores("magnitude", model, granularity)
    dense = _accuracy(model, x, y)
    result = bingo.prune(model, scores, floor=dense - 0.05, eval_fn=lambda m: _accuracy(m, x, y),
                         reconstruct=LeastSquaresReconstruction(x), progress=False)
    # The caller's model is untouched, and the returned (reconstructed) model is the one the
    # floor search accepted: same accuracy as its evaluation at that count.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert result.reconstructed == refitted
    chosen = next(p for p in result.history if p["pruned_units"] == result.pruned_units)
    assert _accuracy(result.model, x, y) == chosen["accuracy"] == result.accuracy
    assert result.accuracy >= dense - 0.05
    # And the same masks without reconstruction are a different model.
    plain = bingo.prune(model, scores, sparsity=result.sparsity, progress=False)
    with torch.no_grad():
        assert not torch.allclose(plain.model(x), result.model(x))


def test_prune_to_a_sparsity_with_reconstruction_matches_a_manual_refit():
    model = _mlp(6)
    x, _ = _data(6)
    scores = baseline_scores("magnitude", model, "weight")
    result = bingo.prune(model, scores, sparsity=0.6, reconstruct=LeastSquaresReconstruction(x),
                         progress=False)
    manual = copy.deepcopy(model)
    rec = LeastSquaresReconstruction(x)
    rec.prepare(manual)
    _write(manual, result.masks)
    rec(manual, result.masks)
    with torch.no_grad():
        assert torch.allclose(result.model(x), manual(x), atol=1e-12)
    for name, mask in result.masks.items():
        module = result.model.get_submodule(name.rpartition(".")[0])
        assert torch.all(getattr(module, name.rpartition(".")[2])[~mask] == 0)
    # A reconstruction called again (as a floor search does, with cached dense-input
    # statistics) gives what a fresh one gives.
    other = bingo.prune(model, scores, sparsity=0.3, progress=False).masks
    again, fresh = copy.deepcopy(model), copy.deepcopy(model)
    _write(again, other)
    _write(fresh, other)
    rec(again, other)
    new = LeastSquaresReconstruction(x)
    new.prepare(model)
    new(fresh, other)
    with torch.no_grad():
        assert torch.equal(again(x), fresh(x))


def test_bad_input_is_named():
    x = torch.randn(50, 12, dtype=torch.float64)
    with pytest.raises(InvalidOptionError, match="input tensor"):
        LeastSquaresReconstruction([1, 2, 3])
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        LeastSquaresReconstruction((bad, torch.zeros(50)))
    with pytest.raises(InvalidOptionError, match="damping"):
        LeastSquaresReconstruction(x, damping=0)
    with pytest.raises(InvalidOptionError, match="samples"):
        LeastSquaresReconstruction(x, samples=0)
    with pytest.raises(InvalidOptionError, match="prepare"):
        LeastSquaresReconstruction(x)(_mlp(0), {})
    # Integer inputs are token ids to a language model; this MLP needs floats: named at prepare.
    with pytest.raises(InputMismatchError, match="does not run.*integer"):
        LeastSquaresReconstruction(torch.zeros(5, 12, dtype=torch.long)).prepare(_mlp(0))
    # A layer used twice per forward is named when a refit reaches it.
    shared = nn.Linear(12, 12).double()
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    rec = LeastSquaresReconstruction(x)
    rec.prepare(twice)
    keep = torch.ones(12, 12, dtype=torch.bool)
    keep[3] = False
    with pytest.raises(InputMismatchError, match="'0'.*used 2 times"):
        rec(twice, {"0.weight": keep})
    model = _mlp(0)
    rec = LeastSquaresReconstruction(x)
    rec.prepare(model)
    with pytest.raises(InputMismatchError, match="not parameters"):
        rec(model, {"9.weight": torch.ones(3, dtype=torch.bool)})
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        rec(model, _neuron_masks(model, 2, [0]))
    scores = baseline_scores("magnitude", _mlp(0), "neuron")
    with pytest.raises(InvalidOptionError, match="reconstruct must be"):
        bingo.prune(_mlp(0), scores, sparsity=0.5, reconstruct=object(), progress=False)


class _FailingReconstruction(LeastSquaresReconstruction):
    """Refits, then fails: as a refit that meets a non-finite input half-way would."""

    def __call__(self, model, masks):
        super().__call__(model, masks)
        raise NonFiniteError("refit failed half-way")


def test_a_failed_refit_leaves_an_inplace_model_as_it_was():
    model = _mlp(7)
    x, _ = _data(7)
    before = copy.deepcopy(model.state_dict())
    scores = baseline_scores("magnitude", model, "neuron")
    with pytest.raises(NonFiniteError, match="half-way"):
        bingo.prune(model, scores, sparsity=0.5, inplace=True, progress=False,
                    reconstruct=_FailingReconstruction(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
