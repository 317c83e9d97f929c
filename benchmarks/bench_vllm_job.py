"""The align_dataset job on vLLM (Ray Data LLM) vs a plain in-process loop over `vllm.LLM.generate` (goal >= 0.85x).

    .venv/bin/python benchmarks/bench_vllm_job.py [--rows 16] [--max-new-tokens 96] [--batch 16] [--quick]

Rows: held-out AlpacaEval instructions with their real Llama-3-8B-Instruct drafts (../shared/data; without it,
the bundled demo prompts with drafts sampled from the default model), written as {id, prompt, draft} JSONL into
a temp folder, so only the aligner stage runs.

* job:  `.venv/bin/python -m jobs.align_dataset base.engine=vllm aligner.engine=vllm ...` as a subprocess (local
        Ray, one vLLM engine through `ray.data.llm`). Its summary's `wall_s` / `rows_per_s` count from the job's
        `main()`: Ray start, engine start and the run; the subprocess wall (imports too) is printed as well. Its
        engine phase, start-up excluded, is read from Ray Data LLM's "[vLLM] Elapsed time for batch" lines in the
        job's Ray worker logs: the longest of its batches, which run concurrently on the one engine
        (batch_size 4 x max_concurrent_batches 8 >= the rows).
* loop: this process: `AlignerPrompts.encode` + `continuation()` per row (the job's recipe), one
        `vllm.LLM(...)` with the job's engine arguments, `LLM.generate` over `--batch` rows per call,
        `finish()` + decode. Timed twice: engine start included (comparable with the job's summary), and the
        generate calls alone.

Figures: `vllm_job_vs_plain_loop_rows_per_s` = job engine phase vs loop generate calls (start-up excluded on
both sides); `..._with_startup` = the job's summary rows/s vs the loop with its engine start.
The job's aligned texts are compared with the loop's, row by row. The job runs first, then the loop (its engine
would otherwise share the two cores with the job's).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # the job's default aligner.vllm.cpu_kv_cache_gib
ROOT = Path(__file__).resolve().parents[1]

from benchmarks.bench_vllm_aligner import bench_rows, chunks, load, start_vllm, vllm_generate  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=96, help="aligner.refine.max_new_tokens")
    p.add_argument("--batch", type=int, default=16, help="rows per LLM.generate call in the plain loop")
    p.add_argument("--max-model-len", type=int, default=2048, help="vLLM's context length (both sides)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 rows, 32 tokens")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (input, job output, job log)")
    a = p.parse_args()
    if a.quick:
        a.rows, a.max_new_tokens, a.batch = 4, 32, 4
    return a


def run_job(src: Path, out: Path, a) -> tuple[dict, float, Path]:
    """The job as a user runs it; returns its summary, the subprocess wall and the log file."""
    cmd = [sys.executable, "-m", "jobs.align_dataset", f"input.path={src}", f"output.path={out}",
           "base.engine=vllm", "aligner.engine=vllm", f"aligner.refine.max_new_tokens={a.max_new_tokens}",
           f"aligner.vllm.max_model_len={a.max_model_len}", f"input.limit={a.rows}", "ray.progress_bars=false",
           "show_samples=0"]
    log = out.parent / "job.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print("job: " + " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    if rc != 0 or not (out / "summary.json").exists():
        print(f"!! the job failed (exit {rc}); last lines of {log}:")
        print("".join(open(log).readlines()[-60:]))
        sys.exit(1)
    return json.loads((out / "summary.json").read_text()), wall, log


def job_engine_batches(log: Path) -> list[tuple[int, float]]:
    """(rows, seconds) of every vLLM batch the job ran: Ray Data LLM's own "[vLLM] Elapsed time for batch"
    lines, in the job's Ray session logs (the job log names the session folder)."""
    m = re.search(r"Full logs are in (\S+)/ray-data", log.read_text())
    if not m:
        return []
    found = []
    for f in sorted(Path(m.group(1)).glob("worker-*")):
        found += [(int(k), float(s)) for k, s in
                  re.findall(r"\[vLLM\] Elapsed time for batch \S+ with size (\d+): ([\d.]+)", f.read_text(errors="replace"))]
    return found


