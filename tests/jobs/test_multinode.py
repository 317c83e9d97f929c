"""align_dataset on a local multi-node Ray cluster (several raylets on this machine, `ray.cluster_utils.Cluster`):
the stages' actors spread over the nodes, a worker node is killed mid-job and a fresh one added as an autoscaler
would, and the job finishes by itself with every row once (rows in = rows out + error rows, nothing twice); the
same with the aligner's vLLM engine on the node that dies (Serve replaces the replica, the batches it held are sent
again). The job runs as its own driver process (`ray.address=<cluster>`); this test process watches the cluster
through the GCS (`Cluster.global_state`), without joining it (the session's own Ray may already be up here)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.common.config import REPO
from tests.conftest import alive_actors

pytestmark = pytest.mark.integration


def _rows(path: Path, n: int) -> Path:
    """n rows that carry their drafts (so only the aligner runs), and two bad lines."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "prompt": f"Question {i}?", "draft": f"Answer {i}."}) + "\n")
            if i in (7, n // 2):
                f.write('{"id": "broken", "prompt": \n')
    return path


def _start_job(cluster, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL="5")
    return subprocess.Popen([sys.executable, "-m", "jobs.align_dataset", f"ray.address={cluster.address}", *args],
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait(cond, proc, log: Path, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the job ended (exit {proc.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}:\n{_tail(log)}")


def _tail(log: Path, chars: int = 4000) -> str:
    """The job log's end without Ray's raylet state dumps (which a killed node floods it with)."""
    lines = [ln for ln in log.read_text().splitlines() if "[state-dump]" not in ln]
    return "\n".join(lines)[-chars:]


def _check_output(out: Path, n_in: int) -> dict:
    s = json.loads((out / "summary.json").read_text())
    ok = [r for f in sorted((out / "rows").glob("*.parquet")) for r in pq.read_table(f, columns=["id"]).to_pylist()]
    bad = [r for f in sorted((out / "errors").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    ids = [r["id"] for r in ok] + [r["id"] for r in bad]
    assert len(ids) == len(set(ids)), "no row written twice"
    assert s["rows_in"] == n_in == len(ok) + len(bad) == s["rows_out"] + s["error_rows"], "rows in = out + errors"
    assert {str(i) for i in range(n_in - 2)} <= {r["id"] for r in ok}, "every good row aligned"
    assert len(bad) == 2 and all("not valid JSON" in r["error"] for r in bad)
    assert not [p for p in (out / "rows").iterdir() if p.name.startswith(".tmp-")], "no half-written file left"
    return s


@pytest.mark.timeout(600)
def test_a_worker_node_lost_mid_job_on_the_hf_engine(tmp_path, tiny_dirs, cluster):
    """One aligner actor per node (0.75 CPU on 1-CPU nodes); the worker node dies while blocks are in flight; a new
    node joins 5 s later; the job completes without a rerun."""
    worker = cluster.add_node(num_cpus=1, resources={"worker": 1})
    n = 1000
    src, out, log = _rows(tmp_path / "in.jsonl", n), tmp_path / "out", tmp_path / "job.log"
    proc = _start_job(cluster, [f"input.path={src}", f"output.path={out}", f"aligner.model={tiny_dirs['llama']}",
                                "aligner.engine=ar", "aligner.refine.max_new_tokens=2", "aligner.refine.reserve_tokens=1",
                                "aligner.concurrency=2", "aligner.num_cpus=0.75", "aligner.batch_size=1",
                                "output.rows_per_block=50", "ray.progress_bars=false", "show_samples=0"], log)
    seen: set = set()

    def two_nodes():
        seen.update(alive_actors(cluster, "MapWorker").values())  # Ray Data's actor pool workers
        return len(seen) >= 2

    _wait(two_nodes, proc, log, 240, f"the stage's actors on two nodes (seen on {len(seen)})")
    assert worker.node_id in seen, "the stage's actors run on more than one node"
    _wait(lambda: len(list((out / "rows").glob("*.parquet"))) >= 2, proc, log, 240, "the first blocks")
    cluster.remove_node(worker, allow_graceful=False)
    killed = time.time()
    time.sleep(5)
    cluster.add_node(num_cpus=1, resources={"worker": 1})
    assert proc.wait(timeout=400) == 0, _tail(log)
    s = _check_output(out, n + 2)
    assert s["rows_processed_this_run"] == n + 2, "one run did it all: nothing left for a rerun"
    print(f"job finished {time.time() - killed:.0f} s after the node was killed")


@pytest.mark.timeout(900)
def test_the_node_of_the_vllm_engine_lost_mid_job(tmp_path, vllm_tiny, cluster):
    """The aligner's engine (a Serve LLM replica, placed by a custom resource on a worker node) dies with its node
    mid-job; a fresh node joins; Serve starts a new replica there and the job finishes by itself, every row once,
    the answers those of an undisturbed engine (greedy)."""
    worker = cluster.add_node(num_cpus=1, resources={"engine_node": 1})
    n = 160
    src, out, log = _rows(tmp_path / "in.jsonl", n), tmp_path / "out", tmp_path / "job.log"
    proc = _start_job(cluster, [f"input.path={src}", f"output.path={out}", f"aligner.model={vllm_tiny}",
                                # 0.9 + the replica actor's 0.1 fill the worker node: only the engine is on it (the
                                # stage actors stay on the head; the HF test above loses stage actors with a node)
                                "aligner.engine=vllm", "aligner.num_cpus=0.9", "aligner.vllm.bundles=[{CPU: 0.9, engine_node: 0.5}]",
                                "aligner.refine.max_new_tokens=24", "aligner.batch_size=4",
                                "aligner.vllm.max_concurrent_batches=2", "output.rows_per_block=8",
                                "ray.progress_bars=false", "show_samples=0"], log)
    _wait(lambda: len(list((out / "rows").glob("*.parquet"))) >= 2, proc, log, 600, "the first blocks")
    replicas = alive_actors(cluster, "ServeReplica:diffpo-align")  # the LLM server's replica
    assert set(replicas.values()) == {worker.node_id}, "the engine runs on the worker node"
    assert worker.node_id not in alive_actors(cluster, "MapWorker").values(), "only the engine runs there"
    cluster.remove_node(worker, allow_graceful=False)
    time.sleep(3)
    cluster.add_node(num_cpus=1, resources={"engine_node": 1})
    assert proc.wait(timeout=700) == 0, _tail(log)
    _check_output(out, n + 2)
    assert not list((out / "errors").glob("*")) or all(
        "not valid JSON" in r["error"] for f in (out / "errors").glob("*.parquet") for r in pq.read_table(f).to_pylist()
    ), "no row lost to the dead engine"
