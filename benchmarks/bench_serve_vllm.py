"""The Serve graph on vLLM engines (Ray Serve LLM), measured side by side in one run.

    .venv/bin/python benchmarks/bench_serve_vllm.py [--requests 8] [--max-tokens 64] [--clients 8] [--per-client 2]
        [--temperature 0.7] [--max-model-len 2048] [--quick]

Two Serve graphs on a local Ray with 2 CPUs, the embedded default model (SmolLM2-135M-Instruct, fp32) as base and
aligner, prompts from the bundled demo set (a " (i)" suffix makes the later ones distinct; no prompt is used in two
parts, so no part gains from another's prefix cache):

* vllm: base and aligner `engine: vllm` with the same engine settings, so both run on ONE Ray Serve LLM
  server (one CPU engine, num_cpus 0.5; vLLM's CPU worker computes on one core); ingress and the two thin
  adapters get 0.05 CPU each;
* hf:   base `engine: hf`, aligner `engine: fast` (the fast Jacobi engine), one torch thread and 0.4 CPU each,
  batching on (max_batch_size 8, adaptive window 0.1 s), as in bench_serve.py.

1. Latency, one request at a time: the vllm graph over HTTP (ingress -> base draft -> aligner) vs the same work on
   one in-process `vllm.LLM` (same model folder, engine arguments from the same `VllmSettings` through
   `engine_setup`): the base's chat prompt ids (`chat_prompt_ids`) sampled with `--temperature` and the seed
   `draft_seed(seed, conversation_key)`, then the aligner's continuation (`AlignerPrompts.encode`,
   `continuation`, greedy, `finish`). p50 of each; goal: ratio <= 1.10. Drafts and answers are compared text for
   text. The two sides cannot live at once on a 2-core machine (each vLLM engine binds a core and its front end
   polls the other), so the Serve side runs first and is shut down (serve.shutdown, ray.shutdown) before the
   in-process engine starts; the in-process side runs last of all.
2. Throughput: `--clients` concurrent clients, `--clients x --per-client` requests, greedy drafts (temperature 0),
   against the vllm graph and then the hf graph (same requests, same max_tokens): requests/s of each and the
   ratio; drafts and answers compared (greedy HF and greedy vLLM may part on a near-tie of fp32 logits).
3. Streaming: `--requests` other prompts one at a time with `stream=true` on each graph: time to the first text vs
   time to the full answer (end of stream), p50, (a) with the base's greedy draft and (b) with
   `prediction=` (OpenAI Predicted Outputs: the client's own draft, here the vllm graph's draft from (a), so the
   base is skipped and the reserved draft tokens arrive at once). The server's own `time_to_first_token_ms`
   (from the ingress) and the aligner's `first_token_ms` are printed too. Checks: the vllm graph's (b) answer
   equals its (a) answer (same draft, same conversation key); the hf graph's (b) answer equals the vllm graph's
   (b) answer (the same draft refined by two engines: DiffPO's answer token for token).

Start-up (Ray, app deployment, `LLM(...)`) is timed and printed but not counted; every graph and the in-process
engine get a warm-up request first. The machine's 1-minute load average is printed next to every phase.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for a 135M model
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray nices workers to 15 by default; the in-process side runs at 0
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "pipeline/data/demo_prompts.jsonl"
APP = "diffpo"
LIGHT = {"ray_actor_options": {"num_cpus": 0.05}}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=8, help="sequential requests of parts 1 and 3 (each)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (draft and answer cap)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of part 2")
    p.add_argument("--per-client", type=int, default=2, help="requests per client in part 2")
    p.add_argument("--temperature", type=float, default=0.7, help="the base's sampling in part 1 (Serve's default)")
    p.add_argument("--max-model-len", type=int, default=2048, help="vLLM's context length (both sides)")
    p.add_argument("--quick", action="store_true", help="smoke run: 3 requests, 32 tokens, 4 clients x 1")
    a = p.parse_args()
    if a.quick:
        a.requests, a.max_tokens, a.clients, a.per_client = 3, 32, 4, 1
    return a


def load() -> str:
    """The 1-minute load average: on a shared machine, what else was running shows up here."""
    return f"{os.getloadavg()[0]:.2f}"


def bench_prompts(n: int) -> list[str]:
    demo = [json.loads(x)["prompt"] for x in open(DEMO)]
    return [demo[i % len(demo)] + ("" if i < len(demo) else f" ({i // len(demo)})") for i in range(n)]


def app_args(kind: str, max_tokens: int, max_model_len: int) -> dict:
    """The `args:` block of one graph: `vllm` (both models on one shared LLM server) or `hf` (fast Jacobi)."""
    if kind == "vllm":
        engine = {"model": "default", "num_cpus": 0.5, "vllm": {"max_model_len": max_model_len}}
        bases = {"smollm2": {"engine": "vllm", **engine}}
        aligners = {"jacobi": {"engine": "vllm", "refine": {"max_new_tokens": max_tokens}, **engine}}
    else:
        bases = {"smollm2": {"engine": "hf", "model": "default", "torch_threads": 1, "max_batch_size": 8}}
        aligners = {"jacobi": {"engine": "fast", "model": "default", "torch_threads": 1, "max_batch_size": 8,
                               "refine": {"max_new_tokens": max_tokens}}}
    return {"bases": bases, "aligners": aligners, "models": {APP: {"base": "smollm2", "aligner": "jacobi"}},
            "max_tokens_cap": max_tokens, "default_max_tokens": max_tokens, "request_timeout_s": 600}


def deploy_options(kind: str) -> dict:
    model = LIGHT if kind == "vllm" else {"ray_actor_options": {"num_cpus": 0.4}}
    return {"Ingress": LIGHT, "base-smollm2": model, "aligner-jacobi": model}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- HTTP clients -------------------------------------------------------------------------------------------------
def _body(prompt: str, max_tokens: int, temperature: float, prediction: str | None, stream: bool) -> dict:
    body = {"model": APP, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "stream": stream}
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    return body


def chat(url: str, prompt: str, max_tokens: int, temperature: float) -> tuple[float, dict]:
    """One non-streamed request: (seconds, the chat.completion)."""
    import httpx

    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=_body(prompt, max_tokens, temperature, None, False),
                   timeout=900)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
    return time.perf_counter() - t0, r.json()


def stream(url: str, prompt: str, max_tokens: int, prediction: str | None = None) -> dict:
    """One streamed request (greedy draft): client-side time to the first text and to the end of the stream, the
    joined text and the final chunk's `diffpo` extra."""
    import httpx

    t0, first, pieces, extra = time.perf_counter(), None, [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=900,
                      json=_body(prompt, max_tokens, 0.0, prediction, True)) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"the stream failed: {event['error']}")
            for choice in event.get("choices", []):
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    pieces.append(text)
            extra = event.get("diffpo", extra)
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "total": end - t0, "text": "".join(pieces), "chunks": len(pieces),
            "draft": extra.get("draft"), "server_ttft_ms": extra.get("time_to_first_token_ms"),
            "first_token_ms": extra.get("first_token_ms"), "draft_source": extra.get("draft_source")}


