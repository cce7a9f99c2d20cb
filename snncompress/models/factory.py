"""User model factories, named ``"package.module:function"`` in a recipe.

A factory is imported only when trusted (see ``registry.trust_factory``), and its model is checked
before use: it must be an ``nn.Module`` with supported layers whose forward maps ``[T, B, C, H, W]``
(multi-step mode) and ``[B, C, H, W]`` (single-step mode, used by Torch-Pruning's trace) to
``[B, classes]``. Every failure is a one-line :class:`FactoryError` naming the factory.
"""

from __future__ import annotations

import importlib
import inspect
import re
from typing import Callable

import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

from ..errors import SnnCompressError
from .registry import is_trusted_factory

FACTORY_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
DATA_KWARGS = ("in_channels", "num_classes")  # filled in from the data, if the factory accepts them


class FactoryError(SnnCompressError):
    """A user factory is untrusted, malformed, cannot be imported, or builds an unusable model."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def check_factory_string(factory: str) -> str:
    """Return ``factory`` if it has the form ``package.module:function``, else raise ValueError."""
    if not isinstance(factory, str) or not FACTORY_PATTERN.fullmatch(factory):
        raise ValueError(f"must be 'package.module:function', got {factory!r}")
    return factory


def resolve_factory(factory: str, trust: bool = False) -> Callable[..., nn.Module]:
    """Import the function a factory string names; refuses (without importing) unless trusted."""
    try:
        check_factory_string(factory)
    except ValueError as e:
        raise FactoryError(f"model factory: {e}") from None
    if not (trust or is_trusted_factory(factory)):
        raise FactoryError(f"model factory {factory!r} is not trusted: building it would import and run its code; "
                           "refused (pass --trust-factory, or trust_factory=True in Python, if you trust it)")
    module_name, attr_path = factory.split(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # the user's module may raise anything on import
        raise FactoryError(f"model factory {factory!r}: cannot import {module_name!r} ({_first_line(e)})") from e
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise FactoryError(f"model factory {factory!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise FactoryError(f"model factory {factory!r}: not callable ({type(obj).__name__})")
    return obj


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
    from ..prune.gates import check_supported  # late: prune.gates is heavier and not needed by the registry

    fn = resolve_factory(factory, trust)
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise FactoryError(f"model factory {factory!r} failed with kwargs {sorted(kwargs)} ({_first_line(e)})") from e
    if not isinstance(model, nn.Module):
        raise FactoryError(f"model factory {factory!r} did not return an nn.Module (got {type(model).__name__})")
    try:
        check_supported(model)
    except ValueError as e:
        raise FactoryError(f"model factory {factory!r}: {e}") from e
    check_step_modes(model, example, num_classes, factory)
    return model


@torch.no_grad()
def check_step_modes(model: nn.Module, example: torch.Tensor, num_classes: int | None, factory: str) -> None:
    """Require ``[B, classes]`` logits from a ``[T,B,C,H,W]`` multi-step and a ``[B,C,H,W]`` single-step forward."""
    B = example.shape[1]
    was_training = model.training
    model.eval()  # no BatchNorm statistics are updated by the check
    try:
        for mode, x in (("multi-step", example), ("single-step", example[0])):
            functional.set_step_mode(model, "m" if mode == "multi-step" else "s")
            functional.reset_net(model)
            try:
                y = model(x)
            except Exception as e:
                raise FactoryError(f"model factory {factory!r}: forward fails in {mode} mode on input "
                                   f"{list(x.shape)} ({_first_line(e)})") from e
            ok = isinstance(y, torch.Tensor) and y.dim() == 2 and y.shape[0] == B \
                and (num_classes is None or y.shape[1] == num_classes)
            if not ok:
                got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise FactoryError(f"model factory {factory!r}: {mode} forward of {list(x.shape)} must return "
                                   f"[B, classes] = [{B}, {num_classes if num_classes is not None else 'classes'}], "
                                   f"got {got}")
    finally:
        functional.reset_net(model)
        functional.set_step_mode(model, "m")
        functional.invalidate_reset_cache(model)
        model.train(was_training)
