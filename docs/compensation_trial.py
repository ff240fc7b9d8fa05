"""Does mean replacement (bias compensation) raise the hidden-neuron sparsity at the floor?

Trial on LeNet-300-100 / MNIST, trained per seed exactly as ``bingo experiment mnist`` does (same
code path as ``docs/targeted_settings.py``). Pruning a hidden neuron j of layer l normally zeroes
its weight row and bias, so its activation becomes 0 downstream. *Mean replacement* replaces the
activation by its mean mu_j over the training split instead and folds it into the next Linear
layer's bias: ``b_{l+1} += W_{l+1}[:, j] * mu_j``. The physically smaller model is exact (only a
different bias); nothing is retrained.

Means are *sequential*: first-layer means come from the dense model; second-layer means are
measured in the model whose first-layer removals are already compensated (the means the smaller
model's second layer really has). The same :func:`compensated` builder is used everywhere.

Variants, each measured with one floor procedure (:func:`sweep`), so they compare like for like:

* ``order`` -- the default targeted elimination order
  (``targeted_scores(model, "neuron", data=splits.train, seed=seed)``), zeroed units.
* ``order+comp`` -- the same order, the removed units mean-replaced.
* ``order+comp-l1`` / ``order+comp-l2`` -- diagnostics: the same order, only the first / second
  hidden layer's removed units mean-replaced (the other layer's zeroed).
* ``comp-elim`` -- (``--comp-elim``) a greedy elimination that measures every candidate's damage
  *with* compensation (rank-one update ``-(a_j - mu_j) W_{l+1}[:, j]`` of the next pre-activation,
  batched over candidates), removes <= 4 units per step by least evidence-loss increase on 1024
  training images (same evidence subset, joint check and 3-pt stopping rule as the default
  elimination), then floors with compensation.

Floor procedure (:func:`sweep`): remove the k lowest-scored units for k = 0, 4, 8, ..., 396 and
measure validation accuracy; the floor is the largest k whose validation accuracy is >=
dense_val - 0.01 ("any": anywhere on the sweep), also reported as "prefix": the largest k before
the first failing k. Sparsity = k / 400 (the sweep does not protect a layer's last unit; that
only matters far past every floor); test accuracy at that k is recorded, never used to
choose. As a cross-check, the harness's own :func:`bingo.experiment.measure.floors` (grid +
bisection, zeroing) is also run on the default order.

Usage (one CPU thread; the recorded run, about 75 s per seed)::

    python docs/compensation_trial.py --data-dir ../shared/data --seeds 0 1 2 3 4 5 \\
        --comp-elim --out docs/results/compensation-trial-2026-11-26.json

Result (2026-11-26, 6 seeds, mean +- sd of the sparsity at the "any" floor): zeroed 60.3 +- 2.8%,
mean-replaced on the same order 38.0 +- 3.4%, elimination measured with mean replacement
51.5 +- 2.6%; the harness's floors() on the zeroed order 60.25%. Mean replacement does not pay
here, and the loss says the same as the accuracy: zeroing the eliminated units lowers the
validation loss well below the dense model's (seed 0: 0.244 -> 0.178 at 160 removals), mean
replacement of the same units less (0.201), and it climbs steeply after that (0.533 vs 0.219 at
240). The sparsity is lost mostly in the first layer (order+comp-l1 38%, order+comp-l2 55%).
Curves per seed: docs/results/compensation-trial-2026-11-26.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bingo.data import load_dataset
from bingo.experiment import measure
from bingo.experiment.config import ExperimentConfig
from bingo.experiment.runner import dense_model
from bingo.targeted import targeted_scores
from bingo.targeted.elimination import evidence_batch
from bingo.training import accuracy

HIDDEN = (1, 3)
"""Indices of the two hidden Linear layers of ``lenet_300_100`` (their outputs are scored)."""
NEXT = {1: 3, 3: 5}
"""Hidden layer index -> index of the Linear layer its activations feed."""
DROP = 0.01
STEP = 4


# ----------------------------------------------------------------------------------------------
# The compensated model
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def hidden_activations(model: nn.Sequential, inputs: Tensor, layer: int) -> Tensor:
    """Post-ReLU output of hidden Linear ``layer`` of ``model`` on ``inputs``."""
    return model[:layer + 2](inputs)


@torch.no_grad()
def compensated(model: nn.Sequential, removed: dict[int, Tensor], train_inputs: Tensor,
                compensate: tuple[int, ...] = HIDDEN) -> nn.Sequential:
    """A copy of ``model`` with the ``removed`` units (layer index -> bool mask) zeroed and, with
    ``compensate`` naming their layer, their training-mean activations folded into the next
    layer's bias (``()``: plain zeroing, what :func:`bingo.prune` does).

    Layers are handled in order, so a later layer's means are those of the already compensated
    model (its inputs' upstream removals included)."""
    out = copy.deepcopy(model).eval()
    for layer in HIDDEN:
        mask = removed[layer]
        if not mask.any():
            continue
        if layer in compensate:
            mu = hidden_activations(out, train_inputs, layer).mean(0)
            nxt = out[NEXT[layer]]
            nxt.bias += nxt.weight[:, mask] @ mu[mask]
        out[layer].weight[mask] = 0.0
        out[layer].bias[mask] = 0.0
    return out


def masks_for(scores: dict[str, Tensor], keys: dict[str, int], k: int) -> dict[int, Tensor]:
    """Removal masks of the ``k`` globally lowest-scored units (stable order, ties by layer)."""
    flat = torch.cat([scores[key] for key in keys])
    sizes = [scores[key].numel() for key in keys]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.argsort(flat, stable=True)[:k]] = True
    return {keys[key]: m for key, m in zip(keys, torch.split(chosen, sizes))}


