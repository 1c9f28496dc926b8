"""runtime/verify.py: one verdict for chains and trees -- accepted ids, kept rows, next id, bonus or recovered."""
from __future__ import annotations

import numpy as np
import pytest
from specrt.runtime.drafters.base import Proposal
from specrt.runtime.sampling import SamplingParams
from specrt.runtime.tree import Tree, chain
from specrt.runtime.verify import verify

V = 8
GREEDY = SamplingParams()


def rows_choosing(*choices: int) -> np.ndarray:
    """Target logits [len(choices), V] whose argmax at row i is choices[i]."""
    logits = np.zeros((len(choices), V), np.float32)
    logits[np.arange(len(choices)), choices] = 5.0
    return logits


# a tree: node 0 (token 3) and node 1 (token 4) under the root; node 2 (token 5) under node 0; node 3 (token 6)
# under node 2 -- so rows: 0 root, 1 node0, 2 node1, 3 node2, 4 node3
TREE = Tree(np.array([3, 4, 5, 6]), np.array([-1, -1, 0, 2]))


@pytest.mark.parametrize(("name", "proposal", "tree", "choices", "accepted", "rows", "next_id", "bonus"), [
    ("chain, all accepted", [3, 4], None, (3, 4, 7), [3, 4], [0, 1, 2], 7, True),
    ("chain, early mismatch", [3, 4], None, (3, 1, 7), [3], [0, 1], 1, False),
    ("chain, first rejected", [3, 4], None, (2, 4, 7), [], [0], 2, False),
    ("nothing proposed", [], None, (5,), [], [0], 5, False),
    ("tree, path to a leaf", [3, 4, 5, 6], TREE, (3, 5, 0, 6, 2), [3, 5, 6], [0, 1, 3, 4], 2, True),
    ("tree, stops above a leaf", [3, 4, 5, 6], TREE, (3, 5, 0, 1, 2), [3, 5], [0, 1, 3], 1, False),
    ("tree, second branch is a leaf", [3, 4, 5, 6], TREE, (4, 0, 7, 0, 0), [4], [0, 2], 7, True),
    ("tree, root's children rejected", [3, 4, 5, 6], TREE, (1, 0, 0, 0, 0), [], [0], 1, False),
    ("a tree that is a chain", [3, 4], chain(np.array([3, 4])), (3, 4, 7), [3, 4], [0, 1, 2], 7, True),
])
def test_greedy_verdicts(name, proposal, tree, choices, accepted, rows, next_id, bonus):
    v = verify(Proposal(np.array(proposal, dtype=np.int64)), tree, rows_choosing(*choices), GREEDY,
               np.random.default_rng(0))
    assert (v.accepted_ids, v.rows, v.next_id, v.bonus) == (accepted, rows, next_id, bonus), name
    assert v.accepted == len(accepted) and len(v.rows) == v.accepted + 1


def test_sampled_verdicts_keep_their_shape():
    """Sampling: whatever is drawn, the rows are the accepted path's and bonus means the path ended at a leaf."""
    rng = np.random.default_rng(3)
    logits = np.random.default_rng(1).standard_normal((5, V)).astype(np.float32)
    logits[:, 3:7] += 2.0  # the tree's tokens are likely
    seen = set()
    for _ in range(300):
        v = verify(Proposal(np.array([3, 4, 5, 6])), TREE, logits, SamplingParams(1.0), rng)
        path = [r - 1 for r in v.rows[1:]]
        assert [int(TREE.token_ids[i]) for i in path] == v.accepted_ids
        assert v.bonus == (bool(path) and not TREE.children()[path[-1] + 1])
        seen.add((len(path), v.bonus))
    assert {(3, True), (0, False)} <= seen


def test_a_trees_path_ending_at_a_leaf_is_a_bonus_step():
    """A step's last token is booked by the verdict (``Sequence`` counts ``StepResult.bonus``): a tree whose accepted
    path ends at a leaf gives a bonus, though not every node was accepted (it used to be booked as recovered)."""
    from specrt.runtime import loop
    from specrt.runtime.backend import ModelStep
    from specrt.runtime.drafters.base import Drafter, tree_proposal
    from specrt.runtime.policy import Fixed
    from specrt.runtime.stats import Stats

    class Echo(ModelStep):  # the target's next token is always (token + 1) % V
        supports_tree = True

        def __init__(self):
            self.max_context, self.vocab_size, self.length = 64, V, 0

        def forward(self, token_ids, pos, *, tree=None, inputs=None, last_only=False):
            self.length = pos + len(token_ids)
            return rows_choosing(*((np.asarray(token_ids) + 1) % V))

        def keep(self, pos, rows):
            self.length = pos + len(rows)

        def set_length(self, n):
            self.length = n

        def extend(self, ids, pos):
            self.length = pos + len(ids)
            return rows_choosing((int(ids[-1]) + 1) % V)[0]

    class TwoBranches(Drafter):  # last + 1 (a leaf) beside last + 2 -> last + 3 (a longer, wrong branch)
        def begin(self, prompt_ids, features=None):
            self.last = int(prompt_ids[-1])

        def propose_tree(self, k, nodes, sampling, rng):
            a = (self.last + 1) % V
            return tree_proposal([(self.last + 2) % V, (self.last + 3) % V, a], [-1, 0, -1], [0.5, 0.4, 0.5])

        def commit(self, accepted_ids, next_id, features=None, logits=None):
            self.last = next_id

    steps = list(loop.speculative(Echo(), TwoBranches(), np.array([0, 1]), Fixed(2), 6, GREEDY,
                                  np.random.default_rng(0), Stats(), tree_nodes=3))
    assert steps and all(s.accepted == 1 and s.bonus for s in steps)
