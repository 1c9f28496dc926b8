"""``specrt serve``: an OpenAI-compatible HTTP server (Starlette on uvicorn) over an engine directory.

    POST /v1/chat/completions   POST /v1/completions   (``stream: true``: server-sent events, then [DONE])
    GET  /v1/models             GET  /health           GET  /metrics (Prometheus text format)

Concurrency: ``engines`` generations run at once, in worker threads, on sequences of one loaded engine
(``Engine.sequence``: one copy of the weights, KV caches each).  Requests wait in a bounded queue in
front of them; past ``max_queue`` waiting, a request gets 429 with ``Retry-After``.  A generation
checks between target passes whether its client is still there and whether its time is up, so a
client that disconnects mid-stream frees its engine within one step.

Requests follow OpenAI's field names (``max_tokens``, ``temperature`` -- default 1, as OpenAI's --,
``top_p``, ``seed``, ``stop``, ``n``); specrt's own come as extra fields: ``k``, ``drafter``,
``policy``, ``top_k``, ``ngram_min``, ``ngram_max``.  Every response carries ``usage`` and a
``specrt`` object with the speculation statistics.  Errors are OpenAI-style JSON bodies
(``{"error": {"message", "type", "param", "code"}}``) with the status a client expects; never a
traceback.  The server binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from specrt.runtime import Engine, GenerationError, SpecrtError
from specrt.runtime.engine import Sequence
from specrt.runtime.request import MAX_SAMPLES, Request, http_fields, params_of

log = logging.getLogger("specrt.server")

# OpenAI request fields: those we honour, and those we accept only at their no-op value
SUPPORTED = {"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
             "stop", "n", "stream", "stream_options", "user"}
NO_OP = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": (None, False), "top_logprobs": (None, 0),
         "logit_bias": (None, {}), "echo": False, "best_of": (None, 1), "suffix": None, "response_format": None,
         "parallel_tool_calls": None, "tools": (None, []), "tool_choice": (None, "none")}
# specrt's own request fields, beside OpenAI's: every Request field the HTTP body may set (runtime/request.py)
HTTP_FIELDS = http_fields()  # body name -> Request field
EXTRA = {body: params_of()[name].help for body, name in HTTP_FIELDS.items() if body not in SUPPORTED}
OPENAI_DEFAULTS = {"temperature": 1.0}  # OpenAI's default where it differs from the library's (greedy)
DEFAULT_MAX_TOKENS = 256


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = (status, message, kind, param,
                                                                                     code, headers or {})


def error_body(e: HTTPError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


@dataclass
class Config:
    engine_dir: str
    engines: int = 1
    max_queue: int = 16
    api_key: str | None = None
    model_name: str | None = None
    timeout_s: float = 600.0
    max_body_bytes: int = 4 << 20
    threads: int | None = None
    backend: str = "onnxruntime"
    max_batch: int = 1  # > 1: that many sequences share the engine's batched passes (its batch graph)
    prefill_graph: str = "auto"  # an int4 target's prefill graph: auto (by the CPU) | on | off (Engine.load)
    attention_kernel: str = "auto"  # the target's GroupQueryAttention kernel: auto (by the CPU) | flash | unfused
    datastore: str | bool | None = None  # the suffix drafter's table: None = the engine's own, False = none, or a file


class Metrics:
    """The Prometheus side: request counts by status, queue and engines, latencies, speculation."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("specrt_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.queue_depth = Gauge("specrt_queue_depth", "requests waiting for an engine", registry=r)
        self.engines_busy = Gauge("specrt_engines_busy", "engines running a generation", registry=r)
        self.engines_total = Gauge("specrt_engines", "engines (concurrent generations)", registry=r)
        self.ttft = Histogram("specrt_time_to_first_token_seconds", "request start to first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.tpot = Histogram("specrt_time_per_output_token_seconds", "generation time per token after the first",
                              registry=r, buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32))
        self.duration = Histogram("specrt_request_duration_seconds", "request start to end", registry=r,
                                  buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens_per_s = Histogram("specrt_tokens_per_second", "new tokens / generation time, per request",
                                      registry=r, buckets=(5, 10, 20, 40, 80, 160, 320, 640))
        self.acceptance = Histogram("specrt_acceptance_rate", "accepted / proposed draft tokens, per request",
                                    registry=r, buckets=(.1, .2, .3, .4, .5, .6, .7, .8, .9, 1.0))
        self.tokens_per_pass = Histogram("specrt_tokens_per_target_pass", "new tokens / target passes, per request",
                                         registry=r, buckets=(1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 9))
        self.generated = Counter("specrt_generated_tokens", "new tokens generated", registry=r)
        self.prompt_tokens = Counter("specrt_prompt_tokens", "prompt tokens read", registry=r)
        self.proposed = Counter("specrt_draft_proposed_tokens", "draft tokens proposed", registry=r)
        self.accepted = Counter("specrt_draft_accepted_tokens", "draft tokens accepted", registry=r)
        self.passes = Counter("specrt_target_passes", "target (verification) passes", registry=r)
        # a batching engine's scheduler (max_batch > 1): its passes and their rows, read at each scrape
        self.batched_passes = Gauge("specrt_batched_passes", "target passes shared by several sequences", registry=r)
        self.solo_passes = Gauge("specrt_solo_passes", "speculative passes of one sequence (batching engine)",
                                 registry=r)
        self.batch_rows = Gauge("specrt_batched_pass_rows", "rows of the batched passes (one per slot in range)",
                                registry=r)
        self.engine = None

    def watch(self, engine) -> None:
        self.engine = engine

    def observe(self, stats, first_token_s: float | None, start: float) -> None:
        self.generated.inc(stats.new_tokens)
        self.proposed.inc(stats.proposed)
        self.accepted.inc(stats.accepted)
        self.passes.inc(stats.steps)
        if first_token_s is not None:
            self.ttft.observe(first_token_s - start)
            if stats.new_tokens > 1:
                self.tpot.observe((time.perf_counter() - first_token_s) / (stats.new_tokens - 1))
        if stats.total_s > 0 and stats.new_tokens:
            self.tokens_per_s.observe(stats.tokens_per_s)
        if stats.proposed:
            self.acceptance.observe(stats.acceptance_rate)
        if stats.steps:
            self.tokens_per_pass.observe(stats.tokens_per_step)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        batcher = getattr(self.engine, "batcher", None)
        if batcher is not None:
            self.batched_passes.set(batcher.batched_passes)
            self.solo_passes.set(batcher.solo_passes)
            self.batch_rows.set(self.engine.batch.rows)
        return generate_latest(self.registry)


class Scheduler:
    """Hands sequences to requests: at most ``len(sequences)`` generations at once, at most ``max_queue`` waiting."""

    def __init__(self, sequences: list[Sequence], max_queue: int, metrics: Metrics):
        self.free: asyncio.Queue[Sequence] = asyncio.Queue()
        for seq in sequences:
            self.free.put_nowait(seq)
        self.size, self.max_queue, self.metrics, self.waiting = len(sequences), max_queue, metrics, 0
        metrics.engines_total.set(self.size)

    async def acquire(self, timeout: float) -> Sequence:
        if self.free.empty() and self.waiting >= self.max_queue:
            raise HTTPError(429, f"the server is busy: {self.size} generations running and {self.waiting} requests "
                            "waiting (its --max-queue); retry shortly", kind="rate_limit_error",
                            code="queue_full", headers={"Retry-After": "1"})
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            seq = await asyncio.wait_for(self.free.get(), timeout)
        except asyncio.TimeoutError:
            raise HTTPError(503, "no engine became free before the request's timeout", kind="server_error",
                            code="timeout", headers={"Retry-After": "1"}) from None
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        self.metrics.engines_busy.inc()
        return seq

    def release(self, seq: Sequence) -> None:
        self.metrics.engines_busy.dec()
        self.free.put_nowait(seq)


@dataclass
class Job:
    """One request's generation(s), run in a worker thread; chunks flow to the event loop through a queue."""

    sequence: Sequence
    prompt_ids: list[int]
    request: Request
    n: int
    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    results: list = field(default_factory=list)
    first_token_s: float | None = None

    def run(self, emit: Callable[[int, str], None]) -> None:
        for i in range(self.n):
            request = self.request  # sample i of n: seed + i
            if request.seed is not None and i:
                request = dataclasses.replace(request, seed=request.seed + i)
            stream = self.sequence.stream(self.prompt_ids, request)
            try:
                for chunk in stream:
                    if chunk.token_ids and self.first_token_s is None:
                        self.first_token_s = time.perf_counter()
                    if chunk.text:
                        emit(i, chunk.text)
                    if self.cancel.is_set() or time.perf_counter() > self.deadline:
                        break  # within one target pass of the client leaving or the time running out
            finally:
                stream.close()
            self.results.append(stream.result)
            if self.cancel.is_set() or time.perf_counter() > self.deadline:
                return


def finish_reason(result) -> str:
    return {"eos": "stop", "stop_string": "stop", "max_new_tokens": "length", "max_context": "length"}.get(
        result.stats.stop_reason, "length")


def speculation(results: list) -> dict:
    s = [r.stats for r in results]
    proposed, accepted = sum(x.proposed for x in s), sum(x.accepted for x in s)
    steps, tokens = sum(x.steps for x in s), sum(x.new_tokens for x in s)
    seconds = sum(x.total_s for x in s)
    return {"drafter": s[0].drafter or "target-only", "policy": s[0].policy, "proposed": proposed,
            "accepted": accepted, "acceptance_rate": round(accepted / proposed, 4) if proposed else None,
            "target_passes": steps, "tokens_per_target_pass": round(tokens / steps, 3) if steps else None,
            "tokens_per_s": round(tokens / seconds, 2) if seconds else None, "lossless": all(x.lossless for x in s)}


class App:
    """The ASGI application: routes, validation, scheduling, responses."""

    def __init__(self, config: Config, engine: Engine | None = None):
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.config = config
        first = engine or Engine.load(config.engine_dir, backend=config.backend, threads=config.threads,
                                      max_batch=config.max_batch, prefill_graph=config.prefill_graph,
                                      attention_kernel=config.attention_kernel, datastore=config.datastore)
        self.engine = first
        # concurrent generations: the batching engine's slots, or --engines sequences of their own passes
        concurrent = first.batch.slots if first.batcher is not None else config.engines
        self.sequences = [first.default_sequence] + [first.sequence() for _ in range(concurrent - 1)]
        self.model = config.model_name or first.manifest.root.name
        self.metrics = Metrics()
        self.metrics.watch(first)
        self.scheduler: Scheduler | None = None
        self.created = int(time.time())
        routes = [Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model_info, methods=["GET"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.prometheus, methods=["GET"])]
        self.app = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed,
                                                                 Exception: self._internal})

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)

    async def dispatch(self, request):
        """Route one Starlette request by hand (Ray Serve hands a replica's ``__call__`` a Request, not ASGI)."""
        routes = {("POST", "/v1/chat/completions"): self.chat, ("POST", "/v1/completions"): self.completions,
                  ("GET", "/v1/models"): self.models, ("GET", "/health"): self.health,
                  ("GET", "/metrics"): self.prometheus}
        handler = routes.get((request.method, request.url.path.rstrip("/") or "/"))
        if handler is None:
            return await self._not_found(request, None)
        try:
            return await handler(request)
        except Exception as e:  # noqa: BLE001 -- never a traceback in a response
            return await self._internal(request, e)

    # -- helpers --------------------------------------------------------------------------------
    def _json(self, body: dict, status: int = 200, headers: dict | None = None):
        from starlette.responses import JSONResponse

        return JSONResponse(body, status_code=status, headers=headers)

    def _error(self, e: HTTPError, endpoint: str):
        self.metrics.requests.labels(endpoint, str(e.status)).inc()
        return self._json(error_body(e), e.status, e.headers)

    async def _not_found(self, request, exc):
        return self._error(HTTPError(404, f"no route {request.url.path!r}; see /v1/models, /v1/chat/completions, "
                                     "/v1/completions, /health, /metrics", code="not_found"), "other")

    async def _not_allowed(self, request, exc):
        return self._error(HTTPError(405, f"{request.method} is not allowed on {request.url.path}"), "other")

    async def _internal(self, request, exc):
        log.exception("internal error on %s", request.url.path)
        return self._error(HTTPError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                                     kind="server_error"), "other")

    def _authorize(self, request) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {key}":
            raise HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                            kind="authentication_error", code="invalid_api_key")

    async def _body(self, request) -> dict:
        length = request.headers.get("content-length")
        limit = self.config.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise HTTPError(413, f"the request body is {int(length):,} bytes; this server accepts at most {limit:,}",
                            code="body_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > limit:
                raise HTTPError(413, f"the request body is over {limit:,} bytes, this server's limit",
                                code="body_too_large")
        try:
            body = json.loads(raw.decode("utf-8") or "null")
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise HTTPError(400, f"the request body is not valid JSON: {e}"[:300], code="invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def _params(self, body: dict, endpoint: str) -> tuple[Request, int, bool, bool]:
        """(generation parameters, n, stream, include usage in the stream) from an OpenAI request body."""
        unknown = sorted(set(body) - SUPPORTED - set(NO_OP) - set(EXTRA) - {"messages", "prompt"})
        if unknown:
            raise HTTPError(400, f"unrecognized request field(s): {', '.join(unknown)}; specrt's own are "
                            f"{', '.join(EXTRA)}", param=unknown[0])
        for name, ok in NO_OP.items():
            if name in body and body[name] not in (ok if isinstance(ok, tuple) else (ok,)):
                raise HTTPError(400, f"{name}={body[name]!r:.50} is not supported by specrt", param=name)
        model = body.get("model")
        if model is not None and model != self.model:
            raise HTTPError(404, f"the model {model!r:.100} does not exist; this server serves {self.model!r}",
                            param="model", code="model_not_found")

        def typed(name, types, default=None):
            value = body.get(name, default)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in
                                      (types if isinstance(types, tuple) else (types,))):
                raise HTTPError(400, f"{name} must be of type {getattr(types, '__name__', types)}, got "
                                f"{type(value).__name__}", param=name)
            return value
        n = typed("n", int, 1)
        if not 1 <= n <= MAX_SAMPLES:
            raise HTTPError(400, f"n must be in [1, {MAX_SAMPLES}], got {n}", param="n")
        stream = typed("stream", bool, False)
        options = typed("stream_options", dict) or {}
        # the request's fields, as the body names them; OpenAI's defaults where they differ from the library's
        params = {name: body[field] for field, name in HTTP_FIELDS.items() if field in body}
        params = {**OPENAI_DEFAULTS, "max_new_tokens": DEFAULT_MAX_TOKENS, **params}
        if "max_completion_tokens" in body:  # OpenAI's newer name for max_tokens
            params["max_new_tokens"] = body["max_completion_tokens"]
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        k_values = self.engine.manifest.k_values
        # every parameter checked now, once, before the request takes a sequence or waits for one; what the
        # request leaves unset is the engine's (its measured defaults)
        request = Request().with_params(params).with_defaults(self.engine.defaults).validate(
            k_values, names={"max_new_tokens": "max_tokens"})
        drafter = request.drafter or self.engine.default_drafter
        if request.speculative and drafter not in self.engine.drafters:
            raise GenerationError(f"the {drafter!r} drafter is not available on this engine; it has "
                                  f"{', '.join(self.engine.drafters)}")
        return request, n, stream, bool(options.get("include_usage"))

    # -- routes -----------------------------------------------------------------------------------
    async def health(self, request):
        busy = self.scheduler.size - self.scheduler.free.qsize() if self.scheduler else 0
        return self._json({"status": "ok", "model": self.model, "engines": len(self.sequences), "engines_busy": busy,
                           "queue": self.scheduler.waiting if self.scheduler else 0})

    async def prometheus(self, request):
        from starlette.responses import Response

        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _model_card(self) -> dict:
        m = self.engine.manifest
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "specrt",
                "max_context": self.engine.max_context, "k_values": list(m.k_values),
                "drafters": list(self.engine.drafters), "default_drafter": self.engine.default_drafter}

    async def models(self, request):
        try:
            self._authorize(request)
        except HTTPError as e:
            return self._error(e, "models")
        self.metrics.requests.labels("models", "200").inc()
        return self._json({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request):
        try:
            self._authorize(request)
            if request.path_params["model"] != self.model:
                raise HTTPError(404, f"the model {request.path_params['model']!r:.100} does not exist",
                                code="model_not_found")
        except HTTPError as e:
            return self._error(e, "models")
        return self._json(self._model_card())

    async def chat(self, request):
        return await self._generate(request, "chat")

    async def completions(self, request):
        return await self._generate(request, "completions")

    async def _generate(self, request, endpoint: str):
        start = time.perf_counter()
        if self.scheduler is None:
            self.scheduler = Scheduler(self.sequences, self.config.max_queue, self.metrics)
        try:
            self._authorize(request)
            body = await self._body(request)
            params, n, stream, include_usage = self._params(body, endpoint)  # params: a validated Request
            prompt_ids = self._prompt(body, endpoint)
        except HTTPError as e:
            return self._error(e, endpoint)
        except GenerationError as e:  # the request's fault
            return self._error(HTTPError(400, str(e)), endpoint)
        except SpecrtError as e:  # the engine directory's (its chat template, say)
            return self._error(HTTPError(500, str(e), kind="server_error"), endpoint)
        try:
            seq = await self.scheduler.acquire(self.config.timeout_s)
        except HTTPError as e:
            return self._error(e, endpoint)
        job = Job(seq, prompt_ids, params, n, time.perf_counter() + self.config.timeout_s)
        rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if stream:
            return self._stream(request, job, endpoint, rid, include_usage, start)
        loop = asyncio.get_running_loop()
        texts: dict[int, list[str]] = {i: [] for i in range(n)}

        def emit(i, text):
            texts[i].append(text)

        disconnect = asyncio.ensure_future(self._watch_disconnect(request, job))
        try:
            await loop.run_in_executor(None, job.run, emit)
        except SpecrtError as e:
            return self._error(HTTPError(400, str(e)), endpoint)
        finally:
            disconnect.cancel()
            self.scheduler.release(seq)
        if time.perf_counter() > job.deadline:
            return self._error(HTTPError(504, f"the generation took longer than the server's timeout of "
                                         f"{self.config.timeout_s:g} s", kind="server_error", code="timeout"), endpoint)
        self.metrics.duration.observe(time.perf_counter() - start)
        for r in job.results:
            self.metrics.observe(r.stats, job.first_token_s, start)
        self.metrics.prompt_tokens.inc(len(prompt_ids) * n)
        self.metrics.requests.labels(endpoint, "200").inc()
        return self._json(self._response(endpoint, rid, job, prompt_ids))

    def _prompt(self, body: dict, endpoint: str) -> list[int]:
        e = self.engine
        if endpoint == "chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise HTTPError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
            flat = []
            for m in messages:
                if isinstance(m, dict) and isinstance(m.get("content"), list):  # content parts: text only
                    parts = m["content"]
                    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                               for p in parts):
                        raise HTTPError(400, "only text content parts are supported", param="messages")
                    m = {**m, "content": "".join(p["text"] for p in parts)}
                if isinstance(m, dict):
                    m = {k: v for k, v in m.items() if k in ("role", "content", "name")}
                flat.append(m)
            return e.chat_prompt(flat)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if not isinstance(prompt, (str, list)):
            raise HTTPError(400, "prompt must be a string or a list of token ids (one prompt per request)",
                            param="prompt")
        if isinstance(prompt, list) and not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise HTTPError(400, "a prompt given as a list must be token ids (integers)", param="prompt")
        return e.prompt_ids(prompt)

    def _response(self, endpoint: str, rid: str, job: Job, prompt_ids: list[int]) -> dict:
        completion = sum(len(r.token_ids) for r in job.results)
        choices = []
        for i, r in enumerate(job.results):
            if endpoint == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": r.text},
                                "logprobs": None, "finish_reason": finish_reason(r)})
            else:
                choices.append({"index": i, "text": r.text, "logprobs": None, "finish_reason": finish_reason(r)})
        return {"id": rid, "object": "chat.completion" if endpoint == "chat" else "text_completion",
                "created": int(time.time()), "model": self.model, "choices": choices,
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                          "total_tokens": len(prompt_ids) + completion},
                "specrt": speculation(job.results)}

    async def _watch_disconnect(self, request, job: Job) -> None:
        while not job.cancel.is_set():
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel.set()
                return

    def _stream(self, request, job: Job, endpoint: str, rid: str, include_usage: bool, start: float):
        from starlette.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
        created = int(time.time())

        def event(choices: list, usage: dict | None = None, extra: dict | None = None) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": self.model, "choices": choices,
                    **(extra or {})}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        def delta(i: int, text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if endpoint == "chat":
                d = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                return {"index": i, "delta": d, "logprobs": None, "finish_reason": finish}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

        def emit(i, text):
            loop.call_soon_threadsafe(queue.put_nowait, ("text", i, text))

        def work():
            try:
                job.run(emit)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", None, None))
            except BaseException as e:  # noqa: BLE001 -- reported to the client as an error event
                loop.call_soon_threadsafe(queue.put_nowait, ("error", None, e))

        async def body() -> AsyncIterator[str]:
            future = loop.run_in_executor(None, work)
            status = "200"
            try:
                if endpoint == "chat":
                    for i in range(job.n):
                        yield event([delta(i, None, role=True)])
                while True:
                    kind, i, payload = await queue.get()
                    if kind == "text":
                        yield event([delta(i, payload)])
                    elif kind == "error":
                        status = "500"
                        err = HTTPError(400 if isinstance(payload, SpecrtError) else 500, str(payload)[:500],
                                        kind="invalid_request_error" if isinstance(payload, SpecrtError)
                                        else "server_error")
                        yield f"data: {json.dumps(error_body(err))}\n\n"
                        break
                    else:
                        if job.results:  # the last chunk: finish reasons, and the speculation statistics
                            yield event([delta(i, None, finish_reason(r)) for i, r in enumerate(job.results)],
                                        extra={"specrt": speculation(job.results)})
                        if include_usage:
                            completion = sum(len(r.token_ids) for r in job.results)
                            usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion,
                                     "total_tokens": len(job.prompt_ids) + completion}
                            yield event([], usage)
                        yield "data: [DONE]\n\n"
                        break
            finally:
                # Done, or the client left (this generator was cancelled -- no await may follow: the cancelled
                # scope would cancel it too).  The worker stops within one target pass; the engine goes back
                # to the pool when it has.
                finished = status != "200" or bool(job.results)
                job.cancel.set()

                def cleanup(_):
                    self.scheduler.release(job.sequence)
                    self.metrics.duration.observe(time.perf_counter() - start)
                    for r in job.results:
                        self.metrics.observe(r.stats, job.first_token_s, start)
                    self.metrics.requests.labels(endpoint, status if finished else "499").inc()
                future.add_done_callback(cleanup)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def build_app(config: Config, engine: Engine | None = None) -> App:
    return App(config, engine)


def serve(config: Config, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until interrupted (uvicorn, one process; concurrency from the engines' threads)."""
    import uvicorn

    app = build_app(config)
    log.info("specrt serving %s as %r on http://%s:%d with %d engine(s)", config.engine_dir, app.model, host, port,
             config.engines)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


__all__ = ["EXTRA", "App", "Config", "HTTPError", "build_app", "serve"]
