"""Blocks: the unit a batch job reads, writes and redoes, so that rows stream from storage to storage.

A block is `rows_per_block` consecutive records of one input file, named by the file and the row range
(``<file key>-<first record:09d>``): the same input gives the same blocks on every run and on every machine. The
driver only lists files and block names; the rows themselves are read, processed and written by Ray's workers.

    index = index_blocks(file_tasks(files, root), parser, done)   # workers: one row per block (O(blocks) back)
    ds = read_blocks(todo, parser)                            # workers: a task per block to do
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
from typing import Any, Callable, Iterator, Optional

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


def file_key(rel: str) -> str:
    """A short, stable name for an input file: its name's letters and a hash of its path under the input root."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", rel.rsplit("/", 1)[-1].split(".", 1)[0])[:32] or "file"
    return f"{stem}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"


def file_tasks(files: list[str], root: str) -> list[FileTask]:
    import os

    out = []
    for f in files:
        rel = (os.path.relpath(storage.display(f), storage.display(root)) if f != root
               else os.path.basename(storage.display(f)))
        out.append(FileTask(f, file_key(rel), os.path.basename(storage.display(f))))
    return out


# ---- records ------------------------------------------------------------------------------------------------
def _seekable(uri: str) -> bool:
    return uri.endswith((".jsonl",)) or not uri.endswith((".gz", ".json", ".parquet"))


