"""Train: choose good images, check them, pick settings, train in the background, see the calibration."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import streamlit as st
from PIL import Image

from fod_app.archive import ArchiveError, extract_images_from_zip, find_mvtec_root
from fod_app.backbone import KNOWN_BACKBONES, BackboneWeightsError, resolve_weights_path
from fod_app.bundle import BundleError, list_bundles, validate_name
from fod_app.config import DEFAULT_PRESET, create_config
from fod_app.data import (
    IMAGE_EXTENSIONS,
    MIN_TRAIN_IMAGES,
    DatasetError,
    ImageLoadError,
    check_enough_images,
    list_images,
    load_image,
    names_for,
    resolve_training_images,
)
from fod_app.health import HealthReport, check_training_set
from fod_app.jobs import BusyError, JobError, TrainingSpec, demo_epochs, get_job_manager
from fod_app.paths import SAMPLE_DATA, PathNotAllowedError, data_roots, resolve_data_path
from fod_app.training import cpu_time_warning
from fod_app.ui.common import ensure_router, session_id
from fod_app.ui.training_view import PRESET_LABELS, busy_panel, job_panel, model_ready_actions, watched

THUMBNAILS = 24
SOURCES = ("Upload images", "Upload a zip", "Sample data", "Folder on the server")
PRESET_ORDER = ("quick", "cpu", "paper")
PRESET_TEXT = {
    "quick": "**Quick** — for trying things out: a small model, {epochs} training rounds. About a minute for 60 "
    "images on an ordinary computer; less accurate.",
    "cpu": "**Standard** (recommended without a GPU) — a small model, {epochs} training rounds (at least "
    "{min_steps} and at most {max_steps} steps), stopped early when the self-check on synthetic defects stops "
    "improving. About 2 minutes for 30 images and 4 for 200 on an ordinary computer; more for large sets.",
    "paper": "**Full** (as in the research paper) — the largest model, {epochs} training rounds. Needs a GPU; on "
    "an ordinary computer each image takes about 2 s per round: over half an hour for 16 images, hours for more.",
}
SAMPLE_TRAIN = SAMPLE_DATA / "train_good"


@dataclass
class GoodSet:
    """The good images the user picked: sources for the job plus what is needed to describe them."""

    label: str
    key: str
    sources: list[Any]  # paths, (name, bytes) pairs or UploadedFile objects
    names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    default_name: str = ""


@dataclass
class Analysis:
    report: HealthReport
    thumbnails: list[tuple[str, Image.Image]]


#: The exposure settings (``fod_app.config.EXPOSURES``) as the Train page names them.
EXPOSURE_CHOICES = {
    "auto": "Automatic: even out when the good photos' light varies",
    "even": "Even out every photo",
    "as_taken": "Use the photos as taken",
}


def _slug(text: str, fallback: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:48]
    return slug if slug and slug[0].isalnum() else fallback


def _timestamp_name() -> str:
    return f"model-{datetime.now():%Y%m%d-%H%M}"


# --------------------------------------------------------------------------- choosing the good images


def _from_uploads() -> GoodSet | None:
    files = st.file_uploader(
        "Photos of good parts (select many at once)",
        type=[ext.lstrip(".") for ext in IMAGE_EXTENSIONS],
        accept_multiple_files=True,
        key="train_upload_images",
        help="Only defect-free parts. Use the same camera, lighting and framing you will use for inspection.",
    )
    if not files:
        st.caption(f"At least {MIN_TRAIN_IMAGES} images are needed; 50 or more are recommended.")
        return None
    return GoodSet(
        label=f"upload ({len(files)} files)",
        key="upload:" + ",".join(f.file_id for f in files),
        sources=list(files),  # UploadedFile objects; copied to bytes when training starts
        names=[f.name for f in files],
        default_name=_timestamp_name(),
    )


def _from_zip() -> GoodSet | None:
    uploaded = st.file_uploader(
        "A zip file with photos of good parts",
        type=["zip"],
        key="train_upload_zip",
        help="A zip of a folder of good images. If it has the MVTec layout (train/good, test/...), only "
        "train/good is used.",
    )
    if uploaded is None:
        return None
    cache = st.session_state.get("train_zip_cache")
    if cache is not None and cache.key == f"zip:{uploaded.file_id}":
        return cache
    with st.spinner("Unpacking the zip…"), tempfile.TemporaryDirectory(prefix="fod-zip-") as tmp:
        try:
            extracted = extract_images_from_zip(uploaded.getvalue(), tmp, keep_structure=True, name=uploaded.name)
            root = find_mvtec_root(tmp)
            paths = resolve_training_images(root) if root is not None else list_images(tmp, recursive=True)
        except (ArchiveError, DatasetError) as err:
            st.error(str(err), icon=":material/error:")
            return None
        names = names_for(paths) if root is not None else [p.relative_to(tmp).as_posix() for p in paths]
        good = GoodSet(
            label=f"zip {uploaded.name}" + (" (train/good)" if root is not None else ""),
            key=f"zip:{uploaded.file_id}",
            sources=[(name, p.read_bytes()) for name, p in zip(names, paths)],
            names=names,
            skipped=list(extracted.skipped),
            default_name=_slug(Path(uploaded.name).stem, _timestamp_name()),
        )
    if root is not None:
        st.info(f"This zip has the MVTec layout; using its {len(paths)} images in train/good.")
    st.session_state["train_zip_cache"] = good
    return good


def _from_paths(paths: list[Path], label: str, key_prefix: str, default_name: str) -> GoodSet:
    stamp = max((p.stat().st_mtime_ns for p in paths), default=0)
    return GoodSet(
        label=label,
        key=f"{key_prefix}:{len(paths)}:{stamp}",
        sources=list(paths),
        names=names_for(paths),
        default_name=default_name,
    )


def _from_sample() -> GoodSet:
    st.caption(
        "60 electroluminescence images of defect-free solar cells (the bundled sample data; CC BY-NC-SA 4.0, "
        "see sample_data/README.md). Cracks and dark areas are the defects to find later."
    )
    paths = list_images(SAMPLE_TRAIN)
    return _from_paths(paths, "sample data (sample_data/train_good)", "sample", "solar-cells")


def _from_server_folder() -> GoodSet | None:
    roots = ", ".join(f"`{r}`" for r in data_roots())
    folder = st.text_input(
        "Folder on the server",
        key="train_server_folder",
        placeholder="/data/parts/good",
        help="A folder of good images, or an MVTec-style folder (its train/good is used).",
    )
    st.caption(f"Allowed folders (and their sub-folders): {roots}. An administrator can add more with FOD_DATA_ROOTS.")
    if not folder.strip():
        return None
    try:
        path = resolve_data_path(folder)
        paths = resolve_training_images(path)
    except (PathNotAllowedError, DatasetError) as err:
        st.error(str(err), icon=":material/block:")
        return None
    return _from_paths(paths, str(path), f"folder:{path}", _slug(path.name, _timestamp_name()))


# --------------------------------------------------------------------------- health check


def _analyse(good: GoodSet) -> Analysis:
    cached = st.session_state.get("train_analysis")
    if cached is not None and cached[0] == good.key:
        return cached[1]
    named: list[tuple[str, Image.Image]] = []
    failures = list(good.skipped)
    with st.spinner(f"Checking {len(good.sources)} images…"):
        for name, source in zip(good.names, good.sources):
            raw = source[1] if isinstance(source, tuple) else source
            try:
                named.append((name, load_image(raw, name=name)))
            except ImageLoadError as err:
                failures.append((name, str(err).removeprefix(f"{name}: ")))
        report = check_training_set(named, failures)
    flagged = {name for name, _ in report.outliers} | {n for group in report.near_duplicates for n in group[1:]}
    ordered = [item for item in named if item[0] in flagged] + [item for item in named if item[0] not in flagged]
    thumbnails = []
    for name, img in ordered[:THUMBNAILS]:
        thumb = img.copy()
        thumb.thumbnail((160, 160))
        thumbnails.append((name, thumb))
    analysis = Analysis(report, thumbnails)
    st.session_state["train_analysis"] = (good.key, analysis)
    return analysis


def _show_health(good: GoodSet, analysis: Analysis) -> None:
    report = analysis.report
    st.markdown("#### Check of the good images")
    sizes = ", ".join(f"{w}×{h}" for (w, h), _ in report.sizes.most_common(2)) or "–"
    if len(report.sizes) > 2:
        sizes += f" (+{len(report.sizes) - 2} more)"
    kinds = ", ".join(f"{count} {kind}" for kind, count in report.kinds.most_common()) or "–"
    cols = st.columns(4)
    copies = sum(len(group) - 1 for group in report.near_duplicates)  # a near-identical copy adds nothing new
    cols[0].metric("Usable good images", report.count - copies,
                   help=f"{report.count} readable images" + (f", of which {copies} near-identical copies are not "
                                                            "counted (see the list below)" if copies else "") + ".")
    cols[1].metric("Image sizes", sizes, help="Width × height in pixels. All images are resized to the same square.")
    modes = ", ".join(f"{m} ({c})" for m, c in report.modes.items())
    cols[2].metric("Colour", kinds, help=f"File colour modes: {modes}")
    cols[3].metric("Unreadable files", len(report.failures))
    if report.ok:
        st.success("No problems found with these images.", icon=":material/check_circle:")
    for warning in report.warnings:
        st.warning(warning, icon=":material/warning:")
    for note in report.notes:
        st.info(note, icon=":material/light_mode:")
    if report.failures:
        with st.expander(f"Files that could not be read ({len(report.failures)}) — they are left out"):
            for name, reason in report.failures:
                st.markdown(f"- **{name}**: {reason}")
    if report.outliers:
        with st.expander(f"Images that look different from the rest ({len(report.outliers)})"):
            for name, reason in report.outliers:
                st.markdown(f"- **{name}**: {reason}")
    if report.near_duplicates:
        with st.expander(f"Groups of near-identical images ({len(report.near_duplicates)})"):
            for group in report.near_duplicates:
                st.markdown("- " + " = ".join(group))
    if analysis.thumbnails:
        shown = len(analysis.thumbnails)
        more = f" (first {shown} of {report.count}; flagged images first)" if report.count > shown else ""
        st.caption(f"Your good images{more}:")
        st.image([t for _, t in analysis.thumbnails], caption=[n for n, _ in analysis.thumbnails], width=110)


# --------------------------------------------------------------------------- settings and start


def _backbone_ok(name: str) -> str | None:
    try:
        resolve_weights_path(name)
    except BackboneWeightsError as err:
        return str(err)
    return None


def _settings(good: GoodSet, busy: bool, report: HealthReport) -> None:
    if st.session_state.get("train_name_for") != good.key:
        st.session_state["train_name_for"] = good.key
        st.session_state["train_model_name"] = good.default_name
    problems: list[str] = []
    name = st.text_input(
        "Model name",
        key="train_model_name",
        help="Letters, digits, '-', '_' and '.', up to 64 characters, e.g. 'bracket-line2'.",
    ).strip()
    try:
        validate_name(name)
    except BundleError as err:
        st.error(str(err), icon=":material/error:")
        problems.append("fix the model name")
    existing = {b.name for b in list_bundles()}
    replace_ok = True
    if name in existing:
        replace_ok = st.checkbox(
            f"A model named “{name}” already exists. Replace it when the new one is ready?",
            key="train_replace",
        )
        if not replace_ok:
            problems.append("choose another model name or confirm replacing the existing model")

    preset = st.selectbox(
        "How thorough should training be?",
        PRESET_ORDER,
        index=PRESET_ORDER.index(DEFAULT_PRESET),
        format_func=lambda p: PRESET_LABELS[p],
        key="train_preset",
    )
    base = create_config(preset)
    st.markdown(PRESET_TEXT[preset].format(epochs=base.epochs, min_steps=base.min_steps, max_steps=base.max_steps))
    epochs = st.number_input(
        "Training rounds (epochs)",
        min_value=1,
        max_value=1000,
        value=base.epochs,
        step=1,
        key=f"train_epochs_{preset}",
        help="How many times the model goes through all good images. More rounds take longer and usually help "
        "a little; the preset's value is a good default.",
    )
    override = demo_epochs()
    if override is not None:
        st.caption(f"Demo mode: every training on this server uses {override} round(s) (FOD_DEMO_EPOCHS).")
    slow = cpu_time_warning(base.with_overrides(epochs=override or int(epochs)), report.count) if report.count else None
    if slow:
        st.warning(slow, icon=":material/hourglass_top:")
    with st.expander("Advanced settings"):
        backbones = list(KNOWN_BACKBONES)
        backbone = st.selectbox(
            "Pre-trained network (backbone)",
            backbones,
            index=backbones.index(base.backbone) if base.backbone in backbones else 0,
            key="train_backbone",
            help="The image network that turns each photo into features before FOD learns them. lite0 is the "
            "fastest; lite1/lite2 are larger and slower.",
        )
        seed = st.number_input(
            "Random seed",
            min_value=0,
            max_value=2**31 - 1,
            value=base.seed,
            step=1,
            key="train_seed",
            help="Same images + same settings + same seed give the same model.",
        )
        flips = st.toggle(
            "Also learn from flipped copies of the good images",
            value=base.augment == "flips",
            key="train_augment",
            help="Adds left-right and up-down flipped copies of the good images to what FOD's transformer learns "
            "from (the memory bank of good patches keeps the originals). Training takes 1.3-1.5 times as long and the "
            "self-check showed no gain, so it is off by default. Leave it off when the orientation of the part "
            "matters (a flipped part would be a defect).",
        )
        exposure = st.selectbox(
            "Brightness and contrast of each photo",
            list(EXPOSURE_CHOICES),
            index=list(EXPOSURE_CHOICES).index(base.exposure),
            format_func=EXPOSURE_CHOICES.get,
            key="train_exposure",
            help="Evening out moves every photo (training and inspection alike) to the same brightness and contrast "
            "before the network sees it, so light drifting on the line is not taken for a defect; it also hides a "
            "part that is too dark or too bright as a whole. Automatic evens out when the good photos' own light "
            "differs from photo to photo (see the check of the good images above).",
        )
    weights_problem = _backbone_ok(backbone)
    if weights_problem:
        st.error(weights_problem, icon=":material/error:")
        problems.append("choose an installed backbone")
    enough = report.enough_images
    if not enough:
        try:
            check_enough_images(report.count)
        except DatasetError as err:
            st.error(f"Training cannot start: {err}", icon=":material/block:")
    disabled = busy or not enough or bool(problems)
    if problems and enough:
        st.caption("To start: " + "; ".join(problems) + ".")
    elif busy:
        st.caption("Start is disabled while a training runs on this server (one training at a time; see above).")
    if st.button("Start training", type="primary", disabled=disabled, icon=":material/play_arrow:", key="train_start"):
        # Uploads are copied to plain bytes: the job must not depend on this browser session staying open.
        sources = [(s.name, s.getvalue()) if hasattr(s, "getvalue") else s for s in good.sources]
        spec = TrainingSpec(
            name=name,
            sources=sources,
            preset=preset,
            epochs=int(epochs),
            backbone=backbone,
            seed=int(seed),
            augment="flips" if flips else "none",
            exposure=exposure,
            owner=session_id(),
            source_label=good.label,
        )
        try:
            job = get_job_manager().start(spec)
        except BusyError as err:
            st.warning(str(err), icon=":material/hourglass_top:")
            return
        except JobError as err:
            st.error(str(err), icon=":material/error:")
            return
        st.session_state["train_job_id"] = job.id
        st.rerun()


# --------------------------------------------------------------------------- page


ensure_router()
st.title("Train a model")
st.markdown(
    "Show the model **photos of good parts only**. It learns what normal looks like; later, anything that "
    "differs from that — a scratch, a crack, a missing piece — gets a high score and is flagged."
)

manager = get_job_manager()
# The running job is shown to every session (it belongs to the server, not to the tab that started it: a reload
# keeps it); a finished one to the sessions that started or watched it.
job = manager.active() or manager.get(st.session_state.get("train_job_id")) or manager.latest(owner=session_id())
latest = manager.latest()
if job is None and latest is not None and watched(latest):
    job = latest
if job is not None and st.session_state.get("train_dismissed") == job.id:
    job = None

if job is not None:
    job_panel(job)
    if job.active:
        st.caption("You can switch to other pages or reload; training continues on the server. The sidebar shows "
                   "its progress on every page.")
        st.stop()
    if job.result is not None:
        model_ready_actions(job.result.model_name, f"train_{job.id}", decision_key=f"job_{job.id}")
    if st.button("Train another model", key="train_again", icon=":material/restart_alt:"):
        st.session_state["train_dismissed"] = job.id
        st.session_state.pop("train_job_id", None)
        st.rerun()
    st.stop()

busy = busy_panel(session_id()) is not None

st.markdown("#### 1. Good images")
source = st.radio("Where are your good images?", SOURCES, horizontal=True, key="train_source")
if source == SOURCES[0]:
    good = _from_uploads()
elif source == SOURCES[1]:
    good = _from_zip()
elif source == SOURCES[2]:
    good = _from_sample()
else:
    good = _from_server_folder()

if good is not None:
    analysis = _analyse(good)
    _show_health(good, analysis)
    st.markdown("#### 2. Settings")
    _settings(good, busy, analysis.report)
