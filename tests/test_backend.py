"""The backend contract (``runtime/backend.py``): every backend class against the Protocol, and the same behaviour
through it -- ONNX Runtime for real, TensorRT with its library and CUDA faked at their Python boundary
(``tests/fake_cuda.py``), so the TensorRT backend's own code runs on a CPU."""
from __future__ import annotations

import inspect
import json
import os
import shutil

import fake_cuda
import numpy as np
import pytest
from fakes import FakeStep
from specrt.runtime import Engine
from specrt.runtime.backend import BACKENDS, Model, ModelStep, open_model
from specrt.runtime.errors import EngineDirError, GenerationError
from specrt.runtime.manifest import MANIFEST, load_manifest, sha256_file
from specrt.runtime.ort_backend import GQA_FLASH_OFF_ENV, OrtModel, OrtModelStep, attention_flash, use_prefill_graph
from specrt.runtime.tensorrt_plan import binding_plan, plan_profiles
from specrt.runtime.trt_backend import TrtModel, TrtModelStep

STEP_MEMBERS = ("forward", "keep", "set_length", "prefill", "extend", "features", "output")
STEP_FIELDS = ("spec", "max_context", "vocab_size", "length", "min_rows", "supports_tree", "has_features")


@pytest.mark.parametrize("cls", [OrtModelStep, TrtModelStep, FakeStep])
def test_every_step_class_is_a_model_step(cls):
    assert ModelStep in cls.__mro__  # an explicit subclass: it inherits the defaults of what it lacks
    for name in STEP_MEMBERS:
        member = getattr(cls, name)
        want = inspect.signature(getattr(ModelStep, name))
        have = inspect.signature(member)
        # the same parameters by name and kind (defaults may differ), so every call the loop makes fits
        assert [(p.name, p.kind) for p in have.parameters.values()] == \
            [(p.name, p.kind) for p in want.parameters.values()], (cls.__name__, name, have, want)


@pytest.mark.parametrize("cls", [OrtModel, TrtModel])
def test_every_model_class_makes_steps(cls):
    assert Model in cls.__mro__ and callable(cls.new_step)


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="onnxruntime, tensorrt"):
        open_model(None, "cuda")
    assert BACKENDS == ("onnxruntime", "tensorrt")


