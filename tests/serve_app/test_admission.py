"""The admission gate (serve_app/admission.py) on its own: plain asyncio, real clocks, short times."""
import asyncio
import time

import pytest

from serve_app.admission import Gate, Refused


def run(coro):
    return asyncio.run(coro)


def test_free_slots_start_at_once_and_the_rest_wait_in_order():
    async def main():
        g = Gate("d", max_concurrent=2)
        a, b = await g.admit(1.0), await g.admit(1.0)
        assert a.waited_s == b.waited_s == 0.0 and g.running == 2
        order = []

        async def later(i):
            t = await g.admit(5.0)
            order.append(i)
            return t

        waiting = [asyncio.ensure_future(later(i)) for i in range(3)]
        await asyncio.sleep(0.05)
        assert len(g.waiters) == 3 and not order
        g.release(0.5)
        await asyncio.sleep(0.01)
        assert order == [0] and g.running == 2
        g.release(0.5)
        g.release(0.5)
        tickets = await asyncio.gather(*waiting)
        assert order == [0, 1, 2], "first come, first started"
        assert all(t.waited_s > 0.04 for t in tickets)
        assert g.answer_s == pytest.approx(0.5)
    run(main())


def test_a_predicted_wait_over_the_budget_is_refused_at_once():
    async def main():
        g = Gate("d", max_concurrent=1)
        await g.admit(1.0)
        g.answer_s = 2.0  # measured: an answer takes 2 s, one slot
        t0 = time.monotonic()
        with pytest.raises(Refused) as e:
            await g.admit(1.0)  # would wait ~2 s for the running one
        assert time.monotonic() - t0 < 0.05, "refused at once, not after waiting"
        assert e.value.reason == "over_budget" and e.value.wait_s == pytest.approx(2.0)
        assert e.value.retry_after_s == 1  # ceil(2 - 1)
        assert not g.waiters and g.running == 1, "a refused request holds nothing"
        # within the budget it queues: 2 s answers, budget 3 s
        w = asyncio.ensure_future(g.admit(3.0))
        await asyncio.sleep(0.01)
        assert len(g.waiters) == 1
        # the second in line would wait 2 answers on one slot: 4 s > 3 s
        with pytest.raises(Refused):
            await g.admit(3.0)
        g.release(2.0)
        assert (await w).waited_s > 0
    run(main())


def test_retry_after_counts_the_clients_refused_before():
    """Each refused client comes back: Retry-After grows with the refusals of the last window, so that the slots
    can start them all within it, up to MAX_RETRY_S; once they are past, it is the queue's own again."""
    from serve_app.admission import MAX_RETRY_S

    async def main():
        g = Gate("d", max_concurrent=1)
        await g.admit(1.0)
        g.answer_s = 1.0
        after = []
        for _ in range(10):
            with pytest.raises(Refused) as e:
                await g.admit(0.5)
            after.append(e.value.retry_after_s)
        assert after[0] == 1 and after == sorted(after), after
        assert after[-1] == 10, "10 refused clients, 1 s answers on one slot, 0.5 s budget: ceil(10 - 0.5)"
        g.answer_s = 1000.0
        with pytest.raises(Refused) as e:
            await g.admit(0.5)
        assert e.value.retry_after_s == MAX_RETRY_S
        g.answer_s = 1.0
        g.refusals = type(g.refusals)(t - 3600 for t in g.refusals)  # those refusals are long past
        with pytest.raises(Refused) as e:
            await g.admit(0.5)
        assert e.value.retry_after_s == 1
    run(main())


def test_a_wrong_prediction_is_caught_by_the_queue_timeout():
    async def main():
        g = Gate("d", max_concurrent=1)
        await g.admit(1.0)  # nothing measured yet: the prediction cannot refuse
        t0 = time.monotonic()
        with pytest.raises(Refused) as e:
            await g.admit(0.2)
        assert e.value.reason == "queue_timeout" and 0.19 < time.monotonic() - t0 < 0.5
        assert not g.waiters and g.running == 1
    run(main())


def test_more_replicas_more_slots_and_waiters_start():
    async def main():
        g = Gate("d", max_concurrent=2)
        for _ in range(2):
            await g.admit(None)
        w = asyncio.ensure_future(g.admit(None))  # no budget: waits as long as it takes
        await asyncio.sleep(0.01)
        assert not w.done()
        g.resize(2)  # Serve's autoscaler added a replica
        await asyncio.sleep(0.01)
        assert w.done() and g.slots == 4 and g.running == 3
        g.resize(0)  # every replica lost: still one replica's slots (requests wait for the replacement)
        assert g.slots == 2
    run(main())


def test_a_client_that_leaves_while_waiting_frees_its_place():
    async def main():
        g = Gate("d", max_concurrent=1)
        await g.admit(None)
        w = asyncio.ensure_future(g.admit(None))
        await asyncio.sleep(0.01)
        w.cancel()
        await asyncio.sleep(0.01)
        assert not g.waiters
        g.release(0.1)
        assert g.running == 0, "the slot went to nobody, not to the cancelled request"
    run(main())


def test_streams_count_their_first_token():
    async def main():
        g = Gate("d", max_concurrent=1)
        await g.admit(10.0)
        g.answer_s, g.first_token_s = 1.0, 3.0
        assert g.predicted_wait(stream=False) == pytest.approx(1.0)
        assert g.predicted_wait(stream=True) == pytest.approx(4.0)
        with pytest.raises(Refused):
            await g.admit(2.0, stream=True)  # 1 s queue + 3 s to the first token > 2 s
        w = asyncio.ensure_future(g.admit(2.0))  # a plain request waits 1 s: admitted to the queue
        await asyncio.sleep(0.01)
        assert len(g.waiters) == 1
        w.cancel()
    run(main())
