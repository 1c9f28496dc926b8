"""``scripts/head_data.py``: the order in which prompts are answered keeps every source under its share of the
answer tokens, an answer stuck in a loop is ended (``batch_gen.generate(stop_repeats=...)``) and remembered so, and
kept answers rebuild with their own prompts on a machine whose prompt list comes out otherwise."""
from __future__ import annotations

import collections
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import batch_gen
import head_data
import head_prompts
import numpy as np


def _job(i: int, source: str) -> batch_gen.Job:
    return batch_gen.Job(f"{source}-{i}", [1, 2, 3], [], meta={"source": source})


def _answer(jobs, lengths: dict[str, int], shares: head_data.SourceShares, cap: float, after: int,
            slots: int = 1) -> list[str]:
    """Run ``balanced`` as the answers stage does: ``slots`` conversations in flight, each pulled job answered
    (with its source's length) when ``slots`` more have been pulled after it, the rest at the end."""
    order, flight = [], collections.deque()
    for job in head_data.balanced(jobs, shares, cap=cap, after=after):
        order.append(job.meta["source"])
        flight.append(job.meta["source"])
        if len(flight) == slots:  # the oldest in flight finishes, freeing the slot the next pull fills
            source = flight.popleft()
            shares.finish(source, lengths[source])
    while flight:
        source = flight.popleft()
        shares.finish(source, lengths[source])
    return order


def _shares(order: list[str], lengths: dict[str, int]) -> dict[str, float]:
    tokens = collections.Counter()
    for s in order:
        tokens[s] += lengths[s]
    return {s: n / sum(tokens.values()) for s, n in tokens.items()}


def test_a_source_with_long_answers_waits_and_never_passes_the_cap():
    # "code" answers 5x longer than the others, and a third of the list is code: in list order it would hold
    # 5 / (5 + 2) = 71% of the answer tokens
    sources = ["code", "chat", "maths"]
    jobs = [_job(i, sources[i % 3]) for i in range(300)]
    lengths = {"code": 500, "chat": 100, "maths": 100}
    order = _answer(jobs, lengths, head_data.SourceShares(), cap=0.4, after=1000)
    assert order.count("chat") == order.count("maths") == 100  # the sources under the cap: every job
    assert 0 < order.count("code") < 100  # code: what the cap lets in, the rest not answered
    assert _shares(order, lengths)["code"] <= 0.4


def test_answers_in_flight_count_so_many_slots_do_not_overshoot_the_cap():
    # 32 conversations in flight, as batch_gen runs them: counted only when finished, "code" would be pulled 32
    # times past the cap before the first of them lands
    sources = ["code", "chat", "maths", "docs"]
    jobs = [_job(i, sources[i % 4]) for i in range(2000)]
    lengths = {"code": 400, "chat": 100, "maths": 100, "docs": 100}
    shares = head_data.SourceShares()
    order = _answer(jobs, lengths, shares, cap=0.3, after=1000, slots=32)
    assert _shares(order, lengths)["code"] <= 0.3
    assert not +shares.in_flight  # every job pulled was counted finished: nothing left in flight
    unweighted = head_data.SourceShares()  # the same run were in-flight answers not counted: it does overshoot
    unweighted.start = lambda source: None
    unweighted.finish = lambda source, tokens: (unweighted.answered.update({source: tokens}),
                                                unweighted.finished.update({source: 1}))
    order = _answer(jobs, lengths, unweighted, cap=0.3, after=1000, slots=32)
    assert _shares(order, lengths)["code"] > 0.3 + 400 / sum(lengths[s] for s in order)


def test_first_sources_come_first_each_in_its_own_order():
    jobs = [_job(0, "a"), _job(0, "m"), _job(1, "a"), _job(0, "p"), _job(1, "m")]
    assert [j.key for j in head_data.first_sources(jobs, ["m", "p"])] == ["m-0", "p-0", "m-1", "a-0", "a-1"]
    assert head_data.first_sources(jobs, []) == jobs


