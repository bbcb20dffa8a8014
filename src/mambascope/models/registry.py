"""Name -> model constructor registry, so configs and checkpoints refer to models by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from mambascope.errors import ConfigError

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: make a model class or factory available as `create_model(name, ...)`."""

    def add(factory: F) -> F:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return add


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name with its keyword arguments."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}", hint=f"choose one of: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)
