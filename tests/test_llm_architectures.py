"""The structure layer on the causal LM families users bring to ``bingo llm prune``: transformers'
own classes built from small configs (no downloads), each checked end to end on fresh weights.

For each family: the trace finds its attention heads (or key-value groups) and MLP neurons, or
says why its heads cannot be removed (ALiBi's slopes depend on the head count; a fused q/k/v
projection whose split the trace cannot follow); removing random units physically gives the
masked model's outputs, at the traced length and at another; the batched search of reset subsets
equals the one-at-a-time oracle. Phi-3, whose attention reads the config's head count, gets a
config per layer that survives save and reload.

Mistral, Gemma, Gemma 2, GPT-Neo, Falcon, Bloom and MPT failed here before 2026-12-04: their
forwards build a 0-d tensor (a sliding-window bound, an ALiBi term) and the tracer expanded its
0-d label tensor with no sizes.
"""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch

from bingo.executor import BatchedEvaluator, Design
from bingo.structure import HEADS, NEURONS, discover
from bingo.structure.shrink import apply_masks, shrink
from bingo.units import find_units
from test_search_any_model import RTOL, ATOL, _compare
from test_structure import _random_keep

transformers = pytest.importorskip("transformers")

VOCAB = 48
SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64)
"""The common shape of the Llama-like configs; families with other field names spell it out."""
GQA = dict(SIZES, num_key_value_heads=2)

CAUSAL_LMS = {
    # name: (config class, its arguments, heads removable; else a word of the reason)
    "mistral": ("MistralConfig", GQA, True),
    "qwen2": ("Qwen2Config", GQA, True),
    "qwen3": ("Qwen3Config", dict(GQA, head_dim=8), True),
    "gemma": ("GemmaConfig", dict(GQA, head_dim=8), True),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=8), True),
    "llama-cache": ("LlamaConfig", dict(GQA, use_cache=True), True),
    "olmo": ("OlmoConfig", dict(GQA, pad_token_id=0), True),
    "stablelm": ("StableLmConfig", GQA, True),
    "phi": ("PhiConfig", SIZES, True),
    # splits its fused q/k/v output at config.num_attention_heads: each layer gets its own config
    "phi3": ("Phi3Config", dict(GQA, pad_token_id=0), True),
    "gpt-neox": ("GPTNeoXConfig", SIZES, True),
    "opt": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                              max_position_embeddings=32), True),
    "gptj": ("GPTJConfig", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                n_positions=32), True),
    "codegen": ("CodeGenConfig", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                      rotary_dim=4, n_positions=32, n_ctx=32), True),
    "gpt-neo": ("GPTNeoConfig", dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                     attention_types=[[["global", "local"], 1]],
                                     max_position_embeddings=32), True),
    "falcon-gqa": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_kv_heads=2,
                                        new_decoder_architecture=True), True),
    # ALiBi: the bias of each head is a slope computed from the number of heads in forward
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
              "fixed width"),
    "mpt": ("MptConfig", dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4,
                              max_seq_len=32), "fixed width"),
    # multi-query: one key/value head shared by every query head, in one fused projection
    "falcon-mqa": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, multi_query=True,
                                        new_decoder_architecture=False), "spans all"),
    "gpt-bigcode": ("GPTBigCodeConfig", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                             n_positions=32), "spans all"),
}


def _build(name: str, seed: int, dtype=torch.float32):
    """A model of family ``name`` whose weights are moved off their initial values (the reset
    values), and that initial state. Matrices move by 1/sqrt(fan-in), so that activations and
    logits are of order one as in a trained model: at transformers' initial scale (std 0.02)
    a 32-wide model's logits are nearly uniform and every subset's loss is about ln(VOCAB)."""
    config_class, kwargs, _ = CAUSAL_LMS[name]
    config = getattr(transformers, config_class, None)
    if config is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_class}")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config(**kwargs))
    model = model.to(dtype).eval()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            scale = (p.shape[-1] ** -0.5 if p.dim() > 1 else
                     0.3 * p.detach().std().nan_to_num(1.0).clamp_min(1e-3))
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model, init, generator


def _tokens(generator, batch, length):
    ids = torch.randint(0, VOCAB, (batch, length + 1), generator=generator)
    return ids[:, :-1], ids[:, 1:]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_units_found_or_refused_with_a_reason(name):
    model, _, generator = _build(name, 0)
    ids, _ = _tokens(generator, 2, 8)
    structure = discover(model, {"input_ids": ids})
    kinds = [g.kind for g in structure.groups]
    assert kinds.count(NEURONS) == 2, kinds  # one MLP per block
    heads = CAUSAL_LMS[name][2]
    if heads is True:
        assert kinds.count(HEADS) == 2, kinds
        assert all(g.num_units > 1 for g in structure.groups if g.kind == HEADS)
    else:
        assert HEADS not in kinds
        reasons = [why for param, why in structure.blocked.items()
                   if "attn" in param or "attention" in param]
        assert any(heads in why for why in reasons), structure.blocked


