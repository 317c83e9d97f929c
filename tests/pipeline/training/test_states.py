"""pipeline.training.states: parsing, filters, ranking and the split rule, on plain values (no Ray)."""
import random

import pyarrow as pa
import pytest

from pipeline.training.states import (ROW_SCHEMA, STATES_SCHEMA, RowError, filter_answers, length_problem,
                                      merge_flat, normalize_record, parse_score, rank_states, ranked_row,
                                      repeated_ngram_fraction, split_of, text_problem)

FIELDS = {"id": "id", "prompt": "instruction", "answers": "responses", "text": "output",
          "score": "win_prob_vs_reference", "generator": "generator", "reference": "reference_output"}


def ans(text, score=None, gen="g", drop=None):
    return {"generator": gen, "text": text, "score": score, "raw_score": None, "drop": drop, "detail": ""}


def test_rank_orders_worst_to_best_and_picks_the_target():
    answers = [ans("mid", 0.5, "b"), ans("worst", 0.1, "a"), ans("best", 0.9, "c"), ans("dropped", 5.0, "d", "empty")]
    st = rank_states("7", answers, reference="REF", target="best")
    assert st == {"states": ["worst", "mid", "best"], "scores": [0.1, 0.5, 0.9], "generators": ["a", "b", "c"]}
    st = rank_states("7", [dict(a, drop=a["drop"]) for a in answers], reference="REF", target="reference")
    assert st["states"] == ["worst", "mid", "best", "REF"] and st["scores"][-1] is None
    assert st["generators"][-1] == "reference", "the reference is the target, every answer ranks below it"


def test_rank_ties_do_not_depend_on_input_order_and_duplicates_keep_the_better_copy():
    base = [ans(f"t{i}", 1.0, f"g{i}") for i in range(6)] + [ans("low", 0.0)]
    orders = set()
    for k in range(5):
        xs = [dict(a) for a in base]
        random.Random(k).shuffle(xs)
        orders.add(tuple(rank_states("x", xs, None, seed=3)["states"]))
    assert len(orders) == 1, "equal scores are ordered by a hash of (seed, id, text), not by input order"
    assert next(iter(orders))[0] == "low"
    answers = [ans("same", 0.2, "a"), ans("same ", 0.8, "b"), ans("other", 0.5, "c")]
    st = rank_states("x", answers, None)
    assert st["generators"] == ["c", "b"] and answers[0]["drop"] == "duplicate"
    answers = [ans("REF", 0.9, "a"), ans("other", 0.5, "c")]
    st = rank_states("x", answers, "REF", target="reference")
    assert st["states"] == ["other", "REF"] and answers[0]["drop"] == "duplicate"


def test_rank_rejects_rows_with_too_few_states():
    with pytest.raises(RowError, match="1 state.*min_states is 2.*1 empty") as e:
        rank_states("x", [ans("only", 0.3), ans("", drop="empty")], None, min_states=2)
    assert e.value.kind == "too_few_states"
    with pytest.raises(RowError) as e:
        rank_states("x", [ans("a", 0.3)], None, target="reference")
    assert e.value.kind == "reference"
    assert rank_states("x", [ans("a", 0.3)], "R", target="reference", min_states=2)["states"] == ["a", "R"]


def test_filters():
    assert repeated_ngram_fraction("a b c d a b c d", 4) == pytest.approx(1 - 4 / 5)  # 5 4-grams, 4 distinct
    assert repeated_ngram_fraction("one two three", 4) == 0.0  # fewer words than n
    assert repeated_ngram_fraction("Stop, stop. STOP! stop stop", 1) == pytest.approx(0.8)  # case and punctuation
    assert text_problem("", 4, 0.5)[0] == "empty" and text_problem(" \n", 4, 0.5)[0] == "empty"
    assert text_problem("go " * 40, 4, 0.5)[0] == "repetition"
    assert text_problem("go " * 40, 4, None) is None, "null threshold switches the filter off"
    assert text_problem("A normal answer with several different words in it.", 4, 0.5) is None
    assert length_problem(10, 89, 100) is None  # 10 + 89 + EOS = 100 fits
    assert length_problem(10, 90, 100)[0] == "too_long"
    assert length_problem(10, 10**6, None) is None
    assert parse_score("1.8e-07") == pytest.approx(1.8e-07) and parse_score(3) == 3.0
    assert [parse_score(x) for x in ("n/a", "", None, "nan", float("inf"), True, [1])] == [None] * 7


