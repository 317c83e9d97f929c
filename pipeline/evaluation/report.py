"""The evaluation report: one self-contained HTML page (figures embedded as base64 PNGs, inline CSS, no
JavaScript, nothing fetched from the network) plus the same figures as PNG files.

    write_report(results, summary, out_dir) -> out_dir/report.html   (and out_dir/figures/*.png)

`results` is the long per-(prompt, method) frame of `jobs/evaluate.py`; `summary` its aggregate (metrics
with bootstrap intervals, latency, Jacobi statistics, generated tokens, paired comparisons, notes). Jacobi
statistics (passes, tokens per pass, convergence) are shown only for the methods whose engine computed them
(non-null values: the Jacobi engines); generated tokens only for the greedy-continuation engines (vLLM, HF
generate); every other method shows "–" in those columns and is left out of the Jacobi figure. The report
only draws what those two already hold; it computes nothing statistical itself. Anything missing (a judge that
did not run, a metric without values, a method without Jacobi passes, an empty frame) drops the figure, panel
or column that would show it: the report never fails because the evaluation was partial. A figure builder
that raises is a bug and is not hidden: the exception propagates.

Sections: header and caveats, per-method key numbers, quality vs latency (the trade-off figure),
metric panels (win rates against 0.5, scores with intervals), the summary table (best value per column
highlighted), paired comparisons (forest plot and table), Jacobi statistics, answer lengths, the first
few prompts with every method's answer, and the run's configuration.

The figures are drawn in `pipeline.evaluation.figures`; the page is the Jinja template
`templates/report.html.j2` (with `templates/report.css` inlined), rendered with autoescaping. This module
turns (results, summary) into plain values for both: formatted numbers, table rows, figure data URIs.
"""
from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import jinja2
import pandas as pd

from pipeline.evaluation.figures import (FIGURES, MUTED, REFERENCE_COLOR, column, draw_figures, finite,
                                         method_colors, num)

JUDGE_COLUMNS = {  # per-row judge columns shown with the examples: column -> short label
    "offline_sim": "sim", "llm_score": "LLM score", "llm_pref": "LLM pref", "rm_score": "RM score",
    "rm_pref": "RM pref",
}
N_EXAMPLES = 3
EXAMPLE_CHARS = 700
PROMPT_CHARS = 1200
CSS_PX_PER_INCH = 104  # figures are shown at this scale (capped at the page width)

_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("pipeline.evaluation", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    finalize=lambda v: "" if v is None else v,  # a missing value prints as nothing, not "None"
)


# ------------------------------------------------------------------------------------------ formatting

def _fmt(v, kind: str = "score", signed: bool = False) -> str:
    """A metric value: win rates in percent (percentage points when signed), scores with about three
    significant digits; "–" when not a finite number."""
    v = num(v)
    if math.isnan(v):
        return "–"
    sign = "+" if signed else ""
    if kind == "win_rate":
        return f"{v * 100:{sign}.1f}" + (" pp" if signed else "%")
    a = abs(v)
    digits = 3 if a < 1 else 2 if a < 10 else 1 if a < 100 else 0
    return f"{v:{sign}.{digits}f}"


def _fmt_s(v) -> str:
    """Seconds, with a unit."""
    v = num(v)
    if math.isnan(v):
        return "–"
    return f"{v:.3f} s" if 0 < abs(v) < 0.1 else f"{v:.2f} s"


