"""Alignment knobs in the Serve app, over real HTTP with tiny models: a request's `alignment` changes the answer
(exactly to what the knobbed model computes in-process), repeats hit the variant cache, bad knobs get a 400.

Its own app on its own port, shut down at the end of the module (the shared local Ray stays up).
"""
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import TEST_API_KEY, TEST_API_KEY_ENV, free_port, run_serve_app
from tests.conftest import moved_copy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
MAX_NEW = 24
MSGS = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def vec_server(ray_local, tiny_dirs, tmp_path_factory):
    from ray import serve

    from pipeline.vectors.extract import extract_vector
    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    root = tmp_path_factory.mktemp("serve-vec")
    base = str(tiny_dirs["llama"])
    paths = {}
    for name, seed in (("one", 1), ("two", 2)):
        aligned = moved_copy(base, root / f"{name}-model", seed)
        extract_vector(base, str(aligned), root / name, name, log=lambda *_: None)
        paths[name] = (str(aligned), str(root / name))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = AppArgs(**{
        "bases": {"tiny": {"engine": "hf", "model": base, "vectors": {"style": paths["two"][1]},
                           "batch_wait_timeout_s": 0.05}},
        "aligners": {
            "knob": {"model": base, "engine": "fast", "refine": {"max_new_tokens": MAX_NEW},
                     "vectors": {"one": paths["one"][1], "two": paths["two"][1]},
                     "knob_bounds": {"min": -1, "max": 2}, "variant_cache_size": 2, "batch_wait_timeout_s": 0.05},
            "plain": {"model": base, "engine": "fast", "refine": {"max_new_tokens": MAX_NEW}},
        },
        "models": {"diffpo-knob": {"base": "tiny", "aligner": "knob"},
                   "diffpo-plain": {"base": "tiny", "aligner": "plain"},
                   "tiny": {"base": "tiny"}},
        "max_tokens_cap": MAX_NEW, "default_max_tokens": 16, "request_timeout_s": 60, "api_key_env": TEST_API_KEY_ENV,
    })
    small = {"ray_actor_options": {"num_cpus": 0.2}}
    options = {"base-tiny": small, "aligner-knob": small, "aligner-plain": {"ray_actor_options": {"num_cpus": 0.1}},
               "Ingress": {"ray_actor_options": {"num_cpus": 0.05}}}
    run_serve_app(build_graph(args, options), "diffpo-vectors", port)
    yield {"url": url, "base": base, "paths": paths}
    serve.shutdown()


@pytest.fixture(scope="module")
def expected(vec_server):
    """In-process answers of the same engine on the same base with the same knobs."""
    from pipeline.decoding.drafting import SamplingParams, generate_answers
    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.models import load_model
    from pipeline.decoding.refiner import Refiner, RefineRequest
    from pipeline.vectors.knobs import load_knobbed
    from serve_app.protocol import conversation_key

    p = vec_server["paths"]
    lm = load_model(vec_server["base"])
    km = load_knobbed(lm, {"one": p["one"][1], "two": p["two"][1]}, cache_size=4)
    refiner = Refiner(lm, RefineSettings(max_new_tokens=MAX_NEW), mode="fast")

    def refine(knobs, messages, draft, max_tokens=16):
        km.apply(knobs)
        return refiner.refine([RefineRequest(messages, draft, conversation_key(messages), max_tokens)])[0].text

    def draft(knobs, messages, max_tokens=16):
        km.apply({"two": knobs["style"]} if knobs else {})  # the base's "style" vector is vector two
        return generate_answers(lm, [messages], SamplingParams(max_new_tokens=max_tokens, do_sample=False),
                                seed_key=conversation_key(messages))[0][0]

    return {"refine": refine, "draft": draft, "aligned_one": Refiner(load_model(p["one"][0]),
                                                                     RefineSettings(max_new_tokens=MAX_NEW))}


def post(server, body, key=TEST_API_KEY):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server["url"] + "/v1/chat/completions", content=raw,
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def chat(server, model="diffpo-knob", alignment=None, messages=MSGS, max_tokens=16):
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    if alignment is not None:
        body["alignment"] = alignment
    r = post(server, body)
    assert r.status_code == 200, r.text
    return r.json()