def test_the_list_order_is_kept_when_no_source_is_over():
    jobs = [_job(i, s) for i, s in enumerate(["a", "b", "c", "d"] * 25)]
    order = _answer(jobs, {s: 10 for s in "abcd"}, head_data.SourceShares(), cap=0.3, after=200)
    assert order == ["a", "b", "c", "d"] * 25


def test_shares_count_from_what_was_answered_before():
    # an earlier run left "a" at 10,000 answer tokens and "b" at none: "a" waits until five of "b"'s answers
    # bring it under 70%, then every job comes
    jobs = [_job(i, s) for i, s in enumerate(["a", "b"] * 10)]
    before = head_data.SourceShares(collections.Counter(a=10_000), collections.Counter(a=10_000))
    order = _answer(jobs, {"a": 1, "b": 1_000}, before, cap=0.7, after=100)
    assert order[:5] == ["b"] * 5 and sorted(order) == ["a"] * 10 + ["b"] * 10
    # nothing to bring it under: its jobs are not answered
    before = head_data.SourceShares(collections.Counter(a=10_000), collections.Counter(a=10_000))
    assert _answer(jobs, {"a": 1, "b": 10}, before, cap=0.7, after=100) == ["b"] * 10


class _CyclingTarget:
    """A stand-in for ``batch_gen.BatchedTarget`` whose greedy next token after t is ``cycle[t]``."""

    slots, max_context = 2, 512

    def __init__(self, cycle: dict[int, int], vocab: int = 16):
        self.cycle, self.vocab = cycle, vocab

    def _logits(self, ids) -> np.ndarray:
        out = np.zeros((len(ids), self.vocab), np.float32)
        out[np.arange(len(ids)), [self.cycle.get(int(t), 0) for t in ids]] = 1.0
        return out

    def extend(self, slot, ids, pos, rows_from=None):
        return {"logits": self._logits(ids)[len(ids) - 1 if rows_from is None else rows_from:]}

    def decode(self, ids, past):
        return {"logits": self._logits(ids)[:, None][:, 0]}


def _answers(target, jobs, stop_repeats, max_new=200, turn_end=None):
    return list(batch_gen.generate(target, jobs, max_new, eos=set(), turn_end=turn_end, record=False,
                                   stop_repeats=stop_repeats))


def test_repeated_marks_the_tokens_that_complete_an_earlier_ngram():
    tokens = list(range(20)) + list(range(5, 25))
    marks = batch_gen.repeated(tokens, n=4)
    # the second run repeats 5..19: its 4-grams are new up to 5 6 7 8, the first one seen before
    assert np.flatnonzero(marks).tolist() == list(range(23, 35))


def test_an_answer_stuck_in_a_loop_ends_after_stop_repeats_tokens_and_keeps_its_prefix():
    loop = {3: 4, 4: 5, 5: 6, 6: 7, 7: 3}  # 3 4 5 6 7 3 4 5 6 7 ...: a period of 5, never an end token
    job = batch_gen.Job("loop", [1, 2, 3], [[9, 10]])  # a follow-up turn that must not run after a cut
    full = _answers(_CyclingTarget(loop), [job], 0, turn_end=8)[0]
    assert len(full.answers[0]) == 200 and not full.looped
    cut = _answers(_CyclingTarget(loop), [job], 32, turn_end=8)[0]
    # the first repeated 16-gram ends at answer index 16 + 5 - 1; the run reaches 32 tokens 31 later
    assert cut.looped and len(cut.answers) == 1
    assert cut.answers[0] == full.answers[0][:20 + 32]
    assert batch_gen.repeated(cut.answers[0])[-32:].all()


def test_an_answer_that_never_repeats_itself_is_not_cut():
    counting = {t: t + 1 for t in range(2, 300)}  # 3 4 5 ... every 16-gram new
    target = _CyclingTarget(counting, vocab=320)
    d = _answers(target, [batch_gen.Job("c", [1, 2])], 1)[0]
    assert len(d.answers[0]) == 200 and not d.looped