def _lines(uri: str, offset: int = 0, line: int = 1) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, line) of every non-blank line of a (gzipped or plain) text file, streamed,
    from byte `offset` (line number `line`; plain files only: gzip streams are read from the start)."""
    fs, path = storage.location(uri)
    if offset:
        f = fs.open_input_file(path)
        f.seek(offset)
    else:
        f = fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None)
    with f:
        rest, n, pos = b"", line - 1, offset
        while chunk := f.read(1 << 22):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for raw in lines:
                n += 1
                at, pos = pos, pos + len(raw) + 1
                if n == 1:
                    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as some tools write
                if raw.strip():
                    yield n, at, raw.rstrip(b"\r")
        if rest.strip():
            n += 1
            yield n, pos, (rest.removeprefix(b"\xef\xbb\xbf") if n == 1 else rest).rstrip(b"\r")


def _json_records(uri: str, source: str):
    from pipeline.records import parse_json_array

    fs, path = storage.location(uri)
    with fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None) as f:
        yield from parse_json_array(f.read(), source)


def _records(task: FileTask, offset: int = 0, line: int = 1) -> Iterator[tuple[Callable[[], tuple], int, int]]:
    """(thunk, line, byte offset) per record of the file from `offset` / `line`: the thunk parses the record (record,
    fallback id, error) only when called, so that indexing the records of blocks already done costs only the line
    splitting. JSON arrays and Parquet files are read from their start (line = the record's index, offset -1)."""
    from pipeline.records import parse_line

    uri = task.uri
    try:
        if uri.endswith(".parquet"):
            for i, th in enumerate(_parquet_records(task)):
                yield th, i, -1
        elif uri.endswith((".json", ".json.gz")):
            for i, rec in enumerate(_json_records(uri, task.source)):
                yield (lambda rec=rec: rec), i, -1
        else:
            for n, at, raw in _lines(uri, offset if _seekable(uri) else 0, line if _seekable(uri) else 1):
                yield (lambda raw=raw, n=n: parse_line(raw, n, task.source)), n, at if _seekable(uri) else -1
    except OSError as e:  # a file that is not what its name says (bad gzip): one error row
        yield (lambda e=e: (None, f"{task.source}:0", f"cannot read the file: {e}")), 0, -1


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
    """How a job turns records into rows: `normalize(record, fallback id, drafts)`, `error_row(id, reason)`, the
    rows' `schema` and the block size. `drafts`: None, or the object-store reference of a drafts file's lookup
    (`drafts_table`), which each worker fetches once and joins in (a broadcast join: the lookup never comes to the
    driver)."""
    normalize: Callable
    error_row: Callable
    schema: pa.Schema
    rows_per_block: int
    drafts: Any = None

    def dicts(self, thunks: list) -> list[dict]:
        drafts = _fetch(self.drafts)
        out = []
        for t in thunks:
            rec, fid, err = t()
            out.append(self.error_row(fid, err) if err else self.normalize(rec, fid, drafts))
        return out

    def rows(self, thunks: list) -> pa.Table:
        return pa.Table.from_pylist(self.dicts(thunks), schema=self.schema)


_fetched: dict = {}


def _fetch(ref):
    """The drafts lookup behind `ref`, fetched once per worker process."""
    if ref is None:
        return None
    if ref.hex() not in _fetched:
        import ray

        _fetched.clear()
        _fetched[ref.hex()] = ray.get(ref)
    return _fetched[ref.hex()]


def _drafts_lookup(uri: str) -> dict:
    from pipeline.records import drafts_from

    return drafts_from(storage.read_bytes(uri), storage.display(uri))


def drafts_table(uri: str):
    """The object-store reference of the drafts file's lookup (id or instruction text -> drafts), built by a Ray
    task: drafts files are benchmark-sized (FastChat answers, AlpacaEval outputs); larger sets of drafts belong in
    the input rows themselves."""
    import ray

    return ray.remote(num_cpus=READ_CPUS)(_drafts_lookup).remote(uri)


# ---- the index: every block of the input, where it starts, what the stages need to know of it ------------------
INDEX = pa.schema([("uri", pa.string()), ("key", pa.string()), ("source", pa.string()), ("file", pa.int64()),
                   ("block", pa.string()), ("start", pa.int64()), ("line", pa.int64()), ("offset", pa.int64()),
                   ("n", pa.int64()), ("turns", pa.int64()), ("to_draft", pa.int64()), ("parsed", pa.bool_())])


def _turns_and_drafts(rows: list[dict]) -> tuple[int, int]:
    turns = max([len(r.get("turns") or []) for r in rows] or [0])
    return turns, sum(1 for r in rows if "drafts" in r and r["drafts"] is None and not r.get("error"))


def _index_file(batch: pa.Table, parser: Parser, done: dict, limit: Optional[int]) -> pa.Table:
    """One row per block of each file of the batch: its name, first record (line and byte offset) and size; the
    blocks not in `done` (block -> rows) are parsed for the most turns and the rows without drafts."""
    n, out = parser.rows_per_block, []
    for t in batch.to_pylist():
        i, task = t.pop("file"), FileTask(**t)
        chunk: list = []

        def emit(chunk):
            start = len(out_blocks) * n
            block = f"{task.key}-{start:09d}"
            # a block already written is only counted (with a limit, which may cut it, every block is parsed)
            rows = None if done.get(block) == len(chunk) and limit is None else parser.dicts([c[0] for c in chunk])
            turns, to_draft = _turns_and_drafts(rows) if rows is not None else (0, 0)
            out_blocks.append(block)
            out.append({**t, "file": i, "block": block, "start": start, "line": chunk[0][1], "offset": chunk[0][2],
                        "n": len(chunk), "turns": turns, "to_draft": to_draft, "parsed": rows is not None})

        out_blocks: list = []
        for k, rec in enumerate(_records(task)):
            if limit is not None and k >= limit:  # no file gives more than `limit` records
                break
            chunk.append(rec)
            if len(chunk) == n:
                emit(chunk)
                chunk = []
        if chunk:
            emit(chunk)
    return pa.Table.from_pylist(out, schema=INDEX)


def index_blocks(tasks: list[FileTask], parser: Parser, done: dict[str, int], limit: Optional[int]) -> list[dict]:
    """Every block of the input (a Ray Data pass over the files, a task per file: O(blocks) rows come back), in
    file order; `limit`: only the first `limit` records over the files in order."""
    import dataclasses

    import ray

    items = [dataclasses.asdict(t) | {"file": i} for i, t in enumerate(tasks)]
    index = (ray.data.from_items(items, override_num_blocks=max(1, len(items)))
             .map_batches(_index_file, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                          fn_kwargs=dict(parser=parser, done=done, limit=limit)).take_all())
    index.sort(key=lambda b: (b["file"], b["start"]))
    if limit is not None:
        kept, left = [], limit
        for b in index:
            if left <= 0:
                break
            if b["n"] > left:  # the block the limit cuts: its first `left` records (the block's info: upper bounds)
                b = dict(b, n=left)
            kept.append(b)
            left -= b["n"]
        index = kept
    return index


def _read_block(batch: pa.Table, parser: Parser) -> pa.Table:
    """The rows of one block (an index row): read from its first record on; bad records are error rows."""
    (b,) = batch.to_pylist()
    task = FileTask(b["uri"], b["key"], b["source"])
    seek = b["offset"] >= 0
    thunks = []
    for k, (th, _, _) in enumerate(_records(task, b["offset"] if seek else 0, b["line"] if seek else 1)):
        if not seek and k < b["start"]:
            continue
        thunks.append(th)
        if len(thunks) == b["n"]:
            break
    rows = parser.rows(thunks)
    k = rows.num_rows
    return with_keys(rows, pa.table({"_block": [b["block"]] * k, "_row": list(range(b["start"], b["start"] + k)),
                                     "_total": [k] * k}, schema=pa.schema(KEY_FIELDS)))


def read_blocks(index: list[dict], parser: Parser):
    """A Dataset of the rows of the blocks of `index`, read and parsed by Ray's workers: a task per block, so that
    the blocks stream through the stages (and to storage) one by one, whatever the files' sizes."""
    import ray

    return (ray.data.from_items(index, override_num_blocks=max(1, len(index)))
            .map_batches(_read_block, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
                         fn_kwargs=dict(parser=parser)))


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


IDS_PER_TASK = 5_000_000  # ids one duplicate-check task holds (a set of strings: a few hundred MB at most)


def _repeated_ids(paths: list[str], uri: str, part: int, parts: int, show: int) -> tuple[int, list[str]]:
    """Ids seen more than once among the files' id columns whose hash falls in `part` of `parts`."""
    import zlib

    fs = storage.location(uri)[0]
    seen, repeated = set(), set()
    for p in paths:
        for i in pq.read_table(p, filesystem=fs, columns=["id"]).column("id").to_pylist():
            if parts > 1 and zlib.crc32(i.encode()) % parts != part:
                continue
            if i in seen:
                repeated.add(i)
            seen.add(i)
    return len(repeated), sorted(repeated)[:show]


def duplicate_ids(rows_uri: str, errors_uri: str, rows: int, show: int = 10) -> tuple[int, list[str]]:
    """How many ids occur more than once in the output folders, and some of them: Ray tasks over the id column,
    each holding the ids of one hash partition (IDS_PER_TASK at most); the ids never come to the driver."""
    import ray

    paths = [storage.location(storage.join(u, n))[1] for u in (rows_uri, errors_uri) for n in storage.list_names(u)
             if PIECE.match(n)]
    if not paths:
        return 0, []
    parts = max(1, -(-rows // IDS_PER_TASK))
    task = ray.remote(num_cpus=READ_CPUS)(_repeated_ids)
    found = ray.get([task.remote(paths, rows_uri, k, parts, show) for k in range(parts)])
    return sum(n for n, _ in found), sorted(i for _, ids in found for i in ids)[:show]


# ---- a job's resume bookkeeping --------------------------------------------------------------------------------
@dataclass
class InputInfo:
    """What the stages need to know of the rows to do before they start (one streaming pass over them)."""
    rows: int
    turns: int  # the most turns of any row (at least 1): how many engine rounds a stage runs
    to_draft: int  # rows without drafts (and without an error)


def info_of(blocks: list[dict]) -> InputInfo:
    return InputInfo(rows=sum(b["n"] for b in blocks), turns=max([1] + [b["turns"] for b in blocks]),
                     to_draft=sum(b["to_draft"] for b in blocks))


class BlockJob:
    """The blocks of a job's input and what its output folders (`rows`, `errors` under `out`) hold of them.

    `todo()` cleans up what a killed run left half-written and gives the rows of the blocks not yet written whole
    (and what the stages need to know of them); `finish(totals, ...)` checks that every block is whole and adds up
    the summary's totals over the whole output (files written by earlier runs included)."""

    def __init__(self, name: str, out: str, files: list[str], root: str, parser: Parser, limit: int | None):
        import json

        from jobs.common.config import ConfigError

        self.name, self.parser, self.limit = name, parser, limit
        self.rows_uri, self.errors_uri = storage.join(out, "rows"), storage.join(out, "errors")
        if not files:
            raise ConfigError([f"input: no input file at {root!r}"])
        self.tasks = file_tasks(files, root)
        # another rows_per_block names other blocks: refused (another limit only cuts a file's last block elsewhere:
        # a block whose size changed is redone)
        uri = storage.join(out, "blocks.json")
        old = json.loads(storage.read_bytes(uri)) if storage.exists(uri) else {}
        if old.get("rows_per_block", parser.rows_per_block) != parser.rows_per_block and scan(self.rows_uri).complete:
            raise ConfigError([f"output.path {storage.display(out)!r} holds blocks of {old['rows_per_block']} rows, "
                               f"and rows_per_block is {parser.rows_per_block}: use the same rows_per_block to resume, "
                               "a new output.path, or delete that one to start over"])
        storage.write_text(uri, json.dumps({"rows_per_block": parser.rows_per_block}))
        self.processed = 0

    def todo(self):
        """(Dataset of the rows to do, InputInfo of them)."""
        s = scan(self.rows_uri)
        index = index_blocks(self.tasks, self.parser, s.rows, self.limit)
        for b in index:  # written whole under another limit: the block's size changed
            if s.rows.get(b["block"], b["n"]) != b["n"]:
                s.incomplete[b["block"]] = s.complete.pop(b["block"])
                del s.rows[b["block"]]
        if s.incomplete or s.temporary:
            print(f"[{self.name}] resume: {len(s.incomplete)} block(s) written only in part are redone", flush=True)
        clean(self.rows_uri, self.errors_uri, s)
        todo = [b for b in index if b["block"] not in s.complete]
        info = info_of(todo)
        self.processed = info.rows
        print(f"[{self.name}] {len(self.tasks)} input file(s), {len(index)} block(s) of up to "
              f"{self.parser.rows_per_block} rows; {len(index) - len(todo)} block(s) "
              f"({sum(b['n'] for b in index) - info.rows} rows) already written in {storage.display(self.rows_uri)}; "
              f"{info.rows} rows to do", flush=True)
        return read_blocks(todo, self.parser), info

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
        total["duplicate_ids"], sample = duplicate_ids(self.rows_uri, self.errors_uri, total["rows_in"])
        if sample:
            print(f"[{self.name}] WARNING: {total['duplicate_ids']} id(s) occur more than once in the input (every row "
                  f"was processed; exports keyed by id will repeat them), e.g. {sample}", flush=True)
        if total.get("rows_out", 0) + total.get("error_rows", 0) != total["rows_in"]:
            raise RuntimeError(f"internal error: {total['rows_in']} rows in, but {total.get('rows_out', 0)} aligned "
                               f"and {total.get('error_rows', 0)} error rows written")
        return total
