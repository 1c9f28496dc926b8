"""The `specrt` command line, run as a user would."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


def specrt(*args, check=True, cwd=None):
    p = subprocess.run([sys.executable, "-m", "specrt.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600, check=False, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(p.stderr)
    return p


def test_help_explains():
    out = specrt("--help").stdout
    assert "export" in out and "generate" in out and "bench" in out
    # the drafters as they are, not "a small draft model" alone
    assert all(w in " ".join(out.split()) for w in ("draft model", "feature head", "n-gram", "suffix cache",
                                                    "recycled", "hybrid", "tree"))
    assert "--no-draft" in specrt("generate", "--help").stdout
    bench = " ".join(re.sub(r"-\s*\n\s*", "-", specrt("bench", "--help").stdout).split())  # argparse wraps at "-"
    assert "specrt-reports/spec_bench-DATE-TIME.md" in bench and "specrt-reports/peers-DATE-TIME.md" in bench
    assert "writes only --json-out" in bench


@pytest.mark.parametrize("args, match", [
    (["--peers", "--json-out", "x.json"], "--json-out is for the plain bench"),
    (["--spec-bench", "q.jsonl", "--json-out", "x.json"], "--json-out is for the plain bench"),
    (["--report", "r.md"], "--report is for --peers and --spec-bench"),
    (["--peers", "--spec-bench", "q.jsonl"], "two different runs"),
])
def test_bench_output_flags_are_checked_before_anything_runs(tmp_path, args, match):
    p = specrt("bench", tmp_path / "no-engine-here", *args, check=False, cwd=tmp_path)
    assert p.returncode == 2 and match in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []  # refused before writing anything, the engine not even opened


def test_bench_peers_report_goes_to_its_folder_not_the_cwd(engines, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"name": "ids", "prompt_ids": [5, 17, 33]}]))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    p = specrt("bench", engines["close"], "--peers", "--k", "2", "--prompts", prompts, "--repeats", "1",
               "--max-new-tokens", "4", "--temperatures", "0", cwd=cwd)
    assert [f.name for f in cwd.iterdir()] == ["specrt-reports"]
    reports = sorted(f.name for f in (cwd / "specrt-reports").iterdir())
    md = next(f for f in reports if f.endswith(".md"))
    assert md.startswith("peers-") and md.replace(".md", ".json") in reports
    assert f"wrote specrt-reports/{md}" in p.stdout.splitlines()[-1]


def test_generate_json(engines):
    p = specrt("generate", engines["close"], "--prompt-ids", "5,17,33", "--max-new-tokens", "12", "--k", "4", "--json")
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert set(d) == {"text", "token_ids", "prompt_token_ids", "stats"}
    assert d["prompt_token_ids"] == [5, 17, 33] and 1 <= len(d["token_ids"]) <= 12
    assert {"new_tokens", "steps", "proposed", "accepted", "acceptance_rate", "tokens_per_step", "draft_s",
            "verify_s", "total_s", "tokens_per_s"} <= set(d["stats"])
    base = json.loads(specrt("generate", engines["close"], "--prompt-ids", "5,17,33", "--max-new-tokens", "12",
                             "--no-draft", "--json").stdout)
    assert base["token_ids"] == d["token_ids"] and base["stats"]["proposed"] == 0


def test_num_samples_one_json_per_line(engines):
    p = specrt("generate", engines["random"], "--prompt-ids", "5,17", "--max-new-tokens", "6", "--temperature", "1",
               "--num-samples", "3", "--seed", "10", "--json")
    rows = [json.loads(line) for line in p.stdout.strip().splitlines()]
    assert len(rows) == 3 and all(set(r) == {"text", "token_ids", "prompt_token_ids", "stats"} for r in rows)
    again = [json.loads(line) for line in specrt("generate", engines["random"], "--prompt-ids", "5,17",
                                                  "--max-new-tokens", "6", "--temperature", "1", "--num-samples",
                                                  "3", "--seed", "10", "--json").stdout.strip().splitlines()]
    assert [r["token_ids"] for r in rows] == [r["token_ids"] for r in again]  # reproducible per seed


def test_relaxed_is_flagged(engines):
    d = json.loads(specrt("generate", engines["random"], "--prompt-ids", "5,17", "--max-new-tokens", "6",
                          "--acceptance", "relaxed", "--accept-tau", "0.2", "--json").stdout)
    assert d["stats"]["acceptance"] == "relaxed" and d["stats"]["lossless"] is False
    d = json.loads(specrt("generate", engines["random"], "--prompt-ids", "5,17", "--max-new-tokens", "6",
                          "--json").stdout)
    assert d["stats"]["lossless"] is True


def test_generate_streams_text(engines):
    p = specrt("generate", engines["close"], "--prompt", "def add(a, b):", "--max-new-tokens", "8")
    assert "tokens" in p.stderr and "acceptance" in p.stderr


@pytest.mark.parametrize("args, match", [
    (["--k", "3", "--policy", "fixed"], "compiled k values"),
    (["--temperature", "-1"], "temperature"),
])
def test_generate_errors_are_one_clear_line(engines, args, match):
    p = specrt("generate", engines["close"], "--prompt", "x", *args, check=False)
    assert p.returncode == 2 and match in p.stderr and "Traceback" not in p.stderr


def test_bad_engine_dir(tmp_path):
    p = specrt("generate", tmp_path, "--prompt", "x", check=False)
    assert p.returncode == 2 and "no manifest.json" in p.stderr


def test_bench_prints_ratio(engines, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"name": "ids", "prompt_ids": [5, 17, 33]}]))
    p = specrt("bench", engines["self"], "--prompts", prompts, "--drafters", "model", "--k", "2,4", "--repeats", "2",
               "--max-new-tokens", "16", "--json-out", tmp_path / "b.json")
    assert "speedup" in p.stdout
    assert p.stdout.splitlines()[-1] == f"wrote {tmp_path / 'b.json'}"
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [r["k"] for r in rows] == [None, 2, 4]
    assert all(r["agreement_with_target"] == 1.0 for r in rows)
    assert rows[1]["acceptance_rate"] == 1.0  # the target is its own draft


def test_bench_policies_and_relaxed(engines, tmp_path):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"name": "ids", "prompt_ids": [5, 17, 33]}]))
    p = specrt("bench", engines["random"], "--prompts", prompts, "--k", "2", "--repeats", "1", "--policies",
               "--relaxed", "0.01", "--max-new-tokens", "12", "--json-out", tmp_path / "b.json")
    rows = json.loads((tmp_path / "b.json").read_text())
    labels = [r["config"] for r in rows]
    assert "adaptive" in labels and "adaptive T=0.8" in labels and "RELAXED k=4 tau=0.01" in labels
    assert "LOSSY" in p.stdout
    for r in rows:
        if r["temperature"] == 0 and r["acceptance"] == "strict":
            assert r["agreement_with_target"] == 1.0, r


def test_bench_peers_report(engines, checkpoints, tmp_path):
    """`specrt bench --peers` with another engine of the pair and transformers' rows: one report."""
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"name": "ids", "prompt_ids": [5, 17, 33]}]))
    report = tmp_path / "peers.md"
    p = specrt("bench", engines["close"], "--peers", "--k", "2", "--also-engine", engines["close_concat"],
               "--hf-target", checkpoints["target"], "--hf-draft", checkpoints["close"], "--prompts", prompts,
               "--repeats", "1", "--max-new-tokens", "8", "--temperatures", "0", "--report", report)
    assert "Median over prompts" in p.stdout and report.is_file()
    rows = {r["system"]: r for r in json.loads(report.with_suffix(".json").read_text())}
    assert set(rows) == {"specrt target-only [fp32]", "specrt k=2 [fp32]", "transformers generate()",
                         "transformers assisted k=2", "specrt target-only [fp32 close_concat]",
                         "specrt k=2 [fp32 close_concat]"}  # same quantization: told apart by directory
    assert all(r["same_greedy_tokens"] in (True, None) for r in rows.values())


