"""TicketSearch checkpoints: corruption is refused, never loaded; a refused state changes nothing;
content that cannot come from a search is refused; save() survives kill -9 and leaves no debris;
resume with search_data sees the same batches."""

import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bingo import CheckpointError, InputMismatchError, TicketSearch
from bingo.models import lenet_300_100
from bingo.search import STALE_TEMP_SECONDS, _temp_owner, state_checksum


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g))
            for _ in range(n)]


OPTIONS = dict(granularity="neuron", subsets=6, fraction=0.3, metric="loss", score="attribution")


def _fresh(model=None, **options):
    return TicketSearch(model or _model(), **{**OPTIONS, **options})


def _search(steps=3, **options):
    search = _fresh(**options)
    for x, y in _batches(steps):
        search.step(x, y)
    return search


def _sealed(state, **changes):
    """``state`` with ``changes`` under a matching checksum (a state edited by hand), so that the
    checks behind the checksum are what must refuse it."""
    state = {**state, **changes}
    state["checksum"] = state_checksum(state)
    return state


def test_load_state_dict_rejects_other_model_config_and_corrupt_files(tmp_path):
    torch.manual_seed(0)
    model = lenet_300_100(in_features=16)
    s = TicketSearch(model, subsets=4)
    s.step(torch.randn(8, 16), torch.randint(0, 10, (8,)))
    state = s.state_dict()
    with pytest.raises(CheckpointError, match="different model"):
        TicketSearch(lenet_300_100(in_features=20), subsets=4).load_state_dict(state)
    with pytest.raises(CheckpointError, match="subsets"):
        TicketSearch(model, subsets=8).load_state_dict(state)
    with pytest.raises(CheckpointError, match="format"):
        TicketSearch(model, subsets=4).load_state_dict({"stats": {}})
    broken = _sealed(state, stats={k: v[:3] for k, v in state["stats"].items()})
    with pytest.raises(CheckpointError, match="corrupt"):
        TicketSearch(model, subsets=4).load_state_dict(broken)
    incomplete = _sealed({k: v for k, v in state.items() if k != "totals"})
    with pytest.raises(CheckpointError, match="incomplete"):
        TicketSearch(model, subsets=4).load_state_dict(incomplete)
    path = tmp_path / "s.pt"
    s.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        TicketSearch(model, subsets=4).load(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        TicketSearch(model, subsets=4).load(path)


# --- corruption --------------------------------------------------------------------------------

def _payload_ranges(path):
    """Byte ranges of the tensor payloads (the zip's ``data/N`` entries, stored uncompressed)."""
    raw = path.read_bytes()
    ranges = []
    for info in zipfile.ZipFile(path).infolist():
        if "/data/" in info.filename:
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:
                                                           info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            ranges.append((start, start + info.file_size))
    return ranges


def test_byte_flips_are_refused_or_change_nothing(tmp_path):
    """A flipped byte anywhere in a saved file raises CheckpointError or loads the same state;
    one inside a tensor payload (torch.load checks no zip CRC) always raises."""
    search = _search(reset="init")
    path = tmp_path / "search.pt"
    search.save(path)
    want = search.state_dict()["checksum"]
    good = path.read_bytes()
    rng = random.Random(17)
    payload = [i for lo, hi in _payload_ranges(path) for i in range(lo, hi)]
    flips = [(rng.randrange(len(good)), False) for _ in range(50)] + \
            [(rng.choice(payload), True) for _ in range(30)]
    outcomes = {"refused": 0, "same": 0}
    for offset, in_payload in flips:
        bad = bytearray(good)
        bad[offset] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(bad))
        fresh = _fresh(reset="init")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # an unverified (version-1) load would be a miss
                fresh.load(path)
        except CheckpointError:
            outcomes["refused"] += 1
            continue
        assert not in_payload, f"a flip at payload byte {offset} loaded"
        assert fresh.state_dict()["checksum"] == want, f"byte {offset} loaded a different state"
        outcomes["same"] += 1
    assert outcomes["refused"] >= 30  # every payload flip, and most others


def test_a_changed_score_is_refused():
    """The issue's case: one statistic changed (a score moving from 0.31 to 0.00)."""
    state = _search().state_dict()
    stats = {k: v.clone() for k, v in state["stats"].items()}
    stats["0.weight"][3, 1] += 0.25
    with pytest.raises(CheckpointError, match="checksum"):
        _fresh().load_state_dict(dict(state, stats=stats))


