"""``bingo llm prune`` (bingo.llm.command, bingo.llm.prune_checkpoint): a tiny transformers Llama
checkpoint pruned end to end through the command line, reloaded in a fresh process, and every
bad input refused in one line before any long work."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bingo
from bingo import cli
from bingo.llm import prune_checkpoint as pipeline
from bingo.llm import recipe

transformers = pytest.importorskip("transformers")

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
SPARSITY = 0.3
WORDS = ("the king shall not be slain by any man of woman born but by a tree that walks to "
         "his castle and the crown falls on the heath where three witches cry").split()


def _text() -> str:
    """About 24 KB of text: Tiny Shakespeare if it is here, else seeded word salad."""
    from bingo.data import load_tinyshakespeare
    from bingo.errors import BingoError

    try:
        return load_tinyshakespeare(DATA_DIR, download=False)[:24_000]
    except BingoError:
        rng = random.Random(0)
        return " ".join(rng.choice(WORDS) for _ in range(5000))[:24_000]


def _save_llama(directory: Path, text: str) -> None:
    """A Llama with grouped-query attention (hidden 32, 2 layers, 4 query / 2 key-value heads,
    SwiGLU 64, a context of 32 tokens), trained 30 steps on ``text``, saved with its character
    tokenizer."""
    from bingo.llm.checkpoint import char_tokenizer, encode
    from bingo.llm.text import random_windows

    chars = "".join(sorted(set(text)))
    tokenizer = char_tokenizer(chars)
    config = transformers.LlamaConfig(
        vocab_size=len(chars), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False, use_cache=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = encode(tokenizer, text)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        x, y = random_windows(ids, 32, 16, generator)
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    transformers.utils.logging.disable_progress_bar()
    try:
        model.eval().save_pretrained(directory)
    finally:
        transformers.utils.logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the command uses by default (the tests share a 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(checkpoint dir, calibration file, text)``."""
    root = tmp_path_factory.mktemp("llm")
    text = _text()
    _save_llama(root / "checkpoint", text[:12_000])
    calibration = root / "calibration.txt"
    calibration.write_text(text[12_000:18_000])
    return root / "checkpoint", calibration, text


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pruned(files, tmp_path_factory):
    """``bingo llm prune`` run once, progress bars on: ``(exit code, stdout, stderr, out dir,
    the report prune_checkpoint returned, with the in-process model)``."""
    checkpoint, calibration, _ = files
    out = tmp_path_factory.mktemp("pruned") / "out"
    returned = {}
    original = pipeline.prune_checkpoint

    def kept(*args, **kwargs):
        returned.update(original(*args, **kwargs))
        return returned

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "prune_checkpoint", kept)
        code, stdout, stderr = _main(["llm", "prune", "--model-dir", str(checkpoint),
                                      "--calibration", str(calibration), "--sparsity",
                                      str(SPARSITY), "--evidence", "8", "--out", str(out)])
    return code, stdout, stderr, out, returned


def _held_out(tokenizer, calibration: Path, block: int):
    from bingo.llm.checkpoint import encode
    from bingo.llm.text import windows

    ids = encode(tokenizer, calibration.read_text())
    return windows(ids[int(pipeline.CALIBRATION_SHARE * ids.numel()):], block)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def test_prune_writes_a_smaller_model_and_prints_perplexity(pruned, files):
    code, stdout, stderr, out, report = pruned
    assert code == 0, stderr
    assert report["block"] == 32  # min(128, max_position_embeddings)
    assert report["windows"]["evidence"] == 8
    before, after = report["perplexity_before"], report["perplexity_after"]
    assert math.isfinite(before) and math.isfinite(after) and before > 1 and after > 1
    assert "perplexity" in stdout and f"{before:.4f}" in stdout and f"{after:.4f}" in stdout
    assert f"{report['parameters_before']:,}" in stdout
    assert f"{report['parameters_after']:,}" in stdout and str(out) in stdout
    assert report["parameters_after"] < report["parameters_before"]
    assert abs(report["removed_block_fraction"] - SPARSITY) < 0.03
    # progress bars and stage lines went to stderr
    assert "targeted elimination" in stderr and "perplexity before" in stderr
    for name in ("bingo_pruned.json", "model.safetensors", "config.json", "tokenizer.json",
                 pipeline.REPORT_FILE):
        assert (out / name).is_file(), name
    saved = json.loads((out / pipeline.REPORT_FILE).read_text())
    assert saved["perplexity_after"] == after and saved["out"] == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no staging left behind
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_removed_fraction_is_what_the_saved_model_lost(pruned, files):
    from bingo.llm.budget import block_parameter_names
    from bingo.llm.checkpoint import load_causal_lm

    _, _, _, out, report = pruned
    dense, _ = load_causal_lm(files[0])
    shrunk = bingo.load_pruned(out)

    def block_size(model):
        names = block_parameter_names(model)
        return sum(p.numel() for n, p in model.named_parameters() if n in names)

    removed = 1 - block_size(shrunk) / block_size(dense)
    assert removed == pytest.approx(report["removed_block_fraction"], abs=1e-9)
    assert abs(removed - SPARSITY) < 0.03
    assert sum(p.numel() for p in shrunk.parameters()) == report["parameters_after"]
    # the printed "after" perplexity is the saved model's, on the held-out last 10%
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    from bingo.llm.text import perplexity

    held_out = _held_out(tokenizer, files[1], report["block"])
    assert perplexity(shrunk, held_out) == pytest.approx(report["perplexity_after"], rel=1e-5)
    assert perplexity(dense, held_out) == pytest.approx(report["perplexity_before"], rel=1e-5)


