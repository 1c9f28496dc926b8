"""runtime/loop.py against a scripted fake ModelStep: the cache bookkeeping and counters, exhaustively."""
from __future__ import annotations

import numpy as np
import pytest
from fakes import VOCAB, FakeStep
from hypothesis import given, settings
from hypothesis import strategies as st
from specrt.runtime.drafters import (
    Drafter,
    HybridDrafter,
    ModelDrafter,
    NgramDrafter,
    RecycleDrafter,
    RecycleTable,
    SuffixCache,
    SuffixDrafter,
)
from specrt.runtime.loop import speculative, target_only
from specrt.runtime.policy import Adaptive, Budget, Confidence, Fixed
from specrt.runtime.sampling import SamplingParams
from specrt.runtime.stats import Stats


def run(gen):
    steps = list(gen)
    return [t for s in steps for t in s.token_ids], steps


GREEDY = SamplingParams()


def make(policy: str, k: int):
    return {"fixed": lambda: Fixed(k), "confidence": lambda: Confidence(k, 0.5),
            "adaptive": lambda: Adaptive((1, 2, 4, 8)), "budget": lambda: Budget(k, 0.7)}[policy]()


def make_drafter(name: str, draft: FakeStep):
    return {"model": lambda: ModelDrafter(draft), "ngram": lambda: NgramDrafter(1, 3),
            "suffix": lambda: SuffixDrafter(SuffixCache(ngram_max=4)),
            "hybrid": lambda: HybridDrafter(NgramDrafter(2, 3), ModelDrafter(draft)),
            "recycle": lambda: RecycleDrafter(RecycleTable(VOCAB)),
            "ngram+recycle": lambda: HybridDrafter(NgramDrafter(1, 3), RecycleDrafter(RecycleTable(VOCAB)), None)}[name]()


@settings(max_examples=300, deadline=None)
@given(k=st.integers(1, 8), agree=st.sampled_from([0.0, 0.3, 0.8, 1.0]), prompt_len=st.integers(1, 20),
       max_new=st.integers(1, 60), max_context=st.integers(22, 64),
       policy=st.sampled_from(["fixed", "confidence", "adaptive", "budget"]),
       drafter=st.sampled_from(["model", "ngram", "suffix", "hybrid", "recycle", "ngram+recycle"]))
def test_speculative_equals_target_only(k, agree, prompt_len, max_new, max_context, policy, drafter):
    prompt = np.arange(prompt_len) % VOCAB
    rng = np.random.default_rng(0)
    target = FakeStep(salt=1, max_context=max_context)
    draft = FakeStep(salt=0, max_context=max_context, agree_with=target, agree=agree)
    stats = Stats()
    pol = make(policy, k)
    spec_ids, steps = run(speculative(target, make_drafter(drafter, draft), prompt, pol, max_new, GREEDY, rng,
                                      stats))
    ref_ids, _ = run(target_only(FakeStep(salt=1, max_context=max_context), prompt, max_new, GREEDY, rng, Stats()))
    assert spec_ids == ref_ids
    # never past the context or the budget
    assert len(spec_ids) == min(max_new, max_context - prompt_len)
    # counters add up
    assert all(s.accepted <= s.proposed <= pol.max_k for s in steps)
    assert target.length <= max_context and draft.length <= max_context
    assert sum(s.accepted for s in steps) + len(steps) == len(spec_ids)
    if agree == 1.0 and drafter == "model":
        assert all(s.accepted == s.proposed for s in steps)
    # the draft model's steps stay within its planned widths (1, 2); longer catch-ups go through extend()
    assert all(n <= 2 for n, _ in draft.widths)


def test_adversarial_draft_still_correct():
    target = FakeStep(salt=1)
    draft = FakeStep(salt=0, agree_with=target, agree=0.0)  # always proposes the wrong token
    ids, steps = run(speculative(target, ModelDrafter(draft), np.array([1, 2, 3]), Fixed(4), 30, GREEDY, np.random.default_rng(0), Stats()))
    ref, _ = run(target_only(FakeStep(salt=1), np.array([1, 2, 3]), 30, GREEDY, np.random.default_rng(0), Stats()))
    assert ids == ref and all(s.accepted == 0 for s in steps) and len(steps) == 30


def test_all_accepted_draft_catches_up():
    """When every proposal passes, the draft runs its last proposal at the next propose (2 tokens at once)."""
    target = FakeStep(salt=1)
    draft = FakeStep(salt=0, agree_with=target, agree=1.0)
    seen = []
    orig = draft.forward
    draft.forward = lambda ids, pos, **kw: (seen.append((len(ids), pos)), orig(ids, pos, **kw))[1]
    run(speculative(target, ModelDrafter(draft), np.array([4, 5]), Fixed(3), 12, GREEDY, np.random.default_rng(0), Stats()))
    # prompt [4,5]: prefill 1 token; step 1 feeds [5] at pos 1; after 3 accepted + bonus, feed 2 tokens at 1+3
    assert seen[:4] == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert seen[4] == (2, 4)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampling_loop_runs_and_counts(temperature):
    target = FakeStep(salt=1)
    draft = FakeStep(salt=0, agree_with=target, agree=0.5)
    stats = Stats()
    params = SamplingParams(temperature=temperature)
    ids, steps = run(speculative(target, ModelDrafter(draft), np.array([1]), Fixed(4), 40, params, np.random.default_rng(1), stats))
    assert len(ids) == 40 and sum(s.accepted for s in steps) + len(steps) == 40


