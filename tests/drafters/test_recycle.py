"""runtime/drafters/recycle.py: the target's own top next tokens per token id, walked as chains and trees."""
from __future__ import annotations

import numpy as np
import pytest
from specrt.runtime.drafters import DrafterOptions, HybridDrafter, RecycleDrafter, RecycleTable, make_drafter
from specrt.runtime.errors import GenerationError
from specrt.runtime.sampling import SamplingParams

GREEDY, RNG = SamplingParams(), np.random.default_rng(0)
V = 50


def logits_preferring(*ranked: int, vocab: int = V) -> np.ndarray:
    """One row of logits whose top tokens are ``ranked``, in that order."""
    row = np.zeros(vocab, np.float32)
    for r, t in enumerate(ranked):
        row[t] = 10.0 - r
    return row


def test_record_keeps_each_tokens_latest_top_candidates_in_rank_order():
    table = RecycleTable(V, width=3)
    assert table.candidates(7).tolist() == [-1, -1, -1] and table.next_ids.size == 0  # nothing held yet
    table.record([7, 8], np.stack([logits_preferring(1, 2, 3), logits_preferring(4, 5, 6)]))
    assert table.candidates(7).tolist() == [1, 2, 3] and table.candidates(8).tolist() == [4, 5, 6]
    assert table.next_ids.shape == (V, 3)
    table.record([7], logits_preferring(9, 1, 2)[None])  # a later prediction for the same token replaces it
    assert table.candidates(7).tolist() == [9, 1, 2]
    # rows that do not fit are ignored, never written out of bounds or as ids past the vocabulary
    table.record([V + 3, -1], np.stack([logits_preferring(1, 2, 3)] * 2))
    table.record([7], np.zeros((1, V + 1), np.float32))
    table.record([7, 8], logits_preferring(1, 2, 3)[None])
    assert table.candidates(7).tolist() == [9, 1, 2] and table.candidates(V + 3).tolist() == [-1, -1, -1]
    table.clear()
    assert table.candidates(7).tolist() == [-1, -1, -1]


def test_a_vocabulary_smaller_than_the_width_keeps_it_all():
    table = RecycleTable(3)
    assert table.width == 3
    table.record([0], np.array([[0.1, 0.7, 0.2]]))
    assert table.candidates(0).tolist() == [1, 2, 0]


@pytest.mark.parametrize("vocab, width", [(0, 2), (10, 0), (10, 99), (3, 8), ("10", 2)])
def test_bad_table_sizes_are_clear_errors(vocab, width):
    with pytest.raises(GenerationError, match="recycle table"):
        RecycleTable(vocab, width)


def test_rates_count_which_rank_held_the_emitted_token():
    table = RecycleTable(V, width=2)
    before = table.rates().copy()
    table.record([1, 2], np.stack([logits_preferring(2, 3), logits_preferring(4, 5)]))
    for _ in range(50):
        table.score([1, 2], [2, 5])  # after 1 the first candidate was right, after 2 the second
    rates = table.rates()
    assert rates[0] > before[0] and rates[1] > before[1] and rates[0] < 1 and rates[1] < 1
    table.score([30], [1])  # a token the table knows nothing about counts for nothing
    assert np.array_equal(table.rates(), rates)


def chain_table() -> RecycleTable:
    """1 -> 2 -> 3 -> 4 as first candidates, with runners-up 11, 12, 13."""
    table = RecycleTable(V, width=2)
    table.record([1, 2, 3], np.stack([logits_preferring(2, 11), logits_preferring(3, 12), logits_preferring(4, 13)]))
    return table


def test_a_chain_follows_first_candidates_as_deep_as_the_rate_allows(monkeypatch):
    d = RecycleDrafter(chain_table())
    d.begin(np.array([9, 1]))
    monkeypatch.setattr(d.table, "rates", lambda: np.array([0.9, 0.1]))
    assert d.propose(8, GREEDY, RNG).token_ids.tolist() == [2, 3, 4]  # 4 has no candidates: the walk ends
    assert d.propose(2, GREEDY, RNG).token_ids.tolist() == [2, 3]  # k caps it
    monkeypatch.setattr(d.table, "rates", lambda: np.array([0.2, 0.1]))
    assert d.propose(8, GREEDY, RNG).token_ids.tolist() == [2]  # 0.2^2 < MIN_NODE_P: one token, never zero
    d.begin(np.array([4]))
    assert len(d.propose(8, GREEDY, RNG)) == 0  # nothing known after 4


def test_a_tree_is_best_first_with_scores_never_above_a_parent(monkeypatch):
    d = RecycleDrafter(chain_table())
    d.begin(np.array([1]))
    monkeypatch.setattr(d.table, "rates", lambda: np.array([0.6, 0.3]))
    p = d.propose_tree(3, 4, GREEDY, RNG)
    # 2 (0.6), 3 (0.36), 11 (0.3), then 12 (0.18) against 4 (0.216): 4 wins
    assert p.token_ids.tolist() == [2, 3, 11, 4] and p.parents.tolist() == [-1, 0, -1, 1]
    assert np.allclose(p.scores, [0.6, 0.36, 0.3, 0.216])
    for i, parent in enumerate(p.parents):
        assert parent < i and (parent < 0 or p.scores[i] <= p.scores[parent])
    deep = d.propose_tree(1, 16, GREEDY, RNG)
    assert deep.token_ids.tolist() == [2, 11] and deep.parents.tolist() == [-1, -1]  # k = 1: one level


def test_commit_scores_the_table_then_records_the_committed_rows():
    d = RecycleDrafter(RecycleTable(V, width=2))
    d.begin(np.array([5, 1]))
    assert len(d.propose(4, GREEDY, RNG)) == 0 and len(d.propose_tree(4, 8, GREEDY, RNG)) == 0
    # rows 0..2 of a pass that accepted [2, 3]: inputs 1, 2, 3 (the old last token and the accepted ones)
    d.commit([2, 3], 4, None, np.stack([logits_preferring(2, 8), logits_preferring(3, 8), logits_preferring(4, 8)]))
    assert d.last == 4 and d.table.candidates(1).tolist() == [2, 8] and d.table.candidates(3).tolist() == [4, 8]
    d.begin(np.array([7, 1]))
    assert d.propose(2, GREEDY, RNG).token_ids.tolist()[:1] == [2]


def test_ngram_recycle_is_the_hybrid_with_unlimited_branches():
    table = chain_table()
    d = make_drafter("ngram+recycle", DrafterOptions(), recycle_table=table, target_vocab=V)
    assert isinstance(d, HybridDrafter) and d.name == "ngram+recycle" and d.needs_logits
    assert d.model_depth is None and isinstance(d.model, RecycleDrafter) and d.model.table is table
    d.begin(np.array([1, 9, 7, 1]))  # the context's 1 -> 9 and the table's 1 -> 2 -> 3 -> 4
    p = d.propose_tree(4, 16, GREEDY, RNG)
    assert d.last_source == "context+recycle"
    roots = {int(p.token_ids[i]) for i in range(len(p)) if p.parents[i] < 0}
    assert {9, 2} <= roots and 4 in p.token_ids.tolist()  # the recycled branch goes three deep
    assert make_drafter("recycle", DrafterOptions(), target_vocab=V).name == "recycle"
