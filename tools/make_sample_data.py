"""Build ``sample_data/``: the demo images for FOD Inspector's one-click demo.

The images are electroluminescence (EL) images of monocrystalline solar cells from the ELPV dataset
(Buerhop-Lutz et al. 2018; Deitsch et al. 2019), installed as the PyPI package ``elpv-dataset``.
The dataset is licensed CC BY-NC-SA 4.0; see ``sample_data/LICENSE`` and ``sample_data/README.md``.

Usage (needs ``pip install elpv-dataset``; uses only numpy and Pillow besides)::

    python tools/make_sample_data.py            # writes sample_data/ next to tools/
    python tools/make_sample_data.py --out DIR

The selection is deterministic (no randomness); rerunning rewrites the same files.

Selection rule
--------------
1. Candidates: cells labelled ``type == "mono"``.
2. One cell design only. The mono cells in ELPV come from modules of several designs (continuous or
   segmented busbars, different corner shapes, textures). A model trained on a mix would learn the
   mix, and a defect from another design would be "anomalous" for the wrong reason. We keep the
   design with *segmented (dashed) busbars*: three horizontal busbars at rows ~51/150/249 whose
   intensity, after removing the slow trend, varies strongly along the busbar (the dashes).
   Statistic: median over the three busbars of std(high-passed busbar profile) / mean(profile);
   the design has values >= 0.20, every other mono cell <= 0.15, so the cut-off 0.17 is unambiguous.
   In the dataset this is two modules (cells 0901-0960 and 1081-1140): 87 cells with defect
   probability 0 and 20 with probability 1.
3. Good cells (probability 0 in that design): drop outliers by two simple statistics, each as a
   robust z-score (median / MAD) over the good pool: mean brightness (|z| > 2.5) and the RMS
   distance of the contrast-normalised image to the pool's pixelwise median image (z > 2.5). The
   66 most typical of the rest (smallest distance) are kept, ordered by cell number; every 11th
   (0-based positions 5, 16, ..., 60) goes to ``inspect/good_NN.png``, the other 60 to
   ``train_good/``.
4. Defective cells (probability 1 in that design): the 10 whose defect is plainly visible, chosen by
   looking at all 20 (listed in ``DEFECT_CELLS`` with what is seen); the other 10 show little or
   nothing clearly visible at this resolution.
5. Every image is resized from 300x300 to ``--size`` (default 256, the app's input size) with a
   Lanczos filter and saved as 8-bit grayscale PNG. ``manifest.csv`` maps each file to its source.
"""

from __future__ import annotations

import argparse
import csv
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from PIL import Image

BUSBAR_ROWS = (51, 150, 249)  # nominal busbar rows in the 300x300 ELPV cells
DASHED_MIN = 0.17  # busbar "dashedness" cut-off (design has >= 0.20, other mono cells <= 0.15)
OUTLIER_Z = 2.5
N_TRAIN = 60
N_INSPECT_GOOD = 6

# Defective cells (defect probability 1.0) of the chosen design whose defect is plainly visible,
# chosen by eye from the 20 candidates; file name in the ELPV dataset -> what one sees.
DEFECT_CELLS = {
    "cell0912.png": "crack and dark fragments at the left edge",
    "cell0915.png": "diagonal crack across the lower half",
    "cell0936.png": "diagonal crack across the lower half",
    "cell0958.png": "dark spot in the centre",
    "cell1088.png": "curved crack in the upper left",
    "cell1097.png": "crack along the middle busbar",
    "cell1103.png": "dark (inactive) area at the bottom left",
    "cell1108.png": "cracks cutting off dark (inactive) regions on the left",
    "cell1109.png": "curved crack below the middle busbar",
    "cell1128.png": "two cracks: diagonal upper left and along the bottom busbar",
}


def load_elpv() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, str]:
    """Return (file names, images uint8 N x 300 x 300, probabilities, types, package version)."""
    try:
        import elpv_dataset
        from elpv_dataset.utils import load_dataset
    except ImportError:
        sys.exit("elpv-dataset is not installed: pip install elpv-dataset")
    images, probs, types = load_dataset()
    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    names = [line.split()[0].split("/")[-1] for line in labels.read_text().splitlines() if line]
    if len(names) != len(images):
        raise RuntimeError("labels.csv and load_dataset() disagree")
    try:
        ver = version("elpv-dataset")
    except PackageNotFoundError:  # pragma: no cover - imported from a source checkout
        ver = "unknown"
    return names, images, probs, np.asarray(types), ver


def _moving_average(x: np.ndarray, width: int) -> np.ndarray:
    pad = width // 2
    xp = np.pad(x, pad, mode="edge")
    return np.convolve(xp, np.ones(width) / width, mode="valid")


