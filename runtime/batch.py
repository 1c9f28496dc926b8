"""Several sequences in one target pass: the batch graph's cache slots, and a scheduler that fills its passes.

An engine exported with ``--batch`` has ``target-batch.onnx``: the target with a batch dimension, one cache slot
per sequence, each with its own length (``export/gqa_graph.build(batch=True)``).  A pass over 8 rows costs little
more than a pass over one (the weights are read once), so decoding eight sequences in one pass is nearly eight
times the tokens.  But ONNX Runtime's GroupQueryAttention on the CPU takes a batch only with one row per sequence
("batch_size must be 1 when sequence_length > 1 and past context is given"), so a batched pass cannot verify
drafts: each sequence scores one token.  The ``Batcher`` therefore chooses, round by round, by goodput (tokens per
second, from pass costs measured at load): one batched pass in which every ready sequence decodes a token, or a
speculative step of one sequence alone (its drafts verified in a pass of its own, as without batching).  One
sequence alone always speculates, so a single client runs as before; under load the batched pass wins.

``BatchTarget`` owns the buffers ([slots, kv_heads, max_context, head_dim] per layer) and runs batched decode passes
over slots [0, B); each slot is also an ``OrtModelStep`` over its own [1, ...] view, which runs the passes of one
sequence (prefill chunks, speculative steps) through the same graph.  A slot's entries past its valid length are
overwritten freely (rollback = a length), so slots inside [0, B) that take no part in a pass run a dummy row at
their own length.

Lossless per request: a row of a batched pass scores bit for bit as the same token in a 1-row pass of its own
(the graph's rows are independent; checked in ``tests/test_batch_graph.py`` and against solo runs in
``tests/test_batch.py``), so a sequence's decode steps are those it runs alone.  Not so for a target that quantizes
activations to int8: alone, its 1-token steps run as 2-row passes (``runtime/invariance.py``), whose attention
differs from a 1-row pass in the last bits, and a batched pass cannot hold 2 rows per sequence; the next layers'
int8 rounding turns those bits into other answers (measured: 15 of 16 Spec-Bench answers changed under load), so
such engines do not batch (``Engine.load`` says so).  Trees need the tree graph, so batched engines verify chains.
A sampled request still follows the target's distribution token by token, but its random numbers are drawn per step
and a batched decode step draws other ones than a speculative step, so under load the same seed can give another
text than alone (as an adaptive policy's k choices, which follow measured timings, can alone).
"""
from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from specrt.runtime import invariance
from specrt.runtime.errors import GenerationError
from specrt.runtime.kv_cache import KVCache
from specrt.runtime.loop import Decoder, StepResult
from specrt.runtime.manifest import ModelSpec
from specrt.runtime.ort_backend import OrtModel, OrtModelStep

log = logging.getLogger(__name__)


