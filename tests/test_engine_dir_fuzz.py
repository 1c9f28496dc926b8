"""Hostile engine directories: every one ends in EngineDirError naming the problem, bounded in time and memory.

Targeted cases (symlinks out of the directory, ONNX external data outside it, numbers that would
allocate terabytes, JSON that is not JSON) plus a property-based fuzz of the manifest run in a child
process under an address-space limit (``fuzz_engine_dir.py``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
from specrt.runtime import Engine, EngineDirError
from specrt.runtime.manifest import check_memory, load_manifest, sha256_file

edit = tiny.edit_manifest


def rehash(path, name):
    f = path / name
    edit(path, lambda d: d["files"].__setitem__(name, {"sha256": sha256_file(f), "bytes": f.stat().st_size}))


def test_fuzzed_manifests_end_in_engine_dir_error(engines):
    script = Path(__file__).with_name("fuzz_engine_dir.py")
    examples = int(os.environ.get("SPECRT_FUZZ_EXAMPLES", "300"))
    proc = subprocess.run([sys.executable, str(script), str(engines["close"]), str(examples)], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"fuzzed {examples} manifests" in proc.stdout


def test_symlink_out_of_the_directory_is_refused(engine_copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(engine_copy / "tokenizer.json", outside)
    (engine_copy / "tokenizer.json").unlink()
    (engine_copy / "tokenizer.json").symlink_to(outside)
    with pytest.raises(EngineDirError, match="'tokenizer.json' is a symbolic link"):
        Engine.load(engine_copy)


def test_linked_folder_out_of_the_directory_is_refused(engine_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(engine_copy / "tokenizer.json", elsewhere / "tokenizer.json")
    (engine_copy / "sub").symlink_to(elsewhere)

    def point(d):
        d["files"]["sub/tokenizer.json"] = d["files"].pop("tokenizer.json")
        d["tokenizer"]["tokenizer_json"] = "sub/tokenizer.json"
        d["tokenizer"]["files"] = ["sub/tokenizer.json" if f == "tokenizer.json" else f for f in d["tokenizer"]["files"]]
    edit(engine_copy, point)
    with pytest.raises(EngineDirError, match="outside the engine directory"):
        Engine.load(engine_copy)


def test_a_fifo_is_not_a_file(engine_copy):
    (engine_copy / "tokenizer_config.json").unlink()
    os.mkfifo(engine_copy / "tokenizer_config.json")
    with pytest.raises(EngineDirError, match="not a regular file"):
        Engine.load(engine_copy)  # and does not block reading the pipe


def _external(model_path: Path, location: str, offset: int = 0, length: int = 16) -> None:
    """Move the first initializer of an ONNX file to external data at ``location`` (bytes left as they were)."""
    import onnx

    model = onnx.load(str(model_path))
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    model_path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "unlisted.bin", "link.bin"])
def test_onnx_external_data_outside_the_manifest_is_refused(engine_copy, tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"s" * 64)
    (engine_copy / "unlisted.bin").write_bytes(b"u" * 64)
    (engine_copy / "link.bin").symlink_to(tmp_path / "secret.bin")
    _external(engine_copy / "draft.onnx", location)
    rehash(engine_copy, "draft.onnx")
    with pytest.raises(EngineDirError, match=f"reads external data from '{location}'"):
        Engine.load(engine_copy)


@pytest.mark.parametrize("past_the_end", ["offset", "length"])
def test_external_data_past_the_end_of_a_listed_file_is_a_clear_error(engine_copy, past_the_end):
    """A graph may read tensors from another listed file (an int4 engine's prefill graph reads the target's
    embedding table): a range outside that file is refused with an EngineDirError, not read."""
    size = (engine_copy / "tokenizer.json").stat().st_size
    offset, length = (size + 4096, 16) if past_the_end == "offset" else (0, size + 4096)
    _external(engine_copy / "draft.onnx", "tokenizer.json", offset, length)
    rehash(engine_copy, "draft.onnx")
    with pytest.raises(EngineDirError, match="draft.onnx"):
        Engine.load(engine_copy)


def test_garbage_onnx_is_refused_by_the_scan(engine_copy):
    (engine_copy / "draft.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"x" * 10)
    rehash(engine_copy, "draft.onnx")
    with pytest.raises(EngineDirError, match="not a readable ONNX model"):
        Engine.load(engine_copy)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["pair"].update(max_context=10**12), "max_context.*greater than the maximum"),
    (lambda d: d["models"]["target"].update(vocab_size=10**12), "vocab_size.*greater than the maximum"),
    (lambda d: d["models"]["target"].update(num_layers=2.0), "num_layers.*not of type 'integer'"),
    (lambda d: d["pair"].update(max_context=True), "max_context.*not of type 'integer'"),
    (lambda d: d["pair"].update(eos_token_ids=[10**6]), "special token ids"),
    (lambda d: d["pair"].update(k_values=[64]), "leaves no room for k=64"),
    (lambda d: d["models"]["target"]["kv_cache"]["buffer_shape"].__setitem__(0, 8), "must have batch 1"),
    (lambda d: d["models"]["target"].update(external_data="../x.data"), "external_data"),
    (lambda d: d["files"].update({"TARGET.onnx": d["files"]["target.onnx"]}), "differ only in case"),
    (lambda d: d["tokenizer"].update(files=["nothere.json"]), "tokenizer file 'nothere.json' is not listed"),
    (lambda d: d["models"]["target"].update(architecture="\x1b[31m" * 300), "architecture"),
])
def test_hostile_numbers_and_types(engine_copy, mutate, match):
    edit(engine_copy, mutate)
    with pytest.raises(EngineDirError, match=match):
        Engine.load(engine_copy)


def test_a_context_this_machine_cannot_hold_is_refused_before_allocation(engines):
    """Within the schema's bounds a manifest can still ask for terabytes: refused with the numbers."""
    data = json.loads((engines["close"] / "manifest.json").read_text())
    for role in ("target", "draft"):
        m = data["models"][role]
        m["num_layers"] = 4096
        m["kv_cache"]["buffer_shape"] = [1, 4096, 1 << 24, 4096]
    with pytest.raises(EngineDirError, match=r"needs \d[\d,.]* GiB .*target KV cache .* but this machine has .*nothing "
                                             r"was allocated"):
        check_memory(data)
    check_memory(json.loads((engines["close"] / "manifest.json").read_text()))  # the real one fits
    with pytest.raises(EngineDirError, match="machine has 0.0 GiB"):
        check_memory(json.loads((engines["close"] / "manifest.json").read_text()), available=1000)


