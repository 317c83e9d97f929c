"""The JSONL block splitter and the column-wise block path against the record-by-record ones (no Ray)."""
import json
import random

import pyarrow as pa

from jobs.common import blocks
from pipeline.records import ROW_SCHEMA, error_row, normalize, normalize_table


def test_spans_split_a_file_as_the_line_reader_does(tmp_path):
    rng = random.Random(1)
    pieces = [b'{"id": "%d"}', b"", b"   ", b" \t", b"\r", b' {"a": 1}', blocks.BOM, b"xx" * 40]
    for trial in range(150):
        parts = [rng.choice(pieces).replace(b"%d", str(i).encode()) for i in range(rng.randint(0, 30))]
        data = (blocks.BOM if rng.random() < 0.3 else b"") + b"\n".join(parts) + rng.choice([b"", b"\n", b"\r\n"])
        f = tmp_path / f"{trial}.jsonl"
        f.write_bytes(data)
        want = list(blocks._lines(str(f)))
        for n in (1, 3, 100):
            for chunk in (1, 7, 1 << 20):  # pieces smaller than a line, a few lines, the whole file
                limit = rng.choice([None, 0, 2, 5])
                got = []
                for sp in blocks._spans(str(f), n, limit, chunk):
                    assert 0 < sp.count <= n
                    assert sp.data == data[sp.offsets[0]:sp.offsets[-1] + sp.lengths[-1]], "the span's own bytes"
                    got += [(ln, int(at), raw) for (ln, raw), at in zip(sp.records(), sp.offsets)]
                assert got == (want if limit is None else want[:limit]), (data, n, chunk, limit)


def test_a_block_reads_the_same_rows_column_wise_and_record_by_record(tmp_path):
    lines = [json.dumps({"id": i, "prompt": f"question {i}", **({"draft": "d"} if i % 2 else {})}).encode()
             for i in range(10)]
    lines[7] = b'{"id": 7, "prompt": "caf\xe9"}'  # not UTF-8: that block goes record by record, with its error row
    f = tmp_path / "in.jsonl"
    f.write_bytes(blocks.BOM + b"\n".join(lines) + b"\n")

    def parser(columnar):
        return blocks.Parser(lambda rec, fid, d: normalize(rec, fid), error_row, ROW_SCHEMA, 4,
                             columnar=normalize_table if columnar else None)

    task = blocks.FileTask(str(f), "k", "in.jsonl")
    fast, slow = parser(True), parser(False)
    index = blocks._index_spans({"uri": str(f), "key": "k", "source": "in.jsonl", "file": 0}, task, fast, {}, None)
    assert [b["n"] for b in index] == [4, 4, 2] and [b["to_draft"] for b in index] == [2, 2, 1]
    paths = []
    for b in index:
        one = pa.Table.from_pylist([b], schema=blocks.INDEX)
        got, want = blocks._read_block(one, fast), blocks._read_block(one, slow)
        assert got.equals(want), b
        span = next(blocks._spans(str(f), b["n"], None, 1 << 20, b["offset"], b["line"], b["size"]))
        paths.append(fast.block_table(span) is not None)
    assert paths == [True, False, True], "column-wise where Arrow reads the block exactly; the bad byte: per record"
    assert "not valid UTF-8" in blocks._read_block(pa.Table.from_pylist([index[1]], schema=blocks.INDEX),
                                                   fast).column("error")[3].as_py()


def test_repeated_ids_are_counted_whole_or_split_in_hash_parts(tmp_path):
    import pyarrow.parquet as pq

    _repeated_ids = blocks._repeated_ids
    files = []
    for k, ids in enumerate([["a", "b", "c"], ["c", "d", "a"], ["e", "a"]]):
        files.append(str(tmp_path / f"f{k}.parquet"))
        pq.write_table(pa.table({"id": ids, "method": ["m"] * len(ids)}), files[-1])
    assert _repeated_ids(files, str(tmp_path), 0, 1, 10) == (2, ["a", "c"])
    assert _repeated_ids(files, str(tmp_path), 0, 1, 1) == (2, ["a"]), "the sample is the first `show`, sorted"
    split = [_repeated_ids(files, str(tmp_path), p, 3, 10) for p in range(3)]
    assert sum(n for n, _ in split) == 2 and sorted(i for _, ids in split for i in ids) == ["a", "c"]
    # a key of two columns, joined by "/"
    assert _repeated_ids(files, str(tmp_path), 0, 1, 10, key=("id", "method")) == (2, ["a/m", "c/m"])


def test_the_sink_writes_each_block_once_whole_as_soon_as_its_rows_are_in(tmp_path):
    """Blocks reach a write task in pieces, interleaved (an actor stage re-batches them): a block whose rows are all
    there is one file; what the task holds of a block beyond that is one piece; the names add up in `scan`."""
    schema = pa.schema([("id", pa.string()), ("error", pa.string())])

    def rows(block, first, n, total, bad=()):
        ids = [f"{block}{r}" for r in range(first, first + n)]
        t = pa.table({"id": ids, "error": ["no" if r in bad else None for r in range(first, first + n)]}, schema)
        return blocks.with_keys(t, pa.table({"_block": [block] * n, "_row": list(range(first, first + n)),
                                             "_total": [total] * n}, schema=pa.schema(blocks.KEY_FIELDS)))

    sink = blocks.BlockSink(str(tmp_path / "rows"), str(tmp_path / "errors"), pa.schema([("id", pa.string())]),
                            ["id", "error"], lambda ok: {"ids": ok.num_rows})
    sink.on_write_start()
    mixed = pa.concat_tables([rows("a", 2, 2, 4), rows("b", 0, 1, 3)])  # a: rows 2-3; b: row 0

    def task_input():
        yield rows("a", 0, 2, 4, bad={1})
        assert not (tmp_path / "rows").joinpath("a.p000000000.n4.t4.parquet").exists(), "a is not whole yet"
        yield mixed
        assert (tmp_path / "rows").joinpath("a.p000000000.n4.t4.parquet").exists(), "a is written once whole"
        yield rows("c", 0, 2, 2)
        yield rows("b", 1, 1, 3)

    total = sink.write(task_input(), None)
    assert sorted(total) == ["a.p000000000.n4.t4.parquet", "b.p000000000.n2.t3.parquet",
                             "c.p000000000.n2.t2.parquet"], "a and c whole, b's two rows as one piece"
    assert total["a.p000000000.n4.t4.parquet"] == {"rows_out": 3, "error_rows": 1, "ids": 3}
    s = blocks.scan(str(tmp_path / "rows"))
    assert sorted(s.complete) == ["a", "c"] and sorted(s.incomplete) == ["b"]
    assert sink.write([rows("b", 2, 1, 3)], None) == {"b.p000000002.n1.t3.parquet": {"rows_out": 1, "error_rows": 0,
                                                                                     "ids": 1}}
    assert sorted(blocks.scan(str(tmp_path / "rows")).complete) == ["a", "b", "c"]
    assert [n for n in sorted((tmp_path / "errors").iterdir())][0].name == "a.p000000000.n4.t4.parquet"


def test_a_read_task_reads_a_few_blocks():
    assert blocks.blocks_per_task(1, 2) == 1 and blocks.blocks_per_task(7, 2) == 1
    assert blocks.blocks_per_task(200, 2) == blocks.READ_GROUP_MAX, "capped"
    assert blocks.blocks_per_task(40, 2) == 5 and blocks.blocks_per_task(40, 1) == 10
