"""Datasets for the experiments: MNIST from IDX files, scikit-learn's 8x8 digits, splits, loaders.

Every loader returns a :class:`torch.utils.data.TensorDataset` of ``(images, labels)`` with
images ``float32`` of shape ``(N, 1, H, W)`` in ``[0, 1]`` and labels ``int64`` of shape ``(N,)``.

MNIST is looked up on disk first (the ``data_dir`` argument, else the ``BINGO_DATA``
environment variable, else bingo's cache directory ``~/.cache/bingo``) and downloaded into that
directory where missing, checked against the official MD5 checksums. The shared machines hold only the 10k
official *test* split, so the experiments split those 10k images (see :func:`split_dataset`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from bingo.errors import BingoError, InputMismatchError, InvalidOptionError, require_option

__all__ = [
    "DATASETS",
    "DATA_ENV_VAR",
    "DataError",
    "DatasetSpec",
    "MNIST_MD5",
    "MNIST_MIRRORS",
    "MNIST_SPLITS",
    "MnistSplitFiles",
    "Splits",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "load_tinyshakespeare",
    "make_loader",
    "read_idx",
    "split_dataset",
]


class DataError(BingoError, RuntimeError):
    """A dataset file is missing, corrupt, fails its checksum, or could not be downloaded."""


DATA_ENV_VAR = "BINGO_DATA"
"""Environment variable naming the data directory when no ``data_dir`` is passed."""

DOWNLOAD_TIMEOUT_S = 10.0
"""Per-request timeout; short so a machine without network fails fast instead of hanging."""


# --------------------------------------------------------------------------------------------
# IDX format
# --------------------------------------------------------------------------------------------

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX type code (third magic byte) -> element dtype; multi-byte types are big-endian."""


