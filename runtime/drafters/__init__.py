"""Drafters: what proposes the tokens the target verifies.  One module each, behind ``base.Drafter``.

| drafter | proposes | costs per step | needs |
|---|---|---|---|
| ``model``  | a small draft model's tokens, autoregressively | a draft forward pass per token | a draft model in the engine |
| ``eagle``  | a feature head's tokens: it reads the target's own hidden states | a head pass per token (one layer) | a feature head in the engine |
| ``ngram``  | what followed the longest earlier match of the context's suffix | a few dict lookups | nothing |
| ``suffix`` | the most frequent continuations seen in this and earlier generations, or in a ``Datastore`` | a few dict lookups per token | nothing |
| ``hybrid`` | a context match (``ngram``) when there is one, else the engine's model or head | either | either |
| ``recycle`` | the target's own latest top next tokens after each token, kept from its verification passes | a table walk; a top-8 per committed row | nothing |
| ``ngram+recycle`` | a context match when there is one, else ``recycle`` (as a tree: both) | both, nearly free | nothing |
"""
from __future__ import annotations

from dataclasses import dataclass

from specrt.runtime.drafters.base import Drafter, Proposal
from specrt.runtime.drafters.datastore import Datastore
from specrt.runtime.drafters.eagle import EagleDrafter
from specrt.runtime.drafters.hybrid import HEAD_DEPTH, MODEL_DEPTH, HybridDrafter
from specrt.runtime.drafters.model import ModelDrafter
from specrt.runtime.drafters.ngram import NgramDrafter
from specrt.runtime.drafters.recycle import RecycleDrafter, RecycleTable
from specrt.runtime.drafters.suffix import SuffixCache, SuffixDrafter
from specrt.runtime.errors import GenerationError

DRAFTERS = ("model", "eagle", "ngram", "suffix", "hybrid", "recycle", "ngram+recycle")
NEEDS = {"model": ("model",), "eagle": ("feature-head",), "hybrid": ("model", "feature-head")}  # draft kinds


def available(draft_kind: str | None) -> tuple[str, ...]:
    """The drafters an engine can run: ``draft_kind`` is its draft's kind, or None without one."""
    return tuple(d for d in DRAFTERS if d not in NEEDS or draft_kind in NEEDS[d])


@dataclass(frozen=True)
class DrafterOptions:
    ngram_min: int = 1  # measured: benchmarks/drafter_replay.py (docs/drafters.md); short matches propose
    ngram_max: int = 8  # short continuations (NgramDrafter.depth), so a 1-gram match is worth trying
    match: str = "latest"
    suffix_min_confidence: float = 0.1  # measured: benchmarks/drafter_replay.py (docs/drafters.md)


def make_drafter(name: str, options: DrafterOptions, draft_step=None, suffix_cache: SuffixCache | None = None,
                 max_k: int = 8, want_top: bool = False, vocab_map=None, target_vocab: int = 0,
                 recycle_table: RecycleTable | None = None, datastore: Datastore | None = None) -> Drafter:
    """A fresh drafter for one generation.  ``draft_step``: the engine's draft (a model or a feature head,
    by its ``spec.kind``), or None; ``vocab_map``: a feature head's draft-to-target vocabulary;
    ``suffix_cache`` / ``recycle_table``: the engine's, shared by its generations (a fresh one if None);
    ``datastore``: the engine's static table for ``suffix``, or None."""
    if name not in DRAFTERS:
        raise GenerationError(f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)}")
    kind = draft_step.spec.kind if draft_step is not None else None
    if name not in available(kind):
        have = f"a {kind} draft" if kind else "no draft"
        raise GenerationError(f"the {name!r} drafter needs a draft model or feature head ({' or '.join(NEEDS[name])}) "
                              f"and this engine has {have}; use one of {', '.join(available(kind))}, or re-export "
                              "with `--draft` / `--draft-head`")
    if name == "ngram":
        return NgramDrafter(options.ngram_min, options.ngram_max, options.match)
    if name == "suffix":
        return SuffixDrafter(suffix_cache or SuffixCache(), options.suffix_min_confidence, datastore=datastore)
    if name in ("recycle", "ngram+recycle"):
        recycle = RecycleDrafter(recycle_table or RecycleTable(target_vocab))
        if name == "recycle":
            return recycle
        return HybridDrafter(NgramDrafter(options.ngram_min, options.ngram_max, options.match), recycle,
                             model_depth=None, name=name)
    if kind == "feature-head":
        neural: Drafter = EagleDrafter(draft_step, vocab_map, target_vocab, max_k=max_k, want_top=want_top)
    else:
        neural = ModelDrafter(draft_step, max_k=max_k, want_top=want_top)
    if name in ("model", "eagle"):
        return neural
    return HybridDrafter(NgramDrafter(options.ngram_min, options.ngram_max, options.match), neural,
                         model_depth=HEAD_DEPTH if kind == "feature-head" else MODEL_DEPTH)


__all__ = ["DRAFTERS", "Datastore", "Drafter", "DrafterOptions", "EagleDrafter", "HybridDrafter", "ModelDrafter",
           "NgramDrafter", "Proposal", "RecycleDrafter", "RecycleTable", "SuffixCache", "SuffixDrafter", "available",
           "make_drafter"]
