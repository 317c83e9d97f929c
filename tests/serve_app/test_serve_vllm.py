"""The Serve app on vLLM engines (Ray Serve LLM) over real HTTP: a tiny model vLLM's CPU kernels accept as
base and as aligner (`engine: vllm`); with the same engine settings they share one LLM server deployment
(``llm-base-tiny``), behind three thin adapters (``base-tiny``, ``aligner-aligner`` and a deliberately tight
``aligner-tight``: 1 ongoing + 1 queued request, for back-pressure).

The aligner's answers must be the DiffPO answers the in-process Jacobi engine computes from the same draft, token
for token; streams must join to the non-streamed answer and start before it is finished."""
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import TEST_API_KEY, TEST_API_KEY_ENV, free_port, ray_metric, run_serve_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
MAX_NEW = 48
MSGS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]
# three engines share the session's 2 CPUs: the tiny model's, the default model's (below), a replacement's
ENGINE = {"num_cpus": 0.5, "vllm": {"max_model_len": 512},
          "deployment_config": {"ray_actor_options": {"num_cpus": 0.1}}}
SMOL = {"num_cpus": 0.25, "vllm": {"max_model_len": 1024},
        "deployment_config": {"ray_actor_options": {"num_cpus": 0.05}}}


@pytest.fixture(scope="module")
def server(ray_local, vllm_tiny):
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    port = free_port()
    tiny = str(vllm_tiny)
    args = AppArgs(**{
        "bases": {"tiny": {"engine": "vllm", "model": tiny, **ENGINE},
                  "tiny-full": {"engine": "vllm", "model": tiny, "drafts": "full", **ENGINE}},  # the same server
        "aligners": {"aligner": {"engine": "vllm", "model": tiny, "refine": {"max_new_tokens": MAX_NEW}, **ENGINE},
                     "tight": {"engine": "vllm", "model": tiny, "refine": {"max_new_tokens": MAX_NEW}, **ENGINE},
                     # the default model (SmolLM2, BPE) after the tiny base (byte-level): tokenizers that differ
                     "smol": {"engine": "vllm", "model": "default", "refine": {"max_new_tokens": 32}, **SMOL}},
        "models": {"diffpo-vllm": {"base": "tiny", "aligner": "aligner"}, "tiny": {"base": "tiny"},
                   "diffpo-full": {"base": "tiny-full", "aligner": "aligner"},
                   "diffpo-tight": {"base": "tiny", "aligner": "tight"},
                   "bytes-prefix": {"base": "tiny", "aligner": "smol"},
                   "bytes-full": {"base": "tiny-full", "aligner": "smol"}},
        "max_tokens_cap": MAX_NEW, "default_max_tokens": 16, "request_timeout_s": 45,  # under the proxy's 60 s
        "api_key_env": TEST_API_KEY_ENV,
        "max_body_bytes": 200_000,
    })
    light = {"ray_actor_options": {"num_cpus": 0.05}}
    tight = {"ray_actor_options": {"num_cpus": 0.05}, "max_ongoing_requests": 1, "max_queued_requests": 1}
    url = run_serve_app(build_graph(args, {"Ingress": light, "base-tiny": light, "base-tiny-full": light,
                                           "aligner-aligner": light, "aligner-smol": light,
                                           "aligner-tight": tight}), "diffpo", port)
    deadline = time.time() + 600  # the ingress answers first; the engines take a minute or two to start
    while serve.status().applications["diffpo"].status != "RUNNING":
        assert time.time() < deadline, f"the vLLM graph did not start: {serve.status().applications['diffpo']}"
        time.sleep(2)
    yield {"url": url, "tiny": tiny, "port": port}
    serve.shutdown()


@pytest.fixture(scope="module")
def expected(server):
    """The aligner's answer from the in-process fast Jacobi engine, same settings and row key."""
    from pipeline.decoding.refiner import Refiner, RefineRequest
    from pipeline.decoding.settings import RefineSettings
    from pipeline.models import load_model
    from serve_app.protocol import conversation_key

    refiner = Refiner(load_model(server["tiny"], dtype="float32"), RefineSettings(max_new_tokens=MAX_NEW), mode="fast")
    return lambda messages, draft, max_tokens: refiner.refine(
        [RefineRequest(messages, draft, conversation_key(messages), max_tokens)])[0].text


