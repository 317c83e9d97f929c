"""Switching alignment-knob settings vs loading a second full model from disk: time and peak memory.

    .venv/bin/python benchmarks/bench_vectors.py [vectors=outputs/demo_vectors/vectors] [repeats=5] [threads=2]

The base is the embedded default (SmolLM2-135M-Instruct, fp32). Vectors: `concise` and `detailed` from
benchmarks/demo_vectors.py when they exist, else two synthetic ones (the base plus seeded noise, extracted the
same way) under outputs/bench_vectors/. Measured in one process, one after the other:

  load    load_model(<base folder>) a second time (files in the page cache: the best case for loading)
  miss    KnobbedModel with cache_size=0: every switch to a new setting merges θ_base + Σ λ·AV
  hit     KnobbedModel with cache_size=4: switching between settings already cached (pointer swaps)

Time: median over `repeats`, each until the model has run one short forward pass (transformers memory-maps
safetensors, so a loaded model reads its weights on first use). Memory, in a fresh child process: the
resident memory (private + file-backed) each step adds once a forward pass has run.
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

from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE")


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    vectors: str = Field(str(ROOT / "outputs/demo_vectors/vectors"),
                         description="folder with concise/ and detailed/ vectors (benchmarks/demo_vectors.py); "
                                     "missing: two synthetic vectors are used")
    repeats: int = Field(5, description="timed repeats of each step (median)")
    threads: int = Field(2, description="torch threads")
    memory_child: bool = Field(False, description="internal: run as the child process that measures memory")


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

    from pipeline.vectors.extract import checkpoint_dir, extract_vector

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


def resident() -> int:
    """Total resident memory (private + file-backed: transformers memory-maps safetensors weights)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def touch(model) -> None:
    """One short forward pass: the model is usable, and every weight it reads is resident."""
    import torch

    with torch.inference_mode():
        model(input_ids=torch.arange(8).unsqueeze(0) + 100)


def memory_child(vectors: dict, threads: int) -> dict:
    """Steady-state resident memory, in a fresh process: what a second model, the vectors, and each merged
    variant add once the model has run a forward pass."""
    import torch

    from pipeline.models import load_model
    from pipeline.vectors.knobs import KnobbedModel
    from pipeline.vectors.extract import checkpoint_dir

    torch.set_num_threads(threads)
    base_dir = checkpoint_dir("default")
    lm = load_model(str(base_dir))
    touch(lm.model)
    r0 = resident()
    second = load_model(str(base_dir))
    touch(second.model)
    r1 = resident()
    del second
    a, b = sorted(vectors)
    km = KnobbedModel(lm.model, vectors, cache_size=4, base_source=str(base_dir))
    r2 = resident()
    with Peak() as pk:
        km.apply({a: 1.0})
    touch(lm.model)
    r3 = resident()
    km.apply({a: 0.5, b: 1.0})
    touch(lm.model)
    r4 = resident()
    mb = 1e6
    return {"second_model_mb": (r1 - r0) / mb, "vectors_mb": (r2 - r0) / mb,
            "first_variant_mb": (r3 - r2) / mb, "second_variant_mb": (r4 - r3) / mb,
            "switch_peak_private_mb": pk.extra_mb, "resident_base_mb": r0 / mb}


