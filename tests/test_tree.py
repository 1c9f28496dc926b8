"""runtime/tree.py: tree layout, masks, verification (greedy and sampled), pruning; KVCache.compact."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from specrt.runtime.kv_cache import KVCache
from specrt.runtime.tree import (
    NEG,
    Tree,
    attention_block,
    chain,
    from_paths,
    greedy_tree_verify,
    merge,
    positions,
    prune,
    sampled_tree_verify,
    trie,
)

# root -> 7 -> 8 -> 9 ; root -> 7 -> 10 ; root -> 11 -> 12
TREE = from_paths([[7, 8, 9], [7, 10], [11, 12]], 10)


def test_trie_layout_positions_and_mask():
    assert TREE.token_ids.tolist() == [7, 8, 9, 10, 11, 12]
    assert TREE.parents.tolist() == [-1, 0, 1, 0, -1, 4]
    assert TREE.depths.tolist() == [1, 2, 3, 2, 1, 2]
    assert positions(TREE, 100).tolist() == [100, 101, 102, 103, 102, 101, 102]
    block = attention_block(TREE)
    visible = [set(np.flatnonzero(row == 0).tolist()) for row in block]
    assert visible == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 4}, {0, 5}, {0, 5, 6}]
    assert block[4, 2] == NEG  # node 10 does not see its uncle 8
    assert from_paths([[1, 2, 3]], 10).is_chain and not TREE.is_chain
    assert from_paths([[7, 8, 9], [11]], 2).token_ids.tolist() == [7, 8]  # the budget cuts
    _, origin = trie([[7, 8, 9], [7, 10], [11, 12]], 10)
    assert origin.tolist() == [0, 0, 0, 1, 2, 2]
    assert chain([4, 5]).parents.tolist() == [-1, 0]


def logits_for(choices, vocab=16):
    out = np.zeros((len(choices), vocab), dtype=np.float32)
    out[np.arange(len(choices)), choices] = 5.0
    return out


@pytest.mark.parametrize("choices, path, next_id", [
    ([3, 0, 0, 0, 0, 0, 0], [], 3),            # the target wants 3: no child has it -> recovered 3
    ([7, 8, 9, 4, 0, 0, 0], [0, 1, 2], 4),     # down 7 -> 8 -> 9, then the bonus after the leaf
    ([7, 10, 0, 0, 5, 0, 0], [0, 3], 5),       # 7, then 10 (the second branch under 7), bonus from row 4
    ([11, 0, 0, 0, 0, 13, 0], [4], 13),        # the other subtree: 11, then 13 is not 12 -> recovered
    ([11, 0, 0, 0, 0, 12, 1], [4, 5], 1),
])
def test_greedy_walks_the_targets_choices(choices, path, next_id):
    assert greedy_tree_verify(TREE, logits_for(choices)) == (path, next_id)


def test_sampled_tree_verification_is_sampling_from_p():
    """At the root the target's p is fixed; the token that comes out of the multi-candidate rule (an
    accepted child's, or a sample of what is left) must follow p exactly, whatever the candidates."""
    rng = np.random.default_rng(0)
    p = np.array([0.05, 0.3, 0.15, 0.1, 0.4])
    tree = from_paths([[4], [1], [0]], 10)  # three candidates under the root, tried in that order
    probs = np.tile(p, (len(tree) + 1, 1))
    n = 20000
    counts = np.zeros(5)
    for _ in range(n):
        path, nxt = sampled_tree_verify(tree, probs, rng)
        counts[int(tree.token_ids[path[0]]) if path else nxt] += 1
    stat = (((counts - n * p) ** 2) / (n * p)).sum()
    critical = 4 * (1 - 2 / 36 + 3.0902 * math.sqrt(2 / 36)) ** 3  # chi-square, 4 df, alpha 0.001
    assert stat < critical, (counts / n, stat)

    def broken(tree, probs, rng):  # BUG: a rejected candidate stays in p for the next one
        kids = tree.children()
        for c in kids[0]:
            x = int(tree.token_ids[c - 1])
            if rng.random() < probs[0][x]:
                return [c - 1], 0
        return [], int(rng.choice(5, p=probs[0]))
    counts = np.zeros(5)
    for _ in range(n):
        path, nxt = broken(tree, probs, rng)
        counts[int(tree.token_ids[path[0]]) if path else nxt] += 1
    assert (((counts - n * p) ** 2) / (n * p)).sum() > critical


