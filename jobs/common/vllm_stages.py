"""Model stages on vLLM engines through Ray Data LLM (`ray.data.llm.build_processor`): drafting with the base
model and refining with the aligner, for the batch jobs.

Each stage is, per conversation turn, three steps over the dataset:

    requests (CPU tasks: our tokenizer builds the token ids)  ->  vLLM processor  ->  collect (CPU tasks)

* The aligner's request is DiffPO's exact output as one greedy continuation (`pipeline.decoding.continuation`):
  its chat prompt (or the correction prompt with the draft in context) + the row's `r` reserved draft tokens,
  greedy, at most cap - r new tokens, stopping at the same stop ids; the answer is those `r` tokens + what vLLM
  generated. That is token for token what the Jacobi engines converge to.
* The base model's request is its chat prompt with the configured sampling, seeded per row and turn, so a
  rerun draws the same drafts and batching never changes them. Turn k+1 of a conversation holds the drafted
  answer of turn k, so turns run one after the other: one processor (one engine pool) per turn.
* Rows never get lost: a row that arrives with an error, or has no turn k, sends a one-token placeholder
  request and passes through; a row whose prompt does not fit the context window, or that the engine
  refuses, becomes an error row with the reason (`should_continue_on_error`).

The per-row time budget (`row_timeout_s`) belongs to the Hugging Face engines; a vLLM request is bounded by its
token cap, and continuous batching keeps one long row from holding the others.
"""
from __future__ import annotations

import functools

import pyarrow as pa

from jobs.common.config import AlignerCfg, DraftCfg, KnobCfg, OnVllm
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
                   pa.field("_goal", pa.int64())]
# the error of a row whose drafted prefix did not decide the aligner's first r tokens: the job leaves it unwritten
# and drafts it again in full (`draft(prefix_for=...)`)
PREFIX_REDO = "draft prefix did not settle"


# ---- engine resources and model folders ---------------------------------------------------------------------
def bundles(sec: OnVllm) -> list[dict[str, float]]:
    """The placement group of one engine: `vllm.bundles`, or tp x pp bundles of the pool's num_cpus/num_gpus."""
    return sec.vllm.placement(sec.num_cpus, sec.num_gpus)


def demand(sec: OnVllm, engines_per_actor: int = 1) -> dict[str, float]:
    """Everything a vLLM stage holds at once: `concurrency` engines (x `engines_per_actor`, one per turn),
    each with its placement group (accelerator types as Ray's `accelerator_type:X` resources)."""
    total: dict[str, float] = {}
    for b in bundles(sec):
        for k, x in b.items():
            total[k] = total.get(k, 0.0) + x * sec.concurrency * engines_per_actor
    if sec.vllm.accelerator_type:
        total[f"accelerator_type:{sec.vllm.accelerator_type}"] = 0.001
    return total


def model_folder(sec: OnVllm) -> str:
    """The folder (or hub id) vLLM loads: the model itself, the embedded default's converted folder, or, for an
    aligner with alignment-vector knobs, the merged weights written once (`vectors.knobs.merged_folder`)."""
    from pipeline.models import resolve_model_path

    path, _ = resolve_model_path(sec.model)
    if isinstance(sec, KnobCfg) and sec.knobs:
        from pipeline.vectors.knobs import merged_folder

        return str(merged_folder(path, sec.knob_vectors(), dict(sec.knobs)))
    return path


@functools.lru_cache(maxsize=4)
def _text(spec: str, trust_remote_code: bool):
    from pipeline.models import load_model_text

    return load_model_text(spec, trust_remote_code)


