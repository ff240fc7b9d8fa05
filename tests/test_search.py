"""TicketSearch end to end: estimators on models with known important units, paths, resume, errors."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
import bingo_kernels as bk
from bingo import (InputMismatchError, InvalidOptionError, NoPrunableLayersError,
                   NonFiniteError, TicketSearch)
from bingo.models import lenet5, lenet_300_100
from bingo.executor import BatchedEvaluator, Design
from bingo.units import find_units

IMPORTANT = 4  # hidden neurons 0..3 carry the signal; 4..15 feed nothing


def _known_model(seed=0):
    """Linear(8,16) -> ReLU -> Linear(16,3); only hidden neurons 0..3 reach the output."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].weight.copy_(0.3 * torch.randn(16, 8, generator=g))
        model[0].bias.fill_(2.0)  # every hidden neuron is active on (almost) every input
        model[2].weight.zero_()
        # Each important neuron pushes its own pattern of logits; the others feed nothing.
        model[2].weight[:, :IMPORTANT] = torch.tensor([[2.0, -1.0, 1.5, -2.0],
                                                       [-1.5, 2.0, -1.0, 1.0],
                                                       [0.5, -1.0, -2.0, 2.5]])
        model[2].bias.zero_()
    x = torch.randn(256, 8, generator=g)
    y = model(x).argmax(-1)  # the model is perfect on its own labels
    return model, x, y


def _auc(important: torch.Tensor, other: torch.Tensor) -> float:
    """P(score of an important unit > score of an unimportant one)."""
    return (important[:, None] > other[None, :]).double().mean().item()


@pytest.mark.parametrize("score,metric", [("attribution", "loss"), ("seed", "loss"),
                                          ("seed", "accuracy"), ("attribution", "accuracy")])
def test_neuron_estimators_find_the_important_units(score, metric):
    model, x, y = _known_model()
    search = TicketSearch(model, granularity="neuron", subsets=64, fraction=0.25, reset="zero",
                          metric=metric, score=score, include=["0"])
    for _ in range(8):
        search.step(x, y)
    sig = search.significance()["0.weight"]
    assert sig.shape == (16,) and float(sig.min()) >= 0 and float(sig.max()) <= 1
    assert _auc(sig[:IMPORTANT], sig[IMPORTANT:]) == 1.0


def test_literal_seed_formula_ranks_backwards():
    model, x, y = _known_model()
    common = dict(granularity="neuron", subsets=64, fraction=0.25, reset="zero", metric="loss",
                  score="seed", include=["0"])
    intended, literal = TicketSearch(model, **common), TicketSearch(model, literal=True, **common)
    for _ in range(6):
        intended.step(x, y)
        literal.step(x, y)
    a, b = intended.significance()["0.weight"], literal.significance()["0.weight"]
    assert _auc(a[:IMPORTANT], a[IMPORTANT:]) == 1.0
    assert _auc(b[:IMPORTANT], b[IMPORTANT:]) == 0.0
    # Same evidence, opposite direction: exactly mirrored rankings.
    assert torch.equal(a.argsort(stable=True), (-b).argsort(stable=True))


def test_weight_estimator_finds_weights_into_dead_neurons():
    model, x, y = _known_model()
    search = TicketSearch(model, granularity="weight", subsets=128, fraction=0.05, reset="zero",
                          metric="loss", score="attribution", include=["0"])
    for _ in range(20):
        search.step(x, y)
    sig = search.significance()["0.weight"]  # (16, 8): rows 4.. feed dead neurons
    assert sig.shape == (16, 8)
    # Weights into dead neurons have exactly zero effect; live ones matter in proportion to |w|,
    # so the guarantee is about the strongest live weights, not all of them.
    live, dead = sig[:IMPORTANT].flatten(), sig[IMPORTANT:].flatten()
    top = sig.flatten().argsort(descending=True)[:8]
    assert (top < IMPORTANT * 8).all()
    strong = model[0].weight[:IMPORTANT].abs().flatten() > 0.3
    assert _auc(live[strong], dead) > 0.95
    assert live.mean() > 2 * dead.mean()


