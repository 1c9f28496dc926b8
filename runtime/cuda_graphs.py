"""CUDA-graph capture, replay, update and rebuild, in one place.

``GraphCache`` keeps one instantiated graph per key (see ``tensorrt_plan.graph_key``).  The first
call for a key runs the work eagerly (warm-up: TensorRT allocates and picks tactics).  A capture is
always preceded by the same work run eagerly and a stream synchronize, as trtexec does: that eager run
is the step's execution, the capture only records it, and later calls replay.  A step right after an
optimization-profile switch runs eagerly (``fresh``): TensorRT applies the switch's resource updates
on the next enqueue, which must not be inside a capture or skipped by a replay.  When the captured
work changes (new addresses), the graph is updated in place with cudaGraphExecUpdate, or rebuilt when
the update is refused.  A capture that fails reports the original error (not end_capture's), frees
what it made, and that key runs eagerly from then on.  Counters prove replays happen.  The CUDA calls
sit behind ``GraphOps`` so the policy is tested on the CPU with a fake; ``CudartOps`` is the
cuda-python implementation (not yet run on hardware).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class GraphOps(Protocol):
    def begin_capture(self, stream: Any) -> None: ...
    def end_capture(self, stream: Any) -> Any: ...  # -> graph
    def instantiate(self, graph: Any) -> Any: ...  # -> executable graph
    def update(self, exec_graph: Any, graph: Any) -> bool: ...  # False = topology changed, rebuild
    def launch(self, exec_graph: Any, stream: Any) -> None: ...
    def destroy(self, graph: Any, exec_graph: Any | None) -> None: ...
    def synchronize(self, stream: Any) -> None: ...


@dataclass
class GraphStats:
    eager: int = 0
    captures: int = 0
    replays: int = 0
    updates: int = 0
    rebuilds: int = 0
    capture_failures: int = 0


@dataclass
class GraphCache:
    ops: GraphOps
    stream: Any
    warmup_runs: int = 1
    stats: GraphStats = field(default_factory=GraphStats)
    _graphs: dict[Hashable, Any] = field(default_factory=dict)
    _seen: dict[Hashable, int] = field(default_factory=dict)
    _eager_only: set = field(default_factory=set)  # keys whose capture failed

    def run(self, key: Hashable, enqueue: Callable[[], None], recapture: bool = False, fresh: bool = False) -> None:
        """Run ``enqueue`` (which enqueues the step's work on ``stream``) for ``key``: eagerly during
        warm-up and right after a profile switch (``fresh``), then as a replayed graph.  ``recapture``
        says the enqueued work changed (for example new tensor addresses): the graph is updated, or
        rebuilt if the update is refused."""
        seen = self._seen.get(key, 0)
        if fresh or seen < self.warmup_runs or key in self._eager_only:
            self._seen[key] = seen + 1
            self.stats.eager += 1
            enqueue()
            return
        exec_graph = self._graphs.get(key)
        if exec_graph is not None and not recapture:
            self.ops.launch(exec_graph, self.stream)
            self.stats.replays += 1
            return
        # The step runs eagerly, the stream drains, then the capture records the same work (not executed).
        enqueue()
        self.stats.eager += 1
        self.ops.synchronize(self.stream)
        try:
            graph = self._capture(enqueue)
        except CaptureError as e:
            self.stats.capture_failures += 1
            self._eager_only.add(key)
            log.warning("CUDA-graph capture failed for %s, running it eagerly from now on: %s", key, e.__cause__)
            return
        if exec_graph is None:
            exec_graph = self.ops.instantiate(graph)
            self.stats.captures += 1
        elif self.ops.update(exec_graph, graph):
            self.stats.updates += 1
        else:
            self.ops.destroy(None, exec_graph)
            exec_graph = self.ops.instantiate(graph)
            self.stats.rebuilds += 1
        self.ops.destroy(graph, None)
        self._graphs[key] = exec_graph

    def _capture(self, enqueue: Callable[[], None]) -> Any:
        self.ops.begin_capture(self.stream)
        try:
            enqueue()
        except BaseException as e:
            try:  # end the capture so the stream is usable again; its own error would hide the real one
                self.ops.destroy(self.ops.end_capture(self.stream), None)
            except Exception as cleanup:  # noqa: BLE001
                log.debug("ending the failed capture also failed: %s", cleanup)
            raise CaptureError(f"capturing the step failed: {e}") from e
        return self.ops.end_capture(self.stream)

    def clear(self) -> None:
        for exec_graph in self._graphs.values():
            self.ops.destroy(None, exec_graph)
        self._graphs.clear()
        self._seen.clear()
        self._eager_only.clear()


class CaptureError(RuntimeError):
    """A stream capture failed; ``__cause__`` is the error raised while capturing."""


def check(result: tuple) -> Any:
    """cuda-python returns (err, *values): raise on error, return the values."""
    from cuda.bindings import runtime as cudart

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(err)
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}")
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


class CudartOps:
    """``GraphOps`` on NVIDIA cuda-python (cuda.bindings.runtime).  NOT YET RUN ON HARDWARE."""

    def __init__(self) -> None:
        from cuda.bindings import runtime as cudart

        self.cudart = cudart

    def begin_capture(self, stream):
        check(self.cudart.cudaStreamBeginCapture(stream, self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))

    def end_capture(self, stream):
        return check(self.cudart.cudaStreamEndCapture(stream))

    def instantiate(self, graph):
        return check(self.cudart.cudaGraphInstantiate(graph, 0))

    def update(self, exec_graph, graph) -> bool:
        err, _info = self.cudart.cudaGraphExecUpdate(exec_graph, graph)
        return err == self.cudart.cudaError_t.cudaSuccess

    def launch(self, exec_graph, stream):
        check(self.cudart.cudaGraphLaunch(exec_graph, stream))

    def synchronize(self, stream):
        check(self.cudart.cudaStreamSynchronize(stream))

    def destroy(self, graph, exec_graph):
        if exec_graph is not None:
            check(self.cudart.cudaGraphExecDestroy(exec_graph))
        if graph is not None:
            check(self.cudart.cudaGraphDestroy(graph))
