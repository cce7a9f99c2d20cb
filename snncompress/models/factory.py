"""Building models: a registered one from its name and options (checked by its builder's signature), or a user
factory named ``"package.module:function"`` in a recipe.

A factory is imported only when trusted (see :func:`snncompress.registry.trust_code`), and its model is checked
before use: it must be an ``nn.Module`` with supported layers whose multi-step forward maps ``[T, B, C, H, W]``
to ``[B, classes]``, as spikingjelly's tutorials write them (``return x_seq.mean(0)``; logits or firing
rates). Its single-step form is only traced (Torch-Pruning follows the tensors, not the output's shape),
so what it returns does not matter. Every failure is a one-line :class:`FactoryError` naming the factory.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, create_model as create_pydantic_model

from ..schema import option_errors
from ..errors import RecipeError, first_line
from ..registry import MODELS, UntrustedCodeError, import_code
from .modules import step_mode

DATA_KWARGS = ("in_channels", "num_classes")  # what every builder takes from the data, not from the recipe


class FactoryError(UntrustedCodeError):
    """A user factory is untrusted, malformed, cannot be imported, or builds an unusable model."""


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered spiking model (multi-step mode) from its name and keyword arguments."""
    return MODELS.get(name)(**kwargs)


@functools.cache
def options_model(builder: Callable) -> type[BaseModel]:
    """A registered builder's options as a pydantic model: its keyword arguments but the data's, with their
    annotated types and defaults (a builder states its options' bounds in its annotations, as timm's builders
    state their kwargs)."""
    hints = typing.get_type_hints(builder, include_extras=True)
    fields = {n: (hints.get(n, Any), ... if p.default is p.empty else p.default)
              for n, p in inspect.signature(builder).parameters.items() if n not in DATA_KWARGS}
    return create_pydantic_model(f"{builder.__name__}_options", __config__=ConfigDict(extra="forbid",
                                                                                     validate_default=True), **fields)


def model_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of registered model ``name`` from a recipe's model options: checked by its builder's
    signature (unknown names, types, bounds) and completed with its defaults, as plain data; a
    :class:`~snncompress.errors.RecipeError` naming each bad ``model.<option>`` otherwise."""
    checked, errors = option_errors(options_model(MODELS.get(name)), options)
    if errors:
        raise RecipeError("; ".join(f"model{line}" for line in errors) + f" (model {name})")
    return checked.model_dump(mode="json")


def resolve_factory(factory: str, trust: bool = False) -> Callable[..., nn.Module]:
    """Import the function a factory string names; refuses (without importing) unless trusted."""
    try:
        fn = import_code(factory, "model factory", trust)
    except UntrustedCodeError as e:
        raise FactoryError(str(e)) from e.__cause__
    if not callable(fn):
        raise FactoryError(f"model factory {factory!r}: not callable ({type(fn).__name__})")
    return fn


def accepted_data_kwargs(fn: Callable, in_channels: int, num_classes: int) -> dict[str, int]:
    """``in_channels`` / ``num_classes`` for the parameters of ``fn`` that take them (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass nothing
        return {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    values = {"in_channels": in_channels, "num_classes": num_classes}
    return {k: v for k, v in values.items() if var_kw or k in params}


def build_factory_model(factory: str, kwargs: dict, example: torch.Tensor, num_classes: int | None = None,
                        trust: bool = False) -> nn.Module:
    """Call a (trusted) factory and check its model; returns it in multi-step mode."""
    fn = resolve_factory(factory, trust)
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise FactoryError(f"model factory {factory!r} failed with kwargs {sorted(kwargs)} ({first_line(e)})") from e
    if not isinstance(model, nn.Module):
        raise FactoryError(f"model factory {factory!r} did not return an nn.Module (got {type(model).__name__})")
    check_multi_step(model, example, num_classes, factory)
    return model


@torch.no_grad()
def check_multi_step(model: nn.Module, example: torch.Tensor, num_classes: int | None, factory: str) -> None:
    """Require ``[B, classes]`` from a multi-step forward of ``example`` (``[T, B, C, H, W]``)."""
    B = example.shape[1]
    was_training = model.training
    model.eval()  # no BatchNorm statistics are updated by the check
    try:
        with step_mode(model, "m"):
            try:
                y = model(example)
            except Exception as e:
                raise FactoryError(f"model factory {factory!r}: forward fails in multi-step mode on input "
                                   f"{list(example.shape)} ({first_line(e)})") from e
        ok = isinstance(y, torch.Tensor) and y.dim() == 2 and y.shape[0] == B \
            and (num_classes is None or y.shape[1] == num_classes)
        if not ok:
            got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise FactoryError(f"model factory {factory!r}: multi-step forward of {list(example.shape)} must return "
                               f"[B, classes] = [{B}, {num_classes if num_classes is not None else 'classes'}], "
                               f"got {got}")
    finally:
        model.train(was_training)
