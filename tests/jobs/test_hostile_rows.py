"""Hostile rows through the batch jobs (tiny HF models, whose context window is 4096 tokens): prompts past the
window (alone or inside a multi-turn history), a draft that pushes the aligner past it, malformed lines, files
that start with a UTF-8 byte-order mark. Each job finishes; every row comes out, or as an error row that names
its stage and the reason. (The evaluation job's hostile rows run in tests/jobs/test_evaluate.py's end-to-end test.)"""
import json
from pathlib import Path

import pandas as pd
import pytest

BOM = b"\xef\xbb\xbf"
HUGE = "word " * 5000  # ~5000 tokens with the byte-level tokenizer: past the 4096-token window


def write_lines(path: Path, lines: list, prefix: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(prefix)
        for x in lines:
            f.write((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n")
    return path


HOSTILE = [
    {"id": 1, "prompt": "Say hi."},
    {"id": 2, "prompt": HUGE},  # over the base model's window, no draft: refused before generate
    {"id": 3, "messages": [{"role": "user", "content": HUGE}, {"role": "assistant", "content": "Sure."},
                           {"role": "user", "content": "And then?"}]},  # over the window inside the history
    {"id": 4, "prompt": "Summarize this.", "draft": HUGE},  # the draft pushes the in-context aligner past it
    {"id": 5, "prompt": ""},  # empty
    {"id": 6, "text": "no prompt field"},  # missing prompt
    b'{"id": 7, "prompt": "caf\xe9 latte"}',  # Latin-1 byte: not UTF-8
    b'{"id": 8, "prompt": ',  # broken JSON
    {"id": 9, "prompt": "Count to three.", "draft": "One, two, three."},
]


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_align_dataset_turns_hostile_rows_into_error_rows(tmp_path, tiny_dirs, ray_local):
    from jobs.align_dataset import main

    m = tiny_dirs["llama"]
    src = tmp_path / "in"
    src.mkdir()
    write_lines(src / "hostile.jsonl", HOSTILE, prefix=BOM)
    (src / "bom.json").write_bytes(BOM + json.dumps([{"id": "b1", "instruction": "Name a color.",
                                                      "output": "Blue."}]).encode())
    out = tmp_path / "out"
    s = main([f"input.path={src}", f"output.path={out}", f"base.model={m}", f"aligner.model={m}",
              "aligner.in_context=true", "base.sampling.max_new_tokens=12", "aligner.refine.max_new_tokens=16",
              "aligner.refine.block_size=8", "base.batch_size=4", "aligner.batch_size=4", "ray.progress_bars=false",
              "base.engine=hf", "aligner.engine=fast"])
    ok = pd.read_parquet(out / "aligned.parquet")
    errors = {e["id"]: e["error"] for e in map(json.loads, open(out / "errors.jsonl"))}
    assert s["rows_in"] == len(HOSTILE) + 1 == len(ok) + len(errors), "rows in = rows out + error rows"
    assert set(ok["id"]) == {"1", "9", "b1"}, "the BOM files parse; good rows go on"
    for i in ("2", "3"):
        assert errors[i].startswith("draft stage: ValueError: prompt of ") and \
            "exceeds the base model's context window of 4096 tokens" in errors[i]
    assert errors["4"].startswith("refine stage: prompt of ") and \
        "exceeds the aligner's context window of 4096 tokens" in errors["4"]
    assert "empty prompt" in errors["5"] and "no prompt field" in errors["6"]
    assert "UTF-8" in errors["hostile.jsonl:7"] and "hostile.jsonl:8" in errors


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_align_dataset_cuts_rows_off_at_the_time_budget(tmp_path, tiny_dirs, ray_local):
    from jobs.align_dataset import main

    m = tiny_dirs["llama"]
    src = write_lines(tmp_path / "in.jsonl", [{"id": 1, "prompt": "Say hi."},
                                              {"id": 2, "prompt": "Count to three.", "draft": "One, two."}])
    out = tmp_path / "out"
    s = main([f"input.path={src}", f"output.path={out}", f"base.model={m}", f"aligner.model={m}",
              "base.row_timeout_s=1e-9", "aligner.row_timeout_s=1e-9", "base.sampling.max_new_tokens=40",
              "aligner.refine.max_new_tokens=40", "aligner.refine.reserve_tokens=0", "ray.progress_bars=false",
              "base.engine=hf", "aligner.engine=fast"])
    errors = {e["id"]: e["error"] for e in map(json.loads, open(out / "errors.jsonl"))}
    assert s["rows_in"] == 2 == len(errors)
    assert errors["1"].startswith("draft stage: TimeoutError: generation cut off by the time budget of ")
    assert errors["2"].startswith("refine stage: cut off by the time budget of ") and "row_timeout_s 1e-09" in errors["2"]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_build_states_turns_hostile_rows_into_error_rows(tmp_path, tiny_dirs, tiny_rm, ray_local):
    from jobs.build_states import main

    m = str(tiny_dirs["llama"])
    rows = [
        {"id": 1, "instruction": "Q1", "reference_output": "R1"},
        {"id": 2, "instruction": HUGE, "reference_output": "R2"},  # over the base model's window
        {"id": 3, "instruction": "word " * 20, "reference_output": "R3"},  # past the reward model's 64 tokens
        {"id": 4, "instruction": "", "reference_output": "R4"},  # empty
        b'{"id": 5, "instruction": ',  # broken JSON
    ]
    src = write_lines(tmp_path / "in.jsonl", rows, prefix=BOM)
    out = tmp_path / "o"
    s = main([f"input.path={src}", f"output.path={out}", "input.answers_field=null", "score.kind=reward_model",
              f"score.reward_model.model={tiny_rm}", "score.reward_model.max_length=64", "rank.target=reference",
              "filters.max_tokens=null", "split.heldout_mod=null", "split.dev_fraction=0",
              f"bases=[{{model: {m}, num_answers: 2, sampling: {{max_new_tokens: 8}}, num_cpus: 0.25}}]",
              "score.reward_model.num_cpus=0.25", "trajectory.enabled=true", f"trajectory.model={m}",
              "trajectory.refine.max_new_tokens=8", "trajectory.num_cpus=0.25", "ray.progress_bars=false",
              "show_samples=0"])
    assert s["rows_in"] == len(rows) == s["rows_out"] + s["error_rows"]
    errors = {e["id"]: e for e in map(json.loads, open(out / "errors.jsonl"))}
    assert set(errors) == {"2", "3", "4", "in.jsonl:5"} and all(e["error"] for e in errors.values())
    assert s["answers_dropped"]["draft_error"] == 2 and "2 draft_error" in errors["2"]["error"], \
        "the base refuses the over-long prompt: its answers are dropped with the reason"
    assert s["answers_dropped"]["score_error"] == 2 and "2 score_error" in errors["3"]["error"], \
        "the reward model refuses what it would truncate (its length and limit: tests/pipeline/scoring)"
    assert "empty" in errors["4"]["error"]
    assert s["rows_out"] == 1 and s["trajectories"]["errors"] == 0
