"""KV-selection policies by name: each module of this package registers the policies it defines on import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import PonderError
from ..registry import import_policy_modules
from ..spec import build, parse_policy
from .base import KVPolicy

_REGISTRY: dict[str, type[KVPolicy]] = {}
_MACHINERY = {"base", "registry"}


def register(cls: type[KVPolicy]) -> type[KVPolicy]:
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    import_policy_modules(__package__, Path(__file__).parent, _MACHINERY)
    return sorted(_REGISTRY)


def get(spec: str, budget: float = 1.0, **kw: Any) -> KVPolicy:
    """A KV policy by name or spec (``snapkv:window=16``), keyword parameters on top."""
    name, params = parse_policy(spec)
    params.update(kw)
    if name not in names():
        raise PonderError(f"unknown KV policy {name!r}; available: {', '.join(names())}")
    return build(_REGISTRY[name], name, budget, params)
