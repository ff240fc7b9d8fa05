"""Targeted elimination on any model (bingo.targeted on the structure layer), on the model zoo.

The central check: the batched damages of "remove unit j on top of the units already removed"
equal an oracle that writes the removals into a copy of the *original* model (every slice of
every removed unit zeroed) and runs one full forward, in float64, with fresh random weights and
batch norm statistics. Then: a short elimination on every zoo model (the order is a permutation of
removed units, scores cover every group, every group keeps a unit, the caller's model is
untouched), the lazy short list, the joint check, ``saving="macs"`` against an independent flop
count of the shrunk model, token data, a model that mixes its batch (vmap fallback), and the
checks before long work (issue #17) and what targeted_prune returns (issue #19).
"""

from __future__ import annotations

import copy
import inspect
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import zoo
from bingo.errors import InputMismatchError, InvalidOptionError, NonFiniteError
from bingo.structure import discover
from bingo.structure.shrink import apply_masks, shrink
from bingo.targeted import (EliminationConfig, allocate, eliminate, iterative_refit,
                            targeted_prune, targeted_scores)
from bingo.targeted.grouped import GroupEvaluator
from bingo.targeted.incremental import SequentialEvaluator, scored_layers
from bingo.units import find_units

# MobileNetV2 has 25 groups; the two of its first block (expand + depthwise channels, and the
# residual-coupled reduce channels) keep its tests as fast as the other models'.
INCLUDE = {"mobilenet": ["mobilenet_v2.layer.0.*"]}