def test_coverage_and_stderr_reported():
    model, x, y = _known_model()
    search = TicketSearch(model, granularity="neuron", subsets=32, fraction=0.2, metric="loss",
                          score="attribution", include=["0"], reset="zero")
    for _ in range(3):
        search.step(x, y)
    sig = search.significance()
    cov = sig.coverage["0.weight"]
    assert cov.dtype == torch.int64 and int(cov.sum()) > 0
    assert abs(cov.double().mean().item() - 0.2 * 96) < 4 * (0.2 * 0.8 * 96) ** 0.5
    assert torch.isfinite(sig.stderr["0.weight"]).all() and (sig.stderr["0.weight"] > 0).all()
    assert sig.searches == 3 and sig.estimator == "attribution" and sig.granularity == "neuron"
    assert sig.summary()["layers"]["0.weight"]["units"] == 16


def test_unsampled_units_score_one_and_are_counted():
    model, x, y = _known_model()
    p = torch.full((16,), 0.3)
    p[10:] = 0.0  # never sampled
    search = TicketSearch(model, granularity="neuron", subsets=16, fraction={"0.weight": p},
                          metric="loss", score="attribution", include=["0"], reset="zero")
    search.step(x, y)
    sig = search.significance()
    assert (sig["0.weight"][10:] == 1.0).all() and (sig.coverage["0.weight"][10:] == 0).all()
    assert sig.unsampled() == 6
    with pytest.raises(bingo.BingoError, match="never"):
        bingo.prune(model, sig, sparsity=0.9)


def test_uninformative_metric_warns():
    model, x, y = _known_model()
    search = TicketSearch(model, granularity="neuron", subsets=8, fraction=0.2, include=["0"],
                          exclude=None, metric="accuracy", score="seed")
    with torch.no_grad():
        model[2].weight.zero_()  # nothing can change the output now
        model[2].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    search.step(x, torch.zeros_like(y))
    with pytest.warns(UserWarning, match="never moved"):
        search.significance()


# --- evaluation paths ----------------------------------------------------------------------------

