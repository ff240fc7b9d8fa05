"""bingo.llm.text and bingo.llm.checkpoint: splits, windows, perplexity, checkpoint checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.llm.text import SPLIT_FRACTIONS, TextSplits, perplexity, random_windows, windows


def test_splits_are_contiguous_disjoint_and_cover_the_stream():
    ids = torch.randint(0, 50, (10_007,))
    splits = TextSplits.from_ids(ids)
    parts = [splits.train, splits.calibration, splits.validation, splits.test]
    assert torch.equal(torch.cat(parts), ids)
    sizes = splits.describe()
    for (name, size), share in zip(sizes.items(), SPLIT_FRACTIONS):
        assert abs(size - share * ids.numel()) <= 4, name
    with pytest.raises(InputMismatchError, match="at least 100 tokens"):
        TextSplits.from_ids(ids[:50])


def test_windows_are_consecutive_with_next_token_targets():
    stream = torch.arange(103)
    x, y = windows(stream, 10)
    assert x.shape == (10, 10) and torch.equal(y, x + 1)
    assert torch.equal(x.flatten(), stream[:100])
    assert windows(stream, 10, count=3)[0].shape == (3, 10)
    with pytest.raises(InputMismatchError, match="holds no window"):
        windows(stream[:5], 10)
    with pytest.raises(InvalidOptionError, match="block"):
        windows(stream, 0)
    g = torch.Generator().manual_seed(0)
    rx, ry = random_windows(stream, 8, 5, g)
    assert rx.shape == (5, 8) and torch.equal(ry, rx + 1)


def test_perplexity_is_exp_of_the_mean_cross_entropy():
    torch.manual_seed(0)
    vocab = 7
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 5), torch.nn.Linear(5, vocab))
    x = torch.randint(0, vocab, (9, 6))
    y = torch.randint(0, vocab, (9, 6))
    with torch.no_grad():
        reference = math.exp(float(F.cross_entropy(model(x).double().reshape(-1, vocab),
                                                   y.reshape(-1))))
    assert perplexity(model, (x, y), batch=4) == pytest.approx(reference, rel=1e-5)


def test_checkpoint_errors_name_the_problem(tmp_path):
    from bingo.llm.checkpoint import check_checkpoint_dir

    with pytest.raises(InputMismatchError, match="not a directory"):
        check_checkpoint_dir(tmp_path / "missing")
    with pytest.raises(InputMismatchError, match="no config.json"):
        check_checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputMismatchError, match="not readable JSON"):
        check_checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(InputMismatchError, match="not a causal language model"):
        check_checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(InputMismatchError, match="no weights"):
        check_checkpoint_dir(tmp_path)


def test_a_saved_char_model_loads_back_as_a_user_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from bingo.llm.checkpoint import char_tokenizer, encode, load_causal_lm

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    chars = "".join(sorted(set(text)))
    tokenizer = char_tokenizer(chars)
    ids = encode(tokenizer, text)
    assert ids.tolist() == [chars.index(c) for c in text]
    assert tokenizer.decode(ids.tolist()) == text
    config = transformers.LlamaConfig(vocab_size=len(chars), hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_causal_lm(tmp_path)
    assert torch.equal(encode(loaded_tokenizer, text), ids)
    x = ids[None, :20]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert loaded.config.use_cache is False and not loaded.training
