"""The HTTP front door: OpenAI-compatible routes over the base and aligner deployments.

POST /v1/chat/completions   draft with the route's base, refine with its aligner (if any), answer; a request's
                            `prediction` (OpenAI Predicted Outputs) is the draft instead on aligner routes, and
                            only counted on bare ones
GET  /v1/models             the configured model routes
GET  /healthz               liveness of the ingress (Serve health-checks every replica on its own)

Every failure is an OpenAI-style JSON error: 400/401/404/413 for the client's mistakes, 503 when a
deployment's queue is full or its replica died (after `replica_failure_retries` resends), 504 past
`request_timeout_s`, 502 when a remote base endpoint failed. `stream: true` on a route with an aligner streams the
answer while the aligner refines it, and on a bare base route on vLLM while the base generates it
(serve_app/streaming.py: the status is decided at the first text; later failures end the stream with an error
event); other bare routes stream the finished answer.

The deployments are called with a `DraftRequest` / `RefineRequest` and answer with a `Draft` / `Refined`
(serve_app/replies.py, which also builds the response's `diffpo` field and `usage` from them).
"""

import asyncio
import hmac
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.decoding.draft_prefix import needs_full_draft, prefix_goal

from .admission import Gate, Refused
from .config import AppArgs
from .metrics import AdmissionMetrics
from .protocol import (ApiError, BadRequest, UpstreamError, chat_completion, completion_id, conversation_key,
                       error_body, parse_chat_request, sse_chunks)
from .replies import Draft, DraftPrefix, DraftRequest, Refined, RefineRequest, diffpo_extra, response_usage
from .streaming import Relay, live_chunks

log = logging.getLogger("ray.serve")
api = FastAPI(title="DiffPO", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    kind = "not_found" if e.status_code == 404 else "method_not_allowed" if e.status_code == 405 else None
    return JSONResponse(error_body(str(e.detail), code=kind), status_code=e.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    return JSONResponse(error_body(f"invalid request: {e.errors()[:3]}"), status_code=400)


@api.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception):
    log.exception("unhandled error in %s", request.url.path)
    return JSONResponse(error_body(f"internal error: {type(e).__name__}", type="server_error"), status_code=500)


def _cause(e: BaseException) -> str:
    """The message of the original exception inside a RayTaskError."""
    inner = getattr(e, "cause", None)
    return str(inner if inner is not None else e).strip().splitlines()[-1][:500]


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256,
                  max_queued_requests=512)
