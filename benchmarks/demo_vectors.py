"""Alignment vectors on the real default model: two style fine-tunes, their vectors, and λ sweeps.

    .venv/bin/python benchmarks/demo_vectors.py [steps=20] [lr=1e-4] [prompts=8] [max_new_tokens=192] \
        [grid_concise=0,0.5,1,1.5] [grid_detailed=0,0.5,1] [out=outputs/demo_vectors] [retrain=false] [reuse_search=false]

1. Two aligned variants of SmolLM2-135M-Instruct (the embedded default), each a short plain-PyTorch full
   fine-tune (AdamW, embeddings frozen) on AlpacaEval *train* instructions (id % 4 != 0) from
   ../shared/data/alpaca_eval/ranked_responses.jsonl.gz (read there, never copied):
     concise  — target = the shortest of the 8 models' answers / the reference with 5..40 words
     detailed — target = the longest answer (>= 150 words), cut to `detailed_tokens` tokens
2. Their vectors (jobs.extract_vector, dense; plus a rank-16 compressed copy of `concise`), with the peak
   private memory the extraction adds (sampled from /proc/self/status; the memory-mapped checkpoints' file
   pages are page cache and not counted).
3. python -m jobs.search_knobs over the λ grid of both vectors on held-out instructions (id % 4 == 0 with short
   GPT-4 references, so the base's answers are not all at the length cap), greedy, score = mean answer words
   (target 60); the answers' token counts (and the share at the cap) are computed from its answers.jsonl.
4. demo_vectors.png: mean answer tokens against λ for each vector alone, and the heat map of the mix.
Outputs under `out` (git-ignored); models are reused on a rerun unless retrain=true. Ends with figure lines.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pydantic import ConfigDict, Field  # noqa: E402

from jobs.common.config import ConfigError, Section, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/alpaca_eval"


class Options(Section):
    """The demo's key=value options (--help lists them)."""
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)  # grid_*=1 is the one-point grid "1"
    steps: int = Field(20, description="fine-tuning steps of each style variant")
    lr: float = Field(1e-4, description="AdamW learning rate of the fine-tunes")
    prompts: int = Field(8, description="held-out prompts of the λ sweep")
    max_new_tokens: int = Field(192, description="answer cap of the λ sweep")
    grid_concise: str = Field("0,0.5,1,1.5", description="comma-separated λ values of the concise vector")
    grid_detailed: str = Field("0,0.5,1", description="comma-separated λ values of the detailed vector")
    detailed_tokens: int = Field(128, description="the detailed variant's targets are cut to this many tokens")
    threads: int = Field(2, description="torch threads")
    out: str = Field(str(ROOT / "outputs/demo_vectors"), description="output folder (models, vectors, search, figure)")
    retrain: bool = Field(False, description="fine-tune again even if the models exist under out")
    reuse_search: bool = Field(False, description="reuse out/search (the λ sweep) if it exists")


def training_sets(seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    concise, detailed = [], []
    for line in gzip.open(DATA / "ranked_responses.jsonl.gz", "rt"):
        r = json.loads(line)
        if r["id"] % 4 == 0:  # held out: never trained on
            continue
        outs = [x["output"].strip() for x in r["responses"] if x["output"] and x["output"].strip()]
        outs.append(r["reference_output"].strip())
        short = sorted((o for o in outs if 5 <= len(o.split()) <= 40), key=lambda o: len(o.split()))
        if short:
            concise.append((r["instruction"], short[0]))
        longest = max(outs, key=lambda o: len(o.split()))
        if len(longest.split()) >= 150:
            detailed.append((r["instruction"], longest))
    rng = random.Random(seed)
    rng.shuffle(concise)
    rng.shuffle(detailed)
    return {"concise": concise, "detailed": detailed}


def heldout_prompts(n: int, path: Path) -> list[dict]:
    rows = [json.loads(x) for x in open(DATA / "eval_set.jsonl")]
    rows = [r for r in rows if r["id"] % 4 == 0 and len(r["reference_output"].split()) <= 60][:n]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "instruction": r["instruction"],
                                "reference_output": r["reference_output"]}) + "\n")
    return rows


