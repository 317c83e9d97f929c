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
