"""runtime/drafters/eagle.py + export/feature_head.py: a feature head that reads the target's own features.

The tiny head is trained for seconds on the target's greedy continuations of the prompts used here (tiny.py),
so its drafts are accepted often enough to exercise every path; elsewhere it is nearly a random draft.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import tiny
import torch
from specrt.runtime import Engine, EngineDirError
from specrt.runtime.backend import ModelStep
from specrt.runtime.sampling import SamplingParams, warp

PROMPTS = [[5], [17, 33, 2], list(range(40, 52)), [5, 17, 33], [100, 7, 7, 7, 250, 3, 9, 11]]


@pytest.fixture(scope="module")
def engine(engines):
    e = Engine.load(engines["eagle"])
    e.manifest = dataclasses.replace(e.manifest, eos_token_ids=frozenset())
    return e


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_export_verified_the_features_and_the_head(engines):
    m = json.loads((engines["eagle"] / "manifest.json").read_text())
    head, target = m["models"]["draft"], m["models"]["target"]
    assert head["kind"] == "feature-head" and target["features"]["layers"] == head["feature_head"]["layers"]
    v = head["verification"]
    assert max(x for key, x in v.items() if not key.endswith("argmax_equal")) < 1e-4 and v["head_real_argmax_equal"] == 1, v
    assert head["vocab_size"] == 256 and len(json.loads((engines["eagle"] / "draft_vocab.json").read_text())) == 256
    assert "quantization" not in head and "quantization" not in target  # draft_quant="fp32" (conftest)


def test_a_head_is_int4_by_default_with_its_drift_recorded_and_stays_lossless(engines, hf_target, tmp_path):
    """Export quantizes a head as asked (it once ignored --quant for heads) and by default to int4: a draft's
    numerics change only what is proposed.  The int4 head's drift from the PyTorch head is measured and recorded,
    and speculation with it still equals transformers."""
    from specrt.export import export_pair
    from specrt.export.pair import draft_default_quant

    assert draft_default_quant("fp32", "head") == "int4" and draft_default_quant("int8-rows", "head") == "int8-rows"
    assert draft_default_quant("fp32", None) == "fp32"
    eagle = json.loads((engines["eagle"] / "manifest.json").read_text())
    target_dir = hf_target.name_or_path
    export_pair(target_dir, None, tmp_path / "e", max_context=eagle["pair"]["max_context"], tolerance=1e-4,
                progress=False, draft_head=engines["eagle"].parent / "head")
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    q = m["models"]["draft"]["quantization"]
    assert q["bits"] == 4 and {"head_real", "head_own_step"} <= set(q["drift_vs_pytorch"])
    assert 0 <= q["drift_vs_pytorch"]["head_real_argmax_equal"] <= 1
    assert "draft.onnx.data" in m["files"] and "quantization" not in m["models"]["target"]
    e = Engine.load(tmp_path / "e")
    e.manifest = dataclasses.replace(e.manifest, eos_token_ids=frozenset())
    for prompt in PROMPTS:
        for drafter, nodes in (("eagle", 0), ("hybrid", 8)):
            r = e.generate(prompt, max_new_tokens=20, k=4, drafter=drafter, tree_nodes=nodes)
            assert r.token_ids == hf_greedy(hf_target, prompt, 20), (drafter, prompt)


@pytest.mark.parametrize("drafter", ["eagle", "hybrid"])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("policy", ["fixed", "adaptive"])
def test_greedy_equals_transformers(engine, hf_target, drafter, k, policy):
    accepted = 0
    for prompt in PROMPTS:
        r = engine.generate(prompt, max_new_tokens=30, k=k, drafter=drafter, policy=policy)
        assert r.token_ids == hf_greedy(hf_target, prompt, 30), (drafter, k, prompt)
        s = r.stats
        assert s.new_tokens == s.accepted + s.recovered + s.bonus == 30
        accepted += s.accepted
    assert accepted > 0


def test_the_head_drafts_the_text_it_learned(engine):
    r = engine.generate([5, 17, 33], max_new_tokens=30, k=2, drafter="eagle")
    assert r.stats.acceptance_rate > 0.3 and r.stats.tokens_per_step > 1.5


def exact_joint(hf, prompt, params):
    """P(t1, t2) of sampling two tokens from the target alone (top-k keeps the table small)."""
    with torch.no_grad():
        p1 = warp(hf(torch.tensor([prompt])).logits[0, -1].numpy(), params)
        joint = np.zeros((len(p1), len(p1)))
        for t1 in np.flatnonzero(p1):
            p2 = warp(hf(torch.tensor([prompt + [int(t1)]])).logits[0, -1].numpy(), params)
            joint[t1] = p1[t1] * p2
    return joint


def chi2_stat(engine, hf, params, n=3000, seed=0):
    prompt = [5, 17, 33]
    joint = exact_joint(hf, prompt, params)
    cells = np.argwhere(joint > 0)
    counts = {tuple(c): 0 for c in cells}
    for i in range(n):
        ids = engine.generate(prompt, max_new_tokens=2, k=2, drafter="eagle", temperature=params.temperature,
                              top_k=params.top_k, seed=seed + i).token_ids
        counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1
    assert sum(counts.values()) == n and len(counts) == len(cells), "a token outside the target's support appeared"
    stat = sum((counts[tuple(c)] - n * joint[tuple(c)]) ** 2 / (n * joint[tuple(c)]) for c in cells)
    df = len(cells) - 1
    critical = df * (1 - 2 / (9 * df) + 3.0902 * math.sqrt(2 / (9 * df))) ** 3  # alpha = 0.001
    return stat, critical


def test_sampling_follows_the_target(engine, hf_target):
    """The real head, end to end.  (Its q mapping has a powerful broken case in tests/test_sampling.py, with a
    head of controlled distributions: this memorised head is too sure of itself for a wrong q to show.)"""
    stat, critical = chi2_stat(engine, hf_target, SamplingParams(1.0, top_k=3))
    assert stat < critical, (stat, critical)


@pytest.mark.parametrize("ids", [[10**9] * 256, [0] + list(range(255))], ids=["out of range", "repeated"])
def test_a_tampered_draft_vocabulary_is_refused(engines, tmp_path, ids):
    from specrt.runtime.manifest import sha256_file

    d = tmp_path / "eagle"
    shutil.copytree(engines["eagle"], d)
    (d / "draft_vocab.json").write_text(json.dumps(ids))
    f = d / "draft_vocab.json"
    data = json.loads((d / "manifest.json").read_text())
    data["files"]["draft_vocab.json"] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    (d / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(EngineDirError, match="draft_vocab.json must be a list of 256 distinct target token ids"):
        Engine.load(d)


def test_a_pass_over_real_features_computes_the_last_rows_logits_alone(engine):
    """The head's graph takes ``logits_from``, as the target's: following the prompt or a commit, the drafter reads
    the last row's logits only, and the LM head over the draft vocabulary is half the head's work per row."""
    head = engine.default_sequence.draft
    assert head.spec.kv.logits_from
    fh = head.spec.feature_head
    n = 6
    inputs = {fh["hidden_input"]: np.zeros((1, n, fh["hidden_size"]), np.float32),
              fh["features_input"]: np.random.default_rng(0).standard_normal((1, n, fh["feature_size"]), np.float32),
              fh["select_input"]: np.ones(1, np.int64)}
    ids = np.arange(3, 3 + n)
    every = head.forward(ids, 0, inputs=inputs).copy()
    hidden = head.output(fh["hidden_output"]).copy()
    last = head.forward(ids, 0, inputs=inputs, last_only=True)
    assert len(every) == n and last.shape == (1, every.shape[1])
    np.testing.assert_allclose(last[0], every[-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(head.output(fh["hidden_output"]), hidden)  # every row's hidden state still out


def test_head_prompts_are_the_ones_tested():
    assert all(p in tiny.HEAD_PROMPTS for p in PROMPTS[:4])


class CountingHead(ModelStep):
    """A stand-in feature head fed target ids 100 + j: its logits favour draft id j + 1, then j + 2; counts calls and
    keeps each call's ids, position and features."""

    V = 16

    def __init__(self):
        self.spec = type("Spec", (), {"feature_head": {
            "hidden_input": "h", "features_input": "f", "select_input": "s", "hidden_output": "o",
            "hidden_size": 4, "feature_size": 6}})()
        self.max_context = 64
        self.calls = 0
        self.seen: list[tuple[list[int], int, np.ndarray | None]] = []

    def forward(self, ids, pos, *, tree=None, inputs=None, last_only=False):
        self.calls += 1
        features = (inputs or {}).get("f")
        self.seen.append((np.asarray(ids).tolist(), pos, None if features is None else features.copy()))
        ids = np.asarray(ids)[-1:] if last_only else np.asarray(ids)
        logits = np.full((len(ids), self.V), -10.0, np.float32)
        for r, t in enumerate(ids - 100):
            logits[r, (t + 1) % self.V], logits[r, (t + 2) % self.V], logits[r, (t + 3) % self.V] = 3.0, 2.0, -4.0
        return logits

    def output(self, name):
        return np.zeros((1, 4), np.float32)

    def set_length(self, n):
        pass


