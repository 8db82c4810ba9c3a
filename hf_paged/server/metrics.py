"""Prometheus metrics of the server, with vLLM's names under the ``hf_paged:`` prefix.

Gauges and counters are read from ``engine.stats`` when ``/metrics`` is scraped (a custom collector:
nothing polls, and the numbers are the engine's own). Histograms are fed by the engine's request
listener, once per finished user request, from the thread that delivers the engine's outputs
(prometheus_client's histograms are thread-safe). Every series carries the label ``model_name``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "hf_paged:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets (seconds) as vLLM's: fine below a second, coarse up to minutes.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
FINISH_REASONS = ("stop", "length", "abort")


class ServerMetrics:
    """The registry ``/metrics`` renders; ``observe`` is the engine's request listener."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine, model_name))

        def histogram(name: str, doc: str, buckets: tuple) -> Any:
            return Histogram(PREFIX + name, doc, ["model_name"], registry=self.registry, buckets=buckets).labels(
                model_name=model_name
            )

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first generated token.", _TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between consecutive tokens of a request.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish of a request.", _REQUEST_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled step.", _REQUEST_BUCKETS)
        self.prompt_len = histogram("request_prompt_tokens", "Prompt tokens of a finished request.", _TOKEN_BUCKETS)
        self.gen_len = histogram("request_generation_tokens", "Generated tokens of a finished request (all samples).",
                                 _TOKEN_BUCKETS)

    def observe(self, m: Any) -> None:
        """Record one finished request (``RequestMetrics``); runs in the engine's delivery thread."""
        if m.ttft_s is not None:
            self.ttft.observe(m.ttft_s)
        for gap in m.inter_token_latencies_s:
            self.itl.observe(gap)
        self.e2e.observe(m.e2e_s)
        if m.queue_time_s is not None:
            self.queue.observe(m.queue_time_s)
        self.prompt_len.observe(m.num_prompt_tokens)
        self.gen_len.observe(m.num_generation_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges and counters straight from ``engine.stats`` at scrape time."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.labels = [model_name]

    def describe(self) -> list:
        return []  # collected at scrape time only (nothing to check for name clashes up front)

    def collect(self):
        stats = self.engine.stats

        def family(kind, name: str, doc: str, value: float):
            metric = kind(PREFIX + name, doc, labels=["model_name"])
            metric.add_metric(self.labels, value)
            return metric

        yield family(GaugeMetricFamily, "num_requests_running", "Sequences running (holding KV blocks).", stats.running)
        yield family(GaugeMetricFamily, "num_requests_waiting", "Sequences waiting to be scheduled.", stats.waiting)
        yield family(GaugeMetricFamily, "kv_cache_usage_perc", "Share of the KV pool's blocks in use (0..1).",
                     stats.kv_usage)
        yield family(CounterMetricFamily, "prompt_tokens", "Prompt tokens submitted.", stats.prompt_tokens)
        yield family(CounterMetricFamily, "generation_tokens", "Tokens generated.", stats.generated_tokens)
        yield family(CounterMetricFamily, "num_preemptions", "Sequences preempted (KV dropped, recomputed later).",
                     stats.preemptions)
        yield family(CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                     stats.prefix_queried_tokens)
        yield family(CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                     stats.prefix_hit_tokens)
        success = CounterMetricFamily(PREFIX + "request_success", "Finished requests by finish reason.",
                                      labels=["model_name", "finished_reason"])
        finished = dict.fromkeys(FINISH_REASONS, 0) | dict(stats.finished)
        for reason, count in finished.items():
            success.add_metric([*self.labels, reason], count)
        yield success
