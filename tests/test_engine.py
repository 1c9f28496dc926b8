"""End-to-end losslessness: Engine.generate == transformers' generate(do_sample=False), token for token."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from specrt.runtime import Engine, GenerationError
from specrt.runtime.backend import ModelStep
from specrt.runtime.ort_backend import OrtModelStep

PROMPTS = [[5], [17, 33, 2], list(range(40, 52)), [100, 7, 7, 7, 250, 3, 9, 11, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69]]


class AdversarialDraft(ModelStep):
    """A draft that always proposes a token the target will reject: the target's choice + 1."""

    def __init__(self, inner: OrtModelStep):
        self.inner = inner

    max_context = property(lambda self: self.inner.max_context)
    vocab_size = property(lambda self: self.inner.vocab_size)
    length = property(lambda self: self.inner.length)
    spec = property(lambda self: self.inner.spec)

    def forward(self, token_ids, pos, *, tree=None, inputs=None, last_only=False):
        return np.roll(self.inner.forward(token_ids, pos), 1, axis=-1)

    def set_length(self, length):
        self.inner.set_length(length)

    def prefill(self, token_ids):
        return np.roll(self.inner.prefill(token_ids), 1)

    def extend(self, token_ids, pos):
        return np.roll(self.inner.extend(token_ids, pos), 1)


def hf_greedy(model, prompt, max_new_tokens, eos=None):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def loaded(engines):
    out = {name: Engine.load(path) for name, path in engines.items()}
    adversarial = Engine.load(engines["self"])
    seq = adversarial.default_sequence
    seq.draft = AdversarialDraft(seq.draft)
    out["adversarial"] = adversarial
    return out


@pytest.fixture(scope="module")
def references(hf_target):
    return {tuple(p): hf_greedy(hf_target, p, 30) for p in PROMPTS}


