"""Blocks: the unit a batch job reads, writes and redoes, so that rows stream from storage to storage.

A block is `rows_per_block` consecutive records of one input file, named by the file and the row range
(``<file key>-<first record:09d>``): the same input gives the same blocks on every run and on every machine. The
driver only lists files and block names; the rows themselves are read, processed and written by Ray's workers.

    index = index_blocks(file_tasks(files, root), parser, done)   # workers: one row per block (O(blocks) back)
    ds = read_blocks(todo, parser)                            # workers: a block per task (a few if no model runs)
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
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink

from jobs.common import storage

KEY_FIELDS = [pa.field("_block", pa.string()), pa.field("_row", pa.int64()), pa.field("_total", pa.int64())]
KEY_NAMES = [f.name for f in KEY_FIELDS]
PIECE = re.compile(r"^(?P<block>[A-Za-z0-9_-]+)\.p(?P<first>\d+)\.n(?P<n>\d+)\.t(?P<total>\d+)\.parquet$")
READ_CPUS = 0.25  # per read task beside model stages: parsing is light, and must fit next to the actor pools
SCAN_CPUS = 1.0  # per task of the passes no model stage runs beside (index, summary, duplicates): Ray's default,
# so that a pass starts as many worker processes as there are CPUs (each one imports the job's modules)
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, as some tools write at the start of a file
READ_GROUP_MAX = 16  # blocks one read task reads at most (`blocks_per_task`)
READ_ATTEMPTS = 3  # tries per block file when summing an earlier run's output (storage reads can fail transiently)


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
                    raw = raw.removeprefix(BOM)
                if raw.strip():
                    yield n, at, raw.rstrip(b"\r")
        if rest:
            n += 1
            if n == 1:
                rest = rest.removeprefix(BOM)
            if rest.strip():
                yield n, pos, rest.rstrip(b"\r")


_SPACE = np.array([ord(c) for c in " \t\r\x0b\x0c"], np.uint8)


@dataclass
class Span:
    """`count` consecutive records of a JSONL file (a block): their bytes (`data`, from the first record's offset
    to the end of the last one) and, per record, its 1-based line number, byte offset in the file and length."""
    lines: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    data: bytes

    @property
    def count(self) -> int:
        return len(self.lines)

    def records(self) -> list[tuple[int, bytes]]:
        """(line number, bytes) per record, as `_lines` gives them."""
        base, out = int(self.offsets[0]), []
        for n, at, k in zip(self.lines.tolist(), self.offsets.tolist(), self.lengths.tolist()):
            raw = self.data[at - base:at - base + k]
            out.append((n, (raw.removeprefix(BOM) if n == 1 else raw).rstrip(b"\r")))
        return out


def _spans(uri: str, n: int, limit: Optional[int] = None, chunk: int = 1 << 24, offset: int = 0, line: int = 1,
           size: Optional[int] = None) -> Iterator[Span]:
    """The non-blank lines (as `_lines` counts them: a line of ASCII whitespace, or a byte-order mark alone, is
    blank) of a plain text file, `n` at a time, the last span shorter; at most `limit` lines in all; from byte
    `offset` (line number `line`) on, `size` bytes (null = to the end). Vectorized: the file is read in
    `chunk`-byte pieces and its newlines found with numpy, so splitting costs no Python per line."""
    fs, path = storage.location(uri)
    f = fs.open_input_file(path) if offset else fs.open_input_stream(path)
    if offset:
        f.seek(offset)
    with f:
        rest, base, line = b"", offset, line - 1  # an incomplete last line, its offset in the file, lines before it
        held, held_at = b"", 0  # the bytes from the first record of the span being filled, their offset
        lines, offsets, lengths, pending, left, unread = [], [], [], 0, limit, size
        while left is None or left > 0:
            more = f.read(chunk if unread is None else min(chunk, unread))
            if unread is not None:
                unread -= len(more)
            data = rest + more
            if not data:  # the end of the file, after a newline
                if pending:
                    ln, off, k = np.concatenate(lines), np.concatenate(offsets), np.concatenate(lengths)
                    yield Span(ln, off, k, held[:int(off[-1] + k[-1]) - held_at])
                break
            a = np.frombuffer(data, np.uint8)
            ends = np.flatnonzero(a == 10)
            if not more and (not len(ends) or ends[-1] != len(data) - 1):
                ends = np.append(ends, len(data))  # the last line has no newline
            if not len(ends):
                rest = data
                continue
            starts = np.concatenate([[0], ends[:-1] + 1])
            numbers = np.arange(line + 1, line + 1 + len(ends))
            keep = ends > starts
            for i in np.flatnonzero(keep & np.isin(a[np.minimum(starts, len(a) - 1)], _SPACE)).tolist():
                keep[i] = bool(data[starts[i]:ends[i]].strip())  # starts with whitespace: blank?
            if base == 0 and keep[0]:
                keep[0] = bool(data[:ends[0]].removeprefix(BOM).strip())
            consumed = min(len(data), int(ends[-1]) + 1)
            line += len(ends)
            starts, ends, numbers = starts[keep], ends[keep], numbers[keep]
            if left is not None:
                starts, ends, numbers = starts[:left], ends[:left], numbers[:left]
                left -= len(starts)
            if len(starts):
                if not pending:
                    held, held_at = b"", base + int(starts[0])
                held += data[held_at - base if not held else 0:consumed]
                lines.append(numbers)
                offsets.append(starts + base)
                lengths.append(ends - starts)
                pending += len(starts)
            elif pending:
                held += data[:consumed]
            last = not more or left == 0
            while pending >= n or (pending and last):
                ln, off, k = np.concatenate(lines), np.concatenate(offsets), np.concatenate(lengths)
                take = min(n, pending)
                yield Span(ln[:take], off[:take], k[:take],
                           held[:int(off[take - 1] + k[take - 1]) - held_at])
                lines, offsets, lengths, pending = [ln[take:]], [off[take:]], [k[take:]], pending - take
                if pending:
                    held, held_at = held[int(off[take]) - held_at:], int(off[take])
            rest, base = data[consumed:], base + consumed
            if not more:
                break


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
    """How a job turns records into rows: `normalize(record, fallback id, lookup)`, `error_row(id, reason)`, the
    rows' `schema` and the block size. `lookup`: None, or the object-store reference of a side table the rows are
    joined with (a drafts file's lookup, `drafts_table`; `lookup_table` for others), which each worker fetches
    once (a broadcast join: the table never comes to the driver). `skips`: `normalize` may return None for a
    record that is not part of the job (a held-out split's filter): such records count for no block."""
    normalize: Callable
    error_row: Callable
    schema: pa.Schema
    rows_per_block: int
    lookup: Any = None
    skips: bool = False
    columnar: Optional[Callable[[pa.Table], Optional[pa.Table]]] = None

    def block_table(self, span: "Span") -> Optional[pa.Table]:
        """The rows of a JSONL block, parsed by Arrow's JSON reader and normalized column-wise (`columnar`), or None
        where that would not give exactly the per-record rows: no `columnar`, a lookup or a skipping parser, a record
        the reader refuses (bad JSON or UTF-8, a repeated key, types that change from record to record), or one
        `columnar` leaves to `normalize`. Then `dicts` does it record by record (error rows and all)."""
        import io

        import pyarrow.json as pj

        if self.columnar is None or self.lookup is not None or self.skips:
            return None
        data = span.data.removeprefix(BOM) if span.lines[0] == 1 else span.data
        try:
            t = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(
                use_threads=False, block_size=min(len(data) + 1, 1 << 30)))
            t.validate(full=True)  # the reader does not check that strings are UTF-8
        except (pa.ArrowException, ValueError):
            return None
        return self.columnar(t) if t.num_rows == span.count else None

    def dicts(self, thunks: list) -> list[dict]:
        lookup = _fetch(self.lookup)
        out = []
        for t in thunks:
            rec, fid, err = t()
            row = self.error_row(fid, err) if err else self.normalize(rec, fid, lookup)
            if row is not None:
                out.append(row)
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


def drafts_lookup(uri: str, prefer: tuple = ()) -> dict:
    """A drafts file (FastChat answers, AlpacaEval outputs, JSONL id + draft) as id or instruction -> turns."""
    from pipeline.records import drafts_from

    return drafts_from(storage.read_bytes(uri), storage.display(uri), prefer)


def lookup_table(fn: Callable, *args):
    """The object-store reference of `fn(*args)` (a side table the rows are joined with), built by a Ray task: side
    tables are benchmark-sized (drafts files, reference answers); larger sets belong in the input rows themselves."""
    import ray

    return ray.remote(num_cpus=SCAN_CPUS)(fn).remote(*args)


def drafts_table(uri: str):
    """The object-store reference of the drafts file's lookup (id or instruction text -> drafts)."""
    return lookup_table(drafts_lookup, uri)


# ---- the index: every block of the input, where it starts, what the stages need to know of it ------------------
INDEX = pa.schema([("uri", pa.string()), ("key", pa.string()), ("source", pa.string()), ("file", pa.int64()),
                   ("block", pa.string()), ("start", pa.int64()), ("line", pa.int64()), ("offset", pa.int64()),
                   ("size", pa.int64()), ("n", pa.int64()), ("kept", pa.int64()), ("turns", pa.int64()), ("to_draft", pa.int64()),
                   ("parsed", pa.bool_())])


def _turns_and_drafts(t: pa.Table) -> tuple[int, int]:
    """A block's most turns and its rows without drafts (and without an error); 0 for a column its schema lacks."""
    names = t.column_names
    turns = (pc.max(pc.list_value_length(t.column("turns"))).as_py() or 0) if t.num_rows and "turns" in names else 0
    if "drafts" not in names:
        return turns, 0
    return turns, pc.sum(pc.and_(pc.is_null(t.column("drafts")), pc.is_null(t.column("error")))).as_py() or 0


def _index_spans(t: dict, task: FileTask, parser: Parser, done: dict, limit: Optional[int]) -> list[dict]:
    """`_index_file` for a plain JSONL file: its blocks from `_spans`, each parsed column-wise where it can be."""
    out, n = [], parser.rows_per_block
    for k, span in enumerate(_spans(task.uri, n, limit)):
        start = k * n
        block = f"{task.key}-{start:09d}"
        turns, to_draft, kept = 0, 0, span.count
        counted = done.get(block) == span.count and limit is None and not parser.skips
        if not counted:
            table = parser.block_table(span)
            if table is None:
                table = parser.rows(_thunks(span, task))
            (turns, to_draft), kept = _turns_and_drafts(table), table.num_rows
        out.append({**t, "block": block, "start": start, "line": int(span.lines[0]), "offset": int(span.offsets[0]),
                    "size": len(span.data), "n": span.count, "kept": kept, "turns": turns, "to_draft": to_draft,
                    "parsed": not counted})
    return out


def _thunks(span: Span, task: FileTask) -> list[Callable[[], tuple]]:
    from pipeline.records import parse_line

    return [lambda raw=raw, n=n: parse_line(raw, n, task.source) for n, raw in span.records()]


def _index_file(batch: pa.Table, parser: Parser, done: dict, limit: Optional[int]) -> pa.Table:
    """One row per block of each file of the batch: its name, first record (line and byte offset), size in records
    (`n`) and in rows (`kept`: fewer where the parser skips records); the blocks not in `done` (block -> rows) are
    parsed for the most turns and the rows without drafts (with a limit or a skipping parser, every block is)."""
    n, out = parser.rows_per_block, []
    for t in batch.to_pylist():
        i, task = t.pop("file"), FileTask(**t)
        if _seekable(task.uri):
            try:
                out += _index_spans(t | {"file": i}, task, parser, done, limit)
                continue
            except OSError:  # a file that cannot be read: the record path makes it an error row
                pass
        chunk: list = []

        def emit(chunk):
            start = len(out_blocks) * n
            block = f"{task.key}-{start:09d}"
            # a block already written is only counted (with a limit, which may cut it, every block is parsed)
            counted = done.get(block) == len(chunk) and limit is None and not parser.skips
            rows = None if counted else parser.rows([c[0] for c in chunk])
            turns, to_draft = _turns_and_drafts(rows) if rows is not None else (0, 0)
            out_blocks.append(block)
            out.append({**t, "file": i, "block": block, "start": start, "line": chunk[0][1], "offset": chunk[0][2],
                        "size": -1, "n": len(chunk), "kept": len(chunk) if rows is None else rows.num_rows,
                        "turns": turns, "to_draft": to_draft, "parsed": rows is not None})

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
    """Every block of the input (a Ray task per file, SCAN_CPUS each: O(blocks) rows come back), in file order;
    `limit`: only the first `limit` rows over the files in order. Plain tasks rather than a Dataset: a pass this
    short is mostly start-up, and Ray Data's budget starts one task at a time where the scheduler runs as many as
    there are CPUs at once (1M rows in 4 files on 2 CPUs: 7.5 s as a Dataset)."""
    import dataclasses

    import ray

    index_file = ray.remote(num_cpus=SCAN_CPUS)(_index_file)
    parser_ref, done_ref = ray.put(parser), ray.put(done)
    refs = [index_file.remote(pa.Table.from_pylist([dataclasses.asdict(t) | {"file": i}]), parser_ref, done_ref, limit)
            for i, t in enumerate(tasks)]
    pending, t0, said = list(refs), time.monotonic(), time.monotonic()
    while pending:  # a long pass (many or large files) says how far it is, every ~30 s
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=5.0)
        if pending and time.monotonic() - said >= 30:
            said = time.monotonic()
            print(f"[index] {len(refs) - len(pending)} of {len(refs)} input file(s) indexed in "
                  f"{said - t0:.0f} s", flush=True)
    index = [b for part in ray.get(refs) for b in part.to_pylist()]
    index.sort(key=lambda b: (b["file"], b["start"]))
    if limit is not None:
        kept, left = [], limit
        for b in index:
            if left <= 0:
                break
            if b["kept"] > left:  # the block the limit cuts: its first `left` rows (the block's info: upper bounds)
                b = dict(b, kept=left, n=left if b["n"] == b["kept"] else b["n"])
            kept.append(b)
            left -= b["kept"]
        index = kept
    return index


