"""On vLLM the base drafts only what the aligned answer depends on, and the answers are those of full drafts.

Real prompts (held-out AlpacaEval instructions, from ../shared/data), both stages on vLLM engines; each case runs
the job twice, with `base.drafts=full` (today's path) and the default `as_needed`, and compares them row by row.
"""
import json
from pathlib import Path

import pandas as pd
import pytest

from jobs.common.config import REPO

EVAL_SET = REPO.parent / "shared" / "data" / "alpaca_eval" / "eval_set.jsonl"
VLLM = ["base.engine=vllm", "aligner.engine=vllm", "base.num_cpus=0.25", "aligner.num_cpus=0.25",
        "ray.progress_bars=false", "show_samples=0", "base.sampling.max_new_tokens=64",
        "aligner.refine.max_new_tokens=48", "output.rows_per_block=4"]


def heldout_prompts(path: Path, n: int) -> Path:
    if not EVAL_SET.exists():
        pytest.skip(f"needs the AlpacaEval data at {EVAL_SET} (../shared/data, see its README)")
    rows = [json.loads(x) for x in open(EVAL_SET)]
    keep = [{"id": r["id"], "prompt": r["instruction"]} for r in rows if int(r["id"]) % 4 == 0][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return path


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_prefix_drafts_give_the_answers_of_full_drafts(tmp_path, ray_local):
    """SmolLM2 drafts and aligns. (A base whose tokens are not the aligner's, a tiny byte-level model drafting for
    SmolLM2, runs the same prefix code: it is tested over HTTP in tests/serve_app/test_serve_vllm.py and measured in
    benchmarks/bench_draft_prefix.py; here its two job runs would start four engines, CI's time.)"""
    from jobs.align_dataset import main

    src = heldout_prompts(tmp_path / "heldout.jsonl", 8)
    common = [f"input.path={src}", "base.model=default", "aligner.model=default", *VLLM]
    full = main([*common, f"output.path={tmp_path / 'full'}", "base.drafts=full"])
    prefix = main([*common, f"output.path={tmp_path / 'prefix'}"])
    assert full["rows_out"] == prefix["rows_out"] == 8
    a = pd.read_parquet(tmp_path / "full" / "aligned.parquet").set_index("id")
    b = pd.read_parquet(tmp_path / "prefix" / "aligned.parquet").set_index("id").loc[a.index]
    assert list(b["aligned"]) == list(a["aligned"]), "the same answers, token for token"
    assert not a["draft_prefix"].any() and b["draft_prefix"].any(), "full drafts, then prefixes"
    shorter = [len(p) < len(f) for p, f in zip(b["draft"], a["draft"])]
    assert sum(shorter) >= 5, "most drafts are only what their answer depends on"
