"""``specrt build DIR``: TensorRT engines from an engine directory's ONNX graphs.  NOT YET RUN ON HARDWARE.

One optimization profile per stage (``runtime.tensorrt_plan.plan_profiles``): draft decode (1 and 2
tokens), every verification width k + 1 with min = opt = max, and a dynamic prefill profile.
``past_length`` is a shape tensor whose value range is [0, max_context - n]; for a bucketed export
(``--attention bucketed``) ``bucket_length`` is the shape tensor, ranging over the context buckets,
and ``past_length`` is data -- the form CUDA-graph replay needs.  A timing cache is
reused across builds.  The engine file, the profile table, the TensorRT version and the GPU's
compute capability are added to the manifest (hashes recomputed); the runtime refuses an engine
built for another TensorRT version or GPU.  Written against the TensorRT 10 Python API; TensorRT
cannot be installed where this was written, so it has not been executed.
"""
from __future__ import annotations

import json
from pathlib import Path

from specrt.runtime.errors import EngineDirError
from specrt.runtime.manifest import MANIFEST, load_manifest, sha256_file, validate_manifest
from specrt.runtime.tensorrt_plan import check_profile_index, past_length_range, plan_profiles, require_tensorrt_graph
from tqdm.auto import tqdm


def build_engines(engine_dir: str | Path, fp16: bool = False, bf16: bool = False,
                  timing_cache: str | Path | None = None, workspace_gb: float = 4.0, force: bool = False) -> None:
    root = Path(engine_dir)
    m = load_manifest(root)
    for spec in (s for s in (m.target, m.draft) if s is not None):
        require_tensorrt_graph(spec)
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError as e:
        raise EngineDirError(f"`specrt build` needs TensorRT and cuda-python ({e}). Install them from NVIDIA's "
                             "index (pip install tensorrt cuda-python) on the GPU machine that will run the engine.") from None
    from specrt.runtime.cuda_graphs import check

    data = json.loads((root / MANIFEST).read_text())
    props = check(cudart.cudaGetDeviceProperties(0))
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = Path(timing_cache) if timing_cache else root / "tensorrt.timing_cache"
    for spec in tqdm([s for s in (m.target, m.draft) if s is not None], desc="TensorRT build", unit="model"):
        out = root / f"{spec.role}.plan"
        if out.exists() and not force:
            raise EngineDirError(f"{out} exists; pass --force to rebuild")
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(spec.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineDirError(f"TensorRT cannot parse {spec.path.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if bf16:
            config.set_flag(trt.BuilderFlag.BF16)
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        kv = spec.kv
        max_ctx = kv.buffer_shape[2]
        profiles = plan_profiles(spec.role, m.k_values, max_ctx, kind=spec.kind)
        for index, p in enumerate(profiles):
            prof = builder.create_optimization_profile()
            prof.set_shape(kv.input_ids, (1, p.n_min), (1, p.n_opt), (1, p.n_max))
            if kv.bucket_length:  # shapes follow the bucket; past_length is data
                buckets = kv.context_buckets
                prof.set_shape_input(kv.bucket_length, (buckets[0],), (buckets[len(buckets) // 2],), (buckets[-1],))
            else:  # every position a step of this profile's widths can start at
                lo, opt, hi = past_length_range(p, max_ctx)
                prof.set_shape_input(kv.past_length, (lo,), (opt,), (hi,))
            for name in kv.key_buffers + kv.value_buffers:
                prof.set_shape(name, kv.buffer_shape, kv.buffer_shape, kv.buffer_shape)
            check_profile_index(config.add_optimization_profile(prof), index)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise EngineDirError(f"TensorRT failed to build {spec.role}; see the log above")
        out.write_bytes(bytes(blob))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        data["models"][spec.role]["tensorrt"] = {
            "file": out.name, "tensorrt_version": trt.__version__,
            "compute_capability": [props.major, props.minor],
            "precision": "bf16" if bf16 else "fp16" if fp16 else "fp32",
            "profiles": [p.__dict__ for p in profiles],
        }
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            data["files"][p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    validate_manifest(data)
    (root / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")
