"""``bingo gpt``: a small character-level GPT on Tiny Shakespeare with BINGO attached.

It trains the GPT on CPU with a structured ticket search (attention heads + MLP neurons; the
per-subset loss goes through the fused LM head, see :mod:`bingo.executor`), then prunes heads and
neurons down to a perplexity ceiling with BINGO, magnitude and Wanda-style ``|W| * ||X||``
scores, shrinks each pruned model physically, and reports test perplexity against sparsity as
JSON, a markdown table and a plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bingo.attention import attention, declare_heads
from bingo.baselines import baseline_scores
from bingo.errors import InvalidOptionError, require_option
from bingo.pruning import prune
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


def random_batch(stream: Tensor, batch: int, block: int, generator: torch.Generator
                 ) -> tuple[Tensor, Tensor]:
    """``batch`` random windows of ``block`` tokens and their next-token targets."""
    starts = torch.randint(0, len(stream) - block - 1, (batch,), generator=generator)
    x = torch.stack([stream[s:s + block] for s in starts])
    y = torch.stack([stream[s + 1:s + block + 1] for s in starts])
    return x, y


def fixed_batches(stream: Tensor, count: int, batch: int, block: int, seed: int) -> list:
    """``count`` reproducible batches of ``stream`` (evaluation and calibration sets)."""
    g = torch.Generator().manual_seed(seed)
    return [random_batch(stream, batch, block, g) for _ in range(count)]


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


@dataclass
class GptConfig:
    """Hyper-parameters of ``bingo gpt`` (every field is a flag)."""

    data_dir: str = None
    """Directory with tinyshakespeare's input.txt (or its tinyshakespeare/ folder); None:
    $BINGO_DATA."""
    out: str = "bingo-gpt"
    """Output directory for report.json, table.md and the plot."""
    attention: str = "linear"
    """Attention block: ``linear`` (q/k/v/o nn.Linear, HF style) or ``mha``."""
    layers: int = 2
    """Transformer blocks."""
    d_model: int = 64
    """Model width."""
    heads: int = 4
    """Attention heads per block."""
    block: int = 64
    """Context length in characters."""
    batch: int = 32
    """Training batch (sequences)."""
    steps: int = 1500
    """Training steps."""
    lr: float = 3e-3
    """Adam learning rate."""
    subsets: int = 32
    """K, subsets per ticket search."""
    fraction: float = 0.05
    """Inclusion probability of a unit in a subset."""
    every: int = 5
    """Run a ticket search after every ``every``-th training step."""
    eval_batches: int = 16
    """Batches (of ``batch`` sequences) in the val and test sets and the Wanda calibration set."""
    ceiling: float = 1.10
    """Prune to a validation perplexity of ``ceiling`` x the dense model's."""
    sparsities: str = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"
    """Unit sparsities of the reported test-perplexity curves."""
    seed: int = 0
    """Seed of the model, the batches and the ticket search."""
    threads: int = 2
    """torch intra-op threads."""
    quick: bool = False
    """A few-second smoke run (tiny model, 40 steps)."""

    def quickened(self) -> "GptConfig":
        """The ``--quick`` variant: same pipeline, tiny sizes."""
        return GptConfig(**{**asdict(self), "layers": 1, "d_model": 32, "block": 32, "batch": 8,
                            "steps": 40, "subsets": 8, "every": 4, "eval_batches": 2,
                            "sparsities": "0,0.3,0.6", "quick": True})


METHODS = ("bingo", "magnitude", "wanda")


def _train(model, data, cfg, search) -> dict:
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    train_s, losses = 0.0, []
    model.train()
    for _ in tqdm(range(cfg.steps), desc="train + ticket search", unit="step"):
        x, y = random_batch(data.train, cfg.batch, cfg.block, g)
        start = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_s += time.perf_counter() - start
        search.step(x, y)
        losses.append(loss.item())
    return dict(train_seconds=train_s, search_seconds=search.seconds, searches=search.searches,
                final_train_loss=sum(losses[-50:]) / len(losses[-50:]))


def _scores(method, model, search, calibration):
    if method == "bingo":
        return search.significance()
    options = {"data": calibration} if method == "wanda" else {}
    return baseline_scores(method, model, "structured", **options)


