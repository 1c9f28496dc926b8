"""runtime/trace.py: the trace format, and a diagnosis that names the right bottleneck."""
from __future__ import annotations

import json

import pytest
from specrt.runtime import Engine
from specrt.runtime.trace import analyze, format_analysis, read


def crafted(path, *, k=4, accept=lambda i: 3, draft_s=0.0005, verify_s=lambda i: 0.010, host_s=0.0005, n=40,
            context=lambda i: 20 + 5 * i):
    """A synthetic trace: a target-only generation (1-token passes of 10 ms) and a speculative one."""
    lines = [{"type": "header", "policy": "target-only", "k": 0}]
    lines += [{"type": "step", "step": i, "context": context(i), "proposed": 0, "accepted": 0, "emitted": 1,
               "rejected_at": None, "draft_top": None, "draft_s": 0.0, "verify_s": verify_s(i), "host_s": 0.0002}
              for i in range(n)]
    lines.append({"type": "summary", "new_tokens": n, "total_s": sum(verify_s(i) + 0.0002 for i in range(n))})
    lines.append({"type": "header", "policy": "fixed", "k": k})
    total, new = 0.0, 0
    for i in range(n):
        a = min(accept(i), k)
        v = verify_s(i) * (1 + 0.05 * k)
        lines.append({"type": "step", "step": i, "context": context(i), "proposed": k, "accepted": a,
                      "emitted": a + 1, "rejected_at": a if a < k else None, "draft_top": [0.9] * k,
                      "draft_s": draft_s * k, "verify_s": v, "host_s": host_s})
        total += draft_s * k + v + host_s
        new += a + 1
    lines.append({"type": "summary", "new_tokens": new, "total_s": total})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


CASES = {
    "low_acceptance": {"accept": lambda i: 1 if i % 5 == 0 else 0},
    "draft_too_slow": {"draft_s": 0.006},
    "verification_dominates": {"k": 8, "accept": lambda i: 1 + i % 2, "draft_s": 0.0001},
    "host_overhead": {"host_s": 0.03},
    "context_growth": {"verify_s": lambda i: 0.002 + 0.0008 * i, "context": lambda i: 20 + 60 * i},
}


@pytest.mark.parametrize("kind", list(CASES))
def test_crafted_traces_name_their_bottleneck(tmp_path, kind):
    a = analyze(read(crafted(tmp_path / f"{kind}.jsonl", **CASES[kind])))
    assert a.diagnoses[0].kind == kind, format_analysis(a)
    assert a.diagnoses[0].fix


def test_healthy_trace(tmp_path):
    a = analyze(read(crafted(tmp_path / "ok.jsonl")))
    assert [d.kind for d in a.diagnoses] == ["healthy"]
    assert a.achieved_speedup > 1.5 and a.predicted_speedup > 1.5


def test_real_traces(engines, tmp_path):
    """The tiny pairs: a random draft is diagnosed as misaligned; the target as its own draft is not."""
    for name, expect_low in (("random", True), ("self", False)):
        trace = tmp_path / f"{name}.jsonl"
        engine = Engine.load(engines[name])
        for _ in range(3):
            engine.generate([5, 17, 33], max_new_tokens=30, k=4, trace=trace)
        engine.generate([5, 17, 33], max_new_tokens=30, use_draft=False, trace=trace)
        gens = read(trace)
        assert len(gens) == 4 and all(g["summary"] for g in gens)
        steps = gens[0]["steps"]
        assert sum(s["emitted"] for s in steps) == gens[0]["summary"]["new_tokens"]
        assert all(len(s["draft_top"] or []) == s["proposed"] for s in steps)  # none when nothing was drafted
        a = analyze(gens)
        assert (a.diagnoses[0].kind == "low_acceptance") is expect_low, format_analysis(a)
        if not expect_low:
            assert a.alpha == 1.0 and a.acceptance_by_position == [1.0] * 4


def test_not_a_trace(tmp_path):
    bad = tmp_path / "x.jsonl"
    bad.write_text("hello\n")
    with pytest.raises(ValueError, match="not JSON"):
        read(bad)
