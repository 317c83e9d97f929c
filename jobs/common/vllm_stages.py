"""Model stages on vLLM engines for the batch jobs: drafting with the base model and refining with the aligner,
through Ray Data LLM's processors calling the job's own engine pool (`Engines`).

One engine pool per model for the whole job: `Engines` starts a Ray Serve LLM deployment (serve_app/llm_server.py,
`concurrency` replicas, each one vLLM engine on its placement group) per distinct engine setting, so every turn,
the prefix drafts' second round, and both stages when the base and the aligner are the same model with the same
settings, use the same engines. Each stage is, per conversation turn, three steps over the dataset:

    requests (CPU tasks: our tokenizer builds the token ids)  ->  Serve deployment processor  ->  collect (CPU tasks)

* The aligner's request is DiffPO's exact output as one greedy continuation (`pipeline.decoding.continuation`):
  its chat prompt (or the correction prompt with the draft in context) + the row's `r` reserved draft tokens,
  greedy, at most cap - r new tokens, stopping at the same stop ids; the answer is those `r` tokens + what vLLM
  generated. That is token for token what the Jacobi engines converge to.
* The base model's request is its chat prompt with the configured sampling, seeded per row and turn, so a
  rerun draws the same drafts and batching never changes them. Turn k+1 of a conversation holds the drafted
  answer of turn k, so turns run one after the other (the same engines).
* Rows never get lost: a row that arrives with an error, or has no turn k, sends a one-token placeholder
  request and passes through; a row whose prompt does not fit the context window, or that the engine
  refuses, becomes an error row with the reason. A replica that dies (its node lost) is replaced by Serve, and
  the batches it held are sent again (`actor_task_retry_on_errors`): nothing is lost, nothing written twice.

The per-row time budget (`row_timeout_s`) belongs to the Hugging Face engines; a vLLM request is bounded by its
token cap, and continuous batching keeps one long row from holding the others.
"""
from __future__ import annotations

import functools

import pyarrow as pa

from jobs.common.config import AlignerCfg, DraftCfg, KnobCfg, OnVllm, expand
from pipeline.decoding.vllm_engine import engine_setup

REQUEST_CPUS = 0.25  # per request / collect task: tokenizing is light, and must fit in the preflight headroom
# what one turn of the aligner yields per row: what vLLM computed (tokens generated, the stop token included;
# positions run; engine seconds). No Jacobi statistics: vLLM runs no Jacobi iteration (they stay with the Jacobi
# engines)
RESULT = pa.struct([("token_ids", pa.list_(pa.int64())), ("text", pa.string()), ("reserved", pa.int64()),
                    ("generated_tokens", pa.int64()), ("tokens_computed", pa.int64()), ("stop", pa.string()),
                    ("wall_s", pa.float64())])
# every field always set (a null among ints turns the column into floats on its way through Ray Data, and vLLM's
# engine core then dies on a float seed)
SAMPLING = pa.struct([("max_tokens", pa.int64()), ("temperature", pa.float64()), ("top_p", pa.float64()),
                      ("seed", pa.int64()), ("stop_token_ids", pa.list_(pa.int64())), ("detokenize", pa.bool_())])
REQUEST_COLUMNS = [pa.field("tokenized_prompt", pa.list_(pa.int64())), pa.field("sampling_params", SAMPLING),
                   pa.field("_reserved", pa.int64()), pa.field("_cap", pa.int64()), pa.field("_skip", pa.bool_()),
                   pa.field("_goal", pa.int64()), pa.field("_adapter", pa.string())]
# the error of a row whose drafted prefix did not decide the aligner's first r tokens: the job leaves it unwritten
# and drafts it again in full (`draft(prefix_for=...)`)
PREFIX_REDO = "draft prefix did not settle"


# ---- the job's engines ----------------------------------------------------------------------------------------
STAGE_ACTOR_CPUS = 0.1  # a processor's stage actor only awaits the engine's answers
REPLICA_CPUS = 0.1  # the LLM server replica actor (its engine workers hold the bundles)
LOST_ENGINE_RETRIES = 10  # tries of a batch whose engine died (backoff up to 32 s each: time for Serve to replace it)