def sweep(model, scores, keys, train_inputs, val, test, dense_val, compensate) -> dict:
    """Validation accuracy (and loss, a diagnostic) at every k = 0, STEP, ... and the two floors
    (see module docstring)."""
    total = sum(s.numel() for s in scores.values())
    floor = dense_val - DROP
    counts = list(range(0, total - len(keys) + 1, STEP))
    vals, losses = [], []
    for k in counts:
        pruned = compensated(model, masks_for(scores, keys, k), train_inputs, compensate)
        vals.append(accuracy(pruned, val))
        with torch.no_grad():
            losses.append(F.cross_entropy(pruned(val.tensors[0]), val.tensors[1]).item())
    passing = [k for k, v in zip(counts, vals) if v >= floor - 1e-12]
    k_any = max(passing)
    first_fail = next((i for i, v in enumerate(vals) if v < floor - 1e-12), len(counts))
    k_prefix = counts[max(first_fail - 1, 0)]
    out = {}
    for name, k in (("any", k_any), ("prefix", k_prefix)):
        pruned = compensated(model, masks_for(scores, keys, k), train_inputs, compensate)
        out[name] = dict(removed=k, sparsity=k / total, val_accuracy=vals[counts.index(k)],
                         test_accuracy=accuracy(pruned, test))
    out["curve"] = dict(counts=counts, val=vals, val_loss=losses)
    return out


