"""The fast Jacobi engine: same fixed point as `jacobi.reference_refine`, far fewer FLOPs.

What it does differently from the reference loop, and why the output cannot change:

* **KV cache of everything final.** Row state is `seq` = context + answer-so-far + the current block.
  A position is *final* once it and everything before it equal the greedy continuation. After a pass
  over inputs seq[m:m+L] we get predictions pred[m+1..m+L]; if the first position past the final frontier
  F where seq != pred is q, then seq[..q-1] were already right and pred[q] is the greedy token given a
  final prefix, so F becomes q, and the keys/values of inputs m..q-1 are final and committed to the cache.
  Each pass therefore finalizes at least one token, and we never recompute a final token again.
* **A window past the frontier.** Only `window` positions past F are recomputed per pass (None = all of
  the block, which reproduces the reference state sequence exactly, max_iter included). With
  `adaptive_window` each row's window doubles while the whole window is accepted and shrinks to the last
  accepted run after a mismatch, down to 1 — one token per pass, the cost of an autoregressive step —
  where the aligner writes its own text. On a CPU a pass over 16 tokens costs ~3 one-token steps, so
  verifying tokens the draft cannot supply is pure loss.
* **Re-seeding from the draft.** Jacobi accepts tokens in parallel only where its state lines up with
  the output position by position; one word inserted by the aligner shifts the rest of the block. After
  a mismatch we look the last accepted n-gram up in the draft and re-seed the unconverged state from the
  draft continuation there. Non-final positions may hold anything without changing the fixed point.
* **Rows finish independently**: as soon as a stop token is final, or the length cap is reached, a row
  leaves the batch (its cache rows are dropped).
* **Streaming.** The final prefix seq[ans:F+1] never changes again, so `refine(on_final=...)` can hand it out
  after every pass: it only grows and ends equal to the row's result (stop token excluded).

A block that spends `max_iter` passes is accepted as is (as in the reference), and flagged.

Attention: full causal attention in every layer works for any decoder (the model builds its own causal mask
from the cache's 2-D validity mask). Sliding-window attention is supported for the families whose forward
pass is known and tested here (`attention_plan`): Gemma-2 and Gemma-3 text models (sliding layers between full
ones; the forward takes one mask per layer type) and Mistral (one window for every layer). For them the
engine builds 4-D masks from token positions (`SlotCache.layer_mask`), since the cache's slots are not
positions; the model's own forward does the rest (Gemma-2's eager attention with its logit soft-capping
included). Anything else with a window, chunked or non-causal attention is refused with the reason.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.decoding.jacobi import RefineItem, RefineResult, RefineSettings, first_stop
from pipeline.decoding.slot_cache import SlotCache


@dataclass
class _Row:
    out: int  # index in the result list
    seq: list[int]
    draft: list[int]
    ans: int  # index in seq where the answer starts
    m: int  # tokens of seq whose keys/values are in the cache
    final: int  # last final position (>= m)
    end: int  # current block end (exclusive)
    delta: int = 0  # seq position p is aligned with draft index p - ans + delta
    block_passes: int = 0
    passes: int = 0
    computed: int = 0
    converged: bool = True
    index: dict | None = None  # n-gram -> end positions in the draft (for re-seeding)
    reserved: int = 0
    w: int = 1  # current window (adaptive)
    cap: int = 0  # answer length cap


def _ngram_index(draft: list[int], max_n: int) -> dict:
    idx: dict = {}
    for n in range(1, max_n + 1):
        for j in range(n - 1, len(draft)):
            idx.setdefault(tuple(draft[j - n + 1:j + 1]), []).append(j)
    return idx


@dataclass(frozen=True)
class AttentionPlan:
    """How the engine masks a model's attention.

    `window` None: every layer attends to the whole prefix, and the model builds its causal masks from the
    cache's 2-D validity mask. Otherwise the sliding layers see `window` positions (the query and the
    window-1 before it) and the engine passes 4-D masks: one per layer type in `keyed` (a forward that takes
    {"full_attention": mask, "sliding_attention": mask}), or, with `keyed` empty, one mask for every layer.
    """

    window: int | None = None
    keyed: tuple[str, ...] = ()


# Families whose forward takes one mask per layer type and applies `sliding_window` to the "sliding_attention"
# layers only (transformers' Gemma2Model / Gemma3TextModel).
_KEYED_FAMILIES = ("gemma2", "gemma3_text")
# Families that apply `sliding_window`, when set, to every layer and ignore `layer_types` (MistralModel).
_ONE_WINDOW_FAMILIES = ("mistral",)
# Attention implementations that take the engine's explicit 4-D masks (eager: additive floats, sdpa: booleans).
_MASKED_IMPLEMENTATIONS = ("eager", "sdpa")


def attention_plan(config) -> AttentionPlan | str:
    """The masks the fast engine gives a model with this (transformers) config, or why it cannot run it."""
    text = config.get_text_config(decoder=True)
    if not getattr(text, "is_causal", True) or getattr(text, "use_bidirectional_attention", False):
        return "the fast engine needs causal attention; this model attends bidirectionally"
    layer_types = list(getattr(text, "layer_types", None) or [])
    window = getattr(text, "sliding_window", None)
    family = config.model_type
    if family in _ONE_WINDOW_FAMILIES:
        plan = AttentionPlan(window=window)
    elif family in _KEYED_FAMILIES:
        other = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if other:
            return f"the fast engine masks full and sliding attention layers; this {family} model also has {other}"
        sliding = "sliding_attention" in layer_types
        if sliding and window is None:
            return f"this {family} model has sliding_attention layers but no sliding_window"
        plan = AttentionPlan(window=window, keyed=tuple(sorted(set(layer_types)))) if sliding else AttentionPlan()
    else:
        if any(t != "full_attention" for t in layer_types):
            return (f"the fast engine needs full causal attention in every layer, or a sliding window in a family it "
                    f"supports ({', '.join(_KEYED_FAMILIES + _ONE_WINDOW_FAMILIES)}); this {family} model has "
                    f"{sorted(set(layer_types))}")
        if window is not None or getattr(text, "attention_chunk_size", None) is not None:
            return (f"the fast engine runs sliding-window attention only for "
                    f"{', '.join(_KEYED_FAMILIES + _ONE_WINDOW_FAMILIES)}; this {family} model sets "
                    f"sliding_window={window}, attention_chunk_size={getattr(text, 'attention_chunk_size', None)}")
        plan = AttentionPlan()
    impl = getattr(config, "_attn_implementation", None)  # None on a bare config: the model decides at load
    if plan.window is not None and impl not in (None,) + _MASKED_IMPLEMENTATIONS:
        return (f"the fast engine masks sliding-window attention for {' and '.join(_MASKED_IMPLEMENTATIONS)} "
                f"attention only; this model uses {impl}")
    return plan


def unsupported_attention(config) -> str | None:
    """Why the fast engine cannot run a model with this (transformers) config, or None if it can."""
    plan = attention_plan(config)
    return plan if isinstance(plan, str) else None


class FastEngine:
    """Batched Jacobi refinement with a per-row KV cache. Stateless between calls."""

    def __init__(self, model, settings: RefineSettings, stop_ids, pad_id: int):
        settings.validate()
        self.model, self.s = model, settings
        self.stop_ids, self.pad_id = set(stop_ids), pad_id
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        self.device = next(model.parameters()).device
        plan = attention_plan(model.config)
        if isinstance(plan, str):
            raise NotImplementedError(f"{plan}. Use mode=reference or mode=ar for it.")
        self.attention = plan

    # ---- row bookkeeping -------------------------------------------------------------------------
    def _draft_at(self, row: _Row, p: int) -> int:
        d = p - row.ans + row.delta
        return row.draft[d] if 0 <= d < len(row.draft) else self.pad_id

    def _open_block(self, row: _Row) -> bool:
        """Start the next block after row.end; False if the answer is at its length cap."""
        room = row.cap - (row.end - row.ans)
        if room <= 0:
            return False
        n = min(self.s.block_size, room)
        row.seq[row.end:] = [self._draft_at(row, p) for p in range(row.end, row.end + n)]
        row.end += n
        row.block_passes = 0
        return True

    def _reseed(self, row: _Row, q: int) -> None:
        """Re-align the state after final position q with the draft, if the last accepted n-gram is in it."""
        expected = q - row.ans + row.delta
        for n in range(min(self.s.reseed_ngram, q + 1), 0, -1):
            ends = row.index.get(tuple(row.seq[q - n + 1:q + 1]))
            if not ends:
                continue
            j = min(ends, key=lambda e: (abs(e - expected), e))
            if n == 1 and abs(j - expected) > 4:  # a lone common token far away is no evidence
                return
            if j + 1 >= len(row.draft):  # nothing left to seed from
                return
            row.delta = j - (q - row.ans)
            for p in range(q + 1, row.end):
                row.seq[p] = self._draft_at(row, p)
            return

    def _window(self, row: _Row) -> int:
        full = row.end - 1 - row.m  # predict up to the block's last position
        if self.s.window is None:
            return full
        return min(full, row.final - row.m + row.w)

    # ---- main loop -------------------------------------------------------------------------------
    @torch.inference_mode()
    def refine(self, items: list[RefineItem], trace: list[list] | None = None,
               max_time: float | None = None, on_final: Callable[[int, list[int]], None] | None = None
               ) -> list[RefineResult]:
        """Refine a batch. `trace` (one list per item) receives, before every pass, the row's Jacobi state:
        the answer so far + the current block, as token ids (CLLM-style trajectories).

        `max_time` (seconds for the whole call, None = no limit): once a pass ends past it, every row still
        running stops with `stop="timeout"` and its final tokens so far; rows that finished before keep
        their exact results (a pass is never interrupted, so the overrun is at most one pass).

        `on_final(i, token_ids)` streams item i's answer: called with its reserved draft tokens before the
        first pass (if it has any), after every pass it ran in with the answer tokens final so far, and once
        more when it finishes. What it gets for a row only grows (each call extends the last one), never holds
        a stop token, and ends equal to the row's `RefineResult.token_ids`. It runs in the engine's thread
        between passes: keep it quick (hand the list on)."""
        t0 = time.perf_counter()
        report = on_final or (lambda i, ids: None)
        results: list[RefineResult | None] = [None] * len(items)
        rows: list[_Row] = []
        for i, it in enumerate(items):
            if len(it.prompt_ids) < 2:
                raise ValueError("the aligner context must hold at least 2 tokens (use a chat template)")
            r = it.reserved
            fixed = list(it.prompt_ids) + list(it.draft_ids[:r])
            cap = it.cap(self.s)
            hit = first_stop(fixed[len(it.prompt_ids):], self.stop_ids)
            if hit is not None or r >= cap:
                ans = fixed[len(it.prompt_ids):][: hit if hit is not None else cap]
                results[i] = RefineResult(ans, 0, 0, True, "eos" if hit is not None else "max_new_tokens",
                                          time.perf_counter() - t0, r)
                report(i, list(ans))
                continue
            if r:
                report(i, list(it.draft_ids[:r]))  # held fixed: final before any pass
            row = _Row(out=i, seq=fixed, draft=list(it.draft_ids), ans=len(it.prompt_ids),
                       m=len(fixed) - 1, final=len(fixed) - 1, end=len(fixed), reserved=r,
                       w=self.s.window or 1, cap=cap)
            if self.s.reseed:
                row.index = _ngram_index(row.draft, self.s.reseed_ngram)
            self._open_block(row)
            rows.append(row)
        if not rows:
            return results

        # committed slots never exceed the longest context + answer; a pass adds at most one block
        cap = max(r.ans + r.cap for r in rows) + min(self.s.block_size, self.s.max_new_tokens) + 1
        cache = SlotCache(self.num_layers, cap)
        self._prefill(rows, cache)
        while rows:
            finished = self._step(rows, cache, results, t0, trace)
            if on_final:
                for row in rows:
                    on_final(row.out, row.seq[row.ans:row.final + 1])
                for i in finished:
                    on_final(i, list(results[i].token_ids))
            if rows and max_time is not None and time.perf_counter() - t0 > max_time:
                for row in rows:
                    row.seq = row.seq[:row.final + 1]
                    results[row.out] = self._result(row, "timeout", t0)
                    report(row.out, list(results[row.out].token_ids))
                break
        return results

    def _forward(self, ids: list[list[int]], cache: SlotCache, lengths: list[int], **kw):
        """One pass: row b's tokens ids[b] (lengths[b] of them, right-padded) continue its committed ones."""
        width = max(lengths)
        dev = self.device
        input_ids = torch.tensor([x + [self.pad_id] * (width - len(x)) for x in ids], device=dev)
        start = torch.tensor(cache.lengths, device=dev)[:, None]
        pos = start + torch.arange(width, device=dev)[None, :]
        return self.model(input_ids=input_ids, attention_mask=self._mask(cache, lengths, width), position_ids=pos,
                          past_key_values=cache, use_cache=True, **kw)

    def _mask(self, cache: SlotCache, lengths: list[int], width: int):
        """The attention mask of a pass over `width` new tokens per row, the first lengths[b] real ones."""
        plan, dev = self.attention, self.device
        if plan.window is None:
            return cache.attention_mask(lengths, width, dev)

        def as_model_mask(window):
            mask = cache.layer_mask(width, window, dev)
            if self.model.config._attn_implementation == "eager":  # additive, as transformers' eager_mask
                return torch.where(mask, torch.zeros((), dtype=self.model.dtype, device=dev),
                                   torch.finfo(self.model.dtype).min)
            return mask

        if not plan.keyed:
            return as_model_mask(plan.window)
        return {t: as_model_mask(plan.window if t == "sliding_attention" else None) for t in plan.keyed}

    def _prefill(self, rows: list[_Row], cache: SlotCache) -> None:
        """Run the fixed prefix (all but its last token) once; its keys/values stay for the whole row."""
        cache.lengths = [0] * len(rows)
        ids = [r.seq[:r.m] for r in rows]
        lengths = [len(x) for x in ids]
        self._forward(ids, cache, lengths, logits_to_keep=1)
        cache.after_prefill(lengths)
        for r, n in zip(rows, lengths):
            r.computed += n

    def _step(self, rows: list[_Row], cache: SlotCache, results: list, t0: float,
              trace: list[list] | None = None) -> list[int]:
        """One pass over every running row; rows that finish leave `rows`. Returns their item indices."""
        if trace is not None:
            for r in rows:
                trace[r.out].append(r.seq[r.ans:r.end])
        lengths = [self._window(r) for r in rows]
        ids = [r.seq[r.m:r.m + n] for r, n in zip(rows, lengths)]
        logits = self._forward(ids, cache, lengths).logits
        preds = logits.argmax(-1).tolist()
        counts, keep, finished = [], [], []
        for b, (row, n) in enumerate(zip(rows, lengths)):
            pred = preds[b]
            row.passes += 1
            row.block_passes += 1
            row.computed += n
            old_final, m0 = row.final, row.m
            q = None
            for p in range(row.final + 1, m0 + n + 1):
                if row.seq[p] != pred[p - m0 - 1]:
                    q = p
                    break
            if q is None:  # every prediction agreed: all inputs and the next token are final
                row.m = row.final = m0 + n
                if self.s.adaptive_window and self.s.window:
                    row.w = min(self.s.window, 2 * row.w)
            else:
                if self.s.adaptive_window and self.s.window:
                    # the state agreed for q - old_final - 1 tokens: expect a run about that long next time
                    row.w = max(1, min(self.s.window, q - old_final - 1))
                row.seq[q] = pred[q - m0 - 1]
                row.m = row.final = q
                row.seq[q + 1:m0 + n + 1] = pred[q - m0:n]  # plain Jacobi update of the window
                if row.index is not None:
                    self._reseed(row, q)
            counts.append(row.m - m0)
            done = self._after_pass(row, old_final)
            if done is None:
                keep.append(b)
            else:
                results[row.out] = self._result(row, done, t0)
                finished.append(row.out)
        cache.commit(counts)
        if len(keep) < len(rows):
            rows[:] = [rows[b] for b in keep]
            if rows:
                cache.keep_rows(keep)
        return finished

    def _after_pass(self, row: _Row, old_final: int) -> str | None:
        """Stop checks and block transitions. Returns the stop reason when the row is done."""
        while True:
            lo = max(old_final + 1, row.ans)
            hit = first_stop(row.seq[lo:row.final + 1], self.stop_ids)
            if hit is not None:
                row.seq = row.seq[:lo + hit]
                return "eos"
            if row.final < row.end - 1:
                if row.block_passes < self.s.max_iter:
                    return None
                row.converged = False  # accept the block as it stands, like the reference
                old_final, row.final = row.final, row.end - 1
                continue
            if not self._open_block(row):
                row.seq = row.seq[:row.end]
                return "max_new_tokens"
            return None

    def _result(self, row: _Row, stop: str, t0: float) -> RefineResult:
        answer = row.seq[row.ans:]
        return RefineResult(answer, row.passes, row.computed, row.converged, stop,
                            time.perf_counter() - t0, row.reserved)
