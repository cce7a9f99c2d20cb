"""Hostile and broken inputs, round two: every field read from a file is checked, reading is bounded, the terminal
shows text (never markup or control codes), recipes are strict, and no output replaces an input or another run."""

import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import pytest
import torch

from snncompress.errors import SnnCompressError

from .conftest import TINY, cli, write_recipe
from .test_bad_inputs import _assert_clean_failure

DENSE = {**TINY, "prune": None, "train": {"epochs": 2}}


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dense")
    recipe = write_recipe(out / "r.yaml", DENSE)
    assert cli("train", recipe, "--out", out / "run").returncode == 0
    return recipe, out / "run"


# --- checkpoint fields -------------------------------------------------------------------------------------------

def _mutated(run_dir, tmp_path, name="c.pt", **fields):
    ckpt = torch.load(run_dir / "train" / "ckpt.pt", weights_only=True)
    ckpt.update(fields)
    torch.save(ckpt, tmp_path / name)
    return tmp_path / name


def test_every_checkpoint_field_is_checked_before_any_work(run_dir, tmp_path):
    ckpt = torch.load(run_dir / "train" / "ckpt.pt", weights_only=True)
    group = next(iter(ckpt["masks"]))
    entry = dict(ckpt["history"][-1])
    cases = [
        ({"masks": "all"}, "masks must map channel group names"),
        ({"masks": {group: torch.ones(3, dtype=torch.int64)}}, "masks must map"),
        ({"epoch": -5}, "epoch must be an int >= 0"),
        ({"epoch": "10"}, "epoch must be an int >= 0"),
        ({"history": [{**entry, "budget": {"unit": "macs", "dense": "a lot", "target": 1.0, "selected": 1.0,
                                          "round_to": 1}}]}, "history[0].budget must hold"),
        ({"history": [{**entry, "budget": {"unit": "macs", "dense": float("nan"), "target": 1.0, "selected": 1.0,
                                          "round_to": 1}}]}, "history[0].budget must hold"),
        ({"history": [{"epoch": 1}]}, "history[0].masks must map"),
        ({"history": "none"}, "history must be a list"),
        ({"data": {**ckpt["data"], "input_shape": [1, 100_000, 100_000]}}, "at most 67,108,864 elements"),
        ({"data": {**ckpt["data"], "T": 0}}, "data.T and data.input_shape"),
        ({"data": {**ckpt["data"], "classes": []}}, "data.classes must be a non-empty list"),
        ({"state_dict": {1: torch.zeros(1)}}, "state_dict must map tensor names"),
        ({"recipe": {**ckpt["recipe"], "train": {"epochs": "many"}}}, "its recipe: train.epochs"),
    ]
    for fields, says in cases:
        path = _mutated(run_dir, tmp_path, **fields)
        for cmd in (["slim", path, "-o", tmp_path / "out.pt"], ["info", path]):
            res = cli(*cmd)
            _assert_clean_failure(res, str(path), says)
            assert res.returncode == 1, (fields, res.stderr)
        assert not (tmp_path / "out.pt").exists()


def test_a_finished_run_resumed_without_its_metrics_is_refused(dense_run):
    recipe, out = dense_run
    (out / "metrics.jsonl").rename(out / "metrics.bak")
    try:
        res = cli("train", recipe, "--out", out, "--resume")
        _assert_clean_failure(res, "metrics.jsonl: cannot resume")
        (out / "metrics.jsonl").write_text('{"epoch": 0}\nnot json\n')
        _assert_clean_failure(cli("train", recipe, "--out", out, "--resume"), "metrics.jsonl", "corrupt")
    finally:
        (out / "metrics.bak").replace(out / "metrics.jsonl")


def test_measured_latency_tables_that_no_selection_can_use_are_refused(measurement):
    from .test_plugins import tiny_unit

    unit, _, _ = tiny_unit("latency", measurement)
    good = unit.state_dict()
    name = next(iter(good["tables"]))
    table = good["tables"][name]
    bad = [
        ({**good, "dense": float("nan")}, "dense (> 0)"),
        ({**good, "tables": {**good["tables"], name: {**table, "ms": [["1"] * len(table["grid_out"])]
                                                       * len(table["grid_in"])}}}, f"{name}: ms must be"),
        ({**good, "tables": {**good["tables"], name: {**table, "ms": [[-1.0] * len(table["grid_out"])]
                                                       * len(table["grid_in"])}}}, f"{name}: ms must be"),
        ({**good, "tables": {**good["tables"], name: {**table, "grid_in": []}}}, f"{name}: grid_in and grid_out"),
        ({**good, "tables": {**good["tables"], name: {**table, "block": 0}}}, f"{name}: block must be"),
        ({**good, "tables": {k: v for k, v in good["tables"].items() if k != name}}, f"no table for layer {name}"),
    ]
    for state, says in bad:
        with pytest.raises(SnnCompressError, match=f"latency tables: .*{re.escape(says)}"):
            unit.load_state_dict(state)
    unit.load_state_dict(good)


