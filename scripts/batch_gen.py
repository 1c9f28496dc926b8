"""Batched generation on the CPU through the verifier's own in-place ONNX graph: many sequences per pass.

A pass over 32 rows costs little more than a pass over one (the weights are read once), so generating the
head's training data 32 sequences at a time runs ~9x faster here than one at a time (demo verifier, fp32,
2 threads, context 300: 22.7 ms per 1-sequence pass, 79 ms per 32-sequence pass).  The graph is
``export.gqa_graph.build(..., batch=True)``: one cache slot per sequence, each with its own length; a
sequence's prompt is prefilled alone over its slot (a contiguous [1, ...] view of the buffers), and every
slot decodes one token per pass.  Decoding in a batch scores each sequence exactly as decoding it alone
does (checked bit for bit by ``check``).  A slot whose sequence finishes takes the next prompt at once
(continuous batching), so the batch stays full.

This is data tooling (``scripts/head_data.py``), not the serving runtime.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

PREFILL_CHUNK = 128
REPEAT_NGRAM = 16  # an answer repeats itself at a token that completes a 16-gram it already holds


def repeated(tokens, n: int = REPEAT_NGRAM) -> np.ndarray:
    """For every token: whether it completes an n-gram that occurred earlier in ``tokens`` (a context drafter's
    territory: an n-gram match proposes it)."""
    run, so_far = RepeatRun(n), []
    out = np.zeros(len(tokens), dtype=bool)
    for r, t in enumerate(tokens):
        so_far.append(int(t))
        out[r] = run.add(so_far) > 0
    return out


class RepeatRun:
    """How many tokens in a row an answer has spent repeating itself: a token that completes an n-gram the
    answer already holds extends the run, any other token ends it.  The demo verifier (135M) often falls into
    a loop and stays there until ``max_new_tokens``: in its head data a third of the answer tokens complete a
    16-gram their answer already held -- text a context drafter copies anyway, and generation time that buys
    the head nothing new."""

    def __init__(self, n: int = REPEAT_NGRAM):
        self.n, self.seen, self.run = n, set(), 0

    def add(self, answer: list[int]) -> int:
        """The run after ``answer``'s newest token (``answer``: the whole answer so far)."""
        if len(answer) >= self.n:
            gram = tuple(answer[-self.n:])
            self.run = self.run + 1 if gram in self.seen else 0
            self.seen.add(gram)
        return self.run


def export_batch_graph(verifier: Path, out: Path, max_context: int, feature_layers: tuple[int, ...],
                       top_k: int = 8) -> Path:
    """Write the verifier's batched in-place graph (with the features a head reads and each row's top-k) to
    ``out`` once."""
    path = out / f"target-batch-top{top_k}.onnx"
    if path.is_file():
        return path
    import onnx
    import torch
    from specrt.export import gqa_graph
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
    graph = gqa_graph.build(model, max_context, feature_layers=feature_layers, batch=True, top_k=top_k)
    tmp = out / "target-batch.partial.onnx"
    onnx.save(graph, tmp, save_as_external_data=True, location=f"{path.name}.data")
    tmp.replace(path)
    return path


