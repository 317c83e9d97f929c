"""The real embedded default (SmolLM2-135M-Instruct from its GGUF package): loading and exactness."""
import pytest

from pipeline.decoding.jacobi import RefineSettings
from pipeline.decoding.refiner import RefineRequest, Refiner

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
DRAFT = "The capital city of France is Paris, which is known for the Eiffel Tower and the Louvre museum."


def test_default_model_loads_offline_with_template_and_stop_ids(default_lm):
    tok = default_lm.tokenizer
    assert tok.chat_template, "chat template comes from the tokenizer"
    assert "<|im_end|>" in tok.convert_ids_to_tokens(default_lm.stop_ids)
    res = Refiner(default_lm, RefineSettings(max_new_tokens=24), mode="ar").refine([RefineRequest(QUESTION, "", "q")])
    assert "Paris" in res[0].text


@pytest.mark.parametrize("in_context", [False, True])
def test_fast_equals_reference_equals_greedy_ar_on_real_model(default_lm, in_context):
    s = dict(max_new_tokens=40, block_size=32, reserve_tokens=6)
    req = [RefineRequest(QUESTION, DRAFT, "row-7")]
    fast = Refiner(default_lm, RefineSettings(**s), mode="fast", in_context=in_context).refine(req)[0]
    ref = Refiner(default_lm, RefineSettings(**s), mode="reference", in_context=in_context).refine(req)[0]
    ar = Refiner(default_lm, RefineSettings(**s), mode="ar", in_context=in_context).refine(req)[0]
    assert fast.converged and ref.converged
    assert fast.token_ids == ref.token_ids == ar.token_ids, (fast.text, ref.text, ar.text)
    assert fast.text and fast.passes < ref.passes + 1
    assert fast.tokens_computed < ref.tokens_computed, "the cache avoids recomputing the fixed prefix"
