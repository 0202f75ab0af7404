"""ponder: give every token of a transformer only the compute it needs, and measure what that buys honestly."""

import importlib
from typing import Any

__version__ = "0.1.0"

from .errors import PonderError  # noqa: E402

__all__ = ["PonderError", "__version__", "embed", "from_hf", "load"]
_API = {"load": "api", "from_hf": "api", "embed": "encoders.api"}


def __getattr__(name: str) -> Any:
    """``ponder.load`` / ``ponder.from_hf`` / ``ponder.embed`` resolved on first use: ``import ponder`` (and so
    ``import ponder.engine``) imports neither torch's model stack nor the encoder or evaluation layers, which keeps
    ``import ponder`` light and the layers' imports one-way."""
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'ponder' has no attribute {name!r}")
