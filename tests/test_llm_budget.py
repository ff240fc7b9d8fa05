"""bingo.llm.budget and bingo.pruning.pruning_order: units to a fraction of block parameters."""

from __future__ import annotations

import pytest
import torch

import bingo
import zoo
from bingo.baselines import baseline_scores
from bingo.errors import InvalidOptionError
from bingo.llm.budget import block_parameter_names, count_for_fraction, unit_parameters
from bingo.pruning import pruning_order
from bingo.structure import discover


@pytest.mark.parametrize("name", ["llama", "gpt2", "lenet5"])
def test_unit_parameters_count_what_removing_the_unit_zeroes(name):
    model, inputs, _ = zoo.build(name)
    structure = discover(model, inputs)
    params = dict(model.named_parameters())
    owned = unit_parameters(model, structure)
    for group in structure.groups:
        for unit in torch.randperm(group.num_units)[:3].tolist():
            keep = torch.ones(group.num_units, dtype=torch.bool)
            keep[unit] = False
            masks = group.param_masks(keep, structure.shapes)
            removed = sum(int((~m).sum()) for n, m in masks.items() if n in params)
            assert int(owned[group.key][unit]) == removed, (group.key, unit)


def test_block_parameters_are_the_decoder_layers():
    model, _, _ = zoo.build("llama")
    names = block_parameter_names(model)
    assert names == {f"model.layers.{n}" for n, _ in model.model.layers.named_parameters()}
    with pytest.raises(bingo.errors.InputMismatchError, match="no nn.ModuleList"):
        block_parameter_names(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_pruning_order_is_what_prune_removes():
    model, inputs, _ = zoo.build("llama")
    scores = {k: torch.randn(v.shape) for k, v in
              baseline_scores("magnitude", model, "structured", example_inputs=inputs).items()}
    order = pruning_order(model, scores, granularity="structured", example_inputs=inputs)
    total = sum(v.numel() for v in scores.values())
    count = len(order) // 2
    result = bingo.prune(model, scores, sparsity=count / total, structured=False,
                         progress=False, granularity="structured", example_inputs=inputs)
    removed = {(k, u) for k, m in result.unit_masks.items()
               for u in (~m.flatten()).nonzero().flatten().tolist()}
    assert removed == set(order[:count])


def test_count_for_fraction_takes_the_closest_block_fraction():
    model, inputs, _ = zoo.build("llama")
    scores = baseline_scores("magnitude", model, "structured", example_inputs=inputs)
    names = block_parameter_names(model)
    total = sum(p.numel() for n, p in model.named_parameters() if n in names)
    for fraction in (0.2, 0.5):
        count, removed, units = count_for_fraction(model, scores, fraction,
                                                   example_inputs=inputs)
        result = bingo.prune(model, scores, sparsity=count / units, structured=False,
                             progress=False, granularity="structured", example_inputs=inputs)
        masks = discover(model, inputs).param_masks(result.unit_masks)
        zeroed = sum(int((~m).sum()) for n, m in masks.items() if n in names)
        assert zeroed == pytest.approx(removed * total, abs=0.5)
        assert abs(removed - fraction) < 0.1
    with pytest.raises(InvalidOptionError, match="fraction"):
        count_for_fraction(model, scores, 1.0, example_inputs=inputs)
