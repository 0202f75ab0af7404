"""ponder: give every token of a transformer only the compute it needs, and measure what that buys honestly."""

__version__ = "0.1.0"

from .errors import PonderError  # noqa: E402
from .encoders.api import embed  # noqa: E402,F401  (lazy: torch and the model load on the first call)

__all__ = ["PonderError", "__version__"]
