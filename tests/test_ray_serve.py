"""specrt.ray_serve: the same application as a Ray Serve deployment, on a local Ray instance.

Skipped where Ray is not installed (it is not part of the test extra: a large install); run it with
`pip install 'ray[serve]'`.  README "Serving" records the run.
"""
from __future__ import annotations

import socket
import time

import pytest

ray = pytest.importorskip("ray", reason="Ray Serve is optional: pip install 'ray[serve]'")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from specrt.runtime import Engine

from specrt.server import Config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_replica_options():
    from specrt.runtime import GenerationError

    from specrt.ray_serve import replica_options

    cfg = Config("x", max_queue=3)
    assert replica_options("2", cfg) == {"num_replicas": 2, "max_ongoing_requests": 4}
    auto = replica_options("1:4", cfg)["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 4)
    for bad in ("0", "3:1", "x"):
        with pytest.raises(GenerationError, match="--replicas"):
            replica_options(bad, cfg)


@pytest.mark.slow
def test_two_replicas_on_a_local_ray_answer_like_the_engine(engines):
    from ray import serve

    from specrt.ray_serve import deployment

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(Config(str(engines["close"]), model_name="tiny"), "2"), name="specrt", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=3, timeout=120)
        offline = Engine.load(engines["close"])
        for i in range(4):
            messages = [{"role": "user", "content": f"def f{i}"}]
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
            ref = offline.generate(offline.chat_prompt(messages), max_new_tokens=12, temperature=0)
            assert r.choices[0].message.content == ref.text
        stream = client.completions.create(model="tiny", prompt="x", max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == offline.generate(
            "x", max_new_tokens=8, temperature=0).text
        assert len(serve.status().applications["specrt"].deployments["specrt"].replica_states) >= 1
    finally:
        serve.shutdown()
        ray.shutdown()
        time.sleep(1)