def bundles(sec: OnVllm) -> list[dict[str, float]]:
    """The placement group of one engine: `vllm.bundles`, or tp x pp bundles of the pool's num_cpus/num_gpus."""
    return sec.vllm.placement(sec.num_cpus, sec.num_gpus)


def demand(sec: OnVllm) -> dict[str, float]:
    """Everything an engine pool holds at once: `concurrency` engines, each with its placement group (and its
    replica actor; accelerator types as Ray's `accelerator_type:X` resources)."""
    total: dict[str, float] = {"CPU": REPLICA_CPUS * sec.concurrency}
    for b in bundles(sec):
        for k, x in b.items():
            total[k] = total.get(k, 0.0) + x * sec.concurrency
    if sec.vllm.accelerator_type:
        total[f"accelerator_type:{sec.vllm.accelerator_type}"] = 0.001
    return total


def engine_key(sec: OnVllm) -> str:
    """What makes an engine pool: sections with the same key share one (the model folder, the engine settings and
    the number of engines)."""
    import json

    keys = set(OnVllm.model_fields) - {"model"}
    return json.dumps({"folder": model_folder(sec), "concurrency": sec.concurrency, "vectors": vectors_of(sec),
                       **sec.model_dump(include=keys, mode="json")}, sort_keys=True)


def model_folder(sec: OnVllm) -> str:
    """The folder (or hub id) vLLM loads: the model itself or the embedded default's converted folder."""
    from pipeline.models import resolve_model_path

    return resolve_model_path(sec.model)[0]


def vectors_of(sec: OnVllm) -> dict[str, str]:
    """The alignment vectors an engine pool serves as LoRA adapters (an aligner's `vectors`, paths expanded): the
    job's `knobs` and each row's own `alignment` pick among them per row."""
    return {n: expand(p) for n, p in sorted(sec.vectors.items())} if isinstance(sec, KnobCfg) else {}


def retry_lost_engines(ctx) -> None:
    """Ray Data sends a batch again when its engine's replica died (its node lost: the call fails with ActorDiedError,
    or ActorUnavailableError when the connection drops first), once Serve has replaced the replica. The error reaches
    Ray Data two ways: as the stage actor's own task failing (`actor_task_retry_on_errors`), or raised by the stage's
    Serve handle inside the UDF, wrapped in a UserCodeException (`retried_map_errors` matches the cause's class name).
    A Ray LLM stage returns its whole batch at once, so a batch tried again is neither lost nor written twice."""
    import ray

    lost = [ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError]
    ctx.actor_task_retry_on_errors = list({*(ctx.actor_task_retry_on_errors or []), *lost})
    if ctx.retried_map_errors is not True:
        ctx.retried_map_errors = sorted({*(ctx.retried_map_errors or []), *(e.__name__ for e in lost)})
    ctx.max_map_retries = max(ctx.max_map_retries, LOST_ENGINE_RETRIES)


