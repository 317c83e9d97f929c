"""DiffPO's output as one greedy continuation, so that any exact greedy engine can compute it.

A greedy Jacobi fixed point is the greedy autoregressive continuation of what is held fixed: the aligner's
prompt plus the `r` reserved draft tokens. So the DiffPO answer of a row is

    answer = draft[:r] + greedy_continuation(prompt_ids + draft[:r], max_tokens = cap - r, stop at stop_ids)

which is what the Jacobi engines (`jacobi.py`, `engine.py`) converge to, what `generate(do_sample=False)`
returns (the refiner's ``ar`` mode) and what vLLM computes in the batch jobs and the Serve app. This module
holds that recipe once, on the tokenizer side only (no weights, no torch work):

* `ModelText`: what encoding needs of a model: tokenizer, stop ids, context window;
* `AlignerPrompts.encode`: (conversation, draft, row key) -> `RefineItem` with `r` drawn per row, or a
  ValueError that says why the row cannot be refined;
* `continuation(item)` -> the ids to continue and how many tokens to generate;
* `finish(item, generated)` -> the row's `RefineResult`: the answer and stop reason the Jacobi engines would
  have returned; no Jacobi statistics (passes and convergence are None: no Jacobi iteration ran), the number
  of tokens the engine generated instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.decoding.jacobi import RefineItem, RefineResult, first_stop, reserve_count
from pipeline.decoding.settings import RefineSettings
from pipeline.prompts import (DEFAULT_CORRECTION_TEMPLATE, answer_ids, chat_prompt_ids, check_messages,
                              check_template, in_context_messages)


@dataclass
class ModelText:
    """The tokenizer side of a model: enough to build its prompts and read its answers."""

    tokenizer: object
    stop_ids: list[int]  # end-of-turn / EOS ids
    context_window: int | None  # prompt + answer positions the model takes (None: its config does not say)

    def too_long(self, prompt_len: int, cap: int, who: str, limit: int | None = None) -> str | None:
        """Why a prompt of `prompt_len` tokens with `cap` new tokens does not fit `who`'s context window (the
        model's, or `limit` if smaller), or None."""
        windows = [w for w in (self.context_window, limit) if w]
        window = min(windows) if windows else None
        if window and prompt_len + cap > window:
            return (f"prompt of {prompt_len} tokens + max_new_tokens {cap} exceeds {who} context window of "
                    f"{window} tokens")
        return None

    def answer_text(self, ids: list[int]) -> str:
        """The text of an answer's tokens, up to the first stop token (what every engine reports)."""
        cut = first_stop(list(ids), set(self.stop_ids))
        return self.tokenizer.decode(list(ids)[:cut], skip_special_tokens=True).strip()

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.stop_ids[0]


@dataclass
class RefineRequest:
    messages: list[dict]  # the conversation, ending with the user's turn
    draft: str  # the base model's answer to that turn
    key: str = ""  # row id: seeds the number of reserved draft tokens
    max_new_tokens: int | None = None  # answer cap for this request (at most the settings' cap)


class AlignerPrompts:
    """Encodes refine requests for one aligner: its chat prompt (or the correction prompt with the draft in
    context), the draft's tokens, and `r`, drawn from the row key so that batching never changes it."""

    def __init__(self, text: ModelText, settings: RefineSettings | None = None, in_context: bool = False,
                 template: str = DEFAULT_CORRECTION_TEMPLATE, context_window: int | None = None):
        self.text, self.s = text, settings or RefineSettings()
        self.s.validate()
        if in_context:
            check_template(template)
        self.in_context, self.template, self.limit = in_context, template, context_window

    def encode(self, req: RefineRequest) -> RefineItem:
        """Tokenize one request; ValueError with the reason if it cannot be refined."""
        check_messages(req.messages)
        if not isinstance(req.draft, str):
            raise ValueError("draft must be a string")
        tok = self.text.tokenizer
        msgs = in_context_messages(req.messages, req.draft, self.template) if self.in_context else req.messages
        prompt = chat_prompt_ids(tok, msgs)
        draft = answer_ids(tok, req.draft)
        if req.max_new_tokens is not None and req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {req.max_new_tokens})")
        item = RefineItem(prompt_ids=prompt, draft_ids=draft, max_new_tokens=req.max_new_tokens)
        cap = item.cap(self.s)
        why = self.text.too_long(len(prompt), cap, "the aligner's", self.limit)
        if why:
            raise ValueError(why)
        item.reserved = min(reserve_count(req.key, self.s.seed, self.s.reserve_tokens, len(draft)), cap)
        return item


def continuation(item: RefineItem, settings: RefineSettings) -> tuple[list[int], int]:
    """The ids a greedy engine continues (prompt + reserved draft tokens) and how many tokens it may add
    (at least 1: engines refuse 0; `finish` drops what exceeds the cap)."""
    return list(item.prompt_ids) + list(item.draft_ids[:item.reserved]), max(1, item.cap(settings) - item.reserved)


def finish(item: RefineItem, generated: list[int], stop_ids, settings: RefineSettings, wall_s: float = 0.0,
           timed_out: bool = False) -> RefineResult:
    """The row's result from the engine's greedy tokens: the reserved draft tokens + what was generated up to
    the first stop token, capped. `timed_out`: the engine was stopped by a time budget (a row without a stop
    token and under its cap then says "timeout")."""
    held = list(item.draft_ids[:item.reserved])
    cut = first_stop(held, set(stop_ids))
    if cut is not None:  # a stop token among the reserved tokens ends the answer there (as in the Jacobi loop)
        return RefineResult(held[:cut], None, 0, None, "eos", wall_s, cut, generated_tokens=0)
    room = item.cap(settings) - item.reserved
    gen = list(generated)[:room]
    hit = first_stop(gen, set(stop_ids))
    steps = len(gen) if hit is None else hit + 1
    stop = "timeout" if timed_out and hit is None and len(gen) < room else \
        "eos" if hit is not None else "max_new_tokens"
    return RefineResult(held + gen[:hit], passes=None,
                        tokens_computed=len(item.prompt_ids) + item.reserved + steps, converged=None, stop=stop,
                        wall_s=wall_s, reserved=item.reserved, generated_tokens=steps)
