"""Job configuration: a typed schema <- a YAML file <- `key=value` overrides, with one error listing every mistake.

Every job declares its config as pydantic models built from the sections below; a section's fields are its
keys, their defaults are the defaults (written here or in the `pipeline` dataclass a section nests, nowhere
else), and the YAML files in conf/ only say what differs. `load_config(Schema, "conf/x.yaml", argv)`:

1. merges the YAML file (or `config=other.yaml`) with the command line's `key=value` overrides (OmegaConf:
   dotted keys, `${...}` interpolation);
2. checks the merged keys against the schema: an unknown key, a value of the wrong type or out of range,
   a key that was renamed (with its new name), all reported at once;
3. then runs every section's `check()` (the rules that span several keys, and files that must exist),
   again reporting every problem at once.

`python -m jobs.NAME --help` prints every key with its default and its description.
"""
from __future__ import annotations

import os
import sys
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.decoding.settings import RefineSettings, SamplingParams
from pipeline.decoding.vllm_engine import VllmSettings

REPO = Path(__file__).resolve().parents[2]
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")

# Keys that moved when the settings were given one type per concept; `section.*` stands for any section.
RENAMED = {
    **{f"*.{k}": f"*.refine.{k}" for k in ("block_size", "max_iter", "reserve_tokens", "window", "adaptive_window",
                                             "reseed", "reseed_ngram")},
    **{f"*.{k}": f"*.sampling.{k}" for k in ("temperature", "top_p", "do_sample")},
}
# keys that moved in some sections only (both a refine and a sampling setting share the name elsewhere)
RENAMED_IN = {
    "aligner": {"max_new_tokens": "aligner.refine.max_new_tokens", "seed": "aligner.refine.seed"},
    "base": {"max_new_tokens": "base.sampling.max_new_tokens", "seed": "base.sampling.seed"},
    "bases": {"max_new_tokens": "bases.sampling.max_new_tokens"},
    "trajectory": {"max_new_tokens": "trajectory.refine.max_new_tokens"},
}
# keys that moved when the engine choice became one `engine` key per model stage
RENAMED_IN["base"]["kind"] = "base.engine"
RENAMED_IN["bases"]["kind"] = "bases.engine"
RENAMED_IN["aligner"]["mode"] = "aligner.engine"


