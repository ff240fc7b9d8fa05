"""Tests of bingo.pruning: ranking, the floor search, masks, exports and MLP shrinking."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import prune as torch_prune

from bingo.errors import (
    BingoError,
    InputMismatchError,
    InvalidOptionError,
    NonFiniteError,
    NoPrunableLayersError,
    UnreachableFloorError,
)
from bingo.pruning import PruneResult, StructuredResult, prune, shrink_mlp

LINEAR_KEYS = ["0.weight", "2.weight", "4.weight"]


def mlp(
    activation: type[nn.Module] = nn.ReLU, dtype: torch.dtype = torch.float32, bias: bool = True
) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(6, 10, bias=bias),
        activation(),
        nn.Linear(10, 8, bias=bias),
        activation(),
        nn.Linear(8, 3, bias=bias),
    ).to(dtype)


def conv_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 2),
    )


def weight_scores(model: nn.Module, keys=LINEAR_KEYS) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {key: torch.rand(params[key].shape) for key in keys}


def neuron_scores(model: nn.Module, keys=LINEAR_KEYS[:2]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {key: torch.rand(params[key].shape[0]) for key in keys}


class ScoresWithCoverage(dict):
    """A score dict carrying the ticket search's sample counts, as the search hands it over."""

    def __init__(self, scores, coverage):
        super().__init__(scores)
        self.coverage = coverage


def expected_pruned(
    scores: dict[str, torch.Tensor], count: int, min_keep: float = 0.0
) -> set[tuple[str, int]]:
    """Reference ranking: each layer keeps its top units, the rest go lowest score first."""
    candidates = []
    for key, score in scores.items():
        flat = score.reshape(-1)
        kept = max(1, math.ceil(round(min_keep * flat.numel(), 9)))
        ranked = sorted(range(flat.numel()), key=lambda i: float(flat[i]))
        candidates += [(float(flat[i]), key, i) for i in ranked[: flat.numel() - kept]]
    candidates.sort()
    return {(key, i) for _, key, i in candidates[:count]}


def pruned_set(result: PruneResult) -> set[tuple[str, int]]:
    return {
        (key, int(i))
        for key, mask in result.unit_masks.items()
        for i in (~mask.reshape(-1)).nonzero().flatten()
    }


def zeroed_weights(model: nn.Module) -> int:
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(int((layer.weight == 0).sum()) for layer in layers)


# ---------------------------------------------------------------------------------------------
# Ranking and sparsity
# ---------------------------------------------------------------------------------------------


def test_sparsity_prunes_exact_count_lowest_first():
    model = mlp()
    scores = weight_scores(model)
    result = prune(model, scores, sparsity=0.5, progress=False)
    total = sum(s.numel() for s in scores.values())
    assert result.total_units == total
    assert result.pruned_units == round(0.5 * total)
    assert result.sparsity == result.pruned_units / total
    assert result.granularity == "weight"
    assert pruned_set(result) == expected_pruned(scores, result.pruned_units)
    assert zeroed_weights(result.model) == result.pruned_units
    assert result.weight_sparsity == pytest.approx(result.pruned_units / total)
    assert result.accuracy is None and result.dense_accuracy is None and result.floor is None
    assert result.history == []
    for key in LINEAR_KEYS:
        assert torch.equal(result.masks[key], result.unit_masks[key])
        assert result.masks[key].dtype == torch.bool


def test_ties_break_by_key_order_then_flat_index():
    model = mlp()
    scores = {key: torch.zeros(shape.shape) for key, shape in weight_scores(model).items()}
    result = prune(model, scores, sparsity=70 / 164, progress=False)
    assert result.pruned_units == 70
    first = result.unit_masks["0.weight"].reshape(-1)
    # Layer 0 has 60 units and keeps one (its last in the order); the rest come from layer 2.
    assert not first[:59].any() and first[59]
    assert not result.unit_masks["2.weight"].reshape(-1)[:11].any()
    assert result.unit_masks["2.weight"].reshape(-1)[11:].all()
    assert result.unit_masks["4.weight"].all()


def test_original_model_untouched_and_inplace():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, weight_scores(model), sparsity=0.3, progress=False)
    assert result.model is not model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = prune(model, weight_scores(model), sparsity=0.3, inplace=True, progress=False)
    assert result.model is model
    assert torch_prune.is_pruned(model)


