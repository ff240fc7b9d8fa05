"""Attention heads and MLP neurons as structured units (issue #6).

Discovery for nn.MultiheadAttention and Linear-built (HF-style, separate and fused qkv) blocks;
the batched K-subset evaluation against a slow reference that builds each blended model and runs
it alone (fresh random inputs; loss within 1e-4 relative, float64 models); the fused LM head
never materialising K x tokens x vocab logits; shrink == mask; Wanda and magnitude on known
cases; clear errors for unsupported blocks.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bingo.attention import PrunedMultiheadAttention, attention, declare_heads
from bingo.baselines import baseline_scores
from bingo.errors import InputMismatchError
from bingo.executor import BatchedEvaluator, Design
from bingo.pruning import prune
from bingo.units import find_units
from kernel_helpers import LargestOutput

D, H, V = 16, 4, 11


class HFAttention(nn.Module):
    def __init__(self, fused=False):
        super().__init__()
        self.num_heads = H
        self.o = nn.Linear(D, D)
        if fused:
            self.qkv = nn.Linear(D, 3 * D)
            declare_heads(self, qkv="qkv", o="o", num_heads=H)
        else:
            self.q, self.k, self.v = (nn.Linear(D, D) for _ in range(3))
            declare_heads(self, q="q", k="k", v="v", o="o", num_heads=H)

    def forward(self, x):
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        return self.o(attention(q, k, v, self.num_heads, is_causal=True)[0])


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)

    def forward(self, x):
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


class TinyLM(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.attn = MHA() if kind == "mha" else HFAttention(fused=kind == "fused")
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.head = nn.Linear(D, V)

    def forward(self, x):
        x = x + self.attn(x)
        return self.head(x + self.mlp(x))


KINDS = ["mha", "linear", "fused"]


def _seeded():
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def _model(kind):
    model = TinyLM(kind).double().eval()
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # "training": move away from the reset values
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model, init


def test_discovery_orders_heads_then_mlp_neurons():
    for kind, params in [("mha", {"attn.mha.in_proj_weight", "attn.mha.in_proj_bias",
                                  "attn.mha.out_proj.weight"}),
                         ("linear", {f"attn.{r}.{p}" for r in "qkv" for p in ("weight", "bias")}
                          | {"attn.o.weight"}),
                         ("fused", {"attn.qkv.weight", "attn.qkv.bias", "attn.o.weight"})]:
        layout = find_units(TinyLM(kind), "structured", example_inputs=_x())
        key = "attn.mha.heads" if kind == "mha" else "attn.heads"
        assert [(g.param_name, g.num_units, g.offset) for g in layout.groups] == \
            [(key, H, 0), ("mlp.0.weight", 2 * D, H)]
        assert set(layout.groups[0].tensors()) == params
    # other granularities are unchanged: no head groups
    assert [g.param_name for g in find_units(TinyLM("linear"), "neuron").groups][:1] == \
        ["attn.o.weight"]


def _x(batch=2, length=5, dtype=torch.float32):
    return torch.randn(batch, length, D, dtype=dtype)


def _slow_reference(model, init, layout, design, x, y):
    """Blend each subset's model by hand and run it alone: (K,) loss and accuracy."""
    losses, accs = [], []
    heads = {g.param_name: design.unit_masks(layout, g, 0, design.num_subsets)
             for g in layout.groups if g.heads}
    neurons = {g.param_name: design.masks(layout, g, 0, design.num_subsets).materialize(
        g.num_units) for g in layout.groups if not g.heads}
    dh = D // H
    for k in range(design.num_subsets):
        blended = copy.deepcopy(model)
        params = dict(blended.named_parameters())
        with torch.no_grad():
            for key, masks in heads.items():
                for h in torch.nonzero(masks[k]).flatten().tolist():
                    rows = slice(h * dh, (h + 1) * dh)
                    for name, p in params.items():
                        if not name.startswith("attn."):
                            continue
                        if name.endswith(("o.weight", "out_proj.weight")):
                            p[:, rows] = init[name][:, rows]
                        elif name.endswith(("o.bias", "out_proj.bias")):
                            continue
                        else:  # q/k/v rows; packed weights hold q; k; v blocks of D rows
                            for block in range(p.shape[0] // D):
                                r = slice(block * D + h * dh, block * D + (h + 1) * dh)
                                p[r] = init[name][r]
            for key, masks in neurons.items():
                assert key == "mlp.0.weight"
                for n in torch.nonzero(masks[k]).flatten().tolist():
                    # An MLP neuron: its row and bias in mlp.0, its column in mlp.2.
                    params["mlp.0.weight"][n] = init["mlp.0.weight"][n]
                    params["mlp.0.bias"][n] = init["mlp.0.bias"][n]
                    params["mlp.2.weight"][:, n] = init["mlp.2.weight"][:, n]
            logits = blended(x)
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
        accs.append((logits.argmax(-1) == y).double().mean())
    return torch.stack(losses), torch.stack(accs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["auto", "fast", "vmap"])
def test_batched_heads_match_blended_models(kind, path):
    """``fast`` requested (no vmap probe) must still find that these blocks need the inputs
    repeated per subset (their residual adds the input)."""
    seed = _seeded()
    model, init = _model(kind)
    x, y = torch.randn(3, 5, D, dtype=torch.float64), torch.randint(0, V, (3, 5))
    layout = find_units(model, "structured", example_inputs=x)
    design = Design(seed % 2**32, 0, 6, {g.param_name: 0.4 for g in layout.groups})
    evaluator = BatchedEvaluator(model, layout, backend="torch", path=path)
    got = evaluator.subsets(x, y, design, init)
    ref_loss, ref_acc = _slow_reference(model, init, layout, design, x, y)
    assert evaluator.path == ("vmap" if path == "vmap" else "fast"), evaluator.path_reason
    # float64 model; the fused metrics accumulate in float32
    torch.testing.assert_close(got.loss.double(), ref_loss, rtol=1e-4, atol=1e-5,
                               msg=f"seed {seed}")
    assert (got.accuracy.double() - ref_acc).abs().max() <= 1.5 / y.numel(), f"seed {seed}"
    assert not torch.equal(ref_loss, ref_loss[:1].expand_as(ref_loss)), "subsets all alike"


def test_fused_lm_head_never_builds_subset_logits(monkeypatch):
    """K x tokens x vocab logits never exist in storage; the hidden states do (K x tokens x D)."""
    from bingo_kernels import reference
    # A small logit budget, as at a real vocabulary: class chunks of 256 (see test_linear_metrics).
    monkeypatch.setattr(reference, "_MIN_AUTO_CHUNK", 16)
    monkeypatch.setattr(reference, "_LOGIT_ELEMENTS", 1 << 14)
    _seeded()
    vocab = 4096
    model = TinyLM("linear").eval()
    model.head = nn.Linear(D, vocab)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    K, B, T = 8, 2, 6
    x, y = torch.randn(B, T, D), torch.randint(0, vocab, (B, T))
    layout = find_units(model, "structured", example_inputs=x)
    design = Design(1, 0, K, {g.param_name: 0.3 for g in layout.groups})
    evaluator = BatchedEvaluator(model, layout, backend="torch")
    evaluator.subsets(x, y, design, init)  # chooses the path (probes 2 subsets unfused)
    assert evaluator.fused and evaluator.path == "fast"
    with LargestOutput(storage=True) as probe:
        fused = evaluator.subsets(x, y, design, init)
    assert probe.largest < K * B * T * vocab // 4, probe.largest
    evaluator.fused = False  # the unfused composition agrees
    unfused = evaluator.subsets(x, y, design, init)
    torch.testing.assert_close(fused.loss, unfused.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.accuracy, unfused.accuracy)


@pytest.mark.parametrize("kind", KINDS)
def test_shrink_equals_mask(kind):
    seed = _seeded()
    model, _ = _model(kind)
    layout = find_units(model, "structured", example_inputs=_x(dtype=torch.float64))
    scores = {g.param_name: 0.2 + 0.6 * torch.rand(layout.unit_shape(g)) for g in layout.groups}
    # Two random heads go first, two stay: random head scores alone empty or keep all heads of
    # the block in ~1 run of 10, which tests neither the shrink nor the assertions below.
    heads = layout.groups[0].param_name
    scores[heads] = torch.ones(H)
    scores[heads][torch.randperm(H)[:2]] = 0.0
    # A custom model: prune needs one input to discover its structure.
    example = torch.randn(2, 5, D, dtype=torch.float64)
    result = prune(model, scores, sparsity=0.5, progress=False, example_inputs=example)
    small = result.structured.model
    assert result.structured.parameters < result.structured.dense_parameters
    kept = int(result.unit_masks[heads].sum())
    assert kept == H - 2
    if kind == "mha":
        assert isinstance(small.attn.mha, PrunedMultiheadAttention)
    assert find_units(small, "structured", example_inputs=_x(dtype=torch.float64)
                      ).groups[0].num_units == kept
    x = torch.randn(4, 7, D, dtype=torch.float64)  # fresh inputs, another length
    with torch.no_grad():
        torch.testing.assert_close(small(x), result.model(x), rtol=1e-10, atol=1e-10,
                                   msg=f"seed {seed}")


def test_pruned_mha_matches_torch_mha():
    _seeded()
    mha = nn.MultiheadAttention(D, H, batch_first=True).double().eval()
    from bingo.attention import PrunedMultiheadAttention
    same = PrunedMultiheadAttention(D, H, D // H, batch_first=True, dtype=torch.float64).eval()
    same.load_state_dict(mha.state_dict())
    q, kv = torch.randn(2, 5, D, dtype=torch.float64), torch.randn(2, 7, D, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    for kwargs in (dict(need_weights=True), dict(key_padding_mask=pad, need_weights=False)):
        want = mha(q, kv, kv, **kwargs)
        got = same(q, kv, kv, **kwargs)
        torch.testing.assert_close(got[0], want[0])
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1])


def test_wanda_known_case():
    """|W| * ||X||: one Linear with inputs whose column norms are known exactly."""
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, -1.0]]))
    x = torch.tensor([[3.0, 0.0, 1.0], [4.0, 1.0, 0.0]])  # column norms 5, 1, 1
    weight = baseline_scores("wanda", model, "weight", data=[(x, None)], include=["0"])
    torch.testing.assert_close(weight["0.weight"], torch.tensor([[5.0, 2.0, 0.5], [0.0, 1.0, 1.0]]))
    neuron = baseline_scores("wanda", model, "neuron", data=[(x, None)])
    # row sums 7.5 and 2.0, divided by their mean 4.75
    torch.testing.assert_close(neuron["0.weight"], torch.tensor([7.5, 2.0]) / 4.75)


