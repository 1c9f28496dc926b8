"""Speculative sampling is lossless: the joint distribution of the first two tokens equals the
target's own (tempered, top-k/top-p) distribution.  Run through the real loop with small
synthetic Markov models whose exact distribution is known, and shown to catch broken acceptors.

Test: Pearson chi-square over the 16 cells of (token 1, token 2), N = 12000 generations,
significance 0.001 (critical value for 15 degrees of freedom ~ 37.7).  Power: each broken variant
below shifts the joint distribution by a total-variation distance of 0.1-0.3, which at this N gives
chi-square values in the hundreds; the tests assert they are rejected.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from specrt.runtime import loop, verify
from specrt.runtime.acceptance import sample
from specrt.runtime.backend import ModelStep
from specrt.runtime.drafters import EagleDrafter, ModelDrafter, NgramDrafter, Proposal, RecycleDrafter, RecycleTable
from specrt.runtime.drafters import model as model_drafter
from specrt.runtime.drafters.base import Drafter
from specrt.runtime.errors import GenerationError
from specrt.runtime.policy import Fixed
from specrt.runtime.sampling import SamplingParams, warp
from specrt.runtime.stats import Stats

V = 4
P = np.array([[0.50, 0.30, 0.15, 0.05], [0.10, 0.60, 0.20, 0.10], [0.25, 0.25, 0.25, 0.25], [0.05, 0.15, 0.30, 0.50]])
Q = np.array([[0.10, 0.20, 0.30, 0.40], [0.40, 0.10, 0.40, 0.10], [0.70, 0.10, 0.10, 0.10], [0.25, 0.25, 0.25, 0.25]])
N = 12000
TEMPERATURE = 0.7


def chi2_critical(df: int, alpha: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (alpha = 0.001 -> z = 3.0902)."""
    z = {1e-3: 3.0902, 1e-2: 2.3263}[alpha]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


CRITICAL = chi2_critical(15, 1e-3)


class MarkovStep(ModelStep):
    """First-order Markov 'model': logits of position i depend on the token at i (cached by position)."""

    def __init__(self, table: np.ndarray, max_context: int = 16):
        self.logits_table = np.log(table)
        self.max_context, self.vocab_size = max_context, V
        self.tokens = np.zeros(max_context, dtype=np.int64)
        self.length = 0

    def forward(self, token_ids, pos, *, tree=None, inputs=None, last_only=False):
        assert pos <= self.length
        self.tokens[pos:pos + len(token_ids)] = token_ids
        self.length = pos + len(token_ids)
        return self.logits_table[self.tokens[pos:pos + len(token_ids)]]

    def set_length(self, length):
        assert length <= self.length
        self.length = length

    def prefill(self, token_ids):
        self.length = 0
        return self.forward(token_ids, 0)[-1]

    def extend(self, token_ids, pos):
        return self.forward(token_ids, pos)[-1]


def exact_joint(params: SamplingParams, first_context: int = 0) -> np.ndarray:
    p = warp(np.log(P), params)  # [V, V]: row = previous token
    return p[first_context][:, None] * p


class FixedDrafter(Drafter):
    """A deterministic drafter (q one-hot) that always proposes the same tokens: 2, 3, 2, 3 ..."""

    def begin(self, prompt_ids):
        pass

    def propose(self, k, sampling, rng, keep_drafting=None):
        return Proposal(np.array([2, 3] * k, dtype=np.int64)[:k])

    def commit(self, accepted_ids, next_id, features=None, logits=None):
        pass


class FeatureMarkovStep(MarkovStep):
    """The Markov target with a (zero) features output, as a target of a feature-head engine."""

    has_features = True

    def features(self):
        return np.zeros((self._n, 2), np.float32)

    def forward(self, token_ids, pos, *, tree=None, inputs=None, last_only=False):
        self._n = len(token_ids)
        return super().forward(token_ids, pos)


class FakeHead(ModelStep):
    """A feature head whose draft distribution depends only on the token it is fed: a draft vocabulary of 3 of
    the 4 target ids (DRAFT_VOCAB), so target token 1 always has q = 0."""

    DRAFT_VOCAB = np.array([0, 2, 3])
    TABLE = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1], [0.34, 0.33, 0.33]]))

    def __init__(self):
        self.spec = type("Spec", (), {"feature_head": {"hidden_input": "h", "features_input": "f", "select_input": "s",
                                                       "hidden_output": "o", "hidden_size": 2, "feature_size": 2}})()
        self.max_context, self.length = 16, 0

    def forward(self, token_ids, pos, *, tree=None, inputs=None, last_only=False):
        self.length = pos + len(token_ids)
        self._n = len(token_ids)
        return self.TABLE[np.asarray(token_ids)[-1:] if last_only else np.asarray(token_ids)]

    def output(self, name):
        return np.zeros((self._n, 2), np.float32)

    def set_length(self, length):
        self.length = length


# The Markov target's next token depends only on the last one, so any prompt ending in 0 gives the same
# joint distribution; this one gives the n-gram drafter earlier matches to propose from.
PROMPTS = {"model": [0], "ngram": [0, 1, 2, 3, 1, 0, 3, 3, 2, 0], "fixed": [0], "eagle": [2, 0], "recycle": [0]}


