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
from dataclasses import dataclass, field, fields, replace

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


def _float(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GenerationError(f"{name} must be a finite number, got {value!r:.100}")
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        raise GenerationError(f"{name} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}, "
                              f"got {value!r}")
    return float(value)


def check_text(name: str, text: str) -> None:
    """Any Unicode text is fine; a lone UTF-16 surrogate (from a JSON '\\ud800' escape) is not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"{name} contains an unpaired surrogate (U+{ord(text[e.start]):04X}) at character "
                              f"{e.start}: not valid Unicode text") from None


@dataclass(frozen=True)
class Param:
    """One request field, declared once: its type, range and help.  ``Request``'s fields carry these, and the CLI
    flags (``add_arguments``), the server's accepted fields (``http_fields``), ``Engine.generate``'s documentation
    (``describe``) and the checks (``Request.validate``) are derived from them: a new field is one line here."""

    kind: str  # "int" | "float" | "str" | "bool" | "strings"
    help: str
    lo: float | None = None
    hi: float | None = None  # None: no upper bound
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False  # None is allowed (the engine's or the policy's default)
    cli: str | None = None  # the CLI flag; None: --name-with-dashes; "": not on the command line
    http: str | None = None  # the HTTP request field; None: the same name; "": not accepted over HTTP

    def check(self, name: str, value):
        """The value, normalised (numpy ints to ints, a list of stop strings to a tuple), or GenerationError with
        the allowed range."""
        if value is None and self.optional:
            return None
        if self.kind == "int":
            return _int(name, value, int(self.lo or 0), None if self.hi is None else int(self.hi))
        if self.kind == "float":
            return _float(name, value, self.lo or 0.0, math.inf if self.hi is None else self.hi, self.lo_open,
                          self.hi_open)
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise GenerationError(f"{name} must be true or false, got {value!r:.50}")
            return value
        if self.kind == "str":
            if value not in self.choices:
                raise GenerationError(f"unknown {name} {value!r:.50}; choose one of {', '.join(self.choices)}")
            return value
        return _strings(name, value)


def param(default, kind: str, help: str, **spec):
    """A ``Request`` field with its ``Param``."""
    return field(default=default, metadata={"param": Param(kind, help, **spec)})


@dataclass(frozen=True)
class Request:
    """What to generate.  ``use_draft=False``: the target alone (the baseline).  ``drafter``, ``k``, ``policy`` and
    ``tree_nodes`` left None are the engine's (``Engine.defaults``: what measured fastest on its kind).  Every
    field's type, range and help is declared here once (``Param``); ``validate`` checks them all."""

    max_new_tokens: int = param(128, "int", "tokens to generate at most", lo=1, http="max_tokens")
    k: int | None = param(None, "int", "draft tokens per target pass: one of the engine's k values (the most, with "
                          "policy adaptive); default: the engine's", lo=1, hi=MAX_K, optional=True)
    stop: tuple[str, ...] = param((), "strings", f"stop strings (at most {MAX_STOPS}); the text stops before one")
    temperature: float = param(0.0, "float", "0 = greedy; sampling follows the target's distribution exactly",
                               lo=0.0, hi=1e6)
    top_k: int = param(0, "int", "sample among the k most likely tokens (0 = off)", lo=0)
    top_p: float = param(1.0, "float", "sample from the smallest set of tokens holding this probability (1 = off)",
                         lo=0.0, hi=1.0, lo_open=True)
    seed: int | None = param(None, "int", "seed for sampling (none: a fresh one)", lo=0, hi=MAX_SEED, optional=True)
    use_draft: bool = param(True, "bool", "speculate (false: the target alone, the baseline)", cli="--no-draft")
    drafter: str | None = param(None, "str", "what proposes tokens: model (the engine's draft model), eagle (its "
                                "feature head), ngram (prompt lookup: what followed the last n-gram earlier in the "
                                "context), suffix (continuations seen in this and earlier generations), hybrid (a "
                                "context match, else the model or head), recycle (the target's own latest top next "
                                "tokens after each token), ngram+recycle (a context match, else recycle); default: "
                                "the engine's", choices=DRAFTERS, optional=True)
    tree_nodes: int | None = param(None, "int", "verify trees of up to this many candidate tokens per target pass "
                                   "(pruned to what pays by the engine's measured pass costs); 0 = chains; default: "
                                   "the engine's", hi=MAX_TREE_NODES, optional=True)
    ngram_min: int | None = param(None, "int", "shortest context match of the n-gram drafters (default 1)", lo=1,
                                  hi=16, optional=True)
    ngram_max: int | None = param(None, "int", "longest context match of the n-gram drafters (default 8)", lo=1,
                                  hi=16, optional=True)
    policy: str | None = param(None, "str", "how many tokens to draft per step: fixed (k), confidence (stop below "
                               "confidence_tau), adaptive (k up to the largest from measured acceptance and costs), "
                               "budget (max_draft_per_token); default: the engine's", choices=POLICIES, optional=True)
    confidence_tau: float | None = param(None, "float", "policy confidence: stop drafting when the draft's top "
                                         "probability falls below this (default 0.5)", lo=0.0, hi=1.0, lo_open=True,
                                         hi_open=True, optional=True)
    max_draft_per_token: float | None = param(None, "float", "policy budget: drafted tokens per generated token "
                                              "(default 1.0)", lo=0.0, hi=float(MAX_K), optional=True)
    reuse_prefix: bool = param(True, "bool", "start from the KV this sequence already holds for the start of the prompt "
                               "(its previous prompt and answer: a chat's next turn prefills only its new tokens); "
                               "false: prefill the whole prompt afresh", cli="--no-reuse-prefix")
    # LOSSY, and the serving operator's choice rather than a client's: not accepted over HTTP
    acceptance: str = param("strict", "str", "strict = lossless (default); relaxed = LOSSY, also accepts drafts "
                            "the target gives probability >= accept_tau (greedy only)", choices=("strict", "relaxed"),
                            http="")
    accept_tau: float | None = param(None, "float", "the threshold of relaxed acceptance", lo=0.0, hi=1.0,
                                     lo_open=True, optional=True, http="")

    def with_params(self, params: dict) -> Request:
        """This request with some fields replaced; an unknown name is a GenerationError listing the known ones."""
        unknown = sorted(set(params) - {f.name for f in fields(self)})
        if unknown:
            raise GenerationError(f"unknown generation parameter(s) {', '.join(map(repr, unknown))}; known: "
                                  f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **params) if params else self

    @property
    def speculative(self) -> bool:
        return bool(self.use_draft)

    def with_defaults(self, defaults: dict) -> Request:
        """Fields left None take ``defaults`` (an engine's: ``Engine.defaults``); relaxed acceptance verifies chains,
        so it takes no default tree."""
        filled = {name: value for name, value in defaults.items() if getattr(self, name) is None}
        if self.acceptance == "relaxed" and self.tree_nodes is None:
            filled["tree_nodes"] = 0
        return replace(self, **filled)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    def validate(self, k_values: Sequence[int], names: dict[str, str] | None = None) -> Request:
        """The request with its values normalised (numpy ints to ints, stop to a tuple), or GenerationError: every
        field by its ``Param``, then what depends on several fields or on the engine (its compiled ``k_values``).
        ``names``: what the caller calls a field, for the messages (the server's ``max_tokens``)."""
        names = names or {}
        out = replace(self, **{f.name: f.metadata["param"].check(names.get(f.name, f.name), getattr(self, f.name))
                               for f in fields(self)})
        if out.tree_nodes and out.acceptance == "relaxed":
            raise GenerationError("trees are verified strictly; relaxed acceptance needs tree_nodes=0")
        if out.ngram_min is not None and out.ngram_max is not None and out.ngram_min > out.ngram_max:
            raise GenerationError(f"ngram_min ({out.ngram_min}) must not exceed ngram_max ({out.ngram_max})")
        if out.speculative and out.policy != "adaptive" and out.k not in k_values:
            raise GenerationError(f"k={out.k} is not one of this engine's compiled k values {list(k_values)}; "
                                  f"pick one of those or re-export with `specrt export ... --k {out.k}`")
        if out.acceptance == "relaxed":
            if out.accept_tau is None:
                raise GenerationError(f"relaxed acceptance needs accept_tau in (0, 1], got {out.accept_tau!r}")
            if out.temperature != 0:
                raise GenerationError("relaxed acceptance is defined for greedy decoding only; use temperature=0")
        return out


def params_of(request_cls: type = Request) -> dict[str, Param]:
    """Every request field's ``Param``, by field name."""
    return {f.name: f.metadata["param"] for f in fields(request_cls)}


def http_fields(request_cls: type = Request) -> dict[str, str]:
    """The request fields an HTTP body may set: {body field name: Request field name}."""
    return {(p.http or name): name for name, p in params_of(request_cls).items() if p.http != ""}


def describe(request_cls: type = Request) -> str:
    """One line per request field: name, type, default and help (``Engine.generate``'s documentation)."""
    lines = []
    for f in fields(request_cls):
        p = f.metadata["param"]
        lines.append(f"``{f.name}`` ({p.kind}, default {f.default!r}): {p.help}")
    return "\n".join(lines)


def add_arguments(parser, request_cls: type = Request, defaults: dict | None = None) -> None:
    """One command-line flag per request field (help and range from its ``Param``; ``defaults`` overrides a
    field's default for this command)."""
    defaults = defaults or {}
    group = parser.add_argument_group("generation (the fields of a request)")
    for f in fields(request_cls):
        p = f.metadata["param"]
        if p.cli == "":
            continue
        flag = p.cli or "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        shown = f" (default {default})" if default not in (None, (), "") and p.kind != "bool" else ""
        if p.kind == "bool":
            group.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=p.help)
        elif p.kind == "strings":
            group.add_argument(flag, dest=f.name, action="append", default=list(default), help=p.help + " (repeatable)")
        else:
            group.add_argument(flag, dest=f.name, default=default, help=p.help + shown,
                               type={"int": int, "float": float}.get(p.kind, str),
                               choices=p.choices or None, metavar=None if p.choices else f.name.upper())


def from_arguments(args, request_cls: type = Request) -> dict:
    """The request fields of parsed command-line ``args`` (those ``add_arguments`` made)."""
    return {f.name: getattr(args, f.name) for f in fields(request_cls)
            if f.metadata["param"].cli != "" and hasattr(args, f.name)}


def _strings(name: str, value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise GenerationError(f"{name} must be a list of strings, got {value!r:.100}")
    if len(value) > MAX_STOPS:
        raise GenerationError(f"at most {MAX_STOPS} stop strings, got {len(value)}")
    for s in value:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise GenerationError(f"each stop string must be a non-empty string of at most {MAX_STOP_CHARS} "
                                  f"characters, got {s!r:.100}")
        check_text("a stop string", s)
    return tuple(value)


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
