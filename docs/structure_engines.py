"""Which engine finds coupled unit groups on the model zoo: Torch-Pruning's DependencyGraph or
bingo's own trace (bingo.structure). The evidence behind docs/structure.md.

For each zoo model (tests/zoo.py), in a subprocess with a time limit:

* Torch-Pruning (pip ``torch-pruning``, not a bingo dependency): ``DependencyGraph().
  build_dependency(model, example_inputs)``, then ``get_all_groups`` over Linear/Conv roots;
  recorded: whether it finished, seconds, groups, and attention groups: groups that tie q/k/v
  output channels to an output projection's input channels apart from the residual stream.
  Those are channel groups (all heads' dimension d together), not heads: Torch-Pruning needs
  ``num_heads`` passed in, per module, to prune whole heads;
* bingo: ``bingo.structure.discover`` and a random removal of 40% of every group's units with
  ``bingo.structure.shrink.shrink``, which checks the smaller model against the masked one.

Run from the repository root::

    pip install torch-pruning
    python docs/structure_engines.py            # writes docs/structure/engines.{json,md}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "structure"
LIMIT_S = 180

_TP = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, "tests")
import torch, zoo
import torch_pruning as tp
name = sys.argv[1]
model, inputs, _ = zoo.build(name)
x = inputs
def fwd(m, i):
    return zoo.run(m, i)
row = dict(engine="torch-pruning " + tp.__version__, model=name)
t = time.perf_counter()
try:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x, forward_fn=fwd)
except Exception as exc:
    row.update(status="build failed", error=f"{type(exc).__name__}: {exc}"[:200],
               seconds=time.perf_counter() - t)
    print(json.dumps(row)); sys.exit()
row["build_seconds"] = time.perf_counter() - t
print(json.dumps(dict(row, status="built, collecting groups")), flush=True)
groups = list(dg.get_all_groups(root_module_types=[torch.nn.Conv2d, torch.nn.Linear]))
# An attention group ties a q/k/v projection's output channels to an output projection's input
# channels without the residual stream (no normalisation layer in the group).
attention = 0
for g in groups:
    outs = {dep.target.name for dep, _ in g if dep.handler.__name__ == "prune_out_channels"}
    ins = {dep.target.name for dep, _ in g if dep.handler.__name__ == "prune_in_channels"}
    norms = [n for n in outs if "norm" in n.lower()]
    qkv = any(k in n for n in outs for k in ("q_proj", "query", "in_proj", "c_attn"))
    out_proj = any(k in n for n in ins for k in ("o_proj", "out_proj", "attention.output",
                                                 "c_proj"))
    attention += bool(qkv and out_proj and not norms)
row.update(status="ok", seconds=time.perf_counter() - t, groups=len(groups),
           attention_groups=attention)
print(json.dumps(row))
"""

_BINGO = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, "tests")
import torch, zoo
from bingo.structure import discover
from bingo.structure.shrink import shrink
name = sys.argv[1]
model, inputs, _ = zoo.build(name)
t = time.perf_counter()
s = discover(model, inputs)
row = dict(engine="bingo.structure", model=name, seconds=time.perf_counter() - t,
           groups=len(s.groups), attention_groups=sum(g.kind == "heads" for g in s.groups),
           kinds={k: sum(g.kind == k for g in s.groups) for k in ("heads", "neurons", "channels")},
           unsupported=sorted(s.unsupported))
generator = torch.Generator().manual_seed(0)
masks = {}
for g in s.groups:
    keep = torch.rand(g.num_units, generator=generator) > 0.4
    keep[0] = True
    masks[g.key] = keep
try:
    small = shrink(model, masks, example_inputs=inputs)
    row.update(status="ok", shrink="equals the masked model",
               params=[sum(p.numel() for p in model.parameters()),
                       sum(p.numel() for p in small.parameters())])
except Exception as exc:
    row.update(status="shrink failed", error=f"{type(exc).__name__}: {exc}"[:200])
print(json.dumps(row))
"""


def _run(code: str, name: str) -> dict:
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code, name], cwd=ROOT, capture_output=True,
                              text=True, timeout=LIMIT_S, env=dict(os.environ,
                                                                   OMP_NUM_THREADS="1"))
        lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
        if lines:
            return json.loads(lines[-1])
        return dict(model=name, status="crashed", error=done.stderr.strip()[-200:])
    except subprocess.TimeoutExpired as exc:
        partial = [l for l in (exc.stdout or b"").decode().splitlines() if l.startswith("{")]
        row = json.loads(partial[-1]) if partial else dict(model=name)
        row.update(status=f"did not finish in {LIMIT_S} s", seconds=time.perf_counter() - started)
        return row


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import zoo  # noqa: E402

    rows = []
    for name in zoo.ZOO:
        for engine, code in (("torch-pruning", _TP), ("bingo", _BINGO)):
            row = _run(code, name)
            row.setdefault("engine", engine)
            rows.append(row)
            print(json.dumps(row), flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "engines.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model | engine | status | seconds | groups | attention groups |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        status = r.get("status", "")
        if r.get("error"):
            status += f": {r['error'][:90]}"
        lines.append(f"| {r['model']} | {r['engine']} | {status} | "
                     f"{r.get('seconds', float('nan')):.1f} | {r.get('groups', '-')} | "
                     f"{r.get('attention_groups', '-')} |")
    (OUT / "engines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
