"""A batch window that only opens under concurrency.

`@serve.batch` waits `batch_wait_timeout_s` after a batch's first request for more to arrive. That wait
buys throughput when requests come together and costs latency when one comes alone. `AdaptiveWait` sets the
window per arrival: the configured wait while other requests are in flight in this replica (or one arrived
within the last two windows), no wait for a request that arrives to an idle replica.
"""
from __future__ import annotations

import time


class AdaptiveWait:
    def __init__(self, batch_handler, wait_s: float, adaptive: bool = True):
        self.handler, self.wait_s, self.adaptive = batch_handler, wait_s, adaptive
        self.inflight, self.last_arrival = 0, float("-inf")
        batch_handler.set_batch_wait_timeout_s(wait_s)

    def arrive(self) -> None:
        now = time.monotonic()
        if self.adaptive:
            busy = self.inflight > 0 or now - self.last_arrival < 2 * self.wait_s
            self.handler.set_batch_wait_timeout_s(self.wait_s if busy else 0.0)
        self.inflight += 1
        self.last_arrival = now

    def leave(self) -> None:
        self.inflight -= 1
