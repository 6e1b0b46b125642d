"""Prometheus metrics of the service, on the default registry.

The default registry is exposed as a whole, so metrics other modules define (engine,
audit, breakers) appear on ``/api/metrics`` without being listed here. Route labels
are route templates (``/api/v1/executions/{execution_id}``), never raw paths, so a
scan of random URLs cannot grow the label set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

REQUESTS = Counter(
    "requiem_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
ERRORS = Counter(
    "requiem_errors",
    "HTTP requests that failed on the server's side (status 5xx), by error code.",
    ["route", "method", "code"],
)
REQUEST_DURATION = Histogram(
    "requiem_request_duration",
    "Seconds from a request's arrival to the end of its response.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
DATABASE_UP = Gauge(
    "requiem_database_up",
    "1 when the last health check reached the database, 0 otherwise.",
)
ACTIVE_REQUESTS = Gauge(
    "requiem_active_requests", "HTTP requests being answered right now."
)
EXECUTIONS = Counter(
    "requiem_executions",
    "Executions finished, by outcome (succeeded, failed, error, rejected).",
    ["outcome"],
)
EXECUTIONS_RUNNING = Gauge(
    "requiem_executions_running", "Executions the engine is running right now."
)
EXECUTIONS_QUEUED = Gauge(
    "requiem_executions_queued", "Executions waiting for a free execution slot."
)
ENGINE_OOM = Counter(
    "requiem_engine_oom",
    "Executions the engine ended because they exceeded their memory limit.",
)
CAS_READ_LATENCY = Histogram(
    "requiem_cas_read_latency",
    "Seconds to read and verify one CAS object for an API caller.",
    buckets=LATENCY_BUCKETS,
)


class ServiceCollector(Collector):
    """Gauges computed at scrape time: CAS size and flag states.

    Walking the CAS is not free, so its totals are recomputed at most every
    ``cas_interval_s`` seconds and served from the last walk in between.
    """

    def __init__(
        self,
        cas_totals: Callable[[], tuple[int, int]],
        flag_values: Callable[[], dict[str, bool]],
        cas_interval_s: float = 30.0,
    ) -> None:
        self._cas_totals = cas_totals
        self._flag_values = flag_values
        self._interval = cas_interval_s
        self._lock = threading.Lock()
        self._totals = (0, 0)
        self._walked_at = float("-inf")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        objects, size = self._cached_totals()
        yield GaugeMetricFamily(
            "requiem_cas_objects", "Objects in the CAS.", value=objects
        )
        yield GaugeMetricFamily(
            "requiem_cas_bytes", "Logical bytes held in the CAS.", value=size
        )
        flags = GaugeMetricFamily(
            "requiem_flag_state", "Operational flags (1 on, 0 off).", labels=["flag"]
        )
        for name, value in sorted(self._flag_values().items()):
            flags.add_metric([name], 1.0 if value else 0.0)
        yield flags

    def _cached_totals(self) -> tuple[int, int]:
        with self._lock:
            if time.monotonic() - self._walked_at >= self._interval:
                self._totals = self._cas_totals()
                self._walked_at = time.monotonic()
            return self._totals


_installed: list[Collector] = []


def install_collector(collector: Collector) -> None:
    """Register ``collector``, replacing the one an earlier app in this process set."""
    while _installed:
        REGISTRY.unregister(_installed.pop())
    REGISTRY.register(collector)
    _installed.append(collector)