def test_a_kept_answer_remembers_that_it_was_cut_at_a_loop(tmp_path):
    """The kept token ids carry ``looped``, and a shard rebuilt from them says so again (the data card counts it)."""
    loop = {3: 4, 4: 5, 5: 6, 6: 7, 7: 3}
    job = batch_gen.Job("loop", [1, 2, 3], [[9, 10]])
    cut = _answers(_CyclingTarget(loop), [job], 32, turn_end=8)[0]
    prompts = {"loop": _prompt("loop", ["a", "b"]), "plain": _prompt("plain", ["c"])}
    head_data.keep_answers(tmp_path, prompts, [{"id": "loop", "answers": cut.answers, "looped": cut.looped},
                                               {"id": "plain", "answers": [[3, 4]], "looped": False}])
    kept = {k["id"]: k for k in head_data.kept_answers(tmp_path)}
    assert kept["loop"].get("looped") is True and "looped" not in kept["plain"]
    rebuilt = batch_gen.replay(_CyclingTarget(loop), job, kept["loop"]["answers"], top_k=4,
                               looped=bool(kept["loop"].get("looped")))
    assert rebuilt.looped and rebuilt.answers == cut.answers


def _prompt(pid: str, turns: list[str], source: str = "s") -> dict:
    return {"id": pid, "source": source, "family": f"{source}/f", "kind": "chat", "turns": turns}


class _FeatureTarget(_CyclingTarget):
    """Also returns hidden states (3 feature layers of width 2), as the batched graph does."""

    def extend(self, slot, ids, pos, rows_from=None):
        out = super().extend(slot, ids, pos, rows_from)
        return out | {"hidden_states": np.zeros((len(out["logits"]), 6), np.float32)}


class _Tok:
    """Chat rendering stand-in: a turn's text becomes one token per character (ids 1..15)."""

    eos, turn_end = {0}, 0

    def chat(self, text):
        return [1 + ord(c) % 15 for c in text]

    follow_up = chat


def _args(tmp_path, **kw):
    return types.SimpleNamespace(**({"out": tmp_path / "data", "keep": tmp_path / "kept", "seed": 0, "sampled": 0.0,
                                     "no_rebuild": False, "max_new_tokens": 8, "max_context": 512,
                                     "stop_loops": 0, "first": [], "only": set(), "prompt_tail": head_data.PROMPT_TAIL,
                                     "long_passages": 0} | kw))


def _stand_in_verifier(monkeypatch) -> list[str]:
    """Rebuilds run through ``_FeatureTarget``; generation only records the first turns it was asked (returned)."""
    monkeypatch.setattr(head_data, "load_target", lambda args: _FeatureTarget({t: (t % 15) + 1 for t in range(16)}))
    asked: list[str] = []

    def generate(target, jobs, *a, **kw):
        asked.extend(j.meta["turns"][0] for j in jobs)
        return iter(())

    monkeypatch.setattr(batch_gen, "generate", generate)
    return asked


def test_kept_answers_rebuild_with_their_own_prompts_when_the_list_is_renumbered(tmp_path, monkeypatch):
    """The prompt list is rebuilt from what a machine has installed, so elsewhere it numbers (and holds) other
    prompts: a kept answer is rebuilt with the prompt kept beside it, and only prompts whose text was never
    answered are answered again, whatever their ids."""
    hello, bye = "hello there, how are you today", "goodbye, and thanks for all the fish"
    head_data.keep_answers(tmp_path / "kept", {}, [_prompt("s-0", [hello]) | {"answers": [[3, 4, 5]]}])
    # elsewhere: "s-0" is now another prompt, the answered one is "s-1", and a third comes only from this machine
    other = "a question about something else entirely, unrelated to the others"
    prompts = [_prompt("s-0", [bye]), _prompt("s-1", [hello]), _prompt("s-2", [other])]
    asked = _stand_in_verifier(monkeypatch)
    head_data.stage_answers(_args(tmp_path), _Tok(), prompts)
    assert sorted(asked) == sorted([bye, other])
    (shard,) = head_data.finished_shards(tmp_path / "data")
    (conv,) = json.loads((shard / "convs.json").read_text())
    assert conv["turns"] == [hello] and conv["answers"] == [[3, 4, 5]]
    # and a list that does not hold the kept prompt at all still rebuilds it, once
    asked.clear()
    head_data.stage_answers(_args(tmp_path, out=tmp_path / "data2"), _Tok(), [_prompt("s-0", [bye])])
    assert asked == [bye] and len(head_data.finished_shards(tmp_path / "data2")) == 1


