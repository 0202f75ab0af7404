"""The dense encoder: the baseline every encoder row is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import EncoderPolicy
from .registry import register


@register
@dataclass
class Dense(EncoderPolicy):
    """Every token through every layer (the reference)."""

    name: ClassVar[str] = "dense"
    lossless: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.budget = 1.0
