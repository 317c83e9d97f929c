"""Blocks: the unit a batch job reads, writes and redoes, so that rows stream from storage to storage.

A block is `rows_per_block` consecutive records of one input file, named by the file and the row range
(``<file key>-<first record:09d>``): the same input gives the same blocks on every run and on every machine. The
driver only lists files and block names; the rows themselves are read, processed and written by Ray's workers.

    plan = read_plan(files, rows_per_block, limit)            # the driver: one entry per input file
    ds = read_blocks(plan, parser, done)                      # workers: the rows of every block not in `done`
    ...model stages (each row carries _block, _row, _total)...
    ds.write_datasink(BlockSink(rows_uri, errors_uri, ...))   # workers: each block's rows under its name

Output: every row lands in the rows folder (no error) or the errors folder (with its reason), in a Parquet file
named ``<block>.p<first row>.n<rows>.t<block rows>.parquet``, written atomically. Ray Data keeps a block's rows
together through the stages as a rule, so a block is one file; if a block reaches the writer in pieces, each
piece is its own file and the names still add up. A block is complete when the `n` of its files in the rows
folder add up to its `t` exactly: a rerun lists the rows folder (one listing, O(blocks)), skips the complete
blocks, and deletes the files of the others (a kill between pieces) before redoing them,
so a kill at any moment loses nothing and writes nothing twice.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from jobs.common import storage

KEY_FIELDS = [pa.field("_block", pa.string()), pa.field("_row", pa.int64()), pa.field("_total", pa.int64())]
KEY_NAMES = [f.name for f in KEY_FIELDS]
PIECE = re.compile(r"^(?P<block>[A-Za-z0-9_-]+)\.p(?P<first>\d+)\.n(?P<n>\d+)\.t(?P<total>\d+)\.parquet$")
READ_CPUS = 0.25  # per read task: parsing is light, and must fit next to the actor pools


def keyed(schema: pa.Schema) -> pa.Schema:
    """`schema` with the block columns every row carries through the stages."""
    return pa.schema(list(schema) + [f for f in KEY_FIELDS if f.name not in schema.names])


def with_keys(out: pa.Table, source: pa.Table) -> pa.Table:
    """`out` (one row per row of `source`, same order) with `source`'s block columns."""
    for f in KEY_FIELDS:
        if f.name not in source.column_names:
            continue
        if f.name in out.column_names:
            out = out.set_column(out.column_names.index(f.name), f, source.column(f.name))
        else:
            out = out.append_column(f, source.column(f.name))
    return out


# ---- the plan -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileTask:
    uri: str
    key: str  # the file's part of its blocks' names
    source: str  # the name error rows give the file ("prompts.jsonl")
    max_rows: Optional[int] = None  # `limit`: only the first records


def file_key(rel: str) -> str:
    """A short, stable name for an input file: its name's letters and a hash of its path under the input root."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", rel.rsplit("/", 1)[-1].split(".", 1)[0])[:32] or "file"
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def read_plan(files: list[str], root: str, limit: Optional[int] = None) -> list[FileTask]:
    """One task per input file (sorted). `limit`: only the first `limit` records over the files in order, which
    the driver finds by counting records (only as many files as that takes)."""
    import os

    plan, left = [], limit
    for f in files:
        rel = os.path.relpath(storage.display(f), storage.display(root)) if f != root else os.path.basename(
            storage.display(f))
        task = FileTask(f, file_key(rel), os.path.basename(storage.display(f)))
        if left is not None:
            if left <= 0:
                break
            n = count_records(f)
            task = FileTask(task.uri, task.key, task.source, max_rows=min(n, left))
            left -= n
        plan.append(task)
    return plan


# ---- reading --------------------------------------------------------------------------------------------------
def _lines(uri: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of every non-blank line of a (gzipped or plain) text file, streamed."""
    fs, path = storage.location(uri)
    with fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None) as f:
        rest, n = b"", 0
        while chunk := f.read(1 << 22):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for raw in lines:
                n += 1
                if n == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some tools write
                if raw.strip():
                    yield n, raw.rstrip(b"\r")
        if rest.strip():
            yield n + 1, (rest.removeprefix(b"\xef\xbb\xbf") if n == 0 else rest).rstrip(b"\r")


def count_records(uri: str) -> int:
    if uri.endswith(".parquet"):
        fs, path = storage.location(uri)
        return pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
    if uri.endswith((".json", ".json.gz")):
        return sum(1 for _ in _json_records(uri, "count"))
    try:
        return sum(1 for _ in _lines(uri))
    except OSError:  # not valid gzip: one error row
        return 1


def _json_records(uri: str, source: str):
    from pipeline.records import parse_json_array

    fs, path = storage.location(uri)
    with fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None) as f:
        yield from parse_json_array(f.read(), source)