def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=TEST_API_KEY, max_retries=0, timeout=120)


def test_vllm_graph_answers_what_the_jacobi_engine_computes(server, expected):
    c = client(server)
    r = c.chat.completions.create(model="diffpo-full", messages=MSGS, max_tokens=40)  # base.drafts: full
    extra = r.model_extra["diffpo"]
    assert extra["mode"] == "vllm" and extra["draft_source"] == "base" and extra["draft"]
    assert extra["draft_prefix"] is False
    assert extra["engine"] == extra["mode"], "`mode` is the old name of `engine`"
    # no Jacobi iteration ran: no Jacobi statistics, the tokens vLLM generated instead (at most the cap, and with
    # the r <= 12 reserved draft tokens they make up the answer)
    assert extra["iterations"] is None and extra["tokens_per_pass"] is None and extra["converged"] is None
    assert r.usage.completion_tokens - 12 <= extra["generated_tokens"] <= 40
    assert r.choices[0].message.content == expected(MSGS, extra["draft"], 40), "vLLM aligner == fast Jacobi engine"
    assert 0 < r.usage.completion_tokens <= 40 and r.usage.prompt_tokens > 0

    # the bare base: the same sampling seed for the same conversation, so the same draft
    bare = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=40)
    assert bare.choices[0].message.content == extra["draft"]

    # the default (base.drafts: as_needed): the base writes only the prefix the answer depends on, same answer
    p = c.chat.completions.create(model="diffpo-vllm", messages=MSGS, max_tokens=40)
    assert p.choices[0].message.content == r.choices[0].message.content
    assert p.choices[0].message.content == expected(MSGS, p.model_extra["diffpo"]["draft"], 40)
    assert len(p.model_extra["diffpo"]["draft"]) <= len(extra["draft"])


@pytest.mark.parametrize("routes,heldout,at_least", [(("diffpo-full", "diffpo-vllm"), slice(0, 8), 4),
                                                      (("bytes-full", "bytes-prefix"), slice(8, 14), 1)],
                         ids=["same-tokenizer", "byte-level-base"])
def test_prefix_drafts_over_http_give_the_answers_of_full_drafts(server, routes, heldout, at_least):
    """Held-out AlpacaEval instructions (real data), sampled drafts (the base's default temperature, a seed per
    conversation): the route whose base drafts only the prefix answers what the full-draft route answers; also
    when the base's tokenizer is not the aligner's (the tiny byte-level base before the default model)."""
    from pathlib import Path

    data = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_eval" / "eval_set.jsonl"
    if not data.exists():
        pytest.skip(f"needs the AlpacaEval data at {data} (../shared/data, see its README)")
    prompts = [json.loads(x)["instruction"] for x in open(data) if json.loads(x)["id"] % 4 == 0][heldout]
    c = client(server)
    prefixes = 0
    for q in prompts:
        msgs = [{"role": "user", "content": q}]
        full = c.chat.completions.create(model=routes[0], messages=msgs, max_tokens=32)
        part = c.chat.completions.create(model=routes[1], messages=msgs, max_tokens=32)
        assert part.choices[0].message.content == full.choices[0].message.content, q
        a, b = full.model_extra["diffpo"], part.model_extra["diffpo"]
        assert not a["draft_prefix"] and len(b["draft"]) <= len(a["draft"])
        assert b["draft_source"] == ("none" if b["draft"] == "" and b["draft_ms"] == 0.0 else "base")
        prefixes += b["draft_prefix"]
    # a byte-level base writes ~6 tokens per aligner token (x1.5), so under a 32-token cap only small r leave a
    # budget below the whole draft: a few prefixes there (and r = 0 rows, which draft nothing)
    assert prefixes >= at_least, "drafts are prefixes"


