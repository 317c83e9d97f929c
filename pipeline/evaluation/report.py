"""The evaluation report: one self-contained HTML page (figures embedded as base64 PNGs, inline CSS, no
JavaScript, nothing fetched from the network) plus the same figures as PNG files.

    write_report(results, summary, out_dir) -> out_dir/report.html   (and out_dir/figures/*.png)

`results` is the long per-(prompt, method) frame of `jobs/evaluate.py`; `summary` its aggregate (metrics
with bootstrap intervals, latency, Jacobi statistics, paired comparisons, notes). The report only draws what
those two already hold; it computes nothing statistical itself. Anything missing (a judge that did not
run, a metric without values, a method without Jacobi passes, an empty frame) drops the figure, panel or
column that would show it: the report never fails because the evaluation was partial.

Sections: header and caveats, per-method key numbers, quality vs latency (the trade-off figure),
metric panels (win rates against 0.5, scores with intervals), the summary table (best value per column
highlighted), paired comparisons (forest plot and table), Jacobi statistics, answer lengths, and the
first few prompts with every method's answer.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend or rcParams
changes), so the report can be written from any process or thread.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

# ---------------------------------------------------------------------------------------------- style

KNOWN_COLORS = {
    "draft": "#8d949e",             # the baseline: neutral grey
    "refine": "#1a73e8",
    "refine_reference": "#7e57c2",
    "in_context": "#f29900",
    "aligner_ar": "#1e8e3e",
    "best_of_n": "#d93025",
}
EXTRA_COLORS = ["#12a4b6", "#e52592", "#795548", "#9aa81e", "#5c6bc0", "#00897b", "#ef6c00", "#6d4c41",
                "#c2185b", "#455a64"]
REFERENCE_COLOR = "#3c4043"
INK, MUTED, GRID = "#202124", "#5f6368", "#e8eaed"

JUDGE_COLUMNS = {  # per-row judge columns shown with the examples: column -> short label
    "offline_sim": "sim", "llm_score": "LLM score", "llm_pref": "LLM pref", "rm_score": "RM score",
    "rm_pref": "RM pref",
}
MAX_HEADLINE_PANELS = 3
N_EXAMPLES = 3
EXAMPLE_CHARS = 700
DPI = 144
CSS_PX_PER_INCH = 104  # figures are shown at this scale (capped at the page width)

RC = {
    "font.size": 9.5, "axes.titlesize": 10.5, "axes.titleweight": "bold", "axes.titlelocation": "left",
    "axes.titlepad": 8, "axes.labelsize": 9.5, "axes.labelcolor": MUTED, "axes.edgecolor": "#bdc1c6",
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": GRID,
    "grid.linewidth": 0.8, "axes.axisbelow": True, "xtick.color": MUTED, "ytick.color": MUTED,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.frameon": False, "legend.fontsize": 8.5,
    "text.color": INK, "figure.facecolor": "white", "axes.facecolor": "white",
}


def method_colors(methods: list[str]) -> dict[str, str]:
    """A fixed color per method: known methods keep theirs in every report, others take the next free one."""
    out, used = {}, set()
    for m in methods:
        if m in KNOWN_COLORS:
            out[m] = KNOWN_COLORS[m]
            used.add(out[m])
    free = [c for c in EXTRA_COLORS + list(KNOWN_COLORS.values()) if c not in used]
    for i, m in enumerate(x for x in methods if x not in out):
        out[m] = free[i % len(free)] if free else EXTRA_COLORS[i % len(EXTRA_COLORS)]
    return out


# -------------------------------------------------------------------------------------------- helpers

def _num(x) -> float:
    """A finite float, or NaN for anything else (None, strings, inf, missing)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v if math.isfinite(v) else float("nan")


def _ok(x) -> bool:
    return not math.isnan(_num(x))


def _esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _fmt(v, kind: str = "score", signed: bool = False) -> str:
    v = _num(v)
    if math.isnan(v):
        return "–"
    sign = "+" if signed else ""
    if kind == "win_rate":
        return f"{v * 100:{sign}.1f}" + (" pp" if signed else "%")
    a = abs(v)
    digits = 3 if a < 1 else 2 if a < 10 else 1 if a < 100 else 0
    return f"{v:{sign}.{digits}f}"


def _fmt_s(v) -> str:
    v = _num(v)
    if math.isnan(v):
        return "–"
    return f"{v:.3f} s" if 0 < abs(v) < 0.1 else f"{v:.2f} s"