def test_sparsity_zero_and_rounding():
    model = mlp()
    assert prune(model, weight_scores(model), sparsity=0.0, progress=False).pruned_units == 0
    result = prune(model, weight_scores(model), sparsity=0.123, progress=False)
    assert result.pruned_units == round(0.123 * 164)


def test_never_empties_a_layer_and_warns_when_capped():
    model = mlp()
    scores = weight_scores(model)
    with pytest.warns(UserWarning, match="allow only 161"):
        result = prune(model, scores, sparsity=1.0, progress=False)
    assert result.pruned_units == 161
    assert result.sparsity == pytest.approx(161 / 164)
    for key, mask in result.unit_masks.items():
        assert int(mask.sum()) == 1
        # The unit a layer keeps is its best one.
        assert mask.reshape(-1)[scores[key].reshape(-1).argmax()]


def test_min_keep_keeps_a_fraction_of_each_layer():
    model = mlp()
    scores = weight_scores(model)
    with pytest.warns(UserWarning):
        result = prune(model, scores, sparsity=1.0, min_keep=0.25, progress=False)
    for key, mask in result.unit_masks.items():
        assert int(mask.sum()) == math.ceil(0.25 * mask.numel())
    result = prune(model, scores, sparsity=0.2, min_keep=0.7, progress=False)
    assert pruned_set(result) == expected_pruned(scores, result.pruned_units, min_keep=0.7)
    for key, mask in result.unit_masks.items():
        assert int(mask.sum()) >= math.ceil(0.7 * mask.numel())


# ---------------------------------------------------------------------------------------------
# Floor search
# ---------------------------------------------------------------------------------------------


def counting_eval(accuracy_of_count):
    """An eval_fn whose accuracy is a known function of how many weights are zeroed."""
    seen = []

    def eval_fn(model: nn.Module) -> float:
        count = zeroed_weights(model)
        seen.append((id(model), count))
        return accuracy_of_count(count)

    eval_fn.seen = seen
    return eval_fn


def test_floor_monotone_finds_exact_largest_passing_count():
    model = mlp()
    limit = int(torch.randint(1, 160, ()))
    eval_fn = counting_eval(lambda n: 1.0 - n / 1000 if n <= limit else 0.1)
    floor = 1.0 - limit / 1000 - 1e-9
    result = prune(model, weight_scores(model), floor=floor, eval_fn=eval_fn, progress=False)
    assert result.pruned_units == limit
    assert result.accuracy == pytest.approx(1.0 - limit / 1000)
    assert result.dense_accuracy == 1.0
    assert zeroed_weights(result.model) == limit
    counts = [point["pruned_units"] for point in result.history]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert {p["phase"] for p in result.history} <= {"grid", "bisect"}
    grid = [p["pruned_units"] for p in result.history if p["phase"] == "grid"]
    assert grid[0] == 0 and grid[-1] == 161 and len(grid) == 8
    # One working copy, rewritten for every evaluation (no deep copy each time).
    assert len({model_id for model_id, _ in eval_fn.seen}) == 1
    assert len(eval_fn.seen) == len(result.history)


def test_floor_non_monotone_bisects_first_failing_cell():
    model = mlp()
    table = torch.rand(162).tolist()
    table[0] = 1.0
    floor = 0.3
    eval_fn = counting_eval(lambda n: table[n])
    result = prune(model, weight_scores(model), floor=floor, eval_fn=eval_fn, progress=False)
    chosen = result.pruned_units
    accuracy = {p["pruned_units"]: p["accuracy"] for p in result.history}
    assert accuracy[chosen] >= floor and result.accuracy == accuracy[chosen] == table[chosen]
    grid = [p["pruned_units"] for p in result.history if p["phase"] == "grid"]
    assert len(grid) == 8
    failing = [n for n in grid if accuracy[n] < floor]
    if not failing:
        assert chosen == 161
        return
    hi_grid = failing[0]
    lo_grid = max(n for n in grid if n < hi_grid)
    assert lo_grid <= chosen < hi_grid
    # The final cell: the chosen count passes and the next evaluated count fails, one unit away.
    above = min(n for n in accuracy if n > chosen)
    assert above == chosen + 1 and accuracy[above] < floor
    if hi_grid - lo_grid > 1:
        assert any(p["phase"] == "bisect" for p in result.history)
    for p in result.history:
        assert p["accuracy"] == table[p["pruned_units"]]
        assert p["sparsity"] == pytest.approx(p["pruned_units"] / 164)


