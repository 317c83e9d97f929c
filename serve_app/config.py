"""Arguments of the Serve application (the ``args:`` block of conf/serve.yaml), validated by pydantic.

Ray Serve passes ``args`` to the app builder `serve_app.app:build_app`; everything about *which* models run
and *how* lives here, while replica counts, autoscaling and CPUs/GPUs of the in-process deployments stay in Serve's
own ``deployments:`` section of the same file (deployment names: ``Ingress``, ``base-<name>``, ``aligner-<name>``).
Model paths and trust settings come only from here, never from a request.

The bases and aligners are the batch jobs' model stages (`pipeline.config.stages`: the same engines, keys and
defaults), plus what serving adds: batching in an in-process replica, alignment vectors that requests can
turn (in-process engines), the LLM server's deployment options (vLLM). `validate_args(args)` reports every
problem in one error, with the closest valid keys for a misspelt one;

    python -m serve_app.config --help              # every key, its default, its engines and what it does
    python -m serve_app.config conf/serve.yaml     # validate a Serve config file
"""
from __future__ import annotations

import sys
from typing import ClassVar

from pydantic import Field, TypeAdapter, ValidationInfo, model_validator

from pipeline.config.schema import ConfigError, Section, by_engine, describe, key_problems, section_problems, validate
from pipeline.config.stages import (ARAligner, FastAligner, HFBase, OnVllm, OpenAIBase, ReferenceAligner, VllmAligner,
                                    VllmBase)

_Strict = Section


class _Served(Section):
    """First base of every Serve model section: model folders are read where the replicas run (other nodes,
    perhaps), not where the app is built, so they are not looked for here."""
    local_paths: ClassVar[bool] = False


class KnobBounds(_Strict):
    """Allowed range of every λ a request may send (out-of-range values get a 400)."""
    min: float = Field(-1.0, description="smallest λ a request may send")
    max: float = Field(2.0, description="largest λ a request may send")

    @model_validator(mode="after")
    def _order(self):
        if not self.min <= self.max:
            raise ValueError(f"knob_bounds: min {self.min} must be <= max {self.max}")
        return self


class VectorArgs(_Strict):
    """Alignment vectors of an in-process model: requests set `alignment: {name: λ}` and are served by
    θ + Σ λ·AV (pipeline/vectors/); merged variants stay in an LRU of `variant_cache_size` entries."""
    vectors: dict[str, str] = Field(default_factory=dict, description="name -> folder written by "
                                                                      "jobs.extract_vector (the same base model)")
    knob_bounds: KnobBounds = Field(default_factory=KnobBounds)
    variant_cache_size: int = Field(2, ge=0, description="merged variants kept (each one model's worth of the "
                                                         "touched weights)")
    check_vector_base: bool = Field(True, description="each vector's recorded base hash must match the loaded model")

    def knobbed(self, lm):
        """The KnobbedModel over a loaded model, or None without vectors."""
        if not self.vectors:
            return None
        from pipeline.vectors.knobs import load_knobbed

        return load_knobbed(lm, self.vectors, cache_size=self.variant_cache_size,
                            bounds=(self.knob_bounds.min, self.knob_bounds.max), check_base=self.check_vector_base)


class VllmVectorArgs(_Strict):
    """Alignment vectors of a model on vLLM: requests set `alignment: {name: λ}`; each setting (λ rounded to
    `adapters.step`) runs on its own LoRA adapter, built on first use where the engine runs (`adapters`:
    pipeline/vectors/lora.py), and requests with different settings share the engine's batches."""
    vectors: dict[str, str] = Field(default_factory=dict, description="name -> folder written by "
                                                                      "jobs.extract_vector (the same base model), "
                                                                      "readable where the engines run")
    knob_bounds: KnobBounds = Field(default_factory=KnobBounds)

    def knob_key(self, alignment: dict | None) -> tuple:
        """A request's knobs validated (names, finite, bounds) and quantized to `adapters.step`."""
        from pipeline.vectors.knobs import normalize_knobs
        from pipeline.vectors.lora import quantize

        key = normalize_knobs(alignment, sorted(self.vectors), (self.knob_bounds.min, self.knob_bounds.max))
        return quantize(key, self.adapters.step)


class ReplicaArgs(_Strict):
    """A model in the Serve replica's own process: concurrent requests are batched into one engine call."""
    torch_threads: int | None = Field(None, description="null: the replica's CPU allotment (at least 1)")
    max_batch_size: int = Field(8, ge=1, description="requests per engine call (1 turns batching off)")
    batch_wait_timeout_s: float = Field(0.1, ge=0, description="how long a batch waits for company ...")
    adaptive_batch_wait: bool = Field(True, description="... only while other requests are around (a lone request "
                                                        "never waits)")


