"""NIR export: the network laid out for NIR, written, read back with nir.read and simulated by spikingjelly and
by an independent consumer (snnTorch 1.0), on real files; refusals of what NIR cannot express."""

import json

import nir
import numpy as np
import pytest
import torch
from spikingjelly.activation_based.neuron import ParametricLIFNode

import snncompress as sc
from snncompress.artifacts import sha256
from snncompress.data import load_dataset
from snncompress.errors import SnnCompressError
from snncompress.models.factory import model_options
from snncompress.stages.check import check_target
from snncompress.export.nir import (NIR_FORMAT, Simulator, body_logits, check_expressible, nir_body,
                                      read_nir, read_nir_metadata, simulate, to_nir_graph)
from snncompress.prune.gates import attach_gates, gate_modules

from .conftest import TINY, cli, write_recipe
from .nir_consumers import snntorch_simulator


def _net(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A gated model with non-trivial BatchNorm statistics and some closed gates (as in a dense checkpoint)."""
    torch.manual_seed(seed)
    kw = kw or ({"layers": [8, 16, "M", 16, "M", 12], "pool": "avg"} if name == "vgg" else {"width": 0.125})
    m = sc.create_model(name, in_channels=1, num_classes=10, **kw)
    attach_gates(m, torch.zeros(2, 2, 1, 8, 8))
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 2.0)
            mod.bias.data.uniform_(0.0, 1.0)
    for i, gate in enumerate(gate_modules(m).values()):
        mask = torch.ones(gate.mask.numel(), dtype=torch.bool)
        mask[i % 2::3] = False
        gate.set_mask(mask)
    return m.eval()


@pytest.mark.parametrize("name", ["vgg", "resnet20", "sew_resnet20"])
def test_nir_file_simulates_exactly_in_spikingjelly_and_snntorch(name, tmp_path):
    """Residual adds become edges into one node (NIR sums a node's inputs); closed gates and BatchNorm fold."""
    model = _net(name)
    x = torch.randn(48, 1, 8, 8) * 2
    trained = sc.evaluate(model, x, torch.zeros(48, dtype=torch.long), 4)[2].numpy()
    body = nir_body(model, x[:2])
    assert np.abs(body_logits(body, x, 4, "direct") - trained).max() <= 1e-4
    path = tmp_path / "m.nir"
    nir.write(path, to_nir_graph(body, x[:2], {"format": NIR_FORMAT}))
    graph = read_nir(path)
    kinds = {type(n).__name__ for n in graph.nodes.values()}
    assert kinds == {"Input", "Conv2d", "LIF", "SumPool2d", "Flatten", "Affine", "Output"}, kinds
    if name != "vgg":  # the adds: nodes with several incoming edges (SEW: a chain of adds, all summed)
        targets = [b for _, b in graph.edges]
        assert max(targets.count(t) for t in set(targets)) >= 2
    for sim in (Simulator(graph), snntorch_simulator(graph)):
        got = simulate(sim, x, 4, "direct")
        assert (got.argmax(1) == trained.argmax(1)).all() and np.abs(got - trained).max() <= 1e-4
    assert np.abs(trained).max() > 0.1  # spikes reach the readout: the comparison is not vacuous


def test_average_pools_are_sum_pools_with_the_scale_in_the_next_weights():
    model = _net("vgg")
    x = torch.randn(2, 1, 8, 8)
    body = nir_body(model, x)
    graph = to_nir_graph(body, x, {})
    pools = {k: v for k, v in graph.nodes.items() if isinstance(v, nir.SumPool2d)}
    assert set(pools) == {"features_pool1", "features_pool2", "pool"}
    assert not any(isinstance(v, nir.AvgPool2d) for v in graph.nodes.values())
    for p in pools.values():  # (height, width) arrays: what snnTorch, Sinabs and Lava-DL read
        assert p.kernel_size.shape == p.stride.shape == p.padding.shape == (2,)
    conv = body.features.conv3.conv.weight.detach().numpy()
    assert np.array_equal(graph.nodes["features_conv3_conv"].weight, conv / 4)  # after the 2x2 pool1
    readout = body.classifier.weight.detach().numpy()
    assert np.array_equal(graph.nodes["classifier"].weight, readout / 4)  # global pool of 2x2 after pool2
    lif = graph.nodes["features_conv1_spike"]  # spikingjelly's mapping: tau = tau_steps * dt, r = 1
    assert np.allclose(lif.tau, 2.0 * 1e-4) and np.all(lif.r == 1) and np.all(lif.v_reset == 0)


@pytest.mark.parametrize("kw,message", [
    (dict(name="vgg", layers=[8, "M", 8]), "NIR has no max pooling; allowed: average pooling (model.pool: avg)"),
    (dict(name="vgg", layers=[8, "M", 8], pool="avg", neuron={"reset": "soft"}),
     "soft reset (subtract the threshold) has no NIR form; allowed: hard reset (neuron.reset: hard)"),
    (dict(name="vgg", layers=[8], pool="avg", readout_pool=3), "pooling 8x8 to 3x3 is not a plain average"),
])
def test_constructs_nir_cannot_express_are_refused_naming_the_module(kw, message):
    name = kw.pop("name")
    model = sc.create_model(name, in_channels=1, num_classes=10, **kw).eval()
    with pytest.raises(SnnCompressError, match=r"^features\.|^pool ") as e:
        nir_body(model, torch.zeros(2, 1, 8, 8))
    assert message in str(e.value) and "\n" not in str(e.value)
    model = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8], pool="avg")
    model.features.conv1.spike = ParametricLIFNode()
    with pytest.raises(SnnCompressError, match="features.conv1.spike .ParametricLIFNode.: NIR export allows IFNode "
                                               "and LIFNode with a fixed scalar tau"):
        check_expressible(model)


