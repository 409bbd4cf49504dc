"""Plotly figures built from service data: loss curves, accuracy bars, accuracy against trainable parameters.

Every function takes plain lists/dicts (what ``jobs.service`` returns) and gives a ``go.Figure``; no
Gradio here, so the figures are tested as data.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import plotly.graph_objects as go

PALETTE = ["#2563eb", "#d97706", "#059669", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#65a30d"]
LAYOUT = dict(template="plotly_white", margin=dict(l=60, r=60, t=50, b=50), height=380,
              legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
              font=dict(size=12))


def empty_figure(message: str = "No data yet", height: int = 380) -> go.Figure:
    """A blank chart carrying a message where the curves will appear."""
    fig = go.Figure()
    fig.update_layout(**{**LAYOUT, "height": height}, xaxis=dict(visible=False), yaxis=dict(visible=False),
                      annotations=[dict(text=message, x=0.5, y=0.5, xref="paper", yref="paper",
                                        showarrow=False, font=dict(size=14, color="#64748b"))])
    return fig


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing), ``weight`` in [0, 1)."""
    weight = min(max(float(weight or 0.0), 0.0), 0.999)
    if weight == 0:
        return list(values)
    out, last, n = [], 0.0, 0
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(None)
            continue
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return out


def split_metrics(points: Iterable[dict[str, Any]]) -> dict[str, list]:
    """Columns from metric points: ``step``/``loss``/``lr`` of training steps, ``val_step``/``val_loss``.

    Accepts the records ``core.train`` writes (``{"type": "step", ...}``, ``{"type": "eval", ...}``) or
    any dicts holding ``step`` and one of ``loss`` / ``val_loss`` / ``lr``.
    """
    cols: dict[str, list] = {"step": [], "loss": [], "lr": [], "val_step": [], "val_loss": []}
    for p in points:
        step = p.get("step")
        if step is None:
            continue
        if p.get("loss") is not None:
            cols["step"].append(step)
            cols["loss"].append(p["loss"])
            cols["lr"].append(p.get("lr"))
        if p.get("val_loss") is not None:
            cols["val_step"].append(step)
            cols["val_loss"].append(p["val_loss"])
    order = sorted(range(len(cols["step"])), key=cols["step"].__getitem__)
    for key in ("step", "loss", "lr"):
        cols[key] = [cols[key][i] for i in order]
    vorder = sorted(range(len(cols["val_step"])), key=cols["val_step"].__getitem__)
    for key in ("val_step", "val_loss"):
        cols[key] = [cols[key][i] for i in vorder]
    return cols


def loss_figure(series: Sequence[tuple[str, Iterable[dict[str, Any]]]], smoothing: float = 0.0,
                log_scale: bool = False, show_lr: bool = True) -> go.Figure:
    """Training and validation loss against step for one or more jobs, learning rate on a second axis.

    ``series`` is ``[(label, metric points), ...]``; each job gets one colour: a solid (smoothed) training
    loss with the raw curve faint behind it, a dashed validation loss with markers, a dotted learning rate.
    """
    fig = go.Figure()
    any_data = False
    for i, (label, points) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        cols = split_metrics(points)
        group = f"job{i}"
        if cols["step"]:
            any_data = True
            if smoothing and smoothing > 0:
                fig.add_trace(go.Scatter(x=cols["step"], y=cols["loss"], mode="lines", name=f"{label} raw",
                                         line=dict(color=color, width=1), opacity=0.25, legendgroup=group,
                                         showlegend=False, hoverinfo="skip"))
            fig.add_trace(go.Scatter(x=cols["step"], y=smooth(cols["loss"], smoothing), mode="lines",
                                     name=f"{label} · train loss", line=dict(color=color, width=2),
                                     legendgroup=group))
        if cols["val_step"]:
            any_data = True
            fig.add_trace(go.Scatter(x=cols["val_step"], y=cols["val_loss"], mode="lines+markers",
                                     name=f"{label} · val loss", line=dict(color=color, width=2, dash="dash"),
                                     marker=dict(size=7, symbol="diamond"), legendgroup=group))
        if show_lr and cols["step"] and any(v is not None for v in cols["lr"]):
            fig.add_trace(go.Scatter(x=cols["step"], y=cols["lr"], mode="lines", name=f"{label} · lr",
                                     line=dict(color=color, width=1, dash="dot"), yaxis="y2", legendgroup=group,
                                     opacity=0.7))
    if not any_data:
        return empty_figure("No metrics yet: the curves appear as soon as the job logs its first step")
    fig.update_layout(**LAYOUT, hovermode="x unified",
                      xaxis=dict(title="step", rangemode="tozero"),
                      yaxis=dict(title="loss", type="log" if log_scale else "linear"),
                      yaxis2=dict(title="learning rate", overlaying="y", side="right", showgrid=False,
                                  rangemode="tozero", exponentformat="e"))
    return fig


