"""Candidate throughput of targeted elimination on a transformer: batched vs one at a time.

What one elimination step does for every candidate unit: the loss and accuracy of the model with
that unit removed on top of the units already gone. Bingo evaluates J candidates in one batched
pass (:class:`bingo.targeted.grouped.GroupEvaluator`: one-hot ``ExplicitDesign`` removals through
:class:`bingo.executor.BatchedEvaluator`, J folded into the batch); a Bonsai-style search runs
one forward per candidate. Same candidates, same evidence batch, same working model.

Model: ``transformers.LlamaForCausalLM`` built in code (no download), random weights, GQA;
candidates: its unit groups (key/value groups with their query heads, MLP neurons), an equal
number drawn from each group; evidence: random token sequences, next tokens as targets.

Providers:
  batched         GroupEvaluator.evaluate per group (its evaluators built and their path chosen
                  before timing; that one-off set-up is reported as ``setup`` seconds)
  one_at_a_time   per candidate: zero every slice of the unit in the model, one forward, loss
                  and accuracy, restore the slices

Before timing, both providers' losses must agree (relative 1e-4) and their accuracies within one
token; a mismatch aborts the run and writes nothing. Timed interleaved (batched, one_at_a_time,
batched, ...), median of ``--reps``. Rows: seconds per pass over the candidates (``time``, ms),
``candidates_per_s``, and the ratio batched / one_at_a_time (``speedup``).

Usage::

    python bench/bench_elimination.py --preset ci
    python bench/bench_elimination.py --preset cpu --threads 1 --name elimination-cpu-$(date +%F)
    python bench/bench_elimination.py --preset cpu --threads 1 --batch 4 --tokens 16 \
        --name elimination-cpu-$(date +%F) --append
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (sets up sys.path for the checkout, imports torch)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

class MismatchError(RuntimeError):
    """The providers computed different losses: nothing is timed or written."""


PRESETS = {
    "ci": dict(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=64, batch=4,
               tokens=8, per_group=2, reps=1),
    "cpu": dict(hidden=128, intermediate=512, layers=4, heads=4, kv_heads=2, vocab=256,
                batch=16, tokens=32, per_group=16, reps=3),
}


def build_llama(p: dict, device: torch.device, seed: int = 0):
    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"], max_position_embeddings=max(64, p["tokens"]),
        bos_token_id=0, eos_token_id=1, pad_token_id=None)
    config.use_cache = False
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, p["vocab"], (p["batch"], p["tokens"] + 1), generator=generator)
    return model, ids[:, :-1].to(device), ids[:, 1:].to(device)


def candidates_per_group(layout, per_group: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(g.num_units, generator=generator)[:per_group] for g in layout.groups]


def one_at_a_time(model, layout, picks, inputs, targets):
    """Loss and accuracy per candidate, one forward each (the removal written into the model
    and undone after)."""
    params = dict(model.named_parameters())
    losses, accs = [], []
    for group, units in zip(layout.groups, picks):
        for unit in units.tolist():
            chosen = torch.zeros(1, group.num_units, dtype=torch.bool)
            chosen[0, unit] = True
            masks = {n: m[0] for n, m in group.param_unit_masks(chosen).items()}
            saved = {n: params[n][m].clone() for n, m in masks.items()}
            with torch.no_grad():
                for n, m in masks.items():
                    params[n][m] = 0.0
                logits = model(inputs).logits
                for n, m in masks.items():
                    params[n][m] = saved[n]
            flat, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
            losses.append(F.cross_entropy(flat.float(), t))
            accs.append((flat.argmax(-1) == t).float().mean())
    return torch.stack(losses), torch.stack(accs)


def batched(removals, picks):
    losses, accs = [], []
    for i, units in enumerate(picks):
        loss, acc = removals.evaluate(i, units)
        losses.append(loss)
        accs.append(acc)
    return torch.cat(losses), torch.cat(accs)


def main(argv=None) -> Path:
    ap = bc.run_parser(__doc__, PRESETS, "elimination")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--batch", type=int, help="evidence sequences (default: the preset's)")
    ap.add_argument("--tokens", type=int, help="tokens per sequence (default: the preset's)")
    ap.add_argument("--per-group", type=int, help="candidates per group (default: preset's)")
    ap.add_argument("--memory-budget", type=int, default=2 ** 27,
                    help="bytes one batched pass may use (the evaluator's chunking)")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    p.update({k: v for k, v in (("batch", args.batch), ("tokens", args.tokens),
                                ("per_group", args.per_group)) if v is not None})
    reps = args.reps or p["reps"]
    device, env, header = bc.start_run(args)
    name = args.name or f"elimination-{args.preset}-{env['date'][:10]}"

    from bingo.targeted.grouped import GroupEvaluator  # noqa: PLC0415
    from bingo.units import find_units  # noqa: PLC0415

    model, inputs, targets = build_llama(p, device)
    work = copy.deepcopy(model)
    layout = find_units(work, "structured", example_inputs=inputs[:1])
    picks = candidates_per_group(layout, p["per_group"])
    count = sum(u.numel() for u in picks)
    started = time.perf_counter()
    removals = GroupEvaluator(work, layout, inputs, targets, memory_budget=args.memory_budget,
                              backend="auto")
    want = one_at_a_time(model, layout, picks, inputs, targets)
    got = batched(removals, picks)          # builds every group's evaluator, chooses its path
    setup = time.perf_counter() - started
    if not torch.allclose(got[0].double().cpu(), want[0].double().cpu(), rtol=1e-4, atol=1e-6) \
            or (got[1].double().cpu() - want[1].double().cpu()).abs().max() > \
            1.5 / targets.numel():
        raise MismatchError(f"batched and one_at_a_time disagree:\n{got}\n{want}")
    timer = bc.Timer(device)
    fns = {"batched": lambda: batched(removals, picks),
           "one_at_a_time": lambda: one_at_a_time(model, layout, picks, inputs, targets)}
    samples = bc.run_round_robin(fns, {k: reps for k in fns}, timer)
    shape = dict(kernel="elimination_candidates",
                 model=f"llama-h{p['hidden']}-i{p['intermediate']}-l{p['layers']}",
                 in_features=p["hidden"], out_features=p["intermediate"], batch=p["batch"],
                 subsets=count, dtype="fp32", granularity="structured",
                 input=f"tokens{p['tokens']}")
    writer = bc.ResultWriter(env, Path(args.out_dir), name, append=args.append)
    paths = ", ".join(sorted(set(removals.path.values())))
    medians = {}
    for provider, times in samples.items():
        median, low, high = bc.quantiles(times)
        medians[provider] = median
        note = f"{count} candidates over {len(picks)} groups (up to {p['per_group']} each)"
        if provider == "batched":
            note += f"; evaluator path: {paths}; set-up {setup:.2f} s (path choice, once)"
        writer.add(shape, provider, "time", median * 1e3, "ms", len(times),
                   f"{note}; p20 {low * 1e3:.1f} ms, p80 {high * 1e3:.1f} ms")
        writer.add(shape, provider, "candidates_per_s", count / median, "1/s", len(times), note)
    speedup = medians["one_at_a_time"] / medians["batched"]
    writer.add(shape, "batched", "speedup", speedup, "x", reps,
               "one_at_a_time time / batched time; shared machine, see load in the report")
    writer.md += [
        f"# Targeted elimination: candidates per second ({args.preset})", "",
        bc.machine_description(env, header), "",
        f"Model {shape['model']} (heads {p['heads']}, kv heads {p['kv_heads']}, vocab "
        f"{p['vocab']}), evidence {p['batch']} x {p['tokens']} tokens, {count} candidates "
        f"(up to {p['per_group']} per group, {len(picks)} groups), median of {reps}.", "",
        bc.markdown_table(["provider", "ms per pass", "candidates / s"],
                          [[k, medians[k] * 1e3, count / medians[k]] for k in medians]), "",
        f"Batched / one at a time: **{speedup:.2f}x** (evaluator path: {paths}).", ""]
    writer.write()
    bc.log(f"{count} candidates: batched {count / medians['batched']:.1f}/s, one at a time "
           f"{count / medians['one_at_a_time']:.1f}/s, ratio {speedup:.2f}x -> {writer.csv_path}")
    return writer.csv_path


if __name__ == "__main__":
    main()
