"""Overload on the default Serve graph, admission on a queue-time budget on vs off, side by side in one run.

    .venv/bin/python benchmarks/bench_overload.py [--clients 32] [--seconds 120] [--budget 2.0]
        [--max-concurrent N] [--max-tokens 24] [--solo 5]

The graph is conf/serve.yaml's application (its models, engines and deployment options: the embedded default
model drafting and refining on one shared vLLM engine) on a local Ray with 2 CPUs, with one route added: the
same base and aligner as `diffpo-smollm2` with `max_queue_wait_s: --budget`, and `admission.max_concurrent:
--max-concurrent` (default: conf/serve.yaml's). Both routes share every deployment, so the two phases run on the
same engine, one after the other:

0. solo: `--solo` requests one at a time on `diffpo-smollm2`: one answer's time alone (p50) = `answer_s`.
1. off: `--clients` closed-loop clients for `--seconds` on `diffpo-smollm2` (no budget: every request waits its
   turn, today's behaviour);
2. on:  the same clients and time on the budgeted route.

Each client sends greedy requests (`--max-tokens`, distinct bundled prompts) back to back; a refused client (503)
waits the `Retry-After` the server sent (at most 60 s, the gate's longest) and sends its next request. Per phase: p50 /
p99 latency of the answered (200) requests, the fraction refused, and goodput = answers whose latency is within
the objective (`--budget` + `answer_s`) per second; on the budgeted route also the p99 of the wait for a slot
(`diffpo.queue_wait_ms` of each answer). Goal: with the budget, p99 of admitted requests <= budget +
answer_s, and goodput not lower than without it.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402

from serve_app.admission import MAX_RETRY_S  # noqa: E402

APP = "diffpo"
PLAIN, GATED = "diffpo-smollm2", "diffpo-smollm2-slo"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--budget", type=float, default=2.0, help="max_queue_wait_s of the budgeted route")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="admission.max_concurrent (default: conf/serve.yaml's)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--solo", type=int, default=5)
    return p.parse_args()


def graph(a) -> tuple[dict, dict]:
    """conf/serve.yaml's app args with the budgeted route added, and its deployment options by name."""
    app = yaml.safe_load(open(ROOT / "conf" / "serve.yaml"))["applications"][0]
    args = app["args"]
    args["models"][GATED] = dict(args["models"][PLAIN], max_queue_wait_s=a.budget,
                                 description="the same, with a queue-time budget")
    # the conf's admission without its app-wide budget (the plain route has none): --max-concurrent, if given, wins
    args["admission"] = {k: v for k, v in (args.get("admission") or {}).items() if k != "max_queue_wait_s"}
    if a.max_concurrent:
        args["admission"]["max_concurrent"] = a.max_concurrent
    args.pop("api_key_env", None)
    args["api_key_env"] = "DIFFPO_BENCH_UNSET_KEY"
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    return args, options


def start(a) -> str:
    import ray
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import AppArgs

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                       "VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 900})
    args, options = graph(a)
    serve.run(build_graph(AppArgs(**args), options), name=APP, route_prefix="/", blocking=False)
    deadline = time.time() + 900
    while (st := serve.status().applications.get(APP)) is None or st.status != "RUNNING":
        if time.time() > deadline or (st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY")):
            sys.exit(f"the graph did not start: {st}")
        time.sleep(2)
    return f"http://127.0.0.1:{port}"


def prompts() -> list[str]:
    import json

    rows = [json.loads(x) for x in open(ROOT / "pipeline" / "data" / "demo_prompts.jsonl")]
    return [r["prompt"] for r in rows]


def ask(h: httpx.Client, url: str, model: str, prompt: str, max_tokens: int) -> tuple[int, float, str, float]:
    """One greedy request: (status, seconds, error code, seconds to wait before the next one)."""
    t0 = time.perf_counter()
    r = h.post(url + "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": prompt}],
                                                   "max_tokens": max_tokens, "temperature": 0})
    took = time.perf_counter() - t0
    if r.status_code == 200:  # the wait for a slot (admission), in the code field's place
        return 200, took, str(r.json()["diffpo"].get("queue_wait_ms", 0.0) / 1000), 0.0
    if r.status_code == 503:  # a well-behaved client comes back when the server says (or goes elsewhere)
        return r.status_code, took, r.json()["error"]["code"], min(MAX_RETRY_S, float(r.headers.get("retry-after", 1)))
    return r.status_code, took, (r.json()["error"]["code"] if r.status_code != 200 else ""), 0.0


