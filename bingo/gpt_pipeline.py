"""The model and steps of ``bingo gpt`` (configuration and command line: :mod:`bingo.gpt`).

A small decoder-only GPT (separate q/k/v/o ``nn.Linear`` attention, or ``nn.MultiheadAttention``)
trained on Tiny Shakespeare with a structured ticket search attached, then pruned to a
perplexity ceiling with BINGO, magnitude and Wanda scores, shrunk, and measured.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bingo.attention import attention, declare_heads
from bingo.baselines import baseline_scores
from bingo.errors import InvalidOptionError, require_option
from bingo.gpt import GptConfig, markdown, plot
from bingo.llm.text import random_windows
from bingo.pruning import prune
from bingo.rundir import RunDirectory, note
from bingo.search import TicketSearch


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class LinearAttention(nn.Module):
    """Causal self-attention built from separate q/k/v/o nn.Linear layers (Hugging Face style)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads:
            raise InvalidOptionError(f"num_heads={num_heads} does not divide d_model={d_model}")
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))
        self.num_heads = num_heads
        declare_heads(self, q="q", k="k", v="v", o="o", num_heads=num_heads)

    def forward(self, x: Tensor) -> Tensor:
        # The head count comes from self.num_heads, so a shrunk block (fewer heads) still runs.
        out, _ = attention(self.q(x), self.k(x), self.v(x), self.num_heads, is_causal=True)
        return self.o(out)


class MhaAttention(nn.Module):
    """Causal self-attention with nn.MultiheadAttention."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(d_model, num_heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]


ATTENTIONS = {"linear": LinearAttention, "mha": MhaAttention}
"""``--attention`` choice -> attention block class."""


class Block(nn.Module):
    """Pre-norm transformer block; the MLP is an nn.Sequential so its neurons are structured units."""

    def __init__(self, d_model: int, num_heads: int, attention_kind: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = ATTENTIONS[attention_kind](d_model, num_heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small decoder-only transformer: token + position embeddings, blocks, LM head."""

    def __init__(self, vocab: int, block_size: int, layers: int, d_model: int, num_heads: int,
                 attention_kind: str = "linear"):
        super().__init__()
        require_option("attention", attention_kind, ATTENTIONS)
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, attention_kind)
                                    for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab)

    def bingo_example_inputs(self) -> Tensor:
        """One sequence of token ids, for bingo's structure trace."""
        return torch.zeros(1, self.pos.num_embeddings, dtype=torch.long,
                           device=self.tok.weight.device)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class CharData:
    """A character corpus encoded as int64 ids and split into train/val/test streams."""

    chars: str
    """The vocabulary (sorted distinct characters)."""
    train: Tensor
    """Token ids of the first 90%."""
    val: Tensor
    """The next 5% (perplexity ceiling)."""
    test: Tensor
    """The last 5% (reported curves)."""

    @classmethod
    def from_text(cls, text: str) -> "CharData":
        chars = "".join(sorted(set(text)))
        lookup = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.int64)
        a, b = int(0.9 * len(ids)), int(0.95 * len(ids))
        return cls(chars, ids[:a], ids[a:b], ids[b:])


def fixed_batches(stream: Tensor, count: int, batch: int, block: int, seed: int) -> list:
    """``count`` reproducible batches of ``stream`` (evaluation and calibration sets)."""
    g = torch.Generator().manual_seed(seed)
    return [random_windows(stream, block, batch, g) for _ in range(count)]


@torch.no_grad()
def perplexity(model: nn.Module, batches: list) -> float:
    """exp(mean next-token cross-entropy) over ``batches`` (eval mode, restored after)."""
    was = model.training
    model.eval()
    try:
        total = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
                    for x, y in batches)
        return math.exp(total / sum(y.numel() for _, y in batches))
    finally:
        model.train(was)


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


METHODS = ("bingo", "magnitude", "wanda")


TRAINED = "trained.pt"
"""File (under the run directory's parts/) of the trained model and its ticket search."""


def _train(model: nn.Module, data: CharData, cfg: GptConfig, search: TicketSearch) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    train_s, losses = 0.0, []
    model.train()
    for _ in tqdm(range(cfg.steps), desc="train + ticket search", unit="step",
                  disable=not cfg.progress):
        x, y = random_windows(data.train, cfg.block, cfg.batch, g)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_s += time.perf_counter() - start
        search.step(x, y)
        losses.append(loss.item())
    return dict(train_seconds=train_s, search_seconds=search.seconds, searches=search.searches,
                final_train_loss=sum(losses[-50:]) / len(losses[-50:]), path=search.path,
                path_reason=search.path_reason, fused_lm_head=search.evaluator.fused)


