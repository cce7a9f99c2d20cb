"""Datasets in their real formats (tiny files written here), encoders and augmentation."""

import json
import pickle

import numpy as np
import pytest
import torch

import snncompress as sc
from snncompress.data import encode, graph_input, load_dataset
from snncompress.data.augment import random_crop_flip
from snncompress.errors import SnnCompressError
from snncompress.config import DataCfg, parse_recipe

from .conftest import TINY, cli, write_recipe
from .data_files import write_cifar10_bin, write_cifar10_py, write_cifar100_py, write_frames


def test_cifar10_binary_and_python_layouts_read_the_same_images(tmp_path):
    write_cifar10_bin(tmp_path / "bin")
    write_cifar10_py(tmp_path / "py")
    a = load_dataset(DataCfg(name="cifar10", root=str(tmp_path / "bin")), 0)
    b = load_dataset(DataCfg(name="cifar10", root=str(tmp_path / "py" / "cifar-10-batches-py")), 0)
    assert a.x_train.shape == (50, 3, 32, 32) and a.x_test.shape == (20, 3, 32, 32)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.classes == [f"class{i}" for i in range(10)] and len(a.mean) == 3
    assert a.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # per-channel normalisation


def test_cifar100_python(tmp_path):
    write_cifar100_py(tmp_path)
    d = load_dataset(DataCfg(name="cifar100", root=str(tmp_path)), 0)
    assert len(d.classes) == 100 and d.y_train.max() < 100 and d.x_train.shape[1:] == (3, 32, 32)


def test_incomplete_cifar_directory_names_missing_files(tmp_path):
    d = write_cifar10_bin(tmp_path)
    (d / "data_batch_3.bin").unlink()
    with pytest.raises(SnnCompressError, match="missing data_batch_3.bin"):
        load_dataset(DataCfg(name="cifar10", root=str(tmp_path)), 0)
    with pytest.raises(SnnCompressError, match="cifar-10-batches-bin/ .*data_batch_1.bin"):
        load_dataset(DataCfg(name="cifar10", root=str(tmp_path / "empty")), 0)


def test_cifar_labels_out_of_range_and_truncated_records(tmp_path):
    d = write_cifar10_bin(tmp_path)
    raw = bytearray((d / "test_batch.bin").read_bytes())
    raw[0] = 12  # label 12 in a 10-class set
    (d / "test_batch.bin").write_bytes(bytes(raw))
    with pytest.raises(SnnCompressError, match=r"labels must be in \[0, 10\)"):
        load_dataset(DataCfg(name="cifar10", root=str(tmp_path)), 0)
    (d / "test_batch.bin").write_bytes(bytes(raw[:5000]))
    with pytest.raises(SnnCompressError, match="not a whole number of 3073-byte"):
        load_dataset(DataCfg(name="cifar10", root=str(tmp_path)), 0)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_cifar_python_pickle_with_a_callable_is_refused_and_never_runs(tmp_path):
    d = write_cifar10_py(tmp_path)
    sentinel = tmp_path / "pwned"
    with open(d / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 10, b"x": _Evil(str(sentinel))}, f,
                    protocol=2)
    with pytest.raises(SnnCompressError, match=r"refused: the pickle references io\.open"):
        load_dataset(DataCfg(name="cifar10", root=str(tmp_path)), 0)
    assert not sentinel.exists()
    # and through the CLI: one line, non-zero exit, nothing written
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "data": {"name": "cifar10", "root": str(tmp_path), "T": 2}})
    res = cli("train", recipe, "--out", tmp_path / "out")
    assert res.returncode == 1 and "refused" in res.stderr and "Traceback" not in res.stderr
    assert not sentinel.exists() and not (tmp_path / "out" / "ckpt.pt").exists()


def test_frames_split_folders_and_seeded_split(tmp_path):
    write_frames(tmp_path / "a", split=True)
    d = load_dataset(DataCfg(name="frames", root=str(tmp_path / "a"), T=2, encoding="frames"), 0)
    assert d.x_train.shape == (16, 2, 2, 8, 8) and d.x_test.shape == (16, 2, 2, 8, 8)
    assert d.classes == ["gesture0", "gesture1"] and d.input_shape == [2, 8, 8]
    write_frames(tmp_path / "b")
    d = load_dataset(DataCfg(name="frames", root=str(tmp_path / "b"), T=2, encoding="frames", test_fraction=0.25), 0)
    assert len(d.x_train) == 12 and len(d.x_test) == 4
    assert d.y_test.tolist().count(0) == 2  # stratified


def test_bad_frames_are_refused_naming_the_file(tmp_path):
    root = write_frames(tmp_path)
    cfg = DataCfg(name="frames", root=str(root), T=2, encoding="frames")
    bad = root / "gesture1" / "sample3.npz"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    with pytest.raises(SnnCompressError, match="sample3.npz: not a readable .npz"):
        load_dataset(cfg, 0)
    np.savez(bad, frames=np.zeros((2, 2, 9, 8), np.float32))  # another size
    with pytest.raises(SnnCompressError, match=r"sample3.npz: frames of shape \[2, 2, 9, 8\], expected \[2, 2, 8, 8\]"):
        load_dataset(cfg, 0)
    np.savez(bad, events=np.zeros((2, 2, 8, 8), np.float32))
    with pytest.raises(SnnCompressError, match="no 'frames' array"):
        load_dataset(cfg, 0)
    np.savez(bad, frames=np.zeros((3, 2, 8, 8), np.float32))
    with pytest.raises(SnnCompressError, match="holds 3 time steps, the recipe's data.T is 2"):
        load_dataset(cfg, 0)


