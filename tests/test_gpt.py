"""The char-level GPT example: end to end in seconds, and the Tiny Shakespeare loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bingo.data import DataError, load_tinyshakespeare
from bingo.gpt import GPT, CharData, fixed_batches, perplexity, random_batch
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
        x, y = random_batch(data.train, 4, 16, g)
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
