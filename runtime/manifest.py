"""Read and validate an engine directory's ``manifest.json``.

The manifest is the only thing the runtime knows about a model: file names,
tensor names, KV-cache layout, compiled k values, tokenizer.  It is validated
against ``specrt/engines/manifest.schema.json`` and every file's SHA-256 is
checked before anything is opened, so a corrupt, foreign or half-written
directory fails here with a message that says what to do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
from specrt.engines import FORMAT_NAME, SUPPORTED_FORMAT_VERSIONS, manifest_schema
from specrt.runtime.backend import PREFILL_CHUNK  # a prefill pass's [rows, vocab] logits are part of the memory plan
from specrt.runtime.errors import EngineDirError
from specrt.runtime.onnx_scan import OnnxScanError, external_locations

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_REEXPORT = "Re-export it with `specrt export --target T --draft D --out DIR --force`."


@dataclass(frozen=True)
class KVSpec:
    """Names of the step's tensors, and the static cache buffer shape [1, kv_heads, max_context, head_dim]."""

    buffer_shape: tuple[int, int, int, int]
    input_ids: str
    past_length: str
    logits: str
    key_buffers: tuple[str, ...]
    value_buffers: tuple[str, ...]
    new_keys: tuple[str, ...]
    new_values: tuple[str, ...]
    # "write-new": outputs hold the n new entries, the caller copies them in at past_length.
    # "in-place": outputs are the buffers themselves (bind them to the same memory); the graph writes.
    update: str = "write-new"
    # "concat-bucketed" graphs: the input that takes the context bucket, and the buckets
    bucket_length: str | None = None
    context_buckets: tuple[int, ...] = ()
    # tree passes (kv_cache.tree): each row's position, and the additive bias among the n new rows
    position_ids: str | None = None
    tree_bias: str | None = None
    # kv_cache.logits_from: the int64 [1] input that limits the logits to rows [logits_from, n) (prefill: n - 1)
    logits_from: str | None = None

    @property
    def in_place(self) -> bool:
        return self.update == "in-place"

    @property
    def tree(self) -> bool:
        return self.position_ids is not None


@dataclass(frozen=True)
class ModelSpec:
    role: str  # "target" or "draft"
    path: Path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    vocab_size: int
    kv: KVSpec
    raw: dict[str, Any]

    @property
    def min_rows(self) -> int:
        """Rows every pass must have for row-invariant logits (measured at export; 2 = pad 1-token steps)."""
        return (self.raw.get("batch_invariance") or {}).get("min_rows") or 1

    @property
    def kind(self) -> str:
        """``model`` (an autoregressive language model) or ``feature-head`` (reads the target's features)."""
        return self.raw.get("kind", "model")

    @property
    def features(self) -> dict | None:
        """A target's extra output of hidden states for a feature head: {output, layers, size}."""
        return self.raw.get("features")

    @property
    def batch_graph(self) -> ModelSpec | None:
        """The target's batch form (``target-batch.onnx``: one cache slot per sequence, no tree inputs), or None."""
        record = self.raw.get("batch_graph")
        if not record:
            return None
        kv = dataclasses.replace(self.kv, position_ids=None, tree_bias=None)
        raw = {key: v for key, v in self.raw.items() if key != "prefill_graph"}  # a prefill graph runs one sequence
        return dataclasses.replace(self, path=self.path.parent / record["file"], kv=kv, raw=raw)

    @property
    def prefill_graph(self) -> ModelSpec | None:
        """The target's prefill form (``models.target.prefill_graph``: the same interface and weights, computed
        another way; a runtime may run prefill chunks through it), or None."""
        record = self.raw.get("prefill_graph")
        if not record:
            return None
        raw = {key: v for key, v in self.raw.items() if key not in ("prefill_graph", "batch_graph")}
        return dataclasses.replace(self, path=self.path.parent / record["file"], raw=raw)

    @property
    def prefill_graph_scheme(self) -> str | None:
        """How the prefill graph computes: ``int8-rows`` (weights of its own, integer GEMM) or ``matmulnbits`` (the
        target's MatMulNBits weights at another accuracy level; manifests before the key mean this); None without
        one."""
        record = self.raw.get("prefill_graph")
        return None if not record else record.get("scheme", "matmulnbits")

    @property
    def feature_head(self) -> dict | None:
        """A feature head's extra tensors: {hidden_input, features_input, select_input, hidden_output,
        hidden_size, feature_size, draft_vocab (file), target_features_layers}."""
        return self.raw.get("feature_head")


