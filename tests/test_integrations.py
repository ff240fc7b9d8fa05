"""Lightning and Hugging Face callbacks: same search as the plain loop, state survives resume.

The framework tests skip cleanly when the extra is not installed (``pytest.importorskip``); CI
installs both extras through the ``test`` extra, so there they run.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bingo import TicketSearch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OPTIONS = dict(granularity="neuron", subsets=6, fraction=0.3, score="attribution", metric="loss",
               seed=5)
LR = 0.1


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _data(n=24):
    """Three batches of 8: the checkpoints below fall on epoch boundaries, where both frameworks
    resume with the next epoch's first batch (mid-epoch, Lightning restarts a plain loader)."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _plain_loop(steps, batch_size=8):
    """The reference: the README's plain loop over the same batches in the same order (epochs
    in sequence, unshuffled)."""
    model = _net()
    search = TicketSearch(model, **OPTIONS)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data()
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    for i in range(steps):
        xb, yb = batches[i % len(batches)]
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step(xb, yb)
    return search


def _assert_same_search(got: TicketSearch, want: TicketSearch):
    assert (got.calls, got.searches, got.skipped) == (want.calls, want.searches, want.skipped)
    # By position: the searched network may sit inside a wrapper (keys "net.0.weight").
    assert len(got.stats.per_unit) == len(want.stats.per_unit)
    for g, w in zip(got.stats.per_unit.values(), want.stats.per_unit.values()):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.stats.totals, want.stats.totals, rtol=1e-6, atol=1e-6)
    a, b = got.significance(), want.significance()
    for g, w in zip(a.values(), b.values()):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_importing_bingo_imports_no_framework():
    code = ("import sys, bingo, bingo.integrations; "
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("module,blocked", [("bingo.integrations.lightning", "lightning.pytorch"),
                                            ("bingo.integrations.huggingface", "transformers")])
def test_missing_extra_is_a_clear_error(monkeypatch, module, blocked):
    from bingo.integrations import MissingExtraError
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, blocked, None)  # makes `import blocked` raise ImportError
    with pytest.raises(MissingExtraError, match=r"pip install \"bingo-prune\[(lightning|hf)\]\""):
        __import__(module)


def test_default_batch_unpacking():
    from bingo.errors import InputMismatchError
    from bingo.integrations import default_batch_to_inputs_targets as unpack
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    assert unpack((x, y, "extra"))[0] is x
    assert unpack({"input_ids": x, "labels": y})[1] is y
    with pytest.raises(InputMismatchError, match="keys"):
        unpack({"pixels": x})
    with pytest.raises(InputMismatchError, match="batch_to_inputs_targets"):
        unpack(x)


# -- Lightning --------------------------------------------------------------------------------


def _lightning_fit(tmp_path, max_steps, ckpt_path=None):
    L = pytest.importorskip("lightning.pytorch")
    from bingo.integrations.lightning import TicketSearchCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    callback = TicketSearchCallback(module=lambda m: m.net, **OPTIONS)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path),
                        callbacks=[callback])
    loader = DataLoader(TensorDataset(*_data()), batch_size=8, shuffle=False)
    trainer.fit(Module(), loader, ckpt_path=ckpt_path)
    return trainer, callback


def test_lightning_callback_matches_plain_loop_and_resumes(tmp_path):
    trainer, callback = _lightning_fit(tmp_path, 3)
    _assert_same_search(callback.search, _plain_loop(3))
    ckpt = str(tmp_path / "three.ckpt")
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["callbacks"]  # the search state is in it
    # A fresh Trainer, module and callback restore the search exactly (max_steps reached: no step).
    _, restored = _lightning_fit(tmp_path, 3, ckpt_path=ckpt)
    _assert_same_search(restored.search, callback.search)
    assert restored.search.history == callback.search.history
    # Resumed further, the search continues where it stopped. (Which batches Lightning feeds
    # after a resume is Lightning's business, so the new searches are not compared.)
    _, resumed = _lightning_fit(tmp_path, 6, ckpt_path=ckpt)
    assert [r["search"] for r in resumed.search.history] == list(range(6))
    assert resumed.search.history[:3] == callback.search.history


# -- Hugging Face -------------------------------------------------------------------------------


class _Tiny(nn.Module):
    """Any nn.Module returning {"loss", "logits"} trains in the HF Trainer."""

    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_train(tmp_path, max_steps, resume=None, **callback_options):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from bingo.integrations.huggingface import TicketSearchCallback

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=8,
        learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", dataloader_num_workers=0, seed=0)
    model = _Tiny()
    callback = TicketSearchCallback(**OPTIONS, **callback_options)
    # A sequential order, so that the plain loop sees the same batches.
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(),
                                   callbacks=[callback])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(_Rows())
    trainer.train(resume_from_checkpoint=resume)
    return callback


def test_hf_callback_matches_plain_loop_and_resumes(tmp_path):
    callback = _hf_train(tmp_path, 3)
    _assert_same_search(callback.search, _plain_loop(3))
    saved = tmp_path / "checkpoint-3" / "bingo_search.pt"
    assert saved.is_file()
    # Resume from the checkpoint in a fresh Trainer, model and callback.
    resumed = _hf_train(tmp_path, 6, resume=str(tmp_path / "checkpoint-3"))
    assert [r["search"] for r in resumed.search.history] == list(range(6))
    _assert_same_search(resumed.search, _plain_loop(6))
    assert (tmp_path / "checkpoint-6" / "bingo_search.pt").is_file()


def test_hf_resume_without_search_state_is_refused(tmp_path):
    _hf_train(tmp_path, 3)
    os.unlink(tmp_path / "checkpoint-3" / "bingo_search.pt")
    from bingo.errors import CheckpointError
    with pytest.raises(CheckpointError, match="no ticket-search state"):
        _hf_train(tmp_path, 6, resume=str(tmp_path / "checkpoint-3"))
