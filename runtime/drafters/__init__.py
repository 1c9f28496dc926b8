"""Drafters: what proposes the tokens the target verifies.  One module each, behind ``base.Drafter``.

| drafter | proposes | costs per step | needs |
|---|---|---|---|
| ``model``  | a small draft model's tokens, autoregressively | a draft forward pass per token | a draft in the engine |
| ``ngram``  | what followed the longest earlier match of the context's suffix | a few dict lookups | nothing |
| ``suffix`` | the most frequent continuations seen in this and earlier generations | a few dict lookups per token | nothing |
| ``hybrid`` | a context match (``ngram``) when there is one, else the model | either | a draft in the engine |
"""
from __future__ import annotations

from dataclasses import dataclass

from specrt.runtime.drafters.base import Drafter, Proposal
from specrt.runtime.drafters.hybrid import HybridDrafter
from specrt.runtime.drafters.model import ModelDrafter
from specrt.runtime.drafters.ngram import NgramDrafter
from specrt.runtime.drafters.suffix import SuffixCache, SuffixDrafter
from specrt.runtime.errors import GenerationError

DRAFTERS = ("model", "ngram", "suffix", "hybrid")
NEEDS_DRAFT_MODEL = ("model", "hybrid")


@dataclass(frozen=True)
class DrafterOptions:
    ngram_min: int = 2
    ngram_max: int = 4
    match: str = "latest"
    suffix_min_confidence: float = 0.3


def make_drafter(name: str, options: DrafterOptions, draft_step=None, suffix_cache: SuffixCache | None = None,
                 max_k: int = 8, want_top: bool = False) -> Drafter:
    """A fresh drafter for one generation."""
    if name not in DRAFTERS:
        raise GenerationError(f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)}")
    if name in NEEDS_DRAFT_MODEL and draft_step is None:
        raise GenerationError(f"the {name!r} drafter needs a draft model and this engine has none (exported without "
                              "--draft); use --drafter ngram or suffix, or re-export with `--draft`")
    if name == "ngram":
        return NgramDrafter(options.ngram_min, options.ngram_max, options.match)
    if name == "suffix":
        return SuffixDrafter(suffix_cache or SuffixCache(), options.suffix_min_confidence)
    model = ModelDrafter(draft_step, max_k=max_k, want_top=want_top)
    if name == "model":
        return model
    return HybridDrafter(NgramDrafter(options.ngram_min, options.ngram_max, options.match), model)


__all__ = ["DRAFTERS", "Drafter", "DrafterOptions", "HybridDrafter", "ModelDrafter", "NgramDrafter", "Proposal",
           "SuffixCache", "SuffixDrafter", "make_drafter"]
