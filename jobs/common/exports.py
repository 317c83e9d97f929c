"""Single-file exports of a job's output folders (`jobs.common.blocks`), streamed a block file at a time: the
aligned rows as one Parquet / JSONL file, the error rows as errors.jsonl, answers in FastChat's (MT-bench) and
AlpacaEval's formats. They are for benchmark-sized outputs; large datasets stay in their Parquet folders.

    exports.stream(rows_folder, [exports.table_writer(uri, schema), exports.fastchat_writer(uri, model, key)])

Rows come in the blocks' order (input file, then row). Each file is written atomically (`storage.atomic_path`).
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.common import storage
from jobs.common.blocks import PIECE


def block_files(folder: str) -> list[str]:
    """The block files of an output folder, in the blocks' order."""
    return [storage.join(folder, n) for n in storage.list_names(folder) if PIECE.match(n)]


def tables(folder: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
    for uri in block_files(folder):
        fs, path = storage.location(uri)
        yield pq.read_table(path, filesystem=fs, columns=columns)


def first_rows(folder: str, n: int) -> list[dict]:
    out: list[dict] = []
    if n <= 0:
        return out
    for t in tables(folder):
        if len(out) >= n:
            break
        out += t.slice(0, n - len(out)).to_pylist()
    return out


class _Writer:
    """A file being exported: `write(table)` per block file, `close()` commits it, `abort()` leaves nothing."""

    def __init__(self, uri: str):
        self._cm = storage.atomic_path(uri)
        self.fs, self.path = self._cm.__enter__()

    def write(self, table: pa.Table) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._cm.__exit__(None, None, None)

    def abort(self, e: BaseException) -> None:
        with contextlib.suppress(BaseException):
            self._cm.__exit__(type(e), e, e.__traceback__)


class _Parquet(_Writer):
    def __init__(self, uri: str, schema: pa.Schema | None):
        super().__init__(uri)
        self.schema, self.writer = schema, None

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema) if self.schema is not None else table
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, filesystem=self.fs)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is None:  # nothing to export: an empty file with the schema
            pq.write_table((self.schema or pa.schema([])).empty_table(), self.path, filesystem=self.fs)
        else:
            self.writer.close()
        super().close()


class _Lines(_Writer):
    """JSON lines of each row as `record(row)` makes it; `array=True`: one JSON array instead (AlpacaEval)."""

    def __init__(self, uri: str, record=lambda r: r, array: bool = False):
        super().__init__(uri)
        self.record, self.array, self.n = record, array, 0
        self.f = self.fs.open_output_stream(self.path)
        if array:
            self.f.write(b"[")

    def write(self, table: pa.Table) -> None:
        for r in table.to_pylist():
            text = json.dumps(self.record(r), ensure_ascii=False, default=str)
            if self.array:
                text = ("," if self.n else "") + "\n" + text
            else:
                text += "\n"
            self.f.write(text.encode())
            self.n += 1

    def close(self) -> None:
        if self.array:
            self.f.write(b"\n]\n")
        self.f.close()
        super().close()


def table_writer(uri: str, schema: pa.Schema | None) -> _Writer:
    """The rows as they are: Parquet if `uri` ends with .parquet, else JSON lines."""
    return _Parquet(uri, schema) if uri.partition("?")[0].endswith(".parquet") else _Lines(uri)


def fastchat_record(r: dict, model_id: str, turns_key: str, now: float) -> dict:
    """One question of FastChat's answer-file format (MT-bench), with every turn."""
    return {"question_id": int(r["id"]) if str(r["id"]).isdigit() else r["id"], "answer_id": f"{model_id}-{r['id']}",
            "model_id": model_id, "choices": [{"index": 0, "turns": list(r[turns_key])}], "tstamp": now}


def alpaca_eval_record(r: dict, model_id: str, answer_key: str) -> dict:
    """One entry of AlpacaEval's model-outputs format (instruction / output / generator)."""
    return {"instruction": r["prompt"], "output": r[answer_key], "generator": model_id,
            **({"dataset": r["meta"]["dataset"]} if (r.get("meta") or {}).get("dataset") else {})}


def fastchat_writer(uri: str, model_id: str, turns_key: str) -> _Writer:
    """Answers in FastChat's answer-file format (MT-bench): one line per question with every turn."""
    now = time.time()
    return _Lines(uri, lambda r: fastchat_record(r, model_id, turns_key, now))


def alpaca_eval_writer(uri: str, model_id: str, answer_key: str) -> _Writer:
    """Answers in AlpacaEval's model-outputs format (a JSON array of instruction / output / generator)."""
    return _Lines(uri, lambda r: alpaca_eval_record(r, model_id, answer_key), array=True)


def stream(folder: str, writers: list[_Writer]) -> None:
    """Every block file of `folder` through every writer, one file in memory at a time."""
    if not writers:
        return
    try:
        for t in tables(folder):
            for w in writers:
                w.write(t)
    except BaseException as e:
        for w in writers:
            w.abort(e)
        raise
    for w in writers:
        w.close()


def only(column: str, value, writer: _Writer) -> _Writer:
    """`writer`, given only the rows whose `column` is `value` (evaluate: one method's answers)."""
    return _Only(column, value, writer)


class _Only(_Writer):

    def __init__(self, column: str, value, writer: _Writer):
        self.column, self.value, self.writer = column, value, writer

    def write(self, table: pa.Table) -> None:
        import pyarrow.compute as pc

        self.writer.write(table.filter(pc.equal(table.column(self.column), self.value)))

    def close(self) -> None:
        self.writer.close()

    def abort(self, e: BaseException) -> None:
        self.writer.abort(e)
