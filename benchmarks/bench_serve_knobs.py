"""Per-request alignment knobs over HTTP: the vLLM route (a LoRA adapter per setting) vs the HF route (dense merges,
the fast Jacobi engine) with the same model and vectors, side by side in one run.

    .venv/bin/python benchmarks/bench_serve_knobs.py [requests=16] [settings=4] [max_tokens=48] [rank=16]
        [demo=outputs/demo_vectors]

The default model as aligner (fp32) with `benchmarks/demo_vectors.py`'s two style vectors (run bench_vector_lora.py or
demo_vectors.py first), a cheap HF base that never runs (each request brings its own draft as `prediction`, the
same for both routes). `requests` requests over `settings` distinct knob settings (the base included), sent at once
by `requests` clients, to the vLLM route and then to the HF route, after one warm-up request per setting on each
(so that both measure cached settings: adapters loaded, merged variants cached; `variant_cache_size` = settings).
Figures: requests/s of each route and their ratio, p50 latency, and the share of answers identical to the HF route's
(at a rank below full, the adapters approximate the vectors: docs/vectors.md).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402


class Options(Section):
    requests: int = Field(16, ge=1)
    settings: int = Field(4, ge=1, le=5, description="distinct settings (the base first)")
    max_tokens: int = Field(48, ge=1)
    rank: int = Field(16, ge=1, description="adapters.rank of the vLLM route (the default model's layers are past "
                                            "vLLM's full-rank limit)")
    demo: str = Field(str(ROOT / "outputs/demo_vectors"))


SETTINGS = [{}, {"concise": 0.5}, {"detailed": 0.5}, {"concise": 1.0}, {"concise": 0.5, "detailed": 0.5}]


def main(argv: list[str]) -> None:
    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    o = load_config(Options, None, argv)
    vectors = {n: str(Path(o.demo) / "vectors" / n) for n in ("concise", "detailed")}
    if not all((Path(p) / "vector.json").exists() for p in vectors.values()):
        sys.exit(f"needs the demo's vectors under {o.demo}/vectors: run benchmarks/demo_vectors.py first")
    from tests.tiny import save_tiny

    tiny = save_tiny("llama", Path(o.demo) / "tiny-base")  # the route's base: never called (prediction drafts)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}})
    args = AppArgs(**{
        "bases": {"tiny": {"engine": "hf", "model": str(tiny)}},
        "aligners": {
            "hf": {"engine": "fast", "model": "default", "refine": {"max_new_tokens": o.max_tokens}, "vectors": vectors,
                   "variant_cache_size": o.settings, "max_batch_size": 8, "batch_wait_timeout_s": 0.1},
            "vllm": {"engine": "vllm", "model": "default", "refine": {"max_new_tokens": o.max_tokens},
                     "vectors": vectors, "adapters": {"rank": o.rank, "max_loras": o.settings},
                     "num_cpus": 0.5, "vllm": {"max_model_len": 1024},
                     "deployment_config": {"ray_actor_options": {"num_cpus": 0.1}}}},
        "models": {"knob-hf": {"base": "tiny", "aligner": "hf"}, "knob-vllm": {"base": "tiny", "aligner": "vllm"}},
        "max_tokens_cap": o.max_tokens, "default_max_tokens": o.max_tokens, "request_timeout_s": 600})
    light = {"ray_actor_options": {"num_cpus": 0.05}}
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 900})
    t0 = time.perf_counter()
    serve.run(build_graph(args, {"Ingress": light, "base-tiny": light, "aligner-vllm": light,
                                 "aligner-hf": {"ray_actor_options": {"num_cpus": 0.9}}}), name="knobs",
              route_prefix="/")
    print(f"[bench] graph up in {time.perf_counter() - t0:.0f} s", flush=True)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    prompts = [("Name a color.", "Blue is a color."), ("What is rain?", "Rain is water that falls from clouds."),
               ("Say hello.", "Hello there!"), ("Why is the sky blue?", "Because air scatters blue light more.")]
    settings = SETTINGS[:o.settings]
    jobs = [(settings[i % len(settings)], prompts[i % len(prompts)]) for i in range(o.requests)]

    def ask(model, knobs, prompt):
        q, draft = prompt
        body = {"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": o.max_tokens,
                "prediction": {"type": "content", "content": draft}, **({"alignment": knobs} if knobs else {})}
        t = time.perf_counter()
        r = httpx.post(url, json=body, timeout=900)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["choices"][0]["message"]["content"]

    out = {}
    for model in ("knob-vllm", "knob-hf"):
        for k in settings:  # warm: adapters built and loaded, variants merged and cached
            ask(model, k, prompts[0])
        t = time.perf_counter()
        with ThreadPoolExecutor(o.requests) as pool:
            res = list(pool.map(lambda j: ask(model, *j), jobs))
        wall = time.perf_counter() - t
        out[model] = (o.requests / wall, statistics.median(x for x, _ in res), [a for _, a in res])
        print(f"[bench] {model}: {out[model][0]:.3f} req/s, p50 {out[model][1]:.2f} s", flush=True)
    same = sum(a == b for a, b in zip(out["knob-vllm"][2], out["knob-hf"][2])) / o.requests
    serve.shutdown()
    ray.shutdown()
    print(f"figure: knobs_vllm_req_per_s = {out['knob-vllm'][0]:.3f}")
    print(f"figure: knobs_hf_req_per_s = {out['knob-hf'][0]:.3f}")
    print(f"figure: knobs_vllm_vs_hf_throughput = {out['knob-vllm'][0] / out['knob-hf'][0]:.2f}")
    print(f"figure: knobs_vllm_p50_s = {out['knob-vllm'][1]:.2f}")
    print(f"figure: knobs_hf_p50_s = {out['knob-hf'][1]:.2f}")
    print(f"figure: knobs_answers_identical = {same:.2f}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(str(e))