# --- starting weights --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_weights(dense_run):
    _, out = dense_run
    state = torch.load(out / "ckpt.pt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if not k.endswith(".gate.gate")}


def _starts_from(weights, tmp_path):
    torch.save(weights, tmp_path / "w.pt")
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "model": {**TINY["model"], "weights": str(tmp_path / "w.pt")}})
    return cli("train", recipe, "--out", tmp_path / "out")


def test_starting_weights_must_be_finite_dense_real_tensors_under_names(plain_weights, tmp_path):
    conv = "features.conv1.conv.weight"
    nan = plain_weights[conv].clone()
    nan[0, 0, 0, 0] = float("nan")
    cases = [
        ({**plain_weights, conv: nan}, f"tensor '{conv}' holds NaN or infinite values"),
        ({**plain_weights, conv: plain_weights[conv].to_sparse()}, "is sparse"),
        ({**plain_weights, conv: plain_weights[conv].to(torch.complex64)}, "is complex"),
        ({**plain_weights, conv: plain_weights[conv] > 0}, "is bool"),
        ({**plain_weights, 7: torch.zeros(1)}, "keys must be tensor names (strings), found 7"),
        ({**plain_weights, conv: plain_weights[conv].round().to(torch.int32)}, "of another kind of number"),
    ]
    for weights, says in cases:
        res = _starts_from(weights, tmp_path)
        _assert_clean_failure(res, "model.weights:", says)
        assert res.returncode == 2 and not (tmp_path / "out").exists()


def test_a_pickle_that_calls_a_function_is_reported_as_pickled_objects(tmp_path):
    sentinel = tmp_path / "pwned"

    class Call:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    torch.save({"state_dict": Call()}, tmp_path / "w.pt")
    res = cli("info", tmp_path / "w.pt")
    _assert_clean_failure(res, "refused: the file holds pickled Python objects")
    assert not sentinel.exists()


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")  # an empty dict
        with z.open("archive/data/0", "w") as f:  # 256 MiB of zeros: a few hundred kilobytes deflated
            block = bytes(1 << 20)
            for _ in range(256):
                f.write(block)
    assert path.stat().st_size < 1 << 20
    res = cli("info", path)
    _assert_clean_failure(res, "refused: its zip records decompress to 268,435,4")


def test_torchs_legacy_format_is_refused_unread(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    _assert_clean_failure(cli("info", tmp_path / "old.pt"), "refused: torch's legacy format")


# --- NIR files ---------------------------------------------------------------------------------------------------

def _nir_with(tmp_path, build) -> str:
    path = tmp_path / "x.nir"
    with h5py.File(path, "w") as f:
        f.create_group("node")
        build(f)
    return path


def test_hdf5_links_external_storage_and_huge_declarations_are_refused_unread(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"private data")
    cases = [
        (lambda f: f.__setitem__("node/x", h5py.ExternalLink(str(tmp_path / "other.h5"), "/")), "ExternalLink"),
        (lambda f: f.__setitem__("node/y", h5py.SoftLink("/node")), "SoftLink"),
        (lambda f: f.create_dataset("node/z", shape=(12,), dtype="u1", external=[(str(secret), 0, 12)]),
         "external storage"),
        (lambda f: f.create_dataset("node/w", shape=(1 << 30,), dtype="f4"), "declare more than"),
    ]
    for build, says in cases:
        path = _nir_with(tmp_path, build)
        assert path.stat().st_size < 100_000
        res = cli("info", path)
        _assert_clean_failure(res, "refused:", says)
        assert "private data" not in res.stdout + res.stderr


def test_control_codes_in_nir_metadata_are_shown_escaped(run_dir, tmp_path):
    import nir

    graph = nir.read(run_dir / "model.nir") if (run_dir / "model.nir").exists() else None
    if graph is None:
        graph = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": [1]}),
                                    "output": nir.Output(output_type={"output": [1]})},
                             edges=[("input", "output")])
    graph.metadata = {"format": "x", "note": "\x1b[2J\x1b[Hcleared [/] [bold]"}
    nir.write(tmp_path / "m.nir", graph)
    res = cli("info", tmp_path / "m.nir")
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and "note: \\x1b[2J\\x1b[Hcleared [/] [bold]" in res.stdout


