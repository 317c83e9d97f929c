"""Alignment vectors: AV_d = θ_aligned_d − θ_base, applied at inference as θ = θ_base + Σ_d λ_d · AV_d.

Extraction (`extract_vector`) reads two Hugging Face checkpoint folders of the same architecture tensor by
tensor through `safetensors.safe_open` (memory-mapped) and writes each difference straight to disk with a
small streaming safetensors writer (float64 arithmetic in 32 MB chunks), so the memory it adds stays at about
three copies of the largest tensor, not three models. Before reading
any data it checks architecture, tensor names, shapes, dtypes and the tokenizer and names what differs.
Output folder::

    vector.safetensors   one tensor per changed parameter (dense), or two factors "<name>:A" (m×r, singular
                         values folded in) and "<name>:B" (r×n) when low-rank compression is on
    vector.json          base identity (path + content hash), domain, tensors (shape, kind, rank, relative
                         reconstruction error), unchanged tensors, tied weights, compression totals

Application (`KnobbedModel`): holds one loaded model, keeps the base weights it was loaded with, and points
each touched parameter at a merged tensor θ_base + Σ λ·AV computed in float32 (then cast to the parameter's
dtype), in the vectors' name order: ``merged = base.float(); merged = merged + AV_i.float() * λ_i; ...``.
Switching never reloads anything from disk.

Memory design. Merged variants are cached as *full merged tensors* of the touched parameters (LRU, size
`cache_size`), and switching is a pointer swap (`param.data = tensor`), so a repeated knob setting costs
microseconds per tensor and no arithmetic. Caching deltas instead would save nothing (a combined delta is as
big as the merged tensor) and still cost an add per switch. The price: each cached variant holds one model's
worth of the touched parameters (135 M fp32 parameters = 540 MB). The base weights are the tensors the model
was loaded with (no copy); a variant being used is always kept even with `cache_size=0` (then every
switch recomputes). Total ≈ base + vectors (dense: one model each; low-rank: less) + max(1, cache_size)
variants. The all-zero setting is the base itself and never cached.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

VECTOR_FILE = "vector.safetensors"
META_FILE = "vector.json"
FORMAT = "diffpo-alignment-vector"
VERSION = 1

_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_NAMED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64}


class VectorError(ValueError):
    """A vector cannot be extracted or applied; the message says what differs."""


class KnobError(ValueError):
    """A knob setting names an unknown vector or a λ outside the configured bounds."""


# ---- reading checkpoints -----------------------------------------------------------------------------------
def checkpoint_dir(spec: str) -> Path:
    """A local Hugging Face folder with safetensors weights (`default` = the embedded default model)."""
    from .models import resolve_model_path

    path, gguf = resolve_model_path(spec)
    p = Path(path)
    if gguf or not p.is_dir():
        raise VectorError(f"{spec!r}: alignment vectors need a local Hugging Face folder with .safetensors "
                          "weights (save the model with save_pretrained first)")
    return p


def weight_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, for single-file and sharded (index.json) checkpoints."""
    folder = Path(folder)
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        return {k: folder / v for k, v in sorted(wm.items())}
    single = folder / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {k: single for k in sorted(f.keys())}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise VectorError(f"{folder}: no .safetensors weights (pytorch_model.bin checkpoints are not supported; "
                          "re-save with save_pretrained(safe_serialization=True))")
    from safetensors import safe_open

    out = {}
    for fp in files:
        with safe_open(str(fp), "pt") as f:
            out.update({k: fp for k in f.keys()})
    return dict(sorted(out.items()))


