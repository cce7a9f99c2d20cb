"""Event data already integrated into frames: ``root/<class>/<sample>.npz`` holding ``frames [T, 2, H, W]``.

This is the layout spikingjelly writes when it integrates DVS128 Gesture or CIFAR10-DVS events into
frames. ``root`` has either ``train/`` and ``test/`` subfolders (each with one folder per class) or
the class folders directly (then a seeded split is made).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import SnnCompressError


class FrameFiles:
    """Frame samples read from their ``.npz`` files on access, standing in for an ``[N, T, C, H, W]`` tensor.

    A DVS128-sized set (1,176 samples of 16 x 2 x 128 x 128) is 2.5 GB as float32; held in memory, with
    the copies a split and a normalisation make, it took several times that. Here only the file list
    is held: ``x[i]`` reads one sample (in a DataLoader worker when ``data.workers`` > 0), and ``x[a:b]``
    or ``x[indices]`` stacks several, so evaluation reads one batch at a time. Shapes are checked up
    front from the files' headers; the values when a sample is read.
    """

    def __init__(self, files: list[Path], sample_shape: tuple[int, ...]):
        self.files, self.sample_shape = list(files), tuple(sample_shape)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), *self.sample_shape)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return torch.from_numpy(_read_sample(self.files[index]))
        picked = self.files[index] if isinstance(index, slice) else [self.files[i] for i in index]
        if not picked:
            return torch.empty((0, *self.sample_shape))
        return torch.from_numpy(np.stack([_read_sample(f) for f in picked]))

    def subset(self, indices) -> "FrameFiles":
        return FrameFiles([self.files[i] for i in indices], self.sample_shape)


Split = tuple[FrameFiles, np.ndarray]  # (samples, labels)


def load_frames(root: str | Path, T: int) -> tuple[list[str], Split, Split | None]:
    """``(classes, (x, y) train-or-all, (x, y) test or None)``; x :class:`FrameFiles` of ``[T, C, H, W]`` samples."""
    root = Path(root)
    if not root.is_dir():
        raise SnnCompressError(f"{root}: no such frames directory")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _classes(root / "train")
        return classes, _read_split(root / "train", classes, T), _read_split(root / "test", classes, T)
    classes = _classes(root)
    return classes, _read_split(root, classes, T), None


def _classes(d: Path) -> list[str]:
    classes = sorted(p.name for p in d.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise SnnCompressError(f"{d}: expected one subfolder per class (at least 2) holding .npz files")
    return classes


def _read_split(d: Path, classes: list[str], T: int) -> Split:
    files, ys, shape = [], [], None
    for label, c in enumerate(classes):
        if not (d / c).is_dir():
            raise SnnCompressError(f"{d}: class folder '{c}' is missing (classes: {', '.join(classes)})")
        for f in sorted((d / c).glob("*.npz")):
            s = _sample_shape(f)
            if s[0] != T:
                raise SnnCompressError(f"{f}: holds {s[0]} time steps, the recipe's data.T is {T}")
            if shape is None:
                shape = s
            elif s != shape:
                raise SnnCompressError(f"{f}: frames of shape {list(s)}, expected {list(shape)} like the others")
            files.append(f)
            ys.append(label)
    if not files:
        raise SnnCompressError(f"{d}: no .npz samples found")
    return FrameFiles(files, shape), np.asarray(ys, dtype=np.int64)


def _sample_shape(f: Path) -> tuple[int, ...]:
    """The shape of ``f``'s ``frames`` array, read from the .npy header inside the archive (no data read)."""
    try:
        with zipfile.ZipFile(f) as z:
            if "frames.npy" not in z.namelist():
                found = ", ".join(n.removesuffix(".npy") for n in z.namelist()) or "nothing"
                raise SnnCompressError(f"{f}: no 'frames' array (found: {found})")
            with z.open("frames.npy") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(fh)
    except SnnCompressError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise SnnCompressError(f"{f}: not a readable .npz file ({type(e).__name__})") from e
    if len(shape) != 4 or shape[1] != 2 or not np.issubdtype(dtype, np.number):
        raise SnnCompressError(f"{f}: 'frames' must be numeric [T, 2, H, W], got {dtype} {list(shape)}")
    return tuple(shape)


def _read_sample(f: Path) -> np.ndarray:
    try:
        with np.load(f, allow_pickle=False) as z:
            x = z["frames"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise SnnCompressError(f"{f}: not a readable .npz file ({type(e).__name__})") from e
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise SnnCompressError(f"{f}: 'frames' holds NaN or infinite values")
    return x
