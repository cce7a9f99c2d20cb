"""The slim fine-tune: once the masks are final, train removes the closed channels and trains the slim network."""

import copy
import json

import pytest
import torch
from spikingjelly.activation_based import functional

import snncompress as sc
from snncompress.config import parse_recipe
from snncompress.data import encode
from snncompress.errors import VerificationError
from snncompress.prune.costs.layers import model_layers
from snncompress.prune.costs.sops import SopCost
from snncompress.prune.gates import set_masks
from snncompress.prune.shapes import apply_index, gather
from snncompress.prune.surgery import kept_index
from snncompress.stages import train as train_stage

from .conftest import TINY, cli, kill_training_after, write_recipe
from .test_budget import _tiny_model

# learns within 4 epochs (test accuracy about 0.7), so a wrong cut shows in the logits; surgery before epoch 3
LEARNS = {**TINY, "model": {"name": "vgg", "layers": [16, 32, "M", 32]},
          "data": {"name": "digits", "T": 2, "batch_size": 64}, "train": {"epochs": 4, "optimizer": {"lr": 0.5}}}


def test_the_fine_tune_trains_the_slim_network_and_checkpoints_its_shapes(tmp_path):
    off = {**LEARNS, "train": {**LEARNS["train"], "slim_finetune": False}}
    masked = sc.train(parse_recipe(off), tmp_path / "masked", progress=False)
    slim = sc.train(parse_recipe(LEARNS), tmp_path / "slim", progress=False)
    a, b = (torch.load(r.ckpt, weights_only=True) for r in (masked, slim))
    assert "kept_index" not in a and [m["slim"] for m in masked.metrics] == [False] * 4
    assert [m["slim"] for m in slim.metrics] == [False, False, False, True]  # updates end epochs 1 and 2
    # the checkpoint holds the slim shapes and describes the cut, as slim.pt does
    index, kept = b["kept_index"], {g: int(m.sum()) for g, m in b["masks"].items()}
    assert b["state_dict"]["features.conv2.conv.weight"].shape[:2] == (kept["features.conv2.conv"],
                                                                        kept["features.conv1.conv"])
    assert b["removed"] == {g: (~m).nonzero().flatten().tolist() for g, m in b["masks"].items()}
    assert not any(k.endswith(".gate") for k in b["state_dict"])
    for k, t in b["state_dict"].items():
        assert t.shape == (gather(a["state_dict"][k], index[k]) if k in index else a["state_dict"][k]).shape, k
    # up to the float rounding that flips a spike now and then (the step below is exact)
    assert masked.metrics[-1]["test_acc"] == pytest.approx(slim.metrics[-1]["test_acc"], abs=0.05)


def test_the_slim_network_takes_the_masked_networks_steps(tmp_path):
    net, example, groups, data = _tiny_model({"name": "vgg", "layers": [16, 32, "M", 32]})
    masks = {g.name: torch.arange(g.size) % 3 != 0 for g in groups}
    set_masks(net, groups, masks)
    opt = torch.optim.SGD([p for n, p in net.named_parameters() if not n.endswith(".gate")], lr=0.5, momentum=0.9,
                          weight_decay=5e-4)
    net.train()

    def step(model, optimizer, i):
        x, y = encode(data.x_train[i * 64:(i + 1) * 64], 2, "direct"), data.y_train[i * 64:(i + 1) * 64]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        functional.reset_net(model)
        return loss.item()

    for i in range(3):  # momentum to carry over
        step(net, opt, i)
    slim = copy.deepcopy(net)
    slim_opt = torch.optim.SGD([p for n, p in slim.named_parameters() if not n.endswith(".gate")], lr=0.5,
                               momentum=0.9, weight_decay=5e-4)
    slim_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    index = train_stage._slim_network(slim, slim_opt, masks, groups, example, (data.x_test[:64], 2, "direct"))
    assert slim.features.conv2.conv.weight.shape[0] == int(masks["features.conv2.conv"].sum())
    for i in range(3, 5):  # before a float-rounding flip of a spike (one came at the 4th step here)
        assert step(net, opt, i) == step(slim, slim_opt, i)
        dense = net.state_dict()
        for k, t in slim.state_dict().items():
            assert torch.allclose(t, gather(dense[k], index[k]) if k in index else dense[k], atol=1e-6), k


