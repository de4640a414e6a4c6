"""Prometheus metrics of one server (own registry, so several apps in one process do not clash)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = tuple(2 ** i for i in range(6, 20))


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("teacher_requests", "POST /v1/targets requests by status code (499: the client "
                                "closed the connection first; never sent)", ["code"], registry=r)
        self.latency = Histogram("teacher_request_latency_seconds", "POST /v1/targets latency (admission to "
                                 "response)", buckets=LATENCY_BUCKETS, registry=r)
        self.samples = Counter("teacher_samples", "samples processed", registry=r)
        self.tokens = Counter("teacher_tokens", "tokens processed (prefill)", registry=r)
        self.batch_samples = Histogram("teacher_batch_samples", "samples per engine batch", buckets=SIZE_BUCKETS,
                                       registry=r)
        self.batch_tokens = Histogram("teacher_batch_tokens", "real tokens per engine batch", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.batch_padding = Counter("teacher_padded_tokens", "padded tokens (batch x longest) run", registry=r)
        self.batch_seconds = Histogram("teacher_batch_seconds", "engine time per batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.queue_tokens = Gauge("teacher_queue_tokens", "tokens admitted and not finished", registry=r)
        self.queue_samples = Gauge("teacher_queue_samples", "samples waiting for a batch", registry=r)
        self.inflight = Gauge("teacher_inflight_requests", "requests admitted: body arrived, being decoded, "
                              "queued or computed (bounded by --max-inflight-requests)", registry=r)
        self.receiving = Gauge("teacher_receiving_requests", "POST /v1/targets bodies being received", registry=r)
        self.open_connections = Gauge("teacher_open_connections", "open HTTP connections", registry=r)
        self.connections_refused = Counter("teacher_connections_refused", "connections answered 503 because "
                                           "--max-connections were open", registry=r)
        self.receive_timeouts = Counter("teacher_receive_timeouts", "connections closed by the connection layer "
                                        "because a request's headers (408) or an unread body stalled", ["phase"],
                                        registry=r)
        self.tokens_per_second = Gauge("teacher_tokens_per_second", "recent engine throughput (EMA over batches)",
                                       registry=r)

    def bind_engine(self, engine) -> None:
        self.queue_tokens.set_function(lambda: engine.queued_tokens)
        self.queue_samples.set_function(lambda: engine.queued_samples)
        self.tokens_per_second.set_function(engine.tokens_per_second)

    # BatchObserver (called from the engine's worker thread; prometheus_client is thread-safe)
    def on_batch(self, samples: int, tokens: int, padded_tokens: int, seconds: float) -> None:
        self.samples.inc(samples)
        self.tokens.inc(tokens)
        self.batch_samples.observe(samples)
        self.batch_tokens.observe(tokens)
        self.batch_padding.inc(padded_tokens)
        self.batch_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