def test_export_refuses_max_pool_and_soft_reset_checkpoints_writing_nothing(run_dir, tmp_path):
    out = tmp_path / "m.nir"
    res = cli("export", run_dir / "slim.pt", "--nir", "-o", out, timeout=120)  # the shared run: max pools
    assert res.returncode == 1 and not out.exists(), res.stderr
    assert res.stderr.strip().splitlines() == [
        "error: features.pool1 (MaxPool2d): NIR has no max pooling; allowed: average pooling (model.pool: avg)"]
    ck = torch.load(run_dir / "slim.pt", weights_only=True)  # the same weights with soft-reset neurons
    ck["model"]["kwargs"]["neuron"]["reset"] = "soft"
    ck["model"]["kwargs"]["pool"] = "avg"
    torch.save(ck, tmp_path / "soft.pt")
    res = cli("export", tmp_path / "soft.pt", "--nir", timeout=120)
    assert res.returncode == 1 and not (tmp_path / "soft.nir").exists(), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert "features.conv1.spike (LIFNode): soft reset (subtract the threshold) has no NIR form" in res.stderr
    res = cli("export", run_dir / "slim.pt", "--nir", "--onnx", timeout=60)
    assert res.returncode == 1 and "choose one export format: --onnx or --nir" in res.stderr


def test_info_refuses_a_corrupted_nir_file_in_one_line(tmp_path):
    model = _net("vgg")
    x = torch.zeros(2, 1, 8, 8)
    good = tmp_path / "good.nir"
    nir.write(good, to_nir_graph(nir_body(model, x), x, {"format": NIR_FORMAT, "T": "4"}))
    assert read_nir_metadata(good)["T"] == "4"
    bad = tmp_path / "bad.nir"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    res = cli("info", bad, timeout=60)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "bad.nir: not a readable NIR file" in res.stderr and "Traceback" not in res.stderr
    garbage = tmp_path / "garbage.nir"
    garbage.write_text("not hdf5")
    with pytest.raises(SnnCompressError, match="garbage.nir: not a readable NIR file"):
        read_nir(garbage)


