"""The base model drafting only what the aligned answer depends on (`base.drafts=as_needed`) vs the whole draft
(`base.drafts=full`), on vLLM, side by side in one run: base tokens, batch-job rows/s, Serve time to first text.

    .venv/bin/python benchmarks/bench_draft_prefix.py [heldout=64] [part=all|job|serve] [max_tokens=256]
        [refine_tokens=64] [requests=8] [serve_max_tokens=64]

With `as_needed`, a vLLM base before an aligner on vllm (or ar) without in_context writes only a prefix that
decides the aligner's first r tokens (r ~ U{0..reserve_tokens} per row, `pipeline/decoding/draft_prefix.py`), and
nothing where r = 0. The answer must not change: every comparison below checks it, id by id.

* job (`part=job`): `jobs.align_dataset.main` in this process (local Ray started by the job: ray.address null),
  base.engine=vllm aligner.engine=vllm, default model for both, `base.sampling.max_new_tokens=max_tokens` (the
  default cap, 256), `aligner.refine.max_new_tokens=refine_tokens` (64: shorter answers keep the run quick; the
  draft cap is what the prefix saves on), over the 12 bundled demo prompts + `heldout` held-out AlpacaEval
  instructions (id % 4 == 0, no drafts, from ../shared/data; skipped with a reason if absent), once with
  base.drafts=full and once with base.drafts=as_needed. Figures: mean `draft_tokens` per aligned row (the base
  tokens vLLM generated for it); rows/s start-up included (the job's summary: rows / wall from `main()`'s start,
  Ray start and both engines' start included) and start-up excluded (steady state: the rows written after the
  first part file / the time from the first part file to the last, from the files' modification times in
  `rows/`: by the first write both engine pools are up, so none of their start-up is in that interval).
* serve (`part=serve`): conf/serve.yaml's application args (the default graph: route `diffpo-smollm2`, vLLM base
  + vLLM aligner on one shared LLM server) plus one base `smollm2-full` (a copy of `smollm2` with `drafts: full`)
  and a route `diffpo-smollm2-full` using it with the same aligner; the same engine settings, so it shares the
  one LLM server (`_Servers` in serve_app/app.py; checked before anything starts). Started in this process
  (`serve.run`, local Ray with 2 CPUs, the yaml's `deployments:` options). `requests` demo prompts, each sent to
  both routes, one at a time, with the official openai client (`stream=True`, no prediction, the base's default
  sampling: temperature 0.7 seeded by the conversation, so both routes draw the same draft), `max_tokens =
  serve_max_tokens`; which route goes first alternates per prompt (vLLM's prefix cache serves the second one's
  prompt). Time to the first text, to the end of the stream (client side), their ratio (p50 over p50) and the
  p50 latency per route.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from typing import Literal  # noqa: E402

from pydantic import Field  # noqa: E402

from jobs.common.config import Section, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT.parent / "shared/data/alpaca_eval/eval_set.jsonl"
DEMO = ROOT / "pipeline/data/demo_prompts.jsonl"
PREFIX, FULL = "diffpo-smollm2", "diffpo-smollm2-full"


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    part: Literal["all", "job", "serve"] = Field("all", description="which comparisons to run")
    heldout: int = Field(64, ge=0, description="held-out AlpacaEval prompts in the job (besides the 12 demo prompts)")
    max_tokens: int = Field(256, ge=1, description="the job's draft cap, base.sampling.max_new_tokens")
    refine_tokens: int = Field(64, ge=1, description="the job's answer cap, aligner.refine.max_new_tokens")
    requests: int = Field(8, ge=1, description="Serve: prompts sent to each route, one at a time")
    serve_max_tokens: int = Field(64, ge=1, description="Serve: max_tokens of every request (draft and answer cap)")
    keep: bool = Field(False, description="keep the temp folder (inputs, job outputs and logs)")


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- the batch job --------------------------------------------------------------------------------------------
def job_input(folder: Path, heldout: int) -> tuple[Path, dict[str, str]]:
    """A folder with the demo prompts and `heldout` held-out AlpacaEval instructions (no drafts); ids -> source."""
    folder.mkdir(parents=True)
    demo = [json.loads(x) for x in open(DEMO)]
    (folder / "demo.jsonl").write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n" for r in demo))
    source = {r["id"]: "demo" for r in demo}
    if heldout:
        rows = [json.loads(x) for x in open(EVAL_SET)]
        rows = [r for r in rows if r["id"] % 4 == 0][:heldout]
        (folder / "alpaca_eval.jsonl").write_text("".join(
            json.dumps({"id": f"ae-{r['id']}", "prompt": r["instruction"]}) + "\n" for r in rows))
        source |= {f"ae-{r['id']}": "alpaca_eval" for r in rows}
    return folder, source


def run_job(src: Path, out: Path, drafts: str, o: Options) -> dict:
    """jobs.align_dataset.main in this process; its stdout/stderr go to out/../job-<drafts>.log."""
    import ray

    from jobs.align_dataset import main as align_main

    argv = [f"input.path={src}", f"output.path={out}", "base.engine=vllm", "aligner.engine=vllm",
            f"base.drafts={drafts}", f"base.sampling.max_new_tokens={o.max_tokens}",
            f"aligner.refine.max_new_tokens={o.refine_tokens}", "ray.progress_bars=false", "show_samples=0"]
    log = out.parent / f"job-{drafts}.log"
    print(f"job ({drafts}): python -m jobs.align_dataset " + " ".join(argv[:1] + argv[2:]), flush=True)
    t = time.perf_counter()
    try:
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            summary = align_main(argv)
    except BaseException:
        print(f"!! the job failed; last lines of {log}:\n" + "".join(open(log).readlines()[-60:]), flush=True)
        raise
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t
    text = log.read_text()
    if "drafting them in full" in text:
        print("  note: some drafted prefixes did not settle: a second pass drafted them in full (see the log)")
    import pyarrow.parquet as pq

    parts = sorted((out / "rows").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    times = [p.stat().st_mtime for p in parts]
    counts = [pq.ParquetFile(p).metadata.num_rows for p in parts]
    steady = (sum(counts[1:]) / (times[-1] - times[0])) if len(parts) > 1 and times[-1] > times[0] else None
    summary = dict(summary, bench_wall_s=wall, parts=len(parts), steady_rows_per_s=steady,
                   steady_s=times[-1] - times[0] if parts else None, steady_rows=sum(counts[1:]))
    print(f"  done in {wall:.1f}s (summary wall_s {summary['wall_s']}): {summary['rows_out']} rows, "
          f"{summary['error_rows']} error rows, mean_draft_tokens {summary['mean_draft_tokens']}, "
          f"{len(parts)} part files, first -> last write {summary['steady_s']:.1f}s (load {load()})", flush=True)
    time.sleep(5)  # let the engine processes exit before the next run measures anything
    return summary


def bench_job(o: Options, tmp: Path) -> dict | None:
    if o.heldout and not EVAL_SET.exists():
        print(f"job: skipped: {EVAL_SET} not found (the job part needs ../shared/data for its held-out prompts)")
        return None
    import pandas as pd

    src, source = job_input(tmp / "input", o.heldout)
    print(f"job: {len(source)} rows ({sum(v == 'demo' for v in source.values())} demo, "
          f"{sum(v == 'alpaca_eval' for v in source.values())} held-out AlpacaEval), draft cap {o.max_tokens}, "
          f"answer cap {o.refine_tokens}; {os.cpu_count()} cores, load {load()}", flush=True)
    runs, frames = {}, {}
    for drafts in ("full", "as_needed"):
        runs[drafts] = run_job(src, tmp / f"out-{drafts}", drafts, o)
        frames[drafts] = pd.read_parquet(tmp / f"out-{drafts}" / "aligned.parquet").set_index("id")
    full, pre = frames["full"], frames["as_needed"]
    ids = sorted(set(full.index) | set(pre.index))
    same = [i for i in ids if i in full.index and i in pre.index
            and full.at[i, "aligned"] == pre.at[i, "aligned"]
            and list(full.at[i, "aligned_turns"]) == list(pre.at[i, "aligned_turns"])]
    for i in ids:
        if i not in same:
            print(f"  !! row {i}: the aligned answers differ (or the row is missing from one run)")
    starts = sum(bool(full.at[i, "draft"].startswith(pre.at[i, "draft"])) for i in same)
    print(f"  prefix drafts that are the start of the full draft (text): {starts}/{len(same)}; "
          f"rows marked draft_prefix: {int(pre['draft_prefix'].sum())}, rows with no draft (r = 0): "
          f"{int((pre['draft_tokens'] == 0).sum())}")
    by_source = {}
    for name, f in (("full", full), ("prefix", pre)):
        src_of = f.index.map(source)
        by_source[name] = {s: f.loc[src_of == s, "draft_tokens"].mean() for s in sorted(set(src_of))}
    return {"runs": runs, "n": len(ids), "same": len(same), "by_source": by_source,
            "tokens": {"full": full["draft_tokens"].mean(), "prefix": pre["draft_tokens"].mean()}}


# ---- the Serve graph ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_config() -> tuple[dict, dict, dict]:
    """conf/serve.yaml's args + a full-draft copy of its default base and a route with it; the deployment options
    by name; its http_options."""
    import yaml

    cfg = yaml.safe_load((ROOT / "conf/serve.yaml").read_text())
    app = cfg["applications"][0]
    args = copy.deepcopy(app["args"])
    route = args["models"][PREFIX]
    base = route["base"]
    args["bases"][f"{base}-full"] = dict(copy.deepcopy(args["bases"][base]), drafts="full")
    args["models"][FULL] = {"base": f"{base}-full", "aligner": route["aligner"],
                            "description": "the same route, the base drafting in full"}
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments", [])}
    options[f"base-{base}-full"] = copy.deepcopy(options.get(f"base-{base}", {}))
    return args, options, cfg.get("http_options", {})


def check_shared_server(args: dict) -> None:
    """The two bases and the aligner of the two routes must map to one LLM server (one engine)."""
    from serve_app.app import _Servers
    from serve_app.config import ENGINE_KEYS, validate_args

    cfg = validate_args(args, "(bench args)")
    keys = set()
    for name in (PREFIX, FULL):
        r = cfg.models[name]
        for sec in (cfg.bases[r.base], cfg.aligners[r.aligner]):
            keys.add(json.dumps(sec.model_dump(include=ENGINE_KEYS), sort_keys=True, default=str))
    assert len(keys) == 1, f"the two routes would not share one LLM server: {len(keys)} engine settings"
    assert _Servers  # the dedup key above is _Servers.get's
    print(f"serve: both routes' base and aligner share one LLM server (one engine setting); bases "
          f"{cfg.models[PREFIX].base} (drafts {cfg.bases[cfg.models[PREFIX].base].drafts}) and "
          f"{cfg.models[FULL].base} (drafts {cfg.bases[cfg.models[FULL].base].drafts})", flush=True)


def start_serve(args: dict, options: dict, http: dict) -> tuple[str, float]:
    import ray
    from ray import serve

    from serve_app.app import build_graph
    from serve_app.config import validate_args

    t = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port,
                              "request_timeout_s": http.get("request_timeout_s", 180)})
    serve.run(build_graph(validate_args(args, "(bench args)"), options), name="diffpo", route_prefix="/",
              blocking=False)
    deadline = time.time() + 900
    while True:
        st = serve.status().applications.get("diffpo")
        if st is not None and st.status == "RUNNING":
            break
        if (st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY")) or time.time() > deadline:
            sys.exit(f"the graph did not start: {st}")
        time.sleep(2)
    return f"http://127.0.0.1:{port}", time.perf_counter() - t


def stream_one(client, route: str, prompt: str, max_tokens: int) -> dict:
    t0, first, pieces, extra = time.perf_counter(), None, [], {}
    for chunk in client.chat.completions.create(model=route, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, stream=True):
        for choice in chunk.choices or []:
            if choice.delta and choice.delta.content:
                first = first or time.perf_counter()
                pieces.append(choice.delta.content)
        extra = (chunk.model_extra or {}).get("diffpo") or extra
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "total": end - t0, "text": "".join(pieces), "chunks": len(pieces),
            "draft": extra.get("draft"), "draft_prefix": extra.get("draft_prefix"),
            "draft_ms": extra.get("draft_ms"), "refine_ms": extra.get("refine_ms"),
            "source": extra.get("draft_source")}


def bench_serve(o: Options) -> dict:
    from openai import OpenAI

    from pipeline.models import load_model_text
    from pipeline.prompts import answer_ids

    args, options, http = serve_config()
    check_shared_server(args)
    demo = [json.loads(x)["prompt"] for x in open(DEMO)]
    prompts = [demo[i % len(demo)] + ("" if i < len(demo) else f" ({i // len(demo)})") for i in range(o.requests)]
    url, t_up = start_serve(args, options, http)
    print(f"serve: graph RUNNING in {t_up:.1f}s (not counted; load {load()})", flush=True)
    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=900, max_retries=0)
    for route in (PREFIX, FULL):  # warm-up: first calls pay lazy initialisation
        stream_one(client, route, "Hello!", 8)
    tok = load_model_text("default").tokenizer
    res = {PREFIX: [], FULL: []}
    for i, p in enumerate(prompts):
        order = (PREFIX, FULL) if i % 2 == 0 else (FULL, PREFIX)
        for route in order:
            s = stream_one(client, route, p, o.serve_max_tokens)
            s["draft_tokens"] = len(answer_ids(tok, s["draft"] or "")) if s["draft"] else 0
            res[route].append(s)
        a, b = res[PREFIX][-1], res[FULL][-1]
        print(f"  {i}: prefix ttft {a['ttft']:5.2f}s full {a['total']:5.2f}s (draft {a['draft_tokens']:3d} tok, "
              f"{a['draft_ms'] / 1000:.2f}s) | full-draft ttft {b['ttft']:5.2f}s full {b['total']:5.2f}s (draft "
              f"{b['draft_tokens']:3d} tok, {b['draft_ms'] / 1000:.2f}s) | same answer "
              f"{a['text'] == b['text']}  (load {load()})", flush=True)
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    same = sum(a["text"] == b["text"] for a, b in zip(res[PREFIX], res[FULL]))
    for i, (a, b) in enumerate(zip(res[PREFIX], res[FULL])):
        if a["text"] != b["text"]:
            print(f"  !! prompt {i}: the answers differ between the routes:\n     prefix: {a['text'][:200]!r}\n"
                  f"     full:   {b['text'][:200]!r}")
    return {"res": res, "same": same, "n": len(prompts), "startup_s": t_up}


# ---- main -----------------------------------------------------------------------------------------------------
def main():
    o = load_config(Options, None, sys.argv[1:])
    t_all = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_draft_prefix_"))
    job = bench_job(o, tmp) if o.part in ("all", "job") else None
    serve_res = bench_serve(o) if o.part in ("all", "serve") else None
    total = time.perf_counter() - t_all

    print(f"\n== results ({total / 60:.1f} min in all) ==")
    if job:
        f, p = job["runs"]["full"], job["runs"]["as_needed"]
        print(f"job: {job['n']} rows, draft cap {o.max_tokens}, answer cap {o.refine_tokens}")
        print(f"{'':<52}{'full':>12}{'as_needed':>12}")
        print(f"{'base tokens drafted per row (mean draft_tokens)':<52}{job['tokens']['full']:>12.1f}"
              f"{job['tokens']['prefix']:>12.1f}")
        for s in job["by_source"]["full"]:
            print(f"{'  of which ' + s:<52}{job['by_source']['full'][s]:>12.1f}{job['by_source']['prefix'][s]:>12.1f}")
        print(f"{'job wall_s (summary: Ray + engine start + run)':<52}{f['wall_s']:>12.1f}{p['wall_s']:>12.1f}")
        print(f"{'rows/s, start-up included (summary rows_per_s)':<52}{f['rows_per_s']:>12.3f}{p['rows_per_s']:>12.3f}")
        print(f"{'first -> last part written (s)':<52}{f['steady_s']:>12.1f}{p['steady_s']:>12.1f}")
        print(f"{'rows/s, start-up excluded (rows after the 1st part)':<52}{f['steady_rows_per_s']:>12.3f}"
              f"{p['steady_rows_per_s']:>12.3f}")
        print(f"figure: base_tokens_per_row_full = {job['tokens']['full']:.1f}")
        print(f"figure: base_tokens_per_row_prefix = {job['tokens']['prefix']:.1f}")
        print(f"figure: base_tokens_ratio = {job['tokens']['full'] / max(job['tokens']['prefix'], 1e-9):.1f}")
        print(f"figure: job_rows_per_s_full = {f['steady_rows_per_s']:.3f}")
        print(f"figure: job_rows_per_s_prefix = {p['steady_rows_per_s']:.3f}")
        print(f"figure: job_rows_per_s_ratio = {p['steady_rows_per_s'] / f['steady_rows_per_s']:.2f}")
        print(f"figure: job_rows_per_s_with_startup_full = {f['rows_per_s']:.3f}")
        print(f"figure: job_rows_per_s_with_startup_prefix = {p['rows_per_s']:.3f}")
        print(f"figure: job_rows_per_s_with_startup_ratio = {p['rows_per_s'] / f['rows_per_s']:.2f}")
        print(f"figure: job_identical_answers = {job['same']}/{job['n']}")
    if serve_res:
        r = serve_res["res"]
        print(f"serve: {serve_res['n']} streamed requests per route, max_tokens {o.serve_max_tokens}, graph start "
              f"{serve_res['startup_s']:.0f}s (not counted)")
        print(f"{'':<40}{'prefix':>12}{'full':>12}")
        stats = {}
        for name, route in (("prefix", PREFIX), ("full", FULL)):
            xs = r[route]
            stats[name] = (p50([x["ttft"] for x in xs]), p50([x["total"] for x in xs]),
                           statistics.mean(x["draft_tokens"] for x in xs), p50([x["draft_ms"] / 1000 for x in xs]))
        for k, label in enumerate(("p50 time to first text (s)", "p50 time to the full answer (s)",
                                   "mean base tokens per request", "p50 draft_ms (s)")):
            print(f"{label:<40}{stats['prefix'][k]:>12.2f}{stats['full'][k]:>12.2f}")
        for name in ("prefix", "full"):
            print(f"figure: ttft_over_total_{name} = {stats[name][0] / stats[name][1]:.2f}")
        for name in ("prefix", "full"):
            print(f"figure: p50_s_{name} = {stats[name][1]:.2f}")
        print(f"figure: serve_identical_answers = {serve_res['same']}/{serve_res['n']}")
    print(f"figure: bench_draft_prefix_runtime_min = {total / 60:.1f}")
    if o.keep:
        print(f"kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = (not job or job["same"] == job["n"]) and (not serve_res or serve_res["same"] == serve_res["n"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
