"""The Ray Data plumbing the batch jobs share (align_dataset, evaluate, build_states), written once.

align_dataset streams from storage to storage in blocks (`jobs.common.blocks`, `storage`, `exports`):

    job = blocks.BlockJob(name, out, input_files(path), input_root(path), parser, limit)
    ds, info = job.todo()                                        # workers index and read the blocks not yet written
    ds = map_stage(ds, SomeStage, cfg.stage, ...)                # a callable class per model stage (actor pool)
    ds.write_datasink(blocks.BlockSink(...))                     # workers write each block, atomically
    totals = job.finish(sink.totals, ...)                        # the summary's totals over the whole output

evaluate and build_states (benchmark-sized: their statistics and splits need every row) still gather the rows in
the driver:

    rows = read_rows(files, normalize, error_row, SCHEMA)        # parse every file in parallel; bad lines = error rows
    todo = not_done(rows, done_ids(parts))                       # resume: skip what an earlier run wrote
    ds = blocks(todo, rows_per_file)                             # the unit a killed run redoes
    ds = map_stage(ds, SomeStage, cfg.stage, ...)
    write_parts(ds, parts)                                       # Parquet parts; then the job's finalize

Rows are Arrow tables with an explicit schema (lists and structs, never JSON text). A stage is a
`RowStage`: it sees its batch as a list of dicts, rows with an error pass through untouched, and a row
that raises fails alone (an error row naming the stage and the reason), never its batch or the job; the block
columns a row carries (`blocks.KEY_FIELDS`) pass through every stage as they came.
"""
from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pydantic import Field

from jobs.common.config import REPO, ConfigError, PoolCfg, Section, resolve_path, to_yaml
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


def _parse_files(batch: pa.Table, normalize: Callable, error_row: Callable, schema: pa.Schema) -> pa.Table:
    """JSONL / JSON-array files (gzipped or not) -> normalized rows; a bad line is one error row."""
    from pipeline.records import parse_json_array, parse_lines

    rows = []
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        src = os.path.basename(path)
        if data[:2] == b"\x1f\x8b":  # still gzipped
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as e:
                rows.append(error_row(f"{src}:0", f"not a valid gzip file: {e}"))
                continue
        name = path[:-3] if path.endswith(".gz") else path
        parse = parse_json_array if name.endswith(".json") else parse_lines
        rows += [error_row(fid, err) if err else normalize(rec, fid) for rec, fid, err in parse(data, src)]
    return pa.Table.from_pylist(rows, schema=schema)


def _parse_parquet(batch: pa.Table, normalize: Callable, error_row: Callable, schema: pa.Schema) -> pa.Table:
    import hashlib

    rows = []
    for rec in batch.to_pylist():
        # Parquet rows carry no line number: a row without a usable id is named by a hash of its content
        fallback = "parquet:" + hashlib.sha256(repr(sorted(rec.items())).encode()).hexdigest()[:12]
        try:
            rec = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in rec.items()}
        except UnicodeDecodeError as e:
            rows.append(error_row(fallback, f"field is not valid UTF-8 ({e.reason})"))
            continue
        rows.append(normalize(rec, fallback))
    return pa.Table.from_pylist(rows, schema=schema)


def read_rows(files: list[str], normalize: Callable[[object, str], dict], error_row: Callable[[str, str], dict],
              schema: pa.Schema) -> pa.Table:
    """Every input record as a normalized row (`normalize(record, fallback_id)`), or an error row
    (`error_row(id, reason)`) for what cannot be parsed; files are parsed in parallel by Ray Data and the rows
    come back to the driver as one Arrow table (prompts are small; the models are the heavy part)."""
    import ray

    kw = dict(normalize=normalize, error_row=error_row, schema=schema)
    js = [f for f in files if not f.endswith(".parquet")]
    pqs = [f for f in files if f.endswith(".parquet")]
    pieces = []
    if js:
        pieces.append(ray.data.read_binary_files(js, include_paths=True)
                      .map_batches(_parse_files, batch_format="pyarrow", batch_size=1, fn_kwargs=kw))
    if pqs:
        pieces.append(ray.data.read_parquet(pqs).map_batches(_parse_parquet, batch_format="pyarrow", fn_kwargs=kw))
    tables = [t for p in pieces for t in ray.get(p.to_arrow_refs())]
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def check_unique_ids(rows: pa.Table, hint: str) -> None:
    counts = pc.value_counts(rows.column("id")).to_pylist()
    dups = [c["values"] for c in counts if c["counts"] > 1]
    if dups:
        raise ConfigError([f"input has duplicate ids {dups[:10]}{' ...' if len(dups) > 10 else ''} (resume and "
                           f"outputs need unique ids); {hint}"])


