"""One vLLM engine pool per model, before and after: engines started, their start-up and the job's wall, side by
side in one run.

    .venv/bin/python benchmarks/bench_engines.py [before=0b8082e] [questions=80] [draft_tokens=64]
        [answer_tokens=64] [demo=true] [tmp=/path/to/scratch] [keep=false]

Two workloads, each run by `python -m jobs.align_dataset` at two versions of this repository, one after the other:

* mt_bench: the first `questions` MT-bench questions (../shared/data/mt_bench/question.jsonl: two turns each, no
  drafts), base and aligner the embedded default model on vLLM (the job's defaults), drafts capped at
  `draft_tokens` (base.sampling.max_new_tokens) and answers at `answer_tokens` (aligner.refine.max_new_tokens).
* demo: the README's main command as it is (the bundled demo prompts, every default), into a temp folder.

Versions: `before` is a commit checked out into a temporary git worktree (default 0b8082e, the last one where each
vLLM stage and each turn had its own engine pool: Ray Data LLM's vLLMEngineProcessorConfig per stage); `after` is
this working tree. Both run with this venv's Python, their own tree first on PYTHONPATH (so the job's Ray workers
import the same version) and their own Ray temp folder.

Per run: engines started = the vLLM engine cores that initialized (vLLM's "init engine (profile, create kv cache,
warmup model) took" lines in the run's Ray session logs); engines ready = the last of those lines, in seconds from
the job's start (vLLM stamps its lines to the second); wall = the subprocess's start to its exit; the answers
(`aligned_turns` by id) compared between the versions (greedy on both: expected identical).

Figures: mt_bench_engines_before / _after, mt_bench_engines_ready_s_before / _after, mt_bench_wall_ratio_after_vs_before,
demo_engines_before / _after, demo_wall_ratio_after_vs_before.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pydantic import Field  # noqa: E402

from benchmarks.bench_scale import fail, fmt, ray_tmpdir, run_sampled  # noqa: E402
from jobs.common.config import Section, load_config  # noqa: E402

MT_BENCH = ROOT.parent / "shared" / "data" / "mt_bench" / "question.jsonl"
READY = re.compile(r"INFO (\d\d-\d\d \d\d:\d\d:\d\d) \[core\.py:\d+\] init engine \(profile, create kv cache, "
                   r"warmup model\) took")


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    before: str = Field("0b8082e", description="the commit to compare with (checked out into a temp worktree)")
    questions: int = Field(80, ge=1, description="MT-bench questions (input.limit)")
    draft_tokens: int = Field(64, ge=1, description="the MT-bench job's base.sampling.max_new_tokens")
    answer_tokens: int = Field(64, ge=1, description="the MT-bench job's aligner.refine.max_new_tokens")
    fallback_args: list[str] = Field(["base.num_cpus=0.25", "aligner.num_cpus=0.25"],
                                     description="overrides for a version whose preflight refuses a workload on this "
                                                 "machine's CPUs (the run is then repeated with them)")
    mt_bench: bool = Field(True, description="run the MT-bench workload")
    demo: bool = Field(True, description="run the README's main command (demo prompts, defaults)")
    tmp: Optional[str] = Field(None, description="folder for worktree, outputs and logs (null = a new temp folder)")
    keep: bool = Field(False, description="keep the worktree's outputs and logs")
    timeout_s: float = Field(3600, gt=0, description="per job; killed past it")


def engines_ready(ray_dir: Path, started: float) -> tuple[int, Optional[float]]:
    """(engine cores that initialized, seconds from `started` to the last one) from the run's Ray session logs."""
    stamps = []
    for f in [*ray_dir.glob("session_2*/logs/*"), *ray_dir.glob("ray/session_2*/logs/*")]:
        if f.is_file():
            stamps += READY.findall(f.read_text(errors="replace"))
    if not stamps:
        return 0, None
    year = dt.datetime.fromtimestamp(started).year
    last = max(dt.datetime.strptime(f"{year}-{s}", "%Y-%m-%d %H:%M:%S").timestamp() for s in stamps)
    return len(stamps), last - started


def answers(out: Path) -> dict[str, list]:
    import pyarrow.dataset as pds

    t = pds.dataset(str(out / "rows"), format="parquet").to_table(columns=["id", "aligned_turns"])
    return dict(zip(t.column("id").to_pylist(), t.column("aligned_turns").to_pylist()))


