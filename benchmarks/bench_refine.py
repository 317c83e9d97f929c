"""Refinement speed, side by side in one run, on the same aligner and the same real drafts.

    .venv/bin/python benchmarks/bench_refine.py [rows=4] [batch_rows=16] [max_new_tokens=128]

Aligner: the embedded default (SmolLM2-135M-Instruct). Drafts: real Llama-3-8B-Instruct answers to
AlpacaEval instructions from ../shared/data. Every speed ratio is between runs whose output tokens are
checked identical (a mismatch is printed, never hidden).

  1. reference algorithm vs fast engine, batch 1                (goal >= 4x)
  2. fast engine, batch 16 vs one row at a time                 (goal >= 2x rows/s)
  3. passes and tokens per pass: reference, fast, draft-in-context (AR runs no Jacobi pass: its generated tokens)
  4. draft-in-context: fast engine vs generate(prompt_lookup_num_tokens=10) vs plain greedy generate
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402
from pipeline.decoding.jacobi import RefineSettings  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.decoding.refiner import RefineRequest, Refiner  # noqa: E402

DRAFTS = Path(__file__).resolve().parents[2] / "shared/data/alpaca_eval/drafts_Meta-Llama-3-8B-Instruct.jsonl"


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    rows: int = Field(4, description="held-out rows of the batch-1 comparisons (parts 1, 3 and 4)")
    batch_rows: int = Field(16, description="rows of the batched run of part 2 (one batch)")
    max_new_tokens: int = Field(128, description="answer cap (RefineSettings.max_new_tokens)")


def args():
    o = load_config(Options, None, sys.argv[1:])
    return o.rows, o.batch_rows, o.max_new_tokens


def timed(refiner, reqs, batch):
    t = time.perf_counter()
    res = []
    for i in range(0, len(reqs), batch):
        res += refiner.refine(reqs[i:i + batch])
    return time.perf_counter() - t, res


def same(a, b, label):
    bad = [i for i, (x, y) in enumerate(zip(a, b)) if x.token_ids != y.token_ids]
    if bad:
        print(f"  !! {label}: outputs differ on rows {bad} (see test_engine for near-tie diagnosis)")
    return not bad


def stats(res):
    passes = sum(r.passes for r in res)
    new = sum(r.new_tokens for r in res)
    return passes / len(res), new / max(1, passes)


def main():
    n_rows, batch_rows, max_new = args()
    if not DRAFTS.exists():
        print(f"skipped: {DRAFTS} not found (the benchmark needs ../shared/data)")
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = [json.loads(line) for line in open(DRAFTS)]
    rows = [r for r in rows if r["id"] % 4 == 0]  # held-out split
    reqs = [RefineRequest([{"role": "user", "content": r["instruction"]}], r["output"], str(r["id"])) for r in rows]
    lm = load_model("default")
    print(f"aligner {lm.source}, torch threads {torch.get_num_threads()}, max_new_tokens {max_new}")
    S = lambda **kw: RefineSettings(max_new_tokens=max_new, **kw)  # noqa: E731
    small = reqs[:n_rows]
    figures = {}

    # 1. reference vs fast at batch 1
    t_ref, ref = timed(Refiner(lm, S(), mode="reference"), small, 1)
    t_fast, fast = timed(Refiner(lm, S(), mode="fast"), small, 1)
    t_ar, ar = timed(Refiner(lm, S(), mode="ar"), small, 1)
    same(ref, fast, "reference vs fast")
    same(ref, ar, "reference vs AR")
    print(f"[1] batch 1, {n_rows} rows: reference {t_ref:.1f}s, fast {t_fast:.1f}s, AR {t_ar:.1f}s")
    figures["fast_speedup_vs_reference_batch1"] = t_ref / t_fast
    figures["fast_speedup_vs_ar_batch1"] = t_ar / t_fast

    # 3. passes / tokens per pass per mode (chat layout), plus in-context
    for name, res in (("reference", ref), ("fast", fast)):
        p, tpp = stats(res)
        print(f"[3] {name:<18} passes/row {p:7.1f}  tokens/pass {tpp:.2f}")
        figures[f"tokens_per_pass_{name}"] = tpp
    print(f"[3] {'ar':<18} generated tokens/row {sum(r.generated_tokens for r in ar) / len(ar):7.1f}  (no Jacobi pass)")

    # 4. draft-in-context: engine vs prompt lookup vs plain AR, identical greedy output
    t_ic, ic = timed(Refiner(lm, S(), mode="fast", in_context=True), small, 1)
    t_pl, pl = timed(Refiner(lm, S(), mode="ar", in_context=True, prompt_lookup=10), small, 1)
    t_icar, icar = timed(Refiner(lm, S(), mode="ar", in_context=True), small, 1)
    same(ic, icar, "in-context fast vs AR")
    same(pl, icar, "prompt lookup vs AR")
    p, tpp = stats(ic)
    print(f"[3] {'in_context fast':<18} passes/row {p:7.1f}  tokens/pass {tpp:.2f}")
    print(f"[4] in-context, batch 1: fast {t_ic:.1f}s, prompt-lookup generate {t_pl:.1f}s, plain generate {t_icar:.1f}s")
    figures["tokens_per_pass_in_context"] = tpp
    figures["in_context_speedup_vs_prompt_lookup"] = t_pl / t_ic
    figures["in_context_speedup_vs_ar"] = t_icar / t_ic

    # 2. batch 16 vs one at a time (fast engine)
    many = reqs[:batch_rows]
    t_one, one = timed(Refiner(lm, S(), mode="fast"), many, 1)
    t_b, b = timed(Refiner(lm, S(), mode="fast"), many, batch_rows)
    same(one, b, f"batch {batch_rows} vs one at a time")
    print(f"[2] {batch_rows} rows: one at a time {t_one:.1f}s ({batch_rows / t_one:.3f} rows/s), "
          f"batch {batch_rows} {t_b:.1f}s ({batch_rows / t_b:.3f} rows/s)")
    figures[f"batch{batch_rows}_rows_per_s_ratio"] = t_one / t_b

    for k, v in figures.items():
        print(f"figure: {k} = {v:.2f}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a mistake in the options: one message listing every problem, exit status 2
        print(f"[bench_refine] {e}", file=sys.stderr)
        sys.exit(2)
