"""``Engine``: an engine directory opened for generation."""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
import warnings
from collections import abc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from specrt.runtime import invariance
from specrt.runtime.backend import BACKENDS, Model, open_model
from specrt.runtime.drafters import Drafter, DrafterOptions, RecycleTable, SuffixCache, available, make_drafter
from specrt.runtime.drafters.datastore import Datastore
from specrt.runtime.errors import EngineDirError, GenerationError
from specrt.runtime.loop import Decoder, StepResult, decode
from specrt.runtime.manifest import Manifest, load_draft_vocab, load_manifest
from specrt.runtime.policy import make_policy
from specrt.runtime.request import Request, check_prompt, describe
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


# What a request that names no drafter, k, policy or tree size gets, per kind of draft in the engine (None: no
# draft): the fastest rows of the Spec-Bench run in docs/benchmarks.md.  On the demo pair (a draft model) n-gram
# lookup beat the 11M draft model (ngram+recycle as a tree of 32 ran 2% faster, within noise: chains kept, simpler); on a feature head's engine the hybrid (a context match, else the head) as a tree
# of 32 with adaptive k up to 8 was the fastest fp32 row; a target that quantizes activations to int8 verifies
# chains only (``trees_lossless``), and n-gram was its fastest drafter.  The adaptive policy drafts nothing where
# drafting does not pay (a chat answer that repeats nothing: measured no slower than target-only beyond noise).
# An engine that carries a datastore of the target's own answers (``manifest.datastore``) drafts with ``suffix``
# where these say ``ngram``: on the int8-rows demo target, suffix with the datastore ran 6% faster than n-gram
# (docs/drafters.md, "A datastore of the target's answers"); on fp32 it was within noise of n-gram.
DEFAULTS = {"model": {"drafter": "ngram", "k": 8, "policy": "adaptive", "tree_nodes": 0},
            "feature-head": {"drafter": "hybrid", "k": 8, "policy": "adaptive", "tree_nodes": 32},
            None: {"drafter": "ngram", "k": 8, "policy": "adaptive", "tree_nodes": 0}}


def request_defaults(manifest: Manifest, trees: bool | None = None, datastore: bool | None = None) -> dict:
    """Drafter, k, policy and tree size for a request that names none: measured on Spec-Bench (``DEFAULTS``, per
    draft kind); chains, and n-gram instead of the hybrid, where the target verifies chains only (``trees``: whether
    this engine takes lossless tree passes; default: what the manifest says); ``suffix`` instead of n-gram where a
    datastore is loaded (``datastore``; default: whether the manifest ships one)."""
    kind = manifest.draft.kind if manifest.draft is not None else None
    integer = invariance.integer_activations(manifest.target.raw.get("quantization"))
    if trees is None:
        trees = bool(manifest.target.kv.tree) and not integer
    d = dict(DEFAULTS[kind])
    # the largest compiled k up to the default's (fixed k must be compiled; adaptive drafts at most k)
    d["k"] = max((v for v in manifest.k_values if v <= d["k"]), default=min(manifest.k_values))
    if not trees:
        d["tree_nodes"] = 0
        if d["drafter"] == "hybrid" and integer:
            d["drafter"] = "ngram"
    if d["drafter"] == "ngram" and (manifest.datastore is not None if datastore is None else datastore):
        d["drafter"] = "suffix"
    return d


class LosslessnessWarning(UserWarning):
    """The engine directory cannot guarantee speculative output == target-only output."""


