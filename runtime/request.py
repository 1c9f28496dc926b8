"""One generation request: its parameters, checked once, before any work, with the allowed range in every error.

Requests come from users, CLIs and HTTP clients: untrusted.  ``Request.validate`` is the one place
their parameters are checked (types included: ``True`` is not a token count, ``1e3`` is not an
integer), and ``check_prompt`` bounds the prompt before it reaches the tokenizer, so that no request
can make the runtime do unbounded work or raise anything but ``GenerationError``.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from specrt.runtime.drafters import DRAFTERS
from specrt.runtime.errors import GenerationError
from specrt.runtime.policy import POLICIES
from specrt.runtime.sampling import SamplingParams

MAX_STOPS = 16  # stop strings per request
MAX_STOP_CHARS = 1000  # characters per stop string
MAX_SAMPLES = 16  # independent samples per request (the CLI's --num-samples, the server's n)
MAX_SEED = 2**63 - 1
CHARS_PER_TOKEN = 256  # a prompt longer than this many characters per context token cannot fit: refused unread
MAX_K = 64
MAX_TREE_NODES = 64


def _int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise GenerationError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)  # ints and numpy integers; never floats or strings
    except TypeError:
        raise GenerationError(f"{name} must be an integer, got {value!r:.100}") from None
    if value < lo or (hi is not None and value > hi):
        raise GenerationError(f"{name} must be in [{lo}, {hi if hi is not None else 'inf'}], got {value}")
    return value


def _float(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GenerationError(f"{name} must be a finite number, got {value!r:.100}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise GenerationError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def check_text(name: str, text: str) -> None:
    """Any Unicode text is fine; a lone UTF-16 surrogate (from a JSON '\\ud800' escape) is not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"{name} contains an unpaired surrogate (U+{ord(text[e.start]):04X}) at character "
                              f"{e.start}: not valid Unicode text") from None