def test_vllm_graph_aligns_a_clients_prediction_and_streams_it(server, expected):
    c = client(server)
    draft = "Blue is a color of the sky, and also of the sea on a clear day."
    r = c.chat.completions.create(model="diffpo-vllm", messages=MSGS, max_tokens=MAX_NEW,
                                  prediction={"type": "content", "content": draft})
    answer = r.choices[0].message.content
    assert answer == expected(MSGS, draft, MAX_NEW) and r.model_extra["diffpo"]["draft_source"] == "prediction"
    details = r.usage.completion_tokens_details
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0

    t0 = time.perf_counter()
    stream = c.chat.completions.create(model="diffpo-vllm", messages=MSGS, max_tokens=MAX_NEW, stream=True,
                                       stream_options={"include_usage": True},
                                       prediction={"type": "content", "content": draft})
    arrivals, pieces, chunks = [], [], []
    for ch in stream:
        chunks.append(ch)
        if ch.choices and ch.choices[0].delta.content:
            arrivals.append(time.perf_counter() - t0)
            pieces.append(ch.choices[0].delta.content)
    assert "".join(pieces) == answer, "the stream joins to the non-streamed answer"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert len(pieces) > 2 and arrivals[0] < arrivals[-1], "text arrives while the answer is being computed"


def test_vllm_bare_base_streams_its_tokens_as_they_come(server):
    c = client(server)
    full = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=MAX_NEW)
    stream = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=MAX_NEW, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert "".join(pieces) == full.choices[0].message.content, "the stream joins to the non-streamed answer"
    assert len(pieces) > 2, "the base's text arrives in pieces, as the engine emits tokens"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    # a prediction on the bare route never changes the answer; it is only counted, on the base's tokenizer
    guess = full.choices[0].message.content[:20] + " something else entirely"
    pred = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=MAX_NEW,
                                     prediction={"type": "content", "content": guess})
    assert pred.choices[0].message.content == full.choices[0].message.content
    details = pred.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens > 0


def test_openai_client_lists_the_routes_and_raises_the_errors(server):
    import openai

    c = client(server)
    assert {"diffpo-vllm", "tiny", "diffpo-tight"} <= {m.id for m in c.models.list().data}
    with pytest.raises(openai.BadRequestError, match="vLLM"):
        c.chat.completions.create(model="diffpo-vllm", messages=MSGS, extra_body={"alignment": {"concise": 0.5}})
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=MSGS)
    with pytest.raises(openai.AuthenticationError):
        c.with_options(api_key="wrong").chat.completions.create(model="diffpo-vllm", messages=MSGS)


