"""Encoder policies by CLI name (``ponder embed --policy``, ``ponder bench --task embed``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import PonderError
from ...policies.registry import import_policy_modules
from ...policies.spec import build
from .base import EncoderPolicy

_REGISTRY: dict[str, type[EncoderPolicy]] = {}
_MACHINERY = {"base", "registry"}  # every other module of this package defines (and registers) encoder policies


def register(cls: type[EncoderPolicy]) -> type[EncoderPolicy]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    import_policy_modules(__package__, Path(__file__).parent, _MACHINERY)


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[EncoderPolicy]:
    _load_all()
    if name not in _REGISTRY:
        raise PonderError(f"unknown encoder policy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get(name: str, budget: float = 1.0, **kw: Any) -> EncoderPolicy:
    return build(policy_class(name), name, budget, kw)