def test_a_kept_answer_without_its_prompt_text_is_matched_by_the_text_not_the_id(tmp_path):
    """Lines kept before prompts were kept with them: the list's prompt of the same text, never the same id."""
    hello = _prompt("s-0", ["hello"])
    legacy = {"id": "s-0", "prompt_sha": head_data.prompt_sha(hello), "sampled": False, "answers": [[1]]}
    renumbered = {head_data.prompt_sha(p): p for p in (_prompt("s-0", ["bye"]), _prompt("s-7", ["hello"]))}
    assert head_data.kept_prompt(legacy, renumbered)["id"] == "s-7"
    assert head_data.kept_prompt(legacy, {}) is None


def test_every_committed_answer_carries_the_prompt_it_answers():
    """engines/demo/head-data must rebuild on any machine: each kept line holds its prompt, whose text's sha is the
    one recorded, and answers of token ids in the verifier's vocabulary."""
    kept = head_data.kept_answers(Path(__file__).resolve().parents[1] / "engines" / "demo" / "head-data")
    assert len(kept) > 9000
    for k in kept:
        assert all(k.get(f) for f in head_data.PROMPT_FIELDS), k.get("id")
        assert head_data.prompt_sha(k) == k["prompt_sha"], k["id"]
        assert 1 <= len(k["answers"]) <= len(k["turns"])
        assert all(0 <= t < 49152 for a in k["answers"] for t in a)


def test_a_prompt_kept_twice_rebuilds_once_and_near_duplicates_of_kept_prompts_are_not_answered(tmp_path,
                                                                                                monkeypatch):
    kept_text = "please translate the following sentence into french for me right now thank you very much"
    near = kept_text + " indeed"  # one more word: word 5-gram Jaccard 11/12 against the kept prompt
    other = "a question about something else entirely, unrelated to the others"
    head_data.keep_answers(tmp_path / "kept", {}, [_prompt("s-0", [kept_text]) | {"answers": [[3, 4]]},
                                                   _prompt("s-9", [kept_text]) | {"answers": [[5, 6]]}])
    prompts = [_prompt("s-0", [near]), _prompt("s-1", [other]), _prompt("s-2", [kept_text])]
    asked = _stand_in_verifier(monkeypatch)
    head_data.stage_answers(_args(tmp_path), _Tok(), prompts)
    assert asked == [other]
    (shard,) = head_data.finished_shards(tmp_path / "data")
    assert [c["answers"] for c in json.loads((shard / "convs.json").read_text())] == [[[3, 4]]]
    # --no-rebuild: the same prompts answered, no shard of the kept answers written
    asked.clear()
    head_data.stage_answers(_args(tmp_path, out=tmp_path / "data2", no_rebuild=True), _Tok(), prompts)
    assert asked == [other] and head_data.finished_shards(tmp_path / "data2") == []


def test_the_kept_card_counts_what_the_kept_files_hold(tmp_path):
    """The data card of the kept answers: per source conversations, answer tokens and their shares, distinct prompts
    (a prompt answered twice, greedy and sampled, counts once), second turns, sampled and looped answers."""
    a, b = _prompt("a-0", ["first question"]), _prompt("b-0", ["second question", "and a follow-up"])
    b["source"], b["family"], b["kind"] = "other", "other/x", "qa"
    head_data.keep_answers(tmp_path, {}, [a | {"answers": [[1, 2, 3]]}, a | {"answers": [[1, 2]], "sampled": True}])
    head_data.keep_answers(tmp_path, {}, [b | {"answers": [[5], [6, 7, 8, 9]], "looped": True}])
    card = head_data.write_kept_card(tmp_path)
    assert json.loads((tmp_path / "card.json").read_text()) == card
    assert (card["distinct_prompts"], card["conversations"], card["answer_tokens"]) == (2, 3, 10)
    assert (card["two_turn"], card["sampled"]) == (1, 1)
    first, other = card["sources"][a["source"]], card["sources"]["other"]
    assert (first["conversations"], first["answer_tokens"], first["share_of_answer_tokens"]) == (2, 5, 0.5)
    assert (other["two_turn"], other["looped"], other["families"]) == (1, 1, 1)
    assert card["kinds"] == {"chat": 2, "qa": 1}


