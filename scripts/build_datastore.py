#!/usr/bin/env python
"""Build the ``suffix`` drafter's datastore (runtime/drafters/datastore.py) from the head data's answer tokens.

``--data`` is either the committed answers (``engines/demo/head-data``, the default: ``answers_*.jsonl.gz``, the
verifier's token ids per assistant turn; seconds, no model needed) or the shards of ``scripts/head_data.py``
(``shard_*/`` with a ``done`` file; one still being written has none and is skipped).  Every answer -- the tokens the
verifier wrote itself, so prompts and user turns never enter the table -- goes into one ``.npz``:

    python scripts/build_datastore.py --out .cache/datastore/answers.npz
    specrt export ... --datastore .cache/datastore/answers.npz     # shipped in the engine: suffix drafts from it
    specrt generate .cache/demo/engine --chat "..." --drafter suffix --datastore .cache/datastore/answers.npz

Only reads under ``--data``: refuses an ``--out`` inside it (head_data.py may be writing there).
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
import sys
from pathlib import Path

import numpy as np
from specrt.runtime.drafters import Datastore
from tqdm.auto import tqdm

ANSWER = 1  # roles.npy: 1 where the verifier wrote the token (scripts/batch_gen.py), 0 for prompt tokens


def answers(shard: Path) -> list[np.ndarray]:
    """Every answer of a shard: the maximal runs of answer tokens inside each conversation."""
    tokens, roles, starts = (np.load(shard / f"{name}.npy", allow_pickle=False)
                             for name in ("tokens", "roles", "starts"))
    if not (len(tokens) == len(roles) == starts[-1] and starts[0] == 0):
        raise ValueError(f"{shard}: tokens {len(tokens)}, roles {len(roles)} and starts ending at {starts[-1]} "
                         "disagree")
    is_answer = roles == ANSWER
    edges = np.zeros(len(tokens) + 1, dtype=bool)  # where a run of answer tokens starts or stops
    edges[starts] = True  # a conversation boundary ends a run even between two answer tokens
    edges[1:-1] |= is_answer[1:] != is_answer[:-1]
    cuts = np.flatnonzero(edges)
    return [tokens[a:b] for a, b in itertools.pairwise(cuts) if is_answer[a]]


def kept_answers(path: Path) -> list[np.ndarray]:
    """Every answer of one committed ``answers_*.jsonl.gz`` file (head_data.py ``--keep``): one per assistant turn."""
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            answers = json.loads(line).get("answers")
            if not isinstance(answers, list) or not all(
                    isinstance(a, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in a)
                    for a in answers):
                raise ValueError(f"{path}:{n}: 'answers' is not a list of token id lists")
            out += [np.array(a, dtype=np.int64) for a in answers if a]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("engines/demo/head-data"),
                    help="the committed answers (answers_*.jsonl.gz: default engines/demo/head-data) or head_data.py's "
                    "--out (shard_*/)")
    ap.add_argument("--out", type=Path, default=Path(".cache/datastore/answers.npz"), help="the .npz to write")
    ap.add_argument("--ngram-max", type=int, default=4, help="longest context kept, in tokens (default 4)")
    ap.add_argument("--min-count", type=int, default=2,
                    help="keep a context seen at least this often (default 2: CREST's common n-grams)")
    args = ap.parse_args()
    data, out = args.data.resolve(), args.out.resolve()
    if out.is_relative_to(data):
        ap.error(f"--out {args.out} is inside --data {args.data}: write the datastore elsewhere")
    shards = sorted(p for p in data.glob("shard_*") if (p / "done").is_file())
    kept = sorted(data.glob("answers_*.jsonl.gz"))
    if not shards and not kept:
        ap.error(f"neither finished shards (shard_*/done) nor answers_*.jsonl.gz under {args.data}")
    sequences = []
    if shards:
        for shard in tqdm(shards, desc="reading shards", unit="shard"):
            sequences += answers(shard)
    else:
        for path in tqdm(kept, desc="reading answers", unit="file"):
            sequences += kept_answers(path)
    tokens = sum(len(s) for s in sequences)
    store = Datastore.build(sequences, ngram_max=args.ngram_max, min_count=args.min_count)
    out.parent.mkdir(parents=True, exist_ok=True)
    store.save(out)
    print(f"{len(shards) or len(kept)} {'shards' if shards else 'answer files'}, {len(sequences)} answer sequences, {tokens} tokens -> {len(store)} entries "
          f"(contexts of 1-{args.ngram_max} tokens seen >= {args.min_count} times), {store.nbytes} bytes "
          f"({out.stat().st_size} on disk): {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
