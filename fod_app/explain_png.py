"""PNG of the Explore view for slides, drawn with Pillow only (no kaleido/matplotlib needed).

Layout: the photo with patches A (pinned, red) and B (selected, blue) on the left; on the right one row of
four panels per patch (intra correlation, intra target, inter correlation, inter target) on ONE colour scale,
the colour bar, and what each patch's score is made of (threshold units).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .patch_compare import PatchComparison, panels, term_label

# Plotly's Viridis (the colour scale of the interactive charts), 10 anchors.
_VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
            "#fde725"]
_ANCHORS = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in _VIRIDIS], dtype=float)
PINNED_RGB, COMPARED_RGB, TEXT_RGB = (255, 23, 68), (0, 176, 255), (27, 31, 36)
PANEL, PHOTO, GAP = 170, 340, 14


def viridis(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (..., 3) on the Viridis scale."""
    t = np.clip(np.nan_to_num(np.asarray(t, dtype=float)), 0.0, 1.0)
    positions = np.linspace(0.0, 1.0, len(_ANCHORS))
    return np.stack([np.interp(t, positions, _ANCHORS[:, i]) for i in range(3)], axis=-1).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _scaled(values: np.ndarray, comparison: PatchComparison) -> np.ndarray:
    low, high = comparison.colour_range
    values = np.asarray(values, dtype=float)
    if comparison.log_colours:
        values, low, high = np.log10(np.maximum(values, low)), np.log10(low), np.log10(high)
    return (values - low) / max(high - low, 1e-12)


def comparison_png(comparison: PatchComparison, image: np.ndarray, title: str) -> bytes:
    """PNG bytes of the current Explore view. image: (S, S, 3) uint8 photo."""
    n_rows = len(comparison.views)
    small, normal, large = _font(12), _font(14), _font(17)
    row_h = 22 + 34 + PANEL
    panels_w = 4 * PANEL + 3 * GAP
    bar_w = 90
    width = GAP + PHOTO + 2 * GAP + panels_w + GAP + bar_w
    terms_h = 26 + 20 * (len(comparison.views[0].terms) + 1)
    height = 40 + max(PHOTO + 30, n_rows * row_h) + terms_h + GAP
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((GAP, 10), title, fill=TEXT_RGB, font=large)

    # photo with the patch squares
    photo = Image.fromarray(image).resize((PHOTO, PHOTO), Image.BILINEAR)
    canvas.paste(photo, (GAP, 40))
    grid_h, grid_w = comparison.views[0].patch.grid
    colours = [PINNED_RGB, COMPARED_RGB] if n_rows > 1 else [PINNED_RGB]
    for view, colour in zip(comparison.views, colours):
        r, c = view.patch.row, view.patch.col
        x0, y0 = GAP + c * PHOTO / grid_w, 40 + r * PHOTO / grid_h
        box = [x0 - 1, y0 - 1, x0 + PHOTO / grid_w + 1, y0 + PHOTO / grid_h + 1]
        draw.rectangle(box, outline=colour, width=3)
        label_x = box[2] + 3 if box[2] + 16 < GAP + PHOTO else box[0] - 14
        draw.text((label_x, box[1] - 4), view.label.split(" ")[0], fill=colour, font=normal)
    head = "mean of heads" if comparison.head is None else f"head {comparison.head + 1}"
    draw.text((GAP, 40 + PHOTO + 6), f"level {comparison.level + 1} ({grid_h}x{grid_w}), layer {comparison.layer + 1}, "
              f"{head}", fill=TEXT_RGB, font=small)

    # panels, one row per patch
    left = GAP + PHOTO + 2 * GAP
    for i, (view, colour) in enumerate(zip(comparison.views, colours)):
        top = 40 + i * row_h
        patch = view.patch
        draw.text((left, top), f"{view.label} · row {patch.row + 1}, column {patch.col + 1} · patch score "
                  f"{view.score:.2f}", fill=colour, font=normal)
        titles = (f"Intra correlation\nKL {patch.intra_kl:.2f}",
                  f"Intra target\nsigma {patch.sigma_intra[0]:.2g} x {patch.sigma_intra[1]:.2g}",
                  f"Inter correlation\nKL {patch.inter_kl:.2f}",
                  f"Inter target\nsigma {patch.sigma_inter[0]:.2g} x {patch.sigma_inter[1]:.2g}")
        for c, values in enumerate(panels(patch)):
            x = left + c * (PANEL + GAP)
            draw.multiline_text((x, top + 22), titles[c], fill=TEXT_RGB, font=small, spacing=2)
            tile = Image.fromarray(viridis(_scaled(values, comparison))).resize((PANEL, PANEL), Image.NEAREST)
            canvas.paste(tile, (x, top + 56))
            cell_w, cell_h = PANEL / patch.grid[1], PANEL / patch.grid[0]
            cx, cy = x + (patch.col + 0.5) * cell_w, top + 56 + (patch.row + 0.5) * cell_h
            draw.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], outline=colour, width=2)  # open: the cell stays visible

    # colour bar (shared by every panel)
    bar_x, bar_top, bar_h = left + panels_w + GAP, 62, max(120, n_rows * row_h - 60)
    ramp = viridis(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(16, axis=1)
    canvas.paste(Image.fromarray(ramp), (bar_x, bar_top))
    low, high = comparison.colour_range
    if comparison.log_colours:
        exponents = range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
        ticks = [(10.0 ** e, f"{10.0 ** e:g}") for e in exponents]
        position = [(np.log10(v) - np.log10(low)) / (np.log10(high) - np.log10(low)) for v, _ in ticks]
    else:
        ticks = [(v, f"{v:.3g}") for v in np.linspace(low, high, 5)]
        position = [(v - low) / max(high - low, 1e-12) for v, _ in ticks]
    for (_, text), p in zip(ticks, position):
        if 0.0 <= p <= 1.0:
            y = bar_top + (1.0 - p) * (bar_h - 1)
            draw.line([bar_x + 16, y, bar_x + 20, y], fill=TEXT_RGB)
            draw.text((bar_x + 23, y - 7), text, fill=TEXT_RGB, font=small)
    draw.text((bar_x, bar_top - 20), "weight" + (" (log)" if comparison.log_colours else ""), fill=TEXT_RGB,
              font=small)

    # what each score is made of
    y = 40 + max(PHOTO + 30, n_rows * row_h)
    draw.text((GAP, y), "What each patch score is made of (threshold units, 1.00 = threshold):", fill=TEXT_RGB,
              font=normal)
    for j, name in enumerate(comparison.views[0].terms):  # terms come in the display order of compare.patch_terms
        draw.text((GAP, y + 24 + 20 * j), term_label(name), fill=TEXT_RGB, font=small)
        for k, v in enumerate(comparison.views):
            draw.text((GAP + 300 + 140 * k, y + 24 + 20 * j), f"{v.label.split(' ')[0]}: {v.terms[name]:+.3f}",
                      fill=TEXT_RGB, font=small)
    j = len(comparison.views[0].terms)
    for k, v in enumerate(comparison.views):
        draw.text((GAP + 300 + 140 * k, y + 24 + 20 * j), f"= {v.score:.3f}", fill=TEXT_RGB, font=normal)
    draw.text((GAP, y + 24 + 20 * j), "patch score", fill=TEXT_RGB, font=normal)

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