def test_recipe_pool_is_for_vgg_models_only():
    assert model_options("vgg", {"layers": [8, "M", 8], "pool": "avg"})["pool"] == "avg"
    assert model_options("vgg16", {})["pool"] == "max" and not sc.parse_recipe({}).export.nir
    with pytest.raises(sc.RecipeError, match=r"model.pool: unknown key; allowed: neuron, width \(model resnet20\)"):
        model_options("resnet20", {"pool": "avg"})  # its global pool is an average already: no option
    with pytest.raises(sc.RecipeError, match="model.pool: must be 'max' or 'avg'"):
        model_options("vgg", {"pool": "min"})
    with pytest.raises(sc.RecipeError, match="export.onnx: unknown key; allowed: nir"):
        sc.parse_recipe({"export": {"onnx": True}})


AVG = {**TINY, "name": "tiny-avg", "model": {**TINY["model"], "pool": "avg"}}


def _check_consumers(path, slim_ckpt, min_accuracy=0.0):
    """The file reloads; spikingjelly and snnTorch give the slim model's predictions on the whole test set."""
    ck = sc.load_checkpoint(slim_ckpt)
    recipe = sc.parse_recipe(ck["recipe"])
    data = load_dataset(recipe.data, recipe.seed)
    T, enc = ck["data"]["T"], ck["data"]["encoding"]
    slim = sc.load_model(slim_ckpt)
    ref = sc.evaluate(slim, data.x_test, data.y_test, T, enc)[2].numpy()
    graph = read_nir(path)
    assert json.loads(graph.metadata["classes"]) == ck["data"]["classes"] and graph.metadata["T"] == str(T)
    for sim in (Simulator(graph), snntorch_simulator(graph)):
        got = simulate(sim, data.x_test, T, enc)
        assert (got.argmax(1) == ref.argmax(1)).all() and np.abs(got - ref).max() <= 1e-4
    assert (ref.argmax(1) == data.y_test.numpy()).mean() >= min_accuracy


def test_dense_and_slim_checkpoints_export_verified(tmp_path):
    """Library calls: a dense checkpoint (closed gates folded into zero weights) and its slim version."""
    recipe = sc.parse_recipe(AVG)
    res = sc.train(recipe, tmp_path / "train", progress=False)
    slim = sc.slim_checkpoint(res.ckpt, tmp_path / "slim.pt").path
    for ckpt in (res.ckpt, slim):
        r = sc.export_nir(ckpt)
        assert r.path == ckpt.with_suffix(".nir") and r.path.is_file() and r.n_samples == 360
        assert r.max_abs_diff <= 1e-4 and r.fold_agreement == 1.0
        assert r.nodes == {"Affine": 1, "Conv2d": 3, "Flatten": 1, "Input": 1, "LIF": 3, "Output": 1, "SumPool2d": 2}
        meta = read_nir_metadata(r.path)
        assert meta["source_sha256"] == sha256(ckpt)
        assert meta["encoding"] == "direct" and json.loads(meta["normalisation"])["formula"] == "(x - mean) / std"
    _check_consumers(slim.with_suffix(".nir"), slim)
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_quickstart_vgg_with_average_pools_trains_slims_and_exports_nir(tmp_path):
    """The quickstart network with model.pool: avg, through the real CLI: train -> slim -> export --nir -> info."""
    quick = sc.load_recipe("recipes/quickstart.yaml").model_dump(mode="json")
    recipe = {**quick, "baseline": False, "model": {**quick["model"], "pool": "avg"},
              "train": {**quick["train"], "epochs": 2},
              "prune": {**quick["prune"], "warmup_epochs": 0, "ramp_epochs": 1, "finetune_epochs": 1}}
    path = write_recipe(tmp_path / "q.yaml", recipe)
    assert cli("train", path, "-o", tmp_path / "q").returncode == 0
    assert cli("slim", tmp_path / "q" / "ckpt.pt").returncode == 0
    res = cli("export", tmp_path / "q" / "slim.pt", "--nir", "-o", tmp_path / "q.nir")
    assert res.returncode == 0, res.stderr
    assert "same predictions, max |Δlogit| 0" in res.stdout and "3 SumPool2d" in res.stdout
    info = cli("info", tmp_path / "q.nir")
    assert info.returncode == 0, info.stderr
    for text in ("features_conv1_conv", "Conv2d", "SumPool2d", "1x8x8", f"format: {NIR_FORMAT}", "T: 4",
                 "encoding: direct", "readout: logits = mean of the Output node over the T steps"):
        assert text in info.stdout, text
    _check_consumers(tmp_path / "q.nir", tmp_path / "q" / "slim.pt", min_accuracy=0.2)  # 2 epochs: above chance (0.1)