class Engines:
    """A job's vLLM engine pools: one Ray Serve LLM deployment per distinct engine setting (`engine_key`), each its
    own Serve application (no HTTP: the job's stages call it through handles), started by `start()` and deleted by
    `stop()` (also on errors: use it as a context manager). `name(sec)`: the deployment serving a section."""

    def __init__(self, job: str, sections: list[OnVllm]):
        import uuid

        self.prefix = f"diffpo-{job}-{uuid.uuid4().hex[:6]}"
        self.pools: dict[str, tuple[str, OnVllm]] = {}
        for sec in sections:
            key = engine_key(sec)
            if key not in self.pools:
                self.pools[key] = (f"{self.prefix}-llm{len(self.pools)}", sec)
        self.started: list[str] = []

    def name(self, sec: OnVllm) -> str:
        return self.pools[engine_key(sec)][0]

    def demand(self) -> dict[str, dict[str, float]]:
        """The resources each pool holds (for the preflight): pools shared by several sections counted once."""
        return {name: demand(sec) for name, sec in self.pools.values()}

    def start(self) -> "Engines":
        import time

        from ray import serve

        from serve_app.llm_server import llm_server

        # a Serve instance this job starts is shut down at the end (a later serve.start would join it, and its
        # options, such as this one's disabled HTTP proxy); one that was already running keeps running
        self.owns_serve = not _serve_running()
        serve.start(proxy_location="Disabled")
        apps = []
        for name, sec in self.pools.values():
            options = {"num_replicas": sec.concurrency, "ray_actor_options": {"num_cpus": REPLICA_CPUS},
                       "max_ongoing_requests": 100_000, "health_check_period_s": 10}
            apps.append((name, llm_server(name, model_folder(sec), sec, options, vectors=vectors_of(sec) or None)))
            print(f"[vllm] {name}: {sec.concurrency} engine(s) of {model_folder(sec)}, bundles {bundles(sec)}",
                  flush=True)
        t0 = time.perf_counter()
        self.started = [name for name, _ in apps]
        # deployed together, so that the engines start side by side; returns once every one is running
        serve.run_many([serve.RunTarget(app, name=name, route_prefix=None) for name, app in apps])
        print(f"[vllm] {len(apps)} engine pool(s) ready in {time.perf_counter() - t0:.0f} s", flush=True)
        return self

    def stop(self) -> None:
        if not self.started:
            return
        from ray import serve

        for name in self.started:
            try:
                serve.delete(name)
            except Exception as e:  # noqa: BLE001 - the engines go with the cluster anyway
                print(f"[vllm] could not delete {name}: {e}", flush=True)
        if getattr(self, "owns_serve", False):
            serve.shutdown()
        self.started = []

    def __enter__(self):
        return self.start() if self.pools else self

    def __exit__(self, *exc):
        self.stop()


def _serve_running() -> bool:
    import ray

    return any(a["name"] == "SERVE_CONTROLLER_ACTOR" and a["namespace"] == "serve"
               for a in ray.util.list_named_actors(all_namespaces=True))


@functools.lru_cache(maxsize=4)
def _text(spec: str, trust_remote_code: bool):
    from pipeline.models import load_model_text

    return load_model_text(spec, trust_remote_code)


# the columns the Serve processor adds to a row (its response, merged in); ours that share a name are renamed
# around it
RESPONSE_COLUMNS = ("object", "created", "model", "choices", "usage", "service_tier", "system_fingerprint",
                    "kv_transfer_params", "ec_transfer_params", "metrics", "request_id", "batch_uuid", "time_taken",
                    "request_kwargs", "method", "dtype", "idx_in_batch")


def _request(row: dict, model: str) -> dict:
    s = row["sampling_params"]
    return {"method": "completions_dict",  # plain dicts both ways: the stage actors never import vLLM (PlainCalls)
            "request_kwargs": {"model": row.get("_adapter") or model, "prompt": [int(t) for t in row["tokenized_prompt"]],
                               "max_tokens": int(s["max_tokens"]), "temperature": float(s["temperature"]),
                               "top_p": float(s["top_p"]), "seed": int(s["seed"]),
                               "stop_token_ids": [int(t) for t in s["stop_token_ids"]], "return_token_ids": True,
                               "stream": False}}


def processor(engines: Engines, sec: OnVllm, stage: str):
    """A Ray Data LLM processor sending each row's request (token ids in, token ids out: our own tokenizer builds
    the prompts, so every engine sees the same ids) to the section's engine pool."""
    from ray.data.llm import ServeDeploymentProcessorConfig, build_processor

    name = engines.name(sec)
    cfg = ServeDeploymentProcessorConfig(
        deployment_name=name, app_name=name, dtype_mapping={},
        batch_size=sec.batch_size * sec.vllm.max_concurrent_batches, concurrency=sec.concurrency,
        should_continue_on_error=True)
    light = {"num_cpus": REQUEST_CPUS}  # the processor's own row maps: Ray Data's default (1 CPU) would not fit
    p = build_processor(cfg, preprocess=functools.partial(_request, model=name), preprocess_map_kwargs=light,
                        postprocess_map_kwargs=light)
    # the stage actor only awaits answers; Ray Data would give it a whole CPU
    p.get_stage_by_name("ServeDeploymentStage").map_batches_kwargs["num_cpus"] = STAGE_ACTOR_CPUS
    return p


