"""Base and aligner deployments on vLLM engines, through Ray Serve LLM (`ray.serve.llm`).

Each model runs in an LLM server deployment built by `build_llm_deployment` (named ``llm-base-<name>`` /
``llm-aligner-<name>``: its replicas, autoscaling and placement come from the model's `vllm` section and
`deployment_config`), and a thin adapter deployment (``base-<name>`` / ``aligner-<name>``) gives it the interface
the ingress calls, the same as the in-process deployments':

* `VLLMBase.draft(DraftRequest) -> Draft` / `draft_stream(req)`: the base model's chat prompt, built by our
  tokenizer, sampled with the request's temperature and top_p and a seed from the conversation key (streamed on
  bare base routes);
* `VLLMAligner.refine(RefineRequest) -> Refined` / `refine_stream(req)`: DiffPO's output as one greedy
  continuation (`pipeline.decoding.continuation`): the aligner's prompt + the `r` reserved draft tokens, greedy,
  cap - r new tokens, the same stop ids: token for token what the Jacobi engines and the batch jobs compute.
  No Jacobi iteration runs, so the reply's Jacobi statistics are None; it reports the tokens vLLM generated.

Both send token ids to the engine's completions endpoint (`return_token_ids`) and read token ids back, so every
engine sees the same ids and the answer text is decoded once, here, as everywhere else. The streaming methods
yield ``{"delta": text}`` events, then ``{"result": <the reply>}``; the plain ones run the same code with
``incremental=False`` (vLLM answers once, at the end) and return the reply. Nothing here imports the
in-process deployments (serve_app/aligner.py, bases.py).
"""
from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from ray import serve

from pipeline.decoding.continuation import AlignerPrompts, RefineRequest as RowRequest, continuation, finish
from pipeline.decoding.draft_prefix import PrefixGoal, base_budget, settles, tokens_ratio
from pipeline.decoding.drafting import draft_seed
from pipeline.decoding.jacobi import first_stop
from pipeline.decoding.prediction import prediction_tokens, prediction_usage
from pipeline.decoding.streaming import TextStream
from pipeline.models import load_model_text
from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE, answer_ids, chat_prompt_ids

from .config import VLLMAlignerArgs, VLLMBaseArgs
from .metrics import DraftMetrics, RefineMetrics
from .protocol import BadRequest, UpstreamError
from .replies import Draft, DraftRequest, Refined, RefineRequest, engine_stats, finish_reason


@functools.lru_cache(maxsize=4)
def _model_text(spec: str, trust_remote_code: bool):
    return load_model_text(spec, trust_remote_code)


class Completions:
    """Token ids in, token ids out, through an LLM server deployment's completions endpoint: streamed in
    chunks as the engine produces them, or (``incremental=False``) as one response at the end, which spares the
    adapter and the server a Ray message and an SSE parse per chunk when nobody reads the tokens early. Requests
    and whole responses travel as plain dicts (the server's `completions_dict`, serve_app/llm_server.py
    `PlainCalls`), so this deployment never imports vLLM."""

    def __init__(self, handle, model_id: str):
        self.handle, self.model_id = handle.options(stream=True), model_id

    async def stream(self, prompt: list[int], max_tokens: int, stop_ids: list[int], temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, incremental: bool = True, adapter: str | None = None
                     ) -> AsyncIterator[tuple[list[int], str | None]]:
        """(new token ids, finish reason or None) as the engine produces them (or once, not `incremental`);
        `adapter`: an alignment setting's adapter name (`pipeline.vectors.lora.adapter_name`) to run on."""
        body = {"model": adapter or self.model_id, "prompt": list(prompt), "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, "stop_token_ids": list(stop_ids),
                "return_token_ids": True, "stream": incremental}
        async for out in self.handle.completions_dict.remote(body):
            for item in out if isinstance(out, list) else [out]:
                if isinstance(item, dict):  # a whole (non-streamed) response, or the engine's error response
                    if "error" in item and not item.get("choices"):
                        err = item["error"] if isinstance(item["error"], dict) else {"message": str(item["error"])}
                        self._raise(err.get("message", str(err)), err.get("code", 500))
                    choice = item["choices"][0]
                    yield list(choice.get("token_ids") or []), choice.get("finish_reason")
                    continue
                for line in item.splitlines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        err = event["error"]
                        self._raise(err.get("message", str(err)), err.get("code", 500))
                    for choice in event.get("choices", []):
                        yield list(choice.get("token_ids") or []), choice.get("finish_reason")

    @staticmethod
    def _raise(message: str, code) -> None:
        try:
            status = int(code)
        except (TypeError, ValueError):
            status = 500
        if 400 <= status < 500:
            raise BadRequest(f"vLLM refused the request: {message}")
        raise UpstreamError(f"vLLM failed: {message}")


