"""Torch-Pruning's LLM pruner as the peer library (bingo.llm.torch_pruning_peer) on a small
transformers Llama with grouped-query attention: it finishes, removes about the fraction asked,
removes exactly what a mask of the same heads and MLP channels removes, leaves the caller's model
alone, and writes a config that rebuilds the pruned model."""

from __future__ import annotations

import contextlib
import copy
import sys
import time

import pytest
import torch

pytest.importorskip("torch_pruning")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from bingo.errors import (  # noqa: E402
    BackendUnavailableError,
    InputMismatchError,
    InvalidOptionError,
)
from bingo.llm import torch_pruning_peer as peer  # noqa: E402
from bingo.llm.torch_pruning_peer import prune_with_torch_pruning  # noqa: E402

VOCAB = 65
HIDDEN = 64
HEADS = 8
KV_HEADS = 4
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 192
FRACTION = 0.3


def _llama(kv_heads: int = KV_HEADS):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=kv_heads,
        max_position_embeddings=64, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _tokens(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 17), generator=generator)
    return ids[:, :-1], ids[:, 1:]


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def pruned():
    """(caller's model, its state before the call, the result) at FRACTION."""
    model = _llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["attn_implementation"] = model.config._attn_implementation
    input_ids, _ = _tokens()
    return model, state, prune_with_torch_pruning(model, FRACTION, example_inputs=input_ids)


