"""``specrt serve --ray``: the same OpenAI-compatible application as a Ray Serve deployment.

One engine per replica; Ray places the replicas on the cluster's machines and routes requests among
them behind one HTTP endpoint (no balancer of ours).  ``replicas`` is a number, or ``MIN:MAX`` for
Ray's autoscaler (it adds a replica when a replica has more than one request in flight on average).

    ray start --head                                    # on one machine; `ray start --address ...` on others
    specrt serve ENGINE_DIR --ray --replicas 1:4 --host 0.0.0.0 --port 8000 --api-key KEY

Every machine needs the engine directory at the same path (or shared storage) and specrt installed.
Needs ``pip install 'specrt[serve]' 'ray[serve]'``.
"""
from __future__ import annotations

import logging
import time

from specrt.runtime.errors import GenerationError
from specrt.server import App, Config

log = logging.getLogger("specrt.ray_serve")


def replica_options(replicas: str, config: Config) -> dict:
    """Deployment options from ``N`` or ``MIN:MAX`` (autoscaling), one engine per replica."""
    try:
        if ":" in replicas:
            lo, hi = (int(x) for x in replicas.split(":", 1))
            if not 1 <= lo <= hi:
                raise ValueError
            options = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": 1}}
        else:
            n = int(replicas)
            if n < 1:
                raise ValueError
            options = {"num_replicas": n}
    except ValueError:
        raise GenerationError(f"--replicas must be a number >= 1 or MIN:MAX, got {replicas!r}") from None
    # a replica runs one generation at a time and queues a few more (Ray's own backpressure beyond that)
    options["max_ongoing_requests"] = 1 + config.max_queue
    return options


def deployment(config: Config, replicas: str = "1"):
    """The Ray Serve application (``serve.run`` it), one engine per replica."""
    from ray import serve

    @serve.deployment(name="specrt", **replica_options(replicas, config))
    class SpecrtReplica:
        def __init__(self, cfg: Config):
            self.app = App(cfg)  # loads the engine on the replica's machine

        async def __call__(self, request):
            return await self.app.dispatch(request)

    single = Config(**{**config.__dict__, "engines": 1})
    return SpecrtReplica.bind(single)


def run(config: Config, host: str = "127.0.0.1", port: int = 8000, replicas: str = "1") -> None:
    """Start (or join) Ray, deploy, and serve until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise GenerationError(f"--ray needs Ray Serve ({e}): pip install 'ray[serve]'") from None
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(config, replicas), name="specrt", route_prefix="/")
    log.info("specrt on Ray Serve at http://%s:%d", host, port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
