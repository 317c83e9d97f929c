"""The Ray Data plumbing the batch jobs share (align_dataset, evaluate, build_states), written once.

Every job streams from storage to storage in blocks (`jobs.common.blocks`, `storage`, `exports`):

    job = blocks.BlockJob(name, out, input_files(path), input_root(path), parser, limit)
    ds, info = job.todo()                                        # workers index and read the blocks not yet written
    ds = map_stage(ds, SomeStage, cfg.stage, ...)                # a callable class per model stage (actor pool)
    ds.write_datasink(blocks.BlockSink(...))                     # workers write each block, atomically
    totals = job.finish(sink.totals, ...)                        # the summary's totals over the whole output
    exports.stream(rows_folder, [writers...])                    # single-file exports (benchmark-sized outputs)

Rows are Arrow tables with an explicit schema (lists and structs, never JSON text). A stage is a
`RowStage`: it sees its batch as a list of dicts, rows with an error pass through untouched, and a row
that raises fails alone (an error row naming the stage and the reason), never its batch or the job; the block
columns a row carries (`blocks.KEY_FIELDS`) pass through every stage as they came.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import pyarrow as pa

from pydantic import Field

from jobs.common.config import REPO, ConfigError, PoolCfg, Section, to_yaml
from pipeline.records import FORMATS

DEMO_PROMPTS = REPO / "pipeline" / "data" / "demo_prompts.jsonl"
INPUT_EXTS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
HEADROOM_CPUS = 0.5  # kept free for Ray Data's read/write tasks: actor pools that take every CPU hang silently
WRITE_CPUS = 0.25  # per write task, so writes fit in that headroom


# ---- start ---------------------------------------------------------------------------------------------------
def start_data_job(name: str, cfg, out: str):
    """Record the resolved config next to the outputs (and print it), start or join Ray and set this driver's
    Ray Data context (progress: bars on a terminal, a compact line per stage every ~30 s in a log; order preserved
    so that `limit` picks the same rows on every run). `out`: a local folder or a URI. Returns the context for
    job-specific settings, which must come before the first read."""
    from ray.data import DataContext

    from jobs.common import storage
    from jobs.common.runtime import init_ray, quiet_progress_log

    storage.make_dir(out)
    storage.write_text(storage.join(out, "config.yaml"), to_yaml(cfg))
    print(f"[{name}] resolved config:\n" + to_yaml(cfg), flush=True)
    quiet_progress_log()
    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    ctx.execution_options.preserve_order = True
    # a dataset keeps the context it was created with: the retry rules for batches whose vLLM engine died must be
    # set here, before the first read, not when the engines start
    from jobs.common.vllm_stages import retry_lost_engines

    retry_lost_engines(ctx)
    return ctx


def pool_demand(pool: PoolCfg, turns: int = 1) -> dict[str, float]:
    """The resources a stage's pool holds at once: `concurrency` actors of num_cpus/num_gpus, or, for a stage on
    vLLM (`engine=vllm`), its processors' stage actors (one per turn and engine; the engines are counted by
    `preflight`, once per engine pool)."""
    if getattr(pool, "engine", None) == "vllm":
        from jobs.common.vllm_stages import STAGE_ACTOR_CPUS

        return {"CPU": STAGE_ACTOR_CPUS * pool.concurrency * turns}
    return {"CPU": pool.num_cpus * pool.concurrency, "GPU": pool.num_gpus * pool.concurrency}


def preflight(pools: dict[str, PoolCfg], turns: int = 1) -> None:
    """Refuse stages the cluster cannot hold: Ray Data would otherwise wait forever, silently, for a CPU to run
    its read/write tasks, for GPUs that do not exist, or for an accelerator type no node has. `pools`: config key
    -> pool section; `turns`: the most turns of any row (a vLLM stage runs a processor per turn). Sections on vLLM
    with the same engine settings share one engine pool (`vllm_stages.Engines`), counted once."""
    import ray

    if not pools:
        return
    have = ray.cluster_resources()
    asks = {k: pool_demand(p, turns) for k, p in pools.items()}
    shared: dict[str, list[str]] = {}  # engine pool -> the config keys it serves
    for k, p in pools.items():
        if getattr(p, "engine", None) == "vllm":
            from jobs.common.vllm_stages import engine_key

            shared.setdefault(engine_key(p), []).append(k)
    for keys in shared.values():
        from jobs.common.vllm_stages import demand

        asks[" & ".join(keys) + " engines"] = demand(pools[keys[0]])
    want: dict[str, float] = {}
    for a in asks.values():
        for r, x in a.items():
            want[r] = want.get(r, 0.0) + x
    detail = lambda r: " + ".join(f"{k} {a[r]:g}" for k, a in asks.items() if a.get(r))  # noqa: E731
    first = next(iter(pools))
    problems = []
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if want.get("CPU", 0.0) + HEADROOM_CPUS > cpus:
        problems.append(f"the stages ask for {want.get('CPU', 0.0):g} CPUs ({detail('CPU')}) but the cluster has "
                        f"{cpus:g}, and {HEADROOM_CPUS:g} must stay free for reading and writing. Lower num_cpus "
                        f"(fractions work, e.g. {first}.num_cpus={pools[first].num_cpus / 2:g}) or concurrency"
                        + ".")
    if want.get("GPU", 0.0) > gpus:
        problems.append(f"the stages ask for {want['GPU']:g} GPUs ({detail('GPU')}) but the cluster has {gpus:g}; "
                        "set num_gpus=0 (and no GPU in vllm.bundles) on CPU-only clusters")
    for r, x in want.items():
        if r not in ("CPU", "GPU") and have.get(r, 0.0) < x:
            what = f"accelerator type {r.split(':', 1)[1]}" if r.startswith("accelerator_type:") else f"resource {r}"
            problems.append(f"the stages ask for the {what} ({', '.join(k for k, a in asks.items() if r in a)}) "
                            f"but no node of the cluster has it")
    if problems:
        raise ConfigError(problems)


# ---- reading -------------------------------------------------------------------------------------------------
def input_files(path: str, demo: Path = DEMO_PROMPTS) -> list[str]:
    """The input files at `path` (a file, or every JSONL/JSON/Parquet file under a folder, .gz too; a local path
    or a URI); "demo" = the bundled demo file."""
    from jobs.common import storage

    if path == "demo":
        return [str(demo)]
    return storage.list_files(path, INPUT_EXTS)


def input_root(path: str, demo: Path = DEMO_PROMPTS) -> str:
    """What the input files' names are taken relative to (their blocks' names): the folder, or the file."""
    return str(demo) if path == "demo" else path


class InputCfg(Section):
    """Prompts to read: JSONL / JSON / Parquet files (.gz too) or a folder of them."""
    path: str = Field("demo", description='a file or a folder of them; "demo" = the bundled demo prompts')
    format: Literal[FORMATS] = Field("auto", description="auto decides per record")
    id_field: Optional[str] = Field(None, description='null: "id" or "question_id", else the line number / index')
    drafts_path: Optional[str] = Field(None, description="drafts joined by id (FastChat answers, JSONL id+draft) "
                                                         "or by instruction text (AlpacaEval outputs JSON)")
    limit: Optional[int] = Field(None, ge=1, description="only the first N rows")

    def check(self) -> list[str]:
        from jobs.common import storage

        problems = []
        if not input_files(self.path):
            problems.append(f"path: no .jsonl/.json/.parquet input (.gz too) found at {self.path!r}")
        if self.drafts_path and not storage.exists(self.drafts_path):
            problems.append(f"drafts_path: file not found: {self.drafts_path}")
        return problems


# ---- stages --------------------------------------------------------------------------------------------------
def time_budget(row_timeout_s: Optional[float], n: int) -> Optional[float]:
    """Seconds a model call over `n` rows may take (`row_timeout_s` per row), or None for no limit."""
    return None if row_timeout_s is None else row_timeout_s * max(1, n)


def timeout_reason(row_timeout_s: float, n: int) -> str:
    """Why a row of a model call over `n` rows has no result: the call's time budget ran out first."""
    return (f"cut off by the time budget of {time_budget(row_timeout_s, n):g} s "
            f"(row_timeout_s {row_timeout_s:g} x {n} row(s) in the call)")


