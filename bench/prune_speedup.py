"""CPU inference speedup of the shrunk model, for every model of the test zoo.

Each zoo model (``tests/zoo.py``, small configs built in code) is pruned on its structure groups
at ``--sparsity`` of their units, lowest random score first (``bingo.prune(...,
granularity="structured", structured=True)``), and the speedup ``prune`` measures is reported:
median dense forward time / median shrunk forward time, timed interleaved on the example inputs
repeated to a batch of 32 examples. Untrained zoo models, so only the speed means anything.
Denormal floats are flushed (untrained MobileNet's activations decay into them, which would time
the CPU's denormal path instead of the model).

    python bench/prune_speedup.py [--sparsity 0.5] [--threads 1] [--seed 0] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

import zoo  # noqa: E402
from bingo import prune  # noqa: E402
from bingo.structure import discover  # noqa: E402


def measure(name: str, sparsity: float, seed: int) -> dict:
    model, inputs, _ = zoo.build(name, seed)
    structure = discover(model, inputs)
    generator = torch.Generator().manual_seed(seed)
    scores = {g.key: torch.rand(g.num_units, generator=generator) for g in structure.groups}
    result = prune(model, scores, sparsity=sparsity, granularity="structured",
                   example_inputs=inputs, structured=True, progress=False)
    small = result.structured
    return dict(model=name, unit_sparsity=round(result.sparsity, 4),
                parameters=small.parameters, dense_parameters=small.dense_parameters,
                speedup=round(small.speedup, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = [measure(name, args.sparsity, args.seed) for name in sorted(zoo.ZOO)]
    print("| model | unit sparsity | parameters (dense -> shrunk) | CPU speedup |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['unit_sparsity']:.2f} | {r['dense_parameters']:,} -> "
              f"{r['parameters']:,} | {r['speedup']:.2f}x |")
    if args.out is not None:
        args.out.write_text(json.dumps(dict(threads=args.threads, torch=torch.__version__,
                                             rows=rows), indent=1))


if __name__ == "__main__":
    main()
