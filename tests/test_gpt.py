"""The char-level GPT example: end to end in seconds, and the Tiny Shakespeare loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bingo.data import DataError, load_tinyshakespeare
from bingo.errors import InvalidOptionError
from bingo import cli, data as bingo_data, gpt, gpt_pipeline
from bingo.gpt_pipeline import GPT, CharData, fixed_batches, perplexity
from bingo.llm.text import random_windows
from bingo.pruning import prune
from bingo.search import TicketSearch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("attention", ["linear", "mha"])
def test_tiny_gpt_end_to_end(attention):
    torch.manual_seed(0)
    data = CharData.from_text("to be or not to be, that is the question. " * 40)
    model = GPT(len(data.chars), 16, 1, 16, 4, attention)
    search = TicketSearch(model, "structured", subsets=4, fraction=0.2, metric="loss",
                          score="attribution", every=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = random_windows(data.train, 16, 4, g)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step(x, y)
    assert search.path == "fast" and search.evaluator.fused, search.path_reason
    val = fixed_batches(data.val, 2, 4, 16, 1)
    dense = perplexity(model, val)
    result = prune(model, search.significance(), ceiling=1.5 * dense,
                   eval_fn=lambda m: perplexity(m, val), structured=True, allow_unsampled=True,
                   progress=False, example_inputs=val[0][0])
    assert result.accuracy <= 1.5 * dense and result.ceiling == 1.5 * dense
    small = result.structured.model
    assert abs(perplexity(small, val) - result.accuracy) < 1e-3 * result.accuracy


def test_loader_errors_name_the_place(tmp_path):
    with pytest.raises(DataError, match="download=False"):
        load_tinyshakespeare(tmp_path, download=False)
    (tmp_path / "input.txt").write_text("not shakespeare")
    with pytest.raises(DataError, match="MD5"):
        load_tinyshakespeare(tmp_path, download=False)


@pytest.mark.skipif(not (SHARED / "tinyshakespeare" / "input.txt").is_file(),
                    reason="needs ../shared/data/tinyshakespeare/input.txt (shared machines)")
def test_real_tinyshakespeare_loads():
    text = load_tinyshakespeare(SHARED, download=False)
    data = CharData.from_text(text)
    assert len(text) == 1_115_394 and len(data.chars) == 65
    assert len(data.train) + len(data.val) + len(data.test) == len(text)


TEXT = "to be or not to be, that is the question. whether tis nobler in the mind. " * 60


def _tiny(tmp_path, **change):
    return gpt.GptConfig(**{**gpt.QUICK, "steps": 8, "eval_batches": 1, "batch": 4, "block": 16,
                            "every": 4, "out": str(tmp_path / "run"), "progress": False,
                            **change})


def test_run_saves_as_it_goes_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bingo_data, "load_tinyshakespeare", lambda data_dir=None: TEXT)
    config = _tiny(tmp_path)
    first = gpt.run(config)
    parts = tmp_path / "run" / "parts"
    assert {p.name for p in parts.iterdir()} == {
        "training.json", gpt_pipeline.TRAINED, *(f"{m}.json" for m in gpt_pipeline.METHODS)}
    assert "Quick smoke run: not a result" in (tmp_path / "run" / "table.md").read_text()

    def never(*args, **kwargs):
        raise AssertionError("a finished piece was computed again")

    # An interrupted run keeps what finished: drop one method, rerun the same configuration.
    (parts / "wanda.json").unlink()
    monkeypatch.setattr(gpt_pipeline, "_train", never)
    capsys.readouterr()
    again = gpt.run(config)
    err = capsys.readouterr().err
    assert "training: finished in an earlier run, kept" in err and "bingo: finished" in err
    assert again["methods"]["bingo"] == first["methods"]["bingo"]
    # wanda was measured again on the reloaded model: the same numbers
    assert again["methods"]["wanda"]["curve"] == pytest.approx(first["methods"]["wanda"]["curve"])
    assert again["dense"] == first["dense"]


def test_resume_with_another_configuration_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(bingo_data, "load_tinyshakespeare", lambda data_dir=None: TEXT)
    gpt.run(_tiny(tmp_path))
    with pytest.raises(InvalidOptionError, match=r"another configuration \(steps: 9 now, 8 there"):
        gpt.run(_tiny(tmp_path, steps=9))


@pytest.mark.parametrize("argv, message", [
    (["--heads", "3"], "--heads 3 must divide --d-model 64"),
    (["--sparsities", "0,x"], "--sparsities must be comma-separated numbers in [0, 1)"),
    (["--ceiling", "0.9"], "--ceiling must be >= 1"),
])
def test_bad_options_are_one_line_errors(argv, message, tmp_path, capsys):
    assert cli.main(["gpt", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bingo gpt: error: {message}") and err.count("\n") == 1
