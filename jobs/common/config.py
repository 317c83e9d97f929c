"""Job configuration: the sections the batch jobs share, on the schema mechanics of `pipeline.config.schema`.

Every job declares its config as pydantic models built from these sections and the model stages of
`pipeline.config.stages` (the same base and aligner sections the Serve app uses, plus each job stage's actor pool
here); a section's fields are its keys and their defaults are the defaults, and the YAML files in conf/ only say
what differs. `load_config(Schema, "conf/x.yaml", argv)` merges the YAML file (or `config=other.yaml`) with the
command line's `key=value` overrides and raises one `ConfigError` with every problem: unknown keys (with the
closest valid ones), keys that belong to another engine, wrong types and ranges, and the sections' cross-key
rules. `python -m jobs.NAME --help` prints every key with its default, its engines and its description.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, Field

from pipeline.config.schema import (REPO, ConfigError, Section, by_engine, describe, formerly, engines_of, expand,  # noqa: F401
                                    load_config, to_yaml, validate)
from pipeline.config.stages import (ARAligner, EndpointKeys, FastAligner, HFBase, InProcess, ModelSource,  # noqa: F401
                                    OnVllm, OpenAIBase, ReferenceAligner, VllmAligner, VllmBase, missing_local_model)


# ---- sections the jobs share -------------------------------------------------------------------------------
ModelCfg = InProcess  # a model loaded in the job's actors (reward models, trajectories, the knob search)


class PoolCfg(Section):
    """The Ray Data actor pool that runs a stage in-process (the HF engines, endpoint calls)."""
    batch_size: int = Field(4, ge=1, description="rows per actor call (more = faster per row, more memory)")
    num_cpus: float = Field(0.5, ge=0, description="per actor; fractions let several actors share a machine")
    num_gpus: float = Field(0.0, ge=0, description="per actor")
    concurrency: int = Field(1, ge=1, description="actors in the pool")
    row_timeout_s: Optional[float] = Field(
        600.0, gt=0, description="seconds of model time per row; a batch of n rows gets n times this, and the rows "
                                 "still running when it is spent become error rows (null = no budget)")

    def check(self) -> list[str]:
        problems = super().check()
        if self.num_cpus <= 0 and self.num_gpus <= 0:
            problems.append(f"num_cpus: must be > 0 (fractions such as 0.5 are fine), got {self.num_cpus}")
        return problems


class VllmPoolCfg(Section):
    """A stage on vLLM engines through Ray Data LLM: its engine pool (each engine placed as `vllm.*` says)."""
    batch_size: int = Field(4, ge=1, description="rows per request batch sent to an engine (vllm.max_concurrent_"
                                                 "batches of them in flight keep its continuous batching fed)")
    concurrency: int = Field(1, ge=1, description="engines in the pool")


class StageCfg(PoolCfg, InProcess):
    """A model stage of a Ray Data job on a Hugging Face model: the model and the actor pool."""


class EndpointCfg(EndpointKeys):
    """An OpenAI-compatible chat endpoint called from the job's actors."""
    parallel_requests: int = Field(8, ge=1, description="concurrent requests per actor")


# ---- the base model that drafts ----------------------------------------------------------------------------
class VllmDraftCfg(VllmBase, VllmPoolCfg):
    """Drafts on vLLM engines (Ray Data LLM)."""


class HFDraftCfg(HFBase, PoolCfg):
    """Drafts with transformers `generate` in the job's actors (`pipeline.decoding.drafting.Drafter`)."""


class OpenAIDraftCfg(OpenAIBase, EndpointCfg, PoolCfg):
    """Drafts at an OpenAI-compatible endpoint, called from the job's actors."""

    def check(self) -> list[str]:  # the key's variable must be set here too: the job's actors inherit it
        return super().check() + [p for p in self.endpoint_problems(self.model) if "is not set" in p]


DraftCfg = by_engine(VllmDraftCfg, HFDraftCfg, OpenAIDraftCfg, default="vllm")


# ---- the aligner -----------------------------------------------------------------------------------------
class KnobCfg(Section):
    """Alignment-vector knobs applied to the aligner for the whole job (θ + Σ λ·AV, merged once)."""
    vectors: dict[str, str] = Field(default_factory=dict, description="alignment vectors: name -> folder "
                                                                      "(python -m jobs.extract_vector)")
    knobs: dict[str, float] = Field(default_factory=dict, description="name -> λ: the aligner runs with θ + Σ λ·AV")

    def check(self) -> list[str]:
        problems = super().check()
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


class VllmAlignerCfg(VllmAligner, KnobCfg, VllmPoolCfg):
    """The aligner on vLLM engines (Ray Data LLM)."""


class FastAlignerCfg(FastAligner, KnobCfg, PoolCfg):
    """The aligner on the fast Jacobi engine in the job's actors."""


class ReferenceAlignerCfg(ReferenceAligner, KnobCfg, PoolCfg):
    """The aligner on the published Jacobi loop in the job's actors."""


class ARAlignerCfg(ARAligner, KnobCfg, PoolCfg):
    """The aligner's greedy `generate` in the job's actors."""


AlignerCfg = by_engine(VllmAlignerCfg, FastAlignerCfg, ReferenceAlignerCfg, ARAlignerCfg, default="vllm")


class NoAlignerCfg(Section):
    """No aligner (align_dataset only): each row's answers are its drafts, given or written by the base: the base
    model's own answers as a baseline for a judge, or a drafts dataset to align later with several aligners."""
    engine: Literal["none"] = Field("none", description="none: the drafts are the answers; no model runs after the "
                                                        "base")
    label: ClassVar[str] = "none"  # the output's mode


JobAlignerCfg = by_engine(VllmAlignerCfg, FastAlignerCfg, ReferenceAlignerCfg, ARAlignerCfg, NoAlignerCfg,
                          default="vllm")


def as_engine(section: BaseModel, engine: str, stage=None, **update):
    """The same model stage on another engine: the keys both engines take carry over, the others get their
    defaults (e.g. the evaluation's reference and ar methods run the configured aligner on the HF engines).
    `stage`: the stage's `by_engine` type (default: the one `section` belongs to, DraftCfg or AlignerCfg)."""
    union = stage or (AlignerCfg if isinstance(section, KnobCfg) else DraftCfg)
    target = engines_of(union).variants[engine]
    data = {k: v for k, v in section.model_dump().items() if k in target.model_fields and k != "refine"}
    if "refine" in target.model_fields and hasattr(section, "refine"):
        keys = target.model_fields["refine"].annotation.__dataclass_fields__
        data["refine"] = {k: v for k, v in vars(section.refine).items() if k in keys}
    return target.model_validate({**data, **update, "engine": engine})


class RayCfg(Section):
    address: Optional[str] = Field(None, description='null = start a local Ray (or join $RAY_ADDRESS when set, as '
                                   'under `ray job submit`); "auto" = join the running cluster')
    num_cpus: Optional[int] = Field(None, ge=1, description="local Ray only: CPUs to give it (null = all)")


class DataRayCfg(RayCfg):
    """`ray` section of a Ray Data job."""
    torch_threads: int = Field(1, ge=1, description="torch threads per actor (one per CPU it was given)")
    progress_bars: bool = True


# ---- paths -------------------------------------------------------------------------------------------------
def resolve_path(path: str) -> Path:
    """An absolute path (Ray workers do not share the driver's working directory): relative paths are taken
    from the working directory if they exist there, else from the repository root."""
    p = Path(expand(str(path)))
    return (p if p.is_absolute() or p.exists() else REPO / p).resolve()
