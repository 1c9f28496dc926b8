"""Tree speculation end to end: greedy equals transformers' generate() for every family whose graph takes
tree passes (Llama, Qwen2, Mistral), with random, perturbed and self drafts and every drafter; sampling with
trees follows the target's distribution through the real loop."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tiny
import torch
from specrt.runtime import Engine
from specrt.runtime import loop as loop_mod
from specrt.runtime import verify as verify_mod
from specrt.runtime.backend import ModelStep
from specrt.runtime.drafters.base import Drafter, Proposal
from specrt.runtime.policy import Fixed
from specrt.runtime.sampling import SamplingParams, warp
from specrt.runtime.stats import Stats

PROMPTS = [[5], [17, 33, 2], list(range(40, 52)), [100, 7, 7, 7, 250, 3, 9, 11, 60, 61, 62, 63]]


def flat_pass_costs(engine: Engine) -> None:
    """Rows nearly free, so pruning keeps the trees: the measured costs of a tiny model on a shared machine
    would make whether a test sees any tree pass depend on timing."""
    engine._pass_costs, engine._pass_costs_rows = {n: 1.0 + 0.001 * n for n in range(1, 65)}, 64


@pytest.fixture(scope="module")
def family_engines(tmp_path_factory, tokenizer, engines, checkpoints):
    """{(family, draft): engine dir} for Qwen2 and Mistral (Llama's come from conftest)."""
    import transformers as T
    from specrt.export import export_pair

    root = tmp_path_factory.mktemp("families")
    out = {("llama", "perturbed"): engines["close"], ("llama", "random"): engines["random"],
           ("llama", "self"): engines["self"]}
    refs = {"llama": checkpoints["target"]}
    for family in ("qwen2", "mistral"):
        target = tiny.make_checkpoint(root / f"{family}-target", family, seed=1, init_std=0.2, tokenizer=tokenizer)
        model = T.AutoModelForCausalLM.from_pretrained(target)
        torch.manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05 * p.std())
        perturbed = root / f"{family}-perturbed"
        model.save_pretrained(perturbed)
        tokenizer.save_pretrained(perturbed)
        random = tiny.make_checkpoint(root / f"{family}-random", family, seed=2, layers=1, tokenizer=tokenizer)
        for name, draft in (("perturbed", perturbed), ("random", random), ("self", target)):
            export_pair(target, draft, root / f"engine-{family}-{name}", max_context=64, tolerance=1e-4,
                        progress=False)
            out[(family, name)] = root / f"engine-{family}-{name}"
        refs[family] = target
    return out, refs


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("draft", ["perturbed", "random", "self"])
def test_greedy_trees_equal_transformers(family_engines, family, draft):
    import transformers as T

    dirs, refs = family_engines
    engine = Engine.load(dirs[(family, draft)])
    flat_pass_costs(engine)
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    assert engine.supports_tree and engine.default_sequence.target.supports_tree
    hf = T.AutoModelForCausalLM.from_pretrained(refs[family]).eval()
    tree_passes = 0
    for prompt in PROMPTS:
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
        for drafter in ("model", "ngram", "suffix", "hybrid", "recycle", "ngram+recycle"):
            for nodes in (4, 12):
                r = engine.generate(prompt, max_new_tokens=30, k=4, drafter=drafter, tree_nodes=nodes)
                assert r.token_ids == want, (family, draft, drafter, nodes, prompt)
                assert r.stats.new_tokens == r.stats.accepted + r.stats.recovered + r.stats.bonus
                tree_passes += r.stats.tree_passes
    assert tree_passes > 0, "no pass verified a tree: the test would prove nothing"