def _to_engine(batch: pa.Table) -> pa.Table:
    """Our `id` and `error` columns out of the way of the response's (the processor merges it into the row)."""
    return batch.rename_columns([{"id": "_id", "error": "_error"}.get(c, c) for c in batch.column_names])


def _engine_rows(table: pa.Table, schema: pa.Schema) -> list[dict]:
    """The rows after the processor, as our rows (`schema`) plus what the engine computed: generated_tokens,
    time_taken_llm, prompt_token_ids, __inference_error__ (a refusal or a failure, as text)."""
    out = []
    for r in table.to_pylist():
        row = {k: r.get(k) for k in schema.names if k not in ("id", "error")}
        row["id"], row["error"] = r.get("_id"), r.get("_error")
        for k in ("_reserved", "_cap", "_skip", "_goal"):
            row[k] = r.get(k)
        choices = r.get("choices") or []
        err = r.get("__inference_error__") or ""
        refusal = r.get("error")  # an engine's ErrorResponse comes back as the row's `error`
        if not err and isinstance(refusal, dict):
            err = refusal.get("message") or str(refusal)
        if not err and not choices and not row["_skip"]:
            err = "no answer from the engine"
        row["__inference_error__"] = err
        row["generated_tokens"] = list(choices[0].get("token_ids") or []) if choices else None
        row["time_taken_llm"] = r.get("time_taken") or 0.0
        row["prompt_token_ids"] = list(r.get("tokenized_prompt") or [])
        out.append(row)
    return out


def _map(ds, fn, **kwargs):
    return ds.map_batches(fn, batch_format="pyarrow", num_cpus=REQUEST_CPUS, fn_kwargs=kwargs)


def _placeholder(stop_id: int) -> dict:
    return {"tokenized_prompt": [stop_id], "_reserved": 0, "_cap": 1, "_skip": True, "_goal": -1,
            "sampling_params": {"max_tokens": 1, "temperature": 0.0, "top_p": 1.0, "seed": 0,
                                "stop_token_ids": [], "detokenize": False}}


def _error(stage: str, why: str) -> str:
    return f"{stage}: {why}"[:1000]


# ---- the base model drafts ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _ratio(base: str, base_trust: bool, aligner: str, aligner_trust: bool) -> float:
    from pipeline.decoding.draft_prefix import tokens_ratio

    return tokens_ratio(_text(base, base_trust).tokenizer, _text(aligner, aligner_trust).tokenizer)


def _turn_key(row: dict, turn: int) -> str:
    return str(row["id"]) if turn == 0 else f"{row['id']}#{turn}"  # how the aligner keys a row's turns


def _draft_requests(batch: pa.Table, base: DraftCfg, turn: int, schema: pa.Schema, prefix_for=None) -> pa.Table:
    from pipeline.decoding.draft_prefix import base_budget, prefix_goal
    from pipeline.decoding.drafting import draft_seed
    from pipeline.prompts import chat_prompt_ids
    from pipeline.records import conversation

    text = _text(base.model, base.trust_remote_code)
    s = base.sampling
    out = []
    for r in batch.to_pylist():
        answers = r.get("_answers") or []
        turn_ = len(r["turns"]) - 1 if turn < 0 else turn  # -1: the last turn again (`_redraft_requests`)
        if r.pop("_skip_turn", None) or r.get("error") or r["drafts"] is not None or turn_ >= len(r["turns"]):
            out.append({**r, **_placeholder(text.stop_ids[0])})
            continue
        try:
            ids = chat_prompt_ids(text.tokenizer, conversation(r, turn_, answers))
        except ValueError as e:
            out.append({**r, **_placeholder(text.stop_ids[0]), "error": _error("draft stage", e)})
            continue
        why = text.too_long(len(ids), s.max_new_tokens, "the base model's", base.vllm.max_model_len)
        if why:
            out.append({**r, **_placeholder(text.stop_ids[0]), "error": _error("draft stage", why)})
            continue
        cap, goal = s.max_new_tokens, -1
        if prefix_for is not None and turn_ == len(r["turns"]) - 1:  # earlier turns' drafts are in later prompts
            g = prefix_goal(_turn_key(r, turn_), prefix_for.refine)
            if g.skip:  # r = 0: the answer reads none of the draft
                out.append({**r, **_placeholder(text.stop_ids[0]), "_goal": 0})
                continue
            goal = g.tokens
            cap = base_budget(g, _ratio(base.model, base.trust_remote_code, prefix_for.model,
                                        prefix_for.trust_remote_code), s.max_new_tokens)
        params = {"max_tokens": cap, "temperature": s.temperature if s.do_sample else 0.0,
                  "top_p": s.top_p if s.do_sample else 1.0, "seed": draft_seed(s.seed, f"{r['id']}#{turn_}"),
                  "stop_token_ids": list(text.stop_ids), "detokenize": False}
        out.append({**r, "tokenized_prompt": ids, "sampling_params": params, "_reserved": 0,
                    "_cap": cap, "_skip": False, "_goal": goal})
    return pa.Table.from_pylist(out, schema=pa.schema(list(schema) + REQUEST_COLUMNS))


