"""runtime/batch.py: several sequences in one target pass.  Every request's output is the one it gets alone -- and
transformers' own -- whatever shares its passes: mixed drafters, lengths, stop strings, a cancel, sampling."""
from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.slow
PROMPTS = [[5], [17, 33, 2], list(range(40, 52)), [100, 7, 7, 7, 250, 3, 9, 11, 60, 61, 62, 63, 64, 65, 66]]


@pytest.fixture(scope="module")
def batch_engines(tmp_path_factory, checkpoints):
    """The tiny pair with a batch graph: fp32 and int8-rows."""
    from specrt.export import export_pair

    root = tmp_path_factory.mktemp("batch")
    out = {}
    for name, quant in (("fp32", "fp32"), ("int8-rows", "int8-rows")):
        export_pair(checkpoints["target"], checkpoints["close"], root / name, max_context=64, tolerance=1e-4,
                    progress=False, quant=quant, draft_quant="fp32", batch=True)
        out[name] = root / name
    return out


def test_the_batch_graph_is_recorded_and_checked(batch_engines):
    from specrt.runtime.manifest import load_manifest

    for name, d in batch_engines.items():
        spec = load_manifest(d).target
        record = spec.raw["batch_graph"]
        assert (d / record["file"]).is_file() and spec.batch_graph.kv.tree is False
        assert record["verification"]["decode_batch_argmax_equal"] == 1.0, name
        if name == "fp32":
            assert record["verification"]["decode_batch"] < 1e-4


def requests():
    """Mixed drafters, lengths and stop strings, one request each."""
    return [(PROMPTS[0], {"max_new_tokens": 20, "drafter": "ngram", "k": 4}),
            (PROMPTS[1], {"max_new_tokens": 30, "drafter": "model", "k": 2}),
            (PROMPTS[2], {"max_new_tokens": 12, "use_draft": False}),
            (PROMPTS[3], {"max_new_tokens": 25, "drafter": "suffix", "k": 4, "policy": "adaptive"}),
            (PROMPTS[2], {"max_new_tokens": 18, "drafter": "ngram+recycle", "k": 8, "policy": "adaptive"}),
            (PROMPTS[1], {"max_new_tokens": 16, "temperature": 0.8, "seed": 3, "drafter": "ngram", "k": 4})]


@pytest.mark.parametrize("name", ["fp32"])
def test_every_request_gets_what_it_gets_alone(batch_engines, hf_target, name):
    """Six requests at once on four slots (two wait for a free one): each greedy output equals the same request run
    alone on the unbatched engine and transformers' own, and the scheduler did share passes."""
    import dataclasses

    from specrt.runtime import Engine
    from test_engine import hf_greedy

    alone = Engine.load(batch_engines[name])
    alone.manifest = dataclasses.replace(alone.manifest, eos_token_ids=frozenset())
    want = [alone.generate(p, reuse_prefix=False, **kw).token_ids for p, kw in requests()]
    engine = Engine.load(batch_engines[name], max_batch=4)
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    # the scheduler's choice follows pass costs timed at load, which a busy machine skews: solo steps made to look
    # slow, so whenever two sequences are ready they share a pass (one alone still speculates)
    engine.batcher.solo_costs = {n: 1.0 for n in engine.batcher.solo_costs}
    sequences = [engine.default_sequence] + [engine.sequence() for _ in range(3)]
    free = list(sequences)
    lock = threading.Lock()
    got: dict[int, list[int]] = {}

    def run(i, prompt, kw):
        with lock:
            seq = free.pop()
        try:
            got[i] = seq.generate(prompt, reuse_prefix=False, **kw).token_ids
        finally:
            with lock:
                free.append(seq)
    threads = []
    for i, (p, kw) in enumerate(requests()):
        while True:
            with lock:
                if free:
                    break
            threading.Event().wait(0.01)
        threads.append(threading.Thread(target=run, args=(i, p, kw)))
        threads[-1].start()
    for t in threads:
        t.join(timeout=300)
    # greedy: the same tokens; sampled: a sample of the same distribution, but which random numbers a token draws
    # depends on whether it came from a batched pass or a speculative step, so the same seed need not give the
    # same text (runtime/batch.py)
    greedy = [i for i, (_, kw) in enumerate(requests()) if kw.get("temperature", 0) == 0]
    assert [got[i] for i in greedy] == [want[i] for i in greedy]
    for i, (_, kw) in enumerate(requests()):
        if i not in greedy:
            assert len(got[i]) == kw["max_new_tokens"]
    assert engine.batcher.batched_passes > 0
    if name == "fp32":
        for (p, kw), ids in zip(requests(), want):
            if kw.get("temperature", 0) == 0:
                assert ids == hf_greedy(hf_target, p, kw["max_new_tokens"])


def test_a_stop_and_a_cancel_free_their_slot_and_lose_nothing(batch_engines):
    from specrt.runtime import Engine

    engine = Engine.load(batch_engines["fp32"], max_batch=2)
    a, b = engine.default_sequence, engine.sequence()
    ref = Engine.load(batch_engines["fp32"]).generate(PROMPTS[3], max_new_tokens=30, use_draft=False).token_ids
    stream = a.stream(PROMPTS[2], max_new_tokens=40, k=4)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("b", b.generate(PROMPTS[3], max_new_tokens=30,
                                                                         use_draft=False).token_ids))
    t.start()
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()  # a client that left: its slot takes the next request at once
    t.join(timeout=120)
    assert done["b"] == ref
    assert a.generate(PROMPTS[3], max_new_tokens=30, use_draft=False).token_ids == ref


def test_an_engine_without_a_batch_graph_says_how_to_get_one(engines):
    from specrt.runtime import Engine, EngineDirError

    with pytest.raises(EngineDirError, match="--batch"):
        Engine.load(engines["close"], max_batch=4)


def test_a_target_with_int8_activations_does_not_batch(batch_engines):
    """Alone its 1-token steps are 2-row passes, which a batched pass cannot be: batching would change answers
    (measured on the demo target), so loading it to batch is refused with what to do instead."""
    from specrt.runtime import Engine, GenerationError

    with pytest.raises(GenerationError, match="quantizes activations.*max_batch=1"):
        Engine.load(batch_engines["int8-rows"], max_batch=4)
    assert Engine.load(batch_engines["int8-rows"]).generate(PROMPTS[1], max_new_tokens=4).token_ids