def run(cfg: GptConfig) -> dict:
    """Train, search, prune and measure; returns the report (also written to ``cfg.out``)."""
    from bingo.data import load_tinyshakespeare
    from bingo.plots import metric_vs_sparsity
    from bingo.training import environment, torch_threads

    started = time.perf_counter()
    cfg = cfg.quickened() if cfg.quick else cfg
    sparsities = [float(s) for s in cfg.sparsities.split(",")]
    with torch_threads(cfg.threads):
        data = CharData.from_text(load_tinyshakespeare(cfg.data_dir))
        torch.manual_seed(cfg.seed)
        model = GPT(len(data.chars), cfg.block, cfg.layers, cfg.d_model, cfg.heads, cfg.attention)
        search = TicketSearch(model, "structured", subsets=cfg.subsets, fraction=cfg.fraction,
                              metric="loss", score="attribution", every=cfg.every, seed=cfg.seed)
        training = _train(model, data, cfg, search)
        val = fixed_batches(data.val, cfg.eval_batches, cfg.batch, cfg.block, cfg.seed + 2)
        test = fixed_batches(data.test, cfg.eval_batches, cfg.batch, cfg.block, cfg.seed + 3)
        calibration = fixed_batches(data.train, cfg.eval_batches, cfg.batch, cfg.block,
                                    cfg.seed + 4)
        dense_val, dense_test = perplexity(model, val), perplexity(model, test)
        ceiling = cfg.ceiling * dense_val
        report = dict(config=asdict(cfg), environment=environment(), training=training,
                      path=search.path, path_reason=search.path_reason,
                      fused_lm_head=search.evaluator.fused, units=search.layout.total,
                      dense=dict(val_ppl=dense_val, test_ppl=dense_test,
                                 parameters=sum(p.numel() for p in model.parameters())),
                      ceiling=ceiling, methods={})
        for method in tqdm(METHODS, desc="prune", unit="method"):
            t0 = time.perf_counter()
            scores = _scores(method, model, search, calibration)
            result = prune(model, scores, ceiling=ceiling, eval_fn=lambda m: perplexity(m, val),
                           structured=True, allow_unsampled=True, progress=False,
                           example_inputs=val[0][0])
            small = result.structured.model
            curve = [perplexity(prune(model, scores, sparsity=s, structured=False,
                                      allow_unsampled=True, progress=False).model, test)
                     for s in sparsities]
            report["methods"][method] = dict(
                sparsity=result.sparsity, val_ppl=result.accuracy,
                test_ppl=perplexity(result.model, test), shrunk_test_ppl=perplexity(small, test),
                parameters=result.structured.parameters,
                heads_kept={k: int(v.sum()) for k, v in result.unit_masks.items()
                            if k.endswith(".heads")},
                neurons_kept=sum(int(v.sum()) for k, v in result.unit_masks.items()
                                 if not k.endswith(".heads")),
                curve=curve, seconds=time.perf_counter() - t0)
        report["sparsities"] = sparsities
        report["seconds"] = time.perf_counter() - started
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(cfg.out, "table.md"), "w") as f:
        f.write(markdown(report))
    metric_vs_sparsity(os.path.join(cfg.out, "perplexity_vs_sparsity.png"), sparsities,
                       {m: r["curve"] for m, r in report["methods"].items()},
                       reference=dense_test, ylabel="test perplexity",
                       title="char-GPT on Tiny Shakespeare: heads + MLP neurons pruned")
    return report


def markdown(report: dict) -> str:
    """The report's tables in markdown."""
    d = report["dense"]
    lines = [f"Dense: val perplexity {d['val_ppl']:.3f}, test {d['test_ppl']:.3f}, "
             f"{d['parameters']:,} parameters, {report['units']} units (heads + MLP neurons). "
             f"Ceiling: val perplexity <= {report['ceiling']:.3f}.", "",
             "| method | unit sparsity | val ppl | test ppl (masked) | test ppl (shrunk) | "
             "parameters (shrunk) | heads kept | MLP neurons kept |",
             "|---|---|---|---|---|---|---|---|"]
    for m, r in report["methods"].items():
        lines.append(f"| {m} | {r['sparsity']:.3f} | {r['val_ppl']:.3f} | {r['test_ppl']:.3f} | "
                     f"{r['shrunk_test_ppl']:.3f} | {r['parameters']:,} | "
                     f"{sum(r['heads_kept'].values())} | {r['neurons_kept']} |")
    lines += ["", "Test perplexity at fixed unit sparsity:", "",
              "| sparsity | " + " | ".join(report["methods"]) + " |",
              "|---|" + "---|" * len(report["methods"])]
    for i, s in enumerate(report["sparsities"]):
        lines.append(f"| {s:.2f} | " + " | ".join(f"{r['curve'][i]:.3f}"
                                                  for r in report["methods"].values()) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`GptConfig` field (help text from the field's docstring)."""
    defaults = GptConfig()
    docs = _field_docs()
    for f in fields(GptConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "quick":
            parser.add_argument(flag, action="store_true", help=docs[f.name])
            continue
        kind = type(getattr(defaults, f.name)) if getattr(defaults, f.name) is not None else str
        parser.add_argument(flag, type=kind, default=getattr(defaults, f.name),
                            help=docs[f.name])


def _field_docs() -> dict[str, str]:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(GptConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def main(args: argparse.Namespace) -> int:
    """Run ``bingo gpt`` with parsed flags; prints the tables."""
    cfg = GptConfig(**{f.name: getattr(args, f.name) for f in fields(GptConfig)})
    report = run(cfg)
    print(markdown(report))
    print(f"total {report['seconds']:.1f} s; wrote {cfg.out}/report.json, table.md, "
          "perplexity_vs_sparsity.png")
    return 0
