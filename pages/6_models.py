"""Models: list trained models, activate, rename, delete, download and upload model bundles."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import streamlit as st

from fod_app.bundle import (
    BundleError,
    BundleInfo,
    delete_bundle,
    export_bundle_zip,
    import_bundle_zip,
    list_bundles,
    models_dir,
    rename_bundle,
    validate_name,
)
from fod_app.exposure import describe as describe_exposure
from fod_app.jobs import JobResult, get_job_manager
from fod_app.ui.charts import self_check_figure
from fod_app.ui.common import ACTIVE_MODEL_KEY, active_model, ensure_router, set_active_model
from fod_app.ui.evaluations_view import evaluation_records_section, latest_image_auroc
from fod_app.ui.export_view import render_onnx_export
from fod_app.ui.ignore_view import ignore_regions_panel
from fod_app.ui.training_view import duration, preset_label, self_check_summary, strictness_summary

FLASH_KEY = "models_flash"
SELECT_NEXT_KEY = "models_select_next"  # set by actions; applied before the selectbox exists
SELF_CHECK_BRANCHES = (
    ("reconstruction", "Reconstruction"),
    ("intra", "Intra-image (patterns within the image)"),
    ("inter", "Inter-image (patterns vs. the reference)"),
    ("nearest", "Nearest good patch (not FOD: PatchCore's distance)"),
    ("combined", "Combined"),
)


def _created(meta: dict[str, Any]) -> str:
    raw = meta.get("created")
    try:
        return datetime.fromisoformat(str(raw)).astimezone().strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError):
        return str(raw or "–")


def _row(info: BundleInfo, active: str | None) -> dict[str, Any]:
    meta = info.metadata or {}
    cfg = meta.get("config", {})
    training = meta.get("training", {})
    calibration = meta.get("calibration", {})
    fingerprint = str((meta.get("data") or {}).get("fingerprint") or "")
    quantile = calibration.get("quantile")
    auroc = latest_image_auroc(info.name, meta)
    return {
        "Active": "✔" if info.name == active else "",
        "Name": info.name,
        "Created": _created(meta),
        "Preset": preset_label(cfg.get("preset")),
        "Backbone": str(cfg.get("backbone", "")).removeprefix("tf_"),
        "Good images": training.get("n_images"),
        "Expected false rejects": f"{1 - float(quantile):.0%}" if isinstance(quantile, (int, float)) else "–",
        "Image AUROC": f"{auroc:.3f}" if auroc is not None else "not evaluated",
        "Data fingerprint": fingerprint[:12] or "–",
    }


def _threshold_text(meta: dict[str, Any]) -> str:
    calibration = meta.get("calibration", {})
    quantile = calibration.get("quantile")
    raw = calibration.get("threshold")
    if not isinstance(quantile, (int, float)) or not isinstance(raw, (int, float)):
        return "–"
    return (
        f"set so that about {1 - quantile:.0%} of good parts are flagged by mistake "
        f"(from {len(calibration.get('good_scores', []))} held-back good images; raw value {raw:.4g})"
    )


def _number(value: Any) -> str:
    return f"{float(value):.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _self_check(info: BundleInfo) -> None:
    """The label-free self-check recorded at training: sentence, warning, per-branch AUROC, score, curve."""
    record = (info.metadata or {}).get("self_check")
    st.markdown("##### Self-check")
    self_check_summary(record)
    if not isinstance(record, dict) or record.get("auroc") is None:
        return
    per_branch = record.get("per_branch") or {}
    st.table(
        [{"Branch": label, "Self-check AUROC": _number(per_branch.get(key))} for key, label in SELF_CHECK_BRANCHES],
        hide_index=True,
    )
    st.caption(
        "Measured on synthetic defects — cut-and-paste patches, scars and blended foreign texture — added to "
        "good images held back from training; no real defect labels are used. 1.0 = synthetic defects and good "
        "parts perfectly separated, 0.5 = guessing. — = branch not part of this model.",
        help=record.get("method") or None,
    )
    score = record.get("score") or {}
    weights = score.get("weights") or {}
    if score:
        parts = ", ".join(f"{key} {_number(weights[key])}" for key, _ in SELF_CHECK_BRANCHES[:-1] if key in weights)
        how = {
            "weighted": " — each branch weighted by how well it separated the synthetic defects on its own, less "
                        "where it repeats another branch",
            "product": " — the paper's formula",
        }.get(score.get("name"), "")
        st.markdown(f"**Score used**: `{score.get('mode', '?')}`{how} · weights {parts}")
    curve = record.get("curve") or []
    if curve:
        best_step = record.get("best_step")
        st.plotly_chart(
            self_check_figure(curve, best_step),
            key=f"models_self_check_{info.name}",
            config={"displayModeBar": False},
        )
        st.caption(
            f"Self-check AUROC measured during training ({record.get('steps_run', '?')} steps run) of the score kept "
            "and, dashed, of the best score made of FOD's trained branches alone: early stopping follows that one "
            "(the nearest-good-patch distance does not depend on training). The saved model keeps the weights of step "
            f"{best_step if best_step is not None else '?'} (star)."
        )


def _calibration(info: BundleInfo) -> None:
    """Threshold, false-reject rates and the held-back good-score histogram, from the bundle (any model, any time)."""
    meta = info.metadata or {}
    st.markdown("##### Calibration")
    strictness_summary(JobResult.from_metadata(meta, str(info.path)), key="models_")
    reference = meta.get("familiarity")
    if isinstance(reference, dict):
        held = reference.get("holdout_distances") or []
        st.caption(
            f"**Wrong-part check**: on. Images whose overall appearance is further from the training images than "
            f"{reference.get('margin', '?')}× the furthest of the {len(held)} held-back good images are flagged "
            "“do not look like the parts this model was trained on”."
        )
    else:
        st.caption("**Wrong-part check**: not available for this model (trained before the check existed); "
                   "train it again to get it.")


def _flash(kind: str, text: str) -> None:
    st.session_state[FLASH_KEY] = (kind, text)


def _show_flash() -> None:
    item = st.session_state.pop(FLASH_KEY, None)
    if item:
        kind, text = item
        getattr(st, kind)(text)


def _held_out_in_bank(training: dict) -> bool:
    """Whether the held-out images joined the memory bank after calibration (``held_out_in_bank``)."""
    return int(training.get("n_bank_images", 0)) > int(training.get("n_train", 0))


def _details(info: BundleInfo) -> None:
    meta = info.metadata or {}
    cfg = meta.get("config", {})
    training = meta.get("training", {})
    data = meta.get("data") or {}
    lines = [
        f"- **Created**: {_created(meta)} · model version `{meta.get('model_version')}`",
        f"- **Training**: preset *{preset_label(cfg.get('preset'))}*, {cfg.get('epochs')} rounds, backbone "
        f"`{cfg.get('backbone')}`, {training.get('n_train', '?')} images for learning + "
        f"{training.get('n_calibration', '?')} held back for the threshold"
        f"{' (then added to the memory bank)' if _held_out_in_bank(training) else ''}, "
        f"{duration(training.get('seconds_total'))} on {training.get('device', '?')}",
        f"- **Exposure**: {describe_exposure(training.get('exposure'))}",
        f"- **Threshold**: {_threshold_text(meta)}",
        f"- **Data**: {data.get('source', '–')} · fingerprint `{str(data.get('fingerprint', '–'))[:16]}`"
        " (identifies the exact set of training images)",
    ]
    st.markdown("\n".join(lines))


def _actions(info: BundleInfo, active: str | None) -> None:
    name = info.name
    running = get_job_manager().active()
    in_use = running is not None and running.name == name
    left, right = st.columns(2, gap="large")
    with left:
        st.markdown("**Use**")
        if name == active:
            st.caption("This is the active model: the Inspect, Explore and Evaluate pages use it.")
        elif st.button("Make active", key=f"models_activate_{name}", icon=":material/check:", type="primary"):
            set_active_model(name)
            _flash("success", f"“{name}” is now the active model.")
            st.rerun()
        st.download_button(
            "Download as zip",
            data=lambda: export_bundle_zip(name),
            file_name=f"{name}.zip",
            mime="application/zip",
            key=f"models_download_{name}",
            icon=":material/download:",
            on_click="ignore",
            help="A single file with the model and its settings, to copy to another FOD Inspector.",
        )
        st.markdown("**Rename**")
        with st.form(key=f"models_rename_form_{name}", border=False):
            new_name = st.text_input("New name", value=name, key=f"models_new_name_{name}")
            renamed = st.form_submit_button("Rename", icon=":material/edit:", disabled=in_use)
        if in_use:
            st.caption("Rename is disabled: a training job is writing this model right now.")
        if renamed:
            new_name = new_name.strip()
            try:
                if new_name == name:
                    raise BundleError("The new name is the same as the current one.")
                validate_name(new_name)
                rename_bundle(name, new_name)
            except (BundleError, OSError) as err:
                st.error(str(err), icon=":material/error:")
            else:
                if st.session_state.get(ACTIVE_MODEL_KEY) == name:
                    set_active_model(new_name)
                st.session_state[SELECT_NEXT_KEY] = new_name
                _flash("success", f"Renamed “{name}” to “{new_name}”.")
                st.rerun()
    with right:
        st.markdown("**Delete**")
        st.caption("Deleting removes the model from this computer for everyone. Download it first to keep a copy.")
        sure = st.checkbox(f"Yes, delete “{name}” permanently", key=f"models_confirm_delete_{name}", disabled=in_use)
        if in_use:
            st.caption("A training job is writing this model right now; wait until it finishes.")
        if not sure and not in_use:
            st.caption("Tick the box above to enable Delete.")
        if st.button("Delete model", key=f"models_delete_{name}", disabled=not sure or in_use,
                     icon=":material/delete:"):
            try:
                delete_bundle(name)
            except (BundleError, OSError) as err:
                st.error(f"Could not delete “{name}”: {err}", icon=":material/error:")
            else:
                if st.session_state.get(ACTIVE_MODEL_KEY) == name:
                    set_active_model(None)
                st.session_state[SELECT_NEXT_KEY] = None
                _flash("success", f"Deleted “{name}”.")
                st.rerun()


def _upload() -> None:
    with st.expander("Add a model from a zip file (downloaded from another FOD Inspector)"):
        uploaded = st.file_uploader("Model zip", type=["zip"], key="models_upload")
        new_name = st.text_input("Save as (optional; default: the name inside the zip)", key="models_upload_name")
        if uploaded is None:
            st.caption("Choose a model zip file above to enable this button.")
        if st.button("Check and add the model", key="models_upload_go", disabled=uploaded is None,
                     icon=":material/upload:"):
            try:
                with st.spinner("Checking the model file…"):
                    added = import_bundle_zip(uploaded.getvalue(), name=new_name.strip() or None)
            except BundleError as err:
                st.error(f"This model was not added: {err}", icon=":material/error:")
            else:
                st.session_state[SELECT_NEXT_KEY] = added
                _flash("success", f"Added model “{added}”. It passed all checks.")
                st.rerun()


ensure_router()
st.title("Models")
st.caption(
    f"Every trained model is stored as a folder in `{models_dir()}`. The **active** model is the one the Inspect, "
    "Explore and Evaluate pages use in your browser session; the last one chosen is remembered on this workstation "
    "(a reload or a new tab starts with it)."
)
_show_flash()

bundles = list_bundles()
readable = [b for b in bundles if b.error is None]
broken = [b for b in bundles if b.error is not None]
active = active_model()

if not readable:
    st.info("No models yet. Train one on the **Train** page, or add one from a zip below.", icon=":material/info:")
else:
    st.dataframe(
        [_row(b, active) for b in readable],
        hide_index=True,
        column_config={
            "Image AUROC": st.column_config.TextColumn(
                help="From the Evaluate page: 1.0 = good and defective images perfectly separated, 0.5 = guessing."
            ),
            "Expected false rejects": st.column_config.TextColumn(
                help="Share of good parts expected to be flagged by mistake at the threshold."
            ),
            "Data fingerprint": st.column_config.TextColumn(
                help="Identifies the exact set of training images: same fingerprint = same images."
            ),
        },
    )
    names = [b.name for b in readable]
    if SELECT_NEXT_KEY in st.session_state:
        st.session_state["models_selected"] = st.session_state.pop(SELECT_NEXT_KEY)
    if st.session_state.get("models_selected") not in names:
        st.session_state["models_selected"] = active if active in names else names[0]
    st.markdown("#### Manage a model")
    selected = st.selectbox("Model", names, key="models_selected")
    info = next(b for b in readable if b.name == selected)
    _details(info)
    _calibration(info)
    evaluation_records_section(info.name, info.metadata)
    ignore_regions_panel(info.name, info.metadata or {})
    _self_check(info)
    _actions(info, active)
    render_onnx_export(info.name)

if broken:
    st.markdown("#### Models that cannot be used")
    for info in broken:
        with st.container(border=True):
            st.error(f"**{info.name}**: {info.error}", icon=":material/error:")
            sure = st.checkbox(f"Yes, delete “{info.name}”", key=f"models_confirm_delete_broken_{info.name}")
            if st.button("Delete", key=f"models_delete_broken_{info.name}", disabled=not sure):
                try:
                    delete_bundle(info.name)
                except (BundleError, OSError) as err:
                    st.error(f"Could not delete “{info.name}”: {err}")
                else:
                    _flash("success", f"Deleted “{info.name}”.")
                    st.rerun()

_upload()
