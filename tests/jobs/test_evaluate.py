"""The evaluation job end to end on tiny models (offline and reward-model judges, every method, exports, report,
resume), its config errors and its references file."""
import json
from pathlib import Path

import pandas as pd
import pytest

from jobs.common.config import ConfigError, load_config


# ---- the job ------------------------------------------------------------------------------------------
HUGE = "word " * 5000  # ~5000 tokens with the byte-level tokenizer: past the tiny models' 4096-token window


def _bench(tmp_path: Path) -> Path:
    """Good rows in both formats, rows outside the held-out split, and hostile rows (behind a UTF-8 BOM)."""
    rows = [
        {"id": 0, "dataset": "helpful_base", "instruction": "Name two colors.", "output": "Red and blue.",
         "reference_output": "Two colors are red and blue."},
        {"id": 4, "dataset": "koala", "instruction": "Say hello politely.", "reference_output": "Hello, nice to meet you."},
        {"id": 8, "instruction": "", "reference_output": "x"},  # empty prompt: an error row
        {"id": 5, "instruction": "Not held out.", "reference_output": "y"},  # id % 4 != 0: filtered
        {"question_id": 12, "category": "math", "turns": ["What is 1+1?", "And 2+2?"], "reference": ["2", "4"]},
        {"id": 16, "instruction": HUGE, "reference_output": "x"},  # over the base model's window
        {"id": 20, "messages": [{"role": "user", "content": HUGE}, {"role": "assistant", "content": "Sure."},
                                {"role": "user", "content": "And then?"}], "reference_output": "y"},  # in the history
        {"id": 24, "instruction": "Summarize.", "output": HUGE, "reference_output": "A summary."},  # a huge draft
    ]
    p = tmp_path / "bench.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode()
                  + b'{"id": 28, "instruction": \n')  # broken JSON: no id to split on, an error row
    return p


