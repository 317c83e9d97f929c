"""Extract an alignment vector AV = θ_aligned − θ_base from two checkpoints of the same architecture.

    python -m jobs.extract_vector aligned=outputs/concise-model domain=concise          # base = the default model
    python -m jobs.extract_vector base=/models/base aligned=/models/medical domain=medical compression.rank=64
    python -m jobs.extract_vector aligned=... domain=legal compression.energy=0.9 out=/vectors/legal

Streams tensor by tensor (memory ~ two tensors, not three models) and refuses checkpoints that differ in
architecture, tensor names, shapes, dtypes or tokenizer, naming what differs. Writes `<out>/vector.safetensors`
and `<out>/vector.json` (base path + content hash, domain, tensors, compression and its reconstruction error).
Every key of conf/extract_vector.yaml can be given as key=value.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from jobs.config import ConfigError, expand, load_config, run_job


@dataclass
class CompressionCfg:
    rank: Optional[int] = None
    energy: Optional[float] = None
    min_dim: int = 16
    exclude: list[str] = field(default_factory=list)


@dataclass
class ExtractVectorConfig:
    base: str = "default"
    aligned: Optional[str] = None
    domain: str = "aligned"
    out: Optional[str] = None
    dtype: str = "float32"
    skip_unchanged: bool = True
    compression: CompressionCfg = field(default_factory=CompressionCfg)


def validate(cfg) -> None:
    import re

    from pipeline.vectors.extract import Compression

    problems = []
    if not cfg.aligned:
        problems.append("aligned: the aligned checkpoint folder is required (aligned=path/to/model)")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", cfg.domain or ""):
        problems.append(f"domain: use letters, digits, '_', '-', '.' (it names the vector), got {cfg.domain!r}")
    if cfg.dtype not in ("float32", "float16", "bfloat16", "float64"):
        problems.append(f"dtype: {cfg.dtype!r} is not float32, float16, bfloat16 or float64")
    try:
        Compression(**cfg.compression).validate()
    except ValueError as e:
        problems.append(str(e))
    for p in cfg.compression.exclude:
        try:
            re.compile(p)
        except re.error as e:
            problems.append(f"compression.exclude: bad regex {p!r}: {e}")
    if problems:
        raise ConfigError(problems)


def main(argv: list[str] | None = None) -> dict:
    from omegaconf import OmegaConf

    from pipeline.vectors.extract import Compression, extract_vector

    cfg = load_config(ExtractVectorConfig, "conf/extract_vector.yaml", argv)
    validate(cfg)
    out = expand(cfg.out or f"outputs/vectors/{cfg.domain}")
    c = OmegaConf.to_container(cfg.compression)
    meta = extract_vector(expand(cfg.base), expand(cfg.aligned), out, cfg.domain, Compression(**c),
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
    from pipeline.vectors.extract import VectorError

    run_job("extract_vector", errors=(VectorError, FileNotFoundError))
