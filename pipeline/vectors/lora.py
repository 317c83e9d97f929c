"""Knob settings as LoRA adapters: θ_base + Σ_d λ_d · AV_d served by an engine's multi-LoRA (vLLM) instead of a
merged copy of the model per setting.

Each vector's delta of a linear layer is factored once, ``AV_d ≈ A_d @ B_d`` (A: out × r, B: r × in): a truncated
SVD at `rank` per domain, the vector's own factors when it was stored low-rank at that rank or below, or, at full
rank (`rank=None`), the exact factorization ``AV = AV @ I`` (no SVD, no rounding beyond the engine's own matmuls).
A setting is one adapter: the λ's folded into the A factors and the domains concatenated along the rank,

    ΔW = [λ_1 A_1 | λ_2 A_2 | ...] @ [B_1; B_2; ...] = Σ_d λ_d A_d B_d

written as a PEFT LoRA (``lora_B = [λ A ...]``, ``lora_A = [B; ...]``, ``lora_alpha = r`` so the scale is 1; every
module padded with zero rank to the adapter's rank, since vLLM takes one rank per adapter). What a LoRA cannot
express (embeddings, norms, biases: tensors that are not the weight of a linear layer the engine adapts) is dropped
with a warning saying how much of the setting's norm that is, or refused (`unsupported="refuse"`).

Settings are quantized to `step` (λ rounded to a multiple of it; 0.05 by default), so that clients cannot make more
distinct adapters than the bounds / step grid holds, and named by their values (``av:concise=0.5,formal=-0.25``):
the name is the setting, so any process that has the same vectors can build the adapter it names. `AdapterStore`
builds a setting's adapter once per machine under its cache folder (a file lock guards concurrent builders) and
keeps the per-vector factors in memory, so a new setting costs a write, not an SVD.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .extract import META_FILE, VECTOR_FILE, KnobError, VectorError
from .knobs import AlignmentVector, normalize_knobs

# the linear layers vLLM's LoRA adapts in Llama-family models (q/k/v and gate/up are packed there; adapters name
# them one by one)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LINEAR = re.compile(r"^(?P<module>.+\.(?P<kind>" + "|".join(LORA_TARGETS) + r"))\.weight$")
PREFIX = "av:"  # adapter names: av:<name>=<λ>,<name>=<λ> (sorted, quantized)
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_INFO = "diffpo_adapter.json"  # the setting, the vectors' ids, what was dropped


@dataclass(frozen=True)
class AdapterCfg:
    """How settings become adapters: `rank` per domain (None = full rank, exact), the quantization `step` of λ, and
    what to do with deltas a LoRA cannot express (`drop` with a warning, or `refuse`)."""
    rank: int | None = None
    step: float = 0.05
    unsupported: Literal["drop", "refuse"] = "drop"

    def validate(self) -> list[str]:
        problems = []
        if self.rank is not None and self.rank < 1:
            problems.append(f"rank must be >= 1 or null (full rank), got {self.rank}")
        if not (self.step > 0 and math.isfinite(self.step)):
            problems.append(f"step must be a positive number, got {self.step}")
        if self.unsupported not in ("drop", "refuse"):
            problems.append(f"unsupported must be drop or refuse, got {self.unsupported!r}")
        return problems


# ---- settings ---------------------------------------------------------------------------------------------------
def quantize(key: tuple, step: float) -> tuple:
    """A normalized setting ((name, λ), ...) with every λ rounded to a multiple of `step` (zeros dropped)."""
    out = []
    for name, lam in key:
        q = round(round(lam / step) * step, 10)
        if q != 0:
            out.append((name, q))
    return tuple(sorted(out))


def adapter_name(key: tuple) -> str:
    """The adapter's name for a quantized setting: its values, readable and invertible (`parse_name`)."""
    return PREFIX + ",".join(f"{n}={lam:g}" for n, lam in key)