def test_out_reloads_in_a_fresh_process_with_the_same_logits(pruned, tmp_path):
    _, _, _, out, report = pruned
    ids = torch.randint(0, report["model"].config.vocab_size, (2, 20),
                        generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch, transformers, bingo\n"
            "out, ids_file, logits_file = sys.argv[1:]\n"
            "model = bingo.load_pruned(out)\n"
            "tok = transformers.AutoTokenizer.from_pretrained(out)\n"
            "assert tok('to be', add_special_tokens=False)['input_ids'], 'tokenizer'\n"
            "with torch.no_grad():\n"
            "    logits = model(torch.load(ids_file)).logits\n"
            "torch.save(dict(logits=logits, parameters=sum(p.numel() for p in "
            "model.parameters())), logits_file)\n")
    done = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, done.stderr
    fresh = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        expected = report["model"](ids).logits
    assert fresh["parameters"] == report["parameters_after"]
    torch.testing.assert_close(fresh["logits"], expected, rtol=1e-5, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("to be", add_special_tokens=False)["input_ids"]) == "to be"


def test_empty_existing_out_is_used(files, tmp_path):
    checkpoint, calibration, _ = files
    out = tmp_path / "empty"
    out.mkdir()
    report = pipeline.prune_checkpoint(checkpoint, calibration, 0.2, out, block=32, evidence=4,
                                       progress=False)
    assert (out / "bingo_pruned.json").is_file() and report["out"] == str(out)
    assert abs(report["removed_block_fraction"] - 0.2) < 0.03
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, before any long work
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_long_work(monkeypatch):
    """Scoring, pruning and saving fail the test if they start."""
    def started(*args, **kwargs):
        raise AssertionError("long work started although the input is bad")

    monkeypatch.setattr(recipe, "targeted_llm_scores", started)
    monkeypatch.setattr(bingo, "prune", started)
    monkeypatch.setattr(pipeline, "measured_perplexity", started)
    monkeypatch.setattr(pipeline, "_write_out", started)


@pytest.fixture
def no_loading(monkeypatch, no_long_work):
    """As no_long_work, and the model is not even loaded."""
    def started(*args, **kwargs):
        raise AssertionError("the model was loaded although the input is bad")

    monkeypatch.setattr(pipeline, "load_causal_lm", started)


def _refused(argv: list[str], *needles: str) -> str:
    code, stdout, stderr = _main(["llm", "prune", "--no-progress", *argv])
    assert code == 2, stderr
    assert stderr.startswith("bingo llm prune: error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr and stdout == ""
    for needle in needles:
        assert needle in stderr, (needle, stderr)
    return stderr


@pytest.mark.parametrize("sparsity", ["0", "1", "1.5", "-0.1", "nan"])
def test_sparsity_outside_0_1_is_refused(sparsity, files, tmp_path, no_loading):
    checkpoint, calibration, _ = files
    _refused(["--model-dir", str(checkpoint), "--calibration", str(calibration), "--sparsity",
              sparsity, "--out", str(tmp_path / "new" / "out")], "--sparsity must lie in (0, 1)")
    assert list(tmp_path.iterdir()) == []  # not even the missing parent was created


def test_not_a_checkpoint_is_refused(files, tmp_path, no_loading):
    _, calibration, _ = files
    args = ["--calibration", str(calibration), "--sparsity", "0.3", "--out", str(tmp_path / "o")]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    _refused(["--model-dir", str(tmp_path / "plain"), *args], "is not a transformers checkpoint",
             "config.json")
    _refused(["--model-dir", str(tmp_path / "missing"), *args], "not a directory")
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    (encoder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    _refused(["--model-dir", str(encoder), *args], "not a causal language model")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, needle", [(None, "does not exist"), ("", "is empty"),
                                             ("  \n\n ", "is empty"),
                                             (b"\xff\xfe\x00bad", "not UTF-8")])
