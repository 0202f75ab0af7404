"""Policies by CLI name. Each policy module registers itself on import; ``get`` builds one with a budget."""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import PonderError
from .base import Policy

_REGISTRY: dict[str, type[Policy]] = {}

# Modules that define policies; imported lazily so `import ponder` stays fast.
_MODULES = ("dense", "random_skip", "layer_drop", "unified_skip", "ffn_skip", "skipdecode", "early_exit",
            "self_speculative", "oracle")


def register(cls: type[Policy]) -> type[Policy]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"{__package__}.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{m}":
                raise


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str, budget: float = 1.0, **kw: Any) -> Policy:
    """A policy by name or spec (``name:key=value;...``, see ``policies.spec``), keyword parameters on top."""
    from .spec import build, parse_policy

    name, params = parse_policy(name)
    params.update(kw)
    _load_all()
    if name not in _REGISTRY:
        raise PonderError(f"unknown policy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return build(_REGISTRY[name], name, budget, params)
