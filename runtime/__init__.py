"""Deploy time: load an engine directory and decode.  numpy + onnxruntime + tokenizers; never torch."""
from __future__ import annotations

from specrt.runtime.engine import Chunk, Engine, EnginePool, LosslessnessWarning, Result, Stream
from specrt.runtime.errors import CompatibilityError, EngineDirError, GenerationError, SpecrtError
from specrt.runtime.sampling import SamplingParams
from specrt.runtime.stats import Stats

__all__ = [
    "Chunk",
    "CompatibilityError",
    "Engine",
    "EngineDirError",
    "EnginePool",
    "GenerationError",
    "LosslessnessWarning",
    "Result",
    "SamplingParams",
    "SpecrtError",
    "Stats",
    "Stream",
]
