"""Alignment vectors as LoRA adapters on vLLM against the dense merge the HF engines use, side by side in one run.

    .venv/bin/python benchmarks/bench_vector_lora.py [ranks=[8,16,64]] [prompts=8] [max_new_tokens=128]
        [grid=[0,0.5,1]] [demo=outputs/demo_vectors] [threads=2]

The vectors are `benchmarks/demo_vectors.py`'s two style vectors of the default model (concise, detailed; the two
fine-tunes are trained first if `demo`/models has none: about 10 minutes here). On its held-out AlpacaEval prompts,
greedy, `max_new_tokens`:

1. Weights, per rank (8, 16, 64 and full): the relative error ||ΔW_LoRA − ΔW|| / ||ΔW|| over the adapted layers of
   each vector (`pipeline.vectors.lora.factor`; at full rank the factorization is exact by construction), and the
   share of the vector's norm in tensors no LoRA expresses (norms: dropped from the adapter, with a warning).
2. The effect the vectors exist for: mean answer tokens at each λ of `grid`, for each vector alone, HF dense merge
   (`KnobbedModel` + generate) vs vLLM with that rank's adapters (one engine with LoRA enabled, every request of a
   rank at once: the settings share batches). Figure per rank: the largest gap between the two curves relative to
   the dense curve's range (goal: <= 0.10 for the default rank), and the share of answers identical token for token.
3. Costs: a new setting's adapter build seconds, its first request vs a cached setting's; adapter size vs a merged
   model folder (what `aligner.knobs` on vLLM wrote per setting before).
Full rank is not run on vLLM for this model (a q_proj delta has rank 576, past vLLM's largest max_lora_rank, 512):
its answers equal the dense merge token for token on the tiny test model (tests/serve_app/test_vllm_knobs.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402


class Options(Section):
    ranks: list[int] = Field([8, 16, 64], description="LoRA ranks per vector run on vLLM")
    prompts: int = Field(8, ge=1, description="held-out prompts")
    max_new_tokens: int = Field(128, ge=1)
    grid: list[float] = Field([0.0, 0.5, 1.0], description="λ of each vector alone")
    demo: str = Field(str(ROOT / "outputs/demo_vectors"), description="demo_vectors.py's output folder")
    threads: int = Field(2, ge=1)


def vectors(o: Options) -> dict[str, str]:
    """The demo's two vectors, trained and extracted first if missing."""
    out = Path(o.demo)
    paths = {n: str(out / "vectors" / n) for n in ("concise", "detailed")}
    if all((Path(p) / "vector.json").exists() for p in paths.values()):
        return paths
    from benchmarks.demo_vectors import extract, finetune, training_sets

    sets = training_sets()
    for name, batch, ans_tok in (("concise", 8, 64), ("detailed", 4, 128)):
        mdir = out / "models" / name
        if not (mdir / "train_info.json").exists():
            finetune(name, sets[name], mdir, 20, batch, 1e-4, ans_tok)
        if not (Path(paths[name]) / "vector.json").exists():
            extract(mdir, name, Path(paths[name]), [])
    return paths


def prompts_ids(o: Options) -> tuple[list[list[int]], list[int]]:
    from benchmarks.demo_vectors import heldout_prompts
    from pipeline.models import load_model_text
    from pipeline.prompts import chat_prompt_ids

    rows = heldout_prompts(o.prompts, Path(o.demo) / "heldout.jsonl")
    text = load_model_text("default", False)
    return [chat_prompt_ids(text.tokenizer, [{"role": "user", "content": r["instruction"]}]) for r in rows], \
        list(text.stop_ids)


def settings(o: Options) -> list[tuple]:
    out = [()]
    for name in ("concise", "detailed"):
        out += [((name, lam),) for lam in o.grid if lam]
    return out


def dense_answers(o: Options, paths: dict, prompts: list[list[int]], stops: list[int]) -> dict[tuple, list]:
    import torch

    from pipeline.models import load_model
    from pipeline.vectors.knobs import load_knobbed

    torch.set_num_threads(o.threads)
    lm = load_model("default", dtype="float32")
    km = load_knobbed(lm, paths, cache_size=0)
    out = {}
    for key in settings(o):
        km.apply(dict(key))
        answers = []
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p])
                gen = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=o.max_new_tokens, do_sample=False, eos_token_id=stops,
                                        pad_token_id=stops[0], temperature=None, top_p=None, top_k=None)
                a = gen[0, len(p):].tolist()
                answers.append(a[:next((i for i, t in enumerate(a) if t in stops), len(a))])
        out[key] = answers
        print(f"[bench] dense {dict(key) or 'base'}: mean {sum(map(len, answers)) / len(answers):.1f} tokens",
              flush=True)
    return out


