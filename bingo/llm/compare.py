"""``bingo llm bench``: bingo against the LLM structured-pruning field on a Llama trained here.

A ``transformers`` ``LlamaForCausalLM`` with grouped-query attention and SwiGLU MLPs is trained
from scratch on Tiny Shakespeare per seed, with bingo's structured ticket search attached during
training; it is saved with ``save_pretrained`` and every method loads it back from that directory,
as a user's checkpoint is loaded. Then every method removes 20 / 30 / 50% of the transformer
blocks' parameters (heads / key-value groups and MLP neurons, no retraining), with and without
bingo's least-squares refit: magnitude, Wanda-sp, FLAP, LLM-Pruner's Taylor, Bonsai (one sub-model
per forward, as many sub-models as the targeted search evaluates), Torch-Pruning's own LLM pruner,
and bingo's training-time ticket search, targeted elimination, and elimination with the training-
time evidence as its prior. Reported: test perplexity (mean ± std over seeds), the largest
fraction removed at 1.1x and 1.25x dense validation perplexity, each method's cost (wall time,
sub-models and tokens evaluated, peak memory), batched vs one-at-a-time evaluation of the same
sub-models, and the shrunk model's CPU throughput and fresh-process reload. docs/llm.md has the
recorded run.

This module holds the configuration and the command line and imports torch only to run; the
work is in :mod:`bingo.llm.compare_pipeline`.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Optional

from bingo import cli
from bingo.rundir import RunDirectory


@dataclass
class LlmBenchConfig:
    """Hyper-parameters of ``bingo llm bench``."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds: one trained model (and every method on it) each."""
    steps: int = 1500
    """AdamW steps of training (32 windows of ``block`` characters each, one-cycle lr 3e-3)."""
    hidden: int = 64
    """Hidden size of the Llama."""
    layers: int = 4
    """Decoder layers."""
    heads: int = 8
    """Query heads."""
    kv_heads: int = 4
    """Key/value heads (grouped-query attention: heads / kv_heads queries share one)."""
    intermediate: int = 192
    """SwiGLU MLP width."""
    block: int = 64
    """Window length in characters (training, calibration, evaluation)."""
    fractions: tuple[float, ...] = (0.2, 0.3, 0.5)
    """Fractions of the transformer blocks' parameters removed."""
    ceilings: tuple[float, ...] = (1.1, 1.25)
    """Validation-perplexity ceilings, as multiples of the dense model's: the largest fraction
    each method removes under them is reported."""
    ceiling_step: float = 0.025
    """Resolution of that largest fraction: the walk up the fractions takes steps of this."""
    calibration_windows: int = 32
    """Calibration windows (from the calibration split only) every data-driven method scores and
    refits on."""
    subsets: int = 32
    """K of the training-time ticket search."""
    search_every: int = 10
    """The ticket search runs after every this many training steps."""
    search_windows: int = 8
    """Windows of the training batch the ticket search evaluates its subsets on."""
    search_fraction: float = 0.05
    """Share of the units reset in each subset of the ticket search."""
    bonsai_rounds: int = 10
    """Bonsai's rounds (its sub-models: the targeted search's evaluations spread over them)."""
    compare_submodels: int = 200
    """Sub-models of the batched vs one-at-a-time timing."""
    out: str = "bingo-llm-bench"
    """Output directory (report.json, table.md, plots; the trained checkpoints under
    checkpoints/)."""
    data_dir: Optional[str] = None
    """Directory with tinyshakespeare's input.txt (or its tinyshakespeare/ folder); None:
    $BINGO_DATA, else bingo's cache directory."""
    threads: int = 2
    """torch intra-op threads."""
    progress: bool = True
    """Show progress bars (on stderr)."""
    quick: bool = False
    """Set by --quick; recorded so that a smoke run is never mistaken for a result."""

    def validate(self) -> None:
        """Raise InvalidOptionError naming the first bad value."""
        from bingo.errors import InvalidOptionError

        for name in ("steps", "hidden", "layers", "heads", "kv_heads", "intermediate", "block",
                     "calibration_windows", "subsets", "search_every", "search_windows",
                     "bonsai_rounds", "compare_submodels", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise InvalidOptionError(f"seeds must be distinct, got {self.seeds!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise InvalidOptionError(f"heads={self.heads} must divide hidden={self.hidden} and "
                                     f"kv_heads={self.kv_heads} must divide heads")
        if not self.fractions or any(not 0.0 < f < 1.0 for f in self.fractions):
            raise InvalidOptionError(f"fractions must lie in (0, 1), got {self.fractions!r}")
        if not self.ceilings or any(not c > 1.0 for c in self.ceilings):
            raise InvalidOptionError(f"ceilings must be above 1 (multiples of the dense "
                                     f"perplexity), got {self.ceilings!r}")
        if not 0.0 < self.ceiling_step < 0.5:
            raise InvalidOptionError(f"ceiling_step must lie in (0, 0.5), got "
                                     f"{self.ceiling_step!r}")
        if not 0.0 < self.search_fraction < 1.0:
            raise InvalidOptionError(f"search_fraction must lie in (0, 1), got "
                                     f"{self.search_fraction!r}")


QUICK = dict(seeds=(0,), steps=40, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64,
             block=32, fractions=(0.3,), ceilings=(1.25,), ceiling_step=0.1,
             calibration_windows=8, subsets=8, search_every=5, search_windows=4,
             bonsai_rounds=2, compare_submodels=8, quick=True)
"""What ``--quick`` changes: every step of the bench at tiny sizes, a smoke run, not a result."""

RESUME_IGNORES = ("data_dir", "out", "progress", "threads")
"""Settings that may change when a run is resumed: they do not change its numbers."""


def run(config: LlmBenchConfig) -> dict:
    """Train, prune and measure every seed of ``config`` (finished seeds of an earlier run with
    the same configuration in ``config.out`` are kept); returns the report, also written to
    ``config.out``."""
    config.validate()
    out = RunDirectory(config.out, asdict(config), ignore=RESUME_IGNORES)
    from bingo.llm.compare_pipeline import run_bench

    return run_bench(config, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bingo llm bench``; values default to None so that --quick can tell which the
    user set."""
    defaults = LlmBenchConfig()
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help=f"one trained model each (default: {' '.join(map(str, defaults.seeds))})")
    parser.add_argument("--steps", type=int, help=f"training steps (default: {defaults.steps})")
    parser.add_argument("--fractions", type=float, nargs="+", metavar="F",
                        help="fractions of the block parameters removed (default: "
                             f"{' '.join(map(str, defaults.fractions))})")
    parser.add_argument("--ceilings", type=float, nargs="+", metavar="C",
                        help="validation-perplexity ceilings, multiples of dense (default: "
                             f"{' '.join(map(str, defaults.ceilings))})")
    parser.add_argument("--calibration-windows", type=int,
                        help=f"default: {defaults.calibration_windows}")
    parser.add_argument("--out", help=f"output directory (default: {defaults.out})")
    parser.add_argument("--data-dir", help="directory of tinyshakespeare's input.txt (default: "
                                           "$BINGO_DATA, else bingo's cache directory)")
    parser.add_argument("--threads", type=int, help=f"torch threads (default: {defaults.threads})")
    parser.add_argument("--quick", action="store_true",
                        help="every step at tiny sizes in about 2 minutes, a smoke run: "
                             + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()
                                         if k != "quick") + " (flags you give still win)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide the progress bars")


def config_from_args(args: argparse.Namespace) -> LlmBenchConfig:
    """LlmBenchConfig from parsed flags: defaults, then --quick, then every flag the user set."""
    return cli.config_from_args(args, LlmBenchConfig(), QUICK)


def main(args: argparse.Namespace) -> int:
    """Run ``bingo llm bench`` with parsed flags; prints the tables."""
    from bingo.llm.compare_report import markdown

    report = run(config_from_args(args))
    print(markdown(report))
    print(f"wrote {report['files']['report']}, {report['files']['table']} and "
          f"{', '.join(report['files']['plots'])}")
    return 0


