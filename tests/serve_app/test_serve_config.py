"""The shipped Serve configs: they validate and build into the graph they describe (no engine starts)."""
from pathlib import Path

import pytest
import yaml

from serve_app.app import build_app
from serve_app.config import AppArgs

CONF = Path(__file__).resolve().parents[2] / "conf"


def _args(name: str) -> dict:
    return yaml.safe_load((CONF / name).read_text())["applications"][0]["args"]


def test_gpu_example_builds_a_tensor_parallel_base_and_a_vllm_aligner():
    pytest.importorskip("ray.serve.llm")
    args = AppArgs(**_args("serve_gpu.yaml"))
    base, aligner = args.bases["llama3-70b"], args.aligners["diffpo-gemma2"]
    assert base.engine == "vllm" and aligner.engine == "vllm"
    assert base.vllm.placement(base.num_cpus, base.num_gpus) == [{"CPU": 2, "GPU": 1}] * 4
    build_app(_args("serve_gpu.yaml"))  # LLMConfig validates engine, placement and deployment options


def test_default_config_is_the_vllm_graph_with_an_in_process_alternative():
    args = AppArgs(**_args("serve.yaml"))
    assert args.bases["smollm2"].engine == "vllm" and args.aligners["smollm2"].engine == "vllm"
    assert args.aligners["smollm2-jacobi"].engine == "fast"


def test_a_base_and_an_aligner_with_the_same_engine_settings_share_one_llm_server():
    pytest.importorskip("ray.serve.llm")
    from serve_app.app import _Servers

    args = AppArgs(**_args("serve.yaml"))
    servers = _Servers()
    base = servers.get("base", "smollm2", args.bases["smollm2"])
    assert servers.get("aligner", "smollm2", args.aligners["smollm2"]) is base and base[0] == "llm-base-smollm2"
    other = args.aligners["smollm2"].model_copy(update={"num_cpus": 1.0})
    assert servers.get("aligner", "other", other)[0] == "llm-aligner-other", "other settings, another server"


def test_renamed_keys_say_what_they_are_now():
    with pytest.raises(ValueError) as e:
        AppArgs(bases={"b": {"kind": "hf"}}, aligners={"a": {"mode": "fast"}}, models={"m": {"base": "b", "aligner": "a"}})
    assert "bases.b.kind: this key was renamed; use bases.b.engine" in str(e.value)
    assert "aligners.a.mode: this key was renamed; use aligners.a.engine" in str(e.value)


def _deployments(app) -> dict:
    """Every deployment of a built graph: name -> (the replica's own CPUs, its placement group bundles)."""
    out = {}

    def walk(a):
        d = a._bound_deployment
        if d.name not in out:
            rc = d._replica_config
            out[d.name] = (rc.ray_actor_options.get("num_cpus", 1), rc.placement_group_bundles)
            for x in [*d.init_args, *d.init_kwargs.values()]:
                for y in x.values() if isinstance(x, dict) else [x]:
                    if hasattr(y, "_bound_deployment"):
                        walk(y)
    walk(app)
    return out


def test_default_graph_fits_a_two_core_machine():
    """`bash scripts/serve.sh` on the 2-core machine: every deployment's first replica must be schedulable (a
    replica with a placement group takes its bundles, which hold the replica itself; others their num_cpus).
    Ray Serve LLM's server replica reserves 1 CPU of its own by default, which left the in-process aligner
    unscheduled until conf/serve.yaml set it lower."""
    pytest.importorskip("ray.serve.llm")
    from serve_app.app import build_graph

    doc = yaml.safe_load((CONF / "serve.yaml").read_text())["applications"][0]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in doc["deployments"]}
    deployments = _deployments(build_graph(AppArgs(**doc["args"]), options))
    assert set(deployments) == {"Ingress", "base-smollm2", "llm-base-smollm2", "aligner-smollm2",
                                "aligner-smollm2-jacobi"}, "one LLM server for the base and the aligner"
    cpus = sum(sum(b.get("CPU", 0) for b in bundles) if bundles else own for own, bundles in deployments.values())
    assert cpus <= 2, f"the graph needs {cpus} CPUs: {deployments}"


def test_admission_gates_are_the_routes_serving_deployments():
    pytest.importorskip("ray.serve.llm")
    from serve_app.app import _Servers, build_app, serving_deployments

    doc = _args("serve.yaml")
    args = AppArgs(**doc)
    assert args.admission.max_queue_wait_s == 2.0
    servers = _Servers()
    for role, models in (("base", args.bases), ("aligner", args.aligners)):
        for n, m in models.items():
            if m.engine == "vllm":
                servers.get(role, n, m)
    got = serving_deployments(args, servers)
    # both vLLM routes end on the one engine base and aligner share; the Jacobi route on its own aligner
    assert got == {"diffpo-smollm2": "llm-base-smollm2", "smollm2": "llm-base-smollm2",
                   "diffpo-smollm2-jacobi": "aligner-smollm2-jacobi"}
    bad = dict(doc, admission={"max_queue_wait_s": 2.0, "max_concurrent_of": {"aligner-nope": 2}})
    with pytest.raises(ValueError, match=r"aligner-nope.*serving deployments are"):
        build_app(bad)


def test_a_budget_must_be_below_the_request_timeout():
    doc = _args("serve.yaml")
    with pytest.raises(ValueError) as e:
        AppArgs(**dict(doc, request_timeout_s=10, admission={"max_queue_wait_s": 10},
                       models=dict(doc["models"], smollm2=dict(doc["models"]["smollm2"], max_queue_wait_s=30))))
    assert "admission.max_queue_wait_s (10) must be below request_timeout_s" in str(e.value)
    assert "models.smollm2.max_queue_wait_s (30)" in str(e.value)
