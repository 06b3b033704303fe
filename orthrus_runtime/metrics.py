"""Prometheus metrics of one Orthrus replica, defined once for the engine and the router.

Names carry the prefix ``orthrus_`` and mean what vLLM's ``vllm:`` metrics of the
same name mean, so PromQL written for vLLM carries over by swapping the prefix:

    rate(orthrus_spec_decode_num_accepted_tokens_total[5m])
      / rate(orthrus_spec_decode_num_draft_tokens_total[5m])     -> acceptance rate
    1 + rate(orthrus_spec_decode_num_accepted_tokens_total[5m])
      / rate(orthrus_spec_decode_num_drafts_total[5m])           -> mean acceptance length

Every series is labelled ``model`` and ``replica``; where the decoding mode changes
the meaning of a number (speculative counters, generated tokens, finished requests,
per-request latencies, cycle histograms) it is labelled ``mode`` ("orthrus"/"ar").

Scheduler gauges come from step records, or, once ``bind_engine_stats(engine.stats)``
is called (the Serve replica does), from the engine's snapshot at scrape time, which
stays right while the engine idles.

Export: each replica (engine and router) serves its own registry over HTTP
(``start_metrics_server``) instead of going through Ray's metrics agent, because
  * Ray re-exports application metrics as ``ray_<name>`` with its own labels
    (WorkerId, SessionName, Component...): the names would no longer be
    ``orthrus_*`` mirroring ``vllm:*``, and every worker restart would start new series;
  * prometheus-client semantics stay exact (counters, our bucket layouts), with no
    agent report interval between an event and the scrape;
  * the engine package must not import Ray.
In Kubernetes each GPU replica runs in its own worker pod, so a PodMonitor scrapes
one fixed port (metrics_port) per pod; on a shared node a replica takes the next
free port. Ray Serve's own metrics (``ray_serve_*``: healthy replicas, autoscaling
target) still come from Ray's metrics export port.

No ray import here: the engine package must load without Ray.
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Callable, Optional

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orthrus_runtime.types import MODES, EngineStats, RequestRecord, StatLogger, StepRecord

logger = logging.getLogger(__name__)

PREFIX = "orthrus_"
FINISH_REASONS = ("stop", "length", "abort", "error")
# The request_errors series a router creates at 0 (the dashboard's panel then shows 0, not
# "No data", before the first error): the statuses each protocol answers with.
HTTP_ERROR_CODES = ("400", "401", "404", "413", "500", "503")
GRPC_ERROR_CODES = ("INVALID_ARGUMENT", "UNAUTHENTICATED", "NOT_FOUND", "RESOURCE_EXHAUSTED", "INTERNAL",
                    "UNAVAILABLE")
# Label value of a step whose decode batch held sequences of both modes: its one
# wall-clock duration cannot be split between them.
MIXED_MODE = "mixed"

# Bucket layouts. Latencies span a millisecond CPU step up to many-minute queues.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                   20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
CYCLE_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03,
                 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
# Tokens per cycle are whole numbers from 1 to the block size B (B - 1 drafts plus the
# AR token): one bucket per integer up to 16 (the default B), coarser for larger blocks.
ACCEPTED_LENGTH_BUCKETS = tuple(float(i) for i in range(1, 17)) + (20.0, 24.0, 32.0, 48.0, 64.0)

BASE_LABELS = ("model", "replica")


class OrthrusMetrics(StatLogger):
    """All metrics of one replica, in a registry of its own.

    The engine calls on_step / on_request_finished from its step-loop thread; the
    router calls on_request_error from its event loop. prometheus-client metrics are
    thread-safe, and the per-position child cache is guarded by a lock.
    """

    def __init__(self, model: str, replica: str, registry: Optional[CollectorRegistry] = None):
        if not model or not replica:
            raise ValueError("OrthrusMetrics needs a non-empty model and replica label")
        self.model = str(model)
        self.replica = str(replica)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        base = list(BASE_LABELS)
        moded = base + ["mode"]
        r = self.registry

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, base, registry=r)

        def histogram(name: str, doc: str, labels: list[str], buckets) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r)

        # Speculative decoding (vLLM: vllm:spec_decode_*).
        self.spec_decode_num_drafts = counter(
            "spec_decode_num_drafts",
            "Number of spec decoding drafts: orthrus decode cycles of one sequence that verified at least one draft token.",
            moded)
        self.spec_decode_num_draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Number of draft tokens verified.", moded)
        self.spec_decode_num_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Number of accepted draft tokens.", moded)
        self.spec_decode_num_accepted_tokens_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens per draft position (0-based).", moded + ["position"])
        # Tokens, requests, scheduling (vLLM: vllm:prompt_tokens etc.).
        self.prompt_tokens = counter(
            "prompt_tokens", "Number of prefill tokens processed (recomputation after preemption excluded).", base)
        self.generation_tokens = counter(
            "generation_tokens", "Number of generation tokens emitted.", moded)
        self.request_success = counter(
            "request_success", "Count of finished requests, by finish reason.", moded + ["finished_reason"])
        self.num_preemptions = counter(
            "num_preemptions", "Cumulative number of preemptions from the engine.", base)
        self.request_errors = counter(
            "request_errors", "Requests refused or failed, by status code and protocol (http/grpc).",
            base + ["code", "protocol"])
        # What clients ask for (router side).
        self.request_choices = counter(
            "request_choices", "Choices requested (n per request), by protocol.", base + ["protocol"])
        self.echo_prompt_tokens = counter(
            "echo_prompt_tokens", "Prompt tokens whose log-probabilities were returned (echo), by protocol.",
            base + ["protocol"])
        # Scheduler state.
        self.num_requests_running = gauge("num_requests_running", "Number of requests in model execution batches.")
        self.num_requests_waiting = gauge("num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.kernel_compiles_after_ready = gauge(
            "kernel_compiles_after_ready",
            "Triton kernel specialisations built since the engine's warm-up ended (each one stalled a step).")
        # Per-request latencies.
        self.time_to_first_token_seconds = histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.", moded, TTFT_BUCKETS)
        self.inter_token_latency_seconds = histogram(
            "inter_token_latency_seconds",
            "Histogram of the time between successive token emissions of a request in seconds "
            "(one emission may carry several tokens in orthrus mode).", moded, ITL_BUCKETS)
        self.request_time_per_output_token_seconds = histogram(
            "request_time_per_output_token_seconds",
            "Histogram of each request's time per output token after the first, in seconds.", moded, ITL_BUCKETS)
        self.e2e_request_latency_seconds = histogram(
            "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", moded, REQUEST_BUCKETS)
        self.request_queue_time_seconds = histogram(
            "request_queue_time_seconds", "Histogram of time spent waiting before first being scheduled in seconds.",
            moded, QUEUE_BUCKETS)
        # Decode cycles.
        self.cycle_duration_seconds = histogram(
            "cycle_duration_seconds",
            "Histogram of the wall time of one batched decode cycle (draft + verify) in seconds; "
            "mode is 'mixed' when the batch held both modes.", moded, CYCLE_BUCKETS)
        self.accepted_length = histogram(
            "accepted_length",
            "Histogram of tokens emitted per decode cycle of one sequence (accepted drafts + the AR token).",
            moded, ACCEPTED_LENGTH_BUCKETS)

        self._lock = threading.Lock()
        self._per_pos: dict[tuple[str, int], Counter] = {}
        self._gauges_bound = False
        self._engine_series = False

    def bind_engine_stats(self, stats: Callable[[], EngineStats]) -> None:
        """Read the scheduler gauges from stats() (e.g. AsyncOrthrusEngine.stats) at
        scrape time instead of from step records.

        Step records stop when the engine goes idle, so a request aborted while the
        engine has nothing else to do would leave the last step's values standing;
        the engine's published snapshot is refreshed on idle too."""
        self._precreate_series()
        m, rp = self.model, self.replica
        self.num_requests_running.labels(m, rp).set_function(lambda: stats().num_running)
        self.num_requests_waiting.labels(m, rp).set_function(lambda: stats().num_waiting)
        self.kv_cache_usage_perc.labels(m, rp).set_function(lambda: stats().kv_cache_usage)
        self.kernel_compiles_after_ready.labels(m, rp).set_function(lambda: stats().num_kernel_compiles_after_ready)
        self._gauges_bound = True

    # -- helpers -----------------------------------------------------------------

    def _precreate_series(self) -> None:
        """Create every fixed-label engine series at zero, so rate() and ratios have
        data from the first scrape instead of appearing only after the first event.

        Done when an engine attaches (bind_engine_stats, or its first record), not in
        __init__: a router replica's registry then holds only what a router records,
        and does not show up as an idle engine in per-replica panels."""
        if self._engine_series:
            return
        self._engine_series = True
        m, rp = self.model, self.replica
        for metric in (self.prompt_tokens, self.num_preemptions, self.num_requests_running,
                       self.num_requests_waiting, self.kv_cache_usage_perc, self.kernel_compiles_after_ready):
            metric.labels(m, rp)
        for mode in MODES:
            for metric in (self.spec_decode_num_drafts, self.spec_decode_num_draft_tokens,
                           self.spec_decode_num_accepted_tokens, self.generation_tokens,
                           self.time_to_first_token_seconds, self.inter_token_latency_seconds,
                           self.request_time_per_output_token_seconds, self.e2e_request_latency_seconds,
                           self.request_queue_time_seconds, self.cycle_duration_seconds,
                           self.accepted_length):
                metric.labels(m, rp, mode)
            for reason in FINISH_REASONS:
                self.request_success.labels(m, rp, mode, reason)
        self.cycle_duration_seconds.labels(m, rp, MIXED_MODE)

    def precreate_positions(self, num_positions: int) -> None:
        """Create the per-draft-position acceptance counters at 0 (positions 0..num_positions-1,
        orthrus mode: the only mode that drafts), once the engine's block size is known."""
        for pos in range(num_positions):
            self._pos_counter("orthrus", pos)

    def precreate_router_series(self) -> None:
        """Create the router's labelled counters at 0 (see HTTP_ERROR_CODES)."""
        for code in HTTP_ERROR_CODES:
            self.request_errors.labels(self.model, self.replica, code, "http")
        for code in GRPC_ERROR_CODES:
            self.request_errors.labels(self.model, self.replica, code, "grpc")
        for protocol in ("http", "grpc"):
            self.request_choices.labels(self.model, self.replica, protocol)
            self.echo_prompt_tokens.labels(self.model, self.replica, protocol)

    def _pos_counter(self, mode: str, pos: int) -> Counter:
        key = (mode, pos)
        c = self._per_pos.get(key)
        if c is None:
            with self._lock:
                c = self._per_pos.get(key)
                if c is None:
                    c = self.spec_decode_num_accepted_tokens_per_pos.labels(self.model, self.replica, mode, str(pos))
                    self._per_pos[key] = c
        return c

    # -- StatLogger ----------------------------------------------------------------

    def on_step(self, rec: StepRecord) -> None:
        try:
            self._on_step(rec)
        except Exception:  # a metrics bug must never take the engine loop down
            logger.exception("orthrus metrics: on_step failed")

    def _on_step(self, rec: StepRecord) -> None:
        self._precreate_series()
        m, rp = self.model, self.replica
        if not self._gauges_bound:
            self.num_requests_running.labels(m, rp).set(rec.num_running)
            self.num_requests_waiting.labels(m, rp).set(rec.num_waiting)
            self.kv_cache_usage_perc.labels(m, rp).set(rec.kv_cache_usage)
        if rec.num_preemptions:
            self.num_preemptions.labels(m, rp).inc(rec.num_preemptions)
        if rec.num_prompt_tokens:
            self.prompt_tokens.labels(m, rp).inc(rec.num_prompt_tokens)

        drafts: dict[str, int] = defaultdict(int)
        draft_tokens: dict[str, int] = defaultdict(int)
        accepted: dict[str, int] = defaultdict(int)
        emitted: dict[str, int] = defaultdict(int)
        per_pos: dict[tuple[str, int], int] = defaultdict(int)
        modes: set[str] = set()
        for c in rec.cycles:
            modes.add(c.mode)
            emitted[c.mode] += c.num_emitted_tokens
            self.accepted_length.labels(m, rp, c.mode).observe(c.num_accepted_tokens + 1)
            if c.mode == "orthrus" and c.num_draft_tokens > 0:
                drafts[c.mode] += 1
                draft_tokens[c.mode] += c.num_draft_tokens
                accepted[c.mode] += c.num_accepted_tokens
                # Every drafted position gets a series (possibly 0): a position
                # that never accepts is a fact the dashboard should show.
                for pos in range(c.num_draft_tokens):
                    per_pos[(c.mode, pos)] += 1 if pos < c.num_accepted_tokens else 0
        for mode, n in drafts.items():
            self.spec_decode_num_drafts.labels(m, rp, mode).inc(n)
            self.spec_decode_num_draft_tokens.labels(m, rp, mode).inc(draft_tokens[mode])
            self.spec_decode_num_accepted_tokens.labels(m, rp, mode).inc(accepted[mode])
        for (mode, pos), n in per_pos.items():
            self._pos_counter(mode, pos).inc(n)

        self._count_generation_tokens(rec, emitted)
        if rec.cycles and rec.decode_duration_s > 0:
            mode = next(iter(modes)) if len(modes) == 1 else MIXED_MODE
            self.cycle_duration_seconds.labels(m, rp, mode).observe(rec.decode_duration_s)

    def _count_generation_tokens(self, rec: StepRecord, emitted_by_mode: dict[str, int]) -> None:
        """generation_tokens of the decode cycles, each under its own mode.

        The one other kind of emission, the first token a prefill samples, is counted
        in on_request_finished: a StepRecord does not say which mode's request it was,
        and a request's first token is the only token it emits outside a cycle. Once
        requests finish, the sum over modes equals the engine's generation_tokens."""
        m, rp = self.model, self.replica
        for mode, n in emitted_by_mode.items():
            if n:
                self.generation_tokens.labels(m, rp, mode).inc(n)

    def on_request_finished(self, rec: RequestRecord) -> None:
        try:
            self._on_request_finished(rec)
        except Exception:
            logger.exception("orthrus metrics: on_request_finished failed")

    def _on_request_finished(self, rec: RequestRecord) -> None:
        self._precreate_series()
        m, rp, mode = self.model, self.replica, rec.mode
        self.request_success.labels(m, rp, mode, rec.finish_reason).inc()
        self.e2e_request_latency_seconds.labels(m, rp, mode).observe(max(0.0, rec.finished_time - rec.arrival_time))
        if rec.first_scheduled_time is not None:
            self.request_queue_time_seconds.labels(m, rp, mode).observe(
                max(0.0, rec.first_scheduled_time - rec.arrival_time))
        if rec.first_token_time is None:
            return
        # The first token came from the prefill, not from a cycle (see _count_generation_tokens).
        self.generation_tokens.labels(m, rp, mode).inc()
        self.time_to_first_token_seconds.labels(m, rp, mode).observe(max(0.0, rec.first_token_time - rec.arrival_time))
        itl = self.inter_token_latency_seconds.labels(m, rp, mode)
        prev = rec.first_token_time
        tokens_after_first = 0
        for t, n in rec.emissions:
            itl.observe(max(0.0, t - prev))
            prev = t
            tokens_after_first += n
        if tokens_after_first > 0:
            self.request_time_per_output_token_seconds.labels(m, rp, mode).observe(
                max(0.0, prev - rec.first_token_time) / tokens_after_first)

    def on_choices(self, n: int, protocol: str) -> None:
        try:
            self.request_choices.labels(self.model, self.replica, protocol).inc(n)
        except Exception:
            logger.exception("orthrus metrics: on_choices failed")

    def on_echo_prompt_tokens(self, n: int, protocol: str) -> None:
        try:
            self.echo_prompt_tokens.labels(self.model, self.replica, protocol).inc(n)
        except Exception:
            logger.exception("orthrus metrics: on_echo_prompt_tokens failed")

    def on_request_error(self, code: str, protocol: str) -> None:
        try:
            self.request_errors.labels(self.model, self.replica, str(code), str(protocol)).inc()
        except Exception:
            logger.exception("orthrus metrics: on_request_error failed")


