"""Structured pruning on the model zoo after short real training: targeted elimination + refit
against magnitude + the same refit, at several structured sparsities, on validation data that
tests/test_zoo_training.py never reads.

Each model of the zoo is trained exactly as tests/test_zoo_training.py trains it (its setup
functions are imported from there, so the schedule is defined once); validation here is MNIST
images 5000-6000 of the same seeded order (the test validates on 4000-5000) and Shakespeare
windows of another seed. Both methods prune the same number of units of the model's structure
groups and are refitted by the same ``LeastSquaresReconstruction`` (its defaults, as
``targeted_prune`` uses it); the search takes the test's options (evidence, units per step).
One targeted search per model, run up to the largest sparsity; smaller sparsities take its
first removals (what ``targeted_prune(sparsity=)`` computes).

Run from the repository root (needs ../shared/data; all ten models took 13 minutes on this
project's 2-core CPU machine, one torch thread)::

    python bench/zoo_structured.py                      # every model, the test's evidence
    python bench/zoo_structured.py --models llama gpt2 --evidence 1024

Writes ``zoo-structured-<date>.{json,md}`` into ``--out`` (default bench/results/): validation
loss per model, method and sparsity, the search's seconds and what stopped it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the zoo's training setup lives beside its test

import test_zoo_training as setup  # noqa: E402

import bingo  # noqa: E402
from bingo.baselines import baseline_scores  # noqa: E402
from bingo.targeted import EliminationConfig, targeted_scores  # noqa: E402

SPARSITIES = (0.3, 0.5, 0.7)


def validation(name: str):
    """Validation data the test does not use."""
    if name in setup.VISION:
        from bingo.data import load_mnist

        x, y = load_mnist(setup.SHARED, download=False).tensors
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[5000:6000]
        _, view = setup.vision_model(name)
        return view(x[order]), y[order]
    data = setup._shakespeare()
    return setup.language_windows(name, data, data.test, 512, 7)


def run(name: str, evidence: int | None) -> dict:
    started = time.perf_counter()
    model, train, _ = (setup._vision_setup if name in setup.VISION else
                       setup._language_setup)(name)
    val = validation(name)
    options = setup.search_options(name)
    if evidence is not None:
        options["evidence"] = evidence
    example = train[0][:4]
    refit = bingo.LeastSquaresReconstruction(train, progress=False)
    scores = {"magnitude": baseline_scores("magnitude", model, "structured",
                                           example_inputs=example)}
    searched = time.perf_counter()
    scores["targeted"] = targeted_scores(model, "structured", data=train, progress=False,
                                         example_inputs=example,
                                         max_fraction=max(SPARSITIES), **options)
    search = scores["targeted"].result
    row = dict(model=name, dense=setup._evaluate(model, val),
               prior=setup._prior_loss(train, val), units=sum(search.scores[k].numel()
                                                              for k in search.scores),
               search_seconds=time.perf_counter() - searched, stopped=search.stopped,
               evidence=options.get("evidence", EliminationConfig.evidence), loss={})
    for method, ranking in scores.items():
        for sparsity in SPARSITIES:
            pruned = bingo.prune(model, ranking, sparsity=sparsity, reconstruct=refit,
                                 progress=False, example_inputs=example, structured=False)
            row["loss"][f"{method}@{sparsity}"] = setup._evaluate(pruned.model, val)
    row["seconds"] = time.perf_counter() - started
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    head = ["model", "units", "dense"] + [f"{m} @{s:.0%}" for s in SPARSITIES
                                          for m in ("magnitude", "targeted")]
    lines = [f"Validation loss after pruning + refit (lower is better; **bold**: the better of "
             f"the two at that sparsity). {meta['machine']}, torch {meta['torch']}, "
             f"{meta['date']}; evidence: the training examples the search measured damages on.",
             "",
             "| " + " | ".join(head + ["evidence", "search s", "stopped"]) + " |",
             "|" + "---|" * (len(head) + 3)]
    for r in rows:
        cells = [r["model"], str(r["units"]), f"{r['dense']:.4f}"]
        for s in SPARSITIES:
            mag, tgt = r["loss"][f"magnitude@{s}"], r["loss"][f"targeted@{s}"]
            best = min(mag, tgt)
            cells += [f"**{v:.4f}**" if v == best else f"{v:.4f}" for v in (mag, tgt)]
        cells += [str(r["evidence"]), f"{r['search_seconds']:.0f}", r["stopped"] or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=setup.VISION + setup.LANGUAGE,
                        choices=setup.VISION + setup.LANGUAGE)
    parser.add_argument("--evidence", type=int, default=None,
                        help="training examples the targeted search measures damages on "
                             "(default: the test's, per model)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the small ops here are slower with two threads on 2 shared cores
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                machine=f"{platform.machine()} CPU, 1 torch thread")
    rows = []
    for name in tqdm(args.models, desc="zoo models", unit="model"):
        rows.append(run(name, args.evidence))
        tqdm.write(json.dumps(rows[-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"zoo-structured-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