def _records(task: FileTask) -> Iterator[Callable[[], tuple]]:
    """A thunk per record of the file (record, fallback id, error): parsed only when called, so that the records
    of blocks already done are skipped at the cost of splitting lines."""
    from pipeline.records import parse_line

    uri = task.uri
    try:
        if uri.endswith(".parquet"):
            yield from _parquet_records(task)
        elif uri.endswith((".json", ".json.gz")):
            for rec in _json_records(uri, task.source):
                yield lambda rec=rec: rec
        else:
            for n, raw in _lines(uri):
                yield lambda raw=raw, n=n: parse_line(raw, n, task.source)
    except OSError as e:  # a file that is not what its name says (bad gzip): one error row
        yield lambda e=e: (None, f"{task.source}:0", f"cannot read the file: {e}")


def _parquet_records(task: FileTask):
    fs, path = storage.location(task.uri)
    for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield lambda rec=rec: _parquet_record(rec)


def _parquet_record(rec: dict) -> tuple:
    # Parquet rows carry no line number: a row without a usable id is named by a hash of its content
    fallback = "parquet:" + hashlib.sha256(repr(sorted(rec.items())).encode()).hexdigest()[:12]
    try:
        return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in rec.items()}, fallback, None
    except UnicodeDecodeError as e:
        return None, fallback, f"field is not valid UTF-8 ({e.reason})"


@dataclass(frozen=True)
class Parser:
    """How a job turns records into rows: `normalize(record, fallback id)`, `error_row(id, reason)`, the rows'
    `schema` and the block size."""
    normalize: Callable
    error_row: Callable
    schema: pa.Schema
    rows_per_block: int

    def rows(self, thunks: list) -> pa.Table:
        out = []
        for t in thunks:
            rec, fid, err = t()
            out.append(self.error_row(fid, err) if err else self.normalize(rec, fid))
        return pa.Table.from_pylist(out, schema=self.schema)


def _read_file(batch: pa.Table, parser: Parser, done: frozenset) -> Iterator[pa.Table]:
    """The rows of each block of the batch's files that is not in `done`, a table per block."""
    n = parser.rows_per_block
    for t in batch.to_pylist():
        task = FileTask(**t)
        chunk, start = [], 0

        def emit(chunk, start):
            block = f"{task.key}-{start:09d}"
            if block in done:
                return None
            rows = parser.rows(chunk)
            k = rows.num_rows
            return with_keys(rows, pa.table({"_block": [block] * k, "_row": list(range(start, start + k)),
                                             "_total": [k] * k}, schema=pa.schema(KEY_FIELDS)))

        for i, thunk in enumerate(_records(task)):
            if task.max_rows is not None and i >= task.max_rows:
                break
            chunk.append(thunk)
            if len(chunk) == n:
                if (t := emit(chunk, start)) is not None:
                    yield t
                chunk, start = [], start + n
        if chunk and (t := emit(chunk, start)) is not None:
            yield t


def read_blocks(plan: list[FileTask], parser: Parser, done: set[str] = frozenset()):
    """A Dataset of the rows of every block of `plan` not in `done`, read and parsed by Ray's workers (a task per
    file, its blocks streamed out as they are parsed); bad records are error rows."""
    import dataclasses

    import ray

    items = [dataclasses.asdict(t) for t in plan]
    return (ray.data.from_items(items, override_num_blocks=max(1, len(items)))
            .map_batches(_read_file, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                         fn_kwargs=dict(parser=parser, done=frozenset(done))))


# ---- what is written ------------------------------------------------------------------------------------------
@dataclass
class Scan:
    complete: dict[str, list[str]]  # block -> its files
    incomplete: dict[str, list[str]]
    rows: dict[str, int]  # complete block -> its rows
    temporary: list[str]


def scan(rows_uri: str) -> Scan:
    """Which blocks the rows folder holds whole (their files' rows add up to the block's), from one listing."""
    have: dict[str, list[tuple[str, int, int]]] = {}
    temporary = []
    for name in storage.list_names(rows_uri):
        m = PIECE.match(name)
        if m:
            have.setdefault(m["block"], []).append((name, int(m["n"]), int(m["total"])))
        elif name.startswith(storage.TMP_PREFIX):
            temporary.append(name)
    complete, incomplete, rows = {}, {}, {}
    for block, files in have.items():
        totals = {t for _, _, t in files}
        if len(totals) == 1 and sum(n for _, n, _ in files) == files[0][2]:
            complete[block], rows[block] = [f for f, _, _ in files], files[0][2]
        else:
            incomplete[block] = [f for f, _, _ in files]
    return Scan(complete, incomplete, rows, temporary)


