"""Serve's autoscaler on the DiffPO graph, shown (not only configured): load on a route with a queue-time budget
makes the aligner deployment grow from 1 to 2 replicas, the ingress's admission gate grows with it (its
`diffpo_replicas` gauge), answers stay those of the in-process aligner while it happens, and the replica is removed
after the load ends. Short upscale / downscale delays; tiny models on the session's local Ray."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import TEST_API_KEY, free_port, ray_metric, run_serve_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]
MAX_NEW = 32
APP = "diffpo-scaling"


def _running(deployment: str) -> int:
    from ray import serve

    d = serve.status().applications[APP].deployments[deployment]
    return int(d.replica_states.get("RUNNING", 0))


def test_the_aligner_scales_up_under_load_and_back_down_after(ray_local, tiny_dirs):
    from ray import serve

    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.decoding.refiner import Refiner, RefineRequest
    from pipeline.models import load_model
    from serve_app.app import build_graph
    from serve_app.config import AppArgs
    from serve_app.protocol import conversation_key

    tiny, port = str(tiny_dirs["llama"]), free_port()
    args = AppArgs(**{
        "bases": {"tiny": {"engine": "hf", "model": tiny, "max_batch_size": 4, "batch_wait_timeout_s": 0.02}},
        "aligners": {"jacobi": {"model": tiny, "engine": "fast", "refine": {"max_new_tokens": MAX_NEW, "window": 8},
                                "max_batch_size": 1}},
        "models": {"diffpo-tiny": {"base": "tiny", "aligner": "jacobi"}},
        "max_tokens_cap": MAX_NEW, "default_max_tokens": MAX_NEW, "request_timeout_s": 60,
        "admission": {"max_queue_wait_s": 20, "max_concurrent": 2, "replicas_refresh_s": 0.5},
    })
    # a low target: the tiny aligner answers fast, so with a target of 1 its ongoing requests, averaged, stayed under
    # it whenever the machine had cores to spare (no second replica in 120 s); any steady load now asks for two
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 0.25, "upscale_delay_s": 1,
               "downscale_delay_s": 5, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    options = {"base-tiny": {"ray_actor_options": {"num_cpus": 0.1}},
               "aligner-jacobi": {"ray_actor_options": {"num_cpus": 0.2}, "autoscaling_config": scaling},
               "Ingress": {"ray_actor_options": {"num_cpus": 0.05}}}
    url = run_serve_app(build_graph(args, options), APP, port)
    refiner = Refiner(load_model(tiny), RefineSettings(max_new_tokens=MAX_NEW, window=8), mode="fast")
    try:
        assert _running("aligner-jacobi") == 1
        stop, answers, failures = threading.Event(), [], []

        def client(c: int):
            i = 0
            with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {TEST_API_KEY}"}) as h:
                while not stop.is_set():
                    msgs = [{"role": "user", "content": f"Client {c} asks question {i}."}]
                    r = h.post(url + "/v1/chat/completions", json={"model": "diffpo-tiny", "messages": msgs,
                                                                    "temperature": 0})
                    (answers if r.status_code == 200 else failures).append((msgs, r))
                    i += 1

        t0 = time.time()
        with ThreadPoolExecutor(6) as pool:
            for c in range(6):
                pool.submit(client, c)
            while _running("aligner-jacobi") < 2 and time.time() - t0 < 120:
                time.sleep(0.5)
            scaled_up = time.time() - t0
            grown = _running("aligner-jacobi")
            time.sleep(2)  # keep the load on the two replicas a little
            stop.set()
        assert grown == 2, f"no second aligner replica after {scaled_up:.0f} s of load"
        assert not failures, [(r.status_code, r.text[:200]) for _, r in failures[:3]]
        assert len(answers) > 10
        for msgs, r in answers[:: max(1, len(answers) // 12)]:  # a sample, spread over the run
            body = r.json()
            want = refiner.refine([RefineRequest(msgs, body["diffpo"]["draft"], conversation_key(msgs), MAX_NEW)])
            assert body["choices"][0]["message"]["content"] == want[0].text
        assert ray_metric("ray_diffpo_replicas", deployment="aligner-jacobi") >= 1
        t1 = time.time()
        while _running("aligner-jacobi") > 1 and time.time() - t1 < 90:
            time.sleep(1)
        assert _running("aligner-jacobi") == 1, "the extra replica was not removed after the load ended"
        print(f"scaled up after {scaled_up:.1f} s of load, down {time.time() - t1:.1f} s after it ended; "
              f"{len(answers)} answers")
    finally:
        serve.delete(APP)
        serve.shutdown()
