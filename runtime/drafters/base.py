"""The one interface every drafter implements: propose up to k tokens, be told what was accepted.

A drafter follows one generation's context.  The loop calls

    begin(prompt_ids, features)            a new generation; the prompt is the context (features: the
                                           target's hidden states of the prompt, for a feature head)
    propose(k, sampling, rng, keep) -> Proposal   up to k tokens that may follow the context
    commit(accepted_ids, next_id, features, logits)  the target accepted these proposals and emitted
                                                  next_id (recovered or bonus): the context grew by
                                                  accepted_ids + [next_id]; ``logits`` are the target's
                                                  for the committed rows [a + 1, vocab] (their inputs:
                                                  the old last token and accepted_ids), for a drafter
                                                  that ``needs_logits``; else None
    end()                                  the generation is over (finished, stopped or abandoned)

A proposal carries, per token, the distribution q it was drawn from (``probs``), or ``None`` for a
deterministic proposal (a context match): q is then one-hot and the acceptance rule uses p(x) alone.
A drafter that finds nothing returns an empty proposal; the step is then a plain target step.
Drafters that keep a model cache roll it back by length inside ``commit``; the loop never knows
which drafter runs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from specrt.runtime.sampling import SamplingParams

KeepDrafting = Callable[[float], bool]  # the policy's early stop, given the draft's top probability


@dataclass
class Proposal:
    token_ids: np.ndarray  # [m] int64, m <= k
    probs: np.ndarray | None = None  # [m, vocab] q per token (sampling with a model draft); None = deterministic
    top: list[float] | None = None  # the draft's top probability per token (traces), when it has one
    parents: np.ndarray | None = None  # a tree (runtime/tree.py): each token's parent, -1 = the root; None = chain
    scores: np.ndarray | None = None  # a tree's per-node estimate that the node is accepted (for pruning)

    def __len__(self) -> int:
        return len(self.token_ids)


EMPTY = np.zeros(0, dtype=np.int64)


def empty() -> Proposal:
    return Proposal(EMPTY)


def tree_proposal(tokens: Sequence[int], parents: Sequence[int], scores: Sequence[float]) -> Proposal:
    """A deterministic tree proposal from its nodes in topological order; no nodes: the empty proposal."""
    if not len(tokens):
        return empty()
    return Proposal(np.array(tokens, dtype=np.int64), None, None, np.array(parents, dtype=np.int64),
                    np.array(scores, dtype=np.float64))


class Drafter:
    """Base class; see the module docstring for the protocol."""

    name = "drafter"
    needs_features = False  # True: commit() wants the target's hidden states of the committed rows
    needs_logits = False  # True: commit() wants the target's logits of the committed rows
    max_context: int | None = None  # a model drafter's cache capacity; None = no cache of its own

    def begin(self, prompt_ids: np.ndarray, features: np.ndarray | None = None) -> None:
        raise NotImplementedError

    def propose(self, k: int, sampling: SamplingParams, rng: np.random.Generator,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        raise NotImplementedError

    def propose_tree(self, k: int, nodes: int, sampling: SamplingParams, rng: np.random.Generator) -> Proposal:
        """A tree of at most ``nodes`` candidates, at most ``k`` deep, with ``parents`` and ``scores`` (the
        default: the chain proposal as a one-branch tree).  Tree candidates are deterministic proposals."""
        chain = self.propose(k, sampling, rng)
        m = len(chain)
        return Proposal(chain.token_ids, None, chain.top, np.arange(-1, m - 1, dtype=np.int64),
                        np.full(m, 0.5) ** np.arange(1, m + 1))

    def commit(self, accepted_ids: Sequence[int], next_id: int, features: np.ndarray | None = None,
               logits: np.ndarray | None = None) -> None:
        raise NotImplementedError

    def end(self) -> None:
        """Called once per generation, however it ended (the suffix cache keeps the text here)."""