@serve.ingress(api)
class Ingress:
    def __init__(self, args: dict, bases: dict, aligners: dict, serving: dict[str, str] | None = None):
        self.args = AppArgs(**args)
        self.bases, self.aligners = bases, aligners
        self.api_key = os.environ.get(self.args.api_key_env) or None
        self.created = int(time.time())
        self.inflight = 0  # chat requests being served: tells the model deployments whether to batch-wait
        # admission: one gate per serving deployment (routes ending in the same deployment share it)
        self.serving = serving or {}
        adm = self.args.admission
        self.gates = {d: Gate(d, adm.max_concurrent_of.get(d, adm.max_concurrent))
                      for d in sorted(set(self.serving.values()))}
        self.metrics = AdmissionMetrics()
        self._watch: asyncio.Task | None = None

    def check_health(self):
        if set(self.bases) != {r.base for r in self.args.models.values()}:
            raise RuntimeError("ingress lost its base handles")

    # ---- helpers ---------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), self.api_key.encode())):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body over {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _call(self, method, payload: DraftRequest | RefineRequest, deadline: float, what: str,
                    relay: Relay | None = None) -> Draft | Refined:
        """One deployment call with the request's deadline, mapped to ApiError on failure. With `relay`, `method`
        streams (`refine_stream`, `draft_stream`): its deltas go to the relay, and a lost replica is resent only while
        none was relayed."""
        for attempt in range(self.args.replica_failure_retries + 1):
            resp = method.remote(payload) if relay is None else method.options(stream=True).remote(payload)
            try:
                if relay is not None:
                    return await relay.read(resp, deadline)
                return await asyncio.wait_for(resp, timeout=max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                resp.cancel()
                raise ApiError(504, f"{what} did not finish within request_timeout_s={self.args.request_timeout_s}",
                               type="timeout", code="timeout") from None
            except BackPressureError:
                raise ApiError(503, f"{what} is at capacity; retry later", type="server_busy",
                               code="overloaded", headers={"Retry-After": "1"}) from None
            except (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError,
                    RequestCancelledError) as e:
                log.warning("%s failed on a lost replica (attempt %d): %s", what, attempt + 1, type(e).__name__)
                if (attempt >= self.args.replica_failure_retries or time.monotonic() >= deadline
                        or (relay is not None and relay.started.is_set())):
                    raise ApiError(503, f"{what} lost its replica; retry later", type="server_error",
                                   code="replica_unavailable") from None
            except BadRequest as e:
                raise ApiError(400, _cause(e), param="messages") from None
            except UpstreamError as e:
                raise ApiError(502, _cause(e), type="upstream_error", code="bad_gateway") from None

    # ---- routes ----------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "models": sorted(self.args.models)}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._auth(request)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "diffpo",
             "base": r.base, "aligner": r.aligner, "description": r.description,
             "alignment_vectors": {v: {"model": who, "min": a.knob_bounds.min, "max": a.knob_bounds.max}
                                   for v, (who, a) in sorted(self.args.knob_owners(r).items())}}
            for name, r in sorted(self.args.models.items())]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._auth(request)
        req = parse_chat_request(await self._body(request), self.args.max_messages, self.args.max_prediction_chars)
        route = self.args.models.get(req.model)
        if route is None:
            raise ApiError(404, f"the model {req.model!r} does not exist; available: {sorted(self.args.models)}",
                           param="model", code="model_not_found")
        max_tokens = req.max_tokens or req.max_completion_tokens or self.args.default_max_tokens
        if max_tokens > self.args.max_tokens_cap:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's cap of {self.args.max_tokens_cap}",
                           param="max_tokens")
        knobs = self._split_knobs(req.model, route, req.alignment)
        messages = [m.plain() for m in req.messages]
        key = conversation_key(messages)
        deadline = time.monotonic() + self.args.request_timeout_s
        live = req.stream and (route.aligner is not None or self.args.bases[route.base].engine == "vllm")
        gate, budget = self._gate(req.model, route)
        try:
            ticket = await self._admit(req.model, gate, budget, live) if gate is not None else None
            if live:  # the stream's task gives the slot back when it ends
                return await self._stream(req, route, messages, key, max_tokens, deadline, knobs, gate, ticket)
            return await self._answer(req, route, messages, key, max_tokens, deadline, knobs, gate, ticket)
        except ApiError as e:
            if e.status in (503, 504):
                self.metrics.refusal(req.model, e.code or str(e.status))
            raise

    async def _answer(self, req, route, messages, key, max_tokens, deadline, knobs, gate, ticket):
        self.inflight += 1
        t0, took = time.monotonic(), None
        try:
            out = await self._complete(req, route, messages, key, max_tokens, deadline, knobs)
            took = time.monotonic() - t0
            if ticket is not None and isinstance(out, dict):  # what admission added to the latency
                out["diffpo"]["queue_wait_ms"] = round(ticket.waited_s * 1000, 1)
            return out
        finally:
            self.inflight -= 1
            if ticket is not None:
                gate.release(took)

    # ---- admission -------------------------------------------------------------------------------
    def _gate(self, model: str, route) -> tuple[Gate | None, float | None]:
        """The gate of the route's serving deployment and the route's budget; (None, None) with admission off."""
        if self._watch is None or self._watch.done():  # replica counts: the gates' slots and the diffpo_replicas gauge
            self._watch = asyncio.ensure_future(self._watch_replicas())
        budget = route.max_queue_wait_s or self.args.admission.max_queue_wait_s
        if budget is None or model not in self.serving:
            return None, None
        return self.gates[self.serving[model]], budget

    async def _admit(self, model: str, gate: Gate, budget: float, stream: bool):
        try:
            ticket = await gate.admit(budget, stream=stream)
        except Refused as r:
            what = "its first token" if stream else "start"
            raise ApiError(503, f"model {model!r} is at capacity: a request now would wait about {r.wait_s:.1f} s "
                                f"to {what}, over this route's max_queue_wait_s={budget:g}; retry after "
                                f"{r.retry_after_s} s", type="server_busy", code=r.reason,
                           headers={"Retry-After": str(r.retry_after_s)}) from None
        self.metrics.admitted(model, ticket.waited_s)
        return ticket

    async def _watch_replicas(self):
        """Every `admission.replicas_refresh_s`: the app's running replicas per deployment from Serve's controller,
        resizing the gates (autoscaling, lost nodes) and exporting the gauges."""
        app = serve.get_replica_context().app_name
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deps = status.applications[app].deployments
                replicas = {name: int(d.replica_states.get("RUNNING", 0)) for name, d in deps.items()}
                for name, gate in self.gates.items():
                    if name in replicas:
                        gate.resize(replicas[name])
                self.metrics.deployments(replicas, self.gates)
            except Exception as e:  # the controller may be restarting: keep the last counts
                log.warning("admission: could not read replica counts from Serve: %s", e)
            await asyncio.sleep(self.args.admission.replicas_refresh_s)

    async def _stream(self, req, route, messages, key, max_tokens, deadline, knobs, gate=None, ticket=None):
        """The request in a task that relays the aligner's text; the SSE response once the first text is there."""
        t0, relay = time.monotonic(), Relay()
        first: list[float] = []
        self.inflight += 1
        task = asyncio.ensure_future(self._complete(req, route, messages, key, max_tokens, deadline, knobs, relay))

        def ended(t):
            self.inflight -= 1
            relay.close()
            if ticket is not None:
                ok = not t.cancelled() and t.exception() is None
                gate.release(time.monotonic() - t0 if ok else None, first[0] if first else None)

        task.add_done_callback(ended)
        try:
            await relay.opened(task)  # errors before the first text are answered as JSON errors
            first.append(time.monotonic() - t0)
        except BaseException:
            task.cancel()
            raise
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(live_chunks(completion_id(), req.model, relay, task, include_usage, t0),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _split_knobs(self, model: str, route, alignment: dict | None) -> dict[str, dict]:
        """The request's `alignment` knobs split by the model that owns each vector, checked against the
        config (names, bounds) so a bad knob is a 400 before any model runs."""
        out: dict[str, dict] = {"base": {}, "aligner": {}}
        if not alignment:
            return out
        owners = self.args.knob_owners(route)
        for name, lam in alignment.items():
            if name not in owners:
                raise ApiError(400, self._no_knob(model, route, name, owners), param="alignment",
                               code="invalid_alignment")
            who, margs = owners[name]
            lo, hi = margs.knob_bounds.min, margs.knob_bounds.max
            if not lo <= lam <= hi:
                raise ApiError(400, f"alignment[{name!r}] = {lam} is outside the allowed range [{lo}, {hi}]",
                               param="alignment", code="invalid_alignment")
            out[who][name] = lam
        return out

    def _no_knob(self, model: str, route, name: str, owners: dict) -> str:
        why = f"unknown alignment vector {name!r} for model {model!r}; available: {sorted(owners) or 'none'}"
        if route.aligner is not None and self.args.aligners[route.aligner].engine == "vllm":
            why = (f"model {model!r} refines on vLLM, which serves no per-request alignment knobs; "
                   f"{why}")
        others = sorted(m for m, r in self.args.models.items() if name in self.args.knob_owners(r))
        return why + (f"; models that serve {name!r}: {others}" if others else "")

    def _prefix(self, route, key: str) -> DraftPrefix | None:
        """What the base drafts for an aligner that reads only the draft's first r tokens (`base.drafts:
        as_needed`, a vLLM base, an aligner on vllm or ar without the draft in context): the prefix that decides
        them (tokens 0: none at all), or None for the whole draft."""
        base = self.args.bases[route.base]
        if route.aligner is None or base.engine != "vllm" or base.drafts != "as_needed":
            return None
        al = self.args.aligners[route.aligner]
        if needs_full_draft(al.engine, al.in_context):
            return None
        return DraftPrefix(al.model, al.trust_remote_code, prefix_goal(key, al.refine).tokens)

    async def _complete(self, req, route, messages, key, max_tokens, deadline, knobs=None, relay=None):
        knobs = knobs or {"base": {}, "aligner": {}}
        sampling = self.args.bases[route.base].sampling  # the base's defaults, the same as in the batch jobs
        temperature = (sampling.temperature if sampling.do_sample else 0.0) if req.temperature is None \
            else req.temperature
        top_p = sampling.top_p if req.top_p is None else req.top_p
        draft_cap = min(max_tokens, sampling.max_new_tokens)  # a base writes at most its sampling.max_new_tokens
        prediction = req.prediction_text()  # OpenAI Predicted Outputs: the client's own draft
        draft: Draft | None = None  # None: the client's prediction is the draft
        if route.aligner is not None and prediction is not None:  # the aligner refines it; the base is skipped
            if knobs["base"]:
                raise ApiError(400, f"alignment knobs {sorted(knobs['base'])} are the base model's, which a request "
                                    "with a prediction skips", param="alignment", code="invalid_alignment")
            draft_text = prediction
        elif (prefix := self._prefix(route, key)) is not None and prefix.tokens == 0:
            draft = Draft("", 0, None, "stop", 0.0, batch_size=0, prefix=True, drafted=False)  # r = 0: reads none
            draft_text = ""
        else:  # on a bare base a prediction never changes the answer: the base only counts it
            live = relay if route.aligner is None else None  # a bare base on vLLM streams its own tokens
            base = self.bases[route.base]
            draft = await self._call(base.draft if live is None else base.draft_stream,
                                     DraftRequest(messages, draft_cap, temperature, top_p, key,
                                                  concurrent=self.inflight > 1, prediction=prediction,
                                                  alignment=knobs["base"] or None, prefix=prefix), deadline,
                                     f"base model {route.base!r}", live)
            draft_text = draft.text
        ref: Refined | None = None
        if route.aligner is not None:
            aligner = self.aligners[route.aligner]
            ref = await self._call(aligner.refine if relay is None else aligner.refine_stream,
                                   RefineRequest(messages, draft_text, max_tokens, key, concurrent=self.inflight > 1,
                                                 prediction=prediction, alignment=knobs["aligner"] or None,
                                                 count_prompt=draft is not None and not draft.drafted),
                                   deadline, f"aligner {route.aligner!r}", relay)
        extra = diffpo_extra(route.base, route.aligner, draft, draft_text, ref)
        result = ref if ref is not None else draft
        text, finish = result.text, result.finish_reason
        usage = response_usage(draft, ref, prediction is not None)
        cid = completion_id()
        if req.stream and relay is None:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(sse_chunks(cid, req.model, text, finish, usage, extra, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return chat_completion(cid, req.model, text, finish, usage, extra)