# ----------------------------------------------------------------------------------------------
# Greedy elimination that measures damages with compensation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def comp_eliminate(model: nn.Sequential, train_inputs: Tensor, ev_x: Tensor, ev_y: Tensor,
                   per_step: int = 4, stop_drop: float = 0.03, joint_tolerance: float = 0.5,
                   joint_floor: float = 1e-4, chunk: int = 64) -> dict:
    """Greedy backward elimination of the hidden neurons with mean replacement.

    Each step rebuilds the compensated model from the current masks, measures on the evidence
    the loss with each remaining unit mean-replaced on top (first layer: rank-one update
    ``-(a_j - mu_j) W2[:, j]`` of the second pre-activation, then ReLU and the output layer;
    second layer: the same on the logits), removes the ``per_step`` least damaging units (never a
    layer's last), and backs off to one unit when the actual loss increase exceeds the sum of
    the predicted ones by more than ``joint_tolerance`` (as the default elimination does).
    Stops when the evidence accuracy falls ``stop_drop`` below the dense model's; survivors are
    ranked above all removed units by their last damage. Ignored in a candidate's damage: the
    change of the already-removed second-layer units' means that a first-layer removal causes
    (the rebuild after the step includes it exactly).

    Returns scores (layer index -> higher = keep), the order and the step history.
    """
    sizes = {layer: model[layer].weight.shape[0] for layer in HIDDEN}
    removed = {layer: torch.zeros(n, dtype=torch.bool) for layer, n in sizes.items()}
    last = {layer: torch.zeros(n, dtype=torch.float64) for layer, n in sizes.items()}
    total = sum(sizes.values())
    limit = min(math.floor(0.98 * total), total - len(HIDDEN))
    order, history = [], []

    def state(masks):
        m = compensated(model, masks, train_inputs)
        h1 = hidden_activations(m, ev_x, 1)
        z2 = F.linear(h1, m[3].weight, m[3].bias)
        h2 = z2.relu()
        z3 = F.linear(h2, m[5].weight, m[5].bias)
        mu1 = hidden_activations(m, train_inputs, 1).mean(0)
        mu2 = hidden_activations(m, train_inputs, 3).mean(0)
        loss = F.cross_entropy(z3, ev_y).item()
        acc = (z3.argmax(-1) == ev_y).double().mean().item()
        return m, h1, z2, h2, mu1, mu2, z3, loss, acc

    m, h1, z2, h2, mu1, mu2, z3, loss, acc = state(removed)
    dense_acc = acc
    while len(order) < limit:
        damages, owners = [], []
        # first hidden layer: candidate j changes z2 by -(h1_j - mu1_j) W2[:, j]
        cand = (~removed[1]).nonzero().flatten()
        if cand.numel() > 1:
            w2 = m[3].weight
            for part in cand.split(chunk):
                d = (h1[:, part] - mu1[part]).T                         # (J, N)
                z2v = z2[None] - d[:, :, None] * w2[:, part].T[:, None, :]  # (J, N, 100)
                logits = F.linear(z2v.relu(), m[5].weight, m[5].bias)  # (J, N, 10)
                lv = F.cross_entropy(logits.flatten(0, 1), ev_y.repeat(part.numel()),
                                     reduction="none").view(part.numel(), -1).mean(1)
                damages.append(lv.double() - loss)
                owners += [(1, j) for j in part.tolist()]
        cand = (~removed[3]).nonzero().flatten()
        if cand.numel() > 1:
            w3 = m[5].weight
            d = (h2[:, cand] - mu2[cand]).T                               # (J, N)
            logits = z3[None] - d[:, :, None] * w3[:, cand].T[:, None, :]
            lv = F.cross_entropy(logits.flatten(0, 1), ev_y.repeat(cand.numel()),
                                 reduction="none").view(cand.numel(), -1).mean(1)
            damages.append(lv.double() - loss)
            owners += [(3, j) for j in cand.tolist()]
        damage = torch.cat(damages)
        for (layer, j), dmg in zip(owners, damage.tolist()):
            last[layer][j] = dmg
        left = {layer: int((~removed[layer]).sum()) for layer in HIDDEN}
        picked = []
        for pos in torch.argsort(damage, stable=True).tolist():
            layer, j = owners[pos]
            if left[layer] <= 1:
                continue
            left[layer] -= 1
            picked.append((float(damage[pos]), layer, j))
            if len(picked) == min(per_step, limit - len(order)):
                break
        trial = {layer: mask.clone() for layer, mask in removed.items()}
        for _, layer, j in picked:
            trial[layer][j] = True
        before = loss
        new = state(trial)
        predicted = sum(p[0] for p in picked)
        actual = new[7] - before
        backoff = len(picked) > 1 and actual > predicted + joint_tolerance * max(
            abs(predicted), joint_floor)
        if backoff:
            picked = picked[:1]
            trial = {layer: mask.clone() for layer, mask in removed.items()}
            trial[picked[0][1]][picked[0][2]] = True
            new = state(trial)
        removed = trial
        m, h1, z2, h2, mu1, mu2, z3, loss, acc = new
        order += [(layer, j) for _, layer, j in picked]
        history.append(dict(removed=len(order), loss=loss, accuracy=acc, predicted=predicted,
                            actual=actual, backoff=bool(backoff)))
        if acc < dense_acc - stop_drop:
            break
    scores = {layer: torch.zeros(n, dtype=torch.float32) for layer, n in sizes.items()}
    for position, (layer, j) in enumerate(order):
        scores[layer][j] = float(position)
    survivors = sorted((float(last[layer][j]), layer, j) for layer in HIDDEN
                       for j in (~removed[layer]).nonzero().flatten().tolist())
    for rank, (_, layer, j) in enumerate(survivors):
        scores[layer][j] = float(len(order) + rank)
    return dict(scores=scores, order=order,
                history=history, backoffs=sum(h["backoff"] for h in history))