class RowMixing(nn.Module):
    """Subtracts the batch mean: rows are not independent, so the fast path is wrong here."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class FunctionalMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _run(model, x, y, path, granularity="weight", reset="zero"):
    s = TicketSearch(model, granularity=granularity, subsets=12, fraction=0.3, metric="loss",
                     score="attribution", path=path, reset=reset, include=None)
    s.step(x, y)
    return s


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("factory,shape", [
    (FunctionalMLP, (20, 6)),
    (lambda: lenet5(image_size=12), (10, 1, 12, 12)),
])
def test_fast_and_vmap_paths_agree(factory, shape, granularity):
    torch.manual_seed(0)
    model = factory()
    x, y = torch.randn(*shape), torch.randint(0, 4, (shape[0],))
    fast, vmap = _run(model, x, y, "fast", granularity), _run(model, x, y, "vmap", granularity)
    auto = _run(model, x, y, "auto", granularity)
    assert auto.path == "fast"
    for key in fast.stats.per_unit:
        assert torch.allclose(fast.stats.per_unit[key], vmap.stats.per_unit[key], atol=1e-4)


def test_row_mixing_model_falls_back_to_vmap_with_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), RowMixing(), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with pytest.warns(UserWarning, match="vmap fallback"):
        auto = _run(model, x, y, "auto")
    assert auto.path == "vmap" and "differ" in auto.path_reason
    vmap = _run(model, x, y, "vmap")
    assert torch.equal(auto.stats.per_unit["0.weight"], vmap.stats.per_unit["0.weight"])


def test_multihead_attention_takes_the_vmap_path():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    torch.manual_seed(0)
    model = Attn().eval()
    x, y = torch.randn(6, 5, 8), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = _run(model, x, y, "auto")
    assert s.path == "vmap"  # out_proj's weight is used without calling out_proj


def test_chunking_over_k_does_not_change_results():
    torch.manual_seed(0)
    model = lenet_300_100(in_features=16)
    x, y = torch.randn(32, 16), torch.randint(0, 10, (32,))
    big = TicketSearch(model, subsets=40, fraction=0.1, metric="loss", score="attribution")
    small = TicketSearch(model, subsets=40, fraction=0.1, metric="loss", score="attribution",
                         memory_budget=200_000)
    big.step(x, y)
    small.step(x, y)
    assert small.evaluator.chunk_size(x, 40) < big.evaluator.chunk_size(x, 40)
    for key in big.stats.per_unit:
        assert torch.allclose(big.stats.per_unit[key], small.stats.per_unit[key], atol=1e-5)


def test_search_leaves_model_untouched_and_restores_mode():
    model, x, y = _known_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = TicketSearch(model, granularity="weight", subsets=8, fraction=0.5)
    s.step(x, y)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all("forward" not in vars(m) for m in model.modules())


# --- shared modules, and the model after a search ----------------------------------------------

class CalledTwice(nn.Module):
    """One Linear applied twice in a forward (one name)."""

    def __init__(self):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.mid(torch.relu(self.mid(h)))))


def _registered_twice():
    """One Linear registered under two names ("2" and "4") of an nn.Sequential."""
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(),
                         nn.Linear(8, 3))


def _oracle_losses(model, search, x, y, search_index=0):
    """Per-subset loss of a copy of the model into which each subset's reset is written (the
    shared module is one module in the copy too, so one reset reaches every use)."""
    cfg, layout = search.config, search.layout
    losses = []
    for k in range(cfg.subsets):
        copy_ = copy.deepcopy(model)
        params = dict(copy_.named_parameters())
        with torch.no_grad():
            for g in layout.groups:
                mask = bk.subset_mask(cfg.seed, search_index, k, 1, g.offset, g.num_units,
                                      cfg.fraction)[0]
                for name in g.tensors():
                    p = params[name]
                    if layout.granularity == "neuron":  # a row with its bias entry
                        m = mask.view(-1, *([1] * (p.dim() - 1)))
                    elif name == g.param_name:  # weight units leave the bias trained
                        m = mask.view(p.shape)
                    else:
                        continue
                    p.copy_(torch.where(m, search.init[name], p))
        losses.append(F.cross_entropy(copy_.eval()(x).double(), y).item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("path", ["auto", "vmap"])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("factory", [_registered_twice, CalledTwice],
                         ids=["registered-twice", "called-twice"])
def test_shared_module_is_searched_once_and_the_model_stays_intact(factory, granularity, path):
    """A module used at two places: one group, its units counted once, each subset's reset
    applied at both uses (equal to writing the reset into a copy), and afterwards the model is
    untouched and trains (the vmap path used to leave an escaped vmapped weight in it)."""
    torch.manual_seed(0)
    model = factory()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    params = dict(model.named_parameters())
    values = {k: v.detach().clone() for k, v in params.items()}
    search = TicketSearch(model, granularity=granularity, subsets=6, fraction=0.3, metric="loss",
                          score="attribution", include="*", path=path)
    assert search.layout.total == sum(g.num_units for g in search.layout.groups) == (
        (6 * 8 + 8 * 8 + 8 * 3) if granularity == "weight" else 8 + 8 + 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no vmap fallback warning: the fast path agrees
        record = search.step(x, y)
    assert search.path == ("fast" if path == "auto" else "vmap")
    oracle = _oracle_losses(model, search, x, y)
    assert record["after_loss"] == pytest.approx(float(oracle.mean()), rel=1e-5)
    values_k = oracle - F.cross_entropy(model(x).double(), y).item()
    for g in search.layout.groups:
        masks = bk.subset_mask(0, 0, 0, 6, g.offset, g.num_units, 0.3).double()
        want = masks.t() @ torch.stack([torch.ones_like(values_k), values_k, values_k ** 2], 1)
        assert torch.allclose(search.stats.per_unit[g.param_name], want, atol=1e-4), g.name
    assert dict(model.named_parameters()) == params  # the same objects ...
    assert all(torch.equal(p, values[k]) for k, p in params.items())  # ... and values
    torch.save(model.state_dict(), io.BytesIO())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    search.step(x, y)


def test_tied_parameters_of_two_layers_are_one_group_reset_at_both_uses():
    """A weight shared by two layers is one set of units (one score key, the canonical name),
    and a reset of it reaches both layers: the batched losses equal a copy-and-run oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    model[2].weight = model[0].weight
    model = model.double()
    layout = find_units(model, "neuron")
    assert [g.param_name for g in layout.groups] == ["0.weight"]
    init = {n: p.detach().clone() + 0.5 for n, p in model.named_parameters()}
    design = Design(5, 0, 4, {"0.weight": 0.4})
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    evaluator = BatchedEvaluator(model, layout, backend="torch")
    with pytest.warns(UserWarning, match="vmap"):
        got = evaluator.subsets(x, y, design, init)
    masks = design.unit_masks(layout, layout.groups[0], 0, 4)
    for k in range(4):
        blended = copy.deepcopy(model)
        with torch.no_grad():
            rows = masks[k]
            blended[0].weight[rows] = init["0.weight"][rows]   # blended[2] shares it
            blended[0].bias[rows] = init["0.bias"][rows]
            loss = F.cross_entropy(blended(x), y)
        torch.testing.assert_close(got.loss[k].double(), loss, rtol=1e-5, atol=1e-6)