def phase(url: str, model: str, a, texts: list[str]) -> dict:
    """`a.clients` closed-loop clients for `a.seconds` on `model`: every outcome (status, seconds, error code)."""
    got, stop, counter = [], threading.Event(), iter(range(10**9))

    def client():
        with httpx.Client(timeout=600) as h:
            while not stop.is_set():
                i = next(counter)
                code, took, why, retry_after = ask(h, url, model, f"{texts[i % len(texts)]} ({i})", a.max_tokens)
                if not stop.is_set():
                    got.append((code, took, why))
                stop.wait(retry_after)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(a.seconds)
    stop.set()
    wall = time.perf_counter() - t0
    for t in threads:
        t.join(900)
    return {"got": got, "wall": wall}


def summary(name: str, r: dict, objective: float) -> dict:
    ok = sorted(t for c, t, _ in r["got"] if c == 200)
    n = len(r["got"])
    refused = sum(1 for c, _, _ in r["got"] if c == 503)
    other = n - len(ok) - refused
    q = statistics.quantiles(ok, n=100) if len(ok) >= 2 else [float("nan")] * 99
    s = {"answered": len(ok), "refused": refused, "other": other, "p50": statistics.median(ok) if ok else float("nan"),
         "p99": q[98], "refused_fraction": refused / max(1, n),
         "goodput": sum(1 for t in ok if t <= objective) / r["wall"], "answers_per_s": len(ok) / r["wall"],
         "reasons": sorted({w for c, _, w in r["got"] if c == 503})}
    waits = sorted(float(w) for c, _, w in r["got"] if c == 200)
    s["queue_wait_p99"] = statistics.quantiles(waits, n=100)[98] if len(waits) >= 2 else float("nan")
    print(f"[{name}] {n} requests in {r['wall']:.0f} s: {len(ok)} answered, {refused} refused {s['reasons']} "
          f"({refused / r['wall']:.1f}/s), "
          f"{other} other; p50 {s['p50']:.2f} s, p99 {s['p99']:.2f} s (of it queue wait p99 {s['queue_wait_p99']:.2f} s); goodput {s['goodput']:.3f}/s "
          f"(answers within {objective:.2f} s), answers {s['answers_per_s']:.3f}/s", flush=True)
    return s


def main():
    a = parse_args()
    t = time.perf_counter()
    url = start(a)
    print(f"[start] graph RUNNING after {time.perf_counter() - t:.0f} s (not counted)", flush=True)
    texts = prompts()
    with httpx.Client(timeout=600) as h:
        ask(h, url, PLAIN, "Warm up.", a.max_tokens)
        solo = [ask(h, url, PLAIN, f"{texts[i % len(texts)]} (solo {i})", a.max_tokens)[1] for i in range(a.solo)]
    answer_s = statistics.median(solo)
    objective = a.budget + answer_s
    print(f"[solo] one answer alone: p50 {answer_s:.2f} s; objective = budget {a.budget:g} s + {answer_s:.2f} s "
          f"= {objective:.2f} s", flush=True)
    off = summary("off", phase(url, PLAIN, a, texts), objective)
    on = summary("on", phase(url, GATED, a, texts), objective)
    print(f"figure: overload_solo_answer_s = {answer_s:.2f}")
    for tag, s in (("off", off), ("on", on)):
        print(f"figure: overload_{tag}_p50_s = {s['p50']:.2f}")
        print(f"figure: overload_{tag}_p99_s = {s['p99']:.2f}")
        print(f"figure: overload_{tag}_refused_fraction = {s['refused_fraction']:.3f}")
        print(f"figure: overload_{tag}_goodput_per_s = {s['goodput']:.3f}")
    print(f"figure: overload_on_queue_wait_p99_s = {on['queue_wait_p99']:.2f}")
    print(f"figure: overload_on_p99_vs_objective = {on['p99'] / objective:.2f}")
    print(f"figure: overload_goodput_on_vs_off = {on['goodput'] / max(off['goodput'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