class BatchMixing(nn.Module):
    """An MLP whose forward centres each feature over the batch: rows are not independent, so
    the batched evaluator must fall back to its vmap path."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 12), nn.Linear(12, 10), nn.Linear(10, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = h - h.mean(0, keepdim=True)
        return self.out(torch.tanh(self.fc2(h)))


def _batch_mixing(generator):
    return BatchMixing().eval(), torch.randn(6, 6, generator=generator), \
        torch.randint(0, 4, (6,), generator=generator)


MODELS = sorted(zoo.ZOO) + ["batchmix"]
PICKS = 3
"""Candidates per group checked against the oracle (a random draw each run)."""


def _tensor_input(inputs):
    return next(iter(inputs.values())) if isinstance(inputs, dict) else inputs


def _build(name, seed, dtype=torch.float64):
    """A zoo model with weights and batch norm statistics moved away from their init (so no
    layer is an identity), its tensor input and targets."""
    if name == "batchmix":
        torch.manual_seed(seed)
        model, x, targets = _batch_mixing(torch.Generator().manual_seed(seed))
    else:
        model, inputs, targets = zoo.build(name, seed)
        x = _tensor_input(inputs)
    model = model.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.detach().std().nan_to_num(1.0).clamp_min(1e-3) *
                   torch.randn(p.shape, generator=generator, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
    return model, x, targets


def _logits(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def _metrics(model, x, targets):
    with torch.no_grad():
        logits = _logits(model, x)
    flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return F.cross_entropy(flat, t).item(), (flat.argmax(-1) == t).double().mean().item()


def _removed_copy(model, layout, removed):
    """A copy of ``model`` with every slice of the (score key, unit) pairs zeroed, written from
    the slices directly (not through the code under test)."""
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    groups = {g.param_name: g for g in layout.groups}
    with torch.no_grad():
        for key, unit in removed:
            for s in groups[key].slices:
                if s.param not in params:
                    continue  # buffers (running statistics) are data, never removed
                index = [slice(None)] * params[s.param].dim()
                index[s.axis] = s.positions[s.unit_of == unit]
                params[s.param][tuple(index)] = 0.0
    return clone


def _group_evaluator(model, x, targets, name):
    work = copy.deepcopy(model).eval()
    layout = find_units(work, "structured", INCLUDE.get(name), example_inputs=x[:1])
    return GroupEvaluator(work, layout, x, targets, memory_budget=2 ** 22, backend="torch",
                          always_split=True), layout


@pytest.mark.filterwarnings("ignore:bingo.*vmap fallback")
@pytest.mark.parametrize("name", MODELS)
def test_batched_damages_equal_an_oracle(name):
    seed = random.SystemRandom().randrange(2 ** 31)
    generator = torch.Generator().manual_seed(seed)
    model, x, targets = _build(name, seed % 5)
    removals, layout = _group_evaluator(model, x, targets, name)
    assert (removals.loss, removals.accuracy) == pytest.approx(_metrics(model, x, targets))
    # Units already removed: one in each of two groups (never a group's last unit).
    removed = []
    for i in torch.randperm(len(layout.groups), generator=generator)[:2].tolist():
        if layout.groups[i].num_units > 1:
            removed.append((i, int(torch.randint(layout.groups[i].num_units, (1,),
                                                  generator=generator))))
    removals.remove(removed)
    gone = [(layout.groups[i].param_name, u) for i, u in removed]
    assert (removals.loss, removals.accuracy) == pytest.approx(
        _metrics(_removed_copy(model, layout, gone), x, targets))
    for i, g in enumerate(layout.groups):
        alive = [u for u in range(g.num_units) if (g.param_name, u) not in gone]
        picks = torch.tensor(alive)[torch.randperm(len(alive), generator=generator)[:PICKS]]
        # Two calls: the first chunk decides whether later ones may split the evidence into
        # examples (transformer blocks), the second runs the chosen way.
        first, second = removals.evaluate(i, picks[:1]), removals.evaluate(i, picks[1:])
        loss, acc = torch.cat([first[0], second[0]]), torch.cat([first[1], second[1]])
        for j, unit in enumerate(picks.tolist()):
            want_loss, want_acc = _metrics(
                _removed_copy(model, layout, gone + [(g.param_name, unit)]), x, targets)
            assert loss[j].item() == pytest.approx(want_loss, rel=1e-6, abs=1e-8), (
                seed, g.param_name, unit)
            assert acc[j].item() == pytest.approx(want_acc), (seed, g.param_name, unit)
    how = removals.path
    if name in ("llama", "llama_tied", "gpt2", "vit", "bert"):
        assert any("one example at a time" in p for p in how.values()), how
    if name == "batchmix":  # rows mix after fc1: its group needs vmap, fc2's sees them mixed
        assert how == {"fc1.weight": "vmap", "fc2.weight": "fast (batch shared)"}, how


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "llama", "mha"])
def test_restore_puts_back_only_what_no_removed_unit_owns(name):
    """Restoring a unit whose slices cross a removed unit's (a conv row of one channel group,
    a column of another) leaves the crossing entries zero: the working model equals a copy of
    the original with the remaining removals written."""
    generator = torch.Generator().manual_seed(0)
    model, x, targets = _build(name, 0)
    removals, layout = _group_evaluator(model, x, targets, name)
    picks = [(i, int(torch.randint(g.num_units, (1,), generator=generator)))
             for i, g in enumerate(layout.groups) if g.num_units > 1]
    removals.remove(picks)
    removals.restore(picks[::2], model)
    left = [(layout.groups[i].param_name, u) for i, u in picks[1::2]]
    want = dict(_removed_copy(model, layout, left).named_parameters())
    for pname, p in removals.work.named_parameters():
        assert torch.equal(p, want[pname]), pname
    assert removals.loss == pytest.approx(_metrics(removals.work, x, targets)[0])


@pytest.mark.filterwarnings("ignore:bingo.*vmap fallback")
@pytest.mark.parametrize("name", MODELS)
def test_short_elimination_on_the_zoo(name):
    model, x, targets = _build(name, 1, torch.float32)
    before = copy.deepcopy(model.state_dict())
    layout = find_units(model, "structured", INCLUDE.get(name), example_inputs=x[:1])
    config = EliminationConfig(stop_drop=1.0, max_fraction=0.05, per_step=3, lazy=8)
    result = eliminate(model, (x, targets), config, include=INCLUDE.get(name), progress=False,
                       granularity="structured")
    assert result.granularity == "structured" and result.evaluator == "batched"
    sizes = {g.param_name: g.num_units for g in layout.groups}
    assert set(result.scores) == set(sizes)
    assert all(result.scores[k].shape == (n,) for k, n in sizes.items())
    assert 0 < len(result.order) == len(set(result.order)) <= 0.05 * sum(sizes.values())
    assert all(0 <= u < sizes[k] for k, u in result.order)
    flat = torch.cat([result.scores[k] for k in sizes])
    assert sorted(flat.tolist()) == [float(i) for i in range(flat.numel())]  # a strict ranking
    for position, (key, unit) in enumerate(result.order):
        assert result.scores[key][unit] == position  # removed first = lowest score
    for key, n in sizes.items():
        assert sum(k == key for k, _ in result.order) < n  # every group keeps a unit
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the caller's model


def test_elimination_to_the_limit_keeps_one_unit_per_group():
    model, x, targets = _build("mha", 2, torch.float32)
    result = eliminate(model, (x, targets), EliminationConfig(stop_drop=1.0, max_fraction=1.0),
                       progress=False)
    sizes = {g.param_name: g.num_units for g in find_units(model, "structured", example_inputs=x[:1]).groups}
    assert len(result.order) == sum(sizes.values()) - len(sizes)
    assert all(sum(k == key for k, _ in result.order) == n - 1 for key, n in sizes.items())
    assert result.granularity == "structured"   # "neuron" means the unit groups here


def test_history_losses_are_those_of_the_removals_written_into_the_model():
    """The loss after each step is the loss of a copy of the model with the removed units
    written, and pruning the lowest-scored units (apply_masks) gives the same model."""
    model, x, targets = _build("llama", 3, torch.float32)
    result = eliminate(model, (x, targets), EliminationConfig(stop_drop=1.0, max_fraction=0.12,
                                                              per_step=4), progress=False)
    structure = discover(model, x[:1])
    layout = find_units(model, "structured", example_inputs=x[:1])
    for entry in result.history:
        count = entry["removed"]
        written = _removed_copy(model, layout, result.order[:count])
        assert entry["loss"] == pytest.approx(_metrics(written, x, targets)[0], rel=1e-5)
        keep = {k: torch.ones(s.numel(), dtype=torch.bool) for k, s in result.scores.items()}
        for key, unit in result.order[:count]:
            keep[key][unit] = False
        masked = copy.deepcopy(model)
        apply_masks(masked, structure, keep)
        assert all(torch.equal(a, b) for a, b in zip(masked.parameters(), written.parameters()))


def test_lazy_short_list_evaluates_only_the_short_list_between_full_passes():
    model, x, targets = _build("mha", 4, torch.float32)
    sizes = [g.num_units for g in find_units(model, "structured", example_inputs=x[:1]).groups]
    common = dict(stop_drop=1.0, per_step=1, max_fraction=8 / sum(sizes))
    exhaustive = eliminate(model, (x, targets), EliminationConfig(lazy=0, **common),
                           progress=False)
    # Every step evaluates every remaining unit of every group that has more than one.
    left, want = dict(zip(range(len(sizes)), sizes)), 0
    keys = [g.param_name for g in find_units(model, "structured", example_inputs=x[:1]).groups]
    for key, _ in exhaustive.order:
        want += sum(n for n in left.values() if n > 1)
        left[keys.index(key)] -= 1
    assert exhaustive.variants == want
    lazy = eliminate(model, (x, targets), EliminationConfig(lazy=3, full_every=8, **common),
                     progress=False)
    assert len(lazy.order) == 8
    assert lazy.variants <= sum(sizes) + 7 * 3


def test_prior_limits_the_measured_units_and_ranks_the_rest_by_it():
    """With a prior, a full pass measures only the prior_pool x (units still to remove) units it
    ranks lowest; units never measured rank above every measured one, in the prior's order."""
    model, x, targets = _build("llama", 5, torch.float32)
    layout = find_units(model, "structured", example_inputs=x[:1])
    sizes = {g.param_name: g.num_units for g in layout.groups}
    total = sum(sizes.values())
    generator = torch.Generator().manual_seed(11)
    prior = {k: torch.rand(n, generator=generator) for k, n in sizes.items()}
    config = EliminationConfig(stop_drop=1.0, per_step=2, lazy=0, max_fraction=4 / total,
                               prior_pool=1.5)
    result = eliminate(model, (x, targets), config, progress=False, prior=prior)
    flat = torch.cat([prior[k] for k in sizes])
    pool = torch.argsort(flat)[:6]  # 1.5 x 4 units still to remove at the first pass
    owners = [(k, u) for k, n in sizes.items() for u in range(n)]
    pooled = {owners[i] for i in pool.tolist()}
    assert set(result.order) <= pooled
    assert result.variants <= 6 + 3   # first pass: the pool of 6; second: 1.5 x 2 left
    assert result.unmeasured == total - len(pooled)
    unmeasured = [(k, u) for k, u in owners if (k, u) not in pooled]
    scores = result.scores
    lowest_unmeasured = min(float(scores[k][u]) for k, u in unmeasured)
    assert all(float(scores[k][u]) < lowest_unmeasured for k, u in pooled)
    by_prior = sorted(unmeasured, key=lambda ku: float(prior[ku[0]][ku[1]]))
    ranks = [float(scores[k][u]) for k, u in by_prior]
    assert ranks == sorted(ranks)
    # Without a prior the same search measures every unit in its first pass.
    plain = eliminate(model, (x, targets), config, progress=False)
    assert plain.variants > result.variants and plain.unmeasured == 0