@dataclass(frozen=True)
class Manifest:
    root: Path
    target: ModelSpec
    draft: ModelSpec | None  # None: a target-only engine (context drafters only)
    k_values: tuple[int, ...]
    max_context: int
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    tokenizer_json: Path
    chat_template: str | None
    add_bos_token: bool
    raw: dict[str, Any]
    datastore: Path | None = None  # the suffix drafter's static table shipped in the directory, or None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def validate_manifest(data: Any) -> None:
    """Raise EngineDirError if ``data`` does not follow the schema (format versions 1 and 2)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise EngineDirError(
            f"not a specrt engine manifest (format={data.get('format') if isinstance(data, dict) else None!r}, "
            f"expected {FORMAT_NAME!r}). Point at a directory written by `specrt export`."
        )
    if data.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise EngineDirError(
            f"engine format version {data.get('format_version')!r} is not supported by this specrt "
            f"(supports {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}). {_REEXPORT}"
        )
    try:
        error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    except RecursionError:
        raise EngineDirError(f"manifest.json is nested too deeply to be a manifest. {_REEXPORT}") from None
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise EngineDirError(f"manifest.json is invalid at {where!r}: {error.message[:300]}. {_REEXPORT}")
    pair = data["pair"]
    if max(pair["k_values"]) + 2 > pair["max_context"]:
        raise EngineDirError(f"manifest.json: max_context {pair['max_context']} leaves no room for k="
                             f"{max(pair['k_values'])}. {_REEXPORT}")
    vocab = data["models"]["target"]["vocab_size"]
    special = [*pair["eos_token_ids"], *([pair["bos_token_id"]] if pair.get("bos_token_id") is not None else [])]
    if any(t >= vocab for t in special):
        raise EngineDirError(f"manifest.json: special token ids {special} must be below the target's vocab_size "
                             f"{vocab}. {_REEXPORT}")
    folded: dict[str, str] = {}
    for name in data["files"]:
        if name.casefold() in folded:
            raise EngineDirError(f"manifest.json: files {folded[name.casefold()]!r} and {name!r} differ only in "
                                 f"case. {_REEXPORT}")
        folded[name.casefold()] = name
    if "datastore" in data and data["datastore"]["file"] not in data["files"]:
        raise EngineDirError(f"manifest.json: datastore/file {data['datastore']['file']!r} is not listed in files. "
                             f"{_REEXPORT}")
    tok = data["tokenizer"]
    for name in [tok["tokenizer_json"], *tok["files"]]:
        if name not in data["files"]:
            raise EngineDirError(f"manifest.json: tokenizer file {name!r} is not listed in files. {_REEXPORT}")
    for role in data["models"]:
        m = data["models"][role]
        kv = m["kv_cache"]
        n = m["num_layers"]
        for key in ("key_buffers", "value_buffers", "new_keys", "new_values"):
            if len(kv[key]) != n:
                raise EngineDirError(f"manifest.json: models/{role}/kv_cache/{key} has {len(kv[key])} names "
                                     f"for {n} layers. {_REEXPORT}")
        # Version 2 states how the step updates the cache; version 1 predates in-place graphs; version 3 adds
        # optional drafts, feature heads and tree inputs; version 4 the logits_from input.
        if data["format_version"] >= 2 and "update" not in kv:
            raise EngineDirError(f"manifest.json: models/{role}/kv_cache/update is required in format version 2 "
                                 f"(\"write-new\" or \"in-place\"). {_REEXPORT}")
        if data["format_version"] == 1 and kv.get("update", "write-new") != "write-new":
            raise EngineDirError(f"manifest.json: models/{role}/kv_cache/update {kv['update']!r} needs format "
                                 f"version 2. {_REEXPORT}")
        if data["format_version"] < 3 and ("draft" not in data["models"] or m.get("kind") or "tree" in kv
                                           or m.get("features")):
            raise EngineDirError(f"manifest.json: a missing draft, feature heads and tree passes need format "
                                 f"version 3. {_REEXPORT}")
        if "logits_from" in kv:
            if data["format_version"] < 4 or kv.get("update") != "in-place":
                raise EngineDirError(f"manifest.json: models/{role}/kv_cache/logits_from needs format version 4 "
                                     f"and an in-place graph. {_REEXPORT}")
            head = m.get("feature_head") or {}
            others = [kv["input_ids"], kv["past_length"], *kv["key_buffers"], *kv["value_buffers"],
                      *(kv.get("tree") or {}).values(),
                      *(head.get(k) for k in ("hidden_input", "features_input", "select_input") if head.get(k))]
            if kv["logits_from"] in others:
                raise EngineDirError(f"manifest.json: models/{role}/kv_cache/logits_from names another input "
                                     f"({kv['logits_from']!r}). {_REEXPORT}")
        if "bucket_length" in kv and (not kv.get("context_buckets")
                                      or kv["context_buckets"][-1] != data["pair"]["max_context"]
                                      or kv["context_buckets"] != sorted(kv["context_buckets"])):
            raise EngineDirError(f"manifest.json: models/{role}/kv_cache/context_buckets must ascend to max_context "
                                 f"{data['pair']['max_context']}. {_REEXPORT}")
        if kv["buffer_shape"][1:] != [m["num_kv_heads"], data["pair"]["max_context"], m["head_dim"]]:
            raise EngineDirError(f"manifest.json: models/{role}/kv_cache/buffer_shape {kv['buffer_shape']} disagrees "
                                 f"with num_kv_heads/max_context/head_dim. {_REEXPORT}")
        if m["file"] not in data["files"]:
            raise EngineDirError(f"manifest.json: models/{role}/file {m['file']!r} is not listed in files. {_REEXPORT}")
        if m.get("external_data") and m["external_data"] not in data["files"]:
            raise EngineDirError(f"manifest.json: models/{role}/external_data {m['external_data']!r} is not listed "
                                 f"in files. {_REEXPORT}")
        if m.get("kind", "model") == "feature-head":
            head = m.get("feature_head")
            target_features = data["models"]["target"].get("features")
            if role != "draft" or not head or not target_features:
                raise EngineDirError(f"manifest.json: a feature head must be models/draft with a feature_head entry, "
                                     f"and the target must declare its features output. {_REEXPORT}")
            if head["feature_size"] != target_features["size"] or head["layers"] != target_features["layers"]:
                raise EngineDirError(f"manifest.json: the feature head reads layers {head['layers']} "
                                     f"({head['feature_size']} values) but the target outputs layers "
                                     f"{target_features['layers']} ({target_features['size']}). {_REEXPORT}")
            if head["draft_vocab"] not in data["files"]:
                raise EngineDirError(f"manifest.json: the draft vocabulary {head['draft_vocab']!r} is not listed in "
                                     f"files. {_REEXPORT}")
        if "prefill_graph" in m:
            record = m["prefill_graph"]
            if role != "target" or kv.get("update") != "in-place":
                raise EngineDirError(f"manifest.json: models/{role}/prefill_graph belongs to an in-place target "
                                     f"graph. {_REEXPORT}")
            for key in ("file", "external_data"):
                if record.get(key) and record[key] not in data["files"]:
                    raise EngineDirError(f"manifest.json: models/{role}/prefill_graph/{key} {record[key]!r} is not "
                                         f"listed in files. {_REEXPORT}")
            if record["file"] in (m["file"], (m.get("batch_graph") or {}).get("file")):
                raise EngineDirError(f"manifest.json: models/{role}/prefill_graph/file must be a graph of its own. "
                                     f"{_REEXPORT}")
        if "tree" in kv and kv.get("update") != "in-place":
            raise EngineDirError(f"manifest.json: models/{role}/kv_cache/tree needs an in-place cache (the accepted "
                                 f"path is compacted inside the buffers). {_REEXPORT}")
        if kv["buffer_shape"][0] != 1:
            raise EngineDirError(f"manifest.json: models/{role}/kv_cache/buffer_shape must have batch 1, got "
                                 f"{kv['buffer_shape']}. {_REEXPORT}")


@lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    """The manifest schema, where "integer" means a JSON integer: 2.0 or true is not a layer count."""
    base = jsonschema.validators.validator_for(manifest_schema())
    strict = base.TYPE_CHECKER.redefine(
        "integer", lambda checker, x: isinstance(x, int) and not isinstance(x, bool)).redefine(
        "number", lambda checker, x: isinstance(x, (int, float)) and not isinstance(x, bool))
    return jsonschema.validators.extend(base, type_checker=strict)(manifest_schema())


def read_json(path: Path, what: str = "manifest.json") -> Any:
    """Strict JSON from an untrusted file: bounded size, no NaN/Infinity, no duplicated keys."""
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise EngineDirError(f"{what} is {size:,} bytes, more than any manifest ({MAX_MANIFEST_BYTES:,}). {_REEXPORT}")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise EngineDirError(f"{what} has the key {dup!r} twice in one object. {_REEXPORT}")
        return dict(pairs)

    def no_constants(name):
        raise EngineDirError(f"{what} contains {name}, which is not JSON. {_REEXPORT}")

    try:
        return json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=no_duplicates,
                          parse_constant=no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineDirError(f"{path} is not valid JSON ({e}). {_REEXPORT}") from None
    except RecursionError:
        raise EngineDirError(f"{what} is nested too deeply to be a manifest. {_REEXPORT}") from None


def machine_memory() -> int:
    """Bytes this process can hold: physical memory, or the cgroup limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def memory_plan(data: dict) -> dict[str, int]:
    """Bytes loading this directory will take: weights (file sizes), KV caches, logits buffers."""
    k_max = max(data["pair"]["k_values"])
    plan = {"files": sum(meta["bytes"] for meta in data["files"].values())}
    for role, m in data["models"].items():
        _, kv_heads, ctx, head_dim = m["kv_cache"]["buffer_shape"]
        plan[f"{role} KV cache"] = 2 * m["num_layers"] * kv_heads * ctx * head_dim * _DTYPE_BYTES.get(m["dtype"], 4)
        rows = (k_max + 1) * (k_max + 2) // 2 + PREFILL_CHUNK + 2 * k_max  # logits per width, prefill, q rows
        plan[f"{role} logits buffers"] = rows * m["vocab_size"] * 8
    return plan


