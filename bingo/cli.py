"""The ``bingo`` command line: ``bingo demo``, ``bingo experiment``, ``bingo --version``.

Subcommands live in :data:`COMMANDS`; a new one (``experiment``, ...) is one more entry: a help
line, a function adding its flags to its parser, and a function running it that returns the exit
status. Errors bingo raises on purpose (:class:`bingo.errors.BingoError`) print one line to stderr
and exit with status 2, like argparse's own usage errors; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from bingo import __version__, demo, gpt
from bingo.experiment import command as experiment
from bingo.errors import BingoError

PROG = "bingo"
USAGE_ERROR = 2
"""Exit status of a usage error or a BingoError (argparse uses 2 for its own errors too)."""
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


@dataclass(frozen=True)
class Command:
    """One ``bingo`` subcommand."""

    help: str
    """One line shown by ``bingo --help``."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Adds the subcommand's flags to its parser."""
    run: Callable[[argparse.Namespace], int]
    """Runs it with the parsed flags; returns the exit status."""
    description: Optional[str] = None
    """Longer text for ``bingo <command> --help`` (default: ``help``)."""


COMMANDS: dict[str, Command] = {
    "gpt": Command(
        help="char-level GPT on Tiny Shakespeare: BINGO on heads + MLP neurons vs magnitude, wanda",
        add_arguments=gpt.add_arguments, run=gpt.main,
        description="Train a small character-level GPT on Tiny Shakespeare (--data-dir or "
                    "$BINGO_DATA) with a structured ticket search attached, prune attention heads "
                    "and MLP neurons to a validation-perplexity ceiling with BINGO, magnitude and "
                    "Wanda scores, shrink the models, and report test perplexity vs sparsity."),
    "demo": Command(
        help="train LeNet-300-100 with a ticket search, prune it, compare with baselines",
        add_arguments=demo.add_arguments, run=demo.main,
        description="BINGO end to end on scikit-learn's bundled digits (no download): train "
                    "LeNet-300-100 with a ticket search, prune it to an accuracy floor, and "
                    "compare its accuracy-vs-sparsity curve with magnitude and random pruning. "
                    "Writes report.json and a PNG plot into --out."),
    "experiment": Command(
        help="reproduce the seed paper's MNIST experiment: BINGO vs IMP vs one-shot criteria",
        add_arguments=experiment.add_arguments, run=experiment.main,
        description="Train LeNet-300-100 once per seed with ticket searches attached (main "
                    "setting and ablations), compute every baseline criterion and IMP with "
                    "rewinding, and report floors, accuracy curves, fine-tuning, cost and overlap "
                    "with IMP as JSON, markdown and plots in --out. --quick is a smoke test."),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="BINGO pruning: ticket search during training, then one-shot "
                               "pruning to an accuracy floor.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help,
                               description=command.description or command.help)
        command.add_arguments(child)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``bingo`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    try:
        return COMMANDS[args.command].run(args)
    except BingoError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
