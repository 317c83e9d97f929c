"""How `jobs.align_dataset` scales with the number of rows: driver memory, rows/s, and the plain Ray Data pipeline
doing the same I/O on the same rows, side by side in one run.

    .venv/bin/python benchmarks/bench_scale.py [sizes=[10000,100000,1000000]] [rows_per_block=5000] [files=4]
        [batch_size=256] [num_cpus=2] [plain=largest|all|none] [plumbing_only=false] [tmp=/path/to/scratch]
        [keep=false]

For each N in `sizes`: N synthetic rows that carry drafts (an id, a short prompt, a long draft: ~0.6 KB of JSON
each, spread over `files` JSONL files in a temp folder; the prompt is all the aligner runs on, so it is kept short), then `python -m jobs.align_dataset` as a subprocess (so the process
sampled is the job's driver alone, not Ray's workers) with a tiny random llama aligner on the `ar` engine doing the
least model work there is (`aligner.refine.max_new_tokens=1`, `aligner.refine.reserve_tokens=0`), a large
`aligner.batch_size`, `output.single_file=false`, `show_samples=0`, `ray.progress_bars=false`,
`output.rows_per_block`, `ray.num_cpus`. The driver's RSS (psutil, that pid only) is sampled every 0.25 s for its
peak; wall = the subprocess's start to its exit (Python start, Ray start, model load included); rows/s = N / wall.
The job's stdout is timestamped line by line, which splits the wall into phases: imports (to the resolved config),
Ray start + index pass (to the "input file(s)" line), the stream (first and last block file written, from the
files' modification times), finish (to the summary) and exit (Ray shutdown).

The plain pipeline (`plain=largest`: for the largest N only; `all`; `none`): in its own subprocess (this script
with `--plain`), `ray.data.read_json(folder).map_batches(lambda b: b, batch_format="pyarrow")
.write_parquet(out)` on a local Ray with the same `num_cpus`, timed the same way (its own Python start, Ray start
and shutdown included).

Each subprocess gets its own Ray temp folder (RAY_TMPDIR), so its Ray session shares nothing with any other Ray on
the machine. Inputs and outputs are removed after each N (`keep=true` keeps them).

The job's plumbing alone: for the same sizes, the job again with `aligner.engine=none` (no model runs: the drafts
are the answers), timed the same way (`plumbing_only=true`: only these and the plain pipeline run).

Figures: driver_peak_rss_ratio_largest_vs_smallest (goal <= 1.2), rows_per_s_ratio_largest_vs_middle (goal >= 0.9;
"middle" = the size just below the largest), job_vs_plain_ray_data_rows_per_s (the job with aligner.engine=none vs
the plain pipeline, largest N; goal >= 0.8), job_with_tiny_model_vs_plain_ray_data_rows_per_s, and the raw numbers
per N.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    sizes: list[int] = Field([10000, 100000, 1000000], description="row counts, each a run of the job")
    rows_per_block: int = Field(5000, ge=1, description="the job's output.rows_per_block")
    files: int = Field(4, ge=1, description="JSONL files the rows are spread over (fewer for fewer rows)")
    prompt_words: int = Field(6, ge=1, description="words per prompt (the aligner's whole input: prefill cost)")
    draft_words: int = Field(100, ge=1, description="words per draft (tokenized, not run: reserve_tokens=0)")
    batch_size: int = Field(256, ge=1, description="aligner.batch_size (rows per model call)")
    num_cpus: int = Field(2, ge=1, description="ray.num_cpus of the job and of the plain pipeline")
    plain: Literal["largest", "all", "none"] = Field("largest", description="the sizes the plain Ray Data "
                                                                            "pipeline and the job without a model "
                                                                            "(aligner.engine=none) run on")
    plumbing_only: bool = Field(False, description="skip the tiny-model runs: only the job without a model and the "
                                                   "plain pipeline (for the sizes `plain` names) and their figures")
    job_args: list[str] = Field(default_factory=list, description="more key=value overrides for the job")
    tmp: Optional[str] = Field(None, description="folder for inputs, outputs and logs (null = a new system temp "
                                                 "folder); removed afterwards unless keep")
    keep: bool = Field(False, description="keep inputs, outputs and logs")
    sample_s: float = Field(0.25, gt=0, description="RSS sampling period, seconds")
    timeout_s: float = Field(4 * 3600, gt=0, description="per subprocess; killed past it")


# ---- rows ------------------------------------------------------------------------------------------------------
WORDS = ("the of and to in is that for it as with was on be by this are from or an at which have not but all "
         "can more one were their there has been when will would if what about so they out up them into some "
         "than only other time could these two may first then do any like my now over such our man me even most "
         "made after also did many before must through back years where much your way well down should because "
         "each just those people how too little state good very make world still own see men work long get here "
         "between both life being under never day same another know while last might us great old year off come "
         "since against go came right used take three").split()


def _texts(rng: random.Random, n: int, words: int) -> list[str]:
    """`n` random word strings of about `words` words, JSON-encoded (quotes included)."""
    return [json.dumps(" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + ".") for _ in range(n)]


def write_rows(folder: Path, n: int, files: int, prompt_words: int, draft_words: int) -> tuple[int, int]:
    """`n` rows with drafts over min(files, n) JSONL files in `folder`; (files written, bytes written)."""
    rng = random.Random(0)
    prompts, drafts = _texts(rng, 1009, prompt_words), _texts(rng, 997, draft_words)
    folder.mkdir(parents=True)
    files = max(1, min(files, n))
    per, size = -(-n // files), 0
    for f in range(files):
        lines = [f'{{"id": "r{i}", "prompt": {prompts[i % 1009][:-1]} (question {i})", '
                 f'"draft": {drafts[i % 997]}}}\n' for i in range(f * per, min(n, (f + 1) * per))]
        data = "".join(lines).encode()
        (folder / f"part-{f:04d}.jsonl").write_bytes(data)
        size += len(data)
    return files, size


# ---- a subprocess, timed and sampled ------------------------------------------------------------------------------
def ray_tmpdir(base: Path) -> Path:
    """A Ray temp folder for one subprocess: under `base` if its path is short enough for Ray's Unix sockets
    (~107 characters in all), else a new one in /tmp."""
    if len(str(base)) <= 40:
        d = base / f"ray{len(list(base.glob('ray*')))}"
        d.mkdir()
        return d
    return Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))


def run_sampled(cmd: list[str], log: Path, ray_dir: Path, sample_s: float, timeout_s: float,
                cwd: Path = ROOT) -> dict:
    """Run `cmd` in `cwd` (the repository root, or another checkout of it: first on PYTHONPATH, so that Ray's
    workers import the same code); its peak RSS (its own pid, sampled), wall, exit status and stdout lines with
    their times since the start (also written to `log`)."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env |= {"RAY_TMPDIR": str(ray_dir), "PYTHONPATH": str(cwd) + os.pathsep + env.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines: list[tuple[float, str]] = []

    def read():
        with open(log, "w") as f:
            for raw in proc.stdout:
                s = raw.decode(errors="replace")
                lines.append((time.perf_counter() - t0, s.rstrip("\n")))
                f.write(s)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    ps, peak, samples, timed_out = psutil.Process(proc.pid), 0, [], False
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.Error:
            break
        peak = max(peak, rss)
        samples.append((time.perf_counter() - t0, rss))
        if time.perf_counter() - t0 > timeout_s:
            timed_out = True
            os.killpg(proc.pid, 9)  # this subprocess's own process group (start_new_session)
            break
        time.sleep(sample_s)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    reader.join(timeout=30)
    return {"rc": rc, "wall_s": wall, "peak_rss_mb": peak / 2**20, "samples": samples, "lines": lines,
            "timed_out": timed_out, "log": log}


