"""vLLM computes DiffPO's output token for token: its greedy continuation of the aligner's prompt + r reserved
draft tokens (`pipeline.decoding.continuation`) equals the published Jacobi loop and transformers' greedy
`generate`, on Llama-, Qwen2- and Gemma-2-shaped aligners (Gemma-2 with a sliding window much shorter than the
sequences), for several r, in chat and draft-in-context modes, and on the real default model.

The tiny models have head size 64 (vLLM's CPU attention refuses 16). The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), in float32 like the Hugging Face side. A mismatch is diagnosed as in the
other exactness tests: a floating-point near-tie is an explicit xfail, a clear margin fails.
"""
import os

import pytest

from pipeline.decoding.continuation import RefineRequest, continuation, finish
from pipeline.decoding.refiner import Refiner
from pipeline.decoding.settings import RefineSettings
from pipeline.models import load_model
from tests.pipeline.decoding.exactness import assert_same_tokens
from tests.tiny import WINDOW, save_tiny

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup_env.sh installs the CPU build)")
pytestmark = pytest.mark.integration

MAX_NEW = 48
VLLM_SHAPE = dict(hidden=128, num_attention_heads=2, num_key_value_heads=1)  # head size 64
SHAPES = {"llama": VLLM_SHAPE, "qwen2": VLLM_SHAPE,
          "gemma2": dict(VLLM_SHAPE, head_dim=64, query_pre_attn_scalar=64)}  # sliding window 8 (tests.tiny)
REQUESTS = [
    RefineRequest([{"role": "user", "content": "Name three rivers and say where they flow."}],
                  "The Nile flows north through Egypt, the Danube east to the Black Sea.", key="a"),
    RefineRequest([{"role": "system", "content": "Answer briefly."},
                   {"role": "user", "content": "What is a prime number?"}],
                  "A prime number has exactly two divisors: one and itself.", key="b"),
    RefineRequest([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Tell me a fact."}], "Water boils at 100 C at sea level.", key="c"),
]
RESERVED = (0, 5, 12)


def start_engine(folder: str, max_model_len: int = 1024):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: no spawned children
    from vllm import LLM

    return LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=max_model_len, seed=0)


def vllm_refine(llm, items, settings, stop_ids):
    """The aligner's answers on vLLM, as the batch jobs compute them (continuation -> greedy -> finish)."""
    from vllm import SamplingParams, TokensPrompt

    prompts, params = [], []
    for it in items:
        ids, budget = continuation(it, settings)
        prompts.append(TokensPrompt(prompt_token_ids=ids))
        params.append(SamplingParams(temperature=0.0, max_tokens=budget, stop_token_ids=list(stop_ids),
                                     detokenize=False))
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [finish(it, list(o.outputs[0].token_ids), stop_ids, settings) for it, o in zip(items, outs)]


@pytest.fixture(scope="module", params=list(SHAPES))
def aligner(request, tmp_path_factory):
    arch = request.param
    folder = save_tiny(arch, tmp_path_factory.mktemp(f"vllm-{arch}"), seed=5, **SHAPES[arch])
    llm = start_engine(str(folder))
    yield arch, load_model(str(folder), dtype="float32"), llm
    del llm


@pytest.mark.parametrize("in_context", [False, True], ids=["chat", "draft-in-context"])
def test_vllm_equals_reference_jacobi_and_hf_greedy(aligner, in_context):
    arch, lm, llm = aligner
    s = RefineSettings(block_size=16, max_new_tokens=MAX_NEW)
    ref, ar = (Refiner(lm, s, mode=m, in_context=in_context) for m in ("reference", "ar"))
    items = []
    for req in REQUESTS:
        for r in RESERVED:
            item = ref.encode(req)
            item.reserved = min(r, len(item.draft_ids))
            items.append(item)
    assert len({it.reserved for it in items}) >= 3, "several r"
    got = vllm_refine(llm, items, s, lm.stop_ids)
    want_ref, want_ar = ref.refine_items(items), ar.refine_items(items)
    longest = 0
    for it, g, a, b in zip(items, got, want_ref, want_ar):
        assert g.token_ids[:it.reserved] == it.draft_ids[:it.reserved], "the reserved draft tokens come first"
        assert_same_tokens(lm.model, it, g.token_ids, a.token_ids, f"{arch} vllm vs reference (r={it.reserved})")
        assert_same_tokens(lm.model, it, g.token_ids, b.token_ids, f"{arch} vllm vs hf greedy (r={it.reserved})")
        assert g.stop == a.stop
        longest = max(longest, len(it.prompt_ids) + len(g.token_ids))
    if arch == "gemma2":
        assert longest > 5 * WINDOW, "the sequences must run well past the sliding window"


def test_vllm_equals_fast_engine_on_the_default_model(default_lm):
    """The real aligner (SmolLM2-135M-Instruct): vLLM == the fast Jacobi engine == HF greedy, draft in context."""
    from pipeline.models import resolve_model_path

    llm = start_engine(resolve_model_path("default")[0], max_model_len=2048)
    s = RefineSettings(max_new_tokens=40)
    reqs = [RefineRequest([{"role": "user", "content": "Give me three tips for sleeping better."}],
                          "Go to bed at the same time, avoid screens before bed, and keep the room cool.", key="1"),
            RefineRequest([{"role": "user", "content": "What is the capital of France?"}],
                          "The capital of France is Paris, known for the Eiffel Tower.", key="2")]
    for in_context in (True,):  # the longer prompt; chat prompts are covered on the tiny models
        fast, ar = (Refiner(default_lm, s, mode=m, in_context=in_context) for m in ("fast", "ar"))
        items = [fast.encode(r) for r in reqs]
        for it, r in zip(items, (3, 9)):
            it.reserved = min(r, len(it.draft_ids))
        got, want, greedy = vllm_refine(llm, items, s, default_lm.stop_ids), fast.refine_items(items), ar.refine_items(items)
        for it, g, w, a in zip(items, got, want, greedy):
            assert_same_tokens(default_lm.model, it, g.token_ids, w.token_ids, f"default model vllm vs fast ({in_context=})")
            assert_same_tokens(default_lm.model, it, g.token_ids, a.token_ids, f"default model vllm vs ar ({in_context=})")
