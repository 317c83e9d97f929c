"""From per-row evaluation results (one row per prompt and method) to the summary: every metric with a
bootstrap interval, win rates and length-controlled win rates, paired tests against the baseline method,
latency, and what each method's engine computed.

Per method, the engine's own statistics only (each over the method's rows whose engine computes it, None when
none did): ``jacobi`` (mean_passes, tokens_per_pass, converged_fraction) from the Jacobi engines (rows with a
non-null ``passes``), None values for a method whose engine runs no Jacobi iteration (vLLM, HF generate) or no
aligner at all (draft, best_of_n); ``mean_generated_tokens`` from the greedy-continuation engines (rows with a
non-null ``generated_tokens``), None elsewhere.

Metrics (each present only when its judge ran):
* ``offline_sim``  similarity to the reference answer (offline judge), mean over prompts;
* ``offline_win``  / ``offline_lc``  how often the method's answer is closer to the reference than the
                   baseline's answer to the same prompt, raw and length-controlled (AlpacaEval 2 style);
* ``length_only``  the same comparison made by length alone (the longer answer wins): the bar any
                   reference-similarity judge must clear before it says anything beyond "longer";
* ``llm_score``    LLM judge grade 1-10 (MT-bench single grading), unparsed verdicts left out and counted;
* ``llm_pref`` / ``llm_lc``  LLM judge win rate against the reference answer, raw and length-controlled;
* ``rm_score`` / ``rm_pref`` / ``rm_lc``  reward model: reward, and preference over the reference.
"""
from __future__ import annotations

import math

import pandas as pd

from pipeline.evaluation.stats import bootstrap_ci, lc_win_rate_ci, length_controlled_win_rate, paired_test

METRICS = {
    "offline_sim": ("Offline judge: similarity to the reference answer", "score"),
    "offline_win": ("Offline judge: win rate vs {baseline} (closer to the reference)", "win_rate"),
    "offline_lc": ("Offline judge: length-controlled win rate vs {baseline}", "win_rate"),
    "length_only": ("Length only: win rate vs {baseline} (longer answer wins)", "win_rate"),
    "llm_score": ("LLM judge: grade 1-10", "score"),
    "llm_pref": ("LLM judge: win rate vs the reference answer", "win_rate"),
    "llm_lc": ("LLM judge: length-controlled win rate vs the reference", "win_rate"),
    "rm_score": ("Reward model: reward", "score"),
    "rm_pref": ("Reward model: preference over the reference answer", "win_rate"),
    "rm_lc": ("Reward model: length-controlled preference over the reference", "win_rate"),
}


def _ci(values, n_boot: int, seed: int) -> dict:
    vals = [float(v) for v in values if v == v]  # drop NaN
    est, lo, hi = bootstrap_ci(vals, n_boot=n_boot, seed=seed)
    return {"mean": est, "lo": lo, "hi": hi, "n": len(vals)}


def _lc(prefs: list[float], diffs: list[float], n_boot: int, seed: int) -> dict | None:
    if len(prefs) < 5 or len(set(diffs)) < 2:
        return None
    lc = length_controlled_win_rate(prefs, diffs)["lc_win_rate"]
    lo, hi = lc_win_rate_ci(prefs, diffs, n_boot=min(n_boot, 300), seed=seed)
    return {"mean": lc, "lo": lo, "hi": hi, "n": len(prefs)}


def _pref(a: float, b: float) -> float:
    return 1.0 if a > b else 0.0 if a < b else 0.5


def _jacobi(g: pd.DataFrame) -> dict:
    """Jacobi statistics over the rows a Jacobi engine refined (non-null passes); None values when there are none."""
    passes = (pd.to_numeric(g["passes"], errors="coerce") if "passes" in g else pd.Series(dtype=float)).dropna()
    if passes.empty:
        return {"mean_passes": None, "tokens_per_pass": None, "converged_fraction": None}
    j, total = g.loc[passes.index], int(passes.sum())
    return {"mean_passes": float(passes.mean()),
            "tokens_per_pass": float(j["new_tokens"].sum() / total) if total else 0.0,
            "converged_fraction": float(j["converged"].astype(bool).mean())}


