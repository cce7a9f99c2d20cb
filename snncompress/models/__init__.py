"""Spiking model builders (registered by name, see :mod:`snncompress.registry`) and user factories."""

from ..registry import MODELS, list_models, register_model
from .factory import FactoryError, build_factory_model, create_model

__all__ = ["FactoryError", "MODELS", "build_factory_model", "create_model", "list_models", "register_model"]
