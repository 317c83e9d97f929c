"""DiffPO's Jacobi refinement: shared types and the reference algorithm.

The reference algorithm is the published DiffPO inference, kept deliberately plain so the fast engine
(`pipeline/decoding/engine.py`) can be checked against it token for token:

1. the aligner's context (prompt) plus the first `r` draft tokens are held fixed;
2. the next `block_size` draft tokens (padded if the draft is short) are the initial Jacobi state;
3. each iteration runs ONE forward pass over fixed + state, takes the argmax at every state position and
   replaces the state with it (the fixed part never changes), until the state is a fixed point or
   `max_iter` passes were spent;
4. the block is appended to the fixed part and the next block starts from the following draft tokens,
   until an end-of-turn/EOS token or `max_new_tokens`.

A greedy Jacobi fixed point is exactly the greedy autoregressive continuation, so a converged run
returns what `generate(do_sample=False)` would; the draft only changes how many passes it takes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.decoding.settings import RefineSettings, reserve_count, reserve_draw  # noqa: F401 (re-exported)


@dataclass
class RefineItem:
    """One row, already tokenized: the aligner's context and the draft answer."""

    prompt_ids: list[int]
    draft_ids: list[int]
    reserved: int = 0  # the first `reserved` draft tokens are held fixed
    max_new_tokens: int | None = None  # this row's answer cap (at most the settings' cap); None: the settings'

    def cap(self, settings: "RefineSettings") -> int:
        if self.max_new_tokens is None:
            return settings.max_new_tokens
        return max(1, min(self.max_new_tokens, settings.max_new_tokens))


@dataclass
class RefineResult:
    """One refined answer and what the engine that computed it can tell about it. The Jacobi engines (fast,
    reference) report passes and convergence; the greedy-continuation engines (ar, vllm) run no Jacobi
    iteration, so those are None there, and they report `generated_tokens` instead."""

    token_ids: list[int]  # the answer (reserved draft tokens + refined tokens), without the stop token
    passes: int | None = 0  # Jacobi forward passes, the prefill not included; None: not a Jacobi engine
    tokens_computed: int = 0  # token positions run through the model, prefill included
    converged: bool | None = True  # False if a block was accepted at max_iter short of its fixed point; None: not Jacobi
    stop: str = "eos"  # "eos", "max_new_tokens", or "timeout" (cut off by the caller's time budget)
    wall_s: float = 0.0
    reserved: int = 0
    text: str = ""
    extra: dict = field(default_factory=dict)
    generated_tokens: int | None = None  # greedy-continuation engines: tokens generated, a stop token included

    @property
    def jacobi(self) -> bool:
        """Whether a Jacobi engine computed this result (so passes, tokens per pass and convergence mean something)."""
        return self.passes is not None

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids) - self.reserved

    @property
    def tokens_per_pass(self) -> float | None:
        """Answer tokens finalized per Jacobi pass (0.0 when no pass ran); None for a non-Jacobi engine."""
        if self.passes is None:
            return None
        return self.new_tokens / self.passes if self.passes else 0.0


def first_stop(tokens: list[int], stop_ids) -> int | None:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return i
    return None


@torch.inference_mode()
def reference_refine(model, item: RefineItem, settings: RefineSettings, stop_ids, pad_id: int,
                     max_time: float | None = None) -> RefineResult:
    """The published DiffPO/CLLM Jacobi loop for one row: full forward passes, no KV cache.

    `max_time` (seconds, None = no limit): once a pass ends past it, the row stops with `stop="timeout"` and
    the answer accepted so far (a pass is never interrupted, so the overrun is at most one pass)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    stop_ids = set(stop_ids)
    r = item.reserved
    answer = list(item.draft_ids[:r])
    fixed = list(item.prompt_ids) + answer
    pos = r  # draft cursor
    passes = computed = 0
    converged, stop = True, "max_new_tokens"
    cap = item.cap(settings)
    hit = first_stop(answer, stop_ids)
    if hit is not None:
        return RefineResult(answer[:hit], 0, 0, True, "eos", time.perf_counter() - t0, hit)
    while len(answer) < cap:
        n = min(settings.block_size, cap - len(answer))
        block = list(item.draft_ids[pos:pos + n])
        block += [pad_id] * (n - len(block))
        for _ in range(settings.max_iter):
            ids = torch.tensor([fixed + block], device=device)
            logits = model(input_ids=ids).logits[0]
            passes += 1
            computed += ids.shape[1]
            new = logits[len(fixed) - 1: len(fixed) - 1 + n].argmax(-1).tolist()
            if new == block:
                break
            block = new
            if max_time is not None and time.perf_counter() - t0 > max_time:
                return RefineResult(answer, passes, computed, converged, "timeout", time.perf_counter() - t0, r)
        else:
            converged = False
        hit = first_stop(block, stop_ids)
        if hit is not None:
            answer += block[:hit]
            stop = "eos"
            break
        answer += block
        fixed += block
        pos += n
    return RefineResult(answer, passes, computed, converged, stop, time.perf_counter() - t0, r)