def test_model_is_kept_as_it_was_whatever_the_search_does():
    """Modes per module (a frozen batch norm stays in eval mode), an instance forward the user
    set (a wrapper's hook), parameter objects; also when the search raises. A failed call
    leaves the search's counters as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    model[1].eval()  # frozen statistics while the rest trains
    wrapped = model[3].forward
    model[3].forward = lambda h: wrapped(h)  # as accelerate-style hooks do
    user_forward = model[3].forward
    params = dict(model.named_parameters())
    search = TicketSearch(model, subsets=4, fraction=0.3)
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    for inputs in (x, torch.full_like(x, float("nan"))):
        try:
            search.step(inputs, y)
        except bingo.NonFiniteError:
            assert inputs.isnan().all() and search.calls == 1 and search.searches == 1
        assert [m.training for m in model.modules()] == [True, True, False, True, True]
        assert vars(model[3])["forward"] is user_forward
        assert all("forward" not in vars(m) for i, m in enumerate(model) if i != 3)
        assert dict(model.named_parameters()) == params


def test_replaced_layer_is_refused_at_the_next_search():
    torch.manual_seed(0)
    model = lenet_300_100(in_features=16)
    search = TicketSearch(model, subsets=2)
    x, y = torch.randn(4, 16), torch.randint(0, 10, (4,))
    search.step(x, y)
    model[3] = nn.Linear(300, 100)  # e.g. a re-initialised or shrunk layer
    with pytest.raises(InputMismatchError, match="layer '3' is no longer the model's"):
        search.step(x, y)
    assert search.searches == 1 and search.calls == 1


# --- schedule: every, rewind, search data ---------------------------------------------------------

def _train(model, search, steps, seed=0, lr=0.05):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    data = [(torch.randn(32, 16, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(steps)]
    return opt, data


def test_every_and_rewind_schedule():
    torch.manual_seed(0)
    model = lenet_300_100(in_features=16)
    s = TicketSearch(model, subsets=4, fraction=0.1, every=3, reset="rewind", rewind_step=2)
    assert s.init is None
    opt, data = _train(model, s, 9)
    ran = []
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if s.calls + 1 == 2:
            expected_snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        ran.append(s.step(x, y) is not None)
    # Calls 1,4,7 are every-3rd; call 1 precedes the rewind snapshot taken at call 2.
    assert ran == [False, False, False, True, False, False, True, False, False]
    assert torch.equal(s.init["1.weight"], expected_snapshot["1.weight"])
    assert s.searches == 2


def test_separate_search_data():
    torch.manual_seed(0)
    model = lenet_300_100(in_features=16)
    held_out = [(torch.randn(8, 16), torch.randint(0, 10, (8,))) for _ in range(2)]
    s = TicketSearch(model, subsets=4, fraction=0.1, search_data=held_out)
    s.step()
    s.step(torch.randn(3, 16), torch.randint(0, 10, (3,)))  # training batch ignored
    assert s.searches == 2


# --- resume --------------------------------------------------------------------------------------

def _training_run(steps, save_at=None, path=None, resume_from=None):
    torch.manual_seed(1)
    model = lenet_300_100(in_features=16)
    search = TicketSearch(model, granularity="weight", subsets=16, fraction=0.05, metric="loss",
                          score="attribution", seed=7)
    opt, data = _train(model, search, steps)
    start = 0
    if resume_from is not None:
        ckpt = torch.load(resume_from[0])
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        search.load(resume_from[1])
        start = search.calls
    for i, (x, y) in enumerate(data[start:], start):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        search.step(x, y)
        if save_at is not None and i + 1 == save_at:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path[0])
            search.save(path[1])
            return None
    return search.significance()


def test_state_dict_round_trip_resumes_identically(tmp_path):
    paths = (tmp_path / "train.pt", tmp_path / "search.pt")
    uninterrupted = _training_run(10)
    _training_run(10, save_at=4, path=paths)
    resumed = _training_run(10, resume_from=paths)
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key])
        assert torch.equal(uninterrupted.coverage[key], resumed.coverage[key])


# --- bad input -----------------------------------------------------------------------------------

def test_no_prunable_layers():
    with pytest.raises(NoPrunableLayersError, match="no nn.Linear"):
        TicketSearch(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(NoPrunableLayersError, match="leave no layer"):
        TicketSearch(lenet_300_100(), exclude=["*"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(granularity="row"), "granularity"), (dict(reset="random"), "reset"),
    (dict(metric="f1"), "metric"), (dict(score="shapley"), "score"),
    (dict(subsets=0), "subsets"), (dict(fraction=0.0), "fraction"), (dict(fraction=1.5), "fraction"),
    (dict(every=0), "every"), (dict(seed=-1), "seed"), (dict(backend="tpu"), "backend"),
    (dict(reset="rewind"), "rewind_step"), (dict(rewind_step=3), "rewind_step"),
    (dict(literal=True, score="attribution"), "literal"), (dict(path="jit"), "path"),
    (dict(include=["nope"]), "matches no"), (dict(fraction={"1.weight": torch.ones(3)}), "keys"),
])
def test_unknown_options_are_named(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        TicketSearch(lenet_300_100(), **kwargs)


def test_unavailable_backend_is_explained():
    import bingo_kernels as bk
    # cuda is not built in this version, so this always runs (triton may run in its interpreter).
    assert bk.unavailable_reason("cuda") is not None
    with pytest.raises(bingo.BackendUnavailableError, match="cuda"):
        TicketSearch(lenet_300_100(), backend="cuda")


def test_input_mismatches_are_named():
    model = lenet_300_100(in_features=16)
    s = TicketSearch(model, subsets=2)
    y = torch.randint(0, 10, (4,))
    with pytest.raises(InputMismatchError, match="forward failed"):
        s.step(torch.randn(4, 17), y)
    with pytest.raises(InputMismatchError, match="dtype"):
        s.step(torch.randn(4, 16, dtype=torch.float64), y)
    with pytest.raises(InputMismatchError, match="meta"):
        s.step(torch.randn(4, 16, device="meta"), y)
    with pytest.raises(InputMismatchError, match="batch"):
        s.step(torch.randn(4, 16), torch.randint(0, 10, (5,)))
    with pytest.raises(InputMismatchError, match="integer"):
        s.step(torch.randn(4, 16), torch.rand(4))
    with pytest.raises(InputMismatchError, match="two tensors"):
        s.step()


def test_batches_with_nothing_to_measure_are_refused():
    """An empty batch, or one whose targets are all padding, is not a search with zero damage."""
    model = lenet_300_100(in_features=16)
    s = TicketSearch(model, subsets=2, metric="loss", score="attribution")
    with pytest.raises(InputMismatchError, match="empty"):
        s.step(torch.randn(0, 16), torch.zeros(0, dtype=torch.long))
    with pytest.raises(InputMismatchError, match="ignore index -100"):
        s.step(torch.randn(4, 16), torch.full((4,), -100))
    assert s.calls == 0 and s.searches == 0 and not s.history
    held_out = [(torch.randn(0, 16), torch.zeros(0, dtype=torch.long))]
    with pytest.raises(InputMismatchError, match="empty"):
        TicketSearch(model, subsets=2, search_data=held_out).step()


def test_attribution_needs_units_left_out_of_some_subsets():
    model = lenet_300_100(in_features=16)
    with pytest.raises(InvalidOptionError, match="fraction of 1.0 puts a unit in every subset"):
        TicketSearch(model, subsets=4, fraction=1.0, score="attribution")
    p = torch.full((300,), 0.2)
    p[7] = 1.0
    with pytest.raises(InvalidOptionError, match="attribution"):
        TicketSearch(model, granularity="neuron", subsets=4,
                     fraction={"1.weight": p, "3.weight": torch.full((100,), 0.2)},
                     score="attribution")
    TicketSearch(model, subsets=4, fraction=1.0, score="seed")  # defined for the seed score


def test_warning_says_when_units_were_sampled_but_have_no_estimate():
    """Units in every subset so far have no attribution estimate: the warning says so, rather
    than claiming that no unit was sampled."""
    model, x, y = _known_model()
    s = TicketSearch(model, granularity="neuron", subsets=1, fraction=0.9999, metric="loss",
                     score="attribution", include=["0"])
    s.step(x, y)
    assert (s.stats.per_unit["0.weight"][:, 0] > 0).all()  # every unit sampled
    with pytest.warns(UserWarning, match="no unit has an estimate yet .*subsets that do not"):
        s.significance()


def test_meta_model_is_refused_before_anything_runs():
    model = lenet_300_100(in_features=16).to("meta")
    for reset in ("init", "zero"):
        with pytest.raises(InputMismatchError, match="'1.weight' is on the meta device"):
            TicketSearch(model, subsets=2, reset=reset)


class CappedBatch(nn.Module):
    """Evaluates at most 64 rows at a time (a fixed-size buffer, say)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))[:64]


