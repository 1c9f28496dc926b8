"""Sampling parameters, the logits → probabilities warp (temperature, top-k, top-p), and the logits guard."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from specrt.runtime.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy (the default)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise GenerationError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """logits [..., vocab] → probabilities [..., vocab] (float64), after temperature, top-k, top-p."""
    x = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = np.partition(x, -params.top_k, axis=-1)[..., -params.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
    p /= p.sum(axis=-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it is kept)
        drop_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) >= params.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        p = np.where(drop, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities of one logits row [vocab] (unwarped: a draft's own distribution)."""
    e = np.exp(logits - logits.max())
    return e / e.sum()


def top_prob(logits: np.ndarray) -> float:
    """Largest softmax probability of a logits row, without materialising the softmax twice."""
    return float(1.0 / np.exp(logits - logits.max()).sum())


def check_finite(logits: np.ndarray, role: str, pos: int) -> None:
    """One O(vocab) reduction per model pass: NaN/inf would otherwise turn silently into token 0 or garbage."""
    if not np.isfinite(logits).all():
        raise GenerationError(f"the {role} model produced NaN/inf logits at position {pos}: the engine is numerically "
                              "broken (corrupt weights, or fp16 overflow). Re-export it (fp32) with `specrt export`.")
