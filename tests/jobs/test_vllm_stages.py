"""The vLLM stages' request and collect steps (jobs/common/vllm_stages.py) without an engine: multi-turn drafting
feeds turn k's answer into turn k+1's prompt, rows without a turn or with an error send a placeholder and pass
through, the aligner's request is the prompt + r reserved draft tokens, and the engine's tokens become the answer."""
import pyarrow as pa
import pytest

from jobs.align_dataset import DRAFTED_SCHEMA
from jobs.common import vllm_stages as vs
from jobs.common.config import VllmAlignerCfg, VllmDraftCfg
from pipeline.decoding.continuation import AlignerPrompts, RefineRequest, continuation
from pipeline.decoding.drafting import draft_seed
from pipeline.models import load_model_text
from pipeline.prompts import chat_prompt_ids
from pipeline.records import conversation


def _rows():
    base = {"history": [], "meta": None, "references": [], "error": None, "draft_s": 0.0}
    return [dict(base, id="mt", turns=["Write a haiku.", "Now make it sadder."], drafts=None),
            dict(base, id="one", turns=["Say hi."], drafts=None),
            dict(base, id="given", turns=["Count."], drafts=["One, two."]),
            dict(base, id="bad", turns=["x"], drafts=None, error="empty prompt")]


def _engine(table: pa.Table, answers: dict) -> pa.Table:
    """What the Serve deployment processor hands back: the rows with our id / error moved aside (`_to_engine`) and
    the completion merged in (its own `id`; token ids per choice; here given per row)."""
    rows = vs._to_engine(table).to_pylist()
    for r in rows:
        r["choices"] = [{"token_ids": answers.get(r["_id"], [1]), "finish_reason": "stop"}]
        r["id"], r["time_taken"], r["__inference_error__"] = "cmpl-x", 0.5, ""
    return pa.Table.from_pylist(rows)


def test_multi_turn_drafting_feeds_each_answer_into_the_next_prompt(vllm_tiny):
    base = VllmDraftCfg(model=str(vllm_tiny))
    text = load_model_text(str(vllm_tiny))
    tok = text.tokenizer
    work = DRAFTED_SCHEMA.append(pa.field("_answers", pa.list_(pa.string())))
    t = vs._add_columns(pa.Table.from_pylist(_rows(), schema=DRAFTED_SCHEMA), [work.field("_answers")])
    answers = {"mt": tok("A leaf falls.", add_special_tokens=False)["input_ids"] + text.stop_ids[:1] + [70, 71],
               "one": tok("Hi!", add_special_tokens=False)["input_ids"]}
    req = vs._draft_requests(t, base, 0, work)
    by = {r["id"]: r for r in req.to_pylist()}
    assert by["mt"]["tokenized_prompt"] == chat_prompt_ids(tok, [{"role": "user", "content": "Write a haiku."}])
    assert not by["mt"]["_skip"] and by["mt"]["sampling_params"]["seed"] == draft_seed(0, "mt#0")
    assert by["given"]["_skip"] and by["bad"]["_skip"], "given drafts and error rows send a placeholder"
    t = vs._collect_drafts(_engine(req, answers), base, 0, work, last=False)
    by = {r["id"]: r for r in t.to_pylist()}
    assert by["mt"]["_answers"] == ["A leaf falls."], "cut at the first stop id"
    assert by["one"]["_answers"] == ["Hi!"] and by["one"]["draft_s"] == 0.5

    req = vs._draft_requests(t, base, 1, work)
    by = {r["id"]: r for r in req.to_pylist()}
    turn1 = conversation({"turns": ["Write a haiku.", "Now make it sadder."], "history": []}, 1, ["A leaf falls."])
    assert by["mt"]["tokenized_prompt"] == chat_prompt_ids(tok, turn1), "turn 2's prompt holds turn 1's answer"
    assert by["one"]["_skip"], "a one-turn row has no turn 2"
    out = vs._select(vs._collect_drafts(_engine(req, {"mt": tok("Dead leaf.", add_special_tokens=False)["input_ids"]}),
                                        base, 1, work, last=True), DRAFTED_SCHEMA)
    by = {r["id"]: r for r in out.to_pylist()}
    assert by["mt"]["drafts"] == ["A leaf falls.", "Dead leaf."] and by["one"]["drafts"] == ["Hi!"]
    assert by["given"]["drafts"] == ["One, two."] and by["bad"]["drafts"] is None and by["bad"]["error"] == "empty prompt"
    assert out.schema == DRAFTED_SCHEMA


