"""Shared fixtures: tiny checkpoints (built from configs) and engine directories exported from them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import tiny

MAX_CONTEXT = 64


@pytest.fixture(autouse=True)
def drafts_by_default(request, monkeypatch):
    """The suite's draft-kind tests (perturbed, random, adversarial, the target itself) exercise an engine's own
    draft through ``generate()`` with a fixed k = 4 chain; the shipped defaults (measured on Spec-Bench: context
    drafters, adaptive k, trees on head engines) are what tests marked ``product_defaults`` check."""
    if request.node.get_closest_marker("product_defaults"):
        return
    from specrt.runtime import engine as engine_mod

    suite = {"k": 4, "policy": "fixed", "tree_nodes": 0}
    monkeypatch.setitem(engine_mod.DEFAULTS, "model", {"drafter": "model", **suite})
    monkeypatch.setitem(engine_mod.DEFAULTS, "feature-head", {"drafter": "eagle", **suite})
    monkeypatch.setitem(engine_mod.DEFAULTS, None, {"drafter": "ngram", **suite})


@pytest.fixture(scope="session")
def tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer):
    """target: 2-layer Llama with peaked logits; drafts: a perturbed copy (agrees often), a random 1-layer model."""
    import torch
    import transformers as T

    root = tmp_path_factory.mktemp("ckpt")
    target = tiny.make_checkpoint(root / "target", "llama", seed=1, init_std=0.2, tokenizer=tokenizer)
    random_draft = tiny.make_checkpoint(root / "random_draft", "llama", seed=2, layers=1, hidden=32, heads=2,
                                        kv_heads=1, tokenizer=tokenizer)
    model = T.AutoModelForCausalLM.from_pretrained(target)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.std())
    close_draft = root / "close_draft"
    model.save_pretrained(close_draft)
    tokenizer.save_pretrained(close_draft)
    return {"target": target, "random": random_draft, "close": close_draft}


@pytest.fixture(scope="session")
def engines(tmp_path_factory, checkpoints):
    """Engine directories: target paired with each draft (including itself)."""
    from specrt.export import export_pair

    root = tmp_path_factory.mktemp("engines")
    out = {}
    for name, draft in (("close", checkpoints["close"]), ("random", checkpoints["random"]),
                        ("self", checkpoints["target"])):
        export_pair(checkpoints["target"], draft, root / name, max_context=MAX_CONTEXT, tolerance=1e-4,
                    progress=False)
        out[name] = root / name
    # The same pair through optimum's concat-style graph (the fallback for architectures without
    # in-place attention), so the loop is tested on both kinds of cache update.
    export_pair(checkpoints["target"], checkpoints["close"], root / "close_concat", max_context=MAX_CONTEXT,
                tolerance=1e-4, progress=False, attention="concat")
    out["close_concat"] = root / "close_concat"
    # ... and through the bucketed concat graph (shapes fixed per context bucket: 16, 32, 64)
    export_pair(checkpoints["target"], checkpoints["close"], root / "close_bucketed", max_context=MAX_CONTEXT,
                tolerance=1e-4, progress=False, attention="bucketed")
    out["close_bucketed"] = root / "close_bucketed"
    # ... and without a draft: a target-only engine, drafting from the context
    export_pair(checkpoints["target"], None, root / "target_only", max_context=MAX_CONTEXT, tolerance=1e-4,
                progress=False)
    out["target_only"] = root / "target_only"
    # ... and with a feature-level draft head (EAGLE-style), briefly trained on the target's own features; kept
    # fp32 (the default is int4) so the head's graph can be compared with PyTorch exactly
    head = tiny.make_head(root / "head", checkpoints["target"])
    export_pair(checkpoints["target"], None, root / "eagle", max_context=MAX_CONTEXT, tolerance=1e-4,
                progress=False, draft_head=head, draft_quant="fp32")
    out["eagle"] = root / "eagle"
    return out


@pytest.fixture
def engine_copy(engines, tmp_path):
    """A writable copy of the tiny "close" engine directory (tests that damage it)."""
    import shutil

    dst = tmp_path / "engine"
    shutil.copytree(engines["close"], dst)
    return dst


@pytest.fixture(scope="session")
def hf_target(checkpoints):
    import transformers as T

    return T.AutoModelForCausalLM.from_pretrained(checkpoints["target"]).eval()
