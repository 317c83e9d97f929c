"""Grid search over alignment-vector knobs: score every combination of λ per domain toward a target.

    python -m jobs.search_knobs domains.concise.vector=outputs/vectors/concise \\
        'domains.concise.grid=[0,0.5,1,1.5]' domains.concise.score=length_words domains.concise.target=20
    python -m jobs.search_knobs config=my_search.yaml

The base model is loaded once; every grid point is a knob switch on it (pipeline/vectors/), never a reload.
For each point the knobbed model answers the prompts (greedy `generate`, or refines the rows' drafts with the
fast Jacobi engine: `generation.mode=refine`), and each domain's score is computed on its prompt set:
`length_words` / `length_tokens` (mean answer length) or `judge` (offline embedding similarity to the row's
reference answer, pipeline/scoring/embedding.py). A domain's loss is |score - target| when it has a target, else
-score (`direction: max`) or score (`direction: min`); the objective is the weighted sum of the losses.

Outputs in `out`: table.csv (one row per grid point: λ per domain, score per domain, objective, seconds),
answers.jsonl, best.json, summary.json, and knobs.png: a curve of score against λ for one domain, heat maps
(each domain's score and the objective) for two, nothing for more (the table has everything).
"""
from __future__ import annotations

import gzip
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from jobs.config import REPO, ConfigError, expand, load_config, run_job, to_yaml

SCORES = ("length_words", "length_tokens", "judge")


@dataclass
class DomainCfg:
    vector: str = ""  # folder written by jobs.extract_vector
    grid: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    score: str = "length_words"
    target: Optional[float] = None  # null: optimize in `direction`
    direction: str = "max"  # max | min, when there is no target
    weight: float = 1.0
    prompts: Optional[str] = None  # this domain's prompt file; null = prompts.path


@dataclass
class PromptsCfg:
    path: str = "demo"  # .jsonl / .jsonl.gz with prompt | instruction | question (+ reference | reference_output, draft)
    limit: Optional[int] = 8


@dataclass
class GenerationCfg:
    mode: str = "generate"  # generate | refine
    max_new_tokens: int = 96
    batch_size: int = 8


@dataclass
class SearchKnobsConfig:
    model: str = "default"
    dtype: str = "auto"
    device: str = "auto"
    domains: dict[str, DomainCfg] = field(default_factory=dict)
    prompts: PromptsCfg = field(default_factory=PromptsCfg)
    generation: GenerationCfg = field(default_factory=GenerationCfg)
    out: str = "outputs/search_knobs"
    check_base: bool = True
    torch_threads: Optional[int] = None


def validate(cfg) -> None:
    problems = []
    if not cfg.domains:
        problems.append("domains: give at least one, e.g. domains.concise.vector=outputs/vectors/concise")
    for name, d in cfg.domains.items():
        if not d.vector or not (Path(expand(d.vector)) / "vector.json").exists():
            problems.append(f"domains.{name}.vector: no alignment vector at {d.vector!r}")
        if not d.grid:
            problems.append(f"domains.{name}.grid: needs at least one λ")
        if d.score not in SCORES:
            problems.append(f"domains.{name}.score: {d.score!r} is not one of {', '.join(SCORES)}")
        if d.direction not in ("max", "min"):
            problems.append(f"domains.{name}.direction: {d.direction!r} is not max or min")
        src = d.prompts or cfg.prompts.path
        if src != "demo" and not Path(expand(src)).exists():
            problems.append(f"domains.{name}.prompts: file not found: {src}")
    if cfg.generation.mode not in ("generate", "refine"):
        problems.append(f"generation.mode: {cfg.generation.mode!r} is not generate or refine")
    if cfg.generation.max_new_tokens < 1 or cfg.generation.batch_size < 1:
        problems.append("generation.max_new_tokens and generation.batch_size must be >= 1")
    if cfg.prompts.limit is not None and cfg.prompts.limit < 1:
        problems.append("prompts.limit: must be >= 1 or null")
    if problems:
        raise ConfigError(problems)


