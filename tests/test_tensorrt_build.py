"""``specrt build`` with the real TensorRT-RTX library, on a CPU: plans for tiny pairs of every family the concat
graph supports, with every static k profile, recorded in a manifest that validates; the parsed networks' inputs
and outputs are the engine contract's.  Building needs no GPU; loading a plan does (tests/test_gpu.py), so no plan
built here is run -- tests/test_backend.py runs the backend's own code with TensorRT faked at the CUDA boundary."""
from __future__ import annotations

import json

import pytest
import tiny
from specrt.runtime import tensorrt_lib
from specrt.runtime.errors import EngineDirError
from specrt.runtime.manifest import MANIFEST, load_manifest
from specrt.runtime.tensorrt_plan import binding_plan, plan_profiles

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    "tensorrt-rtx" not in tensorrt_lib.available(),
    reason="needs TensorRT-RTX (pip install 'specrt[tensorrt]'; make test installs it)")]
K_VALUES = (1, 2, 3, 4, 8)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tokenizer):
    """Tiny concat (and one bucketed) exports of every family the concat graph supports."""
    from specrt.export import export_pair

    root = tmp_path_factory.mktemp("trt")
    out = {}
    for family, attention in (("llama", "concat"), ("mistral", "concat"), ("qwen2", "concat"), ("gpt2", "concat"),
                              ("phi3", "concat"), ("llama", "bucketed")):
        target = tiny.make_checkpoint(root / f"{family}-t", family, seed=1, init_std=0.1, tokenizer=tokenizer)
        draft = tiny.make_checkpoint(root / f"{family}-d", family, seed=2, layers=1, tokenizer=tokenizer)
        name = f"{family}-{attention}"
        export_pair(target, draft, root / name, max_context=64, k_values=K_VALUES, progress=False,
                    attention=attention)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def built(pairs):
    from specrt.export.tensorrt_build import build_engines

    return {name: build_engines(d, flavour="tensorrt-rtx", progress=False) for name, d in pairs.items()}


@pytest.mark.parametrize("name", ["llama-concat", "mistral-concat", "qwen2-concat", "gpt2-concat", "phi3-concat",
                                  "llama-bucketed"])
def test_a_real_plan_per_model_with_every_static_k_profile(pairs, built, name):
    report, m = built[name], load_manifest(pairs[name])  # load_manifest: schema and every file's SHA-256
    assert report.flavour == "tensorrt-rtx" and report.compute_capabilities == list(tensorrt_lib.RTX_PORTABLE)
    for spec in (m.target, m.draft):
        record = spec.raw["tensorrt"]
        plan = pairs[name] / record["file"]
        assert plan.stat().st_size == report.plans[spec.role]["bytes"] > 100_000
        assert record["flavour"] == "tensorrt-rtx" and record["tensorrt_version"] == tensorrt_lib.load().version
        assert record["precision"] == "fp32" and record["compute_capabilities"] == list(tensorrt_lib.RTX_PORTABLE)
        want = [p.__dict__ for p in plan_profiles(spec.role, m.k_values, spec.kv.buffer_shape[2], kind=spec.kind)]
        assert record["profiles"] == want
    verify = {p["k"]: (p["n_min"], p["n_max"]) for p in m.target.raw["tensorrt"]["profiles"] if p["stage"] == "verify"}
    assert verify == {k: (k + 1, k + 1) for k in K_VALUES}  # one static profile per compiled k


@pytest.mark.parametrize("name", ["llama-concat", "gpt2-concat", "llama-bucketed"])
def test_the_parsed_network_is_the_engine_contract(pairs, name):
    """Names, directions and dtypes of the network TensorRT-RTX parses equal the binding plan the backend binds
    (input_ids and past_length stay INT64; the KV buffers and logits fp32)."""
    lib = tensorrt_lib.load("tensorrt-rtx").module
    m = load_manifest(pairs[name])
    for spec in (m.target, m.draft):
        logger = lib.Logger(lib.Logger.ERROR)
        network = lib.Builder(logger).create_network(0)
        assert lib.OnnxParser(network, logger).parse_from_file(str(spec.path))
        have = {network.get_input(i).name: ("in", str(network.get_input(i).dtype)) for i in range(network.num_inputs)}
        have |= {network.get_output(i).name: ("out", str(network.get_output(i).dtype))
                 for i in range(network.num_outputs)}
        dtypes = {"int64": "DataType.INT64", "float32": "DataType.FLOAT"}
        want = {b.name: ("in" if b.is_input else "out", dtypes[b.dtype]) for b in binding_plan(spec, 9)}
        assert have == want


