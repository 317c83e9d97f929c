"""The evaluation report (pipeline/evaluation/report.py) on synthetic results: no models, a few seconds."""
from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from pipeline.evaluation import figures
from pipeline.evaluation.report import method_colors, write_report
from pipeline.evaluation.summary import summarize

METHODS = ["draft", "refine", "refine_reference", "in_context", "aligner_ar", "best_of_n"]
METRICS = {
    "offline_sim": {"label": "Offline judge: similarity to GPT-4 reference", "higher_is_better": True, "kind": "score"},
    "offline_lc": {"label": "Offline judge, length-controlled win rate vs draft", "higher_is_better": True,
                   "kind": "win_rate"},
    "length_only": {"label": "Length-only baseline: win rate vs draft (longer wins)", "higher_is_better": True,
                    "kind": "win_rate"},
    "llm_pref": {"label": "LLM judge win rate vs reference", "higher_is_better": True, "kind": "win_rate"},
    "llm_lc": {"label": "LLM judge length-controlled win rate vs reference", "higher_is_better": True,
               "kind": "win_rate"},
    "llm_score": {"label": "LLM judge score (1-10)", "higher_is_better": True, "kind": "score"},
    "rm_score": {"label": "Reward model score", "higher_is_better": True, "kind": "score"},
}
JUDGE_COLS = ["offline_sim", "llm_score", "llm_pref", "rm_score", "rm_pref"]
FEW = {k: METRICS[k] for k in ("offline_sim", "length_only")}  # fewer panels: faster tests where breadth is moot


