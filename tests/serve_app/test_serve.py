"""The Serve app on real Ray Serve over real HTTP (127.0.0.1), with tiny models.

One app for the module: a tiny HF base, the same base reached through the app's own OpenAI endpoint (a real
HTTP hop: base kind `openai`), a batched fast-Jacobi aligner, and a deliberately tight aligner (1 ongoing +
1 queued request) for back-pressure. Auth is on: every Ray worker of the session has the test key.
"""
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import TEST_API_KEY, TEST_API_KEY_ENV, free_port, ray_metric, run_serve_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
MAX_NEW = 48


@pytest.fixture(scope="module")
def server(ray_local, tiny_dirs):
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    port = free_port()
    tiny = str(tiny_dirs["llama"])
    url = f"http://127.0.0.1:{port}"
    args = AppArgs(**{
        "bases": {
            "tiny": {"engine": "hf", "model": tiny, "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
            "tiny-remote": {"engine": "openai", "base_url": url + "/v1", "model": "tiny", "api_key_env": TEST_API_KEY_ENV,
                            "timeout_s": 20, "max_retries": 1},
        },
        "aligners": {
            "jacobi": {"model": tiny, "engine": "fast", "refine": {"max_new_tokens": MAX_NEW, "window": 8},
                       "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
            "tight": {"model": tiny, "engine": "fast", "refine": {"max_new_tokens": MAX_NEW}, "max_batch_size": 1},
        },
        "models": {
            "diffpo-tiny": {"base": "tiny", "aligner": "jacobi"},
            "tiny": {"base": "tiny"},
            "diffpo-remote": {"base": "tiny-remote", "aligner": "jacobi"},
            "diffpo-tight": {"base": "tiny", "aligner": "tight"},
            "remote": {"base": "tiny-remote"},
            # the jacobi aligner again, behind admission: one request at a time, a 0.3 s queue-time budget
            "diffpo-gated": {"base": "tiny", "aligner": "jacobi", "max_queue_wait_s": 0.3},
        },
        "admission": {"max_concurrent": 1, "replicas_refresh_s": 0.5},
        "max_tokens_cap": MAX_NEW, "default_max_tokens": 16, "request_timeout_s": 30, "max_prediction_chars": 4000,
        "max_body_bytes": 200_000, "api_key_env": TEST_API_KEY_ENV,
    })
    small = {"ray_actor_options": {"num_cpus": 0.2}}
    options = {"base-tiny": small, "aligner-jacobi": small, "Ingress": {"ray_actor_options": {"num_cpus": 0.05}},
               "base-tiny-remote": {"ray_actor_options": {"num_cpus": 0.05}},
               "aligner-tight": {"ray_actor_options": {"num_cpus": 0.1}, "max_ongoing_requests": 1,
                                 "max_queued_requests": 1}}
    run_serve_app(build_graph(args, options), "diffpo", port)
    yield {"url": url, "port": port, "tiny": tiny}
    serve.shutdown()


@pytest.fixture(scope="module")
def refiner(server):
    """The aligner in-process, with the same engine and settings as the deployment."""
    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.models import load_model
    from pipeline.decoding.refiner import Refiner

    return Refiner(load_model(server["tiny"]), RefineSettings(max_new_tokens=MAX_NEW, window=8), mode="fast")


@pytest.fixture(scope="module")
def expected(refiner):
    """The aligner's answer computed in-process with the same engine and settings as the deployment."""
    from pipeline.decoding.refiner import RefineRequest
    from serve_app.protocol import conversation_key

    def answer(messages, draft, max_tokens):
        req = RefineRequest(messages, draft, conversation_key(messages), max_tokens)
        return refiner.refine([req])[0].text
    return answer


def client(server, **kw):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=kw.pop("api_key", TEST_API_KEY), max_retries=0,
                  timeout=60, **kw)


def post(server, body, key=TEST_API_KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    return httpx.post(server["url"] + "/v1/chat/completions", content=body, headers=headers, timeout=60, **kw)


MSGS = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."}]


def test_openai_client_chat_stream_and_models(server, expected):
    c = client(server)
    r = c.chat.completions.create(model="diffpo-tiny", messages=MSGS, max_tokens=24, temperature=0)
    extra = r.model_extra["diffpo"]
    assert r.object == "chat.completion" and r.model == "diffpo-tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected(MSGS, extra["draft"], 24)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 0
    assert extra["iterations"] >= 1 and extra["tokens_per_pass"] > 0 and extra["base"] == "tiny"
    assert extra["draft_ms"] > 0 and extra["refine_ms"] > 0
    # a Jacobi engine: its own statistics, no greedy-continuation count; `mode` is the old name of `engine`
    assert isinstance(extra["converged"], bool) and extra["generated_tokens"] is None
    assert extra["engine"] == extra["mode"] == "fast"

    stream = c.chat.completions.create(model="diffpo-tiny", messages=MSGS, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)

    ids = {m.id for m in c.models.list()}
    assert ids == {"diffpo-tiny", "tiny", "diffpo-remote", "diffpo-tight", "remote", "diffpo-gated"}

    # the bare base model answers with the draft itself
    bare = c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=24, temperature=0)
    assert bare.choices[0].message.content == extra["draft"]
    assert "draft" not in bare.model_extra["diffpo"]


def test_openai_client_sees_errors_as_exceptions(server):
    import openai

    c = client(server)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="no-such-model", messages=MSGS)
    with pytest.raises(openai.BadRequestError, match="cap"):
        c.chat.completions.create(model="diffpo-tiny", messages=MSGS, max_tokens=MAX_NEW + 1)
    with pytest.raises(openai.BadRequestError, match="context window"):
        c.chat.completions.create(model="diffpo-tiny", messages=[{"role": "user", "content": "x" * 5000}])
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").chat.completions.create(model="diffpo-tiny", messages=MSGS)
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").models.list()