@dataclass(frozen=True)
class Request:
    """What to generate.  ``k=None`` or ``use_draft=False``: the target alone (the baseline)."""

    max_new_tokens: int = 128
    k: int | None = 4
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    use_draft: bool = True
    policy: str = "fixed"
    tau: float | None = None
    max_draft_per_token: float | None = None
    acceptance: str = "strict"  # "relaxed" = LOSSY (greedy only)
    accept_tau: float | None = None
    drafter: str | None = None  # one of drafters.DRAFTERS; None = the engine's default
    ngram_min: int | None = None  # context drafters' n-gram sizes; None = the engine's
    ngram_max: int | None = None
    tree_nodes: int = 0  # > 0: propose trees of up to this many nodes (pruned by measured pass costs); 0 = chains

    def with_params(self, params: dict) -> Request:
        """This request with some fields replaced; an unknown name is a GenerationError listing the known ones."""
        unknown = sorted(set(params) - {f.name for f in fields(self)})
        if unknown:
            raise GenerationError(f"unknown generation parameter(s) {', '.join(map(repr, unknown))}; known: "
                                  f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **params) if params else self

    @property
    def speculative(self) -> bool:
        return bool(self.use_draft) and self.k is not None

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    def validate(self, k_values: Sequence[int]) -> Request:
        """The request with its values normalised (numpy ints to ints, stop to a tuple), or GenerationError."""
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, (list, tuple)):
            raise GenerationError(f"stop must be a list of strings, got {stop!r:.100}")
        if len(stop) > MAX_STOPS:
            raise GenerationError(f"at most {MAX_STOPS} stop strings, got {len(stop)}")
        for s in stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise GenerationError(f"each stop string must be a non-empty string of at most {MAX_STOP_CHARS} "
                                      f"characters, got {s!r:.100}")
            check_text("a stop string", s)
        if not isinstance(self.use_draft, bool):
            raise GenerationError(f"use_draft must be true or false, got {self.use_draft!r:.50}")
        if self.policy not in POLICIES:
            raise GenerationError(f"unknown policy {self.policy!r:.50}; choose one of {', '.join(POLICIES)}")
        if self.drafter is not None and self.drafter not in DRAFTERS:
            raise GenerationError(f"unknown drafter {self.drafter!r:.50}; choose one of {', '.join(DRAFTERS)}")
        if self.acceptance not in ("strict", "relaxed"):
            raise GenerationError(f"acceptance must be 'strict' (lossless, default) or 'relaxed', "
                                  f"got {self.acceptance!r:.50}")
        out = replace(
            self, stop=tuple(stop), max_new_tokens=_int("max_new_tokens", self.max_new_tokens, 1),
            k=None if self.k is None else _int("k", self.k, 1, MAX_K),
            temperature=_float("temperature", self.temperature, 0.0, 1e6),
            top_k=_int("top_k", self.top_k, 0), top_p=_float("top_p", self.top_p, 0.0, 1.0, lo_open=True),
            seed=None if self.seed is None else _int("seed", self.seed, 0, MAX_SEED),
            tau=None if self.tau is None else _float("tau", self.tau, 0.0, 1.0, lo_open=True),
            max_draft_per_token=None if self.max_draft_per_token is None else
            _float("max_draft_per_token", self.max_draft_per_token, 0.0, float(MAX_K)),
            accept_tau=None if self.accept_tau is None else _float("accept_tau", self.accept_tau, 0.0, 1.0,
                                                                     lo_open=True),
            ngram_min=None if self.ngram_min is None else _int("ngram_min", self.ngram_min, 1, 16),
            ngram_max=None if self.ngram_max is None else _int("ngram_max", self.ngram_max, 1, 16),
            tree_nodes=_int("tree_nodes", self.tree_nodes, 0, MAX_TREE_NODES),
        )
        if out.tree_nodes and out.acceptance == "relaxed":
            raise GenerationError("trees are verified strictly; relaxed acceptance needs tree_nodes=0")
        if out.ngram_min is not None and out.ngram_max is not None and out.ngram_min > out.ngram_max:
            raise GenerationError(f"ngram_min ({out.ngram_min}) must not exceed ngram_max ({out.ngram_max})")
        out.sampling  # noqa: B018 -- SamplingParams checks its own ranges
        if out.speculative and out.policy != "adaptive" and out.k not in k_values:
            raise GenerationError(f"k={out.k} is not one of this engine's compiled k values {list(k_values)}; "
                                  f"pick one of those or re-export with `specrt export ... --k {out.k}`")
        if out.acceptance == "relaxed":
            if out.accept_tau is None:
                raise GenerationError(f"relaxed acceptance needs accept_tau in (0, 1], got {out.accept_tau!r}")
            if out.temperature != 0:
                raise GenerationError("relaxed acceptance is defined for greedy decoding only; use temperature=0")
        return out


def check_prompt(prompt, vocab_size: int, max_context: int, encode) -> list[int]:
    """Prompt text or token ids -> ids, bounded before any tokenizer work."""
    if isinstance(prompt, str):
        limit = CHARS_PER_TOKEN * max_context
        if len(prompt) > limit:
            raise GenerationError(f"the prompt has {len(prompt):,} characters; this engine's max context of "
                                  f"{max_context} tokens cannot hold more than about {limit:,}")
        check_text("the prompt", prompt)
        ids = encode(prompt)
    else:
        if isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__len__"):
            raise GenerationError(f"the prompt must be text or a list of token ids, got {type(prompt).__name__}")
        if len(prompt) >= max_context:
            raise GenerationError(f"the prompt has {len(prompt)} tokens but this engine's max context is "
                                  f"{max_context} (prompt + new tokens); shorten the prompt or re-export "
                                  "with a larger `--max-context`")
        ids = []
        for t in prompt:
            if isinstance(t, bool):
                raise GenerationError(f"prompt token ids must be integers, got {t!r}")
            try:
                ids.append(operator.index(t))
            except TypeError:
                raise GenerationError(f"prompt token ids must be integers, got {t!r:.50}") from None
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise GenerationError("the prompt is empty; give at least one token")
    if len(ids) >= max_context:
        raise GenerationError(f"the prompt has {len(ids)} tokens but this engine's max context is "
                              f"{max_context} (prompt + new tokens); shorten the prompt or re-export "
                              "with a larger `--max-context`")
    return ids