def test_split_rule_keeps_heldout_ids_out_of_train():
    splits = {i: split_of(str(i), 4, 0, dev_fraction=0.1, seed=0) for i in range(805)}
    assert all((s == "heldout") == (i % 4 == 0) for i, s in splits.items())
    assert sum(s == "heldout" for s in splits.values()) == 202  # ids 0, 4, ..., 804
    dev = [i for i, s in splits.items() if s == "dev"]
    assert 30 < len(dev) < 90 and all(i % 4 for i in dev), "dev is a hashed share of the train ids"
    assert dev == [i for i in range(805) if split_of(str(i), 4, 0, 0.1, 0) == "dev"], "deterministic"
    assert dev != [i for i in range(805) if split_of(str(i), 4, 0, 0.1, 1) == "dev"], "the seed picks the dev ids"
    assert split_of("7", 4, 3) == "heldout" and split_of("7", None, 0) == "train"
    assert {split_of(f"q{i}", 4, 0) for i in range(50)} == {"train", "heldout"}, "string ids: hashed"


def test_rows_are_native_values_of_the_explicit_schemas():
    rec = {"id": 3, "instruction": "Q?", "reference_output": "R", "dataset": "helpful_base", "n": 2,
           "responses": [{"generator": "m", "output": "An answer.", "win_prob_vs_reference": 0.25},
                         {"output": "Other.", "win_prob_vs_reference": "n/a"}]}
    row = normalize_record(rec, "f:1", FIELDS)
    assert row["messages"] == [{"role": "user", "content": "Q?"}] and row["reference"] == "R"
    assert [(a["generator"], a["raw_score"]) for a in row["answers"]] == [("m", "0.25"), ("answer1", "n/a")]
    assert row["meta"] == {"dataset": "helpful_base", "n": "2"} and row["error"] is None
    pa.Table.from_pylist([row, normalize_record("nope", "f:2", FIELDS)], schema=ROW_SCHEMA)  # types fit
    row["answers"][0]["score"], row["answers"][1]["drop"] = 0.25, "no_score"
    out = ranked_row(row, "train", min_states=1)
    assert out["states"] == ["An answer."] and out["answers_in"] == 2
    assert out["dropped"] == [{"generator": "answer1", "reason": "no_score", "detail": ""}]
    assert set(STATES_SCHEMA.names) < set(out)
    bad = ranked_row(normalize_record({"id": 4}, "f:3", FIELDS), "heldout")
    assert bad["error_kind"] == "input" and bad["states"] == [] and bad["split"] == "heldout"


def test_merge_flat_does_not_depend_on_the_order_rows_arrive_in():
    flat = dict(FIELDS, answers=None, text="answer", generator="model", score="score")
    recs = [{"id": "q", "instruction": "Q?", "reference_output": "R", "answer": f"A{k}", "model": f"m{k}",
             "score": k} for k in range(4)]
    rows = [normalize_record(r, f"f:{n}", flat, layout="flat") for n, r in enumerate(recs)]
    merged = merge_flat(rows)
    assert merged == merge_flat(rows[::-1]) and [a["text"] for a in merged["answers"]] == ["A0", "A1", "A2", "A3"]
    other = normalize_record(dict(recs[0], instruction="Another?"), "f:9", flat, layout="flat")
    assert merge_flat(rows + [other])["error"] == "the rows of prompt id q disagree on the messages"


def test_filter_answers_marks_answers_and_rejects_a_bad_reference_target():
    row = {"messages": [{"role": "user", "content": "Q?"}], "reference": "go " * 40, "error": None,
           "error_kind": None, "answers": [ans(""), ans("go " * 40), ans("A fine and varied answer.")]}
    filter_answers(row, None, None, 4, 0.5, check_reference=False)
    assert [a["drop"] for a in row["answers"]] == ["empty", "repetition", None] and row["error"] is None
    filter_answers(row, None, None, 4, 0.5, check_reference=True)
    assert row["error_kind"] == "reference" and "repeated 4-gram" in row["error"]
