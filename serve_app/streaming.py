"""Live answers: the answer's text relayed to the client as SSE chunks while it is computed.

With ``stream: true`` on a route with an aligner, the ingress runs the request as usual (draft, then the aligner's
`refine_stream` instead of `refine`) in a task, and a `Relay` carries the aligner's text deltas from that task to
the response; on a bare base route on vLLM the base's `draft_stream` is relayed the same way. The HTTP status is
decided at the first delta: until then every failure is the usual JSON error (400, 503 after
`replica_failure_retries` resends, 504 past `request_timeout_s` ...); after it, a failure ends the stream with an
OpenAI-style error event (`protocol.sse_error`), and a lost replica is not resent (the client already has part of
the answer). A client that leaves cancels the request, down to the deployment's stream.
"""
from __future__ import annotations

import asyncio
import logging
import time

from .protocol import ApiError, sse_error, sse_head, sse_tail, sse_text
from .replies import Draft, Refined

log = logging.getLogger("ray.serve")


class Relay:
    """Text deltas of one request, from the task that computes it to its SSE response."""

    def __init__(self):
        self.deltas: asyncio.Queue[str | None] = asyncio.Queue()  # None: the task ended
        self.started = asyncio.Event()  # the first delta arrived
        self.first_token_ms: float | None = None  # the streaming deployment's time to its first delta

    async def read(self, stream, deadline: float) -> Draft | Refined:
        """Relay a deployment stream's {"delta": text} events and return its {"result"} (the deployment's reply:
        serve_app/replies.py); asyncio.TimeoutError past `deadline` (time.monotonic)."""
        try:
            while True:
                event = await asyncio.wait_for(stream.__anext__(), timeout=max(0.01, deadline - time.monotonic()))
                if "result" in event:
                    self.first_token_ms = event["result"].first_token_ms
                    return event["result"]
                self.deltas.put_nowait(event["delta"])
                self.started.set()
        except StopAsyncIteration:
            raise RuntimeError("the deployment's stream ended without a result") from None
        except asyncio.CancelledError:  # the client left: stop the deployment's stream too
            stream.cancel()
            raise

    def close(self) -> None:
        self.deltas.put_nowait(None)

    async def opened(self, task: asyncio.Task) -> None:
        """Wait for the first delta or the end of `task`; raise the task's error if it failed before any delta."""
        started = asyncio.ensure_future(self.started.wait())
        try:
            await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if not self.started.is_set():
            task.result()


async def live_chunks(cid: str, model: str, relay: Relay, task: asyncio.Task, include_usage: bool, t0: float):
    """The SSE chunks of a live answer: the role, each delta as it comes, then the end from `task`'s
    chat.completion (finish reason, usage, the `diffpo` extra with `first_token_ms` and
    `time_to_first_token_ms`), or an error event. `t0`: when the request arrived (time.monotonic)."""
    created, sent, first = int(time.time()), [], None
    yield sse_head(cid, model, created)
    try:
        while (text := await relay.deltas.get()) is not None:
            first = first or time.monotonic()
            sent.append(text)
            yield sse_text(cid, model, created, text)
        body = task.result()
        answer = body["choices"][0]["message"]["content"]
        if "".join(sent) != answer:  # the aligner checks this too (TextStream.close): never end on a wrong join
            raise RuntimeError(f"the streamed text ({len(''.join(sent))} characters) is not the answer "
                               f"({len(answer)} characters)")
    except ApiError as e:
        yield sse_error(e.message, e.type, e.code)
        return
    except Exception as e:
        log.exception("stream %s failed after it started", cid)
        yield sse_error(f"internal error: {type(e).__name__}: {str(e)[:300]}")
        return
    finally:
        task.cancel()  # a no-op once it is done; a client that left cancels the request
    extra = dict(body["diffpo"], time_to_first_token_ms=round(((first or time.monotonic()) - t0) * 1000, 1))
    if relay.first_token_ms is not None:
        extra["first_token_ms"] = round(relay.first_token_ms, 1)
    for chunk in sse_tail(cid, model, created, body["choices"][0]["finish_reason"], body["usage"], extra,
                          include_usage):
        yield chunk