def test_an_impossible_profile_fails_with_a_clear_error(pairs, monkeypatch):
    from specrt.export import tensorrt_build
    from specrt.runtime.tensorrt_plan import Profile

    monkeypatch.setattr(tensorrt_build, "plan_profiles", lambda *a, **kw: [Profile("verify", 4, 5, 3, 2)])
    with pytest.raises(EngineDirError, match="rejected optimization profile 0"):
        tensorrt_build.build_engines(pairs["llama-concat"], flavour="tensorrt-rtx", force=True, progress=False)


def test_what_a_flavour_cannot_do_is_refused_before_building(pairs, built):
    from specrt.export.tensorrt_build import build_engines

    d = pairs["llama-concat"]
    before = json.loads((d / MANIFEST).read_text())
    with pytest.raises(EngineDirError, match="strongly typed: a fp16 plan needs a fp16 ONNX graph"):
        build_engines(d, precision="fp16", flavour="tensorrt-rtx", force=True, progress=False)
    with pytest.raises(EngineDirError, match="cannot build for compute capability 7.0; it builds for 7.5, 8.0"):
        build_engines(d, compute_capabilities=["7.0"], flavour="tensorrt-rtx", force=True, progress=False)
    with pytest.raises(EngineDirError, match="exists; pass --force"):
        build_engines(d, flavour="tensorrt-rtx", progress=False)
    assert json.loads((d / MANIFEST).read_text()) == before  # nothing half-written


def test_a_plan_for_one_gpu_records_it(pairs):
    from specrt.export.tensorrt_build import build_engines

    report = build_engines(pairs["gpt2-concat"], compute_capabilities=["12.0"], flavour="tensorrt-rtx", force=True,
                           progress=False)
    assert report.compute_capabilities == ["12.0"]
    assert load_manifest(pairs["gpt2-concat"]).target.raw["tensorrt"]["compute_capabilities"] == ["12.0"]


def test_a_lean_plan_has_no_one_row_target_profile_and_is_smaller(pairs, tmp_path):
    """TensorRT stores a second weight layout for a 1-row profile; a lean plan leaves the target's out (its 1-row
    passes fall to the prefill profile, which the runtime picks from the recorded table)."""
    import shutil

    from specrt.export.tensorrt_build import build_engines
    from specrt.runtime.tensorrt_plan import recorded_profiles, select_profile

    d = tmp_path / "lean"
    shutil.copytree(pairs["llama-concat"], d)
    full = build_engines(d, flavour="tensorrt-rtx", force=True, progress=False)
    lean = build_engines(d, flavour="tensorrt-rtx", force=True, progress=False, lean=True)
    m = load_manifest(d)
    profiles = recorded_profiles(m.target.raw["tensorrt"])
    assert [p.stage for p in profiles].count("decode") == 0 and profiles[select_profile(profiles, 1)].stage == "prefill"
    assert lean.plans["target"]["bytes"] < full.plans["target"]["bytes"]
    assert lean.plans["draft"]["profiles"] == full.plans["draft"]["profiles"]  # the draft's 1-row pass is its work


def test_without_a_gpu_a_real_plan_is_refused_clearly(pairs, built):
    """The real libraries on a machine without a GPU: loading the plans says why and what to use instead (no
    traceback), from the library and the CLI alike."""
    import subprocess
    import sys

    from specrt.export.tensorrt_build import local_gpu
    from specrt.runtime import Engine

    if local_gpu() is not None:
        pytest.skip("this machine has a GPU: tests/test_gpu.py runs the plans")
    pytest.importorskip("cuda.bindings", reason="needs cuda-python (pip install 'specrt[tensorrt]')")
    with pytest.raises(EngineDirError, match="needs an NVIDIA GPU|not usable here.*onnxruntime backend"):
        Engine.load(pairs["llama-concat"], backend="tensorrt")
    r = subprocess.run([sys.executable, "-m", "specrt.cli", "generate", str(pairs["llama-concat"]), "--prompt-ids",
                        "5,6", "--max-new-tokens", "3", "--backend", "tensorrt"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 2 and "onnxruntime backend" in r.stderr and "Traceback" not in r.stderr