class LLMServerArgs(_Strict):
    """A model on vLLM through Ray Serve LLM: an LLM server deployment `llm-base-<name>` / `llm-aligner-<name>`
    per engine setting, one engine per replica on a placement group of tp x pp bundles."""
    deployment_config: dict = Field(
        default_factory=lambda: {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        description="the LLM server deployment's Serve options (autoscaling_config, max_ongoing_requests, "
                    "ray_actor_options ...)")


# ---- the bases ---------------------------------------------------------------------------------------------
class HFBaseArgs(_Served, HFBase, VectorArgs, ReplicaArgs):
    """A Hugging Face causal LM in the replica; concurrent requests are batched into one `generate`."""


class VLLMBaseArgs(_Served, VllmBase, VllmVectorArgs, LLMServerArgs):
    """A base model on vLLM engines: requests are sampled with their temperature and top_p (or `sampling`'s) and a
    seed drawn from `sampling.seed` and the conversation; with `vectors`, alignment knobs per request (LoRA)."""


class OpenAIBaseArgs(_Served, OpenAIBase):
    """Any OpenAI-compatible chat endpoint over HTTP (vLLM, TGI, a hosted API, another DiffPO server)."""
    max_connections: int = Field(64, ge=1, description="connection pool size to the endpoint")
    context_window: int | None = Field(None, description="optional local check before calling (tokens are not "
                                                         "counted remotely)")


BaseArgs = by_engine(VLLMBaseArgs, HFBaseArgs, OpenAIBaseArgs, default="vllm")


# ---- the aligners ------------------------------------------------------------------------------------------
class FastAlignerArgs(_Served, FastAligner, VectorArgs, ReplicaArgs):
    """The aligner in the replica on the fast Jacobi engine; it serves alignment knobs."""


class ReferenceAlignerArgs(_Served, ReferenceAligner, VectorArgs, ReplicaArgs):
    """The aligner in the replica on the published Jacobi loop."""


class ARAlignerArgs(_Served, ARAligner, VectorArgs, ReplicaArgs):
    """The aligner in the replica with greedy `generate`."""


class VLLMAlignerArgs(_Served, VllmAligner, VllmVectorArgs, LLMServerArgs):
    """The aligner on vLLM engines through Ray Serve LLM; with `vectors`, alignment knobs per request (each setting
    a LoRA adapter, `adapters`)."""


AlignerArgs = by_engine(VLLMAlignerArgs, FastAlignerArgs, ReferenceAlignerArgs, ARAlignerArgs, default="vllm")
EngineArgs = OnVllm  # the keys that make an engine setting (models with the same ones share one LLM server)
ENGINE_KEYS = set(OnVllm.model_fields) | set(LLMServerArgs.model_fields) | set(VllmVectorArgs.model_fields)


def aligner_args(args: dict):
    """An aligner's args (a dict from `model_dump`) as its section."""
    return TypeAdapter(AlignerArgs).validate_python(args)


class Admission(_Strict):
    """Admission on a queue-time budget (serve_app/admission.py): each serving deployment (a route's aligner, or its
    base on a bare route; its LLM server on vLLM) runs at most `max_concurrent` requests per replica at once, the
    rest wait in a queue; a request that cannot start within `max_queue_wait_s` is refused at once with 503 and
    Retry-After (a stream starts at its first token)."""
    max_queue_wait_s: float | None = Field(None, gt=0, description="the latency objective: the longest a request may "
                                                                   "wait to start; null: no budget (requests wait "
                                                                   "their turn, up to request_timeout_s)")
    max_concurrent: int = Field(4, ge=1, description="requests run at once per replica of a serving deployment "
                                                     "(the concurrency at which answers keep their time)")
    max_concurrent_of: dict[str, int] = Field(default_factory=dict, description="max_concurrent of particular "
                                              "serving deployments, by name (aligner-<name>, base-<name>, "
                                              "llm-<role>-<name>)")
    replicas_refresh_s: float = Field(2.0, gt=0, description="how often the ingress reads the deployments' running "
                                                             "replicas from Serve (autoscaling, lost nodes)")


class ModelRoute(_Strict):
    """A model name clients can ask for: a base model, optionally refined by an aligner."""
    base: str = Field(description="a name under bases")
    aligner: str | None = Field(None, description="a name under aligners; null serves the bare base model")
    description: str = Field("", description="shown in /v1/models")
    max_queue_wait_s: float | None = Field(None, gt=0, description="this route's own latency objective (null: "
                                                                   "admission.max_queue_wait_s)")


class AppArgs(_Strict):
    """The Serve app: its models (bases, aligners), the routes clients name, and the API's limits."""
    bases: dict[str, BaseArgs] = Field(description="base models by name: they draft (or answer on bare routes)")
    aligners: dict[str, AlignerArgs] = Field(default_factory=dict, description="aligners by name: they refine")
    models: dict[str, ModelRoute] = Field(description='the names clients send as "model"')
    max_tokens_cap: int = Field(512, ge=1, description="requests asking for more get a 400")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that sends none")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger bodies get a 413")
    max_messages: int = Field(64, ge=1, description="longer conversations get a 400")
    max_prediction_chars: int = Field(32_000, ge=1, description="a longer `prediction` (the client's own draft) "
                                                                 "gets a 400")
    request_timeout_s: float = Field(120.0, gt=0, description="per request, draft + refine; then 504")
    admission: Admission = Field(default_factory=Admission)
    replica_failure_retries: int = Field(1, ge=0, description="resend a request whose replica died (answers are "
                                                              "deterministic)")
    api_key_env: str = Field("API_KEY", description='if this variable is set, requests need "Authorization: Bearer '
                                                    '<its value>"')

    @model_validator(mode="before")
    @classmethod
    def _keys(cls, data, info: ValidationInfo):
        """Unknown keys and keys of another engine, explained (`validate_args` reports them with the rest)."""
        if isinstance(data, dict) and not (info.context or {}).get("config_validate"):
            problems = key_problems(cls, data)
            if problems:
                raise ValueError("\n".join(problems))
        return data

    @model_validator(mode="after")
    def _routes(self, info: ValidationInfo):
        problems = [] if (info.context or {}).get("config_validate") else section_problems(self)
        if not self.models:
            problems.append("models: at least one model route is needed")
        for name, r in self.models.items():
            if r.base not in self.bases:
                problems.append(f"models.{name}.base: no base named {r.base!r} (have {sorted(self.bases)})")
            if r.aligner is not None and r.aligner not in self.aligners:
                problems.append(f"models.{name}.aligner: no aligner named {r.aligner!r} (have {sorted(self.aligners)})")
            base = self.bases.get(r.base)
            both = set(getattr(base, "vectors", {})) & set(getattr(self.aligners.get(r.aligner), "vectors", {}))
            if both:
                problems.append(f"models.{name}: vector names {sorted(both)} are on both its base and its aligner; "
                                "a request's alignment knob must name one model's vector")
        for name, budget in [("admission.max_queue_wait_s", self.admission.max_queue_wait_s)] + [
                (f"models.{n}.max_queue_wait_s", r.max_queue_wait_s) for n, r in self.models.items()]:
            if budget is not None and budget >= self.request_timeout_s:
                problems.append(f"{name} ({budget:g}) must be below request_timeout_s ({self.request_timeout_s:g}): "
                                "a request waits at most the one and is answered within the other")
        if self.default_max_tokens > self.max_tokens_cap:
            problems.append("default_max_tokens must be <= max_tokens_cap")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def knob_owners(self, route: ModelRoute) -> dict[str, tuple[str, VectorArgs]]:
        """Vector name -> ("base" | "aligner", that model's args), for the models of a route."""
        out = {}
        base = self.bases[route.base]
        if isinstance(base, (HFBaseArgs, VLLMBaseArgs)):
            out.update({n: ("base", base) for n in base.vectors})
        if route.aligner is not None:
            al = self.aligners[route.aligner]
            out.update({n: ("aligner", al) for n in getattr(al, "vectors", {})})
        return out


def validate_args(args: dict, where: str = "") -> AppArgs:
    """The app's args, or one ConfigError with every problem (keys, types, cross-key rules, routes)."""
    return validate(AppArgs, args, where)


def main(argv: list[str]) -> int:
    """`--help`: the schema; `FILE`: validate every application's args in a Serve config file."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\nargs:\n" + describe(AppArgs, "  "))
        return 0
    import yaml

    doc = yaml.safe_load(open(argv[0]))
    status = 0
    for app in doc.get("applications", []):
        try:
            validate_args(app.get("args") or {}, f"(application {app.get('name')!r} in {argv[0]})")
            print(f"{argv[0]}: application {app.get('name')!r}: ok")
        except ConfigError as e:
            print(e, file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