async def _result(events):
    """The `{"result"}` of a run that yields no deltas (``incremental=False``)."""
    result = None
    async for event in events:
        result = event.get("result", result)
    return result


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, max_queued_requests=512,
                  health_check_period_s=10)
class VLLMBase:
    """The base model on vLLM: drafts (or, on a bare route, answers) with the request's sampling."""

    def __init__(self, name: str, args: dict, model_id: str, llm):
        self.name, self.args = name, VLLMBaseArgs(**args)
        self.text = load_model_text(self.args.model, self.args.trust_remote_code)
        self.engine = Completions(llm, model_id)
        self.metrics = DraftMetrics(name)

    async def draft(self, req: DraftRequest) -> Draft:
        """The draft, or with `req.prefix` only its start, as far as the aligner's answer depends on it: a budget
        from the two tokenizers, then the whole draft (`req.max_tokens`) if that prefix did not settle. Seeded
        sampling gives the same first tokens whatever the cap, so the prefix is the start of the whole draft."""
        if req.prefix is None:
            return await _result(self._draft(req, incremental=False))
        p = req.prefix
        aligner = _model_text(p.model, p.trust_remote_code).tokenizer
        goal = PrefixGoal(0, p.tokens)
        budget = base_budget(goal, tokens_ratio(self.text.tokenizer, aligner), req.max_tokens)
        out = await _result(self._draft(replace(req, max_tokens=budget, prefix=None), incremental=False))
        whole = out.finish_reason != "length" or budget >= req.max_tokens
        if settles(aligner, out.text, goal, whole):
            return replace(out, prefix=not whole)
        return await _result(self._draft(replace(req, prefix=None), incremental=False))

    async def draft_stream(self, req: DraftRequest):
        """`{"delta": text}` events as the engine emits the answer's tokens (a bare base route streaming), then
        `{"result": ...}`, the `Draft` that `draft` returns."""
        async for event in self._draft(req, incremental=True):
            yield event

    async def _draft(self, req: DraftRequest, incremental: bool):
        """`draft_stream`'s events; not `incremental`: the engine answers once, and only the result comes."""
        t0 = time.perf_counter()
        key, adapter = self._adapter(req)
        try:
            prompt = chat_prompt_ids(self.text.tokenizer, req.messages)
        except Exception as e:  # a template that refuses this conversation (e.g. role order)
            self.metrics.record("rejected")
            raise BadRequest(f"the base model's chat template refused the conversation: {e}") from None
        why = self.text.too_long(len(prompt), req.max_tokens, "the base model's", self.args.vllm.max_model_len)
        if why:
            self.metrics.record("rejected")
            raise BadRequest(why)
        stops = set(self.text.stop_ids)
        stream = TextStream(self.text.tokenizer) if incremental else None
        ids, reason, first_ms = [], None, None
        try:
            async for new, fin in self.engine.stream(prompt, req.max_tokens, self.text.stop_ids,
                                                     req.temperature, req.top_p,
                                                     draft_seed(self.args.sampling.seed, req.key),
                                                     incremental=incremental, adapter=adapter):
                ids += new
                reason = fin or reason
                if stream is not None and new:
                    first_ms = first_ms or (time.perf_counter() - t0) * 1000
                    delta = stream.feed(ids[:first_stop(ids, stops)])
                    if delta:
                        yield {"delta": delta}
        except BadRequest:
            self.metrics.record("rejected")
            raise
        answer = ids[:first_stop(ids, stops)]
        text, n = self.text.answer_text(answer), len(answer)
        if stream is not None:
            rest = stream.close(text)
            if rest:
                yield {"delta": rest}
        ms = (time.perf_counter() - t0) * 1000
        self.metrics.record("ok", ms, n)
        yield {"result": Draft(
            text=text, completion_tokens=n, prompt_tokens=len(prompt), draft_ms=ms, batch_size=1,
            finish_reason="length" if reason == "length" else "stop", first_token_ms=round(first_ms or ms, 1),
            alignment=_setting(key, adapter),
            prediction_tokens=None if req.prediction is None else prediction_tokens(
                answer_ids(self.text.tokenizer, req.prediction), answer))}

    def _adapter(self, req: DraftRequest) -> tuple[tuple, str | None]:
        return _knobs(self.args, req.alignment, f"base {self.name!r}", self.metrics)

    def check_health(self):
        pass  # the LLM server deployment health-checks its engine


