"""Spiking model builders and their registry."""

from . import resnet, vgg  # noqa: F401  (registers the builders)
from .factory import FactoryError, build_factory_model, check_factory_string
from .registry import create_model, is_trusted_factory, list_models, register_model, trust_factory

__all__ = ["FactoryError", "build_factory_model", "check_factory_string", "create_model", "is_trusted_factory",
           "list_models", "register_model", "trust_factory"]
