"""Acceptance math for one verification step: pure numpy, no model in sight.

Vocabulary (after vLLM's rejection sampler):
  * accepted  — draft tokens the target agrees with (a prefix of the k proposals);
  * recovered — the target's own token at the first rejected position;
  * bonus     — the target's extra token when all k proposals are accepted.
Every step emits ``accepted + 1`` tokens: the accepted ones, then exactly one
recovered or bonus token.

Greedy and sampled requests take separate paths.  Sampling follows Leviathan
et al. / Chen et al.: accept draft token x with probability min(1, p(x)/q(x));
on rejection sample from the residual norm(max(0, p - q)); if all pass, sample
the bonus from p at position k.  A draft probability of 0 is a rejection, never
a division.  The output then follows the target's distribution exactly.
"""
from __future__ import annotations

import numpy as np


def greedy_verify(draft_ids: np.ndarray, target_logits: np.ndarray) -> tuple[int, int]:
    """draft_ids [k], target_logits [k+1, vocab] → (number accepted, recovered-or-bonus token id).

    The target's choice at row i is the token after (context + draft_ids[:i]).
    """
    k = len(draft_ids)
    assert target_logits.shape[0] == k + 1, (target_logits.shape, k)
    target_ids = target_logits.argmax(axis=-1)  # [k+1]
    mismatch = np.flatnonzero(target_ids[:k] != draft_ids)
    accepted = int(mismatch[0]) if mismatch.size else k
    return accepted, int(target_ids[accepted])


def rejection_verify(draft_ids: np.ndarray, draft_probs: np.ndarray, target_probs: np.ndarray,
                     rng: np.random.Generator) -> tuple[int, int]:
    """draft_ids [k], draft_probs q [k, vocab], target_probs p [k+1, vocab] → (accepted, next token id).

    Both distributions must already be warped (temperature, top-k, top-p) the same way they are used
    for sampling; rows sum to 1.
    """
    k = len(draft_ids)
    vocab = min(draft_probs.shape[-1], target_probs.shape[-1])
    for i in range(k):
        x = int(draft_ids[i])
        q = float(draft_probs[i, x])
        p = float(target_probs[i, x]) if 0 <= x < target_probs.shape[-1] else 0.0
        if q > 0.0 and rng.random() * q < p:  # u < p/q without dividing
            continue
        # over the target's whole vocabulary: where the draft's is smaller, q = 0 past it and p stays
        residual = target_probs[i].copy()
        residual[:vocab] = np.maximum(residual[:vocab] - draft_probs[i, :vocab], 0.0)
        total = residual.sum()
        if total <= 0.0:  # p == q on the support: any rejection is a measure-zero event; fall back to p
            return i, sample(target_probs[i], rng)
        return i, sample(residual / total, rng)
    return k, sample(target_probs[k], rng)


def point_rejection_verify(draft_ids: np.ndarray, target_probs: np.ndarray,
                           rng: np.random.Generator) -> tuple[int, int]:
    """Deterministic proposals (a context match: q is one-hot at each drafted token).

    draft_ids [k], target_probs p [k+1, vocab] → (accepted, next token id).  The rejection rule with
    q = one-hot(x): accept x with probability min(1, p(x) / 1) = p(x); on rejection the residual
    norm(max(0, p - one-hot(x))) is p with x removed, renormalised; all k pass: the bonus from p[k].
    """
    k = len(draft_ids)
    for i in range(k):
        x = int(draft_ids[i])
        p = target_probs[i]
        px = float(p[x]) if 0 <= x < p.shape[-1] else 0.0  # an id outside p: probability 0
        if rng.random() < px:
            continue
        residual = p.copy()
        if 0 <= x < residual.shape[-1]:
            residual[x] = 0.0
        total = residual.sum()
        if total <= 0.0:  # p was one-hot at x and x was still rejected: a measure-zero event
            return i, sample(p, rng)
        return i, sample(residual / total, rng)
    return k, sample(target_probs[k], rng)


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF sample of one id from a probability vector [vocab]."""
    cdf = np.cumsum(probs, dtype=np.float64)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))


def relaxed_greedy_verify(draft_ids: np.ndarray, target_logits: np.ndarray, tau: float) -> tuple[int, int]:
    """LOSSY.  Like ``greedy_verify``, but a draft token is also accepted when the target gives it
    probability >= tau.  Faster with a weak draft; the output is no longer the target's own."""
    k = len(draft_ids)
    target_ids = target_logits.argmax(axis=-1)  # [k+1]
    for i in range(k):
        d = int(draft_ids[i])
        if d == target_ids[i]:
            continue
        row = target_logits[i]
        if d < row.shape[0]:
            shifted = np.exp(row - row[target_ids[i]])  # [vocab]; the max is 1
            if shifted[d] / shifted.sum() >= tau:
                continue
        return i, int(target_ids[i])
    return k, int(target_ids[k])