def _knobs(args, alignment, who: str, metrics) -> tuple[tuple, str | None]:
    """(the quantized setting, its adapter name) of a request's knobs on a vLLM model; (() , None) without knobs;
    BadRequest for knobs the model does not take (no vectors, unknown names, out of bounds)."""
    from pipeline.vectors.extract import KnobError
    from pipeline.vectors.lora import adapter_name

    if not alignment:
        return (), None
    if not args.vectors:
        metrics.record("rejected")
        raise BadRequest(f"{who} has no alignment vectors")
    try:
        key = args.knob_key(alignment if isinstance(alignment, dict) else dict(alignment))
    except KnobError as e:
        metrics.record("rejected")
        raise BadRequest(str(e)) from None
    return key, adapter_name(key)


def _setting(key: tuple, adapter: str | None) -> dict | None:
    """What a reply says of the setting it ran on (None without knobs)."""
    return None if adapter is None else {"knobs": dict(key), "adapter": adapter, "quantized": True}


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, max_queued_requests=512,
                  health_check_period_s=10)
class VLLMAligner:
    """The aligner on vLLM: DiffPO's answer as the greedy continuation of prompt + reserved draft tokens."""

    def __init__(self, name: str, args: dict, model_id: str, llm):
        self.name, self.args = name, VLLMAlignerArgs(**args)
        a = self.args
        self.text = load_model_text(a.model, a.trust_remote_code)
        self.prompts = AlignerPrompts(self.text, a.settings(), a.in_context, a.template or DEFAULT_CORRECTION_TEMPLATE,
                                      context_window=a.vllm.max_model_len)
        self.engine = Completions(llm, model_id)
        self.metrics = RefineMetrics(name)

    def _encode(self, req: RefineRequest):
        try:
            return self.prompts.encode(RowRequest(req.messages, req.draft, req.key, req.max_tokens))
        except Exception as e:  # over the context window, a template that refuses the conversation ...
            self.metrics.record("rejected")
            raise BadRequest(f"the aligner cannot refine this request: {e}") from None

    async def refine(self, req: RefineRequest) -> Refined:
        return await _result(self._refine(req, incremental=False))

    async def refine_stream(self, req: RefineRequest):
        """`{"delta": text}` events as the answer's tokens arrive (the reserved draft tokens first), then
        `{"result": ...}`, the `Refined` that `refine` returns."""
        async for event in self._refine(req, incremental=True):
            yield event

    async def _refine(self, req: RefineRequest, incremental: bool):
        """`refine_stream`'s events; not `incremental`: the engine answers once, and only the result comes."""
        t0 = time.perf_counter()
        key, adapter = _knobs(self.args, req.alignment, f"aligner {self.name!r}", self.metrics)
        item = self._encode(req)
        settings = self.args.settings()
        prompt, budget = continuation(item, settings)
        held = list(item.draft_ids[:item.reserved])
        stream = TextStream(self.text.tokenizer) if incremental else None
        first_ms, generated = None, []
        if stream is not None and held:
            first_ms = (time.perf_counter() - t0) * 1000
            delta = stream.feed(held)
            if delta:
                yield {"delta": delta}
        async for new, _ in self.engine.stream(prompt, budget, self.text.stop_ids, incremental=incremental,
                                               adapter=adapter):
            generated += new
            if stream is not None and new:
                first_ms = first_ms or (time.perf_counter() - t0) * 1000
                ids = held + generated[:first_stop(generated, set(self.text.stop_ids))]
                delta = stream.feed(ids)
                if delta:
                    yield {"delta": delta}
        res = finish(item, generated, self.text.stop_ids, settings, wall_s=time.perf_counter() - t0)
        text = self.text.answer_text(res.token_ids)
        if stream is not None:
            rest = stream.close(text)
            if rest:
                yield {"delta": rest}
        ms = (time.perf_counter() - t0) * 1000
        out = Refined(text=text, completion_tokens=len(res.token_ids), finish_reason=finish_reason(res.stop),
                      refine_ms=ms, batch_size=1, engine=self.args.engine, in_context=self.args.in_context,
                      alignment=_setting(key, adapter),
                      first_token_ms=round(first_ms or ms, 1), **engine_stats(res),
                      **prediction_usage(self.text.tokenizer, req.messages, req.prediction, req.draft,
                                         item.draft_ids, res.token_ids))
        if req.count_prompt and out.prompt_tokens is None:
            out.prompt_tokens = len(chat_prompt_ids(self.text.tokenizer, req.messages))
        self.metrics.record("ok", out)
        yield {"result": out}

    def check_health(self):
        pass  # the LLM server deployment health-checks its engine
