"""TensorRT planning: optimization profiles, context buckets, graph-cache keys, binding plans and
version checks — everything of the TensorRT path that does not touch a GPU, in plain Python.

Static shapes on every compiled path: the draft runs 1 token (2 when it catches up after an
all-accepted step), the target runs k + 1 for each compiled k, a feature head runs its commit pass
over 1 .. k + 1 rows; each is its own profile with min = opt = max.  Prefill is the one dynamic
profile (1 .. prefill_max tokens), and runs every width without a static profile (a context drafter's
short proposal, a longer catch-up).  Every profile's ``past_length`` range covers every position a
step of its widths can start at, [0, max_context - n_min], so no step the loop can produce falls
outside all profiles (``tests/test_tensorrt_plan.py`` checks this over the loop's own steps).

The step graph reads ``past_length`` entries of the cache: a shape-determining value.  CUDA graphs
are therefore captured per (model, stage, n, context bucket): the bucket is the power of two at or
above the context, and a captured graph is replayed for every length in its bucket only if the
backend pads attention to the bucket (see ``trt_backend``).  Nothing here has run on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from specrt.runtime.backend import PREFILL_CHUNK
from specrt.runtime.errors import EngineDirError, GenerationError
from specrt.runtime.manifest import ModelSpec

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}


@dataclass(frozen=True)
class Profile:
    stage: str  # "prefill" | "decode" | "verify"
    k: int  # draft length for "verify", else 0
    n_min: int
    n_opt: int
    n_max: int

    @property
    def static(self) -> bool:
        return self.n_min == self.n_max


def plan_profiles(role: str, k_values: tuple[int, ...], max_context: int, prefill_max: int = PREFILL_CHUNK,
                  kind: str = "model", decode: bool = True) -> list[Profile]:
    """One optimization profile per stage and width; the index in this list is the TensorRT profile index.

    ``kind`` is the draft's (``model`` or ``feature-head``); ``max_context`` caps the prefill width.  ``decode=False``
    leaves out the target's 1-row profile: TensorRT keeps a second copy of the weights, in another layout, for a
    1-row profile (measured with TensorRT-RTX on the demo target: 560 MB with the prefill profile alone, 1,006 MB
    with a 1-row and a 2-row profile, 578 MB with a 2-row and a 3-row one), so a plan without it stores the
    weights once; its 1-row passes then run under the prefill profile.
    """
    if max_context < max(k_values) + 2:
        raise GenerationError(f"max context {max_context} leaves no room for k={max(k_values)}")
    top = min(prefill_max, max_context)
    profiles = [Profile("prefill", 0, 1, min(64, top), top)]
    if decode or role != "target":
        profiles.append(Profile("decode", 0, 1, 1, 1))
    if role == "draft" and kind == "feature-head":
        # the head's commit pass runs the accepted rows + 1: every width up to the largest k + 1
        profiles += [Profile("commit", 0, n, n, n) for n in range(2, max(k_values) + 2)]
    elif role == "draft":
        profiles.append(Profile("decode", 0, 2, 2, 2))  # catch-up: last proposal + the target's token
    else:
        profiles += [Profile("verify", k, k + 1, k + 1, k + 1) for k in sorted(set(k_values)) if k + 1 > 1]
    return profiles


def recorded_profiles(record: dict) -> list[Profile]:
    """A plan's profiles as its manifest entry lists them, in index order (what ``select_profile`` chooses among)."""
    return [Profile(p["stage"], p["k"], p["n_min"], p["n_opt"], p["n_max"]) for p in record["profiles"]]


