"""Alignment vectors on the real default model: two style fine-tunes, their vectors, and λ sweeps.

    .venv/bin/python benchmarks/demo_vectors.py [steps=20] [lr=1e-4] [prompts=6] [max_new_tokens=128] \
        [grid_concise=0,0.5,1,1.5] [grid_detailed=0,0.75,1.5] [out=outputs/demo_vectors] [retrain=false]

1. Two aligned variants of SmolLM2-135M-Instruct (the embedded default), each a short plain-PyTorch full
   fine-tune (AdamW, embeddings frozen) on AlpacaEval *train* instructions (id % 4 != 0) from
   ../shared/data/alpaca_eval/ranked_responses.jsonl.gz (read there, never copied):
     concise  — target = the shortest of the 8 models' answers / the reference with 5..40 words
     detailed — target = the longest answer (>= 150 words), cut to `detailed_tokens` tokens
2. Their vectors (python -m jobs.extract_vector, dense; plus a rank-16 compressed copy of `concise`), with the
   extraction's peak memory measured in a child process.
3. python -m jobs.search_knobs over the λ grid of both vectors on held-out instructions (id % 4 == 0 with short
   GPT-4 references, so the base's answers are not all at the length cap), greedy, score = mean answer words.
4. demo_vectors.png: mean words against λ for each vector alone, and the heat map of the mix.
Outputs under `out` (git-ignored); models are reused on a rerun unless retrain=true. Ends with figure lines.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared/data/alpaca_eval"


def kv_args() -> dict:
    return dict(a.split("=", 1) for a in sys.argv[1:])


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


def extract_in_child(aligned: Path, domain: str, out: Path, extra: list[str]) -> tuple[dict, float]:
    """jobs.extract_vector in a child process; returns (metadata, child's peak RSS in MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "jobs.extract_vector", f"aligned={aligned}", f"domain={domain}",
                    f"out={out}", *extra], cwd=ROOT, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return json.loads((out / "vector.json").read_text()), max(peak, before) / 1024


def monotone(xs: list[float], increasing: bool) -> bool:
    return all((b >= a) if increasing else (b <= a) for a, b in zip(xs, xs[1:]))