def test_budget_caps_drafted_tokens():
    target = FakeStep(salt=1)
    draft = FakeStep(salt=0, agree_with=target, agree=0.0)
    pol = Budget(8, 0.5)
    ids, steps = run(speculative(target, ModelDrafter(draft), np.array([1]), pol, 40, GREEDY, np.random.default_rng(0), Stats()))
    assert sum(s.proposed for s in steps) <= 0.5 * len(ids) + 1


def test_confidence_stops_drafting_early():
    """FakeStep logits are one-hot with value 1: top probability e/(e+V-1) ~ 0.21 < 0.5, so one token per step."""
    target = FakeStep(salt=1)
    draft = FakeStep(salt=0, agree_with=target, agree=1.0)
    _ids, steps = run(speculative(target, ModelDrafter(draft), np.array([1]), Confidence(8, 0.5), 20, GREEDY,
                                 np.random.default_rng(0), Stats()))
    assert all(s.proposed <= 1 for s in steps)


def test_adaptive_follows_the_text():
    """Costs of the notes' kind (draft token 5% of a pass, passes 10% dearer per extra token):
    k goes up on easy text, down when acceptance collapses, and back up when it returns."""
    pol = Adaptive((1, 2, 4, 8))

    def phase(alpha, steps=40):
        rng = np.random.default_rng(0)
        for _ in range(steps):
            k = pol.next_k(100)
            accepted = 0
            while accepted < k and rng.random() < alpha:
                accepted += 1
            pol.observe(k, accepted, draft_s=0.05 * k, verify_s=1.0 + 0.1 * k)
        return pol.next_k(100)

    assert phase(0.95) == 8
    assert phase(0.05) in (0, 1)  # not drafting, or a probe
    assert phase(0.95) == 8


def test_adaptive_judges_a_tree_by_its_deepest_path():
    """A tree of 16 nodes whose 4-deep path was fully accepted is no rejection: alpha rises, and k with it; the
    same pass counted as 16 proposals with 4 accepted (the old bookkeeping) would have read as one."""
    tree, chain_view = Adaptive((1, 2, 4, 8)), Adaptive((1, 2, 4, 8))
    for _ in range(10):
        tree.observe(16, 4, draft_s=0.0, verify_s=1.0, depth=4)
        chain_view.observe(16, 4, draft_s=0.0, verify_s=1.0)
    assert tree.alpha > 0.9 > chain_view.alpha


class LogitsSpy(Drafter):
    """Wraps a drafter, asks for the target's logits (or not) and records what commit() is handed."""

    def __init__(self, inner: Drafter, needs_logits: bool):
        self.inner, self.needs_logits = inner, needs_logits
        self.max_context = inner.max_context
        self.seen: list[tuple[list[int], int, np.ndarray | None]] = []

    def begin(self, prompt_ids, features=None):
        self.inner.begin(prompt_ids, features)

    def propose(self, k, sampling, rng, keep_drafting=None):
        return self.inner.propose(k, sampling, rng, keep_drafting)

    def commit(self, accepted_ids, next_id, features=None, logits=None):
        self.seen.append((list(accepted_ids), next_id, None if logits is None else logits.copy()))
        self.inner.commit(accepted_ids, next_id, features)


def test_a_drafter_that_asks_gets_the_target_logits_of_the_committed_rows():
    """Row r of what commit() gets predicts the r-th emitted token: the accepted ones, then next_id."""
    prompt = np.array([1, 2, 3, 1, 2, 3, 1, 2])
    for needs in (True, False):
        target = FakeStep(salt=1, max_context=64)
        draft = FakeStep(salt=0, max_context=64, agree_with=target, agree=0.7)  # accepts some, rejects some
        spy = LogitsSpy(ModelDrafter(draft), needs)
        run(speculative(target, spy, prompt, Fixed(4), 40, GREEDY, np.random.default_rng(0), Stats()))
        assert max(len(a) for a, _, _ in spy.seen) >= 2 and min(len(a) for a, _, _ in spy.seen) < 4
        for accepted, next_id, logits in spy.seen:
            if not needs:
                assert logits is None
                continue
            assert logits.shape == (len(accepted) + 1, VOCAB)
            assert logits.argmax(axis=-1).tolist() == [*accepted, next_id]


class FeaturedStep(FakeStep):
    """A fake target with a features output: each row's feature is its position."""

    has_features = True

    def forward(self, token_ids, pos, *, tree=None, inputs=None, last_only=False):
        self._rows = np.arange(pos, pos + len(token_ids), dtype=np.float32)[:, None]
        return super().forward(token_ids, pos)

    def features(self):
        return self._rows


def test_a_feature_heads_prefill_keeps_every_rows_features_from_prefill_stage_passes():
    """The head needs the features of every prompt token but the last; the logits of none but each chunk's last
    row -- so the target runs prefill-stage passes (``extend``), whose LM head skips the other rows (on the demo
    target every row's LM head made its prefill 10-15% slower)."""
    from specrt.runtime.backend import PREFILL_CHUNK
    from specrt.runtime.loop import prefill_features

    n = 2 * PREFILL_CHUNK + 43
    target = FeaturedStep(salt=1, max_context=n + 8)
    features = prefill_features(target, np.arange(n + 1) % VOCAB)
    assert target.widths == []  # no decode-stage pass
    assert target.extends == [(PREFILL_CHUNK, 0), (PREFILL_CHUNK, PREFILL_CHUNK), (43, 2 * PREFILL_CHUNK)]
    np.testing.assert_array_equal(features[:, 0], np.arange(n))
