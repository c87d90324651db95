"""Benchmark sets for ``bench/compare.py``: good training images and labelled test images, fixed splits.

Sets
----
``mvtec_bottle``, ``magnetic_tile``
    ``../shared/datasets/<name>`` (``$FOD_BENCH_DATA/<name>`` where set; MVTec AD layout, see its README): all
    ``train/good`` images for training (209 and 762); the test set with pixel masks.
``elpv_mono``
    Monocrystalline cells of the ELPV data set (Buerhop-Lutz et al. 2018; Deitsch et al. 2019; CC BY-NC-SA 4.0),
    from the PyPI package ``elpv-dataset`` (benchmark-only dependency, ``bench/requirements.txt``). Split, fixed
    and without randomness: cells with ``type == "mono"``; defect probability 0 = good, 2/3 or 1 = defective (the
    ambiguous 1/3 cells are left out). Good cells sorted by their index in the data set; every 4th one (0-based
    positions 3, 7, 11, ...) goes to ``test/good``, the others to ``train/good``. Every defective cell goes to
    the test set, as ``test/defect_p067`` or ``test/defect_p100`` by its probability. No masks: image-level
    metrics only. With elpv-dataset 1.0.0: 1074 mono cells, 588 good (441 train, 147 test), 56 + 313 defective.
    The cells (300x300, 8-bit grayscale) are written once as PNG files, under their ELPV names, to
    ``~/.cache/fod-bench/elpv_mono/`` (``$FOD_BENCH_CACHE`` overrides ``~/.cache/fod-bench``) and reused;
    ``split.json`` there records the split.
``mvtec_bottle_posed``
    A proxy for parts that are not fixtured (an MVTec object category such as screw): every image of
    ``mvtec_bottle`` (training and test, each defect mask with its image) turned by an angle drawn uniformly from
    [0, 360) degrees and shifted by up to ``POSE_SHIFT`` px each way, drawn from ``numpy.random.default_rng`` seeded
    by the CRC-32 of the file's path in the set (``test/broken_large/000.png``); bilinear for images, nearest for
    masks, corners filled with the image's top-left colour (masks: 0). Written once to
    ``~/.cache/fod-bench/mvtec_bottle_posed/`` and reused.
``<set>@<k>`` (e.g. ``mvtec_bottle@16``)
    Few-shot: a seeded random subset of ``k`` good training images of ``<set>`` (``numpy.random.default_rng(seed)``
    with the run's seed, kept in sorted order); the test set is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fod_app.data import TestItem, list_images, load_mvtec_layout, resolve_training_images

REPO = Path(__file__).resolve().parents[1]
# ``$FOD_BENCH_DATA`` overrides where the MVTec-layout sets live (e.g. a copy carried to another machine).
SHARED = Path(os.environ.get("FOD_BENCH_DATA", REPO.parent / "shared" / "datasets")).expanduser()
CACHE = Path(os.environ.get("FOD_BENCH_CACHE", "~/.cache/fod-bench")).expanduser()
BASE_SETS = ("mvtec_bottle", "magnetic_tile", "elpv_mono", "mvtec_bottle_posed")
ELPV_TEST_EVERY = 4
POSE_SHIFT = 24


@dataclass
class BenchSet:
    """A benchmark set: good training image paths and test items (label 1 = defective, mask may be None)."""

    name: str
    train: list[Path]
    test: list[TestItem]

    @property
    def has_masks(self) -> bool:
        return any(item.mask_path is not None for item in self.test)


def parse_name(name: str) -> tuple[str, int | None]:
    """``"mvtec_bottle@16"`` -> ``("mvtec_bottle", 16)``; ``"elpv_mono"`` -> ``("elpv_mono", None)``."""
    base, _, k = name.partition("@")
    if base not in BASE_SETS:
        raise ValueError(f"unknown benchmark set {base!r}; choose from {', '.join(BASE_SETS)} (optionally @k)")
    if k and (not k.isdigit() or int(k) < 1):
        raise ValueError(f"few-shot size must be a positive integer: {name!r}")
    return base, int(k) if k else None


def load_set(name: str, seed: int = 0) -> BenchSet:
    """The benchmark set ``name`` (see module doc); ``seed`` only matters for few-shot ``@k`` sets."""
    base, k = parse_name(name)
    if base == "elpv_mono":
        root = elpv_mono_root()
        train = list_images(root / "train" / "good")
        test = [
            TestItem(path, int(kind.name != "good"), kind.name, None)
            for kind in sorted(p for p in (root / "test").iterdir() if p.is_dir())
            for path in list_images(kind)
        ]
    else:
        root = posed_root() if base == "mvtec_bottle_posed" else SHARED / base
        train = resolve_training_images(root)
        test = load_mvtec_layout(root).test_items
    if k is not None:
        if k > len(train):
            raise ValueError(f"{name}: only {len(train)} training images")
        pick = np.random.default_rng(seed).choice(len(train), size=k, replace=False)
        train = [train[i] for i in sorted(pick)]
    return BenchSet(name, train, test)


def elpv_mono_root(cache: Path = CACHE) -> Path:
    """Folder with the ELPV mono split in MVTec layout (no ground_truth); written on first use."""
    root = cache / "elpv_mono"
    if (root / "split.json").is_file():
        return root
    from importlib.metadata import version

    import elpv_dataset
    from elpv_dataset.utils import load_dataset
    from PIL import Image

    images, probs, types = load_dataset()
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    names = [line.split()[0].split("/")[-1] for line in labels.read_text().splitlines() if line.strip()]
    if len(names) != len(images):
        raise RuntimeError("elpv-dataset: labels.csv and load_dataset() disagree")
    mono = np.flatnonzero(np.asarray(types) == "mono")
    good = [int(i) for i in mono if probs[i] == 0.0]  # ascending index
    test_good = good[ELPV_TEST_EVERY - 1 :: ELPV_TEST_EVERY]
    train_good = [i for i in good if i not in set(test_good)]
    defects = [int(i) for i in mono if probs[i] > 0.5]  # the probabilities are 0, 1/3, 2/3 and 1
    folders = {"train/good": train_good, "test/good": test_good}
    for i in defects:
        folders.setdefault(f"test/defect_p{round(100 * probs[i]):03d}", []).append(i)

    tmp = cache / "elpv_mono.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for folder, indices in folders.items():
        (tmp / folder).mkdir(parents=True)
        for i in indices:
            Image.fromarray(np.asarray(images[i], dtype=np.uint8)).convert("L").save(tmp / folder / names[i])
    record = {
        "source": f"elpv-dataset {version('elpv-dataset')}",
        "rule": __doc__.split("``elpv_mono``")[1].split("``<set>@<k>``")[0].strip(),
        "counts": {folder: len(indices) for folder, indices in folders.items()},
        "files": {folder: [names[i] for i in indices] for folder, indices in folders.items()},
    }
    (tmp / "split.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def posed_root(cache: Path = CACHE, source: Path = SHARED / "mvtec_bottle") -> Path:
    """Folder with ``mvtec_bottle_posed`` (see module doc) in MVTec layout; written on first use."""
    import zlib

    from PIL import Image

    root = cache / "mvtec_bottle_posed"
    if (root / "done.json").is_file():
        return root
    tmp = cache / "mvtec_bottle_posed.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    count = 0
    for path in sorted(p for p in source.rglob("*.png") if "ground_truth" not in p.parts):
        relative = path.relative_to(source)
        rng = np.random.default_rng(zlib.crc32(relative.as_posix().encode()))
        angle = float(rng.uniform(0.0, 360.0))
        dx, dy = (int(v) for v in rng.integers(-POSE_SHIFT, POSE_SHIFT + 1, 2))
        image = Image.open(path).convert("RGB")
        (tmp / relative.parent).mkdir(parents=True, exist_ok=True)
        image.rotate(angle, resample=Image.BILINEAR, translate=(dx, dy), fillcolor=image.getpixel((0, 0))).save(
            tmp / relative)
        mask = source / "ground_truth" / relative.parent.name / f"{path.stem}_mask.png"
        if relative.parts[0] == "test" and mask.is_file():
            (tmp / "ground_truth" / relative.parent.name).mkdir(parents=True, exist_ok=True)
            Image.open(mask).convert("L").rotate(angle, resample=Image.NEAREST, translate=(dx, dy), fillcolor=0).save(
                tmp / "ground_truth" / relative.parent.name / mask.name)
        count += 1
    (tmp / "done.json").write_text(json.dumps({"source": "mvtec_bottle", "images": count, "shift": POSE_SHIFT}))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root
