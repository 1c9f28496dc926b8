"""A static continuation table for the ``suffix`` drafter: what the target itself wrote after short contexts.

Retrieval drafting (REST, arXiv 2311.08252) looks the current context up in a fixed corpus; CREST (arXiv
2408.04678) shows that small, common n-grams carry most of the benefit.  ``Datastore`` keeps exactly that: for
every context of 1..``ngram_max`` tokens that occurs at least ``min_count`` times in the corpus, its most
frequent next token, that token's count and the context's total count -- the same (token, count, total) the
live ``SuffixCache`` answers with, so the suffix drafter's walk and stopping rule apply unchanged.

One ``.npz`` file, four arrays, sorted by key:

    keys       uint64 [E]   a 64-bit hash of the context's n token ids and n (``context_hash``)
    token_ids  int32  [E]   the most frequent next token
    counts     uint32 [E]   how often it followed the context
    totals     uint32 [E]   how often the context was followed by anything
    header     int64  [3]   (FORMAT_VERSION, ngram_max, min_count)

A lookup is one hash and one ``np.searchsorted``: O(log E), nothing proportional to the context.  Two contexts
whose hashes collide (about E^2 / 2^65: ~1e-8 at a million entries) share an entry; that only changes what is
proposed, and proposals are verified by the target, so output never depends on it.

The file is untrusted input: it is read with ``allow_pickle=False``, every array's name, dtype and shape are
checked, keys must be strictly increasing, counts consistent, tokens inside the target's vocabulary, and
members stored uncompressed (as ``save`` writes them: a small file cannot expand into a large one).  Anything
else is a ``GenerationError`` naming the file.  It is read on first use (``Datastore.load`` only checks that
the file exists), whole: np.load cannot memory-map a member of an ``.npz``, and at 20 bytes an entry the table
is a few MB.
"""
from __future__ import annotations

import threading
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from specrt.runtime.errors import GenerationError

FORMAT_VERSION = 1
MASK = (1 << 64) - 1
SEED, MUL = 0x9E3779B97F4A7C15, 0xFF51AFD7ED558CCD  # odd 64-bit constants (golden ratio; murmur3's fmix)
FIELDS = {"keys": np.uint64, "token_ids": np.int32, "counts": np.uint32, "totals": np.uint32}


def context_hash(token_ids: Sequence[int]) -> int:
    """The 64-bit key of a context (its n tokens, and n); ``hash_windows`` computes the same for many."""
    h = (len(token_ids) * SEED) & MASK
    for t in token_ids:
        h = ((h ^ int(t)) * MUL) & MASK
        h ^= h >> 29
    return _finish(h)


def _finish(h):
    # splitmix64's finalizer: every input bit reaches every output bit (python int or uint64 array alike)
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK
    return h ^ (h >> 31)


