"""The training loop: seeded, deterministic on CPU, checkpoints written atomically every epoch."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from spikingjelly.activation_based import functional
from torch.utils.data import DataLoader, TensorDataset

from .. import __version__
from ..artifacts import CKPT_FORMAT, atomic_path, save_torch
from ..checkpoint import model_spec
from ..data import Dataset, encode, load_dataset
from ..errors import SnnCompressError
from ..models import create_model
from ..prune.controller import DynamicPruner
from ..prune.gates import channel_groups, get_masks
from ..recipe import Recipe, TrainCfg


@dataclass
class TrainResult:
    out_dir: Path
    ckpt: Path  # last epoch
    best: Path  # best test accuracy among epochs at the final budget
    metrics: list[dict]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def make_optimizer(model: nn.Module, cfg: TrainCfg) -> torch.optim.Optimizer:
    # gates carry masks, not weights: they are never optimised
    params = [p for n, p in model.named_parameters() if not n.endswith(".gate")]
    o = cfg.optimizer
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[o.name]
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, T: int, encoding: str = "direct",
             batch_size: int = 256) -> tuple[float, float, torch.Tensor]:
    """(mean loss, accuracy, logits) of a multi-step model on a normalised image set."""
    model.eval()
    logits = []
    for i in range(0, len(x), batch_size):
        logits.append(model(encode(x[i:i + batch_size], T, encoding)))
        functional.reset_net(model)
    out = torch.cat(logits)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item(), out


def train(recipe: Recipe, out_dir: str | Path, progress: bool = True) -> TrainResult:
    """Train ``recipe`` into ``out_dir`` (``ckpt.pt``, ``best.pt``, ``metrics.jsonl``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(recipe.seed)
    data: Dataset = load_dataset(recipe.data, recipe.seed)
    spec = model_spec(recipe, data.input_shape[0], len(data.classes))
    model = create_model(spec["name"], **spec["kwargs"])
    T, enc = recipe.data.T, recipe.data.encoding
    groups = channel_groups(model, encode(data.x_train[:2], T, enc))
    pruner = DynamicPruner(model, groups, recipe.prune, recipe.train.epochs, recipe.seed) if recipe.prune else None

    opt = make_optimizer(model, recipe.train)
    epochs = recipe.train.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs) if recipe.train.schedule == "cosine" \
        else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    gen = torch.Generator().manual_seed(recipe.seed)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=recipe.data.batch_size,
                        shuffle=True, generator=gen)

    metrics: list[dict] = []
    best_acc = -1.0
    base = {"format": CKPT_FORMAT, "version": __version__, "recipe": recipe.model_dump(mode="json"),
            "model": spec, "data": data.meta(recipe.data)}
    metrics_path = out_dir / "metrics.jsonl"
    lines: list[str] = []
    with _progress(progress) as bar:
        task = bar.add_task(recipe.name, total=epochs, info="")
        for epoch in range(epochs):
            t0 = time.perf_counter()
            model.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for xb, yb in loader:
                out = model(encode(xb, T, enc))
                loss = F.cross_entropy(out, yb)
                if not torch.isfinite(loss):
                    raise SnnCompressError(f"training diverged: loss is {loss.item()} in epoch {epoch}")
                opt.zero_grad(set_to_none=True)
                (loss + pruner.penalty() if pruner else loss).backward()  # the method's penalty, if any
                if pruner:
                    pruner.after_backward()
                opt.step()
                if pruner:
                    pruner.after_step()
                functional.reset_net(model)
                loss_sum += loss.item() * len(yb)
                correct += int((out.argmax(1) == yb).sum())
                seen += len(yb)
            sched.step()
            event = pruner.end_epoch(epoch) if pruner else None
            test_loss, test_acc, _ = evaluate(model, data.x_test, data.y_test, T, enc)
            kept = pruner.kept_fraction() if pruner else 1.0
            row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / seen,
                   "train_acc": correct / seen, "test_loss": test_loss, "test_acc": test_acc,
                   "kept_channels": kept, "mask_update": event is not None,
                   "seconds": time.perf_counter() - t0, "samples_per_s": seen / (time.perf_counter() - t0)}
            metrics.append(row)
            lines.append(json.dumps(row))
            with atomic_path(metrics_path) as tmp:
                tmp.write_text("\n".join(lines) + "\n")

            ckpt = {**base, "state_dict": model.state_dict(), "masks": get_masks(model, groups),
                    "history": _history(pruner), "metrics": row, "epoch": epoch}
            save_torch(ckpt, out_dir / "ckpt.pt")
            eligible = pruner is None or pruner.at_target()
            if eligible and test_acc > best_acc:
                best_acc = test_acc
                save_torch(ckpt, out_dir / "best.pt")
            bar.update(task, advance=1, info=f"loss {row['train_loss']:.3f}  acc {test_acc:.3f}  kept {kept:.2f}")
    if pruner:
        pruner.remove()
    if not (out_dir / "best.pt").exists():  # e.g. a schedule that never reached its target
        save_torch(ckpt, out_dir / "best.pt")
    return TrainResult(out_dir, out_dir / "ckpt.pt", out_dir / "best.pt", metrics)


def _history(pruner: DynamicPruner | None) -> list[dict]:
    return [] if pruner is None else [dict(h) for h in pruner.history]


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"), disable=not enabled, transient=False)
