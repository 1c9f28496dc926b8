"""The GPU path's CPU half: profiles, buckets, binding plans, version checks, graph-cache policy."""
from __future__ import annotations

import pytest
from specrt.runtime.cuda_graphs import GraphCache
from specrt.runtime.errors import EngineDirError, GenerationError
from specrt.runtime.manifest import load_manifest
from specrt.runtime.tensorrt_plan import (
    binding_plan,
    check_engine_compat,
    context_bucket,
    context_buckets,
    graph_key,
    plan_profiles,
    select_profile,
)


def test_profiles_are_static_per_width():
    target = plan_profiles("target", (1, 2, 4, 8))
    assert [(p.stage, p.k, p.n_min, p.n_max) for p in target] == [
        ("prefill", 0, 1, 128), ("decode", 0, 1, 1), ("verify", 1, 2, 2), ("verify", 2, 3, 3), ("verify", 4, 5, 5),
        ("verify", 8, 9, 9)]
    assert all(p.static for p in target if p.stage != "prefill")
    draft = plan_profiles("draft", (1, 2, 4, 8))
    assert [(p.stage, p.n_max) for p in draft] == [("prefill", 128), ("decode", 1), ("decode", 2)]
    assert select_profile(target, 5) == 4 and select_profile(target, 1) == 1
    assert select_profile(target, 5, prefill=True) == 0
    assert select_profile(target, 7) == 0  # no static width 7: the dynamic prefill profile runs it
    with pytest.raises(GenerationError, match=r"verify-k8 \[9, 9, 9\].*specrt build"):
        select_profile(target, 500)


def test_context_buckets_and_graph_keys():
    assert context_buckets(2048) == [64, 128, 256, 512, 1024, 2048]
    assert context_buckets(100) == [64, 100]
    assert [context_bucket(n, 2048) for n in (0, 64, 65, 1000, 2048)] == [64, 64, 128, 1024, 2048]
    p = plan_profiles("target", (4,))[2]
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


def test_engine_for_other_tensorrt_or_gpu_is_refused():
    record = {"tensorrt_version": "10.3.0", "compute_capability": [9, 0]}
    check_engine_compat(record, "10.3.1", (9, 0))
    with pytest.raises(EngineDirError, match="TensorRT 10.3.0.*has 10.5.0.*specrt build"):
        check_engine_compat(record, "10.5.0", (9, 0))
    with pytest.raises(EngineDirError, match="compute capability 9.0.*8.6"):
        check_engine_compat(record, "10.3.0", (8, 6))


class FakeOps:
    def __init__(self, accept_updates=True):
        self.log, self.accept_updates = [], accept_updates

    def begin_capture(self, stream): self.log.append("begin")
    def end_capture(self, stream): self.log.append("end"); return "graph"
    def instantiate(self, graph): self.log.append("instantiate"); return object()
    def update(self, exec_graph, graph): self.log.append("update"); return self.accept_updates
    def launch(self, exec_graph, stream): self.log.append("launch")
    def destroy(self, graph, exec_graph): self.log.append("destroy")


@pytest.mark.parametrize("accept_updates", [True, False])
def test_graph_cache_warms_up_captures_replays_and_rebuilds(accept_updates):
    ops = FakeOps(accept_updates)
    cache = GraphCache(ops, stream="s")
    enqueued = []
    for _ in range(4):
        cache.run(("target", "verify", 4), lambda: enqueued.append(1))
    # 1 eager warm-up, 1 capture (the work enqueued while capturing), then 3 replays
    assert (cache.stats.eager, cache.stats.captures, cache.stats.replays) == (1, 1, 3)
    assert len(enqueued) == 2
    cache.run(("target", "verify", 4), lambda: None, recapture=True)
    if accept_updates:
        assert cache.stats.updates == 1 and cache.stats.rebuilds == 0
    else:
        assert cache.stats.rebuilds == 1
    assert cache.stats.replays == 4
