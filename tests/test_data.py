"""Tests for bingo.data: IDX parsing, MNIST lookup/checksums/download, digits, splits, loaders.

No test touches the network: urllib.request.urlopen is replaced for every test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from bingo import data
from bingo.data import (
    DATA_ENV_VAR,
    DataError,
    Splits,
    load_dataset,
    load_digits,
    load_mnist,
    make_loader,
    read_idx,
    split_dataset,
)
from bingo.errors import BingoError, InputMismatchError, InvalidOptionError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_MNIST = SHARED_DATA / "mnist"


class _NoNetwork(Exception):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Fail any download attempt; individual tests install their own fake urlopen."""
    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise _NoNetwork(f"network disabled in tests ({url})")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # bingo's default data dir
    return calls


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    """Encode an array as IDX (big-endian header and elements)."""
    dtype = data.IDX_DTYPES[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=dtype).tobytes()


def synthetic_mnist(n: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    return images, labels


def write_mnist(directory: Path, images, labels, split: str = "test", gz: bool = True) -> dict:
    """Write one split's two files; returns {filename: bytes written}."""
    files = data.MNIST_SPLITS[split]
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for base, array in ((files.images, images), (files.labels, labels)):
        payload = idx_bytes(array)
        name = base + (".gz" if gz else "")
        if gz:
            payload = gzip.compress(payload, mtime=0)
        (directory / name).write_bytes(payload)
        written[name] = payload
    return written


def trust(monkeypatch, written: dict) -> None:
    """Make the checksum table accept synthetic files (the real MD5s only fit the real files)."""
    table = dict(data.MNIST_MD5)
    table.update({name: hashlib.md5(b).hexdigest() for name, b in written.items()})
    monkeypatch.setattr(data, "MNIST_MD5", table)


# ---------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_roundtrip_uint8(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    payload = idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(payload) if gz else payload)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("code", [0x09, 0x0B, 0x0C, 0x0D, 0x0E])
def test_read_idx_big_endian_types(tmp_path, code):
    array = np.array([[1, -2, 300], [4, 5, -6]])
    if code == 0x09:
        array = np.array([[1, -2, 3], [4, 5, -6]])
    path = tmp_path / "t.idx"
    path.write_bytes(idx_bytes(array, code))
    out = read_idx(path)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_truncated_names_file(tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(idx_bytes(np.zeros((3, 4), np.uint8))[:-1])
    with pytest.raises(DataError, match="truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "long.idx"
    path.write_bytes(idx_bytes(np.zeros((3,), np.uint8)) + b"\x00")
    with pytest.raises(DataError, match="trailing"):
        read_idx(path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x00\x00", "header needs 4"),
        (b"\x01\x00\x08\x01" + b"\x00" * 8, "magic"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "type code 0x07"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "truncated IDX header"),
    ],
)
def test_read_idx_bad_header(tmp_path, payload, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_read_idx_truncated_gzip_names_file(tmp_path):
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8)))[:-10])
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, BingoError)


def test_read_idx_not_gzip(tmp_path):
    path = tmp_path / "fake.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match="fake.gz"):
        read_idx(path)


