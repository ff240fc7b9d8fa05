"""The structure layer (bingo.structure): unit groups found by tracing, on the model zoo.

The central check: for every zoo model, removing random units physically (``shrink``) gives the
outputs of the model with the same units masked (every slice zeroed), with batch norm statistics
randomised so that no layer is an identity. Then the groups each architecture must have (GQA key/
value groups with their query heads, GPT-2's Conv1D neurons, residual-coupled ResNet channels,
depthwise channels with their producer), tied weights under one key, shared modules counted
once, and clear errors where the structure cannot be trusted.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zoo
from bingo.errors import InputMismatchError
from bingo.structure import CHANNELS, HEADS, NEURONS, discover
from bingo.structure.shrink import apply_masks, shrink


def _randomise_norms(model: nn.Module, generator: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator))


def _random_keep(structure, generator, fraction=0.6):
    masks = {}
    for g in structure.groups:
        keep = torch.rand(g.num_units, generator=generator) < fraction
        keep[torch.randint(g.num_units, (1,), generator=generator)] = True
        masks[g.key] = keep
    return masks


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
@pytest.mark.parametrize("seed", [0, 1])
def test_shrink_equals_mask(name, seed):
    generator = torch.Generator().manual_seed(seed)
    model, inputs, _ = zoo.build(name, seed)
    _randomise_norms(model, generator)
    structure = discover(model, inputs)
    assert structure.groups, f"{name}: no unit group found"
    masks = _random_keep(structure, generator)
    small = shrink(model, masks, example_inputs=inputs)
    masked = copy.deepcopy(model)
    apply_masks(masked, structure, masks)
    with torch.no_grad():
        want, got = zoo.run(masked, inputs), zoo.run(small.eval(), inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    # The user's model is untouched.
    fresh, _, _ = zoo.build(name, seed)
    _randomise_norms(fresh, torch.Generator().manual_seed(seed))
    for (n, p), (_, q) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), n


def _kinds(structure):
    return {g.key: (g.kind, g.num_units) for g in structure.groups}


def _slice(group, param_suffix, axis):
    hits = [s for s in group.slices if s.param.endswith(param_suffix) and s.axis == axis]
    assert len(hits) == 1, (param_suffix, axis, [(s.param, s.axis) for s in group.slices])
    return hits[0]


def test_llama_gqa_key_value_groups_hold_their_query_heads():
    model, inputs, _ = zoo.build("llama")
    structure = discover(model, inputs)
    heads = structure.group("model.layers.0.self_attn.heads")
    assert heads.kind == HEADS and heads.num_units == 2          # 2 key/value heads
    head_dim = 32 // 4
    assert _slice(heads, "q_proj.weight", 0).width == 2 * head_dim    # 2 query heads each
    assert _slice(heads, "k_proj.weight", 0).width == head_dim
    assert _slice(heads, "v_proj.weight", 0).width == head_dim
    assert _slice(heads, "o_proj.weight", 1).width == 2 * head_dim
    # Query heads 0-1 read key/value head 0 (transformers' repeat_kv order).
    q = _slice(heads, "q_proj.weight", 0)
    assert q.positions[q.unit_of == 0].tolist() == list(range(2 * head_dim))
    mlp = structure.group("model.layers.0.mlp.gate_proj.weight")
    assert mlp.kind == NEURONS and mlp.num_units == 48
    assert {(s.param.rsplit(".", 2)[-2], s.axis) for s in mlp.slices} == \
        {("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)}
    # The residual stream is normalised as a whole: not a unit group.
    assert not any("embed_tokens" in k for k in structure.keys())


def test_gpt2_conv1d_layers_are_units():
    model, inputs, _ = zoo.build("gpt2")
    structure = discover(model, inputs)
    mlp = structure.group("transformer.h.0.mlp.c_fc.weight")
    assert mlp.num_units == 128
    assert _slice(mlp, "c_fc.weight", 1).width == 1        # Conv1D: outputs on axis 1
    assert _slice(mlp, "c_proj.weight", 0).width == 1
    heads = structure.group("transformer.h.0.attn.heads")
    assert heads.num_units == 4
    assert _slice(heads, "c_attn.weight", 1).width == 3 * 8  # fused q, k, v rows of a head
    assert not any(k.startswith("lm_head") for k in structure.keys())


def test_tied_weights_have_one_canonical_name():
    model, inputs, _ = zoo.build("llama_tied")
    structure = discover(model, inputs)
    assert structure.canonical("lm_head.weight") == "model.embed_tokens.weight"
    assert structure.param_names["model.embed_tokens.weight"] == \
        ["model.embed_tokens.weight", "lm_head.weight"]


def test_resnet_channels_couple_through_residuals_and_batch_norm():
    model, inputs, _ = zoo.build("resnet")
    structure = discover(model, inputs)
    stem = structure.group("resnet.embedder.embedder.convolution.weight")
    assert stem.kind == CHANNELS
    params = stem.params()
    # The stem's channels run through stage 0's residual add: both convs of the block that
    # write into the stream share the unit, and every BatchNorm on the way is sliced.
    assert "resnet.encoder.stages.0.layers.0.layer.1.convolution.weight" in params
    assert "resnet.embedder.embedder.normalization.running_mean" in params
    assert "resnet.encoder.stages.0.layers.0.layer.1.normalization.weight" in params


def test_mobilenet_depthwise_channels_go_with_their_producer():
    model, inputs, _ = zoo.build("mobilenet")
    structure = discover(model, inputs)
    expand = structure.group("mobilenet_v2.layer.0.expand_1x1.convolution.weight")
    params = expand.params()
    assert "mobilenet_v2.layer.0.conv_3x3.convolution.weight" in params   # depthwise filter
    assert "mobilenet_v2.layer.0.conv_3x3.normalization.weight" in params
    depthwise = _slice(expand, "layer.0.conv_3x3.convolution.weight", 0)
    assert depthwise.width == 1


def test_sequential_groups_keep_the_neuron_keys():
    model, inputs, _ = zoo.build("lenet300")
    structure = discover(model, inputs)
    assert _kinds(structure) == {"1.weight": (NEURONS, 300), "3.weight": (NEURONS, 100)}
    conv, x, _ = zoo.build("lenet5")
    structure = discover(conv, x)
    assert _kinds(structure)["3.weight"] == (CHANNELS, 16)
    # A channel of the last conv owns a block of the first Linear's columns after Flatten.
    fc = _slice(structure.group("3.weight"), "7.weight", 1)
    assert fc.width == conv[7].in_features // 16


def test_shared_module_units_counted_once():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.block = nn.Linear(8, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.inp(x))
            h = torch.relu(self.block(h))
            h = torch.relu(self.block(h))          # the same layer twice
            return self.out(h)

    model = Shared().eval()
    structure = discover(model, torch.randn(2, 4))
    assert structure.module_calls["block"] == 2
    counts = [(s.param, s.axis) for g in structure.groups for s in g.slices]
    assert len(counts) == len(set(counts))
    # Using the layer twice couples its inputs with its outputs: one group, counted once.
    units = sum(g.num_units for g in structure.groups)
    assert units == 8
    masks = {g.key: torch.arange(g.num_units) % 2 == 0 for g in structure.groups}
    small = shrink(model, masks, example_inputs=torch.randn(2, 4))
    assert small.block.weight.shape == (4, 4)


def test_unknown_op_blocks_what_it_touches_and_is_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 6)
            self.c = nn.Linear(6, 2)

        def forward(self, x):
            h = self.a(x).cumprod(-1)        # no rule: mixes the channels it reads
            return self.c(torch.relu(self.b(h)))

    structure = discover(Odd().eval(), torch.randn(2, 4))
    assert "aten.cumprod" in structure.unsupported
    assert structure.unsupported["aten.cumprod"].startswith("<model>")
    assert "a.weight" not in structure.keys()     # a's channels are mixed: not removable
    assert "b.weight" in structure.keys()         # b's are untouched by the odd op


def test_fixed_width_data_pins_the_channels_it_meets():
    class AddsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.c = nn.Linear(6, 2)

        def forward(self, x):
            h = x + self.a(x)              # the input's width cannot shrink with a's channels
            return self.c(torch.relu(self.b(h)))

    structure = discover(AddsInput().eval(), torch.randn(2, 6))
    assert "a.weight" not in structure.keys()
    assert "fixed width" in structure.blocked["a.weight"]
    assert "b.weight" in structure.keys()


def test_shrink_refuses_a_model_it_cannot_shrink_exactly():
    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.c = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            h = h.reshape(-1, 2, 3).flip(1).reshape(-1, 6)   # sizes the trace cannot see
            return self.c(h)

    model = HardCoded().eval()
    x = torch.randn(2, 4)
    keep = torch.ones(6, dtype=torch.bool)
    keep[0] = False
    with pytest.raises(InputMismatchError, match="does not run|differ"):
        shrink(model, {"a.weight": keep}, example_inputs=x)


def test_structure_is_cached_until_the_model_changes():
    model, inputs, _ = zoo.build("lenet300")
    first = discover(model, inputs)
    assert discover(model, inputs) is first
    model[1] = nn.Linear(64, 300)
    assert discover(model, inputs) is not first


def test_bad_unit_masks_are_refused():
    model, inputs, _ = zoo.build("lenet300")
    structure = discover(model, inputs)
    with pytest.raises(InputMismatchError, match="shape"):
        shrink(model, {"1.weight": torch.ones(5, dtype=torch.bool)}, example_inputs=inputs)
    with pytest.raises(InputMismatchError, match="every unit"):
        shrink(model, {"1.weight": torch.zeros(300, dtype=torch.bool)}, example_inputs=inputs)
    with pytest.raises(InputMismatchError, match="no unit group"):
        structure.group("nope.weight")


def test_shrunk_declared_heads_say_the_heads_kept():
    """A block declared with declare_heads: the shrink updates its HeadSpec, so the shrunk
    model is discovered again (with a stale count its heads would not divide the widths)."""
    from bingo.attention import HEADS_ATTR, attention, declare_heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = 4
            self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))
            declare_heads(self, q="q", k="k", v="v", o="o", num_heads=4, num_heads_attr="heads")

        def forward(self, x):
            return x + self.o(attention(self.q(x), self.k(x), self.v(x), self.heads)[0])

    model = nn.Sequential(Block(), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 5, 8)
    keep = torch.tensor([True, False, True, False])
    small = shrink(model, {"0.heads": keep}, example_inputs=x)
    assert getattr(small[0], HEADS_ATTR).num_heads == 2 and small[0].heads == 2
    assert getattr(model[0], HEADS_ATTR).num_heads == 4 and model[0].heads == 4
    assert discover(small, x).group("0.heads").num_units == 2
