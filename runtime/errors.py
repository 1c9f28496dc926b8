"""Error types.  Every message says what is wrong and how to fix it."""
from __future__ import annotations


class SpecrtError(Exception):
    """Base class of every error specrt raises on purpose."""


class EngineDirError(SpecrtError, ValueError):
    """The engine directory is missing, corrupt, foreign or from an incompatible version."""


class GenerationError(SpecrtError, ValueError):
    """Invalid generation request (k, prompt length, sampling parameters...)."""


class CompatibilityError(SpecrtError, ValueError):
    """Draft and target cannot be paired (different tokenizers)."""