@pytest.mark.parametrize("raw, match", [
    ('{"format": "specrt-engine", "format": "x"}', "key 'format' twice"),
    ('{"format": "specrt-engine", "format_version": NaN}', "NaN, which is not JSON"),
    ("[" * 100000 + "]" * 100000, "nested too deeply|not a specrt engine manifest"),
    ('\xff\xfe{}', "not valid JSON"),
])
def test_json_that_is_not_json(engine_copy, raw, match):
    (engine_copy / "manifest.json").write_bytes(raw.encode("latin-1") if raw.startswith("\xff") else raw.encode())
    with pytest.raises(EngineDirError, match=match):
        load_manifest(engine_copy)


def test_an_enormous_manifest_is_not_read(engine_copy):
    with open(engine_copy / "manifest.json", "wb") as f:
        f.truncate(65 << 20)  # sparse: costs nothing to make, would cost 65 MB to read
    with pytest.raises(EngineDirError, match="more than any manifest"):
        load_manifest(engine_copy)


def test_a_graph_that_disagrees_with_its_manifest_is_refused_before_allocating(engines, engine_copy):
    """Files swapped between exports with hashes recomputed: the graph's static dims are checked first."""
    shutil.copy(engines["random"] / "draft.onnx", engine_copy / "draft.onnx")
    rehash(engine_copy, "draft.onnx")
    with pytest.raises(EngineDirError, match="draft.onnx: tensor|draft.onnx: tensor names"):
        Engine.load(engine_copy)
