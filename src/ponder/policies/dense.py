"""The dense model: the baseline every other row is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Policy
from .registry import register


@register
@dataclass
class Dense(Policy):
    """The whole model for every token: the reference every other row is measured against."""

    name: ClassVar[str] = "dense"
    lossless: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.budget = 1.0  # dense has no knob: every budget means the whole model
