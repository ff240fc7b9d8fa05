"""Which (score, metric) ranks units best on validation, in the demo's setting.

Trains LeNet-300-100 on the digits exactly as ``bingo demo`` does (same split, seeds, optimiser,
batch size, epochs, search interval) with one TicketSearch per (score, metric) pair attached to
the same training run (searches never change the weights, so every pair sees the same model),
then, on the *validation* split, measures for each ranking and for the magnitude and random
baselines:

* the sparsity reached when pruning to the floor dense validation accuracy - 0.01, and
* the mean validation accuracy over the demo's sparsity grid (0.1 ... 0.98).

Usage (both runs together took under 12 minutes on 2 CPU cores, sharing them with other work)::

    python docs/compare_estimators.py --granularity weight --seeds 0 1 2
    python docs/compare_estimators.py --granularity neuron --seeds 0 1 2 --all-pairs

Prints a Markdown table; docs/demo.md quotes its output.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
from torch import nn

import bingo
from bingo.baselines import baseline_scores
from bingo.data import load_digits, make_loader, split_dataset
from bingo.demo import SPARSITY_GRID, SPLIT_FRACTIONS, DemoConfig
from bingo.training import accuracy, torch_threads
from bingo.models import lenet_300_100

PAIRS = [("seed", "accuracy"), ("attribution", "loss")]
ALL_PAIRS = PAIRS + [("seed", "loss"), ("attribution", "accuracy")]


def one_seed(seed: int, granularity: str, pairs, config: DemoConfig) -> dict[str, tuple]:
    """(floor sparsity, mean val accuracy over the grid) per ranking, for one seed."""
    splits = split_dataset(load_digits(), SPLIT_FRACTIONS, seed)
    torch.manual_seed(seed)
    model = lenet_300_100(in_features=64)
    searches = {f"{s}/{m}": bingo.TicketSearch(
        model, granularity=granularity, subsets=config.subsets, fraction=config.fraction,
        score=s, metric=m, reset=config.reset, every=config.every, seed=seed) for s, m in pairs}
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loader = make_loader(splits.train, config.batch_size, seed=seed)
    for _ in range(config.epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for search in searches.values():
                search.step(x, y)
    rankings = {name: s.significance() for name, s in searches.items()}
    rankings["magnitude"] = baseline_scores("magnitude", model, granularity)
    rankings["random"] = baseline_scores("random", model, granularity, seed=seed)

    def val(m):
        return accuracy(m, splits.val)

    floor = val(model) - config.floor_drop
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, scores in rankings.items():
            at_floor = bingo.prune(model, scores, floor=floor, eval_fn=val, progress=False,
                                   structured=False, allow_unsampled=True)
            curve = [val(bingo.prune(model, scores, sparsity=s, progress=False,
                                     structured=False, allow_unsampled=True).model)
                     for s in SPARSITY_GRID if s > 0]
            out[name] = (at_floor.sparsity, statistics.mean(curve))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--granularity", default="weight", choices=("weight", "neuron"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--all-pairs", action="store_true", help="also seed/loss, "
                        "attribution/accuracy")
    args = parser.parse_args()
    config = DemoConfig()
    pairs = ALL_PAIRS if args.all_pairs else PAIRS
    with torch_threads(config.threads):
        results = [one_seed(seed, args.granularity, pairs, config) for seed in args.seeds]
    print(f"granularity={args.granularity}, seeds {args.seeds}; each cell: floor sparsity / "
          "mean val accuracy over the grid")
    print("| ranking | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for name in results[0]:
        cells = [r[name] for r in results]
        mean = (statistics.mean(c[0] for c in cells), statistics.mean(c[1] for c in cells))
        print(f"| {name} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in cells)
              + f" | {mean[0]:.3f} / {mean[1]:.3f} |")


if __name__ == "__main__":
    main()
