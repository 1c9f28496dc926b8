"""The batch form of the in-place graph (``gqa_graph.build(batch=True)``): one cache slot per sequence, each with
its own length.  A sequence scores the same in a batch as alone (bit for bit), and as transformers does."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tiny
import torch

pytestmark = pytest.mark.slow
MAX_CTX = 64


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    import onnx
    from specrt.export import gqa_graph
    from transformers import AutoModelForCausalLM

    ckpt = tiny.make_checkpoint(tmp_path_factory.mktemp("ckpt") / "t", init_std=0.2)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    path = tmp_path_factory.mktemp("g") / "batch.onnx"
    onnx.save(gqa_graph.build(model, MAX_CTX, feature_layers=(1,), batch=True), path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return model, ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(session, model, ids: np.ndarray, past: list[int], caches) -> tuple[np.ndarray, np.ndarray]:
    """One pass over ``ids`` [B, n] with each sequence's ``past``; ``caches`` [layers][2] arrays [B, ...]."""
    feeds = {"input_ids": ids.astype(np.int64), "past_length": np.asarray(past, np.int64),
             "logits_from": np.zeros(1, np.int64)}
    b = session.io_binding()
    for name, value in feeds.items():
        b.bind_cpu_input(name, value)
    for i, (k, v) in enumerate(caches):
        for kind, buf in (("key", k), ("value", v)):
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            b.bind_ortvalue_input(f"cache_{kind}.{i}", value)
            b.bind_ortvalue_output(f"present_{kind}.{i}", value)
    b.bind_output("logits")
    b.bind_output("hidden_states")
    session.run_with_iobinding(b)
    out = b.get_outputs()
    return out[-2].numpy(), out[-1].numpy()


def _caches(model, batch: int):
    cfg = model.config
    shape = (batch, cfg.num_key_value_heads, MAX_CTX, cfg.hidden_size // cfg.num_attention_heads)
    return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(cfg.num_hidden_layers)]


def test_batched_decoding_scores_each_sequence_as_alone(graph):
    model, session = graph
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, tiny.VOCAB, n) for n in (5, 23, 11)]
    alone = []
    for p in prompts:
        caches = _caches(model, 1)
        _run(session, model, p[None, :-1], [0], caches)
        alone.append(_run(session, model, p[None, -1:], [len(p) - 1], caches)[0][0, -1])
        with torch.no_grad():
            ref = model(torch.tensor(p[None])).logits[0, -1].numpy()
        np.testing.assert_allclose(alone[-1], ref, atol=1e-4)
    caches = _caches(model, len(prompts))
    for b, p in enumerate(prompts):  # each prompt prefilled alone over its slot: a contiguous view
        _run(session, model, p[None, :-1], [0], [(k[b:b + 1], v[b:b + 1]) for k, v in caches])
    logits, hidden = _run(session, model, np.array([[p[-1]] for p in prompts]), [len(p) - 1 for p in prompts],
                          caches)
    assert logits.shape == (3, 1, tiny.VOCAB) and hidden.shape[:2] == (3, 1)
    for b in range(len(prompts)):
        np.testing.assert_array_equal(logits[b, 0], alone[b])


def test_batch_graph_has_no_tree_form():
    from specrt.export import gqa_graph

    with pytest.raises(ValueError, match="chain passes only"):
        gqa_graph.build(object(), MAX_CTX, tree=True, batch=True)


def test_replay_records_what_generation_recorded(tmp_path):
    """``scripts/batch_gen.replay`` (the head data rebuilt from kept token ids by one teacher-forced pass) records
    the rows ``generate`` recorded while writing the same answers: same tokens and roles, same top-k, features to
    float rounding -- a two-turn conversation, the prompt kept from an offset."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import batch_gen

    ckpt = tiny.make_checkpoint(tmp_path / "t", init_std=0.2)
    cfg = json.loads((ckpt / "config.json").read_text())
    path = batch_gen.export_batch_graph(ckpt, tmp_path, MAX_CTX, (1,), top_k=4)
    target = batch_gen.BatchedTarget(path, 2, cfg["num_hidden_layers"], cfg["num_key_value_heads"],
                                     cfg["hidden_size"] // cfg["num_attention_heads"], MAX_CTX, 1)
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in rng.integers(3, tiny.VOCAB, 12)]
    follow = [int(t) for t in rng.integers(3, tiny.VOCAB, 5)]
    probe = next(batch_gen.generate(target, [batch_gen.Job("probe", prompt)], 8, set(), top_k=4))
    turn_end = probe.answers[0][2]  # the greedy answer's third token ends its first turn
    job = batch_gen.Job("c", prompt, [follow], keep_from=4)
    written = next(batch_gen.generate(target, [job], 8, {turn_end}, turn_end=turn_end, top_k=4))
    assert len(written.answers) == 2 and written.answers[0][-1] == turn_end
    replayed = batch_gen.replay(target, job, written.answers, top_k=4)
    assert replayed.ids == written.ids and replayed.roles == written.roles
    assert replayed.answers == written.answers
    np.testing.assert_array_equal(replayed.top_ids, written.top_ids)
    np.testing.assert_allclose(replayed.top_logp.astype(np.float32), written.top_logp.astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(replayed.features.astype(np.float32), written.features.astype(np.float32), atol=2e-3)
    assert batch_gen.replay(target, job, written.answers + [[5]], top_k=4) is None  # more answers than turns
