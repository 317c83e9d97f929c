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
    from pipeline.models import resolve_model_path

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
