"""Least-squares refit of any model (bingo.refit; bingo.reconstruct's general path) on the zoo.

For every zoo model, random units of every structure group are removed and the survivors
refitted; then, checked from the outside: removed entries stay zero, every refitted layer's output
error against the dense model is at most the masked weights' error on the same input (the refit
is the least-squares optimum), and it *is* that optimum against an independent float64
``torch.linalg.lstsq`` fit for a Linear, a GPT-2 Conv1D, a Linear with a bias and a conv
consumer. Then the device path (float32 products) against the float64 reference, depthwise and
grouped convs, both mask formats, the calibration data forms and the errors (issue #17).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import bingo
import zoo
from bingo.errors import InputMismatchError, NonFiniteError
from bingo.models import lenet_300_100
from bingo.reconstruct import LeastSquaresReconstruction
from bingo.structure import discover
from bingo.structure.shrink import apply_masks
from test_structure import _random_keep

TINY = 1e-10
"""Damping small enough for the ridge fit to be the least-squares fit (to ~1e-6 relative)."""


def _calibration(inputs, count: int, seed: int):
    """``count`` fresh random examples shaped like the zoo model's ``inputs``."""
    generator = torch.Generator().manual_seed(seed)
    if isinstance(inputs, dict):
        key, value = next(iter(inputs.items()))
        if value.is_floating_point():
            return {key: torch.randn((count, *value.shape[1:]), generator=generator)}
        return {key: torch.randint(0, zoo.VOCAB, (count, *value.shape[1:]),
                                   generator=generator)}
    return torch.randn((count, *inputs.shape[1:]), generator=generator)


