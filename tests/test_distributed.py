"""Distributed ticket search: 2 gloo ranks on CPU equal one process; failures raise, never hang.

Each test starts two spawned processes (``torch.multiprocessing`` "spawn" context) that join a
gloo group through a ``file://`` store in a temporary directory. Workers write their outcomes
(state_dicts, error messages) to files; the test process compares them with a single-process run
of the same searches. Workers are joined with a deadline and killed after it, so a hang fails the
test instead of blocking the suite.
"""

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import bingo
from bingo import TicketSearch
from bingo.errors import DistributedError, InvalidOptionError

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
DEADLINE = 120.0  # seconds; only reached if something hangs (the tests take a few seconds)

# (name, TicketSearch options): several estimators, granularities and K, including K not
# divisible by the world size and K smaller than it (rank 1 then evaluates no subset).
CONFIGS = [
    ("neuron-attr-K7", dict(granularity="neuron", subsets=7, fraction=0.3, score="attribution",
                            metric="loss")),
    ("weight-seed-K1", dict(granularity="weight", subsets=1, fraction=0.2, score="seed",
                            metric="accuracy")),
    ("weight-attr-K8-zero", dict(granularity="weight", subsets=8, fraction=0.1,
                                 score="attribution", metric="loss", reset="zero", every=2)),
]
STEPS = 6


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(offset=0):
    g = torch.Generator().manual_seed(1 + offset)
    return [(torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g))
            for _ in range(STEPS)]


def _train(options, *, steps=range(STEPS), search=None, model=None, search_batches=None):
    """SGD steps with a search after each; the same on every rank (so replicas stay equal).

    The search uses the training batch, or ``search_batches[i]`` when given.
    """
    model = _model() if model is None else model
    search = TicketSearch(model, seed=3, **options) if search is None else search
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = _batches()
    for i in steps:
        x, y = batches[i]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step(*(search_batches[i] if search_batches else (x, y)))
    return model, search


def _comparable(state):
    """A state_dict without the wall-time fields (each rank's own) and the checksum (over them)."""
    state = dict(state)
    state.pop("seconds")
    state.pop("checksum")
    state["history"] = [{k: v for k, v in r.items() if k != "seconds"} for r in state["history"]]
    return state


def _same(a, b) -> bool:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


# -- workers (run in the spawned processes) --------------------------------------------------------

def _init(rank, store, timeout=30.0):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=timeout))