def test_floor_non_monotone_recovering_curve():
    # Accuracy dips below the floor around grid point 46, then recovers: only the cell before the
    # first failing grid point counts.
    model = mlp()
    eval_fn = counting_eval(lambda n: 0.0 if 40 <= n <= 50 else 1.0)
    result = prune(model, weight_scores(model), floor=0.5, eval_fn=eval_fn, progress=False)
    assert result.pruned_units == 39
    grid = [p["pruned_units"] for p in result.history if p["phase"] == "grid"]
    assert 161 in grid  # the whole grid is evaluated, for the caller's plot


def test_floor_with_tolerance_picks_an_evaluated_passing_count():
    model = mlp()
    limit = int(torch.randint(1, 160, ()))
    result = prune(
        model, weight_scores(model), floor=0.5, eval_fn=counting_eval(lambda n: float(n <= limit)),
        tolerance=8, progress=True,
    )
    assert limit - 8 < result.pruned_units <= limit
    assert result.accuracy == 1.0


def test_floor_all_grid_points_pass_takes_max():
    model = mlp()
    result = prune(model, weight_scores(model), floor=0.5, eval_fn=lambda m: 0.9, progress=False)
    assert result.pruned_units == 161
    assert all(p["phase"] == "grid" for p in result.history)


def test_unreachable_floor():
    model = mlp()
    with pytest.raises(UnreachableFloorError, match=r"0\.5.*0\.9"):
        prune(model, weight_scores(model), floor=0.9, eval_fn=lambda m: 0.5, progress=False)


def test_eval_fn_error_leaves_inplace_model_restored():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return 1.0

    with pytest.raises(RuntimeError, match="boom"):
        prune(model, weight_scores(model), floor=0.5, eval_fn=failing, inplace=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fails", ["raises", "returns NaN"])
def test_eval_fn_failure_at_a_sparsity_leaves_inplace_model_as_it_came(fails):
    """With sparsity= the pruned model is evaluated after its torch prune masks are applied; a
    failure there used to leave the caller's model pruned."""
    model = mlp()
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 2:  # the pruned model's evaluation
            if fails == "raises":
                raise RuntimeError("boom")
            return float("nan")
        return 1.0

    with pytest.raises((RuntimeError, NonFiniteError)):
        prune(model, weight_scores(model), sparsity=0.5, eval_fn=failing, inplace=True,
              progress=False)
    assert len(calls) == 2
    assert not torch_prune.is_pruned(model)
    assert dict(model.named_parameters()) == params  # the same parameter objects ...
    assert all(torch.equal(p, before[k]) for k, p in params.items())  # ... and values
    assert all(not m._forward_pre_hooks for m in model.modules())
    prune(model, weight_scores(model), sparsity=0.5, inplace=True, progress=False)  # still usable


def test_meta_tensors_are_refused_before_anything_runs():
    model = mlp()
    scores = weight_scores(model)
    with pytest.raises(InputMismatchError, match="'0.weight' is on the meta device"):
        prune(mlp().to("meta"), scores, sparsity=0.5, progress=False)
    meta_scores = {k: v.to("meta") for k, v in scores.items()}
    with pytest.raises(InputMismatchError, match="score '0.weight' is on the meta device"):
        prune(model, meta_scores, sparsity=0.5, progress=False)


@pytest.mark.parametrize(
    "value, error", [(float("nan"), NonFiniteError), ("high", InvalidOptionError)]
)
def test_bad_eval_fn_output(value, error):
    model = mlp()
    with pytest.raises(error):
        prune(model, weight_scores(model), floor=0.5, eval_fn=lambda m: value, progress=False)


def test_sparsity_with_eval_fn_reports_accuracies():
    model = mlp()
    eval_fn = counting_eval(lambda n: 1 - n / 164)
    result = prune(model, weight_scores(model), sparsity=0.5, eval_fn=eval_fn, progress=False)
    assert result.dense_accuracy == 1.0
    assert result.accuracy == pytest.approx(1 - 82 / 164)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, match",
    [
        ({}, "exactly one"),
        ({"floor": 0.5, "sparsity": 0.5, "eval_fn": lambda m: 1.0}, "exactly one"),
        ({"floor": 0.5}, "eval_fn"),
        ({"floor": float("nan"), "eval_fn": lambda m: 1.0}, "floor"),
        ({"floor": float("inf"), "eval_fn": lambda m: 1.0}, "floor"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.5, "min_keep": 1.5}, "min_keep"),
        ({"floor": 0.5, "eval_fn": lambda m: 1.0, "grid": 1}, "grid"),
        ({"floor": 0.5, "eval_fn": lambda m: 1.0, "tolerance": 0}, "tolerance"),
        ({"sparsity": 0.5, "structured": "yes"}, "structured"),
        ({"sparsity": 0.5, "eval_fn": 3}, "eval_fn"),
    ],
)
def test_option_errors(options, match):
    model = mlp()
    with pytest.raises(InvalidOptionError, match=match):
        prune(model, weight_scores(model), progress=False, **options)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_name_the_key(bad):
    model = mlp()
    scores = weight_scores(model)
    scores["2.weight"][3, 4] = bad
    with pytest.raises(NonFiniteError, match=r"2\.weight"):
        prune(model, scores, sparsity=0.5, progress=False)


