"""Plotly figure builders for the Inspect, Explore, Evaluate and Models pages (no Streamlit calls).

Anomaly maps always use the fixed colour scale of ``fod_app.visualize`` (0 .. ``MAP_DISPLAY_MAX``
threshold units, the calibrated threshold 1.0 in the middle), so a colour means the same on every image.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from ..calibration import MAP_DISPLAY_MAX
from ..report import image_data_uri
from ..selfcheck import POOR_AUROC
from ..visualize import PLOTLY_COLORSCALE, colorize, image_to_uint8, overlay

GOOD_COLOUR = "#2e7d32"
DEFECT_COLOUR = "#c62828"
REVIEW_COLOUR = "#ef8f00"
SELECTED_COLOUR = "#ff1744"
PINNED_COLOUR = "#ff1744"  # patch A of the side-by-side explorer
COMPARED_COLOUR = "#00b0ff"  # patch B
CORRELATION_COLORSCALE = "Viridis"
_MARGIN = dict(l=10, r=10, t=40, b=10)


def _units_colorbar(threshold: float, title: str = "score") -> dict:
    """Colour-bar settings on the fixed scale, with the calibrated threshold (1.0) and the current one marked."""
    ticks = {0.0: "0", 0.5: "0.5", 1.0: "1.0 calibrated", 1.5: "1.5", MAP_DISPLAY_MAX: f"{MAP_DISPLAY_MAX:g}+"}
    if abs(threshold - 1.0) > 1e-6 and 0.0 <= threshold <= MAP_DISPLAY_MAX:
        ticks = {k: v for k, v in ticks.items() if abs(k - threshold) > 0.12 or k == 1.0}
        ticks[threshold] = f"◀ {threshold:.2f} your threshold"
    else:
        ticks[1.0] = "◀ 1.0 threshold"
    values = sorted(ticks)
    return dict(
        title=dict(text=title, side="right"),
        tickvals=values,
        ticktext=[ticks[v] for v in values],
        thickness=14,
        len=0.9,
    )


def _colorbar_trace(threshold: float, title: str = "score", hidden: bool = False) -> go.Scatter:
    """An invisible scatter whose only job is to draw the fixed-scale colour bar.

    ``hidden=True`` draws a fully transparent bar: it takes the same room, so a figure without a visible
    colour bar shows its picture at exactly the size of a neighbouring figure with one.
    """
    colorbar = _units_colorbar(threshold, title)
    colorscale = PLOTLY_COLORSCALE
    if hidden:
        clear = "rgba(0,0,0,0)"
        colorscale = [[0.0, clear], [1.0, clear]]
        colorbar = dict(colorbar, tickfont=dict(color=clear), title=dict(colorbar["title"], font=dict(color=clear)),
                        outlinewidth=0, tickcolor=clear)
    return go.Scatter(
        x=[None],
        y=[None],
        mode="markers",
        showlegend=False,
        hoverinfo="skip",
        marker=dict(
            colorscale=colorscale,
            cmin=0.0,
            cmax=MAP_DISPLAY_MAX,
            color=[0.0],
            showscale=True,
            colorbar=colorbar,
        ),
    )


def _image_axes(fig: go.Figure, row: int | None = None, col: int | None = None) -> None:
    kwargs = {} if row is None else {"row": row, "col": col}
    fig.update_xaxes(visible=False, **kwargs)
    fig.update_yaxes(visible=False, scaleanchor="x" if row is None else None, **kwargs)


def overlay_figure(
    image: np.ndarray,
    map_units: np.ndarray,
    opacity: float = 0.5,
    threshold: float = 1.0,
    title: str | None = None,
    height: int = 460,
    show_colorbar: bool = True,
) -> go.Figure:
    """Image with its anomaly map blended on top, plus a colour bar on the fixed scale (threshold marked).

    ``image``: (3, S, S) float or (S, S, 3) uint8; ``map_units``: (S, S) in threshold units.
    Hovering shows the map value of each pixel.
    """
    base = image_to_uint8(image)
    blended = overlay(base, map_units, opacity) if opacity > 0 else base
    size = blended.shape[0]
    fig = go.Figure()
    fig.add_trace(go.Image(source=cached_image_uri(blended), hoverinfo="skip"))  # memoised: reruns skip the encode
    step = max(1, size // 64)
    coarse = map_units[::step, ::step]
    # Invisible heat map on the same pixels: hovering shows the value under the mouse.
    fig.add_trace(
        go.Heatmap(
            z=np.round(coarse, 3),
            x0=(step - 1) / 2,
            dx=step,
            y0=(step - 1) / 2,
            dy=step,
            opacity=0.0,
            showscale=False,
            colorscale=PLOTLY_COLORSCALE,
            zmin=0,
            zmax=MAP_DISPLAY_MAX,
            hovertemplate="score here: %{z:.2f}<extra></extra>",
        )
    )
    fig.add_trace(_colorbar_trace(threshold, hidden=not show_colorbar))
    fig.update_layout(
        title=dict(text=title or "", x=0, font=dict(size=14)),
        height=height,
        margin=_MARGIN,
        plot_bgcolor="rgba(0,0,0,0)",
    )
    fig.update_xaxes(visible=False, range=[-0.5, size - 0.5])
    fig.update_yaxes(visible=False, range=[size - 0.5, -0.5], scaleanchor="x")
    return fig


_URI_CACHE: OrderedDict[bytes, str] = OrderedDict()


def cached_image_uri(array: np.ndarray, max_side: int = 512) -> str:
    """PNG data URI of an (H, W, 3) uint8 image, memoised (the explorer redraws the same picture on every click)."""
    key = hashlib.blake2b(array.tobytes(), digest_size=16, person=str(array.shape).encode()[:16]).digest()
    if key in _URI_CACHE:
        _URI_CACHE.move_to_end(key)
        return _URI_CACHE[key]
    uri = image_data_uri(array, max_side=max_side, fmt="PNG")
    _URI_CACHE[key] = uri
    while len(_URI_CACHE) > 16:
        _URI_CACHE.popitem(last=False)
    return uri


def patch_grid_figure(
    image: np.ndarray,
    grid: tuple[int, int],
    selected: tuple[int, int] | None = None,
    patch_scores: np.ndarray | None = None,
    map_units: np.ndarray | None = None,
    opacity: float = 0.0,
    height: int = 520,
    pinned: tuple[int, int] | None = None,
) -> go.Figure:
    """The image with its patch grid; one nearly invisible marker per patch carries ``customdata=[row, col]``.

    Clicking a marker selects it (``st.plotly_chart(on_select=...)`` reports scatter points, not heat-map
    cells). Rows and columns are 0-based in ``customdata`` and shown 1-based on the axes and in hover text.
    ``selected`` (0-based) is drawn as a red square, like the red points of the paper's Fig. 4; with ``pinned``
    (side-by-side mode) the pinned patch is the red square "A" and the selected one the blue square "B".
    The figure is built in one go from plain lists: it is rebuilt on every click and must be fast.
    """
    height_p, width_p = grid
    base = image_to_uint8(image)
    if map_units is not None and opacity > 0:
        base = overlay(base, map_units, opacity)
    rows, cols = np.meshgrid(np.arange(height_p), np.arange(width_p), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    if patch_scores is not None:
        scores = np.round(np.asarray(patch_scores, dtype=float).ravel(), 3)
        # Plain lists, not numpy arrays: plotly.py sends numpy as base64 typed arrays, and the click event
        # would then carry customdata as {"0": row, "1": col} objects instead of [row, col].
        custom = [[int(r), int(c), float(v)] for r, c, v in zip(rows, cols, scores)]
        hover = "row %{y}, column %{x}<br>patch score %{customdata[2]:.2f}<extra>click to explain</extra>"
    else:
        custom = [[int(r), int(c)] for r, c in zip(rows, cols)]
        hover = "row %{y}, column %{x}<extra>click to explain</extra>"
    marker_px = max(4, int(0.8 * (height - 60) / max(height_p, width_p)))
    line_x: list[float | None] = []
    line_y: list[float | None] = []
    for c in range(width_p + 1):
        line_x += [c + 0.5, c + 0.5, None]
        line_y += [0.5, height_p + 0.5, None]
    for r in range(height_p + 1):
        line_x += [0.5, width_p + 0.5, None]
        line_y += [r + 0.5, r + 0.5, None]
    data = [
        dict(type="scatter", x=line_x, y=line_y, mode="lines", hoverinfo="skip", showlegend=False,
             line=dict(color="rgba(255,255,255,0.28)", width=1)),
        dict(type="scatter", x=(cols + 1).tolist(), y=(rows + 1).tolist(), mode="markers", customdata=custom,
             hovertemplate=hover, showlegend=False, name="patches",
             marker=dict(symbol="square", size=marker_px, color="rgba(255,255,255,0.02)", line=dict(width=0)),
             selected=dict(marker=dict(opacity=1.0)), unselected=dict(marker=dict(opacity=1.0))),
    ]
    if pinned is not None:
        r, c = pinned
        data.append(dict(type="scatter", x=[c + 1], y=[r + 1], mode="markers+text", hoverinfo="skip",
                         showlegend=False, name="pinned", text=["A"], textposition="top center",
                         textfont=dict(color=PINNED_COLOUR, size=14),
                         marker=dict(symbol="square-open", size=marker_px + 4, color=PINNED_COLOUR,
                                     line=dict(width=3))))
    if selected is not None:
        r, c = selected
        data.append(dict(type="scatter", x=[c + 1], y=[r + 1], mode="markers+text" if pinned else "markers",
                         hoverinfo="skip", showlegend=False, name="selected", text=["B"], textposition="bottom center",
                         textfont=dict(color=COMPARED_COLOUR, size=14),
                         marker=dict(symbol="square-open", size=marker_px + 4,
                                     color=COMPARED_COLOUR if pinned else SELECTED_COLOUR, line=dict(width=3))))
    layout = dict(
        images=[dict(source=cached_image_uri(base), xref="x", yref="y", x=0.5, y=0.5, sizex=width_p,
                     sizey=height_p, sizing="stretch", layer="below", xanchor="left", yanchor="top")],
        xaxis=dict(range=[0.5, width_p + 0.5], showgrid=False, zeroline=False, title=dict(text="column"),
                   constrain="domain", fixedrange=True),
        yaxis=dict(range=[height_p + 0.5, 0.5], showgrid=False, zeroline=False, title=dict(text="row"),
                   scaleanchor="x", constrain="domain", fixedrange=True),
        height=height, margin=dict(l=40, r=10, t=10, b=40), hovermode="closest", dragmode=False,
        clickmode="event+select", plot_bgcolor="rgba(0,0,0,0)",
    )
    return go.Figure(data=data, layout=layout)


def correlation_figure(patch, height: int = 520, log_colours: bool = False) -> go.Figure:
    """Paper Fig. 4 for one patch, as a 2x2 grid: intra correlation | intra target, inter correlation | inter target.

    ``patch`` is a ``fod_app.explain.PatchExplanation``; each panel is its (H, W) distribution over the
    patches of the image (intra) or over the reference (normal) positions (inter); the red dot is the patch.
    Each correlation shares its colour range with its target so the two compare directly.
    ``log_colours`` shows log10 of the weights (makes small weights visible), from the KL's own log floor up.
    Built in one go (no ``make_subplots``/``update_*axes`` calls): this figure is rebuilt on every click.
    """
    titles = ("Intra-image correlation (this image)", "Intra target (RBF)",
              "Inter-image correlation (normal reference)", "Inter target (RBF)")
    panels = (patch.intra_correlation, patch.intra_target, patch.inter_correlation, patch.inter_target)
    height_p, width_p = patch.grid
    h_gap, v_gap = 0.04, 0.1
    cell_w, cell_h = (1.0 - h_gap) / 2, (1.0 - v_gap) / 2
    floor = patch.log_floor

    def shown(values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        return np.log10(np.maximum(values, floor)) if log_colours else values

    data, layout, annotations = [], {}, []
    for i, values in enumerate(panels):
        suffix = "" if i == 0 else str(i + 1)
        row, col = divmod(i, 2)
        left = round(col * (cell_w + h_gap), 6)
        top = round(1.0 - row * (cell_h + v_gap), 6)
        data.append(dict(
            type="heatmap", z=np.round(shown(values), 6).tolist(), x0=1, dx=1, y0=1, dy=1,
            customdata=np.round(np.asarray(values, dtype=float), 6).tolist(),
            xaxis=f"x{suffix}", yaxis=f"y{suffix}", coloraxis="coloraxis" if i < 2 else "coloraxis2",
            hovertemplate="row %{y}, column %{x}<br>weight %{customdata:.4f}<extra></extra>",
        ))
        data.append(dict(
            type="scatter", x=[patch.col + 1], y=[patch.row + 1], mode="markers", hoverinfo="skip",
            showlegend=False, xaxis=f"x{suffix}", yaxis=f"y{suffix}",
            marker=dict(color=SELECTED_COLOUR, size=9, line=dict(color="white", width=1.5)),
        ))
        x_domain = [left, min(1.0, round(left + cell_w, 6))]
        y_domain = [max(0.0, round(top - cell_h, 6)), top]
        layout[f"xaxis{suffix}"] = dict(domain=x_domain, range=[0.5, width_p + 0.5], visible=False,
                                        constrain="domain", anchor=f"y{suffix}", fixedrange=True)
        layout[f"yaxis{suffix}"] = dict(domain=y_domain, range=[height_p + 0.5, 0.5], visible=False,
                                        constrain="domain", scaleanchor=f"x{suffix}", anchor=f"x{suffix}",
                                        fixedrange=True)
        annotations.append(dict(text=titles[i], x=left + cell_w / 2, y=top, xref="paper", yref="paper",
                                yanchor="bottom", xanchor="center", showarrow=False, font=dict(size=13)))

    def colour_axis(a: np.ndarray, b: np.ndarray) -> dict:
        top = float(max(np.max(a), np.max(b), floor))
        if log_colours:
            return dict(colorscale=CORRELATION_COLORSCALE, cmin=np.log10(floor), cmax=np.log10(top), showscale=False)
        return dict(colorscale=CORRELATION_COLORSCALE, cmin=0, cmax=top, showscale=False)

    layout.update(
        height=height, margin=dict(l=10, r=10, t=30, b=10),
        coloraxis=colour_axis(patch.intra_correlation, patch.intra_target),
        coloraxis2=colour_axis(patch.inter_correlation, patch.inter_target),
        annotations=annotations,
    )
    return go.Figure(data=data, layout=layout)


def branch_map_figure(
    map_values: np.ndarray, title: str, fixed_scale: bool = False, height: int = 300
) -> go.Figure:
    """One per-branch map of an image as a heat map (downsampled for speed).

    ``fixed_scale=True`` (the final score, threshold units) uses the fixed colour scale with the
    calibrated threshold (1.0) marked; the raw branch maps use their own range ("low" .. "high").
    """
    values = np.asarray(map_values, dtype=float)
    step = max(1, values.shape[0] // 64)
    coarse = values[::step, ::step]
    if fixed_scale:
        colour = dict(colorscale=PLOTLY_COLORSCALE, zmin=0.0, zmax=MAP_DISPLAY_MAX,
                      colorbar=dict(tickvals=[0.0, 1.0, MAP_DISPLAY_MAX], thickness=10, len=0.9,
                                    ticktext=["0", "1 thr.", f"{MAP_DISPLAY_MAX:g}+"]))
        hover = "score %{z:.2f}<extra></extra>"
    else:
        low, high = float(np.min(coarse)), float(np.max(coarse))
        colour = dict(colorscale="Magma", zmin=low, zmax=high if high > low else low + 1e-9,
                      colorbar=dict(tickvals=[low, high], ticktext=["low", "high"], thickness=10, len=0.9))
        hover = "%{z:.4g}<extra></extra>"
    fig = go.Figure(go.Heatmap(z=np.round(coarse, 5), hovertemplate=hover, **colour))
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x", constrain="domain")
    fig.update_layout(title=dict(text=title, x=0, font=dict(size=14)), height=height, margin=dict(l=5, r=5, t=35, b=5))
    return fig


def score_histogram(
    groups: Sequence[tuple[str, Sequence[float], str]],
    threshold: float,
    review: float | None = None,
    title: str = "",
    height: int = 300,
    x_title: str = "score (1.0 = calibrated threshold)",
) -> go.Figure:
    """Overlaid histograms of scores (threshold units), one per (label, scores, colour), with threshold lines."""
    fig = go.Figure()
    values = [float(v) for _, scores, _ in groups for v in scores]
    top = max([threshold * 1.1, *values]) if values else threshold * 1.5
    bin_size = max(top / 40, 1e-3)
    for label, scores, colour in groups:
        if len(scores):
            fig.add_trace(
                go.Histogram(
                    x=list(scores), name=f"{label} ({len(scores)})", marker_color=colour, opacity=0.65,
                    xbins=dict(start=0, end=top + bin_size, size=bin_size),
                    hovertemplate="score %{x}<br>%{y} images<extra>" + label + "</extra>",
                )
            )
    fig.add_vline(x=threshold, line=dict(color="#1f2933", width=2, dash="dash"),
                  annotation_text=f"NG threshold {threshold:.2f}", annotation_position="top")
    if review is not None:
        fig.add_vline(x=review, line=dict(color=REVIEW_COLOUR, width=2, dash="dot"),
                      annotation_text=f"review from {review:.2f}", annotation_position="bottom right")
    fig.update_layout(
        barmode="overlay", height=height, margin=dict(l=10, r=10, t=40 if title else 30, b=10),
        title=dict(text=title, x=0, font=dict(size=14)), xaxis_title=x_title, yaxis_title="images",
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=1, xanchor="right"),
    )
    return fig


def roc_figure(roc: dict, auroc: float | None, height: int = 340) -> go.Figure:
    """ROC curve (``fod_app.metrics.roc_points``) with the chance diagonal."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#9aa5b1"),
                             name="chance", hoverinfo="skip"))
    if roc.get("fpr"):
        fig.add_trace(
            go.Scatter(
                x=roc["fpr"], y=roc["tpr"], mode="lines", line=dict(color="#1f4e79", width=3), name="model",
                customdata=roc["thresholds"], line_shape="hv",
                hovertemplate="good parts rejected %{x:.1%}<br>defects caught %{y:.1%}<br>"
                              "threshold %{customdata:.2f}<extra></extra>",
            )
        )
    return _curve_layout(fig, "ROC curve (image AUROC {})", auroc, "good parts rejected (false-positive rate)",
                         "defects caught (true-positive rate)", height)