TINY = ["base.sampling.max_new_tokens=10", "aligner.refine.max_new_tokens=12", "aligner.refine.block_size=8", "ray.progress_bars=false",
        "stats.n_boot=50", "best_of_n.n=2", "output.rows_per_block=1", "base.num_cpus=0.25", "aligner.num_cpus=0.25",
        "judges.num_cpus=0.25", "aligner.batch_size=1", "base.batch_size=1", "judges.batch_size=6",  # a part per prompt
        "base.engine=hf", "aligner.engine=fast"]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_evaluate_job_end_to_end(tmp_path, tiny_dirs, tiny_rm, ray_local):
    from jobs.evaluate import main

    m = str(tiny_dirs["llama"])
    out = tmp_path / "out"
    args = [f"benchmark.path={_bench(tmp_path)}", "benchmark.name=mini", "benchmark.id_mod=4", f"output.path={out}",
            f"base.model={m}", f"aligner.model={m}", "methods=[draft,refine,refine_reference,in_context,aligner_ar,best_of_n]",
            "judges.reward.enabled=true", f"judges.reward.model={tiny_rm}", "judges.reward.max_length=2048", *TINY]
    s = main(args)
    df = pd.read_parquet(out / "results.parquet")
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    assert s["rows_in"] == 8 and s["n_prompts"] == 4, "8 held-out or unreadable lines; 4 prompts with results"
    assert len(df) == 3 * 6 + 5, "3 good prompts, and the huge draft's row in every method but in_context"
    assert len(df) + len(errors) == 8 * 6, "every held-out or unreadable line comes out once per method"
    assert set(df["method"]) == {"draft", "refine", "refine_reference", "in_context", "aligner_ar", "best_of_n"}
    by = {(r["id"], r["method"]): r for r in df.to_dict("records")}
    assert by[("0", "draft")]["answer"] == "Red and blue."  # a draft that came with the input is kept
    for i in ("0", "4", "12"):  # greedy Jacobi, reference Jacobi and greedy AR agree token for token
        assert list(by[(i, "refine")]["answer_turns"]) == list(by[(i, "aligner_ar")]["answer_turns"]) == \
            list(by[(i, "refine_reference")]["answer_turns"])
    assert len(by[("12", "refine")]["answer_turns"]) == 2  # both MT-bench turns
    assert list(by[("12", "draft")]["reference_turns"]) == ["2", "4"]
    judged = df[(df["id"] != "24") | (df["method"] != "draft")]  # all but the huge draft (below)
    assert df["offline_sim"].notna().all() and judged["rm_score"].notna().all() and judged["rm_pref"].between(0, 1).all()
    assert (df.loc[df["method"] == "refine", "passes"] > 0).all()
    jac = df["method"].isin(["refine", "refine_reference", "in_context"])  # on the fast / reference Jacobi engines
    assert df.loc[jac, "passes"].notna().all() and df.loc[jac, "generated_tokens"].isna().all()
    assert df.loc[~jac, ["passes", "tokens_per_pass", "converged"]].isna().all().all(), "no Jacobi iteration there"
    assert (df.loc[df["method"] == "aligner_ar", "generated_tokens"] > 0).all(), "HF generate: its generated tokens"
    assert df.loc[df["method"].isin(["draft", "best_of_n"]), "generated_tokens"].isna().all()
    err = {(e["id"], e["method"]): e["error"] for e in errors}
    assert {i for i, _ in err} == {"8", "16", "20", "24", "bench.jsonl:9"} and "empty prompt" in err[("8", "draft")]
    for i in ("16", "20"):  # refused before generate, alone or inside a multi-turn history
        assert err[(i, "refine")].startswith("draft stage: ValueError: prompt of ") and \
            "exceeds the base model's context window of 4096 tokens" in err[(i, "refine")]
    assert err[("24", "in_context")].startswith("in_context: prompt of ") and "aligner's context window" in \
        err[("24", "in_context")] and [m for i, m in err if i == "24"] == ["in_context"], \
        "the huge draft pushes only the in-context aligner past its window"
    huge = by[("24", "draft")]
    assert pd.isna(huge["rm_score"]) and any(
        "reward: error: ValueError: the reward model's input" in n and "limit of 2048 tokens" in n
        for n in huge["judge_notes"]), "the reward judge names the length and the limit, never truncates"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "draft" and {"offline_sim", "rm_score", "length_only"} <= set(summary["metrics"])
    assert any(p["method"] == "refine" and p["metric"] == "offline_sim" for p in summary["paired"])
    meth = summary["methods"]
    assert meth["refine"]["jacobi"]["tokens_per_pass"] > 0 and meth["refine"]["mean_generated_tokens"] is None
    for m in ("aligner_ar", "draft", "best_of_n"):
        assert set(meth[m]["jacobi"].values()) == {None}, m
    assert meth["aligner_ar"]["mean_generated_tokens"] > 0 and meth["draft"]["mean_generated_tokens"] is None
    fc = [json.loads(x) for x in (out / "exports/fastchat/refine.jsonl").read_text().splitlines()]
    assert {x["question_id"] for x in fc} == {0, 4, 12, 24} and fc[0]["model_id"] == "diffpo-refine"
    ae = json.loads((out / "exports/alpaca_eval/draft.json").read_text())
    assert ae[0]["instruction"] == "Name two colors." and ae[0]["output"] == "Red and blue."
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "refine_reference" in html

    # resume: drop one block file (one prompt); a rerun redoes exactly that prompt, without duplicates
    parts = sorted((out / "rows").glob("*.parquet"))
    assert len(parts) == 8  # a block per held-out or unreadable line
    parts[0].unlink()
    s2 = main(args)
    assert len(list((out / "rows").glob("*.parquet"))) == 8 and s2["blocks"] == 8
    df2 = pd.read_parquet(out / "results.parquet")
    assert len(df2) == len(df) and not df2.duplicated(["id", "method"]).any()
    pd.testing.assert_frame_equal(df.drop(columns=["draft_s", "refine_s", "total_s"]).reset_index(drop=True),
                                  df2.drop(columns=["draft_s", "refine_s", "total_s"]).reset_index(drop=True),
                                  check_dtype=False)
    assert s2["n_prompts"] == 4