def _trained(model: nn.Module, data: CharData, cfg: GptConfig, search: TicketSearch,
             out: RunDirectory) -> dict:
    """Train with the search attached, or load both from an earlier run of this directory."""
    path = out.parts / TRAINED
    training = out.finished("training")
    if training is not None and path.exists():
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        search.load_state_dict(state["search"])
        note(f"training: finished in an earlier run, kept ({path})")
        return training
    training = _train(model, data, cfg, search)
    path = out.file(TRAINED)
    partial = path.with_name(path.name + ".part")
    torch.save({"model": model.state_dict(), "search": search.state_dict()}, partial)
    os.replace(partial, path)
    out.save("training", training)
    return training


def _scores(method, model, search, calibration):
    if method == "bingo":
        return search.significance()
    options = {"data": calibration} if method == "wanda" else {}
    return baseline_scores(method, model, "structured", **options)


def _method(method: str, model: nn.Module, search: TicketSearch, batches: dict,
            ceiling: float, sparsities: list[float]) -> dict:
    """One method's scores, pruned to the ceiling and shrunk, and its test-perplexity curve."""
    t0 = time.perf_counter()
    val, test = batches["val"], batches["test"]
    scores = _scores(method, model, search, batches["calibration"])
    result = prune(model, scores, ceiling=ceiling, eval_fn=lambda m: perplexity(m, val),
                   structured=True, allow_unsampled=True, progress=False)
    small = result.structured.model
    curve = [perplexity(prune(model, scores, sparsity=s, structured=False,
                              allow_unsampled=True, progress=False).model, test)
             for s in sparsities]
    return dict(
        sparsity=result.sparsity, val_ppl=result.accuracy,
        test_ppl=perplexity(result.model, test), shrunk_test_ppl=perplexity(small, test),
        parameters=result.structured.parameters,
        heads_kept={k: int(v.sum()) for k, v in result.unit_masks.items()
                    if k.endswith(".heads")},
        neurons_kept=sum(int(v.sum()) for k, v in result.unit_masks.items()
                         if not k.endswith(".heads")),
        curve=curve, seconds=time.perf_counter() - t0)


def run_gpt(cfg: GptConfig, out: RunDirectory) -> dict:
    """Train, search, prune and measure with ``cfg`` (already validated), keeping the pieces an
    earlier run left in ``out``; writes report.json, table.md and the plot there."""
    from bingo.data import load_tinyshakespeare
    from bingo.rundir import write_json
    from bingo.training import environment, torch_threads, warnings_above_progress_bars

    started = time.perf_counter()
    sparsities = cfg.sparsity_list()
    with torch_threads(cfg.threads), warnings_above_progress_bars():
        data = CharData.from_text(load_tinyshakespeare(cfg.data_dir))
        torch.manual_seed(cfg.seed)
        model = GPT(len(data.chars), cfg.block, cfg.layers, cfg.d_model, cfg.heads, cfg.attention)
        search = TicketSearch(model, "structured", subsets=cfg.subsets, fraction=cfg.fraction,
                              metric="loss", score="attribution", every=cfg.every, seed=cfg.seed)
        training = _trained(model, data, cfg, search, out)
        batches = {name: fixed_batches(stream, cfg.eval_batches, cfg.batch, cfg.block,
                                       cfg.seed + offset)
                   for name, stream, offset in (("val", data.val, 2), ("test", data.test, 3),
                                                ("calibration", data.train, 4))}
        dense_val, dense_test = perplexity(model, batches["val"]), perplexity(model,
                                                                             batches["test"])
        ceiling = cfg.ceiling * dense_val
        report = dict(config=asdict(cfg), environment=environment(), training=training,
                      path=training["path"], path_reason=training["path_reason"],
                      fused_lm_head=training["fused_lm_head"], units=search.layout.total,
                      dense=dict(val_ppl=dense_val, test_ppl=dense_test,
                                 parameters=sum(p.numel() for p in model.parameters())),
                      ceiling=ceiling, methods={}, sparsities=sparsities)
        for method in tqdm(METHODS, desc="prune", unit="method", disable=not cfg.progress):
            report["methods"][method] = out.piece(
                method, lambda: _method(method, model, search, batches, ceiling, sparsities))
        report["seconds"] = time.perf_counter() - started
    report["files"] = dict(report=str(out.path / "report.json"),
                           table=str(out.path / "table.md"),
                           plot=str(out.path / "perplexity_vs_sparsity.png"))
    write_json(out.path / "report.json", report)
    (out.path / "table.md").write_text(markdown(report))
    plot(report, report["files"]["plot"])
    return report