def first_line(lines: list[tuple[float, str]], needle: str) -> Optional[float]:
    return next((t for t, s in lines if needle in s), None)


def fail(what: str, r: dict) -> None:
    tail = "\n".join(s for _, s in r["lines"][-60:])
    raise SystemExit(f"!! {what} failed (rc {r['rc']}{', timed out' if r['timed_out'] else ''}); last lines of "
                     f"{r['log']}:\n{tail}")


# ---- the job and the plain pipeline --------------------------------------------------------------------------
def run_job(src: Path, out: Path, model: Optional[Path], o: Options, work: Path) -> dict:
    """The job on the tiny model (`model`), or with no model at all (None: aligner.engine=none, its plumbing)."""
    aligner = (["aligner.engine=ar", f"aligner.model={model}", "aligner.device=cpu", "aligner.refine.max_new_tokens=1",
                "aligner.refine.reserve_tokens=0", f"aligner.batch_size={o.batch_size}"] if model is not None
               else ["aligner.engine=none"])
    argv = [f"input.path={src}", f"output.path={out}", *aligner, "output.single_file=false", "show_samples=0",
            "ray.progress_bars=false", f"output.rows_per_block={o.rows_per_block}", f"ray.num_cpus={o.num_cpus}",
            *o.job_args]
    started = time.time()
    r = run_sampled([sys.executable, "-m", "jobs.align_dataset", *argv], out.parent / f"job-{out.name}.log",
                    ray_tmpdir(work), o.sample_s, o.timeout_s)
    if r["rc"] != 0:
        fail("the job", r)
    rows = sorted((out / "rows").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    summary = json.loads((out / "summary.json").read_text())
    t_index = first_line(r["lines"], "input file(s)")
    r |= {"files": len(rows), "summary": summary,
          "t_config": first_line(r["lines"], "resolved config"), "t_index": t_index,
          "t_first": rows[0].stat().st_mtime - started if rows else None,
          "t_last": rows[-1].stat().st_mtime - started if rows else None,
          "t_summary": first_line(r["lines"], "summary:"),
          "rss_after_index_mb": max([x for t, x in r["samples"] if t_index is None or t <= t_index] or [0]) / 2**20}
    return r


def run_plain(src: Path, out: Path, o: Options, work: Path) -> dict:
    r = run_sampled([sys.executable, str(Path(__file__).resolve()), "--plain", str(src), str(out), str(o.num_cpus)],
                    out.parent / f"plain-{out.name}.log", ray_tmpdir(work), o.sample_s, o.timeout_s)
    if r["rc"] != 0:
        fail("the plain Ray Data pipeline", r)
    r["files"] = len(list(out.glob("*.parquet")))
    done = [s for _, s in r["lines"] if s.startswith("plain: written in ")]
    r["pipeline_s"] = float(done[-1].split()[3]) if done else None
    return r


def plain_main(src: str, out: str, num_cpus: int) -> None:
    """The plain Ray Data pipeline (this script's `--plain` subprocess)."""
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    t = time.perf_counter()
    ray.data.read_json(src).map_batches(lambda b: b, batch_format="pyarrow").write_parquet(out)
    print(f"plain: written in {time.perf_counter() - t:.2f} s", flush=True)
    ray.shutdown()


# ---- main ------------------------------------------------------------------------------------------------------
def fmt(x: Optional[float], p: int = 1) -> str:
    return "-" if x is None else f"{x:.{p}f}"


def main():
    o = load_config(Options, None, sys.argv[1:])
    sizes = sorted(set(o.sizes))
    if not sizes or min(sizes) < 1:
        raise ConfigError([f"sizes: give at least one row count >= 1, got {o.sizes}"])
    plain_for = {"largest": sizes[-1:], "all": sizes, "none": []}[o.plain]
    if o.tmp:
        Path(o.tmp).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=o.tmp))
    else:
        work = Path(tempfile.mkdtemp(prefix="bs_"))
    print(f"bench_scale: sizes {sizes}, rows_per_block {o.rows_per_block}, files {o.files}, aligner.batch_size "
          f"{o.batch_size}, ray.num_cpus {o.num_cpus}, plain Ray Data for {plain_for or 'none'}; work folder {work}; "
          f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    t_all = time.perf_counter()
    job, plain, bare = {}, {}, {}
    try:
        from tests.tiny import save_tiny

        model = None if o.plumbing_only else save_tiny("llama", work / "tiny-llama")
        for n in sizes:
            src = work / f"in-{n}"
            t = time.perf_counter()
            nfiles, size = write_rows(src, n, o.files, o.prompt_words, o.draft_words)
            print(f"\n== {n} rows: {nfiles} file(s), {size / 2**20:.1f} MiB ({size / n:.0f} B/row), written in "
                  f"{time.perf_counter() - t:.1f} s; load {os.getloadavg()[0]:.2f}", flush=True)
            if not o.plumbing_only:
                r = job[n] = run_job(src, work / f"out-{n}", model, o, work)
                print(f"  job:   {r['wall_s']:.1f} s, {n / r['wall_s']:.0f} rows/s, driver peak RSS "
                      f"{r['peak_rss_mb']:.0f} MB ({r['rss_after_index_mb']:.0f} MB up to the index), {r['files']} "
                      f"files; phases (s from start): config {fmt(r['t_config'])}, index done {fmt(r['t_index'])}, "
                      f"first block {fmt(r['t_first'])}, last block {fmt(r['t_last'])}, summary "
                      f"{fmt(r['t_summary'])}, exit {r['wall_s']:.1f}; summary rows_in {r['summary']['rows_in']}, "
                      f"rows_out {r['summary']['rows_out']}, error_rows {r['summary']['error_rows']}", flush=True)
                if r["summary"]["rows_out"] != n:
                    print(f"  !! the job aligned {r['summary']['rows_out']} of {n} rows (see {r['log']})", flush=True)
            if n in plain_for:
                b = bare[n] = run_job(src, work / f"bare-{n}", None, o, work)
                print(f"  job, aligner.engine=none: {b['wall_s']:.1f} s, {n / b['wall_s']:.0f} rows/s, driver peak RSS "
                      f"{b['peak_rss_mb']:.0f} MB; index done {fmt(b['t_index'])}, last block {fmt(b['t_last'])}, "
                      f"summary {fmt(b['t_summary'])}", flush=True)
                p = plain[n] = run_plain(src, work / f"plain-{n}", o, work)
                print(f"  plain: {p['wall_s']:.1f} s, {n / p['wall_s']:.0f} rows/s (pipeline alone "
                      f"{fmt(p['pipeline_s'])} s), "
                      f"driver peak RSS {p['peak_rss_mb']:.0f} MB, {p['files']} files", flush=True)
            if not o.keep:
                for d in (src, work / f"out-{n}", work / f"plain-{n}", work / f"bare-{n}"):
                    shutil.rmtree(d, ignore_errors=True)
    finally:
        if not o.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_all

    rate = {n: n / r["wall_s"] for n, r in job.items()}
    print(f"\n{'rows':>9} {'wall s':>8} {'rows/s':>8} {'peak RSS MB':>11} {'files':>6} {'index s':>8} "
          f"{'stream s':>8} {'plain s':>8} {'plain rows/s':>12}")
    for n, r in job.items():
        stream = r["t_last"] - r["t_index"] if r["t_last"] is not None and r["t_index"] is not None else None
        p = plain.get(n)
        print(f"{n:>9} {r['wall_s']:>8.1f} {rate[n]:>8.0f} {r['peak_rss_mb']:>11.0f} {r['files']:>6} "
              f"{fmt(r['t_index']):>8} {fmt(stream):>8} {fmt(p and p['wall_s']):>8} "
              f"{fmt(p and n / p['wall_s'], 0):>12}")
    print(f"(index s: from the job's start to the end of its index pass, Ray start included; stream s: from there to "
          f"the last block file; total benchmark time {total:.0f} s)")
    small, large = sizes[0], sizes[-1]
    middle = sizes[-2] if len(sizes) > 1 else large
    if job:
        print(f"figure: driver_peak_rss_ratio_largest_vs_smallest = "
              f"{job[large]['peak_rss_mb'] / job[small]['peak_rss_mb']:.3f}")
        print(f"figure: rows_per_s_ratio_largest_vs_middle = {rate[large] / rate[middle]:.3f}")
    if large in plain:
        plain_rate = large / plain[large]["wall_s"]
        print(f"figure: job_vs_plain_ray_data_rows_per_s = {large / bare[large]['wall_s'] / plain_rate:.3f}")
        if job:
            print(f"figure: job_with_tiny_model_vs_plain_ray_data_rows_per_s = {rate[large] / plain_rate:.3f}")
    for n in sorted(bare):
        if n != large and n in plain:
            print(f"figure: job_vs_plain_ray_data_rows_per_s_{n} = "
                  f"{plain[n]['wall_s'] / bare[n]['wall_s']:.3f}")
    per_size = {"driver_peak_rss_mb": lambda n: f"{job[n]['peak_rss_mb']:.1f}", "rows_per_s": lambda n: f"{rate[n]:.1f}",
                "wall_s": lambda n: f"{job[n]['wall_s']:.2f}", "output_files": lambda n: f"{job[n]['files']}"}
    for name, value in per_size.items():
        for n in job:
            print(f"figure: {name}_{n} = {value(n)}")
    for n in plain:
        print(f"figure: plain_ray_data_rows_per_s_{n} = {n / plain[n]['wall_s']:.1f}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--plain":
        plain_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        sys.exit(0)
    try:
        main()
    except ConfigError as e:  # a mistake in the options: one message listing every problem, exit status 2
        print(f"[bench_scale] {e}", file=sys.stderr)
        sys.exit(2)
