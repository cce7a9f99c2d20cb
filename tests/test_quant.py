"""Quantisation-aware training (quant:): the deployed weights, BatchNorm folded, train as integers of the recipe's
bits; checkpoints hold the float weights and the network computes with the integers; resumes are bitwise."""

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import snncompress as sc
from snncompress.config import QuantWeightsCfg, parse_recipe
from snncompress.data import load_dataset
from snncompress.errors import RecipeError, SnnCompressError
from snncompress.evaluation import batch_logits
from snncompress.export.fold import fold_batchnorm
from snncompress.prune.costs.memory import model_weight_bytes
from snncompress.quant import FakeQuant, attach_fake_quant, detach_fake_quant, quantize
from snncompress.runtime.sessions import runtime_session

from .conftest import TINY, cli, kill_training_after, write_recipe
from .test_resume import _same_checkpoints

# 6 epochs: the masks are final after epoch 2, then 3 epochs of slim fine-tune (quantised with start: finetune)
QAT = {**TINY, "train": {"epochs": 6, "optimizer": {"name": "sgd", "lr": 0.1}},
       "prune": {**TINY["prune"], "finetune_epochs": 3}, "quant": {"weights": {"bits": 4}}}


def test_fake_quant_gives_the_quantised_weight_and_passes_the_gradient_straight_through():
    w = torch.randn(6, 3, 3, 3, requires_grad=True)
    q, scale = quantize(w.detach(), 4, "channel")
    assert q.abs().max() <= 7 and torch.equal(q, q.round()) and scale.shape == (6, 1, 1, 1)
    assert torch.allclose(scale.flatten(), w.detach().abs().amax(dim=(1, 2, 3)) / 7)
    out = FakeQuant(4, "channel")(w)
    assert torch.allclose(out, q * scale) and not torch.equal(out, w)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    q, scale = quantize(w.detach(), 8, "tensor")
    assert scale.numel() == 1 and q.abs().max() == 127
    # with a BatchNorm after the conv, the folded weight w * gamma / sigma is what is quantised
    bn = nn.BatchNorm2d(6).eval()
    bn.weight.data.uniform_(0.5, 2)
    bn.running_var.uniform_(0.5, 2)
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().view(-1, 1, 1, 1)
    folded = FakeQuant(4, "channel", bn)(w).detach() * s
    q, scale = quantize(folded, 4, "channel")
    assert torch.allclose(folded, q * scale, atol=1e-6)


def _integers(model: nn.Module, example: torch.Tensor, bits: int) -> None:
    """Every conv and linear weight of the deployed network (BatchNorm folded) is an integer of ``bits`` bits times
    its channel's scale."""
    deployed = copy.deepcopy(model).eval()
    assert fold_batchnorm(deployed, example) > 0
    for m in deployed.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach().double()
            scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / (2 ** (bits - 1) - 1)
            ratio = w / torch.where(scale > 0, scale, 1)
            assert (ratio - ratio.round()).abs().max() < 1e-4, m