def test_missing_or_empty_calibration_is_refused(content, needle, files, tmp_path, no_loading):
    checkpoint = files[0]
    path = tmp_path / "calibration.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    err = _refused(["--model-dir", str(checkpoint), "--calibration", str(path), "--sparsity",
                    "0.3", "--out", str(tmp_path / "out")], needle)
    assert str(path) in err
    assert not (tmp_path / "out").exists()


def test_too_little_text_for_a_window_is_refused(files, tmp_path, no_long_work):
    checkpoint, _, text = files
    path = tmp_path / "short.txt"
    path.write_text(text[:300])  # 30 held-out characters: no window of 33
    _refused(["--model-dir", str(checkpoint), "--calibration", str(path), "--sparsity", "0.3",
              "--block", "32", "--out", str(tmp_path / "out")], "too short", str(path),
             "(held out)")
    path.write_text(text[:400])  # 40 held out: enough for one window of 33
    with pytest.raises(AssertionError, match="long work started"):
        pipeline.prune_checkpoint(checkpoint, path, 0.3, tmp_path / "out", block=32,
                                  progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("block, needle", [("0", "--block must be a positive number"),
                                           ("33", "--block 33 is longer than the model's "
                                                  "context of 32")])
def test_bad_window_length_is_refused(block, needle, files, tmp_path, no_loading):
    checkpoint, calibration, _ = files
    _refused(["--model-dir", str(checkpoint), "--calibration", str(calibration), "--sparsity",
              "0.3", "--block", block, "--out", str(tmp_path / "out")], needle)


def test_existing_nonempty_out_is_refused_and_left_untouched(files, tmp_path, no_loading):
    checkpoint, calibration, _ = files
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "sub").mkdir()
    _refused(["--model-dir", str(checkpoint), "--calibration", str(calibration), "--sparsity",
              "0.3", "--out", str(out)], f"--out {out} exists and is not empty")
    assert sorted(p.name for p in out.iterdir()) == ["sub", "thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    afile = tmp_path / "file.txt"
    afile.write_text("keep")
    _refused(["--model-dir", str(checkpoint), "--calibration", str(calibration), "--sparsity",
              "0.3", "--out", str(afile)], f"--out {afile} exists and is not a directory")
    assert afile.read_text() == "keep"


def test_out_under_a_file_is_refused(files, tmp_path, no_loading):
    checkpoint, calibration, _ = files
    (tmp_path / "file").write_text("")
    _refused(["--model-dir", str(checkpoint), "--calibration", str(calibration), "--sparsity",
              "0.3", "--out", str(tmp_path / "file" / "out")], "cannot be written")


UNSUPPORTED = {
    # Mamba-2 has no attention heads, and its mixer's units are not ones bingo can remove
    "mamba2": (lambda vocab: transformers.Mamba2Config(vocab_size=vocab, hidden_size=16,
                                                       num_hidden_layers=2, num_heads=2,
                                                       head_dim=16, state_size=4, n_groups=1),
               "architecture Mamba2ForCausalLM is not supported by bingo's structure layer: it "
               "finds no removable attention head or MLP neuron"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_architecture_is_refused(name, files, tmp_path, no_long_work):
    from bingo.llm.checkpoint import char_tokenizer

    _, calibration, text = files
    chars = "".join(sorted(set(text)))
    make, needle = UNSUPPORTED[name]
    config = make(len(chars))
    directory = tmp_path / name
    transformers.utils.logging.disable_progress_bar()
    try:
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    finally:
        transformers.utils.logging.enable_progress_bar()
    char_tokenizer(chars).save_pretrained(directory)
    _refused(["--model-dir", str(directory), "--calibration", str(calibration), "--sparsity",
              "0.3", "--block", "32", "--out", str(tmp_path / "out")], needle)
    assert not (tmp_path / "out").exists()


def test_a_model_that_cannot_be_shrunk_is_refused_before_the_search(files, tmp_path,
                                                                   no_long_work, monkeypatch):
    """The trial shrink on a copy runs before the search: a module whose sizes bingo cannot
    update (here: any shrink fails) stops the command at once, not after the search."""
    import bingo.structure.shrink as shrink_module
    from bingo.errors import InputMismatchError

    def fails(*args, **kwargs):
        raise InputMismatchError("the shrunk model does not run (a hard-coded width)")

    monkeypatch.setattr(shrink_module, "shrink", fails)
    checkpoint, calibration, _ = files
    _refused(["--model-dir", str(checkpoint), "--calibration", str(calibration), "--sparsity",
              "0.3", "--block", "32", "--out", str(tmp_path / "out")],
             "architecture LlamaForCausalLM is not supported by bingo's structure layer: it "
             "cannot shrink the model (the shrunk model does not run (a hard-coded width))")
    assert not (tmp_path / "out").exists()


def test_heads_bingo_cannot_remove_are_named_and_neurons_still_pruned():
    """Bloom's ALiBi slopes depend on the head count, so its heads are not removable units; the
    check says so (and why) and lets the MLP neurons be pruned."""
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_config(transformers.BloomConfig(
        vocab_size=40, hidden_size=16, n_layer=2, n_head=2)).eval()
    with pytest.warns(UserWarning, match="BloomForCausalLM: no attention head is removable, "
                                         "only MLP neurons will be pruned.*fixed width"):
        structure = pipeline.check_architecture(model, torch.randint(0, 40, (1, 8)))
    assert {g.kind for g in structure.groups} == {"neurons"}


def test_python_api_checks_too(files, tmp_path, no_loading):
    from bingo.errors import InputMismatchError, InvalidOptionError

    checkpoint, calibration, _ = files
    with pytest.raises(InvalidOptionError, match="sparsity must lie in"):
        pipeline.prune_checkpoint(checkpoint, calibration, 1.0, tmp_path / "o")
    with pytest.raises(InvalidOptionError, match="evidence must be a positive"):
        pipeline.prune_checkpoint(checkpoint, calibration, 0.3, tmp_path / "o", evidence=0)
    with pytest.raises(InputMismatchError, match="does not exist"):
        pipeline.prune_checkpoint(checkpoint, tmp_path / "none.txt", 0.3, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, needle", [(["llm", "--help"], "prune"),
                                          (["llm", "prune", "--help"], "last 10%")])
def test_help(argv, needle):
    code, stdout, _ = _main(argv)
    assert code == 0 and needle in stdout
    assert "bench" in _main(["llm", "--help"])[1]


@pytest.mark.parametrize("argv, message", [
    (["llm"], "required: SUBCOMMAND"),
    (["llm", "prune", "--model-dir", "d", "--calibration", "c", "--out", "o"],
     "required: --sparsity"),
    (["llm", "prune", "--model-dir", "d", "--calibration", "c", "--out", "o", "--sparsity",
      "a lot"], "invalid float value"),
])
def test_usage_errors_exit_2(argv, message):
    code, _, stderr = _main(argv)
    assert code == 2 and message in stderr


def test_bench_forwards_to_the_compare_module(monkeypatch):
    compare = pytest.importorskip("bingo.llm.compare")
    seen = []

    def main(args):
        seen.append(args)
        return 7

    monkeypatch.setattr(compare, "main", main)
    assert cli.main(["llm", "bench"]) == 7
    assert seen and seen[0].subcommand == "bench"


def test_refit_chunks_change_memory_not_results():
    """bingo llm prune's refit runs recipe.REFIT_CHUNK_TOKENS tokens at a time: the refitted
    weights equal those of one chunk holding every window."""
    from bingo.structure import discover

    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    dense = transformers.LlamaForCausalLM(config).double().eval()
    ids = torch.randint(0, 40, (12, 17))
    calibration = (ids[:, :-1], ids[:, 1:])
    structure = discover(dense, {"input_ids": ids[:1, :-1]})
    generator = torch.Generator().manual_seed(seed)
    units = {g.key: torch.rand(g.num_units, generator=generator) > 0.3 for g in structure.groups}
    for keep in units.values():
        keep[0] = True  # a group must keep a unit
    assert recipe.least_squares_refit(calibration, progress=False).calibration.chunk == \
        recipe.REFIT_CHUNK_TOKENS // 16
    results, chunks = [], []
    for tokens in (16 * 5, 10**9):  # 5 windows a chunk (3 chunks), then one chunk of all 12
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(recipe, "REFIT_CHUNK_TOKENS", tokens)
            chunks.append(recipe.least_squares_refit(calibration, progress=False).calibration.chunk)
        model = copy.deepcopy(dense)
        bingo.refit(model, units, calibration, chunk=chunks[-1], progress=False)
        results.append(model.state_dict())
    assert chunks == [5, 10**9 // 16]
    assert any(not torch.equal(v, dense.state_dict()[n]) for n, v in results[0].items())
    for name, value in results[0].items():
        torch.testing.assert_close(value, results[1][name], rtol=1e-9, atol=1e-10,
                                   msg=f"seed {seed}: {name}")


def test_missing_transformers_is_one_line(files, tmp_path, no_loading, monkeypatch):
    """bingo's own install (the quick start's first line) has no transformers."""
    checkpoint, calibration, _ = files
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers: ImportError
    _refused(["--model-dir", str(checkpoint), "--calibration", str(calibration), "--sparsity",
              "0.3", "--out", str(tmp_path / "out")],
             "needs the transformers package", "pip install transformers")
