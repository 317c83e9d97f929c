"""Streaming from the engines: `on_final(i, token_ids)` reports each row's final answer tokens as they grow.

For every row what is reported only grows, never holds a stop token, starts with the reserved draft tokens
(before any pass) and ends equal to the row's result, which is the same as without the callback.
"""
import pytest

from pipeline.decoding.engine import FastEngine
from pipeline.decoding.jacobi import RefineItem, RefineSettings, reference_refine
from pipeline.decoding.refiner import RefineRequest, Refiner
from tests.pipeline.decoding.exactness import PAD, STOP, V, random_items
from tests.tiny import ARCHS, tiny_model


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param, V, seed=3)


class Recorder:
    """Collects the reports per item."""

    def __init__(self, n: int):
        self.calls: list[list[list[int]]] = [[] for _ in range(n)]

    def __call__(self, i: int, ids: list[int]) -> None:
        self.calls[i].append(list(ids))

    def check(self, items: list[RefineItem], results, stop_ids, settings=None) -> None:
        """The reports' properties; with the engine's `settings`, also that the reserved tokens come first."""
        for i, (it, res, calls) in enumerate(zip(items, results, self.calls)):
            assert calls, f"row {i} was never reported"
            for a, b in zip(calls, calls[1:]):
                assert b[:len(a)] == a and len(b) >= len(a), f"row {i}: a report does not extend the one before"
            assert calls[-1] == res.token_ids, f"row {i}: the last report is not the result"
            assert not any(t in stop_ids for ids in calls for t in ids), f"row {i}: a stop token was reported"
            held = it.draft_ids[:it.reserved][:it.cap(settings)] if settings else []
            if held and not set(held) & set(stop_ids):
                assert calls[0] == held, f"row {i}: the reserved tokens are not reported first"


S = RefineSettings(block_size=8, max_new_tokens=40, window=6)
VARIANTS = {
    "window+reseed": S,
    "exact-schedule": RefineSettings(block_size=8, max_new_tokens=40, window=None, reseed=False),
    "adaptive": RefineSettings(block_size=16, max_new_tokens=40, window=4, adaptive_window=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reports_grow_to_the_result_which_does_not_change(model, variant):
    s = VARIANTS[variant]
    items = random_items(6, seed=11, max_draft=50)
    items[0].reserved = min(12, len(items[0].draft_ids))  # several r, a long one included
    plain = FastEngine(model, s, STOP, PAD).refine(items)
    rec = Recorder(len(items))
    streamed = FastEngine(model, s, STOP, PAD).refine(items, on_final=rec)
    assert [(r.token_ids, r.passes, r.stop) for r in streamed] == [(r.token_ids, r.passes, r.stop) for r in plain]
    rec.check(items, streamed, STOP, s)
    for it, res in zip(items, streamed):
        if res.converged:
            assert res.token_ids == reference_refine(model, it, s, STOP, PAD).token_ids
    # reports come while the batch runs: rows with long answers get several reports before their last
    assert sum(len(c) > 2 for c in rec.calls) >= len(items) // 2
    assert any(len(set(map(len, c))) > 3 for c in rec.calls), "tokens are handed out pass by pass"


def test_stop_tokens_in_the_answer_and_among_the_reserved_ones(model):
    items = random_items(4, seed=12, max_draft=40)
    free = FastEngine(model, S, [], PAD).refine(items)
    # a token the model writes mid-answer becomes the stop token: the answers end there
    stop = [next(r.token_ids[len(r.token_ids) // 2] for r in free if len(r.token_ids) > 10)]
    draft = [7, 8, stop[0], 9, 10]
    items.append(RefineItem(items[0].prompt_ids, draft, reserved=4))  # a stop among the reserved tokens
    rec = Recorder(len(items))
    res = FastEngine(model, S, stop, PAD).refine(items, on_final=rec)
    assert res[-1].token_ids == [7, 8] and res[-1].passes == 0 and rec.calls[-1] == [[7, 8]]
    assert sum(r.stop == "eos" for r in res) >= 2
    rec.check(items, res, stop, S)


def test_max_iter_and_timeout_rows_end_with_their_result(model):
    s = RefineSettings(block_size=16, max_new_tokens=32, max_iter=2, window=None, reseed=False)
    items = random_items(3, seed=5, max_draft=40)
    rec = Recorder(len(items))
    res = FastEngine(model, s, STOP, PAD).refine(items, on_final=rec)
    assert not any(r.converged for r in res), "blocks accepted at max_iter"
    rec.check(items, res, STOP, s)
    rec = Recorder(len(items))
    cut = FastEngine(model, S, STOP, PAD).refine(items, max_time=0.0, on_final=rec)
    assert any(r.stop == "timeout" for r in cut)
    rec.check(items, cut, STOP, S)


@pytest.fixture(scope="module")
def lm(tiny_dirs):
    from pipeline.models import load_model

    return load_model(str(tiny_dirs["llama"]))


@pytest.mark.parametrize("mode", ["fast", "reference", "ar"])
def test_refiner_reports_in_every_mode_without_changing_results(lm, mode):
    refiner = Refiner(lm, RefineSettings(block_size=8, max_new_tokens=24, reserve_tokens=6), mode=mode)
    reqs = [RefineRequest([{"role": "user", "content": q}], d, key=q)
            for q, d in [("Tell me a story.", "Once upon a time there was"), ("Hi", "Hello! How can I help?"),
                         ("Count.", "")]]
    items = [refiner.encode(r) for r in reqs]
    plain = refiner.refine_items(items)
    rec = Recorder(len(items))
    streamed = refiner.refine_items(items, on_final=rec)
    assert [(r.token_ids, r.text) for r in streamed] == [(r.token_ids, r.text) for r in plain]
    rec.check(items, streamed, lm.stop_ids, refiner.s if mode == "fast" else None)
    if mode != "fast":  # reference / ar: each row once, when it is done
        assert all(len(c) == 1 for c in rec.calls)