class _Reader:
    """Lazy access to every tensor of a checkpoint; one safe_open handle per shard file."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.index = weight_index(folder)
        self._handles = {fp: safe_open(str(fp), "pt") for fp in set(self.index.values())}

    def meta(self, name: str) -> tuple[list[int], str]:
        sl = self._handles[self.index[name]].get_slice(name)
        return list(sl.get_shape()), sl.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self.index[name]].get_tensor(name)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _hash_update(h, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}|{str(t.dtype)}|{list(t.shape)}|".encode())
    h.update(_tensor_bytes(t))


_HASH_CACHE: dict[tuple, str] = {}


def checkpoint_hash(folder: str | Path) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order (independent of sharding and
    file metadata). Cached per (folder, file sizes, mtimes) within a process."""
    folder = checkpoint_dir(str(folder)) if not Path(folder).is_dir() else Path(folder)
    index = weight_index(folder)
    files = sorted(set(index.values()))
    key = (str(folder.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _HASH_CACHE:
        r, h = _Reader(folder), hashlib.sha256()
        for name in index:
            _hash_update(h, name, r.get(name))
        _HASH_CACHE[key] = "sha256:" + h.hexdigest()
    return _HASH_CACHE[key]


# ---- checks ---------------------------------------------------------------------------------------------
def _config(folder: Path) -> dict:
    p = folder / "config.json"
    if not p.exists():
        raise VectorError(f"{folder}: no config.json (not a Hugging Face model folder)")
    return json.loads(p.read_text())


def _tokenizer_signature(folder: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return {"vocab": tok.get_vocab(), "special": {k: str(v) for k, v in tok.special_tokens_map.items()},
            "chat_template": getattr(tok, "chat_template", None)}


def _few(xs, n: int = 5) -> str:
    xs = sorted(xs)
    return ", ".join(xs[:n]) + (f" ... (+{len(xs) - n} more)" if len(xs) > n else "")


def compare_checkpoints(base: Path, aligned: Path) -> tuple[list[str], list[str], dict]:
    """Raise VectorError naming what differs; return (tensor names, warnings, base config)."""
    cb, ca = _config(base), _config(aligned)
    arch_b = (cb.get("model_type"), tuple(cb.get("architectures") or ()))
    arch_a = (ca.get("model_type"), tuple(ca.get("architectures") or ()))
    if arch_b != arch_a:
        raise VectorError(f"architecture differs: base is {'/'.join(arch_b[1]) or '?'} (model_type "
                          f"{arch_b[0]!r}), aligned is {'/'.join(arch_a[1]) or '?'} (model_type {arch_a[0]!r})")
    problems = []
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "n_embd", "n_layer", "n_head", "tie_word_embeddings"):
        if cb.get(k) != ca.get(k):
            problems.append(f"config {k}: base {cb.get(k)!r} vs aligned {ca.get(k)!r}")
    rb, ra = _Reader(base), _Reader(aligned)
    nb, na = set(rb.index), set(ra.index)
    if cb.get("tie_word_embeddings"):  # a tied head may be saved by one side only: it is the embedding anyway
        for tied in ("lm_head.weight",):
            if (tied in nb) != (tied in na):
                nb.discard(tied)
                na.discard(tied)
    if nb != na:
        if nb - na:
            problems.append(f"tensor names only in base: {_few(nb - na)}")
        if na - nb:
            problems.append(f"tensor names only in aligned: {_few(na - nb)}")
    shapes, dtypes = [], []
    for name in sorted(nb & na):
        (sb, db), (sa, da) = rb.meta(name), ra.meta(name)
        if sb != sa:
            shapes.append(f"{name} {sb} vs {sa}")
        if db != da:
            dtypes.append(f"{name} {db} vs {da}")
    if shapes:
        problems.append(f"shapes differ (base vs aligned): {_few(shapes, 4)}")
    if dtypes:
        problems.append(f"dtypes differ (base vs aligned): {_few(dtypes, 4)}")
    warnings = []
    if not problems:
        tb, ta = _tokenizer_signature(base), _tokenizer_signature(aligned)
        if tb["vocab"] != ta["vocab"]:
            vb, va = tb["vocab"], ta["vocab"]
            only_b, only_a = set(vb) - set(va), set(va) - set(vb)
            moved = [t for t in set(vb) & set(va) if vb[t] != va[t]]
            problems.append("tokenizer vocabulary differs: " + "; ".join(
                x for x in [f"{len(only_b)} tokens only in base ({_few(map(repr, only_b), 3)})" if only_b else "",
                            f"{len(only_a)} tokens only in aligned ({_few(map(repr, only_a), 3)})" if only_a else "",
                            f"{len(moved)} tokens with other ids" if moved else ""] if x))
        if tb["special"] != ta["special"]:
            problems.append(f"tokenizer special tokens differ: base {tb['special']} vs aligned {ta['special']}")
        if tb["chat_template"] != ta["chat_template"]:
            warnings.append("chat templates differ; the base's template is used when the vector is applied")
    if problems:
        raise VectorError(f"{aligned} cannot be expressed as a vector over {base}:\n  - " + "\n  - ".join(problems))
    return sorted(nb & na), warnings, cb


# ---- a streaming safetensors writer --------------------------------------------------------------------------
class _StreamWriter:
    """Writes tensors one at a time to a data file; `close` prepends the safetensors header."""

    def __init__(self, path: Path):
        self.path, self.tmp = Path(path), Path(str(path) + ".data")
        self.f = open(self.tmp, "wb")
        self.header: dict = {}
        self.offset = 0

    def add(self, name: str, t: torch.Tensor) -> int:
        if t.dtype not in _ST_DTYPES:
            raise VectorError(f"cannot store dtype {t.dtype} of {name}")
        data = _tensor_bytes(t)
        self.f.write(data)
        n = len(data)
        self.header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + n]}
        self.offset += n
        return n

    def close(self, metadata: dict[str, str]) -> None:
        self.f.close()
        head = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        part = Path(str(self.path) + ".part")
        with open(part, "wb") as out, open(self.tmp, "rb") as src:
            out.write(struct.pack("<Q", len(head)))
            out.write(head)
            shutil.copyfileobj(src, out, 16 << 20)
        self.tmp.unlink()
        os.replace(part, self.path)


