"""The train stage: a seeded training loop (deterministic on CPU) with the recipe's pruner, checkpoints
written atomically every epoch, exact resume."""

from __future__ import annotations

import copy
import json
import math
import random
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from spikingjelly.activation_based import functional
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from .. import __version__, distributed
from ..artifacts import CKPT_FORMAT, check_output, load_checkpoint, locked, remove_temporaries, save_torch, write_text
from ..checkpoint import build_model, check_model_options, load_weights, model_spec, recipe_of
from ..config import DistillCfg, Recipe, TrainCfg
from ..data import EVAL_BATCH, Dataset, encode, eval_batches, load_dataset, to_steps
from ..data.datasets import Pairs
from ..data.augment import random_crop_flip
from ..errors import MaskError, SnnCompressError, VerificationError, first_line
from ..evaluation import compare_models, evaluate
from ..layout import BEST, CKPT, METRICS
from ..prune.gates import ChannelGroup, get_masks, neuron_of
from ..prune.costs import CostUnit, build_unit
from ..prune.groups import channel_groups
from ..prune.pruner import Pruner, build_pruner
from ..prune.shapes import KeptIndex, apply_index, removed_channels, slice_optimizer
from ..prune.surgery import kept_index
from ..quant import attach_fake_quant, detach_fake_quant, is_fake_quant, load_plain_state_dict, plain_state_dict
from ..registry import trusted


