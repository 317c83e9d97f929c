"""OpenAI Predicted Outputs accounting: how much of a client's prediction made it into the completion.

OpenAI reports `accepted_prediction_tokens` (tokens of the prediction that appear in the completion) and
`rejected_prediction_tokens` (the rest). Here both are counted on token ids of one tokenizer: the prediction's
tokens matched in order against the completion's by difflib's matching blocks (longest common block first,
then recursively left and right of it; close to, but not always, the longest common subsequence).
"""
from __future__ import annotations

from difflib import SequenceMatcher


def prediction_counts(prediction_ids, completion_ids) -> tuple[int, int]:
    """(accepted, rejected): prediction tokens found in order in the completion, and the others."""
    pred, comp = list(prediction_ids), list(completion_ids)
    blocks = SequenceMatcher(None, pred, comp, autojunk=False).get_matching_blocks()
    accepted = sum(b.size for b in blocks)
    return accepted, len(pred) - accepted


def prediction_tokens(prediction_ids, completion_ids) -> dict:
    """The counts as the deployments report them: {"accepted": a, "rejected": r}."""
    accepted, rejected = prediction_counts(prediction_ids, completion_ids)
    return {"accepted": accepted, "rejected": rejected}
