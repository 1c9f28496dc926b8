"""Token trees: several candidate continuations verified in one target pass.  Pure numpy.

A tree is a list of nodes in topological order (every parent before its children).  Node i holds a
drafted token ``token_ids[i]`` and ``parents[i]``: the index of its parent node, or -1 when it hangs
off the root -- the last emitted token, which the target runs as row 0 of the pass.  So a pass over a
tree of m nodes runs m + 1 rows: the root, then the nodes, each attending to the committed context
and to its own ancestors only (``attention_block``), at position ``pos + depth`` (``positions``).  A
chain is the tree whose parents are -1, 0, 1, ...

Verification walks down from the root: greedy, it follows the child whose token is the target's
argmax; sampling, it tries the children in turn with the rejection rule for deterministic proposals
(q one-hot: accept x with probability p(x), else remove x from p and renormalise) -- which is just
sampling from p, so the output is the target's own distribution for any tree.  The accepted path
then moves to contiguous cache positions (``runtime/kv_cache.KVCache.compact``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from specrt.runtime.acceptance import sample

NEG = np.float32(-1e9)  # an additive attention bias that masks a key out (finite: no NaN from -inf * 0)


@dataclass
class Tree:
    token_ids: np.ndarray  # [m] int64
    parents: np.ndarray  # [m] int64, -1 = the root

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def depths(self) -> np.ndarray:
        """Depth of every node (1 for a child of the root)."""
        d = np.zeros(len(self.parents), dtype=np.int64)
        for i, p in enumerate(self.parents):
            d[i] = 1 if p < 0 else d[p] + 1
        return d

    @property
    def is_chain(self) -> bool:
        return bool(np.array_equal(self.parents, np.arange(-1, len(self.parents) - 1)))

    def children(self) -> list[list[int]]:
        """Children of every row: row 0 is the root, row i + 1 is node i (row indices are node + 1)."""
        kids: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents):
            kids[p + 1].append(i + 1)
        return kids

    def path(self, node: int) -> list[int]:
        """Node indices from the root's child down to ``node``."""
        out = []
        while node >= 0:
            out.append(node)
            node = int(self.parents[node])
        return out[::-1]


def chain(token_ids: np.ndarray) -> Tree:
    return Tree(np.asarray(token_ids, dtype=np.int64), np.arange(-1, len(token_ids) - 1, dtype=np.int64))


def from_paths(paths: list[list[int]], budget: int) -> Tree:
    """A trie of candidate continuations (shared prefixes merged), in the given order of preference, cut at
    ``budget`` nodes; the first path is laid out first, so a single path stays a chain."""
    return trie(paths, budget)[0]


def trie(paths: list[list[int]], budget: int) -> tuple[Tree, np.ndarray]:
    """``from_paths``, and for every node the index of the path that made it."""
    tokens: list[int] = []
    parents: list[int] = []
    origin: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for r, p in enumerate(paths):
        parent = -1
        for t in p:
            node = index.get((parent, int(t)))
            if node is None:
                if len(tokens) >= budget:
                    break
                node = len(tokens)
                tokens.append(int(t))
                parents.append(parent)
                origin.append(r)
                index[(parent, int(t))] = node
            parent = node
    return Tree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64)), np.array(origin, dtype=np.int64)


def merge(parts: list[tuple[Tree, np.ndarray]], budget: int) -> tuple[Tree, np.ndarray]:
    """One tree of several drafters' trees (each with its nodes' scores), keeping the ``budget`` best-scored
    nodes (``best``): a node that two trees share (the same token under the same path) appears once with the
    higher score, and no node scores above its parent.  A lone tree within the budget comes back unchanged."""
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for tree, tree_scores in parts:
        where = np.zeros(len(tree), dtype=np.int64)  # this tree's node -> merged node
        for i, (token, parent) in enumerate(zip(tree.token_ids.tolist(), tree.parents.tolist())):
            merged_parent = -1 if parent < 0 else int(where[parent])
            node = index.get((merged_parent, token))
            if node is None:
                node = index[(merged_parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(merged_parent)
                scores.append(float(tree_scores[i]))
            else:
                scores[node] = max(scores[node], float(tree_scores[i]))
            where[i] = node
    merged = Tree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64))
    return best(merged, np.array(scores, dtype=np.float64), budget)


def cap_at_parents(tree: Tree, scores: np.ndarray) -> np.ndarray:
    """Scores with none above its parent's (a node is never likelier than its parent), so the best N nodes by
    score always include their ancestors."""
    scores = np.array(scores, dtype=np.float64)
    for i, p in enumerate(tree.parents.tolist()):  # parents come first: one pass caps the whole tree
        if p >= 0:
            scores[i] = min(scores[i], scores[p])
    return scores


