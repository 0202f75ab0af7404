"""The plan-driven forward pass, the KV cache, generation strategies and the counters."""

from .cache import KVCache
from .forward import Engine, ForwardOutput, Planner, StepContext
from .generate import GenerationResult, SamplingConfig, generate, score
from .plan import LayerPlan
from .stats import Stats

__all__ = ["Engine", "ForwardOutput", "KVCache", "LayerPlan", "Planner", "StepContext", "Stats",
           "GenerationResult", "SamplingConfig", "generate", "score"]
