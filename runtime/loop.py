"""The decode loop: propose → verify → commit, one target pass per step.

``Decoder`` is one generation's state, split at the target pass so that whoever runs the pass -- ``decode``
below, for one sequence; a scheduler that puts several sequences' rows into one pass, later -- stays apart
from the algorithm:

    rows = decoder.plan()               # propose: the rows this step wants the target to score
    logits = target.forward(rows...)    # the target pass
    step = decoder.apply(logits, ...)   # verify, then commit: the target keeps the accepted rows, the
                                        # drafter follows, and the step's tokens come out

Cache bookkeeping, the one invariant everything rests on:

    at the top of each step the context is ``length`` tokens long; the target's cache holds the first
    ``length - 1`` of them and ``last`` (token ``length - 1``) has not been run by the target.  The drafter
    follows the same context through ``begin`` / ``commit`` (its own caches are its business: see
    ``runtime/drafters``).

Without a drafter (or with k = 0) a step is plain decoding: the target scores ``last`` alone -- the baseline,
sharing stop and stats code with speculation.  The context never exceeds ``max_context`` tokens: a step
emits at most ``max_context - length`` tokens.  The loop knows nothing about text, stop strings or which
drafter or backend runs; the caller stops iterating when it has enough.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from specrt.runtime.backend import PREFILL_CHUNK, ModelStep, Tree
from specrt.runtime.drafters.base import Drafter, Proposal, empty
from specrt.runtime.policy import Policy
from specrt.runtime.sampling import SamplingParams, check_finite
from specrt.runtime.stats import Stats
from specrt.runtime.tree import Tree as TokenTree
from specrt.runtime.tree import attention_block, positions, prune
from specrt.runtime.verify import verify


@dataclass
class StepResult:
    token_ids: list[int]  # accepted drafts, then one recovered or bonus token
    accepted: int
    proposed: int
    length: int = 0  # context length before the step
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_top: list[float] | None = None  # the draft's top probability per proposal (when traced)
    bonus: bool = False  # the last token is a bonus (no proposal remained to try); False: recovered


@dataclass
class Rows:
    """What one step asks the target to score: ``token_ids`` [n] at ``pos`` (a chain), or as a tree pass."""

    token_ids: np.ndarray
    pos: int
    tree: Tree | None = None  # (positions [n], bias [n, n]); None: consecutive positions


class Decoder:
    """One generation on one sequence: ``begin`` (the prefill), then ``plan`` / ``apply`` per step.

    ``drafter`` None is target-only decoding.  ``accept_tau`` switches on the LOSSY relaxed acceptance (greedy
    only); None = strict.  ``tree_nodes``: propose trees of up to this many nodes (a target that
    ``supports_tree``), pruned by the speedup formula with ``row_cost`` (seconds of a pass by rows, measured
    on this engine)."""

    def __init__(self, target: ModelStep, drafter: Drafter | None, policy: Policy | None, max_new_tokens: int,
                 params: SamplingParams, rng: np.random.Generator, stats: Stats, accept_tau: float | None = None,
                 tree_nodes: int = 0, row_cost: dict[int, float] | None = None):
        self.target, self.drafter, self.policy, self.params, self.rng, self.stats = (target, drafter, policy,
                                                                                    params, rng, stats)
        self.max_new_tokens, self.accept_tau, self.row_cost = max_new_tokens, accept_tau, row_cost
        self.max_context = min(target.max_context, (drafter.max_context if drafter else None) or target.max_context)
        self.tree_nodes = tree_nodes if drafter and target.supports_tree and accept_tau is None else 0
        self.keep_drafting = policy.keep_drafting if policy is not None and policy.needs_confidence else None
        self.row_ids = np.zeros(max(policy.max_k if policy else 0, self.tree_nodes) + 1, dtype=np.int64)
        self.length = self.last = self.emitted = 0
        self.ids: list[int] = []  # the context: the prompt, then every emitted token (what the caches follow)
        self._step: tuple[Proposal, TokenTree | None, float] | None = None  # what plan() proposed, for apply()

    def begin(self, prompt_ids: np.ndarray, reuse: int = 0) -> None:
        """Prefill: the target (and the drafter) take the prompt but its last token, which becomes ``last``.
        ``reuse``: the target's cache already holds the KV of the prompt's first ``reuse`` tokens (this sequence's
        previous prompt and answer); only the rest is run.  A feature drafter needs the features of the whole
        prompt, so it gets a fresh prefill."""
        for _ in self.prefill(prompt_ids, reuse):
            pass

    def prefill(self, prompt_ids: np.ndarray, reuse: int = 0) -> Iterator[None]:
        """``begin``, a target pass at a time: yields after each prefill chunk (a scheduler interleaves other
        sequences' passes there)."""
        self.ids = [int(t) for t in prompt_ids]
        feature_drafter = self.drafter is not None and self.drafter.needs_features
        reuse = 0 if feature_drafter else min(reuse, len(prompt_ids) - 1, self.target.length)
        self.stats.reused_tokens = reuse
        features = [] if feature_drafter else None
        t0 = time.perf_counter()
        for _ in prefill_chunks(self.target, prompt_ids, reuse, features):
            self.stats.prefill_s += time.perf_counter() - t0
            yield
            t0 = time.perf_counter()
        if self.drafter is not None:
            if feature_drafter:
                self.drafter.begin(prompt_ids, np.concatenate(features) if features else np.zeros((0, 0), np.float32))
            else:
                self.drafter.begin(prompt_ids)
        self.stats.prefill_s += time.perf_counter() - t0
        self.length, self.last = len(prompt_ids), int(prompt_ids[-1])

    @property
    def done(self) -> bool:
        return self.emitted >= self.max_new_tokens or self.length >= self.max_context

    def plan(self, k_cap: int | None = None) -> Rows | None:
        """Propose: ``last`` and the drafter's proposal (a chain, or a tree pruned to what pays), as the rows of
        this step's target pass; None when the generation has emitted all it may.  ``k_cap``: at most this many
        proposals (a scheduler's choice: 0 puts the sequence's one row into a batched pass)."""
        if self.done:
            return None
        t0 = time.perf_counter()
        proposal, tree = empty(), None
        if self.drafter is not None:
            # fewer proposals near the end: never emit past max_new_tokens or the context
            limit = max(0, min(self.max_new_tokens - self.emitted - 1, self.max_context - self.length - 1))
            k = self.policy.next_k(limit if k_cap is None else min(limit, k_cap))
            # a tree pass writes its m + 1 rows at length - 1 onwards: at most max_context - length nodes
            nodes = min(max(self.tree_nodes, k), self.max_context - self.length)
            if k > 0 and self.tree_nodes and self.length >= 2 and nodes >= 2:
                proposal = self.drafter.propose_tree(k, nodes, self.params, self.rng)
                if proposal.parents is not None and len(proposal):
                    tree = TokenTree(proposal.token_ids, proposal.parents)
                    if self.row_cost and proposal.scores is not None:
                        tree = prune(tree, proposal.scores, self.row_cost)
                    proposal = Proposal(tree.token_ids)  # verified as deterministic candidates (q one-hot)
            elif k > 0:
                proposal = self.drafter.propose(k, self.params, self.rng, self.keep_drafting)
        m = len(proposal)
        self.row_ids[0] = self.last
        self.row_ids[1:m + 1] = proposal.token_ids
        pos = self.length - 1
        self._step = (proposal, tree, time.perf_counter() - t0 if self.drafter is not None else 0.0)
        if tree is not None and not tree.is_chain:
            return Rows(self.row_ids[:m + 1], pos, (positions(tree, pos), attention_block(tree)))
        return Rows(self.row_ids[:m + 1], pos)

    def apply(self, target_logits: np.ndarray, pass_s: float = 0.0,
              features: np.ndarray | None = None) -> StepResult:
        """Verify the planned proposal against the target's rows [m + 1, vocab] (the pass took ``pass_s``), then
        commit: the target keeps ``last`` and the accepted rows (rollback = a length; a tree's accepted path moves
        to consecutive positions first) and the drafter follows.  ``features``: the pass's rows' features for a
        feature drafter (default: the target's last pass's)."""
        assert self._step is not None, "apply() without a plan()"
        proposal, tree, draft_s = self._step
        self._step = None
        t0 = time.perf_counter()
        check_finite(target_logits, "target", self.length)
        v = verify(proposal, tree, target_logits, self.params, self.rng, self.accept_tau)
        self.target.keep(self.length - 1, v.rows)
        if self.drafter is not None:
            committed_logits = None
            if self.drafter.needs_logits:  # a chain's committed rows are a prefix: a view, no per-step copy
                committed_logits = target_logits[:len(v.rows)] if v.rows[-1] == len(v.rows) - 1 else \
                    target_logits[v.rows]
            if self.drafter.needs_features:
                features = (self.target.features() if features is None else features)[v.rows]
            self.drafter.commit(v.accepted_ids, v.next_id, features if self.drafter.needs_features else None,
                                committed_logits)
        verify_s = pass_s + time.perf_counter() - t0
        m = len(proposal)
        self.stats.draft_s += draft_s
        self.stats.verify_s += verify_s
        if tree is not None and not tree.is_chain:
            self.stats.tree_passes += 1
        if self.policy is not None:
            # a tree's acceptance is that of its deepest path: its m nodes are not m chances in a row
            self.policy.observe(m, v.accepted, draft_s, verify_s,
                                depth=None if tree is None else int(tree.depths.max(initial=0)))
        start = self.length
        self.length += v.accepted + 1
        self.last = v.next_id
        self.emitted += v.accepted + 1
        self.ids += v.accepted_ids
        self.ids.append(v.next_id)
        return StepResult([*v.accepted_ids, v.next_id], accepted=v.accepted, proposed=m, length=start,
                          draft_s=draft_s, verify_s=verify_s, draft_top=proposal.top, bonus=v.bonus)


def prefill_chunks(target: ModelStep, prompt_ids: np.ndarray, reuse: int = 0,
                   features: list[np.ndarray] | None = None) -> Iterator[None]:
    """Run the prompt but its last token through ``target`` from position ``reuse`` (whose earlier entries it holds),
    one prefill-stage pass (``extend`` of a chunk) at a time, yielding after each.  ``features``: also collect each
    chunk's rows' features (a feature head's prefill; every prompt token but the last, [L - 1, F] in all)."""
    n = len(prompt_ids) - 1
    target.set_length(reuse)
    for start in range(reuse, n, PREFILL_CHUNK):
        chunk = prompt_ids[start:min(n, start + PREFILL_CHUNK)]
        target.extend(chunk, start)  # the LM head runs on the chunk's last row only
        if features is not None:
            features.append(target.features().copy())  # the last pass's rows: extend makes one pass of a chunk
            assert len(features[-1]) == len(chunk), "extend split a prefill chunk: its features cover the last pass only"
        yield


def prefill_features(target: ModelStep, prompt_ids: np.ndarray) -> np.ndarray:
    """Prefill, keeping the target's features of every prompt token but the last [L - 1, F] (a feature head's).

    One chunk per ``extend`` (a prefill-stage pass: the LM head runs on the chunk's last row only -- on every row
    it made the demo target's feature prefill 10-15% slower), then its rows' features."""
    features: list[np.ndarray] = []
    for _ in prefill_chunks(target, prompt_ids, 0, features):
        pass
    return np.concatenate(features) if features else np.zeros((0, 0), np.float32)


def decode(decoder: Decoder, prompt_ids: np.ndarray, reuse: int = 0) -> Iterator[StepResult]:
    """One sequence's steps: the decoder's rows through its own target, a pass each (``reuse``: see ``begin``)."""
    decoder.begin(prompt_ids, reuse)
    target = decoder.target
    while (rows := decoder.plan()) is not None:
        t0 = time.perf_counter()
        logits = target.forward(rows.token_ids, rows.pos, tree=rows.tree)  # [m + 1, vocab]
        yield decoder.apply(logits, time.perf_counter() - t0)


def speculative(target: ModelStep, drafter: Drafter, prompt_ids: np.ndarray, policy: Policy, max_new_tokens: int,
                params: SamplingParams, rng: np.random.Generator, stats: Stats, accept_tau: float | None = None,
                tree_nodes: int = 0, row_cost: dict[int, float] | None = None) -> Iterator[StepResult]:
    """Speculative decoding of one sequence (see ``Decoder`` for the parameters)."""
    return decode(Decoder(target, drafter, policy, max_new_tokens, params, rng, stats, accept_tau, tree_nodes,
                          row_cost), prompt_ids)


def target_only(target: ModelStep, prompt_ids: np.ndarray, max_new_tokens: int, params: SamplingParams,
                rng: np.random.Generator, stats: Stats) -> Iterator[StepResult]:
    """Plain decoding with the target alone: the baseline."""
    return decode(Decoder(target, None, None, max_new_tokens, params, rng, stats), prompt_ids)