def test_fast_path_failure_after_the_path_was_chosen_is_a_bingo_error():
    """The path is chosen on 2 subsets; a later block of subsets that does not fit raised the
    executor's internal exception."""
    torch.manual_seed(0)
    s = TicketSearch(CappedBatch(), subsets=12, fraction=0.3, metric="loss", include="*")
    with pytest.raises(InputMismatchError, match="fast path cannot evaluate .*path='vmap'"):
        s.step(torch.randn(16, 6), torch.randint(0, 4, (16,)))
    assert s.path == "fast" and s.searches == 0


def test_nan_weights_and_nan_metrics_are_named():
    model = lenet_300_100(in_features=16)
    s = TicketSearch(model, subsets=2)
    x, y = torch.randn(4, 16), torch.randint(0, 10, (4,))
    with torch.no_grad():
        model[3].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="3.weight"):
        s.step(x, y)
    with torch.no_grad():
        model[3].weight[0, 0] = 0.0
    s.step(x, y)
    bad = TicketSearch(model, subsets=2)
    with pytest.raises(NonFiniteError, match="loss"):
        bad.step(torch.full((4, 16), float("inf")), y)
    model[1].weight.data[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="snapshot"):
        TicketSearch(model)


def test_search_data_is_reiterated_each_pass_not_replayed():
    """A new pass over search_data starts when one ends (a DataLoader would reshuffle here)."""

    class Passes:
        def __init__(self):
            self.started = 0

        def __iter__(self):
            self.started += 1
            g = torch.Generator().manual_seed(self.started)
            return iter([(torch.randn(4, 16, generator=g), torch.randint(0, 10, (4,), generator=g))
                         for _ in range(2)])

    data = Passes()
    s = TicketSearch(lenet_300_100(in_features=16), subsets=2, search_data=data)
    for _ in range(5):
        s.step()
    assert data.started == 3 and s.searches == 5
    with pytest.raises(InputMismatchError, match="no batch"):
        TicketSearch(lenet_300_100(in_features=16), subsets=2, search_data=[]).step()
