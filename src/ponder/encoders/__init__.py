"""Encoders: sentence embeddings with token pruning, merging and early exit (``ponder embed``).

Kept import-light: ``import ponder`` must not pull in torch; the heavy modules load when first used.
"""

from .api import embed, load_encoder

__all__ = ["embed", "load_encoder"]