def _collect_drafts(batch: pa.Table, base: DraftCfg, turn: int, schema: pa.Schema, last: bool,
                    prefix_for=None) -> pa.Table:
    from pipeline.decoding.draft_prefix import PrefixGoal, settles

    text = _text(base.model, base.trust_remote_code)
    out = []
    for r in _engine_rows(batch, schema):
        goal = r.get("_goal")
        goal = -1 if goal is None else goal
        if goal == 0:  # a prefix of nothing: this turn's answer reads no draft token
            r["_answers"] = (r.get("_answers") or []) + [""]
            r["draft_prefix"] = True
        elif not r["_skip"]:
            if r.get("__inference_error__"):
                r["error"] = _error("draft stage", f"vLLM: {r['__inference_error__']}")
            else:
                generated = list(r["generated_tokens"] or [])
                answer = text.answer_text(generated)
                r["_answers"] = (r.get("_answers") or []) + [answer]
                r["draft_s"] = (r.get("draft_s") or 0.0) + max(0.0, r["time_taken_llm"] or 0.0)
                r["draft_tokens"] = (r.get("draft_tokens") or 0) + len(generated)
                if goal > 0:
                    whole = (len(generated) < r["_cap"] or any(t in text.stop_ids for t in generated)
                             or r["_cap"] >= base.sampling.max_new_tokens)
                    al = _text(prefix_for.model, prefix_for.trust_remote_code).tokenizer
                    r["draft_prefix"] = not whole
                    if not settles(al, answer, PrefixGoal(0, goal), whole):
                        r["error"] = PREFIX_REDO
        if last and r["drafts"] is None and not r.get("error"):
            r["drafts"] = r.get("_answers") or []
        out.append(r)
    return pa.Table.from_pylist(out, schema=schema)


def draft(ds, engines: Engines, base: DraftCfg, turns: int, schema: pa.Schema, prefix_for=None):
    """Drafts for the rows without drafts (`drafts` is null), turn by turn, on vLLM engines. `schema`: the rows'
    schema (it must hold `draft_s`); the rows come out with the same schema and `drafts` filled in.

    `prefix_for` (an aligner section whose answer reads only the draft's first r tokens,
    `draft_prefix.needs_full_draft`): a row's last turn is drafted only as far as that aligner's answer depends
    on it (nothing where r = 0), the earlier turns in full (later prompts hold them); a `draft_prefix` column in
    `schema` says which drafts are prefixes. A prefix that did not settle is drafted again, in full, by one more
    round on the same engines."""
    work = schema.append(pa.field("_answers", pa.list_(pa.string())))
    ds = _map(ds, _add_columns, fields=[work.field("_answers")])
    for turn in range(turns):
        ds = _map(ds, _draft_requests, base=base, turn=turn, schema=work, prefix_for=prefix_for)
        ds = _engine(ds, engines, base, f"draft turn {turn}")
        ds = _map(ds, _collect_drafts, base=base, turn=turn, schema=work, last=turn == turns - 1,
                  prefix_for=prefix_for)
    if prefix_for is not None:  # the prefixes that did not settle, in full
        ds = _map(ds, _redraft_requests, base=base, schema=work)
        ds = _engine(ds, engines, base, "draft again in full")
        ds = _map(ds, _collect_drafts, base=base, turn=-1, schema=work, last=True, prefix_for=None)
    return _map(ds, _select, schema=schema)


