#!/usr/bin/env python
"""Throughput, latency and time to first token of `specrt serve` under 1, 2, 4, 8, 16 concurrent clients.

Each client sends streaming chat requests back to back (greedy, ``--max-tokens``); per request: time to first token
(the first content event), total latency, tokens.  Per concurrency level: requests/s, generated tokens/s overall,
p50 / p99 latency and time to first token.  The load is Spec-Bench's first turns (``--spec-bench FILE``, in file
order, cycling) or a few short built-in prompts.

Against a running server:

    specrt serve .cache/demo/engine --engines 2 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 16

Or several server configurations, each started and stopped here, one after another in one run:

    python benchmarks/serve_load.py --spec-bench ../shared/benchmarks/spec_bench/dev.jsonl \\
        --serve "forks=.cache/demo/engine-batch --engines 8 --max-batch 1" \\
        --serve "batched=.cache/demo/engine-batch --max-batch 8" --json-out .cache/serve_load.json

Every greedy answer is checked against the answer to the same prompt from the first configuration of the same
engine directory at the first --clients level (a batched server must answer each request as it is answered alone); a
difference is reported and makes the exit status 1.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["Write a haiku about the sea.", "What is a hash table?", "Give three tips for learning Python.",
           "Explain recursion in one paragraph.", "List the planets of the solar system.",
           "Write a Python function that reverses a string.", "What causes rain?", "Name four sorting algorithms."]


def one(url: str, prompt: str, max_tokens: int, extra: dict) -> tuple[float, float, int, str]:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    first, tokens, text = None, 0, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            for c in event.get("choices", []):
                piece = c.get("delta", {}).get("content")
                if piece:
                    text.append(piece)
                    if first is None:
                        first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return time.perf_counter() - start, first or 0.0, tokens, "".join(text)


def pct(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def load(url: str, prompts: list[str], levels: list[int], requests: int, max_tokens: int, extra: dict) -> list[dict]:
    rows = []
    for clients in levels:
        jobs = [prompts[i % len(prompts)] for i in range(max(requests, clients))]
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda p: one(url, p, max_tokens, extra), jobs))
        wall = time.perf_counter() - start
        lat, ttft, toks, texts = zip(*results)
        rows.append({"clients": clients, "requests": len(jobs), "requests_per_s": len(jobs) / wall,
                     "tokens_per_s": sum(toks) / wall, "latency_p50": pct(lat, .5), "latency_p99": pct(lat, .99),
                     "ttft_p50": pct(ttft, .5), "ttft_p99": pct(ttft, .99), "answers": dict(zip(jobs, texts))})
        r = rows[-1]
        print(f"| {clients} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['latency_p50']:.2f} / "
              f"{r['latency_p99']:.2f} | {r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} |", flush=True)
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def started(spec: str) -> tuple[str, subprocess.Popen, str]:
    """``LABEL=ENGINE_DIR [specrt serve options]``: a server, once /health answers."""
    label, _, rest = spec.partition("=")
    port = free_port()
    cmd = [sys.executable, "-m", "specrt.cli", "serve", *shlex.split(rest), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"{label}: the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return label, proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{label}: the server did not answer /health in 5 minutes")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server")
    ap.add_argument("--serve", action="append", default=[], metavar="LABEL=ENGINE [OPTIONS]",
                    help="start `specrt serve ENGINE OPTIONS` here, measure it, stop it (repeatable)")
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least the clients)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--spec-bench", type=Path, default=None, help="Spec-Bench questions: their first turns are the load")
    ap.add_argument("--extra", type=json.loads, default={"reuse_prefix": False},
                    help='extra request fields (default {"reuse_prefix": false}: every request prefills its prompt, '
                    'as a new user\'s would)')
    ap.add_argument("--json-out", type=Path, default=None, help="also write the rows (and answers) here")
    args = ap.parse_args()
    if bool(args.url) == bool(args.serve):
        ap.error("give --url (a running server) or --serve (servers to start), not both")
    prompts = PROMPTS
    if args.spec_bench:
        prompts = [json.loads(line)["turns"][0] for line in args.spec_bench.read_text().splitlines() if line.strip()]
    levels = [int(c) for c in args.clients.split(",")]
    runs, engines = {}, {}
    for spec in args.serve or [None]:
        if spec is not None:
            engines[spec.partition("=")[0]] = shlex.split(spec.partition("=")[2])[0]
        label, proc, url = ("server", None, args.url) if spec is None else started(spec)
        print(f"\n{label}\n\n| clients | requests/s | tokens/s | latency p50 / p99 (s) | first token p50 / p99 (s) |")
        print("|---:|---:|---:|---|---|", flush=True)
        try:
            runs[label] = load(url, prompts, levels, args.requests, args.max_tokens, args.extra)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    same = True
    first: dict[str, str] = {}  # engine directory -> the label of its first configuration
    for label, rows in runs.items():
        ref_label = first.setdefault(engines.get(label, label), label)
        reference = runs[ref_label][0]["answers"]  # that configuration at 1 client: each request alone
        for row in rows:
            diff = [p for p, text in row["answers"].items() if reference.get(p, text) != text]
            if diff:
                same = False
                print(f"{label}, {row['clients']} clients: {len(diff)} answers differ from {ref_label} at "
                      f"{runs[ref_label][0]['clients']} client(s)", flush=True)
    print("\nevery answer identical across configurations and loads" if same else "\nANSWERS DIFFER")
    if args.json_out:
        args.json_out.write_text(json.dumps(runs, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