def pr_figure(pr: dict, f1: float | None, height: int = 340) -> go.Figure:
    """Precision-recall curve (``fod_app.metrics.pr_points``)."""
    fig = go.Figure()
    if pr.get("recall"):
        thresholds = list(pr["thresholds"]) + [None]
        fig.add_trace(
            go.Scatter(
                x=pr["recall"], y=pr["precision"], mode="lines", line=dict(color="#7b1fa2", width=3),
                customdata=thresholds, line_shape="hv",
                hovertemplate="defects caught %{x:.1%}<br>NG calls that are real defects %{y:.1%}<br>"
                              "threshold %{customdata:.2f}<extra></extra>",
            )
        )
    return _curve_layout(fig, "Precision-recall curve (F1-max {})", f1, "defects caught (recall)",
                         "NG calls that are real defects (precision)", height)


def _curve_layout(
    fig: go.Figure, title: str, value: float | None, x_title: str, y_title: str, height: int
) -> go.Figure:
    """Shared layout of the ROC and PR charts: percentage axes on [0, 1], the metric in the title."""
    label = "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"
    fig.update_layout(
        title=dict(text=title.format(label), x=0, font=dict(size=14)), height=height,
        xaxis=dict(title=x_title, range=[0, 1], tickformat=".0%"),
        yaxis=dict(title=y_title, range=[0, 1.02], tickformat=".0%"),
        margin=dict(l=10, r=10, t=40, b=10), showlegend=False,
    )
    return fig


