"""Compare two model versions on the same images: a recorded run (version A) re-scored with model B.

The run's stored model-input images (PNG beside the history database) are scored again with B; scores are in
each model's own threshold units, so each verdict is at that model's calibrated threshold (1.0). Reviewed labels
(from the history) give each version's false rejects and misses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .data import ImageLoadError, load_image, prepare_image
from .history import Run
from .inference import Detector


@dataclass
class ComparedImage:
    """One image scored by both versions (threshold units of each)."""

    file_name: str
    content_sha256: str
    score_a: float
    score_b: float
    label: str | None  # latest review: "good" | "defective" | None

    @property
    def verdict_a(self) -> str:
        return "NG" if self.score_a >= 1.0 else "OK"

    @property
    def verdict_b(self) -> str:
        return "NG" if self.score_b >= 1.0 else "OK"

    @property
    def changed(self) -> bool:
        return self.verdict_a != self.verdict_b


@dataclass
class Comparison:
    """Version A (as recorded in a run) against version B (re-scored) on the same images."""

    name_a: str
    version_a: str
    name_b: str
    version_b: str
    images: list[ComparedImage] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) not re-scored

    def changed(self) -> list[ComparedImage]:
        """Images whose verdict differs between the versions."""
        return [i for i in self.images if i.changed]

    def error_counts(self) -> dict[str, dict[str, int]]:
        """Per version ("A", "B"): false rejects (reviewed good, NG), misses (reviewed defective, OK), counts."""
        counts = {}
        for version in ("A", "B"):
            verdicts = [(i.label, i.verdict_a if version == "A" else i.verdict_b) for i in self.images]
            counts[version] = {
                "reviewed_good": sum(label == "good" for label, _ in verdicts),
                "reviewed_defective": sum(label == "defective" for label, _ in verdicts),
                "false_rejects": sum(label == "good" and v == "NG" for label, v in verdicts),
                "misses": sum(label == "defective" and v == "OK" for label, v in verdicts),
                "ng": sum(v == "NG" for _, v in verdicts),
            }
        return counts


def compare_run(run: Run, detector_b: Detector, labels: dict[str, str], batch_size: int = 8) -> Comparison:
    """Re-score ``run``'s stored input images with ``detector_b``; ``labels``: content hash -> review label.

    Images are read from the stored (S, S) PNGs and resized to B's input size (exact when both use the same).
    """
    meta = detector_b.metadata
    comparison = Comparison(run.model_name, run.model_version, str(meta.get("name", "?")),
                            str(meta.get("model_version", "?")))
    size = detector_b.config.image_size
    by_key = {f"{i.position}:{i.file_name}": i for i in run.images}

    def images() -> Iterator[tuple[str, np.ndarray]]:
        for key, image in by_key.items():
            if image.thumbnail_path is None or not image.thumbnail_path.is_file():
                comparison.skipped.append((image.file_name, "its image file is not in the history"))
                continue
            try:
                yield key, prepare_image(load_image(image.thumbnail_path, image.file_name), size)
            except ImageLoadError as err:
                comparison.skipped.append((image.file_name, str(err)))

    for result in detector_b.inspect(images(), batch_size=batch_size):
        image = by_key[result.name]
        comparison.images.append(
            ComparedImage(image.file_name, image.content_sha256, float(image.score), float(result.score),
                          labels.get(image.content_sha256))
        )
    return comparison
