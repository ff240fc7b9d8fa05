"""bingo.prune on the unit groups of bingo.structure, for every zoo model (issue #16).

Structured scores (keyed by group, one per unit) mask every slice of a removed unit; the masked
model is checked against the structure layer's ``apply_masks`` on the same unit masks, the
removed slices against the groups' slices, the shrunk model (``result.structured``) against the
masked model on fresh inputs. Then: which granularity prune works at (argument, the scores' own
attribute, inference from heads keys), a floor search on a transformers model, tied parameters
scored under an alias, and clear errors.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch import nn

import zoo
from bingo import UnitScores, prune, shrink_structured
from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.structure import discover
from bingo.structure.shrink import apply_masks
from test_pruning import expected_pruned, pruned_set
from test_structure import _randomise_norms


@contextlib.contextmanager
def quick_timing():
    """The speedup measured on a batch of 2 examples, once: these tests check that it is
    measured, not its value (bench/prune_speedup.py measures it). One thread: on a shared,
    oversubscribed machine two threads made MobileNet's convolutions 20-200x slower."""
    import bingo.pruning as pruning

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pruning, "_SPEEDUP_BATCH_EXAMPLES", 2)
            patch.setattr(pruning, "_SPEEDUP_WARMUP", 1)
            patch.setattr(pruning, "_SPEEDUP_REPEATS", 1)
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def quick():
    with quick_timing():
        yield


def _model(name, seed=0):
    model, inputs, targets = zoo.build(name, seed)
    _randomise_norms(model, torch.Generator().manual_seed(seed))  # no identity batch norms
    return model, inputs, targets


def _fresh_inputs(name):
    return zoo.build(name, seed=11)[1]


def _group_scores(structure, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {g.key: torch.rand(g.num_units, generator=generator) for g in structure.groups}


def _outputs(model, inputs):
    with torch.no_grad():
        return zoo.run(model.eval(), inputs)


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_structured_scores_prune_every_zoo_model(name):
    model, inputs, _ = _model(name)
    structure = discover(model, inputs)
    scores = _group_scores(structure)
    result = prune(model, scores, sparsity=0.4, granularity="structured",
                   example_inputs=inputs, progress=False)
    assert result.granularity == "structured"
    assert result.total_units == sum(g.num_units for g in structure.groups)
    assert pruned_set(result) == expected_pruned(scores, result.pruned_units)
    # Every slice of a removed unit is zero in the masked model (its producers' rows, its
    # consumers' columns, norm entries, q/k/v rows and o columns).
    state = result.export_state_dict()         # the masked values, under the usual names
    params = dict(model.named_parameters())
    checked = 0
    for group in structure.groups:
        removed = (~result.unit_masks[group.key]).nonzero().flatten().tolist()
        for s in group.slices:
            if s.param not in params:
                continue  # a buffer (batch norm statistics): the consumers' columns are zero
            for unit in removed:
                index = s.positions[s.unit_of == unit]
                assert not state[s.param].index_select(s.axis, index).any(), (s.param, unit)
                checked += 1
    assert checked > 0
    # The masked model is the structure layer's masked model.
    reference = copy.deepcopy(model)
    apply_masks(reference, structure, result.unit_masks)
    fresh = _fresh_inputs(name)
    want = _outputs(reference, fresh)
    torch.testing.assert_close(_outputs(result.model, fresh), want, rtol=1e-5,
                               atol=1e-5 * float(want.abs().max()))
    # The shrunk model computes what the masked model does, with fewer parameters.
    small = result.structured
    assert small is not None, result.structured_note
    torch.testing.assert_close(_outputs(small.model, fresh), want, rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))
    assert small.parameters < small.dense_parameters
    assert isinstance(small.speedup, float) and math.isfinite(small.speedup) and \
        small.speedup > 0


