"""Admission on a queue-time budget: a request that cannot start within its route's `max_queue_wait_s` is refused
at once (503 + Retry-After) instead of waiting its turn.

Why our own gate, not Serve's or vLLM's queues: Serve bounds a deployment's queue by a count
(`max_queued_requests`), which is a time only if every answer takes as long as every other; its router's
queue wait is a histogram after the fact (`serve_request_router_fulfillment_time_ms`). vLLM admits every request
into its running batch up to `max_num_seqs` (256 by default): on the measured 2-core graph 32 clients all ran at
once, nothing waited in vLLM's queue, and every answer took 10x its time alone. So the gate bounds how many
requests run at once (`max_concurrent` per replica of the deployment that serves the route, the replica count read
from Serve), keeps the others in a FIFO, and predicts each newcomer's wait from the queue ahead of it and the
answer time it measures:

    wait ≈ (queued ahead + 1) · (mean answer time) / slots,   slots = max_concurrent · running replicas

A newcomer whose predicted wait is over its budget is refused at once (reason `over_budget`); one admitted to the
queue that has not started when its budget runs out is refused then (`queue_timeout`: the prediction was wrong).
A streaming request is started at its first token: its predicted wait adds the streams' mean time to first
token.

Retry-After tells a refused client when a slot can be its own: not only the queue ahead, but also the clients
refused before it, who come back too. The refusals of the last Retry-After window stand for those clients (each
comes back once per window), and the window must be long enough for the slots to start all of them:

    retry after ≈ (queued + refused in the last window) · (mean answer time) / slots − budget,  1 s .. MAX_RETRY_S

(With only the queue ahead counted, every refused client came back after 1 s to a queue that was still full: on
the measured 2-core graph 32 clients sent 22 refusals a second, CPU the engine then lacked.)

Plain asyncio, no Ray: the ingress holds one gate per serving deployment (routes that end in the same deployment
share it).
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

MAX_RETRY_S = 60  # the longest Retry-After the gate sends


class Refused(Exception):
    """A request the gate will not start: why (`over_budget`, `queue_timeout`), and when to retry."""

    def __init__(self, reason: str, wait_s: float, budget_s: float, retry_after_s: int):
        self.reason, self.wait_s, self.budget_s, self.retry_after_s = reason, wait_s, budget_s, retry_after_s
        super().__init__(f"{reason}: predicted wait {wait_s:.1f} s over the budget of {budget_s:g} s")


@dataclass
class Ticket:
    """An admitted request: how long it waited for its slot, and when it got it."""
    waited_s: float
    started: float


class Gate:
    """Slots and a FIFO queue for the requests of one serving deployment."""

    def __init__(self, name: str, max_concurrent: int, replicas: int = 1, smoothing: float = 0.2):
        self.name, self.max_concurrent, self.smoothing = name, max_concurrent, smoothing
        self.replicas = max(1, replicas)
        self.running = 0
        self.waiters: deque[asyncio.Future] = deque()
        self.answer_s: float | None = None  # mean answer time (exponentially weighted), once one finished
        self.first_token_s: float | None = None  # the same for streams' first tokens
        self.refusals: deque[float] = deque()  # when the refusals of the last Retry-After window were
        self.retry_s = 1  # the last Retry-After sent

    @property
    def slots(self) -> int:
        return self.max_concurrent * self.replicas

    def predicted_wait(self, stream: bool = False) -> float:
        """Seconds a request arriving now would wait to start (its first token, for a stream)."""
        ttft = (self.first_token_s or 0.0) if stream else 0.0
        if self.running < self.slots and not self.waiters:
            return ttft
        if self.answer_s is None:  # nothing measured yet: only the queue timeout guards the budget
            return ttft
        return (len(self.waiters) + 1) * self.answer_s / self.slots + ttft

    async def admit(self, budget_s: float | None, stream: bool = False) -> Ticket:
        """Wait for a slot within `budget_s` (None: no budget, wait as long as it takes), or raise Refused."""
        t0 = time.monotonic()
        if self.running < self.slots and not self.waiters:
            self.running += 1
            return Ticket(0.0, t0)
        if budget_s is not None:
            wait = self.predicted_wait(stream)
            if wait > budget_s:
                raise self._refuse("over_budget", wait, budget_s)
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        ttft = (self.first_token_s or 0.0) if stream else 0.0
        try:
            await asyncio.wait_for(asyncio.shield(fut), None if budget_s is None else max(0.01, budget_s - ttft))
        except asyncio.TimeoutError:
            if not fut.done():
                self.waiters.remove(fut)
                fut.cancel()
                raise self._refuse("queue_timeout", time.monotonic() - t0, budget_s,
                                   self.predicted_wait(stream)) from None
        except asyncio.CancelledError:  # the client went away while it waited
            if fut.done() and not fut.cancelled():
                self.release(None)  # the slot it had just been given goes to the next
            elif fut in self.waiters:
                self.waiters.remove(fut)
            raise
        now = time.monotonic()
        return Ticket(now - t0, now)

    def release(self, answer_s: float | None, first_token_s: float | None = None) -> None:
        """A started request ended (`answer_s`: its time from start to end, None if it did not finish normally)."""
        self.running -= 1
        if answer_s is not None:
            self.answer_s = answer_s if self.answer_s is None else (
                (1 - self.smoothing) * self.answer_s + self.smoothing * answer_s)
        if first_token_s is not None:
            self.first_token_s = first_token_s if self.first_token_s is None else (
                (1 - self.smoothing) * self.first_token_s + self.smoothing * first_token_s)
        self._wake()

    def resize(self, replicas: int) -> None:
        """The serving deployment now runs `replicas` replicas (Serve's autoscaler, or a lost node)."""
        self.replicas = max(1, replicas)
        self._wake()

    def _wake(self) -> None:
        while self.waiters and self.running < self.slots:
            fut = self.waiters.popleft()
            if not fut.done():
                self.running += 1
                fut.set_result(None)

    def _refuse(self, reason: str, wait_s: float, budget_s: float, ahead_s: float | None = None) -> Refused:
        """The refusal, with a Retry-After long enough for the queue and the recently refused (module docstring);
        `ahead_s`: the queue's own part (default: the predicted wait over the budget)."""
        now = time.monotonic()
        while self.refusals and self.refusals[0] < now - self.retry_s:
            self.refusals.popleft()
        self.refusals.append(now)
        backlog = (len(self.waiters) + len(self.refusals)) * (self.answer_s or 0.0) / self.slots - budget_s
        ahead = wait_s - budget_s if ahead_s is None else ahead_s
        self.retry_s = min(MAX_RETRY_S, max(1, math.ceil(max(ahead, backlog))))
        return Refused(reason, wait_s, budget_s, self.retry_s)