def test_knobs_change_the_answer_and_repeats_hit_the_cache(vec_server, expected):
    from pipeline.decoding.refiner import RefineRequest
    from serve_app.protocol import conversation_key

    plain = chat(vec_server)
    assert plain["diffpo"]["alignment"]["aligner"]["cache"] == "base"
    draft = plain["diffpo"]["draft"]
    assert plain["choices"][0]["message"]["content"] == expected["refine"]({}, MSGS, draft)

    first = chat(vec_server, alignment={"one": 1.0})
    again = chat(vec_server, alignment={"one": 1})
    text = first["choices"][0]["message"]["content"]
    assert first["diffpo"]["draft"] == draft  # the knob is the aligner's: the base draft is unchanged
    assert text != plain["choices"][0]["message"]["content"]
    # λ = 1 answers as the aligned checkpoint itself would
    aligned = expected["aligned_one"].refine([RefineRequest(MSGS, draft, conversation_key(MSGS), 16)])[0].text
    assert text == aligned == expected["refine"]({"one": 1.0}, MSGS, draft)
    assert first["diffpo"]["alignment"]["aligner"]["cache"] == "miss"
    assert again["diffpo"]["alignment"]["aligner"] == {"knobs": {"one": 1.0}, "cache": "hit",
                                                       "switch_ms": again["diffpo"]["alignment"]["aligner"]["switch_ms"]}
    assert again["choices"][0]["message"]["content"] == text

    mix = chat(vec_server, alignment={"one": 0.5, "two": -0.5})
    assert mix["choices"][0]["message"]["content"] == expected["refine"]({"one": 0.5, "two": -0.5}, MSGS, draft)

    # the official client sends the knobs as an extra body field
    from openai import OpenAI

    c = OpenAI(base_url=vec_server["url"] + "/v1", api_key=TEST_API_KEY, max_retries=0, timeout=60)
    r = c.chat.completions.create(model="diffpo-knob", messages=MSGS, max_tokens=16, temperature=0,
                                  extra_body={"alignment": {"one": 1.0}})
    assert r.choices[0].message.content == text and r.model_extra["diffpo"]["alignment"]["aligner"]["cache"] == "hit"

    models = {m["id"]: m for m in httpx.get(vec_server["url"] + "/v1/models",
                                            headers={"Authorization": f"Bearer {TEST_API_KEY}"}).json()["data"]}
    assert models["diffpo-knob"]["alignment_vectors"] == {
        "one": {"model": "aligner", "min": -1.0, "max": 2.0}, "two": {"model": "aligner", "min": -1.0, "max": 2.0},
        "style": {"model": "base", "min": -1.0, "max": 2.0}}


def test_concurrent_requests_with_different_knobs_are_grouped_correctly(vec_server, expected):
    settings = [None, {"one": 1.0}, {"two": 1.0}, {"one": 1.0}, {"one": 0.25, "two": 0.75}, None]
    msgs = [[{"role": "user", "content": f"Tell me about number {i}."}] for i in range(len(settings))]
    with ThreadPoolExecutor(len(settings)) as pool:
        outs = list(pool.map(lambda i: chat(vec_server, alignment=settings[i], messages=msgs[i]), range(len(settings))))
    for knobs, m, o in zip(settings, msgs, outs):
        assert o["choices"][0]["message"]["content"] == expected["refine"](knobs or {}, m, o["diffpo"]["draft"])
    assert max(o["diffpo"]["refine_batch_size"] for o in outs) >= 2, "no batch mixed settings; grouping not exercised"


def test_base_model_knobs(vec_server, expected):
    bare = chat(vec_server, model="tiny")
    styled = chat(vec_server, model="tiny", alignment={"style": 1.0})
    assert styled["choices"][0]["message"]["content"] != bare["choices"][0]["message"]["content"]
    assert styled["choices"][0]["message"]["content"] == expected["draft"]({"style": 1.0}, MSGS)
    assert bare["choices"][0]["message"]["content"] == expected["draft"]({}, MSGS)
    assert styled["diffpo"]["alignment"]["base"]["knobs"] == {"style": 1.0}
    # a route with an aligner: the base's knob moves the draft, the aligner's stays off
    both = chat(vec_server, alignment={"style": 1.0})
    assert both["diffpo"]["draft"] == styled["choices"][0]["message"]["content"]
    assert both["diffpo"]["alignment"]["aligner"]["cache"] == "base"


def test_bad_knobs_get_400_json_and_the_server_stays_healthy(vec_server):
    ok = {"model": "diffpo-knob", "messages": MSGS, "max_tokens": 8, "temperature": 0}
    cases = [
        ("unknown vector", dict(ok, alignment={"medical": 0.5}), "unknown alignment vector 'medical'"),
        ("over max", dict(ok, alignment={"one": 2.5}), "outside the allowed range [-1.0, 2.0]"),
        ("under min", dict(ok, alignment={"two": -1.01}), "outside the allowed range"),
        ("string", dict(ok, alignment={"one": "0.5"}), "alignment.one"),
        ("bool", dict(ok, alignment={"one": True}), "alignment.one"),
        ("list", dict(ok, alignment=[1]), "alignment"),
        ("null value", dict(ok, alignment={"one": None}), "alignment.one"),
        ("no vectors on this route", dict(ok, model="diffpo-plain", alignment={"one": 1}),
         "unknown alignment vector 'one' for model 'diffpo-plain'; available: ['style']"),
        ("aligner vector on a bare base", dict(ok, model="tiny", alignment={"one": 1}), "unknown alignment vector"),
        ("base knob with a prediction, which skips the base",
         dict(ok, alignment={"style": 1}, prediction={"type": "content", "content": "Red."}),
         "alignment knobs ['style'] are the base model's, which a request with a prediction skips"),
    ]
    for label, body, msg in cases:
        r = post(vec_server, body)
        assert r.status_code == 400, (label, r.status_code, r.text)
        err = r.json()["error"]
        assert msg in err["message"], (label, err)
    for raw in (b'{"model": "diffpo-knob", "messages": [{"role": "user", "content": "x"}], "alignment": {"one": NaN}}',
                b'{"model": "diffpo-knob", "messages": [{"role": "user", "content": "x"}], "alignment": {"one": 1e999}}'):
        r = post(vec_server, raw)
        assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == "invalid_alignment"
    assert chat(vec_server, alignment={"one": 2.0})["choices"][0]["message"]["content"] is not None  # bound inclusive
    assert httpx.get(vec_server["url"] + "/healthz").json()["status"] == "ok"
