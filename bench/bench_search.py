"""End-to-end ticket-search throughput: ``TicketSearch.step`` vs a naive per-subset loop.

Model: LeNet-300-100 (``bingo.models.lenet_300_100``) on a random 28x28 batch, searched at
neuron and weight granularity with the default configuration (fraction 0.05, reset to the
initial weights, accuracy metric, seed estimator). One timed call = one search: the unreset
forward, K reset subsets, and the per-unit statistics update.

Providers:
  naive_loop           per search: materialise every layer's masks; for each subset k deep-copy
                       the model, write the blended weights into it, forward; then the same
                       estimator values and per-unit sums (masks^T @ [1, v, v^2])
  ticket_search        TicketSearch(..., backend="torch"); path chosen by TicketSearch ("fast")
  ticket_search_vmap   the same with path="vmap" (the generic fallback)
  ticket_search_<b>    every other backend in bingo_kernels.available_backends()
  mask_hash            not a search: one materialisation of every searched layer's masks, to
                       show the share of mask generation (reported as % of ticket_search)

Before timing, each TicketSearch provider's first search is compared with the naive loop's
search 0: identical per-unit subset counts (so identical masks), per-subset losses within
tolerance, and agreeing accuracies. A mismatch aborts the run.

Usage::

    python bench/bench_search.py --preset ci
    python bench/bench_search.py --preset cpu --name cpu-$(date +%F) --append
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (sets up sys.path for the checkout, imports torch)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import bingo  # noqa: E402
import bingo_kernels as bk  # noqa: E402
from bingo.estimators import make_estimator  # noqa: E402
from bingo.executor import Design, Metrics  # noqa: E402
from bingo.models import lenet_300_100  # noqa: E402

KERNEL = "ticket_search_step"
MODEL = "lenet_300_100"
FRACTION = 0.05
SEED = 7

PRESETS = {
    "ci": dict(subsets=[4], batches=[16], dtypes=["fp32"], granularities=["neuron", "weight"],
               target_s=0.02, min_reps=2, max_reps=4),
    "cpu": dict(subsets=[16, 64, 256], batches=[128], dtypes=["fp32"],
                granularities=["neuron", "weight"], target_s=1.0, min_reps=3, max_reps=20),
    "gpu": dict(subsets=[64, 256, 512, 1024], batches=[256, 1024], dtypes=["fp32", "bf16"],
                granularities=["neuron", "weight"], target_s=0.5, min_reps=10, max_reps=100),
}

LOSS_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2,
            torch.float16: 5e-3}


class MismatchError(AssertionError):
    """A provider's search computed something else than the naive loop's."""


# --- setup --------------------------------------------------------------------------------------

def make_problem(batch: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """The initial model state, a 'trained' state (init + noise), a batch and its targets.

    Targets are the trained model's own predictions with 30% replaced at random, so the unreset
    accuracy is well above zero and resets visibly change it.
    """
    torch.manual_seed(seed)
    model = lenet_300_100()
    init_state = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    trained_state = copy.deepcopy(model.state_dict())
    inputs = torch.randn(batch, 1, 28, 28, generator=g)
    with torch.no_grad():
        targets = model(inputs).argmax(-1)
    flip = torch.rand(batch, generator=g) < 0.3
    targets = torch.where(flip, torch.randint(0, 10, (batch,), generator=g), targets)
    to = dict(device=device, dtype=dtype)
    init_state = {k: v.to(**to) for k, v in init_state.items()}
    trained_state = {k: v.to(**to) for k, v in trained_state.items()}
    return init_state, trained_state, inputs.to(**to), targets.to(device)


def fresh_model(state: dict, device, dtype) -> torch.nn.Module:
    model = lenet_300_100().to(device=device, dtype=dtype)
    model.load_state_dict(state)
    return model


def make_ticket_search(problem, granularity, K, backend, path, device, dtype):
    init_state, trained_state, _, _ = problem
    model = fresh_model(init_state, device, dtype)
    search = bingo.TicketSearch(model, granularity=granularity, subsets=K, fraction=FRACTION,
                                seed=SEED, backend=backend, path=path)  # snapshots init here
    model.load_state_dict(trained_state)  # then "training" moved the weights
    return search


class NaiveSearch:
    """The obvious implementation: one deep-copied, reset model per subset."""

    def __init__(self, problem, granularity, K, device, dtype):
        init_state, trained_state, _, _ = problem
        self.model = fresh_model(trained_state, device, dtype).eval()
        self.init = init_state
        self.granularity = granularity
        self.K = K
        self.layout = bingo.find_units(self.model, granularity)
        self.probs = {g.param_name: FRACTION for g in self.layout.groups}
        self.estimator = make_estimator("seed", "accuracy", False)
        self.stats = {g.param_name: torch.zeros(g.num_units, 3, dtype=torch.float64,
                                                device=device) for g in self.layout.groups}
        self.searches = 0
        self.last_after = None

    @staticmethod
    def _metrics(logits, targets):
        return (F.cross_entropy(logits.float(), targets),
                (logits.argmax(-1) == targets).float().mean())

    @torch.no_grad()
    def step(self, inputs, targets):
        before = Metrics(*self._metrics(self.model(inputs), targets))
        design = Design(SEED, self.searches, self.K, self.probs)
        masks = {g.param_name: design.masks(self.layout, g, 0, self.K).materialize(
            g.num_units, inputs.device) for g in self.layout.groups}
        losses, accs = [], []
        for k in range(self.K):
            m = copy.deepcopy(self.model)
            for g in self.layout.groups:
                layer = m.get_submodule(g.name)
                mk = masks[g.param_name][k]
                w0 = self.init[g.param_name]
                if self.granularity == "neuron":
                    layer.weight.copy_(torch.where(mk[:, None], w0, layer.weight))
                    if g.bias_name:
                        layer.bias.copy_(torch.where(mk, self.init[g.bias_name], layer.bias))
                else:
                    layer.weight.copy_(torch.where(mk.view(g.weight_shape), w0, layer.weight))
            loss, acc = self._metrics(m(inputs), targets)
            losses.append(loss)
            accs.append(acc)
        after = Metrics(torch.stack(losses), torch.stack(accs))
        values = self.estimator.subset_values(before, after)
        if values is not None:
            v = values.to(inputs.device, torch.float64)
            cols = torch.stack([torch.ones_like(v), v, v * v], dim=1)
            for g in self.layout.groups:
                self.stats[g.param_name] += masks[g.param_name].double().t() @ cols
        self.last_after = after
        self.searches += 1


class MaskHash:
    """Not a search: one pass of mask generation for every searched layer (what a search needs
    at least once; TicketSearch's fast path regenerates them in the forward and again for the
    statistics). Timed so the tables show how much of a search is hashing."""

    def __init__(self, problem, granularity, K, device, dtype):
        model = fresh_model(problem[1], device, dtype)
        self.layout = bingo.find_units(model, granularity)
        self.probs = {g.param_name: FRACTION for g in self.layout.groups}
        self.K, self.device, self.searches = K, device, 0

    def step(self, inputs, targets):
        design = Design(SEED, self.searches, self.K, self.probs)
        for g in self.layout.groups:
            design.masks(self.layout, g, 0, self.K).materialize(g.num_units, self.device)
        self.searches += 1


AUXILIARY = ("mask_hash",)

# --- one configuration --------------------------------------------------------------------------

def check_against_naive(name, search: bingo.TicketSearch, naive: NaiveSearch, problem, label):
    """After one search each: same masks (subset counts per unit), same per-subset metrics."""
    _, _, inputs, targets = problem
    for g in naive.layout.groups:
        mine = search.stats.per_unit[g.param_name][:, 0]
        ref = naive.stats[g.param_name][:, 0]
        if not torch.equal(mine, ref):
            raise MismatchError(f"{label}: {name} reset other units than naive_loop in "
                                f"{g.param_name} (per-unit subset counts differ)")
    design = Design(SEED, 0, naive.K, search.probs)
    after = search.evaluator.subsets(inputs, targets, design, search.init)
    ref = naive.last_after
    loss_err = float((after.loss.float() - ref.loss.float()).abs().max())
    tol = LOSS_TOL[inputs.dtype] * max(1.0, float(ref.loss.abs().max()))
    if not math.isfinite(loss_err) or loss_err > tol:
        raise MismatchError(f"{label}: {name} per-subset losses differ from naive_loop by "
                            f"{loss_err:.3g} > {tol:.3g}")
    acc_diff = (after.accuracy.float() - ref.accuracy.float()).abs()
    # A near-tie in the logits may flip one prediction; anything more is a real difference.
    if float(acc_diff.max()) > 1.5 / targets.numel() or float((acc_diff > 0).float().mean()) > 0.05:
        raise MismatchError(f"{label}: {name} per-subset accuracies differ from naive_loop "
                            f"(max {float(acc_diff.max()):.3g})")
    return loss_err


def bench_config(granularity, K, batch, dtype, device, args, writer) -> dict:
    label = f"{MODEL} B={batch} K={K} {bc.dtype_name(dtype)} {granularity}"
    fields = dict(kernel=KERNEL, model=MODEL, in_features=784, out_features=10, batch=batch,
                  subsets=K, dtype=bc.dtype_name(dtype), granularity=granularity,
                  input="shared")
    problem = make_problem(batch, dtype, device)
    _, _, inputs, targets = problem

    makers = {"naive_loop": lambda: NaiveSearch(problem, granularity, K, device, dtype),
              "ticket_search": lambda: make_ticket_search(problem, granularity, K, "torch",
                                                          "auto", device, dtype),
              "ticket_search_vmap": lambda: make_ticket_search(problem, granularity, K, "torch",
                                                               "vmap", device, dtype),
              "mask_hash": lambda: MaskHash(problem, granularity, K, device, dtype)}
    skipped = {}
    for b in bk.available_backends():
        if b == "torch":
            continue
        try:
            bk.resolve_backend(b, device)
        except bk.BackendUnavailableError as exc:
            skipped[f"ticket_search_{b}"] = f"backend unavailable on {device.type}: {exc}"
            continue
        # LeNet-300-100 in Triton's interpreter takes minutes per search, even for preset ci.
        why = bc.interpreted_backend_reason(b, device, allow=False)
        if why is not None:
            skipped[f"ticket_search_{b}"] = why
            continue
        makers[f"ticket_search_{b}"] = (lambda b=b: make_ticket_search(
            problem, granularity, K, b, "auto", device, dtype))
    if args.providers:
        for n in list(makers):
            if n not in args.providers:
                del makers[n]
        if "naive_loop" not in makers:
            raise SystemExit("--providers must include naive_loop (the reference)")

    # Warm-up search (search 0) of each provider, the agreement check on it, then one search
    # under the memory probes.
    timer = bc.Timer(device)
    objs, results = {}, {}
    for n, make in makers.items():
        obj = make()
        results[n] = dict(warmup_s=timer(lambda: obj.step(inputs, targets)), err=None)
        objs[n] = obj
    for n, obj in objs.items():
        if n != "naive_loop" and n not in AUXILIARY:
            results[n]["err"] = check_against_naive(n, obj, objs["naive_loop"], problem, label)
            results[n]["path"] = obj.path
    for n, obj in objs.items():
        _, peak, mem_note = bc.measure_call(lambda: obj.step(inputs, targets), device)
        results[n].update(peak=peak, mem_note=mem_note)
    for n, why in skipped.items():
        writer.add(fields, n, "skipped", None, "", note=why)
        bc.log(f"  skip {n}: {why}")

    fns = {n: (lambda o=o: o.step(inputs, targets)) for n, o in objs.items()}
    reps = {n: bc.reps_for(r["warmup_s"], args.target_s, args.min_reps, args.max_reps)
            for n, r in results.items()}
    samples = bc.run_round_robin(fns, reps, timer)
    for n, s in samples.items():
        med, p20, p80 = bc.quantiles(s)
        results[n].update(median=med, p20=p20, p80=p80, samples=len(s))
    naive = results["naive_loop"]["median"]
    for n, r in results.items():
        ns = r["samples"]
        note = f"path={r['path']}" if r.get("path") else ""
        if n in AUXILIARY:
            note = "SubsetMasks.materialize of every searched layer once (not a search)"
        writer.add(fields, n, "time", r["median"] * 1e3, "ms/search", ns, note)
        writer.add(fields, n, "time_p20", r["p20"] * 1e3, "ms/search", ns)
        writer.add(fields, n, "time_p80", r["p80"] * 1e3, "ms/search", ns)
        if n in AUXILIARY:
            if "ticket_search" in results:
                r["share"] = 100 * r["median"] / results["ticket_search"]["median"]
                writer.add(fields, n, "pct_of_ticket_search_time", r["share"], "%", ns)
        else:
            r["speedup"] = naive / r["median"]
            writer.add(fields, n, "speedup_vs_naive_loop", r["speedup"], "x", ns)
            writer.add(fields, n, "subsets_per_s", K / r["median"], "1/s", ns)
        writer.add(fields, n, "peak_memory", None if r["peak"] is None else r["peak"] / 2**20,
                   "MiB", 1, r["mem_note"])
        if r["err"] is not None:
            writer.add(fields, n, "max_abs_diff_vs_ref", r["err"], "abs", 1,
                       "per-subset loss vs naive_loop; per-unit subset counts identical")
    return dict(label=label, granularity=granularity, K=K, batch=batch, dtype=dtype,
                results=results, skipped=skipped)


def config_markdown(s: dict) -> str:
    rows = [[n, r["median"] * 1e3, r.get("speedup"),
             None if n in AUXILIARY else s["K"] / r["median"],
             None if r["peak"] is None else r["peak"] / 2**20, r["samples"],
             r.get("path", ""), "" if r["err"] is None else f"{r['err']:.1e}"]
            for n, r in s["results"].items()]
    rows += [[n, "skipped", "", "", "", "", "", why] for n, why in s["skipped"].items()]
    return f"### {s['label']}\n\n" + bc.markdown_table(
        ["provider", "ms/search", "x vs naive_loop", "subsets/s", "peak MiB", "n", "path",
         "max loss diff vs naive"], rows) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", help="output base name (default search-<preset>-<date>)")
    ap.add_argument("--out-dir", default=str(bc.RESULTS_DIR))
    ap.add_argument("--append", action="store_true",
                    help="append to an existing <name>.csv / .md (e.g. the op benchmark's)")
    ap.add_argument("--providers", nargs="+")
    ap.add_argument("--subsets", nargs="+", type=int)
    ap.add_argument("--batches", nargs="+", type=int)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(bc.DTYPES))
    ap.add_argument("--granularities", nargs="+", choices=["neuron", "weight"])
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("subsets", "batches", "dtypes", "granularities"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    for key in ("target_s", "min_reps", "max_reps"):
        setattr(args, key, preset[key])
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    device, env, header = bc.start_run(args)
    name = args.name or f"search-{args.preset}-{env['date'][:10]}"
    writer = bc.ResultWriter(env, Path(args.out_dir), name, append=args.append)
    started = time.perf_counter()
    summaries, sections = [], []
    configs = [(g, K, B, bc.DTYPES[d]) for d in args.dtypes for g in args.granularities
               for B in args.batches for K in args.subsets]
    for i, (g, K, B, dt) in enumerate(configs):
        t0 = time.perf_counter()
        bc.log(f"[{i + 1}/{len(configs)}] {MODEL} {g} K={K} B={B} {bc.dtype_name(dt)}")
        s = bench_config(g, K, B, dt, device, args, writer)
        summaries.append(s)
        sections.append(config_markdown(s))
        print(sections[-1], flush=True)
        bc.log(f"  ({time.perf_counter() - t0:.1f} s)")
    elapsed = time.perf_counter() - started

    providers = []
    for s in summaries:
        providers += [n for n in s["results"]
                      if n not in providers and n != "naive_loop" and n not in AUXILIARY]
    rows = []
    for s in summaries:
        r = s["results"]
        rows.append([s["granularity"], s["batch"], s["K"], bc.dtype_name(s["dtype"]),
                     r["naive_loop"]["median"] * 1e3]
                    + [r[p]["median"] * 1e3 if p in r else "" for p in providers]
                    + [r[p]["speedup"] if p in r else "" for p in providers]
                    + [r["mask_hash"]["median"] * 1e3 if "mask_hash" in r else ""])
    summary = bc.markdown_table(
        ["gran", "B", "K", "dtype", "naive_loop ms"] + [f"{p} ms" for p in providers]
        + [f"{p} x" for p in providers] + ["mask_hash ms"], rows)
    writer.md += [
        f"# {KERNEL} ({MODEL}) — preset `{args.preset}`",
        "",
        bc.machine_description(env, header),
        f"- command: `python bench/bench_search.py "
        f"{' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- runtime: {elapsed:.0f} s for {len(configs)} configurations",
        f"- TicketSearch(fraction={FRACTION}, reset='init', metric='accuracy', score='seed', "
        f"seed={SEED}); one timed call = one search (unreset forward + K subsets + statistics)",
        "",
        "`x` = naive_loop time / provider time (higher is faster).",
        "",
        "## Summary",
        "",
        summary,
        "",
        "## Per configuration",
        "",
        *sections,
    ]
    writer.write()
    print(summary)
    bc.log(f"wrote {writer.csv_path} and {writer.md_path} ({elapsed:.0f} s)")
    return writer.csv_path


if __name__ == "__main__":
    main()