def _expect_error(outcomes, name, fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (the test process checks type and message)
        outcomes[name] = f"{type(exc).__name__}: {exc}"
    else:
        outcomes[name] = "no error"


def _worker_main(rank, store, out):
    """Equal-to-one-process runs, resume, then the checks that leave the group usable."""
    try:
        _init(rank, store)
        results = {}
        for name, options in CONFIGS:
            _, search = _train(options)
            results[name] = search.state_dict()
        # Resume mid-run across a fresh search (as after a restart on any number of ranks).
        name, options = CONFIGS[0]
        _, first = _train(options, steps=range(3))
        model = first.model
        resumed = TicketSearch(model, seed=3, **options)
        resumed.load_state_dict(first.state_dict())
        _, resumed = _train(options, steps=range(3, STEPS), search=resumed, model=model)
        results["resumed"] = resumed.state_dict()
        # Broadcast: the ranks pass different search batches; all search on rank 0's (which
        # are the training batches, so the single-process run is the reference).
        _, search = _train(dict(CONFIGS[0][1], sync_batch="broadcast"),
                           search_batches=_batches(offset=10 * rank) if rank else None)
        results["broadcast"] = search.state_dict()
        # Broadcast from rank 0's search_data (rank 1 has none): every rank records rank 0's
        # position in it, so that any rank's state resumes it.
        search = TicketSearch(_model(), seed=3, sync_batch="broadcast",
                              search_data=_batches()[:4] if rank == 0 else None, **CONFIGS[0][1])
        for _ in range(STEPS):
            search.step()
        results["broadcast_data"] = search.state_dict()

        outcomes = {}
        model = _model()
        x, y = _batches()[0]
        options = CONFIGS[0][1]
        search = TicketSearch(model, seed=3, **options)
        xr = x + rank  # a different batch on rank 1
        _expect_error(outcomes, "batch", lambda: search.step(xr, y))
        search = TicketSearch(model, seed=3, **options)
        if rank == 1:
            with torch.no_grad():
                model[0].weight[0, 0] += 0.5
        _expect_error(outcomes, "weights", lambda: search.step(x, y))
        model = _model()
        search = TicketSearch(model, seed=3, **dict(options, subsets=7 + rank))
        _expect_error(outcomes, "config", lambda: search.step(x, y))
        # Rank 1's evaluation raises: rank 0 must hear of it at once, rank 1 keeps its own error.
        search = TicketSearch(model, seed=3, **options)
        if rank == 1:
            def broken(*_args):
                raise RuntimeError("rank 1's forward broke")
            search.evaluator.baseline = broken
        _expect_error(outcomes, "raised", lambda: search.step(x, y))
        # Rank 1 never calls step: rank 0 must time out with a clear error, not hang.
        search = TicketSearch(model, seed=3, **options, timeout=2.0)
        flag = out + ".rank0-done"
        if rank == 0:
            start = time.monotonic()
            _expect_error(outcomes, "timeout", lambda: search.step(x, y))
            outcomes["timeout_seconds"] = time.monotonic() - start
            open(flag, "w").close()
        else:
            # Stay alive (a dead peer would be reported as a connection error instead).
            while not os.path.exists(flag):
                time.sleep(0.05)
        torch.save(dict(results=results, outcomes=outcomes), f"{out}.rank{rank}")
    except Exception:  # noqa: BLE001
        with open(f"{out}.rank{rank}.error", "w") as f:
            f.write(traceback.format_exc())
        raise


def _worker_dies(rank, store, out):
    """Rank 1 exits before the search's collectives; rank 0 must raise DistributedError."""
    _init(rank, store)
    model = _model()
    search = TicketSearch(model, seed=3, **CONFIGS[0][1], timeout=20.0)
    x, y = _batches()[0]
    if rank == 1:
        os._exit(3)
    outcomes = {}
    start = time.monotonic()
    _expect_error(outcomes, "dies", lambda: search.step(x, y))
    outcomes["dies_seconds"] = time.monotonic() - start
    torch.save(dict(outcomes=outcomes), f"{out}.rank{rank}")


def _run(target, tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, store, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    errors = {r: open(f"{out}.rank{r}.error").read() for r in range(WORLD)
              if os.path.exists(f"{out}.rank{r}.error")}
    assert not errors, errors
    assert not hung, f"ranks {hung} still running after {DEADLINE} s"
    return out, [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    out, codes = _run(_worker_main, tmp_path_factory.mktemp("dist"))
    assert codes == [0, 0]
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(WORLD)]


# -- tests ---------------------------------------------------------------------------------------

def _assert_states_close(got, want):
    got, want = _comparable(got), _comparable(want)
    assert got.keys() == want.keys()
    for key in ("calls", "searches", "skipped", "config", "layout"):
        assert got[key] == want[key], key
    for key in want["stats"]:
        torch.testing.assert_close(got["stats"][key], want["stats"][key], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["totals"], want["totals"], rtol=1e-9, atol=1e-9)
    assert len(got["history"]) == len(want["history"])
    for g, w in zip(got["history"], want["history"]):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), k


def _significance(options, state):
    search = TicketSearch(_model(), seed=3, distributed=False, **options)
    search.load_state_dict(state)  # a 2-rank checkpoint loads into a single process
    return search.significance()


@pytest.mark.parametrize("name,options", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_two_ranks_equal_single_process(main_run, name, options):
    _, single = _train(dict(options, distributed=False))
    want = single.state_dict()
    # Rank 0 and rank 1 hold the same state (so saving from rank 0 suffices) ...
    assert _same(_comparable(main_run[0]["results"][name]),
                 _comparable(main_run[1]["results"][name]))
    # ... equal to the single-process run's, up to float32 summation order.
    _assert_states_close(main_run[0]["results"][name], want)
    assert want["searches"] - want["skipped"] > 0  # the comparison covers real statistics
    got, ref = _significance(options, main_run[0]["results"][name]), single.significance()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5)
        assert torch.equal(got.coverage[key], ref.coverage[key])


def test_resume_mid_run_and_broadcast(main_run):
    name, options = CONFIGS[0]
    _, single = _train(dict(options, distributed=False))
    _assert_states_close(main_run[0]["results"]["resumed"], single.state_dict())
    # With sync_batch="broadcast", rank 1 searched on rank 0's batches, not its own.
    _assert_states_close(main_run[1]["results"]["broadcast"], single.state_dict())
    # ... and recorded rank 0's position in its search_data (6 batches of 4: 2 into a pass).
    states = [main_run[rank]["results"]["broadcast_data"] for rank in range(WORLD)]
    assert states[0]["search_data_position"] == 2
    assert _same(_comparable(states[0]), _comparable(states[1]))


def test_mismatches_raise_on_every_rank(main_run):
    for rank in range(WORLD):
        outcomes = main_run[rank]["outcomes"]
        assert outcomes["batch"].startswith("DistributedError")
        assert "search batch's inputs differ between rank 0 and rank 1" in outcomes["batch"]
        assert "searched weights differ" in outcomes["weights"]
        assert "ranks disagree on the subsets (K): rank 0 has 7, rank 1 has 8" in \
            outcomes["config"]


def test_failing_rank_is_named_and_timeout_is_clear(main_run):
    rank0, rank1 = main_run[0]["outcomes"], main_run[1]["outcomes"]
    assert rank0["raised"].startswith("DistributedError")
    assert "rank(s) [1] of 2 raised an error" in rank0["raised"]
    assert rank1["raised"] == "RuntimeError: rank 1's forward broke"
    assert rank0["timeout"].startswith("DistributedError")
    assert "waited 2 s for the header collective" in rank0["timeout"]
    assert "did not call TicketSearch.step()" in rank0["timeout"]


def test_dead_rank_raises_instead_of_hanging(tmp_path):
    out, codes = _run(_worker_dies, tmp_path)
    assert codes == [0, 3]
    outcome = torch.load(f"{out}.rank0", weights_only=False)["outcomes"]["dies"]
    assert outcome.startswith("DistributedError")
    assert "rank 0 of 2" in outcome


def test_single_process_options():
    model = _model()
    with pytest.raises(InvalidOptionError, match="distributed must be"):
        TicketSearch(model, distributed="yes")
    with pytest.raises(InvalidOptionError, match="sync_batch"):
        TicketSearch(model, sync_batch="gather")
    with pytest.raises(InvalidOptionError, match="timeout"):
        TicketSearch(model, timeout=0)
    if not dist.is_initialized():
        with pytest.raises(DistributedError, match="not initialised"):
            TicketSearch(model, distributed=True).step(*_batches()[0])
    assert issubclass(DistributedError, bingo.BingoError)