def self_check_figure(curve: Sequence[dict], best_step: int | None = None, height: int = 280) -> go.Figure:
    """Self-check AUROC during training (``curve``: ``[{"step", "auroc", "trained"?}, ...]``), the best step starred.

    Two lines where the record has them: the score the check would keep at that step, and the best candidate
    of FOD's trained branches alone (``trained``, which early stopping follows; older bundles lack it). The star sits on
    the line that chose the kept step. The dotted line is the self-check AUROC below which a model is flagged as
    unreliable (``fod_app.selfcheck.POOR_AUROC``). Malformed points are skipped.
    """
    def series(key: str) -> list[tuple[int, float]]:
        return sorted(
            (int(p["step"]), float(p[key]))
            for p in curve
            if isinstance(p, dict) and isinstance(p.get("step"), (int, float)) and isinstance(p.get(key), (int, float))
        )

    kept, trained = series("auroc"), series("trained")
    fig = go.Figure()
    lines = [("score kept", kept, "#1f4e79", "solid")]
    if trained:
        lines.append(("FOD's trained branches (best)", trained, "#c55a11", "dash"))
    for name, points, colour, dash in lines:
        steps = [s for s, _ in points]
        fig.add_trace(
            go.Scatter(
                x=steps, y=[v for _, v in points], mode="lines+markers" if len(steps) <= 40 else "lines", name=name,
                line=dict(color=colour, width=3, dash=dash),
                hovertemplate=f"step %{{x}}<br>{name}: self-check AUROC %{{y:.3f}}<extra></extra>",
            )
        )
    best = [(s, v) for s, v in (trained or kept) if s == best_step]
    if best:
        fig.add_trace(
            go.Scatter(
                x=[best[0][0]], y=[best[0][1]], mode="markers", name="kept step",
                marker=dict(color=GOOD_COLOUR, size=14, symbol="star", line=dict(color="white", width=1)),
                hovertemplate="kept step %{x}<br>self-check AUROC %{y:.3f}<extra></extra>",
            )
        )
    fig.add_hline(y=POOR_AUROC, line=dict(color=REVIEW_COLOUR, width=2, dash="dot"),
                  annotation_text=f"unreliable below {POOR_AUROC:.2f}", annotation_position="bottom right")
    low = min([*(v for _, v in kept + trained), POOR_AUROC, 0.5]) - 0.05
    fig.update_layout(
        title=dict(text="Self-check AUROC during training", x=0, font=dict(size=14)), height=height,
        xaxis_title="training step", yaxis=dict(title="self-check AUROC", range=[max(0.0, low), 1.02]),
        margin=_MARGIN, showlegend=bool(trained), legend=dict(orientation="h", y=-0.3),
    )
    return fig


