"""runtime/drafters/datastore.py: the frozen continuation table, its file, and the suffix drafter it seeds."""
from __future__ import annotations

import dataclasses
import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from specrt.runtime import GenerationError
from specrt.runtime.drafters import Datastore, SuffixCache, SuffixDrafter
from specrt.runtime.drafters.datastore import FORMAT_VERSION, context_hash, hash_windows
from specrt.runtime.sampling import SamplingParams

GREEDY, RNG = SamplingParams(), np.random.default_rng(0)


def reference(seqs: list[list[int]], ngram_max: int, min_count: int) -> dict[tuple, tuple[int, int, int]]:
    """The table by brute force: context -> (most frequent next token, smallest on a tie; its count; total)."""
    follow: dict[tuple, Counter] = {}
    for s in seqs:
        for i in range(1, len(s)):
            for n in range(1, min(ngram_max, i) + 1):
                follow.setdefault(tuple(s[i - n:i]), Counter())[s[i]] += 1
    out = {}
    for ctx, c in follow.items():
        total = sum(c.values())
        if total >= min_count:
            token = min(c, key=lambda t: (-c[t], t))
            out[ctx] = (token, c[token], total)
    return out


@settings(max_examples=100, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(0, 5), max_size=25), max_size=6), ngram_max=st.integers(1, 4),
       min_count=st.integers(1, 3))
def test_build_keeps_each_common_contexts_most_frequent_continuation(seqs, ngram_max, min_count):
    store = Datastore.build(seqs, ngram_max=ngram_max, min_count=min_count)
    want = reference(seqs, ngram_max, min_count)
    assert len(store) == len(want)
    for ctx, entry in want.items():
        assert store.best(ctx) == entry
    assert store.best([9]) is None and store.best([]) is None  # unseen; no context at all
    assert store.best([0] * (ngram_max + 1)) is None  # longer than the table holds


def test_one_hash_for_one_context_and_windows_agree():
    tokens = np.array([0, 1, 2**31 - 1, 7, 7, 49151])
    for n in (1, 2, 3):
        ends = np.arange(n, len(tokens))
        assert hash_windows(tokens, ends, n).tolist() == [context_hash(tokens[e - n:e].tolist()) for e in ends]
    assert context_hash([7]) != context_hash([7, 7]) != context_hash([0, 7])  # n is part of the key


def test_save_load_round_trip_is_lazy(tmp_path):
    store = Datastore.build([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4]], ngram_max=3)
    path = tmp_path / "store.npz"
    store.save(path)
    loaded = Datastore.load(path, vocab_size=6)
    assert loaded._arrays is None  # nothing read until first use
    assert loaded.best([1, 2, 3]) == (4, 2, 3) and loaded.best([3]) == (4, 2, 3) and loaded.best([4]) is None
    assert len(loaded) == len(store) and loaded.nbytes == store.nbytes == 20 * len(store)
    assert loaded.ngram_max == 3 and loaded.min_count == 2
    with pytest.raises(GenerationError, match="no such datastore"):
        Datastore.load(tmp_path / "missing.npz")


def arrays(store: Datastore) -> dict[str, np.ndarray]:
    keys, token_ids, counts, totals = store.arrays()
    return {"keys": keys, "token_ids": token_ids, "counts": counts, "totals": totals,
            "header": np.array([FORMAT_VERSION, store.ngram_max, store.min_count], np.int64)}


def swap(field: str, value):
    return lambda a: a | {field: value(a[field])}


HOSTILE = [  # (what is wrong, how to write it, what the error says)
    ("a token as int64", swap("token_ids", lambda x: x.astype(np.int64)), "token_ids: int64 .*expected a 1-D int32"),
    ("keys unsorted", swap("keys", lambda x: x[::-1].copy()), "not strictly increasing"),
    ("a duplicated key", swap("keys", lambda x: np.r_[x[:1], x[:-1]]), "not strictly increasing"),
    ("a pickled object array", swap("counts", lambda x: np.array([{"x": 1}] * len(x), dtype=object)),
     "counts: object .*expected a 1-D uint32"),
    ("a missing array", lambda a: {k: v for k, v in a.items() if k != "totals"}, "expected"),
    ("lengths differ", swap("totals", lambda x: x[:-1]), "one shared length"),
    ("count above total", swap("counts", lambda x: x + 100), "count <= total"),
    ("a token outside the vocabulary", swap("token_ids", lambda x: x + 1000), "outside the target's vocabulary"),
    ("another format version", swap("header", lambda x: np.r_[99, x[1:]]), "format version 99"),
]


