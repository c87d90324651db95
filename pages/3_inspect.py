"""Inspect: score uploaded images (or a zip) with a trained model, judge them, export CSV / HTML reports."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from fod_app.archive import ArchiveError, extract_images_from_zip
from fod_app.calibration import verdict
from fod_app.data import IMAGE_EXTENSIONS, ImageLoadError, load_image, prepare_image
from fod_app.history import HistoryError
from fod_app.paths import SAMPLE_DATA
from fod_app.records import image_record, model_identity, sha256_bytes
from fod_app.report import html_report, image_data_uri, results_csv
from fod_app.ui import charts
from fod_app.ui.cache import recall_inspection, remember_inspection
from fod_app.ui.common import ensure_router, session_id, wrong_part_warning
from fod_app.ui.history_view import get_history, inspection_from_run, result_viewer, review_panel
from fod_app.ui.pickers import decision_controls, pick_model
from fod_app.visualize import image_to_uint8, overlay

ensure_router()

INSPECTION_KEY = "inspection"  # also read by the Explore page ("from the last inspection")
RESULT_CACHE_KEY = "inspect_result_cache"  # (model version, content sha256) -> result, so added files only are run
SAMPLES_FLAG = "inspect_use_samples"
RUN_PARAM = "run"  # ?run=<run id>: a reload reopens this run from the history
UPLOAD_TYPES = [ext.lstrip(".") for ext in IMAGE_EXTENSIONS] + ["zip"]
THUMB = 96

st.title("Inspect parts")
st.caption(
    "Upload photos of parts taken the same way as the training photos. Each image gets a score "
    "(1.00 = the model's calibrated threshold) and a verdict; the heat map shows where it differs from good parts."
)

picked = pick_model("inspect")
if picked is None:
    st.stop()
model_name, detector = picked
version = str(detector.metadata.get("model_version", "?"))
calibration = detector.calibration
history, history_problem = get_history()
if history_problem:
    st.warning(f"Inspection history is unavailable: {history_problem} Results are shown but not kept.",
               icon=":material/database:")

uploads = st.file_uploader(
    "Images to inspect: one or many, or a .zip of images",
    type=UPLOAD_TYPES, accept_multiple_files=True, key="inspect_uploads",
    help="PNG, JPEG, BMP, TIFF or WEBP files, or one or more zip files containing them.",
)
if not uploads:
    if st.session_state.get(SAMPLES_FLAG):
        st.caption("Showing the 16 bundled solar-cell sample images (6 good, 10 defective). Upload your own images "
                   "above to inspect them instead.")
    else:
        left, right = st.columns([1, 3], vertical_alignment="center")
        left.button("Try the sample images", help="16 solar-cell images shipped with the app (6 good, 10 defective)",
                    on_click=lambda: st.session_state.update({SAMPLES_FLAG: True}))
        right.caption("No images at hand? Inspect the bundled solar-cell sample images (for a model trained on them).")


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        stem, dot, ext = name.rpartition(".")
        candidate = f"{stem} ({n}).{ext}" if dot else f"{name} ({n})"
        n += 1
    taken.add(candidate)
    return candidate


def _gather_sources(files, workdir: Path) -> tuple[list[tuple[str, object]], list[tuple[str, str]]]:
    """(name, source) pairs for every image (zips extracted safely) and (name, reason) for what was skipped."""
    sources: list[tuple[str, object]] = []
    failures: list[tuple[str, str]] = []
    taken: set[str] = set()
    for index, item in enumerate(files):
        name = getattr(item, "name", None) or Path(str(item)).name
        if name.lower().endswith(".zip"):
            dest = workdir / f"zip{index}"
            try:
                report = extract_images_from_zip(item, dest, keep_structure=True, name=name)
            except ArchiveError as err:
                failures.append((name, str(err)))
                continue
            for path in report.extracted:
                sources.append((_unique(f"{name}/{path.relative_to(dest).as_posix()}", taken), path))
            failures += [(f"{name}/{entry}", reason) for entry, reason in report.skipped]
        else:
            sources.append((_unique(name, taken), item))
    return sources, failures


def _content(src) -> bytes:
    return src.getvalue() if hasattr(src, "getvalue") else Path(src).read_bytes()


def _run_inspection(files, signature: tuple, previous: dict | None) -> dict:
    """Inspect the files not inspected before with this model version (cached by content hash); record the run.

    When the files extend the previous inspection (files added to an upload), the new images are appended to
    its history run; otherwise a new run is recorded.
    """
    size = detector.config.image_size
    cache: dict = st.session_state.setdefault(RESULT_CACHE_KEY, {})
    results: list[dict] = []
    records: dict[str, object] = {}  # file -> ImageRecord of newly inspected images
    with tempfile.TemporaryDirectory(prefix="fod-inspect-") as tmp:
        sources, failures = _gather_sources(files, Path(tmp))
        todo: list[tuple[str, object, str]] = []
        for name, src in sources:
            try:
                sha = sha256_bytes(_content(src))
            except OSError as err:
                failures.append((name, f"cannot be read: {err}"))
                continue
            cached = cache.get((version, sha))
            if cached is not None:
                results.append({**cached, "file": name})
            else:
                todo.append((name, src, sha))
        total = len(todo)
        bar = st.progress(0.0, text=f"Inspecting {total} image(s)…") if total else None
        loaded: dict[str, np.ndarray] = {}
        hashes = {name: sha for name, _, sha in todo}

        def images() -> Iterator[tuple[str, np.ndarray]]:
            for done, (name, src, _sha) in enumerate(todo, start=1):
                try:
                    arr = prepare_image(load_image(src, name), size)
                except ImageLoadError as err:
                    failures.append((name, str(err).removeprefix(f"{name}: ")))
                    continue
                except MemoryError:
                    failures.append((name, "not enough memory to open this image"))
                    continue
                loaded[name] = arr
                if bar is not None:
                    bar.progress(done / total, text=f"Inspecting… {done}/{total}")
                yield name, arr

        for result in detector.inspect(images(), batch_size=8):
            array = loaded.pop(result.name)
            image = image_to_uint8(array)
            amap = result.anomaly_map.astype(np.float16)
            entry = {
                "file": result.name,
                "sha": hashes[result.name],
                "score": float(result.score),
                "raw_score": float(result.raw_score),
                "image": image,
                "map": amap,
                "thumb": image_data_uri(image, max_side=THUMB),
                "thumb_overlay": image_data_uri(overlay(image, amap.astype(np.float32), 0.5), max_side=THUMB),
                "unfamiliar": result.unfamiliar,  # wrong-part check (fod_app.familiarity)
                "familiarity": result.familiarity,
            }
            cache[(version, entry["sha"])] = entry
            results.append(entry)
            if history is not None:
                records[result.name] = image_record(result, array, entry["sha"])
        if bar is not None:
            bar.empty()
    results.sort(key=lambda r: r["score"], reverse=True)
    run_id = _record(results, records, previous)
    return {
        "signature": signature, "model": model_name, "version": version, "results": results,
        "failures": failures, "created": datetime.now().astimezone(), "run_id": run_id,
    }


def _record(results: list[dict], records: dict, previous: dict | None) -> str | None:
    """Record the inspection in the history; sets each result's ``image_id``. Returns the run id (or None)."""
    if history is None or not results:
        return None
    decision_units = float(st.session_state.get("fod_threshold", 1.0))
    review_raw = calibration.review_threshold
    review_units = None if review_raw is None else review_raw / calibration.threshold
    old_files = {r["file"]: r for r in (previous or {}).get("results", [])}
    extends = (
        previous is not None and previous.get("run_id") and previous.get("version") == version
        and all(name in {r["file"] for r in results} for name in old_files)
    )
    new = [r for r in results if not (extends and r["file"] in old_files)]
    pending = []
    for r in sorted(new, key=lambda r: r["file"]):
        rec = records.get(r["file"])
        if rec is None:  # inspected earlier (cache): rebuild its record from the cached arrays
            from fod_app.inference import InspectionResult

            rec = image_record(InspectionResult(r["file"], r["score"], "OK", r["map"].astype(np.float32),
                                                r["raw_score"]), r["image"], r["sha"])
        rec.file_name = r["file"]
        rec.verdict = verdict(r["score"], decision_units, None)
        pending.append(rec)
    try:
        if extends:
            run_id = previous["run_id"]
            if pending:
                history.add_images(run_id, pending)
        else:
            run_id = history.record_run(source="app", **model_identity(detector.metadata),
                                        threshold=calibration.threshold, review_threshold=review_units,
                                        images=pending, user=session_id(), threshold_units=decision_units)
        ids = {(i.file_name, i.content_sha256): i.image_id for i in history.run(run_id).images}
    except HistoryError as err:
        st.warning(f"This inspection was not recorded in the history: {err}", icon=":material/database:")
        return None
    for r in results:
        r["image_id"] = ids.get((r["file"], r["sha"]))
    return run_id