# ---- extraction -------------------------------------------------------------------------------------------
@dataclass
class Compression:
    """Truncated SVD of each 2-D delta: keep `rank` singular values, or the fewest that keep `energy` of the
    squared Frobenius norm. None/None = dense. Matrices smaller than `min_dim` on a side, names matching any
    `exclude` regex, and matrices where the factors would not be smaller are stored dense."""
    rank: int | None = None
    energy: float | None = None
    min_dim: int = 16
    exclude: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.rank is not None or self.energy is not None

    def validate(self) -> None:
        if self.rank is not None and self.energy is not None:
            raise ValueError("compression: give rank or energy, not both")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"compression.rank must be >= 1, got {self.rank}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"compression.energy must be in (0, 1], got {self.energy}")


def _low_rank(d: torch.Tensor, c: Compression) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    m, n = d.shape
    U, S, Vh = torch.linalg.svd(d.float(), full_matrices=False)
    if c.rank is not None:
        r = min(c.rank, len(S))
    else:
        e = torch.cumsum(S.double() ** 2, 0)
        total = float(e[-1])
        r = len(S) if total == 0 else int(torch.searchsorted(e, c.energy * total * (1 - 1e-12)).item()) + 1
        r = min(max(r, 1), len(S))
    if r * (m + n) >= m * n:
        return None
    return (U[:, :r] * S[:r]).contiguous(), Vh[:r].contiguous(), r


_CHUNK = 1 << 22  # elements per step of the float64 arithmetic below (32 MB), so big tensors add little memory