def main() -> None:
    options = load_config(Options, None, sys.argv[1:])
    import subprocess

    import torch

    from pipeline.models import load_model
    from pipeline.vectors.knobs import KnobbedModel
    from pipeline.vectors.extract import checkpoint_dir, checkpoint_hash

    threads = options.threads
    torch.set_num_threads(threads)
    repeats = options.repeats
    vdir = Path(options.vectors)
    if (vdir / "concise" / "vector.json").exists() and (vdir / "detailed" / "vector.json").exists():
        vectors, kind = {"concise": vdir / "concise", "detailed": vdir / "detailed"}, "demo (concise, detailed)"
    else:
        vectors, kind = synthetic_vectors(ROOT / "outputs/bench_vectors"), "synthetic"
    if options.memory_child:
        print("MEMORY " + json.dumps(memory_child(vectors, threads)))
        return
    a, b = sorted(vectors)
    base_dir = checkpoint_dir("default")
    lm = load_model(str(base_dir))
    touch(lm.model)
    checkpoint_hash(base_dir)  # computed once per process (and cached), not part of a switch
    print(f"[bench] base loaded; vectors: {kind}", flush=True)

    # a second full model from disk, until it has run a forward pass (its weights are memory-mapped lazily)
    load_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        second = load_model(str(base_dir))
        touch(second.model)
        load_s.append(time.perf_counter() - t0)
        del second

    # uncached switches: every setting new (cache_size=0), until a forward pass has run
    t0 = time.perf_counter()
    km = KnobbedModel(lm.model, vectors, cache_size=0, base_source=str(base_dir))
    setup_s = time.perf_counter() - t0
    settings = [{a: 0.25 * (i + 1), b: 0.5} for i in range(repeats + 1)]
    km.apply(settings[0])
    miss_s = []
    for s in settings[1:]:
        t0 = time.perf_counter()
        info = km.apply(s)
        touch(lm.model)
        miss_s.append(time.perf_counter() - t0)
        assert info.cache == "miss"
    km.apply({})

    # cached switches: two settings alternating in a cache of 4
    km = KnobbedModel(lm.model, vectors, cache_size=4, base_source=str(base_dir))
    s1, s2 = {a: 1.0}, {a: 0.5, b: 1.0}
    km.apply(s1)
    km.apply(s2)
    hit_s, hit_only = [], []
    for i in range(repeats * 2):
        t0 = time.perf_counter()
        info = km.apply(s1 if i % 2 == 0 else s2)
        hit_only.append(info.switch_ms / 1000)
        touch(lm.model)
        hit_s.append(time.perf_counter() - t0)
        assert info.cache == "hit"
    km.apply({})
    # a forward pass alone, for reference
    fwd = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        touch(lm.model)
        fwd.append(time.perf_counter() - t0)

    child = subprocess.run([sys.executable, __file__, "memory_child=true", f"vectors={vdir}", f"threads={threads}"],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    mem_line = [x for x in child.stdout.splitlines() if x.startswith("MEMORY ")]
    if not mem_line:
        raise RuntimeError("memory child failed:\n" + child.stderr[-3000:])
    mem = json.loads(mem_line[0][7:])

    med = statistics.median
    res = {"vectors": kind, "repeats": repeats, "threads": threads, "load_s": med(load_s), "miss_s": med(miss_s),
           "hit_s": med(hit_s), "hit_switch_only_s": med(hit_only), "forward_s": med(fwd), "setup_s": setup_s,
           "memory": mem}
    out = ROOT / "outputs" / "bench_vectors"
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(f"figure: load a second model from disk + first forward s = {res['load_s']:.3f}")
    print(f"figure: knob switch, uncached (merge 2 vectors) + first forward s = {res['miss_s']:.3f}")
    print(f"figure: knob switch, cached + first forward s = {res['hit_s']:.3f} "
          f"(the switch itself {res['hit_switch_only_s'] * 1000:.2f} ms; a forward alone {res['forward_s']:.3f} s)")
    print(f"figure: load / uncached switch time = {res['load_s'] / res['miss_s']:.2f}x")
    print(f"figure: load / cached switch time (switch alone) = {res['load_s'] / res['hit_switch_only_s']:.0f}x")
    print(f"figure: memory, second model = +{mem['second_model_mb']:.0f} MB; cached variant = "
          f"+{mem['first_variant_mb']:.0f} MB each (+{mem['second_variant_mb']:.0f} MB the second); ratio "
          f"{mem['first_variant_mb'] / mem['second_model_mb']:.2f}")
    print(f"figure: one-time setup (2 vectors loaded, base hash cached) s = {res['setup_s']:.2f}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a mistake in the options: one message listing every problem, exit status 2
        print(f"[bench_vectors] {e}", file=sys.stderr)
        sys.exit(2)
