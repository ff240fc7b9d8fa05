"""The steps of ``bingo llm bench`` (:mod:`bingo.llm.compare` has the configuration): per seed,
train the Llama with the ticket search attached and save it as a checkpoint, load it back, score
it with every method (timed, counted, peak memory measured), prune it to each fraction of block
parameters with and without the refit, walk up to each validation ceiling, time batched against
one-at-a-time evaluation of the same sub-models, and shrink, time and reload bingo's model.

Cost columns: ``evaluations`` are sub-model evaluations (one forward of the method's batch with
some units removed), ``tokens`` the target positions they score; a score that needs only
calibration statistics (Wanda-sp, FLAP, Taylor) counts one plain forward (Taylor: and backward)
per calibration batch. Peak memory is the rise of the process's peak resident set over the call
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` before each method; None elsewhere).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import bingo
from bingo.baselines import FlapCompensation, baseline_scores
from bingo.baselines.bonsai import compare_evaluation, sample_submodels
from bingo.llm.budget import removal_fractions
from bingo.llm.checkpoint import char_tokenizer, encode, load_causal_lm, transformers_module
from bingo.llm.compare import LlmBenchConfig
from bingo.llm.recipe import EVIDENCE_WINDOWS, least_squares_refit, targeted_llm_scores
from bingo.llm.text import TextSplits, perplexity, random_windows, windows
from bingo.rundir import RunDirectory, write_json
from bingo.search import TicketSearch
from bingo.units import find_units

CALIBRATION_BATCH = 8
"""Windows per forward of the calibration statistics (Wanda-sp, FLAP, Taylor)."""
THROUGHPUT_BATCH = 16
"""Windows per forward of the throughput measurement."""
THROUGHPUT_REPEATS = 7
"""Timed forwards of the throughput measurement (the median is reported)."""
SHRINK_FRACTION_INDEX = -1
"""The shrunk model measured is bingo's at the largest of the configured fractions."""


