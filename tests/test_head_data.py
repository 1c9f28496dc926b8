"""``scripts/head_data.py``: the order in which prompts are answered keeps every source under its share of the
answer tokens."""
from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import batch_gen
import head_data


def _job(i: int, source: str) -> batch_gen.Job:
    return batch_gen.Job(f"{source}-{i}", [1, 2, 3], [], meta={"source": source})


def _answer(jobs, lengths: dict[str, int], answered: collections.Counter, cap: float, after: int) -> list[str]:
    """Run ``balanced`` as the answers stage does: each job pulled is answered at once with its source's length."""
    order = []
    for job in head_data.balanced(jobs, answered, cap=cap, after=after):
        source = job.meta["source"]
        answered[source] += lengths[source]
        order.append(source)
    return order


def test_a_source_with_long_answers_waits_and_every_job_still_comes():
    # "code" answers 5x longer than the others, and a third of the list is code: in list order it would hold
    # 5 / (5 + 2) = 71% of the answer tokens
    sources = ["code", "chat", "maths"]
    jobs = [_job(i, sources[i % 3]) for i in range(300)]
    lengths = {"code": 500, "chat": 100, "maths": 100}
    answered = collections.Counter()
    order = _answer(jobs, lengths, answered, cap=0.4, after=1000)
    assert sorted(order) == sorted(j.meta["source"] for j in jobs)  # nothing lost, nothing twice
    # while the other sources last, code stays near the cap (one conversation over it at most)
    first = order[:200]
    tokens = collections.Counter()
    for s in first:
        tokens[s] += lengths[s]
    assert tokens["code"] / sum(tokens.values()) < 0.4 + 500 / sum(tokens.values())
    assert order[-1] == "code"  # what waited comes last


def test_the_list_order_is_kept_when_no_source_is_over():
    jobs = [_job(i, s) for i, s in enumerate(["a", "b", "c", "d"] * 25)]
    order = _answer(jobs, {s: 10 for s in "abcd"}, collections.Counter(), cap=0.3, after=0)
    assert order == ["a", "b", "c", "d"] * 25


def test_shares_count_from_what_was_answered_before():
    # an earlier run left "a" far over the cap: its jobs wait behind every other one
    jobs = [_job(i, s) for i, s in enumerate(["a", "b"] * 10)]
    order = _answer(jobs, {"a": 10, "b": 10}, collections.Counter(a=10_000), cap=0.5, after=100)
    assert order == ["b"] * 10 + ["a"] * 10