class ConfigError(ValueError):
    """Everything wrong with a config, one problem per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n  - " + "\n  - ".join(problems))


class Section(BaseModel):
    """A config section: unknown keys are errors; `check()` returns the problems that span several keys
    (key names relative to the section; `load_config` prefixes them)."""

    model_config = ConfigDict(extra="forbid")

    def check(self) -> list[str]:
        return []


# ---- sections the jobs share -------------------------------------------------------------------------------
class ModelCfg(Section):
    """Which model a stage loads."""
    model: str = Field("default", description='"default" (the embedded SmolLM2-135M-Instruct), an HF folder, '
                                              'a .gguf file or a hub id')
    dtype: Literal[DTYPES] = Field("auto", description="auto = float32 on CPU, bfloat16 (or float16) on GPU")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:1 ...")
    trust_remote_code: bool = False

    def check(self) -> list[str]:
        return [f"model: not found: {self.model}"] if missing_local_model(self.model) else []


class PoolCfg(Section):
    """The Ray Data actor pool that runs a stage."""
    batch_size: int = Field(4, ge=1, description="rows per actor call (more = faster per row, more memory)")
    num_cpus: float = Field(0.5, ge=0, description="per actor; fractions let several actors share a machine")
    num_gpus: float = Field(0.0, ge=0, description="per actor")
    concurrency: int = Field(1, ge=1, description="actors in the pool")
    row_timeout_s: Optional[float] = Field(
        600.0, gt=0, description="model stages: seconds of model time per row; a batch of n rows gets n times "
                                 "this, and the rows still running when it is spent become error rows (null = "
                                 "no budget)")

    def check(self) -> list[str]:
        if self.num_cpus <= 0 and self.num_gpus <= 0:
            return [f"num_cpus: must be > 0 (fractions such as 0.5 are fine), got {self.num_cpus}"]
        return []


class StageCfg(PoolCfg, ModelCfg):
    """A model stage of a Ray Data job: the model and the actor pool."""

    def check(self) -> list[str]:
        return ModelCfg.check(self) + PoolCfg.check(self)


class EndpointCfg(Section):
    """An OpenAI-compatible chat endpoint (vLLM, TGI, a hosted API, `serve run conf/serve.yaml`)."""
    base_url: Optional[str] = Field(None, description="e.g. http://10.0.0.5:8000/v1")
    api_key_env: Optional[str] = Field(None, description="environment variable holding the key (set it on every node)")
    timeout_s: float = Field(60.0, gt=0, description="per attempt; failures are retried with backoff")
    max_retries: int = Field(3, ge=0)
    parallel_requests: int = Field(8, ge=1, description="concurrent requests per actor")

    def endpoint(self, model: str):
        from pipeline.clients import EndpointConfig

        return EndpointConfig(base_url=self.base_url or "", model=model, api_key_env=self.api_key_env,
                              timeout_s=self.timeout_s, max_retries=self.max_retries)


class EngineCfg(StageCfg):
    """A model stage that can run on vLLM: the `vllm` section applies when its engine is vllm."""
    vllm: VllmSettings = Field(default_factory=VllmSettings)

    def check(self) -> list[str]:
        problems = StageCfg.check(self)
        if self.engine == "vllm":
            if str(self.model).endswith(".gguf"):
                problems.append("model: engine=vllm needs a Hugging Face model folder (or hub id), not a .gguf file")
            if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
                problems.append(f"device: engine=vllm places engines by vllm.bundles, not device={self.device!r}")
        return problems


class DraftCfg(EndpointCfg, EngineCfg):
    """A base model that drafts answers: on vLLM engines (Ray Data LLM), in the job's actors with Hugging Face
    `generate` (`pipeline.decoding.drafting.Drafter`), or at an OpenAI-compatible endpoint."""
    engine: Literal["vllm", "hf", "openai"] = Field(
        "vllm", description="vllm: vLLM engines run `model` | hf: transformers `generate` in the job's actors | "
                            "openai: `model` is the name at an OpenAI-compatible endpoint")
    sampling: SamplingParams = Field(default_factory=SamplingParams)

    def check(self) -> list[str]:
        problems = EngineCfg.check(self) if self.engine != "openai" else PoolCfg.check(self)
        if self.engine == "openai":
            problems += self.endpoint(self.model).validate()
        s = self.sampling
        if s.max_new_tokens < 1:
            problems.append(f"sampling.max_new_tokens: must be >= 1, got {s.max_new_tokens}")
        if s.do_sample and not (0 < s.top_p <= 1 and s.temperature > 0):
            problems.append("sampling: needs temperature > 0 and 0 < top_p <= 1 (or sampling.do_sample=false)")
        return problems


class AlignerCfg(EngineCfg):
    """The DiffPO aligner: engine, prompt, Jacobi settings and alignment-vector knobs. Every engine computes
    the same answer token for token (greedy): prompt + r reserved draft tokens, continued greedily."""
    engine: Literal["vllm", "fast", "reference", "ar"] = Field(
        "vllm", description="vllm (greedy continuation on vLLM engines, Ray Data LLM) | fast (batched KV-cached "
                            "Jacobi, HF) | reference (the published Jacobi loop, HF) | ar (greedy HF generate)")
    in_context: bool = Field(False, description="the aligner's prompt also shows the draft (correction template)")
    template: Optional[str] = Field(None, description="correction template with {question} and {draft}; null = built-in")
    prompt_lookup: int = Field(0, ge=0, description="ar mode: > 0 uses transformers' prompt-lookup speculation")
    refine: RefineSettings = Field(default_factory=RefineSettings)
    vectors: dict[str, str] = Field(default_factory=dict, description="alignment vectors: name -> folder "
                                                                      "(python -m jobs.extract_vector)")
    knobs: dict[str, float] = Field(default_factory=dict, description="name -> λ: the aligner runs with θ + Σ λ·AV")

    def check(self) -> list[str]:
        from pipeline.prompts import check_template

        problems = EngineCfg.check(self)
        if self.template is not None:
            try:
                check_template(self.template)
            except ValueError as e:
                problems.append(f"template: {e}")
        try:
            self.refine.validate()
        except ValueError as e:
            problems.append(f"refine: {e}")
        for name in self.knobs:
            if name not in self.vectors:
                problems.append(f"knobs.{name}: no vector named {name!r} in vectors (have {sorted(self.vectors)})")
        for name, path in self.vectors.items():
            if not (Path(expand(path)) / "vector.json").exists():
                problems.append(f"vectors.{name}: no alignment vector at {path} (write one with jobs.extract_vector)")
        return problems

    def knob_vectors(self) -> dict[str, str]:
        """The vectors the knobs use, paths expanded."""
        return {n: expand(p) for n, p in self.vectors.items() if n in self.knobs}


class RayCfg(Section):
    address: Optional[str] = Field(None, description='null = start a local Ray; "auto" = join the running cluster')
    num_cpus: Optional[int] = Field(None, ge=1, description="local Ray only: CPUs to give it (null = all)")


class DataRayCfg(RayCfg):
    """`ray` section of a Ray Data job."""
    torch_threads: int = Field(1, ge=1, description="torch threads per actor (one per CPU it was given)")
    progress_bars: bool = True


# ---- loading ----------------------------------------------------------------------------------------------
def expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path))


def missing_local_model(spec) -> bool:
    """A model spec that names a local path (./x, /x, ~/x) which does not exist (hub ids and "default" never do)."""
    spec = str(spec)
    return spec.startswith((".", "/", "~")) and not Path(expand(spec)).exists()


def resolve_path(path: str) -> Path:
    """An absolute path (Ray workers do not share the driver's working directory): relative paths are taken
    from the working directory if they exist there, else from the repository root."""
    p = Path(expand(str(path)))
    return (p if p.is_absolute() or p.exists() else REPO / p).resolve()


def _renamed(tree, prefix: str = "", section: str = "") -> list[str]:
    """`key: renamed, use new.key` for every key of the merged YAML + overrides that moved."""
    problems = []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        full = f"{prefix}{key}"
        here = section if isinstance(tree, list) else str(key)
        new = None
        if isinstance(tree, dict) and section not in ("refine", "sampling"):
            new = RENAMED_IN.get(section, {}).get(key)
            if new is None and prefix and f"*.{key}" in RENAMED:
                new = RENAMED[f"*.{key}"].replace("*", prefix.rstrip("."))
            elif new is not None and prefix.rstrip(".") != section:  # a list element, e.g. bases.0
                new = prefix + new.split(".", 1)[1]
        if new:
            problems.append(f"{full}: this key was renamed; use {new}")
        elif isinstance(value, (dict, list)):
            problems += _renamed(value, full + ".", here)
    return problems


def _checks(node, prefix: str = "") -> list[str]:
    """Every section's `check()` problems, depth first, with full key names."""
    problems = []
    if isinstance(node, BaseModel):
        if isinstance(node, Section):
            problems += [f"{prefix}{p}" for p in node.check()]
        for name in type(node).model_fields:
            problems += _checks(getattr(node, name), f"{prefix}{name}.")
    elif isinstance(node, list):
        for i, x in enumerate(node):
            problems += _checks(x, f"{prefix}{i}.")
    elif isinstance(node, dict):
        for k, x in node.items():
            problems += _checks(x, f"{prefix}{k}.")
    return problems


def _pydantic_problems(e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        key = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] in ("extra_forbidden", "unexpected_keyword_argument") else err["msg"]
        got = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {err.get('input')!r})"
        out.append(f"{key}: {msg}{got}")
    return out


