"""Encoder policies by CLI name (``ponder embed --policy``, ``ponder bench --task embed``)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from ...errors import PonderError
from .base import EncoderPolicy

_REGISTRY: dict[str, type[EncoderPolicy]] = {}
_MACHINERY = {"base", "registry"}  # every other module of this package defines (and registers) encoder policies


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if not m.ispkg and m.name not in _MACHINERY and not m.name.startswith("_"))


def register(cls: type[EncoderPolicy]) -> type[EncoderPolicy]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for m in _modules():
        importlib.import_module(f"{__package__}.{m}")


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def policy_class(name: str) -> type[EncoderPolicy]:
    _load_all()
    if name not in _REGISTRY:
        raise PonderError(f"unknown encoder policy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get(name: str, budget: float = 1.0, **kw: Any) -> EncoderPolicy:
    from ...policies.spec import build

    return build(policy_class(name), name, budget, kw)