def joint_counts(params: SamplingParams, k: int, seed: int = 0, speculative: bool = True,
                 drafter: str = "model") -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros((V, V))
    target, draft = (FeatureMarkovStep if drafter == "eagle" else MarkovStep)(P), MarkovStep(Q)
    prompt = np.array(PROMPTS[drafter])
    table = RecycleTable(V)  # shared by the runs, as an engine's: the recycler proposes from the second on
    for _ in range(N):
        d = {"model": lambda: ModelDrafter(draft), "ngram": lambda: NgramDrafter(1, 3), "fixed": FixedDrafter,
             "eagle": lambda: EagleDrafter(FakeHead(), FakeHead.DRAFT_VOCAB, V, max_k=4),
             "recycle": lambda: RecycleDrafter(table)}[drafter]()
        if speculative:
            steps = loop.speculative(target, d, prompt, Fixed(k), 2, params, rng, Stats())
        else:
            steps = loop.target_only(target, prompt, 2, params, rng, Stats())
        ids = [t for s in steps for t in s.token_ids][:2]
        counts[ids[0], ids[1]] += 1
    return counts


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


PARAMS = [SamplingParams(TEMPERATURE), SamplingParams(1.0, top_k=3), SamplingParams(1.3, top_p=0.8)]


def _cells(params):
    """Chi-square over the cells the target can produce (top-k / top-p zero some out)."""
    p = exact_joint(params)
    return p > 0, p


@pytest.mark.parametrize("params", PARAMS, ids=["t0.7", "topk3", "t1.3-topp0.8"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("drafter", ["model", "ngram", "fixed", "eagle", "recycle"])
def test_speculative_sampling_matches_target(params, k, drafter):
    mask, p = _cells(params)
    counts = joint_counts(params, k, drafter=drafter)
    assert counts[~mask].sum() == 0, "a token outside top-k/top-p was emitted"
    assert chi2(counts[mask], p[mask]) < chi2_critical(int(mask.sum()) - 1, 1e-3)


def test_harness_plain_sampling_matches_exact():
    mask, p = _cells(PARAMS[0])
    assert chi2(joint_counts(PARAMS[0], 0, speculative=False)[mask], p[mask]) < CRITICAL


def _no_residual(draft_ids, q, p, rng):
    for i, x in enumerate(draft_ids):
        if not rng.random() * q[i, x] < p[i, x]:
            return i, sample(p[i], rng)  # BUG: resamples from p instead of norm(max(0, p - q))
    return len(draft_ids), sample(p[len(draft_ids)], rng)


def _ignore_q(draft_ids, q, p, rng):
    for i, x in enumerate(draft_ids):
        if not rng.random() < p[i, x]:  # BUG: accepts with p(x), ignoring q(x)
            residual = np.maximum(p[i] - q[i], 0)
            return i, sample(residual / residual.sum(), rng)
    return len(draft_ids), sample(p[len(draft_ids)], rng)


def _point_no_residual(draft_ids, p, rng):
    for i, x in enumerate(draft_ids):
        if not rng.random() < p[i, x]:
            return i, sample(p[i], rng)  # BUG: resamples from p instead of p with x removed
    return len(draft_ids), sample(p[len(draft_ids)], rng)


def _point_always_accept(draft_ids, p, rng):
    return len(draft_ids), sample(p[len(draft_ids)], rng)  # BUG: a context match is taken on trust


def _untempered_draft(logits, params, rng, probs_out):
    probs_out[:] = warp(logits, params)  # q reported to the acceptor is tempered ...
    return sample(warp(logits, SamplingParams(1.0)), rng)  # BUG: ... but the token is drawn at temperature 1


def _unmapped_q(self, logits, sampling, rng, i, want_top=False):
    token, top = real_choose(self, logits, sampling, rng, i, want_top)
    if not sampling.greedy:  # BUG: q over the draft vocabulary left at draft indices, not mapped to target ids
        q = self._probs[i, self.vocab_map].copy()
        self._probs[i] = 0.0
        self._probs[i, :len(q)] = q
    return token, top


real_choose = EagleDrafter._choose


@pytest.mark.parametrize("bug", ["residual removed", "q ignored", "draft temperature not applied",
                                 "point: residual removed", "point: always accepted", "eagle: q not mapped",
                                 "recycle: always accepted"])
def test_broken_acceptors_are_caught(monkeypatch, bug):
    drafter = "model"
    if bug == "residual removed":
        monkeypatch.setattr(verify, "rejection_verify", _no_residual)
    elif bug == "q ignored":
        monkeypatch.setattr(verify, "rejection_verify", _ignore_q)
    elif bug == "draft temperature not applied":
        monkeypatch.setattr(model_drafter, "draft_sample", _untempered_draft)
    elif bug == "recycle: always accepted":
        monkeypatch.setattr(verify, "point_rejection_verify", _point_always_accept)
        drafter = "recycle"
    elif bug.startswith("point"):
        monkeypatch.setattr(verify, "point_rejection_verify",
                            _point_no_residual if bug == "point: residual removed" else _point_always_accept)
        drafter = "fixed"
    else:
        monkeypatch.setattr(EagleDrafter, "_choose", _unmapped_q)
        drafter = "eagle"
    params = SamplingParams(0.4)  # a low temperature makes tempered and untempered q far apart
    stat = chi2(joint_counts(params, 2, drafter=drafter), exact_joint(params))
    assert stat > CRITICAL, f"{bug}: chi2 {stat:.1f} did not exceed {CRITICAL:.1f}"


def test_seed_reproducible():
    params = SamplingParams(TEMPERATURE)
    runs = []
    for _ in range(2):
        rng = np.random.default_rng(123)
        steps = loop.speculative(MarkovStep(P), ModelDrafter(MarkovStep(Q)), np.array([0]), Fixed(3), 10, params, rng, Stats())
        runs.append([t for s in steps for t in s.token_ids])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"temperature": 1.0, "top_p": 1.5},
                                    {"temperature": 1.0, "top_k": -1}, {"temperature": float("inf")}])
def test_invalid_sampling_parameters(kwargs):
    with pytest.raises(GenerationError):
        SamplingParams(**kwargs)
