"""The decode loops: speculative (propose → verify → commit) and target-only.

Both are generators of ``StepResult`` — the tokens one target pass emitted — and
know nothing about text or stop strings; the caller stops iterating when it has
enough.  Cache bookkeeping, the one invariant everything rests on:

    at the top of each iteration the context is ``L`` tokens long; the target's cache
    holds the first ``L - 1`` of them and ``last`` (token ``L - 1``) has not been run;
    the draft's cache holds ``L - len(pending)`` of them and ``pending`` (which ends
    with ``last``) has not been run by the draft.

The context never exceeds ``max_context`` tokens: a step emits at most
``max_context - L`` tokens.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from specrt.runtime.acceptance import greedy_verify, rejection_verify, relaxed_greedy_verify, sample
from specrt.runtime.backend import ModelStep
from specrt.runtime.errors import GenerationError
from specrt.runtime.policy import Policy
from specrt.runtime.sampling import SamplingParams, warp
from specrt.runtime.stats import Stats


@dataclass
class StepResult:
    token_ids: list[int]  # accepted drafts, then one recovered or bonus token
    accepted: int
    proposed: int
    length: int = 0  # context length before the step
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_top: list[float] | None = None  # the draft's top probability per proposal (when traced)


def _choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    return int(logits.argmax()) if params.greedy else sample(warp(logits, params), rng)


def _prefill(model: ModelStep, prompt_ids: np.ndarray) -> None:
    if len(prompt_ids) > 1:
        model.prefill(prompt_ids[:-1])
    else:
        model.set_length(0)


def target_only(target: ModelStep, prompt_ids: np.ndarray, max_new_tokens: int, params: SamplingParams,
                rng: np.random.Generator, stats: Stats) -> Iterator[StepResult]:
    """Plain decoding with the target alone: the baseline, sharing stop and stats code with speculative."""
    t0 = time.perf_counter()
    _prefill(target, prompt_ids)
    stats.prefill_s += time.perf_counter() - t0
    length, last = len(prompt_ids), int(prompt_ids[-1])
    for _ in range(max_new_tokens):
        if length >= target.max_context:
            return
        t0 = time.perf_counter()
        logits = target.step(np.array([last]), length - 1)[-1]  # [vocab]
        _check_finite(logits, "target", length)
        last = _choose(logits, params, rng)
        dt = time.perf_counter() - t0
        stats.verify_s += dt
        length += 1
        yield StepResult([last], accepted=0, proposed=0, length=length - 1, verify_s=dt)


def speculative(target: ModelStep, draft: ModelStep, prompt_ids: np.ndarray, policy: Policy, max_new_tokens: int,
                params: SamplingParams, rng: np.random.Generator, stats: Stats,
                accept_tau: float | None = None, trace: bool = False) -> Iterator[StepResult]:
    """``accept_tau`` switches on the LOSSY relaxed acceptance (greedy only); None = strict.
    ``trace`` records the draft's top probabilities (one extra softmax per drafted token)."""
    want_top = trace or policy.needs_confidence
    max_context = min(target.max_context, draft.max_context)
    t0 = time.perf_counter()
    _prefill(target, prompt_ids)
    _prefill(draft, prompt_ids)
    stats.prefill_s += time.perf_counter() - t0
    length, last = len(prompt_ids), int(prompt_ids[-1])
    pending = [last]
    k_max = policy.max_k
    draft_ids = np.zeros(k_max, dtype=np.int64)  # [k_max]
    draft_probs = None if params.greedy else np.zeros((k_max, draft.vocab_size))  # [k_max, vocab_draft]
    emitted = 0
    while emitted < max_new_tokens and length < max_context:
        # Fewer proposals near the end: never emit past max_new_tokens or the context.
        k_step = policy.next_k(max(0, min(max_new_tokens - emitted - 1, max_context - length - 1)))

        # propose: up to k_step autoregressive draft steps, starting from the tokens it has not seen
        t0 = time.perf_counter()
        feed, pos = pending, length - len(pending)
        proposed = 0
        tops: list[float] = []
        while proposed < k_step:
            logits = draft.step(np.asarray(feed), pos)[-1]  # [vocab_draft]
            _check_finite(logits, "draft", pos)
            pos += len(feed)
            if params.greedy:
                draft_ids[proposed] = logits.argmax()
                top = _top_prob(logits) if want_top else 1.0
            else:
                draft_ids[proposed] = _draft_sample(logits, params, rng, draft_probs[proposed])
                top = float(draft_probs[proposed].max())
            feed = [int(draft_ids[proposed])]
            proposed += 1
            if trace:
                tops.append(round(top, 4))
            if not policy.keep_drafting(top):
                break
        t1 = time.perf_counter()

        # verify: the target scores `last` and all proposals in one pass
        target_logits = target.step(np.concatenate(([last], draft_ids[:proposed])), length - 1)  # [proposed+1, vocab]
        _check_finite(target_logits, "target", length)
        if not params.greedy:
            accepted, next_id = rejection_verify(draft_ids[:proposed], draft_probs[:proposed],
                                                 warp(target_logits, params), rng)
        elif accept_tau is None:
            accepted, next_id = greedy_verify(draft_ids[:proposed], target_logits)
        else:
            accepted, next_id = relaxed_greedy_verify(draft_ids[:proposed], target_logits, accept_tau)
        t2 = time.perf_counter()
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        policy.observe(proposed, accepted, t1 - t0, t2 - t1)

        # commit: both caches keep exactly the accepted context (rollback = moving a length)
        new_ids = [int(t) for t in draft_ids[:accepted]] + [next_id]
        target.set_length(length + accepted)  # `last` + accepted proposals; next_id not run yet
        if accepted < proposed:
            draft.set_length(length + accepted)
            pending = [next_id]
        else:
            # All proposals accepted (or none made): the draft never ran its last proposal,
            # so it catches up on it together with next_id at the next propose.
            pending = (pending if proposed == 0 else [int(draft_ids[proposed - 1])]) + [next_id]
        length += accepted + 1
        last = next_id
        emitted += len(new_ids)
        yield StepResult(new_ids, accepted=accepted, proposed=proposed, length=length - len(new_ids),
                         draft_s=t1 - t0, verify_s=t2 - t1, draft_top=tops if trace else None)


def _top_prob(logits: np.ndarray) -> float:
    """Largest softmax probability of a logits row, without materialising the softmax twice."""
    return float(1.0 / np.exp(logits - logits.max()).sum())


def _draft_sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, probs_out: np.ndarray) -> int:
    """Sample a draft token; ``probs_out`` receives q, the distribution it was *actually* drawn from
    (the acceptance rule is only lossless if these two agree)."""
    probs_out[:] = warp(logits, params)
    return sample(probs_out, rng)


def _check_finite(logits: np.ndarray, role: str, pos: int) -> None:
    # One O(vocab) reduction per model call; NaN/inf would otherwise turn silently into token 0 or garbage.
    if not np.isfinite(logits).all():
        raise GenerationError(f"the {role} model produced NaN/inf logits at position {pos}: the engine is numerically "
                              "broken (corrupt weights, or fp16 overflow). Re-export it (fp32) with `specrt export`.")
