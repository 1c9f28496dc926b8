"""specrt.spec_bench: Spec-Bench questions per category, every system side by side, identity checked."""
from __future__ import annotations

import json
import sys

import pytest
from specrt.runtime import Engine, GenerationError

from specrt import peers, spec_bench

# short: the tiny test engines hold 64 tokens (byte-level tokenizer, chat template around every turn)
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["def add", "print"]},
    {"question_id": 161, "category": "translation", "turns": ["Hallo Welt"]},
    {"question_id": 481, "category": "rag", "turns": ["a + b. add?"]},
]


@pytest.fixture(scope="module")
def engine(engines):
    return Engine.load(engines["close"])


def test_prompts_follow_the_chat_template_and_the_first_answer(engine):
    prompts = spec_bench.build_prompts(engine, QUESTIONS, max_new_tokens=6, progress=False)
    assert [(p.category, p.turn) for p in prompts] == [("mt_bench", 1), ("mt_bench", 2), ("translation", 1), ("rag", 1)]
    first = engine.generate(prompts[0].ids, max_new_tokens=6, use_draft=False).text
    assert prompts[1].ids == engine.chat_prompt([{"role": "user", "content": "def add"},
                                                 {"role": "assistant", "content": first},
                                                 {"role": "user", "content": "print"}])


def test_every_drafter_identical_to_target_only_per_category(engine, tmp_path):
    prompts = spec_bench.build_prompts(engine, QUESTIONS, max_new_tokens=10, progress=False)
    systems = peers.specrt_systems(engine, [4], 10, "fp32", drafters=engine.drafters)
    rows = spec_bench.run_spec_bench(systems, prompts, repeats=2, progress=False)
    by = {r["system"]: r for r in rows}
    assert set(by) == {"specrt target-only [fp32]", *(f"specrt {d} k=4 [fp32]" for d in engine.drafters)}
    for d in engine.drafters:
        row = by[f"specrt {d} k=4 [fp32]"]
        assert row["overall"]["identical"] is True and row["reference"] == "specrt target-only [fp32]"
        assert set(row["categories"]) == {"mt_bench", "translation", "rag"}
        assert row["overall"]["tokens_per_pass"] >= 1.0 and row["overall"]["runs"] == 2 * len(prompts)
        cats = row["categories"]
        assert row["overall"]["tokens"] == sum(c["tokens"] for c in cats.values())
    assert by["specrt target-only [fp32]"]["overall"]["identical"] is None
    report = spec_bench.format_report(rows)
    assert "| MT-bench | translation | RAG | overall |" in report and "**NO**" not in report
    pytest.importorskip("matplotlib", reason="the chart needs the plot extra: pip install -e '.[plot]'")
    assert spec_bench.plot_report(rows, tmp_path / "sb.png")


def test_a_broken_row_is_reported_as_not_identical(engine):
    prompts = spec_bench.build_prompts(engine, QUESTIONS[1:], max_new_tokens=6, progress=False)
    base = peers.specrt_systems(engine, [4], 6, "fp32")[0]

    def wrong(ids, t, seed):
        run = base.run(ids, t, seed)
        return peers.Run([(x + 1) % 300 for x in run.token_ids], run.seconds)
    rows = spec_bench.run_spec_bench([base, peers.System("broken", wrong, reference=base.name)], prompts,
                                     progress=False)
    assert rows[1]["overall"]["identical"] is False and "**NO**" in spec_bench.format_report(rows)


def test_suffix_cache_is_emptied_before_each_repeat(engine):
    suffix = next(s for s in peers.specrt_systems(engine, [4], 6, "fp32", drafters=["suffix"]) if "suffix" in s.name)
    engine.generate([5, 17, 33], max_new_tokens=6, drafter="suffix")
    assert engine.suffix_cache.tokens > 0
    suffix.reset()
    assert engine.suffix_cache.tokens == 0


def test_questions_file_errors(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"category": "qa"}\n')
    with pytest.raises(GenerationError, match="needs 'category' and 'turns'"):
        spec_bench.load_questions(bad)


