"""Which greedy-elimination setting prunes the most hidden neurons at the dense - 1 pt floor.

Trains LeNet-300-100 exactly as ``bingo experiment mnist`` does (same per-seed split of the 10k
MNIST images, optimiser, batch size and 20 epochs), then, for each named variant of
:class:`bingo.targeted.EliminationConfig`, runs the targeted search on the training split and
prunes to the floor *dense validation accuracy - 0.01* with :func:`bingo.experiment.measure.floors`
(the harness's own floor search). Prints one line per (seed, variant) and writes the numbers as
JSON. Selection happens on validation only; test accuracy is recorded, never used to choose.

Usage (what docs/results.md quotes; each took a few minutes on one CPU core)::

    python docs/targeted_settings.py --data-dir ../shared/data --seeds 0 1 2 \\
        --variants loss stop6 stop10 accuracy evidence2048 step2 stop10-evidence5000
    python docs/targeted_settings.py --data-dir ../shared/data --seeds 0 1 2 \\
        --variants accuracy-evidence2048 accuracy-step2 accuracy-no-joint

(``loss`` is the default; ``accuracy`` won on these seeds and lost on unseen ones, see
docs/results.md.)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bingo.data import load_dataset
from bingo.experiment import measure
from bingo.experiment.config import ExperimentConfig
from bingo.experiment.runner import dense_model
from bingo.targeted import targeted_scores
from bingo.training import accuracy

VARIANTS: dict[str, dict] = {
    "loss": dict(metric="loss"),
    "stop6": dict(metric="loss", stop_drop=0.06),
    "stop10": dict(metric="loss", stop_drop=0.10),
    "accuracy": dict(metric="accuracy"),
    "evidence2048": dict(metric="loss", evidence=2048),
    "step2": dict(metric="loss", per_step=2),
    "stop10-evidence5000": dict(metric="loss", stop_drop=0.10, evidence=5000),
    "accuracy-evidence2048": dict(metric="accuracy", evidence=2048),
    "accuracy-step2": dict(metric="accuracy", per_step=2),
    "accuracy-no-joint": dict(metric="accuracy", joint_check=False),
}
"""Variant name -> EliminationConfig fields that differ from the defaults."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="MNIST IDX directory (or $BINGO_DATA)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default="targeted_settings.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = ExperimentConfig(dataset="mnist", model="lenet_300_100")
    dataset = load_dataset("mnist", data_dir=args.data_dir)
    rows = {}
    for seed in args.seeds:
        splits, model = dense_model(config, dataset, seed)
        dense_val = accuracy(model, splits.val)
        for name in args.variants:
            start = time.perf_counter()
            scores = targeted_scores(model, "neuron", data=splits.train, seed=seed,
                                     **VARIANTS[name])
            seconds = time.perf_counter() - start
            floor = measure.floors(model, scores, dense_val, [0.01], splits.val,
                                   splits.test)["0.01"]
            rows[f"{seed}/{name}"] = dict(sparsity=floor["sparsity"],
                                          test_accuracy=floor["test_accuracy"],
                                          search_seconds=seconds)
            print(f"seed {seed}  {name:24s} sparsity {floor['sparsity']:.4f}  "
                  f"test {floor['test_accuracy']:.4f}  search {seconds:.1f} s", flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(seeds=args.seeds, variants={v: VARIANTS[v] for v in args.variants},
                       rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
