"""Compressing a model someone already trained: starting weights, one-shot schedules, tutorial-style models."""

import json

import pytest
import torch

import snncompress as sc
from snncompress.config import parse_recipe
from snncompress.data import load_dataset
from snncompress.stages.train import starting_model

from .conftest import TINY, cli, write_recipe
from .test_bad_inputs import _Payload

DENSE = {**TINY, "prune": None, "train": {"epochs": 2}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dense TINY training (its ckpt.pt) and its plain state dict (what a user's script would save)."""
    out = tmp_path_factory.mktemp("dense")
    res = sc.train(parse_recipe(DENSE), out, progress=False)
    ckpt = torch.load(res.ckpt, weights_only=True)
    plain = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith(".gate.gate")}
    return res.ckpt, plain


def _start(weights, tmp_path, **model):
    recipe = parse_recipe({**TINY, "model": {**TINY["model"], **model, "weights": str(weights)}})
    return starting_model(recipe, load_dataset(recipe.data, recipe.seed))


@pytest.mark.parametrize("layout", ["snncompress", "state_dict", "net", "ddp_module_prefix"])
def test_weights_load_from_the_common_layouts(trained, tmp_path, layout):
    ckpt, plain = trained
    if layout == "snncompress":
        path = ckpt
    else:
        obj = {"state_dict": plain, "net": {"net": plain, "epoch": 7, "max_test_acc": 0.5},
               "ddp_module_prefix": {f"module.{k}": v for k, v in plain.items()}}[layout]
        path = tmp_path / "w.pth"
        torch.save(obj, path)
    _, model, _, record = _start(path, tmp_path)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.items())
    assert record == {"path": str(path), "sha256": sc.artifacts.sha256(path)}


def _refused(recipe_dict, tmp_path, *fragments):
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict)
    res = cli("train", recipe, "--out", tmp_path / "out")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    for f in fragments:
        assert f in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def test_weights_that_do_not_fit_are_refused_naming_the_keys(trained, tmp_path):
    _, plain = trained
    cut = dict(plain)
    for k in ("features.conv1.bn.running_mean", "features.conv1.bn.running_var", "features.conv1.bn.weight"):
        del cut[k]
    cut["head.extra"] = torch.zeros(3)
    torch.save(cut, tmp_path / "cut.pt")
    _refused({**TINY, "model": {**TINY["model"], "weights": str(tmp_path / "cut.pt")}}, tmp_path,
             "model.weights:", "3 keys missing (features.conv1.bn.weight, features.conv1.bn.running_mean, "
             "features.conv1.bn.running_var)", "1 unexpected (head.extra)")
    wider = {**TINY, "model": {**TINY["model"], "layers": [8, 16, "M", 32], "weights": str(tmp_path / "p.pt")}}
    torch.save(plain, tmp_path / "p.pt")
    _refused(wider, tmp_path, "of another shape (features.conv3.conv.weight: [16, 16, 3, 3] in the file, "
                              "[32, 16, 3, 3] in the model")


def test_weights_files_that_are_not_weights_are_refused(tmp_path):
    (tmp_path / "notes.pt").write_text("not weights\n")
    _refused({**TINY, "model": {**TINY["model"], "weights": str(tmp_path / "notes.pt")}}, tmp_path,
             "model.weights:", "notes.pt: not a PyTorch weights file")
    sentinel = tmp_path / "pwned"
    torch.save({"net": _Payload(str(sentinel))}, tmp_path / "evil.pt")
    _refused({**TINY, "model": {**TINY["model"], "weights": str(tmp_path / "evil.pt")}}, tmp_path,
             "evil.pt: refused: the file holds pickled Python objects")
    assert not sentinel.exists()  # never executed
    torch.save({"epoch": 3, "acc": 0.9}, tmp_path / "meta.pt")
    _refused({**TINY, "model": {**TINY["model"], "weights": str(tmp_path / "meta.pt")}}, tmp_path,
             "meta.pt: no state dict in it", "found epoch, acc")
    _refused({**TINY, "model": {**TINY["model"], "weights": str(tmp_path / "absent.pt")}}, tmp_path,
             "absent.pt: no such file")


def test_one_shot_schedule_prunes_the_whole_budget_at_the_first_update(trained, tmp_path):
    ckpt, _ = trained
    recipe = parse_recipe({**TINY, "model": {**TINY["model"], "weights": str(ckpt)}, "train": {"epochs": 3},
                           "prune": {**TINY["prune"], "warmup_epochs": 0, "ramp_epochs": 0, "finetune_epochs": 2}})
    res = sc.train(recipe, tmp_path, progress=False)
    history = torch.load(res.ckpt, weights_only=True)["history"]
    assert [h["epoch"] for h in history] == [0] and history[0]["keep_target"] == 0.5
    assert abs(res.metrics[0]["kept_channels"] - 0.5) < 0.05
    with pytest.raises(sc.RecipeError, match="at least 1 epoch"):
        parse_recipe({**TINY, "train": {"epochs": 2}, "prune": {**TINY["prune"], "warmup_epochs": 0,
                                                                "ramp_epochs": 0, "finetune_epochs": 2}})


def test_l1_on_gamma_shrinks_the_batchnorm_scales(tmp_path):
    def gammas(l1):
        res = sc.train(parse_recipe({**DENSE, "train": {"epochs": 1, "l1_gamma": l1}}), tmp_path / str(l1),
                       progress=False)
        sd = torch.load(res.ckpt, weights_only=True)["state_dict"]
        return sum(float(v.abs().sum()) for k, v in sd.items() if k.endswith("bn.weight"))
    assert gammas(0.05) < 0.9 * gammas(0.0)


@pytest.mark.slow
def test_run_from_trained_weights_through_slim_export_and_bench(trained, tmp_path):
    ckpt, _ = trained
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "model": {**TINY["model"], "weights": str(ckpt)},
                                                "prune": {**TINY["prune"], "warmup_epochs": 0, "ramp_epochs": 1}})
    res = cli("run", recipe, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    digest = sc.artifacts.sha256(ckpt)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["weights"]["sha256"] == digest
    assert torch.load(tmp_path / "run" / "train" / "ckpt.pt", weights_only=True)["weights"]["sha256"] == digest
    report = json.loads((tmp_path / "run" / "bench.json").read_text())
    assert report["models"]["slim"]["accuracy"] == report["models"]["slim"]["accuracy_onnx"]


@pytest.mark.parametrize("factory", ["csnn", "membrane_csnn"])
@pytest.mark.slow
def test_tutorial_style_multi_step_only_model_runs_through_every_stage(tmp_path, factory):
    # forward(x_seq) -> x_seq.mean(0): in single-step mode it averages over the batch, which only the trace sees
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY, "model": {"factory": f"tests.tutorial_models:{factory}"}})
    res = cli("run", recipe, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "run" / "bench.json").read_text())
    slim = report["models"]["slim"]
    assert slim["accuracy"] == slim["accuracy_onnx"] and slim["macs"] < report["models"]["dense"]["macs"]
