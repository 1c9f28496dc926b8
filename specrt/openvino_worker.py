"""OpenVINO GenAI decoding, driven as a subprocess by ``specrt bench --peers`` / ``--spec-bench``.

Run by the Python of the environment where ``openvino-genai`` is installed (its converter,
optimum-intel, pulls transformers 5; specrt's exporter needs transformers < 4.58: separate virtual
environments).  This file imports nothing from specrt.

Protocol (JSON Lines): the first stdin line is the set-up ``{"model": DIR, "mode": "plain" |
"prompt_lookup" | "draft", "draft": DIR, "num_assistant_tokens": K, "max_ngram_size": N}``; every
further line is a request ``{"ids": [...], "max_new_tokens": N, "temperature": T, "seed": S}``; each
gets one stdout line ``{"ids": [new tokens], "seconds": wall time of prefill + decoding}``.  The prompt
goes in as token ids (``TokenizedInputs``), the same ids every other system gets.
"""
from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    setup = json.loads(sys.stdin.readline())
    mode = setup.get("mode", "plain")
    kwargs = {}
    if mode == "prompt_lookup":
        kwargs["prompt_lookup"] = True
    elif mode == "draft":
        kwargs["draft_model"] = og.draft_model(setup["draft"], "CPU")
    elif mode != "plain":
        raise SystemExit(f"unknown mode {mode!r}")
    pipe = og.LLMPipeline(setup["model"], "CPU", **kwargs)
    print(json.dumps({"ready": True, "version": og.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        ids = np.array([req["ids"]], dtype=np.int64)
        config = pipe.get_generation_config()
        config.max_new_tokens = int(req["max_new_tokens"])
        temperature = float(req.get("temperature", 0.0))
        config.do_sample = temperature > 0
        if temperature > 0:
            config.temperature, config.top_k, config.top_p = temperature, 0, 1.0
            config.rng_seed = int(req.get("seed", 0))
        if mode == "prompt_lookup":
            config.num_assistant_tokens = int(setup.get("num_assistant_tokens", 4))
            config.max_ngram_size = int(setup.get("max_ngram_size", 3))
        elif mode == "draft":
            config.num_assistant_tokens = int(setup.get("num_assistant_tokens", 2))
        inputs = og.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        start = time.perf_counter()
        result = pipe.generate(inputs, config)
        seconds = time.perf_counter() - start
        new = [int(t) for t in result.tokens[0]]
        print(json.dumps({"ids": new, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
