"""specrt: speculative decoding from a self-describing engine directory.

``specrt.export`` (build time, needs torch) turns a HuggingFace draft + target
pair into an engine directory; ``specrt.runtime`` (deploy time, numpy +
onnxruntime only) loads it and decodes.  The *target* is the verification model.
"""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import specrt` never pulls onnxruntime (or torch) by itself.
    if name in ("Engine", "Result", "Stats"):
        from specrt import runtime

        return getattr(runtime, name)
    raise AttributeError(name)