# -- HTTP export ---------------------------------------------------------------------

_servers: dict[int, tuple[object, threading.Thread]] = {}
_servers_lock = threading.Lock()


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "127.0.0.1", max_tries: int = 16) -> int:
    """Serve ``registry`` at http://host:port/metrics from a daemon thread.

    host: the address to bind (loopback by default; a Kubernetes pod that is scraped
    binds 0.0.0.0, see AppArgs.metrics_host).

    Tries port, port+1, ... (max_tries ports) so that several replicas on one node
    each get an endpoint; returns the port actually bound (port 0: any free port).
    """
    if max_tries < 1:
        raise ValueError("max_tries must be >= 1")
    last_err: Optional[OSError] = None
    candidates = [0] if port == 0 else range(port, min(port + max_tries, 65536))
    for p in candidates:
        try:
            server, thread = prometheus_client.start_http_server(p, addr=host, registry=registry)
        except OSError as e:
            last_err = e
            continue
        bound = server.server_port
        with _servers_lock:
            _servers[bound] = (server, thread)
        logger.info("orthrus metrics served on %s:%d", host, bound)
        return bound
    raise OSError(f"no free metrics port in {port}..{port + max_tries - 1} on {host}: {last_err}")


def stop_metrics_server(port: int) -> None:
    """Stop a server started by start_metrics_server (no-op when none runs there)."""
    with _servers_lock:
        entry = _servers.pop(port, None)
    if entry is None:
        return
    server, thread = entry
    server.shutdown()  # type: ignore[attr-defined]
    server.server_close()  # type: ignore[attr-defined]
    thread.join(timeout=5)
