"""The live-stream plumbing of the ingress (serve_app/streaming.py) on fake deployment streams (no Ray needed)."""
import asyncio
import json

import pytest

from serve_app.protocol import ApiError, chat_completion
from serve_app.replies import Refined
from serve_app.streaming import Relay, live_chunks


class FakeStream:
    """A deployment stream: its events, then the end; `cancel()` is recorded."""

    def __init__(self, events, delay: float = 0.0):
        self.events, self.delay, self.cancelled = list(events), delay, False

    async def __anext__(self):
        await asyncio.sleep(self.delay)
        if not self.events:
            raise StopAsyncIteration
        return self.events.pop(0)

    def cancel(self):
        self.cancelled = True


def body(text, finish="stop"):
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    return chat_completion("cid", "m", text, finish, usage, {"refine_ms": 50.0})


def events(chunks: list[str]) -> list:
    return [json.loads(c[len("data: "):]) if c.strip() != "data: [DONE]" else "[DONE]"
            for part in chunks for c in part.split("\n\n") if c.strip()]


async def run(deltas, answer, fail: Exception | None = None, include_usage=True):
    """A request task that relays `deltas` and ends with `answer` (or raises `fail` after the deltas)."""
    relay = Relay()
    reply = Refined(text=answer, completion_tokens=5, finish_reason="stop", refine_ms=50.0, batch_size=1,
                    engine="fast", first_token_ms=12.0)
    stream = FakeStream([{"delta": d} for d in deltas] + [{"result": reply}])

    async def request():
        await relay.read(stream, deadline=float("inf"))
        if fail:
            raise fail
        return body(answer)

    task = asyncio.ensure_future(request())
    task.add_done_callback(lambda _: relay.close())
    await relay.opened(task)
    return events([c async for c in live_chunks("cid", "m", relay, task, include_usage, t0=0.0)])


def test_deltas_become_chunks_and_the_end_carries_finish_usage_and_timings():
    out = asyncio.run(run(["Hel", "lo", " world"], "Hello world"))
    assert out[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"]["content"] for e in out[1:4]] == ["Hel", "lo", " world"]
    end = out[4]
    assert end["choices"][0]["finish_reason"] == "stop"
    assert end["diffpo"]["first_token_ms"] == 12.0 and end["diffpo"]["time_to_first_token_ms"] > 0
    assert out[5]["choices"] == [] and out[5]["usage"]["total_tokens"] == 8
    assert out[6] == "[DONE]"
    assert len(asyncio.run(run(["a"], "a", include_usage=False))) == 4  # role, text, end, [DONE]


def test_a_failure_after_the_first_text_ends_with_an_error_event():
    out = asyncio.run(run(["Hel"], "", fail=ApiError(504, "too slow", type="timeout", code="timeout")))
    assert out[1]["choices"][0]["delta"]["content"] == "Hel"
    assert out[2]["error"] == {"message": "too slow", "type": "timeout", "param": None, "code": "timeout"}
    assert out[3] == "[DONE]" and len(out) == 4


def test_a_stream_that_does_not_join_to_the_answer_never_ends_as_a_success():
    out = asyncio.run(run(["Hel", "p"], "Hello"))
    assert "error" in out[-2] and "not the answer" in out[-2]["error"]["message"]
    finishes = [e["choices"][0]["finish_reason"] for e in out if isinstance(e, dict) and e.get("choices")]
    assert not any(finishes)


def test_errors_before_the_first_text_are_raised_for_a_json_answer():
    async def go():
        relay = Relay()

        async def request():
            raise ApiError(400, "bad request")

        task = asyncio.ensure_future(request())
        await relay.opened(task)

    with pytest.raises(ApiError, match="bad request"):
        asyncio.run(go())


def test_a_cancelled_read_cancels_the_deployment_stream():
    async def go():
        relay, stream = Relay(), FakeStream([{"delta": "x"}] * 100, delay=0.05)
        task = asyncio.ensure_future(relay.read(stream, deadline=float("inf")))
        await relay.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return stream.cancelled

    assert asyncio.run(go())
