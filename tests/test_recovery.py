"""What helps a pruned network recover: BatchNorm statistics re-estimated after every mask change, distillation from
the starting weights, and an L1 pre-training whose BatchNorm scales are free of weight decay."""

import copy

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

import snncompress as sc
from snncompress.config import parse_recipe
from snncompress.errors import RecipeError
from snncompress.prune.gates import attach_gates, set_masks
from snncompress.prune.pruner import build_pruner
from snncompress.stages.train import distillation_loss, make_optimizer, train_step

from .conftest import TINY


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("batches", [2, 0])
def test_batchnorm_statistics_are_re_estimated_after_a_mask_change(batches):
    torch.manual_seed(0)
    model = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8, 8])
    x = torch.rand(2, 4, 1, 8, 8)
    attach_gates(model, x)
    for bn in _bns(model):  # statistics of another network
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    data = [torch.rand(2, 4, 1, 8, 8) for _ in range(3)]
    asked = []
    recipe = parse_recipe({**TINY, "prune": {"method": "l1", "keep": 0.5, "regrow": 0, "warmup_epochs": 0,
                                             "ramp_epochs": 1, "finetune_epochs": 0, "recalibrate_bn": batches}})
    groups = sc.channel_groups(model, x)
    pruner = build_pruner(model, groups, recipe.prune, 1, batches=lambda n: asked.append(n) or data[:n])
    model.eval()
    pruner.begin_epoch(0)
    entry = pruner.end_epoch(0)
    assert entry["pruned"] > 0 and not model.training  # the caller's mode is restored
    # the expected statistics: the plain average over the first `batches` batches, through the pruned network
    expected = copy.deepcopy(model)
    set_masks(expected, groups, entry["masks"])
    for bn in _bns(expected):
        bn.reset_running_stats()
        bn.momentum = None
    expected.train()
    with torch.no_grad():
        for b in data[:batches]:
            expected(b)
            functional.reset_net(expected)
    for got, want in zip(_bns(model), _bns(expected)):
        if batches:
            assert torch.allclose(got.running_mean, want.running_mean, atol=1e-6)
            assert torch.allclose(got.running_var, want.running_var, atol=1e-6)
            assert got.momentum == 0.1
        else:  # off: the old statistics stay
            assert torch.all(got.running_mean == 5.0)
    assert asked == ([batches] if batches else [])
    pruner.remove()


def test_the_distillation_loss_is_the_softened_kl_and_drives_the_gradient():
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 3.0, 1.0]])
    p, log_q = torch.softmax(t / 2, 1), torch.log_softmax(s / 2, 1)
    assert distillation_loss(s, t, 2.0).item() == pytest.approx((p * (p.log() - log_q)).sum().item() * 4, rel=1e-6)
    assert distillation_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-7)

    torch.manual_seed(0)
    student = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8, 8])
    teacher = copy.deepcopy(student).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.rand(2, 4, 1, 8, 8), torch.randint(0, 10, (4,))
    cfg = parse_recipe({"model": {"weights": "w.pt"}, "train": {"distill": {"alpha": 1.0, "temperature": 3.0}}})

    def grads(distill):
        net = copy.deepcopy(student).train()
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        train_step(net, x, y, opt, None, torch.autocast("cpu", enabled=False), teacher=distill and teacher,
                   distill=distill)
        return [p.grad.clone() for p in net.parameters()]

    # alpha 1: the gradient is that of the distillation loss alone, not of the cross-entropy
    reference = copy.deepcopy(student).train()
    with torch.no_grad():
        target = teacher(x)
    functional.reset_net(teacher)
    distillation_loss(reference(x), target, 3.0).backward()
    want = [p.grad for p in reference.parameters()]
    got = grads(cfg.train.distill)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
    assert not all(torch.allclose(g, w, atol=1e-6) for g, w in zip(grads(None), want))


def test_distillation_trains_against_the_starting_weights(tmp_path):
    dense = sc.train(parse_recipe({**TINY, "prune": None, "train": {"epochs": 1}}), tmp_path / "dense", progress=False)
    base = {**TINY, "model": {**TINY["model"], "weights": str(dense.ckpt)}, "train": {**TINY["train"], "epochs": 3},
            "prune": {**TINY["prune"], "warmup_epochs": 0, "ramp_epochs": 1}}
    plain = sc.train(parse_recipe(base), tmp_path / "plain", progress=False)
    taught = sc.train(parse_recipe({**base, "train": {**base["train"], "distill": {"alpha": 0.9}}}),
                      tmp_path / "taught", progress=False)
    assert [m["train_loss"] for m in plain.metrics] != [m["train_loss"] for m in taught.metrics]
    with pytest.raises(RecipeError, match="train.distill: needs model.weights"):
        parse_recipe({**TINY, "train": {"distill": {"alpha": 0.5}}})


def test_batchnorm_parameters_can_be_kept_free_of_weight_decay():
    model = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8, 8])
    norms = {id(p) for bn in _bns(model) for p in bn.parameters()}
    for decay, groups in [(True, 1), (False, 2)]:
        cfg = parse_recipe({"train": {"optimizer": {"weight_decay": 1e-3, "bn_decay": decay}}}).train
        opt = make_optimizer(model, cfg)
        assert len(opt.param_groups) == groups
        for g in opt.param_groups:
            assert g["weight_decay"] == (1e-3 if decay or not {id(p) for p in g["params"]} & norms else 0.0)
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