def hash_windows(tokens: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    """``context_hash(tokens[e - n:e])`` for every e in ``ends`` (each >= n): uint64 [len(ends)]."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the & MASK above does
        h = np.full(len(ends), (n * SEED) & MASK, dtype=np.uint64)
        for j in range(n):
            h = (h ^ tokens[ends - n + j].astype(np.uint64)) * np.uint64(MUL)
            h ^= h >> np.uint64(29)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def _most_frequent(keys: np.ndarray, next_ids: np.ndarray, min_count: int) -> tuple[np.ndarray, ...]:
    """Per distinct key with >= min_count occurrences: (key, its most frequent next id -- the smallest id among
    equals --, that id's count, the key's count).  Keys sorted."""
    if not len(keys):
        return keys, next_ids, next_ids, next_ids
    order = np.lexsort((next_ids, keys))
    keys, next_ids = keys[order], next_ids[order]
    pair = np.flatnonzero(np.r_[True, (keys[1:] != keys[:-1]) | (next_ids[1:] != next_ids[:-1])])
    pair_keys, pair_ids = keys[pair], next_ids[pair]
    pair_counts = np.diff(np.r_[pair, len(keys)])
    first = np.flatnonzero(np.r_[True, pair_keys[1:] != pair_keys[:-1]])  # each key's first pair
    totals = np.add.reduceat(pair_counts, first)
    # within each key (the primary sort key, so the groups start at the same places): highest count first
    best = np.lexsort((pair_ids, -pair_counts, pair_keys))[first]
    keep = totals >= min_count
    return pair_keys[first][keep], pair_ids[best][keep], pair_counts[best][keep], totals[keep]


class Datastore:
    """A frozen table: context (1..ngram_max tokens) -> (most frequent next token, its count, total count)."""

    def __init__(self, arrays: tuple[np.ndarray, ...] | None, ngram_max: int = 0, min_count: int = 0, *,
                 path: Path | None = None, vocab_size: int | None = None):
        """Use ``build`` or ``load``: ``arrays`` (keys, token_ids, counts, totals), or None to read ``path`` on
        first use."""
        self._arrays = arrays
        self._ngram_max, self.min_count = ngram_max, min_count
        self.path, self.vocab_size = path, vocab_size
        self._lock = threading.Lock()

    @classmethod
    def build(cls, sequences: Iterable[Sequence[int] | np.ndarray], ngram_max: int = 4,
              min_count: int = 2) -> Datastore:
        """The table of these token sequences (contexts never cross from one sequence into the next)."""
        if not 1 <= ngram_max <= 16:
            raise ValueError(f"ngram_max must be in [1, 16], got {ngram_max}")
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in sequences]
        tokens = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)  # [T]
        if len(tokens) and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
            raise ValueError(f"token ids must be in [0, 2^31), got {tokens.min()}..{tokens.max()}")
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        # each token's offset inside its own sequence: a context of n tokens ends at offsets >= n
        offset = np.arange(len(tokens)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        parts = []
        for n in range(1, ngram_max + 1):
            ends = np.flatnonzero(offset >= n)
            parts.append(_most_frequent(hash_windows(tokens, ends, n), tokens[ends], min_count))
        keys, token_ids, counts, totals = (np.concatenate([p[i] for p in parts]) for i in range(4))
        order = np.argsort(keys, kind="stable")
        keys, token_ids, counts, totals = keys[order], token_ids[order], counts[order], totals[order]
        unique = np.ones(len(keys), dtype=bool)  # a hash collision across n: keep the shorter context's entry
        unique[1:] = keys[1:] != keys[:-1]
        return cls((keys[unique].astype(np.uint64), token_ids[unique].astype(np.int32),
                    np.minimum(counts[unique], 2**32 - 1).astype(np.uint32),
                    np.minimum(totals[unique], 2**32 - 1).astype(np.uint32)), ngram_max, min_count)

    @classmethod
    def load(cls, path: str | Path, vocab_size: int | None = None) -> Datastore:
        """A datastore read from ``path`` on first use; ``vocab_size``: the target's, which every token must be
        below (a proposal outside the vocabulary would index past the target's logits)."""
        path = Path(path)
        if not path.is_file():
            raise GenerationError(f"{path}: no such datastore file (build one with scripts/build_datastore.py)")
        return cls(None, path=path, vocab_size=vocab_size)

    def save(self, path: str | Path) -> None:
        """Write the table to one uncompressed ``.npz`` (written beside, then renamed: never half a file)."""
        path = Path(path)
        keys, token_ids, counts, totals = self.arrays()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, keys=keys, token_ids=token_ids, counts=counts, totals=totals,
                     header=np.array([FORMAT_VERSION, self.ngram_max, self.min_count], dtype=np.int64))
        tmp.replace(path)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(keys, token_ids, counts, totals), read and checked on the first call."""
        if self._arrays is None:
            with self._lock:
                if self._arrays is None:
                    self._read()
        return self._arrays

    @property
    def ngram_max(self) -> int:
        self.arrays()
        return self._ngram_max

    @property
    def nbytes(self) -> int:
        """Bytes the table holds in memory (what a loaded engine pays for it)."""
        return sum(a.nbytes for a in self.arrays())

    def __len__(self) -> int:
        return len(self.arrays()[0])

    def best(self, context: Sequence[int]) -> tuple[int, int, int] | None:
        """(most frequent next token, its count, total count) of this exact context, or None."""
        keys, token_ids, counts, totals = self.arrays()
        if not 1 <= len(context) <= self._ngram_max:
            return None
        h = context_hash(context)
        i = int(np.searchsorted(keys, np.uint64(h)))
        if i == len(keys) or int(keys[i]) != h:
            return None
        return int(token_ids[i]), int(counts[i]), int(totals[i])

    def _read(self) -> None:
        path = self.path

        def bad(why: str) -> GenerationError:
            return GenerationError(f"{path}: not a valid specrt datastore: {why} (rebuild it with "
                                   "scripts/build_datastore.py)")

        try:
            npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise bad(f"unreadable ({e})") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise bad("not an .npz archive")
        with npz:
            stored = sum(i.file_size for i in npz.zip.infolist())
            if stored > path.stat().st_size:  # a compressed member: check sizes before inflating anything
                raise bad(f"members expand to {stored} bytes from a {path.stat().st_size}-byte file; it must be "
                          "written uncompressed")
            want = {*FIELDS, "header"}
            if set(npz.files) != want:
                raise bad(f"arrays {sorted(npz.files)}, expected {sorted(want)}")
            expected = {**{name: np.dtype(dtype) for name, dtype in FIELDS.items()}, "header": np.dtype(np.int64)}
            for name in want:  # each member's own header first: a small file must not make numpy allocate much
                why = _member_problem(npz.zip, name, expected[name])
                if why:
                    raise bad(f"{name}: {why}")
            try:
                arrays = {name: npz[name] for name in want}
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # object arrays: pickles, refused
                raise bad(f"unreadable array ({e})") from None
        header = arrays["header"]
        if header.dtype != np.int64 or header.shape != (3,):
            raise bad(f"header is {header.dtype} {header.shape}, expected int64 (3,)")
        version, ngram_max, min_count = (int(x) for x in header)
        if version != FORMAT_VERSION:
            raise bad(f"format version {version}, this specrt reads {FORMAT_VERSION}")
        if not 1 <= ngram_max <= 16 or min_count < 1:
            raise bad(f"ngram_max {ngram_max} outside [1, 16] or min_count {min_count} < 1")
        size = len(arrays["keys"]) if arrays["keys"].ndim == 1 else -1
        for name, dtype in FIELDS.items():
            a = arrays[name]
            if a.dtype != np.dtype(dtype) or a.shape != (size,):
                raise bad(f"{name} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} of one shared length")
        keys, token_ids, counts, totals = (arrays[name] for name in FIELDS)
        if size > 1 and not np.all(keys[1:] > keys[:-1]):
            raise bad("keys are not strictly increasing")
        if size and (counts.min() < 1 or np.any(counts > totals)):
            raise bad("counts must satisfy 1 <= count <= total")
        if size and (token_ids.min() < 0 or (self.vocab_size is not None and token_ids.max() >= self.vocab_size)):
            raise bad(f"token ids {token_ids.min()}..{token_ids.max()} outside the target's vocabulary "
                      f"[0, {self.vocab_size})")
        self._ngram_max, self.min_count = ngram_max, min_count
        self._arrays = (keys, token_ids, counts, totals)


def _member_problem(archive: zipfile.ZipFile, name: str, dtype: np.dtype) -> str | None:
    """Why the archive's ``name.npy`` is not a 1-D array of ``dtype`` whose data fits in the member, or None: read
    from its .npy header alone, before numpy allocates the array the header declares."""
    try:
        info = archive.getinfo(name + ".npy")
    except KeyError:
        return "not an .npy member"
    try:
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, got = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _fortran, got = np.lib.format.read_array_header_2_0(f)
            else:
                return f".npy format {version} not supported"
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        return f"unreadable .npy header ({e})"
    if got != dtype or len(shape) != 1:
        return f"{got} {shape}, expected a 1-D {dtype} array"
    if shape[0] * got.itemsize > info.file_size:
        return f"declares {shape[0]} entries, more than its {info.file_size} bytes hold"
    return None
