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
