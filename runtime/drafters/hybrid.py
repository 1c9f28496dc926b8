"""``hybrid``: a context match when there is one, the draft model otherwise (and ``ngram+recycle``: a context
match when there is one, the target's recycled predictions otherwise -- the same composition).

Context matching is nearly free and, when it hits, usually right for several tokens; the draft model
costs a forward pass per token and is right less often but everywhere.  Both follow every commit; a draft
model or feature head runs the commits of the steps a match drafted only when it is next asked, in one pass.

As a tree it takes both: the context's matches as branches, and the model's top choices for the next
token (each continued ``MODEL_DEPTH`` deep; a feature head's ``HEAD_DEPTH``) beside them -- where no match exists or the match is wrong
at once, which on Spec-Bench is most steps, the model's branches are what a pass can still accept.
The loop's pruning then keeps the nodes the pass costs pay for.  A second drafter that costs nothing
per node (``recycle``) branches as deep as k (``model_depth=None``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from specrt.runtime.drafters.base import Drafter, KeepDrafting, Proposal
from specrt.runtime.sampling import SamplingParams
from specrt.runtime.tree import Tree, merge

MODEL_DEPTH = 2  # how deep the model's branches go in a hybrid tree: each level is a draft step per branch
# A feature head's branches: its greedy chain this deep, a runner-up beside each node.  The first level comes from
# the logits the head computed while following the last commit (no head call); each further level costs one
# (~1 ms).  Measured on Spec-Bench dev, one run taking turns prompt by prompt (docs/drafters.md, "Trees"): with
# the current head, depth 1 / 2 / 3 drafted 2.25 / 2.42 / 2.45 tokens per pass at 1.41x / 1.45x / 1.46x; an
# earlier, weaker head gained too little for the calls (depth 1 1.44x, 2-4 1.42-1.43x).  2: within 1% of 3 in two
# runs, one head call less.
HEAD_DEPTH = 2


class HybridDrafter(Drafter):
    name = "hybrid"

    def __init__(self, context: Drafter, model: Drafter, model_depth: int | None = MODEL_DEPTH, name: str = "hybrid"):
        self.context, self.model = context, model
        self.model_depth, self.name = model_depth, name
        self.max_context = model.max_context
        self.needs_features = model.needs_features  # an eagle head follows every commit too
        self.needs_logits = context.needs_logits or model.needs_logits
        # "context" | the second drafter's name ("model", "eagle", "recycle") | "context+<name>" (a tree) | ""
        # (nothing): traces, tests
        self.last_source = ""

    def begin(self, prompt_ids: np.ndarray, features: np.ndarray | None = None) -> None:
        self.context.begin(prompt_ids)
        self.model.begin(prompt_ids, features)

    def propose(self, k: int, sampling: SamplingParams, rng: np.random.Generator,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        proposal = self.context.propose(k, sampling, rng, keep_drafting)
        self.last_source = "context"
        if not len(proposal):
            proposal = self.model.propose(k, sampling, rng, keep_drafting)
            self.last_source = self.model.name if len(proposal) else ""
        return proposal

    def propose_tree(self, k: int, nodes: int, sampling: SamplingParams, rng: np.random.Generator) -> Proposal:
        context = self.context.propose_tree(k, nodes, sampling, rng)
        model = self.model.propose_tree(min(k, self.model_depth or k), nodes, sampling, rng)
        parts = [(Tree(p.token_ids, p.parents), p.scores) for p in (context, model) if len(p)]
        self.last_source = "+".join(name for name, p in (("context", context), (self.model.name, model)) if len(p))
        if not parts:
            return context
        tree, scores = merge(parts, nodes)
        return Proposal(tree.token_ids, None, None, tree.parents, scores)

    def commit(self, accepted_ids: Sequence[int], next_id: int, features: np.ndarray | None = None,
               logits: np.ndarray | None = None) -> None:
        self.context.commit(accepted_ids, next_id, features, logits)
        self.model.commit(accepted_ids, next_id, features, logits)

    def end(self) -> None:
        self.context.end()
        self.model.end()
