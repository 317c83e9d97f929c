"""A batch window that only opens under concurrency.

`@serve.batch` waits `batch_wait_timeout_s` after a batch's first request for more to arrive. That wait
buys throughput when requests come together and costs latency when one comes alone. `AdaptiveWait` sets the
window per arrival: the configured wait when the app is serving other requests (the ingress passes
`concurrent`: more than one request in flight there) or other requests are in flight in this replica, and
no wait otherwise. A per-replica signal alone is not enough: requests move between the stages in groups,
so a stage often looks idle just before a group arrives.
"""
from __future__ import annotations


class AdaptiveWait:
    def __init__(self, batch_handler, wait_s: float, adaptive: bool = True):
        self.handler, self.wait_s, self.adaptive = batch_handler, wait_s, adaptive
        self.inflight = 0
        batch_handler.set_batch_wait_timeout_s(wait_s)

    def arrive(self, concurrent: bool = False) -> None:
        if self.adaptive:
            busy = concurrent or self.inflight > 0
            self.handler.set_batch_wait_timeout_s(self.wait_s if busy else 0.0)
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