def _read_block(batch: pa.Table, parser: Parser) -> pa.Table:
    """The rows of one block (an index row): read from its first record on; bad records are error rows."""
    (b,) = batch.to_pylist()
    task = FileTask(b["uri"], b["key"], b["source"])
    if b["size"] >= 0:  # a JSONL block: its bytes in one read, parsed column-wise where it can be
        span = next(_spans(task.uri, b["n"], None, max(1, b["size"]), b["offset"], b["line"], b["size"]))
        rows = parser.block_table(span)
        if rows is None:
            rows = pa.Table.from_pylist(parser.dicts(_thunks(span, task)), schema=parser.schema)
        rows = rows.slice(0, b["kept"])
    else:
        seek = b["offset"] >= 0
        thunks = []
        for k, (th, _, _) in enumerate(_records(task, b["offset"] if seek else 0, b["line"] if seek else 1)):
            if not seek and k < b["start"]:
                continue
            thunks.append(th)
            if len(thunks) == b["n"]:
                break
        rows = pa.Table.from_pylist(parser.dicts(thunks)[:b["kept"]], schema=parser.schema)
    k = rows.num_rows
    return with_keys(rows, pa.table({"_block": [b["block"]] * k, "_row": list(range(b["start"], b["start"] + k)),
                                     "_total": [k] * k}, schema=pa.schema(KEY_FIELDS)))