def test_cli_spec_bench(engines, tmp_path):
    from test_cli import specrt

    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(x) + "\n" for x in QUESTIONS))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    report = tmp_path / "out" / "sub" / "sb.md"  # a folder that does not exist yet
    p = specrt("bench", engines["target_only"], "--spec-bench", q, "--max-new-tokens", "8", "--repeats", "1",
               "--k", "2", "--report", report, cwd=cwd)
    assert "specrt ngram k=2 [fp32, no draft]" in p.stdout and "specrt suffix k=2" in p.stdout
    rows = json.loads(report.with_suffix(".json").read_text())
    assert all(r["overall"]["identical"] in (True, None) for r in rows)
    assert report.is_file() and f"wrote {report}, {report.with_suffix('.json')}" in p.stdout
    assert list(cwd.iterdir()) == []  # the report lands where asked, nothing in the current directory


def test_cli_spec_bench_default_report_folder(engines, tmp_path):
    from test_cli import specrt

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps(QUESTIONS[1]) + "\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = ("bench", engines["target_only"], "--spec-bench", q, "--max-new-tokens", "4", "--repeats", "1", "--k", "2",
            "--engine-drafters", "ngram")
    p = specrt(*args, cwd=cwd)
    assert [f.name for f in cwd.iterdir()] == ["specrt-reports"]  # no loose files beside the user's own
    (md,) = [f for f in (cwd / "specrt-reports").iterdir() if f.suffix == ".md"]
    assert md.name.startswith("spec_bench-") and md.with_suffix(".json").is_file()
    assert f"wrote specrt-reports/{md.name}" in p.stdout
    folder = tmp_path / "reports"  # an existing folder as --report: the default name inside it
    folder.mkdir()
    specrt(*args, "--report", folder, cwd=cwd)
    assert [f.name.split("-")[0] for f in folder.iterdir() if f.suffix == ".md"] == ["spec_bench"]


def test_openvino_worker_without_openvino_says_what_to_fix(tmp_path):
    try:
        import openvino_genai  # noqa: F401
        pytest.skip("openvino-genai is installed in this Python")
    except ImportError:
        pass
    with pytest.raises(RuntimeError, match="--openvino-python is a Python with openvino-genai installed"):
        peers.openvino_systems(sys.executable, tmp_path, 8, modes=("plain",))


def test_cli_engine_drafters_plan(engines, tmp_path):
    from test_cli import specrt

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps(QUESTIONS[1]) + "\n")
    report = tmp_path / "sb.md"
    p = specrt("bench", engines["target_only"], "--spec-bench", q, "--max-new-tokens", "6", "--repeats", "1",
               "--k", "2", "--report", report, "--engine-drafters", "ngram@4")
    names = [r["system"] for r in json.loads(report.with_suffix(".json").read_text())]
    assert len(names) == 2 and "specrt ngram k=2 tree 4 [fp32, no draft]" in names, p.stdout
    bad = specrt("bench", engines["target_only"], "--spec-bench", q, "--engine-drafters", "model", check=False)
    assert bad.returncode == 2 and "cannot run drafter 'model'" in bad.stderr
    bad = specrt("bench", engines["target_only"], "--spec-bench", q, "--engine-drafters", "ngram@x", check=False)
    assert bad.returncode == 2 and "DRAFTER@NODES" in bad.stderr


def test_side_by_side_prints_speed_over_the_reference_and_tokens_per_pass_per_category():
    tally = spec_bench.SideBySide()
    tally.add("target-only", "rag", 2.0, 10, 10)
    tally.add("target-only", "qa", 1.0, 10, 10)
    tally.add("spec", "rag", 1.0, 10, 4)
    tally.add("spec", "qa", 1.0, 10, 5)
    lines = tally.table(["target-only", "spec"], "target-only").splitlines()
    assert lines[0] == "| configuration | QA | RAG | overall |"
    assert lines[3] == "| spec | 1.00x / 2.00 | 2.00x / 2.50 | 1.50x / 2.22 |"  # overall: 20 tokens in 2 s vs 3 s


def test_side_by_side_runs_tally_and_stop_on_an_output_that_differs(engine):
    p = spec_bench.build_prompts(engine, QUESTIONS[2:], max_new_tokens=6, progress=False)[0]
    tally = spec_bench.SideBySide()
    reference = tally.run(engine, p, "target-only", 6, None, use_draft=False)
    assert tally.run(engine, p, "ngram", 6, reference, drafter="ngram", k=4) == reference
    assert tally.tally[("ngram", "rag")].tokens == len(reference) == tally.tally[("ngram", "overall")].tokens
    with pytest.raises(SystemExit, match="ngram: output differs from the reference on question 481"):
        tally.run(engine, p, "ngram", 6, [t + 1 for t in reference], drafter="ngram", k=4)
