"""runtime/manifest.py: the schema accepts what export writes and rejects corrupt or foreign directories."""
from __future__ import annotations

import shutil

import pytest
import tiny
from specrt.runtime import Engine, EngineDirError
from specrt.runtime.manifest import load_manifest, validate_manifest

edit = tiny.edit_manifest


def test_good_manifest_validates(engines):
    m = load_manifest(engines["close"])
    assert m.k_values == (1, 2, 4, 8) and m.max_context == 64
    assert m.target.kv.buffer_shape == (1, 2, 64, 16)
    validate_manifest(m.raw)


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.update(format="something-else"), "not a specrt engine manifest"),
    (lambda d: d.update(format_version=99), "format version 99 is not supported"),
    (lambda d: d["models"].pop("target"), "models.*target"),  # the draft is optional, the target is not
    (lambda d: d["pair"].update(k_values=[0]), "pair/k_values/0"),
    (lambda d: d["models"]["target"].update(num_layers="two"), "models/target/num_layers"),
    (lambda d: d["models"]["target"]["kv_cache"]["key_buffers"].pop(), "key_buffers has 1 names for 2 layers"),
    (lambda d: d["models"]["draft"]["kv_cache"].update(buffer_shape=[1, 2, 32, 16]), "buffer_shape"),
    (lambda d: d["files"].update({"../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), "files"),
    (lambda d: d["files"]["target.onnx"].update(sha256="f" * 64), "does not match its SHA-256"),
    (lambda d: d["files"]["target.onnx"].update(bytes=1), "has .* bytes, the manifest says 1"),
    (lambda d: d["models"]["target"]["kv_cache"].pop("update"), "kv_cache/update is required in format version 2"),
    (lambda d: d.update(format_version=1), "update 'in-place' needs format version 2"),
    (lambda d: d.update(format_version=3), "logits_from needs format version 4"),
    (lambda d: d["models"]["target"]["kv_cache"].update(logits_from="past_length"), "logits_from names another"),
    (lambda d: d["models"]["draft"].update(prefill_graph={"file": "draft.onnx", "accuracy_level": 1}),
     "draft/prefill_graph belongs to an in-place target graph"),
    (lambda d: d["models"]["target"].update(prefill_graph={"file": "nope.onnx", "accuracy_level": 1}),
     "prefill_graph/file 'nope.onnx' is not listed"),
    (lambda d: d["models"]["target"].update(prefill_graph={"file": "target.onnx", "accuracy_level": 1}),
     "must be a graph of its own"),
    (lambda d: d["models"]["target"].update(prefill_graph={"file": "draft.onnx", "accuracy_level": 7}),
     "prefill_graph/accuracy_level"),
    (lambda d: d["models"]["target"].update(prefill_graph={"file": "draft.onnx"}), "'accuracy_level' is a required"),
    (lambda d: d["models"]["target"].update(prefill_graph={"file": "draft.onnx", "scheme": "int8-rows",
                                                           "accuracy_level": 1}), "prefill_graph"),
    (lambda d: d["models"]["target"].update(prefill_graph={"file": "draft.onnx", "scheme": "bf16",
                                                           "accuracy_level": 1}),
     "prefill_graph/scheme"),
    (lambda d: d.update(datastore={"file": "nope.npz"}), "datastore/file 'nope.npz' is not listed"),
    (lambda d: d.update(datastore={"file": "../answers.npz"}), "datastore/file"),
    (lambda d: d.update(datastore={"file": "target.onnx", "run": "python -c 1"}), "datastore"),
])
def test_corrupt_manifests_are_rejected(engine_copy, mutate, match):
    edit(engine_copy, mutate)
    with pytest.raises(EngineDirError, match=match) as e:
        Engine.load(engine_copy)
    assert "specrt export" in str(e.value) or "Re-export" in str(e.value) or "Point at" in str(e.value)


def test_missing_and_garbled_files(engine_copy, tmp_path):
    with pytest.raises(EngineDirError, match="does not exist"):
        Engine.load(tmp_path / "nowhere")
    with pytest.raises(EngineDirError, match="no manifest.json"):
        Engine.load(tmp_path)
    (engine_copy / "draft.onnx").write_bytes(b"not onnx")
    with pytest.raises(EngineDirError, match="draft.onnx"):
        Engine.load(engine_copy)
    (engine_copy / "manifest.json").write_text("{ not json")
    with pytest.raises(EngineDirError, match="not valid JSON"):
        Engine.load(engine_copy)


def test_swapped_model_file_is_caught_by_names(engines, engine_copy):
    """Files from another export with valid hashes recomputed: tensor names are compared on load."""
    from specrt.runtime.manifest import sha256_file

    shutil.copy(engines["random"] / "draft.onnx", engine_copy / "target.onnx")
    f = engine_copy / "target.onnx"
    edit(engine_copy, lambda d: d["files"]["target.onnx"].update(sha256=sha256_file(f), bytes=f.stat().st_size))
    with pytest.raises(EngineDirError, match="target.onnx: tensor names do not match|ONNX Runtime cannot open"):
        Engine.load(engine_copy)


def test_foreign_prefill_graph_is_caught_by_names(engines, engine_copy):
    """A prefill graph from another model (valid hashes, listed): its tensor names are checked when it opens."""
    from specrt.runtime.manifest import sha256_file

    f = engine_copy / "target.prefill.onnx"
    shutil.copy(engines["random"] / "draft.onnx", f)
    edit(engine_copy, lambda d: (d["files"].update(
        {f.name: {"sha256": sha256_file(f), "bytes": f.stat().st_size}}), d["models"]["target"].update(
        prefill_graph={"file": f.name, "accuracy_level": 1})))
    assert load_manifest(engine_copy).target.prefill_graph.path == f
    with pytest.raises(EngineDirError, match="target.prefill.onnx: tensor names do not match"):
        Engine.load(engine_copy, prefill_graph="on")
    Engine.load(engine_copy, prefill_graph="off")  # not opened: the target graph prefills


def test_version_1_manifest_means_write_new(engines, tmp_path):
    """Engine directories written before in-place graphs (format 1, no kv_cache.update) still load."""
    copy = tmp_path / "v1"
    shutil.copytree(engines["close_concat"], copy)
    edit(copy, lambda d: (d.update(format_version=1), [d["models"][r]["kv_cache"].pop("update") for r in d["models"]]))
    engine = Engine.load(copy)
    assert not engine.target_model.spec.kv.in_place and engine.generate([5, 17, 33], max_new_tokens=5).stats.new_tokens == 5
