"""The review loop: reviewed false rejects recalibrate a model (a new version, the old one kept) or join its
training set for a retrain. Every threshold / version change is written to the history's audit log.

No Streamlit here; pages call these functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle import BundleError, read_metadata, recalibrate_bundle
from .calibration import Calibration
from .data import IMAGE_EXTENSIONS, list_images
from .history import HistoryStore, StoredImage


@dataclass
class RecalibrationProposal:
    """A new threshold from the calibration good scores plus the reviewed false rejects' raw scores."""

    model_name: str
    old_version: str
    old_threshold: float  # raw
    new_threshold: float  # raw
    quantile: float
    n_calibration: int  # held-out good images the model was calibrated on
    reviewed: list[StoredImage] = field(default_factory=list)  # the reviewed good images that join
    calibration: Calibration | None = None

    @property
    def new_threshold_units(self) -> float:
        """The new threshold in the old model's threshold units (1.0 = old threshold)."""
        return self.new_threshold / self.old_threshold

    def newly_accepted(self) -> list[StoredImage]:
        """Reviewed good images that the new threshold accepts (raw score below it)."""
        return [i for i in self.reviewed if i.raw_score is not None and i.raw_score < self.new_threshold]


def reviewed_false_rejects(store: HistoryStore, meta: dict[str, Any]) -> list[StoredImage]:
    """Images reviewed as good ("false reject") in runs of these very weights, with a raw score, that are not
    yet part of the model's calibration (an earlier recalibration may have added them)."""
    weights = str(meta["weights"]["sha256"])
    included = {h for entry in meta.get("calibration_history", []) for h in entry.get("reviewed_images", [])}
    images = store.reviewed_images(weights_sha256=weights, label="good")
    return [i for i in images if i.raw_score is not None and i.raw_score > 0 and i.content_sha256 not in included]


#: A recalibrated threshold sits at least this factor above the highest score a reviewer confirmed as good.
REVIEWED_MARGIN = 1.01


def propose_recalibration(store: HistoryStore, model_name: str) -> RecalibrationProposal | None:
    """The recalibration the reviewed false rejects ask for, or None when there are none. Applies nothing."""
    meta = read_metadata(model_name)
    reviewed = reviewed_false_rejects(store, meta)
    if not reviewed:
        return None
    old = Calibration.from_dict(meta["calibration"])
    reviewed_scores = [float(i.raw_score) for i in reviewed if i.raw_score is not None]
    new = Calibration.from_scores([*old.good_scores, *reviewed_scores], quantile=old.quantile, origin=old.origin)
    new.synthetic_scores = list(old.synthetic_scores)
    if reviewed_scores and new.threshold <= max(reviewed_scores):
        # The fit is robust to a stray score, so on its own it may not move past a part a person has just
        # confirmed as good; a reviewed false reject must not be rejected again by the recalibrated threshold.
        new.threshold = REVIEWED_MARGIN * max(reviewed_scores)
    if old.review_threshold is not None:  # keep the review band at the same fraction of the threshold
        new.review_threshold = new.threshold * old.review_threshold / old.threshold
    else:
        new.review_threshold = None
    return RecalibrationProposal(
        model_name, str(meta.get("model_version")), old.threshold, new.threshold, old.quantile,
        len(old.good_scores), reviewed, new,
    )


def apply_recalibration(
    store: HistoryStore, proposal: RecalibrationProposal, who: str, why: str = ""
) -> tuple[str, dict[str, Any]]:
    """Save the proposal as a new model version (the old one kept as a model); log it. Returns (kept, meta)."""
    if proposal.calibration is None:
        raise BundleError("This recalibration has no new calibration to apply.")
    current = read_metadata(proposal.model_name)
    if str(current.get("model_version")) != proposal.old_version:
        raise BundleError(
            f"Model {proposal.model_name!r} changed since this recalibration was proposed; look at it again."
        )
    reason = why or f"{len(proposal.reviewed)} reviewed false reject(s) joined the calibration"
    kept, meta = recalibrate_bundle(
        proposal.model_name,
        proposal.calibration,
        {"who": who, "why": reason, "old_threshold": proposal.old_threshold, "new_threshold": proposal.new_threshold,
         "reviewed_images": [i.content_sha256 for i in proposal.reviewed]},
    )
    store.audit(who=who, model_name=proposal.model_name, what="threshold", old=f"{proposal.old_threshold:.6g}",
                new=f"{proposal.new_threshold:.6g}", why=reason)
    store.audit(who=who, model_name=proposal.model_name, what="model_version", old=proposal.old_version,
                new=meta.get("model_version"), why=f"recalibrated; the old version is kept as model {kept!r}")
    return kept, meta


def retrain_sources(store: HistoryStore, model_name: str) -> tuple[list[Path], list[Path], str | None]:
    """(original training images, reviewed good images to add, problem) for retraining ``model_name``.

    The original images come from the folder recorded at training (``meta["data"]["source"]``); models trained
    from browser uploads have no such folder, and then ``problem`` says so. The reviewed images are the stored
    model-input PNGs of the reviewed false rejects (any version of this model).
    """
    meta = read_metadata(model_name)
    source = str((meta.get("data") or {}).get("source") or "")
    folder = Path(source)
    original: list[Path] = []
    problem = None
    if source and folder.is_dir():
        train_good = folder / "train" / "good"
        original = list_images(train_good if train_good.is_dir() else folder, recursive=True)
    else:
        problem = (
            f"The images model {model_name!r} was trained on are not on the server "
            f"({source or 'unknown source'}); retrain it on the Train page with the reviewed images added."
        )
    reviewed = [
        i.thumbnail_path for i in store.reviewed_images(model_name=model_name, label="good")
        if i.thumbnail_path is not None and i.thumbnail_path.is_file()
        and i.thumbnail_path.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return original, reviewed, problem


def saved_version(name: str) -> dict[str, Any] | None:
    """The metadata of model ``name`` before it is replaced (None when there is none): see log_model_saved."""
    try:
        return read_metadata(name)
    except (BundleError, OSError):
        return None


def log_model_saved(previous: dict[str, Any] | None, new: dict[str, Any], who: str | None, why: str) -> None:
    """Audit-log a model replaced by a new save (a retrain under the same name): version and threshold changes.

    Never raises: an unavailable history must not fail a training run.
    """
    if previous is None:
        return
    from .history import HistoryError, open_history

    store, _problem = open_history()
    if store is None:
        return
    name = str(new.get("name", "?"))
    try:
        if previous.get("model_version") != new.get("model_version"):
            store.audit(who=who or "unknown", model_name=name, what="model_version",
                        old=previous.get("model_version"), new=new.get("model_version"), why=why)
        old_t, new_t = previous["calibration"]["threshold"], new["calibration"]["threshold"]
        if old_t != new_t:
            store.audit(who=who or "unknown", model_name=name, what="threshold", old=f"{old_t:.6g}",
                        new=f"{new_t:.6g}", why=why)
    except (HistoryError, KeyError, TypeError):
        return
