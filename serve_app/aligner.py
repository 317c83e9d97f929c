"""The aligner deployment: refines drafts with the Jacobi engine; concurrent requests are refined together.

``refine(RefineRequest) -> Refined`` (serve_app/replies.py). Encoding (and the
context-window check, and the knob check) happens per request, before batching, so one bad request fails alone
with `BadRequest`. With alignment vectors configured, a batch is split by knob setting and each group runs on
its merged variant (pipeline/vectors/: LRU-cached, switched by pointer swap); the result says whether the
variant came from the cache.

``refine_stream(req)`` (call it with ``handle.options(stream=True)``) is `refine` as it happens: it yields
``{"delta": text}`` while the answer's tokens become final (the engine's `on_final` reports, turned into text by
`pipeline.decoding.streaming.TextStream`; the deltas join to exactly the answer's text) and then
``{"result": <refine's Refined, with first_token_ms>}``. It shares refine's batches; a request that cannot be
refined raises `BadRequest` before the first event.

The Jacobi engines (fast, reference) report their passes, tokens per pass and convergence; ``ar`` (a greedy
`generate`) the tokens it generated instead (`replies.engine_stats`). With a `prediction` (the client's OpenAI
Predicted Outputs text, which the ingress also sends as the draft), the reply adds ``prediction_tokens =
{accepted, rejected}`` (the draft's tokens against the answer's, under the aligner's tokenizer) and
``prompt_tokens`` (the conversation's tokens: no base counted them): `pipeline.decoding.prediction.prediction_usage`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from ray import serve

from pipeline.models import load_model
from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE
from pipeline.decoding.prediction import prediction_usage
from pipeline.decoding.refiner import RefineRequest as RowRequest, Refiner
from pipeline.decoding.streaming import StreamMismatch, TextStream

from .config import aligner_args
from .metrics import RefineMetrics, VariantMetrics
from .protocol import BadRequest
from .replies import Refined, RefineRequest, engine_stats, finish_reason
from .batchwait import AdaptiveWait
from .threads import set_torch_threads

log = logging.getLogger("ray.serve")


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16, max_queued_requests=64,
                  health_check_period_s=10, health_check_timeout_s=30)
class Aligner:
    def __init__(self, name: str, args: dict):
        self.name, self.args = name, aligner_args(args)
        a = self.args
        set_torch_threads(a.torch_threads)
        lm = load_model(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
        self.knobbed = a.knobbed(lm)
        self.refiner = Refiner(lm, a.settings(), mode=a.engine, in_context=a.in_context,
                               template=a.template or DEFAULT_CORRECTION_TEMPLATE)
        self.metrics = RefineMetrics(name)
        self.variant_metrics = VariantMetrics(name) if self.knobbed else None
        self._refine_batch.set_max_batch_size(a.max_batch_size)
        self.window = AdaptiveWait(self._refine_batch, a.batch_wait_timeout_s, a.adaptive_batch_wait)

    async def refine(self, req: RefineRequest, on_final=None) -> Refined:
        """The refined answer; `on_final(token_ids)` (in-replica callers only) gets its final tokens as they grow,
        from the engine's thread."""
        t0 = time.perf_counter()
        try:
            item = self.refiner.encode(RowRequest(req.messages, req.draft, req.key, req.max_tokens))
            knobs = self._knobs(req.alignment)
        except Exception as e:  # over the context window, a template that refuses the conversation, bad knobs ...
            self.metrics.record("rejected")
            raise BadRequest(f"the aligner cannot refine this request: {e}") from None
        self.window.arrive(req.concurrent)
        try:
            r, info, batch_size = await self._refine_batch((item, knobs, on_final))
        finally:
            self.window.leave()
        a = self.args
        out = Refined(text=r.text, completion_tokens=len(r.token_ids), finish_reason=finish_reason(r.stop),
                      refine_ms=(time.perf_counter() - t0) * 1000, batch_size=batch_size, engine=a.engine,
                      in_context=a.in_context, alignment=info, **engine_stats(r),
                      **prediction_usage(self.refiner.lm.tokenizer, req.messages, req.prediction, req.draft,
                                         item.draft_ids, r.token_ids))
        self.metrics.record("ok", out)
        return out

    async def refine_stream(self, req: RefineRequest):
        """`refine` as a stream: {"delta": text} events as the answer's tokens become final, then {"result": ...}
        (refine's `Refined`, with `first_token_ms`: the time to the first delta, on the same clock as `refine_ms`)."""
        t0 = time.perf_counter()
        loop, changed, final = asyncio.get_running_loop(), asyncio.Event(), []

        def publish(ids: list[int]) -> None:  # only the latest list matters: each extends the one before
            nonlocal final
            final = ids
            changed.set()

        def on_final(ids: list[int]) -> None:  # the engine's thread, between passes
            try:
                loop.call_soon_threadsafe(publish, ids)
            except RuntimeError:  # the loop is closing: nobody is listening
                pass

        task = asyncio.ensure_future(self.refine(req, on_final))
        task.add_done_callback(lambda _: changed.set())
        text, first = TextStream(self.refiner.lm.tokenizer), None
        try:
            while not task.done():
                await changed.wait()
                changed.clear()
                delta = text.feed(final)
                if delta:
                    first = first or time.perf_counter()
                    yield {"delta": delta}
            res = task.result()  # BadRequest (before any delta) or the engine's error
            rest = text.close(res.text)
            if rest:
                first = first or time.perf_counter()
                yield {"delta": rest}
        except StreamMismatch as e:
            log.error("aligner %r: %s", self.name, e)
            raise
        finally:
            task.cancel()  # a client that left: its rows finish in their batch, unread
        yield {"result": dataclasses.replace(res, first_token_ms=((first or time.perf_counter()) - t0) * 1000)}

    def _knobs(self, alignment) -> tuple:
        if not alignment:
            return ()
        if self.knobbed is None:
            raise ValueError(f"aligner {self.name!r} has no alignment vectors")
        return self.knobbed.normalize(alignment)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _refine_batch(self, pairs: list) -> list[tuple]:
        self.metrics.batch_size.observe(len(pairs))
        return await asyncio.to_thread(self._refine_groups, pairs)

    def _refine_groups(self, pairs: list) -> list[tuple]:
        """One engine call per knob setting in the batch (of (item, knobs, on_final) per request), each on its
        merged variant: (RefineResult, the variant's switch info or None, the batch's size) per request."""
        groups: dict[tuple, list[int]] = {}
        for i, (_, knobs, _) in enumerate(pairs):
            groups.setdefault(knobs, []).append(i)
        out: list[tuple | None] = [None] * len(pairs)
        for knobs, idx in groups.items():
            items = [pairs[i][0] for i in idx]
            streams = [pairs[i][2] for i in idx]
            on_final = (lambda j, ids: streams[j] and streams[j](ids)) if any(streams) else None
            if self.knobbed is None:
                results, info = self.refiner.refine_items(items, on_final=on_final), None
            else:
                with self.knobbed.use(knobs) as sw:
                    results = self.refiner.refine_items(items, on_final=on_final)
                info = sw.as_dict()
                self.variant_metrics.record(sw.cache, sw.switch_ms)
            for i, r in zip(idx, results):
                out[i] = (r, info or None, len(pairs))
        return out

    def check_health(self):
        if self.refiner is None:
            raise RuntimeError("aligner not loaded")
