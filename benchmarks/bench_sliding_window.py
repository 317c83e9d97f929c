"""Fast engine vs the reference loop on a sliding-window aligner, at the shipped refinement settings.

    .venv/bin/python benchmarks/bench_sliding_window.py [rows=4] [layers=4] [hidden=64]

Aligner: a tiny random Gemma-2 (tests/tiny.py: window 8, sliding and full layers alternating, eager attention
with logit soft-capping) with Gemma's chat template. Rows: chat requests whose drafts are perturbed copies of
the aligner's own greedy answer, so the Jacobi loop has something to accept, refined at `RefineSettings()`
(block 256, answers up to 256 tokens: far past the window). Both modes run one row at a time; their output
tokens are asserted identical before any ratio is printed.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from pydantic import Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402
from pipeline.decoding.jacobi import RefineSettings  # noqa: E402
from pipeline.decoding.refiner import RefineRequest, Refiner  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from tests.tiny import WINDOW, save_tiny  # noqa: E402

QUESTIONS = ["Explain why the sky is blue.", "Give three tips for sleeping better.",
             "What does a compiler do?", "Summarize the water cycle.", "How do vaccines work?",
             "Why do leaves change colour in autumn?"]


class Options(Section):
    """The benchmark's key=value options (--help lists them)."""
    rows: int = Field(4, description="chat requests, refined one at a time by both modes")
    layers: int = Field(4, description="layers of the tiny Gemma-2 aligner (sliding and full alternating)")
    hidden: int = Field(64, description="hidden size of the tiny Gemma-2 aligner")


def args():
    o = load_config(Options, None, sys.argv[1:])
    return o.rows, o.layers, o.hidden


def timed(refiner, reqs):
    t = time.perf_counter()
    res = [refiner.refine([r])[0] for r in reqs]
    return time.perf_counter() - t, res


def perturbed(text: str, rng: random.Random) -> str:
    """The text with about one character in ten replaced, dropped or doubled: a draft that is nearly right."""
    out = []
    for ch in text:
        roll = rng.random()
        if roll < 0.04:
            out.append(rng.choice("abcdefghij "))
        elif roll < 0.07:
            continue
        elif roll < 0.10:
            out.append(ch + ch)
        else:
            out.append(ch)
    return "".join(out)


def main():
    n_rows, layers, hidden = args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    settings = RefineSettings()
    with tempfile.TemporaryDirectory() as d:
        lm = load_model(str(save_tiny("gemma2", Path(d) / "gemma2", seed=3, layers=layers, hidden=hidden)),
                        device="cpu", dtype="float32")
    cfg = lm.model.config
    print(f"aligner: tiny Gemma-2, {cfg.num_hidden_layers} layers {cfg.layer_types}, hidden {cfg.hidden_size}, "
          f"sliding window {cfg.sliding_window}, {cfg._attn_implementation} attention, soft-caps "
          f"{cfg.attn_logit_softcapping}/{cfg.final_logit_softcapping}; torch threads {torch.get_num_threads()}")
    print(f"settings: block_size {settings.block_size}, max_new_tokens {settings.max_new_tokens}, "
          f"window {settings.window}, reseed {settings.reseed}")

    rng = random.Random(0)
    chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}] for i in range(n_rows)]
    ar = Refiner(lm, RefineSettings(reserve_tokens=0), mode="ar")
    answers = [r.text for r in ar.refine([RefineRequest(c, "") for c in chats])]
    reqs = [RefineRequest(c, perturbed(a, rng), key=str(i)) for i, (c, a) in enumerate(zip(chats, answers))]

    t_ref, ref = timed(Refiner(lm, settings, mode="reference"), reqs)
    t_fast, fast = timed(Refiner(lm, settings, mode="fast"), reqs)
    identical = sum(f.token_ids == r.token_ids for f, r in zip(fast, ref))
    assert identical == len(reqs), f"fast and reference outputs differ on {len(reqs) - identical} row(s)"
    longest = max(len(r.token_ids) for r in ref)
    assert longest > 4 * WINDOW, "the answers must run well past the window"
    for name, t, res in (("reference", t_ref, ref), ("fast", t_fast, fast)):
        passes = sum(r.passes for r in res)
        new = sum(r.new_tokens for r in res)
        print(f"{name:<9} {t:7.2f}s  passes/row {passes / len(res):6.1f}  tokens/pass {new / passes:5.2f}")
    print(f"{len(reqs)} rows, answers of {min(len(r.token_ids) for r in ref)}-{longest} tokens, window {WINDOW}: "
          f"fast is {t_ref / t_fast:.2f}x faster than the reference loop, identical tokens")
    print(f"figure: gemma2_fast_vs_reference_speedup = {t_ref / t_fast:.2f}")
    print(f"figure: gemma2_identical_rows = {identical}/{len(reqs)}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a mistake in the options: one message listing every problem, exit status 2
        print(f"[bench_sliding_window] {e}", file=sys.stderr)
        sys.exit(2)
