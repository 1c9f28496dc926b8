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
    assert max(head["verification"].values()) < 1e-4, head["verification"]
    assert head["vocab_size"] == 256 and len(json.loads((engines["eagle"] / "draft_vocab.json").read_text())) == 256


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


def test_head_prompts_are_the_ones_tested():
    assert all(p in tiny.HEAD_PROMPTS for p in PROMPTS[:4])