def test_unknown_key():
    model = mlp()
    scores = weight_scores(model)
    scores["9.weight"] = torch.rand(3, 3)
    with pytest.raises(InputMismatchError, match=r"9\.weight"):
        prune(model, scores, sparsity=0.5, progress=False)


def test_key_that_is_not_a_prunable_weight():
    model = mlp()
    with pytest.raises(InputMismatchError, match=r"0\.bias"):
        prune(model, {"0.bias": torch.rand(10)}, sparsity=0.5, progress=False)


def test_wrong_shape_names_key_and_shapes():
    model = mlp()
    scores = weight_scores(model)
    scores["2.weight"] = torch.rand(10, 8)
    with pytest.raises(InputMismatchError, match=r"2\.weight.*\(10, 8\).*\(8, 10\).*\(8,\)"):
        prune(model, scores, sparsity=0.5, progress=False)


def test_mixed_granularity():
    model = mlp()
    scores = {"0.weight": torch.rand(10, 6), "2.weight": torch.rand(8)}
    with pytest.raises(InvalidOptionError, match="granularity"):
        prune(model, scores, sparsity=0.5, progress=False)


def test_empty_scores():
    with pytest.raises(NoPrunableLayersError):
        prune(mlp(), {}, sparsity=0.5, progress=False)


def test_already_pruned_model():
    model = prune(mlp(), weight_scores(mlp()), sparsity=0.5, progress=False).model
    with pytest.raises(InputMismatchError, match="already pruned"):
        prune(model, weight_scores(mlp()), sparsity=0.5, progress=False)


# ---------------------------------------------------------------------------------------------
# Coverage: never-sampled units
# ---------------------------------------------------------------------------------------------


def with_unsampled(model: nn.Module, lowest: bool) -> ScoresWithCoverage:
    """Scores where units 0..4 of layer 2 were never sampled, ranked lowest or highest."""
    scores = weight_scores(model)
    coverage = {key: torch.randint(1, 50, score.shape) for key, score in scores.items()}
    coverage["2.weight"].view(-1)[:5] = 0
    scores["2.weight"].view(-1)[:5] = -1.0 if lowest else 2.0
    return ScoresWithCoverage(scores, coverage)


def test_pruning_unsampled_units_raises():
    model = mlp()
    with pytest.raises(BingoError, match=r"5 unit.*2\.weight.*allow_unsampled"):
        prune(model, with_unsampled(model, lowest=True), sparsity=0.2, progress=False)


def test_pruning_unsampled_units_warns_when_allowed():
    model = mlp()
    with pytest.warns(UserWarning, match="5 never-sampled"):
        result = prune(
            model,
            with_unsampled(model, lowest=True),
            sparsity=0.2,
            allow_unsampled=True,
            progress=False,
        )
    assert not result.unit_masks["2.weight"].reshape(-1)[:5].any()


def test_unsampled_units_that_are_kept_are_fine():
    model = mlp()
    result = prune(model, with_unsampled(model, lowest=False), sparsity=0.2, progress=False)
    assert result.unit_masks["2.weight"].reshape(-1)[:5].all()


def test_coverage_must_match_scores():
    model = mlp()
    scores = with_unsampled(model, lowest=False)
    scores.coverage["0.weight"] = torch.ones(3)
    with pytest.raises(InputMismatchError, match=r"coverage\['0\.weight'\]"):
        prune(model, scores, sparsity=0.2, progress=False)


# ---------------------------------------------------------------------------------------------
# torch.nn.utils.prune compatibility and exports
# ---------------------------------------------------------------------------------------------