def parse_name(name: str) -> tuple:
    """The setting an adapter name stands for (KnobError if `name` is not one)."""
    if not name.startswith(PREFIX):
        raise KnobError(f"{name!r} is not an alignment adapter name ({PREFIX}<vector>=<λ>,...)")
    out = []
    for part in filter(None, name[len(PREFIX):].split(",")):
        n, sep, v = part.partition("=")
        try:
            lam = float(v)
        except ValueError:
            lam = math.nan
        if not sep or not n or not math.isfinite(lam):
            raise KnobError(f"{name!r}: {part!r} is not <vector>=<number>")
        out.append((n, lam))
    return tuple(sorted(out))


# ---- factors ----------------------------------------------------------------------------------------------------
@dataclass
class Factors:
    """One vector at one rank: per adapted module (name without ``.weight``), (A, B) with AV ≈ A @ B and the relative
    error of that; the norms of what no LoRA expresses (tensor name -> ||AV||); the vector's total norm."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rel_error: dict[str, float]
    dropped: dict[str, float]
    norm: float


def _exact(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AV = A @ B exactly: the identity on the smaller side."""
    m, n = d.shape
    return (torch.eye(m), d.clone()) if m <= n else (d.clone(), torch.eye(n))


def _truncated(d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    return (U[:, :rank] * S[:rank]).contiguous(), Vh[:rank].contiguous()


@torch.no_grad()
def factor(vec: AlignmentVector, rank: int | None) -> Factors:
    """Every linear-layer delta of `vec` as LoRA factors of at most `rank` (None: exact, full rank)."""
    modules, errors, dropped, total = {}, {}, {}, 0.0
    for name in vec.names:
        parts = vec.parts[name]
        d = vec.delta(name, torch.float32)
        norm = float(d.norm())
        total += norm ** 2
        m = _LINEAR.match(name)
        if m is None or d.dim() != 2:
            dropped[name] = norm
            continue
        full = min(d.shape)
        if len(parts) == 2 and (rank is None or parts[0].shape[1] <= rank):  # the vector's own factors
            A, B = parts[0].float(), parts[1].float()
        elif rank is None or rank >= full:
            A, B = _exact(d)
        else:
            A, B = _truncated(d, rank)
        modules[m["module"]] = (A.contiguous(), B.contiguous())
        errors[m["module"]] = float((A @ B - d).norm() / norm) if norm else 0.0
    return Factors(modules, errors, dropped, math.sqrt(total))


def combine(terms: list[tuple[Factors, float]]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Σ λ_d A_d B_d per module as one (A, B) pair, λ folded into A, domains along the rank, every module padded
    to the largest rank; returns them and that rank."""
    names = sorted({m for f, _ in terms for m in f.modules})
    cat = {}
    for mod in names:
        As = [lam * f.modules[mod][0] for f, lam in terms if mod in f.modules]
        Bs = [f.modules[mod][1] for f, lam in terms if mod in f.modules]
        cat[mod] = (torch.cat(As, dim=1), torch.cat(Bs, dim=0))
    r = max((A.shape[1] for A, _ in cat.values()), default=0)
    out = {}
    for mod, (A, B) in cat.items():
        k = A.shape[1]
        if k < r:
            A = torch.cat([A, A.new_zeros(A.shape[0], r - k)], dim=1)
            B = torch.cat([B, B.new_zeros(r - k, B.shape[1])], dim=0)
        out[mod] = (A.contiguous(), B.contiguous())
    return out, r


def write_adapter(folder: Path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, base: str,
                  info: dict) -> None:
    """A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors, and `info` as diffpo_adapter.json)
    whose ΔW of each module is A @ B."""
    from safetensors.torch import save_file

    tensors = {}
    for mod, (A, B) in modules.items():
        tensors[f"base_model.model.{mod}.lora_A.weight"] = B.float().contiguous()  # r × in
        tensors[f"base_model.model.{mod}.lora_B.weight"] = A.float().contiguous()  # out × r
    targets = sorted({mod.rsplit(".", 1)[-1] for mod in modules})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    (folder / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "base_model_name_or_path": base, "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False}, indent=1))
    (folder / ADAPTER_INFO).write_text(json.dumps(info, indent=1))


# ---- the store ---------------------------------------------------------------------------------------------------
def vector_id(folder: str | Path) -> str:
    """What identifies a vector's content: a hash of its metadata file and its tensor file's size."""
    f = Path(folder)
    h = hashlib.sha256((f / META_FILE).read_bytes())
    h.update(str((f / VECTOR_FILE).stat().st_size).encode())
    return h.hexdigest()[:16]


@dataclass
class Adapter:
    name: str  # the setting's adapter name (what the engine is asked for)
    path: Path  # its PEFT folder
    rank: int  # the adapter's LoRA rank (the engine's max_lora_rank must be at least this)
    dropped_fraction: float  # of the setting's norm, in tensors no LoRA expresses
    built: bool  # built by this call (False: found in the cache)
    build_s: float


class AdapterStore:
    """Knob settings -> adapter folders, built on demand under `root` and kept there (one folder per setting and
    vector content), with each vector's factors at `cfg.rank` computed once per process.

    `vectors`: name -> vector folder; `bounds`: the allowed λ range (as for the HF knobs); `base`: the base model's
    folder, recorded in the adapters."""

    def __init__(self, vectors: dict[str, str], cfg: AdapterCfg, root: str | Path, base: str = "",
                 bounds: tuple[float, float] | None = None):
        problems = cfg.validate()
        if problems:
            raise VectorError("alignment adapters: " + "; ".join(problems))
        self.paths, self.cfg, self.root, self.base, self.bounds = dict(vectors), cfg, Path(root), base, bounds
        self.ids = {n: vector_id(p) for n, p in self.paths.items()}
        self._factors: dict[str, Factors] = {}
        self._adapters: dict[tuple, Adapter] = {}

    @property
    def names(self) -> list[str]:
        return sorted(self.paths)

    def key(self, knobs: dict | None) -> tuple:
        """The validated, quantized setting of a request's `alignment` object (KnobError: unknown names, not finite
        numbers, out of bounds)."""
        return quantize(normalize_knobs(knobs, self.names, self.bounds), self.cfg.step)

    def key_of_name(self, name: str) -> tuple:
        """The setting an adapter name stands for, validated and quantized like a request's."""
        return self.key(dict(parse_name(name)))

    def factors(self, name: str) -> Factors:
        if name not in self._factors:
            self._factors[name] = factor(AlignmentVector(self.paths[name]), self.cfg.rank)
        return self._factors[name]

    def _folder(self, key: tuple) -> Path:
        ident = json.dumps({"vectors": {n: self.ids[n] for n, _ in key}, "key": key, "rank": self.cfg.rank})
        return self.root / hashlib.sha256(ident.encode()).hexdigest()[:16]

    def adapter(self, key: tuple) -> Adapter:
        """The adapter of a quantized setting: from the cache, or built now (once per machine). The all-zero setting
        is an adapter of zeros (the base model exactly), for engines that must run every request on an adapter."""
        if key in self._adapters:
            return self._adapters[key]
        from filelock import FileLock

        t0 = time.perf_counter()
        out = self._folder(key)
        built = False
        out.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(out) + ".lock", timeout=600):
            if not key and not (out / ADAPTER_INFO).exists():
                modules = {m: (torch.zeros(shape[0], 1), torch.zeros(1, shape[1])) for m, shape in self._shapes().items()}
                write_adapter(out, modules, 1, self.base, {"setting": {}, "name": adapter_name(key), "vectors": {},
                                                           "dropped_fraction": 0.0, "dropped_tensors": []})
                built = True
            if not (out / ADAPTER_INFO).exists():
                terms = [(self.factors(n), lam) for n, lam in key]
                dropped2 = sum(lam ** 2 * v ** 2 for f, lam in terms for v in f.dropped.values())
                total2 = sum(lam ** 2 * f.norm ** 2 for f, lam in terms)
                frac = math.sqrt(dropped2 / total2) if total2 else 0.0
                if frac and self.cfg.unsupported == "refuse":
                    names = sorted({t for f, _ in terms for t in f.dropped})
                    raise VectorError(f"alignment setting {adapter_name(key)}: {frac:.2%} of its norm is in tensors a "
                                      f"LoRA adapter cannot express ({', '.join(names[:4])}"
                                      f"{' ...' if len(names) > 4 else ''}); set unsupported=drop to serve the rest")
                modules, r = combine(terms)
                tmp = out.with_name(out.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                write_adapter(tmp, modules, r, self.base, {
                    "setting": dict(key), "name": adapter_name(key), "rank_per_domain": self.cfg.rank,
                    "vectors": {n: self.ids[n] for n, _ in key}, "dropped_fraction": frac,
                    "dropped_tensors": sorted({t for f, _ in terms for t in f.dropped})})
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
                built = True
                if frac:
                    print(f"[knobs] WARNING: adapter {adapter_name(key)} leaves out {frac:.2%} of the setting's norm "
                          f"(tensors a LoRA cannot express, e.g. embeddings and norms); "
                          "unsupported=refuse refuses such settings", flush=True)
        rank = json.loads((out / ADAPTER_CONFIG).read_text())["r"]
        a = Adapter(adapter_name(key), out, rank, json.loads((out / ADAPTER_INFO).read_text())["dropped_fraction"], built,
                    time.perf_counter() - t0)
        self._adapters[key] = a
        return a

    def _shapes(self) -> dict[str, list[int]]:
        """Every adapted module of the vectors and its weight's shape (from their metadata)."""
        out = {}
        for path in self.paths.values():
            for name, e in json.loads((Path(path) / META_FILE).read_text())["tensors"].items():
                m = _LINEAR.match(name)
                if m is not None and len(e["shape"]) == 2:
                    out[m["module"]] = e["shape"]
        return out


# ---- what the engine must allow ------------------------------------------------------------------------------------
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values


def rank_bound(vectors: dict[str, str], rank: int | None) -> int:
    """The largest adapter rank a setting of all `vectors` can have at `rank` per vector, from their metadata alone
    (no tensor is read): per vector, its largest module rank (the stored rank of low-rank tensors, the smaller side
    of dense ones, capped by `rank`), summed over the vectors."""
    total = 0
    for path in vectors.values():
        meta = json.loads((Path(path) / META_FILE).read_text())
        per = 0
        for name, e in meta["tensors"].items():
            if _LINEAR.match(name) is None or len(e["shape"]) != 2:
                continue
            r = e["rank"] if e["kind"] == "low_rank" else min(e["shape"])
            per = max(per, r if rank is None else min(r, rank))
        total += per
    return total


def engine_lora_kwargs(vectors: dict[str, str], rank: int | None, max_loras: int, max_cpu_loras: int) -> dict:
    """vLLM engine arguments for serving these vectors' settings as adapters (VectorError if vLLM cannot: a setting
    of every vector would pass vLLM's largest rank)."""
    need = rank_bound(vectors, rank)
    allowed = [r for r in VLLM_RANKS if r >= need]
    if not allowed:
        raise VectorError(f"alignment adapters of {len(vectors)} vector(s) at rank {rank or 'full'} reach rank {need}, "
                          f"past vLLM's largest ({VLLM_RANKS[-1]}): set adapters.rank (a truncated SVD per vector; "
                          "docs/vectors.md measures what it costs the vectors' effect)")
    return {"enable_lora": True, "max_lora_rank": allowed[0], "max_loras": max_loras,
            "max_cpu_loras": max(max_cpu_loras, max_loras)}
