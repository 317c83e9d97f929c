"""Extract an alignment vector AV = θ_aligned − θ_base from two checkpoints of the same architecture.

    python -m jobs.extract_vector aligned=outputs/concise-model domain=concise          # base = the default model
    python -m jobs.extract_vector base=/models/base aligned=/models/medical domain=medical compression.rank=64
    python -m jobs.extract_vector aligned=... domain=legal compression.energy=0.9 out=/vectors/legal
    python -m jobs.extract_vector --help                                                # every key, default, meaning

Streams tensor by tensor (memory ~ two tensors, not three models) and refuses checkpoints that differ in
architecture, tensor names, shapes, dtypes or tokenizer, naming what differs. Writes `<out>/vector.safetensors`
and `<out>/vector.json` (base path + content hash, domain, tensors, compression and its reconstruction error).
Runs in this process (no Ray); `jobs.search_knobs`, `jobs.align_dataset` and the Serve app load the vector.
"""
from __future__ import annotations

import json
import re
from typing import Literal, Optional

import pydantic
from pydantic import ConfigDict, Field

from jobs.common.config import Section, expand, load_config
from jobs.common.runtime import run_job
from pipeline.vectors.extract import Compression, VectorError, extract_vector


@pydantic.dataclasses.dataclass(config=ConfigDict(extra="forbid"))
class CompressionCfg(Compression):
    """`pipeline.vectors.extract.Compression` as a config section: the same keys and defaults (an optional
    truncated SVD of every 2-D delta: `rank`, or the `energy` to keep; `min_dim`; `exclude` regexes), unknown
    keys refused."""


class ExtractVectorConfig(Section):
    base: str = Field("default", description='base checkpoint: a local HF folder with .safetensors ("default" = '
                                             "the embedded SmolLM2-135M)")
    aligned: Optional[str] = Field(None, description="required: the aligned checkpoint (same architecture, "
                                                     "tokenizer, tensor names/shapes/dtypes)")
    domain: str = Field("aligned", pattern=r"^[A-Za-z0-9_.\-]+$", description="the vector's name (letters, digits, "
                                                                              "'_', '-', '.'), also its folder's")
    out: Optional[str] = Field(None, description="output folder; null = outputs/vectors/<domain>")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = Field(
        "float32", description="storage dtype of the deltas (float32 keeps fp32 and bf16 differences exact)")
    skip_unchanged: bool = Field(True, description="tensors identical in both checkpoints are listed, not stored")
    compression: CompressionCfg = Field(default_factory=CompressionCfg)

    def check(self) -> list[str]:
        problems = []
        if not self.aligned:
            problems.append("aligned: the aligned checkpoint folder is required (aligned=path/to/model)")
        try:
            self.compression.validate()
        except ValueError as e:
            problems.append(str(e))
        for p in self.compression.exclude:
            try:
                re.compile(p)
            except re.error as e:
                problems.append(f"compression.exclude: bad regex {p!r}: {e}")
        return problems


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(ExtractVectorConfig, "conf/extract_vector.yaml", argv)
    out = expand(cfg.out or f"outputs/vectors/{cfg.domain}")
    meta = extract_vector(expand(cfg.base), expand(cfg.aligned), out, cfg.domain, cfg.compression,
                          dtype=cfg.dtype, skip_unchanged=cfg.skip_unchanged)
    comp = meta["compression"]
    print(json.dumps({"out": out, "domain": meta["domain"], "base_hash": meta["base"]["hash"],
                      "tensors": len(meta["tensors"]), "unchanged": len(meta["unchanged"]),
                      "low_rank_tensors": comp["low_rank_tensors"], "stored_mb": round(comp["stored_bytes"] / 1e6, 2),
                      "dense_mb": round(comp["dense_bytes"] / 1e6, 2), "rel_error_total": comp["rel_error_total"],
                      "max_rel_error": comp["max_rel_error"], "extract_s": meta["extract_s"],
                      "warnings": meta["warnings"]}, indent=2))
    return meta


if __name__ == "__main__":
    run_job("extract_vector", errors=(VectorError, FileNotFoundError))
