"""Alignment settings as LoRA adapters on a real vLLM engine (`serve_app.llm_server.KnobLLMServer`), over HTTP:
requests with different settings, sent together, each give the answer of the HF route, which runs the dense merge
θ + Σ λ·AV on the fast Jacobi engine: token for token at full rank in fp32. The base setting rides along in the same
batches (on an all-zero adapter: vLLM's CPU build gets rows without an adapter wrong when they share a batch with
adapter rows). A vLLM base with the same vectors shares that engine (one LLM server) and serves knobs per request on
bare routes, as the HF base does with its dense merges. The batch job's side: tests/jobs/test_vllm_knobs_job.py."""
import pytest


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_knobs_per_request_over_http_on_vllm_answer_what_the_hf_route_answers(vllm_tiny, vllm_vectors, ray_local):
    """16 requests, 4 settings, sent at once to the vLLM route and to the HF route (fast Jacobi engine, dense merge)
    with the same model, vectors and drafts: the same answers; bad knobs are 400s on the vLLM route too. The same
    for a base: greedy answers of a vLLM base on the adapters equal an HF base's on the dense merges."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs
    from tests.conftest import TEST_API_KEY, TEST_API_KEY_ENV, free_port, run_serve_app

    tiny, n = str(vllm_tiny), 16
    bounds = {"min": -1, "max": 2}
    engine = {"engine": "vllm", "model": tiny, "vectors": vllm_vectors, "knob_bounds": bounds,
              "adapters": {"rank": None, "max_loras": 4}, "num_cpus": 0.5, "vllm": {"max_model_len": 512},
              "deployment_config": {"ray_actor_options": {"num_cpus": 0.1}}}  # one engine setting: one LLM server
    args = AppArgs(**{
        "bases": {"tiny": {"engine": "hf", "model": tiny},
                  "hf-knobs": {"engine": "hf", "model": tiny, "vectors": vllm_vectors, "knob_bounds": bounds,
                               "variant_cache_size": 4, "batch_wait_timeout_s": 0.05},
                  "vllm-knobs": engine},
        "aligners": {
            "hf": {"engine": "fast", "model": tiny, "refine": {"max_new_tokens": n}, "vectors": vllm_vectors,
                   "knob_bounds": bounds, "variant_cache_size": 4, "batch_wait_timeout_s": 0.05},
            "vllm": {**engine, "refine": {"max_new_tokens": n}}},
        "models": {"knob-hf": {"base": "tiny", "aligner": "hf"}, "knob-vllm": {"base": "tiny", "aligner": "vllm"},
                   "base-hf": {"base": "hf-knobs"}, "base-vllm": {"base": "vllm-knobs"}},
        "max_tokens_cap": n, "default_max_tokens": n, "request_timeout_s": 60, "api_key_env": TEST_API_KEY_ENV})
    small = {"ray_actor_options": {"num_cpus": 0.05}}
    port = free_port()
    url = run_serve_app(build_graph(args, {"Ingress": small, "base-tiny": small, "aligner-hf": small,
                                           "aligner-vllm": small, "base-hf-knobs": small, "base-vllm-knobs": small}),
                        "knobs-http", port)
    try:
        import time

        deadline = time.time() + 300
        while serve.status().applications["knobs-http"].status != "RUNNING":
            assert time.time() < deadline, serve.status().applications["knobs-http"]
            time.sleep(2)
        settings = [{}, {"one": 0.5}, {"two": -0.25}, {"one": 1.0, "two": 0.5}]
        drafts = ["Blue.", "The sky is blue today.", "Red and green are colors.", "Yes."]
        jobs = [(k, d) for k in settings for d in drafts]
        headers = {"Authorization": f"Bearer {TEST_API_KEY}"}

        def ask(model, knobs, question, **extra):
            body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": n, **extra,
                    **({"alignment": knobs} if knobs else {})}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
            return r.status_code, r.json()

        def same_answers(hf_model, vllm_model, jobs, ask_one):
            """Every job sent at once to each route: 200s with the same text; the vLLM route's bodies."""
            with ThreadPoolExecutor(16) as pool:
                hf, vl = ([*pool.map(lambda j: ask_one(m, *j), jobs)] for m in (hf_model, vllm_model))
            for job, (s1, a), (s2, b) in zip(jobs, hf, vl):
                assert s1 == s2 == 200, (a, b)
                assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"], job
            return [b for _, b in vl]

        def aligned(model, knobs, draft):
            return ask(model, knobs, "Name a color.", prediction={"type": "content", "content": draft})

        vl = same_answers("knob-hf", "knob-vllm", jobs, aligned)
        for (k, _), b in zip(jobs, vl):
            if k:
                setting = b["diffpo"]["alignment"]["aligner"]
                assert setting["knobs"] == k and setting["adapter"].startswith("av:")
        assert len({b["choices"][0]["message"]["content"] for b in vl}) > 4, "knobs change answers"
        for bad, why in [({"three": 1.0}, "three"), ({"one": 5.0}, "outside the allowed range")]:
            status, body = aligned("knob-vllm", bad, "Blue.")
            assert status == 400 and why in body["error"]["message"], body
        llm_servers = [d for d in serve.status().applications["knobs-http"].deployments if d.startswith("llm-")]
        assert len(llm_servers) == 1, f"the vLLM base and aligner share one engine: {llm_servers}"

        def bare(model, knobs, question):  # a bare base, greedy
            return ask(model, knobs, question, temperature=0.0)

        asks = [(k, q) for k in settings for q in ("Name a color.", "Count to three.")]
        vl = same_answers("base-hf", "base-vllm", asks, bare)
        for (k, _), b in zip(asks, vl):
            if k:
                assert b["diffpo"]["alignment"]["base"]["knobs"] == k, b["diffpo"]
        assert len({b["choices"][0]["message"]["content"] for b in vl}) > 2, "knobs change the base's answers"
        status, body = bare("base-vllm", {"one": 5.0}, "Name a color.")
        assert status == 400 and "outside the allowed range" in body["error"]["message"], body
    finally:
        serve.shutdown()
