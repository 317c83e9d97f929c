"""How a vLLM engine is set up from our settings, once for the batch jobs (Ray Data LLM) and the Serve app
(Ray Serve LLM): `VllmSettings` is the `vllm` section both nest, `engine_setup` turns it into what Ray's LLM
libraries take (the placement group of one engine, vLLM's engine arguments, the engine's environment).

No Ray and no vLLM import here: the jobs and the Serve app pass the result to `vLLMEngineProcessorConfig` /
`LLMConfig` themselves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class VllmSettings(BaseModel):
    """A vLLM engine: parallelism, placement and engine arguments (the `vllm` section of a model stage or a
    Serve model). One engine runs on a placement group of tp x pp bundles."""

    model_config = ConfigDict(extra="forbid")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (workers) one engine shards each layer over")
    pipeline_parallel_size: int = Field(1, ge=1, description="stages one engine splits the layers into")
    bundles: Optional[list[dict[str, float]]] = Field(
        None, description="placement group of one engine, one resource dict per worker; null = tp x pp bundles "
                          "of {CPU: num_cpus, GPU: num_gpus} (CPU-only bundles when num_gpus is 0)")
    strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="placement group strategy of one engine's bundles (STRICT_PACK: all on one node)")
    accelerator_type: Optional[str] = Field(None, description="e.g. A100, H100 (Ray's accelerator_type label)")
    max_model_len: Optional[int] = Field(None, ge=1, description="null = the model's context window")
    enforce_eager: Optional[bool] = Field(None, description="null = true on CPU bundles, vLLM's default on GPUs")
    cpu_kv_cache_gib: int = Field(1, ge=1, description="CPU engines: KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE)")
    max_concurrent_batches: int = Field(32, ge=1, description="batch jobs: batches in flight per engine (batch_size x "
                                                              "this rows keep the engine's continuous batching fed)")
    speculative_config: Optional[dict[str, Any]] = Field(
        None, description='passed to vLLM, e.g. {method: ngram, num_speculative_tokens: 8}; greedy output unchanged')
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="any other vLLM engine argument "
                                                                            "(they override the keys above)")

    def placement(self, num_cpus: float, num_gpus: float) -> list[dict[str, float]]:
        """The placement group of one engine: `bundles`, or tp x pp bundles of {CPU: num_cpus, GPU: num_gpus}."""
        if self.bundles:
            return [dict(b) for b in self.bundles]
        one = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        return [dict(one) for _ in range(self.tensor_parallel_size * self.pipeline_parallel_size)]


@dataclass
class EngineSetup:
    bundles: list[dict[str, float]]  # the placement group of one engine
    engine_kwargs: dict[str, Any]  # vLLM's engine arguments
    env: dict[str, str]  # environment variables of the engine's processes
    on_gpu: bool


def engine_setup(v: VllmSettings, dtype: str, trust_remote_code: bool, num_cpus: float,
                 num_gpus: float, context_window: int | None = None) -> EngineSetup:
    """What one engine needs: float32 and eager mode on CPU bundles unless said otherwise (the CPU kernels'
    safe choice), the KV cache size as vLLM's CPU build reads it, the rest passed through.

    CPU engines also run without chunked prefill: when a prompt's prefill is split over steps, vLLM discards the
    token sampled for it and rewinds the request's seeded generator (`set_offset`), which a CPU generator cannot
    do ("CPU Generator does not use offset": the engine dies, and the stage retries it forever). Every prompt is
    then prefilled in one step, so the step's token budget must hold the longest one (`max_model_len`, else the
    model's `context_window`)."""
    bundles = v.placement(num_cpus, num_gpus)
    on_gpu = any(b.get("GPU") for b in bundles)
    dtype = {"auto": "auto" if on_gpu else "float32", "fp32": "float32", "bf16": "bfloat16",
             "fp16": "float16"}.get(dtype, dtype)
    kw: dict[str, Any] = dict(dtype=dtype, tensor_parallel_size=v.tensor_parallel_size,
                              pipeline_parallel_size=v.pipeline_parallel_size, trust_remote_code=trust_remote_code,
                              enforce_eager=not on_gpu if v.enforce_eager is None else v.enforce_eager)
    if v.max_model_len:
        kw["max_model_len"] = v.max_model_len
    if v.speculative_config:
        kw["speculative_config"] = dict(v.speculative_config)
    if not on_gpu:
        kw["enable_chunked_prefill"] = False
        kw["max_num_batched_tokens"] = max(2048, v.max_model_len or context_window or 0)
    kw.update(v.engine_kwargs)
    env = {} if on_gpu else {"VLLM_CPU_KVCACHE_SPACE": str(v.cpu_kv_cache_gib)}
    return EngineSetup(bundles, kw, env, on_gpu)
