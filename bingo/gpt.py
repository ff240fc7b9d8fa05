"""``bingo gpt``: a small character-level GPT on Tiny Shakespeare with BINGO attached.

It trains the GPT on CPU with a structured ticket search (attention heads + MLP neurons; the
per-subset loss goes through the fused LM head, see :mod:`bingo.executor`), then prunes heads and
neurons down to a perplexity ceiling with BINGO, magnitude and Wanda-style ``|W| * ||X||``
scores, shrinks each pruned model physically, and reports test perplexity against sparsity as
JSON, a markdown table and a plot. The trained model and each finished method are saved in the
output directory at once, so rerunning the same command resumes an interrupted run.

This module holds the configuration and the command line and imports torch only to run; the
model and the steps are in :mod:`bingo.gpt_pipeline`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
from dataclasses import asdict, dataclass, fields
from typing import Optional

from bingo import choices, cli
from bingo.rundir import RunDirectory


@dataclass
class GptConfig:
    """Hyper-parameters of ``bingo gpt`` (every field is a flag)."""

    data_dir: Optional[str] = None
    """Directory with tinyshakespeare's input.txt (or its tinyshakespeare/ folder); None:
    $BINGO_DATA, else bingo's cache directory."""
    out: str = "bingo-gpt"
    """Output directory for report.json, table.md and the plot."""
    attention: str = "linear"
    """Attention block: linear (q/k/v/o nn.Linear, HF style) or mha (nn.MultiheadAttention)."""
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
    """Run a ticket search after every N-th training step."""
    eval_batches: int = 16
    """Batches (of --batch sequences) in the val and test sets and the Wanda calibration set."""
    ceiling: float = 1.10
    """Prune to a validation perplexity of this times the dense model's."""
    sparsities: str = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"
    """Unit sparsities of the reported test-perplexity curves (comma-separated)."""
    seed: int = 0
    """Seed of the model, the batches and the ticket search."""
    threads: Optional[int] = 1
    """torch intra-op threads (None: torch's default)."""
    progress: bool = True
    """Show progress bars (on stderr)."""
    quick: bool = False
    """Set by --quick; recorded so that a smoke run is never mistaken for a result."""

    def sparsity_list(self) -> list[float]:
        """:attr:`sparsities` as numbers."""
        return [float(s) for s in self.sparsities.split(",")]

    def validate(self) -> None:
        """Raise InvalidOptionError naming the first bad value."""
        from bingo.errors import InvalidOptionError, require_option

        require_option("attention", self.attention, choices.ATTENTIONS)
        optional = ("threads",) if self.threads is not None else ()
        for name in ("layers", "d_model", "heads", "block", "batch", "steps", "subsets", "every",
                     "eval_batches", *optional):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.heads:
            raise InvalidOptionError(f"heads={self.heads} must divide d_model={self.d_model}")
        if not self.lr > 0:
            raise InvalidOptionError(f"lr must be positive, got {self.lr!r}")
        if not self.ceiling >= 1.0:
            raise InvalidOptionError(f"ceiling must be >= 1 (a multiple of the dense model's "
                                     f"perplexity), got {self.ceiling!r}")
        try:
            values = self.sparsity_list()
        except ValueError:
            values = None
        if not values or any(not 0.0 <= s < 1.0 for s in values):
            raise InvalidOptionError(f"sparsities must be comma-separated numbers in [0, 1), "
                                     f"got {self.sparsities!r}")


QUICK = dict(layers=1, d_model=32, block=32, batch=8, steps=40, subsets=8, every=4,
             eval_batches=2, sparsities="0,0.3,0.6", quick=True)
"""What ``--quick`` changes: the same pipeline at tiny sizes, a smoke run, not a result."""


def quick(config: GptConfig) -> GptConfig:
    """``config`` with the :data:`QUICK` settings."""
    return dataclasses.replace(config, **QUICK)


RESUME_IGNORES = ("data_dir", "out", "progress", "threads")
"""Settings that may change when a run is resumed: they do not change its numbers."""


def run(config: GptConfig) -> dict:
    """Train, search, prune and measure; returns the report (also written to ``config.out``).

    Options and the output directory are checked before any work; finished pieces of an
    earlier run with the same configuration in ``config.out`` are kept."""
    config.validate()
    out = RunDirectory(config.out, asdict(config), ignore=RESUME_IGNORES)
    from bingo.gpt_pipeline import run_gpt

    return run_gpt(config, out)


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
    if report["config"].get("quick"):
        lines += ["", "**Quick smoke run: not a result.**"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> str:
    """The report's test-perplexity curves as a PNG at ``path``."""
    from bingo.plots import metric_vs_sparsity

    return metric_vs_sparsity(path, report["sparsities"],
                              {m: r["curve"] for m, r in report["methods"].items()},
                              reference=report["dense"]["test_ppl"], ylabel="test perplexity",
                              title="char-GPT on Tiny Shakespeare: heads + MLP neurons pruned")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

FLAG_CHOICES = {"attention": choices.ATTENTIONS}
"""Fields whose flag takes one of a few names."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`GptConfig` field (help: the field's docstring and its default).
    Values default to None, so that --quick can tell which flags the user set."""
    defaults = GptConfig()
    docs = _field_docs()
    for f in fields(GptConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("quick", "progress"):
            continue
        default = getattr(defaults, f.name)
        kind = type(default) if default is not None else str
        if f.name == "threads":
            kind = int
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(flag, type=kind, default=None, choices=FLAG_CHOICES.get(f.name),
                            help=docs[f.name] + shown)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in about 10 s: "
                             + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()
                                         if k != "quick") + " (flags you give still win)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide the progress bars")


def _field_docs() -> dict[str, str]:
    """Field name -> its docstring, on one line."""
    body = ast.parse(inspect.getsource(GptConfig)).body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def config_from_args(args: argparse.Namespace) -> GptConfig:
    """GptConfig from parsed flags: defaults, then --quick, then every flag the user set."""
    return cli.config_from_args(args, GptConfig(), QUICK)


def main(args: argparse.Namespace) -> int:
    """Run ``bingo gpt`` with parsed flags; prints the tables."""
    config = config_from_args(args)
    report = run(config)
    print(markdown(report))
    print(f"total {report['seconds']:.1f} s; wrote {report['files']['report']}, "
          f"{report['files']['table']} and {report['files']['plot']}")
    return 0