def test_floor_search_on_a_transformers_model():
    """Floor = top-1 agreement with the dense model's next-token predictions."""
    model, inputs, _ = _model("gpt2")
    fresh = _fresh_inputs("gpt2")
    dense = _outputs(model, fresh).argmax(-1)

    def agreement(m):
        return float((_outputs(m, fresh).argmax(-1) == dense).double().mean())

    structure = discover(model, inputs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prune(model, _group_scores(structure, 3), floor=0.6, eval_fn=agreement,
                   granularity="structured", example_inputs=inputs, progress=False)
    assert result.accuracy >= 0.6 and result.dense_accuracy == 1.0
    assert 0 < result.pruned_units < result.total_units
    assert agreement(result.model) == result.accuracy
    assert agreement(result.structured.model) == result.accuracy
    assert [p["pruned_units"] for p in result.history] == \
        sorted(p["pruned_units"] for p in result.history)
    for n, p in model.named_parameters():  # the caller's model is untouched
        assert torch.equal(p, before[n]), n


def test_tied_weight_is_scored_under_any_of_its_names():
    model, inputs, _ = zoo.build("llama_tied")
    generator = torch.Generator().manual_seed(0)
    scores = {"lm_head.weight": torch.rand(model.lm_head.weight.shape, generator=generator),
              "model.layers.0.mlp.up_proj.weight":
                  torch.rand(model.model.layers[0].mlp.up_proj.weight.shape, generator=generator)}
    result = prune(model, scores, sparsity=0.3, progress=False)
    assert result.granularity == "weight"
    assert set(result.unit_masks) == {"model.embed_tokens.weight",
                                      "model.layers.0.mlp.up_proj.weight"}
    keep = result.masks["model.embed_tokens.weight"]
    assert not keep.all()
    # One parameter, masked in both its uses; the reference writes the mask into the weights.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.model.embed_tokens.weight.mul_(keep)     # tied: lm_head too
        reference.model.layers[0].mlp.up_proj.weight.mul_(
            result.masks["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(result.model.lm_head.weight, result.model.model.embed_tokens.weight)
    fresh = _fresh_inputs("llama_tied")
    torch.testing.assert_close(_outputs(result.model, fresh), _outputs(reference, fresh))
    canonical = {"model.embed_tokens.weight": scores["lm_head.weight"],
                 "model.layers.0.mlp.up_proj.weight": scores["model.layers.0.mlp.up_proj.weight"]}
    again = prune(model, canonical, sparsity=0.3, progress=False)
    assert all(torch.equal(again.masks[n], m) for n, m in result.masks.items())
    with pytest.raises(InputMismatchError, match="tied names of one parameter"):
        prune(model, {**scores, "model.embed_tokens.weight": scores["lm_head.weight"]},
              sparsity=0.3, progress=False)


def test_granularity_decides_what_a_unit_is():
    """Same keys and shapes, two meanings: a ResNet stem conv's own output channels (per
    layer) or the channel group (with its BatchNorm and every consumer)."""
    model, inputs, _ = _model("resnet")
    structure = discover(model, inputs)
    key = "resnet.embedder.embedder.convolution.weight"
    scores = {key: torch.rand(structure.group(key).num_units)}
    per_layer = prune(model, scores, sparsity=0.5, progress=False)
    assert per_layer.granularity == "neuron" and set(per_layer.masks) == {key}
    assert per_layer.structured is None and per_layer.structured_note
    grouped = prune(model, UnitScores(scores, "structured"), sparsity=0.5,
                    example_inputs=inputs, progress=False)
    assert grouped.granularity == "structured"
    assert "resnet.embedder.embedder.normalization.weight" in grouped.masks
    assert "resnet.encoder.stages.0.layers.0.layer.1.convolution.weight" in grouped.masks
    same = prune(model, scores, sparsity=0.5, granularity="structured", progress=False)
    assert all(torch.equal(same.masks[n], m) for n, m in grouped.masks.items())
    with pytest.raises(InvalidOptionError, match="contradicts"):
        prune(model, UnitScores(scores, "structured"), sparsity=0.5, granularity="neuron",
              progress=False)
    with pytest.raises(InputMismatchError, match=r"expected \(8, 1, \d, \d\) \(weight\)"):
        prune(model, scores, sparsity=0.5, granularity="weight", progress=False)


def test_heads_keys_mean_structured_scores():
    model, inputs, _ = zoo.build("llama")
    structure = discover(model, inputs)
    scores = {"model.layers.1.self_attn.heads": torch.tensor([0.0, 1.0])}
    result = prune(model, scores, sparsity=0.5, progress=False)   # inputs from the config
    assert result.granularity == "structured"
    q = result.masks["model.layers.1.self_attn.q_proj.weight"]
    o = result.masks["model.layers.1.self_attn.o_proj.weight"]
    assert not q[:16].any() and q[16:].all() and not o[:, :16].any() and o[:, 16:].all()
    assert result.structured.model.config.num_key_value_heads == 2   # layers differ: per layer
    assert result.structured.model.bingo_config_note is not None
    assert structure is discover(model)   # discovered before the copy: the cache holds


def test_neuron_scores_on_an_mlp_are_still_per_layer():
    """The recorded MNIST numbers: per-layer neuron masks (rows and bias only), shrink_mlp."""
    model, inputs, _ = zoo.build("lenet300")
    scores = {"1.weight": torch.rand(300), "3.weight": torch.rand(100)}
    neuron = prune(model, scores, sparsity=0.5, progress=False)
    assert neuron.granularity == "neuron"
    assert set(neuron.masks) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    grouped = prune(model, scores, sparsity=0.5, granularity="structured", progress=False)
    assert set(grouped.masks) == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight"}
    assert torch.equal(neuron.unit_masks["1.weight"], grouped.unit_masks["1.weight"])
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(_outputs(neuron.structured.model, x), _outputs(grouped.model, x))


def test_shrink_structured_takes_the_masked_model():
    model, inputs, _ = _model("mha")
    structure = discover(model, inputs)
    result = prune(model, _group_scores(structure), sparsity=0.4, granularity="structured",
                   example_inputs=inputs, progress=False)
    small = shrink_structured(result.model, result.unit_masks, example_inputs=inputs)
    fresh = _fresh_inputs("mha")
    torch.testing.assert_close(_outputs(small, fresh), _outputs(result.model, fresh))
    assert hasattr(result.model.attn, "in_proj_weight_orig")   # the masked model is kept


class _HardCoded(nn.Module):
    """A width the shrink cannot know about: shrinking changes what it computes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.c = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.a(x)).reshape(-1, 2, 3).flip(1).reshape(-1, 6)  # sizes untraced
        return self.c(h)


def test_structured_auto_says_why_not_and_true_raises():
    model = _HardCoded().eval()
    x = torch.randn(3, 4)
    scores = {"a.weight": torch.arange(6.0)}
    result = prune(model, scores, sparsity=0.3, granularity="structured", example_inputs=x,
                   progress=False)
    assert result.structured is None and "does not run" in result.structured_note
    with pytest.raises(InputMismatchError, match="structured=True: the shrunk model does not"):
        prune(model, scores, sparsity=0.3, granularity="structured", example_inputs=x,
              structured=True, progress=False)


def test_structured_scores_errors():
    model, inputs, _ = zoo.build("llama")
    with pytest.raises(InputMismatchError, match="cannot be removed: it spans all of model.embed_tokens"):
        prune(model, {"model.layers.0.mlp.down_proj.weight": torch.rand(32)},
              granularity="structured", sparsity=0.5, progress=False)
    with pytest.raises(InputMismatchError, match=r"expected \(48,\)"):
        prune(model, {"model.layers.0.mlp.gate_proj.weight": torch.rand(47)},
              granularity="structured", sparsity=0.5, progress=False)
    with pytest.raises(InputMismatchError, match="not a recognised attention block"):
        prune(model, {"model.layers.0.mlp.heads": torch.rand(2)}, sparsity=0.5, progress=False)
    masked = prune(model, {"model.layers.0.self_attn.heads": torch.rand(2)}, sparsity=0.5,
                   progress=False).model
    with pytest.raises(InputMismatchError, match="already pruned"):
        prune(masked, {"model.layers.0.self_attn.heads": torch.rand(2)}, sparsity=0.5,
              progress=False)
    net, x, _ = zoo.build("mha")
    with pytest.raises(InputMismatchError, match="example_inputs="):
        prune(net, {"attn.heads": torch.rand(4)}, sparsity=0.5, progress=False)