def check_memory(data: dict, available: int | None = None) -> None:
    plan = memory_plan(data)
    available = machine_memory() if available is None else available
    if sum(plan.values()) > available:
        parts = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in plan.items())
        raise EngineDirError(f"this engine directory needs {sum(plan.values()) / 2**30:.1f} GiB ({parts}) but this "
                             f"machine has {available / 2**30:.1f} GiB; nothing was allocated. Export it with a "
                             "smaller --max-context, or load it on a larger machine.")


def load_manifest(root: str | Path, check_hashes: bool = True) -> Manifest:
    root = Path(root)
    if not root.is_dir():
        raise EngineDirError(f"engine directory {str(root)!r} does not exist. Create one with `specrt export`.")
    path = root / MANIFEST
    if not path.is_file():
        raise EngineDirError(f"{str(root)!r} has no manifest.json, so it is not an engine directory "
                             f"(or its export did not finish). {_REEXPORT}")
    data = read_json(path)
    validate_manifest(data)
    check_memory(data)
    real_root = root.resolve()
    for name, meta in data["files"].items():
        f = root / name
        try:
            st = os.lstat(f)
        except FileNotFoundError:
            raise EngineDirError(f"engine file {name!r} listed in the manifest is missing. {_REEXPORT}") from None
        except OSError as e:
            raise EngineDirError(f"engine file {name!r} cannot be read ({e.strerror}). {_REEXPORT}") from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise EngineDirError(f"engine file {name!r} is {'a symbolic link' if stat.S_ISLNK(st.st_mode) else 'not a regular file'}: "
                                 f"an engine directory holds plain files only. {_REEXPORT}")
        if not f.resolve().is_relative_to(real_root):
            raise EngineDirError(f"engine file {name!r} lies outside the engine directory (through a linked "
                                 f"folder). {_REEXPORT}")
        if st.st_size != meta["bytes"]:
            raise EngineDirError(f"engine file {name!r} has {f.stat().st_size} bytes, the manifest says "
                                 f"{meta['bytes']}: the directory is corrupt or was modified. {_REEXPORT}")
        if check_hashes and sha256_file(f) != meta["sha256"]:
            raise EngineDirError(f"engine file {name!r} does not match its SHA-256 in the manifest: the directory "
                                 f"is corrupt or was modified. {_REEXPORT}")
    for m in data["models"].values():
        check_external_data(root, m["file"], data["files"])
        for extra in ("batch_graph", "prefill_graph"):
            if m.get(extra):
                check_external_data(root, m[extra]["file"], data["files"])
    pair, tok = data["pair"], data["tokenizer"]
    return Manifest(
        root=root,
        target=model_spec(root, "target", data),
        draft=model_spec(root, "draft", data) if "draft" in data["models"] else None,
        k_values=tuple(sorted(pair["k_values"])),
        max_context=pair["max_context"],
        eos_token_ids=frozenset(pair["eos_token_ids"]),
        bos_token_id=pair.get("bos_token_id"),
        tokenizer_json=root / tok["tokenizer_json"],
        chat_template=tok.get("chat_template"),
        add_bos_token=tok.get("add_bos_token", False),
        raw=data,
        datastore=root / data["datastore"]["file"] if "datastore" in data else None,
    )


