#!/usr/bin/env python
"""Build the ``suffix`` drafter's datastore (runtime/drafters/datastore.py) from the head data's answer tokens.

Reads the finished shards of ``scripts/head_data.py`` (``shard_*/`` with a ``done`` file; one still being
written has none and is skipped), takes every answer -- each run of tokens the verifier wrote itself (role
1), so prompts and user turns never enter the table -- and writes one ``.npz``:

    python scripts/build_datastore.py --data .cache/head/data --out .cache/datastore/answers.npz
    specrt generate .cache/demo/engine --chat "..." --drafter suffix --datastore .cache/datastore/answers.npz

Only reads under ``--data``: refuses an ``--out`` inside it (head_data.py may be writing there).
"""
from __future__ import annotations

import argparse
import itertools
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(".cache/head/data"), help="head_data.py's --out")
    ap.add_argument("--out", type=Path, default=Path(".cache/datastore/answers.npz"), help="the .npz to write")
    ap.add_argument("--ngram-max", type=int, default=4, help="longest context kept, in tokens (default 4)")
    ap.add_argument("--min-count", type=int, default=2,
                    help="keep a context seen at least this often (default 2: CREST's common n-grams)")
    args = ap.parse_args()
    data, out = args.data.resolve(), args.out.resolve()
    if out.is_relative_to(data):
        ap.error(f"--out {args.out} is inside --data {args.data}: write the datastore elsewhere")
    shards = sorted(p for p in data.glob("shard_*") if (p / "done").is_file())
    if not shards:
        ap.error(f"no finished shards (shard_*/done) under {args.data}")
    sequences = []
    for shard in tqdm(shards, desc="reading shards", unit="shard"):
        sequences += answers(shard)
    tokens = sum(len(s) for s in sequences)
    store = Datastore.build(sequences, ngram_max=args.ngram_max, min_count=args.min_count)
    out.parent.mkdir(parents=True, exist_ok=True)
    store.save(out)
    print(f"{len(shards)} shards, {len(sequences)} answer sequences, {tokens} tokens -> {len(store)} entries "
          f"(contexts of 1-{args.ngram_max} tokens seen >= {args.min_count} times), {store.nbytes} bytes "
          f"({out.stat().st_size} on disk): {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
