"""Output directories of the ``bingo`` commands: checked before any work, filled as work finishes.

:func:`prepare_output_dir` creates the directory and proves it writable before a run starts, so
a bad ``--out`` costs seconds, not a whole run. :class:`RunDirectory` adds what a long run
needs: every finished piece (a seed, a method) is written at once as its own JSON file under
``parts/``, so an interrupted run keeps what finished, and rerunning the same command with the
same output directory skips it. ``run.json`` records the configuration; a rerun with another
configuration is refused while pieces of the first are there, so results of two configurations
are never mixed.

Torch-free, so that the command line can check ``--out`` before importing torch.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

MANIFEST = "run.json"
"""The run's configuration, written when the directory is first used."""
PARTS = "parts"
"""Subdirectory of the finished pieces, one JSON file each."""


def _invalid(message: str) -> Exception:
    from bingo.errors import InvalidOptionError  # imports torch: only on the error path

    return InvalidOptionError(message)


def prepare_output_dir(path: str | os.PathLike, option: str = "out") -> Path:
    """Create directory ``path`` (with its parents) and check that files can be written there.

    Raises InvalidOptionError, naming ``option`` and the reason (a file is in the way, no
    permission, a read-only or virtual file system), before any work is done.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise _invalid(f"{option}={out} is a file, not a directory; pass a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".bingo-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise _invalid(f"{option}={out} cannot be used as the output directory: {reason}"
                       f"{f' ({exc.filename})' if exc.filename else ''}") from None
    return out


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically: a reader (or a crash) never sees half a
    file."""
    partial = path.with_name(path.name + ".part")
    with open(partial, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(partial, path)


class RunDirectory:
    """An output directory that a long run fills piece by piece and can resume.

    Args:
        path: the directory (created and checked by :func:`prepare_output_dir`).
        config: the run's configuration as JSON types; it identifies the run.
        ignore: configuration keys that may differ between the runs of one directory (where the
            output goes, progress bars, ...).
        option: how the user named ``path`` (``"out"``; the CLI shows ``--out``).
    """

    def __init__(self, path: str | os.PathLike, config: dict, *, ignore: Iterable[str] = (),
                 option: str = "out"):
        self.path = prepare_output_dir(path, option)
        self.parts = self.path / PARTS
        config = json.loads(json.dumps(config, default=list))  # tuples as the file has them
        ignored = set(ignore)
        identity = {k: v for k, v in config.items() if k not in ignored}
        self.config = config
        manifest = self.path / MANIFEST
        if manifest.exists() and self._saved():
            try:
                recorded = json.loads(manifest.read_text())["config"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise _invalid(f"{option}={self.path} holds an unreadable {MANIFEST} ({exc}); "
                               "delete it or pass another directory") from None
            recorded = {k: v for k, v in recorded.items() if k not in ignored}
            if recorded != identity:
                changed = sorted(k for k in {*recorded, *identity}
                                 if recorded.get(k) != identity.get(k))
                shown = "; ".join(f"{k}: {_short(identity.get(k))} now, "
                                  f"{_short(recorded.get(k))} there" for k in changed[:4])
                raise _invalid(f"{option}={self.path} holds a run with another configuration "
                               f"({shown}{'; ...' if len(changed) > 4 else ''}); pass another "
                               f"directory, or delete this one to start over")

    def _saved(self) -> list[Path]:
        return sorted(self.parts.glob("*.json")) if self.parts.is_dir() else []

    def finished(self, name: str) -> Optional[dict]:
        """The saved piece ``name``, or None if it has not finished yet."""
        path = self.parts / f"{name}.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError:  # cannot be half-written (atomic); a damaged file is redone
            return None

    def _claim(self) -> None:
        """Record the run's configuration in ``run.json`` before its first piece is written (a
        run that failed before finishing anything claims no directory)."""
        if not self._saved():
            self.parts.mkdir(exist_ok=True)
            write_json(self.path / MANIFEST, {"config": self.config})

    def file(self, name: str) -> Path:
        """Path under ``parts/`` for a piece the caller writes itself (a torch checkpoint);
        write it before the JSON piece that says it is finished."""
        self._claim()
        return self.parts / name

    def save(self, name: str, data: Any) -> Path:
        """Write the finished piece ``name`` (atomically)."""
        self._claim()
        path = self.parts / f"{name}.json"
        write_json(path, data)
        return path

    def piece(self, name: str, compute: Callable[[], Any],
              say: Optional[Callable[[str], None]] = None) -> Any:
        """Piece ``name``: loaded if an earlier run finished it (saying so), else computed and
        saved before it is returned."""
        done = self.finished(name)
        if done is not None:
            (say or note)(f"{name}: finished in an earlier run, kept "
                          f"({self.parts / (name + '.json')})")
            return done
        data = compute()
        self.save(name, data)
        return data


def note(message: str) -> None:
    """Print a line for the user on stderr, above any progress bars."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
