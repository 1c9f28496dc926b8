"""How many tokens to draft each step: the control policies.

A policy is asked ``next_k(limit)`` before each step (``limit`` is what the context and
``max_new_tokens`` still allow), may stop the draft early through ``keep_drafting`` (given the
draft's top probability for the token it just proposed), and is told what happened via
``observe``.  Policies never affect *which* tokens are emitted — only how much work is done to
get them — so every policy is exactly as lossless as the acceptance rule.

| policy | when to use it | what it costs |
|---|---|---|
| ``fixed``      | a draft whose acceptance you know; benchmarks | nothing; wrong k wastes draft work or verifier passes |
| ``confidence`` | drafts whose confidence tracks acceptance (distilled drafts do) | one softmax of the draft's logits per drafted token |
| ``adaptive``   | unknown or changing text (chat vs code, boilerplate vs novel); any drafter | a few floating-point updates per step; k = 0 (no drafting) when drafting does not pay, with a probe every 16 steps |
| ``budget``     | deployments that pay per drafted token | fewer tokens per verifier pass when the cap binds |
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from specrt.runtime.errors import GenerationError


class Policy:
    name = "policy"

    def next_k(self, limit: int) -> int:
        raise NotImplementedError

    @property
    def max_k(self) -> int:
        """The most tokens this policy will ever draft in one step."""
        return self.k

    def keep_drafting(self, top_prob: float) -> bool:
        return True

    def observe(self, proposed: int, accepted: int, draft_s: float, verify_s: float, depth: int | None = None) -> None:
        """A step happened: ``proposed`` tokens drafted (a tree's nodes), ``accepted`` of them, in these times.
        ``depth``: a tree's deepest path (None for a chain: ``proposed``)."""

    @property
    def needs_confidence(self) -> bool:
        return False


@dataclass
class Fixed(Policy):
    k: int
    name = "fixed"

    def next_k(self, limit: int) -> int:
        return min(self.k, limit)


@dataclass
class Confidence(Policy):
    """Draft up to ``k`` tokens, but stop as soon as the draft's top probability falls below ``tau`` (a request's
    ``confidence_tau``)."""

    k: int
    tau: float
    name = "confidence"

    def __post_init__(self) -> None:
        if not 0.0 < self.tau < 1.0:
            raise GenerationError(f"confidence_tau must be in (0, 1), got {self.tau!r}")

    def next_k(self, limit: int) -> int:
        return min(self.k, limit)

    def keep_drafting(self, top_prob: float) -> bool:
        return top_prob >= self.tau

    @property
    def needs_confidence(self) -> bool:
        return True


@dataclass
class Budget(Policy):
    """At most ``max_draft_per_token`` drafted tokens per generated token (running total)."""

    k: int
    max_draft_per_token: float
    proposed: int = 0
    generated: int = 0
    name = "budget"

    def __post_init__(self) -> None:
        if not self.max_draft_per_token >= 0:
            raise GenerationError(f"max_draft_per_token must be >= 0, got {self.max_draft_per_token!r}")

    def next_k(self, limit: int) -> int:
        allowed = int(self.max_draft_per_token * (self.generated + 1) - self.proposed)
        return max(0, min(self.k, limit, allowed))

    def observe(self, proposed: int, accepted: int, draft_s: float, verify_s: float, depth: int | None = None) -> None:
        self.proposed += proposed
        self.generated += accepted + 1


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per verifier pass for i.i.d. acceptance alpha: (1 - alpha^(k+1)) / (1 - alpha)."""
    return k + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class Adaptive(Policy):
    """Pick k from ``{0} ∪ k_values`` maximising expected tokens per second, from running estimates.

    alpha: acceptance probability, estimated from (accepted, rejected) counts with exponential
    forgetting (decay per step), so it follows the text when it changes character.
    Costs are measured on this machine: seconds per drafted token, and seconds per target pass for
    each number of proposed tokens seen (0 included: a plain target step; a linear fit ``t0 + slope
    * k`` fills in the rest).  The score E(alpha, k) / (k * draft_token_s + verify_s(k)) is the
    speedup formula of the notes; k = 0 scores 1 / verify_s(0).  So when drafting does not pay --
    a draft that is rarely right, rows that are not free -- it stops drafting, and probes with the
    smallest k every ``probe_every`` steps to notice when the text changes.
    """

    k_values: Sequence[int]
    decay: float = 0.9
    alpha: float = 0.6  # prior until the first observations
    probe_every: int = 16
    name = "adaptive"
    _acc: float = 0.0
    _rej: float = 0.0
    _draft_s: float | None = None
    _verify_s: dict[int, float] = field(default_factory=dict)
    _idle: int = 0

    @property
    def max_k(self) -> int:
        return max(self.k_values)

    def next_k(self, limit: int) -> int:
        ks = [k for k in sorted(set(self.k_values)) if k <= limit] or ([limit] if limit > 0 else [])
        if not ks:
            return 0
        if not self._verify_s:  # nothing measured yet: start in the middle
            return ks[len(ks) // 2]
        t0, slope = self._verify_fit()
        draft = self._draft_s if self._draft_s is not None else 0.1 * t0

        def score(k: int) -> float:
            return expected_tokens(self.alpha, k) / (k * draft + self._verify_s.get(k, t0 + slope * k))

        best = max([0, *ks], key=score)
        if best == 0:
            self._idle += 1
            if self._idle >= self.probe_every:  # look again now and then: the text may have changed
                self._idle = 0
                return ks[0]
        else:
            self._idle = 0
        return best

    def observe(self, proposed: int, accepted: int, draft_s: float, verify_s: float, depth: int | None = None) -> None:
        old = self._verify_s.get(proposed)  # the cost of a pass over proposed + 1 rows (a tree's too)
        self._verify_s[proposed] = verify_s if old is None else 0.8 * old + 0.2 * verify_s
        if proposed == 0:
            return
        # alpha from the chain (or a tree's deepest path): a tree's other nodes are not chances in a row
        rejected = 1 if accepted < (proposed if depth is None else depth) else 0
        self._acc = self.decay * self._acc + accepted
        self._rej = self.decay * self._rej + rejected
        if self._acc + self._rej > 0:
            # Beta(1, 1) prior keeps alpha away from exactly 0 or 1
            self.alpha = (self._acc + 1.0) / (self._acc + self._rej + 2.0)
        per_token = draft_s / proposed
        self._draft_s = per_token if self._draft_s is None else 0.8 * self._draft_s + 0.2 * per_token

    def _verify_fit(self) -> tuple[float, float]:
        ks = sorted(self._verify_s)
        if len(ks) == 1:
            return self._verify_s[ks[0]] / (1 + 0.05 * ks[0]), 0.05 * self._verify_s[ks[0]] / (1 + 0.05 * ks[0])
        n = len(ks)
        mk = sum(ks) / n
        mt = sum(self._verify_s[k] for k in ks) / n
        var = sum((k - mk) ** 2 for k in ks)
        slope = max(0.0, sum((k - mk) * (self._verify_s[k] - mt) for k in ks) / var)
        return max(1e-9, mt - slope * mk), slope


POLICIES = ("fixed", "confidence", "adaptive", "budget")


def make_policy(name: str, k: int, k_values: Sequence[int], confidence_tau: float | None = None,
                max_draft_per_token: float | None = None) -> Policy:
    if name == "fixed":
        return Fixed(k)
    if name == "confidence":
        return Confidence(k, 0.5 if confidence_tau is None else confidence_tau)
    if name == "adaptive":  # k is the most it drafts: the compiled values up to it (the smallest if none is)
        return Adaptive(tuple(v for v in k_values if v <= k) or (min(k_values),))
    if name == "budget":
        return Budget(k, 1.0 if max_draft_per_token is None else max_draft_per_token)
    raise GenerationError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
