"""CUDA-graph capture, replay, update and rebuild, in one place.

``GraphCache`` keeps one instantiated graph per key (see ``tensorrt_plan.graph_key``).  The first
call for a key runs the work eagerly (warm-up: TensorRT allocates and picks tactics), the second
captures it and replays the capture; later calls replay.  When the captured work changes (new
addresses), the graph is updated in place with cudaGraphExecUpdate, or rebuilt when the update is
refused.  Counters prove replays happen.  The CUDA calls sit behind ``GraphOps`` so the policy is
tested on the CPU with a fake; ``CudartOps`` is the cuda-python implementation (not yet run on
hardware).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol


class GraphOps(Protocol):
    def begin_capture(self, stream: Any) -> None: ...
    def end_capture(self, stream: Any) -> Any: ...  # -> graph
    def instantiate(self, graph: Any) -> Any: ...  # -> executable graph
    def update(self, exec_graph: Any, graph: Any) -> bool: ...  # False = topology changed, rebuild
    def launch(self, exec_graph: Any, stream: Any) -> None: ...
    def destroy(self, graph: Any, exec_graph: Any | None) -> None: ...


@dataclass
class GraphStats:
    eager: int = 0
    captures: int = 0
    replays: int = 0
    updates: int = 0
    rebuilds: int = 0


@dataclass
class GraphCache:
    ops: GraphOps
    stream: Any
    warmup_runs: int = 1
    stats: GraphStats = field(default_factory=GraphStats)
    _graphs: dict[Hashable, Any] = field(default_factory=dict)
    _seen: dict[Hashable, int] = field(default_factory=dict)

    def run(self, key: Hashable, enqueue: Callable[[], None], recapture: bool = False) -> None:
        """Run ``enqueue`` (which enqueues the step's work on ``stream``) for ``key``: eagerly during
        warm-up, then as a replayed graph.  ``recapture`` says the enqueued work changed (for example
        new tensor addresses): the graph is updated, or rebuilt if the update is refused."""
        seen = self._seen.get(key, 0)
        if seen < self.warmup_runs:
            self._seen[key] = seen + 1
            self.stats.eager += 1
            enqueue()
            return
        exec_graph = self._graphs.get(key)
        if exec_graph is None or recapture:
            graph = self._capture(enqueue)
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
        self.ops.launch(exec_graph, self.stream)
        self.stats.replays += 1

    def _capture(self, enqueue: Callable[[], None]) -> Any:
        self.ops.begin_capture(self.stream)
        try:
            enqueue()
        finally:
            graph = self.ops.end_capture(self.stream)
        return graph

    def clear(self) -> None:
        for exec_graph in self._graphs.values():
            self.ops.destroy(None, exec_graph)
        self._graphs.clear()
        self._seen.clear()


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

    def destroy(self, graph, exec_graph):
        if exec_graph is not None:
            check(self.cudart.cudaGraphExecDestroy(exec_graph))
        if graph is not None:
            check(self.cudart.cudaGraphDestroy(graph))