def busbar_features(img: np.ndarray) -> tuple[int, float]:
    """(max offset of the busbars from their nominal rows, dashedness of the busbars)."""
    a = img.astype(np.float64)
    profile = a[:, 40:260].mean(axis=1)
    offsets, dashed = [], []
    for row in BUSBAR_ROWS:
        r = row - 12 + int(np.argmin(profile[row - 12 : row + 13]))
        offsets.append(abs(r - row))
        line = a[r - 1 : r + 2, 20:280].mean(axis=0)
        high_pass = _moving_average(line, 5) - _moving_average(line, 61)
        dashed.append(np.std(high_pass[30:-30]) / line.mean())
    return max(offsets), float(np.median(dashed))


def robust_z(v: np.ndarray) -> np.ndarray:
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    return (v - med) / (mad if mad > 0 else 1.0)


def select(names, images, probs, types):
    """Return (train indices, inspect-good indices, defect indices, info dict)."""
    mono = np.flatnonzero(types == "mono")
    design = []
    for i in mono:
        offset, dashed = busbar_features(images[i])
        if offset <= 5 and dashed > DASHED_MIN:
            design.append(i)
    design = np.array(design)
    good = design[probs[design] == 0.0]

    x = images[good].astype(np.float64)
    brightness = x.mean(axis=(1, 2))
    z = (x - brightness[:, None, None]) / x.std(axis=(1, 2))[:, None, None]
    distance = np.sqrt(((z - np.median(z, axis=0)) ** 2).mean(axis=(1, 2)))
    keep = (np.abs(robust_z(brightness)) <= OUTLIER_Z) & (robust_z(distance) <= OUTLIER_Z)
    n_needed = N_TRAIN + N_INSPECT_GOOD
    if keep.sum() < n_needed:
        raise RuntimeError(f"only {keep.sum()} good cells left, need {n_needed}")
    kept = good[keep]
    order = np.lexsort((kept, distance[keep]))  # most typical first; ties by index
    chosen = np.sort(kept[order[:n_needed]])
    step = n_needed // N_INSPECT_GOOD
    inspect_pos = set(range(step // 2, n_needed, step))
    inspect_good = np.array([c for k, c in enumerate(chosen) if k in inspect_pos])
    train = np.array([c for k, c in enumerate(chosen) if k not in inspect_pos])

    name_to_index = {n: i for i, n in enumerate(names)}
    defects = np.array(sorted(name_to_index[n] for n in DEFECT_CELLS))
    for i in defects:
        if i not in design or probs[i] != 1.0:
            raise RuntimeError(f"{names[i]} is not a probability-1 cell of the chosen design")

    info = {
        "mono": len(mono),
        "design": len(design),
        "design_good": len(good),
        "design_defect": int((probs[design] == 1.0).sum()),
        "outliers": [names[i] for i in good[~keep]],
    }
    return train, inspect_good, defects, info


def save(img: np.ndarray, path: Path, size: int) -> None:
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).convert("L")
    if size != im.width:
        im = im.resize((size, size), Image.LANCZOS)
    im.save(path, format="PNG", optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parents[1] / "sample_data"
    )
    parser.add_argument(
        "--size", type=int, default=256, help="output side in pixels (300 = original)"
    )
    args = parser.parse_args(argv)

    names, images, probs, types, ver = load_elpv()
    train, inspect_good, defects, info = select(names, images, probs, types)

    train_dir, inspect_dir = args.out / "train_good", args.out / "inspect"
    for d in (train_dir, inspect_dir):
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.png"):
            old.unlink()

    rows = []
    for k, i in enumerate(train, 1):
        fn = f"good_{k:03d}.png"
        save(images[i], train_dir / fn, args.size)
        rows.append((f"train_good/{fn}", names[i], probs[i], types[i], "good (training)"))
    for k, i in enumerate(inspect_good, 1):
        fn = f"good_{k:02d}.png"
        save(images[i], inspect_dir / fn, args.size)
        rows.append((f"inspect/{fn}", names[i], probs[i], types[i], "good (not in training set)"))
    for k, i in enumerate(defects, 1):
        fn = f"defect_{k:02d}.png"
        save(images[i], inspect_dir / fn, args.size)
        rows.append((f"inspect/{fn}", names[i], probs[i], types[i], DEFECT_CELLS[names[i]]))

    with open(args.out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["file", "elpv_source_file", "defect_probability", "cell_type", "note"])
        for file, src, p, t, note in rows:
            w.writerow([file, f"images/{src}", f"{p:.4g}", t, note])

    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(
        f"elpv-dataset {ver}: {info['mono']} mono cells, {info['design']} of the dashed-busbar "
        f"design ({info['design_good']} good, {info['design_defect']} with probability 1)"
    )
    print(f"outliers dropped: {info['outliers'] or 'none'}")
    print(
        f"wrote {len(train)} train_good, {len(inspect_good)} inspect/good, {len(defects)} "
        f"inspect/defect images ({args.size}x{args.size}) to {args.out}; "
        f"sample_data total {total / 1e6:.2f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