# ----------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="MNIST IDX directory (or $BINGO_DATA)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--comp-elim", action="store_true",
                        help="also run the elimination that measures damages with compensation")
    parser.add_argument("--out", default="compensation_trial.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = ExperimentConfig(dataset="mnist", model="lenet_300_100")
    dataset = load_dataset("mnist", data_dir=args.data_dir)
    rows = {}
    for seed in args.seeds:
        started = time.perf_counter()
        splits, model = dense_model(config, dataset, seed)
        model.eval()
        train_inputs = splits.train.tensors[0]
        dense_val, dense_test = accuracy(model, splits.val), accuracy(model, splits.test)
        row = dict(dense_val=dense_val, dense_test=dense_test,
                   train_seconds=time.perf_counter() - started)

        t = time.perf_counter()
        scores = targeted_scores(model, "neuron", data=splits.train, seed=seed)
        row["order_search_seconds"] = time.perf_counter() - t
        keys = {key: int(key.split(".")[0]) for key in scores}  # "1.weight" -> 1
        assert sorted(keys.values()) == list(HIDDEN), keys
        t = time.perf_counter()
        harness = measure.floors(model, scores, dense_val, [DROP], splits.val,
                                 splits.test)[f"{DROP:g}"]
        row["harness_floor"] = dict(sparsity=harness["sparsity"],
                                    val_accuracy=harness["val_accuracy"],
                                    test_accuracy=harness["test_accuracy"],
                                    seconds=time.perf_counter() - t)
        variants = {"order": (scores, ()), "order+comp": (scores, HIDDEN),
                    "order+comp-l1": (scores, (1,)), "order+comp-l2": (scores, (3,))}
        if args.comp_elim:
            t = time.perf_counter()
            ev_x, ev_y = evidence_batch(splits.train, 1024, seed)
            elim = comp_eliminate(model, train_inputs, ev_x, ev_y)
            row["comp_elim_search_seconds"] = time.perf_counter() - t
            row["comp_elim_backoffs"] = elim["backoffs"]
            row["comp_elim_removed_before_stop"] = len(elim["order"])
            row["comp_elim_history"] = elim["history"]
            variants["comp-elim"] = ({key: elim["scores"][layer] for key, layer in keys.items()},
                                    HIDDEN)
        for name, (sc, comp) in variants.items():
            t = time.perf_counter()
            row[name] = sweep(model, sc, keys, train_inputs, splits.val, splits.test,
                              dense_val, comp)
            row[name]["sweep_seconds"] = time.perf_counter() - t
        row["seconds"] = time.perf_counter() - started
        rows[str(seed)] = row
        print(f"seed {seed}: dense val {dense_val:.4f} test {dense_test:.4f}  "
              f"harness floor (order, zeroed) {harness['sparsity']:.4f} "
              f"test {harness['test_accuracy']:.4f}  ({row['seconds']:.0f} s)", flush=True)
        for name in variants:
            a, p = row[name]["any"], row[name]["prefix"]
            print(f"  {name:13s} any: {a['sparsity']:.4f} test {a['test_accuracy']:.4f} | "
                  f"prefix: {p['sparsity']:.4f} test {p['test_accuracy']:.4f}", flush=True)
        with open(args.out, "w") as f:
            json.dump(dict(seeds=args.seeds, drop=DROP, step=STEP, rows=rows), f, indent=1)

    print("\nmean over seeds (sparsity at floor, 'any' / 'prefix'; test accuracy at 'any')")
    names = [n for n in ("order", "order+comp", "order+comp-l1", "order+comp-l2", "comp-elim")
             if n in rows[str(args.seeds[0])]]
    for name in names:
        for rule in ("any", "prefix"):
            vals = torch.tensor([rows[str(s)][name][rule]["sparsity"] for s in args.seeds])
            tests = torch.tensor([rows[str(s)][name][rule]["test_accuracy"] for s in args.seeds])
            sd = vals.std().item() if len(vals) > 1 else 0.0
            print(f"  {name:13s} {rule:6s} sparsity {vals.mean():.4f} +- {sd:.4f}  "
                  f"test {tests.mean():.4f}")
    h = torch.tensor([rows[str(s)]["harness_floor"]["sparsity"] for s in args.seeds])
    print(f"  harness floors(order, zeroed) sparsity {h.mean():.4f}")


if __name__ == "__main__":
    main()
