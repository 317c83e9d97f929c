"""The aligner as one object: conversation + draft in, aligned answer + statistics out.

Modes (all greedy):
* ``fast``       the batched KV-cached Jacobi engine (`engine.FastEngine`) — the default;
* ``reference``  the published DiffPO Jacobi loop (`jacobi.reference_refine`), one row at a time;
* ``ar``         the aligner's own greedy `generate` with KV cache, for comparison
                 (``prompt_lookup`` > 0 turns on transformers' prompt-lookup speculation).
``in_context=True`` switches the aligner's prompt from "chat with the draft as the assistant turn" to a
correction request that also shows the draft (see `prompts.py`); the draft still seeds the Jacobi state.

Streaming (`refine_items(on_final=...)`): ``fast`` reports each row's final tokens after every pass (see
`FastEngine.refine`); ``reference`` reports each row once, when its turn in the one-row-at-a-time loop ends;
``ar`` reports every row once, after the batch's `generate`. In every mode the last report of a row is its
answer's token ids.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pipeline.decoding.continuation import AlignerPrompts, RefineRequest, continuation, finish
from pipeline.decoding.engine import FastEngine
from pipeline.decoding.jacobi import RefineItem, RefineResult, RefineSettings, reference_refine
from pipeline.models import LoadedModel
from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE

__all__ = ["MODES", "RefineRequest", "Refiner"]

MODES = ("fast", "reference", "ar")


class Refiner:
    def __init__(self, lm: LoadedModel, settings: RefineSettings | None = None, mode: str = "fast",
                 in_context: bool = False, template: str = DEFAULT_CORRECTION_TEMPLATE, prompt_lookup: int = 0):
        if mode not in MODES:
            raise ValueError(f"unknown refine mode {mode!r}; choose one of {', '.join(MODES)}")
        self.lm = lm
        self.prompts = AlignerPrompts(lm.text, settings, in_context, template)
        self.s = self.prompts.s
        self.mode, self.in_context, self.template, self.prompt_lookup = mode, in_context, template, prompt_lookup
        self.pad_id = lm.text.pad_id
        self.context_window = lm.context_window
        self._engine = FastEngine(lm.model, self.s, lm.stop_ids, self.pad_id) if mode == "fast" else None

    def encode(self, req: RefineRequest) -> RefineItem:
        """Tokenize one request; ValueError with the reason if it cannot be refined (`AlignerPrompts.encode`)."""
        return self.prompts.encode(req)

    # ---- refinement ------------------------------------------------------------------------------
    def refine(self, reqs: list[RefineRequest], max_time: float | None = None) -> list[RefineResult]:
        return self.refine_items([self.encode(r) for r in reqs], max_time=max_time)

    def refine_items(self, items: list[RefineItem], trace: list[list] | None = None,
                     max_time: float | None = None, on_final: Callable[[int, list[int]], None] | None = None
                     ) -> list[RefineResult]:
        """Refine encoded items. `trace` (fast mode only; one list per item) receives each row's Jacobi
        state before every pass, as token ids (see `FastEngine.refine`). `on_final(i, token_ids)` receives
        item i's answer tokens final so far: a growing list that ends equal to its result's `token_ids`
        (how often depends on the mode: see the module docstring). Results are the same with or without it.

        `max_time` (seconds for the whole call, None = no limit): rows still running when it is spent stop
        with `stop="timeout"` (fast and reference: after the pass that overran it, the reference loop's rows
        sharing what is left in turn; ar: `generate`'s own `max_time`). Rows that finish in time are exact."""
        if trace is not None and self.mode != "fast":
            raise ValueError(f"recording Jacobi states needs mode='fast' (this refiner is mode={self.mode!r})")
        if not items:
            return []
        report = on_final or (lambda i, ids: None)
        if self.mode == "fast":
            results = self._engine.refine(items, trace=trace, max_time=max_time, on_final=on_final)
        elif self.mode == "reference":
            deadline = None if max_time is None else time.perf_counter() + max_time
            results = []
            for i, it in enumerate(items):
                results.append(reference_refine(self.lm.model, it, self.s, self.lm.stop_ids, self.pad_id,
                                                max_time=None if deadline is None else deadline - time.perf_counter()))
                report(i, list(results[-1].token_ids))
        elif self.prompt_lookup:
            deadline = None if max_time is None else time.perf_counter() + max_time
            results = []
            for i, it in enumerate(items):
                left = None if deadline is None else max(1e-3, deadline - time.perf_counter())
                results.append(self._ar_batch([it], left)[0])
                report(i, list(results[-1].token_ids))
        else:
            results = self._ar_batch(items, max_time)
            for i, res in enumerate(results):
                report(i, list(res.token_ids))
        for res in results:
            res.text = self.lm.tokenizer.decode(res.token_ids, skip_special_tokens=True).strip()
        return results

    @torch.inference_mode()
    def _ar_batch(self, items: list[RefineItem], max_time: float | None = None) -> list[RefineResult]:
        """Greedy generate over a left-padded batch (prompt + reserved draft tokens). With `max_time`,
        `generate` stops when it is spent, and a row it cut (no stop token, under its cap) says "timeout"."""
        t0 = time.perf_counter()
        dev = self.lm.device
        ctx, budgets = zip(*(continuation(it, self.s) for it in items))
        width = max(map(len, ctx))
        ids = torch.tensor([[self.pad_id] * (width - len(c)) + c for c in ctx], device=dev)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in ctx], device=dev)
        kw = dict(max_new_tokens=max(budgets), do_sample=False, eos_token_id=self.lm.stop_ids, pad_token_id=self.pad_id,
                  temperature=None, top_p=None, top_k=None)
        if self.prompt_lookup:
            kw["prompt_lookup_num_tokens"] = self.prompt_lookup
        if max_time is not None:
            kw["max_time"] = max_time
        out = self.lm.model.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:].tolist()
        wall = time.perf_counter() - t0
        return [finish(it, gen, self.lm.stop_ids, self.s, wall, timed_out=max_time is not None) for it, gen in zip(items, out)]