def load_prompts(path: str, limit: int | None) -> list[dict]:
    """Rows {id, prompt, reference, draft} from a JSONL (optionally gzipped) file; `demo` = bundled prompts."""
    p = REPO / "pipeline" / "data" / "demo_prompts.jsonl" if path == "demo" else Path(expand(path))
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            prompt = r.get("prompt") or r.get("instruction") or r.get("question")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError([f"{p}:{n + 1}: no prompt / instruction / question"])
            rows.append({"id": str(r.get("id", n)), "prompt": prompt,
                         "reference": r.get("reference") or r.get("reference_output"),
                         "draft": r.get("draft") or r.get("output")})
            if limit and len(rows) >= limit:
                break
    return rows


class Scorer:
    def __init__(self, tokenizer):
        self.tok, self._judge = tokenizer, None

    def __call__(self, kind: str, answers: list[str], rows: list[dict]) -> list[float]:
        if kind == "length_words":
            return [float(len(a.split())) for a in answers]
        if kind == "length_tokens":
            return [float(len(self.tok(a, add_special_tokens=False)["input_ids"])) for a in answers]
        refs = [r["reference"] for r in rows]
        if any(not isinstance(x, str) or not x for x in refs):
            raise ConfigError(["score=judge needs a reference (reference / reference_output) on every prompt row"])
        if self._judge is None:
            from pipeline.scoring.embedding import EmbeddingJudge

            self._judge = EmbeddingJudge()
        return self._judge.similarity(answers, refs)


def answer_all(lm, rows: list[dict], gen, refiner=None) -> list[str]:
    from pipeline.decoding.drafting import SamplingParams, generate_answers
    from pipeline.decoding.refiner import RefineRequest

    out = []
    for i in range(0, len(rows), gen.batch_size):
        chunk = rows[i:i + gen.batch_size]
        convs = [[{"role": "user", "content": r["prompt"]}] for r in chunk]
        if refiner is None:
            params = SamplingParams(max_new_tokens=gen.max_new_tokens, do_sample=False)
            out += [a[0] for a in generate_answers(lm, convs, params, seed_key="search")]
        else:
            out += [x.text for x in refiner.refine([RefineRequest(c, r["draft"] or "", key=r["id"])
                                                    for c, r in zip(convs, chunk)])]
    return out


def loss(d, score: float) -> float:
    if d.target is not None:
        return abs(score - d.target)
    return -score if d.direction == "max" else score


