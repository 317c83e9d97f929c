"""Custom Ray metrics of the DiffPO graph (exported with Ray's own and Serve's built-in metrics).

All carry a ``model`` tag: the base or aligner name from the app config.
"""
from __future__ import annotations

from ray.util import metrics

_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]


class DraftMetrics:
    def __init__(self, name: str):
        tags = {"model": name}
        self.requests = metrics.Counter("diffpo_draft_requests", "Drafts requested from a base model",
                                        tag_keys=("model", "outcome"))
        self.requests.set_default_tags(tags)
        self.latency = metrics.Histogram("diffpo_draft_latency_ms", "Time to draft one answer (ms)",
                                         boundaries=_MS, tag_keys=("model",))
        self.latency.set_default_tags(tags)
        self.tokens = metrics.Counter("diffpo_draft_tokens", "Tokens drafted by a base model", tag_keys=("model",))
        self.tokens.set_default_tags(tags)

    def record(self, outcome: str, ms: float | None = None, tokens: int | None = None):
        self.requests.inc(1, tags={"outcome": outcome})
        if ms is not None:
            self.latency.observe(ms)
        if tokens:
            self.tokens.inc(tokens)


class RefineMetrics:
    def __init__(self, name: str):
        tags = {"model": name}
        self.requests = metrics.Counter("diffpo_refine_requests", "Answers refined by an aligner",
                                        tag_keys=("model", "outcome"))
        self.requests.set_default_tags(tags)
        self.latency = metrics.Histogram("diffpo_refine_latency_ms", "Time to refine one answer (ms)",
                                         boundaries=_MS, tag_keys=("model",))
        self.latency.set_default_tags(tags)
        self.iterations = metrics.Histogram("diffpo_jacobi_iterations", "Jacobi passes per refined answer",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
                                            tag_keys=("model",))
        self.iterations.set_default_tags(tags)
        self.tokens_per_pass = metrics.Histogram("diffpo_tokens_per_pass", "Answer tokens finalized per Jacobi pass",
                                                 boundaries=[1, 1.25, 1.5, 2, 3, 4, 6, 8, 16, 32],
                                                 tag_keys=("model",))
        self.tokens_per_pass.set_default_tags(tags)
        self.batch_size = metrics.Histogram("diffpo_refine_batch_size", "Requests refined together in one batch",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("model",))
        self.batch_size.set_default_tags(tags)

    def record(self, outcome: str, ms: float | None = None, passes: int | None = None,
               tokens_per_pass: float | None = None):
        self.requests.inc(1, tags={"outcome": outcome})
        if ms is not None:
            self.latency.observe(ms)
        if passes is not None:
            self.iterations.observe(passes)
        if tokens_per_pass is not None:
            self.tokens_per_pass.observe(tokens_per_pass)


class VariantMetrics:
    """Alignment-vector knob switches of one model: cache outcome (hit / miss / base) and switch time."""

    def __init__(self, name: str):
        tags = {"model": name}
        self.switches = metrics.Counter("diffpo_variant_switches", "Knob-setting switches by cache outcome",
                                        tag_keys=("model", "outcome"))
        self.switches.set_default_tags(tags)
        self.switch_ms = metrics.Histogram("diffpo_variant_switch_ms", "Time to switch to a knob setting (ms)",
                                           boundaries=[0.1, 1, 10, 50, 100, 250, 500, 1000, 5000], tag_keys=("model",))
        self.switch_ms.set_default_tags(tags)

    def record(self, outcome: str, ms: float):
        self.switches.inc(1, tags={"outcome": outcome})
        self.switch_ms.observe(ms)
