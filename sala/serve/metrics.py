"""Prometheus metrics of the server (prometheus-client), one registry per app.

Engine-wide numbers (running / waiting requests, token totals, cache pages, prefix-cache lookups) are read from
the engine's latest `stats()` snapshot when Prometheus scrapes, so counters are the engine's own totals and rates
come from Prometheus (`rate(sala_generation_tokens_total[1m])`). Per-request latencies are histograms observed
on the event loop, as clients see them.
"""
from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)


class _EngineStatsCollector:
    """Gauges and counters from a `stats()` snapshot (keys of EngineCore.stats; missing keys are skipped)."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self._stats = stats

    def collect(self):
        s = self._stats()

        def gauge(name: str, doc: str, value) -> GaugeMetricFamily | None:
            return None if value is None else GaugeMetricFamily(name, doc, value=float(value))

        def counter(name: str, doc: str, value) -> CounterMetricFamily | None:
            return None if value is None else CounterMetricFamily(name, doc, value=float(value))

        queries, hits = s.get("prefix_cache_queries"), s.get("prefix_cache_hits")
        running = None if s.get("running") is None else s["running"] + s.get("prefilling", 0)
        families = [
            gauge("sala_num_requests_running", "Requests in the running batch (prefilling or decoding)", running),
            gauge("sala_num_requests_waiting", "Requests waiting to be admitted", s.get("waiting")),
            counter("sala_prompt_tokens", "Prompt tokens of admitted requests", s.get("prompt_tokens_total")),
            counter("sala_generation_tokens", "Generated tokens", s.get("generation_tokens_total")),
            gauge("sala_cache_pages_used", "K/V pool pages (one sparse block each) mapped by running requests",
                  s.get("cache_pages_used")),
            gauge("sala_cache_pages_total", "K/V pool pages allocated at start", s.get("cache_pages_total")),
            counter("sala_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", queries),
            counter("sala_prefix_cache_hits", "Prompt tokens served from the prefix cache", hits),
            counter("sala_prefill_tokens", "Prompt tokens computed (not served from the prefix cache)",
                    s.get("prefill_tokens_total")),
            counter("sala_requests_aborted", "Requests aborted (client gone)", s.get("requests_aborted")),
            counter("sala_preemptions", "Requests preempted for K/V pages (recomputed on re-admission)",
                    s.get("preemptions")),
            gauge("sala_prefix_cache_bytes", "Bytes of lightning-state snapshots held by the prefix cache",
                  s.get("prefix_cache_bytes")),
            gauge("sala_prefix_cache_pages", "K/V pool pages held by the prefix cache", s.get("prefix_cache_pages")),
            gauge("sala_cache_pages_free", "K/V pool pages free", s.get("cache_pages_free")),
            counter("sala_spec_draft_tokens", "Draft tokens proposed to verify steps (speculative decoding)",
                    s.get("spec_draft_tokens_total")),
            counter("sala_spec_accepted_tokens", "Draft tokens accepted by verify steps (speculative decoding)",
                    s.get("spec_accepted_tokens_total")),
            gauge("sala_prefix_cache_hit_rate", "Prefix-cache hits / queries (tokens) since start",
                  (hits / queries if queries else 0.0) if queries is not None and hits is not None else None),
        ]
        return [f for f in families if f is not None]


class ServerMetrics:
    """The registry and the per-request histograms; `render()` is the /metrics body."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(stats))
        self.request_latency = Histogram("sala_request_latency_seconds", "Request arrival to last token",
                                         buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("sala_time_to_first_token_seconds", "Request arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("sala_inter_token_latency_seconds", "Time between consecutive generated tokens",
                             buckets=_ITL_BUCKETS, registry=self.registry)
        self.requests = Counter("sala_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