def test_a_head_tree_costs_its_chains_head_calls_and_no_more():
    """The head's tree: its greedy chain, with runners-up (probability >= MIN_BRANCH_P) as leaves beside each
    chain node -- taken from logits the chain computes anyway, so k - 1 head calls whatever the branching."""
    from specrt.runtime.drafters.eagle import EagleDrafter
    from specrt.runtime.drafters.model import MIN_BRANCH_P

    head = CountingHead()
    vocab_map = np.arange(100, 100 + CountingHead.V)  # draft index j is target id 100 + j
    d = EagleDrafter(head, vocab_map, target_vocab=200, max_k=8)
    d._logits, d.length = head.forward(np.array([100]), 0, inputs={})[0], 1  # as after begin(): proposal 1 is draft id 1
    head.calls = 0
    for k, nodes in ((4, 32), (1, 32), (4, 5)):
        head.calls = 0
        p = d.propose_tree(k, nodes, SamplingParams(), np.random.default_rng(0))
        assert head.calls == min(k, (nodes + 1) // 2) - 1, (k, nodes, head.calls)
        assert len(p) == min(2 * k, nodes)  # per depth: the chain's node and one runner-up (the third is too unlikely)
        chain = [i for i in range(len(p)) if i == 0 or p.parents[i] != p.parents[i - 1]]
        # the chain follows the head's first choices: 1, 2, 3, ... (draft ids), each the child of the one before
        assert [int(p.token_ids[i]) - 100 for i in chain] == list(range(1, len(chain) + 1))
        for i in range(len(p)):
            assert p.parents[i] < i and (p.parents[i] == -1 or p.scores[i] <= p.scores[p.parents[i]])
            if i not in chain:  # a leaf: the runner-up beside the chain node just before it
                assert p.parents[i] == p.parents[i - 1] and p.token_ids[i] == p.token_ids[i - 1] + 1
                assert not any(p.parents[j] == i for j in range(len(p)))
        probs = np.exp([3.0, 2.0, -4.0]) / (np.exp([3.0, 2.0, -4.0]).sum() + 13 * np.exp(-10.0))
        assert probs[2] < MIN_BRANCH_P < probs[1]


def test_the_head_runs_the_commits_kept_since_it_last_ran_in_one_pass_when_next_asked():
    """A commit is kept, not run: a hybrid's context match may draft the next steps, and a head pass costs little
    more for more rows.  The next proposal runs every kept commit in order, from the slot after the last real one,
    with each row's own features; then proposal 1 follows the last committed token."""
    from specrt.runtime.drafters.eagle import EagleDrafter

    head = CountingHead()
    d = EagleDrafter(head, np.arange(100, 100 + CountingHead.V), target_vocab=200, max_k=8)
    d._logits, d.length = head.forward(np.array([100]), 0, inputs={})[0], 1
    head.calls = 0
    features = np.arange(3 * 6, dtype=np.float32).reshape(3, 6)
    d.commit([101], 102, features[:2])  # the target's feature buffer is reused by its next pass: the head keeps a copy
    features[:2] = -1.0
    d.commit([], 104, np.arange(12, 18, dtype=np.float32)[None])
    assert head.calls == 0
    p = d.propose(2, SamplingParams(), np.random.default_rng(0))
    ids, pos, seen_features = head.seen[-2]  # the catch-up; then one call for proposal 2
    assert head.calls == 2 and ids == [101, 102, 104] and pos == 1 and d.length == 4
    assert seen_features[0].tolist() == np.arange(18, dtype=np.float32).reshape(3, 6).tolist()
    assert p.token_ids.tolist() == [105, 106]  # 104 -> draft id 5, then its own output's successor
    head.calls = 0
    d.propose_tree(1, 4, SamplingParams(), np.random.default_rng(0))
    assert head.calls == 0  # nothing kept since: proposal 1 comes from the logits already there
    d.commit([105], 106, features[:2])
    d.end()  # a generation that ends drops what it kept
    assert d._pending == [] and d._logits is None


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_hybrid_tree_takes_the_heads_chain_depth_deep_at_one_head_call_a_level_past_the_first(monkeypatch, depth):
    """``HEAD_DEPTH``: beside the context's matches, the head's greedy chain that deep with a runner-up beside each
    node; the first level is read from the logits of the last commit (no head call), each further level costs one."""
    from specrt.runtime import drafters
    from specrt.runtime.drafters import DrafterOptions, make_drafter

    monkeypatch.setattr(drafters, "HEAD_DEPTH", depth)
    head = CountingHead()
    head.spec.kind = "feature-head"
    d = make_drafter("hybrid", DrafterOptions(), head, vocab_map=np.arange(100, 100 + CountingHead.V),
                     target_vocab=200)
    d.context.begin(np.array([7, 8, 9]))  # nothing repeats: no context match
    d.model._logits, d.model.length = head.forward(np.array([100]), 0, inputs={})[0], 1
    head.calls = 0
    p = d.propose_tree(4, 32, SamplingParams(), np.random.default_rng(0))
    assert head.calls == depth - 1 and d.last_source == "eagle"
    chain_parents = [-1] + [2 * level for level in range(depth - 1)]  # chain node l sits at row 2l
    assert p.token_ids.tolist() == [t for level in range(depth) for t in (101 + level, 102 + level)]
    assert p.parents.tolist() == [q for parent in chain_parents for q in (parent, parent)]


@pytest.mark.parametrize("window", [1, 3, 11, None])
def test_a_head_following_the_prompts_last_slots_only_stays_lossless_and_still_drafts(engine, hf_target, window):
    """PROMPT_WINDOW: the head runs over the prompt's last slots only, at head positions counted from there (rotary
    attention depends on distances alone).  Its cache holds just those slots; output equals transformers."""
    from specrt.runtime import loop
    from specrt.runtime.drafters.eagle import EagleDrafter
    from specrt.runtime.policy import Fixed
    from specrt.runtime.stats import Stats

    prompt = PROMPTS[2]  # 12 tokens: 11 slots
    accepted = 0
    for k in (2, 4):
        seq = engine.default_sequence
        d = EagleDrafter(seq.draft, engine.draft_vocab, engine.manifest.target.vocab_size, max_k=8,
                         prompt_window=window)
        steps = list(loop.speculative(seq.target, d, np.array(prompt), Fixed(k), 30, SamplingParams(),
                                      np.random.default_rng(0), Stats()))
        assert [t for s in steps for t in s.token_ids] == hf_greedy(hf_target, prompt, 30), (window, k)
        accepted += sum(s.accepted for s in steps)
    assert accepted > 0
    d.begin(np.array(prompt), np.zeros((len(prompt) - 1, engine.draft_model.spec.feature_head["feature_size"]), np.float32))
    assert d.length == min(window or 11, 11)