def finetune(name: str, pairs, out_dir: Path, steps: int, batch: int, lr: float, answer_tokens: int) -> dict:
    """Plain PyTorch: AdamW on the answer tokens only (prompt masked), embeddings frozen."""
    import torch

    from pipeline.models import load_model
    from pipeline.prompts import answer_ids, chat_prompt_ids

    torch.manual_seed(0)
    lm = load_model("default")
    model, tok = lm.model, lm.tokenizer
    model.train()
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)  # tied with the output head: both stay as they are
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    stop, pad = lm.stop_ids[0], tok.pad_token_id
    examples = []
    for q, a in pairs:
        p = chat_prompt_ids(tok, [{"role": "user", "content": q}])[-96:]
        ans = answer_ids(tok, a)
        ans = ans[:answer_tokens] if len(ans) > answer_tokens else ans + [stop]  # cut answers carry no stop
        examples.append((p, ans))
    losses, t0, k = [], time.perf_counter(), 0
    for step in range(steps):
        chunk = [examples[(k + i) % len(examples)] for i in range(batch)]
        k += batch
        width = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (p, a) in enumerate(chunk):
            seq = p + a
            ids[i, :len(seq)] = torch.tensor(seq)
            labels[i, len(p):len(seq)] = torch.tensor(a)
            mask[i, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        print(f"[demo] {name} step {step + 1}/{steps} loss {losses[-1]:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    model.eval()
    emb.requires_grad_(True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    info = {"steps": steps, "batch": batch, "lr": lr, "examples_available": len(pairs),
            "examples_seen": steps * batch, "loss_first": losses[0], "loss_last": losses[-1],
            "loss_first5": sum(losses[:5]) / min(5, len(losses)), "loss_last5": sum(losses[-5:]) / min(5, len(losses)),
            "train_s": round(time.perf_counter() - t0, 1)}
    (out_dir / "train_info.json").write_text(json.dumps(info, indent=2))
    return info


def extract(aligned: Path, domain: str, out: Path, extra: list[str]) -> tuple[dict, float]:
    """python -m jobs.extract_vector's main, in-process; returns (metadata, peak private memory it added, MB)."""
    from benchmarks.bench_vectors import Peak
    from jobs.extract_vector import main as extract_main

    with Peak() as pk:
        meta = extract_main([f"aligned={aligned}", f"domain={domain}", f"out={out}", *extra])
    return meta, pk.extra_mb


def monotone(xs: list[float], increasing: bool) -> bool:
    return all((b >= a) if increasing else (b <= a) for a, b in zip(xs, xs[1:]))


def token_table(search_dir: Path, base_dir: Path, max_new: int):
    """The search table plus, per grid point, answer tokens (mean, s.e.) and the share of answers at the cap,
    computed from answers.jsonl with the model's tokenizer."""
    import pandas as pd
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    table = pd.read_csv(search_dir / "table.csv")
    per: dict = {}
    for line in open(search_dir / "answers.jsonl"):
        r = json.loads(line)
        key = (r["knobs"]["concise"], r["knobs"]["detailed"])
        per.setdefault(key, []).append(len(tok(r["answer"], add_special_tokens=False)["input_ids"]))
    means, sems, capped = [], [], []
    for _, row in table.iterrows():
        t = per[(row["lambda_concise"], row["lambda_detailed"])]
        m = sum(t) / len(t)
        means.append(m)
        sems.append((sum((x - m) ** 2 for x in t) / max(1, len(t) - 1)) ** 0.5 / len(t) ** 0.5)
        capped.append(sum(x >= max_new - 2 for x in t) / len(t))
    table["tokens"], table["sem_tokens"], table["at_cap"] = means, sems, capped
    table = table.rename(columns={"score_concise": "words", "sem_concise": "sem_words"})
    table.to_csv(search_dir / "table_tokens.csv", index=False)
    return table


def make_figure(table, out: Path, max_new: int, n_rows: int):
    """demo_vectors.png: each vector alone (curves) and the mix (heat map); returns the two 1-D slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    alone_c = table[table["lambda_detailed"] == 0].sort_values("lambda_concise")
    alone_d = table[table["lambda_concise"] == 0].sort_values("lambda_detailed")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.errorbar(alone_c["lambda_concise"], alone_c["tokens"], yerr=alone_c["sem_tokens"], marker="o",
                capsize=3, label="concise vector alone")
    a1.errorbar(alone_d["lambda_detailed"], alone_d["tokens"], yerr=alone_d["sem_tokens"], marker="s",
                capsize=3, label="detailed vector alone")
    a1.axhline(max_new, color="gray", ls=":", lw=1)
    a1.text(0, max_new, f" {max_new}-token cap", va="bottom", fontsize=8, color="gray")
    a1.set_xlabel("λ")
    a1.set_ylabel(f"mean answer tokens ({n_rows} held-out prompts, ± s.e.)")
    a1.set_title("SmolLM2-135M + λ · AV: answer length")
    a1.grid(alpha=0.3)
    a1.legend()
    xs, ys = sorted(table["lambda_concise"].unique()), sorted(table["lambda_detailed"].unique())
    grid = np.full((len(ys), len(xs)), np.nan)
    for _, r in table.iterrows():
        grid[ys.index(r["lambda_detailed"]), xs.index(r["lambda_concise"])] = r["tokens"]
    im = a2.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    a2.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    a2.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    mid = (np.nanmin(grid) + np.nanmax(grid)) / 2
    for i in range(len(ys)):
        for j in range(len(xs)):
            a2.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color="k" if grid[i, j] > mid else "w")
    a2.set_xlabel("λ concise")
    a2.set_ylabel("λ detailed")
    a2.set_title("mean answer tokens, both vectors mixed")
    fig.colorbar(im, ax=a2, shrink=0.85)
    fig.tight_layout()
    fig.savefig(out / "demo_vectors.png", dpi=120)
    plt.close(fig)
    return alone_c, alone_d


def main() -> None:
    options = load_config(Options, None, sys.argv[1:])
    import torch

    if not (DATA / "ranked_responses.jsonl.gz").exists():
        print(f"skipped: {DATA} is not here (the demo trains on ../shared/data)")
        return
    torch.set_num_threads(options.threads)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, lr = options.steps, options.lr
    n_prompts, max_new = options.prompts, options.max_new_tokens
    grid_c = [float(x) for x in options.grid_concise.split(",")]
    grid_d = [float(x) for x in options.grid_detailed.split(",")]
    retrain = options.retrain
    t_all = time.perf_counter()

    # 1. two aligned variants
    sets = training_sets()
    train = {}
    for name, batch, ans_tok in (("concise", 8, 64), ("detailed", 4, options.detailed_tokens)):
        mdir = out / "models" / name
        if retrain or not (mdir / "train_info.json").exists():
            train[name] = finetune(name, sets[name], mdir, steps, batch, lr, ans_tok)
        else:
            train[name] = json.loads((mdir / "train_info.json").read_text())
            print(f"[demo] reusing {mdir} (retrain=true to redo)")

    # 2. vectors
    from pipeline.vectors.extract import checkpoint_dir

    base_dir = checkpoint_dir("default")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(base_dir))  # imports and tokenizer caches: not part of the measurement
    vec, peaks = {}, {}
    for name in ("concise", "detailed"):
        vec[name], peaks[name] = extract(out / "models" / name, name, out / "vectors" / name, [])
    vec["concise_r16"], peaks["concise_r16"] = extract(out / "models" / "concise", "concise_r16",
                                                                out / "vectors" / "concise_r16",
                                                                ["compression.rank=16"])
    model_mb = sum(f.stat().st_size for f in base_dir.glob("*.safetensors")) / 1e6

    # 3. λ sweep with jobs.search_knobs (base loaded once; every point is a knob switch)
    prompts = heldout_prompts(n_prompts, out / "heldout.jsonl")
    from jobs.search_knobs import main as search

    args = [f"prompts.path={out / 'heldout.jsonl'}", f"prompts.limit={n_prompts}",
            f"generation.max_new_tokens={max_new}", f"generation.batch_size={n_prompts}", f"out={out / 'search'}",
            f"domains.concise.vector={out / 'vectors/concise'}", f"domains.concise.grid=[{','.join(map(str, grid_c))}]",
            f"domains.detailed.vector={out / 'vectors/detailed'}",
            f"domains.detailed.grid=[{','.join(map(str, grid_d))}]",
            "domains.concise.score=length_words", "domains.detailed.score=length_words",
            "domains.concise.target=60", "domains.detailed.target=60"]
    if options.reuse_search and (out / "search" / "summary.json").exists():
        summary = json.loads((out / "search" / "summary.json").read_text())
        print(f"[demo] reusing {out / 'search'} (reuse_search=false to redo)")
    else:
        summary = search(args)
    table = token_table(out / "search", checkpoint_dir("default"), max_new)

    # the compressed vector at λ = 1, same prompts
    from pipeline.models import load_model
    from pipeline.vectors.knobs import load_knobbed
    from pipeline.vectors.search import answer_all, load_prompts

    lm = load_model("default")
    km = load_knobbed(lm, {"concise": out / "vectors/concise", "concise_r16": out / "vectors/concise_r16"})
    rows = load_prompts(out / "heldout.jsonl", n_prompts)
    km.apply({"concise_r16": 1.0})
    ans = answer_all(lm, rows, batch_size=n_prompts, max_new_tokens=max_new)
    r16_words = sum(len(a.split()) for a in ans) / len(rows)
    r16_tokens = sum(len(lm.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in ans) / len(rows)
    del km, lm

    alone_c, alone_d = make_figure(table, out, max_new, len(rows))

    def at(c, d, col="tokens"):
        t = table[(table["lambda_concise"] == c) & (table["lambda_detailed"] == d)]
        return float(t[col].iloc[0]) if len(t) else float("nan")

    d_top = max(grid_d)
    result = {
        "train": train, "base_tokens": at(0.0, 0.0), "base_words": at(0.0, 0.0, "words"),
        "table": str(out / "search/table_tokens.csv"), "figure": str(out / "demo_vectors.png"),
        "heatmap": summary["figure"],
        "monotone_tokens": [monotone(list(alone_c["tokens"]), False), monotone(list(alone_d["tokens"]), True)],
        "monotone_words": [monotone(list(alone_c["words"]), False), monotone(list(alone_d["words"]), True)],
        "r16_at_1": {"tokens": r16_tokens, "words": r16_words}, "wall_s": round(time.perf_counter() - t_all, 1),
        "extract_peak_added_mb": peaks, "model_mb": model_mb,
        "vector_mb": {k: v["compression"]["stored_bytes"] / 1e6 for k, v in vec.items()},
        "r16_rel_error_total": vec["concise_r16"]["compression"]["rel_error_total"],
        "search_wall_s": summary["wall_s"], "prompts": [r["id"] for r in prompts],
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    cols = ["lambda_concise", "lambda_detailed", "tokens", "sem_tokens", "at_cap", "words", "sem_words", "seconds"]
    print(table[cols].to_string(index=False))
    print(f"\n[demo] figure {out / 'demo_vectors.png'}, heat map {summary['figure']}, "
          f"table {out / 'search/table_tokens.csv'}")
    for name in ("concise", "detailed"):
        t = train[name]
        print(f"figure: {name} fine-tune = {t['steps']} steps x {t['batch']} in {t['train_s']} s "
              f"(loss first5 {t['loss_first5']:.3f}, last5 {t['loss_last5']:.3f})")
    print(f"figure: base mean answer tokens = {at(0, 0):.1f} ({at(0, 0, 'words'):.1f} words, "
          f"{at(0, 0, 'at_cap'):.0%} at the {max_new}-token cap)")
    for name, alone in (("concise", alone_c), ("detailed", alone_d)):
        for _, r in alone.iterrows():
            print(f"figure: {name} lambda={r[f'lambda_{name}']:g}: mean tokens = {r['tokens']:.1f} "
                  f"(words {r['words']:.1f}, at cap {r['at_cap']:.0%})")
    print(f"figure: monotone in lambda, tokens (concise down, detailed up) = {result['monotone_tokens']}; "
          f"words = {result['monotone_words']}")
    print(f"figure: mix concise=1 + detailed={d_top:g}: mean tokens = {at(1.0, d_top):.1f} "
          f"(concise alone {at(1.0, 0.0):.1f}, detailed alone {at(0.0, d_top):.1f})")
    print(f"figure: mix concise=0.5 + detailed=0.5: mean tokens = {at(0.5, 0.5):.1f} "
          f"(concise alone {at(0.5, 0.0):.1f}, detailed alone {at(0.0, 0.5):.1f})")
    print(f"figure: concise rank-16 vector at lambda=1: mean tokens = {r16_tokens:.1f} (dense {at(1.0, 0.0):.1f}; "
          f"total rel. error {result['r16_rel_error_total']:.3f}, "
          f"{result['vector_mb']['concise_r16']:.1f} MB vs {result['vector_mb']['concise']:.1f} MB)")
    print(f"figure: extraction peak added memory / checkpoint size = {peaks['detailed'] / model_mb:.2f} "
          f"({peaks['detailed']:.0f} MB for a {model_mb:.0f} MB checkpoint)")
    print(f"figure: demo wall time s = {result['wall_s']}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:  # a mistake in the options: one message listing every problem, exit status 2
        print(f"[demo_vectors] {e}", file=sys.stderr)
        sys.exit(2)