def test_version_1_states_load_with_a_warning():
    search = _search()
    state = search.state_dict()
    old = {k: v for k, v in state.items() if k not in ("checksum", "search_data_position")}
    old["version"] = 1
    fresh = _fresh()
    with pytest.warns(UserWarning, match="version 1.*cannot be ruled out"):
        fresh.load_state_dict(old)
    assert fresh.state_dict()["checksum"] == state["checksum"]
    with pytest.raises(CheckpointError, match="version-2 fields"):
        fresh.load_state_dict(dict(state, version=1))


# --- a refused state changes nothing -----------------------------------------------------------

def test_refused_state_leaves_the_search_as_it_was():
    donor = _search(steps=4).state_dict()
    search = _search(steps=2)
    before = search.state_dict()
    bad_init = {k: v.clone() for k, v in donor["init"].items()}
    bad_init["0.bias"] = bad_init["0.bias"].double()  # the last field checked
    with pytest.raises(CheckpointError, match="0.bias"):
        search.load_state_dict(_sealed(donor, init=bad_init))
    after = search.state_dict()
    assert after["checksum"] == before["checksum"]
    assert search.calls == 2 and search.history == before["history"]


# --- content that no search produces -----------------------------------------------------------

def _bad_states(state):
    stats = {k: v.clone() for k, v in state["stats"].items()}
    stats["0.weight"][0, 0] = -1.0
    fractional = {k: v.clone() for k, v in state["stats"].items()}
    fractional["0.weight"][0, 0] += 0.5
    init64 = {k: v.long() for k, v in state["init"].items()}
    return {
        "no snapshot": (dict(init=None), "lacks a reset snapshot"),
        "int64 snapshot": (dict(init=init64), "reset snapshot of '0.weight'"),
        "extra snapshot key": (dict(init={**state["init"], "x": torch.zeros(1)}),
                               "reset snapshot holds"),
        "NaN totals": (dict(totals=torch.full((3,), float("nan"), dtype=torch.float64)),
                       "totals are corrupt"),
        "zero totals": (dict(totals=torch.zeros(3, dtype=torch.float64)), "totals are corrupt"),
        "negative count": (dict(stats=stats), "whole numbers"),
        "fractional count": (dict(stats=fractional), "whole numbers"),
        "float calls": (dict(calls=3.7), "calls must be a non-negative integer"),
        "bool searches": (dict(searches=True), "searches must be a non-negative integer"),
        "skipped > searches": (dict(skipped=state["searches"] + 1), "do not fit together"),
        "searches > calls": (dict(calls=1), "do not fit together"),
        "short history": (dict(history=state["history"][:1]), "one record per search"),
        "NaN seconds": (dict(seconds=float("nan")), "seconds"),
        "subsets=True": (dict(config={**state["config"], "subsets": True}), "subsets"),
        "bool version": (dict(version=True), "version True"),
        "negative data position": (dict(search_data_position=-1), "search_data_position"),
    }


@pytest.mark.parametrize("case", list(_bad_states(_search(steps=1).state_dict())))
def test_semantically_wrong_states_are_refused(case):
    state = _search().state_dict()
    changes, match = _bad_states(state)[case]
    search = _search(steps=1)
    before = search.state_dict()["checksum"]
    with pytest.raises(CheckpointError, match=match):
        search.load_state_dict(_sealed(state, **changes))
    assert search.state_dict()["checksum"] == before  # nothing applied


def test_snapshot_presence_follows_the_reset_schedule():
    zero = _search(reset="zero").state_dict()
    with pytest.raises(CheckpointError, match="has a reset snapshot"):
        _fresh(reset="zero").load_state_dict(_sealed(zero, init=_search().state_dict()["init"]))
    rewind = _search(steps=1, reset="rewind", rewind_step=3).state_dict()
    assert rewind["init"] is None  # before the rewind step: none yet, and that is consistent
    _fresh(reset="rewind", rewind_step=3).load_state_dict(rewind)


