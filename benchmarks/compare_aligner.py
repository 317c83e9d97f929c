"""The aligner before vs after training, on held-out instructions (goal: >= 1.5x tokens per Jacobi pass, and
the offline judge's score of the refined answers must not drop).

    .venv/bin/python benchmarks/compare_aligner.py after=outputs/train/cpu-recipe/aligner \
        [before=default] [heldout=outputs/build_states/heldout.parquet] [rows=24] [max_new_tokens=128] \
        [in_context=false] [batch=8] [engines=jacobi,fast(,fast_fixed_window)] [block_size=32]

Each held-out prompt gets one of its real worse answers (seeded pick, as in training) as the draft; both
aligners refine it (greedy, so each converges to its own greedy answer) and we count answer tokens
accepted per pass (next to the share of repeated word 4-grams: degenerate, repetitive text is both easy to
decode in parallel and bad), with two engines: `jacobi` = plain Jacobi iteration over `block_size`-token blocks
(the published loop's states, run batched with a KV cache: what CLLM-style training speeds up) and `fast`
= the project's default fast engine (adaptive window + re-seeding from the draft); `fast_fixed_window`
= the fast engine with a fixed 16-token window (no adaptive shrinking). The refined answers
are scored by the offline judge (cosine similarity to the AlpacaEval GPT-4 reference in MiniLM space),
reported with a paired bootstrap interval and next to answer lengths, because that judge tracks
closeness to the reference, not quality.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pydantic import ConfigDict, Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT.parent / "shared/data/alpaca_eval/eval_set.jsonl"


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
    after: Optional[str] = Field(None, description="the trained aligner folder (required; without it: skipped)")
    before: str = Field("default", description="the aligner before training")
    heldout: str = Field("outputs/build_states/heldout.parquet",
                         description="held-out rows with their states (python -m jobs.build_states)")
    rows: int = Field(24, description="held-out prompts")
    max_new_tokens: int = Field(128, description="answer cap of both aligners")
    in_context: bool = Field(False, description="the aligner's prompt also shows the draft (correction template)")
    batch: int = Field(8, description="rows per refine call")
    engines: str = Field("jacobi,fast", description="comma-separated: jacobi, fast, fast_fixed_window")
    block_size: int = Field(32, description="block size of the jacobi engine")


def paired_bootstrap(diffs: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(n))
    return means[int(0.025 * n)], means[int(0.975 * n) - 1]


def main():
    options = load_config(Options, None, sys.argv[1:])
    after = options.after
    heldout = Path(options.heldout)
    if not after or not heldout.exists() or not EVAL_SET.exists():
        print(f"skipped: need after=<trained aligner dir>, {heldout} (python -m jobs.build_states) and {EVAL_SET}")
        return
    before, n = options.before, options.rows
    max_new, batch = options.max_new_tokens, options.batch
    in_context = options.in_context
    engines = options.engines.split(",")
    block = options.block_size

    import pandas as pd
    import torch

    from pipeline.decoding.jacobi import RefineSettings
    from pipeline.decoding.refiner import RefineRequest, Refiner
    from pipeline.models import load_model
    from pipeline.scoring.embedding import EmbeddingJudge
    from pipeline.training.examples import as_states, conversation, pick_state
    from pipeline.training.states import repeated_ngram_fraction
    from pipeline.training.trajectories import trajectory_settings

    torch.set_num_threads(2)
    refs = {str(r["id"]): r["reference_output"] for r in map(json.loads, open(EVAL_SET))}
    df = pd.read_parquet(heldout).sort_values("id", key=lambda s: s.astype(int))
    df = df[df["id"].astype(str).isin(refs)].head(n)
    reqs, drafts = [], []
    for r in df.itertuples():
        states = as_states(r.states)
        draft = states[pick_state(str(r.id), 0, 0, len(states))]
        reqs.append(RefineRequest(conversation(r.messages), draft, str(r.id)))
        drafts.append(draft)
    refs_list = [refs[str(i)] for i in df["id"]]
    settings = {"jacobi": trajectory_settings(block, max_iter=block + 1, max_new_tokens=max_new),
                "fast": RefineSettings(max_new_tokens=max_new),
                "fast_fixed_window": RefineSettings(max_new_tokens=max_new, adaptive_window=False)}
    unknown = [e for e in engines if e not in settings]
    if unknown:
        raise SystemExit(f"engines: unknown {unknown}; choose from {', '.join(settings)}")

    out = {}
    for name, path in (("before", before), ("after", after)):
        lm = load_model(path)
        out[name] = {}
        for eng in engines:
            ref = Refiner(lm, settings[eng], mode="fast", in_context=in_context)
            t0 = time.perf_counter()
            res = []
            for i in range(0, len(reqs), batch):
                res += ref.refine(reqs[i:i + batch])
            out[name][eng] = {"results": res, "wall": time.perf_counter() - t0,
                              "tpp": sum(x.new_tokens for x in res) / max(1, sum(x.passes for x in res)),
                              "len": statistics.fmean(len(x.token_ids) for x in res)}
            o = out[name][eng]
            print(f"{name:6s} {path} [{eng}]: tokens/pass {o['tpp']:.3f}, mean answer {o['len']:.0f} tokens, "
                  f"{o['wall']:.1f}s", flush=True)
        out[name]["results"] = out[name][engines[0]]["results"]
        out[name]["len"] = out[name][engines[0]]["len"]
        del lm

    judge = EmbeddingJudge()
    sims = {k: judge.similarity([x.text for x in v["results"]], refs_list) for k, v in out.items()}
    sims["draft"] = judge.similarity(drafts, refs_list)
    diffs = [a - b for a, b in zip(sims["after"], sims["before"])]
    lo, hi = paired_bootstrap(diffs)
    print(f"\n{len(reqs)} held-out prompts, drafts = real worse answers from the ranked data, "
          f"max_new_tokens={max_new}, in_context={in_context}")
    rep = {k: statistics.fmean(repeated_ngram_fraction(x.text) for x in out[k]["results"]) for k in ("before", "after")}
    rep["draft"] = statistics.fmean(repeated_ngram_fraction(d) for d in drafts)
    heads = " | ".join(f"tokens/pass ({e})" for e in engines)
    print(f"| | {heads} | offline judge (cos to GPT-4 ref) | repeated 4-grams | mean answer tokens |")
    print("|---|" + "---|" * len(engines) + "---|---|---|")
    print("| draft (worse answer) |" + " — |" * len(engines) +
          f" {statistics.fmean(sims['draft']):.3f} | {rep['draft']:.3f} | — |")
    for k in ("before", "after"):
        tpp = " | ".join(f"{out[k][e]['tpp']:.3f}" for e in engines)
        print(f"| aligner {k} training | {tpp} | {statistics.fmean(sims[k]):.3f} | {rep[k]:.3f} | {out[k]['len']:.0f} |")
    print(f"paired judge difference after - before: {statistics.fmean(diffs):+.3f} (95% CI {lo:+.3f} .. {hi:+.3f})")
    for e in engines:
        print(f"figure: tokens_per_pass_after_vs_before_{e} = "
              f"{out['after'][e]['tpp'] / max(1e-9, out['before'][e]['tpp']):.2f}")
    print(f"figure: offline_judge_after_minus_before = {statistics.fmean(diffs):.4f}")
    print(f"figure: repeated_4gram_fraction_after_minus_before = {rep['after'] - rep['before']:.4f}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a mistake in the options: one message listing every problem, exit status 2
        print(f"[compare_aligner] {e}", file=sys.stderr)
        sys.exit(2)
