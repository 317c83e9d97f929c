import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind Ray to 127.0.0.1 only
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.s3server import s3_server  # noqa: F401,E402  (the fixture, registered here once)

TEST_API_KEY_ENV, TEST_API_KEY = "DIFFPO_TEST_API_KEY", "test-key-123"  # set in every Ray worker of the session
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(rel: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"real data not available: {p} (tests that need ../shared/data skip on a fresh clone)")
    return p


def ray_metric(name: str, timeout_s: float = 30, **tags: str) -> float:
    """The sum of a Ray metric's samples whose labels include `tags`, from the session Ray's Prometheus endpoint;
    waits up to `timeout_s` for a positive value (Ray exports every few seconds). 0.0 if none appears."""
    import time

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.time() + timeout_s
    while True:
        text = httpx.get(os.environ["DIFFPO_TEST_RAY_METRICS_URL"], timeout=10).text
        total = sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                    if s.name == name and all(s.labels.get(k) == v for k, v in tags.items()))
        if total > 0 or time.time() > deadline:
            return total
        time.sleep(2)


@pytest.fixture
def cluster():
    """A local multi-node Ray cluster (`ray.cluster_utils.Cluster`), not joined by this process: a 1-CPU head node
    with the custom resource `head`; tests add worker nodes (and kill them)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False})
    yield c
    try:
        c.shutdown()
    finally:
        # Cluster writes its address to Ray's "current cluster" file and clears it only at the end of a
        # shutdown that went through; a stale file makes a later plain ray.init() try to join a dead cluster
        from ray._common.utils import reset_ray_address

        reset_ray_address()


def alive_actors(cluster, name_part: str) -> dict[str, str]:
    """Alive actors of a `ray.cluster_utils.Cluster` (read through its GCS, without joining it) whose class name
    holds `name_part`: actor id -> node id."""
    out = {}
    for aid, a in cluster.global_state.actor_table(None).items():
        if a.get("State") in ("ALIVE", 2) and name_part in str(a.get("ActorClassName") or a.get("Name") or ""):
            out[aid] = a["Address"]["NodeID"]
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_serve_app(app, name: str, port: int, timeout_s: float = 120) -> str:
    """Start Serve on 127.0.0.1:port, deploy `app` and wait until its /healthz answers; returns the base URL."""
    import time

    import httpx
    from ray import serve

    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    serve.run(app, name=name, route_prefix="/", blocking=False)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return url


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny random Llama / Qwen2 / GPT-2 folders, each with the byte-level tokenizer and a chat template."""
    from tests.tiny import ARCHS, save_tiny

    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def vllm_tiny(tmp_path_factory):
    """A tiny random Llama folder vLLM's CPU kernels accept (head size 64), with the byte-level chat tokenizer."""
    from tests.tiny import save_tiny

    return save_tiny("llama", tmp_path_factory.mktemp("vllm-tiny") / "llama", seed=7, hidden=128,
                     num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="session")
def vllm_vectors(vllm_tiny, tmp_path_factory):
    """Two alignment vectors of `vllm_tiny` that move only its linear layers (what a LoRA adapter expresses)."""
    from pipeline.vectors.extract import extract_vector

    root = tmp_path_factory.mktemp("vllm-vectors")
    out = {}
    for k, seed in (("one", 1), ("two", 2)):
        moved = moved_copy(vllm_tiny, root / f"a-{k}", seed, frozen=("embed", "norm", "lm_head"))
        out[k] = str(root / f"v-{k}")
        extract_vector(str(vllm_tiny), str(moved), out[k], k, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def default_lm():
    """The real embedded default model (SmolLM2-135M-Instruct, converted from GGUF once)."""
    from pipeline.models import load_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_model("default")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session (2 CPUs, loopback only). After the S3 server: its endpoint and
    credentials are in the environment that Ray's workers inherit (tests/s3server.py)."""
    import ray

    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    port = free_port()
    # a fresh Ray even where a cluster's address was left behind (RAY_ADDRESS, Ray's current-cluster file from a
    # Cluster or `ray start`), which ray.init() would try to join
    from ray._common.utils import reset_ray_address

    os.environ.pop("RAY_ADDRESS", None)
    reset_ray_address()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "HF_HUB_OFFLINE": "1",
                                        TEST_API_KEY_ENV: TEST_API_KEY}})
    # the session Ray's Prometheus endpoint (an env var: tests import this file as tests.conftest, a second copy)
    os.environ["DIFFPO_TEST_RAY_METRICS_URL"] = f"http://127.0.0.1:{port}/metrics"
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_rm(tmp_path_factory):
    """A tiny random LlamaForSequenceClassification (num_labels=1) with the byte-level chat tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tests.tiny import tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny_rm")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, num_labels=1,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    LlamaForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def moved_copy(base_dir, out_dir, seed: int, scale: float = 0.5, frozen=("embed", "wte", "wpe")):
    """The base's weights plus seeded noise on every tensor except `frozen` ones, saved as a checkpoint."""
    from transformers import AutoModelForCausalLM

    from tests.tiny import tiny_tokenizer

    m = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if not any(f in n for f in frozen):
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp(min=1e-3))
    m.save_pretrained(out_dir)
    tiny_tokenizer().save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def vector_ckpts(tmp_path_factory):
    """Tiny llama / gpt2 bases, two moved copies of each and the two vectors between them."""
    from pipeline.vectors.extract import extract_vector
    from tests.tiny import save_tiny

    root = tmp_path_factory.mktemp("vec")
    out = {}
    for arch in ("llama", "gpt2"):  # gpt2 ties its input and output embeddings
        base = save_tiny(arch, root / f"{arch}-base")
        out[arch] = {"base": base, "a1": moved_copy(base, root / f"{arch}-a1", 1),
                     "a2": moved_copy(base, root / f"{arch}-a2", 2)}
        out[arch]["v1"] = root / f"{arch}-v1"
        out[arch]["v2"] = root / f"{arch}-v2"
        extract_vector(str(base), str(out[arch]["a1"]), out[arch]["v1"], "one", log=lambda *_: None)
        extract_vector(str(base), str(out[arch]["a2"]), out[arch]["v2"], "two", log=lambda *_: None)
    return out