def summarize(df: pd.DataFrame, baseline: str = "draft", n_boot: int = 1000, seed: int = 0) -> dict:
    """The summary dict of an evaluation (see `pipeline/evaluation/report.py` for how it is shown)."""
    ok = df[df["error"] == ""]
    methods = list(dict.fromkeys(ok["method"]))
    has = {c for c in ("offline_sim", "llm_score", "llm_pref", "rm_score", "rm_pref")
           if c in ok and ok[c].notna().any()}
    base = ok[ok["method"] == baseline].set_index("id") if baseline in methods else None
    out: dict = {"baseline": baseline if base is not None else None, "methods": {}, "paired": []}
    present: set[str] = set()
    for m in methods:
        g = ok[ok["method"] == m]
        rec: dict = {"n": int(len(g)), "errors": int(((df["method"] == m) & (df["error"] != "")).sum()),
                     "mean_words": float(g["answer_words"].mean()) if len(g) else math.nan, "metrics": {}}
        for c in has:
            rec["metrics"][c] = _ci(g[c], n_boot, seed)
            if c.endswith("_pref"):  # against the reference: also length-controlled
                k = g[g[c].notna()]
                lc = _lc(k[c].tolist(), (k["answer_words"] - k["reference_words"]).astype(float).tolist(), n_boot, seed)
                if lc:
                    rec["metrics"][c.replace("_pref", "_lc")] = lc
        if "llm_score" in has:
            rec["llm_unparsed"] = int(g["llm_score"].isna().sum())
        if "llm_pref" in has:
            rec["llm_pref_unparsed"] = int(g["llm_pref"].isna().sum())
        if base is not None and m != baseline:
            j = g.set_index("id").join(base, rsuffix="_b", how="inner")
            lp = [_pref(a, b) for a, b in zip(j["answer_words"], j["answer_words_b"])]
            rec["metrics"]["length_only"] = _ci(lp, n_boot, seed)
            if "offline_sim" in has:
                jj = j[j["offline_sim"].notna() & j["offline_sim_b"].notna()]
                prefs = [_pref(a, b) for a, b in zip(jj["offline_sim"], jj["offline_sim_b"])]
                rec["metrics"]["offline_win"] = _ci(prefs, n_boot, seed)
                lc = _lc(prefs, (jj["answer_words"] - jj["answer_words_b"]).astype(float).tolist(), n_boot, seed)
                if lc:
                    rec["metrics"]["offline_lc"] = lc
            for c in sorted(has):
                jj = j[j[c].notna() & j[f"{c}_b"].notna()]
                if len(jj) >= 2:
                    t = paired_test(jj[c].tolist(), jj[f"{c}_b"].tolist(), n_boot=n_boot, seed=seed)
                    out["paired"].append({"metric": c, "method": m, "vs": baseline, "diff": t["mean_diff"],
                                          "lo": t["ci_low"], "hi": t["ci_high"], "p_value": t["p_value"],
                                          "n": t["n"], "wins": t["wins"], "losses": t["losses"], "ties": t["ties"]})
        lat = {k: float(g[k].mean()) if len(g) else 0.0 for k in ("draft_s", "refine_s", "total_s")}
        lat["total_s_p50"] = float(g["total_s"].median()) if len(g) else 0.0
        lat["total_s_p90"] = float(g["total_s"].quantile(0.9)) if len(g) else 0.0
        rec["latency"] = lat
        rec["jacobi"] = _jacobi(g)
        gen = pd.to_numeric(g["generated_tokens"], errors="coerce").dropna() if "generated_tokens" in g else []
        rec["mean_generated_tokens"] = float(gen.mean()) if len(gen) else None
        present |= set(rec["metrics"])
        out["methods"][m] = rec
    order = ["offline_sim", "offline_lc", "offline_win", "length_only", "llm_score", "llm_pref", "llm_lc",
             "rm_score", "rm_pref", "rm_lc"]
    out["metrics"] = {k: {"label": METRICS[k][0].format(baseline=baseline), "kind": METRICS[k][1],
                          "higher_is_better": True} for k in order if k in present}
    return out