def test_stream_starts_before_the_answer_is_finished(server, expected):
    """stream=True on an aligner route streams the aligner's final tokens while it refines: the chunks join to
    the non-streaming answer, and the first text arrives before the refinement ends."""
    import openai

    c = client(server)
    for i in range(30):  # a full-length answer: many passes between the first text and the end
        msgs = [{"role": "user", "content": f"Write a long story about lighthouse keeper number {i}."}]
        whole = c.chat.completions.create(model="diffpo-tiny", messages=msgs, max_tokens=MAX_NEW, temperature=0)
        if whole.usage.completion_tokens == MAX_NEW:
            break
    else:
        pytest.fail("no prompt got a full-length answer")
    answer = whole.choices[0].message.content
    assert answer == expected(msgs, whole.model_extra["diffpo"]["draft"], MAX_NEW)
    arrivals = [(time.perf_counter(), ch) for ch in c.chat.completions.create(
        model="diffpo-tiny", messages=msgs, max_tokens=MAX_NEW, temperature=0, stream=True,
        stream_options={"include_usage": True})]
    chunks = [ch for _, ch in arrivals]
    texts = [(t, ch.choices[0].delta.content) for t, ch in arrivals if ch.choices and ch.choices[0].delta.content]
    assert "".join(x for _, x in texts) == answer
    assert len(texts) > 3, "the answer comes in pieces"
    assert chunks[0].choices[0].delta.role == "assistant"
    (t_end, end), = [(t, ch) for t, ch in arrivals if ch.choices and ch.choices[0].finish_reason]
    assert end.choices[0].finish_reason == whole.choices[0].finish_reason
    extra = end.model_extra["diffpo"]
    assert extra["draft"] == whole.model_extra["diffpo"]["draft"] and extra["iterations"] >= 4
    assert 0 < extra["first_token_ms"] < extra["refine_ms"], "the aligner sent text before it finished"
    # the client got the first text while the aligner was still refining, not all at the end
    assert t_end - texts[0][0] > 0.25 * (extra["refine_ms"] - extra["first_token_ms"]) / 1000, (
        t_end - texts[0][0], extra)
    assert extra["draft_ms"] < extra["time_to_first_token_ms"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    # errors before the first text are plain HTTP errors, raised by the client at the call
    with pytest.raises(openai.BadRequestError, match="context window"):
        c.chat.completions.create(model="diffpo-tiny", messages=[{"role": "user", "content": "x" * 5000}],
                                  stream=True)


def test_refine_stream_through_a_handle_batches_and_refuses_bad_requests(server, expected):
    from ray import serve

    from serve_app.protocol import BadRequest, conversation_key
    from serve_app.replies import Refined, RefineRequest

    handle = serve.get_deployment_handle("aligner-jacobi", app_name="diffpo").options(stream=True)
    convs = [[{"role": "user", "content": f"Tell me about topic {i}."}] for i in range(4)]
    drafts = ["Sure. " * i + "Here it is" for i in range(4)]
    gens = [handle.refine_stream.remote(RefineRequest(m, d, MAX_NEW, conversation_key(m), concurrent=True))
            for m, d in zip(convs, drafts)]
    batch_sizes = []
    for m, d, gen in zip(convs, drafts, gens):
        events = list(gen)
        *deltas, last = events
        res = last["result"]
        assert isinstance(res, Refined) and res.engine == "fast" and res.iterations >= 1
        assert all(set(e) == {"delta"} for e in deltas)
        assert "".join(e["delta"] for e in deltas) == res.text == expected(m, d, MAX_NEW)
        batch_sizes.append(res.batch_size)
    assert max(batch_sizes) > 1, f"concurrent streams are refined together: {batch_sizes}"
    with pytest.raises(BadRequest, match="context window"):
        list(handle.refine_stream.remote(RefineRequest([{"role": "user", "content": "x" * 5000}], "", 8, "k")))


def test_remote_base_over_http_matches_in_process_base(server, expected):
    """Base kind `openai` pointed at this app's own endpoint: same greedy draft, same aligned answer."""
    c = client(server)
    msgs = [{"role": "user", "content": "Say something about rivers."}]
    local = c.chat.completions.create(model="diffpo-tiny", messages=msgs, max_tokens=20, temperature=0)
    remote = c.chat.completions.create(model="diffpo-remote", messages=msgs, max_tokens=20, temperature=0)
    assert remote.model_extra["diffpo"]["base"] == "tiny-remote"
    assert remote.model_extra["diffpo"]["draft"] == local.model_extra["diffpo"]["draft"]
    assert remote.choices[0].message.content == local.choices[0].message.content
    assert remote.choices[0].message.content == expected(msgs, remote.model_extra["diffpo"]["draft"], 20)


# ---- OpenAI Predicted Outputs: the client's own draft --------------------------------------------------------
ONE = [{"role": "user", "content": "Name a color."}]
PREDICTION = "Blue, like the sky."  # 19 tokens under the tiny byte-level tokenizer (one per character)


def predicted(r) -> tuple[int, int]:
    d = r.usage.completion_tokens_details
    return d.accepted_prediction_tokens, d.rejected_prediction_tokens


def test_prediction_is_the_draft_on_an_aligner_route(server, expected):
    """The official client's `prediction=`: the aligner refines the client's text, the base is not called."""
    import openai

    c = client(server)
    r = c.chat.completions.create(model="diffpo-tiny", messages=ONE, max_tokens=24, temperature=0,
                                  prediction={"type": "content", "content": PREDICTION})
    extra = r.model_extra["diffpo"]
    assert r.choices[0].message.content == expected(ONE, PREDICTION, 24)
    assert extra["draft_source"] == "prediction" and extra["draft"] == PREDICTION
    assert extra["draft_ms"] == 0 and extra["refine_ms"] > 0
    plain = c.chat.completions.create(model="diffpo-tiny", messages=ONE, max_tokens=24, temperature=0)
    assert plain.model_extra["diffpo"]["draft_source"] == "base" and plain.model_extra["diffpo"]["draft_ms"] > 0
    assert plain.usage.completion_tokens_details is None  # no prediction, no prediction counts
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens > 0  # counted by the aligner: same tokenizer here

    parts = [{"type": "text", "text": "Blue, like "}, {"type": "text", "text": "the sky."}]
    joined = c.chat.completions.create(model="diffpo-tiny", messages=ONE, max_tokens=24, temperature=0,
                                       prediction={"type": "content", "content": parts})
    assert joined.choices[0].message.content == r.choices[0].message.content and joined.usage == r.usage
    # the route whose base is a remote endpoint skips it the same way
    remote = c.chat.completions.create(model="diffpo-remote", messages=ONE, max_tokens=24, temperature=0,
                                       prediction={"type": "content", "content": PREDICTION})
    assert remote.choices[0].message.content == r.choices[0].message.content
    assert remote.model_extra["diffpo"]["draft_ms"] == 0 and remote.usage == r.usage
    with pytest.raises(openai.BadRequestError, match="cannot be combined with 'prediction'"):
        c.chat.completions.create(model="diffpo-tiny", messages=ONE, n=2,
                                  prediction={"type": "content", "content": PREDICTION})


def test_prediction_counts_on_the_aligner_route_and_in_the_stream(server, refiner):
    from pipeline.decoding.jacobi import reserve_count
    from pipeline.decoding.prediction import prediction_counts
    from pipeline.decoding.refiner import RefineRequest
    from pipeline.prompts import answer_ids
    from serve_app.protocol import conversation_key

    assert len(answer_ids(refiner.lm.tokenizer, PREDICTION)) == len(PREDICTION) == 19  # one token per character
    held = reserve_count(conversation_key(ONE), 0, 12, len(PREDICTION))  # r: prediction tokens held fixed
    assert held >= 4
    c = client(server)
    pred = {"type": "content", "content": PREDICTION}
    # by hand: with max_tokens 4 <= r the answer is the prediction's first 4 tokens, "Blue": 4 kept, 15 not
    short = c.chat.completions.create(model="diffpo-tiny", messages=ONE, max_tokens=4, temperature=0, prediction=pred)
    assert short.choices[0].message.content == "Blue" and short.usage.completion_tokens == 4
    assert predicted(short) == (4, 15)
    # longer: the r held tokens are kept, and both counts are the in-process aligner's
    r = c.chat.completions.create(model="diffpo-tiny", messages=ONE, max_tokens=24, temperature=0, prediction=pred)
    item = refiner.encode(RefineRequest(ONE, PREDICTION, conversation_key(ONE), 24))
    answer = refiner.refine_items([item])[0]
    accepted, rejected = predicted(r)
    assert (accepted, rejected) == prediction_counts(item.draft_ids, answer.token_ids)
    assert accepted + rejected == 19 and accepted >= held
    assert r.usage.completion_tokens == len(answer.token_ids)
    # the stream's usage chunk carries the same counts
    chunks = list(c.chat.completions.create(model="diffpo-tiny", messages=ONE, max_tokens=24, temperature=0,
                                            prediction=pred, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert chunks[-1].usage == r.usage and predicted(chunks[-1]) == (accepted, rejected)
    last = [ch for ch in chunks if ch.choices][-1]
    assert last.model_extra["diffpo"]["draft_source"] == "prediction"


def test_prediction_on_a_bare_base_never_changes_the_answer(server, refiner):
    """Bare routes answer as without the prediction and only count it; the `openai` base forwards the field
    and passes the endpoint's counts on."""
    from pipeline.decoding.drafting import SamplingParams, generate_answers
    from pipeline.decoding.prediction import prediction_counts
    from pipeline.prompts import answer_ids

    c = client(server)
    pred = {"type": "content", "content": PREDICTION}
    plain = c.chat.completions.create(model="tiny", messages=ONE, max_tokens=24, temperature=0)
    r = c.chat.completions.create(model="tiny", messages=ONE, max_tokens=24, temperature=0, prediction=pred)
    assert r.choices[0].message.content == plain.choices[0].message.content
    assert r.usage.completion_tokens == plain.usage.completion_tokens
    assert r.model_extra["diffpo"]["draft_source"] == "base" and r.model_extra["diffpo"]["draft_ms"] > 0
    ids = generate_answers(refiner.lm, [ONE], SamplingParams(max_new_tokens=24, do_sample=False), with_ids=True)[0][3]
    assert predicted(r) == prediction_counts(answer_ids(refiner.lm.tokenizer, PREDICTION), ids)
    assert sum(predicted(r)) == 19
    remote = c.chat.completions.create(model="remote", messages=ONE, max_tokens=24, temperature=0, prediction=pred)
    assert remote.choices[0].message.content == plain.choices[0].message.content
    assert predicted(remote) == predicted(r)
    chunks = list(c.chat.completions.create(model="tiny", messages=ONE, max_tokens=24, temperature=0, prediction=pred,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage == r.usage


@pytest.mark.parametrize("change, param", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"modalities": ["audio"]}, "modalities"),
    ({"max_completion_tokens": 8}, "max_completion_tokens"),
    ({"prediction": {"type": "text", "content": PREDICTION}}, "prediction.type"),
    ({"prediction": {"type": "content", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}},
     "prediction.content.0"),
    ({"prediction": {"type": "content", "content": "x" * 4001}}, "prediction.content"),
])
def test_prediction_refusals(server, change, param):
    body = {"model": "diffpo-tiny", "messages": ONE, "max_tokens": 8,
            "prediction": {"type": "content", "content": PREDICTION}, **change}
    r = post(server, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    if param.startswith("prediction"):
        assert err["message"].startswith(param.replace(".0", "[0]")), err
    else:
        assert err["message"] == f"'{param}' cannot be combined with 'prediction' (Predicted Outputs)", err
        assert err["code"] == "unsupported_parameter"


def _fuzz_cases(rng: random.Random) -> list[tuple[str, bytes | dict, dict]]:
    """(label, body, extra request kwargs): every one is malformed or hostile."""
    ok = {"model": "diffpo-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ("empty body", b"", {}), ("not json", b"{bad", {}), ("json list", b"[1,2]", {}), ("json string", b'"hi"', {}),
        ("json null", b"null", {}), ("non-utf8", b'{"model": "\xff\xfe"}', {}), ("nan", b'{"model": NaN}', {}),
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000, {}), ("oversized", b'{"x": "' + b"a" * 300_000 + b'"}', {}),
        ("missing messages", {"model": "diffpo-tiny"}, {}), ("missing model", {"messages": ok["messages"]}, {}),
        ("empty messages", dict(ok, messages=[]), {}), ("messages not list", dict(ok, messages="hi"), {}),
        ("message not object", dict(ok, messages=["hi"]), {}), ("no content", dict(ok, messages=[{"role": "user"}]), {}),
        ("bad role", dict(ok, messages=[{"role": "root", "content": "x"}]), {}),
        ("last not user", dict(ok, messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]), {}),
        ("empty content", dict(ok, messages=[{"role": "user", "content": "   "}]), {}),
        ("content int", dict(ok, messages=[{"role": "user", "content": 5}]), {}),
        ("image part", dict(ok, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), {}),
        ("unknown model", dict(ok, model="gpt-7"), {}), ("model int", dict(ok, model=3), {}),
        ("max_tokens huge", dict(ok, max_tokens=10 ** 9), {}), ("max_tokens zero", dict(ok, max_tokens=0), {}),
        ("max_tokens str", dict(ok, max_tokens="5"), {}), ("max_tokens float", dict(ok, max_tokens=2.5), {}),
        ("temperature neg", dict(ok, temperature=-1), {}), ("temperature str", dict(ok, temperature="hot"), {}),
        ("top_p zero", dict(ok, top_p=0), {}), ("top_p big", dict(ok, top_p=3), {}), ("n=2", dict(ok, n=2), {}),
        ("stream str", dict(ok, stream="yes"), {}), ("tools", dict(ok, tools=[{"type": "function"}]), {}),
        ("stop", dict(ok, stop=["\n"]), {}), ("too many messages", dict(ok, messages=ok["messages"] * 100), {}),
        ("over context", dict(ok, messages=[{"role": "user", "content": "y" * 6000}]), {}),
        ("no auth", ok, {"key": None}), ("wrong auth", ok, {"key": "nope"}),
        ("basic auth", ok, {"key": None, "headers": {"Authorization": "Basic dXNlcjpwYXNz"}}),
    ]
    fields = ["model", "messages", "max_tokens", "temperature", "top_p", "n", "stream", "stop"]
    junk = [None, -1, 0, 1e309, "", "\u0000", "\u202e", [], {}, [[]], {"a": {"b": []}}, True, "x" * 5000]
    while len(cases) < 230:
        body = dict(ok)
        for f in rng.sample(fields, rng.randint(0, 3)):
            body[f] = rng.choice(junk)
        body[rng.choice(["model", "messages"])] = rng.choice([None, -1, 1e309, "", [], {}, [[]], True])  # always bad
        raw = json.dumps(body).encode()
        if rng.random() < 0.3:  # truncate or flip bytes
            cut = rng.randint(0, len(raw) - 1)
            raw = raw[:cut] + bytes([rng.randint(0, 255)]) * rng.randint(0, 3)
        cases.append((f"random {len(cases)}", raw, {}))
    return cases


def test_llm_judge_over_http_records_what_it_cannot_parse(server, monkeypatch, tmp_path):
    """The evaluation's LLM judge talking to this project's own OpenAI-compatible server: the tiny random model
    answers gibberish, which must be recorded as unparsed with its raw text, never turned into a number."""
    import math

    from pipeline.evaluation.judges import LLMJudge, load_fastchat_prompts
    from pipeline.clients import ChatEndpoint, EndpointConfig
    from tests.pipeline.evaluation.test_judges import write_prompts

    monkeypatch.setenv(TEST_API_KEY_ENV, TEST_API_KEY)
    prompts = load_fastchat_prompts(write_prompts(tmp_path / "p.jsonl"))

    def judge(model):
        return LLMJudge(ChatEndpoint(EndpointConfig(base_url=server["url"] + "/v1", model=model,
                                                    api_key_env=TEST_API_KEY_ENV, timeout_s=30, max_retries=1)),
                        prompts, max_tokens=12)

    v = judge("tiny").grade(["Is this a good answer?"], ["Yes."])[0]
    assert v.status == "unparsed" and v.raw.strip() and math.isnan(v.number)
    assert judge("tiny").grade(["Is this a good answer?"], ["Yes."])[0].raw == v.raw  # greedy: same verdict again
    p = judge("tiny").compare("Pick one.", "A.", "B.")
    assert p.status == "unparsed" and p.value is None
    err = judge("no-such-model").compare("Pick one.", "A.", "B.")
    assert err.status == "error" and "404" in err.raw


def test_fuzz_hostile_requests_get_4xx_json_and_server_stays_healthy(server):
    cases = _fuzz_cases(random.Random(0))
    assert len(cases) >= 200
    statuses = {}
    for label, body, kw in cases:
        kw = dict(kw)
        key = kw.pop("key", TEST_API_KEY)
        r = post(server, body, key=key, **kw)
        assert r.status_code < 500, f"{label}: {r.status_code} {r.text[:300]}"
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if r.status_code >= 400:
            err = r.json()["error"]
            assert isinstance(err["message"], str) and err["message"], label
    # a declared body far over the limit is refused before it is read (raw socket: clients won't send this)
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + TEST_API_KEY.encode() + b"\r\nContent-Length: 99999999\r\n\r\n{}")
        head = sock.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head[:200]
    assert sum(v for k, v in statuses.items() if 400 <= k < 500) >= 200, statuses
    assert statuses.get(401, 0) >= 3 and statuses.get(413, 0) >= 1 and statuses.get(404, 0) >= 1, statuses
    # wrong routes and methods are JSON errors too
    assert httpx.get(server["url"] + "/v1/chat/completions").status_code == 405
    assert httpx.get(server["url"] + "/nope").json()["error"]["code"] == "not_found"
    assert httpx.get(server["url"] + "/healthz").json()["status"] == "ok"
    assert post(server, {"model": "diffpo-tiny", "messages": MSGS, "max_tokens": 8}).status_code == 200


def test_full_queue_answers_503_quickly(server):
    body = {"model": "diffpo-tight", "messages": MSGS, "max_tokens": MAX_NEW, "temperature": 0}
    with ThreadPoolExecutor(16) as pool:
        t0 = time.time()
        rs = list(pool.map(lambda i: post(server, dict(body, messages=[{"role": "user", "content": f"q{i}"}])),
                           range(16)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    assert all(r.json()["error"]["code"] == "overloaded" for r in rs if r.status_code == 503)
    assert time.time() - t0 < 30


def test_admission_refuses_at_once_what_would_wait_past_the_budget(server, expected):
    """Overload on a route with a queue-time budget: every request is answered correctly or refused with 503,
    Retry-After and an OpenAI error body, and refusals come back fast; the gate's metrics are exported."""
    def one(i):
        msgs = [{"role": "user", "content": f"Say something about the number {i}."}]
        t0 = time.time()
        r = post(server, {"model": "diffpo-gated", "messages": msgs, "max_tokens": MAX_NEW, "temperature": 0})
        return i, msgs, r, time.time() - t0

    one(-1)  # one answer measured by the gate (its answer time is what it predicts with)
    with ThreadPoolExecutor(24) as pool:
        got = list(pool.map(one, range(24)))
    ok = [(i, m, r) for i, m, r, _ in got if r.status_code == 200]
    refused = [(r, s) for _, _, r, s in got if r.status_code == 503]
    assert len(ok) + len(refused) == len(got), [r.status_code for _, _, r, _ in got]
    assert ok and refused, f"{len(ok)} answered, {len(refused)} refused: the budget never bit or always did"
    for i, msgs, r in ok:
        body = r.json()
        assert body["choices"][0]["message"]["content"] == expected(msgs, body["diffpo"]["draft"], MAX_NEW), i
    for r, took in refused:
        err = r.json()["error"]
        assert err["type"] == "server_busy" and err["code"] in ("over_budget", "queue_timeout"), err
        assert "max_queue_wait_s=0.3" in err["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert took < 0.3 + 2.0, f"a refusal took {took:.2f} s: it waited instead of being refused"
    assert any(r.json()["error"]["code"] == "over_budget" for r, _ in refused), "some were refused on arrival"
    # a stream on the gated route, then a request after it: the stream gave its slot back when it ended
    time.sleep(1)
    msgs = [{"role": "user", "content": "Stream this."}]
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {TEST_API_KEY}"},
                      json={"model": "diffpo-gated", "messages": msgs, "max_tokens": MAX_NEW, "temperature": 0,
                            "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    after = post(server, {"model": "diffpo-gated", "messages": msgs, "max_tokens": MAX_NEW, "temperature": 0})
    assert after.status_code == 200 and after.json()["diffpo"]["queue_wait_ms"] == 0.0, "the slot was free"
    assert streamed == after.json()["choices"][0]["message"]["content"]
    # a route without a budget on the same aligner still queues and answers everything
    with ThreadPoolExecutor(8) as pool:
        plain = list(pool.map(lambda i: post(server, {"model": "diffpo-tiny", "messages": MSGS, "max_tokens": 8,
                                                      "temperature": 0}), range(8)))
    assert all(r.status_code == 200 for r in plain)
    assert ray_metric("ray_diffpo_refused_requests_total", route="diffpo-gated") >= len(refused) > 0
    assert ray_metric("ray_diffpo_queue_wait_ms_count", route="diffpo-gated") > 0
    assert ray_metric("ray_diffpo_replicas", deployment="aligner-jacobi") >= 1
    assert ray_metric("ray_diffpo_replicas", deployment="Ingress") >= 1


def _replica_actors(deployment: str):
    import ray

    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"#{deployment}#" in a["name"]]


def _burst_with_a_kill(n: int, call, replica: str, stagger_s: float = 0.02, join_s: float = 90) -> None:
    """Run `call(i)` for i < n on threads started `stagger_s` apart, kill the Serve replica actor named `replica`
    while they run (no restart: Serve must replace it), and wait for all of them; fails if one hangs."""
    import ray

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(stagger_s)
    time.sleep(0.3)
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=join_s)
    assert not any(t.is_alive() for t in threads), "a request hung"


def test_killing_the_aligner_replica_under_load(server, expected):
    before = _replica_actors("aligner-jacobi")
    assert len(before) == 1, before
    prompts = [[{"role": "user", "content": f"Tell me fact number {i}."}] for i in range(12)]
    results = [None] * len(prompts)

    def call(i):
        t0 = time.time()
        r = post(server, {"model": "diffpo-tiny", "messages": prompts[i], "max_tokens": MAX_NEW, "temperature": 0})
        results[i] = (r, time.time() - t0)

    _burst_with_a_kill(len(prompts), call, before[0]["name"])
    ok = 0
    for i, (r, secs) in enumerate(results):
        assert secs < 30 + 10, f"request {i} took {secs:.1f}s, past the 30 s request timeout"
        if r.status_code == 200:
            body = r.json()
            assert body["choices"][0]["message"]["content"] == expected(prompts[i], body["diffpo"]["draft"], MAX_NEW)
            ok += 1
        else:
            assert r.status_code in (503, 504), (r.status_code, r.text)
            assert r.json()["error"]["message"]
    # Serve replaces the replica and the app answers correctly again
    deadline = time.time() + 90
    while time.time() < deadline:
        after = _replica_actors("aligner-jacobi")
        if after and after[0]["name"] != before[0]["name"]:
            r = post(server, {"model": "diffpo-tiny", "messages": prompts[0], "max_tokens": 8, "temperature": 0})
            if r.status_code == 200:
                break
        time.sleep(1)
    else:
        pytest.fail("the aligner replica was not replaced within 90 s")
    assert r.json()["choices"][0]["message"]["content"] == expected(prompts[0], r.json()["diffpo"]["draft"], 8)


def test_batch_job_drafts_through_the_openai_endpoint(server, tmp_path, monkeypatch):
    """jobs.align_dataset with base.engine=openai: the drafts come over HTTP from the running app."""
    import pandas as pd

    from jobs.align_dataset import main

    monkeypatch.setenv(TEST_API_KEY_ENV, TEST_API_KEY)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                           for i, p in enumerate(["Say hi.", "Name a fruit.", "Count to two."])))
    out = tmp_path / "out"
    s = main([f"input.path={src}", f"output.path={out}", "base.engine=openai", "aligner.engine=fast", f"base.base_url={server['url']}/v1",
              "base.model=tiny", f"base.api_key_env={TEST_API_KEY_ENV}", "base.sampling.do_sample=false",
              "base.sampling.max_new_tokens=12", "base.num_cpus=0.1", f"aligner.model={server['tiny']}",
              "aligner.refine.max_new_tokens=16", "aligner.num_cpus=0.2", "ray.progress_bars=false"])
    assert s["rows_out"] == 3 and s["error_rows"] == 0, s
    df = pd.read_parquet(out / "aligned.parquet").sort_values("id")
    c = client(server)
    for _, row in df.iterrows():
        bare = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": row["prompt"]}],
                                         max_tokens=12, temperature=0)
        assert row["draft"] == bare.choices[0].message.content


def test_deployments_export_their_metrics(server):
    """The deployments' Ray metrics reach Ray's Prometheus endpoint, tagged with the model and the outcome."""
    assert ray_metric("ray_diffpo_draft_requests_total", model="tiny", outcome="ok") > 0
    assert ray_metric("ray_diffpo_refine_requests_total", model="jacobi", outcome="ok") > 0
    assert ray_metric("ray_diffpo_refine_batch_size_count", model="jacobi") > 0
    assert ray_metric("ray_diffpo_jacobi_iterations_sum", model="jacobi") > 0
    assert ray_metric("ray_diffpo_tokens_per_pass_count", model="jacobi") > 0
    # a Jacobi engine records no greedy-continuation counts (exported with the above: no need to wait)
    assert ray_metric("ray_diffpo_generated_tokens_count", timeout_s=0, model="jacobi") == 0