@pytest.mark.parametrize("method", ["wanda", "magnitude", "lamp"])
def test_head_baselines_rank_a_dead_head_last(method):
    _seeded()
    model, _ = _model("linear")
    dead = 2
    with torch.no_grad():  # head 2: its q/k/v rows and o columns scaled down 100x
        for name in "qkv":
            getattr(model.attn, name).weight[dead * 4:(dead + 1) * 4] /= 100
            getattr(model.attn, name).bias[dead * 4:(dead + 1) * 4] /= 100
        model.attn.o.weight[:, dead * 4:(dead + 1) * 4] /= 100
    data = [(torch.randn(2, 5, D, dtype=torch.float64), None)]
    # wanda traces the model on its first calibration batch; the data-free baselines are told
    # what to trace it with (TinyLM is neither a transformers model nor an MLP)
    options = dict(data=data) if method == "wanda" else dict(example_inputs=data[0][0])
    scores = baseline_scores(method, model, "structured", **options)["attn.heads"]
    assert int(scores.argmin()) == dead and scores.shape == (H,)
    if method != "lamp":  # LAMP scores are shares of the layer's energy, not normalised
        assert abs(float(scores.mean()) - 1.0) < 1e-5  # layer-normalised


def test_bad_attention_blocks_raise_naming_them():
    block = nn.Module()
    block.q, block.k, block.v, block.o = (nn.Linear(D, D) for _ in range(4))
    block.num_heads = 3
    with pytest.raises(InputMismatchError, match="num_heads=3 does not divide"):
        declare_heads(block, q="q", k="k", v="v", o="o", num_heads=3)
    with pytest.raises(InputMismatchError, match="not a submodule"):
        declare_heads(block, q="nope", k="k", v="v", o="o", num_heads=4)
    block.k = nn.Linear(D, D // 2)
    block.num_heads = 4
    with pytest.raises(InputMismatchError, match="grouped-query attention is found by tracing"):
        declare_heads(block, q="q", k="k", v="v", o="o", num_heads=4)
    model, _ = _model("linear")
    with pytest.raises(InputMismatchError, match="not a recognised attention block"):
        prune(model, {"mlp.heads": torch.ones(2)}, sparsity=0.1, progress=False,
              example_inputs=torch.randn(2, 5, D, dtype=torch.float64))
