"""A name -> builder registry in the style of timm's ``register_model`` / ``create_model``."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered spiking model (multi-step mode) from its name and keyword arguments."""
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


# User factories ("pkg.module:function") whose code may be imported in this process. Importing runs
# code, so a factory named by a checkpoint (a file people pass around) is only built once the user
# has vouched for it: by naming it in their own recipe (train/run add it here) or by passing
# --trust-factory / trust_factory=True.
_TRUSTED_FACTORIES: set[str] = set()


def trust_factory(factory: str) -> None:
    """Allow ``factory`` to be imported and called for the rest of this process."""
    _TRUSTED_FACTORIES.add(factory)


def is_trusted_factory(factory: str) -> bool:
    return factory in _TRUSTED_FACTORIES
