"""``specrt build DIR``: TensorRT plans from an engine directory's ONNX graphs, one static profile per k.

One optimization profile per stage (``runtime.tensorrt_plan.plan_profiles``): draft decode (1 and 2 tokens), every
verification width k + 1 with min = opt = max, and a dynamic prefill profile.  ``past_length`` is a shape tensor
whose value range is [0, max_context - n]; for a bucketed export (``--attention bucketed``) ``bucket_length`` is the
shape tensor, ranging over the context buckets, and ``past_length`` is data -- the form CUDA-graph replay needs.

Two TensorRT flavours, one code path (``runtime/tensorrt_lib.py``):

* **TensorRT-RTX** (``pip install 'specrt[tensorrt]'``) builds ahead of time **with no GPU**, for the compute
  capabilities asked (default: a local GPU's, else NVIDIA's portable set 8.0/8.6/8.9/12.0); its networks are
  strongly typed, so the plan's precision is the graph's (fp32 exports give fp32 plans).  CI builds real plans
  with it for tiny pairs.
* **TensorRT 10** (NVIDIA's index) builds for the GPU it runs on, reusing a timing cache; ``--fp16`` / ``--bf16``
  set its weakly-typed precision flags.

The plan files, the flavour and version, the target compute capabilities, the precision and the profile table go
into the manifest (hashes recomputed); the runtime refuses a plan from another flavour, version or GPU.  What has
and has not run on hardware: docs/gpu.md (no plan built here has been executed: that needs a GPU).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from specrt.runtime import tensorrt_lib
from specrt.runtime.errors import EngineDirError
from specrt.runtime.manifest import MANIFEST, ModelSpec, load_manifest, sha256_file, validate_manifest
from specrt.runtime.tensorrt_plan import (
    Profile,
    check_profile_index,
    past_length_range,
    plan_profiles,
    require_tensorrt_graph,
)
from tqdm.auto import tqdm

log = logging.getLogger(__name__)
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class BuildReport:
    flavour: str
    version: str
    compute_capabilities: list[str]
    plans: dict[str, dict] = field(default_factory=dict)  # role -> {file, bytes, seconds, profiles}


def local_gpu() -> tuple[int, int] | None:
    """The compute capability of CUDA device 0, or None without cuda-python or a GPU (a CPU-only build)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    try:
        err, count = cudart.cudaGetDeviceCount()
        if err != cudart.cudaError_t.cudaSuccess or not count:
            return None
        err, props = cudart.cudaGetDeviceProperties(0)
        return (props.major, props.minor) if err == cudart.cudaError_t.cudaSuccess else None
    except Exception:  # noqa: BLE001 -- no driver, no device: a CPU-only build
        return None


def targets(trt: tensorrt_lib.TensorRT, asked: list[str] | None, gpu: tuple[int, int] | None) -> list[str]:
    """The compute capabilities a plan is built for, as "major.minor" strings."""
    here = f"{gpu[0]}.{gpu[1]}" if gpu else None
    if not trt.builds_without_gpu:  # TensorRT 10: the local GPU, nothing else
        if here is None:
            raise EngineDirError("TensorRT 10 builds on the GPU that will run the plan, and this machine has none "
                                 "(or no cuda-python). Build with TensorRT-RTX, which needs no GPU: "
                                 "pip install 'specrt[tensorrt]'")
        if asked and asked != [here]:
            raise EngineDirError(f"TensorRT 10 builds for this machine's GPU only ({here}), not {', '.join(asked)}; "
                                 "TensorRT-RTX builds for other GPUs")
        return [here]
    if asked:
        for cc in asked:
            trt.compute_capability(cc)  # refused with the supported list
        return list(asked)
    return [here] if here else list(tensorrt_lib.RTX_PORTABLE)


def graph_precision(spec: ModelSpec) -> str:
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(spec.dtype, spec.dtype)


