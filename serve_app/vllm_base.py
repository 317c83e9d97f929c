"""Base kind ``vllm``: a vLLM engine behind ``ray.serve.llm`` (tensor parallel, GPU placement from config).

Optional: needs ``pip install "ray[llm]==2.60.0"`` (which brings vLLM) where the app is built and on the GPU
nodes. This module is imported only when a base of kind ``vllm`` is configured, so CPU installs never see it.
"""
from __future__ import annotations

import time

from ray import serve

from .config import VLLMBaseArgs
from .metrics import DraftMetrics
from .protocol import BadRequest, UpstreamError


def build_vllm_base(name: str, args: VLLMBaseArgs):
    try:
        from ray.serve.llm import LLMConfig, build_llm_deployment
    except ImportError as e:
        raise ImportError(f"base {name!r} has kind 'vllm', which needs the optional extra: "
                          f"pip install 'ray[llm]==2.60.0' ({e})") from None
    n_gpus = args.tensor_parallel_size * args.pipeline_parallel_size
    llm_config = LLMConfig(
        model_loading_config={"model_id": args.model, "model_source": args.model_source or args.model},
        engine_kwargs={"tensor_parallel_size": args.tensor_parallel_size,
                       "pipeline_parallel_size": args.pipeline_parallel_size, **args.engine_kwargs},
        accelerator_type=args.accelerator_type,
        placement_group_config={"bundles": [{"GPU": 1}] * n_gpus, "strategy": args.placement_strategy},
        deployment_config={"autoscaling_config": {"min_replicas": args.min_replicas,
                                                  "max_replicas": args.max_replicas}},
    )
    llm = build_llm_deployment(llm_config, override_serve_options={"name": f"vllm-{name}"})
    return VLLMBase.options(name=f"base-{name}").bind(name, args.model_dump(), llm)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, health_check_period_s=10)
class VLLMBase:
    """Adapts the LLMServer handle to the ``draft`` interface of the other base deployments."""

    def __init__(self, name: str, args: dict, llm):
        from ray.serve.llm.openai_api_models import ChatCompletionRequest, ErrorResponse

        self.name, self.args = name, VLLMBaseArgs(**args)
        self._request_cls, self._error_cls = ChatCompletionRequest, ErrorResponse
        self.llm = llm.options(stream=True)  # LLMServer.chat is an async generator
        self.metrics = DraftMetrics(name)

    async def draft(self, req: dict) -> dict:
        t0 = time.perf_counter()
        body = self._request_cls(model=self.args.model, messages=req["messages"], max_tokens=req["max_tokens"],
                                 temperature=req["temperature"], top_p=req["top_p"], stream=False)
        async for out in self.llm.chat.remote(body):
            first = out[0] if isinstance(out, list) else out
            if isinstance(first, self._error_cls):
                self.metrics.record("rejected")
                err = first.error
                if 400 <= int(getattr(err, "code", 500) or 500) < 500:
                    raise BadRequest(f"vLLM refused the request: {err.message}")
                raise UpstreamError(f"vLLM failed: {err.message}")
            choice = first.choices[0]
            usage = first.usage
            ms = (time.perf_counter() - t0) * 1000
            self.metrics.record("ok", ms, usage.completion_tokens if usage else None)
            return {"text": (choice.message.content or "").strip(), "finish_reason": choice.finish_reason or "stop",
                    "completion_tokens": usage.completion_tokens if usage else None,
                    "prompt_tokens": usage.prompt_tokens if usage else None, "draft_ms": ms, "batch_size": 1}
        raise UpstreamError("vLLM returned no response")

    def check_health(self):
        pass
