"""The evaluation report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend; the report's rc settings apply only while the figures are drawn), so they can be made from any process.

    draw_figures(data) -> {stem: DrawnFigure(png, width_in)}   in page order, only the figures that have data

`data` is the report's normalised view of the evaluation (`pipeline.evaluation.report.ReportData`). Each builder
returns a Figure, or None when there is nothing to draw (a judge that did not run, no per-row values); a panel
without data inside a drawn figure says "no data". A builder that raises is a bug, and the exception propagates.

Also here: the fixed colour of each method (shared with the page) and the value helpers both modules use.
"""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np
import pandas as pd
from matplotlib import patheffects, rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

if TYPE_CHECKING:
    from pipeline.evaluation.report import ReportData

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

MAX_HEADLINE_PANELS = 3
DPI = 144

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


# ------------------------------------------------------------------------------------------------ values

def num(x) -> float:
    """A finite float, or NaN for anything else (None, strings, inf, missing)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return float("nan")
    return v if math.isfinite(v) else float("nan")


def finite(x) -> bool:
    """Whether `x` reads as a finite number."""
    return not math.isnan(num(x))


def column(df: pd.DataFrame, name: str) -> pd.Series:
    """A numeric column (NaN where missing or unparseable); an all-NaN series when the column is absent."""
    if name in df.columns:
        return pd.to_numeric(df[name], errors="coerce").astype(float)
    return pd.Series(np.nan, index=df.index, dtype=float)


# ------------------------------------------------------------------------------------------------ helpers

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


def _place_labels(fig: Figure, ax, points: list[tuple]) -> None:
    """Annotate scatter points (x, y, lo, hi, text, color) without overlaps: try offsets near the point, then
    farther out with a leader line, and keep the one that least hits earlier labels, other markers, error
    bars and the axes border (the figure must have been laid out already)."""
    renderer = fig.canvas.get_renderer()
    markers, bars = [], []
    for x, y, lo, hi, *_ in points:
        px, py = ax.transData.transform((x, y))
        markers.append((px - 6, py - 6, px + 6, py + 6))
        _, plo = ax.transData.transform((x, lo if finite(lo) else y))
        _, phi = ax.transData.transform((x, hi if finite(hi) else y))
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


def _grid(n_panels: int, n_rows: int, extra_w: float = 0.0) -> tuple[Figure, np.ndarray]:
    """Up to three panels a row sharing one y axis of n_rows categories (labels only on the left column)."""
    ncol = min(3, n_panels)
    nrow = math.ceil(n_panels / ncol)
    fig = _new_figure(3.4 * ncol + 1.4 + extra_w, nrow * (0.95 + 0.3 * n_rows) + 0.1)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _hist_bins(values: list[np.ndarray], integer: bool) -> tuple[np.ndarray, bool]:
    """Shared bins for overlaid histograms, and whether the x axis should be logarithmic (the values span more
    than a factor 15, e.g. a draft close to its fixed point next to one far from it)."""
    allv = np.concatenate(values)
    lo, hi = float(allv.min()), float(allv.max())
    if lo > 0 and hi / lo > 15:
        return np.geomspace(lo * 0.95, hi * 1.05, 30), True
    if integer and hi - lo <= 40:
        return np.arange(math.floor(lo), math.floor(hi) + 2) - 0.5, False
    if hi == lo:
        return np.array([lo - 0.5, hi + 0.5]), False
    return np.linspace(lo, hi, 25), False


# ------------------------------------------------------------------------------------------------ figures

def fig_quality_latency(r: ReportData) -> Figure | None:
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
            lo = st["mean"] - st["lo"] if finite(st["lo"]) else 0.0
            hi = st["hi"] - st["mean"] if finite(st["hi"]) else 0.0
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


def _metric_panel(ax, r: ReportData, metric: str, rows: list[str]) -> None:
    """Win rate as a bar against the 0.5 line, or a score as a point; the interval as a whisker. One row per
    method (shared across panels; a method without a value for this metric leaves its row empty)."""
    ys = np.arange(len(rows))[::-1]
    win = r.kind(metric) == "win_rate"
    for y, m in zip(ys, rows):
        st = r.stat(m, metric)
        if math.isnan(st["mean"]):
            continue
        lo = st["mean"] - st["lo"] if finite(st["lo"]) else 0.0
        hi = st["hi"] - st["mean"] if finite(st["hi"]) else 0.0
        c = r.colors[m]
        if win:
            ax.barh(y, st["mean"], height=0.62, color=c, alpha=0.85, zorder=2)
            ax.errorbar(st["mean"], y, xerr=[[max(lo, 0)], [max(hi, 0)]], fmt="none", ecolor=INK, elinewidth=1.1,
                        capsize=3, zorder=3)
            ax.text(1.02, y, f"{st['mean'] * 100:.1f}%", transform=ax.get_yaxis_transform(), va="center",
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


def fig_metrics(r: ReportData) -> Figure | None:
    """One panel per metric: win rates as bars against the 0.5 line, scores as points, all with intervals."""
    metrics = sorted(r.metrics, key=lambda k: r.kind(k) != "win_rate")  # win rates first, order kept
    if not metrics:
        return None
    rows = [m for m in r.methods if any(finite(r.stat(m, k)["mean"]) for k in metrics)]
    fig, axes = _grid(len(metrics), len(rows))
    for ax, metric in zip(axes, metrics):
        _metric_panel(ax, r, metric, rows)
    axes[0].set_yticks(np.arange(len(rows))[::-1], rows)
    axes[0].set_ylim(-0.6, len(rows) - 0.4)
    return fig


def fig_paired(r: ReportData) -> Figure | None:
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
            d = num(p["diff"])
            lo = d - num(p.get("lo")) if finite(p.get("lo")) else 0.0
            hi = num(p.get("hi")) - d if finite(p.get("hi")) else 0.0
            c = r.colors.get(str(p["method"]), MUTED)
            sig = num(p.get("p_value")) < 0.05
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


def fig_jacobi(r: ReportData) -> Figure | None:
    """Histograms of Jacobi passes and tokens per pass, one overlaid step histogram per Jacobi method (the methods
    whose engine runs Jacobi iterations; the others have null passes and are not drawn)."""
    methods = r.jacobi_methods()
    if not methods or r.df.empty:
        return None
    fig = _new_figure(10.4, 3.5)
    axes = fig.subplots(1, 2)
    handles = {}
    for ax, (col, title, integer) in zip(axes, [("passes", "Forward passes per prompt", True),
                                                  ("tokens_per_pass", "Tokens per pass (Jacobi methods)", False)]):
        data = {m: column(r.rows(m), col).dropna().to_numpy() for m in methods}
        data = {m: v[v > 0] for m, v in data.items()}  # 0: no pass ran (the answer ended in the reserved tokens)
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
    fig.legend([Line2D([], [], color=r.colors[m], lw=2.2) for m in handles], list(handles),
               loc="outside upper center", ncol=min(len(handles), 6), fontsize=9)
    return fig


def _reference_words(df: pd.DataFrame) -> np.ndarray:
    """Reference lengths, one per prompt; rows without a reference (0 words, or an empty reference) left out."""
    if "reference_words" not in df.columns:
        return np.array([])
    refdf = df.drop_duplicates("id") if "id" in df.columns else df
    if "reference" in refdf.columns:
        refdf = refdf[refdf["reference"].fillna("").astype(str).str.len().to_numpy() > 0]
    ref = column(refdf, "reference_words").dropna().to_numpy()
    return ref[ref > 0]


def fig_lengths(r: ReportData) -> Figure | None:
    """Answer length (words) per method as violins with median and quartiles; the reference's alongside."""
    rows = {m: column(r.rows(m), "answer_words").dropna().to_numpy() for m in r.methods}
    rows = {m: v for m, v in rows.items() if len(v)}
    if not rows:
        return None
    ref = _reference_words(r.df)
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


FIGURES: dict[str, Callable[[ReportData], Figure | None]] = {  # file stem -> builder, in page order
    "quality_latency": fig_quality_latency,
    "metrics": fig_metrics,
    "paired": fig_paired,
    "jacobi": fig_jacobi,
    "lengths": fig_lengths,
}


class DrawnFigure(NamedTuple):
    """A drawn figure: its PNG bytes and its width in inches (the page shows every figure at one scale)."""
    png: bytes
    width_in: float


def draw_figures(r: ReportData) -> dict[str, DrawnFigure]:
    """Every figure of FIGURES that has data to show, keyed by file stem in page order. Builders that return
    None (nothing to draw) are left out; an exception in a builder propagates."""
    drawn = {}
    with rc_context(RC):
        for stem, build in FIGURES.items():
            fig = build(r)
            if fig is not None:
                drawn[stem] = DrawnFigure(_png(fig), fig.get_figwidth())
    return drawn
