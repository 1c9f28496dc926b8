"""One verification: a proposal (a chain, or a tree of candidates) and the target's rows for it -> one ``Verdict``.

The pass ran the last emitted token as row 0 and the proposal's token i as row i + 1.  Whatever the shape, the
verdict says which proposals were accepted, which of the pass's rows hold them (the target keeps exactly those
rows: ``ModelStep.keep``), and the one token the target emits after them -- in the vocabulary of
``runtime/acceptance.py``: *recovered* (the target's own token where a proposal was rejected, or where nothing
was proposed) or *bonus* (where no proposal remained to try: every proposal of a chain accepted, or a tree's
accepted path ending at a leaf).  The math lives in ``acceptance`` (chains) and ``tree`` (trees); this module
only chooses it and shapes the answer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from specrt.runtime.acceptance import greedy_verify, point_rejection_verify, rejection_verify, relaxed_greedy_verify
from specrt.runtime.drafters.base import Proposal
from specrt.runtime.sampling import SamplingParams, warp
from specrt.runtime.tree import Tree, greedy_tree_verify, sampled_tree_verify


@dataclass(frozen=True)
class Verdict:
    accepted_ids: list[int]  # the accepted proposals, in order
    rows: list[int]  # the pass's rows to keep: 0 (the last emitted token), then the accepted proposals' rows
    next_id: int  # the recovered or bonus token
    bonus: bool  # next_id came where no proposal remained; False: recovered

    @property
    def accepted(self) -> int:
        return len(self.accepted_ids)


def verify(proposal: Proposal, tree: Tree | None, target_logits: np.ndarray, params: SamplingParams,
           rng: np.random.Generator, accept_tau: float | None = None) -> Verdict:
    """The verdict on ``proposal`` (its nodes laid out as ``tree``; None: a chain) from the target's rows
    ``target_logits`` [len(proposal) + 1, vocab].  ``accept_tau`` switches chains to the LOSSY relaxed rule
    (greedy only); trees are always verified strictly."""
    ids = proposal.token_ids
    if tree is not None and not tree.is_chain:
        if params.greedy:
            path, next_id = greedy_tree_verify(tree, target_logits)
        else:
            path, next_id = sampled_tree_verify(tree, lambda row: warp(target_logits[row], params), rng)
        leaf = bool(path) and not tree.children()[path[-1] + 1]
        return Verdict([int(ids[i]) for i in path], [0, *(i + 1 for i in path)], next_id, leaf)
    if params.greedy:
        accepted, next_id = (greedy_verify(ids, target_logits) if accept_tau is None else
                             relaxed_greedy_verify(ids, target_logits, accept_tau))
    else:
        target_probs = warp(target_logits, params)  # [len + 1, vocab], the same warp as the draft's q
        accepted, next_id = (point_rejection_verify(ids, target_probs, rng) if proposal.probs is None else
                             rejection_verify(ids, proposal.probs, target_probs, rng))
    m = len(ids)
    return Verdict([int(t) for t in ids[:accepted]], list(range(accepted + 1)), next_id, m > 0 and accepted == m)
