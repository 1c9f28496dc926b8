"""runtime/drafters/suffix.py: continuation counts, the bounded cache, proposals that follow confidence."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from specrt.runtime.drafters import SuffixCache, SuffixDrafter
from specrt.runtime.sampling import SamplingParams

GREEDY, RNG = SamplingParams(), np.random.default_rng(0)


def fill(cache: SuffixCache, seq: list[int]) -> None:
    for i in range(1, len(seq)):
        cache.count(seq, i, +1)
    cache.keep(seq)


def table(cache: SuffixCache) -> dict:
    return {key: (dict(conts), cache.best(key)[2]) for key, conts in cache._counts.items()}


@settings(max_examples=150, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=20), min_size=1, max_size=8),
       budget=st.integers(1, 60))
def test_eviction_leaves_exactly_the_kept_sequences(seqs, budget):
    cache = SuffixCache(budget_tokens=budget, ngram_min=1, ngram_max=3)
    for s in seqs:
        fill(cache, s)
    kept = list(cache._sequences)
    fresh = SuffixCache(budget_tokens=10**9, ngram_min=1, ngram_max=3)
    for s in kept:
        fill(fresh, s)
    assert table(cache) == table(fresh)
    assert cache.tokens == sum(map(len, kept)) and (cache.tokens <= budget or len(kept) == 1)
    for key in cache._counts:  # the cached best continuation is a most frequent one
        token, count, _ = cache.best(key)
        assert count == max(cache._counts[key].values()) and cache._counts[key][token] == count


def test_proposal_follows_the_most_frequent_continuation_and_stops_when_unsure():
    cache = SuffixCache(ngram_min=1, ngram_max=3)
    for seq in ([1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 4, 5], [9, 2, 3, 7]):
        fill(cache, seq)
    d = SuffixDrafter(cache, min_confidence=0.5, length_factor=10)
    d.begin(np.array([8, 1, 2]))
    # after (1, 2): 3 (3 of 3), then (1, 2, 3) -> 4 (3 of 3), then (2, 3, 4) -> 5 (2 of 3) = 0.67, then nothing
    assert d.propose(8, GREEDY, RNG).token_ids.tolist() == [3, 4, 5]
    strict = SuffixDrafter(cache, min_confidence=0.9, length_factor=10)
    strict.begin(np.array([8, 1, 2]))
    assert strict.propose(8, GREEDY, RNG).token_ids.tolist() == [3, 4]


def test_a_short_match_proposes_little():
    cache = SuffixCache(ngram_min=1, ngram_max=4)
    fill(cache, [5, 6, 7, 8, 9, 10, 11])
    d = SuffixDrafter(cache, min_confidence=0.1, length_factor=1.0)
    d.begin(np.array([3, 5]))  # a 1-token match: at most 1 + 1 * 1 tokens
    assert d.propose(8, GREEDY, RNG).token_ids.tolist() == [6, 7]


def test_a_repeated_request_is_drafted_from_the_first_one():
    cache = SuffixCache()
    first = SuffixDrafter(cache)
    first.begin(np.array([1, 2, 3]))
    for t in [10, 11, 12, 13, 14, 15]:
        first.commit([], t)
    first.end()
    second = SuffixDrafter(cache)
    second.begin(np.array([1, 2, 3]))
    assert second.propose(4, GREEDY, RNG).token_ids.tolist() == [10, 11, 12, 13]