def test_per_unit_fraction_must_be_the_searchs_own():
    """A checkpoint made with per-unit fraction 0.5 is refused by a search built with 0.05 (it
    used to switch the search to 0.5), and the caller's tensor is copied, not aliased."""
    def build(p):
        return _fresh(fraction={"0.weight": p})

    half = build(torch.full((16,), 0.5))
    half.step(*_batches(1)[0])
    mine = torch.full((16,), 0.05)
    search = build(mine)
    with pytest.raises(CheckpointError, match="different per-unit fraction of '0.weight'"):
        search.load_state_dict(half.state_dict())
    assert torch.equal(search.probs["0.weight"], torch.full((16,), 0.05))
    mine.fill_(0.9)  # the caller's tensor changes later; the search's must not
    assert torch.equal(search.probs["0.weight"], torch.full((16,), 0.05))


# --- save() under kill -9 --------------------------------------------------------------------

_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from torch import nn
    from bingo import TicketSearch

    torch.manual_seed(0)
    search = TicketSearch(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),
                          granularity="neuron", subsets=6, fraction=0.3, metric="loss",
                          score="attribution")
    path = sys.argv[1]
    for _ in range(3):
        search.save(path)
    real_save = torch.save

    def killed_midway(obj, f, *args, **kwargs):
        f.write(b"PK half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = killed_midway
    search.step(torch.randn(4, 8), torch.randint(0, 3, (4,)))
    search.save(path)
""")


@pytest.mark.skipif(os.name != "posix", reason="kill -9 is POSIX")
def test_kill_9_during_save_keeps_the_old_file_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "search.pt"
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    leftovers = list(tmp_path.glob(".bingo-*.tmp"))
    assert len(leftovers) == 1  # the killed writer's half file
    search = _fresh()
    search.load(path)  # the last complete save, intact
    assert search.calls == 0
    # A live writer's temporary file (this process's) and a fresh one from an older bingo stay;
    # an old one from an older bingo goes.
    live = tmp_path / f".bingo-{_temp_owner()}.0123abcd.tmp"
    fresh_legacy, old_legacy = tmp_path / ".bingo-abcd1234.tmp", tmp_path / ".bingo-wxyz_789.tmp"
    for f in (live, fresh_legacy, old_legacy):
        f.write_bytes(b"partial")
    stale = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(old_legacy, (stale, stale))
    search.save(path)
    assert sorted(tmp_path.glob(".bingo-*.tmp")) == sorted([live, fresh_legacy])
    _fresh().load(path)


@pytest.mark.skipif(os.name != "posix", reason="file modes and symlinks as on POSIX")
def test_save_keeps_the_file_mode_and_writes_through_symlinks(tmp_path):
    search = _search(steps=1)
    target = tmp_path / "real.pt"
    search.save(target)
    os.chmod(target, 0o644)
    search.save(target)
    assert (target.stat().st_mode & 0o777) == 0o644
    link = tmp_path / "latest.pt"
    link.symlink_to(target)
    search.step(*_batches(1, seed=5)[0])
    search.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    loaded = _fresh()
    loaded.load(target)
    assert loaded.calls == 2 and (target.stat().st_mode & 0o777) == 0o644


# --- resume with search_data -----------------------------------------------------------------

def _run_on_search_data(data, steps, model=None, state=None, stop_after=None):
    """Training steps with a search on ``data`` after each, from ``state``'s call on."""
    model = model or _model()
    search = _fresh(model, search_data=data)
    if state is not None:
        search.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: nothing else to resume
    for x, y in _batches(steps, seed=9)[search.calls:stop_after]:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        search.step()
    return model, search


def test_resume_with_search_data_continues_where_the_pass_stopped():
    """Saved mid-way through the second pass over a list of batches, the resumed search uses the
    batches the uninterrupted one used (it used to restart the pass from its first batch)."""
    data = _batches(3, seed=4)
    _, uninterrupted = _run_on_search_data(data, 7)
    model, first = _run_on_search_data(data, 7, stop_after=4)
    state = first.state_dict()
    assert state["search_data_position"] == 1
    _, resumed = _run_on_search_data(data, 7, model=model, state=state)
    assert resumed.searches == 7
    for key, stats in uninterrupted.stats.per_unit.items():
        assert torch.equal(resumed.stats.per_unit[key], stats), key
    short = _fresh(search_data=data[:1])
    short.load_state_dict(_sealed(state, search_data_position=2))
    with pytest.raises(InputMismatchError, match="not the search data"):
        short.step()