@pytest.mark.parametrize("draft", ["close", "random", "self", "adversarial", "close_concat", "close_bucketed"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_greedy_equals_transformers(loaded, references, draft, k):
    engine = loaded[draft]
    # the tiny target never picks EOS on these prompts; disable EOS so both sides run the full length
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    for prompt in PROMPTS:
        r = engine.generate(prompt, max_new_tokens=30, k=k)
        assert r.token_ids == references[tuple(prompt)], (draft, k, prompt)
        s = r.stats
        assert s.accepted <= s.proposed and s.new_tokens == s.accepted + s.recovered + s.bonus == 30
        if draft == "self":
            assert s.acceptance_rate == 1.0
        if draft == "adversarial":
            assert s.accepted == 0 and s.steps == 30
    if draft in ("close", "close_concat", "close_bucketed"):
        assert r.stats.tokens_per_step > 1.4  # the perturbed copy really is a useful draft


@pytest.mark.parametrize("engine_name", ["close", "close_concat", "close_bucketed", "target_only"])
@pytest.mark.parametrize("drafter", ["model", "ngram", "suffix", "hybrid", "recycle", "ngram+recycle"])
@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_every_drafter_greedy_equals_transformers(loaded, references, engine_name, drafter, policy):
    """Context drafters (and the hybrid) on every graph kind, and on an engine without a draft model."""
    engine = loaded[engine_name]
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    if engine.draft_model is None and drafter in ("model", "hybrid"):
        with pytest.raises(GenerationError, match="needs a draft model"):
            engine.generate(PROMPTS[0], max_new_tokens=5, drafter=drafter)
        return
    proposed = 0
    for k in (2, 8):
        for prompt in PROMPTS:
            r = engine.generate(prompt, max_new_tokens=30, k=k, drafter=drafter, policy=policy)
            assert r.token_ids == references[tuple(prompt)], (engine_name, drafter, k, prompt)
            assert r.stats.drafter == drafter and r.stats.new_tokens == r.stats.accepted + r.stats.recovered + \
                r.stats.bonus
            proposed += r.stats.proposed
    assert proposed > 0, "the drafter never proposed anything: the test would prove nothing"


@pytest.mark.parametrize("kernel", ["flash", "unfused"])
def test_greedy_equals_transformers_with_either_attention_kernel(engines, references, kernel):
    """GroupQueryAttention's flash and unfused kernels (``attention_kernel``): the prompt, the verification passes
    and target-only decoding all run the one chosen, so every drafter kind still gives transformers' tokens."""
    for name in ("close", "random", "self"):
        engine = Engine.load(engines[name], attention_kernel=kernel)
        assert engine.target_model.attention == kernel
        engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
        for prompt in PROMPTS:
            assert engine.generate(prompt, max_new_tokens=30, use_draft=False).token_ids == references[tuple(prompt)]
            for drafter, k in (("model", 4), ("ngram", 8)):
                r = engine.generate(prompt, max_new_tokens=30, k=k, drafter=drafter)
                assert r.token_ids == references[tuple(prompt)], (name, kernel, drafter, prompt)


@pytest.mark.product_defaults
def test_default_drafters_follow_spec_bench(loaded, engines):
    """Shipped defaults: context lookup on a draft-model engine, hybrid on a feature-head engine."""
    from specrt.runtime import Engine

    assert loaded["close"].default_drafter == "ngram"
    assert loaded["close"].defaults == {"drafter": "ngram", "k": 8, "policy": "adaptive", "tree_nodes": 0}
    assert loaded["close"].generate([5, 5, 5, 5], max_new_tokens=4, k=2).stats.drafter == "ngram"
    eagle = Engine.load(engines["eagle"])
    assert eagle.defaults == {"drafter": "hybrid", "k": 8, "policy": "adaptive", "tree_nodes": 32}
    plain = eagle.generate(PROMPTS[2], max_new_tokens=20, use_draft=False).token_ids
    r = eagle.generate(PROMPTS[2], max_new_tokens=20)  # nothing named: the head's hybrid tree, adaptive k
    assert r.token_ids == plain and r.stats.drafter == "hybrid" and r.stats.policy == "adaptive"
    assert loaded["target_only"].default_drafter == "ngram"


@pytest.mark.product_defaults
def test_what_a_request_names_overrides_the_defaults(loaded, engines):
    """A k without a policy caps the adaptive default; relaxed acceptance gets chains, not the default tree; a
    default k is one the engine compiled."""
    from specrt.runtime import Engine
    from specrt.runtime.engine import request_defaults
    from specrt.runtime.policy import make_policy
    from specrt.runtime.request import Request

    eagle = Engine.load(engines["eagle"])
    req = Request(k=2).with_defaults(eagle.defaults).validate(eagle.manifest.k_values)
    assert req.policy == "adaptive" and make_policy(req.policy, req.k, eagle.manifest.k_values).k_values == (1, 2)
    assert make_policy("adaptive", 3, (2, 4, 8)).k_values == (2,) and make_policy("adaptive", 1, (2, 4)).k_values == (2,)
    relaxed = Request(acceptance="relaxed", accept_tau=0.5).with_defaults(eagle.defaults)
    assert relaxed.tree_nodes == 0 and relaxed.validate(eagle.manifest.k_values).drafter == "hybrid"
    m = loaded["close"].manifest
    assert request_defaults(dataclasses.replace(m, k_values=(1, 2, 4, 16)))["k"] == 4
    assert request_defaults(dataclasses.replace(m, k_values=(16,)))["k"] == 16


def test_target_only_engine_defaults_to_ngram(loaded):
    engine = loaded["target_only"]
    assert engine.draft_model is None and engine.default_drafter == "ngram" and engine.drafters == ("ngram", "suffix", "recycle",
                                                                                         "ngram+recycle")
    assert loaded["close"].drafters == ("model", "ngram", "suffix", "hybrid", "recycle", "ngram+recycle")
    assert engine.generate([5, 5, 5, 5], max_new_tokens=4).stats.drafter == "ngram"


@pytest.mark.parametrize("draft", ["close", "random"])
def test_eos_cuts_inside_an_accepted_run(loaded, hf_target, draft):
    engine = loaded[draft]
    prompt = PROMPTS[2]
    free_run = hf_greedy(hf_target, prompt, 30)
    eos = free_run[11]  # pretend the 12th token is EOS: it can arrive in the middle of an accepted run
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset({eos}))
    expected = hf_greedy(hf_target, prompt, 30, eos=eos)
    for k in (2, 4, 8):
        r = engine.generate(prompt, max_new_tokens=30, k=k)
        assert r.token_ids == expected and r.token_ids[-1] == eos and r.stats.stop_reason == "eos"
        assert r.stats.new_tokens == r.stats.accepted + r.stats.recovered + r.stats.bonus


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("name", ["close", "close_concat", "close_bucketed"])
def test_runs_to_max_context(loaded, hf_target, k, name):
    engine = loaded[name]
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    prompt = PROMPTS[3]
    r = engine.generate(prompt, max_new_tokens=500, k=k)
    assert len(prompt) + len(r.token_ids) == engine.max_context
    assert r.stats.stop_reason == "max_context"
    assert r.token_ids == hf_greedy(hf_target, prompt, engine.max_context - len(prompt))


def test_target_only_equals_transformers(loaded, references):
    engine = loaded["random"]
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    for prompt in PROMPTS:
        assert engine.generate(prompt, max_new_tokens=30, use_draft=False).token_ids == references[tuple(prompt)]


def test_stream_yields_the_same_text(loaded):
    engine = loaded["close"]
    stream = engine.stream("def add(a, b):", max_new_tokens=20, k=4)
    pieces = [c.text for c in stream]
    assert "".join(pieces) == stream.result.text
    assert stream.result.text == engine.decode(stream.result.token_ids) or len(stream.result.text) > 0


def test_stop_string_cuts_text_and_tokens(loaded):
    engine = loaded["close"]
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    full = engine.generate("def add(a, b):", max_new_tokens=30, k=4)
    stop = full.text[5:8]
    assert stop
    cut = engine.generate("def add(a, b):", max_new_tokens=30, k=4, stop=[stop])
    assert cut.stats.stop_reason == "stop_string"
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < len(full.token_ids)


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 3}, "compiled k values"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"stop": "x"}, "stop"),
])
def test_invalid_requests(loaded, kwargs, match):
    with pytest.raises(GenerationError, match=match):
        loaded["close"].generate([1, 2, 3], **kwargs)