# ---- resume --------------------------------------------------------------------------------------------------
def read_parts(parts: Path, columns: list[str] | None = None) -> pa.Table | None:
    """Everything earlier runs wrote to `parts` (None if nothing); a part cut short by a kill (no Parquet
    footer) is removed, so its rows are redone."""
    tables = []
    for f in sorted(parts.glob("*.parquet")):
        try:
            tables.append(pq.read_table(f, columns=columns))
        except Exception:  # noqa: BLE001 - a file cut short by a kill has no footer
            print(f"[resume] removing incomplete part {f.name} (its rows will be redone)", flush=True)
            f.unlink()
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def done_ids(parts: Path) -> set[str]:
    """Ids already written by an earlier run."""
    t = read_parts(parts, ["id"])
    return set(t.column("id").to_pylist()) if t is not None else set()


def not_done(rows: pa.Table, done: set[str]) -> pa.Table:
    return rows.filter(pc.invert(pc.is_in(rows.column("id"), pa.array(sorted(done), pa.string())))) if done else rows


# ---- stages --------------------------------------------------------------------------------------------------
def blocks(rows: pa.Table, rows_per_block: int):
    """A Dataset of `rows` cut into blocks of `rows_per_block` rows in the driver (no repartition task to
    schedule; each block becomes one Parquet part, the unit a killed run redoes)."""
    import ray

    n = max(1, rows_per_block)
    return ray.data.from_arrow([rows.slice(i, n) for i in range(0, rows.num_rows, n)] or [rows])


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


def write_parts(ds, parts: Path) -> None:
    ds.write_parquet(str(parts), ray_remote_args={"num_cpus": WRITE_CPUS})


# ---- finalize ------------------------------------------------------------------------------------------------
def sort_key(x) -> tuple:
    """Numeric ids in numeric order (negative ones too), then the others by text."""
    s = str(x)
    return (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s)


def sorted_rows(table: pa.Table | None, schema: pa.Schema) -> list[dict]:
    """The rows of `table` (or none) as dicts, ordered by id."""
    if table is None:
        return []
    rows = table.cast(schema).to_pylist() if table.schema != schema else table.to_pylist()
    return sorted(rows, key=lambda r: sort_key(r["id"]))


def write_table(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    """Rows as Parquet (`.parquet`) or JSON lines (`.jsonl`), typed by `schema`."""
    table = pa.Table.from_pylist(rows, schema=schema)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        write_jsonl(path, table.to_pylist())


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")


def write_fastchat(path: Path, rows: Iterable[dict], model_id: str, turns_key: str) -> None:
    """Answers in FastChat's answer-file format (MT-bench): one line per question with every turn."""
    from jobs.common.exports import fastchat_record

    now = time.time()
    write_jsonl(path, (fastchat_record(r, model_id, turns_key, now) for r in rows))


def write_alpaca_eval(path: Path, rows: Iterable[dict], model_id: str, answer_key: str) -> None:
    """Answers in AlpacaEval's model-outputs format (a JSON array of instruction / output / generator)."""
    from jobs.common.exports import alpaca_eval_record

    recs = [alpaca_eval_record(r, model_id, answer_key) for r in rows]
    path.write_text(json.dumps(recs, indent=1, ensure_ascii=False))
