"""Input records: HH-RLHF dialogues (on the real file) and the formats the batch jobs read."""
import gzip
import json

from pipeline.records import normalize
from tests.conftest import shared_file


def test_hh_rlhf_dialogues_become_prompts_with_the_chosen_answer_as_reference():
    with gzip.open(shared_file("hh_rlhf/harmless-base-test.jsonl.gz"), "rt") as f:
        recs = [json.loads(next(f)) for _ in range(20)]
    for i, rec in enumerate(recs):
        row = normalize(rec, str(i))
        assert row["error"] is None
        last = rec["chosen"].rsplit("\n\nAssistant:", 1)
        assert row["references"] == [last[1].strip()]
        assert row["turns"][0] == last[0].rsplit("\n\nHuman:", 1)[1].strip()
    assert normalize({"chosen": "no turns here"}, "x")["error"]


def test_a_block_normalized_column_wise_is_exactly_what_normalize_gives_or_left_to_it():
    import io

    import pyarrow as pa
    import pyarrow.json as pj

    from pipeline.records import ROW_SCHEMA, normalize_table

    def both(records, **kw):
        t = pj.read_json(io.BytesIO("\n".join(json.dumps(r) for r in records).encode()))
        want = pa.Table.from_pylist([normalize(r, f"f:{i}", **kw) for i, r in enumerate(records)], schema=ROW_SCHEMA)
        return normalize_table(t, **kw), want

    simple = [
        [{"id": "a", "prompt": "x", "draft": "d"}, {"id": "b", "prompt": "y"}],  # a draft, none
        [{"id": 1, "instruction": "x", "output": None, "response": "r", "category": "c"},  # the first non-null draft
         {"id": 2, "instruction": "y", "output": "o", "generator": "g", "reference": "ref"}],
        [{"id": "a", "question": "q", "draft": "", "reference_output": "ro", "reference": "r2", "dataset": "ds",
          "rejected": "rj", "extra": 3}],  # an empty draft is a draft; unknown fields are ignored
        [{"id": "a", "prompt": "\u00e9t\u00e9"}, {"id": "b", "prompt": " \u3000\u4e00"}],  # no ASCII letter, not empty
    ]
    for records in simple:
        got, want = both(records)
        assert got is not None and got.equals(want), (records, got and got.to_pylist(), want.to_pylist())
    got, want = both([{"qid": "q1", "prompt": "x"}], id_key="qid")
    assert got is not None and got.equals(want)
    per_record = [
        [{"id": "a", "prompt": "  "}],  # an empty prompt: normalize's error row
        [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "\u3000\x1c\u2028"}],  # only what str.strip removes
        [{"id": "a", "prompt": "x", "messages": None}],  # another format's field
        [{"id": "a", "prompt": "x"}, {"prompt": "y"}],  # a missing id: the fallback id
        [{"id": "a", "prompt": "x"}, {"id": "b", "instruction": "y"}],  # two prompt fields
        [{"id": "a", "instruction": "x", "input": "more"}],  # Alpaca input
        [{"id": "a", "prompt": "x", "alignment": {"v": 1.0}}],  # its own knobs
        [{"id": "a", "prompt": "x", "category": 3}],  # a number where normalize writes str()
        [{"id": 1.5, "prompt": "x"}],  # a float id
    ]
    for records in per_record:
        assert both(records)[0] is None, records
    assert both(simple[0], fmt="messages")[0] is None, "a forced format other than prompts"
