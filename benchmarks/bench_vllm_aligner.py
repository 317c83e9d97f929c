"""The aligner stage on vLLM vs the project's fast Jacobi engine vs Hugging Face greedy `generate`.

    .venv/bin/python benchmarks/bench_vllm_aligner.py [--rows 16] [--max-new-tokens 96] [--batch 16] [--quick]

DiffPO's answer of a row is one greedy continuation (`pipeline/decoding/continuation.py`): the aligner's chat
prompt + the row's `r` reserved draft tokens, continued greedily up to the cap. All three engines get the very
same `RefineItem`s (one `Refiner.encode` per row, aligner = the embedded default SmolLM2-135M-Instruct, fp32):

* fast  `Refiner(mode="fast")`: the batched KV-cached Jacobi engine, the draft as its initial state;
* hf    `Refiner(mode="ar")`: transformers `generate(do_sample=False)` on `continuation()`'s ids;
* vllm  `vllm.LLM.generate` on `continuation()`'s ids (TokensPrompt, temperature 0), turned into a
        `RefineResult` by `finish()`, as the job's vLLM stage does.

Each runs one row at a time (batch 1) and `--batch` rows per call (batch 16), all rows. Output tokens are
compared across all six runs and the agreeing rows are counted (a mismatch is printed, never hidden). Engine
start (HF model load, vLLM `LLM(...)`) is timed separately and not counted; every engine gets one short warm-up
call first. HF runs first, then the vLLM engine starts (its engine process would otherwise share the cores).
On a 2-core CPU vLLM's worker computes on one core (it binds core 0, reserving the other for its front end); the HF
engines get `--threads` torch threads (2).

Rows: held-out AlpacaEval instructions (`id % 4 == 0`) with their real Llama-3-8B-Instruct drafts from
../shared/data; without that folder, the bundled demo prompts with drafts sampled from the default model.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for a 135M model
ROOT = Path(__file__).resolve().parents[1]
DRAFTS = ROOT.parent / "shared/data/alpaca_eval/drafts_Meta-Llama-3-8B-Instruct.jsonl"
DEMO = ROOT / "pipeline/data/demo_prompts.jsonl"


def bench_rows(n: int, lm=None, draft_tokens: int = 128) -> tuple[list[dict], str]:
    """`n` rows {id, prompt, draft} and where they come from: held-out AlpacaEval with real drafts, or (no
    ../shared/data) the demo prompts with drafts sampled from `lm` (loaded here if not given)."""
    if DRAFTS.exists():
        rows = [json.loads(x) for x in open(DRAFTS)]
        rows = [{"id": str(r["id"]), "prompt": r["instruction"], "draft": r["output"]} for r in rows if r["id"] % 4 == 0]
        return rows[:n], f"{min(n, len(rows))} held-out AlpacaEval prompts, real Llama-3-8B-Instruct drafts"
    import torch

    from pipeline.models import load_model
    from pipeline.prompts import chat_prompt_ids

    lm = lm or load_model("default", device="cpu", dtype="float32")
    demo = [json.loads(x) for x in open(DEMO)]
    rows = []
    for i in range(n):
        d = demo[i % len(demo)]
        prompt = d["prompt"] if i < len(demo) else f"{d['prompt']} ({i})"
        ids = torch.tensor([chat_prompt_ids(lm.tokenizer, [{"role": "user", "content": prompt}])])
        torch.manual_seed(i)
        with torch.inference_mode():
            out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                    temperature=0.9, top_p=0.95, max_new_tokens=draft_tokens,
                                    eos_token_id=lm.stop_ids, pad_token_id=lm.text.pad_id)
        rows.append({"id": f"{d['id']}-{i}", "prompt": prompt,
                     "draft": lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()})
    return rows, (f"{n} bundled demo prompts with drafts sampled from the default model "
                  f"(../shared/data not found: NOT the real-draft setting)")


def start_vllm(folder: str, max_model_len: int):
    """A vLLM engine as the notes say works on this CPU (fp32, eager); returns (engine, start seconds)."""
    from vllm import LLM

    t = time.perf_counter()
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=max_model_len, seed=0)
    return llm, time.perf_counter() - t


def vllm_generate(llm, reqs: list[tuple[list[int], int]], stop_ids: list[int]) -> list[list[int]]:
    """Greedy continuation of each (ids, max_tokens), one `LLM.generate` call: the generated token ids."""
    from vllm import SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in reqs]
    params = [SamplingParams(temperature=0.0, max_tokens=k, stop_token_ids=list(stop_ids), detokenize=False)
              for _, k in reqs]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def load() -> str:
    """The 1-minute load average: on a shared machine, what else was running shows up here."""
    return f"{os.getloadavg()[0]:.2f}"


def chunks(xs: list, size: int) -> list[list]:
    return [xs[i:i + size] for i in range(0, len(xs), size)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer cap (RefineSettings.max_new_tokens)")
    p.add_argument("--batch", type=int, default=16, help="rows per call in the batched runs")
    p.add_argument("--max-model-len", type=int, default=2048, help="vLLM's context length")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the HF engines")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 rows, 32 tokens, batch 4")
    a = p.parse_args()
    if a.quick:
        a.rows, a.max_new_tokens, a.batch = 4, 32, 4
    return a


def main():
    a = parse_args()
    import torch

    from pipeline.decoding.continuation import continuation, finish
    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.decoding.refiner import RefineRequest, Refiner
    from pipeline.models import load_model, resolve_model_path

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    lm = load_model("default", device="cpu", dtype="float32")
    t_hf_load = time.perf_counter() - t
    rows, source = bench_rows(a.rows, lm)
    settings = RefineSettings(max_new_tokens=a.max_new_tokens)
    engines = {"fast": Refiner(lm, settings, mode="fast"), "hf": Refiner(lm, settings, mode="ar")}
    items = [engines["fast"].encode(RefineRequest([{"role": "user", "content": r["prompt"]}], r["draft"], key=r["id"]))
             for r in rows]
    n = len(items)
    print(f"rows: {source}")
    print(f"aligner: default (SmolLM2-135M-Instruct) fp32, max_new_tokens {a.max_new_tokens}, reserve_tokens "
          f"{settings.reserve_tokens} (r per row: {[it.reserved for it in items]}), prompts "
          f"{min(len(it.prompt_ids) for it in items)}-{max(len(it.prompt_ids) for it in items)} tokens; "
          f"torch threads {torch.get_num_threads()} (HF), {os.cpu_count()} cores, load average {load()}")

    batches = {"b1": 1, f"b{a.batch}": a.batch}
    times: dict[tuple[str, str], float] = {}
    results: dict[tuple[str, str], list] = {}

    # ---- HF engines (warm-up: one row, 4 tokens) ------------------------------------------------------------
    for name, ref in engines.items():
        Refiner(lm, RefineSettings(max_new_tokens=4), mode=ref.mode).refine_items([copy.deepcopy(items[0])])
        for b, size in batches.items():
            t = time.perf_counter()
            out = []
            for part in chunks(copy.deepcopy(items), size):
                out += ref.refine_items(part)
            times[name, b], results[name, b] = time.perf_counter() - t, out
            print(f"  {name:<5} {b:<4} {times[name, b]:7.2f}s  (load average {load()})", flush=True)

    # ---- vLLM -----------------------------------------------------------------------------------------------
    need = max(len(c) + k for c, k in (continuation(it, settings) for it in items))
    if need > a.max_model_len:
        sys.exit(f"--max-model-len {a.max_model_len} is below the longest row ({need} tokens)")
    llm, t_vllm_start = start_vllm(resolve_model_path("default")[0], a.max_model_len)
    vllm_generate(llm, [(continuation(items[0], settings)[0], 4)], lm.stop_ids)  # warm-up
    for b, size in batches.items():
        t = time.perf_counter()
        out = []
        for part in chunks(items, size):
            gen = vllm_generate(llm, [continuation(it, settings) for it in part], lm.stop_ids)
            out += [finish(it, g, lm.stop_ids, settings) for it, g in zip(part, gen)]
        times["vllm", b], results["vllm", b] = time.perf_counter() - t, out
        print(f"  vllm  {b:<4} {times['vllm', b]:7.2f}s  (load average {load()})", flush=True)

    # ---- identical tokens? ----------------------------------------------------------------------------------
    runs = list(results)
    base = results["vllm", f"b{a.batch}"]
    agree = [all(results[k][i].token_ids == base[i].token_ids for k in runs) for i in range(n)]
    for k in runs:
        bad = [i for i in range(n) if results[k][i].token_ids != base[i].token_ids]
        if bad:
            print(f"  !! {k[0]} {k[1]} differs from vllm b{a.batch} on rows {bad}")
    identical = sum(agree)
    new_tokens = sum(r.new_tokens for r in base)

    # ---- table ----------------------------------------------------------------------------------------------
    b16 = f"b{a.batch}"
    print(f"\n{n} rows, {new_tokens} answer tokens in all (incl. reserved draft tokens); engine start not counted: "
          f"HF model load {t_hf_load:.1f}s, vLLM LLM() {t_vllm_start:.1f}s")
    print(f"{'engine':<32}{'batch 1 s':>10}{'rows/s':>8}{f'batch {a.batch} s':>12}{'rows/s':>8}"
          f"{'same tokens as vllm':>21}")
    labels = {"vllm": "vLLM LLM.generate", "fast": "fast Jacobi engine (Refiner)", "hf": "HF generate (Refiner ar)"}
    for name in ("vllm", "fast", "hf"):
        same = sum(results[name, b][i].token_ids == base[i].token_ids for b in batches for i in range(n))
        print(f"{labels[name]:<32}{times[name, 'b1']:>10.2f}{n / times[name, 'b1']:>8.3f}{times[name, b16]:>12.2f}"
              f"{n / times[name, b16]:>8.3f}{f'{same}/{2 * n}':>21}")
    print(f"rows identical in all 6 runs: {identical}/{n}")
    print(f"figure: vllm_vs_fast_aligner_speedup_b{a.batch} = {times['fast', b16] / times['vllm', b16]:.2f}")
    print(f"figure: vllm_vs_fast_aligner_speedup_b1 = {times['fast', 'b1'] / times['vllm', 'b1']:.2f}")
    print(f"figure: vllm_vs_hf_generate_speedup_b{a.batch} = {times['hf', b16] / times['vllm', b16]:.2f}")
    print(f"figure: vllm_vs_hf_generate_speedup_b1 = {times['hf', 'b1'] / times['vllm', 'b1']:.2f}")
    print(f"figure: vllm_engine_start_s = {t_vllm_start:.1f}")
    print(f"figure: vllm_aligner_identical_rows = {identical}/{n}")
    sys.stdout.flush()
    del llm


if __name__ == "__main__":
    main()
