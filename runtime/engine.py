"""``Engine``: an engine directory opened for generation."""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from specrt.runtime import invariance
from specrt.runtime.drafters import Drafter, DrafterOptions, RecycleTable, SuffixCache, available, make_drafter
from specrt.runtime.errors import GenerationError
from specrt.runtime.loop import StepResult, speculative, target_only
from specrt.runtime.manifest import Manifest, load_draft_vocab, load_manifest
from specrt.runtime.ort_backend import OrtModelStep
from specrt.runtime.policy import make_policy
from specrt.runtime.request import Request, check_prompt
from specrt.runtime.stats import Stats
from specrt.runtime.text import Detokenizer, StopChecker, TextCodec
from specrt.runtime.trace import TraceWriter


@dataclass
class Result:
    text: str
    token_ids: list[int]  # new tokens only (an EOS that ended generation is included)
    prompt_token_ids: list[int]
    stats: Stats = field(default_factory=Stats)

    def as_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_token_ids": self.prompt_token_ids,
                "stats": self.stats.as_dict()}


@dataclass
class Chunk:
    """What one target pass added: text safe to show, and the token ids."""

    text: str
    token_ids: list[int]


class Stream:
    """Iterate for ``Chunk``s as tokens are accepted; ``result`` is complete once iteration ends
    (read before that — say after an interrupt — it holds everything accepted so far)."""

    def __init__(self, chunks: Iterator[Chunk], result: Result, checker: StopChecker):
        self._chunks = chunks
        self._result = result
        self._checker = checker

    @property
    def result(self) -> Result:
        self._result.text = self._checker.text  # one join per access, never per token
        return self._result

    def __iter__(self) -> Iterator[Chunk]:
        return self._chunks

    def close(self) -> None:
        """Stop the generation now (a client went away): the engine is free again, ``result`` holds what
        was accepted so far, ``stop_reason`` is "cancelled"."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()


# The default drafter per kind of draft in the engine (None: no draft), chosen by the Spec-Bench run in
# the README ("Measured", fp32 demo pair): n-gram lookup 1.45x overall against the 11M draft model's
# 1.01x and hybrid's 1.35x; on a feature-head engine hybrid (n-gram first, then the head) 1.26x against
# the head alone 0.98x.  A request's `drafter` overrides it.  (Chains by default: ngram+recycle as a tree
# of 32 ran 1.50x in the same run, 3% over the chain -- within this machine's run-to-run noise, and a
# first tree use measures pass costs; `drafter="ngram+recycle", tree_nodes=32` asks for it.)
DEFAULT_DRAFTER = {"model": "ngram", "feature-head": "hybrid", None: "ngram"}


class LosslessnessWarning(UserWarning):
    """The engine directory cannot guarantee speculative output == target-only output."""


class Engine:
    """A target model (and, optionally, a draft model) loaded from an engine directory.

    >>> engine = Engine.load("engines/demo/engine")                      # doctest: +SKIP
    >>> engine.generate("def fib(n):", max_new_tokens=64, k=4).text      # doctest: +SKIP
    >>> engine.generate("Summarise: ...", drafter="ngram").stats         # doctest: +SKIP
    """

    def __init__(self, manifest: Manifest, target: OrtModelStep, draft: OrtModelStep | None,
                 codec: TextCodec | None = None):
        self.manifest = manifest
        self.target = target
        self.draft = draft
        self.codec = codec or TextCodec(manifest.tokenizer_json, manifest.chat_template, manifest.bos_token_id,
                                        manifest.eos_token_ids)
        self.drafter_options = DrafterOptions()
        self.draft_vocab = load_draft_vocab(manifest) if draft is not None and draft.spec.kind == "feature-head" \
            else None
        # Earlier generations' prompts and outputs, for the suffix drafter (bounded; oldest evicted).
        self.suffix_cache = SuffixCache()
        # The target's own latest next-token predictions per token, for the recycle drafters (1.5 MB at 49k).
        self.recycle_table = RecycleTable(manifest.target.vocab_size)
        self._lock = threading.Lock()
        self._generation = 0
        self.row_invariance: invariance.RowInvariance | None = None  # measured at load (quantized targets)
        self._pass_costs: dict[int, float] = {}  # target pass seconds by rows, measured on first tree use
        self._pass_costs_rows = 0
        self._warned_chains = False

    @property
    def trees_lossless(self) -> bool:
        """Whether tree passes score a path exactly as chain passes do.  A tree puts a path's nodes at other rows
        than a chain (siblings in between), which changes the order of attention's sums by rounding only; fp32
        logits move by ~1e-6, but a target that quantizes activations to int8 (int8-rows, int4 at accuracy
        level 4) turns that into other tokens -- measured on Spec-Bench summarisation with the int4 demo
        target: a forced 16-node tree diverged from target-only after 25 and 39 tokens.  Such targets verify
        chains only."""
        return self.target.supports_tree and not invariance.integer_activations(
            self.manifest.target.raw.get("quantization"))

    @property
    def chains_only_reason(self) -> str | None:
        """Why this engine verifies chains only, or None where it takes trees (``trees_lossless``)."""
        if not self.target.supports_tree:
            return "its graph takes no tree passes (re-export it with --attention gqa)"
        if not self.trees_lossless:
            return ("its target quantizes activations to int8, where a tree pass does not score a path exactly as "
                    "a chain pass does")
        return None

    @property
    def default_drafter(self) -> str:
        """What runs when a request names no drafter: measured on Spec-Bench (README), per engine kind."""
        return DEFAULT_DRAFTER[self.draft.spec.kind if self.draft is not None else None]

    @property
    def drafters(self) -> tuple[str, ...]:
        """The drafters this engine can run (a draft model's and a feature head's only with one)."""
        return available(self.draft.spec.kind if self.draft is not None else None)

    @classmethod
    def load(cls, path: str | Path, provider: str = "cpu", threads: int | None = None,
             draft_threads: int | None = None, spin: bool = True, check_hashes: bool = True,
             check_invariance: bool = True) -> Engine:
        """Validate the manifest (schema + SHA-256 of every file) and open the models.

        ``threads``: ONNX Runtime intra-op threads for the target (default: all cores, at most 8);
        ``draft_threads`` for the draft (default 1: a small model gains little from more threads, and
        measured on 2 cores, two alternating multi-threaded sessions slow each other down: a draft step
        took 6.7 ms alternating vs 3.7 ms single-threaded); ``spin=False`` stops idle threads from
        busy-waiting between runs.  ``check_invariance``: for a quantized target, measure on this
        machine whether verification passes score rows as 1-token decoding does (a few target passes,
        see ``runtime.invariance``) and pad 1-token steps where needed; otherwise the export machine's
        measurement in the manifest is trusted.
        """
        manifest = load_manifest(path, check_hashes=check_hashes)
        k_max = max(manifest.k_values)
        target = OrtModelStep(manifest.target, provider, threads, max_step=k_max + 1, spin=spin)
        draft = None
        if manifest.draft is not None:
            draft = OrtModelStep(manifest.draft, provider, draft_threads or 1, max_step=k_max + 1, spin=spin)
        engine = cls(manifest, target, draft)
        recorded = manifest.target.raw.get("batch_invariance")
        min_rows = recorded["min_rows"] if recorded else 1
        if check_invariance and manifest.target.raw.get("quantization"):
            engine.row_invariance = invariance.measure(
                target, vocab_limit=manifest.target.vocab_size,
                trust_single=not invariance.integer_activations(manifest.target.raw["quantization"]))
            min_rows = engine.row_invariance.min_rows
        target.min_rows = min_rows or 1
        if min_rows is None:
            warnings.warn(
                f"{path}: the target's multi-token verification passes score positions differently from "
                "1-token decoding on this machine (see runtime/invariance.py), so speculative output can "
                "differ from target-only output. Re-export with `--accuracy-level 1` for lossless "
                "speculation.", LosslessnessWarning, stacklevel=2)
        return engine

    def pass_costs(self, rows: int) -> dict[int, float]:
        """Seconds of a target pass by number of rows (1 .. ``rows``), measured once on this machine at a middle
        context at a few row counts and interpolated (``_measure_pass_costs``) -- what a tree's size is chosen from
        (``runtime.tree.prune``)."""
        have = self._pass_costs
        if have and self._pass_costs_rows >= rows:
            return have
        if not self._lock.acquire(blocking=False):  # it runs the target: never under another thread's step
            raise GenerationError("this Engine is running a step for another thread; an Engine (its KV caches) is "
                                  "not thread-safe: use one Engine per thread, or specrt.runtime.EnginePool")
        try:
            costs = self._measure_pass_costs(min(rows, self.max_context - min(256, self.max_context // 2) - 1))
        finally:
            self._lock.release()
        self._pass_costs, self._pass_costs_rows = costs, rows  # rows as asked: a clipped measurement is not redone
        return costs

    def _measure_pass_costs(self, rows: int) -> dict[int, float]:
        """Every row count 1 .. ``rows``, from passes at a few of them (1-4 each, then ~1.4x apart, and ``rows``)
        linearly interpolated: a pass's cost is nearly linear in its rows past the first few, and measuring all
        33 of a 32-node tree's counts took ~4.5 s before a first tree request could start (now 1.4 s)."""
        import statistics

        ctx = min(256, self.max_context // 2)
        ids = (np.arange(ctx + rows) % min(1000, self.manifest.target.vocab_size)).astype(np.int64)
        t = self.target
        t.prefill(ids[:ctx])
        measured = sorted({*range(1, min(rows, 4) + 1), *(int(1.4 ** i) for i in range(5, 13) if 1.4 ** i < rows),
                           rows})
        times = []
        for n in measured:
            reps = []
            for _ in range(3):
                t0 = time.perf_counter()
                t.step(ids[ctx:ctx + n], ctx)
                reps.append(time.perf_counter() - t0)
                t.set_length(ctx)
            times.append(statistics.median(reps))
        t.set_length(0)
        every = np.interp(np.arange(1, rows + 1), measured, times)
        return {n: float(c) for n, c in zip(range(1, rows + 1), every)}

    def fork(self) -> Engine:
        """Another Engine over the same loaded models: the weights (ONNX Runtime sessions), tokenizer, chat
        template, suffix cache and recycle table are shared; the KV caches and bindings are its own.  Run one generation per
        Engine at a time, each Engine in its own thread; N forks hold one copy of the weights."""
        k_max = max(self.manifest.k_values)
        target = OrtModelStep(self.target.model, max_step=k_max + 1)
        target.min_rows = self.target.min_rows
        draft = OrtModelStep(self.draft.model, max_step=k_max + 1) if self.draft is not None else None
        twin = Engine(self.manifest, target, draft, self.codec)
        twin.drafter_options, twin.suffix_cache = self.drafter_options, self.suffix_cache
        twin.recycle_table = self.recycle_table
        twin.row_invariance, twin._pass_costs, twin._pass_costs_rows = (self.row_invariance, self._pass_costs,
                                                                         self._pass_costs_rows)
        return twin

    @property
    def max_context(self) -> int:
        """Prompt + generated tokens: the manifest's, less one where 1-token steps are padded."""
        models = [self.target] + ([self.draft] if self.draft is not None else [])
        return min(self.manifest.max_context, *(m.max_context for m in models))

    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.codec.decode(token_ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for a chat, rendered with the model's chat template."""
        return self.codec.encode(self.codec.apply_chat_template(messages), add_special_tokens=False)

    # -- generation -----------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], request: Request | None = None, /, *,
                 trace: str | Path | IO[str] | None = None, **params) -> Result:
        """Generate.  ``params`` are the fields of ``runtime.request.Request`` (or pass a ``Request``):
        ``max_new_tokens``, ``k`` (None, or ``use_draft=False``: the target alone, the baseline),
        ``drafter`` (model | eagle | ngram | suffix | hybrid | recycle | ngram+recycle; default: the engine's, see ``drafters``),
        ``ngram_min``/``ngram_max``, ``tree_nodes`` (verify trees of up to that many candidates; 0 = chains),
        ``stop``, ``temperature``/``top_k``/``top_p``/``seed``, ``policy`` (fixed | confidence | adaptive |
        budget, see ``runtime.policy``) with ``tau`` / ``max_draft_per_token``, and ``acceptance="relaxed"``
        with ``accept_tau`` (LOSSY, greedy only).
        """
        s = self.stream(prompt, request, trace=trace, **params)
        for _ in s:
            pass
        return s.result

    def stream(self, prompt: str | Sequence[int], request: Request | None = None, /, *,
               trace: str | Path | IO[str] | None = None, **params) -> Stream:
        """Like ``generate`` but yields text as soon as the target accepts it.

        ``trace``: a path or text file to append a JSON Lines trace to (see ``specrt.runtime.trace``).
        """
        req = (request or Request()).with_params(params).validate(self.manifest.k_values)
        prompt_ids = self._prompt_ids(prompt)
        params_ = req.sampling
        use_draft = req.speculative
        relaxed = use_draft and req.acceptance == "relaxed"
        drafter = None
        if use_draft:
            options = self.drafter_options
            if req.ngram_min is not None or req.ngram_max is not None:
                options = dataclasses.replace(options, ngram_min=req.ngram_min or options.ngram_min,
                                              ngram_max=req.ngram_max or options.ngram_max)
            drafter = make_drafter(req.drafter or self.default_drafter, options, self.draft, self.suffix_cache,
                                   max_k=max(self.manifest.k_values), want_top=trace is not None,
                                   vocab_map=self.draft_vocab, target_vocab=self.manifest.target.vocab_size,
                                   recycle_table=self.recycle_table)
        control = make_policy(req.policy, req.k or 1, self.manifest.k_values, req.tau,
                              req.max_draft_per_token) if use_draft else None
        rng = np.random.default_rng(req.seed)
        stats = Stats(policy=control.name if control else "target-only", acceptance="relaxed" if relaxed else "strict",
                      accept_tau=req.accept_tau if relaxed else None, drafter=drafter.name if drafter else "")
        checker = StopChecker(Detokenizer(self.codec, prompt_ids), self.manifest.eos_token_ids, req.stop,
                              req.max_new_tokens)
        result = Result("", checker.token_ids, list(prompt_ids), stats)
        ids = np.asarray(prompt_ids, dtype=np.int64)
        if drafter is not None:
            tree_nodes = req.tree_nodes if self.trees_lossless else 0
            if req.tree_nodes and not tree_nodes and not self._warned_chains:
                self._warned_chains = True
                warnings.warn(f"{self.manifest.root}: this engine verifies chains only (tree_nodes ignored): "
                              f"{self.chains_only_reason}", stacklevel=2)
            steps = speculative(self.target, drafter, ids, control, req.max_new_tokens, params_, rng, stats,
                                accept_tau=stats.accept_tau, tree_nodes=tree_nodes,
                                row_cost=self.pass_costs(tree_nodes + 1) if tree_nodes else None)
        else:
            steps = target_only(self.target, ids, req.max_new_tokens, params_, rng, stats)
        tracer = None
        if trace is not None:
            tracer = TraceWriter(trace)
            tracer.header(engine=str(self.manifest.root), policy=stats.policy, drafter=stats.drafter,
                          k=req.k if use_draft else 0, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                          seed=req.seed, acceptance=stats.acceptance, accept_tau=stats.accept_tau,
                          prompt_tokens=len(prompt_ids), max_new_tokens=req.max_new_tokens)
        self._generation += 1
        return Stream(self._run(steps, checker, stats, result, self._generation, tracer, drafter), result, checker)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        return check_prompt(prompt, self.manifest.target.vocab_size, self.max_context, self.codec.encode)

    def _run(self, steps: Iterator[StepResult], checker: StopChecker, stats: Stats, result: Result,
             generation: int, tracer: TraceWriter | None = None, drafter: Drafter | None = None) -> Iterator[Chunk]:
        t0 = time.perf_counter()
        try:
            while True:
                step = self._advance(steps, generation)
                if step is None:
                    checker.reason = checker.reason or "max_context"
                    break
                stats.steps += 1
                stats.proposed += step.proposed
                kept = 0
                for token_id in step.token_ids:
                    checker.push(token_id)
                    kept += 1
                    if checker.reason:
                        break
                # book only what was kept: new_tokens == accepted + recovered + bonus
                accepted = min(step.accepted, kept)
                stats.accepted += accepted
                if kept > accepted:
                    if step.proposed and step.accepted == step.proposed:
                        stats.bonus += 1
                    else:
                        stats.recovered += 1
                stats.new_tokens += kept
                if tracer:
                    tracer.step(stats.steps - 1, step, kept)
                chunk = Chunk(checker.take(), step.token_ids[:kept])
                stats.total_s = time.perf_counter() - t0
                yield chunk
                if checker.reason:
                    break
        finally:
            stats.total_s = time.perf_counter() - t0
            stats.stop_reason = checker.reason or "cancelled"
            if drafter is not None:
                drafter.end()
            tail = checker.take(final=True)
            result.text = checker.text
            if tracer:
                tracer.summary(stats.as_dict())
                tracer.close()
        if tail:
            yield Chunk(tail, [])

    def _advance(self, steps: Iterator[StepResult], generation: int) -> StepResult | None:
        """Run one step of ``steps`` while holding the engine (its caches are not shareable)."""
        if not self._lock.acquire(blocking=False):
            raise GenerationError("this Engine is running a step for another thread; an Engine (its KV caches) is "
                                  "not thread-safe: use one Engine per thread, or specrt.runtime.EnginePool")
        try:
            if generation != self._generation:
                raise GenerationError("this stream was superseded: a newer generate()/stream() on the same Engine "
                                      "reused its KV caches. Finish one stream before starting the next, or use "
                                      "one Engine per concurrent generation (specrt.runtime.EnginePool)")
            return next(steps, None)
        finally:
            self._lock.release()


class EnginePool:
    """N Engines of one directory for concurrent generations (one per thread at a time), sharing one copy of
    the weights (``Engine.fork``): each holds only its own KV caches.

    >>> pool = EnginePool("engine", size=2)          # doctest: +SKIP
    >>> pool.generate("def f(x):", max_new_tokens=32)  # doctest: +SKIP  (thread-safe)
    """

    def __init__(self, path: str | Path, size: int = 2, **load_kwargs):
        if not isinstance(size, int) or size < 1:
            raise GenerationError(f"EnginePool size must be an integer >= 1, got {size!r}")
        first = Engine.load(path, **load_kwargs)
        self.engines = [first] + [first.fork() for _ in range(size - 1)]
        self._free: queue.Queue[Engine] = queue.Queue()
        for engine in self.engines:
            self._free.put(engine)

    def generate(self, prompt: str | Sequence[int], **kwargs) -> Result:
        engine = self._free.get()
        try:
            return engine.generate(prompt, **kwargs)
        finally:
            self._free.put(engine)