def _delta(a: torch.Tensor, b: torch.Tensor, vdt: torch.dtype) -> tuple[torch.Tensor, float, float]:
    """(a - b) stored in `vdt`, computed exactly in float64 chunk by chunk; returns it, the exact delta's
    norm and the norm of the storage rounding error."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    out = torch.empty(fa.numel(), dtype=vdt)
    n2 = e2 = 0.0
    for i in range(0, fa.numel(), _CHUNK):
        d = fa[i:i + _CHUNK].double() - fb[i:i + _CHUNK].double()
        s = d.to(vdt)
        out[i:i + _CHUNK] = s
        n2 += float(d.square().sum())
        e2 += float((s.double() - d).square().sum())
    return out.view(a.shape), n2 ** 0.5, e2 ** 0.5


def _low_rank_error(A: torch.Tensor, B: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """||A @ B - (a - b)|| in float64, a block of rows at a time."""
    Bd = B.double()
    rows = max(1, _CHUNK // max(1, a.shape[1]))
    e2 = 0.0
    for i in range(0, a.shape[0], rows):
        d = a[i:i + rows].double() - b[i:i + rows].double()
        e2 += float((A[i:i + rows].double() @ Bd - d).square().sum())
    return e2 ** 0.5


def extract_vector(base: str, aligned: str, out: str | Path, domain: str, compression: Compression | None = None,
                   dtype: str = "float32", skip_unchanged: bool = True, log=print) -> dict:
    """Write `out/vector.safetensors` + `out/vector.json` for AV = aligned − base; returns the metadata."""
    t0 = time.perf_counter()
    comp = compression or Compression()
    comp.validate()
    if dtype not in _NAMED_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_NAMED_DTYPES)}, got {dtype!r}")
    vdt = _NAMED_DTYPES[dtype]
    bdir, adir = checkpoint_dir(base), checkpoint_dir(aligned)
    names, warnings, cfg = compare_checkpoints(bdir, adir)
    rb, ra = _Reader(bdir), _Reader(adir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    excl = [re.compile(p) for p in comp.exclude]
    tied = {}
    if cfg.get("tie_word_embeddings"):
        emb = next((n for n in names if n.endswith(("embed_tokens.weight", "wte.weight"))), None)
        tied = {"lm_head.weight": emb} if emb else {}
    hb, ha = hashlib.sha256(), hashlib.sha256()
    writer = _StreamWriter(out / VECTOR_FILE)
    tensors, unchanged, skipped = {}, [], []
    dense_bytes = stored_bytes = 0
    err2 = norm2 = 0.0
    n_params = 0
    try:
        for name in names:
            b, a = rb.get(name), ra.get(name)
            _hash_update(hb, name, b)
            _hash_update(ha, name, a)
            n_params += b.numel()
            if name in tied and tied[name] in names:  # saved on both sides: the same parameter in the model
                skipped.append(name)
                continue
            if not b.is_floating_point():
                if not torch.equal(a, b):
                    raise VectorError(f"non-float tensor {name} ({b.dtype}) differs between base and aligned; "
                                      "it cannot be scaled by λ")
                skipped.append(name)
                continue
            if skip_unchanged and torch.equal(a, b):
                unchanged.append(name)
                continue
            stored, nrm, err = _delta(a, b, vdt)
            entry = {"shape": list(stored.shape), "dtype": dtype, "norm": nrm}
            dense_bytes += stored.numel() * vdt.itemsize
            lr = None
            if (comp.enabled and stored.ndim == 2 and min(stored.shape) >= comp.min_dim and nrm > 0
                    and not any(p.search(name) for p in excl)):
                lr = _low_rank(stored, comp)
            if lr is None:
                stored_bytes += writer.add(name, stored)
                entry.update(kind="dense", rel_error=err / nrm if nrm else 0.0)
            else:
                del stored
                A, B, r = lr[0].to(vdt), lr[1].to(vdt), lr[2]
                stored_bytes += writer.add(name + ":A", A) + writer.add(name + ":B", B)
                entry.update(kind="low_rank", rank=r, rel_error=_low_rank_error(A, B, a, b) / nrm)
            del a, b
            err2 += (entry["rel_error"] * nrm) ** 2
            norm2 += nrm ** 2
            tensors[name] = entry
    except BaseException:
        writer.f.close()
        writer.tmp.unlink(missing_ok=True)
        raise
    if tied and tied["lm_head.weight"] in tensors:
        warnings.append(f"tied input/output embeddings ({tied['lm_head.weight']} = lm_head.weight): the embedding "
                        "delta also moves the output head")
    meta = {
        "format": FORMAT, "version": VERSION, "domain": domain,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "base": {"path": str(bdir.resolve()), "hash": "sha256:" + hb.hexdigest(),
                 "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures"),
                 "num_parameters": n_params},
        "aligned": {"path": str(adir.resolve()), "hash": "sha256:" + ha.hexdigest()},
        "dtype": dtype,
        "tensors": tensors, "unchanged": unchanged, "skipped": skipped, "tied": tied, "warnings": warnings,
        "compression": {"rank": comp.rank, "energy": comp.energy, "min_dim": comp.min_dim, "exclude": comp.exclude,
                        "low_rank_tensors": sum(1 for e in tensors.values() if e["kind"] == "low_rank"),
                        "rel_error_total": math.sqrt(err2 / norm2) if norm2 else 0.0,
                        "max_rel_error": max((e["rel_error"] for e in tensors.values()), default=0.0),
                        "dense_bytes": dense_bytes, "stored_bytes": stored_bytes},
        "extract_s": 0.0,
    }
    writer.close({"format": FORMAT, "domain": domain, "base_hash": meta["base"]["hash"]})
    meta["extract_s"] = round(time.perf_counter() - t0, 3)
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    log(f"[vectors] {domain}: {len(tensors)} tensors changed, {len(unchanged)} unchanged, "
        f"{stored_bytes / 1e6:.1f} MB stored ({dense_bytes / 1e6:.1f} MB dense), total relative error "
        f"{meta['compression']['rel_error_total']:.3g} -> {out}")
    return meta


# ---- loading vectors ----------------------------------------------------------------------------------------
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
        knobs = knobs or {}
        if not isinstance(knobs, dict):
            raise KnobError("alignment must be an object mapping vector names to numbers")
        out = []
        for name, lam in knobs.items():
            if name not in self.vectors:
                raise KnobError(f"unknown alignment vector {name!r}; available: {self.names or 'none'}")
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
                raise KnobError(f"alignment[{name!r}] must be a finite number, got {lam!r}")
            if self.bounds is not None and not self.bounds[0] <= lam <= self.bounds[1]:
                raise KnobError(f"alignment[{name!r}] = {lam} is outside the allowed range "
                                f"[{self.bounds[0]}, {self.bounds[1]}]")
            if lam != 0:
                out.append((name, float(lam)))
        return tuple(sorted(out))

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