def test_torch_prune_compatible():
    model = mlp()
    result = prune(model, weight_scores(model), sparsity=0.5, progress=False)
    layer = result.model[2]
    assert hasattr(layer, "weight_orig") and hasattr(layer, "weight_mask")
    assert torch_prune.is_pruned(result.model)
    assert torch.equal(layer.weight_orig, model[2].weight)
    masked = layer.weight.clone()
    torch_prune.remove(layer, "weight")
    assert not hasattr(layer, "weight_orig") and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight, masked)
    assert torch.equal(layer.weight != 0, result.masks["2.weight"])


def test_export_state_dict_and_safetensors_round_trip(tmp_path):
    model = mlp()
    result = prune(model, neuron_scores(model), sparsity=0.4, progress=False)
    state = result.export_state_dict()
    assert set(state) == set(model.state_dict())
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    for name, mask in result.masks.items():
        assert torch.all(state[name][~mask] == 0)
        assert torch.equal(state[name][mask], model.state_dict()[name][mask])
    fresh = mlp()
    fresh.load_state_dict(state)
    x = torch.randn(7, 6)
    assert torch.allclose(fresh(x), result.model(x))
    path = tmp_path / "pruned.safetensors"
    result.save_safetensors(path)
    loaded = load_file(str(path))
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_neuron_granularity_masks_bias():
    model = mlp()
    scores = neuron_scores(model)
    result = prune(model, scores, sparsity=0.5, structured=False, progress=False)
    assert result.granularity == "neuron"
    assert result.total_units == 18 and result.pruned_units == 9
    assert pruned_set(result) == expected_pruned(scores, 9)
    assert set(result.masks) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    layer = result.model[0]
    assert hasattr(layer, "bias_orig") and hasattr(layer, "bias_mask")
    keep = result.unit_masks["0.weight"]
    assert torch.equal(result.masks["0.bias"], keep)
    assert torch.equal(result.masks["0.weight"], keep[:, None].expand(10, 6))
    hidden = layer(torch.randn(5, 6))
    assert torch.all(hidden[:, ~keep] == 0)
    pruned_rows = (
        int((~result.unit_masks["0.weight"]).sum()) * 6
        + int((~result.unit_masks["2.weight"]).sum()) * 10
    )
    assert result.weight_sparsity == pytest.approx(pruned_rows / (60 + 80))


# ---------------------------------------------------------------------------------------------
# Conv models
# ---------------------------------------------------------------------------------------------


def test_conv_weight_granularity():
    model = conv_net()
    scores = weight_scores(model, ["0.weight", "2.weight"])
    result = prune(model, scores, sparsity=0.6, progress=False)
    assert result.total_units == 4 * 3 * 9 + 5 * 4 * 9
    assert pruned_set(result) == expected_pruned(scores, result.pruned_units)
    assert result.structured is None
    result.model(torch.randn(2, 3, 8, 8))


def test_conv_channel_granularity():
    model = conv_net()
    scores = neuron_scores(model, ["0.weight", "2.weight"])
    result = prune(model, scores, sparsity=0.5, progress=False)
    assert result.granularity == "neuron" and result.pruned_units == round(0.5 * 9)
    keep = result.unit_masks["2.weight"]
    assert result.masks["2.weight"].shape == (5, 4, 3, 3)
    assert torch.all(result.model[2].weight[~keep] == 0)
    assert torch.all(result.model[2].bias[~keep] == 0)
    features = result.model[:3](torch.randn(2, 3, 8, 8))
    assert torch.all(features[:, ~keep] == 0)
    assert result.structured is None
    with pytest.raises(InputMismatchError, match="nn.Sequential of nn.Linear"):
        prune(model, scores, sparsity=0.5, structured=True, progress=False)


# ---------------------------------------------------------------------------------------------
# Structured shrinking
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "activation, bias", [(nn.ReLU, True), (nn.Sigmoid, True), (nn.Sigmoid, False)]
)
def test_shrink_matches_masked_model(activation, bias):
    model = mlp(activation, torch.float64, bias=bias)
    result = prune(model, neuron_scores(model), sparsity=0.5, progress=False)
    small = shrink_mlp(result.model, result.unit_masks)
    x = torch.randn(32, 6, dtype=torch.float64)
    assert torch.allclose(small(x), result.model(x), atol=1e-6, rtol=0)
    assert small[0].out_features == int(result.unit_masks["0.weight"].sum())
    assert small[2].in_features == small[0].out_features
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # The shrink also works from the dense model and the masks.
    assert torch.allclose(shrink_mlp(model, result.unit_masks)(x), small(x), atol=1e-12, rtol=0)


