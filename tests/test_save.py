"""bingo.save: a pruned model (shrunk or masked) saved and loaded back in a fresh process.

Every zoo model is pruned on its structure groups; the shrunk and the masked model are saved,
and one fresh ``python -c`` process loads them all (transformers models from their config alone,
plain modules into a dense instance built with another seed, so that every value must come from
the save) and runs them on inputs the saving process wrote. Their outputs must equal the
in-memory models' to the bit. Then ``save_pretrained`` / ``from_pretrained`` for a uniformly
pruned Llama, tied weights stored once, bad directories, corrupt files and other
architectures refused, and atomic writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.utils import prune as torch_prune

import zoo
from bingo import load_pruned, prune, save_pruned
from bingo.errors import CheckpointError, InputMismatchError
from bingo.save import MANIFEST, MASKS, WEIGHTS
from bingo.structure import discover
from test_prune_structured import quick, quick_timing  # noqa: F401  (autouse fixture)
from test_structure import _randomise_norms

TESTS = Path(__file__).resolve().parent
SAVED = ["llama", "llama_tied", "gpt2", "bert", "vit", "resnet", "mobilenet", "mha", "lenet5",
         "lenet300"]
PLAIN = {"mha", "lenet5", "lenet300"}   # no config: load_pruned gets a dense instance

LOADER = """
import json, sys, torch
sys.path.insert(0, sys.argv[3])
torch.set_num_threads(1)
import transformers, zoo
from torch.nn.utils import prune as torch_prune
from bingo import load_pruned
out = {}
for e in json.load(open(sys.argv[1])):
    if e["loader"] == "bingo":
        dense = zoo.build(e["name"], seed=7)[0] if e["plain"] else None
        model = load_pruned(e["dir"], dense)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(e["dir"])
    with torch.no_grad():
        logits = zoo.run(model.eval(), torch.load(e["inputs"]))
    out[e["key"]] = dict(logits=logits, masked=torch_prune.is_pruned(model),
                         parameters=sum(p.numel() for p in model.parameters()),
                         module=type(model).__name__)
