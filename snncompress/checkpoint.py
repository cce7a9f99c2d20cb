"""Checkpoints as plain dicts (weights-only loadable), and models rebuilt from them."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .artifacts import SLIM_FORMAT, load_checkpoint
from .errors import SnnCompressError
from .models import FactoryError, build_factory_model, create_model, registry
from .models.factory import accepted_data_kwargs, resolve_factory
from .prune.gates import attach_gates, channel_groups, set_masks
from .prune.surgery import slim as slim_model
from .recipe import Recipe, parse_recipe


def model_spec(recipe: Recipe, in_channels: int, num_classes: int) -> dict:
    """``{name, kwargs}`` or ``{factory, kwargs}``: everything needed to rebuild the architecture, as plain data.

    A factory named by the user's own recipe is trusted (imported, to see whether it takes
    ``in_channels`` / ``num_classes``).
    """
    m = recipe.model
    if m.factory is not None:
        registry.trust_factory(m.factory)
        fn = resolve_factory(m.factory)
        return {"factory": m.factory, "kwargs": {**m.kwargs, **accepted_data_kwargs(fn, in_channels, num_classes)}}
    kwargs = {"in_channels": in_channels, "num_classes": num_classes, "neuron": m.neuron.model_dump(), "width": m.width}
    if m.name == "vgg":
        kwargs.update(layers=list(m.layers), readout_pool=m.readout_pool)
    return {"name": m.name, "kwargs": kwargs}


def build_model(spec: dict, example: torch.Tensor, num_classes: int | None = None,
                trust_factory: bool = False) -> nn.Module:
    """The gated multi-step model of a ``{name, kwargs}`` or ``{factory, kwargs}`` spec (gates open).

    A factory is imported only if trusted (``trust_factory=True`` or ``models.trust_factory``);
    its model must map ``example`` to ``[B, num_classes]`` in both step modes.
    """
    if "factory" in spec:
        model = build_factory_model(spec["factory"], dict(spec["kwargs"]), example, num_classes, trust_factory)
    else:
        model = create_model(spec["name"], **spec["kwargs"])
        try:  # the first forward: a built-in model that cannot take this input says so in one line
            return attach_gates(model, example)
        except RuntimeError as e:
            raise SnnCompressError(f"model {spec['name']!r} cannot take inputs of shape {list(example.shape[2:])} "
                                   f"({str(e).splitlines()[0]})") from e
    return attach_gates(model, example)


def describe_spec(spec: dict) -> str:
    """A one-line description of a model spec, without building (or importing) anything."""
    kwargs = {k: v for k, v in spec.get("kwargs", {}).items() if k not in ("in_channels", "num_classes", "neuron")}
    if "factory" in spec:
        return f"factory {spec['factory']} {kwargs} (user code, not imported)"
    return f"{spec.get('name')} {kwargs}"


def example_input(ckpt: dict, batch: int = 2) -> torch.Tensor:
    """A multi-step input of the checkpoint's shape, ``[T, B, C, H, W]``."""
    data = ckpt["data"]
    return torch.zeros(data["T"], batch, *data["input_shape"])


def model_from_checkpoint(ckpt: dict, source: str = "checkpoint", trust_factory: bool = False) -> nn.Module:
    """Rebuild the model a checkpoint dict describes (gated dense model, or slim model) in eval mode.

    A checkpoint naming a user factory is refused, without importing it, unless ``trust_factory``
    (or the factory is trusted in this process already, e.g. named by the recipe being run).
    """
    try:
        example = example_input(ckpt)
        model = build_model(ckpt["model"], example, len(ckpt["data"]["classes"]), trust_factory)
        if ckpt["format"] == SLIM_FORMAT:
            # replay the removal on the dense architecture, then load the slim weights
            keep = {g: torch.as_tensor(m, dtype=torch.bool) for g, m in ckpt["masks"].items()}
            model = slim_model(model, keep, example)
            model.load_state_dict(ckpt["state_dict"])
        else:
            model.load_state_dict(ckpt["state_dict"])
            set_masks(model, channel_groups(model, example), ckpt["masks"])
    except FactoryError as e:
        raise FactoryError(f"{source}: {e}") from e
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SnnCompressError(f"{source}: weights do not match the model it describes ({first})") from e
    return model.eval()


def load_model(path: str | os.PathLike, trust_factory: bool = False) -> nn.Module:
    """The multi-step spiking model of a dense (``ckpt.pt``) or slim (``slim.pt``) checkpoint, in eval mode.

    ``trust_factory=True`` allows a checkpoint that names a user factory to import and run it.
    """
    return model_from_checkpoint(load_checkpoint(path), str(path), trust_factory)


def recipe_of(ckpt: dict) -> Recipe:
    return parse_recipe(ckpt["recipe"], "checkpoint recipe")