def test_method_rows_and_summary_hold_only_what_the_engine_computed(capsys):
    """Per method, only what its engine computed: Jacobi statistics from a Jacobi engine (refine on fast), the
    generated tokens from vLLM (in_context on vllm) and HF generate, neither for the draft; the summary and the
    printed table the same (null / "-" where the engine does not compute it). No Ray, no model."""
    import pyarrow as pa

    from jobs.common import vllm_stages
    from jobs.evaluate import LONG_SCHEMA, MethodStage, print_table
    from pipeline.decoding.jacobi import RefineResult
    from pipeline.evaluation.summary import summarize

    stage = object.__new__(MethodStage)  # its rows only: no model
    stage.benchmark = "mini"
    rows = []
    for i in range(4):
        r = {"id": str(i), "turns": [f"q{i}?"], "history": [], "meta": None, "references": [f"ref {i}"], "error": None}
        vllm = vllm_stages.as_results([{"token_ids": [1, 2, 3], "text": "a b", "reserved": 1, "generated_tokens": 3 + i,
                                        "tokens_computed": 20, "stop": "eos", "wall_s": 0.1}])
        fast = [RefineResult([1, 2, 3, 4, 5], passes=2, tokens_computed=30, converged=i != 0, reserved=1, text="a b c")]
        rows += [stage._row(r, "draft", ["a"], 0.5), stage._row(r, "in_context", ["a b"], 0.5, 0.1, vllm),
                 stage._row(r, "refine", ["a b c"], 0.5, 0.3, fast)]
    by = {(r["id"], r["method"]): r for r in rows}
    d, v, f = by[("1", "draft")], by[("1", "in_context")], by[("1", "refine")]
    assert [d[k] for k in ("passes", "tokens_per_pass", "converged", "generated_tokens")] == [None] * 4
    assert [v[k] for k in ("passes", "tokens_per_pass", "converged")] == [None] * 3 and v["generated_tokens"] == 4
    assert (f["passes"], f["tokens_per_pass"], f["converged"], f["generated_tokens"]) == (2, 2.0, True, None)
    df = pa.Table.from_pylist(rows, schema=LONG_SCHEMA).to_pandas()
    df["error"] = df["error"].fillna("")
    s = summarize(df, "draft", n_boot=10)
    nothing = {"mean_passes": None, "tokens_per_pass": None, "converged_fraction": None}
    assert s["methods"]["draft"]["jacobi"] == s["methods"]["in_context"]["jacobi"] == nothing
    assert s["methods"]["refine"]["jacobi"] == {"mean_passes": 2.0, "tokens_per_pass": 2.0, "converged_fraction": 0.75}
    assert s["methods"]["in_context"]["mean_generated_tokens"] == 4.5
    assert s["methods"]["draft"]["mean_generated_tokens"] is None and s["methods"]["refine"]["mean_generated_tokens"] is None
    print_table(s)
    table = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert table["draft"][-2:] == ["-", "-"] and table["in_context"][-2:] == ["-", "4.5"]
    assert table["refine"][-2:] == ["2.00", "-"]


@pytest.mark.parametrize("override,msg", [
    ("methods=[draft,nope]", "methods.1: Input should be 'draft'"),
    ("stats.baseline=refine_reference", "not among the methods"),
    ("methods=[draft,best_of_n]", None),  # fine with the offline judge on
    ("judges.llm.enabled=true", "base_url"),
    ("judges.offline.enabled=false", "enable at least one"),
    ("benchmark.path=/nonexistent.jsonl", "benchmark.path"),
])
def test_config_errors_are_reported_up_front(override, msg):
    from jobs.evaluate import EvaluateConfig

    if msg is None:
        load_config(EvaluateConfig, "conf/evaluate.yaml", [override])
        return
    with pytest.raises(ConfigError, match=msg):
        load_config(EvaluateConfig, "conf/evaluate.yaml", [override])