@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_shrink_equals_mask(name):
    seed = random.SystemRandom().randrange(2**31)
    model, _, generator = _build(name, seed % 5)
    generator.manual_seed(seed)
    ids, _ = _tokens(generator, 2, 8)
    structure = discover(model, {"input_ids": ids})
    masks = _random_keep(structure, generator)  # different widths per layer, as pruning leaves
    small = shrink(model, masks, example_inputs={"input_ids": ids})
    masked = copy.deepcopy(model)
    apply_masks(masked, structure, masks)
    for batch, length in [(2, 8), (3, 13)]:  # the traced shape and another
        other, _ = _tokens(generator, batch, length)
        want, got = _logits(masked, other), _logits(small, other)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                   msg=f"seed {seed}, input {batch}x{length}")
    assert sum(p.numel() for p in small.parameters()) < \
        sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_batched_search_equals_oracle(name):
    seed = random.SystemRandom().randrange(2**31)
    model, init, generator = _build(name, seed % 5, torch.float64)
    generator.manual_seed(seed)
    x, targets = _tokens(generator, 3, 8)
    layout = find_units(model, "structured", example_inputs=x[:1])
    design = Design(seed, 0, 5, {g.param_name: 0.35 for g in layout.groups})
    evaluator = BatchedEvaluator(model, layout, backend="torch")
    loss = _compare(evaluator, layout, design, init, model, x, targets, seed)
    tolerance = ATOL + RTOL * loss.abs().max()
    assert loss.max() - loss.min() > 20 * tolerance, f"subsets all alike: {loss.tolist()}"


def test_per_layer_head_counts_survive_save_and_reload(tmp_path):
    """Phi-3 reads ``config.num_attention_heads`` in forward: after layers keep different
    numbers of heads, each attention block holds a config of its own, and bingo.save restores
    them, so the reloaded model computes what the shrunk one does."""
    from bingo import load_pruned, save_pruned

    model, _, generator = _build("phi3", 0)
    ids, _ = _tokens(generator, 2, 8)
    structure = discover(model, {"input_ids": ids})
    heads = [g for g in structure.groups if g.kind == HEADS]
    masks = {heads[0].key: torch.arange(heads[0].num_units) > 0}  # layer 0 loses one group
    small = shrink(model, masks, example_inputs={"input_ids": ids})
    attention = [m for n, m in small.named_modules() if n.endswith("self_attn")]
    assert [m.config.num_key_value_heads for m in attention] == [1, 2]
    assert small.config.num_key_value_heads == 2  # the shared config still says the dense count
    save_pruned(small, tmp_path / "phi3")
    reloaded = load_pruned(tmp_path / "phi3").eval()
    other, _ = _tokens(generator, 3, 11)
    torch.testing.assert_close(_logits(reloaded, other), _logits(small, other))
    assert [m.config.num_key_value_heads for n, m in reloaded.named_modules()
            if n.endswith("self_attn")] == [1, 2]


def _loss(model, ids, targets):
    logits = _logits(model, ids)
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()))


@pytest.mark.parametrize("name", sorted(CAUSAL_LMS))
def test_targeted_elimination_removes_what_hurts_least(name):
    """bingo llm prune's search on each family (OPT computes on its logits after the head, so
    the fused LM head must step aside; Falcon's FalconLinear must count as an nn.Linear): the
    units it ranks lowest hurt the loss less than as many it ranks highest."""
    from bingo.llm.recipe import targeted_llm_scores

    model, _, generator = _build(name, 0)
    ids, targets = _tokens(generator, 4, 8)
    scores = targeted_llm_scores(model, (ids, targets), fraction=0.2, progress=False)
    structure = discover(model, {"input_ids": ids[:1]})
    flat = torch.cat([scores[g.key] for g in structure.groups])
    assert flat.numel() == sum(g.num_units for g in structure.groups)
    assert torch.isfinite(flat).all()
    count = flat.numel() // 5
    losses = []
    for chosen in (flat.argsort()[:count], flat.argsort(descending=True)[:count]):
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[chosen] = False
        masks = dict(zip([g.key for g in structure.groups],
                         keep.split([g.num_units for g in structure.groups])))
        masked = copy.deepcopy(model)
        apply_masks(masked, structure, masks)
        losses.append(_loss(masked, ids, targets))
    assert losses[0] < losses[1], losses
