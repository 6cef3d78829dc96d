"""``GET /metrics``: the server's Prometheus metrics (prometheus_client, one registry per server).

Names follow Prometheus' conventions (base units, ``_total`` counters) and mirror vLLM's where they overlap:
requests running and waiting, prompt and generated tokens, time to first token, inter-token latency and end-to-end
latency histograms, and finished requests by outcome.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge(
            "gptlab_requests_running", "Requests holding cache rows (prefilling or decoding)", registry=r
        )
        self.waiting = Gauge("gptlab_requests_waiting", "Requests queued for cache rows", registry=r)
        self.rows = Gauge("gptlab_cache_rows_used", "KV-cache rows in use", registry=r)
        self.prompt_tokens = Counter("gptlab_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("gptlab_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("gptlab_requests", "Requests ended, by outcome", ["outcome"], registry=r)
        self.ttft = Histogram(
            "gptlab_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "gptlab_inter_token_latency_seconds", "Time between a choice's tokens", buckets=LATENCY_BUCKETS, registry=r
        )
        self.cancel_steps = Histogram(
            "gptlab_cancel_delay_steps",
            "Decode steps between a request's cancellation (its client left) and its rows being freed",
            buckets=(0, 1, 2, 3, 5, 10),
            registry=r,
        )
        self.spec_proposed = Counter(
            "gptlab_spec_proposed_tokens", "Speculative decoding: draft tokens proposed", registry=r
        )
        self.spec_accepted = Counter(
            "gptlab_spec_accepted_tokens", "Speculative decoding: draft tokens the target accepted", registry=r
        )
        self.prefix_asked = Counter(
            "gptlab_prefix_cache_queries_tokens", "Prompt slots looked up in the prefix cache", registry=r
        )
        self.prefix_hit = Counter(
            "gptlab_prefix_cache_hits_tokens", "Prompt slots taken from the prefix cache, not prefilled", registry=r
        )
        self.prefix_evicted = Counter(
            "gptlab_prefix_cache_evicted_blocks", "Prefix-cache blocks evicted to make room", registry=r
        )
        self.prefix_blocks = Gauge("gptlab_prefix_cache_blocks", "Prefix-cache blocks held", registry=r)
        self.prefix_bytes = Gauge(
            "gptlab_prefix_cache_capacity_bytes", "Memory the prefix cache holds for its blocks", registry=r
        )
        self.e2e = Histogram(
            "gptlab_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r
        )

    def watch(self, scheduler: Any) -> None:
        """Read the gauges from ``scheduler`` at each scrape."""
        self.running.set_function(lambda: scheduler.counts()["running"])
        self.waiting.set_function(lambda: scheduler.counts()["waiting"])
        self.rows.set_function(lambda: scheduler.counts()["rows"])
        prefix = scheduler.prefix
        self.prefix_blocks.set_function(lambda: 0 if prefix is None else prefix.used)
        self.prefix_bytes.set(0 if prefix is None else prefix.nbytes)

    def event(self, name: str, job: Any, **kw: Any) -> None:
        """Called by the scheduler thread (prometheus_client is thread-safe)."""
        if name == "admitted":
            self.prompt_tokens.inc(len(job.request.prompt))
        elif name == "token":
            self.generation_tokens.inc()
            if kw.get("gap") is not None:
                self.itl.observe(kw["gap"])
        elif name == "speculative":
            self.spec_proposed.inc(kw["proposed"])
            self.spec_accepted.inc(kw["accepted"])
        elif name == "prefix":
            self.prefix_asked.inc(kw["asked"])
            self.prefix_hit.inc(kw["hit"])
        elif name == "prefix_stored":
            self.prefix_evicted.inc(kw["evicted"])
        elif name == "first_token":
            self.ttft.observe(kw["ttft"])
        elif name == "finished":
            self.e2e.observe(kw["seconds"])
            self.requests.labels("finished").inc()
        elif name == "expired":  # (also counted as finished: its choices ended with finish_reason length)
            self.requests.labels("expired").inc()
        elif name in ("cancelled", "failed"):
            self.requests.labels(name).inc()
            if name == "cancelled":
                self.cancel_steps.observe(kw["steps"])

    def text(self) -> bytes:
        return generate_latest(self.registry)