def test_prompt_longer_than_context(loaded):
    engine = loaded["close"]
    with pytest.raises(GenerationError, match="max context is 64.*--max-context"):
        engine.generate(list(range(1, 65)), max_new_tokens=4)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.generate([1, 10_000], max_new_tokens=4)
    # the engine is still usable afterwards
    assert len(engine.generate([1, 2], max_new_tokens=4, k=2).token_ids) >= 1


def test_sampling_first_token_follows_target(loaded, hf_target):
    """Speculative sampling with a random draft: the first token's distribution is the target's softmax
    computed by transformers (temperature 1)."""
    engine = loaded["random"]
    prompt = [17, 33, 2]
    with torch.no_grad():
        p = torch.softmax(hf_target(torch.tensor([prompt])).logits[0, -1].double() / 1.5, -1).numpy()
    n = 1500
    rng = np.random.default_rng(0)
    counts = np.zeros_like(p)
    for _ in range(n):
        r = engine.generate(prompt, max_new_tokens=2, k=2, temperature=1.5, seed=int(rng.integers(1 << 31)))
        counts[r.token_ids[0]] += 1
    tv = 0.5 * np.abs(counts / n - p).sum()
    noise = 0.5 * np.sqrt(p * (1 - p) / n).sum() * 2.5  # a generous bound on sampling noise
    assert tv < max(noise, 0.05), (tv, noise)


