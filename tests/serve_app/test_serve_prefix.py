"""Prefix drafts over HTTP when the base's tokenizer is not the aligner's: a tiny random base with a byte-level
vocabulary drafts on vLLM, the default model (SmolLM2, BPE) aligns on vLLM. A route whose base drafts only the
prefix (`drafts: as_needed`) must answer what the route with full drafts answers, on held-out AlpacaEval prompts
with sampled drafts (a seed per conversation)."""
import json
import time
from pathlib import Path

import pytest

from tests.conftest import TEST_API_KEY, TEST_API_KEY_ENV, free_port, run_serve_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_eval" / "eval_set.jsonl"
ENGINE = {"num_cpus": 0.25, "vllm": {"max_model_len": 1024}, "deployment_config": {
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, "ray_actor_options": {"num_cpus": 0.1}}}


@pytest.fixture(scope="module")
def server(ray_local, vllm_tiny):
    if not DATA.exists():
        pytest.skip(f"needs the AlpacaEval data at {DATA} (../shared/data, see its README)")
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    port = free_port()
    args = AppArgs(**{
        "bases": {"bytes": {"engine": "vllm", "model": str(vllm_tiny), **ENGINE},
                  "bytes-full": {"engine": "vllm", "model": str(vllm_tiny), "drafts": "full", **ENGINE}},
        "aligners": {"smol": {"engine": "vllm", "model": "default", "refine": {"max_new_tokens": 32}, **ENGINE}},
        "models": {"prefix": {"base": "bytes", "aligner": "smol"}, "full": {"base": "bytes-full", "aligner": "smol"}},
        "max_tokens_cap": 32, "default_max_tokens": 32, "request_timeout_s": 50, "api_key_env": TEST_API_KEY_ENV,
    })
    light = {"ray_actor_options": {"num_cpus": 0.05}}
    url = run_serve_app(build_graph(args, {"Ingress": light, "base-bytes": light, "base-bytes-full": light,
                                           "aligner-smol": light}), "diffpo-prefix", port)
    deadline = time.time() + 600
    while serve.status().applications["diffpo-prefix"].status != "RUNNING":
        assert time.time() < deadline, f"the graph did not start: {serve.status().applications['diffpo-prefix']}"
        time.sleep(2)
    yield url
    serve.shutdown()


def test_a_byte_level_base_drafts_prefixes_that_give_the_full_drafts_answers(server):
    from openai import OpenAI

    c = OpenAI(base_url=server + "/v1", api_key=TEST_API_KEY, max_retries=0, timeout=120)
    prompts = [json.loads(x)["instruction"] for x in open(DATA) if json.loads(x)["id"] % 4 == 0][8:14]
    prefixes = 0
    for q in prompts:
        msgs = [{"role": "user", "content": q}]
        full = c.chat.completions.create(model="full", messages=msgs, max_tokens=32)
        part = c.chat.completions.create(model="prefix", messages=msgs, max_tokens=32)
        assert part.choices[0].message.content == full.choices[0].message.content, q
        a, b = full.model_extra["diffpo"], part.model_extra["diffpo"]
        assert a["draft_prefix"] is False and len(b["draft"]) <= len(a["draft"])
        prefixes += b["draft_prefix"]
    # a byte-level base writes ~6 tokens per aligner token (x1.5), so under a 32-token cap only small r leave
    # a budget below the whole draft: a few prefixes (and r = 0 rows, which draft nothing)
    assert prefixes >= 1, "some drafts are prefixes"