def load_config(schema: type[BaseModel], default_yaml: str | Path, argv: list[str] | None = None):
    """The typed config of a job: `schema` <- YAML (`default_yaml`, or `config=...` in argv) <- key=value argv.
    Raises ConfigError listing every problem."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(describe(schema))
        sys.exit(0)
    bad = [a for a in argv if "=" not in a or a.startswith("-")]
    if bad:
        raise ConfigError([f"arguments must be key=value overrides (or --help), got {a!r}" for a in bad])
    path, rest = Path(default_yaml), []
    for a in argv:
        k, v = a.split("=", 1)
        if k == "config":
            path = Path(v)
        else:
            rest.append(a)
    if not path.is_absolute() and not path.exists():
        path = REPO / path
    if not path.exists():
        raise ConfigError([f"config file not found: {path}"])
    try:
        merged = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(rest))
        tree = OmegaConf.to_container(merged, resolve=True) or {}
    except OmegaConfBaseException as e:
        raise ConfigError([f"{str(e).splitlines()[0]}  (config file {path})"]) from None
    problems = _renamed(tree)
    try:
        cfg = schema.model_validate(tree)
    except ValidationError as e:
        moved = {p.split(":")[0] for p in problems}
        rest = [p for p in _pydantic_problems(e) if p.split(":")[0] not in moved]
        raise ConfigError(problems + rest + [f"(config file {path})"]) from None
    problems += _checks(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_yaml(cfg: BaseModel) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg.model_dump(mode="json")))


def describe(schema, prefix: str = "") -> str:
    """Every key of a schema with its default and description, one per line (`--help`)."""
    lines = []
    fields = schema.model_fields if isinstance(schema, type) and issubclass(schema, BaseModel) else None
    if fields is None:  # a pipeline dataclass (RefineSettings, SamplingParams): its fields and defaults
        import dataclasses

        for f in dataclasses.fields(schema):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name} = {default!r}")
        return "\n".join(lines)
    for name, f in fields.items():
        t = f.annotation
        sub = next((a for a in (t, *getattr(t, "__args__", ())) if isinstance(a, type)
                    and (issubclass(a, BaseModel) or is_dataclass(a))), None)
        origin = getattr(t, "__origin__", None)
        if sub is not None and origin in (list, dict):  # a list or a map of sections: one entry's keys
            kind, key = ("list", "N") if origin is list else ("map", "<name>")
            lines.append(f"{prefix}{name} = {f.get_default(call_default_factory=True)!r}    # a {kind} of entries:")
            lines.append(describe(sub, f"{prefix}{name}.{key}."))
        elif sub is not None:
            lines.append(describe(sub, f"{prefix}{name}."))
        else:
            default = f.get_default(call_default_factory=True)
            lines.append(f"{prefix}{name} = {default!r}" + (f"    # {f.description}" if f.description else ""))
    return "\n".join(lines)
