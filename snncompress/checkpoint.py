"""Checkpoints as plain dicts (weights-only loadable), and models rebuilt from them."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .artifacts import SLIM_FORMAT, load_checkpoint
from .errors import SnnCompressError
from .models import create_model
from .prune.gates import attach_gates, channel_groups, set_masks
from .prune.surgery import slim as slim_model
from .recipe import Recipe, parse_recipe


def model_spec(recipe: Recipe, in_channels: int, num_classes: int) -> dict:
    """``{name, kwargs}``: everything needed to rebuild the architecture, as plain data."""
    m = recipe.model
    return {"name": m.name, "kwargs": {"in_channels": in_channels, "num_classes": num_classes,
                                       "layers": list(m.layers), "neuron": m.neuron.model_dump()}}


def build_model(spec: dict, example: torch.Tensor) -> nn.Module:
    """The gated multi-step model of a ``{name, kwargs}`` spec (gates open)."""
    return attach_gates(create_model(spec["name"], **spec["kwargs"]), example)


def example_input(ckpt: dict, batch: int = 2) -> torch.Tensor:
    """A multi-step input of the checkpoint's shape, ``[T, B, C, H, W]``."""
    data = ckpt["data"]
    return torch.zeros(data["T"], batch, *data["input_shape"])


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint dict describes (gated dense model, or slim model) in eval mode."""
    try:
        model = build_model(ckpt["model"], example_input(ckpt))
        if ckpt["format"] == SLIM_FORMAT:
            # replay the removal on the dense architecture, then load the slim weights
            keep = {g: torch.as_tensor(m, dtype=torch.bool) for g, m in ckpt["masks"].items()}
            model = slim_model(model, keep, example_input(ckpt))
            model.load_state_dict(ckpt["state_dict"])
        else:
            model.load_state_dict(ckpt["state_dict"])
            set_masks(model, channel_groups(model, example_input(ckpt)), ckpt["masks"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SnnCompressError(f"{source}: weights do not match the model it describes ({first})") from e
    return model.eval()


def load_model(path: str | os.PathLike) -> nn.Module:
    """The multi-step spiking model of a dense (``ckpt.pt``) or slim (``slim.pt``) checkpoint, in eval mode."""
    return model_from_checkpoint(load_checkpoint(path), str(path))


def recipe_of(ckpt: dict) -> Recipe:
    return parse_recipe(ckpt["recipe"], "checkpoint recipe")