def accuracy_bars(rows: Sequence[dict[str, Any]]) -> go.Figure:
    """Grouped bars: one group per benchmark under a protocol (the matrix's column label, ``piqa (loglik)``),
    one bar per model. Rows hold model, benchmark (that label), accuracy (0-1) and optionally
    accuracy_norm (0-1, lm-eval's acc_norm), which the bar's hover text shows."""
    rows = [r for r in rows if r.get("accuracy") is not None]
    if not rows:
        return empty_figure("No results yet: pick models and benchmarks, then run the evaluations")
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig = go.Figure()
    for i, model in enumerate(models):
        mine = {r["benchmark"]: r for r in rows if r["model"] == model}
        hover = [_bar_hover(model, b, mine.get(b)) for b in benchmarks]
        fig.add_trace(go.Bar(x=benchmarks, y=[100 * mine[b]["accuracy"] if b in mine else None for b in benchmarks],
                             name=model, marker_color=PALETTE[i % len(PALETTE)],
                             text=[f"{100 * mine[b]['accuracy']:.1f}" if b in mine else "" for b in benchmarks],
                             textposition="outside", hovertext=hover, hoverinfo="text"))
    fig.update_layout(**LAYOUT, barmode="group", yaxis=dict(title="accuracy (%)", range=[0, 105]),
                      xaxis=dict(title="benchmark (protocol)"))
    return fig