def processor(sec: OnVllm, model: str, stage: str):
    """A Ray Data LLM processor running `model` on vLLM engines as the section says (token ids in, token ids out:
    our own tokenizer builds the prompts, so every engine sees the same ids)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    v = sec.vllm
    on_cpu = not any(b.get("GPU") for b in bundles(sec))  # a GPU cluster's model folder may not be on this node
    e = engine_setup(v, sec.dtype, sec.trust_remote_code, sec.num_cpus, sec.num_gpus,
                     _text(model, sec.trust_remote_code).context_window if on_cpu else None)
    cfg = vLLMEngineProcessorConfig(
        model_source=model, engine_kwargs=e.engine_kwargs, batch_size=sec.batch_size, concurrency=sec.concurrency,
        max_concurrent_batches=v.max_concurrent_batches, accelerator_type=v.accelerator_type,
        placement_group_config={"bundles": e.bundles, "strategy": v.strategy},
        runtime_env={"env_vars": e.env} if e.env else None, should_continue_on_error=True,
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
    print(f"[vllm] {stage}: {sec.concurrency} engine(s) of {model}, bundles {e.bundles}, engine args "
          f"{e.engine_kwargs}", flush=True)
    light = {"num_cpus": REQUEST_CPUS}  # the processor's own row maps: Ray Data's default (1 CPU) would not fit
    return build_processor(cfg, preprocess_map_kwargs=light, postprocess_map_kwargs=light)


def _map(ds, fn, **kwargs):
    return ds.map_batches(fn, batch_format="pyarrow", num_cpus=REQUEST_CPUS, fn_kwargs=kwargs)


def _without_engine_columns(table: pa.Table, schema: pa.Schema) -> list[dict]:
    return table.select([c for c in table.column_names if c in schema.names or c in
                         ("generated_tokens", "time_taken_llm", "__inference_error__", "_reserved", "_cap", "_skip",
                          "_goal", "prompt_token_ids")]).to_pylist()


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
        if r.get("error") or r["drafts"] is not None or turn >= len(r["turns"]):
            out.append({**r, **_placeholder(text.stop_ids[0])})
            continue
        try:
            ids = chat_prompt_ids(text.tokenizer, conversation(r, turn, answers))
        except ValueError as e:
            out.append({**r, **_placeholder(text.stop_ids[0]), "error": _error("draft stage", e)})
            continue
        why = text.too_long(len(ids), s.max_new_tokens, "the base model's", base.vllm.max_model_len)
        if why:
            out.append({**r, **_placeholder(text.stop_ids[0]), "error": _error("draft stage", why)})
            continue
        cap, goal = s.max_new_tokens, -1
        if prefix_for is not None and turn == len(r["turns"]) - 1:  # earlier turns' drafts are in later prompts
            g = prefix_goal(_turn_key(r, turn), prefix_for.refine)
            if g.skip:  # r = 0: the answer reads none of the draft
                out.append({**r, **_placeholder(text.stop_ids[0]), "_goal": 0})
                continue
            goal = g.tokens
            cap = base_budget(g, _ratio(base.model, base.trust_remote_code, prefix_for.model,
                                        prefix_for.trust_remote_code), s.max_new_tokens)
        params = {"max_tokens": cap, "temperature": s.temperature if s.do_sample else 0.0,
                  "top_p": s.top_p if s.do_sample else 1.0, "seed": draft_seed(s.seed, f"{r['id']}#{turn}"),
                  "stop_token_ids": list(text.stop_ids), "detokenize": False}
        out.append({**r, "tokenized_prompt": ids, "sampling_params": params, "_reserved": 0,
                    "_cap": cap, "_skip": False, "_goal": goal})
    return pa.Table.from_pylist(out, schema=pa.schema(list(schema) + REQUEST_COLUMNS))


def _collect_drafts(batch: pa.Table, base: DraftCfg, turn: int, schema: pa.Schema, last: bool,
                    prefix_for=None) -> pa.Table:
    from pipeline.decoding.draft_prefix import PrefixGoal, settles

    text = _text(base.model, base.trust_remote_code)
    out = []
    for r in _without_engine_columns(batch, schema):
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


def draft(ds, base: DraftCfg, turns: int, schema: pa.Schema, prefix_for=None):
    """Drafts for the rows without drafts (`drafts` is null), turn by turn, on vLLM engines. `schema`: the rows'
    schema (it must hold `draft_s`); the rows come out with the same schema and `drafts` filled in.

    `prefix_for` (an aligner section whose answer reads only the draft's first r tokens,
    `draft_prefix.needs_full_draft`): a row's last turn is drafted only as far as that aligner's answer depends
    on it (nothing where r = 0), the earlier turns in full (later prompts hold them); a `draft_prefix` column in
    `schema` says which drafts are prefixes. A prefix that did not settle gets the error `PREFIX_REDO`: the job
    leaves the row unwritten and drafts it again in full."""
    work = schema.append(pa.field("_answers", pa.list_(pa.string())))
    ds = _map(ds, _add_columns, fields=[work.field("_answers")])
    model = model_folder(base)
    for turn in range(turns):
        ds = _map(ds, _draft_requests, base=base, turn=turn, schema=work, prefix_for=prefix_for)
        ds = processor(base, model, f"draft turn {turn}")(ds)
        ds = _map(ds, _collect_drafts, base=base, turn=turn, schema=work, last=turn == turns - 1,
                  prefix_for=prefix_for)
    return _map(ds, _select, schema=schema)


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
        key = str(r["id"]) if turn == 0 else f"{r['id']}#{turn}"  # as the HF engines key turns
        try:
            item = prompts.encode(RefineRequest(conversation(r, turn, r["drafts"]), r["drafts"][turn], key=key))
        except ValueError as e:
            out.append({**r, **_placeholder(text.stop_ids[0]), failed: _error("refine stage", e)})
            continue
        ids, budget = continuation(item, aligner.refine)
        params = {"max_tokens": budget, "temperature": 0.0, "top_p": 1.0, "seed": 0,  # greedy: the seed is unused
                  "stop_token_ids": list(text.stop_ids), "detokenize": False}
        out.append({**r, "tokenized_prompt": ids, "sampling_params": params, "_reserved": item.reserved,
                    "_cap": item.cap(aligner.refine), "_skip": False})
    return pa.Table.from_pylist(out, schema=pa.schema(list(schema) + REQUEST_COLUMNS))


def _collect_refined(batch: pa.Table, aligner: AlignerCfg, schema: pa.Schema, column: str, failed: str) -> pa.Table:
    from pipeline.decoding.continuation import finish
    from pipeline.decoding.jacobi import RefineItem

    text = _text(aligner.model, aligner.trust_remote_code)
    out = []
    for r in _without_engine_columns(batch, schema):
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


def refine(ds, aligner: AlignerCfg, turns: int, schema: pa.Schema, column: str = "refined", fail_row: bool = True):
    """Every turn's draft refined by the aligner on vLLM engines. Rows come out with `schema` plus `column`: one
    `RESULT` per turn (token ids, text, tokens generated, stop reason, engine seconds). A row the aligner cannot
    refine gets the reason in `error` (`fail_row`), or else in `<column>_error`, so that other answers of the row still count
    (evaluate's methods); the result schema is `refined_schema(schema, column, fail_row)`."""
    failed = "error" if fail_row else f"{column}_error"
    work = refined_schema(schema, column, fail_row)
    ds = _map(ds, _add_columns, fields=[f for f in work if f.name not in schema.names])
    model = model_folder(aligner)
    for turn in range(turns):
        ds = _map(ds, _refine_requests, aligner=aligner, turn=turn, schema=work, failed=failed)
        ds = processor(aligner, model, f"refine turn {turn}" + ("" if fail_row else f" ({column})"))(ds)
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
