"""Counters and timers of one generation."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Stats:
    """``new_tokens == accepted + recovered + bonus`` always holds (tokens cut by a stop are not counted)."""

    new_tokens: int = 0
    steps: int = 0  # target (verifier) passes after the prefill
    proposed: int = 0  # draft tokens offered to the target
    accepted: int = 0
    recovered: int = 0  # target's token at the first rejection (or the only token when nothing was proposed)
    bonus: int = 0  # target's extra token when all proposals passed
    tree_passes: int = 0  # target passes that verified a tree (not a chain)
    draft_s: float = 0.0
    verify_s: float = 0.0
    prefill_s: float = 0.0
    reused_tokens: int = 0  # prompt tokens whose KV the sequence already held (not prefilled again)
    total_s: float = 0.0
    stop_reason: str = ""
    policy: str = "fixed"
    drafter: str = ""  # one of drafters.DRAFTERS ("" = target only)
    acceptance: str = "strict"  # "relaxed" = LOSSY: output may differ from the target's own
    accept_tau: float | None = None

    @property
    def lossless(self) -> bool:
        return self.acceptance == "strict"

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def other_s(self) -> float:
        return max(0.0, self.total_s - self.draft_s - self.verify_s - self.prefill_s)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(acceptance_rate=self.acceptance_rate, tokens_per_step=self.tokens_per_step,
                 other_s=self.other_s, tokens_per_s=self.tokens_per_s,
                 lossless=self.lossless)
        return d
