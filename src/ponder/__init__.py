"""ponder: give every token of a transformer only the compute it needs, and measure what that buys honestly."""

from typing import Any

__version__ = "0.1.0"

from .errors import PonderError  # noqa: E402
from .encoders.api import embed  # noqa: E402,F401  (lazy: torch and the model load on the first call)

__all__ = ["PonderError", "__version__", "embed", "load", "from_hf"]
_API = ("load", "from_hf")


def __getattr__(name: str) -> Any:
    """``ponder.load`` / ``ponder.from_hf`` without importing torch on ``import ponder`` (the CLI's error paths and
    ``ponder --help`` stay fast)."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ponder' has no attribute {name!r}")
