#!/usr/bin/env python
"""Convert the demo pair for the OpenVINO GenAI peer (run with the OpenVINO venv's Python; `make peers-setup`).

    python scripts/openvino_convert.py VERIFIER_HF DRAFT_HF OUT_DIR

Writes OUT_DIR/int4 (the verifier: int4 symmetric, group size 32, every layer -- what the peer numbers in
the README use) and OUT_DIR/draft (the draft, fp32).  OpenVINO GenAI refuses a draft whose tokenizer
differs from the target's, so the target's tokenizer/detokenizer IR, tokenizer files and chat template
are copied into the draft's folder and its configs get the target's pad_token_id.  Skips what exists.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml",
                   "openvino_detokenizer.bin", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def convert(model: Path, out: Path, *weight_args: str) -> None:
    if (out / "openvino_model.xml").is_file():
        print(f"{out}: exists")
        return
    cli = Path(sys.executable).with_name("optimum-cli")
    subprocess.run([str(cli), "export", "openvino", "--model", str(model), "--task", "text-generation-with-past",
                    *weight_args, str(out)], check=True)


def main() -> int:
    verifier, draft, out = map(Path, sys.argv[1:4])
    convert(verifier, out / "int4", "--weight-format", "int4", "--group-size", "32", "--ratio", "1.0", "--sym")
    convert(draft, out / "draft", "--weight-format", "fp32")
    for name in TOKENIZER_FILES:
        if (out / "int4" / name).is_file():
            shutil.copy(out / "int4" / name, out / "draft" / name)
    for name in ("config.json", "generation_config.json"):
        target = json.loads((out / "int4" / name).read_text())
        path = out / "draft" / name
        data = json.loads(path.read_text())
        data["pad_token_id"] = target.get("pad_token_id", data.get("pad_token_id"))
        path.write_text(json.dumps(data, indent=1))
    print(f"wrote {out / 'int4'} and {out / 'draft'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
