"""Predicted Outputs accounting: accepted / rejected prediction tokens on hand-computed cases."""
import pytest

from pipeline.decoding.prediction import prediction_counts, prediction_tokens
from pipeline.prompts import answer_ids
from tests.tiny import tiny_tokenizer


@pytest.mark.parametrize("prediction, completion, counts", [
    ([5, 6, 7], [5, 6, 7], (3, 0)),  # the completion is the prediction
    ([1, 2, 3, 4, 5], [1, 2, 9, 4, 5, 6], (4, 1)),  # 3 replaced by 9: [1 2] and [4 5] kept, 6 added
    ([1, 2, 3, 4], [1, 4], (2, 2)),  # 2 and 3 dropped
    ([1, 2, 3], [1, 2, 7, 7, 3], (3, 0)),  # insertions reject nothing
    ([1, 2, 3], [3, 2, 1], (1, 2)),  # in order only: one of them
    ([7, 7, 7], [7], (1, 2)),  # a completion token matches one prediction token
    ([], [1, 2], (0, 0)),
    ([1, 2], [], (0, 2)),
])
def test_prediction_counts_by_hand(prediction, completion, counts):
    assert prediction_counts(prediction, completion) == counts
    assert prediction_tokens(prediction, completion) == dict(zip(("accepted", "rejected"), counts))


def test_prediction_counts_on_text_with_a_byte_level_tokenizer():
    tok = tiny_tokenizer()  # one token per byte
    pred = answer_ids(tok, "The sky is blue.")
    assert len(pred) == 16
    # every prediction token kept, "very " inserted
    assert prediction_counts(pred, answer_ids(tok, "The sky is very blue.")) == (16, 0)
    # " is blue." (9) and "The s" (5) kept; "ky" rejected
    assert prediction_counts(pred, answer_ids(tok, "The sea is blue.")) == (14, 2)
    assert prediction_counts(pred, answer_ids(tok, "")) == (0, 16)