# --- recipes -----------------------------------------------------------------------------------------------------

def test_a_key_given_twice_in_a_section_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: dup\ntrain:\n  epochs: 3\n  epochs: 300\n")
    res = cli("train", path)
    _assert_clean_failure(res, "line 4: duplicate key 'epochs' (first on line 3)")
    assert res.returncode == 2


@pytest.mark.parametrize("change, says", [
    ({"data": {**TINY["data"], "T": 10**9}}, "data.T: must be at most 4,096"),
    ({"data": {**TINY["data"], "batch_size": 10**9}}, "data.batch_size: must be at most 65,536"),
    ({"data": {**TINY["data"], "workers": 10**6}}, "data.workers: must be at most 256"),
    ({"seed": 2**40}, "seed: must be at most 4,294,967,295"),
    ({"model": {**TINY["model"], "layers": [10**9]}}, "an int in [1, 16,384]"),
    ({"model": {**TINY["model"], "layers": [8] * 600}}, "at most 512 entries"),
    ({"model": {**TINY["model"], "width": float("inf")}}, "model.width: must be a finite number"),
    ({"model": {**TINY["model"], "width": 1000.0}}, "model.width: must be at most 64"),
    ({"model": {**TINY["model"], "neuron": {"tau": float("inf")}}}, "tau: must be a finite number"),
    ({"model": {**TINY["model"], "neuron": {"v_threshold": float("nan")}}}, "v_threshold: must be a finite number"),
    ({"name": "../escape"}, "name: must be a plain directory name"),
    ({"name": "[/]"}, "name: must be a plain directory name"),
])
def test_recipe_numbers_are_bounded_and_finite_and_the_name_stays_in_runs(tmp_path, change, says):
    res = cli("train", write_recipe(tmp_path / "r.yaml", {**TINY, **change}), cwd=tmp_path)
    _assert_clean_failure(res, says)
    assert res.returncode == 2 and not (tmp_path / "runs").exists()


# --- outputs -----------------------------------------------------------------------------------------------------

def test_an_output_that_cannot_be_written_is_refused_before_any_work(tiny_recipe, tmp_path):
    (tmp_path / "file").write_text("x")
    for out, says in [(tmp_path / "file", "is a file; the output must be a directory"),
                      (tmp_path / "file" / "sub", "is a file, so nothing can be written under it"),
                      ("/proc/snncompress-out", "cannot write in /proc")]:
        t0 = time.monotonic()
        res = cli("train", tiny_recipe, "--out", out)
        _assert_clean_failure(res, says)
        assert time.monotonic() - t0 < 30  # refused at once, not after an epoch
    assert (tmp_path / "file").read_text() == "x"


def test_an_output_that_is_the_input_is_refused_and_the_input_kept(run_dir, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes((run_dir / "train" / "ckpt.pt").read_bytes())
    before = ckpt.read_bytes()
    for cmd in (["slim", ckpt, "-o", ckpt], ["export", ckpt, "--nir", "-o", ckpt],
                ["export", ckpt, "--onnx", "-o", tmp_path / "." / "ckpt.pt"]):
        _assert_clean_failure(cli(*cmd), "is also the input")
    assert ckpt.read_bytes() == before


def test_a_second_training_into_a_directory_being_written_is_refused(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "train": {"epochs": 200}})
    first = subprocess.Popen([sys.executable, "-m", "snncompress", "train", str(recipe), "--out", str(tmp_path / "o")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "o" / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        other = write_recipe(tmp_path / "other.yaml", {**TINY, "name": "other"})
        res = cli("train", other, "--out", tmp_path / "o")
        _assert_clean_failure(res, "another snncompress process is writing it")
        assert first.poll() is None  # the first one goes on undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # once the writer is gone, the directory is free again
    res = cli("train", recipe, "--out", tmp_path / "o", "--resume")
    assert "another snncompress process" not in res.stderr


def test_artifacts_get_the_users_umask(tiny_recipe, tmp_path):
    res = subprocess.run(["sh", "-c", f"umask 027 && {sys.executable} -m snncompress train {tiny_recipe} "
                                      f"--out {tmp_path / 'o'}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for name in ("ckpt.pt", "best.pt", "metrics.jsonl"):
        assert (tmp_path / "o" / name).stat().st_mode & 0o777 == 0o640, name


def test_brackets_in_an_output_path_are_printed_as_text(tiny_recipe, tmp_path):
    out = tmp_path / "a[bold]b[/]c"
    res = cli("train", tiny_recipe, "--out", out)
    assert res.returncode == 0, res.stderr
    assert f"wrote {out / 'ckpt.pt'}" in res.stdout.replace("\n", "")
