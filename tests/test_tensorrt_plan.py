"""The GPU path's CPU half: profiles, buckets, binding plans, version checks, graph-cache policy."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from specrt.runtime.backend import PREFILL_CHUNK, ModelStep
from specrt.runtime.cuda_graphs import GraphCache
from specrt.runtime.errors import EngineDirError, GenerationError
from specrt.runtime.manifest import load_manifest
from specrt.runtime.tensorrt_plan import (
    Binding,
    EngineTensor,
    aligned_host_buffer,
    binding_plan,
    check_engine_compat,
    check_engine_tensors,
    check_profile_index,
    context_bucket,
    context_buckets,
    graph_key,
    past_length_range,
    plan_profiles,
    select_profile,
)


def test_profiles_are_static_per_width():
    target = plan_profiles("target", (1, 2, 4, 8), 2048)
    assert [(p.stage, p.k, p.n_min, p.n_max) for p in target] == [
        ("prefill", 0, 1, 256), ("decode", 0, 1, 1), ("verify", 1, 2, 2), ("verify", 2, 3, 3), ("verify", 4, 5, 5),
        ("verify", 8, 9, 9)]
    assert all(p.static for p in target if p.stage != "prefill")
    draft = plan_profiles("draft", (1, 2, 4, 8), 2048)
    assert [(p.stage, p.n_max) for p in draft] == [("prefill", 256), ("decode", 1), ("decode", 2)]
    head = plan_profiles("draft", (1, 2, 4, 8), 2048, kind="feature-head")
    assert [p.n_max for p in head if p.stage == "commit"] == list(range(2, 10))  # commit passes of a + 1 rows
    assert select_profile(target, 5) == 4 and select_profile(target, 1) == 1
    assert select_profile(target, 5, prefill=True) == 0
    assert select_profile(target, 7) == 0  # no static width 7: the dynamic prefill profile runs it
    with pytest.raises(GenerationError, match=r"verify-k8 \[9, 9, 9\].*specrt build"):
        select_profile(target, 500)


def test_context_buckets_and_graph_keys():
    assert context_buckets(2048) == [64, 128, 256, 512, 1024, 2048]
    assert context_buckets(100) == [64, 100]
    assert [context_bucket(n, 2048) for n in (0, 64, 65, 1000, 2048)] == [64, 64, 128, 1024, 2048]
    p = plan_profiles("target", (4,), 2048)[2]
    assert graph_key("target", p, 5, 70, 2048) == ("target", "verify", 4, 5, 128)
    with pytest.raises(ValueError):
        context_bucket(3000, 2048)
    # a bucketed export's own buckets (manifest kv_cache.context_buckets) decide the key
    assert graph_key("target", p, 5, 17, 64, buckets=(16, 32, 64)) == ("target", "verify", 4, 5, 32)
    assert graph_key("target", p, 5, 16, 64, buckets=(16, 32, 64))[-1] == 16
    with pytest.raises(ValueError, match="beyond the largest bucket"):
        graph_key("target", p, 5, 65, 64, buckets=(16, 32, 64))


def test_bucketed_binding_plan_moves_past_length_to_the_device(engines):
    """In the bucketed graph only bucket_length shapes tensors (host); past_length is device data,
    so a CUDA graph captured for a bucket replays at every context inside it."""
    spec = load_manifest(engines["close_bucketed"]).target
    assert spec.kv.context_buckets == (16, 32, 64)
    plan = {b.name: b for b in binding_plan(spec, 9)}
    assert plan["bucket_length"].on_host and not plan["past_length"].on_host
    assert set(plan) == {t["name"] for t in spec.raw["inputs"] + spec.raw["outputs"]}
    concat = {b.name: b for b in binding_plan(load_manifest(engines["close_concat"]).target, 9)}
    assert concat["past_length"].on_host and "bucket_length" not in concat


def test_binding_plan_sizes(engines):
    spec = load_manifest(engines["close_concat"]).target
    plan = {b.name: b for b in binding_plan(spec, 9)}
    assert plan["cache_key.0"].shape == (1, 2, 64, 16) and plan["cache_key.0"].nbytes == 2 * 64 * 16 * 4
    assert plan["logits"].shape == (1, 9, spec.vocab_size)
    assert plan["past_length"].on_host and not plan["input_ids"].on_host
    assert set(plan) == {t["name"] for t in spec.raw["inputs"] + spec.raw["outputs"]}


def test_in_place_engine_is_refused_for_tensorrt_with_the_fix(engines):
    from specrt.export.tensorrt_build import build_engines

    with pytest.raises(EngineDirError, match="GroupQueryAttention.*--attention concat"):
        build_engines(engines["close"])  # refused before TensorRT is even imported
    with pytest.raises(EngineDirError, match="--attention concat"):
        binding_plan(load_manifest(engines["close"]).target, 9)


def test_a_plan_for_another_flavour_version_or_gpu_is_refused():
    trt10 = {"flavour": "tensorrt", "tensorrt_version": "10.3.0", "compute_capabilities": ["9.0"]}
    assert check_engine_compat(trt10, "tensorrt", "10.3.1", (9, 0)) is None
    with pytest.raises(EngineDirError, match="tensorrt 10.3.0.*has 10.5.0.*specrt build"):
        check_engine_compat(trt10, "tensorrt", "10.5.0", (9, 0))
    with pytest.raises(EngineDirError, match="compute capability 9.0, this GPU is 8.6"):
        check_engine_compat(trt10, "tensorrt", "10.3.0", (8, 6))
    with pytest.raises(EngineDirError, match="compute capability 9.0, this GPU is 12.0"):  # TensorRT 10: that GPU only
        check_engine_compat(trt10, "tensorrt", "10.3.0", (12, 0))
    with pytest.raises(EngineDirError, match="built with tensorrt, the runtime loaded tensorrt-rtx"):
        check_engine_compat(trt10, "tensorrt-rtx", "10.3.0", (9, 0))
    rtx = {"flavour": "tensorrt-rtx", "tensorrt_version": "1.7.1.116", "compute_capabilities": ["8.0", "8.6"]}
    assert check_engine_compat(rtx, "tensorrt-rtx", "1.7.0", (8, 6)) is None
    assert check_engine_compat(rtx, "tensorrt-rtx", "1.7.0", (8, 9)) is None  # "and later"
    assert "Hopper" in check_engine_compat(rtx, "tensorrt-rtx", "1.7.0", (9, 0))  # tried, with a note
    with pytest.raises(EngineDirError, match="8.0, 8.6, this GPU is 7.5.*--compute-capability 7.5"):
        check_engine_compat(rtx, "tensorrt-rtx", "1.7.0", (7, 5))
    with pytest.raises(EngineDirError, match="pip install specrt.tensorrt."):
        check_engine_compat(rtx, "tensorrt", "1.7.0", (8, 6))


class FakeOps:
    def __init__(self, accept_updates=True):
        self.log, self.accept_updates = [], accept_updates
        self.capturing = False

    def begin_capture(self, stream): self.log.append("begin"); self.capturing = True
    def end_capture(self, stream): self.log.append("end"); self.capturing = False; return "graph"
    def instantiate(self, graph): self.log.append("instantiate"); return object()
    def update(self, exec_graph, graph): self.log.append("update"); return self.accept_updates
    def launch(self, exec_graph, stream): self.log.append("launch")
    def destroy(self, graph, exec_graph): self.log.append("destroy")
    def synchronize(self, stream): self.log.append("sync")


def enqueue(ops):
    return lambda: ops.log.append("capture-enqueue" if ops.capturing else "enqueue")


@pytest.mark.parametrize("accept_updates", [True, False])
def test_graph_cache_warms_up_captures_replays_and_rebuilds(accept_updates):
    ops = FakeOps(accept_updates)
    cache = GraphCache(ops, stream="s")
    for _ in range(5):
        cache.run(("target", "verify", 4), enqueue(ops))
    # 1 eager warm-up; then the step runs eagerly, the stream drains and the capture records it; 3 replays
    assert (cache.stats.eager, cache.stats.captures, cache.stats.replays) == (2, 1, 3)
    assert ops.log[:7] == ["enqueue", "enqueue", "sync", "begin", "capture-enqueue", "end", "instantiate"]
    cache.run(("target", "verify", 4), enqueue(ops), recapture=True)
    if accept_updates:
        assert cache.stats.updates == 1 and cache.stats.rebuilds == 0
    else:
        assert cache.stats.rebuilds == 1
    assert cache.stats.replays == 3


def test_every_capture_follows_an_eager_run_and_a_sync_also_after_a_profile_switch():
    """trtexec's order, and TensorRT's rule that a profile switch takes effect at the next enqueue: that
    enqueue is eager -- never inside a capture, never skipped by a replay."""
    ops = FakeOps()
    cache = GraphCache(ops, stream="s")
    a, b = ("target", "verify", 4, 5, 64), ("target", "verify", 2, 3, 64)
    for key, fresh in [(a, True), (a, False), (a, False), (b, True), (b, False), (a, True), (a, False), (b, True)]:
        ops.log.append(f"-- {key[2]} fresh={fresh}")
        cache.run(key, enqueue(ops), fresh=fresh)
    log = ops.log
    for i, entry in enumerate(log):
        if entry == "begin":
            assert log[i - 2:i] == ["enqueue", "sync"], log
    # a fresh step (profile just switched) is an eager enqueue, whatever graphs exist
    for i, entry in enumerate(log):
        if entry.endswith("fresh=True"):
            assert log[i + 1] == "enqueue" and (i + 2 == len(log) or log[i + 2].startswith("--")), log
    assert cache.stats.replays == 2 and cache.stats.captures == 2


def test_a_failed_capture_reports_its_own_error_frees_the_graph_and_falls_back_to_eager(caplog):
    ops = FakeOps()
    cache = GraphCache(ops, stream="s")
    calls = []

    def step():
        calls.append(ops.capturing)
        if ops.capturing:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported in a plugin kernel")
    key = ("target", "verify", 4, 5, 64)
    for _ in range(4):
        cache.run(key, step)
    assert cache.stats.capture_failures == 1 and cache.stats.captures == 0 and cache.stats.replays == 0
    assert calls == [False, False, True, False, False]  # warm-up, eager + failed capture, then eager only
    assert "destroy" in ops.log and ops.log.index("destroy") > ops.log.index("end")  # the partial graph freed
    assert "cudaErrorStreamCaptureUnsupported" in caplog.text


@settings(max_examples=200, deadline=None)
@given(k_values=st.lists(st.integers(1, 16), min_size=1, max_size=4, unique=True), extra=st.integers(0, 300),
       kind=st.sampled_from(["model", "feature-head"]))
def test_profile_ranges_are_valid_for_every_max_context(k_values, extra, kind):
    """min <= opt <= max for widths and past_length, down to the smallest max context export allows (k + 2)."""
    max_ctx = max(k_values) + 2 + extra
    for role in ("target", "draft"):
        for p in plan_profiles(role, tuple(k_values), max_ctx, kind=kind):
            assert 1 <= p.n_min <= p.n_opt <= p.n_max <= max_ctx, p
            lo, opt, hi = past_length_range(p, max_ctx)
            assert 0 <= lo <= opt <= hi and hi + p.n_min == max_ctx, (p, lo, opt, hi)


class Recording(ModelStep):
    """Wraps a fake ModelStep and records every pass as (width, position, prefill stage?)."""

    def __init__(self, inner):
        self.inner, self.passes = inner, []
        self.max_context, self.vocab_size = inner.max_context, inner.vocab_size

    @property
    def length(self):
        return self.inner.length

    def forward(self, ids, pos, *, tree=None, inputs=None, last_only=False):
        self.passes.append((len(ids), pos, False))
        return self.inner.forward(ids, pos)

    def extend(self, ids, pos, chunk=PREFILL_CHUNK):
        out = None
        for s in range(0, len(ids), chunk):
            self.passes.append((len(ids[s:s + chunk]), pos + s, True))
            out = self.inner.forward(ids[s:s + chunk], pos + s)[-1]
        return out

    def prefill(self, ids):
        self.inner.length = 0
        return self.extend(ids, 0)

    def set_length(self, n):
        self.inner.set_length(n)


@settings(max_examples=150, deadline=None)
@given(k_values=st.sampled_from([(1, 2, 4, 8), (2, 4), (1,), (3, 5)]), prompt_len=st.integers(1, 30),
       max_new=st.integers(1, 60), extra=st.integers(0, 40), agree=st.sampled_from([0.0, 0.5, 1.0]),
       drafter=st.sampled_from(["model", "ngram", "suffix", "hybrid"]),
       policy=st.sampled_from(["fixed", "adaptive", "budget", "confidence"]))
def test_every_step_the_loop_produces_has_a_profile(k_values, prompt_len, max_new, extra, agree, drafter, policy):
    """Run the real loop with fakes and check each of its passes -- widths from every drafter and policy, at every
    position up to the max context -- against the planned profiles of the model that runs it."""
    import numpy as np
    from fakes import FakeStep
    from specrt.runtime.drafters import HybridDrafter, ModelDrafter, NgramDrafter, SuffixCache, SuffixDrafter
    from specrt.runtime.loop import speculative
    from specrt.runtime.policy import make_policy
    from specrt.runtime.sampling import SamplingParams
    from specrt.runtime.stats import Stats

    max_ctx = max(k_values) + 2 + prompt_len + extra
    target = Recording(FakeStep(1, max_ctx))
    draft = Recording(FakeStep(0, max_ctx, agree_with=target.inner, agree=agree))
    d = {"model": lambda: ModelDrafter(draft), "ngram": lambda: NgramDrafter(1, 3),
         "suffix": lambda: SuffixDrafter(SuffixCache()),
         "hybrid": lambda: HybridDrafter(NgramDrafter(2, 3), ModelDrafter(draft))}[drafter]()
    k = k_values[len(k_values) // 2]
    pol = make_policy(policy, k, k_values, 0.5, 0.7)
    for _ in speculative(target, d, np.arange(prompt_len) % 11, pol, max_new, SamplingParams(),
                         np.random.default_rng(0), Stats()):
        pass
    for role, model in (("target", target), ("draft", draft)):
        profiles = plan_profiles(role, k_values, max_ctx)
        for n, pos, prefill in model.passes:
            assert pos + n <= max_ctx
            p = profiles[select_profile(profiles, n, pos, max_ctx, prefill)]
            assert p.n_min <= n <= p.n_max and pos <= past_length_range(p, max_ctx)[2], (role, n, pos, p)
            if role == "draft" and not prefill:
                assert n in (1, 2), "a draft step outside its static widths"


def test_profile_index_bookkeeping():
    check_profile_index(3, 3)
    with pytest.raises(EngineDirError, match="rejected optimization profile 2.*returned -1"):
        check_profile_index(-1, 2)


def test_engine_tensors_are_compared_with_the_binding_plan(engines):
    spec = load_manifest(engines["close_bucketed"]).target
    plan = binding_plan(spec, 9)
    good = [EngineTensor(b.name, b.dtype, b.is_input, b.on_host and b.is_input, b.on_host) for b in plan]
    check_engine_tensors(good, plan)
    bad = [EngineTensor(t.name, "int32", t.is_input, t.is_shape_tensor, t.on_host) if t.name == "input_ids" else
           EngineTensor(t.name, t.dtype, t.is_input, True, True) if t.name == "past_length" else t for t in good]
    bad = [t for t in bad if not t.name.startswith("cache_value.1")] + [EngineTensor("extra", "float32", False,
                                                                                       False, False)]
    with pytest.raises(EngineDirError) as e:
        check_engine_tensors(bad, plan)
    msg = str(e.value)
    assert "'input_ids' is int32, the plan binds int64" in msg and "'past_length' is a shape tensor" in msg
    assert "missing 'cache_value.1'" in msg and "unexpected 'extra'" in msg


def test_host_shape_buffers_are_256_byte_aligned():
    for _ in range(20):
        buf = aligned_host_buffer(1)
        assert buf.ctypes.data % 256 == 0 and buf.dtype.name == "int64" and buf.shape == (1,)
    assert isinstance(plan_profiles("target", (4,), 64)[0], object) and Binding
