"""Memory of knob settings on vLLM: one base engine holding N settings as LoRA adapters vs N merged model folders
(what `aligner.knobs` on vLLM wrote per setting before adapters: one folder, and one engine, per setting).

    .venv/bin/python benchmarks/bench_lora_memory.py [settings=[1,4,8,16]] [rank=32] [max_loras=4]

Adapters: random LoRA factors of `rank` on every linear layer of the embedded default model (q/k/v/o and the MLP's
gate/up/down in every block: what an alignment vector's adapter covers; rank 32 = two vectors at rank 16, as in
`bench_serve_knobs.py`), written by `pipeline.vectors.lora.write_adapter`, one folder per setting. Memory depends
on the adapters' shapes only, so random factors measure it as well as extracted vectors would.

Each side runs in its own subprocess (this script with `--side`), fp32, eager, 1 GiB of KV cache, and reports the
proportional set size (PSS: shared pages split between the processes that map them) of its process tree (the
`vllm.LLM` process and its engine-core child) before the engine starts, after it starts, and for the LoRA side
after each setting's first request (vLLM then holds it among its `max_cpu_loras` cached adapters; `max_loras`
settings share a batch):

* lora:   one engine with `enable_lora`, `max_cpu_loras` = the largest N; a 4-token greedy request per setting.
* merged: one engine of the plain model (no LoRA): a merged setting is this model again, so N merged settings
          served at once are N such engines (N x this engine's memory, not started N times), and N folders on disk.

Figures: lora_engine_mb_n{N} (the engine's PSS above the process before it started, N settings cached),
merged_engines_mb_n{N} (N x the plain engine's), lora_vs_merged_memory_ratio_n{N}, adapter_disk_mb,
merged_folder_mb, adapter_vs_merged_folder_disk_ratio.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402


class Options(Section):
    settings: list[int] = Field([1, 4, 8, 16], description="numbers of cached settings measured (ascending)")
    rank: int = Field(32, ge=1, description="each adapter's LoRA rank (a setting of two vectors at rank 16 = 32)")
    max_loras: int = Field(4, ge=1, description="vLLM's max_loras: settings in one batch")


def tree_pss_mb() -> float:
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**20


def write_adapters(folder: Path, n: int, rank: int, model: str) -> list[Path]:
    import torch
    from transformers import AutoConfig

    from pipeline.vectors.lora import write_adapter

    c = AutoConfig.from_pretrained(model)
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    shapes = {"self_attn.q_proj": (c.num_attention_heads * head, c.hidden_size),
              "self_attn.k_proj": (c.num_key_value_heads * head, c.hidden_size),
              "self_attn.v_proj": (c.num_key_value_heads * head, c.hidden_size),
              "self_attn.o_proj": (c.hidden_size, c.num_attention_heads * head),
              "mlp.gate_proj": (c.intermediate_size, c.hidden_size), "mlp.up_proj": (c.intermediate_size, c.hidden_size),
              "mlp.down_proj": (c.hidden_size, c.intermediate_size)}
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(n):
        mods = {f"model.layers.{i}.{m}": (torch.randn(o, rank, generator=g) * 1e-3,
                                          torch.randn(rank, d, generator=g) * 1e-3)
                for i in range(c.num_hidden_layers) for m, (o, d) in shapes.items()}
        write_adapter(folder / f"setting-{k}", mods, rank, model, {"bench": k})
        out.append(folder / f"setting-{k}")
    return out


def side(name: str, o: Options, folder: Path) -> dict:
    """One engine in this process (the `--side` subprocess); its memory as the docstring says."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from pipeline.models import resolve_model_path

    model = resolve_model_path("default")[0]
    n_max = max(o.settings)
    paths = write_adapters(folder, n_max, o.rank, model) if name == "lora" else []
    before = tree_pss_mb()
    lora = ({"enable_lora": True, "max_lora_rank": o.rank, "max_loras": o.max_loras, "max_cpu_loras": n_max}
            if name == "lora" else {})
    t = time.perf_counter()
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, seed=0, **lora)
    res = {"before_mb": before, "start_s": time.perf_counter() - t, "started_mb": tree_pss_mb() - before}
    if name == "lora":
        sp = SamplingParams(max_tokens=4, temperature=0.0, detokenize=False)
        res["cached_mb"] = {}
        for k, p in enumerate(paths, 1):
            llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], sp, lora_request=LoRARequest(p.name, k, str(p)),
                         use_tqdm=False)
            if k in o.settings:
                res["cached_mb"][k] = tree_pss_mb() - before
                print(f"[lora] {k} setting(s) cached: engine {res['cached_mb'][k]:.0f} MB", flush=True)
        res["adapter_disk_mb"] = sum(f.stat().st_size for f in paths[0].iterdir()) / 2**20
    else:
        res["folder_mb"] = sum(f.stat().st_size for f in Path(model).iterdir() if f.is_file()) / 2**20
    return res


def main(argv: list[str]) -> None:
    if argv[:1] == ["--side"]:
        o = Options(**json.loads(argv[2]))
        print("RESULT " + json.dumps(side(argv[1], o, Path(argv[3]))), flush=True)
        return
    o = load_config(Options, None, argv)
    if sorted(o.settings) != o.settings or o.settings[0] < 1:
        raise ConfigError([f"settings: give ascending counts >= 1, got {o.settings}"])
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench_lora_memory_") as tmp:
        for name in ("merged", "lora"):
            print(f"[bench] {name}: starting its engine in a subprocess", flush=True)
            p = subprocess.run([sys.executable, __file__, "--side", name, o.model_dump_json(), tmp],
                               capture_output=True, text=True, cwd=ROOT)
            found = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not found:
                sys.exit(f"!! the {name} side failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
            res[name] = json.loads(found[-1][len("RESULT "):])
            print(f"[bench] {name}: {json.dumps(res[name])}", flush=True)
    m, lo = res["merged"], res["lora"]
    print(f"\nengine start: plain {m['start_s']:.1f} s, with LoRA {lo['start_s']:.1f} s; one plain engine "
          f"{m['started_mb']:.0f} MB; the LoRA engine before any adapter {lo['started_mb']:.0f} MB "
          f"(max_loras {o.max_loras} slots of rank {o.rank} allocated at start)")
    print("\n| settings | one engine + adapters (MB) | N merged engines (MB) | memory ratio | adapters on disk (MB) "
          "| merged folders (MB) | disk ratio |\n|---|---|---|---|---|---|---|")
    figures = []
    for n in o.settings:
        mem, merged = lo["cached_mb"][str(n)], n * m["started_mb"]
        disk, folders = n * lo["adapter_disk_mb"], n * m["folder_mb"]
        print(f"| {n} | {mem:.0f} | {merged:.0f} | {mem / merged:.2f} | {disk:.0f} | {folders:.0f} | "
              f"{disk / folders:.3f} |")
        figures += [f"lora_engine_mb_n{n} = {mem:.0f}", f"merged_engines_mb_n{n} = {merged:.0f}",
                    f"lora_vs_merged_memory_ratio_n{n} = {mem / merged:.3f}"]
    for f in figures:
        print(f"figure: {f}")
    print(f"figure: adapter_disk_mb = {lo['adapter_disk_mb']:.1f}")
    print(f"figure: merged_folder_mb = {m['folder_mb']:.1f}")
    print(f"figure: adapter_vs_merged_folder_disk_ratio = {lo['adapter_disk_mb'] / m['folder_mb']:.4f}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(str(e))