def past_length_range(profile: Profile, max_context: int) -> tuple[int, int, int]:
    """[min, opt, max] of ``past_length`` for a profile: every position a step of its widths can start at."""
    hi = max_context - profile.n_min
    if hi < 0:
        raise GenerationError(f"a {profile.n_min}-token step cannot fit a max context of {max_context}")
    return 0, min(hi, max_context // 2), hi


def select_profile(profiles: list[Profile], n: int, pos: int = 0, max_context: int | None = None,
                   prefill: bool = False) -> int:
    """Index of the profile that runs an n-token step at ``pos`` (a static width first, else prefill); the
    error quotes every profile's [min, opt, max]."""
    def fits(p: Profile) -> bool:
        if not p.n_min <= n <= p.n_max:
            return False
        return max_context is None or pos <= past_length_range(p, max_context)[2]
    for i, p in enumerate(profiles):
        if p.stage != "prefill" and not prefill and fits(p):
            return i
    for i, p in enumerate(profiles):
        if p.stage == "prefill" and fits(p):
            return i
    table = ", ".join(f"{p.stage}{'-k' + str(p.k) if p.k else ''} [{p.n_min}, {p.n_opt}, {p.n_max}]" for p in profiles)
    raise GenerationError(f"no TensorRT profile runs {n} tokens at position {pos} (profiles: {table}); rebuild with "
                          f"`specrt build` after re-exporting with the k you need")


def check_profile_index(returned: int, expected: int) -> None:
    """``IBuilderConfig.add_optimization_profile`` returns the new profile's index, or -1 when the profile is
    invalid: a silently skipped profile would shift every later index away from the plan."""
    if returned != expected:
        raise EngineDirError(f"TensorRT rejected optimization profile {expected} (add_optimization_profile returned "
                             f"{returned}); its shape ranges are invalid for this network")


@dataclass(frozen=True)
class EngineTensor:
    """What a deserialized TensorRT engine says of one I/O tensor (read with its Python API)."""

    name: str
    dtype: str  # "int64", "float32", ...
    is_input: bool
    is_shape_tensor: bool  # ICudaEngine.is_shape_inference_io
    on_host: bool  # TensorLocation.HOST


def check_engine_tensors(actual: list[EngineTensor], plan: list[Binding]) -> None:
    """The loaded engine's tensors must be the binding plan's: names, dtypes (is input_ids still INT64 after
    parsing?), direction, and which inputs are host shape tensors.  Every difference is reported."""
    have = {t.name: t for t in actual}
    want = {b.name: b for b in plan}
    problems = [f"missing {n!r}" for n in sorted(set(want) - set(have))]
    problems += [f"unexpected {n!r}" for n in sorted(set(have) - set(want))]
    for name in sorted(set(want) & set(have)):
        t, b = have[name], want[name]
        if t.dtype != b.dtype:
            problems.append(f"{name!r} is {t.dtype}, the plan binds {b.dtype}")
        if t.is_input != b.is_input:
            problems.append(f"{name!r} is an {'input' if t.is_input else 'output'}, the plan says otherwise")
        if t.is_input and b.on_host != t.is_shape_tensor:
            problems.append(f"{name!r} is {'' if t.is_shape_tensor else 'not '}a shape tensor, the plan binds it in "
                            f"{'host' if b.on_host else 'device'} memory")
    if problems:
        raise EngineDirError("the TensorRT engine does not match its binding plan: " + "; ".join(problems)
                             + ". Rebuild it with `specrt build DIR --force`.")


def aligned_host_buffer(count: int, dtype=np.int64, alignment: int = 256) -> np.ndarray:
    """A host array whose data pointer is ``alignment``-byte aligned (TensorRT's requirement for the address of
    a host shape tensor given to set_tensor_address)."""
    item = np.dtype(dtype).itemsize
    raw = np.zeros(count * item + alignment, dtype=np.uint8)
    offset = (-raw.ctypes.data) % alignment
    return raw[offset:offset + count * item].view(dtype)


def context_buckets(max_context: int, smallest: int = 64) -> list[int]:
    out, b = [], smallest
    while b < max_context:
        out.append(b)
        b *= 2
    return [*out, max_context]


def context_bucket(length: int, max_context: int, smallest: int = 64) -> int:
    if not 0 <= length <= max_context:
        raise ValueError(f"context length {length} outside [0, {max_context}]")
    return next(b for b in context_buckets(max_context, smallest) if length <= b)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest of an engine's context buckets (``kv_cache.context_buckets``) holding ``length``."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"context length {length} is beyond the largest bucket {buckets[-1] if buckets else None}")


def graph_key(role: str, profile: Profile, n: int, length: int, max_context: int,
              buckets: tuple[int, ...] = ()) -> tuple:
    """The CUDA-graph cache key: (model, stage, k, n, context bucket)."""
    bucket = bucket_for(length, buckets) if buckets else context_bucket(length, max_context)
    return role, profile.stage, profile.k, n, bucket


@dataclass(frozen=True)
class Binding:
    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    is_input: bool
    on_host: bool  # shape-tensor inputs (past_length) live in host memory for TensorRT


def require_tensorrt_graph(spec: ModelSpec) -> None:
    """TensorRT builds only the concat-style graph: the in-place one is made of ONNX Runtime contrib ops."""
    if spec.kv.in_place:
        raise EngineDirError(
            f"{spec.role}: this engine directory was exported with in-place attention (ONNX Runtime's "
            "com.microsoft.GroupQueryAttention), which TensorRT's ONNX parser does not implement. For TensorRT, "
            "export the pair with `specrt export ... --attention concat`."
        )


def binding_plan(spec: ModelSpec, n_max: int) -> list[Binding]:
    """Every tensor of a step at width ``n_max``: its shape and buffer size (buffers are sized for the
    largest profile once, and their addresses never change — a requirement of graph replay)."""
    require_tensorrt_graph(spec)
    kv = spec.kv
    _, kvh, max_ctx, hd = kv.buffer_shape

    def b(name, shape, dtype, is_input, on_host=False):
        size = _BYTES[dtype]
        for d in shape:
            size *= d
        return Binding(name, tuple(shape), dtype, size, is_input, on_host)

    # past_length decides shapes in the concat graph (a host shape tensor); in the bucketed graph only
    # bucket_length does, and past_length is plain device data -- which is what lets a captured CUDA
    # graph replay at every context inside its bucket.
    plan = [b(kv.input_ids, (1, n_max), "int64", True),
            b(kv.past_length, (1,), "int64", True, on_host=not kv.bucket_length)]
    if kv.bucket_length:
        plan.append(b(kv.bucket_length, (1,), "int64", True, on_host=True))
    plan += [b(name, (1, kvh, max_ctx, hd), spec.dtype, True) for name in kv.key_buffers + kv.value_buffers]
    plan.append(b(kv.logits, (1, n_max, spec.vocab_size), "float32", False))
    plan += [b(name, (1, kvh, n_max, hd), spec.dtype, False) for name in kv.new_keys + kv.new_values]
    return plan


def check_engine_compat(record: dict, flavour: str, version: str, compute_capability: tuple[int, int]) -> str | None:
    """Refuse a plan this runtime cannot load: built by the other flavour (TensorRT vs TensorRT-RTX), another
    major.minor version, or for another GPU.  TensorRT 10 plans run on the GPU they were built on; TensorRT-RTX plans
    on their targets "and later" (NVIDIA's word: the plan is specialised just in time).  Returns a note when the GPU
    is outside NVIDIA's support matrix but not refused (Hopper, 9.x, under TensorRT-RTX: to be found out on one)."""
    built_with = record.get("flavour", "tensorrt")
    if built_with != flavour:
        raise EngineDirError(f"this plan was built with {built_with}, the runtime loaded {flavour}: a plan loads only "
                             f"in the library that built it. Install {built_with} "
                             f"({'pip install specrt[tensorrt]' if built_with == 'tensorrt-rtx' else 'NVIDIA index'}), "
                             "or rebuild with `specrt build DIR --force`, or use the onnxruntime backend.")
    built_trt = record.get("tensorrt_version", "?")
    if built_trt.split(".")[:2] != version.split(".")[:2]:
        raise EngineDirError(f"this plan was built with {flavour} {built_trt}, the runtime has {version}: plans only "
                             "load in the version that built them. Rebuild with `specrt build DIR --force`, or use the "
                             "onnxruntime backend (backend='onnxruntime').")
    here = f"{compute_capability[0]}.{compute_capability[1]}"
    targets = list(record.get("compute_capabilities", []))
    key = lambda cc: tuple(int(x) for x in cc.split("."))
    if here in targets:
        return None
    if flavour == "tensorrt-rtx" and targets and key(here) > max(map(key, targets)):
        if compute_capability[0] == 9:
            return (f"compute capability {here} (Hopper) is not in TensorRT-RTX's support matrix; the plan (built for "
                    f"{', '.join(targets)}) is tried as NVIDIA's 'and later' allows")
        return None
    raise EngineDirError(f"this plan was built for compute capabilit{'y' if len(targets) == 1 else 'ies'} "
                         f"{', '.join(targets) or '?'}, this GPU is {here}. Rebuild with `specrt build DIR --force"
                         f"{' --compute-capability ' + here if flavour == 'tensorrt-rtx' else ''}`.")
