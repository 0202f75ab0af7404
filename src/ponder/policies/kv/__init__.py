"""KV-selection policies: which prompt tokens' K/V a model keeps (the sequence axis, not depth).

One file per method, each a small dataclass on ``base.KVPolicy``: it scores the cached slots of one layer after
that layer ran at prefill, and the engine keeps the top of them in a ``ShrinkingCache`` (the rest are freed). The
budget is the fraction of a prompt's tokens kept (or ``tokens=N``, a token budget); for ``mikv`` and ``razor``,
which keep more than a set of slots (demoted tokens at low precision; a few heads whole), the fraction of the
prompt's KV bytes held.
"""

from .base import KVPolicy
from .registry import get, names, register

__all__ = ["KVPolicy", "get", "names", "register"]