def _fmt_p(p) -> str:
    """A p-value."""
    p = num(p)
    if math.isnan(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_duration(seconds) -> str:
    """A wall time in seconds, minutes or hours, whichever reads best."""
    v = num(seconds)
    if math.isnan(v):
        return "–"
    return f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min" if v < 7200 else f"{v / 3600:.1f} h"


def _truncate(text, n: int = EXAMPLE_CHARS) -> tuple[str, str | None]:
    """The first n characters of a text (missing: empty), and the full text when it had to be cut."""
    text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    return (text, None) if len(text) <= n else (text[:n].rstrip() + " …", text)


# --------------------------------------------------------------------------------------------- the model

class ReportData:
    """Normalised view of (results, summary): method order, metrics with data, per-method numbers."""

    def __init__(self, results: pd.DataFrame | None, summary: dict | None):
        self.df = results if isinstance(results, pd.DataFrame) else pd.DataFrame(results or [])
        self.s = summary if isinstance(summary, dict) else {}
        sm = self.s.get("methods") or {}
        self.sm = sm if isinstance(sm, dict) else {}
        order = list(self.sm)
        if "method" in self.df.columns:
            order += [m for m in self.df["method"].dropna().astype(str).unique() if m not in order]
        base = self.s.get("baseline")
        if base in order:  # the baseline leads everywhere
            order.remove(base)
            order.insert(0, base)
        self.methods = [str(m) for m in order]
        self.colors = method_colors(self.methods)
        metrics = self.s.get("metrics") or {}
        self.metrics = {k: (v if isinstance(v, dict) else {}) for k, v in metrics.items()} \
            if isinstance(metrics, dict) else {}
        # only metrics that at least one method has a value for
        self.metrics = {k: v for k, v in self.metrics.items()
                        if any(finite(self.stat(m, k)["mean"]) for m in self.methods)}

    def kind(self, metric: str) -> str:
        return str(self.metrics.get(metric, {}).get("kind", "score"))

    def label(self, metric: str) -> str:
        return str(self.metrics.get(metric, {}).get("label") or metric)

    def higher_better(self, metric: str) -> bool:
        return bool(self.metrics.get(metric, {}).get("higher_is_better", True))

    def stat(self, method: str, metric: str) -> dict:
        d = ((self.sm.get(method) or {}).get("metrics") or {}).get(metric) or {}
        d = d if isinstance(d, dict) else {}
        return {"mean": num(d.get("mean")), "lo": num(d.get("lo")), "hi": num(d.get("hi")), "n": d.get("n")}

    def rows(self, method: str) -> pd.DataFrame:
        if "method" not in self.df.columns:
            return self.df.iloc[0:0]
        return self.df[self.df["method"].astype(str) == method]

    def latency(self, method: str, key: str) -> float:
        """Latency from the summary; falls back to the per-row mean/percentile of the results."""
        v = num(((self.sm.get(method) or {}).get("latency") or {}).get(key))
        if not math.isnan(v):
            return v
        base, _, q = key.partition("_p")
        col = column(self.rows(method), base if q else key).dropna()
        if col.empty:
            return float("nan")
        return float(col.quantile(int(q) / 100)) if q.isdigit() else float(col.mean())

    def jacobi(self, method: str, key: str) -> float:
        v = num(((self.sm.get(method) or {}).get("jacobi") or {}).get(key))
        if not math.isnan(v):
            return v
        r = self.rows(method)
        col = {"mean_passes": "passes", "tokens_per_pass": "tokens_per_pass", "converged_fraction": "converged"}[key]
        c = column(r, col).dropna()
        return float(c.mean()) if len(c) else float("nan")

    def scalar(self, method: str, key: str) -> float:
        v = num((self.sm.get(method) or {}).get(key))
        if not math.isnan(v):
            return v
        r = self.rows(method)
        if key == "n":
            return float(len(r)) if len(r) else float("nan")
        if key == "errors":
            if "error" not in r.columns:
                return float("nan") if r.empty else 0.0
            return float((r["error"].fillna("").astype(str) != "").sum())
        if key in ("mean_words", "mean_generated_tokens"):
            c = column(r, "answer_words" if key == "mean_words" else "generated_tokens").dropna()
            return float(c.mean()) if len(c) else float("nan")
        return float("nan")

    def jacobi_methods(self) -> list[str]:
        """The methods a Jacobi engine ran: per-row passes, or a mean in the summary (null elsewhere)."""
        out = []
        for m in self.methods:
            p = column(self.rows(m), "passes")
            if p.notna().any() or finite(((self.sm.get(m) or {}).get("jacobi") or {}).get("mean_passes")):
                out.append(m)
        return out

    def paired(self) -> list[dict]:
        out = []
        for p in self.s.get("paired") or []:
            if isinstance(p, dict) and p.get("metric") and p.get("method") and finite(p.get("diff")):
                out.append(p)
        return out


# -------------------------------------------------------------------------------- values for the page

def _header(r: ReportData) -> dict:
    """Benchmark name, the key/value pills under the title, and the notes to read first."""
    s = r.s
    bench = s.get("benchmark") or (r.df["benchmark"].iloc[0] if "benchmark" in r.df.columns and len(r.df) else "")
    n = s.get("n_prompts")
    if n is None and "id" in r.df.columns:
        n = r.df["id"].nunique()
    judges = s.get("judges")
    judges = ", ".join(map(str, judges)) if isinstance(judges, (list, tuple)) else (judges or "")
    pills = [("benchmark", bench or "–"), ("prompts", n if n is not None else "–"), ("methods", len(r.methods)),
             ("judges", judges or "none"), ("baseline", s.get("baseline") or "–"),
             ("created", s.get("created") or "–"), ("wall time", _fmt_duration(s.get("wall_s")))]
    notes = s.get("notes")
    notes = [x for x in notes if str(x).strip()] if isinstance(notes, list) else ([notes] if notes else [])
    return {"benchmark": bench, "pills": [(k, str(v)) for k, v in pills], "notes": notes}


def _cards(r: ReportData) -> list[dict]:
    """One card per method: the headline metric (the first one) with its interval, then latency, tokens per
    pass (Jacobi methods) or generated tokens (greedy-continuation engines), and mean answer length."""
    first = next(iter(r.metrics), None)
    cards = []
    for m in r.methods:
        card = {"method": m, "color": r.colors[m], "value": None, "ci": "", "rows": []}
        if first:
            st, k = r.stat(m, first), r.kind(first)
            card["value"] = _fmt(st["mean"], k)
            if finite(st["lo"]) and finite(st["hi"]):
                card["ci"] = f"[{_fmt(st['lo'], k)}, {_fmt(st['hi'], k)}]"
        card["rows"].append(("latency / prompt", _fmt_s(r.latency(m, "total_s"))))
        tpp, gen = r.jacobi(m, "tokens_per_pass"), r.scalar(m, "mean_generated_tokens")
        if finite(tpp):
            card["rows"].append(("tokens / pass", f"{tpp:.2f}"))
        if finite(gen):
            card["rows"].append(("generated tokens", f"{gen:.0f}"))
        words = r.scalar(m, "mean_words")
        if finite(words):
            card["rows"].append(("mean words", f"{words:.0f}"))
        cards.append(card)
    return cards


def _best(values: list[float], higher: bool | None) -> set[int]:
    """Indices of the best value(s) in a column; nothing when fewer than two distinct finite values."""
    if higher is None:
        return set()
    finite_values = [(i, v) for i, v in enumerate(values) if finite(v)]
    if len({round(v, 12) for _, v in finite_values}) < 2:
        return set()
    target = (max if higher else min)(v for _, v in finite_values)
    return {i for i, v in finite_values if abs(v - target) <= 1e-12}


def _column(head: str, values: list[float], texts: list[str] | None = None, higher: bool | None = None,
            cis: list[str | None] | None = None, title: str | None = None) -> dict:
    """One column of a summary table: its header (with a hover title), and a cell per method with its text
    (the value as an integer when no texts are given), its interval and whether it is the column's best
    (higher=None: no best)."""
    texts = texts or ["–" if not finite(v) else f"{v:.0f}" for v in values]
    cis = cis or [None] * len(values)
    best = _best(values, higher)
    return {"head": head, "title": title,
            "cells": [{"text": t, "ci": c, "best": i in best} for i, (t, c) in enumerate(zip(texts, cis))]}


def _table(r: ReportData, heading: str, cls: str, columns: list[dict]) -> dict:
    """A summary table: one row per method, one cell per column."""
    return {"heading": heading, "cls": cls, "columns": [{"head": c["head"], "title": c["title"]} for c in columns],
            "rows": [{"method": m, "color": r.colors[m], "cells": [c["cells"][i] for c in columns]}
                     for i, m in enumerate(r.methods)]}


def _summary_tables(r: ReportData) -> list[dict]:
    """Two tables over the same methods: quality (every metric with its interval; only when there are
    metrics) and cost (length, latency, Jacobi statistics, errors); the best value of each column
    highlighted. No tables when there are no methods."""
    if not r.methods:
        return []
    M = r.methods
    quality = [_column("n", [r.scalar(m, "n") for m in M])]
    for k in r.metrics:
        kind = r.kind(k)
        stats = [r.stat(m, k) for m in M]
        quality.append(_column(
            k, [st["mean"] for st in stats], [_fmt(st["mean"], kind) for st in stats], r.higher_better(k),
            cis=[f"[{_fmt(st['lo'], kind)}, {_fmt(st['hi'], kind)}]" if finite(st["lo"]) and finite(st["hi"])
                 else None for st in stats],
            title=r.label(k)))
    cost = [_column("mean words", [r.scalar(m, "mean_words") for m in M])]
    for key, head in [("draft_s", "draft s"), ("refine_s", "refine s"), ("total_s", "total s"),
                      ("total_s_p50", "total s p50"), ("total_s_p90", "total s p90")]:
        vals = [r.latency(m, key) for m in M]
        if any(finite(v) for v in vals):
            cost.append(_column(head, vals, [_fmt_s(v).replace(" s", "") for v in vals],
                                False if key.startswith("total") else None))
    jm = set(r.jacobi_methods())
    if jm:
        for key, head, hb, f in [("tokens_per_pass", "tokens / pass", True, "{:.2f}"),
                                 ("mean_passes", "passes", False, "{:.1f}"),
                                 ("converged_fraction", "converged", True, "{:.0%}")]:
            vals = [r.jacobi(m, key) if m in jm else float("nan") for m in M]  # NaN: not a Jacobi engine
            cost.append(_column(head, vals, [f.format(v) if finite(v) else "–" for v in vals], hb))
    gen = [r.scalar(m, "mean_generated_tokens") for m in M]  # NaN: not a greedy-continuation engine
    if any(finite(v) for v in gen):
        cost.append(_column("generated tokens", gen, title="tokens the engine generated per prompt (vLLM, HF "
                                                            "generate; stop tokens included)"))
    cost.append(_column("errors", [r.scalar(m, "errors") for m in M], higher=False))
    tables = [_table(r, "Quality", "summary quality", quality)] if len(quality) > 1 else []
    return tables + [_table(r, "Length, latency (seconds per prompt) and decoding", "summary cost", cost)]


def _metric_legend(r: ReportData) -> list[dict]:
    """Each metric's key, label and direction."""
    return [{"key": k, "label": r.label(k), "better": "higher" if r.higher_better(k) else "lower"}
            for k in r.metrics]


def _paired(r: ReportData) -> dict | None:
    """The paired comparisons as table rows, the rows of a metric together (the first one of a group carries
    the metric and how many rows it spans); None when there are none."""
    paired = r.paired()
    if not paired:
        return None
    span = {k: sum(str(q["metric"]) == k for q in paired) for k in dict.fromkeys(str(q["metric"]) for q in paired)}
    paired = sorted(paired, key=lambda q: list(span).index(str(q["metric"])))
    rows, seen = [], set()
    for p in paired:
        k = str(p["metric"])
        kind = r.kind(k)
        d, pv = num(p["diff"]), num(p.get("p_value"))
        good = (d > 0) == r.higher_better(k) if d != 0 else None
        if pv < 0.05 and good is not None:
            badge, verdict = ("up", "better") if good else ("down", "worse")
        else:
            badge, verdict = None, "not significant" if finite(pv) else "–"
        m = str(p["method"])
        rows.append({"metric": None if k in seen else (r.label(k) if k in r.metrics else k), "span": span[k],
                     "method": m, "color": r.colors.get(m, MUTED), "vs": p.get("vs", ""),
                     "diff": _fmt(d, kind, signed=True),
                     "ci": f"[{_fmt(p.get('lo'), kind, True)}, {_fmt(p.get('hi'), kind, True)}]",
                     "p": _fmt_p(pv), "n": p.get("n", ""), "badge": badge, "verdict": verdict})
        seen.add(k)
    return {"rows": rows, "n_sig": sum(num(p.get("p_value")) < 0.05 for p in paired), "open": len(paired) <= 12}


def _answer_chips(row: pd.Series, judge_cols: list[str]) -> list[dict]:
    """The small labelled values shown with an answer: its judge values, length, latency, and Jacobi passes or
    generated tokens (whichever its engine computed)."""
    chips = []
    for col in judge_cols:
        v = num(row.get(col))
        if finite(v):
            chips.append({"name": JUDGE_COLUMNS[col], "value": _fmt(v), "unit": None})
    for col, unit, f in [("answer_words", "words", "{:.0f}"), ("total_s", "s", "{:.2f}"),
                         ("passes", "passes", "{:.0f}"), ("generated_tokens", "generated tokens", "{:.0f}")]:
        v = num(row.get(col))
        if finite(v):
            chips.append({"name": None, "value": f.format(v), "unit": unit})
    return chips


def _examples(r: ReportData, n: int = N_EXAMPLES) -> list[dict]:
    """The first n prompts: the prompt, then the reference answer (when there is one) and every method's
    answer in method order, truncated with the full text alongside when cut."""
    df = r.df
    if df.empty or "id" not in df.columns:
        return []
    judge_cols = [c for c in JUDGE_COLUMNS if c in df.columns]
    order = {m: i for i, m in enumerate(r.methods)}
    examples = []
    for pid in list(dict.fromkeys(df["id"].tolist()))[:n]:
        rows = df[df["id"] == pid]
        first = rows.iloc[0]
        prompt, full_prompt = _truncate(first.get("prompt", ""), PROMPT_CHARS)
        cat = str(first.get("category", "") or "")
        answers = []
        ref = first.get("reference", "")
        if isinstance(ref, str) and ref.strip():
            text, full = _truncate(ref)
            words = num(first.get("reference_words"))
            chips = [{"name": None, "value": f"{words:.0f}", "unit": "words"}] if finite(words) else []
            answers.append({"kind": "reference", "name": "reference", "color": REFERENCE_COLOR, "text": text,
                            "full": full, "error": None, "error_short": None, "chips": chips})
        if "method" in rows.columns:
            rows = rows.assign(_o=rows["method"].astype(str).map(order)).sort_values("_o")
        for _, row in rows.iterrows():
            m = str(row.get("method", "?"))
            err = row.get("error", "")
            err = err if isinstance(err, str) and err.strip() else None
            text, full = _truncate(row.get("answer", ""))
            answers.append({"kind": "answer", "name": m, "color": r.colors.get(m, MUTED), "text": text, "full": full,
                            "error": err, "error_short": _truncate(err, 80)[0] if err else None,
                            "chips": _answer_chips(row, judge_cols)})
        examples.append({"title": f"Prompt {pid}" + (f" · {cat}" if cat and cat != "nan" else ""),
                         "prompt": prompt, "full_prompt": full_prompt, "answers": answers})
    return examples


def _config_text(r: ReportData) -> str | None:
    """The run's configuration as indented JSON (its str() when not JSON-serialisable); None without one."""
    config = r.s.get("config")
    if not config:
        return None
    try:
        return json.dumps(config, indent=2, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(config)


def _save_figures(r: ReportData, fig_dir: Path) -> dict[str, dict]:
    """Draw the figures, write each as fig_dir/<stem>.png and return stem -> its image on the page (a data
    URI and the display width in CSS pixels, so type has the same size in every figure)."""
    images = {}
    for stem, drawn in draw_figures(r).items():
        (fig_dir / f"{stem}.png").write_bytes(drawn.png)
        images[stem] = {"src": "data:image/png;base64," + base64.b64encode(drawn.png).decode("ascii"),
                        "width": round(drawn.width_in * CSS_PX_PER_INCH)}
    return images


# ------------------------------------------------------------------------------------------------ entry

def write_report(results: pd.DataFrame, summary: dict, out_dir: str | Path) -> Path:
    """Write out_dir/report.html (self-contained) and out_dir/figures/*.png; return the HTML path."""
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for stem in FIGURES:  # a rerun must not leave figures of a metric that is gone now
        (fig_dir / f"{stem}.png").unlink(missing_ok=True)
    r = ReportData(results, summary)
    headline = next(iter(r.metrics), None)
    page = _TEMPLATES.get_template("report.html.j2").render(
        title_benchmark=r.s.get("benchmark", ""),
        header=_header(r),
        cards=_cards(r),
        headline=headline,
        headline_label=r.label(headline) if headline else None,
        figures=_save_figures(r, fig_dir),
        tables=_summary_tables(r),
        metric_legend=_metric_legend(r),
        paired=_paired(r),
        examples=_examples(r),
        n_examples=N_EXAMPLES,
        config=_config_text(r),
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
