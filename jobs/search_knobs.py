"""Grid search over alignment-vector knobs: score every combination of λ per domain toward a target.

    python -m jobs.search_knobs domains.concise.vector=outputs/vectors/concise \\
        'domains.concise.grid=[0,0.5,1,1.5]' domains.concise.score=length_words domains.concise.target=20
    python -m jobs.search_knobs config=my_search.yaml generation.mode=refine generation.refine.block_size=32
    python -m jobs.search_knobs --help                                       # every key, default, meaning

Runs in this process (no Ray). The base model is loaded once; every grid point is a knob switch on it
(pipeline/vectors/knobs.py), never a reload. For each point the knobbed model answers the prompts (greedy
`generate`, or refines the rows' drafts with the fast Jacobi engine: `generation.mode=refine`, settings in
`generation.refine`), and each domain's score is computed on its prompt set (pipeline/vectors/search.py):
`length_words` / `length_tokens` (mean answer length) or `judge` (offline embedding similarity to the row's
reference answer). A domain's loss is |score - target| when it has a target, else -score (`direction: max`)
or score (`direction: min`); the objective is the weighted sum of the losses.

Outputs in `out`: table.csv (one row per grid point: λ per domain, score per domain, objective, seconds),
answers.jsonl, best.json, summary.json, and knobs.png: a curve of score against λ for one domain, heat maps
(each domain's score and the objective) for two, nothing for more (the table has everything).
"""
from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from jobs.common.config import ConfigError, ModelCfg, Section, expand, load_config, resolve_path, to_yaml
from jobs.common.data import DEMO_PROMPTS
from jobs.common.runtime import run_job
from pipeline.decoding.settings import RefineSettings
from pipeline.vectors.search import SCORES, PromptRowsError, Scorer, answer_all, load_prompts, refine_all


# ---- config schema ---------------------------------------------------------------------------------------
class DomainCfg(Section):
    """One knob: its alignment vector, the λ values to try, and how its answers are scored."""
    vector: str = Field("", description="folder written by jobs.extract_vector")
    grid: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0], min_length=1,
                              description="λ values (every combination across the domains is evaluated)")
    score: Literal[SCORES] = Field("length_words", description="length_words | length_tokens | judge (offline "
                                                               "embedding similarity to the row's reference)")
    target: Optional[float] = Field(None, description="a number: minimize |score - target|; null: optimize in "
                                                      "`direction`")
    direction: Literal["max", "min"] = Field("max", description="without a target")
    weight: float = Field(1.0, description="weight of this domain's loss in the objective")
    prompts: Optional[str] = Field(None, description="this domain's prompt file; null = prompts.path")

    def loss(self, score: float) -> float:
        """This domain's part of the objective (lower is better)."""
        if self.target is not None:
            return abs(score - self.target)
        return -score if self.direction == "max" else score


class PromptsCfg(Section):
    path: str = Field("demo", description=".jsonl(.gz) rows with prompt | instruction | question (+ reference | "
                                          "reference_output, draft | output); demo = the bundled demo prompts")
    limit: Optional[int] = Field(8, ge=1, description="first N rows of each prompt file")


class GenerationCfg(Section):
    """How the knobbed model answers."""
    mode: Literal["generate", "refine"] = Field("generate", description="generate: it answers (greedy) | refine: it "
                                                                        "refines each row's draft (fast Jacobi)")
    max_new_tokens: int = Field(96, ge=1, description="generate mode's answer cap (refine mode: refine.max_new_tokens)")
    batch_size: int = Field(8, ge=1, description="prompts per batch")
    refine: RefineSettings = Field(default_factory=RefineSettings)

    def check(self) -> list[str]:
        problems = []  # refine's own problems are reported as generation.refine: ...
        if self.mode == "refine" and "max_new_tokens" in self.model_fields_set:
            problems.append("max_new_tokens: caps generate mode only; with mode=refine set "
                            "generation.refine.max_new_tokens")
        return problems


