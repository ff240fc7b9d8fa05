"""The ``bingo`` command line: ``bingo demo``, ``bingo experiment``, ``bingo gpt``, ``--version``.

Subcommands live in :data:`COMMANDS`; a new one is one more entry: a help line and the module
that adds its flags (``add_arguments(parser)``) and runs it (``main(args)`` -> exit status).
Those modules import torch only inside ``main``, so ``bingo --help``, ``bingo demo --help`` and
argument errors come at once. Errors bingo raises on purpose (:class:`bingo.errors.BingoError`)
print one line to stderr, with the library's argument names turned into the command's flags
(``floor_drop`` -> ``--floor-drop``), and exit with status 2, like argparse's own usage errors;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from bingo import __version__

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
    module: str
    """The torch-free module with ``add_arguments(parser)`` and ``main(args) -> int``."""
    description: Optional[str] = None
    """Longer text for ``bingo <command> --help`` (default: ``help``)."""
    resumable: bool = False
    """Whether it saves finished pieces in --out, so that rerunning it resumes."""


COMMANDS: dict[str, Command] = {
    "demo": Command(
        help="train LeNet-300-100 with a ticket search, prune it, compare with baselines "
             "(about 30 s)",
        module="bingo.demo",
        description="BINGO end to end on scikit-learn's bundled digits (no download): train "
                    "LeNet-300-100 with a ticket search, prune it to an accuracy floor, and "
                    "compare its accuracy-vs-sparsity curve with magnitude and random pruning. "
                    "Writes report.json and a PNG plot into --out."),
    "experiment": Command(
        help="the MNIST experiment: BINGO, targeted pruning, one-shot criteria and IMP",
        module="bingo.experiment.command",
        description="Train an MNIST classifier (LeNet-300-100, or LeNet-5 with --model lenet5) "
                    "once per seed with ticket searches attached, score it with every "
                    "criterion (targeted elimination with least-squares refit, magnitude, LAMP, "
                    "Taylor, ...) and run IMP with rewinding; report floors, accuracy curves, "
                    "fine-tuning, cost and overlap with IMP as JSON, markdown and plots in "
                    "--out. Each finished seed is saved at once: rerun the same command to "
                    "resume an interrupted run.",
        resumable=True),
    "gpt": Command(
        help="char-level GPT on Tiny Shakespeare: BINGO on heads + MLP neurons vs magnitude, "
             "wanda",
        module="bingo.gpt",
        description="Train a small character-level GPT on Tiny Shakespeare (--data-dir or "
                    "$BINGO_DATA) with a structured ticket search attached, prune attention heads "
                    "and MLP neurons to a validation-perplexity ceiling with BINGO, magnitude and "
                    "Wanda scores, shrink the models, and report test perplexity vs sparsity. "
                    "The trained model and each finished method are saved at once: rerun the "
                    "same command to resume.",
        resumable=True),
    "llm": Command(
        help="prune a local transformers causal LM's heads and MLP neurons (prune), or "
             "compare with other structured pruners (bench)",
        module="bingo.llm.command",
        description="Structured pruning of a local transformers causal language model. "
                    "'bingo llm prune' removes a fraction of its transformer blocks' parameters "
                    "as whole attention heads / key-value groups and MLP neurons (bingo's "
                    "targeted elimination and least-squares refit on a calibration text), "
                    "saves the physically smaller model with its tokenizer and prints the "
                    "held-out perplexity before and after; 'bingo llm bench' compares bingo "
                    "with the other structured LLM pruners. 'bingo llm SUBCOMMAND --help' "
                    "lists each one's flags."),
}


def config_from_args(args: argparse.Namespace, defaults: Any, preset: Mapping[str, Any]) -> Any:
    """The configuration a command runs with: ``defaults`` (a dataclass), then ``preset`` if
    ``--quick`` was given, then every flag the user gave, which always wins over the preset.
    Flags are named after the fields (``--floor-drop`` sets ``floor_drop``) and default to None
    when not given; list values become tuples."""
    config = dataclasses.replace(defaults, **preset) if args.quick else defaults
    given = {}
    for f in dataclasses.fields(config):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "quick":
            given[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(config, **given)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="BINGO pruning: ticket search during training, targeted "
                               "elimination with least-squares refit, one-shot pruning to an "
                               "accuracy floor.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help,
                               description=command.description or command.help)
        importlib.import_module(command.module).add_arguments(child)
        child.set_defaults(flags=flag_names(child))
    return parser


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Argument name -> its ``--flag``, for the long options of a (sub)command's parser."""
    names = {}
    for action in parser._actions:  # noqa: SLF001 (argparse has no public list of its actions)
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and action.dest != "help":
            names.setdefault(action.dest, longs[0])
    return names


def in_flag_words(message: str, flags: dict[str, str]) -> str:
    """``message`` with the library's argument names written as the command's flags:
    ``floor_drop must ...`` -> ``--floor-drop must ...``, ``score='seed'`` -> ``--score seed``,
    ``literal=True`` -> ``--literal``, ``data_dir=...`` -> ``--data-dir ...``."""
    for name, flag in flags.items():
        word = rf"(?<![\w.\-'\"]){re.escape(name)}"
        message = re.sub(rf"{word}=True\b", flag, message)
        message = re.sub(rf"{word}=(?:'([^']*)'|\"([^\"]*)\"|([^\s,;)]+))",
                         lambda m: f"{flag} {m.group(1) or m.group(2) or m.group(3)}", message)
        message = re.sub(rf"(?:^|(?<=\s)){re.escape(name)}(?= must\b| is\b| are\b)", flag,
                         message)
    return message


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``bingo`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse already printed
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    command = importlib.import_module(COMMANDS[args.command].module)
    # A command with subcommands names its parser's dest "subcommand": errors name both words.
    name = " ".join(filter(None, (args.command, getattr(args, "subcommand", None))))
    try:
        return command.main(args)
    except KeyboardInterrupt:
        kept = ("; what finished is saved in --out: rerun the same command to resume"
                if COMMANDS[args.command].resumable else "")
        print(f"{PROG} {name}: interrupted{kept}", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:
        from bingo.errors import BingoError  # imports torch; the command has done so already

        if not isinstance(exc, BingoError):
            raise
        message = in_flag_words(str(exc), args.flags)
        print(f"{PROG} {name}: error: {message}", file=sys.stderr)
        return USAGE_ERROR
