"""Encoder compute policies (token pruning, merging, early exit, layer skipping), with their own registry:
their plans are token-set reductions for :mod:`ponder.encoders.engine`, not decoder LayerPlans."""

from .base import EncoderPolicy
from .registry import get, names, register

__all__ = ["EncoderPolicy", "get", "names", "register"]