def confusion_figure(counts: dict[str, int], threshold: float, height: int = 320) -> go.Figure:
    """2x2 confusion matrix (rows: truth, columns: verdict) from ``fod_app.metrics.confusion_at``."""
    z = [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]]
    text = [
        [f"{counts['tn']}<br>good passed", f"{counts['fp']}<br>good rejected"],
        [f"{counts['fn']}<br>defects missed", f"{counts['tp']}<br>defects caught"],
    ]
    # Colour by meaning, not by count: right decisions green, wrong ones red.
    fig = go.Figure(
        go.Heatmap(
            z=[[0, 1], [1, 0]], x=["verdict OK", "verdict NG"], y=["truly good", "truly defective"], text=text,
            customdata=z, texttemplate="%{text}", textfont=dict(size=15, color="#1f2933"),
            colorscale=[[0, "#dcedc8"], [1, "#ffcdd2"]], zmin=0, zmax=1, xgap=3, ygap=3,
            showscale=False, hovertemplate="%{y}, %{x}: %{customdata}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(
        title=dict(text=f"Confusion matrix at threshold {threshold:.2f}", x=0, font=dict(size=14)),
        height=height, margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig


def colour_legend_strip(width: int = 256, height: int = 12) -> np.ndarray:
    """(height, width, 3) uint8 strip of the fixed colour scale 0 .. MAP_DISPLAY_MAX."""
    ramp = np.linspace(0.0, MAP_DISPLAY_MAX, width)[None, :].repeat(height, axis=0)
    return colorize(ramp)


def comparison_figure(comparison, height_per_row: int = 250) -> go.Figure:
    """Side-by-side paper Fig. 4: one row per patch of a ``fod_app.compare.PatchComparison`` (A pinned, B selected),
    columns intra correlation | intra target | inter correlation | inter target, all eight panels on ONE colour
    scale (``comparison.colour_range``, log10 when ``comparison.log_colours``) with its colour bar on the right.
    Each panel's title carries its KL (correlations) or σ (targets); the dot marks the patch itself.

    Drawn as ONE heat map (the panels tiled into one array with transparent gaps) on one pair of axes: eight
    sub-plots made Plotly's re-layout on every click several times slower in the browser.
    """
    from ..patch_compare import panels as patch_panels

    views = comparison.views
    low, high = comparison.colour_range
    log = comparison.log_colours
    height_p, width_p = views[0].patch.grid
    gap_x = max(1, round(width_p * 0.12))
    title_h = max(3, round(height_p * 0.45))
    block_h = title_h + height_p
    total_w = 4 * width_p + 3 * gap_x
    values = np.full((len(views) * block_h, total_w), np.nan)
    weights = np.full_like(values, np.nan)
    dots_x, dots_y, dot_colours, annotations = [], [], [], []
    multi = len(views) > 1
    for r, view in enumerate(views):
        patch = view.patch
        colour = (PINNED_COLOUR if r == 0 else COMPARED_COLOUR) if multi else SELECTED_COLOUR
        top = r * block_h + title_h
        titles = (
            f"Intra correlation<br>KL {patch.intra_kl:.2f}",
            f"Intra target<br>σ {patch.sigma_intra[0]:.2g} × {patch.sigma_intra[1]:.2g}",
            f"Inter correlation<br>KL {patch.inter_kl:.2f}",
            f"Inter target<br>σ {patch.sigma_inter[0]:.2g} × {patch.sigma_inter[1]:.2g}",
        )
        for c, panel in enumerate(patch_panels(patch)):
            left = c * (width_p + gap_x)
            panel = np.asarray(panel, dtype=float)
            weights[top:top + height_p, left:left + width_p] = panel
            shown = np.log10(np.maximum(panel, low)) if log else panel
            values[top:top + height_p, left:left + width_p] = shown
            dots_x.append(left + patch.col)
            dots_y.append(top + patch.row)
            dot_colours.append(colour)
            annotations.append(dict(text=titles[c], x=left + (width_p - 1) / 2, y=top - 0.6, xref="x", yref="y",
                                    xanchor="center", yanchor="bottom", showarrow=False, font=dict(size=12)))
        annotations.append(dict(
            text=f"<b>{view.label}</b> · row {patch.row + 1}, column {patch.col + 1} · patch score {view.score:.2f}",
            x=-0.5, y=r * block_h + 0.2 * title_h - 0.5, xref="x", yref="y", xanchor="left", yanchor="top",
            showarrow=False, font=dict(size=13, color=colour),
        ))
    if log:
        exponents = range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
        ticks = dict(tickvals=list(exponents), ticktext=[f"{10.0 ** e:g}" for e in exponents])
        z_range = dict(zmin=float(np.log10(low)), zmax=float(np.log10(high)))
    else:
        ticks = {}
        z_range = dict(zmin=low, zmax=high)
    # numpy arrays go to the browser as compact typed arrays (NaN = transparent gap): much faster than lists.
    data = [
        dict(type="heatmap", z=values.astype(np.float32), customdata=np.nan_to_num(weights).astype(np.float32),
             hoverongaps=False,
             colorscale=CORRELATION_COLORSCALE, **z_range, x0=0, dx=1, y0=0, dy=1,
             hovertemplate="weight %{customdata:.4f}<extra></extra>",
             colorbar=dict(title=dict(text="weight" + (" (log scale)" if log else ""), side="right"),
                           thickness=14, len=0.9, **ticks)),
        dict(type="scatter", x=dots_x, y=dots_y, mode="markers", hoverinfo="skip", showlegend=False,
             marker=dict(symbol="circle-open", color=dot_colours, size=11, line=dict(color=dot_colours, width=2.5))),
    ]
    layout = dict(
        height=height_per_row * len(views) + 40, margin=dict(l=10, r=10, t=10, b=10), annotations=annotations,
        xaxis=dict(range=[-0.5, total_w - 0.5], visible=False, constrain="domain", fixedrange=True),
        yaxis=dict(range=[values.shape[0] - 0.5, -0.5], visible=False, scaleanchor="x", constrain="domain",
                   fixedrange=True),
        plot_bgcolor="rgba(0,0,0,0)", hovermode="closest",
    )
    return go.Figure(data=data, layout=layout)


def term_bar_figure(comparison, height: int = 220) -> go.Figure:
    """What each patch's score is made of: one horizontal stacked bar per patch (threshold units), with the total."""
    from ..patch_compare import term_label

    palette = {"reconstruction": "#5c6bc0", "intra": "#26a69a", "inter": "#ffa726", "nearest": "#8d6e63"}
    views = comparison.views
    labels = [v.label for v in views][::-1]
    names = list(views[0].terms)
    data = [
        dict(type="bar", orientation="h", name=term_label(n), y=labels, x=[v.terms[n] for v in views][::-1],
             marker=dict(color=palette.get(n, "#90a4ae")),
             hovertemplate=term_label(n) + ": %{x:.3f}<extra></extra>")
        for n in names
    ]
    data.append(dict(type="scatter", mode="markers+text", name="= patch score", y=labels, cliponaxis=False,
                     x=[v.score for v in views][::-1], text=[f"= {v.score:.2f}" for v in views][::-1],
                     textposition="middle right", marker=dict(symbol="line-ns", size=22, color="#1b1f24",
                                                              line=dict(width=3, color="#1b1f24")),
                     hovertemplate="patch score %{x:.3f}<extra></extra>"))
    layout = dict(
        barmode="relative", height=height, margin=dict(l=10, r=60, t=60, b=10),
        xaxis=dict(title=dict(text="threshold units (1.0 = threshold)"), zeroline=True, zerolinecolor="#616e7c"),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, xanchor="left", font=dict(size=11)),
        shapes=[dict(type="line", x0=1.0, x1=1.0, y0=0, y1=1, yref="paper", line=dict(color="#c62828", dash="dash"))],
    )
    return go.Figure(data=data, layout=layout)