def test_a_quantised_training_holds_the_integers_it_deploys(tmp_path):
    recipe = parse_recipe(QAT)
    res = sc.train(recipe, tmp_path / "out", progress=False)
    ckpt = sc.load_checkpoint(res.ckpt)
    assert ckpt["quant"] == {"bits": 4, "granularity": "channel"}
    assert not any("parametrizations" in k for k in ckpt["state_dict"])  # the usual names: the float weights
    model = sc.load_model(res.ckpt)
    data = load_dataset(recipe.data, recipe.seed)
    # the checkpoint's network is the one the training evaluated: quantised
    assert sc.evaluate(model, data.x_test, data.y_test, 2)[1] == res.metrics[-1]["test_acc"]
    example = torch.zeros(1, 2, 1, 8, 8)
    _integers(model, example, 4)
    # the slim stage keeps the integers
    sc.slim_checkpoint(res.ckpt, tmp_path / "slim.pt")
    _integers(sc.load_model(tmp_path / "slim.pt"), example, 4)
    # the memory budget unit and the bench count 4 bits per weight
    assert model_weight_bytes(model, 4) < model_weight_bytes(model, 32) / 4
    # ONNX: the convs on spikes are integer convs (int8 weights behind DequantizeLinear, uint8 spikes), verified by
    # onnxruntime at export; OpenVINO runs them and gives PyTorch's quantised logits
    r = sc.export_onnx(tmp_path / "slim.pt")
    proto = onnx.load(r.path)
    int8 = {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    dq = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    on_spikes = [c for c in convs if dq.get(c.input[1]) in int8]
    assert len(on_spikes) == len(convs) - 1  # all but the conv on the image (computed once: direct encoding)
    assert {p.key: p.value for p in proto.metadata_props}["weight_bits"] == "4"
    ref = sc.evaluate(sc.load_model(tmp_path / "slim.pt"), data.x_test, data.y_test, 2)[2].numpy()
    for runtime in ("onnxruntime", "openvino"):
        session = runtime_session(runtime, r.path, threads=1)
        got = batch_logits(lambda inp: session(inp.numpy()), data.x_test, 2, "direct")
        assert (got.argmax(1) == ref.argmax(1)).all() and np.abs(got - ref).max() <= 1e-4, runtime


def test_quantising_from_the_first_epoch_and_per_tensor(tmp_path):
    recipe = parse_recipe({**QAT, "quant": {"weights": {"bits": 8, "granularity": "tensor"}, "start": "begin"}})
    res = sc.train(recipe, tmp_path, progress=False)
    model = sc.load_model(res.ckpt)
    deployed = copy.deepcopy(model).eval()
    fold_batchnorm(deployed, torch.zeros(1, 2, 1, 8, 8))
    for m in deployed.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach().double()
            ratio = w / (w.abs().max() / 127)
            assert (ratio - ratio.round()).abs().max() < 1e-4 and len(torch.unique(ratio.round())) <= 255


def test_attaching_and_baking_leave_the_parameters_and_a_float_model_alone():
    model = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[4, 8])
    example = torch.zeros(2, 2, 1, 8, 8)
    params = list(model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attach_fake_quant(model, example, QuantWeightsCfg(bits=2))
    assert model.training and set(map(id, model.parameters())) == set(map(id, params))  # an optimiser keeps them
    detach_fake_quant(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats too


@pytest.mark.slow
def test_a_quantised_training_resumes_bitwise(tmp_path):
    recipe = write_recipe(tmp_path / "q.yaml", QAT)
    ref = cli("train", recipe, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    kill_training_after(recipe, tmp_path / "killed", 4)  # inside the quantised slim fine-tune
    res = cli("train", recipe, "--out", tmp_path / "killed", "--resume")
    assert res.returncode == 0, res.stderr
    _same_checkpoints(tmp_path / "ref" / "ckpt.pt", tmp_path / "killed" / "ckpt.pt")


def test_quant_recipes_and_checkpoint_entries_are_checked(tmp_path):
    with pytest.raises(RecipeError, match=r"quant.weights.bits: must be less than or equal to 8, got 16"):
        parse_recipe({**QAT, "quant": {"weights": {"bits": 16}}})
    with pytest.raises(RecipeError, match="quant.start: finetune starts when the masks are final"):
        parse_recipe({**QAT, "prune": None})
    with pytest.raises(RecipeError, match="quant: .* pq is unstructured"):
        parse_recipe({**QAT, "prune": {"method": "pq", "sparsity": 0.5}, "quant": {"start": "begin"}})
    assert parse_recipe(QAT).dense().quant.start == "begin"  # the baseline has no masks to wait for
    res = sc.train(parse_recipe({**TINY, "train": {**TINY["train"], "epochs": 2},
                                 "prune": {**TINY["prune"], "warmup_epochs": 0, "ramp_epochs": 1,
                                           "finetune_epochs": 1},
                                 "quant": {"start": "begin"}}), tmp_path, progress=False)
    ckpt = sc.load_checkpoint(res.ckpt)
    ckpt["quant"] = {"bits": 99, "granularity": "channel"}
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(SnnCompressError, match=r"bad.pt: quant entry must be \{bits: 2-8, granularity: channel \| "
                                               r"tensor\}, got \{'bits': 99"):
        sc.load_model(tmp_path / "bad.pt")


def test_torch_pruning_criteria_and_a_memory_budget_at_the_quantised_bit_width(tmp_path):
    """tp_taylor reads the float weights and their gradients on its copy of a quantised model; the memory unit
    counts 8 bits per weight and selects the bytes the slim model holds."""
    recipe = parse_recipe({**QAT, "prune": {**QAT["prune"], "method": "tp_taylor", "budget_unit": "memory"},
                           "quant": {"weights": {"bits": 8}, "start": "begin"}})
    res = sc.train(recipe, tmp_path, progress=False)
    sc.slim_checkpoint(res.ckpt, tmp_path / "slim.pt")
    dense, slim = sc.load_model(res.ckpt), sc.load_model(tmp_path / "slim.pt")
    assert res.budget["dense"] == model_weight_bytes(dense, 8) and res.budget["selected"] == model_weight_bytes(slim, 8)
    assert res.budget["selected"] <= res.budget["target"]


def test_a_run_that_exports_nir_needs_one_scale_per_layer():
    with pytest.raises(RecipeError, match="export.nir: integer NIR needs one scale per layer"):
        parse_recipe({**QAT, "export": {"nir": True}})
    assert parse_recipe({**QAT, "export": {"nir": True}, "quant": {"weights": {"granularity": "tensor"}}}).export.nir


def test_export_int8_is_refused_with_what_replaces_it(tmp_path):
    res = cli("export", tmp_path / "none.pt", "--onnx", "--int8")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "export --int8 was removed" in res.stderr and "quant section" in res.stderr
