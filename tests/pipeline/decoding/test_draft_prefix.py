"""What a base must draft for an aligner that reads only the draft's first r tokens (`draft_prefix`)."""
import pytest
import torch

from pipeline.decoding.draft_prefix import (MARGIN, PrefixGoal, base_budget, needs_full_draft, prefix_goal, settles,
                                            tokens_ratio)
from pipeline.decoding.settings import AnswerSettings, reserve_count


def test_the_goal_is_r_plus_a_margin_and_nothing_where_r_is_zero():
    s = AnswerSettings(reserve_tokens=12)
    goals = {k: prefix_goal(k, s) for k in map(str, range(200))}
    assert {g.reserved for g in goals.values()} == set(range(13)), "r ~ U{0..12}"
    for k, g in goals.items():
        assert g.reserved == reserve_count(k, s.seed, s.reserve_tokens, 10**6), "the aligner's own r"
        assert g.tokens == (0 if g.reserved == 0 else g.reserved + MARGIN) and g.skip == (g.reserved == 0)
    assert prefix_goal("x", AnswerSettings(reserve_tokens=0)).skip, "no reserved tokens: no draft needed"


def test_only_continuation_engines_without_the_draft_in_context_take_a_prefix():
    assert not needs_full_draft("vllm", False) and not needs_full_draft("ar", False)
    assert needs_full_draft("vllm", True) and needs_full_draft("fast", False) and needs_full_draft("reference", False)


@pytest.mark.integration
def test_budget_and_settling(tiny_dirs, default_lm):
    from pipeline.models import load_tokenizer

    tiny = load_tokenizer(str(tiny_dirs["llama"]))
    assert tokens_ratio(tiny, tiny) == 1.0
    bytes_per_smol = tokens_ratio(tiny, default_lm.tokenizer)  # a byte-level base before a BPE aligner
    assert bytes_per_smol > 2.0
    g = PrefixGoal(5, 5 + MARGIN)
    assert base_budget(g, 1.0, 256) == 5 + 2 * MARGIN and base_budget(g, bytes_per_smol, 20) == 20, "capped"
    smol = default_lm.tokenizer
    assert settles(smol, "one two three four five six seven eight nine ten", g, whole=False)
    assert not settles(smol, "one two", g, whole=False) and settles(smol, "one two", g, whole=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_generate_draws_the_same_first_tokens_whatever_the_cap(tiny_dirs, arch):
    """HF `generate`, sampled, the same batch: a smaller max_new_tokens gives the start of the longer answer (the
    RNG draws step by step), so a prefix capped early is the start of the full draft."""
    from pipeline.decoding.drafting import generate_answers
    from pipeline.decoding.settings import SamplingParams
    from pipeline.models import load_model

    lm = load_model(str(tiny_dirs[arch]), dtype="float32")
    convs = [[{"role": "user", "content": q}] for q in ("Say hi.", "Name a color.", "Count to five, slowly.")]
    full = generate_answers(lm, convs, SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.95),
                            seed_key="a,b,c", with_ids=True)
    for cap in (3, 11):
        short = generate_answers(lm, convs, SamplingParams(max_new_tokens=cap, temperature=1.0, top_p=0.95),
                                 seed_key="a,b,c", with_ids=True)
        for (_, _, _, long_ids), (_, _, _, ids) in zip(full, short):
            assert ids == long_ids[:len(ids)] and (len(ids) == cap or len(ids) == len(long_ids))
    torch.manual_seed(0)


def test_cpu_engines_prefill_each_prompt_whole():
    """vLLM rewinds a seeded request's generator after a chunked prefill step; CPU generators cannot (the engine
    dies), so CPU engines run without chunked prefill and a step holds the longest prompt."""
    from pipeline.decoding.vllm_engine import VllmSettings, engine_setup

    cpu = engine_setup(VllmSettings(), "auto", False, 1.0, 0.0, context_window=8192).engine_kwargs
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] == 8192
    short = engine_setup(VllmSettings(max_model_len=512), "auto", False, 1.0, 0.0, 8192).engine_kwargs
    assert short["max_num_batched_tokens"] == 2048
    gpu = engine_setup(VllmSettings(), "auto", False, 1.0, 1.0).engine_kwargs
    assert "enable_chunked_prefill" not in gpu, "GPU generators rewind: vLLM's defaults"
    mine = engine_setup(VllmSettings(engine_kwargs={"enable_chunked_prefill": True}), "auto", False, 1, 0).engine_kwargs
    assert mine["enable_chunked_prefill"] is True, "engine_kwargs win"