def _read_bytes(path: Path) -> bytes:
    """Whole file content, gunzipped when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        # gzip reports truncation as EOFError and bad streams as BadGzipFile/zlib.error;
        # callers only need to know which file is broken.
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an uncompressed IDX blob into an array; ``source`` names it in error messages.

    Layout: two zero bytes, a type code (see :data:`IDX_DTYPES`), the number of dimensions,
    one big-endian uint32 per dimension, then the elements in C order.
    """
    if len(raw) < 4:
        raise DataError(f"{source}: not an IDX file (only {len(raw)} bytes, the header needs 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(
            f"{source}: not an IDX file (magic starts with {raw[:2].hex()}, expected 0000)"
        )
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise DataError(f"{source}: unknown IDX type code 0x{code:02x}; known codes: {known}")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(
            f"{source}: truncated IDX header ({len(raw)} bytes; {ndim} dimensions need "
            f"{header_len})"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_len
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataError(
            f"{source}: IDX data {what}: shape {dims} of {dtype} needs {expected} bytes, "
            f"found {found}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    # Native byte order and a writable copy, so torch.from_numpy accepts it.
    return data.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or ``.gz``) into a numpy array; errors name the file."""
    path = Path(path)
    return parse_idx(_read_bytes(path), source=str(path))


# --------------------------------------------------------------------------------------------
# MNIST files, checksums, mirrors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MnistSplitFiles:
    """The two IDX files of one official MNIST split."""

    images: str = field(metadata={"doc": "base name of the image file, without .gz"})
    labels: str = field(metadata={"doc": "base name of the label file, without .gz"})
    size: int = field(metadata={"doc": "number of samples in the official files"})


MNIST_SPLITS: dict[str, MnistSplitFiles] = {
    "train": MnistSplitFiles("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": MnistSplitFiles("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}

MNIST_FILES: tuple[str, ...] = tuple(
    name + suffix for split in MNIST_SPLITS.values() for name in (split.images, split.labels)
    for suffix in (".gz", ""))
"""Every file name an MNIST directory may hold."""

MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
"""Official MD5s of the canonical ``.gz`` files. They say nothing about an uncompressed copy,
so uncompressed files are only checked structurally (header, sizes, label range)."""

MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
"""Tried in order; the original yann.lecun.com site is left out because it often refuses bots."""

MNIST_IMAGE_SIDE = 28


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _verify_md5(path: Path) -> None:
    """Check a canonical ``.gz`` file against :data:`MNIST_MD5`; other names pass unchecked."""
    expected = MNIST_MD5.get(path.name)
    if expected is None:
        return
    found = _md5(path.read_bytes())
    if found != expected:
        raise DataError(
            f"{path}: MD5 checksum mismatch (expected {expected}, found {found}); the file is "
            f"corrupt or not the official MNIST file; delete it to re-download"
        )


def default_data_dir() -> Path:
    """Where data goes when neither ``data_dir`` nor ``$BINGO_DATA`` says: bingo's cache
    directory, ``$XDG_CACHE_HOME/bingo`` (default ``~/.cache/bingo``)."""
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(cache).expanduser() / "bingo"


def _resolve_root(data_dir: str | os.PathLike | None, files: tuple[str, ...], what: str
                  ) -> tuple[Path, str]:
    """The data root and a phrase saying where it came from (for error messages).

    ``data_dir`` may also name one of the dataset's own ``files`` (``t10k-images-idx3-ubyte.gz``):
    its folder is the root then. Any other file is refused, saying what to pass instead.
    """
    if data_dir is not None:
        root, origin = Path(data_dir).expanduser(), f"data_dir={data_dir}"
    elif os.environ.get(DATA_ENV_VAR, "").strip():
        root, origin = Path(os.environ[DATA_ENV_VAR].strip()).expanduser(), f"${DATA_ENV_VAR}"
    else:
        return default_data_dir(), (f"the default, bingo's cache directory, as neither "
                                    f"data_dir=... nor ${DATA_ENV_VAR} is set")
    if root.is_file():
        if root.name in files:
            return root.parent, f"{origin}, the folder of that file"
        raise DataError(f"{origin} is a file, not a directory; pass the directory that holds "
                        f"the {what} files (such as {root.parent})")
    return root, origin


def _search_dirs(root: Path) -> list[Path]:
    # The root may hold the IDX files itself or be the shared data root with an mnist/ folder.
    return [root, root / "mnist"]


def _find(root: Path, base: str) -> tuple[Path | None, list[Path]]:
    """First existing ``base.gz`` or ``base`` under the search dirs, and every path tried."""
    tried = []
    for directory in _search_dirs(root):
        for name in (base + ".gz", base):
            candidate = directory / name
            tried.append(candidate)
            if candidate.is_file():
                return candidate, tried
    return None, tried


def _download_dir(root: Path) -> Path:
    """Where missing files go: next to MNIST files already present, else ``root/mnist``."""
    if root.name.lower() == "mnist":
        return root
    if any((root / n).is_file() for s in MNIST_SPLITS.values() for n in _names(s)):
        return root
    return root / "mnist"


def _names(split: MnistSplitFiles) -> list[str]:
    return [split.images, split.images + ".gz", split.labels, split.labels + ".gz"]


def _download(filename: str, dest_dir: Path) -> tuple[Path | None, list[str]]:
    """Fetch ``filename`` from the mirrors into ``dest_dir``; returns the path or the failures."""
    failures = []
    expected = MNIST_MD5.get(filename)
    for mirror in MNIST_MIRRORS:
        url = mirror + filename
        try:
            # Looked up at call time so tests can monkeypatch urllib.request.urlopen.
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
                payload = response.read()
        except Exception as exc:  # noqa: BLE001 - any network failure means "try the next one"
            reason = getattr(exc, "reason", None) or exc  # URLError wraps the socket error
            failures.append(f"{urllib.parse.urlsplit(url).netloc}: "
                            f"{getattr(reason, 'strerror', None) or reason}")
            continue
        found = _md5(payload)
        if expected is not None and found != expected:
            failures.append(f"{url}: MD5 mismatch (expected {expected}, found {found})")
            continue
        dest = dest_dir / filename
        partial = dest.with_name(dest.name + ".part")
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            partial.write_bytes(payload)
            # Atomic rename so an interrupted run never leaves a half-written canonical file.
            os.replace(partial, dest)
        except OSError as exc:
            failures.append(f"{url}: downloaded but cannot write {dest}: {exc}")
            continue
        return dest, failures
    return None, failures


def _locate(base: str, root: Path, origin: str, download: bool) -> Path:
    """Path of one MNIST file, downloading it if allowed; a clear DataError otherwise."""
    found, _ = _find(root, base)
    if found is not None:
        _verify_md5(found)
        return found
    missing = (f"MNIST file {base}[.gz] is neither in {root} nor in its mnist/ folder "
               f"({origin}{'; the directory does not exist' if not root.is_dir() else ''})")
    hint = (f"put the MNIST IDX files in a directory and pass it as data_dir=... or set "
            f"{DATA_ENV_VAR}=/path/to/data (the directory itself or its mnist/ folder is "
            f"searched)")
    if not download:
        raise DataError(f"{missing}, and download=False; {hint}")
    dest, failures = _download(base + ".gz", _download_dir(root))
    if dest is None:
        raise DataError(f"{missing}, and the download failed ({'; '.join(failures)}); {hint}")
    return dest


def load_mnist(
    data_dir: str | os.PathLike | None = None, split: str = "test", download: bool = True
) -> TensorDataset:
    """Load one official MNIST split from its IDX files.

    Args:
        data_dir: directory holding the IDX files, or a root holding an ``mnist/`` subfolder.
            Defaults to ``$BINGO_DATA``.
        split: ``"test"`` (10k images) or ``"train"`` (60k images).
        download: fetch missing files from :data:`MNIST_MIRRORS` into the data directory
            (``root/mnist`` unless MNIST files already sit in ``root``).

    Returns:
        ``TensorDataset(images, labels)``: float32 ``(N, 1, 28, 28)`` in ``[0, 1]`` and
        int64 ``(N,)``.

    Raises:
        InvalidOptionError: unknown ``split``.
        DataError: files missing and not downloadable, checksum mismatch, or corrupt content.
    """
    require_option("split", split, MNIST_SPLITS)
    files = MNIST_SPLITS[split]
    root, origin = _resolve_root(data_dir, MNIST_FILES, "MNIST IDX")
    image_path = _locate(files.images, root, origin, download)
    label_path = _locate(files.labels, root, origin, download)
    images = read_idx(image_path)
    labels = read_idx(label_path)

    side = MNIST_IMAGE_SIDE
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (side, side):
        raise DataError(
            f"{image_path}: expected uint8 images of shape (N, {side}, {side}), "
            f"found {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{label_path}: expected uint8 labels of shape (N,), "
            f"found {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{label_path}: labels must be 0..9, found {int(labels.max())}")

    x = torch.from_numpy(images).to(torch.float32).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels).to(torch.int64)
    return TensorDataset(x, y)


# --------------------------------------------------------------------------------------------
# Tiny Shakespeare (character-level language modelling)
# --------------------------------------------------------------------------------------------

TINYSHAKESPEARE_FILE = "input.txt"
TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"
"""MD5 of the canonical 1,115,394-byte file (checked on download and on load)."""


def load_tinyshakespeare(data_dir: str | os.PathLike | None = None, download: bool = True) -> str:
    """The Tiny Shakespeare corpus (Karpathy's char-rnn) as one string.

    Looked up as ``input.txt`` in ``data_dir`` (else ``$BINGO_DATA``) or its ``tinyshakespeare/``
    subfolder; downloaded from :data:`TINYSHAKESPEARE_URL` into ``root/tinyshakespeare`` when
    missing and ``download`` is set. A file whose MD5 differs raises DataError.
    """
    root, origin = _resolve_root(data_dir, (TINYSHAKESPEARE_FILE,), "Tiny Shakespeare")
    hint = (f"put tinyshakespeare's {TINYSHAKESPEARE_FILE} in a directory (or its tinyshakespeare/ "
            f"subfolder) and pass it as data_dir=..., or set {DATA_ENV_VAR}")
    tried = [root / TINYSHAKESPEARE_FILE, root / "tinyshakespeare" / TINYSHAKESPEARE_FILE]
    path = next((p for p in tried if p.is_file()), None)
    if path is None:
        if not download:
            raise DataError(f"Tiny Shakespeare not found (data dir {root} from {origin}); looked "
                            f"at {', '.join(map(str, tried))}; download=False; {hint}")
        path = tried[1]
        try:
            with urllib.request.urlopen(TINYSHAKESPEARE_URL, timeout=DOWNLOAD_TIMEOUT_S) as r:
                payload = r.read()
        except Exception as exc:  # noqa: BLE001 - any network failure is reported the same way
            raise DataError(f"Tiny Shakespeare not found under {root} ({origin}) and the "
                            f"download from {TINYSHAKESPEARE_URL} failed: {exc}; {hint}") from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        partial.write_bytes(payload)
        os.replace(partial, path)
    raw = _read_bytes(path)
    found = _md5(raw)
    if found != TINYSHAKESPEARE_MD5:
        raise DataError(f"{path}: MD5 checksum mismatch (expected {TINYSHAKESPEARE_MD5}, found "
                        f"{found}); the file is corrupt or not Tiny Shakespeare")
    return raw.decode("utf-8")


# --------------------------------------------------------------------------------------------
# Embedded default: scikit-learn digits
# --------------------------------------------------------------------------------------------


def load_digits() -> TensorDataset:
    """scikit-learn's bundled 8x8 digits: 1797 samples, float32 ``(N, 1, 8, 8)`` in [0, 1].

    Labels are int64 0..9. Ships with scikit-learn, so it works offline; pixel values 0..16 are
    divided by 16.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # slow import; only when used

    bunch = _sk_load_digits()
    x = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return TensorDataset(x, y)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: how to load it and the input shape models must accept."""

    loader: Callable[[str | os.PathLike | None], TensorDataset] = field(
        metadata={"doc": "called with data_dir (None: the loader's default)"}
    )
    in_channels: int = field(metadata={"doc": "image channels"})
    image_size: int = field(metadata={"doc": "image height = width in pixels"})
    num_classes: int = field(metadata={"doc": "number of label values"})
    description: str = field(default="", metadata={"doc": "one line for help texts"})

    @property
    def in_features(self) -> int:
        """Flattened input size, for MLPs."""
        return self.in_channels * self.image_size * self.image_size


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        loader=lambda data_dir=None: load_digits(),
        in_channels=1,
        image_size=8,
        num_classes=10,
        description="scikit-learn 8x8 digits, 1797 samples, bundled (no download)",
    ),
    "mnist": DatasetSpec(
        # The official test split: it is the one present on the shared machines.
        loader=lambda data_dir=None: load_mnist(data_dir, split="test"),
        in_channels=1,
        image_size=MNIST_IMAGE_SIDE,
        num_classes=10,
        description="MNIST official 10k test split (IDX files from data_dir, $BINGO_DATA or the "
                    "cache directory; downloaded when missing)",
    ),
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> TensorDataset:
    """Load a dataset of :data:`DATASETS` by name (``"mnist"``: the 10k official test split)."""
    require_option("dataset", name, DATASETS)
    return DATASETS[name].loader(data_dir)


# --------------------------------------------------------------------------------------------
# Splits and loaders
# --------------------------------------------------------------------------------------------


@dataclass
class Splits:
    """Disjoint train/val/test subsets of one dataset."""

    train: TensorDataset = field(metadata={"doc": "training subset"})
    val: TensorDataset = field(metadata={"doc": "validation subset (model and ticket selection)"})
    test: TensorDataset = field(metadata={"doc": "held-out subset, reported once"})
    indices: dict[str, torch.Tensor] = field(
        default_factory=dict,
        metadata={"doc": "'train'/'val'/'test' -> row indices into the source dataset"},
    )


def split_dataset(
    dataset: TensorDataset, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> Splits:
    """Split ``dataset`` into train/val/test by a seeded random permutation.

    Sizes: the cumulative fractions are rounded to row counts, so they add up to ``len(dataset)``
    exactly. The same dataset, fractions and seed give the same split on every machine.

    On these machines MNIST is the 10k official *test* images only (the 60k training files are
    not available): ``bingo demo --dataset mnist`` splits them 60/20/20 (6000/2000/2000), and
    ``bingo experiment`` sets the last sixth of this train part aside as a held-out search set
    (:mod:`bingo.experiment.splits`). Results are therefore not directly comparable to numbers
    trained on the 60k set.

    Raises:
        InputMismatchError: not a TensorDataset, or a subset would be empty.
        InvalidOptionError: fractions not three positive numbers summing to 1 (within 1e-6).
    """
    if not isinstance(dataset, TensorDataset):
        raise InputMismatchError(
            f"split_dataset needs a TensorDataset, got {type(dataset).__name__}"
        )
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or any(not f > 0 for f in fractions):
        raise InvalidOptionError(
            f"fractions must be three positive numbers (train, val, test), got {fractions}"
        )
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise InvalidOptionError(
            f"fractions must sum to 1, got {fractions} (sum {sum(fractions)})"
        )

    n = len(dataset)
    cut1 = round(fractions[0] * n)
    cut2 = round((fractions[0] + fractions[1]) * n)
    sizes = {"train": cut1, "val": cut2 - cut1, "test": n - cut2}
    if min(sizes.values()) <= 0:
        raise InputMismatchError(
            f"splitting {n} samples by {fractions} leaves an empty subset: {sizes}"
        )

    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    indices = {"train": perm[:cut1], "val": perm[cut1:cut2], "test": perm[cut2:]}
    subsets = {k: TensorDataset(*(t[idx] for t in dataset.tensors)) for k, idx in indices.items()}
    return Splits(**subsets, indices=indices)


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A single-process DataLoader whose shuffle order is fixed by ``seed``.

    Two loaders built with the same seed yield the same batches epoch after epoch; each
    loader's own epochs still differ from one another.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidOptionError(f"batch_size must be a positive integer, got {batch_size!r}")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator
    )