class Engine:
    """An engine directory opened for generation: the models (their weights loaded once), the tokenizer and chat
    template, and what every generation of this engine shares -- the suffix cache and recycle table, the
    measured row invariance and pass costs.  Each generation runs on a ``Sequence`` of it: its own KV caches.

    ``generate`` / ``stream`` run on the engine's own default sequence, one generation at a time;
    ``sequence()`` makes another, for generations at the same time (one thread each, one copy of the weights).

    >>> engine = Engine.load("engines/demo/engine")                      # doctest: +SKIP
    >>> engine.generate("def fib(n):", max_new_tokens=64, k=4).text      # doctest: +SKIP
    >>> engine.generate("Summarise: ...", drafter="ngram").stats         # doctest: +SKIP
    """

    def __init__(self, manifest: Manifest, target: Model, draft: Model | None, codec: TextCodec | None = None,
                 min_rows: int = 1):
        self.manifest = manifest
        self.target_model = target
        self.draft_model = draft
        self.codec = codec or TextCodec(manifest.tokenizer_json, manifest.chat_template, manifest.bos_token_id,
                                        manifest.eos_token_ids)
        self.drafter_options = DrafterOptions()
        self.draft_kind = draft.spec.kind if draft is not None else None
        self.draft_vocab = load_draft_vocab(manifest) if self.draft_kind == "feature-head" else None
        self.min_rows = min_rows  # every sequence's target passes run at least this many rows (runtime.invariance)
        # Earlier generations' prompts and outputs, for the suffix drafter (bounded; oldest evicted).
        self.suffix_cache = SuffixCache()
        self.datastore: Datastore | None = None  # a static table of the target's answers for suffix (load())
        # The target's own latest next-token predictions per token, for the recycle drafters (1.5 MB at 49k).
        self.recycle_table = RecycleTable(manifest.target.vocab_size)
        self.row_invariance: invariance.RowInvariance | None = None  # measured at load (quantized targets)
        self._pass_costs: dict[int, float] = {}  # target pass seconds by rows, measured on first tree use
        self._pass_costs_rows = 0
        self._costs_lock = threading.Lock()
        self._warned_chains = False
        self._default: Sequence | None = None
        self.batch = self.batcher = None  # max_batch > 1: the batch graph's slots and their scheduler

    @property
    def supports_tree(self) -> bool:
        """Whether the target's graph takes tree passes (a batching engine's batch graph does not)."""
        return bool(self.target_model.spec.kv.tree)

    @property
    def trees_lossless(self) -> bool:
        """Whether tree passes score a path exactly as chain passes do.  A tree puts a path's nodes at other rows
        than a chain (siblings in between), which changes the order of attention's sums by rounding only; fp32
        logits move by ~1e-6, but a target that quantizes activations to int8 (int8-rows, int4 at accuracy
        level 4) turns that into other tokens -- measured on Spec-Bench summarisation with the int4 demo
        target: a forced 16-node tree diverged from target-only after 25 and 39 tokens.  Such targets verify
        chains only."""
        return self.supports_tree and not invariance.integer_activations(
            self.manifest.target.raw.get("quantization"))

    @property
    def chains_only_reason(self) -> str | None:
        """Why this engine verifies chains only, or None where it takes trees (``trees_lossless``)."""
        if self.batcher is not None:
            return "it serves batches, and its batch graph takes chain passes only"
        if not self.supports_tree:
            return "its graph takes no tree passes (re-export it with --attention gqa)"
        if not self.trees_lossless:
            return ("its target quantizes activations to int8, where a tree pass does not score a path exactly as "
                    "a chain pass does")
        return None

    @property
    def defaults(self) -> dict:
        """What a request that leaves them unset gets (``request_defaults``); chains on a batching engine."""
        return request_defaults(self.manifest, trees=self.trees_lossless and self.batcher is None,
                                datastore=self.datastore is not None)

    @property
    def default_drafter(self) -> str:
        """What runs when a request names no drafter (``defaults``)."""
        return self.defaults["drafter"]

    @property
    def drafters(self) -> tuple[str, ...]:
        """The drafters this engine can run (a draft model's and a feature head's only with one)."""
        return available(self.draft_kind)

    @classmethod
    def load(cls, path: str | Path, backend: str = "onnxruntime", threads: int | None = None,
             draft_threads: int | None = None, spin: bool = True, check_hashes: bool = True,
             check_invariance: bool = True, device: int = 0, cuda_graphs: bool = True,
             max_batch: int = 1, datastore: str | Path | bool | None = None, prefill_graph: str = "auto",
             attention_kernel: str = "auto") -> Engine:
        """Validate the manifest (schema + SHA-256 of every file) and open the models.

        ``backend``: ``onnxruntime`` (the CPU, always available) or ``tensorrt`` (CUDA ``device``; needs the
        engine's plans from ``specrt build``; ``cuda_graphs=False`` runs its passes eagerly).  ``threads``: ONNX
        Runtime intra-op threads for the target (default: all cores, at most 8); ``draft_threads`` for the draft (default 1: a small model gains little
        from more threads, and measured on 2 cores, two alternating multi-threaded sessions slow each other
        down: a draft step took 6.7 ms alternating vs 3.7 ms single-threaded); ``spin=False`` stops idle
        threads from busy-waiting between runs.  ``check_invariance``: for a quantized target, measure on this
        machine whether verification passes score rows as 1-token decoding does (a few target passes, see
        ``runtime.invariance``) and pad 1-token passes where needed; otherwise the export machine's
        measurement in the manifest is trusted.  ``max_batch`` > 1: serve up to that many sequences at once
        from the target's batch graph (an engine exported with ``--batch``; ``runtime/batch.py``): their one-token
        steps share passes, and each still speculates alone where that yields more; trees are off.  ``datastore``:
        an ``.npz`` from ``scripts/build_datastore.py`` (``runtime/drafters/datastore.py``) that the ``suffix``
        drafter consults where its live cache knows less; read and checked on the first suffix generation.  None
        (default): the engine's own, if its directory ships one (``specrt export --datastore``); False: none.
        ``prefill_graph`` (auto | on | off; ONNX Runtime only): run prompts' prefill chunks through the target's
        prefill graph where the engine has one (an int4 export: the checkpoint at int8-rows in weights of its own,
        or the same weights at fp32 compute); ``auto`` does so on CPUs where that was measured faster
        (``ort_backend.use_prefill_graph``).  Target-only and speculative generation share the prefill, so either
        choice is lossless; the two choices' outputs may differ from each other, as two engines' would: the
        prompt's KV cache holds the prefill graph's numbers.
        ``attention_kernel`` (auto | flash | unfused; ONNX Runtime only): the target's GroupQueryAttention kernel,
        for every pass; ``auto`` takes the unfused one on CPUs where it was measured faster
        (``ort_backend.attention_flash``).  Lossless for the same reason.
        """
        if backend not in BACKENDS:
            raise GenerationError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        manifest = load_manifest(path, check_hashes=check_hashes)
        # a missing file fails here, before the models open; its contents are read on first use
        if datastore is None or datastore is True:
            datastore = manifest.datastore  # the directory's own (hash-checked with its other files), or None
        store = Datastore.load(datastore, manifest.target.vocab_size) if datastore not in (None, False) else None
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= 256:
            raise GenerationError(f"max_batch must be an integer in [1, 256], got {max_batch!r}")
        target_spec = manifest.target
        if max_batch > 1:
            if target_spec.batch_graph is None:
                raise EngineDirError(f"{path}: this engine has no batch graph, so it serves one sequence per pass; "
                                     "re-export it with `specrt export ... --batch` (or use max_batch=1)")
            if backend != "onnxruntime":
                raise GenerationError("batched serving runs on the onnxruntime backend")
            target_spec = target_spec.batch_graph  # every sequence runs in a slot of its buffers
        opts = {"spin": spin, "k_values": manifest.k_values, "device": device, "cuda_graphs": cuda_graphs}
        opts_ort = {"prefill_graph": prefill_graph, "attention_kernel": attention_kernel}
        target = open_model(target_spec, backend, threads=threads, **opts,
                            **(opts_ort if backend == "onnxruntime" else {}))
        draft = None
        if manifest.draft is not None:
            draft = open_model(manifest.draft, backend, threads=draft_threads or 1, **opts)
        engine = cls(manifest, target, draft)
        engine.datastore = store
        recorded = manifest.target.raw.get("batch_invariance")
        min_rows = recorded["min_rows"] if recorded else 1
        if check_invariance and manifest.target.raw.get("quantization"):
            engine.row_invariance = invariance.measure(
                engine._probe_step(), vocab_limit=manifest.target.vocab_size,
                trust_single=not invariance.integer_activations(manifest.target.raw["quantization"]))
            min_rows = engine.row_invariance.min_rows
        engine.min_rows = min_rows or 1
        if max_batch > 1:
            engine._start_batching(max_batch)
        if min_rows is None:
            warnings.warn(
                f"{path}: the target's multi-token verification passes score positions differently from "
                "1-token decoding on this machine (see runtime/invariance.py), so speculative output can "
                "differ from target-only output. Re-export with `--accuracy-level 1` for lossless "
                "speculation.", LosslessnessWarning, stacklevel=2)
        return engine

    def _start_batching(self, max_batch: int) -> None:
        from specrt.runtime.batch import Batcher, BatchTarget

        if self.min_rows != 1:
            # Such a target (int8 activations) scores a 1-row pass differently, so alone its 1-token steps run as
            # 2-row passes; a batched pass cannot (ONNX Runtime's GroupQueryAttention takes one row per sequence
            # in a batch), and its rows then differ from the solo ones in the last bits -- which the next layers'
            # int8 rounding amplifies: measured, 15 of 16 Spec-Bench answers changed under load.
            raise GenerationError(
                "this engine's target quantizes activations (its 1-token steps run as 2-row passes), so a batched "
                "pass would score a sequence differently from the same sequence alone and change its answer; "
                "serve it with max_batch=1 (`specrt serve --engines N` runs N generations at once)")
        k_max = max(self.manifest.k_values)
        self.batch = BatchTarget(self.target_model, max_batch, k_max + 1)
        for step in self.batch.steps:
            step.min_rows = self.min_rows
        solo = self.pass_costs(k_max + 1)
        self.batcher = Batcher(self.batch, solo, self.batch.measure())
        self._free_slots = list(range(max_batch))

    # -- sequences --------------------------------------------------------------------
    def sequence(self, recycle_table: RecycleTable | None = None, suffix_cache: SuffixCache | None = None) -> Sequence:
        """A new sequence of this engine: its own KV caches (target and draft), sharing everything else -- or, given
        here, a recycle table or suffix cache of its own (a benchmark keeps runs apart so).  Run one generation per
        sequence at a time, each sequence in its own thread.  A batching engine (``max_batch``) has that many
        sequences at most, one per cache slot."""
        if self.batcher is not None:
            if not self._free_slots:
                raise GenerationError(f"this engine serves {self.batch.slots} sequences at most (max_batch)")
            return Sequence(self, recycle_table, suffix_cache, slot=self._free_slots.pop(0))
        return Sequence(self, recycle_table, suffix_cache)

    @property
    def default_sequence(self) -> Sequence:
        """The sequence ``generate`` and ``stream`` run on (made on first use)."""
        if self._default is None:
            self._default = self.sequence()
        return self._default

    def _probe_step(self):
        """A target step of its own, for measurements outside any generation (its cache is its own)."""
        step = self.target_model.new_step(max(self.manifest.k_values) + 1)
        step.min_rows = self.min_rows
        return step

    def pass_costs(self, rows: int) -> dict[int, float]:
        """Seconds of a target pass by number of rows (1 .. ``rows``), measured once on this machine at a middle
        context at a few row counts and interpolated (``_measure_pass_costs``) -- what a tree's size is chosen from
        (``runtime.tree.prune``)."""
        with self._costs_lock:  # measured once, whichever sequence asks first
            have = self._pass_costs
            if have and self._pass_costs_rows >= rows:
                return have
            costs = self._measure_pass_costs(min(rows, self.max_context - min(256, self.max_context // 2) - 1))
            self._pass_costs, self._pass_costs_rows = costs, rows  # rows as asked: a clipped one is not redone
            return costs

    def _measure_pass_costs(self, rows: int) -> dict[int, float]:
        """Every row count 1 .. ``rows``, from passes at a few of them (1-4 each, then ~1.4x apart, and ``rows``)
        linearly interpolated: a pass's cost is nearly linear in its rows past the first few, and measuring all
        33 of a 32-node tree's counts took ~4.5 s before a first tree request could start (now 1.4 s)."""
        import statistics

        ctx = min(256, self.max_context // 2)
        ids = (np.arange(ctx + rows) % min(1000, self.manifest.target.vocab_size)).astype(np.int64)
        t = self._probe_step()
        t.prefill(ids[:ctx])
        measured = sorted({*range(1, min(rows, 4) + 1), *(int(1.4 ** i) for i in range(5, 13) if 1.4 ** i < rows),
                           rows})
        times = []
        for n in measured:
            reps = []
            for _ in range(3):
                t0 = time.perf_counter()
                t.forward(ids[ctx:ctx + n], ctx)
                reps.append(time.perf_counter() - t0)
                t.set_length(ctx)
            times.append(statistics.median(reps))
        every = np.interp(np.arange(1, rows + 1), measured, times)
        return {n: float(c) for n, c in zip(range(1, rows + 1), every)}

    @property
    def max_context(self) -> int:
        """Prompt + generated tokens: the manifest's and the caches', less one where 1-token passes are padded."""
        caches = [self.target_model.spec.kv.buffer_shape[2] - (self.min_rows - 1)]
        if self.draft_model is not None:
            caches.append(self.draft_model.spec.kv.buffer_shape[2])
        return min(self.manifest.max_context, *caches)

    # -- text -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.codec.encode(text)

    def decode(self, token_ids: abc.Sequence[int]) -> str:
        return self.codec.decode(token_ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids for a chat, rendered with the model's chat template."""
        return self.codec.encode(self.codec.apply_chat_template(messages), add_special_tokens=False)

    def prompt_ids(self, prompt: str | abc.Sequence[int]) -> list[int]:
        """A prompt (text, or token ids) as token ids, checked against the vocabulary and the context: what a
        generation of this engine takes, or GenerationError."""
        return check_prompt(prompt, self.manifest.target.vocab_size, self.max_context, self.codec.encode)

    # -- generation on the default sequence --------------------------------------------
    def generate(self, prompt: str | abc.Sequence[int], request: Request | None = None, /, *,
                 trace: str | Path | IO[str] | None = None, **params) -> Result:
        """Generate on the default sequence (see ``Sequence.generate``)."""
        return self.default_sequence.generate(prompt, request, trace=trace, **params)

    def stream(self, prompt: str | abc.Sequence[int], request: Request | None = None, /, *,
               trace: str | Path | IO[str] | None = None, **params) -> Stream:
        """Stream on the default sequence (see ``Sequence.stream``)."""
        return self.default_sequence.stream(prompt, request, trace=trace, **params)


class Sequence:
    """One sequence of an ``Engine``: the target's (and the draft's) KV caches and bindings, one generation at a
    time.  Everything else -- weights, tokenizer, suffix cache, recycle table, measured costs -- is the engine's."""

    def __init__(self, engine: Engine, recycle_table: RecycleTable | None = None,
                 suffix_cache: SuffixCache | None = None, slot: int | None = None):
        self.engine = engine
        self.recycle_table = recycle_table or engine.recycle_table
        self.suffix_cache = suffix_cache or engine.suffix_cache
        k_max = max(engine.manifest.k_values)
        self.slot = slot  # a batching engine's cache slot: this sequence's passes go through its batcher
        if slot is None:
            self.target = engine.target_model.new_step(k_max + 1)
            self.target.min_rows = engine.min_rows
        else:
            self.target = engine.batch.steps[slot]
        self.draft = engine.draft_model.new_step(k_max + 1) if engine.draft_model is not None else None
        self._lock = threading.Lock()
        self._generation = 0
        # the token ids whose KV the target's cache holds, [0, len): what a next prompt starting with them reuses
        self._cached_ids: list[int] = []

    def reusable(self, prompt_ids: abc.Sequence[int]) -> int:
        """How many of the prompt's first tokens this sequence's target cache already holds (its longest common
        prefix with the previous generation's prompt and answer)."""
        cached, n = self._cached_ids, 0
        for a, b in zip(cached, prompt_ids):
            if a != b:
                break
            n += 1
        return n

    def generate(self, prompt: str | abc.Sequence[int], request: Request | None = None, /, *,
                 trace: str | Path | IO[str] | None = None, **params) -> Result:
        """Generate.  ``params`` are the fields of ``runtime.request.Request`` (or pass a ``Request``); each is checked
        before any work, and a bad one is a GenerationError naming its allowed range:

        {fields}
        """
        s = self.stream(prompt, request, trace=trace, **params)
        for _ in s:
            pass
        return s.result

    def stream(self, prompt: str | abc.Sequence[int], request: Request | None = None, /, *,
               trace: str | Path | IO[str] | None = None, **params) -> Stream:
        """Like ``generate`` but yields text as soon as the target accepts it.

        ``trace``: a path or text file to append a JSON Lines trace to (see ``specrt.runtime.trace``).
        """
        engine = self.engine
        req = (request or Request()).with_params(params).with_defaults(engine.defaults).validate(engine.manifest.k_values)
        prompt_ids = engine.prompt_ids(prompt)
        params_ = req.sampling
        use_draft = req.speculative
        relaxed = use_draft and req.acceptance == "relaxed"
        drafter = None
        if use_draft:
            options = engine.drafter_options
            if req.ngram_min is not None or req.ngram_max is not None:
                options = dataclasses.replace(options, ngram_min=req.ngram_min or options.ngram_min,
                                              ngram_max=req.ngram_max or options.ngram_max)
            drafter = make_drafter(req.drafter or engine.default_drafter, options, self.draft, self.suffix_cache,
                                   max_k=max(engine.manifest.k_values), want_top=trace is not None,
                                   vocab_map=engine.draft_vocab, target_vocab=engine.manifest.target.vocab_size,
                                   recycle_table=self.recycle_table, datastore=engine.datastore)
        control = make_policy(req.policy, req.k or 1, engine.manifest.k_values, req.confidence_tau,
                              req.max_draft_per_token) if use_draft else None
        rng = np.random.default_rng(req.seed)
        stats = Stats(policy=control.name if control else "target-only", acceptance="relaxed" if relaxed else "strict",
                      accept_tau=req.accept_tau if relaxed else None, drafter=drafter.name if drafter else "")
        checker = StopChecker(Detokenizer(engine.codec, prompt_ids), engine.manifest.eos_token_ids, req.stop,
                              req.max_new_tokens)
        result = Result("", checker.token_ids, list(prompt_ids), stats)
        ids = np.asarray(prompt_ids, dtype=np.int64)
        tree_nodes = 0
        if drafter is not None:
            tree_nodes = req.tree_nodes if engine.trees_lossless else 0
            if req.tree_nodes and not tree_nodes and not engine._warned_chains:
                engine._warned_chains = True
                warnings.warn(f"{engine.manifest.root}: this engine verifies chains only (tree_nodes ignored): "
                              f"{engine.chains_only_reason}", stacklevel=2)
        decoder = Decoder(self.target, drafter, control, req.max_new_tokens, params_, rng, stats,
                          accept_tau=stats.accept_tau, tree_nodes=tree_nodes,
                          row_cost=engine.pass_costs(tree_nodes + 1) if tree_nodes else None)
        reuse = self.reusable(prompt_ids) if req.reuse_prefix else 0
        self._cached_ids = []  # this generation rewrites the cache: nothing is known until it ends
        if self.slot is None:
            steps = decode(decoder, ids, reuse)
        else:  # the engine's scheduler runs the passes, this sequence's among others'
            steps = engine.batcher.run(self.slot, decoder, ids, reuse, engine.manifest.eos_token_ids)
        tracer = None
        if trace is not None:
            tracer = TraceWriter(trace)
            tracer.header(engine=str(engine.manifest.root), policy=stats.policy, drafter=stats.drafter,
                          k=req.k if use_draft else 0, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                          seed=req.seed, acceptance=stats.acceptance, accept_tau=stats.accept_tau,
                          prompt_tokens=len(prompt_ids), max_new_tokens=req.max_new_tokens)
        self._generation += 1
        return Stream(self._run(steps, checker, stats, result, self._generation, tracer, drafter, decoder), result,
                      checker)

    def _run(self, steps: Iterator[StepResult], checker: StopChecker, stats: Stats, result: Result,
             generation: int, tracer: TraceWriter | None = None, drafter: Drafter | None = None,
             decoder: Decoder | None = None) -> Iterator[Chunk]:
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
                    if step.bonus:
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
            close = getattr(steps, "close", None)
            if close is not None:  # a scheduler's stream stops running this sequence's passes
                with self._lock:
                    close()
            if drafter is not None:
                drafter.end()
            if decoder is not None and generation == self._generation:  # what the cache holds now
                self._cached_ids = decoder.ids[:self.target.length]
            tail = checker.take(final=True)
            result.text = checker.text
            if tracer:
                tracer.summary(stats.as_dict())
                tracer.close()
        if tail:
            yield Chunk(tail, [])

    def _advance(self, steps: Iterator[StepResult], generation: int) -> StepResult | None:
        """Run one step of ``steps`` while holding the sequence (its caches are not shareable)."""
        if not self._lock.acquire(blocking=False):
            raise GenerationError("this sequence is running a step for another thread; a sequence (its KV caches) "
                                  "is not thread-safe: use one per thread (Engine.sequence(), or "
                                  "specrt.runtime.EnginePool)")
        try:
            if generation != self._generation:
                raise GenerationError("this stream was superseded: a newer generate()/stream() on the same sequence "
                                      "reused its KV caches. Finish one stream before starting the next, or use "
                                      "one sequence per concurrent generation (Engine.sequence())")
            return next(steps, None)
        finally:
            self._lock.release()


class EnginePool:
    """N sequences of one engine for concurrent generations (one per thread at a time), sharing one copy of the
    weights: each holds only its own KV caches.

    >>> pool = EnginePool("engine", size=2)          # doctest: +SKIP
    >>> pool.generate("def f(x):", max_new_tokens=32)  # doctest: +SKIP  (thread-safe)
    """

    def __init__(self, path: str | Path, size: int = 2, **load_kwargs):
        if not isinstance(size, int) or size < 1:
            raise GenerationError(f"EnginePool size must be an integer >= 1, got {size!r}")
        self.engine = Engine.load(path, **load_kwargs)
        self.sequences = [self.engine.default_sequence] + [self.engine.sequence() for _ in range(size - 1)]
        self._free: queue.Queue[Sequence] = queue.Queue()
        for seq in self.sequences:
            self._free.put(seq)

    def generate(self, prompt: str | abc.Sequence[int], **kwargs) -> Result:
        seq = self._free.get()
        try:
            return seq.generate(prompt, **kwargs)
        finally:
            self._free.put(seq)


# The request fields, documented where they are declared (runtime/request.py), listed where they are used.
Sequence.generate.__doc__ = Sequence.generate.__doc__.format(fields=describe().replace("\n", "\n        "))
