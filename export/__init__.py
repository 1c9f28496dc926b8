"""Build time: HuggingFace draft + target → engine directory (needs torch, transformers, optimum-onnx, onnx)."""
from __future__ import annotations

from specrt.export.pair import DEFAULT_K, DEFAULT_MAX_CONTEXT, ExportError, ExportReport, export_pair

__all__ = ["DEFAULT_K", "DEFAULT_MAX_CONTEXT", "ExportError", "ExportReport", "export_pair"]