def test_vllm_graph_refuses_what_it_cannot_serve(server):
    def post(body):
        return httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {TEST_API_KEY}"})

    r = post({"model": "diffpo-vllm", "messages": [{"role": "user", "content": "x" * 3000}]})
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"]
    r = post({"model": "diffpo-vllm", "messages": MSGS, "alignment": {"concise": 0.5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "alignment" and "vLLM" in r.json()["error"]["message"]
    r = post({"model": "diffpo-vllm", "messages": MSGS, "max_tokens": MAX_NEW + 1})
    assert r.status_code == 400 and "cap" in r.json()["error"]["message"]
    assert httpx.get(server["url"] + "/healthz", timeout=10).status_code == 200


def test_vllm_graph_answers_hostile_requests_with_4xx_json(server):
    """The hostile requests of the in-process graph's fuzz test (tests/serve_app/test_serve.py), sent to the vLLM
    graph: never a 5xx, always an OpenAI-style error body, and the graph still answers afterwards."""
    from tests.serve_app.test_serve import _fuzz_cases

    statuses = {}
    cases = _fuzz_cases(random.Random(1))
    for label, body, kw in cases[:60]:  # the hand-written cases and some random ones (the ingress is shared code)
        kw = dict(kw)
        key = kw.pop("key", TEST_API_KEY)
        if isinstance(body, dict):
            body = json.dumps({k: "diffpo-vllm" if v == "diffpo-tiny" else v for k, v in body.items()}).encode()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        headers.update(kw.pop("headers", {}))
        r = httpx.post(server["url"] + "/v1/chat/completions", content=body, headers=headers, timeout=60)
        assert r.status_code < 500, f"{label}: {r.status_code} {r.text[:300]}"
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code >= 400:
            assert r.json()["error"]["message"], label
    assert sum(v for k, v in statuses.items() if 400 <= k < 500) >= 55 and statuses.get(401, 0) >= 3, statuses
    r = client(server).chat.completions.create(model="diffpo-vllm", messages=MSGS, max_tokens=8)
    assert r.choices[0].message.content is not None


def test_killing_the_vllm_aligner_replica_under_load(server, expected):
    """The aligner's adapter replica dies with requests in flight: each is answered with the DiffPO answer or a
    clear 503/504, and Serve replaces the replica (the LLM server and its engine keep running)."""
    from tests.serve_app.test_serve import _burst_with_a_kill, _replica_actors

    def replicas():
        return _replica_actors("aligner-aligner")

    before = replicas()
    assert len(before) == 1, before
    prompts = [[{"role": "user", "content": f"Tell me fact number {i}."}] for i in range(12)]
    results = [None] * len(prompts)
    c = client(server)

    def call(i):
        try:
            results[i] = c.chat.completions.create(model="diffpo-vllm", messages=prompts[i], max_tokens=MAX_NEW)
        except Exception as e:  # openai raises on 5xx: keep the status for the check below
            results[i] = e

    _burst_with_a_kill(len(prompts), call, before[0]["name"], join_s=120)
    for i, r in enumerate(results):
        if isinstance(r, Exception):
            assert getattr(r, "status_code", None) in (503, 504), repr(r)
        else:
            assert r.choices[0].message.content == expected(prompts[i], r.model_extra["diffpo"]["draft"], MAX_NEW)
    deadline = time.time() + 120
    while not (replicas() and replicas()[0]["name"] != before[0]["name"]):
        assert time.time() < deadline, "the aligner replica was not replaced within 120 s"
        time.sleep(1)
    r = c.chat.completions.create(model="diffpo-vllm", messages=prompts[0], max_tokens=8)
    assert r.choices[0].message.content == expected(prompts[0], r.model_extra["diffpo"]["draft"], 8)


def test_vllm_graph_answers_503_when_an_adapter_queue_is_full(server):
    def post(i):
        return httpx.post(server["url"] + "/v1/chat/completions", timeout=120,
                          headers={"Authorization": f"Bearer {TEST_API_KEY}"},
                          json={"model": "diffpo-tight", "messages": [{"role": "user", "content": f"q{i}"}],
                                "max_tokens": MAX_NEW, "temperature": 0})

    t0 = time.time()
    with ThreadPoolExecutor(16) as pool:
        rs = list(pool.map(post, range(16)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes
    assert all(r.json()["error"]["code"] == "overloaded" for r in rs if r.status_code == 503)
    assert time.time() - t0 < 60


def test_vllm_adapters_export_their_metrics(server):
    """The adapters' Ray metrics reach Ray's Prometheus endpoint, tagged with the model and the outcome (this
    module's earlier tests answered and refused requests on both)."""
    assert ray_metric("ray_diffpo_draft_requests_total", model="tiny", outcome="ok") > 0
    assert ray_metric("ray_diffpo_refine_requests_total", model="aligner", outcome="ok") > 0
    assert ray_metric("ray_diffpo_draft_requests_total", model="tiny", outcome="rejected") > 0  # over the window
    assert ray_metric("ray_diffpo_refine_latency_ms_count", model="aligner") > 0
    # vLLM runs no Jacobi iteration: it records the tokens it generated, never Jacobi passes (exported together
    # with the count above, so no need to wait for them)
    assert ray_metric("ray_diffpo_generated_tokens_count", model="aligner") > 0
    assert ray_metric("ray_diffpo_jacobi_iterations_count", timeout_s=0, model="aligner") == 0
    assert ray_metric("ray_diffpo_tokens_per_pass_count", timeout_s=0, model="aligner") == 0