def test_prune_keeps_what_pays():
    tree = from_paths([[7, 8, 9], [7, 10], [11, 12]], 10)
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    cheap = {r: 1.0 + 0.02 * (r - 1) for r in range(1, 8)}  # rows nearly free (fp32 here)
    dear = {r: 1.0 + 0.5 * (r - 1) for r in range(1, 8)}  # each row costs half a pass
    wide, narrow = prune(tree, scores, cheap), prune(tree, scores, dear)
    assert len(wide) == 6 and len(narrow) < len(wide)
    assert narrow.token_ids.tolist()[:1] == [7] and narrow.parents[0] == -1
    for t in (wide, narrow):  # closed under ancestors, still topologically ordered
        assert all(p < i for i, p in enumerate(t.parents))


@settings(max_examples=100, deadline=None)
@given(n_rows=st.integers(1, 8), data=st.data())
def test_compact_moves_the_accepted_path(n_rows, data):
    rows = sorted(set([0] + data.draw(st.lists(st.integers(1, n_rows), max_size=n_rows))))
    cache = KVCache(2, (1, 2, 32, 3), np.float32)
    pos = data.draw(st.integers(0, 32 - n_rows - 1))
    for buf in (*cache.keys, *cache.values):
        buf[...] = np.arange(32)[None, None, :, None]  # entry j holds j
    cache.length = pos + n_rows + 1
    cache.compact(pos, rows)
    assert cache.length == pos + len(rows)
    for buf in (*cache.keys, *cache.values):
        assert buf[0, :, pos:pos + len(rows), 0].tolist() == [[pos + r for r in rows]] * 2
        assert buf[0, 0, :pos, 0].tolist() == list(range(pos))  # the committed context untouched


def test_a_one_branch_tree_is_a_chain():
    t = Tree(np.array([5, 6, 7]), np.array([-1, 0, 1]))
    assert t.is_chain and t.path(2) == [0, 1, 2]


def test_sampled_tree_verify_leaves_the_callers_probabilities_untouched():
    """Rejected candidates are zeroed in a copy of the row: a float64 array passed in comes back as it was."""
    probs = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    before = probs.copy()
    tree = Tree(np.array([1, 0]), np.array([-1, -1]))
    for seed in range(50):
        sampled_tree_verify(tree, probs, np.random.default_rng(seed))
    assert np.array_equal(probs, before)


def test_merge_shares_common_nodes_and_respects_the_budget():
    a = from_paths([[7, 8, 9], [11]], 10)  # 7 -> 8 -> 9 ; 11
    b = from_paths([[7, 10], [12, 13]], 10)  # 7 -> 10 ; 12 -> 13
    tree, scores = merge([(a, np.array([0.5, 0.4, 0.3, 0.2])), (b, np.array([0.9, 0.1, 0.05, 0.01]))], 10)
    paths = {tuple(tree.token_ids[tree.path(i)].tolist()): scores[i] for i in range(len(tree))}
    assert paths == {(7,): 0.9, (7, 8): 0.4, (7, 8, 9): 0.3, (11,): 0.2, (7, 10): 0.1, (12,): 0.05, (12, 13): 0.01}
    assert all(p < i for i, p in enumerate(tree.parents.tolist()))  # parents first: still topological
    alone, _ = merge([(a, np.arange(4.0))], 10)
    assert np.array_equal(alone.token_ids, a.token_ids) and np.array_equal(alone.parents, a.parents)
    cut, _ = merge([(a, np.ones(4)), (b, np.ones(4))], 5)  # 7 8 9 11 (a), then 10 (b); 12 is cut, so is 13
    assert cut.token_ids.tolist() == [7, 8, 9, 11, 10] and cut.parents.tolist() == [-1, 0, 1, -1, 0]
