"""``bingo llm``: structured pruning of a local ``transformers`` causal language model.

* ``bingo llm prune --model-dir DIR --calibration FILE --sparsity 0.3 --out OUT`` prunes the
  checkpoint's attention heads / key-value groups and MLP neurons with bingo's setting
  (targeted elimination, then the least-squares refit; :mod:`bingo.llm.recipe`), writes the
  physically smaller model and its tokenizer to OUT (:func:`bingo.load_pruned` reloads it) and
  prints the held-out perplexity before and after (:mod:`bingo.llm.prune_checkpoint`).
* ``bingo llm bench`` runs the comparison with the other structured methods
  (:mod:`bingo.llm.compare`, its flags are its own).

Torch-free at import, like the other commands: ``--help`` and argument errors come at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bingo import cli

BENCH_MODULE = "bingo.llm.compare"
"""The module behind ``bingo llm bench``: ``add_arguments(parser)`` and ``main(args) -> int``."""

PRUNE_DESCRIPTION = (
    "Prune a local transformers causal LM checkpoint (config.json, weights and tokenizer, as "
    "save_pretrained writes them): remove --sparsity of its transformer blocks' parameters as "
    "whole attention heads / key-value groups and MLP neurons, chosen by bingo's targeted "
    "elimination, refit the survivors by least squares, and save the physically smaller model "
    "with its tokenizer in --out (reload it with bingo.load_pruned(OUT)). The text of "
    "--calibration is tokenized with the model's tokenizer and split: its first 90% of tokens "
    "calibrate (the elimination's evidence and the refit), its last 10% are held out for the "
    "perplexity printed before and after. Every input is checked before the long work starts; "
    "--out must be new or empty (nothing is ever overwritten) and is written whole or not at "
    "all.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``prune`` and ``bench`` subcommands and their flags."""
    sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    prune = sub.add_parser(
        "prune", help="prune a checkpoint's heads and MLP neurons, save the smaller model",
        description=PRUNE_DESCRIPTION)
    prune.add_argument("--model-dir", required=True, metavar="DIR",
                       help="a local transformers causal LM checkpoint with its tokenizer")
    prune.add_argument("--calibration", required=True, metavar="FILE",
                       help="UTF-8 text file: first 90%% of its tokens calibrate, last 10%% "
                            "are held out for the perplexity before and after")
    prune.add_argument("--sparsity", required=True, type=float,
                       help="fraction of the transformer blocks' parameters to remove, in "
                            "(0, 1)")
    prune.add_argument("--out", required=True, metavar="OUT",
                       help="new or empty directory for the pruned model and its tokenizer")
    prune.add_argument("--block", type=int, default=None, metavar="TOKENS",
                       help="window length in tokens (default: 128, at most the model's "
                            "context length)")
    prune.add_argument("--evidence", type=int, default=None, metavar="WINDOWS",
                       help="calibration windows the elimination measures damages on "
                            "(default: 32)")
    prune.add_argument("--threads", type=int, default=1,
                       help="torch intra-op threads (default: 1; 0: torch's default)")
    prune.add_argument("--no-progress", dest="progress", action="store_false",
                       help="hide the progress bars")
    prune.set_defaults(flags=cli.flag_names(prune))

    module = importlib.import_module(BENCH_MODULE)
    bench = sub.add_parser("bench", help="bingo against the other structured LLM pruners",
                           description=(module.__doc__ or "").strip().split("\n\n")[0])
    module.add_arguments(bench)
    bench.set_defaults(flags=cli.flag_names(bench))


def run_prune(args: argparse.Namespace) -> int:
    """``bingo llm prune``: prune, save, print the report."""
    from bingo.errors import InvalidOptionError
    from bingo.llm import recipe
    from bingo.llm.prune_checkpoint import prune_checkpoint
    from bingo.training import torch_threads, warnings_above_progress_bars

    if args.threads < 0:
        raise InvalidOptionError(f"threads must be a positive integer (0: torch's default), "
                                 f"got {args.threads}")
    evidence = recipe.EVIDENCE_WINDOWS if args.evidence is None else args.evidence
    with torch_threads(args.threads or None), warnings_above_progress_bars():
        report = prune_checkpoint(args.model_dir, args.calibration, args.sparsity, args.out,
                                  block=args.block, evidence=evidence, progress=args.progress)
    print(summary(report))
    return 0


def summary(report: dict) -> str:
    """The printed result of ``bingo llm prune``."""
    r = report
    return "\n".join([
        f"{r['architecture']} from {r['model_dir']}: removed {r['removed_block_fraction']:.1%} "
        f"of the transformer blocks' parameters (asked {r['sparsity']:.1%}; {r['units_removed']} "
        f"of {r['units_total']} heads / key-value groups and MLP neurons)",
        f"{'':28}{'before':>12}{'after':>12}",
        f"{'perplexity (held-out text)':28}{r['perplexity_before']:>12.4f}"
        f"{r['perplexity_after']:>12.4f}",
        f"{'parameters':28}{r['parameters_before']:>12,}{r['parameters_after']:>12,}",
        f"held out: {r['windows']['held_out']} windows of {r['block']} tokens (last 10% of "
        f"{r['calibration_file']}); calibration: {r['windows']['calibration']} windows",
        f"saved to {r['out']} in {r['seconds']:.1f} s: bingo.load_pruned({r['out']!r}) reloads "
        f"it, transformers.AutoTokenizer.from_pretrained({r['out']!r}) its tokenizer"])


def run_bench(args: argparse.Namespace) -> int:
    """``bingo llm bench``: :data:`BENCH_MODULE`'s ``main``."""
    return importlib.import_module(BENCH_MODULE).main(args)


def main(args: argparse.Namespace) -> int:
    """Run ``bingo llm <subcommand>`` with parsed flags; returns the exit status."""
    if args.subcommand == "prune":
        return run_prune(args)
    if args.subcommand == "bench":
        return run_bench(args)
    print(f"bingo llm: unknown subcommand {args.subcommand!r}", file=sys.stderr)
    return cli.USAGE_ERROR


__all__ = ["BENCH_MODULE", "add_arguments", "main", "summary"]