def _reopen_from_history() -> dict | None:
    """The run named in the URL (?run=), else this browser's or the app's last run, from the history."""
    if history is None:
        return None
    try:
        run_id = st.query_params.get(RUN_PARAM)
        if not run_id:
            latest = history.latest_run(source="app")
            run_id = latest.run_id if latest else None
        return inspection_from_run(history.run(run_id)) if run_id else None
    except HistoryError:
        return None


if uploads:
    st.session_state[SAMPLES_FLAG] = False
    files = list(uploads)
    signature = ("upload", model_name, version, tuple((f.file_id, f.name, f.size) for f in files))
elif st.session_state.get(SAMPLES_FLAG):
    files = sorted(p for p in (SAMPLE_DATA / "inspect").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    signature = ("samples", model_name, version)
else:
    files, signature = [], None

inspection = st.session_state.get(INSPECTION_KEY)
if signature is not None and (inspection is None or inspection["signature"] != signature):
    inspection = recall_inspection(signature) or _run_inspection(files, signature, inspection)
    remember_inspection(inspection)
    st.session_state[INSPECTION_KEY] = inspection
elif signature is None and inspection is None:
    inspection = _reopen_from_history()  # a reload, or a new browser tab
    if inspection is not None:
        st.session_state[INSPECTION_KEY] = inspection

if inspection is None:
    st.stop()
if inspection.get("run_id"):
    st.query_params[RUN_PARAM] = inspection["run_id"]
if signature is None:
    when = inspection["created"].strftime("%Y-%m-%d %H:%M")
    st.info(f"Showing the last inspection ({len(inspection['results'])} image(s), {when}, model "
            f"{inspection['model']!r}). Upload images above to inspect new ones; past runs are on the "
            "**History** page.", icon=":material/history:")

results = inspection["results"]
failures = inspection["failures"]
if failures:
    with st.expander(f"⚠️ {len(failures)} file(s) could not be inspected", expanded=not results):
        st.dataframe(pd.DataFrame(failures, columns=["File", "Reason"]), hide_index=True, width="stretch")
if not results:
    st.error("None of the uploaded files could be read as an image. See the list above for the reasons.")
    st.stop()
wrong_part_warning([(r["file"], bool(r.get("unfamiliar"))) for r in results])

# ---------------------------------------------------------------- decision
st.subheader("Decision")
ctrl, info = st.columns([3, 2], gap="large")
with ctrl:
    decision = decision_controls("inspect", detector)
threshold, review = decision.threshold, decision.review
verdicts = [verdict(r["score"], threshold, review) for r in results]
counts = {v: verdicts.count(v) for v in ("OK", "REVIEW", "NG")}
with info:
    n_cal = len(calibration.good_scores)
    frr = calibration.false_reject_rate(threshold)
    rejected = int(round(frr * n_cal))
    st.markdown(
        f"**This threshold rejects {100 * frr:.1f}% of good parts** ({rejected} of the {n_cal} good images "
        "held out for calibration when the model was trained)."
    )
    if review is not None:
        to_review = calibration.false_reject_rate(review) - frr
        st.markdown(f"A further {100 * to_review:.1f}% of good parts would go to manual review.")
    catch = calibration.synthetic_catch_rate(threshold)
    if catch is not None:
        st.markdown(
            f"It flags **{100 * catch:.0f}% of the synthetic defects** the self-check made on those images "
            "(a label-free estimate; real defects differ)."
        )
    if n_cal < 20:
        st.caption(f"Only {n_cal} calibration images: this percentage is a rough estimate.")

cols = st.columns(4 if review is not None else 3)
cols[0].metric("Images", len(results))
cols[1].metric("NG", counts["NG"])
if review is not None:
    cols[2].metric("REVIEW", counts["REVIEW"])
cols[-1].metric("OK", counts["OK"])

# ---------------------------------------------------------------- results table
st.subheader("Results (highest score first)")
table = pd.DataFrame({
    "Image": [r["thumb"] for r in results],
    "Heat map": [r["thumb_overlay"] for r in results],
    "File": [r["file"] for r in results],
    "Score": [round(r["score"], 3) for r in results],
    "Verdict": verdicts,
})
shown = st.multiselect("Show verdicts", ["NG", "REVIEW", "OK"] if review is not None else ["NG", "OK"],
                       default=None, placeholder="all verdicts", key="inspect_filter")
view = table[table["Verdict"].isin(shown)] if shown else table


def _verdict_style(value: str) -> str:
    colours = {"NG": ("#ffffff", "#c62828"), "REVIEW": ("#4e2a00", "#ffcc80"), "OK": ("#1b5e20", "#e8f5e9")}
    text, background = colours.get(value, ("#ffffff", "#616e7c"))
    return f"color: {text}; background-color: {background}; font-weight: 700"


st.dataframe(
    view.style.map(_verdict_style, subset=["Verdict"]),
    hide_index=True, width="stretch", row_height=THUMB // 2 + 8, key="inspect_table",
    height=(THUMB // 2 + 8) * min(len(view), 12) + 40,
    column_config={
        "Image": st.column_config.ImageColumn("Image", width="small"),
        "Heat map": st.column_config.ImageColumn("Heat map", width="small",
                                                 help="Same colours on every image; yellow = threshold"),
        "File": st.column_config.TextColumn("File", width="large"),
        "Score": st.column_config.NumberColumn("Score", format="%.3f",
                                               help="1.00 = calibrated threshold; higher = more unusual"),
        "Verdict": st.column_config.TextColumn("Verdict", width="small"),
    },
)

# ---------------------------------------------------------------- heat-map viewer
st.subheader("Heat map")
record = result_viewer(results, verdicts, threshold, key="inspect_view", opacity_key="inspect_opacity")
review_panel(history, record, key="inspect_review")
st.caption(
    "Colour scale is fixed: the same colour means the same score on every image. Yellow is the calibrated "
    "threshold (1.0); red areas differ most from the good parts seen in training. Open **Explore correlations** "
    "to see why a patch scores high."
)

with st.expander("Score distribution of this batch"):
    good_units = [s / calibration.threshold for s in calibration.good_scores]
    st.plotly_chart(
        charts.score_histogram(
            [("this batch", [r["score"] for r in results], "#1f4e79"),
             ("good calibration images", good_units, charts.GOOD_COLOUR)],
            threshold, review,
        ),
        key="inspect_hist", config={"displayModeBar": False},
    )

# ---------------------------------------------------------------- downloads
st.subheader("Download")
rows = [{"file": r["file"], "score": r["score"], "verdict": v} for r, v in zip(results, verdicts)]
stamp = inspection["created"].strftime("%Y%m%d-%H%M")
csv_text = results_csv(rows, threshold, model_name, version, review)


def _html() -> str:
    report_rows = [
        {**row, "image": r["image"], "overlay": overlay(r["image"], r["map"].astype(np.float32), 0.5)}
        for row, r in zip(rows, results)
    ]
    return html_report(
        report_rows, threshold=threshold, model_name=model_name, model_version=version, review_threshold=review,
        false_reject_rate=calibration.false_reject_rate(threshold), n_calibration=len(calibration.good_scores),
        failures=failures,
    )


d1, d2 = st.columns(2)
d1.download_button("Download results (CSV)", csv_text, file_name=f"inspection-{model_name}-{stamp}.csv",
                   mime="text/csv", on_click="ignore", icon=":material/table:", width="stretch")
d2.download_button("Download report for stakeholders (HTML)", _html, file_name=f"inspection-{model_name}-{stamp}.html",
                   mime="text/html", on_click="ignore", icon=":material/description:", width="stretch",
                   help="One self-contained file with thumbnails, heat maps and verdicts; opens in any browser.")