def test_greedy_trees_with_the_feature_head(engines, hf_target):
    engine = Engine.load(engines["eagle"])
    flat_pass_costs(engine)
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    for prompt in PROMPTS + [[5, 17, 33]]:
        with torch.no_grad():
            want = hf_target.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False,
                                      pad_token_id=0)[0, len(prompt):].tolist()
        for drafter in ("eagle", "hybrid"):
            r = engine.generate(prompt, max_new_tokens=30, k=4, drafter=drafter, tree_nodes=8)
            assert r.token_ids == want, (drafter, prompt)


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_trees_run_to_the_max_context(engines, drafter):
    """Near the end of the context a tree may hold only as many nodes as slots are left; it stops cleanly."""
    engine = Engine.load(engines["self"])
    flat_pass_costs(engine)
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    prompt = [5, 7, 1, 2, 3, 5, 7, 4, 8, 9, 5, 7, 11, 12, 13] * 2 + [5, 7]  # "5 7" has three continuations: a tree
    want = engine.generate(prompt, max_new_tokens=500, use_draft=False)
    r = engine.generate(prompt, max_new_tokens=500, k=8, drafter=drafter, tree_nodes=16)
    assert r.token_ids == want.token_ids and r.stats.stop_reason == want.stats.stop_reason == "max_context"
    assert r.stats.tree_passes > 0


def test_pruning_reads_this_engines_pass_costs(engines):
    engine = Engine.load(engines["close"])
    costs = engine.pass_costs(9)
    assert sorted(costs) == list(range(1, 10)) and all(c > 0 for c in costs.values())
    assert engine.pass_costs(5) is costs  # measured once, for every sequence
    # a wide tree's costs come from a few row counts, interpolated: a first tree request does not wait for 3 x 33 passes
    wide = Engine.load(engines["close"])
    probes, probe = [], wide._probe_step
    wide._probe_step = lambda: probes.append(probe()) or probes[-1]
    costs = wide.pass_costs(33)
    rows = len(costs)  # 33, or what the context leaves (the tiny engines': 64 - 32 - 1)
    assert rows >= 24 and sorted(costs) == list(range(1, rows + 1)) and sum(p.calls for p in probes) <= 3 * 11 + 1
    assert all(costs[n] > 0 for n in costs)


# ---- sampling through the loop, with a target that takes tree passes ---------------------------------------
V = 4
P = np.array([[0.50, 0.30, 0.15, 0.05], [0.10, 0.60, 0.20, 0.10], [0.25, 0.25, 0.25, 0.25], [0.05, 0.15, 0.30, 0.50]])


class MarkovTreeStep(ModelStep):
    """First-order Markov target: a row's logits depend only on the row's own token, so a tree pass is right
    whatever the positions and masks; ``keep`` keeps only the bookkeeping."""

    supports_tree = True

    def __init__(self):
        self.max_context, self.vocab_size, self.length = 32, V, 0
        self.trees = 0

    def forward(self, token_ids, pos, *, tree=None, inputs=None, last_only=False):
        self.trees += tree is not None
        self.length = pos + len(token_ids)
        return np.log(P)[np.asarray(token_ids)]

    def keep(self, pos, rows):
        self.length = pos + len(rows)

    def set_length(self, n):
        self.length = n

    def prefill(self, ids):
        self.length = len(ids)
        return np.log(P)[ids[-1]]

    def extend(self, ids, pos):
        self.length = pos + len(ids)
        return np.log(P)[ids[-1]]


class FixedTree(Drafter):
    """Always the same tree: 3 -> (1, 2), 0 -> (3), 1."""

    def begin(self, prompt_ids, features=None):
        pass

    def propose(self, k, sampling, rng, keep_drafting=None):
        return Proposal(np.array([3, 1], dtype=np.int64)[:k])

    def propose_tree(self, k, nodes, sampling, rng):
        return Proposal(np.array([3, 1, 2, 0, 3, 1]), None, None, np.array([-1, 0, 0, -1, 3, -1]),
                        np.full(6, 0.5))

    def commit(self, accepted_ids, next_id, features=None, logits=None):
        pass


class LogitsOfFixedTree(FixedTree):
    """The fixed tree, asking for the target's logits of the committed rows."""

    needs_logits = True

    def __init__(self):
        self.seen = []

    def commit(self, accepted_ids, next_id, features=None, logits=None):
        self.seen.append((list(accepted_ids), next_id, logits.copy()))


