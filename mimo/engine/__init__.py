"""Continuous-batching engine over paged KV (no Triton import)."""

from mimo.engine.engine import EngineConfig, LLMEngine, RequestOutput, context_overflow, engine_knobs, generate
from mimo.engine.sampling import InvalidRequestError, SamplingParams

__all__ = [
    "EngineConfig", "InvalidRequestError", "LLMEngine", "RequestOutput", "SamplingParams", "context_overflow",
    "engine_knobs", "generate",
]