def clean(rows_uri: str, errors_uri: str, s: Scan) -> None:
    """Delete the files of incomplete blocks (and of temporary writes) in both folders, so that those blocks are
    redone whole."""
    storage.delete(rows_uri, [f for fs in s.incomplete.values() for f in fs] + s.temporary)
    storage.remove_temporary(errors_uri)
    storage.delete(errors_uri, [n for n in storage.list_names(errors_uri)
                                if (m := PIECE.match(n)) and m["block"] not in s.complete])


class BlockSink(Datasink):
    """Ray Data datasink: writes each block's rows (or each piece of a block that reached a write task) as one
    Parquet file in the rows folder, its error rows as one in the errors folder (written first: the rows file
    says the piece is done). Each write task returns, per file, what the job's summary adds up (`rows_out`,
    `error_rows` and `stats(ok rows)`: numbers, or dicts of numbers), gathered in `self.totals` (file -> stats:
    O(blocks) in the driver) when the write completes."""

    def __init__(self, rows_uri: str, errors_uri: str, schema: pa.Schema, error_columns: list[str],
                 stats: Callable[[pa.Table], dict]):
        self.rows_uri, self.errors_uri = rows_uri, errors_uri
        self.schema, self.error_columns, self.stats = schema, error_columns, stats
        self.totals: dict = {}

    def get_name(self) -> str:
        return "WriteBlocks"

    def on_write_start(self, schema=None) -> None:
        storage.make_dir(self.rows_uri)
        storage.make_dir(self.errors_uri)

    def write(self, blocks, ctx) -> dict:
        tables = [b if isinstance(b, pa.Table) else pa.table(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        total: dict = {}
        if not tables:
            return total
        t = pa.concat_tables(tables, promote_options="permissive")
        for block in pc.unique(t.column("_block")).to_pylist():
            piece = t.filter(pc.equal(t.column("_block"), block)).sort_by("_row")
            n, first, of = piece.num_rows, piece.column("_row")[0].as_py(), piece.column("_total")[0].as_py()
            name = f"{block}.p{first:09d}.n{n}.t{of}.parquet"
            failed = pc.invert(pc.is_null(piece.column("error")))
            bad, ok = piece.filter(failed), piece.filter(pc.invert(failed))
            if bad.num_rows:
                _write_parquet(storage.join(self.errors_uri, name), bad.select(self.error_columns))
            ok = ok.select(self.schema.names).cast(self.schema)
            _write_parquet(storage.join(self.rows_uri, name), ok)
            total[name] = {"rows_out": ok.num_rows, "error_rows": bad.num_rows} | self.stats(ok)
        return total

    def on_write_complete(self, write_result) -> None:
        for r in write_result.write_returns:
            self.totals.update(r)


def _write_parquet(uri: str, table: pa.Table) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_atomic(uri, buf.getvalue().to_pybytes())


def add(a: dict, b: dict) -> dict:
    """Sums of two stats dicts (numbers, or dicts of numbers, by key)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            out[k] = add(out.get(k) or {}, v)
        elif v is not None:
            out[k] = (out.get(k) or 0) + v
    return out


def totals_of_files(rows_uri: str, errors_uri: str, names: list[str], columns: list[str],
                    stats: Callable[[pa.Table], dict]) -> dict[str, dict]:
    """What `BlockSink` returned for the block files `names` (written by an earlier run), from a Ray Data pass
    over them (`columns` only), so that a resumed job's summary covers the whole output."""
    import json

    import ray

    if not names:
        return {}
    fs = storage.location(rows_uri)[0]
    paths = [storage.location(storage.join(rows_uri, n))[1] for n in names]
    err_fs, err_dir = storage.location(errors_uri)
    errors = set(storage.list_names(errors_uri))

    def one(batch: dict) -> dict:
        out = []
        for name, path in zip(batch["name"], batch["path"]):
            t = pq.read_table(path, filesystem=fs, columns=columns)
            bad = pq.read_metadata(f"{err_dir}/{name}", filesystem=err_fs).num_rows if name in errors else 0
            out.append(json.dumps({"rows_out": t.num_rows, "error_rows": bad} | stats(t)))
        return {"name": batch["name"], "stats": out}

    ds = ray.data.from_items([{"name": n, "path": p} for n, p in zip(names, paths)])
    return {r["name"]: json.loads(r["stats"]) for r in ds.map_batches(one, batch_size=64, num_cpus=READ_CPUS).iter_rows()}


# ---- a job's resume bookkeeping --------------------------------------------------------------------------------
@dataclass
class InputInfo:
    """What the stages need to know of the rows to do before they start (one streaming pass over them)."""
    rows: int
    turns: int  # the most turns of any row (at least 1): how many engine rounds a stage runs
    to_draft: int  # rows without drafts (and without an error)


def _features(batch: pa.Table) -> pa.Table:
    turns = pc.fill_null(pc.list_value_length(batch.column("turns")), 0)
    need = pc.and_(pc.is_null(batch.column("drafts")), pc.is_null(batch.column("error"))) \
        if "drafts" in batch.column_names else pa.array([False] * batch.num_rows)
    return pa.table({"turns": pc.cast(turns, pa.int64()), "to_draft": pc.cast(need, pa.int64())})


def input_info(ds) -> InputInfo:
    from ray.data.aggregate import Count, Max, Sum

    agg = ds.map_batches(_features, batch_format="pyarrow", num_cpus=READ_CPUS).aggregate(
        Count(), Max("turns"), Sum("to_draft"))
    return InputInfo(rows=agg.get("count()") or 0, turns=max(1, agg.get("max(turns)") or 0),
                     to_draft=agg.get("sum(to_draft)") or 0)


class BlockJob:
    """The blocks of a job's input and what its output folders (`rows`, `errors` under `out`) hold of them.

    `todo()` cleans up what a killed run left half-written and gives the rows of the blocks not yet written whole
    (and what the stages need to know of them); `finish(totals, ...)` checks that every block is whole and adds up
    the summary's totals over the whole output (files written by earlier runs included)."""

    def __init__(self, name: str, out: str, files: list[str], root: str, parser: Parser, limit: int | None):
        from jobs.common.config import ConfigError

        self.name, self.parser = name, parser
        self.rows_uri, self.errors_uri = storage.join(out, "rows"), storage.join(out, "errors")
        if not files:
            raise ConfigError([f"input: no input file at {root!r}"])
        self.plan = read_plan(files, root, limit)
        import json

        # what decides the blocks' names and sizes: another rows_per_block names other blocks (refused); another
        # limit may cut a file's last block elsewhere (the blocks shorter than rows_per_block are redone)
        manifest = {"rows_per_block": parser.rows_per_block, "limit": limit}
        uri = storage.join(out, "blocks.json")
        old = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else manifest
        self.short_redone = old.get("limit") != limit
        if old.get("rows_per_block") != parser.rows_per_block and scan(self.rows_uri).complete:
            raise ConfigError([f"output.path {storage.display(out)!r} holds blocks of {old.get('rows_per_block')} "
                               f"rows, and rows_per_block is {parser.rows_per_block}: use the same rows_per_block to "
                               "resume, a new output.path, or delete that one to start over"])
        storage.write_text(uri, json.dumps(manifest))
        self.started_with: set[str] | None = None
        self.processed = 0

    def todo(self):
        """(Dataset of the rows to do, InputInfo of them)."""
        s = scan(self.rows_uri)
        if self.short_redone:
            for b in [b for b, n in s.rows.items() if n < self.parser.rows_per_block]:
                s.incomplete[b] = s.complete.pop(b)
                del s.rows[b]
            self.short_redone = False
        if s.incomplete or s.temporary:
            print(f"[{self.name}] resume: {len(s.incomplete)} block(s) written only in part are redone", flush=True)
        clean(self.rows_uri, self.errors_uri, s)
        first = self.started_with is None
        if first:
            self.started_with = set(s.complete)
        ds = read_blocks(self.plan, self.parser, set(s.complete))
        info = input_info(ds)
        if first:
            self.processed = info.rows
            print(f"[{self.name}] {len(self.plan)} input file(s); {len(s.complete)} block(s) "
                  f"({sum(s.rows.values())} rows) already written in {storage.display(self.rows_uri)}; "
                  f"{info.rows} rows to do", flush=True)
        return ds, info

    def finish(self, totals: dict[str, dict], columns: list[str], stats: Callable[[pa.Table], dict]) -> dict:
        """The summary's totals over every block file (`totals`: file -> stats of the files this run wrote), with
        `rows_in` and `blocks`; raises if a block is not whole."""
        s = scan(self.rows_uri)
        if s.incomplete:
            raise RuntimeError(f"internal error: blocks written only in part: {sorted(s.incomplete)[:5]}")
        names = [n for fs in s.complete.values() for n in fs]
        known = {n: totals[n] for n in names if n in totals}
        known |= totals_of_files(self.rows_uri, self.errors_uri, [n for n in names if n not in known], columns, stats)
        total: dict = {}
        for n in names:
            total = add(total, known[n])
        total["rows_in"], total["blocks"] = sum(s.rows.values()), len(s.complete)
        if total.get("rows_out", 0) + total.get("error_rows", 0) != total["rows_in"]:
            raise RuntimeError(f"internal error: {total['rows_in']} rows in, but {total.get('rows_out', 0)} aligned "
                               f"and {total.get('error_rows', 0)} error rows written")
        return total