# ---- one Serve graph ---------------------------------------------------------------------------------------------
def start_graph(kind: str, a) -> tuple[str, float]:
    """Local Ray (2 CPUs) with the `kind` graph deployed and RUNNING: (base URL, seconds it took)."""
    import ray
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    t = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                       "VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 900})
    app = build_graph(AppArgs(**app_args(kind, a.max_tokens, a.max_model_len)), deploy_options(kind))
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    deadline = time.time() + 900  # vLLM engines take a minute or two to start (more on a busy machine)
    while True:
        st = serve.status().applications.get(APP)
        if st is not None and st.status == "RUNNING":
            break
        if (st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY")) or time.time() > deadline:
            sys.exit(f"the {kind} graph did not start: {st}")
        time.sleep(2)
    return f"http://127.0.0.1:{port}", time.perf_counter() - t


def stop_graph() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    time.sleep(5)  # let the engine processes exit before the next phase measures anything


def throughput(url: str, prompts: list[str], a) -> tuple[float, float, list[dict]]:
    """`a.clients` closed-loop clients over `prompts` (greedy): (requests/s, wall seconds, answers in order)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.clients) as pool:
        out = list(pool.map(lambda p: chat(url, p, a.max_tokens, 0.0)[1], prompts))
    wall = time.perf_counter() - t0
    return len(prompts) / wall, wall, out


def streaming(url: str, name: str, prompts: list[str], a, predictions: list[str] | None) -> dict:
    """Part 3 on one graph: each prompt streamed (a) with the base's draft, (b) with `prediction=` (the given
    predictions, or each prompt's own (a) draft)."""
    runs = {"draft": [], "prediction": []}
    for i, p in enumerate(prompts):
        s = stream(url, p, a.max_tokens)
        guess = predictions[i] if predictions is not None else s["draft"]
        q = stream(url, p, a.max_tokens, prediction=guess)
        assert q["draft_source"] == "prediction", q
        runs["draft"].append(s)
        runs["prediction"].append(q)
        print(f"  {name} stream {i}: base draft  ttft {s['ttft']:5.2f}s full {s['total']:5.2f}s ({s['chunks']} chunks)"
              f" | prediction  ttft {q['ttft']:5.2f}s full {q['total']:5.2f}s ({q['chunks']} chunks)"
              f"  (load {load()})", flush=True)
    return runs


def main():
    a = parse_args()
    n, m = a.requests, a.clients * a.per_client
    prompts = bench_prompts(2 * n + m)
    p1, p2, p3 = prompts[:n], prompts[n:n + m], prompts[n + m:]
    loads: dict[str, list[str]] = {}

    def note(phase: str) -> None:
        loads.setdefault(phase, []).append(load())

    print(f"{os.cpu_count()} cores, load average {load()}; default model fp32 as base and aligner, "
          f"max_tokens {a.max_tokens}; {n} sequential requests (temperature {a.temperature}), "
          f"{a.clients} clients x {a.per_client}, {n} streamed prompts", flush=True)

    # ---- vllm graph: parts 1 (Serve side), 2, 3 ------------------------------------------------------------------
    url, t_up_vllm = start_graph("vllm", a)
    print(f"vllm graph RUNNING in {t_up_vllm:.1f}s (load {load()})", flush=True)
    chat(url, "Hello", a.max_tokens, a.temperature)  # warm-up: first calls pay lazy initialisation
    stream(url, "Hi there", a.max_tokens)
    note("1 serve")
    serve_lat = []
    for i, p in enumerate(p1):
        t, body = chat(url, p, a.max_tokens, a.temperature)
        d = body["diffpo"]
        serve_lat.append({"s": t, "draft": d["draft"], "answer": body["choices"][0]["message"]["content"]})
        print(f"  1 serve {i}: {t:5.2f}s (draft {d['draft_ms'] / 1000:.2f} refine {d['refine_ms'] / 1000:.2f})  "
              f"(load {load()})", flush=True)
    note("1 serve")
    note("2 vllm")
    rps_vllm, wall_vllm, out_vllm = throughput(url, p2, a)
    note("2 vllm")
    print(f"  2 vllm graph: {rps_vllm:.3f} req/s ({wall_vllm:.1f}s for {m})  (load {load()})", flush=True)
    note("3 vllm")
    st_vllm = streaming(url, "vllm", p3, a, None)
    note("3 vllm")
    stop_graph()

    # ---- hf graph: parts 2, 3 -------------------------------------------------------------------------------------
    url, t_up_hf = start_graph("hf", a)
    print(f"hf graph RUNNING in {t_up_hf:.1f}s (load {load()})", flush=True)
    chat(url, "Hello", a.max_tokens, 0.0)
    stream(url, "Hi there", a.max_tokens)
    note("2 hf")
    rps_hf, wall_hf, out_hf = throughput(url, p2, a)
    note("2 hf")
    print(f"  2 hf graph:   {rps_hf:.3f} req/s ({wall_hf:.1f}s for {m})  (load {load()})", flush=True)
    sizes = [o["diffpo"]["refine_batch_size"] for o in out_hf]
    note("3 hf")
    st_hf = streaming(url, "hf", p3, a, [s["draft"] for s in st_vllm["draft"]])
    note("3 hf")
    stop_graph()

    # ---- part 1, in-process side: one vllm.LLM, the same two engine calls -----------------------------------------
    from vllm import LLM, SamplingParams, TokensPrompt

    from pipeline.decoding.continuation import AlignerPrompts, RefineRequest, continuation, finish
    from pipeline.decoding.drafting import draft_seed
    from pipeline.decoding.vllm_engine import engine_setup
    from pipeline.models import load_model_text, resolve_model_path
    from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE, chat_prompt_ids
    from serve_app.config import AppArgs
    from serve_app.protocol import conversation_key

    cfg = AppArgs(**app_args("vllm", a.max_tokens, a.max_model_len))
    base, al = cfg.bases["smollm2"], cfg.aligners["jacobi"]
    e = engine_setup(al.vllm, al.dtype, al.trust_remote_code, al.num_cpus, al.num_gpus)  # = the shared server's
    os.environ.update(e.env)
    text = load_model_text("default")
    settings = al.settings()
    enc = AlignerPrompts(text, settings, al.in_context, al.template or DEFAULT_CORRECTION_TEMPLATE,
                         context_window=al.vllm.max_model_len)
    stops = list(text.stop_ids)
    t = time.perf_counter()
    llm = LLM(model=resolve_model_path("default")[0], **e.engine_kwargs)
    t_llm = time.perf_counter() - t
    print(f"in-process vllm.LLM up in {t_llm:.1f}s ({e.engine_kwargs}) (load {load()})", flush=True)

    def in_process(prompt: str, temperature: float) -> tuple[float, str, str, float]:
        t0 = time.perf_counter()
        msgs = [{"role": "user", "content": prompt}]
        key = conversation_key(msgs)
        sampling = SamplingParams(temperature=temperature, top_p=1.0, seed=draft_seed(base.seed, key),
                                  max_tokens=a.max_tokens, stop_token_ids=stops, detokenize=False)
        out = llm.generate([TokensPrompt(prompt_token_ids=chat_prompt_ids(text.tokenizer, msgs))], sampling,
                           use_tqdm=False)
        draft = text.answer_text(out[0].outputs[0].token_ids)
        t_draft = time.perf_counter() - t0
        item = enc.encode(RefineRequest(msgs, draft, key, a.max_tokens))
        ids, budget = continuation(item, settings)
        greedy = SamplingParams(temperature=0.0, max_tokens=budget, stop_token_ids=stops, detokenize=False)
        gen = llm.generate([TokensPrompt(prompt_token_ids=ids)], greedy, use_tqdm=False)[0].outputs[0].token_ids
        answer = text.answer_text(finish(item, list(gen), stops, settings).token_ids)
        return time.perf_counter() - t0, draft, answer, t_draft

    in_process("Hello", a.temperature)  # warm-up
    note("1 in-process")
    local_lat = []
    for i, p in enumerate(p1):
        t, draft, answer, t_draft = in_process(p, a.temperature)
        local_lat.append({"s": t, "draft": draft, "answer": answer})
        print(f"  1 in-process {i}: {t:5.2f}s (draft {t_draft:.2f} refine {t - t_draft:.2f})  (load {load()})",
              flush=True)
    note("1 in-process")

    # ---- comparisons ---------------------------------------------------------------------------------------------
    same_draft1 = sum(s["draft"] == l["draft"] for s, l in zip(serve_lat, local_lat))
    same_answer1 = sum(s["answer"] == l["answer"] for s, l in zip(serve_lat, local_lat))
    for i, (s, l) in enumerate(zip(serve_lat, local_lat)):
        if s["answer"] != l["answer"]:
            print(f"  !! part 1 request {i}: Serve and in-process answers differ "
                  f"(drafts {'equal' if s['draft'] == l['draft'] else 'differ'})")
    drafts2 = [(v["diffpo"]["draft"], h["diffpo"]["draft"]) for v, h in zip(out_vllm, out_hf)]
    answers2 = [(v["choices"][0]["message"]["content"], h["choices"][0]["message"]["content"])
                for v, h in zip(out_vllm, out_hf)]
    same_draft2 = sum(x == y for x, y in drafts2)
    same_answer2 = sum(x == y for x, y in answers2)
    same_answer2_given = sum(ax == ay for (dx, dy), (ax, ay) in zip(drafts2, answers2) if dx == dy)
    for i, ((dx, dy), (ax, ay)) in enumerate(zip(drafts2, answers2)):
        if ax != ay:
            print(f"  !! part 2 request {i}: vllm and hf answers differ "
                  f"(drafts {'equal' if dx == dy else 'differ'})")
    own = sum(q["text"] == s["text"] for q, s in zip(st_vllm["prediction"], st_vllm["draft"]))
    cross = sum(v["text"] == h["text"] for v, h in zip(st_vllm["prediction"], st_hf["prediction"]))
    for i, (v, h) in enumerate(zip(st_vllm["prediction"], st_hf["prediction"])):
        if v["text"] != h["text"]:
            print(f"  !! part 3 prompt {i}: the same prediction refined differently by the vllm and hf graphs")

    # ---- table ---------------------------------------------------------------------------------------------------
    lat_serve, lat_local = p50([x["s"] for x in serve_lat]), p50([x["s"] for x in local_lat])
    print(f"\nstart-up (not counted): vllm graph {t_up_vllm:.1f}s, hf graph {t_up_hf:.1f}s, in-process LLM() "
          f"{t_llm:.1f}s")
    print("load average per phase (start-end): " + ", ".join(f"{k} {'-'.join(v)}" for k, v in loads.items()))
    print(f"1. latency, {n} requests one at a time, max_tokens {a.max_tokens}, draft temperature {a.temperature}:")
    print(f"   p50 vllm graph over HTTP {lat_serve:.2f}s, in-process vllm.LLM {lat_local:.2f}s; "
          f"same drafts {same_draft1}/{n}, same answers {same_answer1}/{n}")
    print(f"2. throughput, {a.clients} clients x {a.per_client} requests, greedy drafts:")
    print(f"   vllm graph {rps_vllm:.3f} req/s ({wall_vllm:.1f}s), hf graph {rps_hf:.3f} req/s ({wall_hf:.1f}s, "
          f"mean aligner batch {statistics.mean(sizes):.1f}); same drafts {same_draft2}/{m}, same answers "
          f"{same_answer2}/{m} ({same_answer2_given}/{same_draft2} where the drafts are equal)")
    print(f"3. streaming, {n} prompts one at a time, p50 seconds (client side):")
    print(f"   {'graph / draft':<22}{'first text':>11}{'full answer':>13}{'ratio':>7}{'server ttft':>13}"
          f"{'aligner first':>15}")
    ratios = {}
    for name, runs in (("vllm", st_vllm), ("hf", st_hf)):
        for variant in ("draft", "prediction"):
            rs = runs[variant]
            ttft, full = p50([r["ttft"] for r in rs]), p50([r["total"] for r in rs])
            ratios[name, variant] = (ttft, full)
            print(f"   {name + ' / ' + ('base draft' if variant == 'draft' else 'prediction='):<22}{ttft:>11.2f}"
                  f"{full:>13.2f}{ttft / full:>7.2f}{p50([r['server_ttft_ms'] for r in rs]) / 1000:>13.2f}"
                  f"{p50([r['first_token_ms'] for r in rs]) / 1000:>15.2f}")
    print(f"   vllm graph: prediction = its own draft gives the same answer {own}/{n}; the same prediction gives the "
          f"same answer on both graphs {cross}/{n}")
    print(f"figure: serve_vllm_p50_latency_vs_in_process = {lat_serve / lat_local:.3f}")
    print(f"figure: serve_vllm_vs_in_process_same_answers = {same_answer1 / n:.2f}")
    print(f"figure: serve_vllm_rps = {rps_vllm:.3f}")
    print(f"figure: serve_hf_rps = {rps_hf:.3f}")
    print(f"figure: serve_vllm_vs_hf_throughput = {rps_vllm / rps_hf:.2f}")
    print(f"figure: serve_vllm_vs_hf_same_answers = {same_answer2 / m:.2f}")
    print(f"figure: serve_vllm_vs_hf_same_answers_given_same_draft = "
          f"{(same_answer2_given / same_draft2) if same_draft2 else float('nan'):.2f}")
    print(f"figure: serve_vllm_vs_hf_same_answers_same_prediction = {cross / n:.2f}")
    for (name, variant), (ttft, full) in ratios.items():
        tag = f"{name}_{'draft' if variant == 'draft' else 'prediction'}"
        print(f"figure: stream_ttft_s_{tag} = {ttft:.2f}")
        print(f"figure: stream_ttft_vs_full_{tag} = {ttft / full:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
