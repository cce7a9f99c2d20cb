"""Registered models (VGG-16, spiking ResNets, SEW-ResNets, width) and user model factories."""

import os
import sys

import numpy as np
import pytest
import torch
from spikingjelly.activation_based import functional
from spikingjelly.activation_based.neuron import BaseNode

import snncompress as sc
from snncompress.checkpoint import build_model
from snncompress.export.onnx import read_onnx_metadata, to_onnx
from snncompress.export.unroll import UnrolledSNN
from snncompress.runtime.sessions import ort_session
from snncompress.models import FactoryError
from snncompress.prune.gates import attach_gates, set_masks
from snncompress.config import parse_recipe
from snncompress.models.factory import model_options
from snncompress.registry import trusted
from snncompress.evaluation import compare_models

from .conftest import TINY, cli, write_recipe

USER = "tests.user_models"


def _gated(name: str, width: float = 0.125, in_channels: int = 3, size: int = 16, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = sc.create_model(name, in_channels=in_channels, num_classes=10, width=width)
    return attach_gates(model, torch.zeros(2, 2, in_channels, size, size))


def _groups(model: torch.nn.Module, size: int = 16) -> dict[str, sc.ChannelGroup]:
    return {g.name: g for g in sc.channel_groups(model, torch.zeros(2, 2, 3, size, size))}


# ---------------------------------------------------------------- registry, widths, channel groups

@pytest.mark.parametrize("name", sc.list_models())
def test_every_registered_model_builds_from_its_default_options_and_lists_its_stages(name):
    model = sc.create_model(name, in_channels=3, num_classes=10, **{**model_options(name, {}), "width": 0.125}).eval()
    x = torch.rand(2, 3, 3, 32, 32) * 4  # T 2, batch 3; vgg16's five pools need 32x32; strong enough to fire
    with torch.no_grad():
        logits = model(x)
        functional.reset_net(model)
        body = torch.nn.Sequential(*(m for _, m in model.stages()))  # the stages in order are the forward
        functional.set_step_mode(body, "s")
        by_stage = torch.stack([body(x_t) for x_t in x]).mean(0)
    assert logits.shape == (3, 10) and torch.allclose(by_stage, logits, atol=1e-6)


def test_plots_shorten_layer_names_by_their_shared_prefix_whatever_the_model_calls_it():
    from snncompress.plots import short_names

    assert short_names(["features.conv1.conv", "features.conv2.conv"]) == ["conv1.conv", "conv2.conv"]
    assert short_names(["body.0", "body.3"]) == ["0", "3"]
    assert short_names(["stem.conv", "layer1.0.conv1", "classifier"]) == ["stem.conv", "layer1.0.conv1", "classifier"]


def test_width_scales_every_channel_count():
    convs = lambda m: [c.out_channels for c in m.modules() if isinstance(c, torch.nn.Conv2d)]  # noqa: E731
    r19 = sc.create_model("resnet19", in_channels=3, num_classes=10, width=0.125)
    # stem 128 -> 16; stages 128/256/512 -> 16/32/64; 2 convs per block plus 2 downsampling convs
    assert convs(r19) == [16] + [16] * 6 + [32] * 7 + [64] * 5
    v16 = sc.create_model("vgg16", in_channels=3, num_classes=10, width=0.125)
    assert convs(v16) == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    tiny = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8, "M", 3], width=0.1)
    assert convs(tiny) == [1, 1]  # never below one channel


def test_vgg16_runs_in_both_step_modes_on_32x32():
    model = _gated("vgg16", size=32)
    assert len(sc.channel_groups(model, torch.zeros(2, 3, 32, 32))) == 13
    with torch.no_grad():
        assert model(torch.randn(2, 3, 3, 32, 32)).shape == (3, 10)
        functional.reset_net(model)
        functional.set_step_mode(model, "s")
        assert model(torch.randn(3, 3, 32, 32)).shape == (3, 10)
    functional.set_step_mode(model, "m")


