"""runtime/drafters/hybrid.py: a context match first, the draft model otherwise; both follow every commit."""
from __future__ import annotations

import numpy as np
from fakes import FakeStep
from specrt.runtime.drafters import HybridDrafter, ModelDrafter, NgramDrafter
from specrt.runtime.sampling import SamplingParams

GREEDY, RNG = SamplingParams(), np.random.default_rng(0)


def test_context_match_first_model_otherwise():
    target = FakeStep(salt=1)
    draft = FakeStep(salt=0, agree_with=target)
    h = HybridDrafter(NgramDrafter(2, 3), ModelDrafter(draft))
    h.begin(np.array([1, 2, 3, 4, 1, 2]))
    p = h.propose(2, GREEDY, RNG)
    assert h.last_source == "context" and p.token_ids.tolist() == [3, 4]
    h.commit([3, 4], 9)  # context ... 1, 2, 3, 4, 9: no earlier (4, 9) or (3, 4, 9)
    draft.widths.clear()
    p = h.propose(2, GREEDY, RNG)
    assert h.last_source == "model" and len(p) == 2
    # the model caught up on the 3 tokens it did not draft (prefill stage), then stepped 1 token at a time
    assert draft.extends[-1][0] == 3 and [n for n, _ in draft.widths] == [1, 1]


def test_a_hybrid_tree_holds_the_context_match_and_the_models_choices():
    """As a tree, hybrid verifies both: the context's continuations and, beside them, the model's top first
    tokens -- which is where a pass still gains when the match is wrong at once."""
    target = FakeStep(salt=1)
    draft = FakeStep(salt=0, agree_with=target)
    h = HybridDrafter(NgramDrafter(2, 3), ModelDrafter(draft))
    h.begin(np.array([1, 2, 3, 4, 1, 2]))
    p = h.propose_tree(3, 16, GREEDY, RNG)
    assert h.last_source == "context+model" and p.parents is not None and len(p.scores) == len(p)
    tree_paths = [p.token_ids[i] for i in range(len(p)) if p.parents[i] < 0]  # the root's children
    assert tree_paths[0] == 3  # the match's continuation (1, 2) -> 3 comes first
    model = ModelDrafter(FakeStep(salt=0, agree_with=target))
    model.begin(np.array([1, 2, 3, 4, 1, 2]))
    first = model.propose_tree(1, 16, GREEDY, RNG)
    assert set(first.token_ids.tolist()) <= set(tree_paths)  # the model's first-token choices hang off the root
    h.commit([3], 4)  # a tree was verified: both drafters follow
    assert len(h.propose(2, GREEDY, RNG)) > 0


def test_a_full_hybrid_tree_keeps_the_best_nodes_of_both():
    """The context's tree alone can fill the node budget (a 1-gram match offers a deep path); the merged tree
    keeps the best-scored nodes of both, so a likelier model branch displaces the match's unlikely depths."""
    target = FakeStep(salt=1)
    context = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1])  # "1" matches: 2, 3, 4, ... at 0.45 ** depth
    model = ModelDrafter(FakeStep(salt=0, agree_with=target))
    model.begin(context)
    choice = int(model.propose_tree(1, 1, GREEDY, RNG).token_ids[0])  # the model's first choice
    assert choice != 2
    h = HybridDrafter(NgramDrafter(1, 8), ModelDrafter(FakeStep(salt=0, agree_with=target)))
    h.begin(context)
    p = h.propose_tree(8, 2, GREEDY, RNG)
    assert p.token_ids.tolist() == [2, choice] and p.parents.tolist() == [-1, -1]  # not 2 -> 3
