"""onnxruntime-genai decoding, driven as a subprocess by ``specrt bench --peers``.

Run by the Python of the environment where onnxruntime-genai is installed (its 0.18 model
builder needs transformers 5, specrt's exporter needs transformers < 4.58, so the two live in
separate virtual environments).  This file imports nothing from specrt.

Protocol (JSON Lines): the first stdin line is ``{"model": DIR}``; every further line is a
request ``{"ids": [...], "max_new_tokens": N, "temperature": T, "seed": S}``; each gets one
stdout line ``{"ids": [new tokens], "seconds": wall time of prefill + decoding}``.
"""
from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import onnxruntime_genai as og

    setup = json.loads(sys.stdin.readline())
    model = og.Model(setup["model"])
    print(json.dumps({"ready": True, "genai_version": og.__version__}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        ids = req["ids"]
        params = og.GeneratorParams(model)
        temperature = float(req.get("temperature", 0.0))
        options = {"max_length": len(ids) + int(req["max_new_tokens"])}
        if temperature > 0:
            # plain sampling at this temperature: no top-k / top-p truncation
            options.update(do_sample=True, temperature=temperature, top_k=int(req.get("vocab_size", 1 << 20)),
                           top_p=1.0, random_seed=int(req.get("seed", 0)))
        else:
            options.update(do_sample=False)
        params.set_search_options(**options)
        start = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        seconds = time.perf_counter() - start
        new = [int(t) for t in generator.get_sequence(0)[len(ids):]]
        del generator
        print(json.dumps({"ids": new, "seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