class BatchTarget:
    """The batch graph, its ``slots`` cache slots, batched decode passes over slots [0, B), and a step per slot."""

    def __init__(self, model: OrtModel, slots: int, max_step: int):
        self.model, self.spec, self.slots = model, model.spec, slots
        _, kvh, max_ctx, hd = self.spec.kv.buffer_shape
        dtype = np.float32 if self.spec.dtype == "float32" else np.float16
        shape = (slots, kvh, max_ctx, hd)
        self.keys = [np.zeros(shape, dtype) for _ in range(self.spec.num_layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(self.spec.num_layers)]
        self.caches = [KVCache.over([k[i:i + 1] for k in self.keys], [v[i:i + 1] for v in self.values])
                       for i in range(slots)]
        self.steps = [OrtModelStep(model, max_step=max_step, cache=c) for c in self.caches]
        self._bindings: dict[int, tuple] = {}  # B -> (binding, ids [B, 1], past [B], logits, features)
        self._from = np.zeros(1, np.int64)
        self.passes = 0
        self.rows = 0  # rows of the batched passes (a server's /metrics)

    def _binding(self, b: int):
        have = self._bindings.get(b)
        if have is not None:
            return have
        kv, session = self.spec.kv, self.model.session
        binding = session.io_binding()
        for name, out_name, bufs in zip(kv.key_buffers + kv.value_buffers, kv.new_keys + kv.new_values,
                                        self.keys + self.values):
            value = ort.OrtValue.ortvalue_from_numpy(bufs[:b])  # slots [0, b): contiguous, written in place
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(out_name, value)
        ids, past = np.zeros((b, 1), np.int64), np.zeros(b, np.int64)
        logits = np.empty((b, 1, self.spec.vocab_size), np.float32)
        binding.bind_cpu_input(kv.input_ids, ids)
        binding.bind_cpu_input(kv.past_length, past)
        if kv.logits_from:
            binding.bind_cpu_input(kv.logits_from, self._from)
        binding.bind_ortvalue_output(kv.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        features = None
        if self.spec.features:
            features = np.empty((b, 1, self.spec.features["size"]), np.float32)
            binding.bind_ortvalue_output(self.spec.features["output"], ort.OrtValue.ortvalue_from_numpy(features))
        self._bindings[b] = have = (binding, ids, past, logits, features)
        return have

    def decode(self, rows: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        """One batched pass: each (slot, token) runs ``token`` at its slot's length.  Slots in [0, B) that are not
        in ``rows`` run a dummy token at their own length (written past their valid entries: nothing lost).
        Returns logits [len(rows), vocab] (and features [len(rows), F]), in the order of ``rows``."""
        b = max(slot for slot, _ in rows) + 1
        binding, ids, past, logits, features = self._binding(b)
        ids[:] = 0
        for j in range(b):
            past[j] = min(self.caches[j].length, self.caches[j].capacity - 1)
        for slot, token in rows:
            if self.caches[slot].length >= self.caches[slot].capacity:
                raise GenerationError(f"slot {slot} is full ({self.caches[slot].capacity} entries)")
            ids[slot, 0] = token
        self.model.session.run_with_iobinding(binding)
        self.passes += 1
        self.rows += b
        order = [slot for slot, _ in rows]
        for slot in order:
            self.caches[slot].written(int(past[slot]), 1)
        return logits[order, 0], (features[order, 0] if features is not None else None)

    def measure(self, context: int = 64, repeats: int = 3) -> dict[int, float]:
        """Seconds of a batched pass by batch size 2 .. slots, at ``context`` entries per slot (all slots free:
        at load)."""
        context = min(context, self.caches[0].capacity // 4)
        ids = (np.arange(context) % 1000).astype(np.int64)
        for step in self.steps:
            step.prefill(ids)
        costs = {}
        for b in range(2, self.slots + 1):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.decode([(j, 7) for j in range(b)])
                times.append(time.perf_counter() - t0)
                for j in range(b):
                    self.caches[j].set_length(context)
            costs[b] = statistics.median(times)
        for step in self.steps:
            step.set_length(0)
        self.passes = self.rows = 0
        return costs


@dataclass
class _Generation:
    """One sequence's generation as the scheduler runs it."""

    slot: int
    decoder: Decoder
    prefill: Iterator[None] | None
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    eos: frozenset[int] = frozenset()

    @property
    def ready(self) -> bool:
        return self.prefill is None and not self.cancelled


class Batcher:
    """Continuous batching: one thread runs every target pass of the engine's sequences.  Each round: one prefill
    chunk of a sequence that is starting (a new request waits at most a chunk's time for others, and delays them by
    at most one chunk), then either one batched pass (every ready sequence decodes a token) or one sequence's
    speculative step alone, whichever yields more tokens per second by the measured pass costs."""

    def __init__(self, target: BatchTarget, solo_costs: dict[int, float], batch_costs: dict[int, float]):
        self.target, self.solo_costs, self.batch_costs = target, solo_costs, batch_costs
        self._new: queue.Queue[_Generation] = queue.Queue()
        self._active: list[_Generation] = []
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="specrt-batcher", daemon=True)
        self._thread.start()
        self.batched_passes = self.solo_passes = 0

    # -- the sequences' side ------------------------------------------------------------
    def run(self, slot: int, decoder: Decoder, prompt_ids: np.ndarray, reuse: int,
            eos: frozenset[int]) -> Iterator[StepResult]:
        """The steps of one generation on ``slot``, as the scheduler runs them; closing the iterator cancels it."""
        gen = _Generation(slot, decoder, decoder.prefill(prompt_ids, reuse), eos=eos)
        self._new.put(gen)
        self._wake.set()
        try:
            while True:
                item = gen.out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            gen.cancelled = True  # the consumer stopped (a stop string, a cancel): the scheduler drops it
            self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)

    # -- the scheduler ------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._closed:
            while True:
                try:
                    self._active.append(self._new.get_nowait())
                except queue.Empty:
                    break
            self._active = [g for g in self._active if not self._finished(g)]
            if not self._active:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._round()
            except Exception as e:  # handed to every waiting consumer, never lost in this thread
                log.exception("batch round failed")
                for g in self._active:
                    g.out.put(GenerationError(f"the batch scheduler failed: {e}"))
                    g.cancelled = True

    def _finished(self, g: _Generation) -> bool:
        if g.cancelled or (g.prefill is None and g.decoder.done):
            g.out.put(None)
            return True
        return False

    def _round(self) -> None:
        starting = next((g for g in self._active if g.prefill is not None), None)
        # one chunk of one starting sequence per round
        if starting is not None and next(starting.prefill, StopIteration) is StopIteration:
            starting.prefill = None
        ready = [g for g in self._active if g.ready and not g.decoder.done]
        if not ready:
            return
        if len(ready) == 1 or self._solo_pays(ready):
            g = max(ready, key=self._solo_rate) if len(ready) > 1 else ready[0]
            self._solo(g)
        else:
            self._batched(ready)

    def _solo_rate(self, g: _Generation) -> float:
        """Expected tokens per second of a speculative step of ``g`` alone (the speedup formula)."""
        d = g.decoder
        k = d.policy.max_k if d.policy is not None else 0
        if d.drafter is None or k == 0:
            return 1.0 / self.solo_costs[1]
        s = d.stats
        alpha = min(0.95, (s.accepted + 1) / (s.proposed + 2))  # the acceptance so far, a uniform prior
        expected = (1 - alpha ** (k + 1)) / (1 - alpha)
        return expected / self.solo_costs[min(k + 1, max(self.solo_costs))]

    def _solo_pays(self, ready: list[_Generation]) -> bool:
        batched = len(ready) / self.batch_costs[min(len(ready), max(self.batch_costs))]
        return max(self._solo_rate(g) for g in ready) > batched

    def _solo(self, g: _Generation) -> None:
        """A speculative step of one sequence, in a pass of its own."""
        d = g.decoder
        rows = d.plan()
        t0 = time.perf_counter()
        logits = d.target.forward(rows.token_ids, rows.pos, tree=rows.tree)
        self._emit(g, d.apply(logits, time.perf_counter() - t0))
        self.solo_passes += 1

    def _batched(self, ready: list[_Generation]) -> None:
        """Every ready sequence decodes one token, in one pass."""
        plans = [(g, g.decoder.plan(k_cap=0)) for g in ready]
        t0 = time.perf_counter()
        logits, features = self.target.decode([(g.slot, int(r.token_ids[0])) for g, r in plans])
        seconds = time.perf_counter() - t0
        for i, (g, _) in enumerate(plans):
            self._emit(g, g.decoder.apply(logits[i:i + 1], seconds,
                                          features=None if features is None else features[i:i + 1]))
        self.batched_passes += 1

    @staticmethod
    def _emit(g: _Generation, step: StepResult) -> None:
        g.out.put(step)
        if g.eos and any(t in g.eos for t in step.token_ids):  # the consumer stops at EOS: no pass past it
            g.cancelled = True


def compare_batch_graph(spec: ModelSpec, batch_path, prompts: int = 3, seed: int = 0) -> dict[str, float]:
    """The batch graph against the target graph it was made beside: a batched decode pass of ``prompts`` sequences
    of different lengths against each sequence decoded alone -- max |logits difference| and the share of rows whose
    argmax agrees (export records both)."""
    import dataclasses

    batch_spec = dataclasses.replace(spec, path=batch_path,
                                     kv=dataclasses.replace(spec.kv, position_ids=None, tree_bias=None))
    single = OrtModelStep(spec, threads=1)
    # alone, a 1-token step is a 1-row pass, or a 2-row one where activations are int8 (which then differs)
    single.min_rows = 2 if invariance.integer_activations(spec.raw.get("quantization")) else 1
    target = BatchTarget(OrtModel(batch_spec, "cpu", 1), prompts, max_step=2)
    rng = np.random.default_rng(seed)
    hi = min(spec.vocab_size, 1000)
    lengths = [3 + 7 * i for i in range(prompts)]
    ids = [rng.integers(0, hi, n, dtype=np.int64) for n in lengths]
    alone = []
    for p in ids:
        single.prefill(p[:-1])
        alone.append(single.forward(p[-1:], len(p) - 1)[-1].copy())
    for slot, p in enumerate(ids):
        target.steps[slot].prefill(p[:-1])
    logits, _ = target.decode([(slot, int(p[-1])) for slot, p in enumerate(ids)])
    diff = max(float(np.abs(logits[i] - alone[i]).max()) for i in range(prompts))
    agree = float(np.mean([logits[i].argmax() == alone[i].argmax() for i in range(prompts)]))
    return {"decode_batch": round(diff, 8), "decode_batch_argmax_equal": agree}
