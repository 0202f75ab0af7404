"""Policies by CLI name. Each policy module registers itself on import; ``get`` builds one with a budget."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from ..errors import PonderError
from .base import Policy

_REGISTRY: dict[str, type[Policy]] = {}

# Modules of this package that are machinery, not methods; every other module is imported (on first use, so
# `import ponder.policies` stays fast) and registers the policies it defines: a new method is one new file.
_MACHINERY = {"base", "budget", "calibration", "registry", "spec"}


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if not m.ispkg and m.name not in _MACHINERY and not m.name.startswith("_"))


def register(cls: type[Policy]) -> type[Policy]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for m in _modules():
        importlib.import_module(f"{__package__}.{m}")


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
