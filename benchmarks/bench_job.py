"""The Ray Data job vs a plain in-process loop over the same rows and the same aligner (goal >= 0.85x rows/s).

    .venv/bin/python benchmarks/bench_job.py [rows=16] [max_new_tokens=64]

Rows: held-out AlpacaEval instructions with their real Llama-3-8B-Instruct drafts (so only the refine
stage runs). Both sides load the model inside the timed region. The job runs 2 refine actors with one
torch thread each on a local Ray started before the clock; the loop uses one process with 2 threads.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DRAFTS = ROOT.parent / "shared/data/alpaca_eval/drafts_Meta-Llama-3-8B-Instruct.jsonl"


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    rows: int = Field(16, description="held-out rows, through both the loop and the job")
    max_new_tokens: int = Field(64, description="answer cap of the aligner (aligner.refine.max_new_tokens)")


def main():
    options = load_config(Options, None, sys.argv[1:])
    if not DRAFTS.exists():
        print(f"skipped: {DRAFTS} not found (the benchmark needs ../shared/data)")
        return
    n, max_new = options.rows, options.max_new_tokens
    rows = [json.loads(x) for x in open(DRAFTS)]
    rows = [r for r in rows if r["id"] % 4 == 0][:n]
    tmp = Path(tempfile.mkdtemp())
    src = tmp / "rows.jsonl"
    src.write_text("".join(json.dumps({"id": r["id"], "instruction": r["instruction"], "output": r["output"]}) + "\n"
                           for r in rows))

    # plain loop: one process, all cores
    import torch

    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.models import load_model
    from pipeline.decoding.refiner import RefineRequest, Refiner

    torch.set_num_threads(2)
    t = time.perf_counter()
    lm = load_model("default")
    ref = Refiner(lm, RefineSettings(max_new_tokens=max_new), mode="fast")
    reqs = [RefineRequest([{"role": "user", "content": r["instruction"]}], r["output"], str(r["id"])) for r in rows]
    loop_out = []
    for i in range(0, n, 4):
        loop_out += ref.refine(reqs[i:i + 4])
    t_loop = time.perf_counter() - t
    del lm, ref

    import pandas as pd
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}})
    from jobs.align_dataset import main as job

    t = time.perf_counter()
    job([f"input.path={src}", f"output.path={tmp / 'out'}", f"aligner.refine.max_new_tokens={max_new}",
         "aligner.concurrency=2", "aligner.num_cpus=0.5", "aligner.batch_size=4", "output.rows_per_block=4",
         "ray.progress_bars=false", "show_samples=0"])
    t_job = time.perf_counter() - t
    ray.shutdown()
    out = pd.read_parquet(tmp / "out" / "aligned.parquet").set_index("id")
    same = all(out.loc[str(r["id"]), "aligned"] == o.text for r, o in zip(rows, loop_out))
    print(f"{n} rows, max_new_tokens {max_new}: loop {t_loop:.1f}s ({n / t_loop:.3f} rows/s), "
          f"Ray Data job {t_job:.1f}s ({n / t_job:.3f} rows/s); identical outputs: {same}")
    print(f"figure: job_rows_per_s_vs_loop = {t_loop / t_job:.2f}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a mistake in the options: one message listing every problem, exit status 2
        print(f"[bench_job] {e}", file=sys.stderr)
        sys.exit(2)