def _engine(ds, engines: Engines, sec: OnVllm, stage: str):
    return processor(engines, sec, stage)(_map(ds, _to_engine))


def _redraft_requests(batch: pa.Table, base: DraftCfg, schema: pa.Schema) -> pa.Table:
    """The full draft of each row whose prefix did not settle (the prefix dropped); a placeholder for the others."""
    rows = []
    for r in batch.to_pylist():
        if r.get("error") == PREFIX_REDO:
            r = {**r, "error": None, "_answers": (r.get("_answers") or [])[:-1], "draft_prefix": False}
        else:
            r = {**r, "_skip_turn": True}
        rows.append(r)
    return _draft_requests(pa.Table.from_pylist(rows, schema=schema.append(pa.field("_skip_turn", pa.bool_()))),
                           base, -1, schema)


# ---- the aligner refines --------------------------------------------------------------------------------------
def _refine_requests(batch: pa.Table, aligner: AlignerCfg, turn: int, schema: pa.Schema, failed: str) -> pa.Table:
    from pipeline.decoding.continuation import AlignerPrompts, RefineRequest, continuation
    from pipeline.prompts import DEFAULT_CORRECTION_TEMPLATE
    from pipeline.records import conversation

    text = _text(aligner.model, aligner.trust_remote_code)
    prompts = AlignerPrompts(text, aligner.refine, aligner.in_context, aligner.template or DEFAULT_CORRECTION_TEMPLATE,
                             context_window=aligner.vllm.max_model_len)
    out = []
    for r in batch.to_pylist():
        if r.get("error") or r.get(failed) or turn >= len(r["turns"]):
            out.append({**r, **_placeholder(text.stop_ids[0])})
            continue
        try:
            setting, adapter = row_setting(aligner, r.get("alignment"))
        except ValueError as e:
            out.append({**r, **_placeholder(text.stop_ids[0]), failed: _error("refine stage", e)})
            continue
        key = _turn_key(r, turn)  # as the HF engines key turns
        try:
            item = prompts.encode(RefineRequest(conversation(r, turn, r["drafts"]), r["drafts"][turn], key=key))
        except ValueError as e:
            out.append({**r, **_placeholder(text.stop_ids[0]), failed: _error("refine stage", e)})
            continue
        ids, budget = continuation(item, aligner.refine)
        params = {"max_tokens": budget, "temperature": 0.0, "top_p": 1.0, "seed": 0,  # greedy: the seed is unused
                  "stop_token_ids": list(text.stop_ids), "detokenize": False}
        out.append({**r, "tokenized_prompt": ids, "sampling_params": params, "_reserved": item.reserved,
                    "_cap": item.cap(aligner.refine), "_skip": False, "_adapter": adapter,
                    **({"alignment": setting} if "alignment" in schema.names else {})})
    return pa.Table.from_pylist(out, schema=pa.schema(list(schema) + REQUEST_COLUMNS))


def row_setting(aligner: AlignerCfg, own) -> tuple[dict | None, str | None]:
    """(the alignment setting a row runs with, its adapter name): the job's `aligner.knobs`, each overridden by the
    row's own `alignment` ({vector: λ}), validated against the aligner's vectors and quantized to `adapters.step`;
    (None, None) for an aligner without vectors (and a ValueError for a row that asks for knobs there)."""
    from pipeline.vectors.knobs import normalize_knobs
    from pipeline.vectors.lora import adapter_name, quantize

    knobs = dict(getattr(aligner, "knobs", {}) or {}) | dict(own or {})
    names = sorted(vectors_of(aligner))
    if not names:
        if knobs:
            raise ValueError(f"alignment {knobs}: the aligner has no alignment vectors (aligner.vectors)")
        return None, None
    key = quantize(normalize_knobs(knobs, names), aligner.adapters.step)
    return dict(key), adapter_name(key)


