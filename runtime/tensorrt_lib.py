"""Which TensorRT: NVIDIA's TensorRT when it imports, TensorRT for RTX otherwise -- one code path for both.

* ``tensorrt`` (TensorRT 10): on PyPI only as a stub that downloads from NVIDIA's index.  Builds for the GPU it
  runs on (a GPU is needed to build); weakly typed networks (BuilderFlag.FP16 / BF16 lower precision).
* ``tensorrt-rtx`` (TensorRT for RTX, module ``tensorrt_rtx_bindings``): real wheels on PyPI
  (``pip install 'specrt[tensorrt]'``).  Builds ahead of time **without a GPU** for a chosen set of compute
  capabilities (the engine is specialised just in time on the GPU that runs it; a runtime cache keeps that
  work across runs); networks are strongly typed -- precision comes from the ONNX graph's own types, so an fp16
  plan needs an fp16 graph; built-in CUDA graphs (``CudaGraphStrategy``).

Both share the TensorRT 10 Python API for everything specrt uses (builder, ONNX parser, optimization profiles,
``set_tensor_address`` / ``execute_async_v3``), so ``export/tensorrt_build.py`` and ``runtime/trt_backend.py``
take whichever ``load()`` gives and ask this module what differs.  Nothing here needs a GPU.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from specrt.runtime.errors import EngineDirError

FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}  # flavour -> module
# TensorRT-RTX's ahead-of-time targets when none are asked for and no GPU is here: NVIDIA's default set (its plans
# run on these "and later"); Turing (7.5) only when asked.  Hopper (9.0) is in no RTX support matrix.
RTX_PORTABLE = ("8.0", "8.6", "8.9", "12.0")
INSTALL = ("pip install 'specrt[tensorrt]' (TensorRT for RTX from PyPI; builds without a GPU), or NVIDIA's "
           "TensorRT from its own index (pip install tensorrt --extra-index-url https://pypi.nvidia.com)")


@dataclass(frozen=True)
class TensorRT:
    """A loaded TensorRT library and what its flavour implies."""

    module: ModuleType
    flavour: str  # "tensorrt" | "tensorrt-rtx"

    @property
    def version(self) -> str:
        return self.module.__version__

    @property
    def strongly_typed(self) -> bool:
        """Precision comes from the network's types (TensorRT-RTX has no FP16/BF16 builder flags)."""
        return not hasattr(self.module.BuilderFlag, "FP16")

    @property
    def builds_without_gpu(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    @property
    def has_cuda_graphs(self) -> bool:
        """Built-in CUDA graphs (TensorRT-RTX's runtime config); TensorRT 10 leaves capture to the caller."""
        return hasattr(self.module, "CudaGraphStrategy")

    def compute_capability(self, cc: str):
        """The builder's enum for ``"8.6"`` (TensorRT-RTX), with the supported values in the error."""
        name = "SM" + cc.replace(".", "")
        member = getattr(self.module.ComputeCapability, name, None)
        if member is None:
            have = [m[2:-1] + "." + m[-1] for m in self.module.ComputeCapability.__members__ if m.startswith("SM")]
            raise EngineDirError(f"TensorRT-RTX {self.version} cannot build for compute capability {cc}; it "
                                 f"builds for {', '.join(have)}")
        return member


def load(flavour: str | None = None) -> TensorRT:
    """TensorRT when it imports, TensorRT-RTX otherwise (or the ``flavour`` asked for); an error says how to install
    one."""
    names = [flavour] if flavour else list(FLAVOURS)
    errors = []
    for name in names:
        if name not in FLAVOURS:
            raise EngineDirError(f"unknown TensorRT flavour {name!r}; choose one of {', '.join(FLAVOURS)}")
        try:
            return TensorRT(importlib.import_module(FLAVOURS[name]), name)
        except ImportError as e:
            errors.append(f"{FLAVOURS[name]}: {e}")
        except OSError as e:  # a wheel whose shared libraries do not load
            errors.append(f"{FLAVOURS[name]}: {e}")
    raise EngineDirError(f"no TensorRT found ({'; '.join(errors)}). Install one: {INSTALL}")


def available() -> list[str]:
    """The flavours that import here (tests skip what is absent, with this list in the reason)."""
    out = []
    for name, module in FLAVOURS.items():
        try:
            importlib.import_module(module)
            out.append(name)
        except (ImportError, OSError):
            pass
    return out