@dataclass
class TrainResult:
    out_dir: Path
    ckpt: Path  # last epoch
    best: Path  # best test accuracy among epochs at the final budget
    metrics: list[dict]
    budget: dict | None = None  # a cost unit's last update: {unit, dense, target, selected, round_to}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """torch's deterministic algorithms for the block; the caller's setting afterwards."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when torch sees a GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SnnCompressError("train.device: cuda was asked for, but torch sees no CUDA device "
                               "(CPU-only torch build or no GPU); use auto or cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def make_optimizer(model: nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
    """The recipe's optimiser over every parameter but the gates (they carry masks, not weights); with
    ``optimizer.bn_decay: false`` the BatchNorm parameters are a second group without weight decay."""
    o = cfg.optimizer
    norms = set() if o.bn_decay else {id(p) for m in model.modules()
                                      if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    params = [p for n, p in model.named_parameters() if not n.endswith(".gate")]
    groups = [{"params": [p for p in params if id(p) not in norms]}]
    if norms:
        groups.append({"params": [p for p in params if id(p) in norms], "weight_decay": 0.0})
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    return cls(groups, lr=o.lr, weight_decay=o.weight_decay)


@torch.no_grad()
def evaluate_sharded(model: nn.Module, x: torch.Tensor, y: torch.Tensor, T: int, encoding: str = "direct",
                     batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """(mean loss, accuracy) like :func:`evaluate`, each rank running every world-size-th batch.

    Every rank draws every batch's input (cheap), so Poisson spikes are those of :func:`evaluate`.
    """
    model.eval()
    device = next(model.parameters()).device
    rank, world = distributed.rank(), distributed.world_size()
    loss_sum, correct, start = 0.0, 0, 0
    for i, inp in enumerate(eval_batches(x, T, encoding, batch_size)):
        yb, start = y[start:start + len(inp)], start + len(inp)
        if i % world != rank:
            continue
        out = model(to_steps(inp, T, encoding).to(device)).float().cpu()
        functional.reset_net(model)
        loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
        correct += int((out.argmax(1) == yb).sum())
    loss_sum, correct = distributed.sum_numbers(loss_sum, correct)
    return loss_sum / len(y), correct / len(y)


def starting_model(recipe: Recipe, data: Dataset) -> tuple[dict, nn.Module, torch.Tensor, dict | None]:
    """``(spec, gated model, example input, weights record)`` of a recipe: the model it builds, loaded
    with ``model.weights`` if given (the record then holds the file's path and sha256)."""
    spec = model_spec(recipe, data.input_shape[0], len(data.classes))
    example = encode(data.x_train[:2], recipe.data.T, recipe.data.encoding)
    model = build_model(spec, example, len(data.classes))
    path = recipe.model.weights
    return spec, model, example, {"path": path, "sha256": load_weights(model, path)} if path else None


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``temperature^2 * KL(softmax(teacher / t) || softmax(student / t))``, mean over the batch (Hinton et al. 2015:
    the square keeps the gradient's scale independent of the temperature)."""
    return F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def train_step(net: nn.Module, x_seq: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
               pruner: Pruner | None, autocast: torch.autocast, l1_gamma: float = 0.0,
               gammas: list[torch.Tensor] = (), teacher: nn.Module | None = None,
               distill: DistillCfg | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step with the pruner's hooks; returns (cross-entropy loss, correct predictions) as device tensors.

    The loss minimised is the cross-entropy, or with a ``teacher`` (``train.distill``) ``(1 - alpha)`` times it plus
    ``alpha`` times :func:`distillation_loss` against the teacher's logits (the readout over T, like the
    student's); plus the method's penalty and ``l1_gamma`` times the L1 norm of ``gammas`` (the BatchNorm scales,
    ``train.l1_gamma``). Nothing here reads a value back to the host, so a GPU is never made to wait inside the step.
    """
    with autocast:
        out = net(x_seq)
        loss = F.cross_entropy(out.float(), y)
        total = loss
        if teacher is not None:
            with torch.no_grad():
                target = teacher(x_seq).float()
            functional.reset_net(teacher)
            total = (1 - distill.alpha) * loss + distill.alpha * distillation_loss(out.float(), target,
                                                                                  distill.temperature)
    total = total + pruner.penalty() if pruner else total
    if l1_gamma:
        total = total + l1_gamma * sum(g.abs().sum() for g in gammas)
    opt.zero_grad(set_to_none=True)
    total.backward()
    if pruner:
        pruner.after_backward()
    opt.step()
    if pruner:
        pruner.after_step()
    return loss, (out.argmax(1) == y).sum()


def train(recipe: Recipe, out_dir: str | Path, progress: bool = True, resume: bool = False) -> TrainResult:
    """Train ``recipe`` into ``out_dir`` (``ckpt.pt``, ``best.pt``, ``metrics.jsonl``).

    With ``resume=True`` and an ``out_dir/ckpt.pt`` of the same recipe, training continues from it
    with the optimiser, scheduler, RNG, masks and pruning-score state it saved, so that the result
    is bitwise identical (on CPU) to an uninterrupted run. Without a checkpoint it starts afresh.

    Under ``torchrun`` (WORLD_SIZE > 1) every process trains its shard of each epoch in
    DistributedDataParallel (``data.batch_size`` is per process); pruning statistics and metrics
    are summed over the processes, every mask update is checked to be identical on all of them,
    and only rank 0 writes files and shows progress.

    User code the recipe names (a model factory, a method, a budget unit) is trusted for the call: the
    recipe is what the user runs.
    """
    out_dir = check_output(out_dir, directory=True)
    with distributed.session(), deterministic_algorithms(), trusted(*recipe.user_code()), ExitStack() as hold:
        return _train(recipe, out_dir, progress, resume, hold)


def _train(recipe: Recipe, out_dir: Path, progress: bool, resume: bool, hold: ExitStack) -> TrainResult:
    multi, rank, main = distributed.is_distributed(), distributed.rank(), distributed.is_main()
    check_model_options(recipe)
    seed_everything(recipe.seed)
    data: Dataset = load_dataset(recipe.data, recipe.seed)
    spec, model, example, weights = starting_model(recipe, data)
    T, enc = recipe.data.T, recipe.data.encoding
    # the network training starts from, frozen (train.distill): before any gate closes or weight moves
    teacher = _frozen_copy(model) if recipe.train.distill is not None else None
    groups = channel_groups(model, example)
    unit = build_unit(model, groups, example, recipe) if recipe.prune else None  # may refuse: before any write
    # only now: a recipe whose weights do not fit writes nothing
    if main:  # the one writer: a second process training into out_dir is refused; then what a killed run left
        hold.enter_context(locked(out_dir))
        remove_temporaries(out_dir)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
    device = distributed.process_device(resolve_device(recipe.train.device))
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    opt = make_optimizer(model, recipe.train)
    pruner: Pruner | None = None
    if recipe.prune:
        # unstructured methods reset the optimiser state of the weights they rewire, so they get the optimiser
        pruner = build_pruner(model, groups, recipe.prune, recipe.train.epochs, recipe.seed, opt, unit=unit,
                              batches=lambda n: _first_batches(data.x_train, n, recipe, device))
    # the statistics a pruner gathers per process (summed over processes under torchrun)
    statistics = pruner.statistics if pruner is not None else list
    epochs = recipe.train.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs) if recipe.train.schedule == "cosine" \
        else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    gen = torch.Generator().manual_seed(recipe.seed)  # the shuffle's (checkpointed: resumes are exact)
    train_set = Pairs(data.x_train, data.y_train)
    # under torchrun: each rank a disjoint shard of a permutation drawn from the seed and the epoch
    sampler = DistributedSampler(train_set, seed=recipe.seed) if multi else RandomSampler(train_set, generator=gen)
    # the loader draws its workers' seeds from its own generator (the samples need no randomness), so the
    # shuffle is the same with or without (persistent) workers
    loader = DataLoader(train_set, batch_size=recipe.data.batch_size, sampler=sampler,
                        generator=torch.Generator().manual_seed(recipe.seed), num_workers=recipe.data.workers,
                        pin_memory=device.type == "cuda", persistent_workers=recipe.data.workers > 0)
    augment = recipe.data.augments and enc != "frames"
    # the BatchNorm scales that train.l1_gamma penalises, found once rather than at every step
    gammas = _bn_gammas(model)
    # bf16 autocast on GPUs; CPU training stays fp32 (bitwise-deterministic runs and resumes)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    ckpt_path, best_path, metrics_path = out_dir / CKPT, out_dir / BEST, out_dir / METRICS
    slim_ft = recipe.train.slim_finetune and pruner is not None
    index: KeptIndex | None = None  # once train has removed the closed channels (the slim fine-tune)

    def quantise() -> None:  # quant: from here on the weights train as the deployed integers
        attach_fake_quant(model, example, recipe.quant.weights)

    def slim_network(masks: dict[str, torch.Tensor], check: bool) -> KeptIndex:
        nonlocal gammas
        checked = (data.x_test[:recipe.data.batch_size], T, enc) if check else None
        detach_fake_quant(model)  # the surgery cuts the float weights; quantisation-aware training goes on after
        cut = _slim_network(model, opt, masks, groups, example, checked)
        if recipe.quant is not None:  # start: finetune starts here, begin goes on
            quantise()
        gammas = _bn_gammas(model)
        if multi:
            distributed.check_agree(json.dumps({n: list(t.shape) for n, t in model.state_dict().items()}),
                                    "the slim network's shapes")
        return cut

    start, best_acc, metrics = 0, -1.0, []
    if recipe.quant is not None and recipe.quant.start == "begin":
        quantise()
    if resume and ckpt_path.exists():
        start, best_acc, metrics, index = _restore(ckpt_path, recipe, model, opt, sched, gen, pruner, metrics_path,
                                                   lambda masks: slim_network(masks, check=False))
        if rank != 0:  # the checkpoint holds the sums over all ranks: rank 0 takes them
            for t in statistics():
                t.zero_()
    if multi:
        distributed.check_agree(str(start), "the epoch to start from",
                                "every rank must see the same OUT/ckpt.pt (across nodes: a shared filesystem)")
    if unit is not None and unit.needs_measurement:  # a resume reads it from the checkpoint: same masks
        _measure(unit, model, data.x_train, recipe, progress and main)
    net = distributed.wrap(model, device)  # after the resume: rank 0's state goes to every rank
    base = {"format": CKPT_FORMAT, "version": __version__, "recipe": recipe.model_dump(mode="json"),
            "model": spec, "data": data.meta(recipe.data), "weights": weights}
    every = recipe.train.checkpoint_every
    last_saved = start - 1
    with _progress(progress and main) as bar:
        task = bar.add_task(recipe.name, total=epochs, completed=start, info="resumed" if start else "")
        for epoch in range(start, epochs):
            t0 = time.perf_counter()
            if multi:
                sampler.set_epoch(epoch)
                seed_everything(distributed.rank_seed(recipe.seed, epoch))
            if pruner:
                pruner.begin_epoch(epoch)
            trained_slim = index is not None
            net.train()
            # summed on the device: the step never waits for it; the host reads the sums once per epoch
            loss_sum, correct = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
            seen = 0
            for xb, yb in loader:
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                if augment:
                    xb = random_crop_flip(xb)
                loss, hits = train_step(net, encode(xb, T, enc), yb, opt, pruner, autocast, recipe.train.l1_gamma,
                                        gammas, teacher, recipe.train.distill)
                functional.reset_net(model)
                loss_sum += loss.detach() * len(yb)
                correct += hits
                seen += len(yb)
            sched.step()
            loss_sum, correct, seen = distributed.sum_numbers(loss_sum.item(), int(correct), seen)
            if not math.isfinite(loss_sum):  # checked after the sum, so every rank stops together
                good = f"{ckpt_path} (epoch {last_saved})" if last_saved >= 0 else "none (no epoch finished)"
                raise SnnCompressError(f"training diverged: the loss is {loss_sum} in epoch {epoch}; "
                                       f"stopped; last good checkpoint: {good}")
            event = pruner.end_epoch(epoch, distributed.sum_across_ranks if multi else None) if pruner else None
            if event is not None:
                event["mask_sha256"] = distributed.check_masks_agree(pruner.agreement(), epoch)
            final = pruner.freeze(epoch + 1) if slim_ft and event is not None else None
            if final is not None:  # that was the last update: from here on, train the network the masks leave
                try:
                    index = slim_network(final, check=True)
                except VerificationError as e:
                    good = f"{ckpt_path} (epoch {last_saved})" if last_saved >= 0 else "none"
                    raise VerificationError(f"after the mask update of epoch {epoch}: {e}; training stopped; last "
                                            f"checkpoint: {good}; train.slim_finetune: false fine-tunes the masked "
                                            "network instead") from e
                net = distributed.wrap(model, device)  # DDP holds the parameters the surgery replaced
            if multi:
                distributed.broadcast_buffers(model)
                test_loss, test_acc = evaluate_sharded(model, data.x_test, data.y_test, T, enc)
            else:
                test_loss, test_acc, _ = evaluate(model, data.x_test, data.y_test, T, enc)
            kept = pruner.kept_fraction() if pruner else 1.0
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / seen,
                   "train_acc": correct / seen, "test_loss": test_loss, "test_acc": test_acc,
                   "kept_channels": kept, "mask_update": event is not None, "slim": trained_slim,
                   **(pruner.metrics() if pruner else {}),
                   "seconds": seconds, "samples_per_s": seen / seconds}
            if multi:
                row["world_size"] = distributed.world_size()
            metrics.append(row)

            eligible = pruner is None or pruner.at_target()
            improved = eligible and test_acc > best_acc
            best_acc = test_acc if improved else best_acc
            if multi:  # the checkpoint (rank 0's) must hold every rank's statistics
                distributed.gather_on_main(statistics())
            save = (epoch + 1) % every == 0 or epoch == epochs - 1
            if main:  # the other ranks never write, so no file is ever half-written by two processes
                masks = pruner.masks if pruner else get_masks(model, groups)
                slimmed = {} if index is None else {
                    "kept_index": index, "removed": removed_channels(masks)}
                # quant: the float weights as they train, and how the network quantises them
                quant = {"quant": recipe.quant.weights.model_dump()} if is_fake_quant(model) else {}
                ckpt = {**base, "state_dict": plain_state_dict(model), **quant, "masks": masks, **slimmed,
                        "history": _history(pruner), "metrics": row, "epoch": epoch,
                        **(pruner.checkpoint_entries() if pruner else {}),
                        "train_state": _train_state(opt, sched, gen, pruner, best_acc)}
                if improved:
                    save_torch(ckpt, best_path)
                # metrics first: a resume truncates them to the checkpoint's epoch
                write_text("".join(json.dumps(m) + "\n" for m in metrics), metrics_path)
                if save:
                    save_torch(ckpt, ckpt_path)
            last_saved = epoch if save else last_saved
            bar.update(task, advance=1, info=f"loss {row['train_loss']:.3f}  acc {test_acc:.3f}  kept {kept:.2f}  "
                                             f"{row['samples_per_s']:.0f} samples/s")
    if pruner:
        pruner.remove()
    if main and not best_path.exists():  # e.g. a schedule that never reached its target
        save_torch(load_checkpoint(ckpt_path), best_path)
    distributed.barrier()  # every rank returns once rank 0's files are complete
    budget = next((h["budget"] for h in reversed(_history(pruner)) if "budget" in h), None)
    return TrainResult(out_dir, ckpt_path, best_path, metrics, budget)


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _first_batches(x: torch.Tensor, n: int | None, recipe: Recipe, device: torch.device) -> Iterator[torch.Tensor]:
    """The first ``n`` training batches (None: all), unshuffled and unaugmented, encoded, on ``device``; a Poisson
    encoding draws from a forked generator, so the run's random stream is the same with or without them."""
    size = recipe.data.batch_size
    stop = len(x) if n is None else min(len(x), n * size)
    state = torch.get_rng_state()
    for i in range(0, stop, size):
        with torch.random.fork_rng(devices=[]):  # one batch at a time: the fork never spans the caller's work
            torch.set_rng_state(state)
            batch = encode(x[i:i + size], recipe.data.T, recipe.data.encoding)
            state = torch.get_rng_state()
        yield batch.to(device)


def _bn_gammas(model: nn.Module) -> list[torch.Tensor]:
    """The BatchNorm scales that ``train.l1_gamma`` penalises (found again after the slim fine-tune's surgery)."""
    return [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


def _slim_network(model: nn.Module, opt: torch.optim.Optimizer, masks: dict[str, torch.Tensor],
                  groups: list[ChannelGroup], example: torch.Tensor,
                  check: tuple[torch.Tensor, int, str] | None) -> KeptIndex:
    """Remove the channels ``masks`` close from the training network, in place, with the slim stage's surgery,
    and cut the optimiser's state alike; returns what was kept. With ``check`` (images, T, encoding) the slim
    network must first give the masked one's outputs on those images (as ``slim`` verifies), else
    :class:`VerificationError`."""
    reference = copy.deepcopy(model).cpu() if check else None
    before = dict(model.named_parameters())
    index = kept_index(model, masks, example)
    apply_index(model, index)
    slice_optimizer(opt, before, dict(model.named_parameters()), index)
    if check:
        kept = {neuron_of(gate): masks[g.name] for g in groups for gate in g.gates}
        with torch.random.fork_rng(devices=[]):  # a Poisson encoding draws: the run's stream stays untouched
            eq = compare_models(reference, copy.deepcopy(model).cpu(), *check, kept)
        if not eq.ok:
            raise VerificationError(f"the slim network differs from the masked one at layer {eq.first_bad_layer} "
                                    f"(max |Δlogit| {eq.max_abs_diff:.3g}, same predictions: {eq.same_predictions})")
    return index


def _measure(unit: CostUnit, model: nn.Module, x: torch.Tensor, recipe: Recipe, show: bool) -> None:
    """What the cost unit measures before training (e.g. latency tables on ``deploy.runtime``), measured by
    rank 0 alone (two processes timing at once would disturb each other) and sent to every rank, so all
    select the same masks."""
    text = json.dumps(unit.measure(model, x, recipe, show)) if distributed.is_main() else ""
    unit.load_measurement(json.loads(distributed.broadcast_text(text)))


def _train_state(opt, sched, gen: torch.Generator, pruner: Pruner | None, best_acc: float) -> dict:
    """Everything beyond the weights that a bitwise-exact resume needs (tensors and plain data only)."""
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "loader": gen.get_state()},
            "pruner": pruner.state_dict() if pruner else None, "best_acc": best_acc}


def _restore(path: Path, recipe: Recipe, model, opt, sched, gen, pruner, metrics_path: Path,
             slim: Callable[[dict[str, torch.Tensor]], KeptIndex]) -> tuple[int, float, list, KeptIndex | None]:
    """Load a checkpoint's weights and training state; one written after the slim fine-tune's surgery has the
    same surgery (``slim``) made on the model first. Returns (first epoch, best accuracy, metrics, kept index)."""
    ckpt = load_checkpoint(path)
    if ckpt["format"] != CKPT_FORMAT or "train_state" not in ckpt:
        raise SnnCompressError(f"{path}: cannot resume from it (a {ckpt['format']} checkpoint without training state)")
    # compared as this version reads both (an older checkpoint states its recipe in older spellings)
    diff = _recipe_diff(recipe_of(ckpt).model_dump(mode="json"), recipe.model_dump(mode="json"))
    if diff:
        raise SnnCompressError(f"{path}: was trained with a different recipe ({', '.join(diff)} differ); "
                               "resume with the same recipe or use another --out")
    state, epoch = ckpt["train_state"], ckpt.get("epoch")
    problem = _train_state_problem(state, pruner is not None)
    if problem or not isinstance(epoch, int) or not 0 <= epoch < recipe.train.epochs:
        raise SnnCompressError(f"{path}: cannot resume from it ("
                               + (problem or f"epoch must be an int in [0, {recipe.train.epochs}), got {epoch!r:.40}")
                               + ")")
    index = None
    if "kept_index" in ckpt:  # the masks, then the surgery they made; the slim weights last
        _restore_pruner(path, ckpt, pruner)
        final = pruner.freeze(epoch + 1) if pruner is not None and recipe.train.slim_finetune else None
        index = slim(final) if final is not None else None
        if index is None or index != ckpt["kept_index"]:
            raise SnnCompressError(f"{path}: cannot resume from it (its kept_index is not the cut its masks make "
                                   f"after epoch {epoch})")
    try:  # load_state_dict reports missing, unexpected or resized tensors, and parameter groups that differ
        load_plain_state_dict(model, ckpt["state_dict"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as e:
        raise SnnCompressError(f"{path}: its weights or optimizer state do not match this model ({first_line(e)})") from e
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["rng"]["loader"])
    torch.set_rng_state(state["rng"]["torch"])
    if index is None:  # the closed channels' weights are frozen from the loaded ones
        _restore_pruner(path, ckpt, pruner)
        # written before the surgery by an older version, with the masks already final: the surgery now
        final = pruner.freeze(epoch + 1) if pruner is not None and recipe.train.slim_finetune else None
        index = slim(final) if final is not None else None
    return epoch + 1, float(state["best_acc"]), _metrics_until(metrics_path, epoch), index


def _metrics_until(path: Path, epoch: int) -> list[dict]:
    """The metrics of epochs 0..``epoch`` that a checkpoint of ``epoch`` wrote before itself (later lines are of
    epochs a kill cut short); refused in one line if they are not there."""
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:epoch + 1]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnnCompressError(f"{path}: cannot resume without the metrics of the checkpoint's epochs "
                               f"({type(e).__name__}: missing or corrupt)") from e
    if len(rows) != epoch + 1 or not all(isinstance(r, dict) and r.get("epoch") == i for i, r in enumerate(rows)):
        raise SnnCompressError(f"{path}: cannot resume: it must hold epochs 0-{epoch} in order (the checkpoint's), "
                               f"found {len(rows)} lines")
    return rows


def _restore_pruner(path: Path, ckpt: dict, pruner: Pruner | None) -> None:
    if pruner:
        try:
            pruner.load_state_dict(ckpt["train_state"]["pruner"], ckpt["masks"], ckpt["history"])
        except MaskError as e:
            raise SnnCompressError(f"{path}: its masks do not match this model ({e})") from e
        except SnnCompressError as e:  # e.g. a cost unit's measurement that no selection can use
            raise SnnCompressError(f"{path}: {e}") from e


def _train_state_problem(state: object, pruned: bool) -> str | None:
    """What is wrong with a checkpoint's training state, by its structure (None if nothing)."""
    if not isinstance(state, dict):
        return "train_state must be a mapping"
    rng = state.get("rng")
    if not (isinstance(rng, dict) and all(isinstance(rng.get(k), torch.Tensor) and rng[k].dtype == torch.uint8
                                          for k in ("torch", "loader"))):
        return "train_state.rng must hold the torch and loader generator states (uint8 tensors)"
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
        return "train_state.optimizer must be an optimizer state dict (state, param_groups)"
    if not isinstance(state.get("scheduler"), dict):
        return "train_state.scheduler must be a mapping"
    if isinstance(state.get("best_acc"), bool) or not isinstance(state.get("best_acc"), (int, float)):
        return "train_state.best_acc must be a number"
    if pruned and not isinstance(state.get("pruner"), dict):
        return "train_state.pruner must be the pruning method's state (a mapping)"
    return None


def _recipe_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two recipe dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _recipe_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _history(pruner: Pruner | None) -> list[dict]:
    return [] if pruner is None else [dict(h) for h in pruner.history]


def _progress(enabled: bool) -> Progress:
    # the description is the recipe's name: plain text, never markup
    return Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}", markup=False), disable=not enabled,
                    transient=False)
