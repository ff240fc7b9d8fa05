"""FLAP (bingo.baselines.flap): the scores against an independent float64 computation from hooks
on the consumer layers (Llama with GQA, GPT-2's Conv1D), the per-group standardisation, the bias
compensation's zero mean error on the calibration data, its use by bingo.prune (a floor search
that calls it many times, the physical shrink, save and load), and the errors."""

from __future__ import annotations

import copy

import pytest
import torch

import bingo
import zoo
from bingo.baselines.flap import FlapCompensation, add_biases, consumer_axes, flap
from bingo.errors import CheckpointError, InputMismatchError, InvalidOptionError
from bingo.structure import discover

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LAYERS = 2
"""Transformer blocks of the zoo's language models."""

MODELS = {
    # model: (attention consumer, MLP consumer, heads key, neurons key, consumer input axis)
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj",
              "model.layers.{}.self_attn.heads", "model.layers.{}.mlp.gate_proj.weight", 1),
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj",
             "transformer.h.{}.attn.heads", "transformer.h.{}.mlp.c_fc.weight", 0),
}


def _calibration(seed: int, batches: int = 2, rows: int = 3, tokens: int = 8):
    """Fresh random token batches ``(inputs, targets)``, unlike the zoo's example."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, zoo.VOCAB, (rows, tokens + 1), generator=generator)
        out.append(({"input_ids": ids[:, :-1]}, ids[:, 1:]))
    return out


def _consumer_io(model, names, data):
    """Module name -> (inputs, outputs) over every calibration row, float64 (N, features)."""
    seen = {name: ([], []) for name in names}

    def record(name):
        def hook(_module, inputs, output):
            seen[name][0].append(inputs[0].detach().flatten(0, -2).double())
            seen[name][1].append(output.detach().flatten(0, -2).double())
        return hook

    hooks = [model.get_submodule(name).register_forward_hook(record(name)) for name in names]
    try:
        with torch.no_grad():
            for inputs, _ in data:
                model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return {name: (torch.cat(x), torch.cat(y)) for name, (x, y) in seen.items()}


def _standardised(values):
    return (values - values.mean()) / values.std()


def _reference(name: str, model, data, standardize: bool) -> dict[str, torch.Tensor]:
    """FLAP's scores computed by hand on a float64 copy: per consumer column the sample variance
    of its input times its squared weight norm, squared for heads; a key/value group (GPT-2: a
    head) owns the contiguous columns of its query heads."""
    attention, mlp, heads, neurons, in_axis = MODELS[name]
    dense = copy.deepcopy(model).double()
    names = [pattern.format(i) for i in range(LAYERS) for pattern in (attention, mlp)]
    io = _consumer_io(dense, names, data)
    config = model.config
    units = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    out = {}
    for i in range(LAYERS):
        for pattern, key, is_heads in ((attention, heads, True), (mlp, neurons, False)):
            consumer = pattern.format(i)
            x = io[consumer][0]
            weight = dense.get_submodule(consumer).weight.detach()
            fluctuation = x.var(0) * weight.pow(2).sum(1 - in_axis)  # torch.var: N - 1
            metric = fluctuation.pow(2) if is_heads else fluctuation
            if standardize:
                metric = _standardised(metric)
            per_unit = metric.view(units, -1) if is_heads else metric.view(-1, 1)
            # Raw sums are divided by their group's mean (bingo's layer normalisation).
            out[key.format(i)] = per_unit.mean(1) if standardize else \
                per_unit.sum(1) / per_unit.sum(1).mean()
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("standardize", [True, False])
def test_scores_match_hand_computed_reference(name, standardize):
    model, _, _ = zoo.build(name)
    data = _calibration(seed=11)
    scores = flap(model, data=data, standardize=standardize)
    want = _reference(name, model, data, standardize)
    assert set(scores) == set(want)
    assert scores.granularity == "structured"
    for key, value in want.items():
        assert scores[key].dtype == torch.float32
        scale = float(value.abs().max())
        torch.testing.assert_close(scores[key].double(), value, rtol=1e-4, atol=1e-5 * scale,
                                   msg=key)


@pytest.mark.parametrize("name", ["llama", "mha", "lenet5"])
def test_standardised_groups_have_mean_zero_and_neurons_unit_std(name):
    model, inputs, targets = zoo.build(name)
    standardized = flap(model, data=[(inputs, targets)])
    raw = flap(model, data=[(inputs, targets)], standardize=False)
    layout = bingo.units.find_units(model, "structured", example_inputs=inputs)
    consumers = consumer_axes(layout, discover(model, inputs))
    one_channel = 0
    for group in layout.groups:
        value = standardized[group.param_name].double()
        assert abs(float(value.mean())) < 1e-5, group.param_name
        channels = sum(len(s.positions) for s in group.slices
                       if consumers.get(s.param) == s.axis) // group.num_units
        if channels == 1:  # one consumer channel per unit (an MLP neuron): its z-score
            one_channel += 1
            assert abs(float(value.std()) - 1) < 1e-5, group.param_name
            torch.testing.assert_close(value, _standardised(raw[group.param_name].double()),
                                       rtol=1e-4, atol=1e-5)
        else:  # the mean of its channels' z-scores: a smaller spread
            assert float(value.std()) < 1, group.param_name
        assert abs(float(raw[group.param_name].double().mean()) - 1) < 1e-5, group.param_name
    assert one_channel


def _param_masks(model, inputs, unit_masks):
    structure = discover(model, inputs)
    return structure.param_masks(unit_masks)


def _write(model, masks):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].mul_(keep.to(params[name].dtype))


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("unit", ["head", "neuron"])
def test_compensation_cancels_the_mean_error_of_the_consumer(name, unit):
    model, inputs, _ = zoo.build(name)
    attention, mlp, heads, neurons, in_axis = MODELS[name]
    # A head of the first block, or a neuron of the last: every other input of the consumer is
    # unchanged by the pruning, so its error is the removed channels' alone.
    key, consumer, removed = ((heads.format(0), attention.format(0), 1) if unit == "head" else
                              (neurons.format(LAYERS - 1), mlp.format(LAYERS - 1), 5))
    data = _calibration(seed=23)
    dense = copy.deepcopy(model)
    group = discover(model, inputs).group(key)  # before prepare adds biases: one trace
    keep = torch.ones(group.num_units, dtype=torch.bool)
    keep[removed] = False
    masks = _param_masks(model, inputs, {key: keep})
    compensation = FlapCompensation(data)
    compensation.prepare(model)
    _write(model, masks)
    x_dense, y_dense = _consumer_io(dense, [consumer], data)[consumer]
    y_before = _consumer_io(model, [consumer], data)[consumer][1]
    compensation(model, masks)
    x_after, y_after = _consumer_io(model, [consumer], data)[consumer]
    assert compensation.refitted == [consumer]
    scale = float(y_dense.abs().max())
    before = (y_before - y_dense).mean(0).abs().max()
    after = (y_after - y_dense).mean(0).abs().max()
    assert after < 1e-5 * scale, (float(before), float(after))
    assert before > 1e-3 * scale
    # Per row: the dense output minus the removed channels' deviation from their mean.
    columns = ~masks[f"{consumer}.weight"].any(1 - in_axis)
    weight = dense.get_submodule(consumer).weight.detach().double()
    weight_removed = weight[:, columns] if in_axis == 1 else weight[columns].T
    deviation = x_dense[:, columns] - x_dense[:, columns].mean(0)
    torch.testing.assert_close(y_after, y_dense - deviation @ weight_removed.T,
                               rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(x_after[:, ~columns], x_dense[:, ~columns])
    # Idempotent: a second call (a floor search makes one per count) changes nothing.
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    compensation(model, masks)
    for n, value in biases.items():
        assert torch.equal(model.get_parameter(n), value), n


def test_llama_gets_zero_biases_until_a_call_fills_them():
    model, inputs, _ = zoo.build("llama")
    before = zoo.run(model, inputs)
    compensation = FlapCompensation(_calibration(seed=5))
    compensation.prepare(model)
    assert compensation.added == [f"model.layers.{i}.{m}" for i in range(LAYERS)
                                  for m in ("self_attn.o_proj", "mlp.down_proj")]
    assert sorted(compensation.parameter_names(model)) == sorted(
        f"{m}.bias" for m in compensation.added)
    for m in compensation.added:
        bias = model.get_submodule(m).bias
        assert isinstance(bias, torch.nn.Parameter) and not bool(bias.any())
        assert bias.dtype == model.get_submodule(m).weight.dtype
    torch.testing.assert_close(zoo.run(model, inputs), before)


def test_prune_floor_search_with_compensation_equals_one_compensation():
    model, inputs, _ = zoo.build("llama")
    data = _calibration(seed=7)
    scores = flap(model, data=data)
    result = bingo.prune(model, scores, floor=0.0, eval_fn=lambda m: 1.0, structured=False,
                         progress=False, reconstruct=FlapCompensation(data))
    assert model.model.layers[0].mlp.down_proj.bias is None  # the caller's model is untouched
    assert result.reconstructed
    once = copy.deepcopy(model)
    compensation = FlapCompensation(data)
    compensation.prepare(once)
    _write(once, result.masks)
    compensation(once, result.masks)
    assert compensation.refitted == result.reconstructed
    for m in compensation.added:
        torch.testing.assert_close(result.model.get_submodule(m).bias,
                                   once.get_submodule(m).bias, rtol=0, atol=0)


@pytest.fixture
def untimed(monkeypatch):
    """structured=True without its CPU timing of the shrunk model (seconds; not tested here)."""
    monkeypatch.setattr(bingo.pruning, "_measured_speedup", lambda dense, small, batch: 1.0)


def test_llama_shrunk_save_keeps_the_added_biases(tmp_path, untimed):
    model, inputs, _ = zoo.build("llama")
    data = _calibration(seed=3)
    scores = flap(model, data=data)
    compensation = FlapCompensation(data)
    result = bingo.prune(model, scores, sparsity=0.3, structured=True, progress=False,
                         reconstruct=compensation, example_inputs=inputs)
    small = result.structured.model
    compensated = [m for m in compensation.added if bool(small.get_submodule(m).bias.any())]
    assert compensated  # some added bias holds a compensation
    bingo.save_pruned(result, tmp_path / "flap")
    with pytest.raises(CheckpointError, match=r"mlp\.down_proj\.bias"):
        bingo.load_pruned(tmp_path / "flap")
    fresh = add_biases(zoo.llama(), compensation.added)
    loaded = bingo.load_pruned(tmp_path / "flap", model=fresh).eval()
    for m in compensated:
        torch.testing.assert_close(loaded.get_submodule(m).bias, small.get_submodule(m).bias)
    torch.testing.assert_close(zoo.run(loaded, inputs), zoo.run(small.eval(), inputs))


def test_gpt2_prune_with_compensation_shrinks(untimed):
    model, inputs, _ = zoo.build("gpt2")
    data = _calibration(seed=9)
    compensation = FlapCompensation(data)
    result = bingo.prune(model, flap(model, data=data), sparsity=0.3, structured=True,
                         progress=False, reconstruct=compensation, example_inputs=inputs)
    assert compensation.added == []  # Conv1D layers have their biases
    assert result.reconstructed and all(m.endswith("c_proj") for m in result.reconstructed)
    for m in result.reconstructed:
        assert not torch.equal(result.model.get_submodule(m).bias,
                               model.get_submodule(m).bias), m
    torch.testing.assert_close(zoo.run(result.structured.model.eval(), inputs),
                               zoo.run(result.model.eval(), inputs), rtol=1e-4, atol=1e-4)


def test_convolution_consumer_is_refused_naming_it():
    model, inputs, targets = zoo.build("lenet5")
    compensation = FlapCompensation([(inputs, targets)])
    compensation.prepare(model)
    assert set(compensation.unsupported) == {"3.weight"}  # the one convolution consumer
    key = "0.weight"
    group = discover(model, inputs).group(key)
    keep = torch.ones(group.num_units, dtype=torch.bool)
    keep[0] = False
    with pytest.raises(InputMismatchError, match=r"cannot compensate '3\.weight'.*not a matrix"):
        compensation(model, _param_masks(model, inputs, {key: keep}))


def test_bad_options_raise_one_clear_error():
    model, inputs, targets = zoo.build("llama")
    data = [(inputs, targets)]
    with pytest.raises(InvalidOptionError, match=r"'flap'.*granularity='neuron'"):
        flap(model, "neuron", data=data)
    with pytest.raises(InvalidOptionError, match="flap needs data="):
        flap(model)
    with pytest.raises(InvalidOptionError, match="iterable of batches.*Tensor"):
        flap(model, data=inputs["input_ids"])
    with pytest.raises(InvalidOptionError, match="batches must be a positive integer"):
        flap(model, data=data, batches=0)
    with pytest.raises(InvalidOptionError, match="FlapCompensation needs data="):
        FlapCompensation(None)
    compensation = FlapCompensation(data)
    with pytest.raises(InvalidOptionError, match=r"prepare\(dense_model\)"):
        compensation(model, {})
    with pytest.raises(InvalidOptionError, match=r"prepare\(dense_model\)"):
        compensation.parameter_names(model)