class BatchedTarget:
    """The batched graph with ``slots`` preallocated cache slots of ``max_context`` entries."""

    def __init__(self, path: Path, slots: int, num_layers: int, kv_heads: int, head_dim: int, max_context: int,
                 threads: int | None = None):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.slots, self.max_context, self.num_layers = slots, max_context, num_layers
        shape = (slots, kv_heads, max_context, head_dim)
        self.keys = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.values = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.outputs = [o.name for o in self.session.get_outputs() if not o.name.startswith("present_")]
        self.has_features = "hidden_states" in self.outputs
        self.has_top = "top_ids" in self.outputs
        self._all = self._binding(slice(0, slots))
        self._one = [self._binding(slice(s, s + 1)) for s in range(slots)]
        self._from = np.zeros(1, np.int64)

    def _binding(self, rows: slice):
        b = self.session.io_binding()
        for i in range(self.num_layers):
            for kind, bufs in (("key", self.keys), ("value", self.values)):
                v = ort.OrtValue.ortvalue_from_numpy(bufs[i][rows])  # a contiguous view: written in place
                b.bind_ortvalue_input(f"cache_{kind}.{i}", v)
                b.bind_ortvalue_output(f"present_{kind}.{i}", v)
        return b

    def _run(self, b, ids: np.ndarray, past: np.ndarray, logits_from: int) -> dict[str, np.ndarray]:
        self._from[0] = logits_from
        b.bind_cpu_input("input_ids", ids)
        b.bind_cpu_input("past_length", past)
        b.bind_cpu_input("logits_from", self._from)
        for name in self.outputs:
            b.bind_output(name)
        self.session.run_with_iobinding(b)
        out = b.get_outputs()  # in binding order: the caches, then ours
        return {name: v.numpy() for name, v in zip(self.outputs, out[-len(self.outputs):])}

    def extend(self, slot: int, ids: np.ndarray, pos: int, rows_from: int | None = None) -> dict[str, np.ndarray]:
        """Run ``ids`` at [pos, ...) in ``slot`` alone, in chunks; return the outputs (logits [rows, vocab],
        hidden_states, top_ids, top_logp) of the rows from ``rows_from`` (offset into ids; default: the last row
        only) to the end."""
        rows_from = len(ids) - 1 if rows_from is None else rows_from
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = np.asarray(ids[start:start + PREFILL_CHUNK], np.int64)[None]
            first = max(0, rows_from - start)  # rows of this chunk whose logits are wanted
            if first >= chunk.shape[1]:
                # the LM head on one row only; nothing of this chunk is kept
                self._run(self._one[slot], chunk, np.array([pos + start], np.int64), chunk.shape[1] - 1)
                continue
            out = self._run(self._one[slot], chunk, np.array([pos + start], np.int64), first)
            for name, value in out.items():  # hidden_states has every row of the chunk, the others rows first..
                parts[name].append(value[0, first:] if name == "hidden_states" else value[0])
        return {name: np.concatenate(v) for name, v in parts.items() if v}

    def decode(self, ids: np.ndarray, past: np.ndarray) -> dict[str, np.ndarray]:
        """One token per slot: ids [slots], past [slots] -> each output's row per slot ([slots, ...])."""
        return {name: v[:, 0] for name, v in self._run(self._all, ids.reshape(-1, 1), past, 0).items()}