torch.save(out, sys.argv[2])
"""


def _pruned(name, seed=0, uniform=False):
    """(PruneResult on structure groups, fresh inputs) for zoo model ``name``."""
    model, inputs, _ = zoo.build(name, seed)
    _randomise_norms(model, torch.Generator().manual_seed(seed))
    structure = discover(model, inputs)
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for g in structure.groups:
        scores[g.key] = torch.rand(g.num_units, generator=generator)
        if uniform:  # half of every group goes: a config can say it
            scores[g.key] = (torch.randperm(g.num_units, generator=generator) >=
                             g.num_units // 2).float()
    result = prune(model, scores, sparsity=0.5 if uniform else 0.4, granularity="structured",
                   example_inputs=inputs, structured=True, progress=False)
    return result, zoo.build(name, seed=11)[1]


def _logits(model, inputs):
    with torch.no_grad():
        return zoo.run(model.eval(), inputs)


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory):
    """Save every model, load them all in one fresh process; key -> (expected, loaded)."""
    root = tmp_path_factory.mktemp("saves")
    entries, expected = [], {}
    with quick_timing():
        for name in SAVED:
            result, inputs = _pruned(name)
            torch.save(inputs, root / f"{name}.inputs")
            for kind, model in (("shrunk", result.structured.model),
                                ("masked", result.model)):
                key = f"{name}-{kind}"
                save_pruned(model, root / key)
                expected[key] = dict(logits=_logits(model, inputs),
                                     masked=kind == "masked", module=type(model).__name__,
                                     parameters=sum(p.numel() for p in model.parameters()))
                entries.append(dict(key=key, name=name, dir=str(root / key),
                                    plain=name in PLAIN, loader="bingo",
                                    inputs=str(root / f"{name}.inputs")))
        uniform, inputs = _pruned("llama", uniform=True)
        small = uniform.structured.model
        assert small.bingo_config_note is None, small.bingo_config_note
        torch.save(inputs, root / "uniform.inputs")
        small.save_pretrained(root / "hf")
        save_pruned(uniform, root / "uniform")
        for key, directory in (("hf", "hf"), ("uniform", "uniform")):
            expected[key] = dict(logits=_logits(small, inputs), masked=False,
                                 module=type(small).__name__,
                                 parameters=sum(p.numel() for p in small.parameters()))
            entries.append(dict(key=key, name="llama", dir=str(root / directory),
                                plain=False, loader="from_pretrained",
                                inputs=str(root / "uniform.inputs")))
    (root / "entries.json").write_text(json.dumps(entries))
    done = subprocess.run([sys.executable, "-c", LOADER, str(root / "entries.json"),
                           str(root / "loaded.pt"), str(TESTS)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return expected, torch.load(root / "loaded.pt")


@pytest.mark.parametrize("kind", ["shrunk", "masked"])
@pytest.mark.parametrize("name", SAVED)
def test_loaded_in_a_fresh_process_gives_the_same_outputs(fresh_process, name, kind):
    expected, loaded = fresh_process
    want, got = expected[f"{name}-{kind}"], loaded[f"{name}-{kind}"]
    assert got["module"] == want["module"] and got["parameters"] == want["parameters"]
    assert got["masked"] == want["masked"]     # a masked save comes back masked
    assert float(want["logits"].abs().max()) > 1e-3   # outputs that say something
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", ["hf", "uniform"])
def test_uniformly_pruned_llama_round_trips_through_from_pretrained(fresh_process, key):
    """The config says every layer's heads and neurons: transformers' own save_pretrained /
    from_pretrained round-trip the shrunk model, and so does a bingo save directory."""
    expected, loaded = fresh_process
    assert loaded[key]["parameters"] == expected[key]["parameters"]
    torch.testing.assert_close(loaded[key]["logits"], expected[key]["logits"], rtol=0, atol=1e-6)


def test_a_transformers_save_loads_into_a_dense_instance_too(tmp_path):
    result, inputs = _pruned("llama", uniform=True)
    directory = save_pruned(result, tmp_path / "uniform")
    loaded = load_pruned(directory, zoo.build("llama", seed=7)[0])
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads,
            loaded.config.intermediate_size) == (2, 1, 24)     # the config says it, as saved
    assert torch.equal(_logits(loaded, inputs), _logits(result.structured.model, inputs))


def test_tied_weights_are_stored_once(tmp_path):
    result, _ = _pruned("llama_tied")
    directory = save_pruned(result, tmp_path / "tied")
    weights = load_file(str(directory / WEIGHTS))
    assert "model.embed_tokens.weight" in weights and "lm_head.weight" not in weights
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = load_pruned(directory)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_what_save_pruned_takes(tmp_path):
    result, inputs = _pruned("lenet300")
    save_pruned(result, tmp_path / "result")            # the shrunk model, when there is one
    save_pruned(result.structured, tmp_path / "structured")
    for directory in ("result", "structured"):
        loaded = load_pruned(tmp_path / directory, zoo.build("lenet300")[0])
        assert not (tmp_path / directory / MASKS).exists()
        assert torch.equal(_logits(loaded, inputs), _logits(result.structured.model, inputs))
    result.structured = None
    save_pruned(result, tmp_path / "masked")            # else the masked model
    assert torch_prune.is_pruned(load_pruned(tmp_path / "masked", zoo.build("lenet300")[0]))
    with pytest.raises(InputMismatchError, match="nn.Module, a PruneResult"):
        save_pruned({"0.weight": torch.ones(2)}, tmp_path / "dict")


@pytest.fixture(scope="module")
def small_save(tmp_path_factory):
    """A saved shrunk LeNet-300-100 and a saved shrunk Llama (for the error tests)."""
    root = tmp_path_factory.mktemp("small")
    with quick_timing():
        lenet, _ = _pruned("lenet300")
        llama, _ = _pruned("llama")
    return save_pruned(lenet, root / "lenet"), save_pruned(llama, root / "llama")


def _copy(directory, tmp_path):
    import shutil

    return Path(shutil.copytree(directory, tmp_path / directory.name))


def test_not_a_save_is_refused(tmp_path, small_save):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a bingo save"):
        load_pruned(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pruned(tmp_path / "missing")
    broken = _copy(small_save[0], tmp_path)
    (broken / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_pruned(broken)
    manifest = json.loads((small_save[0] / MANIFEST).read_text())
    (broken / MANIFEST).write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        load_pruned(broken)
    (broken / MANIFEST).write_text(json.dumps({**manifest, "format": "other"}))
    with pytest.raises(CheckpointError, match="not a bingo save manifest"):
        load_pruned(broken)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_weights_are_refused_by_their_checksum(tmp_path, small_save, damage):
    copy = _copy(small_save[0], tmp_path)
    data = bytearray((copy / WEIGHTS).read_bytes())
    if damage == "flip":
        data[-7] ^= 0xFF          # a weight's bits, not the header: safetensors would load it
    else:
        data = data[: len(data) // 2]
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_pruned(copy, zoo.build("lenet300")[0])


def test_another_architecture_is_refused_and_left_alone(small_save):
    lenet_dir, llama_dir = small_save
    other = zoo.build("lenet5")[0]
    before = {n: t.clone() for n, t in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="not the saved architecture"):
        load_pruned(lenet_dir, other)
    assert all(torch.equal(t, before[n]) for n, t in other.state_dict().items())
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        load_pruned(llama_dir, zoo.build("gpt2")[0])
    transformers = pytest.importorskip("transformers")
    wider = zoo.llama()
    config = transformers.LlamaConfig(**{**wider.config.to_dict(), "hidden_size": 64})
    with pytest.raises(CheckpointError, match="hidden_size=64"):
        load_pruned(llama_dir, transformers.LlamaForCausalLM(config))
    with pytest.raises(InputMismatchError, match="pass model="):
        load_pruned(lenet_dir)
    with pytest.raises(CheckpointError, match="masked"):
        load_pruned(lenet_dir, prune(zoo.build("lenet300")[0], {"1.weight": torch.rand(300)},
                                     sparsity=0.5, progress=False).model)


def test_writes_are_atomic(tmp_path, small_save, monkeypatch):
    import bingo.save as save

    result, inputs = _pruned("lenet300")
    target = tmp_path / "out"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(InputMismatchError, match="not empty"):
        save_pruned(result, tmp_path / "taken", overwrite=True)   # not a save: never replaced
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    save_pruned(result, target)
    with pytest.raises(InputMismatchError, match="overwrite=True"):
        save_pruned(result, target)
    written = save._write_into

    def fails_after_the_weights(directory, model):
        written(directory, model)
        (directory / MANIFEST).unlink()
        raise OSError("disk full")

    monkeypatch.setattr(save, "_write_into", fails_after_the_weights)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(result, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save_pruned(result, target, overwrite=True)
    # Nothing half-written is left, and the earlier save is whole.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "taken"]
    loaded = load_pruned(target, zoo.build("lenet300")[0])
    assert torch.equal(_logits(loaded, inputs), _logits(result.structured.model, inputs))
    monkeypatch.setattr(save, "_write_into", written)
    save_pruned(result.model, target, overwrite=True)             # replaces the earlier save
    assert (target / MASKS).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "taken"]