def test_the_committed_card_is_the_committed_answers_card():
    """engines/demo/head-data/card.json is rewritten whenever answers are kept: it must describe the files beside it."""
    keep = Path(__file__).resolve().parents[1] / "engines" / "demo" / "head-data"
    assert json.loads((keep / "card.json").read_text()) == head_data.kept_card(keep)


def test_the_prompt_list_is_rebuilt_when_seeds_were_added_after_it_and_reused_otherwise(tmp_path, monkeypatch):
    built = []

    def build(seed, scale):
        built.append(seed)
        return [{"source": "docs", "family": "docs/a", "kind": "qa", "turns": ["What is a pipe?"]}]

    monkeypatch.setattr(head_prompts, "build", build)
    monkeypatch.setattr(head_prompts, "finish",
                        lambda prompts, seed: [p | {"id": str(i)} for i, p in enumerate(prompts)])
    monkeypatch.setattr(head_data, "seed_prompts", lambda tok, seeds, args: [
        {"source": "verifier-passages", "family": "verifier-passages/g0", "kind": "rag", "turns": [s["key"]]}
        for s in seeds])
    args = _args(tmp_path, scale=1.0, magpie=10, passages=10)
    args.out.mkdir()
    one = [{"key": "passage-0"}]
    first = head_data.stage_prompts(args, None, one)
    assert head_data.stage_prompts(args, None, one) == first and len(built) == 1  # the same seeds: read, not rebuilt
    again = head_data.stage_prompts(args, None, one + [{"key": "passage-1"}])
    assert len(built) == 2 and [p["turns"] for p in again][-1] == ["passage-1"]
    (args.out / "prompts.made").unlink()  # a list written before lists recorded what they were built from
    head_data.stage_prompts(args, None, one + [{"key": "passage-1"}])
    assert len(built) == 3
    head_data.stage_prompts(args, None, one + [{"key": "passage-1"}])
    assert len(built) == 3


def test_only_answers_the_named_sources(tmp_path, monkeypatch):
    prompts = [_prompt("a-0", ["a prompt of the first source"]) | {"source": "a"},
               _prompt("b-0", ["a prompt of the second source"]) | {"source": "b"}]
    asked = _stand_in_verifier(monkeypatch)
    head_data.stage_answers(_args(tmp_path, only={"b"}), _Tok(), prompts)
    assert asked == ["a prompt of the second source"]


def test_long_passage_prompts_join_several_passages_and_ask_about_one_of_them():
    """Summarisation joins passages of one genre; RAG asks a question over several titled documents."""
    import random

    items = [{"family": f"verifier-passages/g{g}", "text": f"passage {g}-{i} " + "word " * 50,
              "topic": f"topic {g}-{i}"} for g in range(3) for i in range(6)]
    prompts = head_prompts.long_passage_prompts(random.Random(0), items, 40)
    assert len(prompts) == 40 and {p["kind"] for p in prompts} == {"summarization", "rag"}
    for p in prompts:
        text = p["turns"][0]
        used = [it for it in items if it["text"] in text]
        assert 2 <= len(used) <= 4 and p["source"] == "long-passages"
        if p["kind"] == "summarization":  # one article: one genre, the family's
            assert {it["family"] for it in used} == {p["family"].removeprefix("long-")}
        else:  # each document under its title; the family is a document's genre
            assert all(it["topic"] in text for it in used) and "Question: " in text
            assert p["family"].removeprefix("long-") in {it["family"] for it in used}
    assert head_prompts.long_passage_prompts(random.Random(0), items[:3], 5) == []  # no genre with enough passages