def synthetic(n: int = 40, methods=METHODS, judge_cols=JUDGE_COLS, metrics=METRICS, seed: int = 0):
    """A results frame and summary shaped like jobs/evaluate.py's output: Jacobi statistics only for the methods
    on a Jacobi engine (refine, refine_reference, in_context), generated tokens only for aligner_ar (HF generate),
    neither for draft and best_of_n (null)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ref_words = int(rng.integers(80, 400))
        for j, m in enumerate(methods):
            jac = m in ("refine", "refine_reference", "in_context")
            passes = int(rng.integers(3, 30)) if jac else None
            gen = int(rng.integers(50, 300)) if m == "aligner_ar" else None
            new = int(rng.integers(100, 400))
            draft_s = 0.0 if m == "draft" and i % 2 else float(rng.uniform(0.5, 2.0))
            refine_s = float(rng.uniform(0.5, 3.0)) * (j > 0)
            row = {"id": f"p{i:03d}", "benchmark": "alpaca_eval", "category": ["writing", "coding", ""][i % 3],
                   "method": m, "prompt": f"Question {i}: explain topic {i} in detail.",
                   "answer": f"Answer of {m} to {i}. " + "word " * int(rng.integers(20, 300)),
                   "reference": "" if i == 5 else f"Reference answer {i}. " + "ref " * ref_words,
                   "answer_words": int(rng.integers(50, 450)), "reference_words": 0 if i == 5 else ref_words,
                   "draft_s": draft_s, "refine_s": refine_s, "total_s": draft_s + refine_s, "passes": passes,
                   "new_tokens": new, "tokens_per_pass": new / passes if jac else None,
                   "converged": bool(rng.random() > 0.1) if jac else None, "generated_tokens": gen,
                   "error": "timeout" if (i == 7 and m == "refine") else ""}
            vals = {"offline_sim": rng.uniform(0.4, 0.95), "llm_score": float(rng.integers(1, 11)),
                    "llm_pref": float(rng.choice([0, 0.5, 1])), "rm_score": rng.normal(j * 0.2, 1),
                    "rm_pref": rng.uniform(0, 1)}
            for c in judge_cols:
                row[c] = float("nan") if (i + j) % 11 == 0 else vals[c]
            rows.append(row)
    df = pd.DataFrame(rows)
    smeth = {}
    for j, m in enumerate(methods):
        r = df[df.method == m]
        ms = {}
        for k, spec in metrics.items():
            if spec["kind"] == "win_rate":
                mean = 0.5 if m == "draft" and k in ("offline_lc", "length_only") else float(0.35 + 0.06 * j)
                ms[k] = {"mean": mean, "lo": mean - 0.07, "hi": mean + 0.07, "n": n}
            else:
                col = k if k in r else "offline_sim"
                v = r[col].dropna() if col in r else pd.Series([0.7])
                mean = float(v.mean()) + 0.01 * j
                ms[k] = {"mean": mean, "lo": mean - 0.02 * (1 + abs(mean)), "hi": mean + 0.02 * (1 + abs(mean)),
                         "n": n}
        jac = r.passes.notna().any()
        smeth[m] = {"n": len(r), "errors": int((r.error != "").sum()), "metrics": ms,
                    "latency": {"draft_s": r.draft_s.mean(), "refine_s": r.refine_s.mean(),
                                "total_s": r.total_s.mean(), "total_s_p50": r.total_s.median(),
                                "total_s_p90": r.total_s.quantile(0.9)},
                    "jacobi": {"mean_passes": float(r.passes.mean()) if jac else None,
                               "tokens_per_pass": float(r.tokens_per_pass.mean()) if jac else None,
                               "converged_fraction": float(r.converged.astype(bool).mean()) if jac else None},
                    "mean_generated_tokens": float(r.generated_tokens.mean()) if r.generated_tokens.notna().any()
                    else None,
                    "mean_words": float(r.answer_words.mean())}
    paired = []
    base = methods[0]
    for k in metrics:
        for j, m in enumerate(methods[1:], 1):
            d = 0.02 * j - 0.03
            paired.append({"metric": k, "method": m, "vs": base, "diff": d, "lo": d - 0.025, "hi": d + 0.025,
                           "p_value": 0.01 if abs(d) > 0.025 else 0.4, "n": n})
    summary = {"benchmark": "alpaca_eval", "n_prompts": n, "baseline": base, "judges": ["offline", "llm", "rm"],
               "config": {"aligner": {"model": "SmolLM2-135M-Instruct", "mode": "in_context"}, "seed": 0},
               "created": "2026-11-22T12:00:00Z", "wall_s": 1234.5, "metrics": dict(metrics), "methods": smeth,
               "paired": paired,
               "notes": ["The offline judge measures closeness to the GPT-4 reference, not preference.",
                         "LLM judge verdicts that could not be parsed count as missing."]}
    return df, summary


def _pngs(html: str) -> list[str]:
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)


def test_full_report(tmp_path):
    df, summary = synthetic()
    path = write_report(df, summary, tmp_path / "out")
    assert path == tmp_path / "out" / "report.html" and path.exists()
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "data:image/png;base64," in html
    assert len(_pngs(html)) == 5  # quality/latency, metrics, paired, jacobi, lengths
    for m in METHODS:
        assert m in html
    assert '<table class="summary' in html and '<table class="paired">' in html
    assert 'class="best"' in html  # best value per column highlighted
    assert "p&lt;0.05" in html  # significant paired rows marked
    assert "The offline judge measures" in html  # notes shown
    assert "<script" not in html and "http://" not in html and "https://" not in html  # self-contained
    figs = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    assert figs == ["jacobi.png", "lengths.png", "metrics.png", "paired.png", "quality_latency.png"]
    for f in (tmp_path / "out" / "figures").glob("*.png"):
        data = f.read_bytes()
        assert len(data) > 2000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    # first three prompts shown as examples, nothing after
    assert "Prompt p000" in html and "Prompt p002" in html and "Prompt p003" not in html


def test_only_offline_sim(tmp_path):
    metrics = {"offline_sim": METRICS["offline_sim"]}
    df, summary = synthetic(n=12, judge_cols=["offline_sim"], metrics=metrics)
    summary["paired"] = [p for p in summary["paired"] if p["metric"] == "offline_sim"]
    html = write_report(df, summary, tmp_path).read_text()
    assert "offline_sim" in html and "llm_score" not in html and "rm_score" not in html
    assert (tmp_path / "figures" / "quality_latency.png").stat().st_size > 0


def test_no_judges_at_all(tmp_path):
    df, summary = synthetic(n=8, judge_cols=[], metrics={})
    summary.update(judges=[], paired=[], notes=[])
    html = write_report(df, summary, tmp_path).read_text()
    figs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figs == ["jacobi.png", "lengths.png"]  # no metric figures, but the rest still drawn
    assert '<table class="summary' in html and "refine" in html


def test_metric_declared_but_absent_is_skipped(tmp_path):
    df, summary = synthetic(n=8, judge_cols=["offline_sim"], metrics={"offline_sim": METRICS["offline_sim"]})
    summary["metrics"]["llm_pref"] = METRICS["llm_pref"]  # declared, yet no method has a value for it
    summary["methods"]["refine"]["metrics"]["offline_sim"]["mean"] = float("nan")
    summary["methods"]["draft"]["metrics"]["offline_sim"]["lo"] = None
    html = write_report(df, summary, tmp_path).read_text()
    assert "llm_pref" not in html


def test_single_method(tmp_path):
    df, summary = synthetic(n=6, methods=["draft"], metrics=FEW)
    summary["paired"] = []
    html = write_report(df, summary, tmp_path).read_text()
    assert "draft" in html and _pngs(html)
    assert not (tmp_path / "figures" / "jacobi.png").exists()  # the draft has no Jacobi passes


def test_eight_methods_and_unknown_names(tmp_path):
    methods = METHODS + ["my_method", "other"]
    df, summary = synthetic(n=6, methods=methods, metrics=FEW)
    html = write_report(df, summary, tmp_path).read_text()
    assert "my_method" in html and "other" in html
    colors = method_colors(methods)
    assert len(set(colors.values())) == len(methods) and colors["draft"] == method_colors(["x", "draft"])["draft"]


def test_nan_everywhere_and_empty_histograms(tmp_path):
    df, summary = synthetic(n=5, methods=["draft", "refine"], metrics=FEW)
    for c in ["answer_words", "passes", "tokens_per_pass", "total_s", "offline_sim"]:
        df[c] = np.nan
    for m in summary["methods"].values():
        m["latency"] = {}
        m["jacobi"] = {"mean_passes": 3}  # says Jacobi, but no per-row passes to draw
        m["metrics"]["offline_sim"] = {"mean": float("nan")}
    summary["paired"].append({"metric": "llm_score", "method": "refine", "vs": "draft", "diff": None})
    html = write_report(df, summary, tmp_path).read_text()  # a figure builder that raises fails the test
    assert "<html" in html
    # every figure drawn, or skipped because it has nothing to draw: no latency (quality_latency), no per-row
    # passes (jacobi), no answer lengths (lengths)
    figs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert figs == ["metrics.png", "paired.png"]
    assert len(_pngs(html)) == 2 and 'alt="metrics"' in html and 'alt="paired"' in html


def test_figure_errors_propagate(tmp_path, monkeypatch):
    def broken(r):
        raise RuntimeError("broken figure")

    monkeypatch.setitem(figures.FIGURES, "lengths", broken)
    df, summary = synthetic(n=3, methods=["draft", "refine"], metrics=FEW)
    with pytest.raises(RuntimeError, match="broken figure"):
        write_report(df, summary, tmp_path)


def test_report_from_summarize(tmp_path):
    """The summary as jobs/evaluate.py's finalize builds it (summarize() plus the run's fields), over the rows
    without errors."""
    df, _ = synthetic(n=12)
    ok = df[df["error"] == ""]
    summary = {"benchmark": "alpaca_eval", "n_prompts": int(ok["id"].nunique()), "rows_in": 12,
               "error_rows": int((df["error"] != "").sum()), "judges": ["offline", "llm", "reward"],
               "methods_run": METHODS, "created": "2026-11-22T12:00:00Z", "wall_s": 98.7,
               "notes": ["The offline judge measures closeness to the reference."], "config": {"seed": 0},
               **summarize(df, "draft", n_boot=10, seed=0)}  # few resamples: the shape matters here, not the intervals
    html = write_report(ok, summary, tmp_path).read_text(encoding="utf-8")
    assert len(_pngs(html)) == 5
    for m in METHODS:
        assert m in html
    for k in summary["metrics"]:
        assert f'<span title="{summary["metrics"][k]["label"]}">{k}</span>' in html
    assert '<table class="paired">' in html and "Read this first" in html and "Prompt p002" in html


def test_empty_inputs(tmp_path):
    path = write_report(pd.DataFrame(), {}, tmp_path)
    assert path.exists() and "DiffPO evaluation" in path.read_text()


def test_html_escaping(tmp_path):
    df, summary = synthetic(n=3, methods=["draft", "refine"], metrics=FEW)
    df.loc[df.id == "p000", "prompt"] = "<script>alert('x')</script> & more"
    df.loc[df.id == "p001", "answer"] = "<img src=x onerror=alert(1)>"
    summary["notes"] = ["<b>bold?</b>"]
    summary["config"] = {"x": "</pre><script>"}
    html = write_report(df, summary, tmp_path).read_text()
    assert "<script" not in html and "<img src=x" not in html and "<b>bold?</b>" not in html
    # the quote may be written &#x27; (html.escape) or &#39; (Jinja's markupsafe): the same character
    assert re.search(r"&lt;script&gt;alert\((&#x27;|&#39;)x(&#x27;|&#39;)\)&lt;/script&gt; &amp; more", html)
    assert "&lt;b&gt;bold?&lt;/b&gt;" in html


def test_rerun_removes_stale_figures(tmp_path):
    df, summary = synthetic(n=5, methods=["draft", "refine"], metrics=FEW)
    write_report(df, summary, tmp_path)
    assert (tmp_path / "figures" / "paired.png").exists()
    summary["paired"] = []
    write_report(df, summary, tmp_path)
    assert not (tmp_path / "figures" / "paired.png").exists()


@pytest.mark.parametrize("v,kind,out", [(0.5432, "win_rate", "54.3%"), (0.713, "score", "0.713"),
                                        (7.25, "score", "7.25"), (math.nan, "score", "–")])
def test_format(v, kind, out):
    from pipeline.evaluation.report import _fmt
    assert _fmt(v, kind) == out


def test_jacobi_statistics_only_for_methods_on_a_jacobi_engine(tmp_path):
    """Passes, tokens per pass and convergence belong to the Jacobi engines: the other methods (aligner_ar on HF
    generate, draft, best_of_n) have null values in the summary and "–" in the report, aligner_ar its generated
    tokens instead, and the Jacobi figure draws the Jacobi methods only."""
    from pipeline.evaluation.report import ReportData, _answer_chips, _cards, _summary_tables

    df, _ = synthetic(n=12, metrics=FEW)
    s = summarize(df, "draft", n_boot=10, seed=0)
    jacobi = ["refine", "refine_reference", "in_context"]
    for m in METHODS:
        j = s["methods"][m]["jacobi"]
        if m in jacobi:
            assert j["mean_passes"] > 0 and j["tokens_per_pass"] > 0 and 0 <= j["converged_fraction"] <= 1
            assert s["methods"][m]["mean_generated_tokens"] is None
        else:
            assert j == {"mean_passes": None, "tokens_per_pass": None, "converged_fraction": None}, m
    ar = df[(df.method == "aligner_ar") & (df.error == "")]
    assert s["methods"]["aligner_ar"]["mean_generated_tokens"] == pytest.approx(ar.generated_tokens.mean())
    assert s["methods"]["draft"]["mean_generated_tokens"] is None

    r = ReportData(df[df.error == ""], s)
    assert r.jacobi_methods() == jacobi
    cost = _summary_tables(r)[-1]
    heads = [c["head"] for c in cost["columns"]]
    assert {"tokens / pass", "passes", "converged", "generated tokens"} <= set(heads)
    cells = {row["method"]: {h: c["text"] for h, c in zip(heads, row["cells"])} for row in cost["rows"]}
    for m in METHODS:
        jac_cells = [cells[m][h] for h in ("tokens / pass", "passes", "converged")]
        assert all(t != "–" for t in jac_cells) if m in jacobi else jac_cells == ["–"] * 3, (m, jac_cells)
        assert (cells[m]["generated tokens"] != "–") == (m == "aligner_ar"), m
    cards = {c["method"]: dict(c["rows"]) for c in _cards(r)}
    assert "tokens / pass" in cards["refine"] and "tokens / pass" not in cards["aligner_ar"]
    assert "generated tokens" in cards["aligner_ar"] and "generated tokens" not in cards["draft"]
    units = lambda m: {c["unit"] for c in _answer_chips(df[df.method == m].iloc[0], [])}  # noqa: E731
    assert "passes" in units("refine") and "passes" not in units("aligner_ar") | units("draft")
    assert "generated tokens" in units("aligner_ar")
    write_report(df[df.error == ""], s, tmp_path)
    assert (tmp_path / "figures" / "jacobi.png").exists()
