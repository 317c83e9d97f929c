"""The Ray Data job end to end on a tiny model: formats, bad rows, exports, resume after a kill, config errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from jobs.common.config import REPO, ConfigError, load_config

TINY = ["base.sampling.max_new_tokens=12", "aligner.refine.max_new_tokens=16", "aligner.refine.block_size=8", "ray.progress_bars=false",
        "show_samples=1", "base.engine=hf", "aligner.engine=fast"]
# both stages on vLLM engines; a quarter CPU each, so that one engine per turn of a 2-turn row fits a 2-CPU Ray
VLLM = ["base.engine=vllm", "aligner.engine=vllm", "base.num_cpus=0.25", "aligner.num_cpus=0.25",
        "ray.progress_bars=false", "show_samples=0"]


def write_jsonl(path: Path, lines: list) -> Path:
    with open(path, "wb") as f:
        for x in lines:
            f.write(x if isinstance(x, bytes) else json.dumps(x).encode())
            f.write(b"\n")
    return path


def run_job(args):
    from jobs.align_dataset import main

    return main(args)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_job_handles_formats_bad_rows_and_exports(tmp_path, tiny_dirs, ray_local):
    m = tiny_dirs["llama"]
    lines = [
        {"id": 1, "prompt": "Say hi."},
        {"id": 2, "instruction": "List two colors.", "output": "Red and blue."},  # AlpacaEval style, has a draft
        {"id": 3, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
        {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it sadder."]},  # MT-bench
        {"id": 5, "prompt": ""},  # empty
        {"id": 6, "text": "no prompt field"},  # missing prompt
        b'{"id": 7, "prompt": "caf\xe9 latte"}',  # Latin-1 byte: not UTF-8
        b'{"id": 8, "prompt": ',  # broken JSON
        {"id": 9, "prompt": "x" * 5000},  # over the tiny model's 4096-token context window
        {"id": 10, "prompt": "Count to three.", "draft": "One, two, three."},
        {"id": 10, "prompt": "Count to four.", "draft": "One, two, three, four."},  # the id again
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    # drafts from a separate file, by id and by instruction text (joined in the workers)
    given = write_jsonl(tmp_path / "drafts.jsonl", [{"id": 1, "draft": "Hi there."},
                                                     {"instruction": "Why?", "output": "Because."}])
    out = tmp_path / "out"
    s = run_job([f"input.path={src}", f"output.path={out}", f"base.model={m}", f"aligner.model={m}",
                 f"input.drafts_path={given}", "output.fastchat_answers=true", "output.alpaca_eval_outputs=true", *TINY])
    ok = pd.read_parquet(out / "aligned.parquet")
    errors = [json.loads(x) for x in open(out / "errors.jsonl")]
    assert s["rows_in"] == len(lines) == len(ok) + len(errors), "rows in = rows out + error rows"
    assert set(ok["id"]) == {"1", "2", "3", "81", "10"} and (ok["id"] == "10").sum() == 2, "every row is processed"
    assert s["duplicate_ids"] == 1, "a repeated id is found (an aggregation over the output) and reported"
    reasons = {e["id"]: e["error"] for e in errors}
    assert "empty prompt" in reasons["5"]
    assert "no prompt field" in reasons["6"]
    assert "UTF-8" in reasons["in.jsonl:7"]
    assert "not valid JSON" in reasons["in.jsonl:8"]
    assert "context window" in reasons["9"] and reasons["9"].startswith("draft stage"), "caught before drafting"
    by_id = ok.set_index("id")
    assert by_id.loc["1", "draft"] == "Hi there." and by_id.loc["3", "draft"] == "Because.", "the drafts file's"
    assert by_id.loc["1", "draft_s"] == 0.0 and by_id.loc["81", "draft_s"] > 0, "drafted only where none was given"
    row2 = ok.set_index("id").loc["2"]
    assert row2["draft"] == "Red and blue." and row2["draft_s"] == 0.0, "given drafts are used, not regenerated"
    mt = ok.set_index("id").loc["81"]
    assert len(mt["draft_turns"]) == 2 and len(mt["aligned_turns"]) == 2
    assert (ok["passes"] > 0).all() and (ok["tokens_per_pass"] > 0.5).all()  # (the last pass confirms the fixed point)
    assert ok["converged"].notna().all() and ok["generated_tokens"].isna().all(), "a Jacobi engine: its statistics"
    assert s["mean_passes"] > 0 and s["tokens_per_pass"] > 0.5 and s["converged_fraction"] is not None
    assert "mean_generated_tokens" not in s and s["rows_by_mode"] == {"fast": len(ok)}
    fc = [json.loads(x) for x in open(out / "fastchat_answers.jsonl")]
    assert {r["question_id"] for r in fc} >= {1, 2} and all(r["choices"][0]["turns"] for r in fc)
    ae = json.loads((out / "alpaca_eval_outputs.json").read_text())
    assert {r["instruction"] for r in ae} >= {"Say hi.", "List two colors."}


@pytest.mark.integration
def test_config_errors_are_clear(tmp_path, ray_local):
    from jobs.align_dataset import AlignDatasetConfig
    from jobs.common.data import preflight

    with pytest.raises(ConfigError, match="nope: unknown key"):
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml", ["aligner.nope=1"])
    with pytest.raises(ConfigError, match="refine.block_size"):
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml", ["aligner.refine.block_size=abc"])
    with pytest.raises(ConfigError, match="aligner.block_size: this key was renamed; use aligner.refine.block_size"):
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml", ["aligner.block_size=8"])
    with pytest.raises(ConfigError) as e:
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml",
                    ["aligner.engine=magic", "base.batch_size=0", "output.format=csv"])
    msg = str(e.value)
    assert "aligner.engine" in msg and "base.batch_size" in msg and "output.format" in msg, "all problems at once"
    with pytest.raises(ConfigError) as e:
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml",
                    ["input.path=/does/not/exist.jsonl", "aligner.refine.window=0", "aligner.knobs.x=1"])
    msg = str(e.value)
    assert "input.path" in msg and "aligner.refine" in msg and "aligner.knobs.x" in msg, "cross-key checks at once"
    with pytest.raises(ConfigError, match="aligner.mode: this key was renamed; use aligner.engine"):
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml", ["aligner.mode=fast"])
    with pytest.raises(ConfigError, match="base.kind: this key was renamed; use base.engine"):
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml", ["base.kind=hf"])
    cfg = load_config(AlignDatasetConfig, "conf/align_dataset.yaml", ["aligner.num_cpus=1", "aligner.concurrency=2"])
    with pytest.raises(ConfigError, match="fractions"):
        preflight({"base": cfg.base, "aligner": cfg.aligner})


@pytest.mark.integration
def test_vllm_stages_that_the_cluster_cannot_hold_fail_fast_with_the_reason(ray_local):
    """vLLM placement groups are counted before anything starts: GPUs, CPUs (one engine pool per model) and
    accelerator types the cluster lacks are refused with the reason, never a silent wait."""
    from jobs.align_dataset import AlignDatasetConfig
    from jobs.common.data import preflight

    def cfg(*args):
        c = load_config(AlignDatasetConfig, "conf/align_dataset.yaml", list(args))
        return {"base": c.base, "aligner": c.aligner}

    preflight(cfg())  # the shipped default (a CPU bundle of 0.5 per engine) fits this 2-CPU Ray
    with pytest.raises(ConfigError, match=r"ask for 4 GPUs \(aligner engines 4\) but the cluster has 0"):
        preflight(cfg("aligner.num_gpus=1", "aligner.vllm.tensor_parallel_size=4"))
    preflight(cfg(), turns=2)  # a base and an aligner with the same engine settings share one engine pool
    with pytest.raises(ConfigError, match=r"ask for 1.85 CPUs \(base 0.2 \+ aligner 0.2 \+ base engines 0.6 \+ "
                                          r"aligner engines 0.85\)"):
        preflight(cfg("aligner.num_cpus=0.75"), turns=2)  # two pools, and a stage actor per turn
    with pytest.raises(ConfigError, match="accelerator type H100"):
        preflight(cfg("aligner.vllm.accelerator_type=H100"))
    with pytest.raises(ConfigError, match=r"ask for 3.2 CPUs"):
        preflight(cfg("base.engine=hf", "aligner.vllm.bundles=[{CPU: 1}, {CPU: 1}]", "aligner.concurrency=1",
                      "base.num_cpus=1"))


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_vllm_job_formats_bad_rows_exports_kill_and_resume(tmp_path, vllm_tiny, ray_local):
    """Both stages on vLLM engines (Ray Data LLM): every input row comes out once, as an aligned row or an error
    row with its reason, across a kill and a rerun; exports; and the aligned answers are
    the ones the fast Jacobi engine computes from the same drafts, token for token.

    The killed run uses the HF engines (a vLLM engine pool takes a minute or two to start on this machine; the
    parts and the resume are the same code for every engine), the rerun that finishes the job runs on vLLM."""
    from pipeline.decoding.refiner import Refiner, RefineRequest
    from pipeline.decoding.settings import RefineSettings
    from pipeline.models import load_model
    from pipeline.records import conversation

    lines = [
        {"id": 1, "prompt": "Say hi."},
        {"id": 2, "prompt": "List two colors.", "draft": "Red and blue."},
        {"id": 5, "prompt": ""},  # empty
        b'{"id": 7, "prompt": "caf\xe9 latte"}',  # Latin-1 byte: not UTF-8
        b'{"id": 8, "prompt": ',  # broken JSON
        {"id": 9, "prompt": "x" * 5000},  # over the model's 4096-token context window
    ] + [{"id": 100 + i, "prompt": f"Question number {i}?"} for i in range(24)] + [
        # more prompt tokens in flight than one engine step takes (2,048): with chunked prefill a split prompt's
        # seeded CPU generator would have to rewind, which it cannot ("CPU Generator does not use offset": the engine
        # died and the stage retried it forever); CPU engines prefill each prompt whole (`engine_setup`)
        {"id": 200 + i, "prompt": f"Question {i}: " + "tell me more " * 40} for i in range(24)]  # ~500 tokens each
    # (multi-turn rows: one engine pool per turn; their request building is tested in test_vllm_stages.py)
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    common = [f"input.path={src}", f"output.path={out}", f"base.model={vllm_tiny}", f"aligner.model={vllm_tiny}",
              "base.sampling.max_new_tokens=40", "aligner.refine.max_new_tokens=48", "output.rows_per_block=2",
              "output.fastchat_answers=true", "output.alpaca_eval_outputs=true", *VLLM]
    # first run: the first 20 rows on the HF engines, one row per call, killed half-way
    slow = ["input.limit=20", "base.batch_size=1", "aligner.batch_size=1", "base.engine=hf", "aligner.engine=fast"]
    addr = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, "-m", "jobs.align_dataset", f"ray.address={addr}", *common, *slow],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    written = out / "rows"
    deadline = time.time() + 400
    while time.time() < deadline and len(list(written.glob("*.parquet"))) < 1:
        assert proc.poll() is None, "the job ended before it could be killed; make it slower"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(written.glob("*.parquet")), "the job wrote no block before the kill"

    s = run_job(common)  # the rerun, at full speed
    ok = pd.read_parquet(out / "aligned.parquet")
    errors = [json.loads(x) for x in open(out / "errors.jsonl")]
    assert s["rows_in"] == len(lines) == len(ok) + len(errors), "rows in = rows out + error rows"
    assert sorted(list(ok["id"]) + [e["id"] for e in errors]) == sorted(
        ["1", "2", "5", "in.jsonl:4", "in.jsonl:5", "9"] + [str(100 + i) for i in range(24)]
        + [str(200 + i) for i in range(24)]), "each row once"
    assert 0 < s["rows_processed_this_run"] < len(lines), "the rerun skipped what the killed run had written"
    reasons = {e["id"]: e["error"] for e in errors}
    assert set(reasons) == {"5", "in.jsonl:4", "in.jsonl:5", "9"}
    assert "UTF-8" in reasons["in.jsonl:4"] and "not valid JSON" in reasons["in.jsonl:5"]
    assert "context window" in reasons["9"] and reasons["9"].startswith("draft stage"), "caught before the engine"
    rows = ok.set_index("id")
    assert rows.loc["2", "draft"] == "Red and blue." and rows.loc["2", "draft_s"] == 0.0, "given drafts are kept"
    assert set(ok["mode"]) <= {"fast", "vllm"} and (ok["mode"] == "vllm").sum() >= 10, "killed on HF, done on vLLM"
    assert (ok["new_tokens"] > 0).all() and (ok["refine_s"] > 0).all()
    assert s["mode"] == "vllm" and s["mean_generated_tokens"] > 0
    on_vllm = ok[ok["mode"] == "vllm"]  # vLLM runs no Jacobi iteration: its generated tokens, no Jacobi statistics
    assert on_vllm[["passes", "tokens_per_pass", "converged"]].isna().all().all()
    assert (on_vllm["generated_tokens"] > 0).all() and (on_vllm["generated_tokens"] >= on_vllm["new_tokens"]).all()
    on_fast = ok[ok["mode"] == "fast"]  # the killed run's rows keep the fast engine's Jacobi statistics
    assert (on_fast["passes"] > 0).all() and on_fast["generated_tokens"].isna().all()
    assert s["rows_by_mode"] == {m: int((ok["mode"] == m).sum()) for m in sorted(set(ok["mode"]))}
    fc = [json.loads(x) for x in open(out / "fastchat_answers.jsonl")]
    assert {r["question_id"] for r in fc} >= {1, 2}
    assert {r["instruction"] for r in json.loads((out / "alpaca_eval_outputs.json").read_text())} >= {"Say hi."}

    # the same drafts through the fast Jacobi engine: the same aligned answers, token for token
    lm = load_model(str(vllm_tiny), dtype="float32")
    fast = Refiner(lm, RefineSettings(max_new_tokens=48), mode="fast")
    picked = rows.loc[["1", "2", "100", "101", "122"]]
    for rid, r in picked.iterrows():
        row = {"turns": list(r["turns"]), "history": list(r["history"])}
        for k, aligned in enumerate(r["aligned_turns"]):
            req = RefineRequest(conversation(row, k, list(r["draft_turns"])), r["draft_turns"][k],
                                key=rid if k == 0 else f"{rid}#{k}")
            assert fast.refine([req])[0].text == aligned, f"row {rid} turn {k}: vLLM job == fast engine"


def _drafted(rid: str, turns=("Say hi.",), drafts=("Hello.",)) -> dict:
    return {"id": rid, "turns": list(turns), "history": [], "drafts": list(drafts), "meta": None, "references": [],
            "error": None, "draft_s": 0.5}


def test_output_rows_and_summary_hold_only_what_the_engine_computed(tmp_path):
    """vLLM (and ar) rows: null passes / tokens_per_pass / converged, their generated tokens instead; Jacobi rows the
    other way round; the summary's Jacobi statistics are null for a vLLM run, set for a fast one. No Ray, no model."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401

    from jobs.align_dataset import (DRAFTED_SCHEMA, OUTPUT_SCHEMA, AlignDatasetConfig, RefineStage, VllmOutputStage,
                                    engine_summary, row_stats)
    from jobs.common import vllm_stages
    from pipeline.decoding.jacobi import RefineResult

    cfg = load_config(AlignDatasetConfig, "conf/align_dataset.yaml", [f"output.path={tmp_path}", "aligner.engine=vllm"])

    # the vLLM stage's rows, as vllm_stages.refine hands them over (one RESULT per turn)
    result = lambda ids, gen: {"token_ids": ids, "text": "Hi.", "reserved": 1, "generated_tokens": gen,  # noqa: E731
                               "tokens_computed": 20 + gen, "stop": "eos", "wall_s": 0.2}
    rows = [dict(_drafted("1"), refined=[result([1, 2, 3], 3)]),
            dict(_drafted("2", ["a?", "b?"], ["A.", "B."]), refined=[result([1, 2], 2), result([1, 2, 3, 4], 4)]),
            dict(_drafted("3"), refined=None, error="draft stage: boom")]
    table = pa.Table.from_pylist(rows, schema=vllm_stages.refined_schema(DRAFTED_SCHEMA))
    out = VllmOutputStage(cfg.aligner)(table)
    assert out.schema == OUTPUT_SCHEMA
    by = {r["id"]: r for r in out.to_pylist()}
    for rid, gen, new in (("1", 3, 2), ("2", 6, 4)):
        r = by[rid]
        assert r["passes"] is None and r["tokens_per_pass"] is None and r["converged"] is None, "no Jacobi iteration"
        assert r["generated_tokens"] == gen and r["new_tokens"] == new and r["mode"] == "vllm"
        assert r["refine_s"] == pytest.approx(0.2 * len(r["aligned_turns"]))
    assert by["3"]["error"] == "draft stage: boom" and by["3"]["passes"] is None

    # a Jacobi engine's rows: passes, tokens per pass and convergence; no generated tokens
    fast = object.__new__(RefineStage)  # its output only: no model
    fast.mode, fast.jacobi = "fast", True
    jac = fast.output(_drafted("4"), [RefineResult([9, 8, 7, 6], passes=2, tokens_computed=30, converged=True,
                                                   reserved=1, text="x")], 0.3)
    assert jac["passes"] == 2 and jac["tokens_per_pass"] == 1.5 and jac["converged"] is True
    assert jac["generated_tokens"] is None
    ar = fast.output(_drafted("5"), [RefineResult([9, 8], passes=None, converged=None, reserved=0, text="y",
                                                  generated_tokens=3)], 0.3)
    assert ar["passes"] is None and ar["tokens_per_pass"] is None and ar["converged"] is None
    assert ar["generated_tokens"] == 3, "the results say which engine ran, whatever the stage was told"

    # the summary of a vLLM run: no Jacobi statistic, the generated tokens and engine seconds instead
    ok_rows = out.filter(pa.compute.is_null(out.column("error")))
    s = engine_summary({"rows_out": ok_rows.num_rows, **row_stats(ok_rows)})
    assert not {"mean_passes", "tokens_per_pass", "converged_fraction"} & set(s), "no Jacobi statistic on vLLM"
    assert s["mean_generated_tokens"] == 4.5 and s["mean_refine_s"] == pytest.approx(0.3)
    assert s["rows_by_mode"] == {"vllm": 2}
    # ... and of a fast run: the Jacobi statistics, no generated tokens
    fast_rows = pa.Table.from_pylist([jac, dict(jac, id="6", passes=4, new_tokens=5, converged=False)], schema=OUTPUT_SCHEMA)
    s = engine_summary({"rows_out": 2, **row_stats(fast_rows)})
    assert s["mean_passes"] == 3.0 and s["tokens_per_pass"] == round(8 / 6, 3) and s["converged_fraction"] == 0.5
    assert "mean_generated_tokens" not in s and s["rows_by_mode"] == {"fast": 2}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_no_aligner_writes_the_drafts_as_answers_with_error_rows_and_resume(tmp_path, ray_local):
    """aligner.engine=none: no model runs; the rows are parsed column-wise (whole blocks through Arrow's JSON
    reader) except a block with a bad record, which goes record by record; the answers are the drafts."""
    lines = [{"id": i, "prompt": f"Question {i}?", "draft": f"Answer {i}."} for i in range(9)]
    lines[4] = b'{"id": 4, "prompt": '  # broken JSON: its block is parsed record by record
    lines[6] = {"id": 6, "prompt": "Knobs?", "draft": "A.", "alignment": {"concise": 1.0}}  # no aligner applies them
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    args = [f"input.path={src}", f"output.path={out}", "aligner.engine=none", "output.rows_per_block=3",
            "ray.progress_bars=false", "show_samples=0"]
    s = run_job(args)
    ok = pd.read_parquet(out / "aligned.parquet")
    errors = [json.loads(x) for x in open(out / "errors.jsonl")]
    assert s["rows_in"] == 9 and s["rows_out"] == 7 == len(ok) and s["error_rows"] == 2 == len(errors)
    assert {e["id"] for e in errors} == {"in.jsonl:5", "6"}, "the broken line and the row that asks for knobs"
    assert (ok["aligned"] == ok["draft"]).all() and ok.set_index("id").loc["3", "aligned"] == "Answer 3."
    assert list(ok["id"]) == ["0", "1", "2", "3", "5", "7", "8"], "input order"
    assert (ok["mode"] == "none").all() and ok["generated_tokens"].isna().all() and ok["passes"].isna().all()
    assert s["rows_by_mode"] == {"none": 7} and "mean_generated_tokens" not in s and "mean_passes" not in s
    first = sorted(p.name for p in (out / "rows").glob("*.parquet"))
    (out / "rows" / first[1]).unlink()  # a block lost: the rerun redoes it alone
    s2 = run_job(args)
    assert s2["rows_processed_this_run"] == 3 and s2["rows_out"] == 7 and s2["error_rows"] == 2
    assert sorted(p.name for p in (out / "rows").glob("*.parquet")) == first
