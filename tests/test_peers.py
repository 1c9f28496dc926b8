"""specrt.peers: the side-by-side peer report (transformers rows are ground truth; genai runs out of process)."""
from __future__ import annotations

import sys

import pytest
from specrt.runtime import Engine

from specrt import peers


@pytest.fixture(scope="module")
def engine(engines):
    return Engine.load(engines["close"])


def test_specrt_and_transformers_rows_agree_token_for_token(engine, checkpoints, tmp_path):
    systems = peers.specrt_systems(engine, [2, 4], max_new_tokens=12, label="fp32")
    systems += peers.transformers_systems(checkpoints["target"], checkpoints["close"], 2, 12,
                                          sorted(engine.manifest.eos_token_ids), threads=1)
    prompts = [{"name": "a", "prompt_ids": [5, 17, 33]}, {"name": "b", "prompt_ids": [40, 41, 42, 43]}]
    rows = peers.run_peers(engine, systems, prompts, temperatures=[0.0, 0.8], repeats=1, progress=False)
    assert len(rows) == 2 * 2 * 5
    greedy = {(r["prompt"], r["system"]): r for r in rows if r["temperature"] == 0}
    for p in ("a", "b"):
        # speculative rows are checked against their own target-only run ...
        assert greedy[(p, "specrt k=4 [fp32]")]["reference"] == "specrt target-only [fp32]"
        # ... and transformers' generate() / assisted generation against specrt target-only (ground truth)
        for name in ("specrt k=2 [fp32]", "specrt k=4 [fp32]", "transformers generate()", "transformers assisted k=2"):
            assert greedy[(p, name)]["same_greedy_tokens"] is True, (p, name)
        assert greedy[(p, "specrt target-only [fp32]")]["same_greedy_tokens"] is None
        assert greedy[(p, "specrt k=2 [fp32]")]["acceptance"] is not None
        assert greedy[(p, "transformers generate()")]["acceptance"] is None
    assert all(r["tokens_per_s"] > 0 for r in rows)
    report = peers.format_report(rows, systems[0].name)
    assert "| 0.8 | transformers assisted k=2 |" in report and "Median over prompts" in report
    assert "yes: specrt target-only [fp32]" in report and "NO:" not in report
    pytest.importorskip("matplotlib", reason="the chart needs the plot extra: pip install -e '.[plot]'")
    assert peers.plot_report(rows, tmp_path / "peers.png")
    assert (tmp_path / "peers.png").read_bytes()[:4] == b"\x89PNG"


def test_engine_label_names_the_quantization(engine):
    assert peers.engine_label(engine) == "fp32"


def test_genai_worker_without_genai_says_what_to_fix(tmp_path):
    try:
        import onnxruntime_genai  # noqa: F401
        pytest.skip("onnxruntime-genai is installed in this Python")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="--genai-python is a Python with onnxruntime-genai installed"):
        peers.genai_system(sys.executable, tmp_path, 100, 8)


def test_each_recycling_system_learns_only_from_its_own_runs(engine):
    """Two systems that recycle the target's predictions keep a table each: the tree row never drafts from the
    chain row's run of the same prompt, and a repeat starts from an empty table."""
    systems = peers.specrt_systems(engine, [4], max_new_tokens=12, plan=[("ngram+recycle", 0), ("recycle", 8)])
    chain, tree = systems[1], systems[2]
    chain_table, tree_table = chain.reset.__self__, tree.reset.__self__  # each system's reset clears its table
    assert chain_table is not tree_table and engine.recycle_table not in (chain_table, tree_table)
    chain.run([5, 17, 33], 0.0, 1)
    assert chain_table.candidates(33)[0] >= 0  # the first pass's row 0 (input: the prompt's last token) recorded
    tree.reset()
    tree.run([40, 41, 42, 43], 0.0, 1)
    assert (tree_table.candidates(33) == -1).all() and (engine.recycle_table.candidates(33) == -1).all()
    chain.reset()  # a new repeat: the chain row's table is empty again
    assert (chain_table.candidates(33) == -1).all()
