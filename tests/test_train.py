import copy

import pytest

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


STRUCTURED = ["sca", "criticality", "random", "l1", "bn"]
HOST_READS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def _pruned_model(method: str, epochs: int = 3):
    """A gated VGG with the recipe's pruner (warm-up 1, ramp 1, fine-tune 1), its optimiser and a batch."""
    from snncompress.stages.train import make_optimizer

    torch.manual_seed(0)
    family = {"sparsity": 0.5} if method in ("pq", "criticality_unstructured") else {"keep": 0.5, "regrow": 0.1}
    if method == "criticality":  # measured in the training steps (the paper's measure at the update runs no step)
        family["options"] = {"measure": "training"}
    recipe = parse_recipe({**TINY, "train": {"epochs": epochs}, "prune": {
        "method": method, **family, "warmup_epochs": 1, "ramp_epochs": 1, "finetune_epochs": 1, "min_channels": 1}})
    model = sc.create_model("vgg", in_channels=1, num_classes=10, layers=[8, 8])
    x = torch.randn(2, 8, 1, 8, 8)
    attach_gates(model, x)
    opt = make_optimizer(model, recipe.train)
    pruner = build_pruner(model, sc.channel_groups(model, x), recipe.prune, epochs, optimizer=opt)
    return model, pruner, opt, x, torch.randint(0, 10, (8,))


@pytest.mark.parametrize("method", [*STRUCTURED, "criticality_unstructured", "pq"])
def test_a_training_step_reads_nothing_back_to_the_host(method, monkeypatch):
    # On a GPU every read of a value back to the host (.item(), .cpu(), bool(t), ...) makes the step wait
    # for the device. The step (forward, the method's penalty, hooks, backward, after_backward, optimiser,
    # after_step) must make none; the host reads the statistics only at a mask update.
    from snncompress.stages.train import train_step
    from spikingjelly.activation_based import functional

    model, pruner, opt, x, y = _pruned_model(method)
    pruner.begin_epoch(1)  # a scoring epoch: every hook is active
    model.train()

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{name}() inside the training step")
        return read

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(name))
        loss, hits = train_step(model, x, y, opt, pruner, torch.autocast("cpu", enabled=False))
    functional.reset_net(model)
    assert torch.isfinite(loss) and 0 <= int(hits) <= len(y)
    stats = pruner.statistics()
    assert all(t.device == x.device for t in stats)  # the accumulators live where the model does
    if method in ("sca", "criticality", "criticality_unstructured"):
        assert all(float(t.abs().sum()) > 0 for t in stats)  # and the step did accumulate into them


@pytest.mark.parametrize("method", ["sca", "criticality", "pq"])
def test_scoring_hooks_run_only_in_epochs_that_feed_a_mask_update(method):
    # epochs 0..2: warm-up (no update reads it), ramp (update at its end), frozen fine-tune
    from snncompress.stages.train import train_step
    from spikingjelly.activation_based import functional

    model, pruner, opt, x, y = _pruned_model(method)
    neurons = [m for n, m in model.named_modules() if n.endswith("spike")]
    model.train()
    for epoch, scoring in ((0, False), (1, True), (2, False)):
        pruner.begin_epoch(epoch)
        if method == "sca":  # the stored membrane potentials cost one activation per neuron
            assert all(n.store_v_seq == scoring for n in neurons)
        accumulators = pruner._grad.values() if method == "pq" else pruner.statistics()
        before = [t.clone() for t in accumulators]
        train_step(model, x, y, opt, pruner, torch.autocast("cpu", enabled=False))
        functional.reset_net(model)
        changed = any(not torch.equal(a, b) for a, b in zip(before, accumulators))
        assert changed == scoring, (epoch, method)
    pruner.remove()
    assert not any(n.store_v_seq for n in neurons)


def test_a_diverged_loss_stops_training_with_one_line_and_no_checkpoint(tmp_path):
    recipe = parse_recipe({**TINY, "model": {"factory": "tests.user_models:diverging"}})
    with pytest.raises(sc.SnnCompressError, match=r"^training diverged: the loss is nan in epoch 0; stopped; "
                                                  r"last good checkpoint: none \(no epoch finished\)$"):
        sc.train(recipe, tmp_path, progress=False)
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "best.pt").exists()