def vllm_answers(o: Options, paths: dict, rank: int, prompts: list[list[int]], stops: list[int], root: Path):
    """Every setting's answers on one vLLM engine with this rank's adapters, all requests at once; and costs."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from pipeline.models import resolve_model_path
    from pipeline.vectors.lora import AdapterCfg, AdapterStore, engine_lora_kwargs

    store = AdapterStore(paths, AdapterCfg(rank=rank), root / f"r{rank}")
    keys = settings(o)
    t0 = time.perf_counter()
    adapters = {k: store.adapter(k) for k in keys}
    build_s = time.perf_counter() - t0
    lora = engine_lora_kwargs(paths, rank, max_loras=len(keys), max_cpu_loras=len(keys))
    llm = LLM(model=resolve_model_path("default")[0], dtype="float32", enforce_eager=True, max_model_len=1024,
              enable_chunked_prefill=False, max_num_batched_tokens=2048, seed=0, **lora)
    sp = SamplingParams(max_tokens=o.max_new_tokens, temperature=0.0, stop_token_ids=stops, detokenize=False)
    reqs = [LoRARequest(adapters[k].name, i + 1, str(adapters[k].path)) for i, k in enumerate(keys)]
    prompts_all = [{"prompt_token_ids": p} for _ in keys for p in prompts]
    loras = [r for r in reqs for _ in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(prompts_all, sp, lora_request=loras, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    answers = {}
    for i, k in enumerate(keys):
        chunk = outs[i * len(prompts):(i + 1) * len(prompts)]
        answers[k] = [[t for t in c.outputs[0].token_ids if t not in stops] for c in chunk]
    # a cached setting's request vs a new one's (its adapter built and loaded on first use)
    one = prompts[0]
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": one}], SamplingParams(max_tokens=16, temperature=0.0), lora_request=reqs[1],
                 use_tqdm=False)
    cached_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    new = store.adapter((("concise", 0.25), ("detailed", 0.25)))
    new_build_s = time.perf_counter() - t0
    llm.generate([{"prompt_token_ids": one}], SamplingParams(max_tokens=16, temperature=0.0),
                 lora_request=LoRARequest(new.name, len(reqs) + 1, str(new.path)), use_tqdm=False)
    new_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in new.path.iterdir())
    del llm
    return answers, {"build_s_all": build_s, "generate_s": gen_s, "cached_request_s": cached_s,
                     "new_setting_build_s": new_build_s, "new_setting_first_request_s": new_s,
                     "adapter_mb": size / 1e6, "max_lora_rank": lora["max_lora_rank"]}


def main(argv: list[str]) -> None:
    o = load_config(Options, None, argv)
    paths = vectors(o)
    import torch

    from pipeline.vectors.knobs import AlignmentVector
    from pipeline.vectors.lora import factor

    # 1. weights
    weights = {}
    for name, p in paths.items():
        vec = AlignmentVector(p)
        for rank in [*o.ranks, None]:
            f = factor(vec, rank)
            num = sum((e * float(torch.linalg.norm(vec.delta(m + ".weight")))) ** 2 for m, e in f.rel_error.items())
            den = sum(float(torch.linalg.norm(vec.delta(m + ".weight"))) ** 2 for m in f.rel_error)
            dropped = (sum(v ** 2 for v in f.dropped.values()) ** 0.5) / f.norm if f.norm else 0.0
            weights[(name, rank)] = ((num / den) ** 0.5 if den else 0.0, dropped)
            print(f"[bench] {name} rank {rank or 'full'}: weight error {weights[(name, rank)][0]:.4f}, "
                  f"dropped norm share {dropped:.4f}", flush=True)

    prompts, stops = prompts_ids(o)
    dense = dense_answers(o, paths, prompts, stops)
    root = Path(o.demo) / "lora_bench"
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    results = {}
    for rank in o.ranks:
        results[rank] = vllm_answers(o, paths, rank, prompts, stops, root)
        print(f"[bench] vLLM rank {rank}: {json.dumps(results[rank][1])}", flush=True)

    mean = lambda xs: sum(map(len, xs)) / len(xs)  # noqa: E731
    print("\n| rank | vector | weight error | dropped | " + " | ".join(f"λ={x:g} HF / vLLM" for x in o.grid)
          + " | max gap / range | identical |")
    for rank in o.ranks:
        answers = results[rank][0]
        for name in ("concise", "detailed"):
            keys = [() if not x else ((name, x),) for x in o.grid]
            hf, vl = [mean(dense[k]) for k in keys], [mean(answers[k]) for k in keys]
            span = max(hf) - min(hf) or 1.0
            gap = max(abs(a - b) for a, b in zip(hf, vl)) / span
            same = sum(a == b for k in keys for a, b in zip(dense[k], answers[k])) / (len(keys) * len(prompts))
            err, dropped = weights[(name, rank)]
            print(f"| {rank} | {name} | {err:.4f} | {dropped:.4f} | "
                  + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(hf, vl)) + f" | {gap:.3f} | {same:.2f} |")
            print(f"figure: effect_curve_gap_rank{rank}_{name} = {gap:.3f}")
            print(f"figure: identical_answers_rank{rank}_{name} = {same:.3f}")
            print(f"figure: weight_error_rank{rank}_{name} = {err:.4f}")
    for name in ("concise", "detailed"):
        print(f"figure: weight_error_full_{name} = {weights[(name, None)][0]:.2e}")
        print(f"figure: dropped_norm_share_{name} = {weights[(name, None)][1]:.4f}")
    from pipeline.models import resolve_model_path

    merged_mb = sum(f.stat().st_size for f in Path(resolve_model_path("default")[0]).glob("*.safetensors")) / 1e6
    for rank in o.ranks:
        c = results[rank][1]
        print(f"figure: new_setting_build_s_rank{rank} = {c['new_setting_build_s']:.3f}")
        print(f"figure: new_setting_first_request_s_rank{rank} = {c['new_setting_first_request_s']:.3f}")
        print(f"figure: cached_setting_request_s_rank{rank} = {c['cached_request_s']:.3f}")
        print(f"figure: adapter_mb_rank{rank} = {c['adapter_mb']:.2f}")
    print(f"figure: merged_folder_mb = {merged_mb:.1f}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(str(e))
