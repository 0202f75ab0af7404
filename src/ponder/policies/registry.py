"""Policies by CLI name. Each policy module registers itself on import; ``get`` builds one with a budget."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from ..errors import PonderError
from .base import Policy
from .spec import build, parse_policy

_REGISTRY: dict[str, type[Policy]] = {}

# Modules of this package that are machinery, not methods; every other module is imported (on first use, so
# `import ponder.policies` stays fast) and registers the policies it defines: a new method is one new file.
_MACHINERY = {"base", "budget", "calibration", "registry", "spec"}


def import_policy_modules(package: str, folder: str | Path, machinery: set[str]) -> None:
    """Import every module of ``package`` (in ``folder``) but its ``machinery``: each one registers the policies it
    defines on import. Shared by the decoder and the encoder registries."""
    for m in sorted(m.name for m in pkgutil.iter_modules([str(folder)])
                    if not m.ispkg and m.name not in machinery and not m.name.startswith("_")):
        importlib.import_module(f"{package}.{m}")


def register(cls: type[Policy]) -> type[Policy]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    import_policy_modules(__package__, Path(__file__).parent, _MACHINERY)


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str, budget: float = 1.0, **kw: Any) -> Policy:
    """A policy by name or spec (``name:key=value;...``, see ``policies.spec``), keyword parameters on top."""
    name, params = parse_policy(name)
    params.update(kw)
    _load_all()
    if name not in _REGISTRY:
        raise PonderError(f"unknown policy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return build(_REGISTRY[name], name, budget, params)