def _peak_kib() -> Optional[int]:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def _reset_peak() -> Optional[int]:
    """Reset the peak resident set (Linux) and return the current one in KiB, or None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _peak_kib()


def measured(compute: Callable[[], Any]) -> tuple[Any, dict]:
    """``compute()`` and its cost: seconds and the rise of the peak resident set in MiB."""
    base = _reset_peak()
    started = time.perf_counter()
    value = compute()
    seconds = time.perf_counter() - started
    peak = _peak_kib()
    rise = None if base is None or peak is None else max(0, peak - base) / 1024
    return value, dict(seconds=seconds, peak_mib=rise)


def _llama(config: LlmBenchConfig, vocab: int):
    t = transformers_module()
    return t.LlamaConfig(vocab_size=vocab, hidden_size=config.hidden,
                         intermediate_size=config.intermediate,
                         num_hidden_layers=config.layers, num_attention_heads=config.heads,
                         num_key_value_heads=config.kv_heads,
                         max_position_embeddings=2 * config.block, tie_word_embeddings=False,
                         use_cache=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)


def train(config: LlmBenchConfig, text: str, seed: int, directory: Path) -> dict:
    """Train the Llama from scratch with the structured ticket search attached; save it as a
    user's checkpoint (``save_pretrained``, model + tokenizer) and the search's significance
    beside it. Returns the training record."""
    t = transformers_module()
    chars = "".join(sorted(set(text)))
    tokenizer = char_tokenizer(chars)
    splits = TextSplits.from_ids(encode(tokenizer, text))
    llama = _llama(config, len(chars))
    torch.manual_seed(seed)
    model = t.LlamaForCausalLM(llama)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3,
                                                   total_steps=config.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed + 1)
    search = TicketSearch(model, "structured", subsets=config.subsets,
                          fraction=config.search_fraction, metric="loss", score="attribution",
                          every=config.search_every, seed=seed,
                          example_inputs=splits.train[None, :config.block])
    train_seconds, losses = 0.0, []
    for _ in tqdm(range(config.steps), desc=f"seed {seed}: train + ticket search", unit="step",
                  disable=not config.progress):
        x, y = random_windows(splits.train, config.block, 32, generator)
        model.train()
        started = time.perf_counter()
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        train_seconds += time.perf_counter() - started
        losses.append(loss.item())
        model.eval()
        search.step(x[:config.search_windows], y[:config.search_windows])
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.save({k: v.clone() for k, v in search.significance().items()},
               directory / "bingo_ticket_search.pt")
    tokens = config.search_windows * config.block
    return dict(steps=config.steps, batch=32, block=config.block, train_seconds=train_seconds,
                search_seconds=search.seconds, searches=search.searches, path=search.path,
                final_train_loss=sum(losses[-50:]) / len(losses[-50:]),
                search_evaluations=search.searches * config.subsets,
                search_tokens=search.searches * (config.subsets + 1) * tokens,
                config=llama.to_diff_dict(), splits=splits.describe(), units=search.layout.total)


class _Seed:
    """One seed's checkpoint, loaded as a user's, with its data."""

    def __init__(self, config: LlmBenchConfig, text: str, directory: Path):
        self.config = config
        self.model, tokenizer = load_causal_lm(directory)
        splits = TextSplits.from_ids(encode(tokenizer, text))
        self.calibration = windows(splits.calibration, config.block, config.calibration_windows)
        inputs, targets = self.calibration
        self.batches = [(inputs[i:i + CALIBRATION_BATCH], targets[i:i + CALIBRATION_BATCH])
                        for i in range(0, inputs.shape[0], CALIBRATION_BATCH)]
        self.validation = windows(splits.validation, config.block)
        self.test = windows(splits.test, config.block)
        self.example = inputs[:1]
        self.prior = torch.load(directory / "bingo_ticket_search.pt", weights_only=True)
        self.tokens = inputs.numel()

    def pruned(self, scores, count: int, units: int, reconstruct, structured: bool = False):
        return bingo.prune(self.model, scores, sparsity=count / units, structured=structured,
                           reconstruct=reconstruct, progress=False, allow_unsampled=True,
                           granularity="structured", example_inputs=self.example)


def _score_methods(seed_data: _Seed, config: LlmBenchConfig, training: dict, seed: int
                   ) -> tuple[dict, dict]:
    """Each method's scores and its cost record."""
    model, calibration, batches = seed_data.model, seed_data.calibration, seed_data.batches
    fraction = max(config.fractions)
    scores, costs = {}, {}

    def run(name, compute, evaluations, tokens):
        value, cost = measured(compute)
        scores[name] = value
        costs[name] = dict(cost, evaluations=evaluations(value), tokens=tokens(value))
        tqdm.write(f"seed {seed} {name}: {costs[name]}")

    def searched(value):
        return value.result.variants + value.result.refreshes

    evidence_tokens = min(config.calibration_windows, EVIDENCE_WINDOWS) * config.block
    run("targeted", lambda: targeted_llm_scores(
        model, calibration, fraction=fraction, example_inputs=seed_data.example,
        progress=config.progress, seed=seed), searched,
        lambda v: searched(v) * evidence_tokens)
    run("targeted+prior", lambda: targeted_llm_scores(
        model, calibration, fraction=fraction, example_inputs=seed_data.example,
        prior=seed_data.prior, progress=config.progress, seed=seed), searched,
        lambda v: searched(v) * evidence_tokens)
    scores["ticket-search"] = seed_data.prior
    costs["ticket-search"] = dict(seconds=training["search_seconds"], peak_mib=None,
                                  evaluations=training["search_evaluations"],
                                  tokens=training["search_tokens"], during_training=True)
    none, plain = (lambda v: 0), (lambda v: seed_data.tokens)
    run("magnitude", lambda: baseline_scores("magnitude", model, "structured",
                                             example_inputs=seed_data.example), none, none)
    run("wanda-sp", lambda: baseline_scores("wanda", model, "structured", data=batches,
                                            variant="wanda-sp"), lambda v: len(batches), plain)
    run("flap", lambda: baseline_scores("flap", model, "structured", data=batches),
        lambda v: len(batches), plain)
    run("llm-pruner", lambda: baseline_scores("taylor", model, "structured", data=batches),
        lambda v: len(batches), plain)
    variants = costs["targeted"]["evaluations"]
    run("bonsai", lambda: baseline_scores(
        "bonsai", model, "structured", data=calibration, rounds=config.bonsai_rounds,
        submodels=max(2, variants // config.bonsai_rounds),
        target_fraction=min(0.9, fraction + 0.15), evaluation="sequential", seed=seed),
        lambda v: v.result.evaluations, lambda v: v.result.tokens_evaluated)
    return scores, costs


def _reconstructions(name: str, seed_data: _Seed) -> list[tuple[str, Any]]:
    options = [("none", None),
               ("refit", least_squares_refit(seed_data.calibration, progress=False))]
    if name == "flap":
        options.append(("flap-bias", FlapCompensation(seed_data.batches)))
    return options


def _ceiling_walk(evaluate: Callable[[float], tuple[float, float]], ceilings: list[float],
                  step: float) -> dict:
    """Walk up the fractions ``step, 2 step, ...`` while the validation perplexity stays under
    the highest ceiling; per ceiling, the largest removed fraction that stayed under it (0 when
    the first step already fails). ``evaluate(fraction)`` -> (removed fraction, val ppl)."""
    best = {c: 0.0 for c in ceilings}
    walk = []
    target = step
    while target < 0.95:
        removed, val = evaluate(target)
        walk.append((removed, val))
        for c in ceilings:
            if val <= c:
                best[c] = max(best[c], removed)
        if val > max(ceilings):
            break
        target += step
    return dict(largest={f"{c:g}": v for c, v in best.items()}, walk=walk)


def _rows(seed_data: _Seed, scores: dict, config: LlmBenchConfig, dense_val: float,
          seed: int) -> tuple[list, dict]:
    """Test perplexity at each fraction and the ceiling walk, per method and reconstruction."""
    rows, ceilings = [], {}
    limits = [c * dense_val for c in config.ceilings]
    for name, ranking in tqdm(scores.items(), desc=f"seed {seed}: prune", unit="method",
                              disable=not config.progress):
        removed, units = removal_fractions(seed_data.model, ranking,
                                           example_inputs=seed_data.example)
        for label, reconstruct in _reconstructions(name, seed_data):
            def at(fraction, split):
                count = int(torch.argmin((removed - fraction).abs()))
                model = seed_data.pruned(ranking, count, units, reconstruct).model
                return float(removed[count]), perplexity(model, split)

            for fraction in config.fractions:
                got, test_ppl = at(fraction, seed_data.test)
                rows.append(dict(method=name, reconstruct=label, fraction=fraction,
                                 removed=got, test_ppl=test_ppl))
            walk = _ceiling_walk(lambda f: at(f, seed_data.validation), limits,
                                 config.ceiling_step)
            ceilings[f"{name}/{label}"] = dict(
                largest={f"{c:g}": walk["largest"][f"{v:g}"]
                         for c, v in zip(config.ceilings, limits)}, walk=walk["walk"])
    return rows, ceilings


def _torch_pruning(seed_data: _Seed, config: LlmBenchConfig, dense_val: float) -> tuple:
    """Torch-Pruning's own LLM pruner at each fraction and up the ceiling walk."""
    from bingo.llm.torch_pruning_peer import prune_with_torch_pruning

    rows, costs = [], []

    def at(fraction, split):
        peer, cost = measured(lambda: prune_with_torch_pruning(
            seed_data.model, fraction, example_inputs=seed_data.example))
        costs.append(cost)
        return peer.removed_fraction, perplexity(peer.model, split)

    for fraction in config.fractions:
        got, test_ppl = at(fraction, seed_data.test)
        rows.append(dict(method="torch-pruning", reconstruct="none", fraction=fraction,
                         removed=got, test_ppl=test_ppl))
    limits = [c * dense_val for c in config.ceilings]
    walk = _ceiling_walk(lambda f: at(f, seed_data.validation), limits, config.ceiling_step)
    ceiling = dict(largest={f"{c:g}": walk["largest"][f"{v:g}"]
                            for c, v in zip(config.ceilings, limits)}, walk=walk["walk"])
    cost = dict(seconds=costs[0]["seconds"], peak_mib=max((c["peak_mib"] or 0) for c in costs),
                evaluations=0, tokens=0)
    return rows, ceiling, cost


def _tokens_per_second(model, inputs) -> float:
    with torch.no_grad():
        model(inputs)  # warm-up
        times = []
        for _ in range(THROUGHPUT_REPEATS):
            started = time.perf_counter()
            model(inputs)
            times.append(time.perf_counter() - started)
    return inputs.numel() / sorted(times)[len(times) // 2]


RELOAD = """
import sys, torch, bingo
model = bingo.load_pruned(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def _shrunk(seed_data: _Seed, scores, config: LlmBenchConfig) -> dict:
    """bingo's model at the largest fraction, shrunk: its parameters, CPU tokens/s against the
    dense model's, and its reload from disk in a fresh process with the same logits."""
    fraction = sorted(config.fractions)[SHRINK_FRACTION_INDEX]
    removed, units = removal_fractions(seed_data.model, scores, example_inputs=seed_data.example)
    count = int(torch.argmin((removed - fraction).abs()))
    refit = least_squares_refit(seed_data.calibration, progress=False)
    result = seed_data.pruned(scores, count, units, refit, structured=True)
    small = result.structured.model.eval()
    inputs = seed_data.test[0][:THROUGHPUT_BATCH]
    dense_rate = _tokens_per_second(seed_data.model, inputs)
    small_rate = _tokens_per_second(small, inputs)
    with tempfile.TemporaryDirectory() as tmp:
        bingo.save_pruned(small, Path(tmp) / "model")
        torch.save(inputs, Path(tmp) / "inputs.pt")
        subprocess.run([sys.executable, "-c", RELOAD, str(Path(tmp) / "model"),
                        str(Path(tmp) / "inputs.pt"), str(Path(tmp) / "logits.pt")],
                       check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        reloaded = torch.load(Path(tmp) / "logits.pt")
    with torch.no_grad():
        here = small(inputs).logits
    return dict(fraction=float(removed[count]),
                parameters=sum(p.numel() for p in small.parameters()),
                dense_parameters=sum(p.numel() for p in seed_data.model.parameters()),
                dense_tokens_per_second=dense_rate, shrunk_tokens_per_second=small_rate,
                speedup=small_rate / dense_rate,
                test_ppl=perplexity(small, seed_data.test),
                reload_max_abs_difference=float((reloaded - here).abs().max()))


def run_seed(config: LlmBenchConfig, text: str, seed: int, checkpoints: Path) -> dict:
    """Everything for one seed; the per-seed record of the report."""
    directory = checkpoints / f"seed{seed}"
    training = train(config, text, seed, directory)
    seed_data = _Seed(config, text, directory)
    dense = dict(val_ppl=perplexity(seed_data.model, seed_data.validation),
                 test_ppl=perplexity(seed_data.model, seed_data.test))
    tqdm.write(f"seed {seed} dense: {dense}")
    scores, costs = _score_methods(seed_data, config, training, seed)
    rows, ceilings = _rows(seed_data, scores, config, dense["val_ppl"], seed)
    peer_rows, peer_ceiling, costs["torch-pruning"] = _torch_pruning(seed_data, config,
                                                                     dense["val_ppl"])
    rows += peer_rows
    ceilings["torch-pruning/none"] = peer_ceiling
    layout = find_units(seed_data.model, "structured",
                                    example_inputs=seed_data.example)
    masks = sample_submodels(layout, config.compare_submodels, 0.05, seed=seed)
    speed = compare_evaluation(seed_data.model, (seed_data.calibration[0][:4],
                                                 seed_data.calibration[1][:4]), masks, repeats=2)
    speed = {k: v for k, v in speed.items() if not isinstance(v, torch.Tensor)}
    speed["tokens_per_submodel"] = 4 * config.block
    tqdm.write(f"seed {seed} batched vs one at a time: {speed['speedup']:.2f}x")
    return dict(seed=seed, training=training, dense=dense, costs=costs, rows=rows,
                ceilings=ceilings, batched_vs_sequential=speed,
                shrunk=_shrunk(seed_data, scores["targeted"], config))


def run_bench(config: LlmBenchConfig, out: RunDirectory) -> dict:
    """Every seed (kept from an earlier run of ``out`` where finished), then the report, the
    table and the plots in ``out``."""
    from bingo.data import load_tinyshakespeare
    from bingo.llm.compare_report import aggregate, markdown, plots
    from bingo.training import environment, torch_threads, warnings_above_progress_bars

    started = time.perf_counter()
    with torch_threads(config.threads), warnings_above_progress_bars():
        text = load_tinyshakespeare(config.data_dir)
        seeds = [out.piece(f"seed{seed}", lambda seed=seed: run_seed(
            config, text, seed, out.path / "checkpoints"))
            for seed in config.seeds]
        machine = environment()  # inside: it records the threads the run used
    report = dict(config=dict(vars(config)), environment=machine, seeds=seeds,
                  summary=aggregate(seeds, config.fractions, config.ceilings),
                  seconds=time.perf_counter() - started)
    report["files"] = dict(report=str(out.path / "report.json"),
                           table=str(out.path / "table.md"),
                           plots=plots(report, out.path))
    write_json(out.path / "report.json", report)
    (out.path / "table.md").write_text(markdown(report))
    return report


__all__ = ["measured", "run_bench", "run_seed", "train"]