def _collect_refined(batch: pa.Table, aligner: AlignerCfg, schema: pa.Schema, column: str, failed: str) -> pa.Table:
    from pipeline.decoding.continuation import finish
    from pipeline.decoding.jacobi import RefineItem

    text = _text(aligner.model, aligner.trust_remote_code)
    out = []
    for r in _engine_rows(batch, schema):
        if not r["_skip"]:
            if r.get("__inference_error__"):
                r[failed] = _error("refine stage", f"vLLM: {r['__inference_error__']}")
            else:
                ids, k = list(r["prompt_token_ids"]), r["_reserved"]
                item = RefineItem(prompt_ids=ids[:len(ids) - k], draft_ids=ids[len(ids) - k:], reserved=k,
                                  max_new_tokens=r["_cap"])
                res = finish(item, r["generated_tokens"] or [], text.stop_ids, aligner.refine,
                             wall_s=max(0.0, r["time_taken_llm"] or 0.0))
                r[column] = (r.get(column) or []) + [{
                    "token_ids": res.token_ids, "text": text.answer_text(res.token_ids),
                    "reserved": res.reserved, "generated_tokens": res.generated_tokens,
                    "tokens_computed": res.tokens_computed,
                    "stop": res.stop, "wall_s": res.wall_s}]
        out.append(r)
    return pa.Table.from_pylist(out, schema=schema)


def refine(ds, engines: Engines, aligner: AlignerCfg, turns: int, schema: pa.Schema, column: str = "refined",
           fail_row: bool = True):
    """Every turn's draft refined by the aligner on vLLM engines. Rows come out with `schema` plus `column`: one
    `RESULT` per turn (token ids, text, tokens generated, stop reason, engine seconds). A row the aligner cannot
    refine gets the reason in `error` (`fail_row`), or else in `<column>_error`, so that other answers of the row still count
    (evaluate's methods); the result schema is `refined_schema(schema, column, fail_row)`."""
    failed = "error" if fail_row else f"{column}_error"
    work = refined_schema(schema, column, fail_row)
    ds = _map(ds, _add_columns, fields=[f for f in work if f.name not in schema.names])
    for turn in range(turns):
        ds = _map(ds, _refine_requests, aligner=aligner, turn=turn, schema=work, failed=failed)
        ds = _engine(ds, engines, aligner, f"refine turn {turn}" + ("" if fail_row else f" ({column})"))
        ds = _map(ds, _collect_refined, aligner=aligner, schema=work, column=column, failed=failed)
    return ds


def as_results(refined: list[dict] | None) -> list:
    """A row's `RESULT`s as `RefineResult`s, for the code that writes the HF engines' results: what vLLM computed
    (`generated_tokens`, tokens_computed, stop, wall_s); no Jacobi statistics (passes and converged are None, as
    `continuation.finish` gives them)."""
    from pipeline.decoding.jacobi import RefineResult

    return [RefineResult(x["token_ids"], passes=None, tokens_computed=x["tokens_computed"], converged=None,
                         stop=x["stop"], wall_s=x["wall_s"], reserved=x["reserved"], text=x["text"],
                         generated_tokens=x["generated_tokens"]) for x in refined or []]


def refined_schema(schema: pa.Schema, column: str = "refined", fail_row: bool = True) -> pa.Schema:
    out = schema.append(pa.field(column, pa.list_(RESULT)))
    return out if fail_row else out.append(pa.field(f"{column}_error", pa.string()))


# ---- helpers --------------------------------------------------------------------------------------------------
def _add_columns(batch: pa.Table, fields: list[pa.Field]) -> pa.Table:
    for f in fields:
        batch = batch.append_column(f, pa.nulls(batch.num_rows, f.type))
    return batch


def _select(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    return batch.select(schema.names).cast(schema)


def max_turns(rows: pa.Table) -> int:
    """The most turns of any row (at least 1): how many engine rounds a stage runs."""
    import pyarrow.compute as pc

    n = pc.max(pc.list_value_length(rows.column("turns"))).as_py() if rows.num_rows else 0
    return max(1, n or 0)