def test_resnet19_groups_join_the_residual_adds():
    groups = _groups(_gated("resnet19"))
    stage1 = groups["stem.conv"]
    assert stage1.convs == ["stem.conv", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert stage1.gates == ["stem.sn.gate", "layer1.0.sn2.gate", "layer1.1.sn2.gate", "layer1.2.sn2.gate"]
    # the add comes before sn2, so its gate gates the sum: the downsample branch has no gate of its own
    stage2 = groups["layer2.0.conv2"]
    assert stage2.convs == ["layer2.0.conv2", "layer2.0.downsample.conv", "layer2.1.conv2", "layer2.2.conv2"]
    assert stage2.gates == ["layer2.0.sn2.gate", "layer2.1.sn2.gate", "layer2.2.sn2.gate"]
    assert stage2.bns == ["layer2.0.bn2", "layer2.0.downsample.bn", "layer2.1.bn2", "layer2.2.bn2"]
    assert groups["layer3.0.conv2"].convs == ["layer3.0.conv2", "layer3.0.downsample.conv", "layer3.1.conv2"]
    conv1s = [n for n in groups if n.endswith("conv1")]
    assert len(conv1s) == 8 and all(groups[n].convs == [n] for n in conv1s)
    assert len(groups) == 3 + 8


def test_sew_resnet19_groups_include_the_shortcut_neuron():
    groups = _groups(_gated("sew_resnet19"))
    assert groups["stem.conv"].convs == ["stem.conv", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    stage2 = groups["layer2.0.conv2"]
    assert stage2.convs == ["layer2.0.conv2", "layer2.0.downsample.conv", "layer2.1.conv2", "layer2.2.conv2"]
    # SEW adds spikes: every addend, the downsampling shortcut included, leaves a gated neuron
    assert stage2.gates == ["layer2.0.sn2.gate", "layer2.0.downsample.sn.gate", "layer2.1.sn2.gate",
                            "layer2.2.sn2.gate"]
    assert groups["layer3.0.conv2"].gates == ["layer3.0.sn2.gate", "layer3.0.downsample.sn.gate", "layer3.1.sn2.gate"]
    assert len(groups) == 3 + 8


@pytest.mark.parametrize("name", ["resnet20", "sew_resnet20"])
def test_resnet20_groups(name):
    groups = _groups(_gated(name, width=0.5))
    residual = {n: g.convs for n, g in groups.items() if len(g.convs) > 1}
    assert residual == {
        "stem.conv": ["stem.conv", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"],
        "layer2.0.conv2": ["layer2.0.conv2", "layer2.0.downsample.conv", "layer2.1.conv2", "layer2.2.conv2"],
        "layer3.0.conv2": ["layer3.0.conv2", "layer3.0.downsample.conv", "layer3.1.conv2", "layer3.2.conv2"],
    }
    assert [groups[n].size for n in residual] == [8, 16, 32] and len(groups) == 3 + 9


# ---------------------------------------------------------------- acceptance: slim and ONNX on residual nets

@torch.no_grad()
def _firing(model: torch.nn.Module, x_seq: torch.Tensor) -> torch.nn.Module:
    """BatchNorm statistics measured on ``x_seq`` (with the masks applied) and positive shifts, so
    that every neuron sees inputs of about N(shift, 1) and fires, however few channels it keeps."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batch
        m.bias.uniform_(0.3, 1.0)
    model.train()
    model(x_seq)
    functional.reset_net(model)
    return model.eval()


def _spike_counts(model: torch.nn.Module, x_seq: torch.Tensor) -> dict[str, float]:
    counts: dict[str, float] = {}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: counts.__setitem__(n, float(out.sum())))
               for n, m in model.named_modules() if isinstance(m, BaseNode)]
    with torch.no_grad():
        model(x_seq)
    functional.reset_net(model)
    for h in handles:
        h.remove()
    return counts


@pytest.mark.parametrize("name", ["resnet19", "sew_resnet19"])
@pytest.mark.slow
def test_slim_and_onnx_equal_the_masked_residual_net(name):
    T = 4
    model = _gated(name)
    x = torch.randn(48, 3, 16, 16) * 2
    groups = sc.channel_groups(model, x[:2])
    gen = torch.Generator().manual_seed(1)
    keep = {}
    for g in groups:  # remove at least half of every group, residual groups included; keep at least one
        n_keep = int(torch.randint(1, g.size // 2 + 1, (1,), generator=gen))
        keep[g.name] = torch.zeros(g.size, dtype=torch.bool)
        keep[g.name][torch.randperm(g.size, generator=gen)[:n_keep]] = True
    set_masks(model, groups, keep)
    _firing(model, x.unsqueeze(0).repeat(T, 1, 1, 1, 1))

    spikes = _spike_counts(model, x.unsqueeze(0).repeat(T, 1, 1, 1, 1))
    assert all(v > 0 for v in spikes.values()), spikes  # every neuron fires: the comparison is not vacuous

    slim = sc.slim(model, keep, x[:2])
    convs = {n: m for n, m in slim.named_modules() if isinstance(m, torch.nn.Conv2d)}
    for g in groups:
        assert all(convs[c].out_channels == int(keep[g.name].sum()) for c in g.convs), g.name
    eq = compare_models(model, slim, x, T=T, encoding="direct")
    assert eq.ok, eq

    wrapper = UnrolledSNN(slim, T, "direct").eval()
    sess = ort_session(to_onnx(wrapper, x[:2]).SerializeToString())
    xr = torch.randn(32, 3, 16, 16) * 2
    got = sess.run(None, {sess.get_inputs()[0].name: xr.numpy()})[0]
    with torch.no_grad():
        ref = wrapper(xr).numpy()
        masked = UnrolledSNN(model, T, "direct")(xr).numpy()
    assert np.array_equal(got.argmax(1), ref.argmax(1)) and np.array_equal(got.argmax(1), masked.argmax(1))
    assert np.abs(got - ref).max() <= 1e-4


# ---------------------------------------------------------------- recipes

def _recipe_error(model: dict) -> str:
    with pytest.raises(sc.RecipeError) as e:
        parse_recipe({"model": model})
    return str(e.value)


def test_recipe_model_fields():
    assert parse_recipe({"model": {"name": "resnet19", "width": 0.25}}).model.options == {"width": 0.25}
    assert model_options("vgg", parse_recipe({}).model.options)["layers"] == [64, 128, "M", 256, "M", 256]
    msg = _recipe_error({"name": "resnet99"})
    assert "model.name: unknown model 'resnet99'; registered:" in msg and "sew_resnet19" in msg and "vgg16" in msg
    with pytest.raises(sc.RecipeError, match=r"model.layers: unknown key; allowed: neuron, width \(model resnet20\)"):
        model_options("resnet20", {"layers": [8]})  # the builder's own signature says what it takes
    with pytest.raises(sc.RecipeError, match="model.width: must be > 0, got 0"):
        model_options("resnet20", {"width": 0})
    assert "not both" in _recipe_error({"name": "vgg", "factory": f"{USER}:small_snn"})
    assert "model.kwargs: only for a factory" in _recipe_error({"name": "vgg", "kwargs": {"a": 1}})
    assert "model.width: only for registered models" in _recipe_error({"factory": f"{USER}:small_snn", "width": 2})
    assert "model.kwargs: in_channels and num_classes come from the data" in _recipe_error(
        {"factory": f"{USER}:small_snn", "kwargs": {"num_classes": 3}})


@pytest.mark.parametrize("bad", ["small_snn", "tests.user_models", "tests/user_models.py:small_snn",
                                 "tests.user_models:small snn", "a..b:c", ":f", "a:"])
def test_bad_factory_strings(bad):
    msg = _recipe_error({"factory": bad})
    assert "model.factory: must be 'package.module:function'" in msg and repr(bad) in msg


# ---------------------------------------------------------------- user factories

def _build(factory: str, kwargs: dict | None = None, trust: bool = True) -> torch.nn.Module:
    return build_model({"factory": factory, "kwargs": kwargs if kwargs is not None else
                        {"in_channels": 1, "num_classes": 10}}, torch.zeros(2, 3, 1, 8, 8), 10, trust)


@pytest.mark.parametrize("factory, fragments", [
    (f"{USER}:grouped_conv", ["body.4 (Conv2d, groups=2)", "grouped"]),
    (f"{USER}:qif_neurons", ["body.2 (QIFNode)", "supported: IFNode, LIFNode"]),
    (f"{USER}:not_a_module", ["did not return an nn.Module (got dict)"]),
    (f"{USER}:no_mean_over_t", ["multi-step forward", "[B, classes] = [3, 10], got [2, 3, 10]"]),
    (f"{USER}:time_axis_by_hand", ["fails when traced in single-step mode on [B, C, H, W]"]),
    (f"{USER}:NOT_CALLABLE", ["not callable (int)"]),
    (f"{USER}:missing", ["has no attribute 'missing'"]),
    ("tests.no_such_module:f", ["cannot import 'tests.no_such_module'", "ModuleNotFoundError"]),
])
def test_factory_refusals_name_the_factory_and_the_module(factory, fragments):
    with pytest.raises(FactoryError) as e:
        _build(factory)
    msg = str(e.value)
    assert f"model factory {factory!r}" in msg and "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_factory_gets_data_kwargs_only_if_it_accepts_them():
    assert isinstance(_build(f"{USER}:no_data_kwargs", {}), torch.nn.Module)
    recipe = parse_recipe({"model": {"factory": f"{USER}:no_data_kwargs"}})
    with trusted(f"{USER}:no_data_kwargs"):
        assert sc.checkpoint.model_spec(recipe, 1, 10) == {"factory": f"{USER}:no_data_kwargs", "kwargs": {}}
    recipe = parse_recipe({"model": {"factory": f"{USER}:small_snn", "kwargs": {"hidden": 4}}})
    with trusted(f"{USER}:small_snn"):
        assert sc.checkpoint.model_spec(recipe, 1, 10)["kwargs"] == {"hidden": 4, "in_channels": 1, "num_classes": 10}
    with pytest.raises(FactoryError, match="is not trusted"):  # the trust ended with the block
        sc.checkpoint.model_spec(recipe, 1, 10)


def test_channels_that_reach_no_neuron_are_not_a_prunable_group():
    model = _build(f"{USER}:analog_head")
    x = torch.randn(16, 1, 8, 8) * 2
    groups = sc.channel_groups(model, x[:2])
    assert [(g.name, g.gates) for g in groups] == [("body.0", ["body.2.gate"])]  # body.4 has no gate: stays dense
    keep = {"body.0": torch.arange(8) < 3}
    set_masks(model, groups, keep)
    slim = sc.slim(model, keep, x[:2])
    assert [m.out_channels for m in slim.modules() if isinstance(m, torch.nn.Conv2d)] == [3, 16]
    assert compare_models(model, slim, x, T=3, encoding="direct").ok


def test_unsupported_factory_model_is_refused_before_training(tmp_path):
    recipe = parse_recipe({**TINY, "model": {"factory": f"{USER}:grouped_conv"}})
    with pytest.raises(FactoryError, match=r"body\.4 \(Conv2d, groups=2\)"):
        sc.train(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing written, not even the directory


@pytest.fixture(scope="module")
def factory_run(tmp_path_factory):
    """`snncompress run` of a recipe whose model is a user factory."""
    d = tmp_path_factory.mktemp("factory")
    recipe = write_recipe(d / "user.yaml", {**TINY, "model": {"factory": f"{USER}:small_snn",
                                                              "kwargs": {"hidden": 6}}})
    res = cli("run", recipe, "--out", d / "out")
    assert res.returncode == 0, res.stderr + res.stdout
    return d / "out"


@pytest.mark.slow
def test_factory_model_runs_through_every_stage(factory_run):
    for f in ["train/ckpt.pt", "slim.pt", "model.onnx", "dense.onnx", "bench.json"]:
        assert (factory_run / f).is_file(), f
    ck = torch.load(factory_run / "slim.pt", weights_only=True)
    assert ck["model"] == {"factory": f"{USER}:small_snn", "kwargs": {"hidden": 6, "in_channels": 1, "num_classes": 10}}
    assert ck["masks"]["body.0"].numel() == 6 and not ck["masks"]["body.4"].all()  # pruned and slimmed
    assert ck["verification"]["max_abs_diff"] <= 1e-4


@pytest.mark.slow
def test_factory_checkpoint_needs_trust_in_every_command(factory_run, tmp_path):
    ckpt = factory_run / "train" / "ckpt.pt"
    refusals = [cli("slim", ckpt, "-o", tmp_path / "s.pt"), cli("export", factory_run / "slim.pt", "--onnx", "-o",
                tmp_path / "m.onnx"), cli("bench", "--dense", ckpt, "--slim", factory_run / "slim.pt", "-o", tmp_path)]
    for res in refusals:
        assert res.returncode == 1 and "Traceback" not in res.stderr + res.stdout
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert f"'{USER}:small_snn' is not trusted" in res.stderr and "--trust-code" in res.stderr
    assert not list(tmp_path.iterdir())
    with pytest.raises(FactoryError, match="not trusted"):
        sc.load_model(ckpt)

    info = cli("info", ckpt)  # describing a checkpoint imports nothing, so it needs no trust
    assert info.returncode == 0 and f"factory {USER}:small_snn" in info.stdout and "not imported" in info.stdout
    res = cli("--trust-factory", "slim", ckpt, "-o", tmp_path / "s.pt")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "s.pt").is_file()
    model = sc.load_model(tmp_path / "s.pt", trust_factory=True)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 2


@pytest.mark.slow
def test_untrusted_factory_checkpoint_never_imports_its_module(factory_run, tmp_path, monkeypatch):
    sentinel = tmp_path / "imported"
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "sentinel_factory.py").write_text(
        f"open({str(sentinel)!r}, 'w').close()  # importing this module leaves a trace\n"
        f"from {USER} import small_snn\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("PYTHONPATH", f"{pkg}:{os.environ.get('PYTHONPATH', '')}")
    ck = torch.load(factory_run / "train" / "ckpt.pt", weights_only=True)
    ck["model"]["factory"] = "sentinel_factory:small_snn"
    torch.save(ck, tmp_path / "ckpt.pt")

    with pytest.raises(FactoryError, match="'sentinel_factory:small_snn' is not trusted"):
        sc.load_model(tmp_path / "ckpt.pt")
    with pytest.raises(FactoryError, match="not trusted"):
        sc.slim_checkpoint(tmp_path / "ckpt.pt", tmp_path / "s.pt")
    assert "sentinel_factory" not in sys.modules
    for args in (["slim", tmp_path / "ckpt.pt"], ["export", tmp_path / "ckpt.pt", "--onnx"]):
        res = cli(*args)
        assert res.returncode == 1 and "'sentinel_factory:small_snn' is not trusted" in res.stderr, res.stderr
    assert cli("info", tmp_path / "ckpt.pt").returncode == 0
    assert not sentinel.exists()
    # the same checkpoint with trust does import it: the sentinel is a real witness
    res = cli("--trust-factory", "export", tmp_path / "ckpt.pt", "--onnx")
    assert res.returncode == 0, res.stderr
    assert sentinel.exists()


# ---------------------------------------------------------------- training smoke

def test_train_resnet20_with_pruning_and_slim(tmp_path):
    recipe = parse_recipe({**TINY, "model": {"name": "resnet20", "width": 0.25},
                           "train": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.1}},
                           "prune": {**TINY["prune"], "warmup_epochs": 0, "ramp_epochs": 1, "finetune_epochs": 1}})
    res = sc.train(recipe, tmp_path, progress=False)
    assert res.metrics[-1]["kept_channels"] < 0.6
    masks = torch.load(res.ckpt, weights_only=True)["masks"]
    assert masks["stem.conv"].numel() == 4 and len(masks) == 12
    slim = sc.slim_checkpoint(res.ckpt, tmp_path / "slim.pt")
    assert slim.equivalence.ok and slim.params[1] < slim.params[0]


def test_export_falls_back_to_layer_order_for_a_readout_that_is_not_the_mean(tmp_path):
    from snncompress.errors import VerificationError

    recipe = parse_recipe({**TINY, "model": {"factory": f"{USER}:summed_readout"}, "prune": None,
                           "train": {"epochs": 1}})
    ckpt = sc.train(recipe, tmp_path, progress=False).ckpt
    r = sc.export_onnx(ckpt, tmp_path / "auto.onnx", trust_factory=True)  # train's trust ended with the call
    assert r.order == "layer" and r.max_abs_diff <= 1e-4
    assert read_onnx_metadata(r.path)["unroll_order"] == "layer"
    with pytest.raises(VerificationError, match="unrolled by step"):
        sc.export_onnx(ckpt, tmp_path / "step.onnx", order="step", trust_factory=True)
    assert not (tmp_path / "step.onnx").exists()