def main() -> None:
    import torch

    kv = kv_args()
    if not (DATA / "ranked_responses.jsonl.gz").exists():
        print(f"skipped: {DATA} is not here (the demo trains on ../shared/data)")
        return
    torch.set_num_threads(int(kv.get("threads", 2)))
    out = Path(kv.get("out", ROOT / "outputs/demo_vectors"))
    out.mkdir(parents=True, exist_ok=True)
    steps, lr = int(kv.get("steps", 20)), float(kv.get("lr", 1e-4))
    n_prompts, max_new = int(kv.get("prompts", 6)), int(kv.get("max_new_tokens", 128))
    grid_c = [float(x) for x in kv.get("grid_concise", "0,0.5,1,1.5").split(",")]
    grid_d = [float(x) for x in kv.get("grid_detailed", "0,0.75,1.5").split(",")]
    retrain = kv.get("retrain", "false").lower() == "true"
    t_all = time.perf_counter()

    # 1. two aligned variants
    sets = training_sets()
    train = {}
    for name, batch, ans_tok in (("concise", 8, 64), ("detailed", 4, int(kv.get("detailed_tokens", 128)))):
        mdir = out / "models" / name
        if retrain or not (mdir / "train_info.json").exists():
            train[name] = finetune(name, sets[name], mdir, steps, batch, lr, ans_tok)
        else:
            train[name] = json.loads((mdir / "train_info.json").read_text())
            print(f"[demo] reusing {mdir} (retrain=true to redo)")

    # 2. vectors
    from pipeline.vectors import checkpoint_dir

    base_dir = checkpoint_dir("default")
    vec, peaks = {}, {}
    for name in ("concise", "detailed"):
        vec[name], peaks[name] = extract_in_child(out / "models" / name, name, out / "vectors" / name, [])
    vec["concise_r16"], peaks["concise_r16"] = extract_in_child(out / "models" / "concise", "concise_r16",
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
    summary = search(args)
    import pandas as pd

    table = pd.read_csv(out / "search" / "table.csv")

    # the compressed vector at λ = 1, same prompts
    from jobs.search_knobs import answer_all, load_prompts
    from omegaconf import OmegaConf

    from pipeline.models import load_model
    from pipeline.vectors import load_knobbed

    lm = load_model("default")
    km = load_knobbed(lm, {"concise": out / "vectors/concise", "concise_r16": out / "vectors/concise_r16"})
    rows = load_prompts(str(out / "heldout.jsonl"), n_prompts)
    gen = OmegaConf.create({"max_new_tokens": max_new, "batch_size": n_prompts})
    km.apply({"concise_r16": 1.0})
    words_r16 = sum(len(a.split()) for a in answer_all(lm, rows, gen)) / len(rows)
    del km, lm

    # 4. figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    alone_c = table[table["lambda_detailed"] == 0].sort_values("lambda_concise")
    alone_d = table[table["lambda_concise"] == 0].sort_values("lambda_detailed")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.errorbar(alone_c["lambda_concise"], alone_c["score_concise"], yerr=alone_c["sem_concise"], marker="o",
                capsize=3, label="concise vector alone")
    a1.errorbar(alone_d["lambda_detailed"], alone_d["score_detailed"], yerr=alone_d["sem_detailed"], marker="s",
                capsize=3, label="detailed vector alone")
    a1.axhline(max_new * 0.75, color="gray", ls=":", lw=1)
    a1.text(0, max_new * 0.75, f" ~{max_new}-token cap", va="bottom", fontsize=8, color="gray")
    a1.set_xlabel("λ")
    a1.set_ylabel(f"mean answer words ({len(rows)} held-out prompts, ± s.e.)")
    a1.set_title("SmolLM2-135M + λ · AV: answer length")
    a1.grid(alpha=0.3)
    a1.legend()
    xs, ys = sorted(table["lambda_concise"].unique()), sorted(table["lambda_detailed"].unique())
    grid = np.full((len(ys), len(xs)), np.nan)
    for _, r in table.iterrows():
        grid[ys.index(r["lambda_detailed"]), xs.index(r["lambda_concise"])] = r["score_concise"]
    im = a2.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    a2.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    a2.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    for i in range(len(ys)):
        for j in range(len(xs)):
            a2.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", color="w")
    a2.set_xlabel("λ concise")
    a2.set_ylabel("λ detailed")
    a2.set_title("mean answer words, both vectors mixed")
    fig.colorbar(im, ax=a2, shrink=0.85)
    fig.tight_layout()
    fig.savefig(out / "demo_vectors.png", dpi=120)
    plt.close(fig)

    base_words = float(table[(table["lambda_concise"] == 0) & (table["lambda_detailed"] == 0)]["score_concise"].iloc[0])

    def at(c, d):
        t = table[(table["lambda_concise"] == c) & (table["lambda_detailed"] == d)]
        return float(t["score_concise"].iloc[0]) if len(t) else float("nan")

    c1 = at(1.0, 0.0)
    d_top = max(grid_d)
    result = {
        "train": train, "base_words": base_words, "table": str(out / "search/table.csv"),
        "figure": str(out / "demo_vectors.png"), "heatmap": summary["figure"],
        "monotone_concise": monotone(list(alone_c["score_concise"]), increasing=False),
        "monotone_detailed": monotone(list(alone_d["score_detailed"]), increasing=True),
        "words_concise_r16_at_1": words_r16, "wall_s": round(time.perf_counter() - t_all, 1),
        "extract_peak_rss_mb": peaks, "model_mb": model_mb,
        "vector_mb": {k: v["compression"]["stored_bytes"] / 1e6 for k, v in vec.items()},
        "r16_rel_error_total": vec["concise_r16"]["compression"]["rel_error_total"],
        "search_wall_s": summary["wall_s"], "prompts": [r["id"] for r in prompts],
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    print(table.to_string(index=False))
    print(f"\n[demo] figure {out / 'demo_vectors.png'}, heat map {summary['figure']}, table {out / 'search/table.csv'}")
    for name in ("concise", "detailed"):
        t = train[name]
        print(f"figure: {name} fine-tune loss first5 -> last5 = {t['loss_first5']:.3f} -> {t['loss_last5']:.3f} "
              f"({t['steps']} steps x {t['batch']}, {t['train_s']} s)")
    print(f"figure: base mean answer words = {base_words:.1f}")
    for _, r in alone_c.iterrows():
        print(f"figure: mean words, concise lambda={r['lambda_concise']:g} = {r['score_concise']:.1f}")
    for _, r in alone_d.iterrows():
        print(f"figure: mean words, detailed lambda={r['lambda_detailed']:g} = {r['score_detailed']:.1f}")
    print(f"figure: monotone in lambda (concise down, detailed up) = {result['monotone_concise']}, "
          f"{result['monotone_detailed']}")
    print(f"figure: mix concise=1 + detailed={d_top:g} mean words = {at(1.0, d_top):.1f} "
          f"(concise alone {c1:.1f}, detailed alone {at(0.0, d_top):.1f})")
    print(f"figure: concise rank-16 vector at lambda=1 mean words = {words_r16:.1f} (dense {c1:.1f}; "
          f"total rel. error {result['r16_rel_error_total']:.3f}, "
          f"{result['vector_mb']['concise_r16']:.1f} MB vs {result['vector_mb']['concise']:.1f} MB)")
    print(f"figure: extraction peak RSS / checkpoint size = {peaks['concise'] / model_mb:.2f} "
          f"({peaks['concise']:.0f} MB for a {model_mb:.0f} MB model)")
    print(f"figure: demo wall time s = {result['wall_s']}")


if __name__ == "__main__":
    main()
