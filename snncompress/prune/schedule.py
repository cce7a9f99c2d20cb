"""When masks change and to what budget: warm-up, a cubic ramp (Zhu & Gupta 2017), frozen fine-tuning."""

from __future__ import annotations

from ..config import PruneCfg


def ramp_remaining(cfg: PruneCfg, epoch: int) -> float:
    """``(1 - t)^3`` of the cubic ramp at the update at the end of ``epoch``, with
    ``t = (epoch - warmup_epochs + 1) / ramp_epochs`` capped at 1: 1 in warm-up, 0 from the ramp's end on.
    ``ramp_epochs: 0`` is one-shot: the whole budget at the first update (the end of epoch ``warmup_epochs``)."""
    if epoch < cfg.warmup_epochs:
        return 1.0
    if cfg.ramp_epochs == 0:
        return 0.0
    t = min(1.0, (epoch - cfg.warmup_epochs + 1) / cfg.ramp_epochs)
    return (1.0 - t) ** 3


def keep_fraction_at(cfg: PruneCfg, epoch: int) -> float:
    """Structured: the kept fraction of the update at the end of ``epoch``, from 1 (dense) down to ``cfg.keep``."""
    return cfg.keep + (1.0 - cfg.keep) * ramp_remaining(cfg, epoch)


def sparsity_at(cfg: PruneCfg, epoch: int) -> float:
    """Unstructured: the target sparsity of the update at the end of ``epoch``, ``s_f * (1 - (1 - t)^3)``."""
    return cfg.sparsity * (1.0 - ramp_remaining(cfg, epoch))


def is_update_epoch(cfg: PruneCfg, epochs: int, epoch: int) -> bool:
    """Masks are recomputed at the end of this epoch (not during warm-up or the frozen fine-tune)."""
    if epoch < cfg.warmup_epochs or epoch >= epochs - cfg.finetune_epochs:
        return False
    return (epoch - cfg.warmup_epochs) % cfg.update_every == 0


def is_scoring_epoch(cfg: PruneCfg, epochs: int, epoch: int) -> bool:
    """The statistics of this epoch feed a mask update: one of the next ``update_every`` epochs (this one
    included) ends with an update. Scorers hook the network only in these epochs; warm-up epochs before
    the first window and the frozen fine-tune cost what dense training costs."""
    return any(is_update_epoch(cfg, epochs, e) for e in range(epoch, min(epoch + cfg.update_every, epochs)))