def _read_group(batch: pa.Table, parser: Parser) -> Iterator[pa.Table]:
    """The rows of a few blocks (index rows), one output block each, as they are read."""
    for i in range(batch.num_rows):
        yield _read_block(batch.slice(i, 1), parser)


def blocks_per_task(blocks: int, cpus: float) -> int:
    """Blocks one read task reads: about four tasks per CPU, READ_GROUP_MAX blocks at most. A task costs Ray about
    as much as a 5,000-row block's own work (~30 ms each on a 2-core machine): 1M rows in 200 blocks streamed in
    9.2 s as 200 tasks and 6.7 s as 20 (a plain `read_json` pipeline's tasks read whole files)."""
    return max(1, min(READ_GROUP_MAX, int(blocks // max(1.0, 4 * cpus))))


def read_blocks(index: list[dict], parser: Parser, num_cpus: float = READ_CPUS):
    """A Dataset of the rows of the blocks of `index`, read and parsed by Ray's workers, each block its own output
    block, so that the blocks stream through the stages (and to storage) one by one, whatever the files' sizes.
    A task reads a few blocks (`blocks_per_task`) where its tasks take whole CPUs (`num_cpus` >= SCAN_CPUS: no
    model stage runs, reads and writes fuse into one task); beside model stages a task reads one block: a read
    task that yields its blocks as the stages take them keeps its CPU share while it waits, and read tasks of 16
    blocks kept the write tasks out of the CPUs left beside the actor pools (1M rows on the tiny model: the first
    block file after 109 s instead of within seconds), where a block's own task costs nothing next to its model
    time."""
    import ray

    per = blocks_per_task(len(index), ray.cluster_resources().get("CPU", 1.0)) if num_cpus >= SCAN_CPUS else 1
    return (ray.data.from_items(index, override_num_blocks=max(1, -(-len(index) // per)))
            .map_batches(_read_group, batch_size=None, batch_format="pyarrow", num_cpus=num_cpus,
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
    `error_rows`, `stats(ok rows)` and `error_stats(error rows)`: numbers, or dicts of numbers), gathered in
    `self.totals` (file -> stats: O(blocks) in the driver) when the write completes."""

    def __init__(self, rows_uri: str, errors_uri: str, schema: pa.Schema, error_columns: list[str],
                 stats: Callable[[pa.Table], dict], error_stats: Optional[Callable[[pa.Table], dict]] = None):
        self.rows_uri, self.errors_uri = rows_uri, errors_uri
        self.schema, self.error_columns, self.stats, self.error_stats = schema, error_columns, stats, error_stats
        self.totals: dict = {}

    def get_name(self) -> str:
        return "WriteBlocks"

    def on_write_start(self, schema=None) -> None:
        storage.make_dir(self.rows_uri)
        storage.make_dir(self.errors_uri)

    def write(self, blocks, ctx) -> dict:
        """A write task's blocks, as they come: a block's rows are held until all of them are there (its `_total`
        input rows), then written as one file; what the task's input holds of a block beyond that is written as a
        piece at the end. A task thus holds only the blocks it has in part."""
        total: dict = {}
        held: dict[str, list[pa.Table]] = {}
        for b in blocks:
            t = b if isinstance(b, pa.Table) else pa.table(b)
            if not t.num_rows:
                continue
            for block in pc.unique(t.column("_block")).to_pylist():
                held.setdefault(block, []).append(t.filter(pc.equal(t.column("_block"), block)))
                piece = pa.concat_tables(held[block], promote_options="permissive")
                if len(pc.unique(piece.column("_row"))) == piece.column("_total")[0].as_py():
                    del held[block]
                    total |= self._write_piece(block, piece)
        for block, tables in held.items():
            total |= self._write_piece(block, pa.concat_tables(tables, promote_options="permissive"))
        return total

    def _write_piece(self, block: str, piece: pa.Table) -> dict:
        piece = piece.sort_by("_row")
        # n counts input rows: a stage may emit several output rows per input row (evaluate: one per method)
        n, first, of = (len(pc.unique(piece.column("_row"))), piece.column("_row")[0].as_py(),
                        piece.column("_total")[0].as_py())
        name = f"{block}.p{first:09d}.n{n}.t{of}.parquet"
        failed = pc.invert(pc.is_null(piece.column("error")))
        bad, ok = piece.filter(failed), piece.filter(pc.invert(failed))
        bad = bad.select(self.error_columns)
        if bad.num_rows:
            _write_parquet(storage.join(self.errors_uri, name), bad)
        ok = ok.select(self.schema.names).cast(self.schema)
        _write_parquet(storage.join(self.rows_uri, name), ok)
        # the rows' and the error rows' stats add up (both may count the same things: answers in, dropped)
        return {name: add(add({"rows_out": ok.num_rows, "error_rows": bad.num_rows}, self.stats(ok)),
                          self.error_stats(bad) if self.error_stats else {})}

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
                    stats: Callable[[pa.Table], dict], error_columns: Optional[list[str]] = None,
                    error_stats: Optional[Callable[[pa.Table], dict]] = None) -> dict[str, dict]:
    """What `BlockSink` returned for the block files `names` (written by an earlier run), from a Ray Data pass
    over them (`columns` and `error_columns` only), so that a resumed job's summary covers the whole output."""
    import json

    import ray

    if not names:
        return {}
    fs = storage.location(rows_uri)[0]
    paths = [storage.location(storage.join(rows_uri, n))[1] for n in names]
    err_fs, err_dir = storage.location(errors_uri)
    errors = set(storage.list_names(errors_uri))

    def stats_of(name: str, path: str) -> dict:
        t = pq.read_table(path, filesystem=fs, columns=columns)
        more: dict = {}
        if error_stats is not None:
            e = (pq.read_table(f"{err_dir}/{name}", filesystem=err_fs, columns=error_columns) if name in errors
                 else None)
            bad, more = (e.num_rows, error_stats(e)) if e is not None else (0, {})
        else:
            bad = pq.read_metadata(f"{err_dir}/{name}", filesystem=err_fs).num_rows if name in errors else 0
        return add(add({"rows_out": t.num_rows, "error_rows": bad}, stats(t)), more)

    def one(batch: dict) -> dict:
        out = []
        for name, path in zip(batch["name"], batch["path"]):
            for attempt in range(READ_ATTEMPTS):
                try:
                    out.append(json.dumps(stats_of(name, path)))
                    break
                except OSError as e:  # a storage read that failed after the client's own retries
                    if attempt + 1 == READ_ATTEMPTS:
                        raise OSError(f"could not read block file {name} of {storage.display(rows_uri)} (or its "
                                      f"error rows) after {READ_ATTEMPTS} attempts: {type(e).__name__}: {e}") from e
                    time.sleep(2**attempt)
                except Exception as e:
                    raise RuntimeError(f"could not sum block file {name} of {storage.display(rows_uri)}: "
                                       f"{type(e).__name__}: {e}") from e
        return {"name": batch["name"], "stats": out}

    ds = ray.data.from_items([{"name": n, "path": p} for n, p in zip(names, paths)])
    return {r["name"]: json.loads(r["stats"]) for r in ds.map_batches(one, batch_size=64, num_cpus=SCAN_CPUS).iter_rows()}


IDS_PER_TASK = 5_000_000  # ids one duplicate-check task holds (a set of strings: a few hundred MB at most)


def _repeated_ids(paths: list[str], uri: str, part: int, parts: int, show: int,
                  key: tuple = ("id",)) -> tuple[int, list[str]]:
    """Keys (the `key` columns, joined by "/") seen more than once among the files whose hash falls in `part` of
    `parts`: counted by an Arrow group-by (no Python object per key unless the keys are split in parts)."""
    import zlib

    fs = storage.location(uri)[0]
    keys = []
    for p in paths:
        t = pq.read_table(p, filesystem=fs, columns=list(key))
        ids = t.column(0) if len(key) == 1 else pc.binary_join_element_wise(*[t.column(k) for k in key], "/")
        ids = ids.cast(pa.string())
        if parts > 1:
            ids = ids.filter(pa.array([zlib.crc32(i.encode()) % parts == part for i in ids.to_pylist()]))
        keys += ids.chunks
    if not keys:
        return 0, []
    counts = pa.table({"k": pa.chunked_array(keys, pa.string())}).group_by("k").aggregate([("k", "count")])
    repeated = counts.filter(pc.greater(counts.column("k_count"), 1)).column("k")
    return len(repeated), pc.take(repeated, pc.sort_indices(repeated)[:show]).to_pylist()


def duplicate_ids(rows_uri: str, errors_uri: str, rows: int, show: int = 10,
                  key: tuple = ("id",)) -> tuple[int, list[str]]:
    """How many ids (values of the `key` columns) occur more than once in the output folders, and some of them: Ray
    tasks over the id column, each holding the ids of one hash partition (IDS_PER_TASK at most); the ids never come
    to the driver."""
    import ray

    paths = [storage.location(storage.join(u, n))[1] for u in (rows_uri, errors_uri) for n in storage.list_names(u)
             if PIECE.match(n)]
    if not paths:
        return 0, []
    parts = max(1, -(-rows // IDS_PER_TASK))
    task = ray.remote(num_cpus=SCAN_CPUS)(_repeated_ids)
    found = ray.get([task.remote(paths, rows_uri, k, parts, show, key) for k in range(parts)])
    return sum(n for n, _ in found), sorted(i for _, ids in found for i in ids)[:show]


# ---- a job's resume bookkeeping --------------------------------------------------------------------------------
@dataclass
class InputInfo:
    """What the stages need to know of the rows to do before they start (one streaming pass over them)."""
    rows: int
    turns: int  # the most turns of any row (at least 1): how many engine rounds a stage runs
    to_draft: int  # rows without drafts (and without an error)


def info_of(blocks: list[dict]) -> InputInfo:
    return InputInfo(rows=sum(b["kept"] for b in blocks), turns=max([1] + [b["turns"] for b in blocks]),
                     to_draft=sum(b["to_draft"] for b in blocks))


def _to_partition(batch: pa.Table, parts: int, done: list[str]) -> pa.Table:
    """The rows with their hash partition of the id as `_block` (the input block and row kept in `_src`, for a
    deterministic order); rows of partitions already written are left out."""
    import zlib

    ids = batch.column("id").to_pylist()
    names = [f"part-{zlib.crc32(str(i).encode()) % parts:05d}" for i in ids]
    src = [f"{b}:{r:09d}" for b, r in zip(batch.column("_block").to_pylist(), batch.column("_row").to_pylist())]
    out = batch.drop_columns(KEY_NAMES).append_column("_block", pa.array(names, pa.string()))
    out = out.append_column("_src", pa.array(src, pa.string()))
    return out.filter(pc.invert(pc.is_in(out.column("_block"), pa.array(done, pa.string())))) if done else out


def _merge_partition(batch: pa.Table, merge: Callable, schema: pa.Schema) -> pa.Table:
    """One hash partition's rows (in input order) -> `merge(rows)`, numbered as the partition's block."""
    batch = batch.sort_by("_src")
    block = batch.column("_block")[0].as_py()
    rows = pa.Table.from_pylist(merge(batch.drop_columns(["_block", "_src"]).to_pylist(maps_as_pydicts="strict")),
                                schema=schema)
    k = rows.num_rows
    return with_keys(rows, pa.table({"_block": [block] * k, "_row": list(range(k)), "_total": [k] * k},
                                    schema=pa.schema(KEY_FIELDS)))


class BlockJob:
    """The blocks of a job's input and what its output folders (`rows`, `errors` under `out`) hold of them.

    `todo()` cleans up what a killed run left half-written and gives the rows of the blocks not yet written whole
    (and what the stages need to know of them); `finish(totals, ...)` checks that every block is whole and adds up
    the summary's totals over the whole output (files written by earlier runs included).

    `per_row`: output rows per input row (evaluate: one per method); `key`: the columns that name an output row;
    `settings`: what else the written rows depend on (evaluate's methods): a rerun with other settings redoes every
    block, saying so. `merge(rows) -> rows`: the rows of one id, wherever they are in the input, are merged
    (build_states' flat layout, one row per answer): the blocks are then hash partitions of the id (about
    `rows_per_block` input rows each), gathered by a Ray Data groupby, and a rerun redoes the partitions not yet
    written."""

    def __init__(self, name: str, out: str, files: list[str], root: str, parser: Parser, limit: int | None,
                 per_row: int = 1, key: tuple = ("id",), settings: dict | None = None,
                 merge: Optional[Callable[[list[dict]], list[dict]]] = None):
        import json

        from jobs.common.config import ConfigError

        self.name, self.parser, self.limit, self.per_row, self.key = name, parser, limit, per_row, key
        self.settings, self.merge = settings, merge
        self.rows_uri, self.errors_uri = storage.join(out, "rows"), storage.join(out, "errors")
        if not files:
            raise ConfigError([f"input: no input file at {root!r}"])
        self.tasks = file_tasks(files, root)
        # another rows_per_block names other blocks: refused (another limit only cuts a file's last block elsewhere:
        # a block whose size changed is redone)
        self.manifest = storage.join(out, "blocks.json")
        self.old = json.loads(storage.read_bytes(self.manifest)) if storage.exists(self.manifest) else {}
        if (self.old.get("rows_per_block", parser.rows_per_block) != parser.rows_per_block
                and scan(self.rows_uri).complete):
            raise ConfigError([f"output.path {storage.display(out)!r} holds blocks of {self.old['rows_per_block']} "
                               f"rows, and rows_per_block is {parser.rows_per_block}: use the same rows_per_block to "
                               "resume, a new output.path, or delete that one to start over"])
        self.out, self.processed = out, 0

    def _settings(self, settings) -> None:
        """Record the settings the output is written with; other settings than the output's: redo every block."""
        import json

        old = self.old.get("settings", settings)
        if old != settings and (s := scan(self.rows_uri)).complete:
            print(f"[{self.name}] {storage.display(self.out)} was written with {old}, this run has {settings}: "
                  f"its {len(s.complete)} block(s) are redone", flush=True)
            clean(self.rows_uri, self.errors_uri, Scan({}, s.complete | s.incomplete, {}, s.temporary))
        storage.write_text(self.manifest, json.dumps({"rows_per_block": self.parser.rows_per_block,
                                                      "settings": settings}))

    def todo(self, cpus: Callable[[InputInfo], float] = lambda info: READ_CPUS):
        """(Dataset of the rows to do, InputInfo of them). `cpus(info)`: the CPUs of a read task (READ_CPUS beside
        model stages; a job that runs none can give its reads whole CPUs)."""
        if self.merge is not None:
            return self._todo_merged()
        self._settings(self.settings)
        s = scan(self.rows_uri)
        index = index_blocks(self.tasks, self.parser, s.rows, self.limit)
        for b in index:  # written whole under another limit: the block's size changed
            if s.rows.get(b["block"], b["kept"]) != b["kept"]:
                s.incomplete[b["block"]] = s.complete.pop(b["block"])
                del s.rows[b["block"]]
        if s.incomplete or s.temporary:
            print(f"[{self.name}] resume: {len(s.incomplete)} block(s) written only in part are redone", flush=True)
        clean(self.rows_uri, self.errors_uri, s)
        todo = [b for b in index if b["block"] not in s.complete and b["kept"]]
        info = info_of(todo)
        self.processed = info.rows
        print(f"[{self.name}] {len(self.tasks)} input file(s), {len(index)} block(s) of up to "
              f"{self.parser.rows_per_block} rows; {len(s.complete)} block(s) "
              f"({sum(b['kept'] for b in index) - info.rows} rows) already written in {storage.display(self.rows_uri)}; "
              f"{info.rows} rows to do", flush=True)
        return read_blocks(todo, self.parser, cpus(info)), info

    def _todo_merged(self):
        index = index_blocks(self.tasks, self.parser, {}, self.limit)
        records = sum(b["kept"] for b in index)
        parts = max(1, -(-records // self.parser.rows_per_block))
        self._settings({**(self.settings or {}), "partitions": parts})
        s = scan(self.rows_uri)
        if s.incomplete or s.temporary:
            print(f"[{self.name}] resume: {len(s.incomplete)} partition(s) written only in part are redone", flush=True)
        clean(self.rows_uri, self.errors_uri, s)
        info = info_of(index)
        self.processed = info.rows
        print(f"[{self.name}] {len(self.tasks)} input file(s), {records} input rows in {parts} partition(s) by id; "
              f"{len(s.complete)} partition(s) already written in {storage.display(self.rows_uri)}", flush=True)
        ds = (read_blocks([b for b in index if b["kept"]], self.parser)
              .map_batches(_to_partition, batch_format="pyarrow", num_cpus=READ_CPUS,
                           fn_kwargs=dict(parts=parts, done=sorted(s.complete)))
              .groupby("_block")
              .map_groups(_merge_partition, batch_format="pyarrow", num_cpus=READ_CPUS,
                          fn_kwargs=dict(merge=self.merge, schema=self.parser.schema)))
        return ds, info

    def finish(self, totals: dict[str, dict], columns: list[str], stats: Callable[[pa.Table], dict],
               error_columns: Optional[list[str]] = None,
               error_stats: Optional[Callable[[pa.Table], dict]] = None) -> dict:
        """The summary's totals over every block file (`totals`: file -> stats of the files this run wrote), with
        `rows_in` and `blocks`; raises if a block is not whole."""
        s = scan(self.rows_uri)
        if s.incomplete:
            raise RuntimeError(f"internal error: blocks written only in part: {sorted(s.incomplete)[:5]}")
        names = [n for fs in s.complete.values() for n in fs]
        known = {n: totals[n] for n in names if n in totals}
        known |= totals_of_files(self.rows_uri, self.errors_uri, [n for n in names if n not in known], columns, stats,
                                 error_columns, error_stats)
        total: dict = {}
        for n in names:
            total = add(total, known[n])
        total["rows_in"], total["blocks"] = sum(s.rows.values()), len(s.complete)
        total["duplicate_ids"], sample = duplicate_ids(self.rows_uri, self.errors_uri, total["rows_in"] * self.per_row,
                                                       key=self.key)
        if sample:
            print(f"[{self.name}] WARNING: {total['duplicate_ids']} id(s) occur more than once in the input (every row "
                  f"was processed; exports keyed by id will repeat them), e.g. {sample}", flush=True)
        if total.get("rows_out", 0) + total.get("error_rows", 0) != total["rows_in"] * self.per_row:
            raise RuntimeError(f"internal error: {total['rows_in']} rows in (x {self.per_row}), but "
                               f"{total.get('rows_out', 0)} rows and {total.get('error_rows', 0)} error rows written")
        return total
