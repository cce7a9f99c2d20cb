"""Reading and writing artifacts: atomic writes, weights-only checkpoint loading, hashes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .config import parse_recipe
from .errors import RecipeError, SnnCompressError, first_line

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
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it 0600: the artifact gets the user's usual mode
        os.replace(tmp_path, path)
    except OSError as e:  # disk full, quota, permissions: the previous file is still in place
        raise _write_failed(path, e.strerror or str(e)) from e
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask (read from /proc where there is one: setting it to read it is a global change)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output(path: str | os.PathLike, directory: bool, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse, before any work, an output that cannot be written: a directory output that is a file, a file output
    that is a directory, a path under a file or in an unwritable place, or one that is also an input (writing it
    would replace the input). Returns the path."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise SnnCompressError(f"{path}: is a file; the output must be a directory")
    if not directory and path.is_dir():
        raise SnnCompressError(f"{path}: is a directory; the output must be a file path")
    for source in inputs:
        if Path(source).exists() and path.exists() and path.samefile(source) or \
                Path(source).resolve() == path.resolve():
            raise SnnCompressError(f"{path}: is also the input {source}; writing it would replace the input, so "
                                   "choose another output")
    parent = path if directory else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SnnCompressError(f"{path}: {parent} is a file, so nothing can be written under it")
    try:  # permissions, a read-only filesystem, a special one such as /proc: whatever would stop the write
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise SnnCompressError(f"{path}: cannot write in {parent} ({e.strerror or e})") from e
    return path


@contextmanager
def locked(directory: str | os.PathLike) -> Iterator[None]:
    """Hold a lock on ``directory`` (created if missing) for the block: a second process that would write the same
    directory is refused in one line instead of mixing its files into it. The lock is on the directory itself
    (``flock``), so nothing is left in it; it ends with the process, however that ends."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SnnCompressError(f"{directory}: another snncompress process is writing it; wait for it to finish "
                                   "or choose another output directory") from None
        yield
    finally:
        os.close(fd)  # releases the lock


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
    problem = _zip_problem(path)
    if problem:
        raise SnnCompressError(f"{path}: refused: {problem} (it was not read)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler refused a pickled class or function (its wording varies with the
        # version and the global); any other unpickling failure: not a torch file
        if re.search(r"unsupported global", str(e), re.IGNORECASE):
            raise SnnCompressError(
                f"{path}: refused: the file holds pickled Python objects, not only tensors and "
                "plain containers (it was not executed)"
            ) from e
        raise SnnCompressError(f"{path}: not a {what} (unreadable: {type(e).__name__})") from e
    except Exception as e:  # torch.load on a text file, a truncated zip, ... raises many types
        raise SnnCompressError(f"{path}: not a {what} (unreadable: {type(e).__name__})") from e


def _zip_problem(path: Path) -> str | None:
    """What makes a torch zip file unsafe to inflate (None if nothing). ``torch.save`` stores its records
    uncompressed, so records that decompress to much more than the file's size are a zip bomb: refused before
    ``torch.load`` allocates them."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            legacy = f.read(1) == b"\x80"  # a bare pickle: torch's format before 1.6
        if legacy:  # whose storages are allocated at the sizes the file claims, before anything is read
            return "torch's legacy format (before torch 1.6); save it again with a current torch.save"
        return None  # not a torch file: torch.load says so
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            declared = sum(info.file_size for info in z.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return None  # torch.load reports a damaged file
    if declared > 2 * size + (1 << 20):
        return (f"its zip records decompress to {declared:,} bytes from a {size:,}-byte file (torch.save writes "
                "them uncompressed)")
    return None


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
    problem = checkpoint_problem(ckpt)
    if problem:
        raise SnnCompressError(f"{path}: {problem}")
    try:
        recipe = parse_recipe(ckpt["recipe"], "recipe")
    except RecipeError as e:  # the file's fault, not the command line's: exit 1, naming the file
        raise SnnCompressError(f"{path}: its {e}") from e
    if (ckpt["data"]["T"], ckpt["data"]["encoding"]) != (recipe.data.T, recipe.data.encoding):
        raise SnnCompressError(f"{path}: data.T and data.encoding ({ckpt['data']['T']}, {ckpt['data']['encoding']}) "
                               f"differ from its recipe's ({recipe.data.T}, {recipe.data.encoding})")
    return ckpt


MAX_INPUT_ELEMENTS = 1 << 26  # one sample over all time steps: a 64 MiB float tensor, far above any dataset's


def _is_int(v: object, lo: int = 0) -> bool:
    return type(v) is int and v >= lo


def _is_number(v: object) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _masks_problem(masks: object, what: str) -> str | None:
    if not isinstance(masks, dict) or not all(
            isinstance(k, str) and torch.is_tensor(m) and m.dtype == torch.bool and m.dim() == 1 and m.numel() > 0
            for k, m in masks.items()):
        return f"{what} must map channel group names to non-empty 1-D bool tensors"
    return None


def checkpoint_problem(ckpt: dict) -> str | None:
    """What makes a checkpoint's fields unusable (None if nothing): each field every stage reads is checked for
    its type and range here, so a damaged or hostile file is refused in one line before any work."""
    if not isinstance(ckpt["recipe"], dict):
        return "recipe must be a mapping"
    spec = ckpt["model"]
    if not (isinstance(spec, dict) and isinstance(spec.get("kwargs"), dict)
            and isinstance(spec.get("name", spec.get("factory")), str)):
        return f"model must be {{name or factory, kwargs}}, got {spec!r:.80}"
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        return "state_dict must map tensor names (strings) to tensors"
    problem = _masks_problem(ckpt["masks"], "masks")
    if problem:
        return problem
    data = ckpt["data"]
    if not isinstance(data, dict):
        return "data must be a mapping (T, encoding, input_shape, classes, ...)"
    shape, classes = data.get("input_shape"), data.get("classes")
    if not (_is_int(data.get("T"), 1) and isinstance(shape, list) and len(shape) == 3
            and all(_is_int(v, 1) for v in shape) and data["T"] * math.prod(shape) <= MAX_INPUT_ELEMENTS):
        return (f"data.T and data.input_shape must be a positive int and 3 positive ints ([C, H, W]) of at most "
                f"{MAX_INPUT_ELEMENTS:,} elements in all, got {data.get('T')!r:.20} and {shape!r:.60}")
    if not (isinstance(classes, list) and 0 < len(classes) <= 1_000_000):
        return "data.classes must be a non-empty list"
    if data.get("encoding") not in ("direct", "poisson", "frames"):
        return f"data.encoding must be direct, poisson or frames, got {data.get('encoding')!r:.40}"
    if "epoch" in ckpt and not _is_int(ckpt["epoch"]):
        return f"epoch must be an int >= 0, got {ckpt['epoch']!r:.40}"
    if "metrics" in ckpt and not isinstance(ckpt["metrics"], dict):
        return "metrics must be a mapping"
    history = ckpt.get("history", [])
    if not isinstance(history, list):
        return "history must be a list of mask updates"
    for i, h in enumerate(history):
        where = f"history[{i}]"
        if not (isinstance(h, dict) and _is_int(h.get("epoch"))):
            return f"{where} must be a mask update with an int epoch >= 0"
        problem = _masks_problem(h.get("masks"), f"{where}.masks")
        if problem:
            return problem
        budget = h.get("budget")
        if budget is not None and not (
                isinstance(budget, dict) and isinstance(budget.get("unit"), str) and _is_int(budget.get("round_to"), 1)
                and all(_is_number(budget.get(k)) and budget[k] >= 0 for k in ("dense", "target", "selected"))):
            return (f"{where}.budget must hold unit (a name), dense, target and selected (finite numbers >= 0) and "
                    "round_to (an int >= 1)")
    return None
