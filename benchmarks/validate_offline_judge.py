"""How far the offline judge can be trusted: agreement with GPT-4-turbo on real answers of 8 models.

    .venv/bin/python benchmarks/validate_offline_judge.py [prompts=805] [split=heldout|train|all]

For each AlpacaEval instruction, `ranked_responses.jsonl.gz` holds 8 models' answers with the GPT-4-turbo
judge's probability of beating the reference. For every pair of answers to the same instruction we ask
whether a judge orders them like GPT-4-turbo: the offline judge (cosine similarity to the GPT-4 reference
answer in MiniLM space), answer length alone (longer wins), and the offline judge with length regressed
out. Chance is 0.5.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
import time
from pathlib import Path
from typing import Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RANKED = ROOT.parent / "shared/data/alpaca_eval/ranked_responses.jsonl.gz"


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    prompts: int = Field(805, description="instructions used (the first ones of the split)")
    split: Literal["heldout", "train", "all"] = Field(
        "heldout", description="heldout (id % 4 == 0) | train (the others) | all")


def main():
    options = load_config(Options, None, sys.argv[1:])
    if not RANKED.exists():
        print(f"skipped: {RANKED} not found (needs ../shared/data)")
        return
    n, split = options.prompts, options.split
    import torch

    from pipeline.scoring.embedding import EmbeddingJudge
    from pipeline.evaluation.stats import pairwise_agreement

    torch.set_num_threads(2)
    rows = [json.loads(x) for x in gzip.open(RANKED, "rt")]
    if split != "all":
        rows = [r for r in rows if (r["id"] % 4 == 0) == (split == "heldout")]
    rows = rows[:n]
    judge = EmbeddingJudge()
    t0 = time.perf_counter()
    answers = [a["output"] for r in rows for a in r["responses"]]
    ref_vecs = judge.embed([r["reference_output"] for r in rows])  # each reference once
    ans_vecs = judge.embed([a or " " for a in answers])
    owner = [i for i, r in enumerate(rows) for _ in r["responses"]]
    sims = [0.0 if not a.strip() else float(ans_vecs[k] @ ref_vecs[owner[k]]) for k, a in enumerate(answers)]
    wall = time.perf_counter() - t0
    lens = [len(a.split()) for a in answers]
    # length-residualised similarity: subtract the least-squares fit of sim on log length
    import math
    xs = [math.log1p(x) for x in lens]
    mx, my = sum(xs) / len(xs), sum(sims) / len(sims)
    beta = sum((x - mx) * (y - my) for x, y in zip(xs, sims)) / max(1e-12, sum((x - mx) ** 2 for x in xs))
    resid = [y - beta * (x - mx) for x, y in zip(xs, sims)]
    groups = {"offline judge (cos to GPT-4 reference)": sims, "length only (longer wins)": lens,
              "offline judge, length regressed out": resid}
    truth = [float(a["win_prob_vs_reference"]) for r in rows for a in r["responses"]]
    out, k = {}, 0
    sizes = [len(r["responses"]) for r in rows]
    for name, scores in groups.items():
        g, k = [], 0
        for s in sizes:
            g.append(list(zip(truth[k:k + s], scores[k:k + s])))
            k += s
        out[name] = pairwise_agreement(g)
    print(f"{len(rows)} instructions ({split}), {len(answers)} answers, embedded in {wall:.1f}s")
    print("| judge | pairwise agreement with GPT-4-turbo | 95% CI | pairs |")
    print("|---|---|---|---|")
    for name, r in out.items():
        print(f"| {name} | {r['agreement']:.3f} | {r['ci_low']:.3f}-{r['ci_high']:.3f} | {r['pairs']} |")
    a = list(out.values())
    print(f"figure: offline_judge_agreement = {a[0]['agreement']:.3f}")
    print(f"figure: length_only_agreement = {a[1]['agreement']:.3f}")
    print(f"figure: offline_judge_length_controlled_agreement = {a[2]['agreement']:.3f}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a mistake in the options: one message listing every problem, exit status 2
        print(f"[validate_offline_judge] {e}", file=sys.stderr)
        sys.exit(2)