def _kept_rows(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows of ``original`` survive in ``pruned`` (random weights: rows are unique)."""
    return [int((original == row).all(dim=1).nonzero().item()) for row in pruned]


def _masked_like(original, pruned):
    """``original`` with the removed query heads' o_proj columns and the removed MLP channels'
    down_proj columns zeroed: what the pruned model must compute."""
    masked = copy.deepcopy(original)
    for before, after, layer in zip(original.model.layers, pruned.model.layers,
                                     masked.model.layers):
        attention, mlp = before.self_attn, before.mlp
        removed_query = torch.ones(HIDDEN, dtype=torch.bool)
        removed_query[_kept_rows(attention.q_proj.weight, after.self_attn.q_proj.weight)] = False
        removed_mlp = torch.ones(INTERMEDIATE, dtype=torch.bool)
        removed_mlp[_kept_rows(mlp.gate_proj.weight, after.mlp.gate_proj.weight)] = False
        with torch.no_grad():
            layer.self_attn.o_proj.weight[:, removed_query] = 0
            layer.mlp.down_proj.weight[:, removed_mlp] = 0
    return masked


def test_pruned_model_runs_and_removes_about_the_fraction(pruned):
    model, _, result = pruned
    input_ids, _ = _tokens(seed=2)
    assert _logits(result.model, input_ids).shape == (2, 16, VOCAB)
    assert abs(result.removed_fraction - FRACTION) < 0.03
    before, after = result.block_params
    assert after < before
    assert after == sum(p.numel() for p in result.model.model.layers.parameters())
    assert result.removed_fraction == pytest.approx(1 - after / before)
    # TP's GQA rule: query heads go, the same number from every key/value group; k/v stay.
    config = result.model.config
    assert config.num_key_value_heads == KV_HEADS
    assert config.num_attention_heads == HEADS - KV_HEADS
    assert config.intermediate_size < INTERMEDIATE
    assert result.library_version and result.seconds > 0
    assert result.options["importance"].startswith("GroupMagnitudeImportance")


def test_pruned_model_equals_the_original_with_the_same_units_masked(pruned):
    """The removed heads are whole heads of the right key/value groups and nothing else moved:
    the traced GQA mapping (eager attention) and the rotary fix are right."""
    model, _, result = pruned
    input_ids, _ = _tokens(seed=3)
    for before, after in zip(model.model.layers, result.model.model.layers):
        assert torch.equal(before.self_attn.k_proj.weight, after.self_attn.k_proj.weight)
        assert torch.equal(before.self_attn.v_proj.weight, after.self_attn.v_proj.weight)
        heads = sorted({row // HEAD_DIM for row in _kept_rows(before.self_attn.q_proj.weight,
                                                               after.self_attn.q_proj.weight)})
        # One query head kept in each key/value group (heads 2g and 2g+1 share group g).
        assert [h // (HEADS // KV_HEADS) for h in heads] == list(range(KV_HEADS))
    torch.testing.assert_close(_logits(result.model, input_ids),
                               _logits(_masked_like(model, result.model), input_ids),
                               rtol=0, atol=1e-5)


def test_caller_model_is_untouched(pruned):
    model, state, result = pruned
    assert result.model is not model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.config.num_attention_heads == HEADS
    assert model.config.intermediate_size == INTERMEDIATE
    # The wrapper traces with eager attention; both models keep the caller's (sdpa here).
    assert (model.config._attn_implementation == result.model.config._attn_implementation
            == state["attn_implementation"] != "eager")
    assert model.model.layers[0].self_attn.num_key_value_groups == HEADS // KV_HEADS


def test_config_round_trip_gives_identical_logits(pruned, tmp_path):
    _, _, result = pruned
    result.model.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    input_ids, _ = _tokens(seed=4)
    assert torch.equal(_logits(reloaded, input_ids), _logits(result.model, input_ids))


def test_taylor_importance_prunes_to_an_equivalent_model():
    model = _llama()
    input_ids, targets = _tokens()
    result = prune_with_torch_pruning(model, FRACTION, example_inputs=input_ids,
                                      importance="taylor", calibration=(input_ids, targets))
    assert result.options["importance"].startswith("GroupTaylorImportance")
    assert abs(result.removed_fraction - FRACTION) < 0.03
    torch.testing.assert_close(_logits(result.model, input_ids),
                               _logits(_masked_like(model, result.model), input_ids),
                               rtol=0, atol=1e-5)


def test_multi_head_attention_loses_whole_heads_with_their_keys_and_values():
    """Without GQA TP removes q, k and v rows of the same heads (the GQA fix stays off)."""
    model = _llama(kv_heads=HEADS)
    input_ids, _ = _tokens()
    result = prune_with_torch_pruning(model, FRACTION, example_inputs=input_ids)
    config = result.model.config
    assert config.num_attention_heads == config.num_key_value_heads < HEADS
    assert abs(result.removed_fraction - FRACTION) < 0.03
    for before, after in zip(model.model.layers, result.model.model.layers):
        assert (_kept_rows(before.self_attn.q_proj.weight, after.self_attn.q_proj.weight)
                == _kept_rows(before.self_attn.k_proj.weight, after.self_attn.k_proj.weight))
    torch.testing.assert_close(_logits(result.model, input_ids),
                               _logits(_masked_like(model, result.model), input_ids),
                               rtol=0, atol=1e-5)


def test_heads_false_prunes_mlp_channels_only():
    model = _llama()
    input_ids, _ = _tokens()
    result = prune_with_torch_pruning(model, 0.2, example_inputs=input_ids, heads=False)
    assert abs(result.removed_fraction - 0.2) < 0.03
    assert result.model.config.num_attention_heads == HEADS
    for before, after in zip(model.model.layers, result.model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(before.self_attn, name).weight,
                               getattr(after.self_attn, name).weight)


def test_prune_hidden_narrows_the_residual_stream_and_round_trips(tmp_path):
    model = _llama()
    input_ids, _ = _tokens()
    result = prune_with_torch_pruning(model, 0.4, example_inputs=input_ids, prune_hidden=True)
    config = result.model.config
    assert config.hidden_size < HIDDEN
    assert result.model.model.embed_tokens.weight.shape == (VOCAB, config.hidden_size)
    assert config.head_dim == HEAD_DIM
    assert abs(result.removed_fraction - 0.4) < 0.06  # the hidden width moves in 6% steps here
    result.model.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded, input_ids), _logits(result.model, input_ids))


@pytest.mark.filterwarnings("ignore:Unwrapped parameters detected")  # TP lists the RMSNorms
def test_eager_trace_ties_each_query_head_to_its_key_value_group():
    """Why the wrapper traces with eager attention: there repeat_kv's expand lets TP map query
    head 1 (o_proj columns 8..15) back to key/value head 0 (k_proj/v_proj rows 0..7)."""
    import torch_pruning as tp

    model = _llama()
    model.set_attn_implementation("eager")
    attention = model.model.layers[0].self_attn
    with peer._concat_dim_read_as_signed(tp):
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=_tokens()[0], forward_fn=lambda m, ids: m(input_ids=ids).logits)
        group = graph.get_pruning_group(attention.o_proj, tp.prune_linear_in_channels,
                                        list(range(HEAD_DIM, 2 * HEAD_DIM)))
    rows = {dep.target.module: sorted(set(idxs)) for dep, idxs in group
            if graph.is_out_channel_pruning_fn(dep.handler)}
    assert rows[attention.q_proj] == list(range(HEAD_DIM, 2 * HEAD_DIM))
    assert rows[attention.k_proj] == rows[attention.v_proj] == list(range(HEAD_DIM))


def test_without_the_rotary_fix_torch_pruning_hangs_and_is_stopped(monkeypatch):
    """The diagnosis: with TP's concat index mapping as it is, grouping never ends; the time
    limit turns that into a clear error and stops the worker."""
    monkeypatch.setattr(peer, "_concat_dim_read_as_signed", lambda tp: contextlib.nullcontext())
    input_ids, _ = _tokens()
    started = time.perf_counter()
    with pytest.raises(BackendUnavailableError, match="did not finish in 2 s") as caught:
        prune_with_torch_pruning(_llama(), FRACTION, example_inputs=input_ids, time_limit_s=2)
    assert "get_pruning_group" in str(caught.value)
    assert time.perf_counter() - started < 20


@pytest.mark.parametrize("options, message", [
    (dict(fraction=0.0), "fraction"),
    (dict(fraction=1.0), "fraction"),
    (dict(importance="hessian"), "importance"),
    (dict(importance="taylor"), "calibration"),
])
def test_bad_options_are_refused(options, message):
    arguments = dict(fraction=FRACTION, example_inputs=_tokens()[0]) | options
    with pytest.raises(InvalidOptionError, match=message):
        prune_with_torch_pruning(_llama(), arguments.pop("fraction"), **arguments)


def test_a_model_that_is_not_llama_shaped_is_refused():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1,
                                     n_head=4)
    with pytest.raises(InputMismatchError, match="not a Llama-style"):
        prune_with_torch_pruning(transformers.GPT2LMHeadModel(config), FRACTION,
                                 example_inputs=_tokens()[0])


def test_missing_torch_pruning_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # makes the import fail
    with pytest.raises(InvalidOptionError, match="pip install torch-pruning"):
        prune_with_torch_pruning(_llama(), FRACTION, example_inputs=_tokens()[0])