def test_a_slim_trained_checkpoint_loads_dense_shaped_and_slims_without_a_second_surgery(tmp_path, monkeypatch):
    res = sc.train(parse_recipe(LEARNS), tmp_path, progress=False)
    ckpt = torch.load(res.ckpt, weights_only=True)
    dense = sc.load_model(res.ckpt)  # the gated dense model, closed channels as zeros
    assert dense.features.conv2.conv.weight.shape[0] == 32
    closed = ~ckpt["masks"]["features.conv2.conv"]
    assert closed.any() and dense.features.conv2.conv.weight[closed].abs().sum() == 0

    def no_surgery(*args, **kwargs):
        raise AssertionError("slim ran a surgery on a checkpoint whose weights are slim already")

    monkeypatch.setattr("snncompress.stages.slim.kept_index", no_surgery)
    out = sc.slim_checkpoint(res.ckpt, tmp_path / "slim.pt")
    assert out.equivalence.ok and out.equivalence.same_predictions
    slim = torch.load(tmp_path / "slim.pt", weights_only=True)
    assert all(torch.equal(slim["state_dict"][k], t) for k, t in ckpt["state_dict"].items())
    assert slim["kept_index"] == ckpt["kept_index"]


def test_a_wrong_surgery_stops_training_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    def wrong(model, masks, example):  # the classifier reads other features than the slim convs give it
        index = kept_index(model, masks, example)
        assert "classifier.weight" in index
        cut = index["classifier.weight"][1]
        index["classifier.weight"][1] = list(range(len(cut))) if cut != list(range(len(cut))) else \
            list(range(1, len(cut) + 1))
        return index

    monkeypatch.setattr(train_stage, "kept_index", wrong)
    with pytest.raises(VerificationError, match=r"after the mask update of epoch 2: the slim network differs .* "
                                                r"last checkpoint: .*ckpt.pt \(epoch 1\)") as e:
        sc.train(parse_recipe(LEARNS), tmp_path, progress=False)
    assert "\n" not in str(e.value)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and "kept_index" not in ckpt
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("killed_after", [2, 3, 4], ids=["before-the-surgery", "at-it", "after-it"])
def test_a_run_killed_in_the_slim_fine_tune_resumes_bitwise(tmp_path, killed_after):
    # the last update and the surgery end epoch 2 of 6: killed inside epoch 2 (checkpoint of epoch 1, dense),
    # 3 (of epoch 2, the surgery's, or 1) or 4 (of epoch 3 or 2, slim)
    recipe = write_recipe(tmp_path / "r.yaml", {**LEARNS, "train": {**LEARNS["train"], "epochs": 6},
                                                "prune": {**TINY["prune"], "finetune_epochs": 3}})
    assert cli("train", recipe, "--out", tmp_path / "ref").returncode == 0
    kill_training_after(recipe, tmp_path / "killed", killed_after)
    killed = torch.load(tmp_path / "killed" / "ckpt.pt", weights_only=True)  # metrics are written first: the
    assert killed["epoch"] in (killed_after - 2, killed_after - 1)  # kill may land before that epoch's checkpoint
    assert ("kept_index" in killed) == (killed["epoch"] >= 2)
    res = cli("train", recipe, "--out", tmp_path / "killed", "--resume")
    assert res.returncode == 0, res.stderr
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("ref", "killed"))
    assert a["kept_index"] == b["kept_index"] and a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    for sa, sb in zip(a["train_state"]["optimizer"]["state"].values(), b["train_state"]["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    losses = [[json.loads(line)["train_loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("ref", "killed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_a_checkpoint_of_the_masked_fine_tune_resumes_into_the_slim_one(tmp_path):
    # what an older version wrote: a checkpoint after the last update, still dense, of a recipe that now slims
    # (made here by training the same schedule without its fine-tune epoch, masked, then naming the recipe)
    masked = {**LEARNS, "train": {**LEARNS["train"], "epochs": 3, "slim_finetune": False},
              "prune": {**LEARNS["prune"], "finetune_epochs": 0}}
    out = tmp_path / "run"
    sc.train(parse_recipe(masked), out, progress=False)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and "kept_index" not in ckpt and [h["epoch"] for h in ckpt["history"]] == [1, 2]
    ckpt["recipe"] = parse_recipe(LEARNS).model_dump(mode="json")
    ckpt["recipe"]["train"].pop("slim_finetune")  # an older version's recipe has no such field: the default, on
    torch.save(ckpt, out / "ckpt.pt")
    res = sc.train(parse_recipe(LEARNS), out, progress=False, resume=True)
    assert [m["slim"] for m in res.metrics] == [False, False, False, True]
    assert "kept_index" in torch.load(res.ckpt, weights_only=True)


def test_a_slim_trained_checkpoint_with_a_broken_kept_index_is_refused_in_one_line(tmp_path):
    res = sc.train(parse_recipe(LEARNS), tmp_path / "run", progress=False)
    ckpt = torch.load(res.ckpt, weights_only=True)
    for bad, says in [({**ckpt["kept_index"], "classifier.weight": [None, [999]]}, "classifier.weight"),
                      ("all", "must map tensor names"), ({"nope": [None]}, "'nope' is not a tensor")]:
        path = tmp_path / "bad.pt"
        torch.save({**ckpt, "kept_index": bad}, path)
        out = cli("slim", path)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "kept_index" in out.stderr and says in out.stderr
        assert not (tmp_path / "slim.pt").exists()


def test_the_sop_hold_measures_the_slim_network_as_the_masked_one():
    net, example, groups, data = _tiny_model({"name": "vgg", "layers": [8, 16, "M", 16]})
    cost = SopCost(model_layers(net, example, groups), groups, 2)
    cost.attach(net)
    for lay in cost.layers:  # every layer's inputs fire
        cost.weights[lay.name] = torch.ones(lay.n_in, dtype=torch.float64)
    masks = {g.name: torch.arange(g.size) % 3 != 0 for g in groups}
    set_masks(net, groups, masks)
    cost.hold(masks, 1e3)
    x = encode(data.x_train[:16], 2, "direct")
    net.train()
    net(x)
    sops = [cost.batch_sops()]
    functional.reset_net(net)
    apply_index(net, kept_index(net, masks, example))  # the slim network, the same modules and hooks
    net(x)
    sops.append(cost.batch_sops())
    assert sops[0] is not None and sops[0].requires_grad and sops[0] > 0
    assert sops[1].item() == pytest.approx(sops[0].item(), rel=1e-6)
    cost.remove()


def test_a_slim_trained_checkpoint_is_a_weights_file_like_any_other(tmp_path):
    from snncompress.data import load_dataset
    from snncompress.stages.train import starting_model

    res = sc.train(parse_recipe(LEARNS), tmp_path / "a", progress=False)
    recipe = parse_recipe({**LEARNS, "model": {**LEARNS["model"], "weights": str(res.ckpt)}})
    _, model, _, _ = starting_model(recipe, load_dataset(recipe.data, recipe.seed))
    dense = sc.load_model(res.ckpt).state_dict()  # the removed channels as zeros
    for k, v in model.state_dict().items():
        assert k.endswith(".gate.gate") or torch.equal(v, dense[k]), k
    assert all(g.all() for g in (v for k, v in model.state_dict().items() if k.endswith(".gate.gate")))
