"""The fast engine on sliding-window models: Gemma-2, Gemma-3 (text) and Mistral, with a window of 8 positions
and sequences several times longer, so the sliding layers must stop seeing old positions.

Fast engine == reference loop == transformers' greedy `generate`, row by row and batched, on raw token rows and
through the `Refiner` in chat and draft-in-context modes; the masks equal transformers' own; what the engine
still cannot run exactly is refused with the reason. Mismatches go through `exactness.assert_same_tokens`
(an xfail naming the margin for a floating-point near-tie, a failure otherwise).
"""
import pytest
import torch
from transformers import Gemma3Config, Gemma3TextConfig, MistralConfig, Qwen2Config
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

from pipeline.decoding.engine import AttentionPlan, FastEngine, attention_plan, unsupported_attention
from pipeline.decoding.jacobi import RefineItem, RefineSettings, reference_refine
from pipeline.decoding.refiner import RefineRequest, Refiner
from pipeline.decoding.slot_cache import SlotCache
from pipeline.models import load_model
from pipeline.prompts import chat_prompt_ids
from tests.pipeline.decoding.exactness import PAD, STOP, V, assert_same_tokens, greedy, random_items
from tests.tiny import WINDOW, WINDOWED_ARCHS, save_tiny, tiny_model, tiny_tokenizer

MODELS = {
    "gemma2": dict(arch="gemma2"),
    "gemma2-4-layers": dict(arch="gemma2", layers=4),
    "gemma3": dict(arch="gemma3"),
    "mistral": dict(arch="mistral"),
    # the case: layer_types say full attention, yet MistralModel slides every layer
    "mistral-full-layer-types": dict(arch="mistral", layer_types=["full_attention"] * 2),
}
SETTINGS = {
    "exact-schedule": dict(window=None, reseed=False),
    "window+reseed": dict(window=8, reseed=True),
}
MAX_NEW = 48


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return tiny_model(**MODELS[request.param], vocab_size=V, seed=3)


@pytest.mark.parametrize("variant", list(SETTINGS))
def test_fast_engine_equals_reference_and_greedy_past_the_window(model, variant):
    assert model.config.sliding_window == WINDOW
    s = RefineSettings(block_size=16, max_new_tokens=MAX_NEW, max_iter=100, **SETTINGS[variant])
    items = random_items(4, seed=1)
    fast = FastEngine(model, s, STOP, PAD).refine(items)
    longest = 0
    for it, f in zip(items, fast):
        want = greedy(model, it, s.max_new_tokens)
        longest = max(longest, len(it.prompt_ids) + len(want))
        ref = reference_refine(model, it, s, STOP, PAD)
        assert ref.converged and f.converged
        assert_same_tokens(model, it, ref.token_ids, want, "reference vs greedy generate")
        assert_same_tokens(model, it, f.token_ids, want, f"fast[{variant}] vs greedy generate")
        assert f.stop == ref.stop
        if variant == "exact-schedule":
            assert f.passes <= ref.passes
    assert longest > 5 * WINDOW, "the test must run well past the window"


def test_batch_equals_one_row_at_a_time(model):
    s = RefineSettings(block_size=12, max_new_tokens=40, window=6)
    items = random_items(6, seed=2, max_prompt=40)
    batch = FastEngine(model, s, STOP, PAD).refine(items)
    for it, b in zip(items, batch):
        one = FastEngine(model, s, STOP, PAD).refine([it])[0]
        assert_same_tokens(model, it, b.token_ids, one.token_ids, "batched vs single row")
        assert (b.passes, b.tokens_computed) == (one.passes, one.tokens_computed)


def test_unconverged_blocks_replay_the_reference(model):
    s = RefineSettings(block_size=16, max_new_tokens=32, max_iter=2, window=None, reseed=False)
    items = random_items(3, seed=5, max_draft=40)
    for it, f in zip(items, FastEngine(model, s, STOP, PAD).refine(items)):
        ref = reference_refine(model, it, s, STOP, PAD)
        assert not ref.converged and not f.converged
        assert_same_tokens(model, it, f.token_ids, ref.token_ids, "fast vs reference at max_iter")


def test_slot_masks_equal_transformers_sliding_window_masks():
    cache = SlotCache(num_layers=1, capacity=64)
    cache.lengths, cache.T = [20, 13, 2], 20
    width = 6
    for window in (None, 1, WINDOW):
        got = cache.layer_mask(width, window, "cpu")
        assert got.shape == (3, 1, width, 20 + width)
        fn = sliding_window_causal_mask_function(window) if window else sliding_window_causal_mask_function(10 ** 6)
        for b, n in enumerate(cache.lengths):
            # the same row as transformers sees it without gaps: n committed tokens, then the width new ones
            want = sdpa_mask(batch_size=1, q_length=width, kv_length=n + width, q_offset=n, mask_function=fn,
                             allow_is_causal_skip=False)[0, 0]
            keys = list(range(n)) + list(range(20, 20 + width))
            assert torch.equal(got[b, 0][:, keys], want), (b, window)
            assert not got[b, 0][:, n:20].any(), "uncommitted slots stay hidden"