def _bar_hover(model: str, column: str, row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    norm = row.get("accuracy_norm")
    text = f"{model}<br>{column}: {100 * row['accuracy']:.1f}%"
    return text if norm is None else f"{text}, acc_norm {100 * norm:.1f}%"


def accuracy_scatter(points: Sequence[dict[str, Any]]) -> go.Figure:
    """Mean accuracy against trainable parameters (log x). Points hold model, trainable, accuracy, method."""
    points = [p for p in points if p.get("accuracy") is not None]
    if not points:
        return empty_figure("No results yet")
    fig = go.Figure()
    methods = list(dict.fromkeys(p.get("method") or "base" for p in points))
    for i, method in enumerate(methods):
        mine = [p for p in points if (p.get("method") or "base") == method]
        fig.add_trace(go.Scatter(
            x=[max(p.get("trainable") or 0, 1) for p in mine], y=[100 * p["accuracy"] for p in mine],
            mode="markers+text", name=method, text=[p["model"] for p in mine], textposition="top center",
            marker=dict(size=13, color=PALETTE[i % len(PALETTE)], line=dict(width=1, color="#1e293b")),
            hovertemplate="%{text}<br>%{x:,} trainable<br>%{y:.1f}%<extra></extra>"))
    fig.update_layout(**LAYOUT, xaxis=dict(title="trainable parameters (base model = 1)", type="log"),
                      yaxis=dict(title="mean accuracy over benchmarks and protocols (%)", range=[0, 105]))
    return fig


# --------------------------------------------------------------------------------------------------
# Study charts: rows are ``core.study.analyse`` configs (method, placement, setting, value, mean, std,
# trainable_params, config), accuracies in 0-1.

def _pct(values: Sequence[float | None]) -> list[float | None]:
    return [None if v is None else 100 * v for v in values]


def study_placement_bars(configs: Sequence[dict[str, Any]]) -> go.Figure:
    """Accuracy by placement: one group per method, one bar per placement (best value of each), ± std."""
    rows = [c for c in configs if c.get("placement") and c.get("mean") is not None]
    if not rows:
        return empty_figure("No placement results yet (methods without placements are not shown)")
    methods = list(dict.fromkeys(c["method"] for c in rows))
    placements = list(dict.fromkeys(c["placement"] for c in rows))
    best: dict[tuple[str, str], dict] = {}
    for c in rows:  # configs come best first: keep the best value per (method, placement)
        best.setdefault((c["method"], c["placement"]), c)
    fig = go.Figure()
    for i, place in enumerate(placements):
        cells = [best.get((m, place)) for m in methods]
        fig.add_trace(go.Bar(
            x=methods, y=_pct([c["mean"] if c else None for c in cells]), name=place,
            marker_color=PALETTE[i % len(PALETTE)],
            error_y=dict(type="data", array=_pct([c["std"] if c else 0 for c in cells]), visible=True),
            text=[f"{100 * c['mean']:.1f}" if c else "" for c in cells], textposition="outside",
            customdata=[c["config"] if c else "" for c in cells],
            hovertemplate="%{customdata}<br>%{y:.1f}%<extra></extra>"))
    fig.update_layout(**LAYOUT, barmode="group", title=dict(text="accuracy by placement", x=0.5, y=0.98),
                      yaxis=dict(title="accuracy (%)", range=[0, 105]), xaxis=dict(title="method"))
    return fig


def study_value_lines(configs: Sequence[dict[str, Any]]) -> go.Figure:
    """Accuracy against the hyperparameter value (rank, bottleneck, virtual tokens): a line per method
    (and placement, where a method has several), ± std."""
    rows = [c for c in configs if c.get("mean") is not None and isinstance(c.get("value"), (int, float))]
    if not rows:
        return empty_figure("No results yet")
    places: dict[str, set] = {}
    for c in rows:
        places.setdefault(c["method"], set()).add(c.get("placement"))
    groups: dict[str, list[dict]] = {}
    for c in rows:
        label = f"{c['method']} ({c['setting']})"
        if len(places[c["method"]]) > 1:
            label = f"{c['method']} @{c['placement']} ({c['setting']})"
        groups.setdefault(label, []).append(c)
    fig = go.Figure()
    for i, (label, mine) in enumerate(groups.items()):
        mine = sorted(mine, key=lambda c: c["value"])
        fig.add_trace(go.Scatter(
            x=[c["value"] for c in mine], y=_pct([c["mean"] for c in mine]), mode="lines+markers", name=label,
            line=dict(color=PALETTE[i % len(PALETTE)], width=2), marker=dict(size=8),
            error_y=dict(type="data", array=_pct([c["std"] for c in mine]), visible=True),
            customdata=[c["config"] for c in mine], hovertemplate="%{customdata}<br>%{y:.1f}%<extra></extra>"))
    fig.update_layout(**LAYOUT, title=dict(text="accuracy by hyperparameter value", x=0.5, y=0.98),
                      xaxis=dict(title="value (rank / bottleneck / virtual tokens)", type="log"),
                      yaxis=dict(title="accuracy (%)", range=[0, 105]))
    return fig


def study_params_scatter(configs: Sequence[dict[str, Any]]) -> go.Figure:
    """Mean accuracy against trainable parameters (log x), one colour per method, ± std."""
    rows = [c for c in configs if c.get("mean") is not None]
    if not rows:
        return empty_figure("No results yet")
    fig = go.Figure()
    for i, method in enumerate(dict.fromkeys(c["method"] for c in rows)):
        mine = [c for c in rows if c["method"] == method]
        fig.add_trace(go.Scatter(
            x=[max(c.get("trainable_params") or 0, 1) for c in mine], y=_pct([c["mean"] for c in mine]),
            mode="markers", name=method,
            error_y=dict(type="data", array=_pct([c["std"] for c in mine]), visible=True),
            marker=dict(size=12, color=PALETTE[i % len(PALETTE)], line=dict(width=1, color="#1e293b")),
            text=[c["config"] for c in mine], hovertemplate="%{text}<br>%{x:,} trainable<br>%{y:.1f}%<extra></extra>"))
    fig.update_layout(**LAYOUT, title=dict(text="accuracy against trainable parameters", x=0.5, y=0.98),
                      xaxis=dict(title="trainable parameters", type="log"),
                      yaxis=dict(title="accuracy (%)", range=[0, 105]))
    return fig


def arena_ratings_figure(rows: Sequence[dict[str, Any]], level: float = 0.95) -> go.Figure:
    """The arena leaderboard: each model's rating (best first) with its bootstrap interval, the pool mean
    (1000) dashed. ``rows`` are ``JobService.arena_leaderboard``'s (label, rating, lower, upper, votes)."""
    if not rows:
        return empty_figure("No models in this pool")
    labels = [r["label"] for r in rows]
    fig = go.Figure(go.Scatter(
        x=labels, y=[r["rating"] for r in rows], mode="markers",
        marker=dict(size=12, color=PALETTE[0], line=dict(width=1, color="#1e293b")),
        error_y=dict(type="data", symmetric=False, visible=True,
                     array=[r["upper"] - r["rating"] for r in rows],
                     arrayminus=[r["rating"] - r["lower"] for r in rows]),
        customdata=[[r["lower"], r["upper"], r["votes"]] for r in rows],
        hovertemplate="%{x}<br>rating %{y:.0f} [%{customdata[0]:.0f}, %{customdata[1]:.0f}]"
                      "<br>%{customdata[2]} votes<extra></extra>"))
    fig.add_hline(y=1000, line=dict(color="#94a3b8", dash="dash"))
    fig.update_layout(**LAYOUT, showlegend=False,
                      title=dict(text=f"ratings with {100 * level:.0f}% intervals", x=0.5, y=0.98),
                      xaxis=dict(title="", type="category"), yaxis=dict(title="rating (pool mean 1000)"))
    return fig


def arena_win_rate_figure(labels: Sequence[str], win_rate: Sequence[Sequence[float | None]],
                          games: Sequence[Sequence[int]]) -> go.Figure:
    """Heat map of the mean score of each row model against each column model (ties half), with counts."""
    if not labels:
        return empty_figure("No models in this pool")
    pct = [[None if x is None else 100 * x for x in row] for row in win_rate]
    text = [[("" if x is None else f"{x:.0f}%") + (f"<br>{n}" if n else "") for x, n in zip(row, counts)]
            for row, counts in zip(pct, games)]
    fig = go.Figure(go.Heatmap(
        z=pct, x=list(labels), y=list(labels), zmin=0, zmax=100, colorscale="RdBu", text=text,
        texttemplate="%{text}", hovertemplate="%{y} against %{x}: %{z:.0f}%<extra></extra>",
        colorbar=dict(title="score %")))
    fig.update_layout(**LAYOUT, title=dict(text="win rate of row against column (battles below)", x=0.5, y=0.98),
                      xaxis=dict(type="category"), yaxis=dict(type="category", autorange="reversed"))
    return fig


def delta_heatmaps(tables: Sequence[tuple[str, dict[str, Any]]]) -> go.Figure:
    """One heat map of ``||ΔW||_F`` per adapter (layer x module, ``core.merge.delta_norms`` tables), side by
    side on one colour scale so their sizes compare; a module an adapter leaves alone is blank."""
    if not tables:
        return empty_figure("Choose adapters to see the size of their updates per layer and module")
    from plotly.subplots import make_subplots

    top = max((v for _, t in tables for row in t["norms"] for v in row if v is not None), default=1.0)
    fig = make_subplots(rows=1, cols=len(tables), subplot_titles=[title for title, _ in tables],
                        shared_yaxes=True, horizontal_spacing=0.04)
    for i, (_, t) in enumerate(tables, start=1):
        z = [[math.nan if v is None else v for v in row] for row in t["norms"]]
        fig.add_trace(go.Heatmap(z=z, x=t["modules"], y=[str(layer) for layer in t["layers"]], coloraxis="coloraxis",
                                 hovertemplate="layer %{y}, %{x}: ||ΔW|| = %{z:.4g}<extra></extra>"), 1, i)
    fig.update_layout(**{**LAYOUT, "height": 420}, coloraxis=dict(colorscale="Viridis", cmin=0, cmax=top,
                                                                  colorbar=dict(title="||ΔW||")))
    fig.update_yaxes(title_text="layer", col=1)
    return fig


def search_figure(series: Sequence[tuple[str, Iterable[dict[str, Any]]]]) -> go.Figure:
    """The accuracy of each point a weight search scored (its metric points of type ``"search"``, whose
    ``loss`` is ``1 - accuracy``: ``core.weight_search.search_record``) with the best so far, per job."""
    fig = go.Figure()
    for i, (label, points) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        tried = sorted((p["step"], 100 * (1 - p["loss"])) for p in points
                       if p.get("type") == "search" and p.get("loss") is not None)
        if not tried:
            continue
        steps, scores = [s for s, _ in tried], [a for _, a in tried]
        best = [max(scores[:k + 1]) for k in range(len(scores))]
        fig.add_trace(go.Scatter(x=steps, y=scores, mode="markers", name=f"{label} · point",
                                 marker=dict(color=color, size=8), legendgroup=f"job{i}"))
        fig.add_trace(go.Scatter(x=steps, y=best, mode="lines", name=f"{label} · best so far",
                                 line=dict(color=color, width=2, shape="hv"), legendgroup=f"job{i}"))
    if not fig.data:
        return empty_figure("No points yet: each appears as soon as the search has scored it")
    fig.update_layout(**LAYOUT, xaxis=dict(title="point", rangemode="tozero"),
                      yaxis=dict(title="accuracy (%)", rangemode="tozero"))
    return fig
