"""Side study for issue #7: does the 2-epoch fine-tune's learning rate limit a reconstructed prune?

LeNet-300-100 on the harness's MNIST split (seeds 0-2, the harness's dense training), pruned to
95% of its weights by LAMP with least-squares reconstruction, then fine-tuned for 2 epochs with
the mask fixed at three Adam learning rates (the harness uses 1e-3). Prints and writes test
accuracies to ``docs/results/finetune-lr-trial-<date>.json``.

    python docs/finetune_lr_trial.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import datetime
import json
import warnings
from pathlib import Path

import torch

import bingo
from bingo.baselines import baseline_scores
from bingo.data import load_dataset, make_loader
from bingo.experiment.config import ExperimentConfig
from bingo.experiment.runner import dense_model
from bingo.training import accuracy, environment, train

LEARNING_RATES = (1e-3, 3e-4, 1e-4)
SPARSITY = 0.95


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    config = ExperimentConfig(data_dir=args.data_dir)
    dataset = load_dataset(config.dataset, config.data_dir)
    rows = []
    for seed in args.seeds:
        splits, model = dense_model(config, dataset, seed)
        scores = baseline_scores("lamp", model, "weight")
        for lr in LEARNING_RATES:
            pruned = bingo.prune(model, scores, sparsity=SPARSITY, structured=False,
                                 progress=False,
                                 reconstruct=bingo.LeastSquaresReconstruction(splits.train,
                                                                              seed=seed)).model
            start = accuracy(pruned, splits.test)
            stats = train(pruned, make_loader(splits.train, config.batch_size, shuffle=True,
                                              seed=seed), config.finetune_epochs, lr,
                          progress=False, on_epoch_end=lambda _e: accuracy(pruned, splits.test))
            rows.append(dict(seed=seed, lr=lr, one_shot=start, finetuned=stats.epoch_end))
            print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / f"finetune-lr-trial-{datetime.date.today()}.json"
    out.write_text(json.dumps(dict(sparsity=SPARSITY, criterion="lamp+ls", rows=rows,
                                   environment=environment()), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
