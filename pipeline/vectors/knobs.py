"""Alignment-vector knobs at inference: θ = θ_base + Σ λ_d · AV_d merged exactly in float32, with an LRU of merged
variants so that switching knob settings is a pointer swap."""
from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .extract import FORMAT, META_FILE, VECTOR_FILE, KnobError, VectorError, _few, checkpoint_hash

def normalize_knobs(knobs: dict | None, names: list[str], bounds: tuple[float, float] | None = None) -> tuple:
    """A request's `alignment` object validated (known names, finite numbers within `bounds`) in canonical form:
    sorted (name, λ) pairs with λ != 0 (KnobError otherwise, naming what is wrong)."""
    knobs = knobs or {}
    if not isinstance(knobs, dict):
        raise KnobError("alignment must be an object mapping vector names to numbers")
    out = []
    for name, lam in knobs.items():
        if name not in names:
            raise KnobError(f"unknown alignment vector {name!r}; available: {sorted(names) or 'none'}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
            raise KnobError(f"alignment[{name!r}] must be a finite number, got {lam!r}")
        if bounds is not None and not bounds[0] <= lam <= bounds[1]:
            raise KnobError(f"alignment[{name!r}] = {lam} is outside the allowed range [{bounds[0]}, {bounds[1]}]")
        if lam != 0:
            out.append((name, float(lam)))
    return tuple(sorted(out))


class AlignmentVector:
    """A vector on disk (dense tensors and low-rank factors), loaded onto a device."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        p = Path(path)
        folder = p.parent if p.name in (META_FILE, VECTOR_FILE) else p
        if not (folder / META_FILE).exists() or not (folder / VECTOR_FILE).exists():
            raise VectorError(f"{path}: not an alignment vector folder (needs {META_FILE} and {VECTOR_FILE}; "
                              "write one with python -m jobs.extract_vector)")
        self.path = folder
        self.meta = json.loads((folder / META_FILE).read_text())
        if self.meta.get("format") != FORMAT:
            raise VectorError(f"{folder / META_FILE}: not a {FORMAT} file")
        from safetensors.torch import load_file

        raw = load_file(str(folder / VECTOR_FILE), device=str(device))
        self.parts: dict[str, tuple] = {}
        for name, e in self.meta["tensors"].items():
            self.parts[name] = (raw[name],) if e["kind"] == "dense" else (raw[name + ":A"], raw[name + ":B"])

    @property
    def domain(self) -> str:
        return self.meta["domain"]

    @property
    def names(self) -> list[str]:
        return list(self.meta["tensors"])

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (reconstructed) dense delta of one tensor."""
        p = self.parts[name]
        return p[0].to(dtype) if len(p) == 1 else p[0].to(dtype) @ p[1].to(dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.parts.values() for t in p)


# ---- applying vectors ---------------------------------------------------------------------------------------
@dataclass
class SwitchInfo:
    knobs: dict  # the normalized setting (zeros dropped)
    cache: str  # "base" (no vector applied: the loaded weights), "hit" (a cached variant), "miss" (merged now)
    switch_ms: float

    def as_dict(self) -> dict:
        return {"knobs": self.knobs, "cache": self.cache, "switch_ms": round(self.switch_ms, 3)}


class KnobbedModel:
    """One loaded model + alignment vectors: `apply({name: λ})` sets its weights to θ_base + Σ λ·AV.

    `model` is the torch module (e.g. `LoadedModel.model`); every other holder of the module (a Refiner, the
    Jacobi engine) sees the switch, since parameters are swapped in place. `base_source` is the folder the
    model was loaded from: with `check_base` each vector's recorded base hash must match it.
    """

    def __init__(self, model: torch.nn.Module, vectors: dict, cache_size: int = 2,
                 bounds: tuple[float, float] | None = None, base_source: str | None = None, check_base: bool = True):
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        prev = model.__dict__.get("_diffpo_knobbed")
        if prev is not None:  # a model already under knobs: take the base weights back before capturing them
            prev.apply({})
        self.model, self.cache_size, self.bounds = model, cache_size, bounds
        dev = next(model.parameters()).device
        self.vectors: dict[str, AlignmentVector] = {}
        for name, v in vectors.items():
            self.vectors[name] = v if isinstance(v, AlignmentVector) else AlignmentVector(v, device=dev)
        params = dict(model.named_parameters(remove_duplicate=False))
        self.params: dict[str, torch.nn.Parameter] = {}
        problems = []
        for vname, v in self.vectors.items():
            missing = [n for n in v.names if n not in params]
            if missing:
                problems.append(f"vector {vname!r} has tensors the model lacks: {_few(missing, 4)}")
            for n in v.names:
                if n in params and list(params[n].shape) != v.meta["tensors"][n]["shape"]:
                    problems.append(f"vector {vname!r}: {n} has shape {v.meta['tensors'][n]['shape']}, "
                                    f"the model's is {list(params[n].shape)}")
            if check_base and base_source is not None:
                have, want = checkpoint_hash(base_source), v.meta["base"]["hash"]
                if have != want:
                    problems.append(f"vector {vname!r} was extracted from base {v.meta['base']['path']} ({want[:19]}…), "
                                    f"but the loaded model {base_source} is different ({have[:19]}…)")
        if problems:
            raise VectorError("cannot apply alignment vectors:\n  - " + "\n  - ".join(problems))
        seen: dict[int, str] = {}
        for n in sorted({n for v in self.vectors.values() for n in v.names}):
            p = params[n]
            if id(p) in seen:  # tied weights: one parameter, two names; apply once
                continue
            seen[id(p)] = n
            self.params[n] = p
        self.base = {n: p.data for n, p in self.params.items()}  # the loaded weights: no copy
        self.cache: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self.current: tuple = ()
        self.hits = self.misses = 0
        self.lock = threading.RLock()
        model.__dict__["_diffpo_knobbed"] = self

    # ---- settings --------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.vectors)

    def normalize(self, knobs: dict | None) -> tuple:
        """Validated, canonical form of a setting: sorted (name, λ) pairs with λ != 0."""
        return normalize_knobs(knobs, self.names, self.bounds)

    # ---- merging and switching ---------------------------------------------------------------------------
    @torch.no_grad()
    def merged(self, key: tuple) -> dict[str, torch.Tensor]:
        """θ_base + Σ λ·AV for every touched parameter (float32 arithmetic, cast to the parameter dtype)."""
        out = {}
        for n, base in self.base.items():
            terms = [(self.vectors[v], lam) for v, lam in key if n in self.vectors[v].parts]
            if not terms:
                out[n] = base
                continue
            acc = base.to(torch.float32, copy=True)  # = base + AV_1·λ_1 + ..., two roundings per term, in place
            tmp = torch.empty_like(acc)  # (no temporaries per term: they would fragment the heap)
            for vec, lam in terms:
                torch.mul(vec.delta(n), lam, out=tmp)
                acc.add_(tmp)
            out[n] = acc.to(base.dtype)
        return out

    def _point(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.data = tensors[n]

    def apply(self, knobs: dict | tuple | None) -> SwitchInfo:
        """Switch the model to a setting; returns whether it came from the cache."""
        key = knobs if isinstance(knobs, tuple) else self.normalize(knobs)
        t0 = time.perf_counter()
        with self.lock:
            if not key:
                self._point(self.base)
                kind = "base"
            elif key in self.cache:
                self.cache.move_to_end(key)
                if key != self.current:
                    self._point(self.cache[key])
                self.hits += 1
                kind = "hit"
            else:
                self._evict(room_for=1)
                tensors = self.merged(key)
                self.cache[key] = tensors
                self._point(tensors)
                self.misses += 1
                kind = "miss"
            self.current = key
            self._evict(room_for=0)
        return SwitchInfo(dict(key), kind, (time.perf_counter() - t0) * 1000)

    def _evict(self, room_for: int) -> None:
        while len(self.cache) + room_for > self.cache_size:
            victim = next((k for k in self.cache if k != self.current), None)
            if victim is None:  # only the variant in use is left: it stays while it is used
                return
            del self.cache[victim]

    @contextmanager
    def use(self, knobs):
        """Hold the model on a setting for the duration of a block (thread-safe)."""
        with self.lock:
            yield self.apply(knobs)

    def variant_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.base.values())

    def stats(self) -> dict:
        return {"vectors": self.names, "cache_size": self.cache_size, "cached": len(self.cache), "hits": self.hits,
                "misses": self.misses, "variant_mb": round(self.variant_bytes() / 1e6, 1),
                "vector_mb": round(sum(v.nbytes() for v in self.vectors.values()) / 1e6, 1)}


def load_knobbed(lm, vectors: dict[str, str], cache_size: int = 2, bounds=None, check_base: bool = True):
    """A KnobbedModel over a `LoadedModel` (its source folder is the base the vectors must come from)."""
    src = lm.source if Path(lm.source).is_dir() else None
    return KnobbedModel(lm.model, vectors, cache_size=cache_size, bounds=bounds, base_source=src,
                        check_base=check_base)