def log_softmax_top(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids (descending) and their log-probabilities of each row of ``logits`` [n, vocab]."""
    idx = np.argpartition(logits, -k, axis=-1)[:, -k:]
    vals = np.take_along_axis(logits, idx, -1)
    order = np.argsort(-vals, axis=-1)
    idx, vals = np.take_along_axis(idx, order, -1), np.take_along_axis(vals, order, -1)
    m = logits.max(-1, keepdims=True)
    lse = m + np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return idx.astype(np.int32), (vals - lse).astype(np.float32)


@dataclass
class Job:
    """One conversation: its turns' prompt ids are produced by ``next_turn`` (given the ids so far)."""
    key: str
    first_ids: list[int]
    follow_ups: list[list[int]] = field(default_factory=list)  # token ids appended before each later turn
    temperature: float = 0.0  # 0: greedy
    keep_from: int = 0  # record rows (features, top-k) from this offset of first_ids on
    meta: dict = field(default_factory=dict)


@dataclass
class Done:
    job: Job
    ids: list[int]  # the recorded tokens: first_ids[keep_from:], answers, follow-ups
    roles: list[int]  # 1 where the verifier wrote the token
    answers: list[list[int]]
    features: np.ndarray | None  # [len(ids), F] float16 (the last row zero: never read)
    top_ids: np.ndarray | None  # [len(ids), k]
    top_logp: np.ndarray | None
    looped: bool = False  # the last answer was ended where it had repeated itself (``stop_repeats``)


class _Slot:
    def __init__(self, job: Job):
        self.job, self.turn, self.answers = job, 0, [[]]
        self.ids = list(job.first_ids[job.keep_from:])
        self.roles = [0] * len(self.ids)
        self.feats: list[np.ndarray] = []
        self.tops: list[np.ndarray] = []
        self.logps: list[np.ndarray] = []
        self.length = 0  # cache entries
        self.repeats = RepeatRun()  # of the answer being written
        self.looped = False


def generate(target: BatchedTarget, jobs: Iterable[Job], max_new_tokens: int, eos: set[int],
             turn_end: int | None = None, top_k: int = 8, record: bool = True, seed: int = 0,
             progress: Callable[[int], None] | None = None, stop_repeats: int = 0) -> Iterator[Done]:
    """Greedy (or sampled, per job) answers of every job, ``target.slots`` at a time; yields each finished job.
    A job's follow-up turns (token ids after ``turn_end``, the end of an assistant turn) run in its slot after
    its answer ends with ``turn_end``; jobs too long for a slot are skipped.

    ``record``: keep each recorded row's features and the verifier's top-k log-probabilities (the head's
    training targets); the prompt rows before ``keep_from`` are run but not kept.

    ``stop_repeats``: end an answer (and its conversation) once its last this-many tokens each completed a
    ``REPEAT_NGRAM``-gram it already held (0: never) -- a loop's first rounds are kept, the rest not written."""
    rng = np.random.default_rng(seed)
    queue = iter(jobs)
    slots: list[_Slot | None] = [None] * target.slots
    last = np.zeros(target.slots, np.int64)
    past = np.zeros(target.slots, np.int64)

    def record_rows(s: _Slot, out: dict[str, np.ndarray], rows: slice = slice(None)):
        if record:
            if "top_ids" in out:  # computed in the graph
                t, lp = out["top_ids"][rows].astype(np.int32), out["top_logp"][rows]
            else:
                t, lp = log_softmax_top(out["logits"][rows], top_k)
            s.tops.append(t)
            s.logps.append(lp)
            if "hidden_states" in out:
                s.feats.append(out["hidden_states"][rows].astype(np.float16))

    def choose(s: _Slot, logits_row: np.ndarray) -> int:
        if s.job.temperature <= 0:
            return int(logits_row.argmax())
        z = logits_row / s.job.temperature
        p = np.exp(z - z.max())
        cdf = np.cumsum(p, dtype=np.float64)  # inverse-CDF sampling: a uniform per token, no vocab of Gumbels
        return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(p) - 1))

    def start(i: int) -> bool:
        """Give slot i the next job and prefill it; False when there is none."""
        for job in queue:
            if len(job.first_ids) + max_new_tokens >= target.max_context:
                continue  # too long for a slot: skipped (the caller counts what came back)
            s = _Slot(job)
            prompt = job.first_ids
            if len(prompt) > 1:
                out = target.extend(i, np.asarray(prompt[:-1], np.int64), 0, rows_from=job.keep_from)
                if job.keep_from < len(prompt) - 1:
                    record_rows(s, out)
            s.length = len(prompt) - 1
            slots[i] = s
            last[i], past[i] = prompt[-1], s.length
            return True
        slots[i] = None
        last[i], past[i] = 0, 0
        return False

    def finish(i: int) -> Done:
        s = slots[i]
        feats = tops = logps = None
        if record:
            n = len(s.ids)
            tops = np.concatenate(s.tops + [np.zeros((n - sum(len(t) for t in s.tops), top_k), np.int32)])
            logps = np.concatenate(s.logps + [np.full((n - sum(len(t) for t in s.logps), top_k), -30, np.float32)])
            if s.feats:
                width = s.feats[0].shape[1]
                feats = np.concatenate(s.feats + [np.zeros((n - sum(len(f) for f in s.feats), width), np.float16)])
        return Done(s.job, s.ids, s.roles, s.answers, feats, tops, logps.astype(np.float16) if logps is not None
                    else None, s.looped)

    for i in range(target.slots):
        start(i)
    while any(s is not None for s in slots):
        out = target.decode(last, past)
        logits = out["logits"]
        if progress:
            progress(sum(s is not None for s in slots))
        for i, s in enumerate(slots):
            if s is None:
                continue
            s.length += 1  # `last` is now in the cache
            record_rows(s, out, slice(i, i + 1))  # the pending token's row
            nxt = choose(s, logits[i])
            s.answers[-1].append(nxt)
            s.ids.append(nxt)
            s.roles.append(1)
            s.looped = stop_repeats > 0 and s.repeats.add(s.answers[-1]) >= stop_repeats
            ended = nxt in eos or len(s.answers[-1]) >= max_new_tokens or s.looped
            if nxt == turn_end and not s.looped and s.turn < len(s.job.follow_ups) and \
                    s.length + 1 + len(s.job.follow_ups[s.turn]) + max_new_tokens < target.max_context:
                # the next user turn, in this slot after the answer (an answer cut at max_new_tokens ends the
                # conversation: its turn was never closed)
                follow = [nxt, *s.job.follow_ups[s.turn]]
                record_rows(s, target.extend(i, np.asarray(follow[:-1], np.int64), s.length, rows_from=0))
                s.length += len(follow) - 1
                s.ids.extend(follow[1:])
                s.roles.extend([0] * (len(follow) - 1))
                s.turn += 1
                s.answers.append([])
                s.repeats = RepeatRun()
                last[i], past[i] = follow[-1], s.length
                continue
            if ended:
                yield finish(i)
                start(i)
                continue
            last[i], past[i] = nxt, s.length