def test_info(engines):
    out = specrt("info", engines["close"]).stdout
    assert "manifest valid" in out and "attention group-query-attention, KV update in-place" in out


def test_export_cli_refuses_non_empty(tmp_path, checkpoints):
    (tmp_path / "x").write_text("x")
    p = specrt("export", "--target", checkpoints["target"], "--draft", checkpoints["random"], "--out", tmp_path,
               check=False)
    assert p.returncode == 2 and "--force" in p.stderr


@pytest.mark.parametrize("drafter", ["model", "ngram", "suffix", "hybrid"])
def test_generate_with_each_drafter_equals_no_draft(engines, drafter):
    args = ["generate", engines["close"], "--prompt-ids", "5,5,17,5,5,17,5", "--max-new-tokens", "16", "--json"]
    spec = json.loads(specrt(*args, "--drafter", drafter, "--ngram-min", "1", "--ngram-max", "3").stdout)
    base = json.loads(specrt(*args, "--no-draft").stdout)
    assert spec["token_ids"] == base["token_ids"] and spec["stats"]["drafter"] == drafter


def test_target_only_engine_cli(engines):
    info = specrt("info", engines["target_only"]).stdout
    assert "draft: none" in info and "a request that names none: ngram, adaptive k up to 8, chains" in info
    p = specrt("generate", engines["target_only"], "--prompt-ids", "5,17", "--drafter", "model", check=False)
    assert p.returncode == 2 and "needs a draft model" in p.stderr and "Traceback" not in p.stderr