def test_refine_requests_hold_r_draft_tokens_and_results_start_with_them(vllm_tiny):
    aligner = VllmAlignerCfg(model=str(vllm_tiny))
    text = load_model_text(str(vllm_tiny))
    rows = _rows()
    rows[0]["drafts"], rows[1]["drafts"] = ["Leaves fall slowly down.", "Gray sky, the leaves are gone."], ["Hello there!"]
    work = vs.refined_schema(DRAFTED_SCHEMA)
    t = vs._add_columns(pa.Table.from_pylist(rows, schema=DRAFTED_SCHEMA), [work.field("refined")])
    prompts = AlignerPrompts(text, aligner.refine)
    for turn in (0, 1):
        req = vs._refine_requests(t, aligner, turn, work, "error")
        by = {r["id"]: r for r in req.to_pylist()}
        r = rows[0]
        item = prompts.encode(RefineRequest(conversation(r, turn, r["drafts"]), r["drafts"][turn],
                                            key="mt" if turn == 0 else "mt#1"))
        ids, budget = continuation(item, aligner.refine)
        assert by["mt"]["tokenized_prompt"] == ids and by["mt"]["_reserved"] == item.reserved
        assert by["mt"]["sampling_params"]["max_tokens"] == budget and by["mt"]["sampling_params"]["temperature"] == 0
        assert by["one"]["_skip"] == (turn == 1) and by["bad"]["_skip"]
        t = vs._collect_refined(_engine(req, {"mt": [40, 41] + text.stop_ids[:1], "one": [42]}), aligner, work,
                                "refined", "error")
    by = {r["id"]: r for r in t.to_pylist()}
    assert len(by["mt"]["refined"]) == 2 and len(by["one"]["refined"]) == 1 and by["bad"]["refined"] is None
    res = vs.as_results(by["mt"]["refined"])
    assert res[1].token_ids[-2:] == [40, 41] and res[1].stop == "eos" and res[1].generated_tokens == 3
    assert res[1].passes is None and res[1].converged is None and res[1].tokens_per_pass is None, \
        "vLLM runs no Jacobi iteration: no Jacobi statistics"
    assert res[1].token_ids[:-2] == item.draft_ids[:item.reserved], "the reserved draft tokens come first"


def test_finish_reports_generated_tokens_and_no_jacobi_statistics():
    """`continuation.finish` (vLLM stages, the refiner's ar mode): the answer, the stop reason and the tokens the
    engine generated (a stop token included); passes, convergence and tokens per pass are None: no Jacobi
    iteration ran."""
    from pipeline.decoding.continuation import finish
    from pipeline.decoding.jacobi import RefineItem
    from pipeline.decoding.settings import RefineSettings

    s, stop = RefineSettings(max_new_tokens=8), [0]
    item = RefineItem(prompt_ids=[5, 6, 7], draft_ids=[20, 21, 22], reserved=2)
    res = finish(item, [30, 31, 0, 99], stop, s, wall_s=0.25)
    assert res.token_ids == [20, 21, 30, 31] and res.stop == "eos" and res.generated_tokens == 3
    assert res.passes is None and res.converged is None and res.tokens_per_pass is None and not res.jacobi
    assert res.tokens_computed == 3 + 2 + 3 and res.wall_s == 0.25 and res.new_tokens == 2
    res = finish(item, list(range(30, 40)), stop, s)  # no stop token: cut at the cap (8 - 2 reserved)
    assert res.stop == "max_new_tokens" and res.generated_tokens == 6 and res.passes is None
    res = finish(RefineItem(prompt_ids=[5], draft_ids=[20, 0, 22], reserved=3), [30], stop, s)
    assert res.token_ids == [20] and res.stop == "eos" and res.generated_tokens == 0 and res.converged is None


def test_a_batch_whose_engine_died_is_tried_again_and_other_errors_are_not():
    """The error a Serve handle raises inside a Ray LLM stage when its replica's node is lost reaches Ray Data as a
    UserCodeException caused by ActorUnavailableError; with the job's retry settings Ray Data's own retry loop sends
    the batch again (one output, not two); a bug in a UDF (ValueError) still fails at once."""
    import ray.exceptions as rex
    from ray.data import DataContext
    from ray.data._internal.util import iterate_with_retry

    ctx = DataContext()
    vs.retry_lost_engines(ctx)
    assert ctx.max_map_retries >= 3 and rex.ActorDiedError in ctx.actor_task_retry_on_errors
    tries = []

    def batches(error):
        def factory():
            tries.append(1)
            if len(tries) == 1:
                try:
                    raise error
                except Exception as cause:
                    raise rex.UserCodeException("UDF failed to process a data block.") from cause
            yield {"batch": [1, 2, 3]}
        return lambda: iterate_with_retry(factory, "apply UDF transform", match=ctx.retried_map_errors,
                                          max_attempts=ctx.max_map_retries + 1, max_backoff_s=0, unwrap_cause=True)

    assert list(batches(rex.ActorUnavailableError("The actor x is unavailable", b"0" * 16))()) == [{"batch": [1, 2, 3]}]
    assert len(tries) == 2
    tries.clear()
    with pytest.raises(rex.UserCodeException):
        list(batches(ValueError("a bug"))())
    assert len(tries) == 1, "a bug is not tried again"