# ---------------------------------------------------------------- load_mnist on synthetic files


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("subfolder", [False, True])
def test_load_mnist_synthetic(tmp_path, monkeypatch, gz, subfolder):
    images, labels = synthetic_mnist()
    written = write_mnist(tmp_path / "mnist" if subfolder else tmp_path, images, labels, gz=gz)
    trust(monkeypatch, written)
    ds = load_mnist(tmp_path, download=False)
    x, y = ds.tensors
    assert x.dtype == torch.float32 and x.shape == (7, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (7,)
    torch.testing.assert_close(x[:, 0], torch.from_numpy(images).float() / 255)
    assert torch.equal(y, torch.from_numpy(labels).long())


def test_load_mnist_md5_mismatch_names_file_and_checksums(tmp_path):
    images, labels = synthetic_mnist()
    written = write_mnist(tmp_path, images, labels)
    name = data.MNIST_SPLITS["test"].images + ".gz"
    found = hashlib.md5(written[name]).hexdigest()
    with pytest.raises(DataError, match="MD5") as info:
        load_mnist(tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path / name) in msg
    assert data.MNIST_MD5[name] in msg and found in msg


def test_load_mnist_label_out_of_range(tmp_path, monkeypatch):
    images, labels = synthetic_mnist()
    labels[0] = 12
    trust(monkeypatch, write_mnist(tmp_path, images, labels))
    with pytest.raises(DataError, match="0..9"):
        load_mnist(tmp_path, download=False)


def test_load_mnist_count_mismatch(tmp_path, monkeypatch):
    images, labels = synthetic_mnist()
    trust(monkeypatch, write_mnist(tmp_path, images, labels[:5]))
    with pytest.raises(DataError, match="7 images but .* 5 labels"):
        load_mnist(tmp_path, download=False)


def test_load_mnist_wrong_image_shape(tmp_path, monkeypatch):
    _, labels = synthetic_mnist()
    trust(monkeypatch, write_mnist(tmp_path, np.zeros((7, 8, 8), np.uint8), labels))
    with pytest.raises(DataError, match=r"\(N, 28, 28\)"):
        load_mnist(tmp_path, download=False)


def test_load_mnist_truncated_file_names_it(tmp_path, monkeypatch):
    images, labels = synthetic_mnist()
    name = data.MNIST_SPLITS["test"].images + ".gz"
    written = write_mnist(tmp_path, images, labels)
    (tmp_path / name).write_bytes(written[name][:-20])
    written[name] = written[name][:-20]
    trust(monkeypatch, written)
    with pytest.raises(DataError, match=name):
        load_mnist(tmp_path, download=False)


def test_load_mnist_missing_dir_no_download(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_mnist(missing, download=False)
    msg = str(info.value)
    assert DATA_ENV_VAR in msg and str(missing) in msg and "does not exist" in msg


def test_load_mnist_no_dir_at_all():
    with pytest.raises(DataError, match=DATA_ENV_VAR):
        load_mnist()


def test_load_mnist_download_fails_cleanly(tmp_path, no_network):
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, download=True)
    msg = str(info.value)
    assert "download failed" in msg and DATA_ENV_VAR in msg and str(tmp_path) in msg
    assert len(no_network) == len(data.MNIST_MIRRORS)
    assert not list(tmp_path.rglob("*")) or all(p.is_dir() for p in tmp_path.rglob("*"))


def test_train_split_absent_gives_clear_error(tmp_path, monkeypatch):
    images, labels = synthetic_mnist()
    trust(monkeypatch, write_mnist(tmp_path, images, labels, split="test"))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, split="train", download=True)


def test_unknown_split():
    with pytest.raises(InvalidOptionError, match="'test'"):
        load_mnist(split="validation")


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_verifies_and_writes(tmp_path, monkeypatch):
    images, labels = synthetic_mnist()
    served = write_mnist(tmp_path / "server", images, labels)
    trust(monkeypatch, served)
    requested = []

    def fake_urlopen(url, timeout=None):
        requested.append((url, timeout))
        if url.startswith(data.MNIST_MIRRORS[0]):
            raise OSError("first mirror down")
        return _Response(served[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "root"
    ds = load_mnist(root, download=True)
    assert len(ds) == 7
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(served)
    assert all(t is not None and t <= 30 for _, t in requested)
    # Second call finds the files on disk and does not download again.
    n = len(requested)
    load_mnist(root, download=True)
    assert len(requested) == n


def test_download_md5_mismatch_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(b"junk"))
    with pytest.raises(DataError, match="MD5 mismatch") as info:
        load_mnist(tmp_path, download=True)
    assert data.MNIST_MD5["t10k-images-idx3-ubyte.gz"] in str(info.value)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_without_data_dir_mnist_is_downloaded_into_the_cache(tmp_path, monkeypatch):
    images, labels = synthetic_mnist()
    served = write_mnist(tmp_path / "server", images, labels)
    trust(monkeypatch, served)
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: _Response(served[url.rsplit("/", 1)[1]]))
    assert data.default_data_dir() == tmp_path / "cache" / "bingo"
    assert len(load_mnist()) == 7
    assert sorted(p.name for p in (tmp_path / "cache" / "bingo" / "mnist").iterdir()) == \
        sorted(served)


def test_without_data_dir_and_network_the_error_says_where_and_what_to_pass(tmp_path):
    with pytest.raises(DataError) as info:
        load_mnist()
    message = str(info.value)
    assert str(tmp_path / "cache" / "bingo") in message and "download failed" in message
    assert "data_dir=..." in message and DATA_ENV_VAR in message


