"""specrt.server: the OpenAI-compatible server, driven by the official `openai` client over real HTTP.

A uvicorn server runs in a thread of the test process on a free 127.0.0.1 port, over a tiny engine.
"""
from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="tests use the official client: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx")

from specrt.runtime import Engine

from specrt.server import App, Config

MESSAGES = [{"role": "user", "content": "def add"}]


class Server:
    def __init__(self, engine_dir, **config):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = App(Config(str(engine_dir), **config))
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(engines):
    s = Server(engines["close"], engines=2, max_queue=64, model_name="tiny")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(engines):
    return Engine.load(engines["close"])


def test_chat_equals_offline_generation(server, offline):
    r = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
    ids = offline.chat_prompt(MESSAGES)
    ref = offline.generate(ids, max_new_tokens=20, temperature=0)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].finish_reason in ("stop", "length")
    spec = r.model_extra["specrt"]
    assert spec["lossless"] and spec["target_passes"] >= 1 and spec["drafter"] == offline.default_drafter


def test_completions_and_extra_fields(server, offline):
    r = server.client().completions.create(model="tiny", prompt="def add(a, b):", max_tokens=16, temperature=0,
                                           extra_body={"k": 2, "drafter": "ngram", "policy": "adaptive"})
    ref = offline.generate("def add(a, b):", max_new_tokens=16, k=2, drafter="ngram", policy="adaptive")
    assert r.choices[0].text == ref.text and r.model_extra["specrt"]["drafter"] == "ngram"


def test_streaming_equals_offline_and_ends_with_done(server, offline):
    stream = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ref = offline.generate(offline.chat_prompt(MESSAGES), max_new_tokens=24, temperature=0)
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4,
                                                                     "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["engines"] == 2


def test_eight_concurrent_clients_on_two_engines(server, offline):
    prompts = [[{"role": "user", "content": f"def f{i}"}] for i in range(8)]
    refs = [offline.generate(offline.chat_prompt(p), max_new_tokens=20, temperature=0).text for p in prompts]

    def ask(p):
        return server.client().chat.completions.create(model="tiny", messages=p, max_tokens=20,
                                                       temperature=0).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, prompts)) == refs
    # one copy of the weights: the two sequences share the ONNX Runtime sessions, not the caches
    a, b = server.app.sequences
    assert a.target.session is b.target.session and a.target.cache is not b.target.cache


def test_a_client_leaving_mid_stream_frees_its_engine(server):
    with httpx.stream("POST", server.url + "/v1/completions",
                      json={"prompt": "x", "max_tokens": 40, "stream": True, "temperature": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first event
    deadline = time.time() + 10
    while httpx.get(server.url + "/health").json()["engines_busy"]:
        assert time.time() < deadline, "the engine was not freed"
        time.sleep(0.05)
    assert server.client().completions.create(model="tiny", prompt="x", max_tokens=3).choices[0].text is not None


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400, r"max_tokens must be in [1, inf]"),
    (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400, "max_tokens must be an integer"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400, "temperature must be in"),
    (json.dumps({"prompt": "x", "top_p": 2}).encode(), 400, "top_p must be in"),
    (json.dumps({"prompt": "x", "frobnicate": 1}).encode(), 400, "unrecognized request field"),
    (json.dumps({"prompt": "x", "presence_penalty": 0.5}).encode(), 400, "not supported"),
    (json.dumps({"prompt": "x", "n": 99}).encode(), 400, "n must be in"),
    (json.dumps({"prompt": "x", "stop": ["a"] * 20}).encode(), 400, "at most 16 stop strings"),
    (json.dumps({"prompt": "x" * 5000}).encode(), 400, "max context"),
    (json.dumps({"prompt": [5, 10**9]}).encode(), 400, "outside the vocabulary"),
    (json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), 404, "does not exist"),
    (json.dumps({"prompt": "x", "drafter": "magic"}).encode(), 400, "unknown drafter"),
    (json.dumps({"prompt": "x", "k": 3}).encode(), 400, "compiled k values"),
])
def test_errors_are_openai_json_with_the_right_status(server, body, status, needle):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text


def test_unknown_route_and_method(server):
    assert httpx.get(server.url + "/v2/nothing").status_code == 404
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_oversized_body_is_413(engines):
    s = Server(engines["close"], max_body_bytes=1000)
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x" * 5000})
        assert r.status_code == 413 and "at most 1,000" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_api_key(engines):
    s = Server(engines["close"], api_key="sekret", model_name="tiny")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert s.client("sekret").completions.create(model="tiny", prompt="x", max_tokens=2).choices
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key (load balancers)
    finally:
        s.stop()


def test_a_full_queue_answers_429_with_retry_after(engines):
    s = Server(engines["close"], engines=1, max_queue=0)
    target = s.app.sequences[0].target
    step = target.forward

    def slow_step(*args, **kwargs):  # keep the only engine busy long enough to be seen busy
        time.sleep(0.02)
        return step(*args, **kwargs)
    target.forward = slow_step
    try:
        busy = threading.Thread(target=lambda: httpx.post(s.url + "/v1/completions", timeout=60,
                                                          json={"prompt": [5, 6], "max_tokens": 55, "temperature": 0}))
        busy.start()
        deadline = time.time() + 10
        while not httpx.get(s.url + "/health").json()["engines_busy"]:
            assert time.time() < deadline
            time.sleep(0.01)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        busy.join()
        assert r.status_code == 429, (r.status_code, r.text)
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    finally:
        s.stop()


def test_bounded_load_no_5xx_no_truncation(server, offline):
    """A few hundred short requests, 8 at a time: every answer 200 and complete (equal to offline greedy)."""
    prompts = [[i % 300 + 1, (7 * i) % 300 + 1] for i in range(240)]
    refs = {tuple(p): offline.generate(p, max_new_tokens=6, temperature=0).text for p in prompts}

    def ask(p):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": p, "max_tokens": 6, "temperature": 0},
                       timeout=60)
        return p, r.status_code, r.json()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, prompts))
    assert all(status == 200 for _, status, _ in results), [s for _, s, _ in results if s != 200][:5]
    assert all(body["choices"][0]["text"] == refs[tuple(p)] for p, _, body in results)


def test_metrics_parse_with_prometheus_client(server):
    from prometheus_client.parser import text_string_to_metric_families

    server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in ("specrt_requests", "specrt_queue_depth", "specrt_engines_busy", "specrt_time_to_first_token_seconds",
                 "specrt_time_per_output_token_seconds", "specrt_tokens_per_second", "specrt_acceptance_rate",
                 "specrt_tokens_per_target_pass", "specrt_generated_tokens"):
        assert name in families, sorted(families)
    ok = [s for s in families["specrt_requests"].samples if s.labels.get("status") == "200"]
    assert ok and sum(s.value for s in ok) >= 1
    assert families["specrt_time_to_first_token_seconds"].type == "histogram"


def test_serve_cli_help_lists_the_extra_fields():
    from test_cli import specrt

    out = specrt("serve", "--help").stdout
    for field in ("k", "drafter", "policy", "--engines", "--max-queue", "--api-key", "127.0.0.1"):
        assert field in out