def build_engines(engine_dir: str | Path, precision: str = "fp32", compute_capabilities: list[str] | None = None,
                  flavour: str | None = None, timing_cache: str | Path | None = None, workspace_gb: float = 4.0,
                  force: bool = False, progress: bool = True, lean: bool = False) -> BuildReport:
    """Build a plan per model of ``engine_dir`` and record them in its manifest.  ``precision``: fp32 (the graphs'
    own on either flavour), or fp16 / bf16 (TensorRT 10's builder flags; TensorRT-RTX builds the precision of the
    graph, so it refuses a precision the graph does not have).  ``lean``: no 1-row profile for the target, whose
    second weight layout doubles the plan (``tensorrt_plan.plan_profiles``); its 1-row passes then run under the
    prefill profile (how much slower they are is to be measured on a GPU)."""
    root = Path(engine_dir)
    m = load_manifest(root)
    specs = [s for s in (m.target, m.draft) if s is not None]
    for spec in specs:
        require_tensorrt_graph(spec)
    if precision not in PRECISIONS:
        raise EngineDirError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    trt = tensorrt_lib.load(flavour)
    lib = trt.module
    gpu = local_gpu()
    ccs = targets(trt, compute_capabilities, gpu)
    for spec in specs:
        have = graph_precision(spec)
        if trt.strongly_typed and precision != have:
            raise EngineDirError(f"TensorRT-RTX networks are strongly typed: a {precision} plan needs a {precision} "
                                 f"ONNX graph, and {spec.path.name} is {have}. Build {have}, or use TensorRT 10 "
                                 "(its builder flags lower the precision of an fp32 graph).")
        out = root / f"{spec.role}.plan"
        if out.exists() and not force:
            raise EngineDirError(f"{out} exists; pass --force to rebuild")
    data = json.loads((root / MANIFEST).read_text())
    logger = lib.Logger(lib.Logger.WARNING)
    # a timing cache needs a GPU to time on: TensorRT 10 (always on one); TensorRT-RTX only with a GPU here
    use_cache = gpu is not None
    cache_path = Path(timing_cache) if timing_cache else root / "tensorrt.timing_cache"
    report = BuildReport(trt.flavour, trt.version, ccs)
    for spec in tqdm(specs, desc=f"{trt.flavour} build", unit="model", disable=not progress):
        t0 = time.perf_counter()
        profiles = plan_profiles(spec.role, m.k_values, spec.kv.buffer_shape[2], kind=spec.kind, decode=not lean)
        blob = _build_one(trt, logger, spec, profiles, precision, ccs, cache_path if use_cache else None,
                          workspace_gb)
        out = root / f"{spec.role}.plan"
        out.write_bytes(blob)
        seconds = time.perf_counter() - t0
        data["models"][spec.role]["tensorrt"] = {
            "file": out.name, "flavour": trt.flavour, "tensorrt_version": trt.version,
            "compute_capabilities": ccs, "precision": precision,
            "profiles": [p.__dict__ for p in profiles],
        }
        report.plans[spec.role] = {"file": out.name, "bytes": len(blob), "seconds": round(seconds, 1),
                                   "profiles": len(profiles)}
        log.info("%s: %s (%.0f MB, %d profiles) in %.0f s", spec.role, out.name, len(blob) / 1e6, len(profiles),
                 seconds)
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            data["files"][p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    validate_manifest(data)
    (root / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")
    return report


def _build_one(trt: tensorrt_lib.TensorRT, logger, spec: ModelSpec, profiles: list[Profile], precision: str,
               ccs: list[str], cache_path: Path | None, workspace_gb: float) -> bytes:
    lib = trt.module
    builder = lib.Builder(logger)
    network = builder.create_network(0)
    parser = lib.OnnxParser(network, logger)
    if not parser.parse_from_file(str(spec.path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineDirError(f"TensorRT cannot parse {spec.path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(lib.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not trt.strongly_typed and precision != "fp32":
        config.set_flag(lib.BuilderFlag.FP16 if precision == "fp16" else lib.BuilderFlag.BF16)
    if trt.builds_without_gpu:
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            config.set_compute_capability(trt.compute_capability(cc), i)
    cache = None
    if cache_path is not None:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    kv = spec.kv
    max_ctx = kv.buffer_shape[2]
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
        raise EngineDirError(f"TensorRT failed to build {spec.role} ({spec.path.name}); see the log above")
    if cache is not None:
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(blob)