def plain_loop(rows: list[dict], a):
    """The same rows through one in-process vLLM engine; (texts by id, engine start s, generate s)."""
    from pipeline.decoding.continuation import AlignerPrompts, RefineRequest, continuation, finish
    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.models import load_model_text, resolve_model_path

    text = load_model_text("default")
    settings = RefineSettings(max_new_tokens=a.max_new_tokens)  # the job's aligner.refine with the cap overridden
    prompts = AlignerPrompts(text, settings, context_window=a.max_model_len)
    items = [prompts.encode(RefineRequest([{"role": "user", "content": r["prompt"]}], r["draft"], key=r["id"]))
             for r in rows]
    llm, t_start = start_vllm(resolve_model_path("default")[0], a.max_model_len)
    t = time.perf_counter()
    texts = {}
    for part_rows, part in zip(chunks(rows, a.batch), chunks(items, a.batch)):
        gen = vllm_generate(llm, [continuation(it, settings) for it in part], text.stop_ids)
        for r, it, g in zip(part_rows, part, gen):
            res = finish(it, g, text.stop_ids, settings)
            texts[r["id"]] = text.tokenizer.decode(res.token_ids, skip_special_tokens=True).strip()
    t_gen = time.perf_counter() - t
    del llm
    return texts, t_start, t_gen


def main():
    a = parse_args()
    rows, source = bench_rows(a.rows)
    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_job_"))
    src = tmp / "rows.jsonl"
    src.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"], "draft": r["draft"]}) + "\n"
                           for r in rows))
    print(f"rows: {source}; max_new_tokens {a.max_new_tokens}; {os.cpu_count()} cores, load average {load()}")

    summary, job_proc_s, log = run_job(src, tmp / "out", a)
    import pandas as pd

    out = pd.read_parquet(tmp / "out" / "aligned.parquet")
    job_texts = dict(zip(out["id"].astype(str), out["aligned"]))
    batches = job_engine_batches(log)
    print(f"  job done: {summary['rows_out']} rows out, {summary['error_rows']} error rows, wall_s "
          f"{summary['wall_s']} (subprocess {job_proc_s:.1f}s), vLLM batches (rows, s) {batches}, "
          f"load average {load()}", flush=True)

    texts, t_start, t_gen = plain_loop(rows, a)
    t_loop = t_start + t_gen
    print(f"  loop done: engine start {t_start:.1f}s, generate {t_gen:.1f}s, load average {load()}", flush=True)

    n = len(rows)
    same = sum(job_texts.get(r["id"]) == texts[r["id"]] for r in rows)
    for r in rows:
        if job_texts.get(r["id"]) != texts[r["id"]]:
            print(f"  !! row {r['id']}: job and loop texts differ")
    loop_rps, loop_gen_rps = n / t_loop, n / t_gen
    print(f"\n{n} rows, refine only (drafts given), default aligner fp32 on vLLM CPU, max_new_tokens {a.max_new_tokens}")
    print(f"{'side':<58}{'seconds':>9}{'rows/s':>9}")
    print(f"{'job: summary wall_s (Ray + engine start + run)':<58}{summary['wall_s']:>9.1f}{summary['rows_per_s']:>9.3f}")
    print(f"{'job: subprocess (+ imports, config, shutdown)':<58}{job_proc_s:>9.1f}{n / job_proc_s:>9.3f}")
    engine_s = max((s for _, s in batches), default=None)
    if engine_s and sum(k for k, _ in batches) == n:
        label = f"job: engine phase (longest of its {len(batches)} concurrent vLLM batches)"
        print(f"{label:<58}{engine_s:>9.1f}{n / engine_s:>9.3f}")
    else:
        print(f"job: engine phase not found in the Ray worker logs (batches {batches})")
        engine_s = None
    print(f"{'plain loop: engine start + generate':<58}{t_loop:>9.1f}{loop_rps:>9.3f}")
    print(f"{'plain loop: generate only (engine start %.1f s not counted)' % t_start:<58}{t_gen:>9.1f}{loop_gen_rps:>9.3f}")
    print(f"job texts equal to the loop's: {same}/{n}")
    if engine_s:  # start-up excluded on both sides, as far as the job lets us
        print(f"figure: vllm_job_vs_plain_loop_rows_per_s = {t_gen / engine_s:.2f}")
    # start-up included on both sides: the job's own summary vs the loop with its engine start
    print(f"figure: vllm_job_vs_plain_loop_rows_per_s_with_startup = {summary['rows_per_s'] / loop_rps:.2f}")
    print(f"figure: vllm_job_identical_texts = {same}/{n}")
    if a.keep:
        print(f"kept: {tmp} (job log {log})")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
