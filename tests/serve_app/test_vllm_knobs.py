"""Alignment settings as LoRA adapters on a real vLLM engine (`serve_app.llm_server.KnobLLMServer`): requests with
different settings, sent together, each give the greedy tokens of the dense merge θ + Σ λ·AV that the HF engines
use, token for token at full rank in fp32; the base model's own id still serves the base (on an all-zero adapter:
vLLM's CPU build gets rows without an adapter wrong when they share a batch with adapter rows)."""
import asyncio

import pytest
import torch

from tests.conftest import moved_copy

LINEAR_ONLY = ("embed", "norm", "lm_head")


@pytest.fixture(scope="module")
def tiny_vectors(vllm_tiny, tmp_path_factory):
    from pipeline.vectors.extract import extract_vector

    root = tmp_path_factory.mktemp("vllm-vectors")
    out = {}
    for k, seed in (("one", 1), ("two", 2)):
        moved = moved_copy(vllm_tiny, root / f"a-{k}", seed, frozen=LINEAR_ONLY)
        out[k] = str(root / f"v-{k}")
        extract_vector(str(vllm_tiny), str(moved), out[k], k, log=lambda *_: None)
    return out


def _dense_greedy(model_dir: str, vectors: dict, knobs: dict, prompts: list[list[int]], n: int) -> list[list[int]]:
    from pipeline.models import load_model
    from pipeline.vectors.knobs import load_knobbed

    lm = load_model(model_dir, dtype="float32")
    if knobs:
        load_knobbed(lm, vectors).apply(knobs)
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                    do_sample=False, eos_token_id=None, pad_token_id=0, temperature=None, top_p=None,
                                    top_k=None, min_new_tokens=n)
            outs.append(gen[0, len(p):].tolist())
    return outs


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_settings_mixed_in_one_batch_give_the_dense_merge_token_for_token(vllm_tiny, tiny_vectors, tmp_path,
                                                                         ray_local):
    from ray import serve

    from pipeline.config.stages import VllmAligner
    from pipeline.vectors.lora import adapter_name
    from serve_app.llm_server import llm_server
    from serve_app.vllm import Completions

    sec = VllmAligner(model=str(vllm_tiny), num_cpus=0.5,
                      adapters={"rank": None, "cache_dir": str(tmp_path / "adapters"), "max_loras": 2})
    name = "knobs-test"
    app = llm_server(name, str(vllm_tiny), sec, {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}},
                     vectors=tiny_vectors)
    serve.start(proxy_location="Disabled")
    handle = serve.run(app, name=name, route_prefix=None)
    try:
        engine = Completions(handle, name)
        prompts = [[5, 17, 40, 2, 9], [33, 8, 71], [12, 12, 60, 4, 19, 27], [90, 3]]
        settings = [{}, {"one": 0.5}, {"one": 0.5, "two": -1.0}]
        n = 12

        async def one(p, knobs):
            key = tuple(sorted(knobs.items()))
            out = []
            async for new, _ in engine.stream(p, n, [], incremental=False,
                                              adapter=adapter_name(key) if key else None):
                out += new
            return out

        async def run_all():
            return await asyncio.gather(*[one(p, k) for k in settings for p in prompts])

        got = asyncio.run(run_all())
        for i, knobs in enumerate(settings):
            want = _dense_greedy(str(vllm_tiny), tiny_vectors, knobs, prompts, n)
            assert got[i * len(prompts):(i + 1) * len(prompts)] == want, f"setting {knobs}"
        assert got[:len(prompts)] != got[len(prompts):2 * len(prompts)], "the settings must change the answers"
        adapters = list((tmp_path / "adapters").glob("*/adapter_config.json"))
        assert len(adapters) == 3, "one adapter per distinct setting, built once (the base's: all zeros)"
    finally:
        serve.delete(name)
