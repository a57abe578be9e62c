"""GPU memory as the torch caching allocator sees it, sampled at scrape time."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.observability.names import metric_name

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """Memory of one CUDA device as the torch caching allocator sees it."""

    device: str
    allocated_bytes: int
    reserved_bytes: int


GpuMemoryProbe = Callable[[], Sequence[GpuMemory]]


def torch_cuda_memory() -> list[GpuMemory]:
    """Per-device CUDA memory, or nothing when this process has not initialised CUDA.

    torch is looked up in ``sys.modules`` rather than imported: a worker that never imported
    torch (or never touched CUDA) is by definition not using GPU memory, and a scrape must
    neither pay for importing torch nor initialise CUDA from the HTTP thread.
    """
    torch: Any = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return []
    return [
        GpuMemory(
            device=f"cuda:{index}",
            allocated_bytes=int(torch.cuda.memory_allocated(index)),
            reserved_bytes=int(torch.cuda.memory_reserved(index)),
        )
        for index in range(torch.cuda.device_count())
    ]


class GpuMemoryCollector(Collector):
    """GPU memory gauges sampled at scrape time; no series at all when CUDA is unused."""

    def __init__(self, probe: GpuMemoryProbe) -> None:
        self._probe = probe

    def describe(self) -> list[Metric]:
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        try:
            devices = self._probe()
        except Exception:  # a failing probe must not fail the whole scrape
            log.warning("GPU memory probe failed", exc_info=True)
            devices = []
        yield from self._families(devices)

    @staticmethod
    def _families(devices: Sequence[GpuMemory]) -> Iterator[GaugeMetricFamily]:
        allocated = GaugeMetricFamily(
            metric_name("gpu_memory_allocated_bytes"),
            "GPU memory held by live tensors (torch.cuda.memory_allocated).",
            labels=["device"],
        )
        reserved = GaugeMetricFamily(
            metric_name("gpu_memory_reserved_bytes"),
            "GPU memory reserved by the torch caching allocator (torch.cuda.memory_reserved).",
            labels=["device"],
        )
        for gpu in devices:
            allocated.add_metric([gpu.device], float(gpu.allocated_bytes))
            reserved.add_metric([gpu.device], float(gpu.reserved_bytes))
        yield allocated
        yield reserved