def _with_fake_plans(src, dst, flavour: str = "tensorrt") -> None:
    """An engine directory with a TensorRT record per model (the plan files are placeholders the fake engine
    never reads), hashed as ``specrt build`` does."""
    shutil.copytree(src, dst)
    data = json.loads((dst / MANIFEST).read_text())
    m = load_manifest(dst)
    for spec in (m.target, m.draft):
        (dst / f"{spec.role}.plan").write_bytes(b"not a plan")
        data["models"][spec.role]["tensorrt"] = {
            "file": f"{spec.role}.plan", "flavour": flavour,
            "tensorrt_version": fake_cuda.VERSION if flavour == "tensorrt" else fake_cuda.RTX_VERSION,
            "compute_capabilities": ["9.0"] if flavour == "tensorrt" else ["8.6"], "precision": "fp32",
            "profiles": [p.__dict__ for p in plan_profiles(spec.role, m.k_values, spec.kv.buffer_shape[2])]}
    for p in sorted(dst.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            data["files"][p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    (dst / MANIFEST).write_text(json.dumps(data))


def _fake_tensorrt_engine(src, d, monkeypatch, flavour: str = "tensorrt") -> tuple[Engine, fake_cuda.FakeCudart]:
    """``src`` with placeholder plans, loaded on the TensorRT backend of ``flavour``, faked below the CUDA boundary."""
    _with_fake_plans(src, d, flavour)
    m = load_manifest(d)
    n_max = max(p.n_max for p in plan_profiles("target", m.k_values, m.target.kv.buffer_shape[2]))
    cudart = fake_cuda.install(monkeypatch, fake_cuda.FakeEngine(binding_plan(m.target, n_max), m.target.vocab_size),
                               flavour)
    return Engine.load(d, backend="tensorrt"), cudart


@pytest.fixture(params=["onnxruntime", "tensorrt", "tensorrt-rtx"])
def step(request, engines, tmp_path, monkeypatch) -> ModelStep:
    """A target step of the tiny concat engine (the graph both backends run) on each backend: ONNX Runtime for real,
    TensorRT and TensorRT-RTX faked at the CUDA boundary."""
    if request.param == "onnxruntime":
        return Engine.load(engines["close_concat"]).sequence().target
    engine, _ = _fake_tensorrt_engine(engines["close_concat"], tmp_path / "engine", monkeypatch, request.param)
    return engine.sequence().target


def test_the_contract_holds_on_every_backend(step):
    ids = np.array([5, 17, 33, 40, 41, 42, 43, 44], dtype=np.int64)
    assert step.length == 0 and step.max_context > 8 and step.vocab_size > 44 and step.min_rows == 1
    last = step.prefill(ids[:5])
    assert last.shape == (step.vocab_size,) and step.length == 5
    logits = step.forward(ids[5:8], 5)
    assert logits.shape == (3, step.vocab_size) and step.length == 8
    step.keep(5, [0, 1])  # a verification pass's accepted prefix: a length moves
    assert step.length == 7
    step.set_length(4)
    assert step.length == 4
    again = step.forward(ids[4:8], 4, last_only=True)
    assert again[-1].shape == (step.vocab_size,) and step.length == 8
    assert step.extend(ids[:3], 8).shape == (step.vocab_size,) and step.length == 11
    with pytest.raises(ValueError):
        step.set_length(12)  # never forward
    with pytest.raises(ValueError):
        step.min_rows = 3
    if not step.supports_tree:  # a chain-only graph refuses a tree pass and a tree's rows, clearly
        with pytest.raises(EngineDirError, match="tree"):
            step.keep(0, [0, 2])
    if not step.has_features:
        with pytest.raises(EngineDirError, match="features"):
            step.features()


def test_the_fake_tensorrt_target_generates_like_its_logits_say(engines, tmp_path, monkeypatch):
    """Through the whole engine on the TensorRT backend (faked below the CUDA boundary): greedy speculative decoding
    equals target-only decoding, and the KV scatter put every row's entries where the cache expects them."""
    engine, cudart = _fake_tensorrt_engine(engines["close_concat"], tmp_path / "engine", monkeypatch)
    m = engine.manifest
    plain = engine.generate([5, 17, 33], max_new_tokens=12, use_draft=False).token_ids
    assert plain == [(33 + i) % m.target.vocab_size for i in range(1, 13)]  # the fake's (token + 1) rule
    for k in (1, 2, 4):
        assert engine.generate([5, 17, 33], max_new_tokens=12, k=k, drafter="ngram").token_ids == plain
    target = engine.default_sequence.target
    key = target.device_ptr[m.target.kv.key_buffers[0]]
    _, kvh, max_ctx, hd = m.target.kv.buffer_shape
    cache = np.ctypeslib.as_array((fake_cuda.ctypes.c_float * (kvh * max_ctx * hd)).from_address(key))
    cache = cache.reshape(kvh, max_ctx, hd)
    context = [5, 17, 33, *plain][:target.length]
    assert (cache[0, :target.length, 0] == context).all() and cudart.copies > 0


def test_tensorrt_rtx_replays_its_own_cuda_graphs_and_keeps_its_runtime_cache(engines, tmp_path, monkeypatch):
    """TensorRT-RTX: on a bucketed export (every shape fixed per bucket) its built-in CUDA graphs run instead of
    ours, and what it compiled just in time is written beside the plan as each profile is first used; TensorRT 10
    keeps our own capture."""
    engine, _ = _fake_tensorrt_engine(engines["close_bucketed"], tmp_path / "rtx", monkeypatch, "tensorrt-rtx")
    target = engine.default_sequence.target
    assert target.graphs is None and target.context.config.cuda_graph_strategy.name == "WHOLE_GRAPH_CAPTURE"
    plain = engine.generate([5, 17, 33], max_new_tokens=10, use_draft=False).token_ids
    assert engine.generate([5, 17, 33], max_new_tokens=10, k=4, drafter="ngram").token_ids == plain
    cache = tmp_path / "rtx" / "target.plan.runtime_cache"
    assert cache.read_bytes() == b"jit:kernels"
    again, _ = _fake_tensorrt_engine(engines["close_bucketed"], tmp_path / "rtx2", monkeypatch, "tensorrt-rtx")
    shutil.copy(cache, tmp_path / "rtx2" / "target.plan.runtime_cache")
    assert again.sequence().target.context.config.cache.data == b"jit:kernels"  # the next run starts warm
    trt10, _ = _fake_tensorrt_engine(engines["close_bucketed"], tmp_path / "trt10", monkeypatch, "tensorrt")
    seq = trt10.sequence()
    assert seq.target.graphs is not None
    assert trt10.generate([5, 17, 33], max_new_tokens=10, use_draft=False).token_ids == plain


def test_prefill_graph_choice_follows_the_cpu():
    """auto: a prefill graph at fp32 compute where it was measured faster -- x86 without VNNI, or with AMX -- and
    nowhere else; an int8-rows one on every x86 CPU (measured faster on each kind)."""
    assert use_prefill_graph("auto", frozenset({"avx2", "fma"}))[0]
    assert not use_prefill_graph("auto", frozenset({"avx2", "fma", "avx512_vnni"}))[0]
    assert use_prefill_graph("auto", frozenset({"avx2", "fma", "avx512_vnni", "amx_int8", "amx_tile"}))[0]
    assert not use_prefill_graph("auto", frozenset({"avx2", "avx_vnni"}))[0]
    assert not use_prefill_graph("auto", frozenset({"asimd", "asimddp"}))[0]  # ARM: unmeasured
    assert use_prefill_graph("on", frozenset())[0] and not use_prefill_graph("off", frozenset({"avx2"}))[0]
    # an int8-rows prefill graph (weights of its own, integer GEMM): faster on every x86 CPU measured
    for flags in ({"avx2", "fma"}, {"avx2", "avx512_vnni"}, {"avx2", "avx512_vnni", "amx_int8"}):
        assert use_prefill_graph("auto", frozenset(flags), scheme="int8-rows")[0]
    assert not use_prefill_graph("auto", frozenset({"asimd"}), scheme="int8-rows")[0]
    assert not use_prefill_graph("off", frozenset({"avx2"}), scheme="int8-rows")[0]
    with pytest.raises(GenerationError, match="prefill_graph must be one of auto, on, off"):
        use_prefill_graph("yes")


def test_attention_kernel_choice_follows_the_cpu_and_the_environment(monkeypatch):
    """auto: the unfused kernel where it was measured faster (x86 with AVX-512), ONNX Runtime's own choice elsewhere
    and wherever the environment already sets it."""
    monkeypatch.delenv(GQA_FLASH_OFF_ENV, raising=False)
    assert attention_flash("auto", frozenset({"avx2", "avx512f", "avx512_vnni"}))[0] is False
    assert attention_flash("auto", frozenset({"avx2", "fma"}))[0] is None
    assert attention_flash("auto", frozenset({"asimd"}))[0] is None
    assert attention_flash("flash", frozenset())[0] is True and attention_flash("unfused", frozenset())[0] is False
    monkeypatch.setenv(GQA_FLASH_OFF_ENV, "0")
    assert attention_flash("auto", frozenset({"avx512f"}))[0] is None
    with pytest.raises(GenerationError, match="attention_kernel must be one of auto, flash, unfused"):
        attention_flash("fast")


@pytest.mark.parametrize("kernel, seen", [("flash", "0"), ("unfused", "1"), (None, "1")])
def test_the_attention_kernel_reaches_onnx_runtime_while_it_builds_the_session(engines, monkeypatch, kernel, seen):
    """ONNX Runtime reads the kernel from the environment when it builds a session: the variable holds the choice
    then, and afterwards whatever it held before (here the user's "1"); None leaves the user's value."""
    import onnxruntime as ort

    built = []
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        built.append(os.environ.get(GQA_FLASH_OFF_ENV))
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    monkeypatch.setenv(GQA_FLASH_OFF_ENV, "1")
    model = OrtModel(load_manifest(engines["close"]).target, attention_kernel=kernel)
    assert built == [seen] and os.environ[GQA_FLASH_OFF_ENV] == "1"
    assert model.attention == {"flash": "flash", "unfused": "unfused", None: "unfused"}[kernel]
    monkeypatch.delenv(GQA_FLASH_OFF_ENV)
    OrtModel(load_manifest(engines["close"]).target, attention_kernel="flash")
    assert built[-1] == "0" and GQA_FLASH_OFF_ENV not in os.environ
    # a value ONNX Runtime cannot parse is the environment's fault, said so, not the engine directory's
    # a graph without GroupQueryAttention (the concat export) has no kernel to choose
    assert OrtModel(load_manifest(engines["close_concat"]).target, attention_kernel="unfused").attention is None
    monkeypatch.setenv(GQA_FLASH_OFF_ENV, "yes please")
    with pytest.raises(GenerationError, match="Failed to parse environment variable.*Set that variable to 0 or 1"):
        OrtModel(load_manifest(engines["close"]).target)


def test_prefill_graph_on_needs_one(engines):
    with pytest.raises(GenerationError, match="has no prefill graph"):
        Engine.load(engines["close"], prefill_graph="on")
    with pytest.raises(GenerationError, match="prefill_graph must be one of"):
        Engine.load(engines["close"], prefill_graph="fast")