class RowStage:
    """A Ray Data stage over rows. Subclasses set `name` (for error messages) and `schema` (the output
    columns) and implement `process(rows)` for the rows without an error, returning them (same order) with
    their new columns. Rows that arrive with an error pass through; if `process` raises on a batch, each row
    is retried alone and the ones that still raise become error rows, so one bad row never sinks its batch.
    `passthrough(row)` gives an error row its output columns (default: as it is).

    A model stage sets `row_timeout_s` (its pool's `row_timeout_s`) and bounds each model call over n rows
    by `time_budget(n)` seconds, the libraries' own stopping (`generate(max_time=...)`, the Jacobi engines'
    `max_time`); the rows a call cut off become error rows with `timeout_error(n)`."""

    name = "stage"
    schema: pa.Schema
    row_timeout_s: Optional[float] = None

    def time_budget(self, n: int) -> Optional[float]:
        return time_budget(self.row_timeout_s, n)

    def timeout_error(self, n: int) -> str:
        return f"{self.name}: {timeout_reason(self.row_timeout_s, n)}"

    def process(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def passthrough(self, row: dict) -> dict:
        return row

    def _run(self, rows: list[dict]) -> list[dict]:
        try:
            return self.process(rows)
        except Exception:  # noqa: BLE001 - isolate the row that breaks the batch
            if len(rows) == 1:
                raise
        out = []
        for r in rows:
            try:
                out += self.process([r])
            except Exception as e:  # noqa: BLE001
                out.append(self.passthrough(dict(r, error=f"{self.name}: {type(e).__name__}: {e}"[:1000])))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        from jobs.common.blocks import KEY_NAMES, with_keys

        keys = batch.select([c for c in KEY_NAMES if c in batch.column_names])
        rows = batch.drop_columns(keys.column_names).to_pylist()
        todo = [not r.get("error") for r in rows]  # decided before `process`, which may mark rows it fails
        good = [r for r, t in zip(rows, todo) if t]
        try:
            done = iter(self._run(good)) if good else iter(())
        except Exception as e:  # noqa: BLE001 - a batch of one that raises
            done = iter([self.passthrough(dict(good[0], error=f"{self.name}: {type(e).__name__}: {e}"[:1000]))])
        out = [next(done) if t else self.passthrough(r) for r, t in zip(rows, todo)]
        return with_keys(pa.Table.from_pylist(out, schema=self.schema), keys)  # the block columns, as they came


def map_stage(ds, stage: type, pool: PoolCfg, **kwargs):
    """`ds.map_batches` with `stage` (a RowStage class) in an actor pool sized by `pool`; `kwargs` go to the
    stage's constructor (typed config sections, not dicts)."""
    import ray

    return ds.map_batches(stage, batch_format="pyarrow", batch_size=pool.batch_size,
                          compute=ray.data.ActorPoolStrategy(size=pool.concurrency), num_cpus=pool.num_cpus,
                          num_gpus=pool.num_gpus or None, fn_constructor_kwargs=kwargs)
