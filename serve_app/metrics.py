"""Custom Ray metrics of the DiffPO graph (exported with Ray's own and Serve's built-in metrics).

All carry a ``model`` tag: the base or aligner name from the app config; counters also an ``outcome``.
"""
from __future__ import annotations

from ray.util import metrics

_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]


def _counter(name: str, doc: str, model: str, by_outcome: bool = False) -> metrics.Counter:
    c = metrics.Counter(name, doc, tag_keys=("model", "outcome") if by_outcome else ("model",))
    c.set_default_tags({"model": model})
    return c


def _histogram(name: str, doc: str, model: str, boundaries: list[float]) -> metrics.Histogram:
    h = metrics.Histogram(name, doc, boundaries=boundaries, tag_keys=("model",))
    h.set_default_tags({"model": model})
    return h


class DraftMetrics:
    def __init__(self, name: str):
        self.requests = _counter("diffpo_draft_requests", "Drafts requested from a base model", name, by_outcome=True)
        self.latency = _histogram("diffpo_draft_latency_ms", "Time to draft one answer (ms)", name, _MS)
        self.tokens = _counter("diffpo_draft_tokens", "Tokens drafted by a base model", name)

    def record(self, outcome: str, ms: float | None = None, tokens: int | None = None):
        self.requests.inc(1, tags={"outcome": outcome})
        if ms is not None:
            self.latency.observe(ms)
        if tokens:
            self.tokens.inc(tokens)


class RefineMetrics:
    """An aligner's answers. Each engine records what it computed: the Jacobi engines (fast, reference) their
    passes and tokens per pass, the greedy-continuation engines (vllm, ar) the tokens they generated."""

    def __init__(self, name: str):
        self.requests = _counter("diffpo_refine_requests", "Answers refined by an aligner", name, by_outcome=True)
        self.latency = _histogram("diffpo_refine_latency_ms", "Time to refine one answer (ms)", name, _MS)
        self.iterations = _histogram("diffpo_jacobi_iterations", "Jacobi passes per refined answer (Jacobi engines)",
                                     name, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024])
        self.tokens_per_pass = _histogram("diffpo_tokens_per_pass",
                                          "Answer tokens finalized per Jacobi pass (Jacobi engines)", name,
                                          [1, 1.25, 1.5, 2, 3, 4, 6, 8, 16, 32])
        self.generated_tokens = _histogram("diffpo_generated_tokens",
                                           "Tokens generated per refined answer (vLLM and ar engines)", name,
                                           [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096])
        self.batch_size = _histogram("diffpo_refine_batch_size", "Requests refined together in one batch", name,
                                     [1, 2, 4, 8, 16, 32, 64])

    def record(self, outcome: str, reply=None):
        """One request's outcome; with `reply` (a `serve_app.replies.Refined`) its latency and the statistics
        its engine computed (what it did not compute is None there and recorded nowhere)."""
        self.requests.inc(1, tags={"outcome": outcome})
        if reply is None:
            return
        self.latency.observe(reply.refine_ms)
        if reply.iterations is not None:
            self.iterations.observe(reply.iterations)
        if reply.tokens_per_pass is not None:
            self.tokens_per_pass.observe(reply.tokens_per_pass)
        if reply.generated_tokens is not None:
            self.generated_tokens.observe(reply.generated_tokens)


class VariantMetrics:
    """Alignment-vector knob switches of one model: cache outcome (hit / miss / base) and switch time."""

    def __init__(self, name: str):
        self.switches = _counter("diffpo_variant_switches", "Knob-setting switches by cache outcome", name,
                                 by_outcome=True)
        self.switch_ms = _histogram("diffpo_variant_switch_ms", "Time to switch to a knob setting (ms)", name,
                                    [0.1, 1, 10, 50, 100, 250, 500, 1000, 5000])

    def record(self, outcome: str, ms: float):
        self.switches.inc(1, tags={"outcome": outcome})
        self.switch_ms.observe(ms)


class AdmissionMetrics:
    """The ingress's admission (serve_app/admission.py) and the replicas it counts: queue wait of admitted requests,
    refusals by reason (the gate's over_budget / queue_timeout and every other 503 / 504: overloaded,
    replica_unavailable, timeout), and per serving deployment the running replicas, requests running and waiting."""

    def __init__(self):
        self.queue_wait = metrics.Histogram("diffpo_queue_wait_ms", "Time an admitted request waited to start (ms)",
                                            boundaries=[1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
                                            tag_keys=("route",))
        self.refused = metrics.Counter("diffpo_refused_requests", "Requests answered 503/504 instead, by reason",
                                       tag_keys=("route", "reason"))
        self.replicas = metrics.Gauge("diffpo_replicas", "Running replicas of a deployment (as Serve reports them)",
                                      tag_keys=("deployment",))
        self.running = metrics.Gauge("diffpo_admission_running", "Requests running on a serving deployment",
                                     tag_keys=("deployment",))
        self.waiting = metrics.Gauge("diffpo_admission_waiting", "Requests waiting to start on a serving deployment",
                                     tag_keys=("deployment",))

    def admitted(self, route: str, waited_s: float) -> None:
        self.queue_wait.observe(waited_s * 1000, tags={"route": route})

    def refusal(self, route: str, reason: str) -> None:
        self.refused.inc(1, tags={"route": route, "reason": reason})

    def deployments(self, replicas: dict[str, int], gates: dict) -> None:
        for name, n in replicas.items():
            self.replicas.set(n, tags={"deployment": name})
        for name, g in gates.items():
            self.running.set(g.running, tags={"deployment": name})
            self.waiting.set(len(g.waiters), tags={"deployment": name})
