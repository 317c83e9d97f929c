"""How much of a draft an aligner's answer depends on, so that the base model writes only that.

DiffPO's answer is `draft[:r] + greedy_continuation(prompt + draft[:r])` (`continuation.py`), with `r` drawn per
row from its key before any draft exists (`jacobi.reserve_draw`) and capped by the draft's length. An engine that
computes the continuation token by token (`vllm`, `ar`) never reads the draft past its first `r` tokens, so
there the base only has to write a prefix that decides those `r` tokens; the Jacobi engines start from the whole
draft (it buys their speed) and draft-in-context shows it in the aligner's prompt, so they keep full drafts.
A row with `r = 0` needs no draft at all.

The prefix is written as text by the base and read with the aligner's tokenizer, which may differ. It decides
the aligner's first `r` tokens once it holds `r + MARGIN` aligner tokens (a token boundary never moves more than a
few tokens back when text is appended), or when the base stopped by itself before its budget (then it is the
whole draft). `base_budget` picks the base tokens to ask for from the two tokenizers' ratio; `settles` checks the
result, and a prefix that did not settle is drafted again in full. Seeded sampling gives the same first tokens
whatever the length cap (vLLM: one seeded generator per request; HF `generate`: the same batch draws the same
samples step by step), so the prefix is the start of the full draft and the answer is the same token for token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.decoding.settings import reserve_draw
from pipeline.decoding.settings import AnswerSettings
from pipeline.prompts import answer_ids

MARGIN = 4  # aligner tokens past the r-th that a prefix must reach before its first r count as decided
CONTINUATION_ENGINES = ("vllm", "ar")  # engines that read the draft only up to its r-th token
SAMPLE = ("The quick brown fox jumps over the lazy dog. Numbers like 1,234.56 and 2026-12-01, code such as "
          "`for i in range(10): print(i ** 2)`, names like Zürich, naïve café, and a list:\n- one\n- two\n")


def needs_full_draft(engine: str, in_context: bool) -> bool:
    """Whether an aligner's answer depends on more of the draft than its first r tokens. Speculative decoding
    from the draft, once an engine does it, makes the rest of the draft pay again: add that engine here."""
    return in_context or engine not in CONTINUATION_ENGINES


@dataclass(frozen=True)
class PrefixGoal:
    """What a row's draft must hold: `tokens` aligner tokens (r + MARGIN; 0 = no draft needed)."""

    reserved: int  # the row's r draw (the aligner holds min(r, draft length) tokens)
    tokens: int

    @property
    def skip(self) -> bool:
        return self.tokens == 0


def prefix_goal(key: str, settings: AnswerSettings, margin: int = MARGIN) -> PrefixGoal:
    """The prefix a row's answer depends on, from its key and the aligner's settings (no draft, no tokenizer)."""
    r = min(reserve_draw(key, settings.seed, settings.reserve_tokens), settings.max_new_tokens)
    return PrefixGoal(r, 0 if r == 0 else r + margin)


def tokens_ratio(base_tokenizer, aligner_tokenizer) -> float:
    """Base tokens per aligner token, estimated on a mixed sample text (1.0 for the same tokenizer); 1.5x that is
    asked for, so that a text denser in base tokens than the sample still settles."""
    if base_tokenizer is aligner_tokenizer or (
            getattr(base_tokenizer, "name_or_path", None) == getattr(aligner_tokenizer, "name_or_path", 0)
            and len(base_tokenizer) == len(aligner_tokenizer)):
        return 1.0
    b, a = len(answer_ids(base_tokenizer, SAMPLE)), len(answer_ids(aligner_tokenizer, SAMPLE))
    return max(1.0, 1.5 * b / max(1, a))


def base_budget(goal: PrefixGoal, ratio: float, cap: int, margin: int = MARGIN) -> int:
    """Base tokens to ask for so that the prefix usually settles at once (at most the full draft's cap)."""
    return min(cap, math.ceil(goal.tokens * ratio) + margin)


def settles(aligner_tokenizer, text: str, goal: PrefixGoal, whole: bool) -> bool:
    """Whether a drafted prefix decides the aligner's first r tokens: it is the whole draft (`whole`: the base
    stopped by itself, or its budget was the full cap), or it holds `goal.tokens` aligner tokens."""
    return whole or goal.skip or len(answer_ids(aligner_tokenizer, text)) >= goal.tokens