def test_prune_fills_structured_result():
    model = mlp(nn.Sigmoid, torch.float64)
    result = prune(model, neuron_scores(model), sparsity=0.5, progress=False)
    structured = result.structured
    assert isinstance(structured, StructuredResult)
    assert structured.dense_parameters == sum(p.numel() for p in model.parameters())
    assert structured.parameters == sum(p.numel() for p in structured.model.parameters())
    assert structured.parameters < structured.dense_parameters
    assert math.isfinite(structured.speedup) and structured.speedup > 0
    x = torch.randn(16, 6, dtype=torch.float64)
    assert torch.allclose(structured.model(x), result.model(x), atol=1e-6, rtol=0)
    unstructured = prune(
        model, neuron_scores(model), sparsity=0.5, structured=False, progress=False
    )
    assert unstructured.structured is None


def test_structured_auto_skips_weight_granularity_and_true_refuses():
    model = mlp()
    assert prune(model, weight_scores(model), sparsity=0.5, progress=False).structured is None
    with pytest.raises(InputMismatchError, match="neuron"):
        prune(model, weight_scores(model), sparsity=0.5, structured=True, progress=False)


def test_shrink_with_leading_flatten_and_dropout():
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(6, 12),
        nn.GELU(),
        nn.Dropout(0.2),
        nn.Linear(12, 9),
        nn.Tanh(),
        nn.Linear(9, 2),
    ).double()
    scores = {"1.weight": torch.rand(12), "4.weight": torch.rand(9)}
    result = prune(model, scores, sparsity=0.5, progress=False)
    result.model.eval()
    small = result.structured.model.eval()
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    assert torch.allclose(small(x), result.model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "model, match",
    [
        (
            nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)),
            r"'1' \(BatchNorm1d\)",
        ),
        (nn.Sequential(nn.Linear(4, 5), nn.Softmax(dim=1), nn.Linear(5, 2)), r"'1' \(Softmax\)"),
        (nn.Sequential(nn.Linear(4, 5), nn.Flatten(), nn.Linear(5, 2)), r"'1' \(Flatten\)"),
        (nn.Sequential(nn.ReLU()), "at least one nn.Linear"),
        (nn.Linear(4, 2), "nn.Sequential"),
    ],
)
def test_shrink_unsupported_model(model, match):
    with pytest.raises(InputMismatchError, match=match):
        shrink_mlp(model, {})


def test_shrink_refuses_bad_masks():
    model = mlp()
    with pytest.raises(InputMismatchError, match="final nn.Linear"):
        shrink_mlp(model, {"4.weight": torch.tensor([True, False, True])})
    with pytest.raises(InputMismatchError, match="neuron-granularity"):
        shrink_mlp(model, {"0.weight": torch.ones(10, 6, dtype=torch.bool)})
    with pytest.raises(InputMismatchError, match=r"'1\.weight'"):
        shrink_mlp(model, {"1.weight": torch.ones(10, dtype=torch.bool)})
    with pytest.raises(InputMismatchError, match="bool"):
        shrink_mlp(model, {"0.weight": torch.ones(10)})
    with pytest.raises(InputMismatchError, match="every neuron"):
        shrink_mlp(model, {"0.weight": torch.zeros(10, dtype=torch.bool)})
    # A final layer that keeps all outputs is fine.
    small = shrink_mlp(model, {"4.weight": torch.ones(3, dtype=torch.bool)})
    x = torch.randn(4, 6)
    assert torch.allclose(small(x), model(x))


def test_structured_auto_skips_when_final_outputs_are_pruned():
    model = mlp()
    scores = neuron_scores(model, LINEAR_KEYS)
    scores["4.weight"] = -torch.rand(3)
    result = prune(model, scores, sparsity=0.1, progress=False)
    assert not result.unit_masks["4.weight"].all()
    assert result.structured is None
    with pytest.raises(InputMismatchError, match="final nn.Linear"):
        prune(model, scores, sparsity=0.1, structured=True, progress=False)


def test_subclassed_linear_layers_are_prunable_like_in_find_units():
    """Scores for a subclass of nn.Linear (e.g. MultiheadAttention's out_proj) are accepted."""

    class MyLinear(nn.Linear):
        pass

    model = nn.Sequential(MyLinear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    scores = {"0.weight": torch.rand(5, 6), "2.weight": torch.rand(3, 5)}
    result = prune(model, scores, sparsity=0.5, progress=False)
    assert result.pruned_units == 22
    assert hasattr(result.model[0], "weight_mask")
