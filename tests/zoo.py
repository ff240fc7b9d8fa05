"""The model zoo every any-model test runs on: small configs built in code, no downloads.

transformers' own classes (its vision models need no torchvision) plus an nn.MultiheadAttention
model and the LeNets. ``ZOO`` maps a name to a builder returning ``(model, example_inputs,
targets)`` with a fixed seed: ``model(**example_inputs)`` (or ``model(example_inputs)`` for a
tensor) runs, and the targets fit the model's logits (next tokens for language models, classes
otherwise). Inputs are a handful of examples so the tests stay fast.
"""

from __future__ import annotations

import warnings
from typing import Callable

import pytest
import torch
from torch import nn

from bingo.models import lenet5, lenet_300_100

VOCAB = 48
BATCH = 3
TOKENS = 8
IMAGE = 16


def _transformers():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*bos_token_id.*")
    warnings.filterwarnings("ignore", message=".*eos_token_id.*")
    return transformers


def _tokens(generator):
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS + 1), generator=generator)
    return {"input_ids": ids[:, :-1]}, ids[:, 1:]


def _images(generator, channels=1, classes=10):
    x = torch.randn(BATCH, channels, IMAGE, IMAGE, generator=generator)
    return {"pixel_values": x}, torch.randint(0, classes, (BATCH,), generator=generator)


def llama(tied: bool = False):
    t = _transformers()
    config = t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=32, tie_word_embeddings=tied,
                           bos_token_id=0, eos_token_id=1, pad_token_id=None)
    config.use_cache = False
    return t.LlamaForCausalLM(config)


def gpt2():
    t = _transformers()
    config = t.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                          bos_token_id=0, eos_token_id=1, use_cache=False)
    return t.GPT2LMHeadModel(config)


def bert():
    t = _transformers()
    config = t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=48,
                          max_position_embeddings=32, num_labels=3)
    return t.BertForSequenceClassification(config)


def vit():
    t = _transformers()
    config = t.ViTConfig(image_size=IMAGE, patch_size=4, num_channels=1, hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                         num_labels=10)
    return t.ViTForImageClassification(config)


def resnet():
    t = _transformers()
    config = t.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                            depths=[1, 1], layer_type="basic", num_labels=10)
    return t.ResNetForImageClassification(config)


def mobilenet():
    t = _transformers()
    config = t.MobileNetV2Config(num_channels=1, image_size=IMAGE, depth_multiplier=0.25,
                                 num_labels=10)
    return t.MobileNetV2ForImageClassification(config)


class MultiheadAttentionNet(nn.Module):
    """A one-block transformer on nn.MultiheadAttention (no norms: its hidden width is a
    removable unit group too), mean-pooled into a classifier."""

    def __init__(self, features: int = 6, width: int = 16, heads: int = 4, classes: int = 5):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def _lm(build):
    def make(generator):
        model = build()
        inputs, targets = _tokens(generator)
        return model, inputs, targets
    return make


def _vision(build, classes=10):
    def make(generator):
        model = build()
        inputs, targets = _images(generator, classes=classes)
        _calibrate_batch_norm(model, generator)
        return model, inputs, targets
    return make


def _calibrate_batch_norm(model: nn.Module, generator: torch.Generator) -> None:
    """BatchNorm running statistics from a batch of random images, as training leaves them.

    Freshly built, a model's running variance is 1 whatever its activations are; in eval mode
    MobileNetV2's small initial convolutions then shrink the signal to ~1e-27 by the pooler, so
    every subset's loss is ln(10) to within the tests' tolerance and nothing is tested."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(pixel_values=torch.randn(16, 1, IMAGE, IMAGE, generator=generator))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def _mha(generator):
    x = torch.randn(BATCH, 5, 6, generator=generator)
    return MultiheadAttentionNet(), x, torch.randint(0, 5, (BATCH,), generator=generator)


def _lenet300(generator):
    x = torch.randn(BATCH, 1, 8, 8, generator=generator)
    return lenet_300_100(in_features=64), x, torch.randint(0, 10, (BATCH,),
                                                          generator=generator)


def _lenet5(generator):
    x = torch.randn(BATCH, 1, IMAGE, IMAGE, generator=generator)
    return lenet5(image_size=IMAGE), x, torch.randint(0, 10, (BATCH,), generator=generator)


def _bert(generator):
    model = bert()
    inputs, _ = _tokens(generator)
    return model, inputs, torch.randint(0, 3, (BATCH,), generator=generator)


ZOO: dict[str, Callable] = {
    "llama": _lm(llama),
    "llama_tied": _lm(lambda: llama(tied=True)),
    "gpt2": _lm(gpt2),
    "bert": _bert,
    "vit": _vision(vit),
    "resnet": _vision(resnet),
    "mobilenet": _vision(mobilenet),
    "mha": _mha,
    "lenet300": _lenet300,
    "lenet5": _lenet5,
}
"""Name -> builder ``(generator) -> (model, example_inputs, targets)``."""


def build(name: str, seed: int = 0):
    """``(model, example_inputs, targets)`` of zoo model ``name`` (eval mode, seeded)."""
    torch.manual_seed(seed)
    model, inputs, targets = ZOO[name](torch.Generator().manual_seed(seed))
    return model.eval(), inputs, targets


def run(model: nn.Module, inputs):
    """The model's logits on ``inputs`` (a tensor, or keyword arguments)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits
