"""Models page section: a model's evaluation records (latest with its size, and all of them)."""

from __future__ import annotations

from typing import Any

import streamlit as st

from ..evaluation_records import latest_image_auroc, metric, model_evaluations, record_row

__all__ = ["evaluation_records_section", "latest_image_auroc"]


def evaluation_records_section(model_name: str, meta: dict[str, Any] | None = None) -> None:
    """The latest evaluation (metrics, data set, size, threshold, date) and a table of all of them."""
    st.markdown("##### Evaluations")
    records, problem = model_evaluations(model_name)
    if problem:
        st.warning(f"The evaluation records cannot be read: {problem}")
    legacy = (meta or {}).get("metrics") or {}
    if not records:
        if metric(legacy, "image_auroc") is not None:
            st.markdown(
                f"An evaluation stored in the model file before evaluation records existed: image AUROC "
                f"{metric(legacy, 'image_auroc'):.3f} on {legacy.get('n_good', '?')} good + "
                f"{legacy.get('n_defective', '?')} defective images from `{legacy.get('data', '?')}`."
            )
        else:
            st.markdown("This model is not evaluated yet: the Evaluate page measures it on labelled images.")
        return
    latest = records[0]
    auroc = metric(latest, "image_auroc")
    parts = [f"image AUROC **{auroc:.3f}**" if auroc is not None else "image AUROC n/a (needs good and defective)"]
    if not latest.image_level_only:
        parts += [f"{label} {value:.3f}" for key, label in (("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO"))
                  if (value := metric(latest, key)) is not None]
    st.markdown(
        f"**Latest** ({record_row(latest)['Date']}): {', '.join(parts)} on **{latest.dataset_name}** — "
        f"{latest.n_good + latest.n_defect} images ({latest.n_good} good, {latest.n_defect} defective)"
        + (", image level only (no masks)" if latest.image_level_only else "")
        + f", threshold {latest.threshold_units:.2f}, model version `{latest.model_version}`."
    )
    with st.expander(f"All evaluations of this model ({len(records)})", expanded=len(records) > 1):
        st.dataframe(
            [record_row(r) for r in records], hide_index=True, width="stretch", key=f"models_evaluations_{model_name}",
            column_config={name: st.column_config.NumberColumn(format="%.3f")
                           for name in ("Image AUROC", "Pixel AUROC", "AUPRO", "Threshold")},
        )
