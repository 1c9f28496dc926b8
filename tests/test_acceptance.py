"""runtime/acceptance.py: table-driven greedy cases, properties, and the sampling distribution."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from specrt.runtime.acceptance import greedy_verify, rejection_verify


def one_hot_logits(ids: list[int], vocab: int = 8) -> np.ndarray:
    logits = np.zeros((len(ids), vocab), dtype=np.float32)
    logits[np.arange(len(ids)), ids] = 5.0
    return logits


@pytest.mark.parametrize("draft, target, accepted, next_id", [
    ([1, 2, 3], [1, 2, 3, 4], 3, 4),   # perfect match: bonus token
    ([1, 2, 3], [5, 2, 3, 4], 0, 5),   # first token rejected: recovered
    ([1, 2, 3], [1, 6, 3, 4], 1, 6),   # mismatch in the middle; later agreement does not count
    ([1, 2, 3], [1, 2, 7, 4], 2, 7),
    ([], [3], 0, 3),                   # empty draft: plain target step
])
def test_greedy_table(draft, target, accepted, next_id):
    assert greedy_verify(np.array(draft, dtype=np.int64), one_hot_logits(target)) == (accepted, next_id)


@given(st.integers(0, 6).flatmap(lambda k: st.tuples(
    st.lists(st.integers(0, 4), min_size=k, max_size=k),
    st.lists(st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=5, max_size=5),
             min_size=k + 1, max_size=k + 1))))
def test_greedy_matches_definition(case):
    draft, logits = np.array(case[0], dtype=np.int64), np.array(case[1], dtype=np.float32)
    accepted, next_id = greedy_verify(draft, logits)
    target = logits.argmax(-1)
    assert all(draft[i] == target[i] for i in range(accepted))
    assert accepted == len(draft) or draft[accepted] != target[accepted]
    assert next_id == target[accepted]


def _dist(rng, vocab, sharp=1.0):
    p = rng.dirichlet(np.full(vocab, sharp))
    p[rng.integers(vocab)] = 0.0  # some zero-probability tokens on each side
    return p / p.sum()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(0, 10_000))
def test_rejection_output_follows_target(k, seed):
    """The first two emitted tokens follow p (rows are context-free here), whatever q is."""
    rng = np.random.default_rng(seed)
    vocab, n = 5, 6000
    p = np.stack([_dist(rng, vocab) for _ in range(k + 1)])  # [k+1, vocab]
    q = np.stack([_dist(rng, vocab, 0.5) for _ in range(k)])  # [k, vocab]
    counts = np.zeros((2, vocab))
    for _ in range(n):
        draft = np.array([rng.choice(vocab, p=q[i]) for i in range(k)])
        accepted, next_id = rejection_verify(draft, q, p, rng)
        out = list(draft[:accepted]) + [next_id]
        counts[0, out[0]] += 1
        if len(out) > 1:
            counts[1, out[1]] += 1
    tv0 = 0.5 * np.abs(counts[0] / n - p[0]).sum()
    assert tv0 < 0.04, (tv0, counts[0] / n, p[0])
    if counts[1].sum() > 1000:
        tv1 = 0.5 * np.abs(counts[1] / counts[1].sum() - p[1]).sum()
        assert tv1 < 0.06, (tv1, counts[1], p[1])


def test_distribution_test_has_power():
    """Accepting every draft token (a classic bug) makes the output follow q, and the TV check above catches it."""
    rng = np.random.default_rng(0)
    p, q = np.array([0.7, 0.2, 0.1, 0.0]), np.array([0.1, 0.1, 0.1, 0.7])
    n = 6000
    buggy = np.bincount(rng.choice(4, size=n, p=q), minlength=4) / n
    assert 0.5 * np.abs(buggy - p).sum() > 0.04
    good = np.bincount([_first(rng, p, q) for _ in range(n)], minlength=4) / n
    assert 0.5 * np.abs(good - p).sum() < 0.04


def _first(rng, p, q):
    x = rng.choice(4, p=q)
    accepted, next_id = rejection_verify(np.array([x]), q[None], np.stack([p, p]), rng)
    return x if accepted else next_id


def test_zero_draft_probability_is_a_rejection():
    rng = np.random.default_rng(0)
    q = np.array([[0.0, 1.0]])
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    # the draft "proposed" token 0 although q(0) = 0: must be rejected, never divided by
    accepted, next_id = rejection_verify(np.array([0]), q, p, rng)
    assert accepted == 0 and next_id == 0


def test_seeded_determinism():
    p = np.full((3, 6), 1 / 6)
    q = np.full((2, 6), 1 / 6)
    a = [rejection_verify(np.array([1, 2]), q, p, np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_relaxed_accepts_probable_non_argmax_tokens():
    from specrt.runtime.acceptance import relaxed_greedy_verify

    logits = np.log(np.array([[0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]))
    draft = np.array([1, 0])  # neither is the argmax; p = 0.4 then 0.2
    assert relaxed_greedy_verify(draft, logits, tau=0.3) == (1, 2)  # 0.4 passes, 0.2 does not
    assert relaxed_greedy_verify(draft, logits, tau=0.15) == (2, 2)  # both pass, bonus = argmax of last row
    assert relaxed_greedy_verify(draft, logits, tau=1.0) == greedy_verify(draft, logits)  # tau=1: strict


def test_residual_covers_the_targets_whole_vocabulary():
    """A draft with a smaller vocabulary: after a rejection the target's mass past the draft's ids stays."""
    p = np.array([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])  # target vocabulary 3
    q = np.array([[1.0, 0.0]])  # draft vocabulary 2, always drafts id 0
    outcomes = set()
    for seed in range(200):
        accepted, next_id = rejection_verify(np.array([0]), q, p, np.random.default_rng(seed))
        if accepted == 0:
            outcomes.add(next_id)
    assert outcomes == {2}  # norm(max(0, p - q)) puts all its mass on id 2