def test_a_tree_pass_hands_the_drafter_the_rows_of_its_accepted_path():
    """Greedy from token 0 the target's next token is always 0, which is node 3 of the fixed tree (row 4, not
    row 1): the committed rows are 0 and 4, and the Markov target's row for a token is P's row for it."""
    drafter = LogitsOfFixedTree()
    steps = list(loop_mod.speculative(MarkovTreeStep(), drafter, np.array([0, 0]), Fixed(3), 12, SamplingParams(),
                                      np.random.default_rng(0), Stats(), tree_nodes=6))
    assert all(s.accepted == 1 for s in steps[:-1]) and drafter.seen
    last = 0
    for accepted, next_id, logits in drafter.seen:
        assert np.allclose(logits, np.log(P)[[last, *accepted]])
        last = next_id


def joint(params, n=12000, seed=0):
    rng = np.random.default_rng(seed)
    counts = np.zeros((V, V))
    target = MarkovTreeStep()
    for _ in range(n):
        ids = [t for s in loop_mod.speculative(target, FixedTree(), np.array([0, 0]), Fixed(3), 2, params, rng,
                                               Stats(), tree_nodes=6) for t in s.token_ids][:2]
        counts[ids[0], ids[1]] += 1
    assert target.trees > 0
    return counts


def chi2(counts, params):
    p = warp(np.log(P), params)
    exact = p[0][:, None] * p
    mask = exact > 0
    stat = (((counts - counts.sum() * exact) ** 2)[mask] / (counts.sum() * exact)[mask]).sum()
    df = int(mask.sum()) - 1
    return stat, df * (1 - 2 / (9 * df) + 3.0902 * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("params", [SamplingParams(0.7), SamplingParams(1.0, top_k=3)], ids=["t0.7", "topk3"])
def test_sampling_with_trees_follows_the_target(params):
    stat, critical = chi2(joint(params), params)
    assert stat < critical, (stat, critical)


def test_a_broken_tree_acceptor_is_caught(monkeypatch):
    def keep_rejected(tree, probs, rng):  # BUG: a rejected candidate is not removed from p
        kids = tree.children()
        row, path = 0, []
        while True:
            accepted = next((c for c in kids[row] if rng.random() < probs(row)[int(tree.token_ids[c - 1])]), None)
            if accepted is None:
                return path, int(rng.choice(V, p=probs(row) / probs(row).sum()))
            path.append(accepted - 1)
            row = accepted
    monkeypatch.setattr(verify_mod, "sampled_tree_verify", keep_rejected)
    params = SamplingParams(0.7)
    stat, critical = chi2(joint(params), params)
    assert stat > critical, (stat, critical)


def test_integer_activation_targets_verify_chains_only(tmp_path, checkpoints):
    """A tree puts a path's nodes at other rows than a chain does; fp32 rounding of attention's sums then
    differs by ~1e-6, which int8 activation quantization turns into other tokens (seen on the int4 demo
    target).  Such engines refuse trees in the bench plan, and a request for one runs chains, with a warning."""
    from specrt.export import export_pair

    out = tmp_path / "engine"
    export_pair(checkpoints["target"], checkpoints["close"], out, max_context=48, target_quant="int8-rows",
                progress=False, verify=False)
    engine = Engine.load(out)
    assert engine.supports_tree and not engine.trees_lossless
    prompt = [5, 7, 1, 2, 3, 5, 7, 4, 8, 9, 5, 7]
    want = engine.generate(prompt, max_new_tokens=20, use_draft=False).token_ids
    with pytest.warns(UserWarning, match="chains only"):
        r = engine.generate(prompt, max_new_tokens=20, k=4, drafter="ngram", tree_nodes=8)
    assert r.stats.tree_passes == 0 and r.token_ids == want


def test_fp32_in_place_targets_take_trees(engines):
    assert Engine.load(engines["close"]).trees_lossless
