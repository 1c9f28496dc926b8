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
