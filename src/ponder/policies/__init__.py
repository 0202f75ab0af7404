"""Compute policies: one file per method, each a small dataclass with one budget knob and four flags."""

from .base import Policy, StaticPlanner
from .registry import get, names, register

__all__ = ["Policy", "StaticPlanner", "get", "names", "register"]
