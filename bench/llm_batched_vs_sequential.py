"""Bonsai's loop (one sub-model per forward pass) against bingo's batched evaluation, on the same
random sub-models of a trained causal LM checkpoint, side by side in one run
(:func:`bingo.baselines.bonsai.compare_evaluation`).

    bingo llm bench --out llm-bench            # trains and saves llm-bench/checkpoints/seed0 ...
    python bench/llm_batched_vs_sequential.py --model-dir llm-bench/checkpoints/seed0

(``bingo llm bench`` runs the same comparison on every seed's model, on 4 calibration windows.)

Writes ``llm-batched-vs-sequential-<date>.json`` into ``--out``: sub-models per second of each
mode, their ratio, and the largest difference between the two modes' losses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from bingo.baselines.bonsai import compare_evaluation, sample_submodels
from bingo.data import load_tinyshakespeare
from bingo.llm.checkpoint import encode, load_causal_lm
from bingo.llm.text import TextSplits, windows
from bingo.units import find_units

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--windows", type=int, nargs="+", default=[4, 16],
                        help="calibration windows of 64 tokens per sub-model evaluation")
    parser.add_argument("--submodels", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_causal_lm(args.model_dir)
    splits = TextSplits.from_ids(encode(tokenizer, load_tinyshakespeare(args.data_dir,
                                                                        download=False)))
    rows = []
    for count in args.windows:
        calibration = windows(splits.calibration, 64, count)
        layout = find_units(model, "structured", example_inputs=calibration[0][:1])
        masks = sample_submodels(layout, args.submodels, 0.05, seed=0)
        row = compare_evaluation(model, calibration, masks, repeats=2)
        row = {k: v for k, v in row.items() if not isinstance(v, torch.Tensor)}
        row["tokens_per_submodel"] = count * 64
        rows.append(row)
        print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"llm-batched-vs-sequential-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(dict(date=datetime.date.today().isoformat(),
                                    torch=torch.__version__, model=str(args.model_dir),
                                    machine=f"{platform.machine()} CPU, 1 torch thread",
                                    rows=rows), indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
