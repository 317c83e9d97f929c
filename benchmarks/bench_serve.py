"""The Serve graph over HTTP vs the same pipeline called in-process, and batching on vs off under load.

    .venv/bin/python benchmarks/bench_serve.py [requests=8] [max_tokens=32] [clients=8] [per_client=2]
        [batch_wait_timeout_s=0.1] [latency_only=0]

Pipeline: the default model drafts (greedy) and the default model refines with the fast Jacobi engine,
prompts from the bundled demo set. One torch thread per model on both sides.
1. Latency: one request at a time, HTTP through Serve (ingress -> base -> aligner) and the in-process call
   (generate_answers + Refiner.refine) interleaved request by request; p50 of each (goal: ratio <= 1.10).
2. Throughput: `clients` concurrent HTTP clients, each sending `per_client` requests, against two copies of
   the app that differ only in max_batch_size (8 vs 1) of the base and aligner (goal: >= 2x).
The latency side runs against the batching app, so it pays the batch wait of a lone request (twice).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_worker_niceness", "0")  # Ray nices workers to 15 by default; the in-process side runs at 0

from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PORT = 8391


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    requests: int = Field(8, description="part 1: requests sent one at a time (HTTP and in-process each)")
    max_tokens: int = Field(32, description="max_tokens of every request (draft and answer cap)")
    clients: int = Field(8, description="part 2: concurrent HTTP clients")
    per_client: int = Field(2, description="part 2: requests per client")
    batch_wait_timeout_s: float = Field(0.1, description="batch_wait_timeout_s of the base and aligner deployments")
    latency_only: bool = Field(False, description="run part 1 only (1/true), skip the throughput part")


def app_args(batch: int, max_tokens: int, wait: float) -> dict:
    return {"bases": {"smollm2": {"engine": "hf", "model": "default", "torch_threads": 1, "max_batch_size": batch,
                                  "batch_wait_timeout_s": wait}},
            "aligners": {"jacobi": {"model": "default", "torch_threads": 1, "max_batch_size": batch,
                                    "batch_wait_timeout_s": wait, "refine": {"max_new_tokens": max_tokens}}},
            "models": {"diffpo": {"base": "smollm2", "aligner": "jacobi"}},
            "max_tokens_cap": max_tokens, "default_max_tokens": max_tokens, "request_timeout_s": 600}


def main():
    options = load_config(Options, None, sys.argv[1:])
    latency_only = options.latency_only
    wait = options.batch_wait_timeout_s
    n, max_tokens = options.requests, options.max_tokens
    clients, per_client = options.clients, options.per_client
    prompts = [json.loads(x)["prompt"] for x in open(ROOT / "pipeline/data/demo_prompts.jsonl")]

    import httpx
    import ray
    import torch
    from ray import serve

    from pipeline.decoding.drafting import SamplingParams, generate_answers
    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.models import load_model
    from pipeline.decoding.refiner import RefineRequest, Refiner
    from serve_app.app import build_graph
    from serve_app.config import AppArgs
    from serve_app.protocol import conversation_key

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT, "request_timeout_s": 900})
    small = {"ray_actor_options": {"num_cpus": 0.4}}
    opts = {"base-smollm2": small, "aligner-jacobi": small, "Ingress": {"ray_actor_options": {"num_cpus": 0.05}}}
    t = time.perf_counter()
    serve.run(build_graph(AppArgs(**app_args(8, max_tokens, wait)), opts), name="batched", route_prefix="/b", blocking=False)
    serve.run(build_graph(AppArgs(**app_args(1, max_tokens, wait)), opts), name="unbatched", route_prefix="/u",
              blocking=False)
    print(f"serve apps up in {time.perf_counter() - t:.1f}s", flush=True)

    def http(prefix: str, prompt: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        r = httpx.post(f"http://127.0.0.1:{PORT}{prefix}/v1/chat/completions", timeout=900,
                       json={"model": "diffpo", "messages": [{"role": "user", "content": prompt}],
                             "max_tokens": max_tokens, "temperature": 0})
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()

    for prefix in ("/b", "/u"):  # warm both apps (first calls pay lazy initialisation)
        http(prefix, "Hello")

    # ---- 1. latency: HTTP vs in-process, interleaved ------------------------------------------------
    torch.set_num_threads(1)
    base, aligner = load_model("default"), load_model("default")
    refiner = Refiner(aligner, RefineSettings(max_new_tokens=max_tokens), mode="fast")
    greedy = SamplingParams(max_new_tokens=max_tokens, do_sample=False)

    def in_process(prompt: str) -> tuple[float, str, float]:
        t0 = time.perf_counter()
        msgs = [{"role": "user", "content": prompt}]
        draft = generate_answers(base, [msgs], greedy)[0][0]
        t_draft = time.perf_counter() - t0
        out = refiner.refine([RefineRequest(msgs, draft, conversation_key(msgs), max_tokens)])[0].text
        return time.perf_counter() - t0, out, t_draft

    in_process(prompts[0])  # warm-up
    lat_http, lat_local, same = [], [], 0
    for p in (prompts * 4)[:n]:
        th, body = http("/b", p)
        tl, text, tl_draft = in_process(p)
        lat_http.append(th)
        lat_local.append(tl)
        same += body["choices"][0]["message"]["content"] == text
        d = body["diffpo"]
        print(f"  http {th:6.2f}s (draft {d['draft_ms'] / 1000:.2f} refine {d['refine_ms'] / 1000:.2f})   "
              f"in-process {tl:6.2f}s (draft {tl_draft:.2f} refine {tl - tl_draft:.2f})", flush=True)
    p50_http, p50_local = statistics.median(lat_http), statistics.median(lat_local)
    del base, aligner, refiner

    # ---- 2. throughput: batching on vs off -----------------------------------------------------------
    def load(prefix: str) -> tuple[float, float, list]:
        work = [(prompts * 8)[i] for i in range(clients * per_client)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(lambda p: http(prefix, p), work))
        wall = time.perf_counter() - t0
        return len(work) / wall, wall, out

    if latency_only:
        print(f"figure: serve_p50_latency_vs_in_process = {p50_http / p50_local:.3f}")
        return
    rps_on, wall_on, out_on = load("/b")
    rps_off, wall_off, out_off = load("/u")
    sizes = [o[1]["diffpo"]["refine_batch_size"] for o in out_on]
    agree = sum(a[1]["choices"][0]["message"]["content"] == b[1]["choices"][0]["message"]["content"]
                for a, b in zip(out_on, out_off))
    serve.shutdown()
    ray.shutdown()

    print(f"\nlatency, {n} requests one at a time, max_tokens={max_tokens}:")
    print(f"  p50 HTTP through Serve {p50_http:.2f}s, in-process {p50_local:.2f}s; same answer {same}/{n}")
    print(f"throughput, {clients} clients x {per_client} requests:")
    print(f"  batching on  {rps_on:.3f} req/s ({wall_on:.1f}s), mean aligner batch {statistics.mean(sizes):.1f}")
    print(f"  batching off {rps_off:.3f} req/s ({wall_off:.1f}s); same answers {agree}/{len(out_on)}")
    print(f"figure: serve_p50_latency_vs_in_process = {p50_http / p50_local:.3f}")
    print(f"figure: serve_throughput_batching_on_vs_off = {rps_on / rps_off:.2f}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a mistake in the options: one message listing every problem, exit status 2
        print(f"[bench_serve] {e}", file=sys.stderr)
        sys.exit(2)