@pytest.mark.slow
def test_resnet_run_writes_verified_nir_and_bench_reports_it(tmp_path):
    """A spiking ResNet (residual adds as NIR edges), width 0.125, through `run` with export.nir."""
    recipe = {**TINY, "name": "tiny-resnet", "model": {"name": "resnet20", "width": 0.125},
              "export": {"nir": True}}
    res = cli("run", write_recipe(tmp_path / "r.yaml", recipe), "-o", tmp_path / "r")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r" / "bench.json").read_text())
    n = report["nir"]
    assert n["same_network_as"] == "slim" and n["path"].endswith("model.nir")
    assert n["neurons"] == n["neurons_slim"] == report["models"]["slim"]["neurons"] > 0
    assert n["sops"] == report["models"]["slim"]["sops"] and n["nodes"]["LIF"] == 19
    assert "NIR file `model.nir`" in (tmp_path / "r" / "report.md").read_text()
    _check_consumers(tmp_path / "r" / "model.nir", tmp_path / "r" / "slim.pt")


def test_a_quantised_network_exports_integer_weights_with_the_scales_in_its_neurons(tmp_path):
    """quant (one scale per layer): the NIR file holds integers; each layer's scale divides its bias and its neuron's
    threshold; read back, spikingjelly and snnTorch give the quantised network's predictions and logits; the speck
    check reads the bits. Per-channel scales are refused in one line."""
    recipe = sc.parse_recipe({**AVG, "train": {**AVG["train"], "epochs": 5},
                              "prune": {**AVG["prune"], "finetune_epochs": 2},
                              "quant": {"weights": {"bits": 4, "granularity": "tensor"}}})
    res = sc.train(recipe, tmp_path / "train", progress=False)
    slim = sc.slim_checkpoint(res.ckpt, tmp_path / "slim.pt").path
    r = sc.export_nir(slim)
    assert r.max_abs_diff <= 1e-4
    graph = read_nir(r.path)
    assert graph.metadata["weight_bits"] == "4" and graph.metadata["weight_granularity"] == "tensor"
    scales = json.loads(graph.metadata["weight_scales"])
    for name, node in graph.nodes.items():
        if type(node).__name__ in ("Conv2d", "Affine") and name != "classifier":  # the readout keeps q * scale
            w = np.asarray(node.weight)
            assert np.array_equal(w, np.round(w)) and np.abs(w).max() == 7 and scales[name] > 0, name
    thresholds = [np.asarray(n.v_threshold) for n in graph.nodes.values() if type(n).__name__ == "LIF"]
    assert all(len(np.unique(t)) == 1 and not np.isclose(t.flat[0], 1.0) for t in thresholds)  # one per layer
    _check_consumers(r.path, slim)
    assert not any("floating point" in n for n in check_target(r.path).notes)
    ckpt = sc.load_checkpoint(slim)
    ckpt["quant"]["granularity"] = "channel"
    torch.save(ckpt, tmp_path / "channel.pt")
    with pytest.raises(SnnCompressError, match="integer NIR needs one scale per layer"):
        sc.export_nir(tmp_path / "channel.pt")