def test_padded_one_token_steps_keep_the_cache_right(engines, references, tmp_path):
    """min_rows = 2 (a target whose 1-token passes compute differently): every 1-token target step
    runs as a 2-token pass; the dummy row's KV lands past the valid length and must never leak."""
    import json
    import shutil

    d = tmp_path / "padded"
    shutil.copytree(engines["close"], d)
    data = json.loads((d / "manifest.json").read_text())
    data["models"]["target"]["batch_invariance"] = {"single_vs_multi": 0.5, "multi_vs_multi": 0.0, "min_rows": 2}
    (d / "manifest.json").write_text(json.dumps(data))
    engine = Engine.load(d)
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    target = engine.default_sequence.target
    assert target.max_context == engine.max_context == 63
    widths = []
    run = target._run
    target._run = lambda ids, pos, inputs=None, last_only=False, binding=None: (
        widths.append(len(ids)), run(ids, pos, inputs, last_only, binding))[1]
    for prompt in PROMPTS:
        assert engine.generate(prompt, max_new_tokens=30, use_draft=False).token_ids == references[tuple(prompt)]
        for k in (1, 4):
            assert engine.generate(prompt, max_new_tokens=30, k=k).token_ids == references[tuple(prompt)]
    assert min(widths) == 2  # no 1-row target pass ran
    r = engine.generate(PROMPTS[3], max_new_tokens=500, k=4)  # up to the (one smaller) context limit
    assert len(PROMPTS[3]) + len(r.token_ids) == 63 and r.stats.stop_reason == "max_context"


def test_a_next_turn_prefills_only_its_new_tokens_and_answers_as_afresh(loaded, hf_target):
    """Prefix reuse: a prompt that starts with this sequence's previous prompt and answer runs only the rest; the
    answer is the one a fresh prefill gives (fp32: the reused KV differ from a fresh prefill's by rounding only),
    and transformers' own; a prompt that diverges reuses the common part only; a request may opt out."""
    engine = loaded["close"]
    seq = engine.sequence()
    first = seq.generate(PROMPTS[2], max_new_tokens=12, k=4)
    assert first.stats.reused_tokens == 0
    turn2 = PROMPTS[2] + first.token_ids + [7, 8, 9]
    reused = seq.generate(turn2, max_new_tokens=12, k=4)
    # the cache held the prompt and every emitted token but the last (pending: never run by the target)
    assert reused.stats.reused_tokens == len(PROMPTS[2]) + len(first.token_ids) - 1
    fresh = engine.sequence().generate(turn2, max_new_tokens=12, k=4, reuse_prefix=False)
    assert fresh.stats.reused_tokens == 0 and reused.token_ids == fresh.token_ids == hf_greedy(hf_target, turn2, 12)
    diverged = turn2[:5] + [300, 301]
    assert seq.generate(diverged, max_new_tokens=4, use_draft=False).stats.reused_tokens == 5
    assert seq.generate(diverged, max_new_tokens=4, reuse_prefix=False).stats.reused_tokens == 0


def test_reuse_follows_what_the_cache_holds_after_a_stop_or_a_cancel(loaded):
    engine = loaded["close"]
    seq = engine.sequence()
    full = seq.generate(PROMPTS[3], max_new_tokens=20, use_draft=False).token_ids
    stream = seq.stream(PROMPTS[3], max_new_tokens=20, k=4, reuse_prefix=False)
    for i, _ in enumerate(stream):
        if i == 1:
            break
    stream.close()  # cancelled after two passes: the cache holds the prompt and what those passes kept
    kept = len(stream.result.token_ids)
    again = seq.generate(PROMPTS[3] + full, max_new_tokens=2, use_draft=False)
    assert len(PROMPTS[3]) - 1 <= again.stats.reused_tokens <= len(PROMPTS[3]) + kept


def test_a_feature_head_prefills_afresh(loaded, engines):
    engine = Engine.load(engines["eagle"])
    first = engine.generate(PROMPTS[2], max_new_tokens=6, drafter="eagle", k=2)
    second = engine.generate(PROMPTS[2] + first.token_ids, max_new_tokens=6, drafter="eagle", k=2)
    assert second.stats.reused_tokens == 0  # it needs the target's features of the whole prompt
    assert engine.generate(PROMPTS[2] + first.token_ids, max_new_tokens=6, use_draft=False).stats.reused_tokens > 0
