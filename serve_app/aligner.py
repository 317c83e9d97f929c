"""The aligner deployment: refines drafts with the Jacobi engine; concurrent requests are refined together.

``refine(req) -> dict`` with ``req = {messages, draft, max_tokens, key}``. Encoding (and the context-window
check) happens per request, before batching, so one bad request fails alone with `BadRequest`.
"""
from __future__ import annotations

import asyncio
import time

from ray import serve

from pipeline.models import load_model
from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE
from pipeline.refiner import Refiner, RefineRequest

from .config import AlignerArgs
from .metrics import RefineMetrics
from .protocol import BadRequest
from .batchwait import AdaptiveWait
from .threads import set_torch_threads


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16, max_queued_requests=64,
                  health_check_period_s=10, health_check_timeout_s=30)
class Aligner:
    def __init__(self, name: str, args: dict):
        self.name, self.args = name, AlignerArgs(**args)
        a = self.args
        set_torch_threads(a.torch_threads)
        lm = load_model(a.model, device=a.device, dtype=a.dtype, trust_remote_code=a.trust_remote_code)
        self.refiner = Refiner(lm, a.settings(), mode=a.mode, in_context=a.in_context,
                               template=a.template or DEFAULT_CORRECTION_TEMPLATE)
        self.metrics = RefineMetrics(name)
        self._refine_batch.set_max_batch_size(a.max_batch_size)
        self.window = AdaptiveWait(self._refine_batch, a.batch_wait_timeout_s, a.adaptive_batch_wait)

    async def refine(self, req: dict) -> dict:
        t0 = time.perf_counter()
        try:
            item = self.refiner.encode(RefineRequest(req["messages"], req["draft"], req["key"], req["max_tokens"]))
        except Exception as e:  # over the context window, a template that refuses the conversation ...
            self.metrics.record("rejected")
            raise BadRequest(f"the aligner cannot refine this request: {e}") from None
        self.window.arrive(req.get("concurrent", False))
        try:
            res = await self._refine_batch(item)
        finally:
            self.window.leave()
        res["refine_ms"] = (time.perf_counter() - t0) * 1000
        self.metrics.record("ok", res["refine_ms"], res["iterations"], res["tokens_per_pass"])
        return res

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _refine_batch(self, items: list) -> list[dict]:
        self.metrics.batch_size.observe(len(items))
        results = await asyncio.to_thread(self.refiner.refine_items, items)
        return [{"text": r.text, "completion_tokens": len(r.token_ids), "iterations": r.passes,
                 "tokens_per_pass": round(r.tokens_per_pass, 3), "converged": r.converged,
                 "finish_reason": "stop" if r.stop == "eos" else "length", "batch_size": len(items),
                 "mode": self.args.mode + ("+in_context" if self.args.in_context else "")}
                for r in results]

    def check_health(self):
        if self.refiner is None:
            raise RuntimeError("aligner not loaded")
