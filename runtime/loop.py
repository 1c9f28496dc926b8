"""The decode loops: speculative (propose → verify → commit) and target-only.

Both are generators of ``StepResult`` — the tokens one target pass emitted — and know nothing about
text, stop strings or which drafter runs; the caller stops iterating when it has enough.  Cache
bookkeeping, the one invariant everything rests on:

    at the top of each iteration the context is ``length`` tokens long; the target's cache holds the
    first ``length - 1`` of them and ``last`` (token ``length - 1``) has not been run by the target.
    The drafter follows the same context through ``begin`` / ``commit`` (its own caches are its
    business: see ``runtime/drafters``).

The context never exceeds ``max_context`` tokens: a step emits at most ``max_context - length`` tokens.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from specrt.runtime.acceptance import (
    greedy_verify,
    point_rejection_verify,
    rejection_verify,
    relaxed_greedy_verify,
    sample,
)
from specrt.runtime.backend import PREFILL_CHUNK, ModelStep
from specrt.runtime.drafters.base import Drafter, Proposal, empty
from specrt.runtime.drafters.model import check_finite
from specrt.runtime.policy import Policy
from specrt.runtime.sampling import SamplingParams, warp
from specrt.runtime.stats import Stats
from specrt.runtime.tree import Tree, attention_block, greedy_tree_verify, positions, prune, sampled_tree_verify


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


def _prefill_features(target: ModelStep, prompt_ids: np.ndarray) -> np.ndarray:
    """Prefill, keeping the target's features of every prompt token but the last [L - 1, F] (a feature head's).

    One chunk per ``extend`` (a prefill-stage pass: the LM head runs on the chunk's last row only -- on every row
    it made the demo target's feature prefill 10-15% slower), then its rows' features."""
    n = len(prompt_ids) - 1
    target.set_length(0)
    if n == 0:
        return np.zeros((0, 0), np.float32)
    chunks = []
    for start in range(0, n, PREFILL_CHUNK):
        chunk = prompt_ids[start:min(n, start + PREFILL_CHUNK)]
        target.extend(chunk, start)
        chunks.append(target.features().copy())  # the last pass's rows: extend makes one pass of a chunk this size
        assert len(chunks[-1]) == len(chunk), "extend split a prefill chunk: its features cover the last pass only"
    return np.concatenate(chunks)


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
        check_finite(logits, "target", length)
        last = _choose(logits, params, rng)
        dt = time.perf_counter() - t0
        stats.verify_s += dt
        length += 1
        yield StepResult([last], accepted=0, proposed=0, length=length - 1, verify_s=dt)


def verify(proposal: Proposal, target_logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           accept_tau: float | None = None) -> tuple[int, int]:
    """(accepted, recovered-or-bonus id) for a chain proposal and the target's rows [len + 1, vocab]."""
    ids = proposal.token_ids
    if params.greedy:
        if accept_tau is None:
            return greedy_verify(ids, target_logits)
        return relaxed_greedy_verify(ids, target_logits, accept_tau)
    target_probs = warp(target_logits, params)  # [len + 1, vocab], the same warp as the draft's q
    if proposal.probs is None:
        return point_rejection_verify(ids, target_probs, rng)
    return rejection_verify(ids, proposal.probs, target_probs, rng)


def speculative(target: ModelStep, drafter: Drafter, prompt_ids: np.ndarray, policy: Policy, max_new_tokens: int,
                params: SamplingParams, rng: np.random.Generator, stats: Stats,
                accept_tau: float | None = None, tree_nodes: int = 0,
                row_cost: dict[int, float] | None = None) -> Iterator[StepResult]:
    """``accept_tau`` switches on the LOSSY relaxed acceptance (greedy only); None = strict.  ``tree_nodes``:
    propose trees of up to this many nodes (a target graph that takes tree passes), pruned by the speedup
    formula with ``row_cost`` (seconds of a pass by rows, measured on this engine)."""
    max_context = min(target.max_context, drafter.max_context or target.max_context)
    trees = bool(tree_nodes) and getattr(target, "supports_tree", False) and accept_tau is None
    keep_drafting = policy.keep_drafting if policy.needs_confidence else None
    t0 = time.perf_counter()
    if drafter.needs_features:
        drafter.begin(prompt_ids, _prefill_features(target, prompt_ids))
    else:
        _prefill(target, prompt_ids)
        drafter.begin(prompt_ids)
    stats.prefill_s += time.perf_counter() - t0
    length, last = len(prompt_ids), int(prompt_ids[-1])
    emitted = 0
    row_ids = np.zeros(max(policy.max_k, tree_nodes) + 1, dtype=np.int64)  # [rows]: last, then the proposal
    while emitted < max_new_tokens and length < max_context:
        # Fewer proposals near the end: never emit past max_new_tokens or the context.
        k = policy.next_k(max(0, min(max_new_tokens - emitted - 1, max_context - length - 1)))

        # propose: a chain, or (a tree-capable target, past the first position) a tree pruned to what pays
        t0 = time.perf_counter()
        tree = None
        # a tree pass writes its m + 1 rows at length - 1 onwards: at most max_context - length nodes
        nodes = min(max(tree_nodes, k), max_context - length)
        if k > 0 and trees and length >= 2 and nodes >= 2:
            proposal = drafter.propose_tree(k, nodes, params, rng)
            if proposal.parents is not None and len(proposal):
                tree = Tree(proposal.token_ids, proposal.parents)
                if row_cost and proposal.scores is not None:
                    tree = prune(tree, proposal.scores, row_cost)
                proposal = Proposal(tree.token_ids)  # verified as deterministic candidates (q one-hot)
        else:
            proposal = drafter.propose(k, params, rng, keep_drafting) if k > 0 else empty()
        m = len(proposal)
        t1 = time.perf_counter()

        # verify: the target scores `last` and all proposals in one pass
        row_ids[0] = last
        row_ids[1:m + 1] = proposal.token_ids
        if tree is None or tree.is_chain:
            target_logits = target.step(row_ids[:m + 1], length - 1)  # [m+1, vocab]
            check_finite(target_logits, "target", length)
            accepted, next_id = verify(proposal, target_logits, params, rng, accept_tau)
            rows = list(range(accepted + 1))
        else:
            target_logits = target.step(row_ids[:m + 1], length - 1,
                                        tree=(positions(tree, length - 1), attention_block(tree)))
            check_finite(target_logits, "target", length)
            path, next_id = (greedy_tree_verify(tree, target_logits) if params.greedy else
                             sampled_tree_verify(tree, lambda row, lg=target_logits: warp(lg[row], params), rng))
            accepted, rows = len(path), [0, *(i + 1 for i in path)]
            stats.tree_passes += 1
        t2 = time.perf_counter()

        # commit: the target keeps `last` + the accepted proposals (rollback = a length; a tree's accepted path
        # moves to consecutive positions first); the drafter follows
        accepted_ids = [int(proposal.token_ids[r - 1]) for r in rows[1:]]
        if tree is None or tree.is_chain:
            target.set_length(length + accepted)
        else:
            target.compact(length - 1, rows)
        committed_logits = None
        if drafter.needs_logits:  # a chain's committed rows are a prefix: a view, no per-step copy
            committed_logits = target_logits[:accepted + 1] if tree is None or tree.is_chain else target_logits[rows]
        drafter.commit(accepted_ids, next_id, target.features()[rows] if drafter.needs_features else None,
                       committed_logits)
        stats.draft_s += t1 - t0
        stats.verify_s += t2 - t1
        # a tree's acceptance is that of its deepest path: its m nodes are not m chances in a row
        policy.observe(m, accepted, t1 - t0, t2 - t1, depth=None if tree is None else int(tree.depths.max(initial=0)))
        length += accepted + 1
        last = next_id
        emitted += accepted + 1
        yield StepResult([*accepted_ids, next_id], accepted=accepted, proposed=m, length=length - accepted - 1,
                         draft_s=t1 - t0, verify_s=t2 - t1, draft_top=proposal.top)