@pytest.mark.parametrize("what,write,says", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_file_is_refused_naming_it(tmp_path, what, write, says):
    path = tmp_path / "bad.npz"
    np.savez(path, **write(arrays(Datastore.build([[1, 2, 3, 1, 2, 3, 1, 2, 4]] * 2, ngram_max=3))))
    store = Datastore.load(path, vocab_size=10)
    with pytest.raises(GenerationError, match=f"{path}.*{says}"):
        store.best([1, 2])


@pytest.mark.parametrize("content", [b"not a zip at all", b"PK\x03\x04truncated", b""])
def test_a_file_that_is_no_archive_is_refused(tmp_path, content):
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(GenerationError, match=f"{path}: not a valid specrt datastore"):
        Datastore.load(path).arrays()


def test_a_member_that_inflates_is_refused_before_reading(tmp_path):
    path = tmp_path / "bomb.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros(1 << 20, np.uint64))  # 8 MB of zeros compress to a few KB
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("keys.npy", buf.getvalue())
    with pytest.raises(GenerationError, match="uncompressed"):
        Datastore.load(path).arrays()


def _rewritten(tmp_path, name: str, change) -> Path:
    """A valid datastore's members, ``change``d (a dict of member name -> bytes), written uncompressed as ``name``."""
    Datastore.build([[1, 2, 3, 1, 2, 3, 4]] * 3, ngram_max=3).save(tmp_path / "ok.npz")
    with zipfile.ZipFile(tmp_path / "ok.npz") as z:
        members = {n: z.read(n) for n in z.namelist()}
    change(members)
    with zipfile.ZipFile(tmp_path / name, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return tmp_path / name


def test_a_header_that_declares_more_than_its_member_holds_is_refused_before_numpy_allocates(tmp_path):
    header = io.BytesIO()  # 10**14 entries declared in a 144-byte member: numpy would try to allocate 728 TiB
    np.lib.format.write_array_header_1_0(header, {"descr": "<u8", "fortran_order": False, "shape": (10 ** 14,)})
    path = _rewritten(tmp_path, "huge.npz", lambda m: m.update({"keys.npy": header.getvalue() + bytes(16)}))
    with pytest.raises(GenerationError, match="declares 100000000000000 entries"):
        Datastore.load(path).arrays()


def test_a_member_that_is_no_npy_array_is_refused(tmp_path):
    def raw(members):
        del members["keys.npy"]
        members["keys"] = b"raw bytes"  # numpy hands such a member back as bytes, not an array
    with pytest.raises(GenerationError, match="keys: not an .npy member"):
        Datastore.load(_rewritten(tmp_path, "raw.npz", raw)).arrays()


def test_the_datastore_answers_where_the_live_cache_knows_a_shorter_context():
    store = Datastore.build([[7, 2, 3, 4, 5, 6]] * 3, ngram_max=3)
    prompt = np.array([9, 2, 3, 7, 2, 3])  # live: (2, 3) -> 7 (a 2-token match); stored: (7, 2, 3) -> 4
    d = SuffixDrafter(SuffixCache(), min_confidence=0.5, length_factor=10, datastore=store)
    d.begin(prompt)
    assert d.propose(3, GREEDY, RNG).token_ids.tolist() == [4, 5, 6]
    plain = SuffixDrafter(SuffixCache(), min_confidence=0.5, length_factor=10)
    plain.begin(prompt)
    assert plain.propose(3, GREEDY, RNG).token_ids.tolist() == [7, 2, 3]
    tie = SuffixDrafter(SuffixCache(), min_confidence=0.5, length_factor=10,
                        datastore=Datastore.build([[2, 3, 4]] * 3, ngram_max=2))
    tie.begin(prompt)  # (2, 3) -> 7 live and (2, 3) -> 4 stored: the live cache holds this very context
    assert tie.propose(1, GREEDY, RNG).token_ids.tolist() == [7]
    fresh = SuffixDrafter(SuffixCache(), min_confidence=0.5, datastore=store)
    fresh.begin(np.array([8, 7]))  # nothing live follows 7: the store's (7,) -> 2, then its longer contexts
    assert fresh.propose(8, GREEDY, RNG).token_ids.tolist() == [2, 3, 4]  # 1 + 2 x a 1-token match
    tree = fresh.propose_tree(3, 8, GREEDY, RNG)
    assert tree.token_ids.tolist() == [2, 3, 4] and tree.parents.tolist() == [-1, 0, 1]


@pytest.fixture(scope="module")
def target_only(engines):
    from specrt.runtime import Engine

    engine = Engine.load(engines["target_only"])
    # the tiny target may pick EOS; without it both runs go the full length
    engine.manifest = dataclasses.replace(engine.manifest, eos_token_ids=frozenset())
    return engine


PROMPTS = [[5], [17, 33, 2], list(range(40, 52))]


def test_greedy_output_with_a_datastore_equals_target_only(target_only, engines, tmp_path: Path):
    """Proposals from the datastore are only proposals: right ones save passes, wrong ones are rejected, and
    the output is target-only's either way."""
    from specrt.runtime import Engine

    plain = {tuple(p): target_only.generate(p, max_new_tokens=30, use_draft=False).token_ids for p in PROMPTS}
    vocab = target_only.manifest.target.vocab_size
    right = [list(p) + out for p, out in plain.items()] * 2  # the target's own text: accepted
    wrong = [[(t + 1) % vocab for t in s] for s in right]  # every continuation shifted by one: rejected
    for name, seqs, accepted in (("right", right, True), ("wrong", wrong, False)):
        path = tmp_path / f"{name}.npz"
        Datastore.build(seqs, ngram_max=4).save(path)
        engine = Engine.load(engines["target_only"], datastore=path)
        engine.manifest = target_only.manifest
        proposed = taken = 0
        for p in PROMPTS:
            engine.suffix_cache.clear()  # only the datastore drafts what the prompt does not hold
            r = engine.generate(p, max_new_tokens=30, drafter="suffix", k=4)
            assert r.token_ids == plain[tuple(p)], (name, p)
            proposed, taken = proposed + r.stats.proposed, taken + r.stats.accepted
        assert proposed > 0 and (taken > proposed // 2 if accepted else taken < proposed // 2), (name, taken, proposed)


def test_a_bad_datastore_fails_the_request_before_any_token(engines, tmp_path):
    from specrt.runtime import Engine

    path = tmp_path / "bad.npz"
    path.write_bytes(b"junk")
    engine = Engine.load(engines["target_only"], datastore=path)
    assert engine.generate([5], max_new_tokens=3, drafter="ngram").token_ids  # not read: suffix never ran
    with pytest.raises(GenerationError, match="not a valid specrt datastore"):
        engine.generate([5], max_new_tokens=3, drafter="suffix")


def test_cli_generate_takes_a_datastore(engines, tmp_path):
    import json
    import subprocess
    import sys

    def generate(*args):
        return subprocess.run([sys.executable, "-m", "specrt.cli", "generate", str(engines["target_only"]),
                               "--prompt-ids", "5,17,33", "--max-new-tokens", "12", "--json", *map(str, args)],
                              capture_output=True, text=True, timeout=600, check=False)

    plain = json.loads(generate("--no-draft").stdout)
    good = tmp_path / "good.npz"
    Datastore.build([[5, 17, 33, *plain["token_ids"]]] * 2).save(good)
    seeded = json.loads(generate("--drafter", "suffix", "--k", "4", "--datastore", good).stdout)
    assert seeded["token_ids"] == plain["token_ids"] and seeded["stats"]["accepted"] > 0
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"junk")
    p = generate("--drafter", "suffix", "--datastore", bad)
    assert p.returncode == 2 and f"{bad}: not a valid specrt datastore" in p.stderr and "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def shipped(checkpoints, target_only, tmp_path_factory):
    """(engine directory, the target's greedy answers): a target-only engine exported with a datastore of those
    answers (what `specrt export --datastore` ships)."""
    from specrt.export import export_pair

    plain = {tuple(p): target_only.generate(p, max_new_tokens=30, use_draft=False).token_ids for p in PROMPTS}
    root = tmp_path_factory.mktemp("shipped")
    Datastore.build([list(p) + out for p, out in plain.items()] * 2, ngram_max=4).save(root / "answers.npz")
    export_pair(checkpoints["target"], None, root / "engine", max_context=target_only.manifest.max_context,
                tolerance=1e-4, progress=False, datastore=root / "answers.npz")
    return root / "engine", plain


def cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "specrt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=False)


def test_an_engine_that_ships_a_datastore_drafts_from_it_by_default(shipped, target_only):
    from specrt.runtime import Engine

    path, plain = shipped
    engine = Engine.load(path)
    entry = engine.manifest.raw["datastore"]
    assert entry["file"] == "datastore.npz" and "datastore.npz" in engine.manifest.raw["files"]
    assert entry["entries"] == len(engine.datastore) > 0 and entry["ngram_max"] == 4
    assert engine.defaults["drafter"] == "suffix"  # where a target-only engine would default to ngram
    engine.manifest = target_only.manifest  # no EOS, as in target_only
    proposed = taken = 0
    for p in PROMPTS:
        engine.suffix_cache.clear()
        r = engine.generate(p, max_new_tokens=30)  # nothing named: suffix, drafting from the shipped table
        assert r.token_ids == plain[tuple(p)] and r.stats.drafter == "suffix", p
        proposed, taken = proposed + r.stats.proposed, taken + r.stats.accepted
    assert taken > proposed // 2
    off = Engine.load(path, datastore=False)
    assert off.datastore is None and off.default_drafter == "ngram"
    from specrt.server import App, Config

    assert App(Config(str(path))).engine.default_drafter == "suffix"  # what `specrt serve` loads
    assert App(Config(str(path), datastore=False)).engine.datastore is None  # `specrt serve --no-datastore`
    info = cli("info", path)
    assert info.returncode == 0 and "datastore: datastore.npz" in info.stdout, info.stderr
    assert "a request that names none: suffix" in info.stdout


def test_export_refuses_a_bad_datastore_before_exporting(checkpoints, tmp_path):
    from specrt.export import ExportError, export_pair

    bad = tmp_path / "bad.npz"
    Datastore.build([[1, 70_000, 2]] * 2).save(bad)  # proposes a token beyond the tiny target's vocabulary
    with pytest.raises(ExportError, match="--datastore: .*outside the target's vocabulary"):
        export_pair(checkpoints["target"], None, tmp_path / "engine", max_context=64, progress=False, datastore=bad)
    assert not (tmp_path / "engine").exists()


def test_a_shipped_datastore_that_is_no_table_fails_requests_clearly_and_loses_nothing(shipped, tmp_path):
    """An engine directory is untrusted: a datastore whose hash matches a rewritten manifest but which is no valid
    table loads (it is read lazily) and every request that drafts from it fails with the file named."""
    import json
    import shutil

    from specrt.runtime import Engine
    from specrt.runtime.manifest import sha256_file

    path = tmp_path / "engine"
    shutil.copytree(shipped[0], path)
    (path / "datastore.npz").write_bytes(b"junk")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["datastore.npz"] = {"sha256": sha256_file(path / "datastore.npz"), "bytes": 4}
    (path / "manifest.json").write_text(json.dumps(manifest))
    engine = Engine.load(path)
    with pytest.raises(GenerationError, match="datastore.npz: not a valid specrt datastore"):
        engine.generate([5], max_new_tokens=3)
    assert engine.generate([5], max_new_tokens=3, drafter="ngram").token_ids  # the engine still serves
    assert Engine.load(path, datastore=False).generate([5], max_new_tokens=3).token_ids
    for args in (("info", path), ("generate", path, "--prompt-ids", "5", "--max-new-tokens", "3")):
        p = cli(*args)
        assert p.returncode == 2 and "not a valid specrt datastore" in p.stderr and "Traceback" not in p.stderr
    p = cli("generate", path, "--prompt-ids", "5", "--max-new-tokens", "3", "--no-datastore")
    assert p.returncode == 0, p.stderr