def replay(target: BatchedTarget, job: Job, answers: list[list[int]], top_k: int = 8,
           looped: bool = False) -> Done | None:
    """What ``generate`` records for ``job`` had it written ``answers`` (token ids kept from an earlier run):
    the same rows -- prompt from ``keep_from``, answers, follow-up turns -- by one teacher-forced pass over the
    whole conversation in slot 0, at prefill speed instead of one pass per token.  The features come from
    another pass shape than decoding's, so they match it to float rounding, not bit for bit.  None when the
    conversation does not fit a slot or has more answers than the job has turns.  ``looped``: the kept record
    says the generation cut the last answer at a loop (``Done.looped``), carried over for the data card."""
    if len(answers) > 1 + len(job.follow_ups):
        return None
    full, roles = list(job.first_ids), [0] * len(job.first_ids)
    for turn, answer in enumerate(answers):
        full += answer
        roles += [1] * len(answer)
        if turn + 1 < len(answers):
            follow = job.follow_ups[turn]
            full += follow
            roles += [0] * len(follow)
    if len(full) >= target.max_context or len(full) < 2:
        return None
    out = target.extend(0, np.asarray(full[:-1], np.int64), 0, rows_from=job.keep_from)
    if "top_ids" in out:
        tops, logps = out["top_ids"].astype(np.int32), out["top_logp"].astype(np.float32)
    else:
        tops, logps = log_softmax_top(out["logits"], top_k)
    n = len(full) - job.keep_from  # rows recorded; the last one (never run) stays zero, as in ``generate``
    feats = None
    if "hidden_states" in out:
        hidden = out["hidden_states"].astype(np.float16)
        feats = np.concatenate([hidden, np.zeros((n - len(hidden), hidden.shape[1]), np.float16)])
    tops = np.concatenate([tops, np.zeros((n - len(tops), top_k), np.int32)])
    logps = np.concatenate([logps, np.full((n - len(logps), top_k), -30, np.float32)]).astype(np.float16)
    return Done(job, full[job.keep_from:], roles[job.keep_from:], [list(a) for a in answers], feats, tops, logps,
                looped)


def check(target: BatchedTarget, prompts: list[list[int]], steps: int = 4) -> None:
    """Decoding in a batch scores each sequence exactly as decoding it alone (raises otherwise)."""
    alone = []
    for i, p in enumerate(prompts[:target.slots]):
        target.extend(i, np.asarray(p[:-1], np.int64), 0)
        alone.append(target.extend(i, np.asarray(p[-1:], np.int64), len(p) - 1)["logits"][-1].copy())
    n = min(len(prompts), target.slots)
    last = np.zeros(target.slots, np.int64)
    past = np.zeros(target.slots, np.int64)
    for i, p in enumerate(prompts[:n]):
        last[i], past[i] = p[-1], len(p) - 1
    lg = target.decode(last, past)["logits"]
    for i in range(n):
        if not np.array_equal(lg[i], alone[i]):
            raise AssertionError(f"slot {i}: a batched pass differs from the same sequence alone "
                                 f"(max |diff| {np.abs(lg[i] - alone[i]).max():.2e})")
