"""Reading and writing artifacts: atomic writes, weights-only checkpoint loading, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import SnnCompressError, first_line

CKPT_FORMAT = "snncompress.ckpt/1"
SLIM_FORMAT = "snncompress.slim/1"
FORMATS = (CKPT_FORMAT, SLIM_FORMAT)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    A failure (or a kill) leaves the previous file, if any, untouched. A failure leaves no partial file
    behind; a SIGKILL skips the clean-up and leaves the hidden temporary (``.NAME.XXXXXXXX.tmp``), which
    :func:`remove_temporaries` deletes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:  # disk full, quota, permissions: the previous file is still in place
        raise _write_failed(path, e.strerror or str(e)) from e
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_temporaries(directory: str | os.PathLike) -> None:
    """Delete the temporaries of :func:`atomic_path` that killed writes left in ``directory``."""
    for tmp in Path(directory).glob(".*.tmp"):
        if re.fullmatch(r"\..+\.[A-Za-z0-9_]{8}\.tmp", tmp.name):  # mkstemp's 8 random characters
            tmp.unlink(missing_ok=True)


def _write_failed(path: Path, reason: str) -> SnnCompressError:
    if shutil.disk_usage(path.parent).free < (1 << 20):
        reason = "no space left on device"
    kept = "the previous version is unchanged" if path.exists() else "nothing was written"
    return SnnCompressError(f"{path}: could not write it ({reason}); {kept}")


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch reports a failed write (e.g. a full disk) as RuntimeError
            raise OSError(first_line(e, typed=False)) from e


def write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    write_text(json.dumps(obj, indent=2) + "\n", path)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def exported_from(path: Path, source: Path, read_metadata: Callable[[Path], dict[str, str]]) -> bool:
    """Whether ``path`` is an snncompress export of exactly ``source`` (by the ``source_sha256`` its metadata
    holds; ``read_metadata`` refuses a foreign or unreadable file). False for a missing, foreign or unreadable
    file, or one exported from something else: a run then exports it again."""
    if not path.exists():
        return False
    try:
        return read_metadata(path).get("source_sha256") == sha256(source)
    except SnnCompressError:
        return False


def read_torch_file(path: str | os.PathLike, what: str = "PyTorch checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors that name ``path``.

    Only tensors and plain containers are read: a file holding any other pickled object is refused
    without executing it.
    """
    path = Path(path)
    if not path.is_file():
        raise SnnCompressError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a pickled class or function (other failures: not a torch file)
            raise SnnCompressError(
                f"{path}: refused: the file holds pickled Python objects, not only tensors and "
                "plain containers (it was not executed)"
            ) from e
        raise SnnCompressError(f"{path}: not a {what} (unreadable: {type(e).__name__})") from e
    except Exception as e:  # torch.load on a text file, a truncated zip, ... raises many types
        raise SnnCompressError(f"{path}: not a {what} (unreadable: {type(e).__name__})") from e


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load an snncompress checkpoint (``ckpt.pt``/``best.pt``/``slim.pt``) safely (:func:`read_torch_file`)."""
    path = Path(path)
    if not path.is_file():
        raise SnnCompressError(f"{path}: no such checkpoint file")
    ckpt = read_torch_file(path)
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if isinstance(found, str) and found.startswith("snncompress.") and found not in FORMATS:
        raise SnnCompressError(f"{path}: checkpoint format {found!r} is not supported by this version "
                               f"(supported: {', '.join(FORMATS)})")
    if found not in FORMATS:
        found = found if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SnnCompressError(
            f"{path}: not an snncompress checkpoint (format {found!r}; expected one of {', '.join(FORMATS)})"
        )
    for key in ("recipe", "model", "state_dict", "masks", "data"):
        if key not in ckpt:
            raise SnnCompressError(f"{path}: checkpoint is missing the '{key}' entry")
    return ckpt
