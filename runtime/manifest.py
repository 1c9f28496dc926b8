"""Read and validate an engine directory's ``manifest.json``.

The manifest is the only thing the runtime knows about a model: file names,
tensor names, KV-cache layout, compiled k values, tokenizer.  It is validated
against ``specrt/engines/manifest.schema.json`` and every file's SHA-256 is
checked before anything is opened, so a corrupt, foreign or half-written
directory fails here with a message that says what to do.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
from specrt.engines import FORMAT_NAME, SUPPORTED_FORMAT_VERSIONS, manifest_schema
from specrt.runtime.errors import EngineDirError

MANIFEST = "manifest.json"
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

    @property
    def in_place(self) -> bool:
        return self.update == "in-place"


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


@dataclass(frozen=True)
class Manifest:
    root: Path
    target: ModelSpec
    draft: ModelSpec
    k_values: tuple[int, ...]
    max_context: int
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    tokenizer_json: Path
    chat_template: str | None
    add_bos_token: bool
    raw: dict[str, Any]


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
        jsonschema.validate(data, manifest_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise EngineDirError(f"manifest.json is invalid at {where}: {e.message}. {_REEXPORT}") from None
    for role in ("target", "draft"):
        m = data["models"][role]
        kv = m["kv_cache"]
        n = m["num_layers"]
        for key in ("key_buffers", "value_buffers", "new_keys", "new_values"):
            if len(kv[key]) != n:
                raise EngineDirError(f"manifest.json: models/{role}/kv_cache/{key} has {len(kv[key])} names "
                                     f"for {n} layers. {_REEXPORT}")
        # Version 2 states how the step updates the cache; version 1 predates in-place graphs.
        if data["format_version"] >= 2 and "update" not in kv:
            raise EngineDirError(f"manifest.json: models/{role}/kv_cache/update is required in format version 2 "
                                 f"(\"write-new\" or \"in-place\"). {_REEXPORT}")
        if data["format_version"] == 1 and kv.get("update", "write-new") != "write-new":
            raise EngineDirError(f"manifest.json: models/{role}/kv_cache/update {kv['update']!r} needs format "
                                 f"version 2. {_REEXPORT}")
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


def load_manifest(root: str | Path, check_hashes: bool = True) -> Manifest:
    root = Path(root)
    if not root.is_dir():
        raise EngineDirError(f"engine directory {str(root)!r} does not exist. Create one with `specrt export`.")
    path = root / MANIFEST
    if not path.is_file():
        raise EngineDirError(f"{str(root)!r} has no manifest.json, so it is not an engine directory "
                             f"(or its export did not finish). {_REEXPORT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineDirError(f"{path} is not valid JSON ({e}). {_REEXPORT}") from None
    validate_manifest(data)
    for name, meta in data["files"].items():
        f = root / name
        if not f.is_file():
            raise EngineDirError(f"engine file {name!r} listed in the manifest is missing. {_REEXPORT}")
        if f.stat().st_size != meta["bytes"]:
            raise EngineDirError(f"engine file {name!r} has {f.stat().st_size} bytes, the manifest says "
                                 f"{meta['bytes']}: the directory is corrupt or was modified. {_REEXPORT}")
        if check_hashes and sha256_file(f) != meta["sha256"]:
            raise EngineDirError(f"engine file {name!r} does not match its SHA-256 in the manifest: the directory "
                                 f"is corrupt or was modified. {_REEXPORT}")
    pair, tok = data["pair"], data["tokenizer"]
    return Manifest(
        root=root,
        target=model_spec(root, "target", data),
        draft=model_spec(root, "draft", data),
        k_values=tuple(sorted(pair["k_values"])),
        max_context=pair["max_context"],
        eos_token_ids=frozenset(pair["eos_token_ids"]),
        bos_token_id=pair.get("bos_token_id"),
        tokenizer_json=root / tok["tokenizer_json"],
        chat_template=tok.get("chat_template"),
        add_bos_token=tok.get("add_bos_token", False),
        raw=data,
    )


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
        ),
        raw=m,
    )