def test_references_file_formats(tmp_path):
    from jobs.evaluate import load_references

    fc = tmp_path / "ref.jsonl"
    fc.write_text(json.dumps({"question_id": 81, "choices": [{"index": 0, "turns": ["t1", "t2"]}]}) + "\n"
                  + json.dumps({"id": 5, "reference_output": "R5", "output": "not this"}) + "\n"
                  + json.dumps({"id": 6, "output": "O6"}) + "\n")
    refs = load_references(str(fc))
    assert refs["81"] == ["t1", "t2"] and refs["5"] == ["R5"] and refs["6"] == ["O6"]
    assert load_references(None) == {}


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_evaluate_on_vllm_engines(tmp_path, vllm_tiny, vllm_vectors, ray_local):
    """aligner.engine=vllm with an alignment knob (`aligner.knobs`: a LoRA adapter on the engine): `in_context` runs
    on a vLLM engine pool and gives the fast Jacobi engine's answers on the dense merge token for token; a row
    whose correction prompt is over the window fails in that method only. (The rows bring their drafts, and one
    method keeps this to one engine pool: drafting on vLLM and `refine` run in test_align_dataset, the exactness
    of every engine in tests/pipeline/decoding/test_vllm_agreement.py.)"""
    from jobs.evaluate import main
    from pipeline.decoding.refiner import Refiner, RefineRequest
    from pipeline.decoding.settings import RefineSettings
    from pipeline.models import load_model

    m = str(vllm_tiny)
    out = tmp_path / "out"
    rows = [{"id": 0, "instruction": "Name two colors.", "output": "Red and blue.", "reference_output": "Red, blue."},
            {"id": 4, "instruction": "Say hello politely.", "output": "Hi.", "reference_output": "Hello, nice to meet you."},
            {"id": 16, "instruction": "Summarize.", "output": "x " * 3000, "reference_output": "y"},  # too long in context
            {"id": 8, "instruction": "", "output": "z", "reference_output": "x"}]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = main([f"benchmark.path={bench}", "benchmark.name=mini", f"output.path={out}", f"base.model={m}",
              f"aligner.model={m}", "methods=[draft,in_context]", "base.engine=hf", "aligner.engine=vllm",
              "aligner.refine.max_new_tokens=24", f"aligner.vectors={json.dumps(vllm_vectors)}",
              "aligner.knobs={one: 1.0}", f"aligner.adapters.cache_dir={tmp_path / 'adapters'}", "stats.n_boot=20",
              "base.num_cpus=0.2", "aligner.num_cpus=0.2", "judges.num_cpus=0.2", "ray.progress_bars=false"])
    df = pd.read_parquet(out / "results.parquet")
    errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
    by = {(r["id"], r["method"]): r for r in df.to_dict("records")}
    assert len(df) + len(errors) == 4 * 2
    assert {(e["id"], e["method"]) for e in errors} == {("8", "draft"), ("8", "in_context"), ("16", "in_context")}, \
        "the empty prompt fails everywhere, the over-long correction prompt only in in_context"
    assert "in_context: refine stage: prompt of" in next(e["error"] for e in errors if e["id"] == "16")
    assert by[("16", "draft")]["answer"].startswith("x x"), "the row's other method still counts"
    from pipeline.vectors.knobs import load_knobbed

    lm = load_model(m, dtype="float32")
    fast = Refiner(lm, RefineSettings(max_new_tokens=24), mode="fast", in_context=True)
    reqs = [RefineRequest([{"role": "user", "content": r["instruction"]}], r["output"], key=str(r["id"])) for r in rows[:2]]
    plain = [a.text for a in fast.refine(reqs)]
    load_knobbed(lm, vllm_vectors, cache_size=0).apply({"one": 1.0})  # the dense merge θ + 1.0·AV_one
    for r, req in zip(rows[:2], reqs):
        got = by[(str(r["id"]), "in_context")]["answer"]
        assert got == fast.refine([req])[0].text, "vLLM adapter == fast engine on the dense merge"
    assert [by[(str(r["id"]), "in_context")]["answer"] for r in rows[:2]] != plain, "the knob changes the answers"
    assert s["n_prompts"] == 3 and (df.loc[df["method"] == "in_context", "refine_s"] > 0).all()
    ic = df[df["method"] == "in_context"]  # vLLM runs no Jacobi iteration: its generated tokens, no Jacobi statistics
    assert ic[["passes", "tokens_per_pass", "converged"]].isna().all().all() and (ic["generated_tokens"] > 0).all()
    assert set(s["methods"]["in_context"]["jacobi"].values()) == {None} and s["methods"]["in_context"]["mean_generated_tokens"] > 0
