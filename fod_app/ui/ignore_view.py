"""Models page panel: set, preview and clear a model's ignore regions (``fod_app.ignore_regions``)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from ..bundle import BundleError, set_ignore_regions
from ..data import ImageLoadError, load_image, prepare_image
from ..ignore_regions import IgnoreRegions, IgnoreRegionsError, create_ignore_regions, preview
from ..review import log_model_saved
from .common import session_id


def ignore_regions_panel(name: str, meta: dict[str, Any]) -> None:
    """Expander with the current regions, a preview, and a form to change or clear them."""
    size = int((meta.get("config") or {}).get("image_size", 256))
    try:
        current = IgnoreRegions.from_dict(meta.get("ignore_regions"))
    except IgnoreRegionsError as err:
        st.error(f"This model's ignore regions are unreadable: {err}", icon=":material/error:")
        return
    with st.expander("Ignore regions (fixtures, labels, edges that never count)", expanded=False):
        if current is None:
            st.caption("Every pixel counts. Mark regions that vary on good parts (a fixture, a label, an edge) so "
                       "they never raise the score.")
        else:
            note = ("calibrated with them at training" if current.calibrated else
                    "set after training: the threshold is kept from training (conservative); retrain to calibrate")
            st.caption(f"{current.ignored_fraction(size):.0%} of the image is ignored ({note}). Inside the regions "
                       "the heat map is 0 and the score is the largest value outside them.")
        key = f"ignore_{name}"
        photo_file = st.file_uploader("A photo to preview on (optional)", type=["png", "jpg", "jpeg", "bmp"],
                                      key=f"{key}_photo")
        with st.form(key=f"{key}_form", border=False):
            text = st.text_area(
                "Rectangles: x0,y0,x1,y1 as fractions of width and height, one per line (0,0,0.2,1 = left fifth)",
                value="\n".join(",".join(f"{v:g}" for v in r) for r in (current.rectangles if current else ())),
                key=f"{key}_rects",
            )
            mask_file = st.file_uploader("and/or a mask image (white = ignore; any size)",
                                         type=["png", "jpg", "jpeg", "bmp"], key=f"{key}_mask")
            apply_clicked = st.form_submit_button("Apply", icon=":material/check:")
        try:
            mask_bytes = mask_file.getvalue() if mask_file is not None else None
            if mask_bytes is None and current is not None and current.mask is not None:
                keep_mask = current.mask  # an earlier uploaded mask stays unless cleared
            else:
                keep_mask = None
            proposed = create_ignore_regions(text, mask_bytes, size)
            if keep_mask is not None:
                proposed = IgnoreRegions(proposed.rectangles if proposed else (), keep_mask)
            photo = None
            if photo_file is not None:
                photo = prepare_image(load_image(photo_file.getvalue(), photo_file.name), size)
        except (IgnoreRegionsError, ImageLoadError, ValueError) as err:
            st.error(str(err), icon=":material/error:")
            return
        st.image(preview(proposed, size, photo), caption="Magenta: ignored", width=256)
        if apply_clicked:
            try:
                log_model_saved(meta, set_ignore_regions(name, proposed), session_id(), "ignore regions set (app)")
            except (BundleError, OSError) as err:
                st.error(f"Could not save the ignore regions: {err}", icon=":material/error:")
            else:
                st.success("Saved. Inspect, Explore and Evaluate use them from now on." if proposed else
                           "Cleared: every pixel counts again.", icon=":material/check:")
        if current is not None and st.button("Clear all ignore regions", key=f"{key}_clear"):
            log_model_saved(meta, set_ignore_regions(name, None), session_id(), "ignore regions cleared (app)")
            st.rerun()
