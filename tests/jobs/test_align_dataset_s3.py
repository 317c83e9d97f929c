"""align_dataset from a bucket to a bucket (the moto S3 server of tests/s3server.py): the rows stream from s3:// to
s3://, a job killed part-way is resumed by a rerun, and the outputs, the summary and the single-file exports land in
the bucket, every input row exactly once and no temporary object left behind. HF engines on the tiny model only."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from jobs.common.config import REPO

BUCKET = "align-dataset-s3"
TINY = ["base.engine=hf", "aligner.engine=fast", "base.sampling.max_new_tokens=12", "aligner.refine.max_new_tokens=16",
        "aligner.refine.block_size=8", "base.num_cpus=0.5", "aligner.num_cpus=0.5", "base.concurrency=1",
        "aligner.concurrency=1", "ray.progress_bars=false", "show_samples=0"]
PIECE = re.compile(r"^(?P<block>.+)\.p(?P<first>\d+)\.n(?P<n>\d+)\.t(?P<total>\d+)\.parquet$")


def _names(fs, path: str, recursive: bool = False) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


def _complete_blocks(names: list[str]) -> dict[str, int]:
    """block -> rows, of the blocks whose piece files' rows add up to the block's (as a rerun decides)."""
    have: dict[str, list[tuple[int, int]]] = {}
    for n in names:
        if m := PIECE.match(n):
            have.setdefault(m["block"], []).append((int(m["n"]), int(m["total"])))
    return {b: p[0][1] for b, p in have.items() if len({t for _, t in p}) == 1 and sum(n for n, _ in p) == p[0][1]}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_s3_to_s3_kill_resume_and_exports(tmp_path, s3_server, tiny_dirs, ray_local):
    m = tiny_dirs["llama"]
    fs = s3_server.filesystem()
    s3_server.create_bucket(BUCKET)
    lines = [
        {"id": 1, "prompt": "Say hi."},
        {"id": 2, "prompt": "List two colors.", "draft": "Red and blue."},
        {"id": 3, "prompt": ""},  # empty prompt (line 3)
    ] + [{"id": 100 + i, "prompt": f"Question number {i}?", **({"draft": f"Answer {i}."} if i % 3 == 0 else {})}
         for i in range(18)] + [
        b'{"id": 7, "prompt": "caf\xe9 latte"}',  # line 22: a Latin-1 byte, not UTF-8
    ] + [{"id": 200 + i, "prompt": f"Tell me fact {i}.", **({"draft": f"Fact {i}."} if i % 2 else {})}
         for i in range(14)] + [
        b'{"id": 8, "prompt": ',  # line 37: broken JSON
        {"id": 300, "prompt": "The last one?"},
    ]
    with fs.open_output_stream(f"{BUCKET}/in/in.jsonl") as f:
        for x in lines:
            f.write((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n")
    want_errors = {"3": "empty prompt", "in.jsonl:22": "not valid UTF-8", "in.jsonl:37": "not valid JSON"}
    want_ok = {"1", "2", "300"} | {str(100 + i) for i in range(18)} | {str(200 + i) for i in range(14)}
    assert len(want_ok) + len(want_errors) == len(lines)

    out_uri, out = f"s3://{BUCKET}/out/", f"{BUCKET}/out"
    common = [f"input.path=s3://{BUCKET}/in/", f"output.path={out_uri}", f"base.model={m}", f"aligner.model={m}",
              "output.rows_per_block=3", "output.fastchat_answers=true", *TINY]

    # the first run: one row per model call, killed (SIGKILL, its whole process group) once a block is in the bucket
    addr = ray_local.get_runtime_context().gcs_address
    log = tmp_path / "killed_run.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.align_dataset", f"ray.address={addr}", *common,
                                 "base.batch_size=1", "aligner.batch_size=1"],
                                cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    try:
        while not any(PIECE.match(n) for n in _names(fs, f"{out}/rows")):
            if proc.poll() is not None:
                pytest.fail(f"the job ended (exit {proc.returncode}) before it could be killed; make it slower "
                            f"(more rows). Its log:\n{log.read_text()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"no block in {out}/rows after 180 s. The job's log:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert fs.get_file_info(f"{out}/summary.json").type == pafs.FileType.NotFound, "killed before it finished"
    kept = _complete_blocks(_names(fs, f"{out}/rows"))
    assert kept, "the killed run wrote no whole block"
    # (its Ray workers may still write a block or two after the kill: the rerun's own listing decides)
    assert sum(kept.values()) < len(lines), (
        f"the killed run had written every block ({len(kept)}) when the first one appeared: the rows are not "
        "streamed to storage block by block (all written at the end), so a kill cannot land mid-run")

    # the rerun, in-process and at full speed, finishes the job
    from jobs.align_dataset import main

    t0 = time.time()
    try:
        s = main(common)
    except Exception as e:  # the root cause last, where a CI excerpt shows it (Ray's chain puts it in the middle)
        pytest.fail(f"the rerun failed: {type(e).__name__}: {str(e)[-4000:]}\nThe killed run's log:\n"
                    f"{log.read_text()[-2000:]}")
    rerun_s = time.time() - t0

    rows = pq.read_table(f"{out}/rows", filesystem=fs)  # the Parquet folder (names starting with "." skipped)
    errors = pq.read_table(f"{out}/errors", filesystem=fs)
    ok_ids, err_ids = rows.column("id").to_pylist(), errors.column("id").to_pylist()
    assert s["rows_in"] == len(lines) == len(ok_ids) + len(err_ids), "rows in = rows out + error rows"
    assert s["rows_out"] == len(ok_ids) and s["error_rows"] == len(err_ids)
    assert sorted(ok_ids + err_ids) == sorted(want_ok | set(want_errors)), "every id exactly once"
    assert set(ok_ids) == want_ok
    reasons = dict(zip(err_ids, errors.column("error").to_pylist()))
    assert set(reasons) == set(want_errors)
    for rid, why in want_errors.items():
        assert why in reasons[rid], f"row {rid}: {reasons[rid]!r}"
    assert s["blocks"] == -(-len(lines) // 3)

    # it resumed: the whole blocks of the killed run were kept, not redone
    assert 0 < s["rows_processed_this_run"] <= len(lines) - sum(kept.values()) < len(lines), "the rerun resumed"
    names_after = _names(fs, f"{out}/rows")
    assert all(any(n.startswith(b + ".") for n in names_after) for b in kept), "kept blocks are still there"
    by_id = {r["id"]: r for r in rows.to_pylist()}
    assert by_id["2"]["draft"] == "Red and blue." and by_id["2"]["draft_s"] == 0.0, "given drafts are used"
    assert by_id["100"]["draft"] == "Answer 0." and by_id["101"]["draft_s"] > 0.0, "rows without one are drafted"
    assert all(r["mode"] == "fast" and r["passes"] > 0 and r["aligned_turns"] for r in by_id.values())

    # summary.json in the bucket is what main returned
    with fs.open_input_stream(f"{out}/summary.json") as f:
        assert json.loads(f.read()) == s
    assert s["output_file"] == f"s3://{BUCKET}/out/aligned.parquet" and s["rows"] == f"s3://{BUCKET}/out/rows"

    # the single-file exports agree with the folders
    aligned = pq.read_table(f"{out}/aligned.parquet", filesystem=fs)
    assert aligned.sort_by("id").to_pylist() == rows.sort_by("id").to_pylist()
    with fs.open_input_stream(f"{out}/errors.jsonl") as f:
        exported = [json.loads(x) for x in f.read().decode().splitlines()]
    assert sorted(exported, key=lambda r: r["id"]) == sorted(errors.to_pylist(), key=lambda r: r["id"])
    with fs.open_input_stream(f"{out}/fastchat_answers.jsonl") as f:
        fc = [json.loads(x) for x in f.read().decode().splitlines()]
    assert {r["question_id"]: r["choices"][0]["turns"] for r in fc} == {
        int(k): r["aligned_turns"] for k, r in by_id.items()}

    # nothing left under a temporary name, anywhere in the output
    left = [n for n in _names(fs, out, recursive=True) if n.rsplit("/", 1)[-1].startswith(".tmp-")]
    assert not left, f"temporary objects left: {left}"
    print(f"rerun: {s['rows_processed_this_run']} of {len(lines)} rows in {rerun_s:.1f} s")