def test_engine_passes_eager_additive_masks_by_layer_type():
    gemma = tiny_model("gemma2", V, seed=3)
    engine = FastEngine(gemma, RefineSettings(), STOP, PAD)
    assert gemma.config._attn_implementation == "eager", "transformers runs Gemma-2 eagerly: sdpa cannot soft-cap"
    assert engine.attention == AttentionPlan(window=WINDOW, keyed=("full_attention", "sliding_attention"))
    cache = SlotCache(2, 64)
    cache.lengths, cache.T = [12, 3], 12
    masks = engine._mask(cache, [4, 2], 4)
    lowest = torch.finfo(gemma.dtype).min
    for kind, window in (("full_attention", None), ("sliding_attention", WINDOW)):
        want = torch.where(cache.layer_mask(4, window, "cpu"), 0.0, lowest)
        assert torch.equal(masks[kind], want)
    mistral = FastEngine(tiny_model("mistral", V, seed=3), RefineSettings(), STOP, PAD)
    assert mistral.attention == AttentionPlan(window=WINDOW)
    assert torch.equal(mistral._mask(cache, [4, 2], 4), cache.layer_mask(4, WINDOW, "cpu")), "one sdpa mask"


@pytest.mark.parametrize("config, reason", [
    (Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, num_hidden_layers=2),
     "sliding window in a family it supports"),
    (Gemma3TextConfig(use_bidirectional_attention=True), "attends bidirectionally"),
    (Gemma3Config(), "this gemma3 model has"),  # the image-text model: only the text-only one is supported
], ids=["qwen2-sliding", "gemma3-bidirectional", "gemma3-image-text"])
def test_what_is_still_refused_names_the_reason(config, reason):
    assert reason in unsupported_attention(config)


def test_windowed_mistral_configs_are_accepted_with_or_without_layer_types():
    for config in (MistralConfig(sliding_window=8), MistralConfig(sliding_window=8, layer_types=["full_attention"] * 32)):
        assert unsupported_attention(config) is None and attention_plan(config) == AttentionPlan(window=8)


def test_a_refused_model_raises_with_the_reason_and_still_runs_in_the_reference_loop():
    qwen = tiny_model("qwen2", V, seed=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)
    with pytest.raises(NotImplementedError, match="this qwen2 model has .*sliding_attention.*mode=reference"):
        FastEngine(qwen, RefineSettings(), STOP, PAD)
    item = random_items(1, seed=5, max_draft=10)[0]
    res = reference_refine(qwen, item, RefineSettings(max_new_tokens=24, block_size=8), STOP, PAD)
    assert_same_tokens(qwen, item, res.token_ids, greedy(qwen, item, 24), "refused model: reference vs greedy")


def test_flash_attention_on_a_windowed_model_is_refused():
    config = tiny_model("gemma2", V).config
    config._attn_implementation = "flash_attention_2"
    assert "eager and sdpa attention only; this model uses flash_attention_2" in attention_plan(config)


# ---- through the Refiner: chat and draft-in-context layouts, with each family's tokenizer -------------------
@pytest.fixture(scope="module")
def windowed_lms(tmp_path_factory):
    root = tmp_path_factory.mktemp("windowed")
    return {arch: load_model(str(save_tiny(arch, root / arch, seed=3))) for arch in WINDOWED_ARCHS}


REQUESTS = [
    RefineRequest([{"role": "user", "content": "Name three rivers and say where they flow."}],
                  "The Nile flows north through Egypt, the Danube east to the Black Sea.", key="a"),
    RefineRequest([{"role": "system", "content": "Answer briefly."},
                   {"role": "user", "content": "What is a prime number?"}],
                  "A prime number has exactly two divisors: one and itself.", key="b"),
    RefineRequest([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Tell me a fact."}], "", key="c"),
]


@pytest.mark.parametrize("in_context", [False, True], ids=["chat", "draft-in-context"])
@pytest.mark.parametrize("arch", WINDOWED_ARCHS)
def test_refiner_modes_agree_on_windowed_aligners(windowed_lms, arch, in_context):
    lm = windowed_lms[arch]
    s = RefineSettings(block_size=16, max_new_tokens=MAX_NEW)
    out = {mode: Refiner(lm, s, mode=mode, in_context=in_context).refine(REQUESTS) for mode in ("fast", "reference", "ar")}
    encoder = Refiner(lm, s, mode="reference", in_context=in_context)
    longest = 0
    for i, req in enumerate(REQUESTS):
        item = encoder.encode(req)
        longest = max(longest, len(item.prompt_ids) + len(out["ar"][i].token_ids))
        for mode in ("fast", "reference"):
            assert_same_tokens(lm.model, item, out[mode][i].token_ids, out["ar"][i].token_ids, f"{arch} {mode} vs ar")
    assert longest > 5 * WINDOW, "the test must run well past the window"


# ---- Gemma's chat layout and stop ids ------------------------------------------------------------------------
def test_gemma_chat_prompt_has_one_bos_and_merges_the_system_turn():
    tok = tiny_tokenizer("gemma")
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Why is the sky blue?"}]
    ids = chat_prompt_ids(tok, msgs)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id, "the template's BOS, once"
    assert tok.decode(ids) == ("<bos><start_of_turn>user\nAnswer briefly.\n\nWhy is the sky blue?<end_of_turn>\n"
                               "<start_of_turn>model\n")
    with pytest.raises(ValueError, match="chat template refuses this conversation: Conversation roles must alternate"):
        chat_prompt_ids(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_gemma_end_of_turn_is_a_stop_id(windowed_lms):
    lm = windowed_lms["gemma2"]
    end_of_turn = lm.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn not in (lm.tokenizer.eos_token_id, lm.model.generation_config.eos_token_id)
    assert set(lm.stop_ids) == {lm.tokenizer.eos_token_id, end_of_turn}
    ref = Refiner(lm, RefineSettings(max_new_tokens=16, reserve_tokens=0), mode="fast")
    item = ref.encode(RefineRequest([{"role": "user", "content": "hi"}], "ok"))
    item.draft_ids, item.reserved = [40, 41, end_of_turn, 42], 3
    res = ref.refine_items([item])[0]
    assert (res.token_ids, res.stop) == ([40, 41], "eos")