def test_prior_must_cover_the_scored_groups():
    model, x, targets = _build("llama", 6, torch.float32)
    layout = find_units(model, "structured", example_inputs=x[:1])
    prior = {g.param_name: torch.rand(g.num_units) for g in layout.groups}
    first = layout.groups[0].param_name
    with pytest.raises(InputMismatchError, match="missing"):
        eliminate(model, (x, targets), progress=False,
                  prior={k: v for k, v in prior.items() if k != first})
    with pytest.raises(InputMismatchError, match="units"):
        eliminate(model, (x, targets), progress=False, prior={**prior, first: prior[first][:1]})
    with pytest.raises(InvalidOptionError, match="elimination"):
        targeted_scores(model, "weight", data=(x, targets), prior=prior, progress=False)


def test_joint_check_backs_off_on_unit_groups():
    """The redundant pair of tests/test_targeted.py inside a non-Sequential model: removing a
    or b alone barely hurts, both together is as bad as removing e."""
    class Wrapped(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    from test_targeted import _redundant_pair

    net, data = _redundant_pair()
    model = Wrapped(net)
    config = EliminationConfig(per_step=2, stop_drop=1.0, lazy=0)
    checked = eliminate(model, data, config, progress=False)
    assert checked.evaluator == "batched" and checked.backoffs >= 1
    first = checked.history[0]
    assert first["backoff"] and first["removed"] == 1
    assert first["actual"] > 100 * first["predicted"]
    unchecked = eliminate(model, data, EliminationConfig(per_step=2, stop_drop=1.0, lazy=0,
                                                         joint_check=False), progress=False)
    assert unchecked.backoffs == 0 and {u for _, u in unchecked.order[:2]} == {0, 1}


def test_sequential_batched_evaluator_equals_the_rank_path():
    """evaluator="batched" on an nn.Sequential evaluates the same removals (its per-layer
    neurons) as the rank path; the default stays the rank path."""
    from test_targeted import _convnet

    torch.manual_seed(8)
    model = _convnet().eval()
    x, y = torch.randn(24, 2, 8, 8), torch.randint(0, 3, (24,))
    layers = scored_layers(model)
    ev = SequentialEvaluator(copy.deepcopy(model), x, y)
    removals = GroupEvaluator(copy.deepcopy(model), find_units(model, "neuron"), x, y,
                              memory_budget=2 ** 22, backend="torch")
    for i, layer in enumerate(layers):
        units = torch.arange(model[layer.index].weight.shape[0])
        want, _ = ev.evaluate(layer, units)
        got, _ = removals.evaluate(i, units)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert eliminate(model, (x, y), EliminationConfig(stop_drop=1.0),
                     progress=False).evaluator == "rank"
    batched = eliminate(model, (x, y), EliminationConfig(stop_drop=1.0, evaluator="batched"),
                        progress=False)
    assert batched.evaluator == "batched" and batched.granularity == "neuron"
    assert set(batched.scores) == {layer.key for layer in layers}


def _contraction_flops(model, x):
    """Flops of the weight contractions (mm, addmm, convolution) of one forward, counted by
    torch's FlopCounterMode (an independent counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _logits(model, x)
    ops = counter.get_flop_counts()["Global"]
    aten = torch.ops.aten
    return sum(v for op, v in ops.items() if op in (aten.mm, aten.addmm, aten.convolution))


@pytest.mark.parametrize("name", ["llama", "gpt2", "resnet", "lenet5"])
def test_unit_macs_are_what_shrinking_one_unit_saves(name):
    model, x, targets = _build(name, 0, torch.float32)
    removals, layout = _group_evaluator(model, x[:1], targets[:1], name)
    dense = _contraction_flops(model, x[:1])
    for i, g in enumerate(layout.groups):
        if g.heads:
            continue  # attention's QK^T and AV shrink too; they are not weight contractions
        keep = {h.param_name: torch.ones(h.num_units, dtype=torch.bool) for h in layout.groups}
        keep[g.param_name][0] = False
        small = shrink(model, keep, example_inputs=x[:1])
        saved = (dense - _contraction_flops(small, x[:1])) / 2
        assert removals.unit_macs(i) == pytest.approx(saved), g.param_name
    if name == "llama":  # a key/value group: its q, k, v rows and o columns, per token
        hidden, head_dim, queries_per_kv, tokens = 32, 8, 2, x.shape[1]
        heads = next(i for i, g in enumerate(layout.groups) if g.heads)
        assert removals.unit_macs(heads) == tokens * hidden * head_dim * (2 * queries_per_kv + 2)


def test_macs_saving_removes_the_least_damage_per_multiply_add_first():
    model, x, targets = _build("resnet", 2)
    removals, layout = _group_evaluator(model, x, targets, "resnet")
    total = sum(g.num_units for g in layout.groups)
    macs = [removals.unit_macs(i) for i in range(len(layout.groups))]
    assert len(set(macs)) > 1          # the groups differ in cost per unit
    candidates = []
    for i, g in enumerate(layout.groups):
        loss, _ = removals.evaluate(i, torch.arange(g.num_units))
        for unit, value in enumerate(loss.double().tolist()):
            damage, saving = value - removals.loss, macs[i] / (sum(macs) / len(macs))
            priority = damage / saving if damage > 0 else damage * saving
            candidates.append((priority, g.param_name, unit))
    _, key, unit = min(candidates)
    config = EliminationConfig(saving="macs", per_step=1, lazy=0, stop_drop=1.0,
                               max_fraction=1.5 / total)
    result = eliminate(model, (x, targets), config, progress=False)
    assert result.order == [(key, unit)]


def test_macs_of_unit_groups_equal_the_sequential_evaluators():
    from test_targeted import _convnet

    torch.manual_seed(4)
    model = _convnet().eval()
    x, y = torch.randn(8, 2, 8, 8), torch.randint(0, 3, (8,))
    ev = SequentialEvaluator(model, x, y)
    removals = GroupEvaluator(copy.deepcopy(model), find_units(model, "structured",
                                                               example_inputs=x[:1]),
                              x, y, memory_budget=2 ** 22, backend="torch")
    for i, layer in enumerate(scored_layers(model)):
        assert removals.keys[i] == layer.key
        assert removals.unit_macs(i) == ev.unit_macs(layer)
    result = eliminate(model, (x, y), EliminationConfig(saving="macs", stop_drop=1.0,
                                                        evaluator="batched"), progress=False)
    assert sorted(torch.cat(list(result.scores.values())).tolist()) == [float(i) for i in
                                                                        range(5 + 6 + 8)]


def test_token_data_and_tensor_datasets():
    """A language model's data: integer token inputs, next tokens as (N, T) targets, as tensors
    or a TensorDataset; "neuron" means the unit groups on a transformers model."""
    model, inputs, targets = zoo.build("llama", 5)
    ids = inputs["input_ids"]
    plain = targeted_scores(model, "neuron", data=(ids, targets), progress=False,
                            stop_drop=1.0, max_fraction=0.08)
    dataset = targeted_scores(model, "structured", data=TensorDataset(ids, targets),
                              progress=False, stop_drop=1.0, max_fraction=0.08)
    assert plain.granularity == dataset.granularity == "structured"
    assert plain.result.order == dataset.result.order
    assert set(plain) == {g.param_name for g in
                          find_units(model, "structured", example_inputs=ids[:1]).groups}


# -- checks before long work (issue #17) -------------------------------------------------------

def _never_search(monkeypatch):
    import bingo.targeted.scores as scores

    def fail(*_args, **_kwargs):
        raise AssertionError("the search ran")

    for name, (config, _) in list(scores.SEARCHES.items()):
        monkeypatch.setitem(scores.SEARCHES, name, (config, fail))


def _lenet():
    from bingo.models import lenet_300_100

    torch.manual_seed(0)
    model = lenet_300_100(in_features=64).eval()
    return model, torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))


@pytest.mark.parametrize("problem", ["nan weight", "nan input", "inf buffer"])
def test_non_finite_weights_or_inputs_raise_before_the_search(problem, monkeypatch):
    model, x, y = _lenet()
    with torch.no_grad():
        if problem == "nan weight":
            model[1].weight[3, 5] = float("nan")
        elif problem == "nan input":
            x[7, 0, 2, 2] = float("nan")
    if problem == "inf buffer":
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(),
                              nn.Linear(8, 10)).eval()
        model[2].running_var[1] = float("inf")
    _never_search(monkeypatch)
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        targeted_prune(model, (x, y), sparsity=0.5, reconstruct=False, progress=False)
    monkeypatch.undo()
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        eliminate(model, (x, y), progress=False)


@pytest.mark.parametrize("problem, message", [
    ("float64 model", "float32 but the model's parameters are torch.float64"),
    ("integer inputs", "no embedding"),
    ("feature count", "forward fails on one example"),
    ("targets", "targets run from"),
    ("token ids", "forward fails on one example"),
])
def test_bad_data_raises_one_clear_error_before_the_search(problem, message, monkeypatch):
    model, x, y = _lenet()
    if problem == "float64 model":
        model = model.double()
    elif problem == "integer inputs":
        x = torch.randint(0, 5, x.shape)
    elif problem == "feature count":
        x = torch.randn(32, 1, 9, 9)
    elif problem == "targets":
        y = y + 10
    elif problem == "token ids":
        model, inputs, y = zoo.build("llama")
        x = inputs["input_ids"] + zoo.VOCAB    # ids past the vocabulary
    _never_search(monkeypatch)
    with pytest.raises(InputMismatchError, match=message):
        targeted_prune(model, (x, y), sparsity=0.5, progress=False)


def test_weight_searches_name_the_model_and_suggest_structured():
    model, inputs, targets = zoo.build("llama")
    data = (inputs["input_ids"], targets)
    for search in (allocate, iterative_refit):
        with pytest.raises(InputMismatchError, match="LlamaForCausalLM.*structured"):
            search(model, data, progress=False)
    with pytest.raises(InputMismatchError, match="LlamaForCausalLM.*structured"):
        targeted_scores(model, "weight", data=data, progress=False)
    with pytest.raises(InputMismatchError, match="nn.Sequential"):
        eliminate(model, data, EliminationConfig(evaluator="rank"), progress=False)


# -- what targeted_prune returns (issue #19) ---------------------------------------------------

def test_long_calls_show_progress_by_default():
    for function in (targeted_scores, targeted_prune, eliminate, allocate, iterative_refit):
        assert inspect.signature(function).parameters["progress"].default is True, function


def test_targeted_prune_returns_scores_search_and_timings():
    model, x, y = _lenet()
    result = targeted_prune(model, (x, y), sparsity=0.3, progress=False, stop_drop=1.0,
                            max_fraction=0.2)
    assert result.search.order and set(result.scores) == {"1.weight", "3.weight"}
    assert result.scores.result is result.search and result.scores.granularity == "neuron"
    assert set(result.timings) == {"search", "prune", "refit"}
    assert all(t >= 0 for t in result.timings.values()) and result.timings["refit"] > 0
    masked = targeted_prune(model, (x, y), sparsity=0.3, progress=False, stop_drop=1.0,
                            max_fraction=0.2, reconstruct=False)
    assert masked.timings["refit"] == 0.0
    assert all(torch.equal(masked.scores[k], result.scores[k]) for k in result.scores)


def test_targeted_prune_any_model():
    """Needs bingo.prune for structure-group scores (``granularity="structured"``,
    ``example_inputs=``)."""
    model, inputs, targets = zoo.build("llama", 6)
    ids = inputs["input_ids"]
    result = targeted_prune(model, (ids, targets), "structured", sparsity=0.25,
                            reconstruct=False, progress=False, stop_drop=1.0,
                            max_fraction=0.08)
    assert result.scores.granularity == "structured" and result.search.order
    total = sum(s.numel() for s in result.scores.values())
    assert result.pruned_units == round(0.25 * total)
    # The lowest-scored units are the ones gone.
    flat = torch.cat([result.scores[k] for k in result.scores])
    cut = flat.sort().values[result.pruned_units - 1]
    for key, keep in result.unit_masks.items():
        assert torch.equal(keep, result.scores[key] > cut)
