"""Switching alignment-knob settings vs loading a second full model from disk: time and peak memory.

    .venv/bin/python benchmarks/bench_vectors.py [vectors=outputs/demo_vectors/vectors] [repeats=5] [threads=2]

The base is the embedded default (SmolLM2-135M-Instruct, fp32). Vectors: `concise` and `detailed` from
benchmarks/demo_vectors.py when they exist, else two synthetic ones (the base plus seeded noise, extracted the
same way) under outputs/bench_vectors/. Measured in one process, one after the other:

  load    load_model(<base folder>) a second time (files in the page cache: the best case for loading)
  miss    KnobbedModel with cache_size=0: every switch to a new setting merges θ_base + Σ λ·AV
  hit     KnobbedModel with cache_size=4: switching between settings already cached (pointer swaps)

Time: median over `repeats`. Memory: the peak private (anonymous) resident memory above its level just before
the operation, sampled every millisecond from /proc/self/status by a thread, and what stays allocated after.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """The process's private (anonymous) resident memory in bytes. File-backed pages (a memory-mapped
    checkpoint being read) are page cache that the kernel can drop, and are left out."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    with open("/proc/self/statm") as f:  # no RssAnon: resident minus shared
        x = f.read().split()
        return (int(x[1]) - int(x[2])) * PAGE


class Peak:
    """Peak private memory above the level at entry (sampled every millisecond) and what is kept after."""

    def __enter__(self):
        self.start = rss()
        self.peak = self.start
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss())
        self.extra_mb = (self.peak - self.start) / 1e6
        self.kept_mb = (rss() - self.start) / 1e6


def synthetic_vectors(out: Path) -> dict[str, Path]:
    """Two vectors from the base plus seeded noise (when the demo's real ones are absent)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.vectors import checkpoint_dir, extract_vector

    base = checkpoint_dir("default")
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        v = out / "vectors" / name
        if not (v / "vector.json").exists():
            m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for _, p in m.named_parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 1e-3)
            mdir = out / "models" / name
            m.save_pretrained(mdir)
            AutoTokenizer.from_pretrained(base).save_pretrained(mdir)
            del m
            extract_vector(str(base), str(mdir), v, name)
        paths[name] = v
    return paths


def main() -> None:
    import torch

    from pipeline.models import load_model
    from pipeline.vectors import KnobbedModel, checkpoint_dir, checkpoint_hash

    kv = dict(a.split("=", 1) for a in sys.argv[1:])
    torch.set_num_threads(int(kv.get("threads", 2)))
    repeats = int(kv.get("repeats", 5))
    vdir = Path(kv.get("vectors", ROOT / "outputs/demo_vectors/vectors"))
    if (vdir / "concise" / "vector.json").exists() and (vdir / "detailed" / "vector.json").exists():
        vectors, kind = {"concise": vdir / "concise", "detailed": vdir / "detailed"}, "demo (concise, detailed)"
    else:
        vectors, kind = synthetic_vectors(ROOT / "outputs/bench_vectors"), "synthetic"
    a, b = sorted(vectors)
    base_dir = checkpoint_dir("default")
    lm = load_model(str(base_dir))
    checkpoint_hash(base_dir)  # computed once per process (and cached), not part of a switch
    print(f"[bench] base loaded, RSS {rss() / 1e6:.0f} MB; vectors: {kind}", flush=True)

    # a second full model from disk
    load_s, load_mem = [], []
    for _ in range(repeats):
        with Peak() as pk:
            t0 = time.perf_counter()
            second = load_model(str(base_dir))
            load_s.append(time.perf_counter() - t0)
        load_mem.append((pk.extra_mb, pk.kept_mb))
        del second

    # uncached switches: every setting new (cache_size=0)
    with Peak() as setup:
        t0 = time.perf_counter()
        km = KnobbedModel(lm.model, vectors, cache_size=0, base_source=str(base_dir))
        setup_s = time.perf_counter() - t0
    settings = [{a: 0.25 * (i + 1), b: 0.5} for i in range(repeats + 1)]
    miss_s, miss_mem = [], []
    km.apply(settings[0])
    for s in settings[1:]:
        with Peak() as pk:
            info = km.apply(s)
        assert info.cache == "miss"
        miss_s.append(info.switch_ms / 1000)
        miss_mem.append((pk.extra_mb, pk.kept_mb))
    km.apply({})

    # cached switches: two settings alternating in a cache of 4
    km = KnobbedModel(lm.model, vectors, cache_size=4, base_source=str(base_dir))
    s1, s2 = {a: 1.0}, {a: 0.5, b: 1.0}
    km.apply(s1)
    km.apply(s2)
    hit_s, hit_mem = [], []
    for i in range(repeats * 2):
        with Peak() as pk:
            info = km.apply(s1 if i % 2 == 0 else s2)
        assert info.cache == "hit"
        hit_s.append(info.switch_ms / 1000)
        hit_mem.append((pk.extra_mb, pk.kept_mb))
    stats = km.stats()
    km.apply({})

    med = statistics.median
    res = {
        "vectors": kind, "repeats": repeats, "threads": torch.get_num_threads(),
        "load_s": med(load_s), "miss_s": med(miss_s), "hit_s": med(hit_s), "setup_s": setup_s,
        "load_peak_mb": med(m[0] for m in load_mem), "load_kept_mb": med(m[1] for m in load_mem),
        "miss_peak_mb": med(m[0] for m in miss_mem), "miss_kept_mb": med(m[1] for m in miss_mem),
        "hit_peak_mb": med(m[0] for m in hit_mem), "hit_kept_mb": med(m[1] for m in hit_mem),
        "setup_peak_mb": setup.extra_mb, "setup_kept_mb": setup.kept_mb, "cache_stats": stats,
    }
    out = ROOT / "outputs" / "bench_vectors"
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"figure: load a second model from disk s = {res['load_s']:.3f} (peak +{res['load_peak_mb']:.0f} MB, "
          f"keeps +{res['load_kept_mb']:.0f} MB)")
    print(f"figure: knob switch, uncached (merge) s = {res['miss_s']:.3f} (peak +{res['miss_peak_mb']:.0f} MB, "
          f"keeps +{res['miss_kept_mb']:.0f} MB per variant)")
    print(f"figure: knob switch, cached s = {res['hit_s'] * 1000:.3f} ms (peak +{res['hit_peak_mb']:.1f} MB)")
    print(f"figure: load / uncached switch time = {res['load_s'] / res['miss_s']:.1f}x")
    print(f"figure: load / cached switch time = {res['load_s'] / res['hit_s']:.0f}x")
    print(f"figure: peak memory, uncached switch / second model = {res['miss_peak_mb'] / res['load_peak_mb']:.2f}")
    print(f"figure: one-time setup (2 vectors loaded) s = {res['setup_s']:.2f} (+{res['setup_kept_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
