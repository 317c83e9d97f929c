"""Base-model deployments: they draft the answer the aligner refines (or serve it bare).

Each has one entry point, ``draft(DraftRequest) -> Draft`` (serve_app/replies.py). A `prediction` (the client's
OpenAI Predicted Outputs text) never changes the answer: the HF base counts it against its answer
(``prediction_tokens = {accepted, rejected}``, `pipeline.decoding.prediction`), the ``openai`` base forwards it to
its endpoint and passes the endpoint's counts on when it reports them.
Requests that cannot be served as asked raise `BadRequest` (the ingress answers 400); a failing remote endpoint
raises `UpstreamError`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict

from ray import serve

from pipeline.decoding.drafting import SamplingParams, generate_answers
from pipeline.decoding.prediction import prediction_tokens
from pipeline.models import load_model
from pipeline.clients import ChatEndpoint, EndpointConfig, EndpointError, EndpointRejected
from pipeline.prompts import answer_ids, chat_prompt_ids

from .config import HFBaseArgs, OpenAIBaseArgs
from .metrics import DraftMetrics, VariantMetrics
from .protocol import BadRequest, UpstreamError
from .replies import Draft, DraftRequest
from .batchwait import AdaptiveWait
from .threads import set_torch_threads


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16, max_queued_requests=64,
                  health_check_period_s=10, health_check_timeout_s=30)
class HFBase:
    """A Hugging Face causal LM in the replica; concurrent requests are batched into one `generate` call."""

    def __init__(self, name: str, args: dict):
        self.name, self.args = name, HFBaseArgs(**args)
        set_torch_threads(self.args.torch_threads)
        self.lm = load_model(self.args.model, device=self.args.device, dtype=self.args.dtype,
                             trust_remote_code=self.args.trust_remote_code)
        cfg = self.lm.model.config.get_text_config(decoder=True)
        self.context_window = getattr(cfg, "max_position_embeddings", None)
        self.knobbed = self.args.knobbed(self.lm)  # alignment vectors (None without)
        self.metrics = DraftMetrics(name)
        self.variant_metrics = VariantMetrics(name) if self.knobbed else None
        self._generate_batch.set_max_batch_size(self.args.max_batch_size)
        self.window = AdaptiveWait(self._generate_batch, self.args.batch_wait_timeout_s,
                                   self.args.adaptive_batch_wait)

    async def draft(self, req: DraftRequest) -> Draft:
        t0 = time.perf_counter()
        try:
            n_prompt = len(chat_prompt_ids(self.lm.tokenizer, req.messages))
        except Exception as e:  # a template that refuses this conversation (e.g. role order)
            self.metrics.record("rejected")
            raise BadRequest(f"the base model's chat template refused the conversation: {e}") from None
        if req.alignment:
            if self.knobbed is None:
                self.metrics.record("rejected")
                raise BadRequest(f"base {self.name!r} has no alignment vectors")
            try:
                req = dataclasses.replace(req, alignment=self.knobbed.normalize(req.alignment))
            except ValueError as e:
                self.metrics.record("rejected")
                raise BadRequest(str(e)) from None
        if self.context_window and n_prompt + req.max_tokens > self.context_window:
            self.metrics.record("rejected")
            raise BadRequest(f"prompt of {n_prompt} tokens + max_tokens {req.max_tokens} exceeds the base "
                             f"model's context window of {self.context_window} tokens")
        self.window.arrive(req.concurrent)
        try:
            out = await self._generate_batch(req)
        finally:
            self.window.leave()
        out = dataclasses.replace(out, prompt_tokens=n_prompt, draft_ms=(time.perf_counter() - t0) * 1000)
        self.metrics.record("ok", out.draft_ms, out.completion_tokens)
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _generate_batch(self, reqs: list[DraftRequest]) -> list[Draft]:
        return await asyncio.to_thread(self._generate, reqs)

    def _generate(self, reqs: list[DraftRequest]) -> list[Draft]:
        """The batch's drafts (prompt tokens and time are the caller's to fill in)."""
        groups = defaultdict(list)  # one generate call per distinct sampling and knob setting
        for i, r in enumerate(reqs):
            groups[(r.max_tokens, r.temperature, r.top_p, r.alignment or ())].append(i)
        out: list[Draft | None] = [None] * len(reqs)
        for (max_tokens, temperature, top_p, knobs), idx in groups.items():
            params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    do_sample=temperature > 0, seed=self.args.sampling.seed)
            convs, seed_key = [reqs[i].messages for i in idx], ",".join(reqs[i].key for i in idx)
            info = None
            if self.knobbed is None:
                answers = generate_answers(self.lm, convs, params, seed_key=seed_key, with_ids=True)
            else:
                with self.knobbed.use(knobs) as sw:
                    answers = generate_answers(self.lm, convs, params, seed_key=seed_key, with_ids=True)
                info = sw.as_dict()
                self.variant_metrics.record(sw.cache, sw.switch_ms)
            for i, (text, n, _, ids) in zip(idx, answers):
                prediction = reqs[i].prediction
                out[i] = Draft(text=text, completion_tokens=n, prompt_tokens=None,
                               finish_reason="length" if n >= max_tokens else "stop", draft_ms=0.0,
                               batch_size=len(reqs), alignment=info or None,
                               prediction_tokens=None if prediction is None else prediction_tokens(
                                   answer_ids(self.lm.tokenizer, prediction), ids))
        return out

    def check_health(self):
        if self.lm is None or self.lm.model is None:
            raise RuntimeError("model not loaded")


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64, max_queued_requests=256,
                  health_check_period_s=10)
class OpenAIBase:
    """Any OpenAI-compatible chat endpoint (vLLM, TGI, a hosted API, another DiffPO server) over HTTP."""

    def __init__(self, name: str, args: dict):
        self.name, self.args = name, OpenAIBaseArgs(**args)
        a = self.args
        try:
            self.endpoint = ChatEndpoint(EndpointConfig(base_url=a.base_url, model=a.model, api_key_env=a.api_key_env,
                                                        timeout_s=a.timeout_s, max_retries=a.max_retries,
                                                        max_connections=a.max_connections))
        except ValueError as e:
            raise ValueError(f"base {name!r}: {e}") from None
        self.metrics = DraftMetrics(name)

    async def draft(self, req: DraftRequest) -> Draft:
        t0 = time.perf_counter()
        try:
            c = await self.endpoint.achat(req.messages, req.max_tokens, req.temperature, req.top_p, req.prediction)
        except EndpointRejected as e:
            self.metrics.record("rejected")
            if e.status in (400, 413, 422):
                raise BadRequest(f"the base model endpoint refused the request: {e}") from None
            raise UpstreamError(f"the base model endpoint refused the call: {e}") from None
        except EndpointError as e:
            self.metrics.record("failed")
            raise UpstreamError(f"the base model endpoint failed: {e}") from None
        ms = (time.perf_counter() - t0) * 1000
        self.metrics.record("ok", ms, c.completion_tokens)
        return Draft(text=c.text, completion_tokens=c.completion_tokens, prompt_tokens=c.prompt_tokens,
                     finish_reason=c.finish_reason or "stop", draft_ms=ms, batch_size=1,
                     prediction_tokens=c.prediction_tokens if c.prediction_tokens and req.prediction is not None
                     else None)

    def check_health(self):
        pass  # the remote endpoint's health is its own; an outage shows as 502s, not replica restarts
