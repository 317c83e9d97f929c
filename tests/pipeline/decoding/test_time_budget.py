"""Per-call time budgets: a spent budget cuts rows off with a clear reason, an unspent one changes nothing."""
import pytest

from pipeline.decoding.drafting import Drafter, SamplingParams, generate_answers
from pipeline.decoding.engine import FastEngine
from pipeline.decoding.jacobi import RefineSettings, reference_refine
from pipeline.decoding.refiner import RefineRequest, Refiner
from tests.pipeline.decoding.exactness import PAD, STOP, V, random_items
from tests.tiny import tiny_model

SETTINGS = RefineSettings(block_size=8, max_new_tokens=32, max_iter=8, reserve_tokens=0)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", V)


@pytest.fixture(scope="module")
def lm(tiny_dirs):
    from pipeline.models import load_model

    return load_model(str(tiny_dirs["llama"]))


def is_prefix(a: list, b: list) -> bool:
    return a == b[:len(a)]


def test_fast_engine_cuts_rows_past_the_budget_and_keeps_their_final_tokens(model):
    items = random_items(3, seed=1)
    full = FastEngine(model, SETTINGS, STOP, PAD).refine(items)
    cut = FastEngine(model, SETTINGS, STOP, PAD).refine(items, max_time=0.0)
    roomy = FastEngine(model, SETTINGS, STOP, PAD).refine(items, max_time=3600.0)
    assert [r.token_ids for r in roomy] == [r.token_ids for r in full], "an unspent budget changes nothing"
    assert all(r.stop != "timeout" for r in full)
    for c, f in zip(cut, full):
        if c.stop != "timeout":  # a row that finished in the first pass is exact
            assert c.token_ids == f.token_ids
            continue
        assert c.passes == 1, "the budget is checked after every pass"
        assert is_prefix(c.token_ids, f.token_ids), "a cut row keeps only final tokens"
    assert any(c.stop == "timeout" for c in cut)


def test_reference_loop_stops_at_its_budget(model):
    it = random_items(1, seed=2)[0]
    full = reference_refine(model, it, SETTINGS, STOP, PAD)
    cut = reference_refine(model, it, SETTINGS, STOP, PAD, max_time=0.0)
    assert full.stop != "timeout" and full.passes > 1
    assert cut.stop == "timeout" and cut.passes == 1 and is_prefix(cut.token_ids, full.token_ids)


@pytest.mark.parametrize("mode", ["fast", "reference", "ar"])
def test_refiner_reports_timeout_in_every_mode(lm, mode):
    refiner = Refiner(lm, RefineSettings(block_size=8, max_new_tokens=48, reserve_tokens=0), mode=mode)
    reqs = [RefineRequest([{"role": "user", "content": "Tell me a long story."}], "Once upon a time", key="a")]
    full = refiner.refine(reqs)[0]
    assert full.stop in ("eos", "max_new_tokens")
    if full.stop == "eos" and full.new_tokens < 2:
        pytest.skip("the random model stops at once: nothing to cut")
    cut = refiner.refine(reqs, max_time=1e-9)[0]
    assert cut.stop == "timeout"
    assert is_prefix(cut.token_ids, full.token_ids)


def test_generation_cut_by_the_budget_is_an_error_not_a_short_answer(lm):
    params = SamplingParams(max_new_tokens=40, do_sample=False)
    conv = [[{"role": "user", "content": "Count to a hundred."}]]
    full = generate_answers(lm, conv, params)[0]
    assert not isinstance(full, Exception)
    if full[1] < 2:
        pytest.skip("the random model stops at once: nothing to cut")
    cut = generate_answers(lm, conv, params, max_time=1e-9)[0]
    assert isinstance(cut, TimeoutError)
    assert "time budget" in str(cut) and "max_new_tokens 40" in str(cut)
    again = Drafter(params, lm=lm).answer(conv, max_time=3600.0)[0]
    assert again[0] == full[0], "an unspent budget changes nothing"