def plot(table, names: list[str], cfg, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if len(names) == 1:
        n = names[0]
        d = cfg.domains[n]
        t = table.sort_values(f"lambda_{n}")
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.errorbar(t[f"lambda_{n}"], t[f"score_{n}"], yerr=t[f"sem_{n}"], marker="o", capsize=3)
        if d.target is not None:
            ax.axhline(d.target, color="gray", ls="--", label=f"target {d.target:g}")
            ax.legend()
        ax.set_xlabel(f"λ ({n})")
        ax.set_ylabel(f"{d.score} (mean ± s.e.)")
        ax.set_title(f"{n}: {d.score} against λ")
        ax.grid(alpha=0.3)
    elif len(names) == 2:
        a, b = names
        xs, ys = sorted(table[f"lambda_{a}"].unique()), sorted(table[f"lambda_{b}"].unique())
        panels, seen = [], {}
        for n in names:  # domains scored the same way on the same prompts share one panel
            d = cfg.domains[n]
            what = (d.score, d.prompts or cfg.prompts.path)
            if what in seen:
                panels[seen[what]] = (panels[seen[what]][0], f"{panels[seen[what]][1].split(':')[0]}, {n}: {d.score}")
                continue
            seen[what] = len(panels)
            panels.append((f"score_{n}", f"{n}: {d.score}"))
        panels.append(("objective", "objective (lower is better)"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4))
        for ax, (col, title) in zip(axes, panels):
            grid = np.full((len(ys), len(xs)), np.nan)
            for _, r in table.iterrows():
                grid[ys.index(r[f"lambda_{b}"]), xs.index(r[f"lambda_{a}"])] = r[col]
            im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
            ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
            ax.set_xlabel(f"λ ({a})")
            ax.set_ylabel(f"λ ({b})")
            ax.set_title(title)
            mid = (np.nanmin(grid) + np.nanmax(grid)) / 2
            for i in range(len(ys)):
                for j in range(len(xs)):
                    if grid[i, j] == grid[i, j]:
                        ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", fontsize=8,
                                color="k" if grid[i, j] > mid else "w")
            fig.colorbar(im, ax=ax, shrink=0.8)
    else:
        return False
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    import pandas as pd
    import torch

    from pipeline.models import load_model
    from pipeline.vectors.knobs import load_knobbed

    started = time.perf_counter()
    cfg = load_config(SearchKnobsConfig, "conf/search_knobs.yaml", argv)
    validate(cfg)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    out = Path(expand(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    names = sorted(cfg.domains)
    sets = {n: cfg.domains[n].prompts or cfg.prompts.path for n in names}
    rows = {src: load_prompts(src, cfg.prompts.limit) for src in set(sets.values())}
    if cfg.generation.mode == "refine":
        missing = [src for src, rs in rows.items() if any(not r["draft"] for r in rs)]
        if missing:
            raise ConfigError([f"generation.mode=refine needs a draft (draft / output) on every row of {missing}"])
    t0 = time.perf_counter()
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    load_s = time.perf_counter() - t0
    knobbed = load_knobbed(lm, {n: expand(cfg.domains[n].vector) for n in names}, cache_size=1,
                           check_base=cfg.check_base)
    refiner = None
    if cfg.generation.mode == "refine":
        from pipeline.decoding.jacobi import RefineSettings
        from pipeline.decoding.refiner import Refiner

        refiner = Refiner(lm, RefineSettings(max_new_tokens=cfg.generation.max_new_tokens), mode="fast")
    scorer = Scorer(lm.tokenizer)
    records, answers_log = [], []
    points = list(itertools.product(*[cfg.domains[n].grid for n in names]))
    print(f"[search_knobs] {len(points)} grid points x {sum(len(r) for r in rows.values())} prompts; "
          f"model loaded once in {load_s:.1f} s", flush=True)
    for k, lams in enumerate(points):
        setting = dict(zip(names, map(float, lams)))
        t1 = time.perf_counter()
        sw = knobbed.apply(setting)
        answers = {src: answer_all(lm, rs, cfg.generation, refiner) for src, rs in rows.items()}
        rec = {f"lambda_{n}": setting[n] for n in names}
        obj = 0.0
        for n in names:
            d, src = cfg.domains[n], sets[n]
            vals = scorer(d.score, answers[src], rows[src])
            mean = sum(vals) / len(vals)
            sem = (sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5 / len(vals) ** 0.5
            rec[f"score_{n}"], rec[f"sem_{n}"] = mean, sem
            obj += d.weight * loss(d, mean)
        rec["objective"], rec["switch_ms"], rec["seconds"] = obj, sw.switch_ms, time.perf_counter() - t1
        records.append(rec)
        for src, ans in answers.items():
            answers_log += [{"knobs": setting, "prompts": src, "id": r["id"], "answer": a} for r, a in zip(rows[src], ans)]
        print(f"[search_knobs] {k + 1}/{len(points)} {setting}: "
              + ", ".join(f"{n}={rec[f'score_{n}']:.3g}" for n in names) + f", objective {obj:.3g} "
              f"({rec['seconds']:.1f} s)", flush=True)
    knobbed.apply({})
    table = pd.DataFrame(records)
    table.to_csv(out / "table.csv", index=False)
    with open(out / "answers.jsonl", "w") as f:
        for a in answers_log:
            f.write(json.dumps(a, ensure_ascii=False) + "\n")
    best = table.loc[table["objective"].idxmin()].to_dict()
    best_knobs = {n: best[f"lambda_{n}"] for n in names}
    (out / "best.json").write_text(json.dumps({"knobs": best_knobs, **best}, indent=2))
    figure = out / "knobs.png"
    has_fig = plot(table, names, cfg, figure)
    summary = {"points": len(points), "domains": names, "best": best_knobs, "best_objective": best["objective"],
               "table": str(out / "table.csv"), "figure": str(figure) if has_fig else None,
               "model_load_s": round(load_s, 2), "wall_s": round(time.perf_counter() - started, 2),
               "variant_switches": knobbed.stats()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table.to_string(index=False), flush=True)
    print(f"[search_knobs] best {best_knobs} (objective {best['objective']:.4g}); table {out / 'table.csv'}"
          + (f", figure {figure}" if has_fig else ""), flush=True)
    return summary


if __name__ == "__main__":
    run_job("search_knobs")