class SearchKnobsConfig(ModelCfg):
    """The base model the vectors were extracted from (`model`, `dtype`, `device`), the domains and the search."""
    domains: dict[str, DomainCfg] = Field(default_factory=dict, description="name -> knob, e.g. "
                                                                            "domains.concise.vector=...")
    prompts: PromptsCfg = Field(default_factory=PromptsCfg)
    generation: GenerationCfg = Field(default_factory=GenerationCfg)
    out: str = Field("outputs/search_knobs", description="table.csv, answers.jsonl, best.json, summary.json, "
                                                         "knobs.png")
    check_base: bool = Field(True, description="refuse vectors whose base hash differs from the model's")
    torch_threads: Optional[int] = Field(None, ge=1, description="null = torch's default")

    def check(self) -> list[str]:
        problems = ModelCfg.check(self)
        if not self.domains:
            problems.append("domains: give at least one, e.g. domains.concise.vector=outputs/vectors/concise")
        missing = set()
        for name, d in self.domains.items():
            if not d.vector or not (Path(expand(d.vector)) / "vector.json").exists():
                problems.append(f"domains.{name}.vector: no alignment vector at {d.vector!r} (write one with "
                                "jobs.extract_vector)")
            src = self.prompt_source(name)
            if src != "demo" and not resolve_path(src).exists() and src not in missing:
                missing.add(src)
                problems.append(f"{f'domains.{name}.prompts' if d.prompts else 'prompts.path'}: file not found: {src}")
        return problems

    def prompt_source(self, domain: str) -> str:
        """The prompt file `domain` is scored on, as configured ("demo" = the bundled prompts)."""
        return self.domains[domain].prompts or self.prompts.path


# ---- the search -------------------------------------------------------------------------------------------
def read_prompt_sets(cfg: SearchKnobsConfig) -> dict[str, list[dict]]:
    """Prompt source -> its rows (prompts.limit of them), one entry per distinct source of the domains."""
    sets = {}
    for src in sorted({cfg.prompt_source(n) for n in cfg.domains}):
        sets[src] = load_prompts(DEMO_PROMPTS if src == "demo" else resolve_path(src), cfg.prompts.limit)
    if cfg.generation.mode == "refine":
        missing = [src for src, rows in sets.items() if any(not r["draft"] for r in rows)]
        if missing:
            raise ConfigError([f"generation.mode=refine needs a draft (draft / output) on every row of {missing}"])
    return sets


def answerer(cfg: SearchKnobsConfig, lm):
    """rows -> the knobbed model's answers, as `generation` says."""
    g = cfg.generation
    if g.mode == "generate":
        return lambda rows: answer_all(lm, rows, g.batch_size, g.max_new_tokens)
    from pipeline.decoding.refiner import Refiner

    refiner = Refiner(lm, g.refine, mode="fast")
    return lambda rows: refine_all(refiner, rows, g.batch_size)


def score_point(cfg: SearchKnobsConfig, setting: dict[str, float], answers: dict[str, list[str]],
                prompt_sets: dict[str, list[dict]], scorer: Scorer) -> dict:
    """The table row of one grid point: λ, mean score and its standard error per domain, and the objective."""
    rec = {f"lambda_{n}": lam for n, lam in setting.items()}
    objective = 0.0
    for n in setting:
        d, src = cfg.domains[n], cfg.prompt_source(n)
        vals = scorer(d.score, answers[src], prompt_sets[src])
        mean = sum(vals) / len(vals)
        sem = (sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5 / len(vals) ** 0.5
        rec[f"score_{n}"], rec[f"sem_{n}"] = mean, sem
        objective += d.weight * d.loss(mean)
    rec["objective"] = objective
    return rec


def plot(table, names: list[str], cfg: SearchKnobsConfig, path: Path) -> bool:
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
            what = (d.score, cfg.prompt_source(n))
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
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    out = Path(expand(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    names = sorted(cfg.domains)
    prompt_sets = read_prompt_sets(cfg)
    t0 = time.perf_counter()
    lm = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    load_s = time.perf_counter() - t0
    knobbed = load_knobbed(lm, {n: expand(cfg.domains[n].vector) for n in names}, cache_size=1,
                           check_base=cfg.check_base)
    answer, scorer = answerer(cfg, lm), Scorer(lm.tokenizer)
    records, answers_log = [], []
    points = list(itertools.product(*[cfg.domains[n].grid for n in names]))
    print(f"[search_knobs] {len(points)} grid points x {sum(len(r) for r in prompt_sets.values())} prompts; "
          f"model loaded once in {load_s:.1f} s", flush=True)
    for k, lams in enumerate(points):
        setting = dict(zip(names, map(float, lams)))
        t1 = time.perf_counter()
        switch = knobbed.apply(setting)
        answers = {src: answer(rows) for src, rows in prompt_sets.items()}
        rec = score_point(cfg, setting, answers, prompt_sets, scorer)
        rec["switch_ms"], rec["seconds"] = switch.switch_ms, time.perf_counter() - t1
        records.append(rec)
        for src, ans in answers.items():
            answers_log += [{"knobs": setting, "prompts": src, "id": r["id"], "answer": a}
                            for r, a in zip(prompt_sets[src], ans)]
        print(f"[search_knobs] {k + 1}/{len(points)} {setting}: "
              + ", ".join(f"{n}={rec[f'score_{n}']:.3g}" for n in names) + f", objective {rec['objective']:.3g} "
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
    run_job("search_knobs", errors=(PromptRowsError,))
