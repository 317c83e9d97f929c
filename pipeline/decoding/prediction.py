"""OpenAI Predicted Outputs accounting: how much of a client's prediction made it into the completion.

OpenAI reports `accepted_prediction_tokens` (tokens of the prediction that appear in the completion) and
`rejected_prediction_tokens` (the rest). Here both are counted on token ids of one tokenizer: the prediction's
tokens matched in order against the completion's by difflib's matching blocks (longest common block first,
then recursively left and right of it; close to, but not always, the longest common subsequence).

`prediction_usage` is what an aligner reports for a request with a prediction (the in-process and the vLLM
aligner alike). Tokenizer side only: no torch import here.
"""
from __future__ import annotations

from difflib import SequenceMatcher

from pipeline.prompts import answer_ids, chat_prompt_ids


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


def prediction_usage(tokenizer, messages: list[dict], prediction: str | None, draft: str, draft_ids: list[int],
                     answer: list[int]) -> dict:
    """An aligner's Predicted Outputs accounting for one request: with a `prediction`, its accepted / rejected
    tokens against the `answer`'s ids (on the aligner's tokenizer; when the prediction is the `draft`, its ids
    are the draft's `draft_ids`) as ``prediction_tokens``, and the conversation's prompt tokens as
    ``prompt_tokens`` (no base ran to count them). Without one: an empty dict."""
    if prediction is None:
        return {}
    predicted = draft_ids if prediction == draft else answer_ids(tokenizer, prediction)
    return {"prediction_tokens": prediction_tokens(predicted, answer),
            "prompt_tokens": len(chat_prompt_ids(tokenizer, messages))}