def test_frames_are_read_from_their_files_when_used(tmp_path):
    # a DVS-sized set does not fit comfortably in memory: loading keeps the file list, reading happens per sample
    from snncompress.data.frames import FrameFiles

    root = write_frames(tmp_path, split=True)
    d = load_dataset(DataCfg(name="frames", root=str(root), T=2, encoding="frames"), 0)
    assert isinstance(d.x_train, FrameFiles) and d.x_train.shape == (16, 2, 2, 8, 8)
    on_disk = torch.from_numpy(np.load(root / "test" / "gesture1" / "sample0.npz")["frames"])
    assert torch.equal(d.x_test[8], on_disk) and torch.equal(d.x_test[8:10][0], on_disk)
    frames = np.load(root / "test" / "gesture1" / "sample1.npz")["frames"]
    frames[0, 0, 0, 0] = np.nan  # values are checked when the sample is read, with the file named
    np.savez(root / "test" / "gesture1" / "sample1.npz", frames=frames)
    with pytest.raises(SnnCompressError, match=r"sample1.npz: 'frames' holds NaN"):
        d.x_test[8:10]


@pytest.mark.slow
def test_training_on_frames_is_the_same_with_dataloader_workers(tmp_path):
    root = write_frames(tmp_path / "data", split=True)
    data = {"name": "frames", "root": str(root), "T": 2, "encoding": "frames", "batch_size": 8}
    runs = [sc.train(parse_recipe({**TINY, "data": {**data, "workers": w}, "train": {"epochs": 4}}), tmp_path / str(w),
                     progress=False) for w in (0, 2)]
    assert [m["train_loss"] for m in runs[0].metrics] == [m["train_loss"] for m in runs[1].metrics]


def test_images_are_float32_in_memory():
    for enc in ("direct", "poisson"):
        d = load_dataset(DataCfg(name="digits", encoding=enc), 0)
        assert d.x_train.dtype == torch.float32 and d.x_test.dtype == torch.float32


def test_mnist5k_ships_5000_real_images():
    d = load_dataset(DataCfg(name="mnist5k"), 0)
    assert len(d.x_train) + len(d.x_test) == 5000 and d.input_shape == [1, 28, 28]


def test_poisson_encoding_is_seeded_and_fires_at_the_pixel_rate():
    x = torch.full((4, 1, 16, 16), 0.25)
    x[2:] = 0.75
    s1 = graph_input(x, 50, "poisson", torch.Generator().manual_seed(3))
    s2 = graph_input(x, 50, "poisson", torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2) and s1.shape == (4, 50, 1, 16, 16) and set(s1.unique().tolist()) <= {0.0, 1.0}
    assert abs(s1[:2].mean().item() - 0.25) < 0.02 and abs(s1[2:].mean().item() - 0.75) < 0.02
    assert encode(x, 50, "poisson", torch.Generator().manual_seed(3)).shape == (50, 4, 1, 16, 16)


def test_augmentation_crops_and_flips_deterministically():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    a = random_crop_flip(x, pad=1, generator=torch.Generator().manual_seed(0))
    b = random_crop_flip(x, pad=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    outs = {tuple(random_crop_flip(x, pad=1, generator=torch.Generator().manual_seed(s))[0].flatten().tolist())
            for s in range(30)}
    assert len(outs) > 5  # crops differ
    assert tuple(x[0].flip(-1).flatten().tolist()) in outs  # an unshifted flip is among them


@pytest.mark.parametrize("fmt", ["cifar10-bin", "frames"])
@pytest.mark.slow
def test_pipeline_runs_on_real_formats(tmp_path, fmt):
    if fmt == "frames":
        root = write_frames(tmp_path / "data", split=True)
        data = {"name": "frames", "root": str(root), "T": 2, "encoding": "frames", "batch_size": 8}
    else:
        write_cifar10_bin(tmp_path / "data")
        data = {"name": "cifar10", "root": str(tmp_path / "data"), "T": 2, "batch_size": 16}
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "data": data})
    res = cli("run", recipe, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "run" / "bench.json").read_text())
    assert report["models"]["slim"]["accuracy"] == report["models"]["slim"]["accuracy_onnx"]
    from snncompress.export.onnx import read_onnx_metadata

    meta = read_onnx_metadata(tmp_path / "run" / "model.onnx")
    expected = ["batch", 2, 2, 8, 8] if fmt == "frames" else ["batch", 3, 32, 32]
    assert json.loads(meta["input_shape"]) == expected


def test_poisson_pipeline_exports_spike_sequences(tmp_path):
    recipe = parse_recipe({**TINY, "data": {**TINY["data"], "encoding": "poisson"}, "train": {"epochs": 4}})
    res = sc.train(recipe, tmp_path, progress=False)
    sc.slim_checkpoint(res.ckpt, tmp_path / "slim.pt")
    out = sc.export_onnx(tmp_path / "slim.pt", tmp_path / "m.onnx")
    assert out.max_abs_diff <= 1e-4
    from snncompress.export.onnx import read_onnx_metadata
    from snncompress.runtime.sessions import ort_session

    assert json.loads(read_onnx_metadata(tmp_path / "m.onnx")["input_shape"]) == ["batch", 2, 1, 8, 8]
    sess = ort_session(tmp_path / "m.onnx")
    spikes = (torch.rand(3, 2, 1, 8, 8) < 0.5).float().numpy()
    assert sess.run(None, {sess.get_inputs()[0].name: spikes})[0].shape == (3, 10)