def run(tree: Path, argv: list[str], out: Path, work: Path, o: Options) -> dict:
    """The job at `tree`; repeated with `fallback_args` if its preflight refuses the workload's CPUs."""
    refused = None
    for extra in ([], o.fallback_args):
        ray_dir = ray_tmpdir(work)
        started = time.time()
        r = run_sampled([sys.executable, "-m", "jobs.align_dataset", f"output.path={out}", "ray.progress_bars=false",
                         "show_samples=0", *argv, *extra], out.parent / f"{out.name}.log", ray_dir, 0.5, o.timeout_s,
                        cwd=tree)
        why = [s.strip() for _, s in r["lines"] if "the stages ask for" in s]
        if r["rc"] == 0 or not why or extra:
            break
        refused = why[0]
        print(f"  (refused by the job's preflight: {refused}; again with {' '.join(o.fallback_args)})", flush=True)
    if r["rc"] != 0:
        fail(f"the job in {tree}", r)
    r["refused"], r["extra"] = refused, extra
    r["engines"], r["ready_s"] = engines_ready(ray_dir, started)
    r["answers"] = answers(out)
    r["pools"] = [s for _, s in r["lines"] if s.startswith("[vllm] ") and " engine(s) of " in s]
    return r


def main():
    o = load_config(Options, None, sys.argv[1:])
    if o.mt_bench and not MT_BENCH.exists():
        raise SystemExit(f"bench_engines: {MT_BENCH} is missing (the shared data folder): nothing to measure")
    work = Path(tempfile.mkdtemp(prefix="be_", dir=o.tmp))
    before = work / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), o.before], check=True,
                   capture_output=True)
    commit = subprocess.run(["git", "-C", str(before), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()[:100]
    print(f"bench_engines: before = {commit}; after = this working tree; {o.questions} MT-bench questions, drafts "
          f"<= {o.draft_tokens} and answers <= {o.answer_tokens} tokens; load {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs; work folder {work}", flush=True)
    workloads = {}
    if o.mt_bench:
        workloads["mt_bench"] = [f"input.path={MT_BENCH}", f"input.limit={o.questions}",
                                 f"base.sampling.max_new_tokens={o.draft_tokens}",
                                 f"aligner.refine.max_new_tokens={o.answer_tokens}"]
    if o.demo:
        workloads["demo"] = []
    res: dict = {}
    try:
        for name, argv in workloads.items():
            for side, tree in (("before", before), ("after", ROOT)):
                r = res[name, side] = run(tree, argv, work / f"{name}-{side}", work, o)
                print(f"  {name:8s} {side:6s}: {r['engines']} engine(s) started, last ready at {fmt(r['ready_s'])} s, "
                      f"wall {r['wall_s']:.1f} s, {len(r['answers'])} rows; pools: "
                      + " | ".join(p[len('[vllm] '):].split(", bundles")[0] for p in r["pools"])
                      + (f"; with {' '.join(r['extra'])}" if r["extra"] else ""), flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], capture_output=True)
        if not o.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    for name in workloads:
        b, a = res[name, "before"], res[name, "after"]
        same = sum(a["answers"].get(k) == v for k, v in b["answers"].items())
        print(f"{name}: answers identical before vs after: {same}/{len(b['answers'])}")
        for side, r in (("before", b), ("after", a)):
            if r["refused"]:
                print(f"{name} {side}: the defaults were refused ({r['refused']}); measured with "
                      f"{' '.join(r['extra'])}")
        print(f"figure: {name}_engines_before = {b['engines']}")
        print(f"figure: {name}_engines_after = {a['engines']}")
        if name == "mt_bench":
            print(f"figure: {name}_engines_ready_s_before = {fmt(b['ready_s'])}")
            print(f"figure: {name}_engines_ready_s_after = {fmt(a['ready_s'])}")
        print(f"figure: {name}_wall_s_before = {b['wall_s']:.1f}")
        print(f"figure: {name}_wall_s_after = {a['wall_s']:.1f}")
        print(f"figure: {name}_wall_ratio_after_vs_before = {a['wall_s'] / b['wall_s']:.2f}")


if __name__ == "__main__":
    main()