def subtree(tree: Tree, keep: np.ndarray) -> Tree:
    """The nodes ``keep`` (ascending indices, closed under ancestors) as a tree of their own."""
    remap = {int(old): new for new, old in enumerate(keep)}
    return Tree(tree.token_ids[keep], np.array([remap.get(int(tree.parents[i]), -1) for i in keep], dtype=np.int64))


def best(tree: Tree, scores: np.ndarray, budget: int) -> tuple[Tree, np.ndarray]:
    """The ``budget`` highest-scored nodes of a tree, with their scores (capped at their parents')."""
    scores = cap_at_parents(tree, scores)
    if len(tree) <= budget:
        return tree, scores
    keep = np.sort(np.argsort(-scores, kind="stable")[:budget])  # ties: the earlier (a parent) first
    return subtree(tree, keep), scores[keep]


def positions(tree: Tree, pos: int) -> np.ndarray:
    """Row positions of a pass over the tree at ``pos``: the root at pos, each node at pos + its depth."""
    return np.concatenate(([pos], pos + tree.depths)).astype(np.int64)


def attention_block(tree: Tree) -> np.ndarray:
    """[rows, rows] additive bias among the pass's own rows: 0 where row j is row i or one of its ancestors
    (the root is every node's ancestor), NEG elsewhere.  The committed context is visible to every row."""
    m = len(tree) + 1
    block = np.full((m, m), NEG, dtype=np.float32)
    for row in range(m):
        node = row - 1
        block[row, row] = 0.0
        block[row, 0] = 0.0
        while node >= 0:
            block[row, node + 1] = 0.0
            node = int(tree.parents[node])
    return block


def greedy_tree_verify(tree: Tree, target_logits: np.ndarray) -> tuple[list[int], int]:
    """(accepted node indices, root to leaf; the recovered-or-bonus token) for the rows [m + 1, vocab]."""
    choice = target_logits.argmax(axis=-1)  # [m+1]: the target's token after each row
    kids = tree.children()
    row, path = 0, []
    while True:
        t = int(choice[row])
        nxt = next((c for c in kids[row] if int(tree.token_ids[c - 1]) == t), None)
        if nxt is None:
            return path, t
        path.append(nxt - 1)
        row = nxt


def sampled_tree_verify(tree: Tree, target_probs: np.ndarray | Callable[[int], np.ndarray],
                        rng: np.random.Generator) -> tuple[list[int], int]:
    """The same walk for sampling: at each row the children are tried in order, each a deterministic proposal;
    a rejected child's token leaves p (renormalised), so the token that finally comes out -- an accepted
    child, or a sample of what is left -- is distributed exactly as p.

    ``target_probs``: [rows, vocab], or a function of the row (the loop warps only the rows the walk visits)."""
    probs_of = target_probs if callable(target_probs) else target_probs.__getitem__
    kids = tree.children()
    row, path = 0, []
    while True:
        p = np.asarray(probs_of(row), dtype=np.float64)
        accepted = None
        for c in kids[row]:
            x = int(tree.token_ids[c - 1])
            if not 0 <= x < len(p):  # an id outside the vocabulary has probability 0: never accepted
                continue
            total = p.sum()
            if total <= 0.0:
                break
            if rng.random() * total < p[x]:
                accepted = c
                break
            p = p.copy()
            p[x] = 0.0
        if accepted is None:
            if p.sum() <= 0.0:  # every candidate rejected and p was supported only on them: measure zero
                p = np.asarray(probs_of(row), dtype=np.float64)
            return path, sample(p / p.sum(), rng)
        path.append(accepted - 1)
        row = accepted


def prune(tree: Tree, scores: np.ndarray, row_cost: dict[int, float], draft_cost: float = 0.0) -> Tree:
    """The best sub-tree for one pass, by the speedup formula: keep the N highest-scored nodes (a score is the
    estimated probability that the node is accepted; a child never scores above its parent, so the kept set
    is closed under ancestors) for the N that maximises (1 + sum of kept scores) / (cost of N + 1 rows +
    draft_cost * N).  ``row_cost[r]``: measured seconds of an r-row target pass on this engine, so cheap rows
    (fp32 here) grow wide trees and dear ones (int4) stay near a chain."""
    if len(tree) == 0:
        return tree
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    gains = np.concatenate(([1.0], 1.0 + np.cumsum(np.asarray(scores, dtype=np.float64)[order])))  # [N+1]
    top = max(row_cost)
    costs = np.array([row_cost.get(min(n + 1, top), row_cost[top] * (n + 1) / top) + draft_cost * n
                      for n in range(len(tree) + 1)])
    n_best = int(np.argmax(gains / costs))
    return subtree(tree, np.sort(order[:n_best]))
