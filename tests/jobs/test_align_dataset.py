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
        "show_samples=1"]


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
    ]
    src = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    s = run_job([f"input.path={src}", f"output.path={out}", f"base.model={m}", f"aligner.model={m}",
                 "output.fastchat_answers=true", "output.alpaca_eval_outputs=true", *TINY])
    ok = pd.read_parquet(out / "aligned.parquet")
    errors = [json.loads(x) for x in open(out / "errors.jsonl")]
    assert s["rows_in"] == len(lines) == len(ok) + len(errors), "rows in = rows out + error rows"
    assert set(ok["id"]) == {"1", "2", "3", "81", "10"}
    reasons = {e["id"]: e["error"] for e in errors}
    assert "empty prompt" in reasons["5"]
    assert "no prompt field" in reasons["6"]
    assert "UTF-8" in reasons["in.jsonl:7"]
    assert "not valid JSON" in reasons["in.jsonl:8"]
    assert "context window" in reasons["9"] and reasons["9"].startswith("draft stage"), "caught before drafting"
    row2 = ok.set_index("id").loc["2"]
    assert row2["draft"] == "Red and blue." and row2["draft_s"] == 0.0, "given drafts are used, not regenerated"
    mt = ok.set_index("id").loc["81"]
    assert len(mt["draft_turns"]) == 2 and len(mt["aligned_turns"]) == 2
    assert (ok["passes"] > 0).all() and (ok["tokens_per_pass"] >= 1.0).all()
    fc = [json.loads(x) for x in open(out / "fastchat_answers.jsonl")]
    assert {r["question_id"] for r in fc} >= {81, 1} and all(r["choices"][0]["turns"] for r in fc)
    ae = json.loads((out / "alpaca_eval_outputs.json").read_text())
    assert {r["instruction"] for r in ae} >= {"Say hi.", "List two colors."}


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_killed_job_resumes_without_losing_or_duplicating_rows(tmp_path, tiny_dirs, ray_local):
    m = tiny_dirs["qwen2"]
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Question number {i}?"} for i in range(40)])
    out = tmp_path / "out"
    args = [f"input.path={src}", f"output.path={out}", f"base.model={m}", f"aligner.model={m}",
            "output.rows_per_file=2", "base.batch_size=2", "aligner.batch_size=2", "base.sampling.max_new_tokens=150",
            "aligner.refine.max_new_tokens=150", "ray.progress_bars=false"]
    addr = ray_local.get_runtime_context().gcs_address
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "jobs.align_dataset", f"ray.address={addr}", *args], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    parts = out / "_parts"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(parts.glob("*.parquet"))) < 2:
        assert proc.poll() is None, "the job ended before it could be killed; make it slower"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = len(list(parts.glob("*.parquet")))
    assert first >= 2, "the job wrote no part before the kill"
    s = run_job(args)
    ok = pd.read_parquet(out / "aligned.parquet")
    assert s["rows_in"] == 40 and s["error_rows"] == 0
    assert sorted(ok["id"], key=int) == [str(i) for i in range(40)], "every row exactly once"
    assert s["rows_processed_this_run"] < 40, "the rerun skipped what the killed run had written"


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
                    ["aligner.mode=magic", "base.batch_size=0", "output.format=csv"])
    msg = str(e.value)
    assert "aligner.mode" in msg and "base.batch_size" in msg and "output.format" in msg, "all problems at once"
    with pytest.raises(ConfigError) as e:
        load_config(AlignDatasetConfig, "conf/align_dataset.yaml",
                    ["input.path=/does/not/exist.jsonl", "aligner.refine.window=0", "aligner.knobs.x=1"])
    msg = str(e.value)
    assert "input.path" in msg and "aligner.refine" in msg and "aligner.knobs.x" in msg, "cross-key checks at once"
    cfg = load_config(AlignDatasetConfig, "conf/align_dataset.yaml", ["aligner.num_cpus=1", "aligner.concurrency=2"])
    with pytest.raises(ConfigError, match="fractions"):
        preflight({"base": cfg.base, "aligner": cfg.aligner})
