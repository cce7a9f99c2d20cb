"""Bad inputs: one-line error, non-zero exit, no traceback, nothing written, nothing executed."""

import pickle

import torch

from .conftest import cli


class _Payload:
    """Unpickling this would create the sentinel file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _assert_clean_failure(res, *fragments):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr + res.stdout
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    for f in fragments:
        assert f in res.stderr, res.stderr


def test_text_file_as_checkpoint(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("hello, I am not a checkpoint\n")
    for cmd in (["slim", p], ["export", p, "--onnx"]):
        _assert_clean_failure(cli(*cmd), "not a PyTorch checkpoint")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["notes.pt"]


def test_pickled_object_is_refused_and_never_executed(tmp_path):
    sentinel = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"format": "snncompress.ckpt/1", "payload": _Payload(str(sentinel))}, p)
    assert not sentinel.exists()
    _assert_clean_failure(cli("slim", p), "refused", "pickled")
    _assert_clean_failure(cli("export", p, "--onnx"), "refused")
    assert not sentinel.exists()
    # and a raw pickle (not a torch zip) is refused the same way
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(str(sentinel))))
    res = cli("slim", raw)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert not sentinel.exists()


def test_missing_checkpoint(tmp_path):
    _assert_clean_failure(cli("slim", tmp_path / "nope.pt"), "no such checkpoint file")


def test_foreign_checkpoint(tmp_path):
    p = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, p)
    _assert_clean_failure(cli("slim", p), "not an snncompress checkpoint")


def test_bench_needs_inputs(tmp_path):
    _assert_clean_failure(cli("bench", tmp_path / "nodir"), "no such run directory")


def test_truncated_checkpoint(run_dir, tmp_path):
    data = (run_dir / "train" / "ckpt.pt").read_bytes()
    p = tmp_path / "cut.pt"
    p.write_bytes(data[: len(data) // 2])
    _assert_clean_failure(cli("slim", p, "-o", tmp_path / "s.pt"), "not a PyTorch checkpoint")
    assert not (tmp_path / "s.pt").exists()


def test_run_without_prune_section_is_refused(tmp_path):
    from .conftest import TINY, write_recipe

    recipe = write_recipe(tmp_path / "dense.yaml", {**TINY, "prune": None})
    _assert_clean_failure(cli("run", recipe, "--out", tmp_path / "out"), "prune")
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_format_version(run_dir, tmp_path):
    ck = torch.load(run_dir / "train" / "ckpt.pt", weights_only=True)
    ck["format"] = "snncompress.ckpt/9"
    torch.save(ck, tmp_path / "future.pt")
    _assert_clean_failure(cli("slim", tmp_path / "future.pt"), "not supported by this version")


def test_checkpoint_of_another_model(run_dir, tmp_path):
    ck = torch.load(run_dir / "train" / "ckpt.pt", weights_only=True)
    ck["model"]["kwargs"]["layers"] = [8, 32, "M", 16]  # weights no longer fit the architecture
    torch.save(ck, tmp_path / "other.pt")
    out = tmp_path / "s.pt"
    _assert_clean_failure(cli("slim", tmp_path / "other.pt", "-o", out), "weights do not match")
    assert not out.exists()


def test_onnx_not_written_by_snncompress_and_truncated(run_dir, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "foreign.onnx")
    _assert_clean_failure(cli("info", tmp_path / "foreign.onnx"), "not an ONNX model written by snncompress")
    data = (run_dir / "model.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    _assert_clean_failure(cli("info", tmp_path / "cut.onnx"), "not a readable ONNX file")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import pytest

    import snncompress as sc
    import snncompress.stages.train as loop
    from snncompress.config import parse_recipe

    from .conftest import TINY

    real, calls = loop.F.cross_entropy, {"n": 0}
    batches_per_epoch = 12  # 1437 training digits / batch 128

    def poisoned(*args, **kwargs):  # the training loss turns NaN in epoch 2, as a diverging run would
        loss = real(*args, **kwargs)
        if not loss.requires_grad:  # evaluation
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] > 2 * batches_per_epoch else loss

    monkeypatch.setattr(loop.F, "cross_entropy", poisoned)
    with pytest.raises(sc.SnnCompressError, match=r"loss is nan in epoch 2.*epoch 1\)"):
        sc.train(parse_recipe(TINY), tmp_path, progress=False)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["epoch"] == 1


def test_full_disk_fails_cleanly_and_keeps_the_old_checkpoint(run_dir, tmp_path):
    import subprocess

    import pytest

    from .conftest import TINY, write_recipe

    size = (run_dir / "baseline" / "ckpt.pt").stat().st_size  # dense-shaped, as the tiny run's first checkpoint
    disk = tmp_path / "disk"
    disk.mkdir()
    # room for one checkpoint and the metrics, not for the temporary copy of the next one
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) // 4096 * 4096 + 8192}",
                              "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        recipe = write_recipe(tmp_path / "r.yaml", TINY)
        res = cli("train", recipe, "--out", disk)
        _assert_clean_failure(res, "no space left on device", "previous version is unchanged")
        assert torch.load(disk / "ckpt.pt", weights_only=True)["epoch"] == 0
        assert not [p for p in disk.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)])


def test_model_too_deep_for_the_input_size(tmp_path):
    from .conftest import TINY, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "model": {"name": "vgg16", "width": 0.125}})
    _assert_clean_failure(cli("train", recipe, "--out", tmp_path / "out"), "model 'vgg16' cannot take inputs of shape [1, 8, 8]")
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_unknown_option_is_a_usage_error():
    res = cli("export", "x.pt", "--onnx", "--unroll", "sideways")
    assert res.returncode == 1 and "unroll order 'sideways': allowed auto, step, layer" in res.stderr
    res = cli("slim", "--bogus")
    assert res.returncode == 2 and "No such option: --bogus" in res.stderr and "Traceback" not in res.stderr
