#!/usr/bin/env python
"""Latency percentiles and throughput of a running `specrt serve` at 1, 2, 4, 8 concurrent clients.

Each client sends streaming chat requests back to back (the prompts below, greedy, ``--max-tokens``);
for every request: time to first token (first content event), total latency, tokens.  Per concurrency
level: requests/s, generated tokens/s overall, p50/p90/p99 of latency and of time to first token.

    specrt serve .cache/demo/engine --engines 2 &
    python benchmarks/serve_load.py http://127.0.0.1:8000 --requests 16
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time

import httpx

PROMPTS = ["Write a haiku about the sea.", "What is a hash table?", "Give three tips for learning Python.",
           "Explain recursion in one paragraph.", "List the planets of the solar system.",
           "Write a Python function that reverses a string.", "What causes rain?", "Name four sorting algorithms."]


def one(url: str, prompt: str, max_tokens: int, extra: dict) -> tuple[float, float, int]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    first, tokens = None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return time.perf_counter() - start, first or 0.0, tokens


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--extra", type=json.loads, default={}, help='extra request fields, e.g. \'{"drafter": "ngram"}\'')
    args = ap.parse_args()
    print("| clients | requests/s | tokens/s | latency p50 / p90 / p99 (s) | first token p50 / p90 / p99 (s) |")
    print("|---:|---:|---:|---|---|")
    for clients in (int(c) for c in args.clients.split(",")):
        jobs = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda p: one(args.url, p, args.max_tokens, args.extra), jobs))
        wall = time.perf_counter() - start
        lat, ttft, toks = zip(*results)
        print(f"| {clients} | {len(jobs) / wall:.2f} | {sum(toks) / wall:.1f} | "
              f"{pct(lat, .5):.2f} / {pct(lat, .9):.2f} / {pct(lat, .99):.2f} | "
              f"{pct(ttft, .5):.2f} / {pct(ttft, .9):.2f} / {pct(ttft, .99):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