def check_external_data(root: Path, name: str, files: dict) -> None:
    """An ONNX file may read tensor bytes from other files: only from files the manifest lists."""
    try:
        locations = external_locations(root / name)
    except (OnnxScanError, OSError, ValueError) as e:
        raise EngineDirError(f"engine file {name!r} is not a readable ONNX model ({e}). {_REEXPORT}") from None
    for loc in sorted(locations):
        if loc not in files:
            raise EngineDirError(f"engine file {name!r} reads external data from {loc!r}, which is not a file listed "
                                 f"in the manifest (an engine directory may not read files outside itself). "
                                 f"{_REEXPORT}")


def load_draft_vocab(manifest: Manifest) -> Any:
    """A feature head's draft vocabulary: target token ids, one per draft logit (validated, untrusted file)."""
    import numpy as np

    name = manifest.draft.feature_head["draft_vocab"]
    ids = read_json(manifest.root / name, name)
    vocab = manifest.target.vocab_size
    if not isinstance(ids, list) or len(ids) != manifest.draft.vocab_size or \
            not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids) or \
            len(set(ids)) != len(ids):  # a repeated id would make q (the acceptance's) differ from what was drawn
        raise EngineDirError(f"{name} must be a list of {manifest.draft.vocab_size} distinct target token ids in "
                             f"[0, {vocab}). {_REEXPORT}")
    return np.array(ids, dtype=np.int64)


def model_spec(root: Path, role: str, data: dict) -> ModelSpec:
    m = data["models"][role]
    kv = m["kv_cache"]
    return ModelSpec(
        role=role, path=root / m["file"], num_layers=m["num_layers"], num_kv_heads=m["num_kv_heads"],
        head_dim=m["head_dim"], dtype=m["dtype"], vocab_size=m["vocab_size"],
        kv=KVSpec(
            buffer_shape=tuple(kv["buffer_shape"]), input_ids=kv["input_ids"], past_length=kv["past_length"],
            logits=kv["logits"], key_buffers=tuple(kv["key_buffers"]), value_buffers=tuple(kv["value_buffers"]),
            new_keys=tuple(kv["new_keys"]), new_values=tuple(kv["new_values"]),
            update=kv.get("update", "write-new"), bucket_length=kv.get("bucket_length"),
            context_buckets=tuple(kv.get("context_buckets", ())),
            position_ids=(kv.get("tree") or {}).get("position_ids"), tree_bias=(kv.get("tree") or {}).get("bias"),
            logits_from=kv.get("logits_from"),
        ),
        raw=m,
    )