def _layer_io(model: nn.Module, names, inputs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Input and output of each module in ``names`` whose forward runs, on ``inputs``."""
    seen: dict[str, tuple] = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(
        lambda m, args, out, n=n: seen.__setitem__(n, (args[0], out)))
        for n in names if n in modules]
    try:
        with torch.no_grad():
            zoo.run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _pruned(name: str, seed: int = 0, count: int = 32):
    """A zoo model, its calibration data, random unit masks of every group, and a copy of the
    model refitted with them."""
    model, example, _ = zoo.build(name, seed)
    data = _calibration(example, count, seed + 1)
    structure = discover(model, example)
    masks = _random_keep(structure, torch.Generator().manual_seed(seed + 2))
    work = copy.deepcopy(model)
    result = bingo.refit(work, masks, data, damping=TINY, progress=False)
    return model, data, structure, masks, work, result


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_refit_keeps_removed_entries_and_reaches_the_optimum_layer_by_layer(name):
    dense, data, structure, masks, work, result = _pruned(name)
    assert result.refitted, result.skipped
    # (a) Every removed entry of every parameter stays zero.
    params = dict(work.named_parameters())
    for pname, keep in result.masks.items():
        if pname in params:
            assert torch.all(params[pname][~keep] == 0), pname
    # (b) On the input it has in the refitted model, each refitted layer is at least as close to
    # the dense layer's output as the masked weights are.
    masked = copy.deepcopy(dense)
    apply_masks(masked, structure, masks)
    refit_io = _layer_io(work, result.refitted, data)
    dense_io = _layer_io(dense, result.refitted, data)
    compared = 0
    for layer in result.refitted:
        if layer not in refit_io:  # nn.MultiheadAttention's projections: no forward of their own
            before, after = result.errors[layer]
            assert after <= before * (1 + 1e-4) + 1e-12, layer
            continue
        x, y = refit_io[layer]
        with torch.no_grad():
            y_masked = masked.get_submodule(layer)(x)
        target = dense_io[layer][1]
        error, masked_error = float(F.mse_loss(y, target)), float(F.mse_loss(y_masked, target))
        assert error <= masked_error * (1 + 1e-4) + 1e-10, (layer, error, masked_error)
        compared += 1
    assert compared
    # The refit moves the model: the layers' total error goes down.
    assert sum(a for _, a in result.errors.values()) < sum(b for b, _ in result.errors.values())


def _feature_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The test's own view of a layer's input as rows of features (a conv: its patches)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _output_rows(y: torch.Tensor) -> torch.Tensor:
    if y.dim() == 4:
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


@pytest.mark.parametrize("name,layer,column_axis", [
    ("llama", "model.layers.0.mlp.down_proj", 1),               # Linear, no bias
    ("bert", "bert.encoder.layer.0.output.dense", 1),           # Linear with a bias
    ("gpt2", "transformer.h.0.mlp.c_proj", 0),                  # Conv1D: weight (in, out)
    ("resnet", "resnet.encoder.stages.0.layers.0.layer.1.convolution", 1),   # conv consumer
])
def test_a_consumer_is_the_least_squares_fit_of_the_dense_output(name, layer, column_axis):
    dense, data, structure, masks, work, result = _pruned(name, seed=3, count=96)
    assert layer in result.refitted
    module = work.get_submodule(layer)
    x, y = _layer_io(work, [layer], data)[layer]
    target = _output_rows(_layer_io(dense, [layer], data)[layer][1]).double()
    rows = _feature_rows(module, x).double()
    keep = result.masks.get(f"{layer}.weight")
    keep = torch.ones_like(module.weight, dtype=torch.bool) if keep is None else keep
    by_row = (keep if column_axis == 1 else keep.T)          # (out, in, ...)
    kept = by_row.reshape(by_row.shape[0], -1).any(1)        # the layer's own kept rows
    columns = by_row[kept].movedim(1, 0).reshape(by_row.shape[1], -1).all(1)
    if isinstance(module, nn.Conv2d):  # patch features: channel-major, kernel area each
        columns = columns.repeat_interleave(module.kernel_size[0] * module.kernel_size[1])
    bias = getattr(module, "bias", None) is not None
    varying = (rows.var(0) > 0) if bias else (rows.abs().amax(0) > 0)
    design = rows[:, columns & varying]
    if bias:
        design = torch.cat([design, torch.ones(len(design), 1, dtype=design.dtype)], 1)
    solution = torch.linalg.lstsq(design, target, driver="gelsd").solution
    optimum = design @ solution
    got = _output_rows(y).double()
    weight = (module.weight if column_axis == 1 else module.weight.T).reshape(got.shape[1], -1)
    scale = float(target.abs().max())
    assert torch.allclose(got[:, kept], optimum[:, kept], atol=1e-4 * scale), \
        float((got - optimum)[:, kept].abs().max())
    # Removed units' columns (and the layer's own removed rows) are zero; the masked model
    # was worse.
    assert torch.all(weight[:, ~columns] == 0) and torch.all(weight[~kept] == 0)
    before, after = result.errors[layer]
    assert after < before


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_the_refit_moves_held_out_outputs_toward_the_dense_model(name, wrapped):
    model, example, _ = zoo.build(name, seed=4)
    data, held_out = _calibration(example, 3000, 5), _calibration(example, 500, 6)
    structure = discover(model, example)
    masks = _random_keep(structure, torch.Generator().manual_seed(7))
    masked = copy.deepcopy(model)
    apply_masks(masked, structure, masks)
    work = _Wrapped(copy.deepcopy(model)) if wrapped else copy.deepcopy(model)
    named = {f"inner.{k}": v for k, v in masks.items()} if wrapped else masks
    result = bingo.refit(work, named, data, progress=False)
    assert result.refitted
    with torch.no_grad():
        want = model(held_out)
        refit_error = float(F.mse_loss(work(held_out), want))
        masked_error = float(F.mse_loss(masked(held_out), want))
    assert refit_error < 0.8 * masked_error, (refit_error, masked_error)


class _Wrapped(nn.Module):
    """A model behind a forward of its own: the general path instead of the Sequential one."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_downstream_refits_what_the_sequential_stream_refits():
    model, example, _ = zoo.build("lenet300", seed=8)
    data = _calibration(example, 400, 9)
    keep = torch.ones(300, dtype=torch.bool)
    keep[::3] = False          # only the first hidden layer loses units
    sequential = copy.deepcopy(model)
    seq = bingo.refit(sequential, {"1.weight": keep}, data, progress=False)
    results = {}
    for policy in ("touched", "downstream"):
        wrapped = _Wrapped(copy.deepcopy(model))
        results[policy] = bingo.refit(wrapped, {"inner.1.weight": keep}, data, layers=policy,
                                      progress=False), wrapped
    assert seq.refitted == ["3", "5"]
    assert results["downstream"][0].refitted == ["inner.3", "inner.5"]
    assert results["touched"][0].refitted == ["inner.3"]    # the consumer of the pruned group
    for (name, a), b in zip(sequential.named_parameters(),
                            results["downstream"][1].inner.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gpt2", "resnet"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_device_path_matches_the_float64_reference(name, dtype, device, monkeypatch):
    """Statistics on the model's device with float32 or float64 products, for a float32
    model, against the float64 reference: the same model in float64 on the CPU. (TF32
    convolutions off: the model's own arithmetic is not what is tested.)"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, example, _ = zoo.build(name, seed=10)
    data = _calibration(example, 48, 11)
    masks = _random_keep(discover(model, example), torch.Generator().manual_seed(12))
    reference = copy.deepcopy(model).double()
    ref_data = {k: v.double() if v.is_floating_point() else v for k, v in data.items()}
    expected = bingo.refit(reference, masks, ref_data, dtype="float64", progress=False)
    work = copy.deepcopy(model).to(device)
    result = bingo.refit(work, masks, {k: v.to(device) for k, v in data.items()}, dtype=dtype,
                         progress=False)
    assert result.refitted == expected.refitted
    ours, theirs = dict(work.named_parameters()), dict(reference.named_parameters())
    for layer in result.refitted:
        a, b = ours[f"{layer}.weight"].detach().cpu().double(), theirs[f"{layer}.weight"].detach()
        assert float((a - b).norm() / b.norm()) < 1e-3, layer


def test_refit_takes_unit_masks_parameter_masks_and_a_dense_reference_alike():
    model, example, _ = zoo.build("llama", seed=13)
    data = _calibration(example, 32, 14)
    structure = discover(model, example)
    units = _random_keep(structure, torch.Generator().manual_seed(15))
    by_units = copy.deepcopy(model)
    first = bingo.refit(by_units, units, data, progress=False)
    by_params = copy.deepcopy(model)
    second = bingo.refit(by_params, structure.param_masks(units), data, progress=False)
    # A model pruned elsewhere (already masked), refitted towards its dense original.
    elsewhere = copy.deepcopy(model)
    apply_masks(elsewhere, structure, units)
    third = bingo.refit(elsewhere, structure.param_masks(units), data, dense=model,
                        progress=False)
    assert first.refitted == second.refitted == third.refitted
    for other in (by_params, elsewhere):
        for (name, a), b in zip(by_units.named_parameters(), other.parameters()):
            assert torch.equal(a, b), name
    assert set(first.layer_seconds) == set(first.refitted) and first.seconds > 0
    # The dense reference is left alone.
    fresh, _, _ = zoo.build("llama", seed=13)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


class _Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(1, 6, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.project = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.expand(x)))
        h = torch.relu(self.depthwise(h))
        return self.head(torch.relu(self.project(h)).mean((2, 3)))


def test_a_depthwise_conv_is_exact_on_dense_channels_and_refitted_per_channel_otherwise():
    torch.manual_seed(16)
    model = _Depthwise().eval()
    x = torch.randn(64, 1, 6, 6)
    keep = torch.tensor([True, False, True, True, False, True])
    # Whole channels removed: the depthwise conv's kept channels read their dense input.
    work = copy.deepcopy(model)
    result = bingo.refit(work, {"expand.weight": keep}, x, damping=TINY, progress=False)
    assert "depthwise" in result.skipped and result.refitted == ["project"]
    assert torch.equal(work.depthwise.weight[keep], model.depthwise.weight[keep])
    assert torch.all(work.depthwise.weight[~keep] == 0)
    # Per-weight masks on the producer change every channel (no unit goes: "touched" refits
    # the producer alone); downstream of it, the depthwise conv is one 9-tap fit per channel.
    generator = torch.Generator().manual_seed(17)
    weights = torch.rand(model.expand.weight.shape, generator=generator) > 0.3
    assert bingo.refit(copy.deepcopy(model), {"expand.weight": weights}, x,
                       progress=False).refitted == ["expand"]
    work = copy.deepcopy(model)
    result = bingo.refit(work, {"expand.weight": weights}, x, damping=TINY, layers="downstream",
                         progress=False)
    assert result.refitted == ["expand", "depthwise", "project", "head"]
    seen = _layer_io(work, ["depthwise"], x)["depthwise"]
    dense = _layer_io(model, ["depthwise"], x)["depthwise"][1]
    for c in range(6):
        taps = F.unfold(seen[0][:, c:c + 1], 3, padding=1).transpose(1, 2).reshape(-1, 9)
        design = torch.cat([taps, torch.ones(len(taps), 1)], 1).double()
        target = dense[:, c].reshape(-1, 1).double()
        optimum = design @ torch.linalg.lstsq(design, target, driver="gelsd").solution
        got = seen[1][:, c].reshape(-1, 1).double()
        assert torch.allclose(got, optimum, atol=1e-4 * float(target.abs().max())), c


def test_a_grouped_conv_is_fitted_group_by_group():
    torch.manual_seed(18)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 25, 3)).eval()
    x = torch.randn(80, 1, 5, 5)
    keep = torch.rand(model[2].weight.shape, generator=torch.Generator().manual_seed(19)) > 0.4
    work = copy.deepcopy(model)
    result = bingo.refit(work, {"2.weight": keep}, x, damping=TINY, progress=False)
    assert result.refitted == ["2"]          # grouped: the general path, "touched" layers
    assert torch.all(work[2].weight[~keep] == 0)
    with torch.no_grad():
        inputs = torch.relu(model[0](x))
        dense = model[2](inputs)
    for out in range(6):                      # each row: least squares on its kept features
        group = out // 3
        patches = F.unfold(inputs[:, 2 * group:2 * group + 2], 3, padding=1)
        rows = patches.transpose(1, 2).reshape(-1, 18)[:, keep[out].reshape(-1)]
        design = torch.cat([rows, torch.ones(len(rows), 1)], 1).double()
        target = dense[:, out].reshape(-1, 1).double()
        optimum = design @ torch.linalg.lstsq(design, target, driver="gelsd").solution
        with torch.no_grad():
            got = work[2](inputs)[:, out].reshape(-1, 1).double()
        assert torch.allclose(got, optimum, atol=1e-4 * float(target.abs().max())), out


def test_calibration_forms_give_one_refit():
    model, example, _ = zoo.build("llama", seed=20)
    ids = _calibration(example, 24, 21)["input_ids"]
    masks = _random_keep(discover(model, example), torch.Generator().manual_seed(22))
    forms = {"dict": {"input_ids": ids}, "tuple": ({"input_ids": ids}, ids),
             "batches": [{"input_ids": ids[:10]}, ({"input_ids": ids[10:]}, None)]}
    weights = {}
    for form, data in forms.items():
        work = copy.deepcopy(model)
        bingo.refit(work, masks, data, samples=24, seed=0, progress=False)
        weights[form] = [p.detach().clone() for p in work.parameters()]
    for form in ("tuple", "batches"):
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights["dict"],
                                                                    weights[form])), form
    mlp, x_example, _ = zoo.build("lenet300", seed=23)
    x = _calibration(x_example, 40, 24)
    y = torch.zeros(40, dtype=torch.long)
    units = {"1.weight": torch.arange(300) % 4 != 0}
    outs = []
    for data in (x, (x, y), TensorDataset(x, y), [x[:15], (x[15:], y[15:])]):
        work = copy.deepcopy(mlp)
        bingo.refit(work, units, data, progress=False)
        outs.append(work[5].weight.detach().clone())
    assert all(torch.allclose(outs[0], o, atol=1e-6) for o in outs[1:])


class _Siamese(nn.Module):
    """One layer applied to two branches: a shared module (bingo refuses to refit it, although
    for parallel uses like these the summed statistics would be the fit: it cannot tell them
    from chained uses)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.block = nn.Linear(8, 8)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(torch.cat([torch.relu(self.block(h)), torch.relu(self.block(-h))], -1))


class _Custom(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 0.5 * x.sum(-1, keepdim=True)


def test_what_cannot_be_refitted_is_named_and_leaves_the_model_as_it_was():
    model = _Siamese().eval()
    x = torch.randn(40, 4)
    before = copy.deepcopy(model.state_dict())
    keep = torch.arange(8) % 2 == 0
    with pytest.raises(InputMismatchError, match="'block'.*used 2 times.*does not refit"):
        bingo.refit(model, {"inp.weight": keep}, x, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # A Linear subclass with a forward of its own is not fitted as a plain Linear.
    custom = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), _Custom(6, 2)).eval()
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 1] = False
    with pytest.raises(InputMismatchError, match="'2'.*_Custom.*forward of its own"):
        bingo.refit(custom, {"2.weight": keep}, x, progress=False)


def test_bad_input_is_named_before_any_work():
    model, example, _ = zoo.build("lenet300")
    x = _calibration(example, 20, 25)
    units = {"1.weight": torch.arange(300) % 2 == 0}
    with pytest.raises(InputMismatchError, match="float64 but the model computes in"):
        LeastSquaresReconstruction(x.double()).prepare(model)
    with pytest.raises(InputMismatchError, match="does not run on the calibration data"):
        LeastSquaresReconstruction(torch.randn(5, 1, 9, 9)).prepare(model)   # 81 features, not 64
    lm, lm_example, _ = zoo.build("llama")
    with pytest.raises(InputMismatchError, match="does not run"):        # floats, not token ids
        LeastSquaresReconstruction({"input_ids": torch.randn(4, 8)}).prepare(lm)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[3].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="'3.weight'"):
        LeastSquaresReconstruction(x).prepare(broken)
    with pytest.raises(InputMismatchError, match="shape \\(300,\\)"):
        bingo.refit(copy.deepcopy(model), {"1.weight": torch.ones(5, dtype=torch.bool)}, x)
    with pytest.raises(InputMismatchError, match="every unit"):
        bingo.refit(copy.deepcopy(model), {"1.weight": torch.zeros(300, dtype=torch.bool)}, x)
    with pytest.raises(InputMismatchError, match="'nope'"):
        bingo.refit(copy.deepcopy(model), {"nope": torch.ones(3, dtype=torch.bool)}, x)
    # Prepared on one model, called on another: refused, whatever the architecture.
    rec = LeastSquaresReconstruction(x, progress=False)
    rec.prepare(model)
    masks = discover(model, example).param_masks(units)
    other, _, _ = zoo.build("lenet300", seed=1)
    with pytest.raises(InputMismatchError, match="prepared on another model"):
        rec(other, masks)
    wider = lenet_300_100(in_features=64, num_classes=11)
    with pytest.raises(InputMismatchError, match="another architecture"):
        rec(wider, {})
    # A copy of the prepared model with the masks written is the prepared model.
    copied = copy.deepcopy(model)
    apply_masks(copied, discover(copied, example), units)
    rec(copied, masks)
    assert rec.refitted == ["3", "5"]


def test_parameter_names_are_canonical_for_tied_weights():
    """GPT-2 ties its LM head to the token embedding: one tensor, listed once under the name
    named_parameters gives it (prune saves and restores parameters by those names)."""
    from bingo.reconstruct.layers import parameter_names

    model, _, _ = zoo.build("gpt2")
    names = parameter_names(model)
    params = dict(model.named_parameters())
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert all(n in params for n in names) and len(names) == len(set(names))