@pytest.mark.parametrize("name", ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"])
def test_data_dir_may_name_one_of_the_mnist_files(tmp_path, monkeypatch, name):
    images, labels = synthetic_mnist()
    trust(monkeypatch, write_mnist(tmp_path / "mnist", images, labels))
    assert len(load_mnist(tmp_path / "mnist" / name, download=False)) == 7


def test_data_dir_naming_another_file_says_what_to_pass(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("")
    with pytest.raises(DataError) as info:
        load_mnist(other)
    assert str(info.value) == (f"data_dir={other} is a file, not a directory; pass the directory "
                               f"that holds the MNIST IDX files (such as {tmp_path})")


def test_command_line_errors_name_the_flag(tmp_path, capsys):
    from bingo import cli

    other = tmp_path / "notes.txt"
    other.write_text("")
    for data_dir in (other, tmp_path / "nowhere"):
        assert cli.main(["demo", "--dataset", "mnist", "--data-dir", str(data_dir), "--out",
                         str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bingo demo: error: ") and err.count("\n") == 1
        assert "--data-dir" in err and "data_dir" not in err


def test_bingo_data_env_var(tmp_path, monkeypatch):
    images, labels = synthetic_mnist()
    trust(monkeypatch, write_mnist(tmp_path / "mnist", images, labels))
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    assert len(load_mnist(download=False)) == 7
    assert len(load_dataset("mnist")) == 7


# ---------------------------------------------------------------- real MNIST (shared data)

needs_shared_mnist = pytest.mark.skipif(
    not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"shared MNIST test split not found at {SHARED_MNIST}",
)


@needs_shared_mnist
def test_real_mnist_test_split():
    x, y = load_mnist(SHARED_DATA, split="test", download=False).tensors
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert 0.1 < float(x.mean()) < 0.2  # MNIST mean intensity is about 0.13
    assert torch.bincount(y, minlength=10).min() > 800  # every class present in quantity


@needs_shared_mnist
def test_real_mnist_via_env_and_mnist_folder(monkeypatch):
    monkeypatch.setenv(DATA_ENV_VAR, str(SHARED_DATA))
    assert len(load_dataset("mnist")) == 10_000
    assert len(load_mnist(SHARED_MNIST, download=False)) == 10_000


@needs_shared_mnist
def test_real_mnist_train_split_absent_is_clear(no_network):
    if (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("the 60k train split is present here")
    # The autouse fixture refuses the network, so nothing is written to the shared folder.
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*download failed"):
        load_mnist(SHARED_DATA, split="train", download=True)
    with pytest.raises(DataError, match="download=False"):
        load_mnist(SHARED_DATA, split="train", download=False)


# ---------------------------------------------------------------- digits and registry


def test_digits():
    x, y = load_digits().tensors
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))


def test_load_dataset_registry():
    assert set(data.DATASETS) == {"digits", "mnist"}
    assert len(load_dataset("digits")) == 1797
    with pytest.raises(InvalidOptionError, match="'digits'.*'mnist'"):
        load_dataset("cifar10")


# ---------------------------------------------------------------- splits and loaders


def _indexed(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n), torch.arange(n) % 10)


def test_split_deterministic_disjoint_covering():
    ds = _indexed(1000)
    a = split_dataset(ds, seed=0)
    b = split_dataset(ds, seed=0)
    c = split_dataset(ds, seed=1)
    assert isinstance(a, Splits)
    assert (len(a.train), len(a.val), len(a.test)) == (600, 200, 200)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part).tensors[0], getattr(b, part).tensors[0])
        assert torch.equal(getattr(a, part).tensors[0], a.indices[part])
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    rows = torch.cat([a.train.tensors[0], a.val.tensors[0], a.test.tensors[0]])
    assert torch.equal(rows.sort().values, torch.arange(1000))
    # Labels stay paired with their rows.
    assert torch.equal(a.val.tensors[1], a.val.tensors[0] % 10)


def test_split_sizes_add_up():
    s = split_dataset(_indexed(1797))
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert len(s.train) == 1078


@pytest.mark.parametrize(
    "fractions", [(0.5, 0.5), (0.7, 0.2, 0.2), (0.8, 0.3, -0.1), (1.0, 0.0, 0.0)]
)
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(InvalidOptionError, match="fractions"):
        split_dataset(_indexed(10), fractions)


def test_split_rejects_empty_subset_and_non_tensor_dataset():
    with pytest.raises(InputMismatchError, match="empty"):
        split_dataset(_indexed(2))
    with pytest.raises(InputMismatchError, match="TensorDataset"):
        split_dataset(list(range(10)))


def _order(loader) -> list[int]:
    return torch.cat([batch[0] for batch in loader]).tolist()


def test_make_loader_reproducible():
    ds = _indexed(50)
    one, two = make_loader(ds, 8, seed=3), make_loader(ds, 8, seed=3)
    first = _order(one)
    assert first == _order(two)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert _order(one) == _order(two)  # second epochs match too
    assert _order(make_loader(ds, 8, seed=4)) != first
    assert _order(make_loader(ds, 8, shuffle=False)) == list(range(50))
    assert len(make_loader(ds, 8, drop_last=True)) == 6


def test_make_loader_rejects_bad_batch_size():
    with pytest.raises(InvalidOptionError, match="batch_size"):
        make_loader(_indexed(4), 0)
