"""ponder: give every token of a transformer only the compute it needs, and measure what that buys honestly."""

__version__ = "0.1.0"

from .errors import PonderError  # noqa: E402

__all__ = ["PonderError", "__version__"]
