import copy

import torch

import snncompress as sc
from snncompress.prune.pruner import build_pruner
from snncompress.prune.gates import attach_gates
from snncompress.config import parse_recipe

from .conftest import TINY


def test_seeded_training_is_deterministic(tmp_path):
    recipe = parse_recipe({**TINY, "train": {"epochs": 3}, "prune": {**TINY["prune"], "finetune_epochs": 0}})
    a = sc.train(recipe, tmp_path / "a", progress=False)
    b = sc.train(recipe, tmp_path / "b", progress=False)
    assert [m["train_loss"] for m in a.metrics] == [m["train_loss"] for m in b.metrics]
    sa = torch.load(a.ckpt, weights_only=True)
    sb = torch.load(b.ckpt, weights_only=True)
    assert all(torch.equal(sa["state_dict"][k], sb["state_dict"][k]) for k in sa["state_dict"])
    assert all(torch.equal(sa["masks"][k], sb["masks"][k]) for k in sa["masks"])


def test_pruning_reaches_budget_and_records_history(tmp_path):
    res = sc.train(parse_recipe(TINY), tmp_path, progress=False)
    ck = torch.load(res.ckpt, weights_only=True)
    kept = sum(int(m.sum()) for m in ck["masks"].values()) / sum(m.numel() for m in ck["masks"].values())
    assert abs(kept - 0.5) < 0.05
    assert [h["epoch"] for h in ck["history"]] == [1, 2]  # warm-up 1, ramp 2, fine-tune 1 of 4 epochs
    assert all(m.dtype == torch.bool for m in ck["history"][-1]["masks"].values())
    assert ck["metrics"]["epoch"] == 3


def test_closed_channels_are_frozen_and_regrowth_signal_is_collected():
    torch.manual_seed(0)
    recipe = parse_recipe(TINY)
    model = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8, 8])
    x = torch.randn(2, 16, 1, 8, 8)
    attach_gates(model, x)
    groups = sc.channel_groups(model, x)
    pruner = build_pruner(model, groups, recipe.prune, epochs=4)
    mask = torch.tensor([True] * 4 + [False] * 4)
    pruner.load_masks({g.name: mask for g in groups})
    conv, bn = model.features.conv1.conv, model.features.conv1.bn
    before = copy.deepcopy((conv.weight.data, bn.weight.data, bn.running_mean))
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.endswith("gate")], lr=0.5,
                          momentum=0.9, weight_decay=0.1)
    model.train()
    for _ in range(3):
        loss = model(x).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        pruner.after_backward()
        opt.step()
        pruner.after_step()
        from spikingjelly.activation_based import functional
        functional.reset_net(model)
    closed = ~mask
    assert torch.equal(conv.weight.data[closed], before[0][closed])
    assert torch.equal(bn.weight.data[closed], before[1][closed])
    assert torch.equal(bn.running_mean[closed], before[2][closed])
    assert not torch.equal(conv.weight.data[mask], before[0][mask])  # open channels do train
    assert pruner._regrowth[groups[0].name][closed].sum() > 0  # closed gates still get |dL/dgate|