def _fmt_p(p) -> str:
    p = _num(p)
    if math.isnan(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _truncate(text, n: int = EXAMPLE_CHARS) -> tuple[str, bool]:
    text = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text)
    return (text, False) if len(text) <= n else (text[:n].rstrip() + " …", True)


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column (NaN where missing or unparseable); an all-NaN series when the column is absent."""
    if name in df.columns:
        return pd.to_numeric(df[name], errors="coerce").astype(float)
    return pd.Series(np.nan, index=df.index, dtype=float)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.get_layout_engine().set(w_pad=0.06, h_pad=0.06, wspace=0.06, hspace=0.08)
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def _no_data(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color=MUTED, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def _wrap(label: str, width: int = 48) -> str:
    """Line-wrap a panel title (metric labels can be long)."""
    words, lines, cur = str(label).split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return "\n".join(lines[:3])


# --------------------------------------------------------------------------------------- the model

class _Report:
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
                        if any(_ok(self.stat(m, k)["mean"]) for m in self.methods)}

    def kind(self, metric: str) -> str:
        return str(self.metrics.get(metric, {}).get("kind", "score"))

    def label(self, metric: str) -> str:
        return str(self.metrics.get(metric, {}).get("label") or metric)

    def higher_better(self, metric: str) -> bool:
        return bool(self.metrics.get(metric, {}).get("higher_is_better", True))

    def stat(self, method: str, metric: str) -> dict:
        d = ((self.sm.get(method) or {}).get("metrics") or {}).get(metric) or {}
        d = d if isinstance(d, dict) else {}
        return {"mean": _num(d.get("mean")), "lo": _num(d.get("lo")), "hi": _num(d.get("hi")), "n": d.get("n")}

    def rows(self, method: str) -> pd.DataFrame:
        if "method" not in self.df.columns:
            return self.df.iloc[0:0]
        return self.df[self.df["method"].astype(str) == method]

    def latency(self, method: str, key: str) -> float:
        """Latency from the summary; falls back to the per-row mean/percentile of the results."""
        v = _num(((self.sm.get(method) or {}).get("latency") or {}).get(key))
        if not math.isnan(v):
            return v
        base, _, q = key.partition("_p")
        col = _col(self.rows(method), base if q else key).dropna()
        if col.empty:
            return float("nan")
        return float(col.quantile(int(q) / 100)) if q.isdigit() else float(col.mean())

    def jacobi(self, method: str, key: str) -> float:
        v = _num(((self.sm.get(method) or {}).get("jacobi") or {}).get(key))
        if not math.isnan(v):
            return v
        r = self.rows(method)
        col = {"mean_passes": "passes", "tokens_per_pass": "tokens_per_pass", "converged_fraction": "converged"}[key]
        c = _col(r, col).dropna()
        return float(c.mean()) if len(c) else float("nan")

    def scalar(self, method: str, key: str) -> float:
        v = _num((self.sm.get(method) or {}).get(key))
        if not math.isnan(v):
            return v
        r = self.rows(method)
        if key == "n":
            return float(len(r)) if len(r) else float("nan")
        if key == "errors":
            if "error" not in r.columns:
                return float("nan") if r.empty else 0.0
            return float((r["error"].fillna("").astype(str) != "").sum())
        if key == "mean_words":
            c = _col(r, "answer_words").dropna()
            return float(c.mean()) if len(c) else float("nan")
        return float("nan")

    def jacobi_methods(self) -> list[str]:
        out = []
        for m in self.methods:
            p = _col(self.rows(m), "passes")
            if (p > 0).any() or _num(((self.sm.get(m) or {}).get("jacobi") or {}).get("mean_passes")) > 0:
                out.append(m)
        return out

    def paired(self) -> list[dict]:
        out = []
        for p in self.s.get("paired") or []:
            if isinstance(p, dict) and p.get("metric") and p.get("method") and _ok(p.get("diff")):
                out.append(p)
        return out


# --------------------------------------------------------------------------------------------- figures

def _place_labels(fig: Figure, ax, points: list[tuple]) -> None:
    """Annotate scatter points (x, y, lo, hi, text, color) without overlaps: try offsets near the point, then
    farther out with a leader line, and keep the one that least hits earlier labels, other markers, error
    bars and the axes border (the figure must have been laid out already)."""
    renderer = fig.canvas.get_renderer()
    markers, bars = [], []
    for x, y, lo, hi, *_ in points:
        px, py = ax.transData.transform((x, y))
        markers.append((px - 6, py - 6, px + 6, py + 6))
        _, plo = ax.transData.transform((x, lo if _ok(lo) else y))
        _, phi = ax.transData.transform((x, hi if _ok(hi) else y))
        bars.append((px - 5, min(plo, phi), px + 5, max(plo, phi)))
    axbox = ax.get_window_extent(renderer)
    placed = []
    near = [(9, 6, "left", "bottom"), (9, -6, "left", "top"), (-9, 6, "right", "bottom"),
            (-9, -6, "right", "top"), (12, 0, "left", "center"), (-12, 0, "right", "center")]
    far = [(dx * s, dy, ha, va) for s in (1, -1) for dx, dy in [(22, 0), (22, 16), (22, -16), (34, 28), (34, -28),
                                                                (50, 0)]
           for ha, va in [("left" if s > 0 else "right", "center")]]
    halo = [patheffects.withStroke(linewidth=3, foreground="white")]

    def overlaps(a, b):
        return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])

    for i, (x, y, _, _, text, color) in enumerate(points):
        best, best_score = None, None
        for k, (dx, dy, ha, va) in enumerate(near + far):
            lead = k >= len(near)
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=9,
                              color=color, fontweight="bold", path_effects=halo, zorder=5,
                              arrowprops=dict(arrowstyle="-", color=color, lw=0.7, shrinkA=1, shrinkB=5,
                                              alpha=0.8) if lead else None)
            bb = ann.get_window_extent(renderer)
            box = (bb.x0 - 2, bb.y0 - 1, bb.x1 + 2, bb.y1 + 1)
            score = sum(overlaps(box, q) for q in placed) * 10
            score += sum(overlaps(box, mb) for j, mb in enumerate(markers) if j != i) * 4
            score += sum(overlaps(box, eb) for eb in bars) * 2
            score += (box[0] < axbox.x0 or box[2] > axbox.x1 or box[1] < axbox.y0 or box[3] > axbox.y1) * 6
            score += lead  # near the point is better when it is free
            if best_score is None or score < best_score:
                if best is not None:
                    best[0].remove()
                best, best_score = (ann, box), score
            else:
                ann.remove()
            if score == 0:
                break
        placed.append(best[1])


def fig_quality_latency(r: _Report) -> Figure | None:
    """The trade-off figure: mean total latency per row (x) against quality (y), one point per method."""
    if not r.metrics:
        return None
    first = next(iter(r.metrics))
    panels = [first] + [k for k in r.metrics if k != first and r.kind(k) == "score"]
    panels = panels[:MAX_HEADLINE_PANELS]
    fig = _new_figure(4.3 * len(panels) + 0.6 if len(panels) > 1 else 7.6, 4.1)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    labels = []
    for ax, metric in zip(axes, panels):
        pts = []
        for m in r.methods:
            st, x = r.stat(m, metric), r.latency(m, "total_s")
            if math.isnan(st["mean"]) or math.isnan(x):
                continue
            lo = st["mean"] - st["lo"] if _ok(st["lo"]) else 0.0
            hi = st["hi"] - st["mean"] if _ok(st["hi"]) else 0.0
            ax.errorbar([x], [st["mean"]], yerr=[[max(lo, 0)], [max(hi, 0)]], fmt="o", ms=8, color=r.colors[m],
                        ecolor=r.colors[m], elinewidth=1.6, capsize=4, mec="white", mew=1.2, zorder=3)
            pts.append((x, st["mean"], st["lo"], st["hi"], m, r.colors[m]))
        labels.append((ax, pts))
        if not pts:
            _no_data(ax, "no method has both a value and a latency")
            ax.set_title(_wrap(r.label(metric)))
            continue
        if r.kind(metric) == "win_rate":
            ax.axhline(0.5, color=MUTED, lw=1, ls="--", zorder=1)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.margins(x=0.18, y=0.22)
        if min(p[0] for p in pts) > 0:  # latency axis from 0 (a point at 0 keeps the margin: drafts given)
            ax.set_xlim(left=0)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g} s"))
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.set_xlabel("mean total latency per prompt (draft + refine)")
        ax.set_title(_wrap(r.label(metric), 44 if len(panels) > 1 else 70))
        if r.higher_better(metric):
            ax.text(0.0, 1.0, "↖ better", transform=ax.transAxes, ha="left", va="top", fontsize=8, color=MUTED)
        else:
            ax.text(0.0, 0.0, "↙ better", transform=ax.transAxes, ha="left", va="bottom", fontsize=8, color=MUTED)
    if not any(pts for _, pts in labels):
        return None
    fig.draw_without_rendering()  # lay out once, then place every panel's labels
    for ax, pts in labels:
        if pts:
            _place_labels(fig, ax, pts)
    return fig


def _metric_panel(ax, r: _Report, metric: str, rows: list[str]) -> None:
    """Win rate as a bar against the 0.5 line, or a score as a point; the interval as a whisker. One row per
    method (shared across panels; a method without a value for this metric leaves its row empty)."""
    ys = np.arange(len(rows))[::-1]
    win = r.kind(metric) == "win_rate"
    for y, m in zip(ys, rows):
        st = r.stat(m, metric)
        if math.isnan(st["mean"]):
            continue
        lo = st["mean"] - st["lo"] if _ok(st["lo"]) else 0.0
        hi = st["hi"] - st["mean"] if _ok(st["hi"]) else 0.0
        c = r.colors[m]
        if win:
            ax.barh(y, st["mean"], height=0.62, color=c, alpha=0.85, zorder=2)
            ax.errorbar(st["mean"], y, xerr=[[max(lo, 0)], [max(hi, 0)]], fmt="none", ecolor=INK, elinewidth=1.1,
                        capsize=3, zorder=3)
            ax.text(1.02, y, _fmt(st["mean"], "win_rate"), transform=ax.get_yaxis_transform(), va="center",
                    ha="left", fontsize=8.5, color=INK)
        else:
            ax.errorbar(st["mean"], y, xerr=[[max(lo, 0)], [max(hi, 0)]], fmt="o", ms=7, color=c, ecolor=c,
                        elinewidth=2, capsize=3.5, mec="white", mew=1, zorder=3)
    ax.grid(axis="y", visible=False)
    if win:
        ax.axvline(0.5, color=MUTED, lw=1.1, ls="--", zorder=4)
        ax.set_xlim(0, 1)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    else:
        ax.margins(x=0.12)
        ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_title(_wrap(r.label(metric), 36))


def _grid(n_panels: int, n_rows: int, extra_w: float = 0.0) -> tuple[Figure, np.ndarray]:
    """Up to three panels a row sharing one y axis of n_rows categories (labels only on the left column)."""
    ncol = min(3, n_panels)
    nrow = math.ceil(n_panels / ncol)
    fig = _new_figure(3.4 * ncol + 1.4 + extra_w, nrow * (0.95 + 0.3 * n_rows) + 0.1)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def fig_metrics(r: _Report) -> Figure | None:
    """One panel per metric: win rates as bars against the 0.5 line, scores as points, all with intervals."""
    metrics = sorted(r.metrics, key=lambda k: r.kind(k) != "win_rate")  # win rates first, order kept
    if not metrics:
        return None
    rows = [m for m in r.methods if any(_ok(r.stat(m, k)["mean"]) for k in metrics)]
    fig, axes = _grid(len(metrics), len(rows))
    for ax, metric in zip(axes, metrics):
        _metric_panel(ax, r, metric, rows)
    axes[0].set_yticks(np.arange(len(rows))[::-1], rows)
    axes[0].set_ylim(-0.6, len(rows) - 0.4)
    return fig


def fig_paired(r: _Report) -> Figure | None:
    """Forest plot of the paired differences: method minus comparator, with the interval; filled = p < 0.05."""
    paired = r.paired()
    metrics = list(dict.fromkeys(p["metric"] for p in paired))
    if not metrics:
        return None
    rows = list(dict.fromkeys((str(p["method"]), str(p.get("vs", "?"))) for p in paired))
    ys = dict(zip(rows, np.arange(len(rows))[::-1]))
    fig, axes = _grid(len(metrics), len(rows), extra_w=0.4)
    for ax, metric in zip(axes, metrics):
        win = r.kind(metric) == "win_rate"
        for p in (q for q in paired if q["metric"] == metric):
            d = _num(p["diff"])
            lo = d - _num(p.get("lo")) if _ok(p.get("lo")) else 0.0
            hi = _num(p.get("hi")) - d if _ok(p.get("hi")) else 0.0
            c = r.colors.get(str(p["method"]), MUTED)
            sig = _num(p.get("p_value")) < 0.05
            ax.errorbar(d, ys[(str(p["method"]), str(p.get("vs", "?")))], xerr=[[max(lo, 0)], [max(hi, 0)]], fmt="o",
                        ms=7, color=c, ecolor=c, elinewidth=2, capsize=3.5, mfc=c if sig else "white", mec=c, mew=1.6,
                        zorder=3)
        ax.axvline(0, color=MUTED, lw=1.1, ls="--", zorder=1)
        ax.grid(axis="y", visible=False)
        ax.margins(x=0.15)
        lim = max(abs(v) for v in ax.get_xlim())
        ax.set_xlim(-lim, lim)
        ax.xaxis.set_major_locator(MaxNLocator(5, symmetric=True))
        if win:
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 100:+.0f} pp" if v else "0"))
        ax.set_title(_wrap(r.label(metric), 36))
    axes[0].set_yticks(list(ys.values()), [f"{m} vs {v}" for m, v in ys])
    axes[0].set_ylim(-0.6, len(rows) - 0.4)
    return fig


def _hist_bins(values: list[np.ndarray], integer: bool) -> tuple[np.ndarray, bool]:
    """Shared bins for overlaid histograms, and whether the x axis should be logarithmic (the values span more
    than a factor 15, e.g. a few Jacobi passes next to an autoregressive aligner's hundreds)."""
    allv = np.concatenate(values)
    lo, hi = float(allv.min()), float(allv.max())
    if lo > 0 and hi / lo > 15:
        return np.geomspace(lo * 0.95, hi * 1.05, 30), True
    if integer and hi - lo <= 40:
        return np.arange(math.floor(lo), math.floor(hi) + 2) - 0.5, False
    if hi == lo:
        return np.array([lo - 0.5, hi + 0.5]), False
    return np.linspace(lo, hi, 25), False


def fig_jacobi(r: _Report) -> Figure | None:
    """Histograms of Jacobi passes and tokens per pass, one overlaid step histogram per Jacobi method."""
    methods = r.jacobi_methods()
    if not methods or r.df.empty:
        return None
    fig = _new_figure(10.4, 3.5)
    axes = fig.subplots(1, 2)
    handles = {}
    for ax, (col, title, integer) in zip(axes, [("passes", "Forward passes per prompt", True),
                                                  ("tokens_per_pass", "Tokens per pass (Jacobi methods)", False)]):
        data = {m: _col(r.rows(m), col).dropna().to_numpy() for m in methods}
        data = {m: v[v > 0] for m, v in data.items()}  # 0 = not applicable (no aligner / not Jacobi)
        data = {m: v for m, v in data.items() if len(v)}
        if not data:
            _no_data(ax)
            ax.set_title(title)
            continue
        bins, log = _hist_bins(list(data.values()), integer)
        for m, v in data.items():
            ax.hist(v, bins=bins, histtype="stepfilled", alpha=0.16, color=r.colors[m], zorder=2)
            ax.hist(v, bins=bins, histtype="step", lw=1.8, color=r.colors[m], zorder=3)
            line = ax.axvline(float(np.mean(v)), color=r.colors[m], lw=1.2, ls=":", zorder=4)
            handles.setdefault(m, line)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        elif integer:
            ax.xaxis.set_major_locator(MaxNLocator(8, integer=True))
        ax.set_title(title + (" · log scale" if log else ""))
        ax.set_ylabel("prompts")
        ax.yaxis.set_major_locator(MaxNLocator(5, integer=True))
    if not handles:  # no per-row passes to draw
        return None
    if handles:
        from matplotlib.lines import Line2D
        fig.legend([Line2D([], [], color=r.colors[m], lw=2.2) for m in handles], list(handles),
                   loc="outside upper center", ncol=min(len(handles), 6), fontsize=9)
    return fig


def fig_lengths(r: _Report) -> Figure | None:
    """Answer length (words) per method as violins with median and quartiles; the reference's alongside."""
    rows = {m: _col(r.rows(m), "answer_words").dropna().to_numpy() for m in r.methods}
    rows = {m: v for m, v in rows.items() if len(v)}
    ref = np.array([])
    if "reference_words" in r.df.columns:
        refdf = r.df.drop_duplicates("id") if "id" in r.df.columns else r.df
        ref = _col(refdf, "reference_words").dropna().to_numpy()
        if "reference" in refdf.columns:  # rows without a reference say 0 words; leave them out
            has = refdf["reference"].fillna("").astype(str).str.len().to_numpy() > 0
            ref = _col(refdf[has], "reference_words").dropna().to_numpy()
        ref = ref[ref > 0]
    if not rows:
        return None
    names = list(rows) + (["reference"] if len(ref) else [])
    series = list(rows.values()) + ([ref] if len(ref) else [])
    colors = [r.colors[m] for m in rows] + ([REFERENCE_COLOR] if len(ref) else [])
    fig = _new_figure(10.4, 0.9 + 0.42 * len(names))
    ax = fig.subplots()
    ys = np.arange(len(names))[::-1]
    for y, v, c in zip(ys, series, colors):
        if len(v) >= 2 and np.ptp(v) > 0:
            parts = ax.violinplot([v], positions=[y], orientation="horizontal", widths=0.8, showextrema=False)
            for b in parts["bodies"]:
                b.set_facecolor(c)
                b.set_edgecolor(c)
                b.set_alpha(0.35)
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        ax.hlines(y, q1, q3, color=c, lw=4, zorder=3)
        ax.scatter([med], [y], s=30, color="white", edgecolor=c, linewidth=1.6, zorder=4)
        ax.text(1.005, y, f"median {med:.0f}", transform=ax.get_yaxis_transform(), va="center", ha="left",
                fontsize=8.5, color=MUTED)
    if len(ref):
        ax.axvline(float(np.median(ref)), color=REFERENCE_COLOR, lw=1, ls="--", zorder=1)
    ax.set_yticks(ys, names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.grid(axis="y", visible=False)
    ax.set_xlim(left=0)
    ax.set_xlabel("answer length (words)")
    ax.set_title("Answer length per method" + (" (dashed: median reference length)" if len(ref) else ""))
    return fig


FIGURES = [  # (file stem, builder, section title, caption)
    ("quality_latency", fig_quality_latency, "Quality vs latency",
     "Each point is a method: mean quality with its 95% bootstrap interval against the mean wall time per "
     "prompt (drafting plus refinement). Up and to the left is better."),
    ("metrics", fig_metrics, "Metrics per method",
     "Win rates as bars (dashed line: a coin flip, 50%) and scores as points, with 95% bootstrap intervals."),
    ("paired", fig_paired, "Paired differences",
     "Per-prompt paired differences (method minus comparator) with 95% bootstrap intervals; "
     "filled markers are significant at p < 0.05."),
    ("jacobi", fig_jacobi, "Jacobi decoding",
     "Forward passes the aligner needed per prompt and tokens fixed per pass (dotted lines: means). "
     "Fewer passes and more tokens per pass mean the draft was closer to the aligner's fixed point."),
    ("lengths", fig_lengths, "Answer length",
     "Length distributions (bar: interquartile range, dot: median). Judges tend to prefer longer answers, "
     "so read win rates next to this."),
]


# ------------------------------------------------------------------------------------------------ HTML

CSS = """
:root{--ink:#202124;--muted:#5f6368;--line:#e3e5e8;--bg:#f6f7f9;--card:#fff;--good:#e6f4ea;--goodink:#137333;
--bad:#fce8e6;--badink:#a50e0e;--accent:#1a73e8}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14.5px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",
Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 28px 60px}
header h1{font-size:26px;margin:0 0 4px;letter-spacing:-.01em}
header .sub{color:var(--muted);font-size:14px}
.meta{display:flex;flex-wrap:wrap;gap:8px;margin:14px 0 6px}
.pill{background:var(--card);border:1px solid var(--line);border-radius:999px;padding:3px 12px;font-size:13px}
.pill b{font-weight:600}
.notes{background:#fef7e0;border:1px solid #f9e3a3;border-left:4px solid #f9ab00;border-radius:8px;
padding:10px 16px;margin:16px 0}
.notes h3{margin:0 0 4px;font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:#8a6100}
.notes ul{margin:0;padding-left:20px}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;padding:18px 22px;margin:18px 0;
box-shadow:0 1px 2px rgba(60,64,67,.06)}
section h2{font-size:18px;margin:0 0 4px}
h3.sub{font-size:13px;margin:14px 0 4px;color:var(--muted);font-weight:600}
.caption{color:var(--muted);font-size:13px;margin:0 0 10px}
img.fig{display:block;max-width:100%;height:auto;margin:6px auto 0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(165px,1fr));gap:12px;margin:14px 0 4px}
.card{background:var(--card);border:1px solid var(--line);border-top:4px solid var(--c);border-radius:10px;
padding:10px 14px}
.card .name{font-weight:600;font-size:14px}
.card .big{font-size:24px;font-weight:650;letter-spacing:-.01em;margin-top:2px}
.card .ci{color:var(--muted);font-size:12px}
.card .row{display:flex;justify-content:space-between;font-size:12.5px;color:var(--muted);margin-top:4px}
.card .row b{color:var(--ink);font-weight:600}
.tablewrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px;font-variant-numeric:tabular-nums}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th{font-size:12px;color:var(--muted);font-weight:600;background:#fafbfc;vertical-align:bottom;white-space:normal;
min-width:70px}
th:first-child,td:first-child{text-align:left}
td.l{text-align:left}
td.metric{white-space:normal;vertical-align:top;font-weight:600;max-width:260px;background:#fff}
tr.grp td{border-top:2px solid var(--line)}
tbody tr:hover{background:#f8f9fb}
td.best{background:var(--good);color:var(--goodink);font-weight:650}
.ci{color:var(--muted);font-size:11.5px}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:7px;vertical-align:0}
.badge{display:inline-block;border-radius:6px;padding:1px 7px;font-size:11.5px;font-weight:650}
.up{background:var(--good);color:var(--goodink)}
.down{background:var(--bad);color:var(--badink)}
.ns{color:var(--muted)}
.ex{border-top:1px solid var(--line);padding-top:14px;margin-top:14px}
.ex:first-of-type{border-top:0;margin-top:0;padding-top:0}
.ex h3{font-size:14px;margin:0 0 6px;color:var(--muted);font-weight:600}
.prompt{background:#f1f3f4;border-radius:8px;padding:10px 14px;white-space:pre-wrap;word-wrap:break-word;
font-size:13.5px}
.answers{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:10px;margin-top:10px}
.ans{border:1px solid var(--line);border-left:4px solid var(--c);border-radius:8px;padding:8px 12px;
font-size:13px;min-width:0}
.ans .top{display:flex;flex-wrap:wrap;gap:6px;align-items:center;margin-bottom:4px}
.ans .top .m{font-weight:650;margin-right:4px}
.chip{background:#f1f3f4;border-radius:999px;padding:0 8px;font-size:11.5px;color:var(--muted)}
.chip b{color:var(--ink)}
.chip.err{background:var(--bad);color:var(--badink)}
.txt{white-space:pre-wrap;word-wrap:break-word;margin:0;max-height:320px;overflow:auto}
details summary{cursor:pointer;color:var(--accent);font-size:12px;margin:4px 0}
details pre{white-space:pre-wrap;word-wrap:break-word;font-size:12px;background:#f8f9fa;padding:10px;
border-radius:8px;max-height:420px;overflow:auto}
footer{color:var(--muted);font-size:12px;text-align:center;margin-top:24px}
"""


def _dot(color: str) -> str:
    return f'<span class="dot" style="background:{color}"></span>'


def _header(r: _Report) -> str:
    s = r.s
    bench = s.get("benchmark") or (r.df["benchmark"].iloc[0] if "benchmark" in r.df.columns and len(r.df) else "")
    n = s.get("n_prompts")
    if n is None and "id" in r.df.columns:
        n = r.df["id"].nunique()
    judges = s.get("judges")
    judges = ", ".join(map(str, judges)) if isinstance(judges, (list, tuple)) else (judges or "")
    wall = _num(s.get("wall_s"))
    wall_txt = "–" if math.isnan(wall) else (f"{wall:.1f} s" if wall < 120 else
                                             f"{wall / 60:.1f} min" if wall < 7200 else f"{wall / 3600:.1f} h")
    pills = [("benchmark", bench or "–"), ("prompts", n if n is not None else "–"), ("methods", len(r.methods)),
             ("judges", judges or "none"), ("baseline", s.get("baseline") or "–"),
             ("created", s.get("created") or "–"), ("wall time", wall_txt)]
    out = ['<header><h1>DiffPO evaluation' + (f' · {_esc(bench)}' if bench else "") + '</h1>',
           '<div class="sub">Inference-time alignment: base-model drafts refined by the aligner '
           '(Jacobi decoding), compared method by method on the same prompts.</div>',
           '<div class="meta">' + "".join(f'<span class="pill">{_esc(k)}: <b>{_esc(v)}</b></span>' for k, v in pills)
           + "</div></header>"]
    notes = [x for x in (s.get("notes") or []) if str(x).strip()] if isinstance(s.get("notes"), list) else \
        ([s["notes"]] if s.get("notes") else [])
    if notes:
        out.append('<div class="notes"><h3>Read this first</h3><ul>'
                   + "".join(f"<li>{_esc(x)}</li>" for x in notes) + "</ul></div>")
    return "\n".join(out)


def _cards(r: _Report) -> str:
    if not r.methods:
        return ""
    first = next(iter(r.metrics), None)
    cards = []
    for m in r.methods:
        body = [f'<div class="name">{_dot(r.colors[m])}{_esc(m)}</div>']
        if first:
            st = r.stat(m, first)
            k = r.kind(first)
            ci = f"[{_fmt(st['lo'], k)}, {_fmt(st['hi'], k)}]" if _ok(st["lo"]) and _ok(st["hi"]) else ""
            body.append(f'<div class="big">{_fmt(st["mean"], k)}</div>'
                        f'<div class="ci">{_esc(first)} {ci}</div>')
        body.append(f'<div class="row"><span>latency / prompt</span><b>{_fmt_s(r.latency(m, "total_s"))}</b></div>')
        tpp = r.jacobi(m, "tokens_per_pass")
        if tpp > 0:
            body.append(f'<div class="row"><span>tokens / pass</span><b>{tpp:.2f}</b></div>')
        words = r.scalar(m, "mean_words")
        if _ok(words):
            body.append(f'<div class="row"><span>mean words</span><b>{words:.0f}</b></div>')
        cards.append(f'<div class="card" style="--c:{r.colors[m]}">' + "".join(body) + "</div>")
    lead = f'<p class="caption">Headline metric: {_esc(r.label(first))}.</p>' if first else ""
    return '<div class="cards">' + "".join(cards) + "</div>" + lead


def _best(values: list[float], higher: bool | None) -> set[int]:
    """Indices of the best value(s) in a column; nothing when fewer than two distinct finite values."""
    if higher is None:
        return set()
    finite = [(i, v) for i, v in enumerate(values) if _ok(v)]
    if len({round(v, 12) for _, v in finite}) < 2:
        return set()
    target = (max if higher else min)(v for _, v in finite)
    return {i for i, v in finite if abs(v - target) <= 1e-12}


def _table(r: _Report, cols: list, cls: str) -> str:
    """Rows = methods; cols = (header html, values, cell html or None for integers, higher_is_better or None)."""
    head = "<tr><th>method</th>" + "".join(f"<th>{h}</th>" for h, *_ in cols) + "</tr>"
    body = []
    for i, m in enumerate(r.methods):
        tds = [f"<td>{_dot(r.colors[m])}<b>{_esc(m)}</b></td>"]
        for _, vals, cells, hb in cols:
            cell = cells[i] if cells else ("–" if not _ok(vals[i]) else f"{vals[i]:.0f}")
            tds.append(f'<td class="best">{cell}</td>' if i in _best(vals, hb) else f"<td>{cell}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f'<div class="tablewrap"><table class="{cls}"><thead>' + head + "</thead><tbody>" + "".join(body)
            + "</tbody></table></div>")


def _summary_table(r: _Report) -> str:
    """Two tables over the same methods: quality (every metric with its interval) and cost (length, latency,
    Jacobi statistics, errors); the best value of each column highlighted."""
    if not r.methods:
        return '<p class="caption">No methods in the results.</p>'
    M = r.methods
    quality = [("n", [r.scalar(m, "n") for m in M], None, None)]
    for k in r.metrics:
        kind = r.kind(k)
        vals, cells = [], []
        for m in M:
            st = r.stat(m, k)
            vals.append(st["mean"])
            ci = (f'<div class="ci">[{_fmt(st["lo"], kind)}, {_fmt(st["hi"], kind)}]</div>'
                  if _ok(st["lo"]) and _ok(st["hi"]) else "")
            cells.append(_fmt(st["mean"], kind) + ci)
        quality.append((f'<span title="{_esc(r.label(k))}">{_esc(k)}</span>', vals, cells, r.higher_better(k)))
    cost = [("mean words", [r.scalar(m, "mean_words") for m in M], None, None)]
    for key, head in [("draft_s", "draft s"), ("refine_s", "refine s"), ("total_s", "total s"),
                      ("total_s_p50", "total s p50"), ("total_s_p90", "total s p90")]:
        vals = [r.latency(m, key) for m in M]
        if any(_ok(v) for v in vals):
            cost.append((head, vals, [_fmt_s(v).replace(" s", "") for v in vals],
                         False if key.startswith("total") else None))
    jm = set(r.jacobi_methods())
    if jm:
        for key, head, hb, f in [("tokens_per_pass", "tokens / pass", True, "{:.2f}"),
                                 ("mean_passes", "passes", False, "{:.1f}"),
                                 ("converged_fraction", "converged", True, "{:.0%}")]:
            vals = [r.jacobi(m, key) if m in jm else float("nan") for m in M]
            vals = [v if key != "tokens_per_pass" or v > 0 else float("nan") for v in vals]  # 0: not Jacobi
            cost.append((head, vals, [f.format(v) if _ok(v) else "–" for v in vals], hb))
    cost.append(("errors", [r.scalar(m, "errors") for m in M], None, False))
    out = ""
    if len(quality) > 1:
        out += '<h3 class="sub">Quality</h3>' + _table(r, quality, "summary quality")
    out += '<h3 class="sub">Length, latency (seconds per prompt) and decoding</h3>' + _table(r, cost, "summary cost")
    return out


def _metric_legend(r: _Report) -> str:
    if not r.metrics:
        return ""
    items = "".join(f"<li><b>{_esc(k)}</b>: {_esc(r.label(k))} ({'higher' if r.higher_better(k) else 'lower'} "
                    f"is better)</li>" for k in r.metrics)
    return f'<details><summary>metric definitions</summary><ul class="caption">{items}</ul></details>'


def _paired_table(r: _Report) -> str:
    paired = r.paired()
    if not paired:
        return ""
    rows = []
    span = {k: sum(str(q["metric"]) == k for q in paired) for k in dict.fromkeys(str(q["metric"]) for q in paired)}
    seen = set()
    paired = sorted(paired, key=lambda q: list(span).index(str(q["metric"])))  # rows of a metric together
    for p in paired:
        k = str(p["metric"])
        kind = r.kind(k)
        d, pv = _num(p["diff"]), _num(p.get("p_value"))
        sig = pv < 0.05
        good = (d > 0) == r.higher_better(k) if d != 0 else None
        if sig and good is not None:
            badge = (f'<span class="badge {"up" if good else "down"}">{"better" if good else "worse"}, '
                     f'p&lt;0.05</span>')
        else:
            badge = '<span class="ns">not significant</span>' if _ok(pv) else '<span class="ns">–</span>'
        m = str(p["method"])
        first = k not in seen
        seen.add(k)
        metric_td = (f"<td class='l metric' rowspan='{span[k]}'>{_esc(r.label(k) if k in r.metrics else k)}</td>"
                     if first else "")
        rows.append(
            f"<tr class='{'grp' if first else ''}'>{metric_td}"
            f"<td class='l'>{_dot(r.colors.get(m, MUTED))}{_esc(m)}</td><td class='l'>{_esc(p.get('vs', ''))}</td>"
            f"<td><b>{_fmt(d, kind, signed=True)}</b></td>"
            f"<td class='ci'>[{_fmt(p.get('lo'), kind, True)}, {_fmt(p.get('hi'), kind, True)}]</td>"
            f"<td>{_fmt_p(pv)}</td><td>{_esc(p.get('n', ''))}</td><td class='l'>{badge}</td></tr>")
    head = ("<tr><th>metric</th><th>method</th><th>vs</th><th>difference</th><th>95% CI</th><th>p-value</th>"
            "<th>n</th><th></th></tr>")
    table = ('<div class="tablewrap"><table class="paired"><thead>' + head + "</thead><tbody>" + "".join(rows)
             + "</tbody></table></div>")
    n_sig = sum(_num(p.get("p_value")) < 0.05 for p in paired)
    return (f"<details{' open' if len(paired) <= 12 else ''}><summary>table of all {len(paired)} paired comparisons "
            f"({n_sig} significant at p &lt; 0.05)</summary>{table}</details>")


def _examples(r: _Report, n: int = N_EXAMPLES) -> str:
    df = r.df
    if df.empty or "id" not in df.columns:
        return ""
    ids = list(dict.fromkeys(df["id"].tolist()))[:n]
    judge_cols = [c for c in JUDGE_COLUMNS if c in df.columns]
    blocks = []
    for pid in ids:
        rows = df[df["id"] == pid]
        first = rows.iloc[0]
        prompt, cut = _truncate(first.get("prompt", ""), 1200)
        cat = str(first.get("category", "") or "")
        title = f"Prompt {_esc(pid)}" + (f" · {_esc(cat)}" if cat and cat != "nan" else "")
        parts = [f'<div class="ex"><h3>{title}</h3><div class="prompt">{_esc(prompt)}</div>']
        if cut:
            parts.append(f"<details><summary>full prompt</summary><pre>{_esc(first.get('prompt', ''))}</pre></details>")
        cards = []
        ref = first.get("reference", "")
        if isinstance(ref, str) and ref.strip():
            txt, cut = _truncate(ref)
            more = f"<details><summary>full reference</summary><pre>{_esc(ref)}</pre></details>" if cut else ""
            words = _num(first.get("reference_words"))
            chip = f'<span class="chip"><b>{words:.0f}</b> words</span>' if _ok(words) else ""
            cards.append(f'<div class="ans" style="--c:{REFERENCE_COLOR}"><div class="top"><span class="m">'
                         f'reference</span>{chip}</div><p class="txt">{_esc(txt)}</p>{more}</div>')
        order = {m: i for i, m in enumerate(r.methods)}
        rows = rows.assign(_o=rows["method"].astype(str).map(order)).sort_values("_o") \
            if "method" in rows.columns else rows
        for _, row in rows.iterrows():
            m = str(row.get("method", "?"))
            c = r.colors.get(m, MUTED)
            chips = []
            for col in judge_cols:
                v = _num(row.get(col))
                if _ok(v):
                    chips.append(f'<span class="chip">{_esc(JUDGE_COLUMNS[col])} <b>{_fmt(v)}</b></span>')
            for col, lab in [("answer_words", "words"), ("total_s", "s"), ("passes", "passes")]:
                v = _num(row.get(col))
                if _ok(v) and (col != "passes" or v > 0):
                    chips.append(f'<span class="chip"><b>{v:.0f}</b> {lab}</span>' if col != "total_s"
                                 else f'<span class="chip"><b>{v:.2f}</b> s</span>')
            err = row.get("error", "")
            if isinstance(err, str) and err.strip():
                chips.append(f'<span class="chip err" title="{_esc(err)}">error: {_esc(_truncate(err, 80)[0])}</span>')
            txt, cut = _truncate(row.get("answer", ""))
            more = f"<details><summary>full answer</summary><pre>{_esc(row.get('answer', ''))}</pre></details>" \
                if cut else ""
            cards.append(f'<div class="ans" style="--c:{c}"><div class="top"><span class="m">{_esc(m)}</span>'
                         + "".join(chips) + f'</div><p class="txt">{_esc(txt)}</p>{more}</div>')
        parts.append('<div class="answers">' + "".join(cards) + "</div></div>")
        blocks.append("".join(parts))
    return "".join(blocks)


def _section(title: str, body: str, caption: str = "", anchor: str = "") -> str:
    if not body:
        return ""
    cap = f'<p class="caption">{caption}</p>' if caption else ""
    aid = f' id="{_esc(anchor)}"' if anchor else ""
    return f"<section{aid}><h2>{_esc(title)}</h2>{cap}{body}</section>"


# ---------------------------------------------------------------------------------------------- entry

def write_report(results: pd.DataFrame, summary: dict, out_dir: str | Path) -> Path:
    """Write out_dir/report.html (self-contained) and out_dir/figures/*.png; return the HTML path."""
    from matplotlib import rc_context

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):  # a rerun must not leave figures of a metric that is gone now
        if old.stem in {f[0] for f in FIGURES}:
            old.unlink()
    r = _Report(results, summary)

    images: dict[str, str] = {}
    with rc_context(RC):
        for stem, build, _, _ in FIGURES:
            try:
                fig = build(r)
            except Exception as e:  # a figure must never cost the whole report
                images[stem] = f'<p class="caption">figure {stem} failed: {_esc(type(e).__name__)}: {_esc(e)}</p>'
                continue
            if fig is None:
                continue
            data = _png(fig)
            (fig_dir / f"{stem}.png").write_bytes(data)
            b64 = base64.b64encode(data).decode("ascii")
            width = round(fig.get_figwidth() * CSS_PX_PER_INCH)  # same type size in every figure
            images[stem] = (f'<img class="fig" alt="{_esc(stem)}" style="width:{width}px" '
                            f'src="data:image/png;base64,{b64}">')

    def fig_section(stem: str, extra: str = "") -> str:
        _, _, title, caption = next(f for f in FIGURES if f[0] == stem)
        return _section(title, images.get(stem, "") + extra if stem in images else extra, caption if stem in images
                        else "", stem)

    config = r.s.get("config")
    config_html = ""
    if config:
        try:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
        except (TypeError, ValueError):
            text = str(config)
        config_html = _section("Configuration", f"<details><summary>show the run's configuration</summary>"
                                                f"<pre>{_esc(text)}</pre></details>", anchor="config")

    parts = [
        _header(r),
        _cards(r),
        fig_section("quality_latency"),
        fig_section("metrics"),
        _section("Summary table", _summary_table(r) + _metric_legend(r),
                 "Mean per method with its 95% bootstrap interval; the best value of each column is "
                 "highlighted.", "summary"),
        fig_section("paired", _paired_table(r)) if "paired" in images else
        _section("Paired differences", _paired_table(r), "", "paired"),
        fig_section("jacobi"),
        fig_section("lengths"),
        _section("Examples", _examples(r), f"The first {N_EXAMPLES} prompts, every method's answer (truncated; "
                                           "expand for the full text) with its judge values.", "examples"),
        config_html,
        '<footer>Generated by pipeline/evaluation/report.py · figures also in figures/*.png</footer>',
    ]
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
           f"<title>DiffPO evaluation · {_esc(r.s.get('benchmark', ''))}</title><style>{CSS}</style></head>"
           "<body><main>\n" + "\n".join(p for p in parts if p) + "\n</main></body></html>\n")
    path = out_dir / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path
