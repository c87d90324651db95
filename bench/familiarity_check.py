"""Wrong-part check on real images: distances (familiarity units, 1.0 = the limit) of each image group.

References: bottle (first 30 train/good to fit, next 10 held out) and solar cells (sample_data/train_good,
48 fit + 12 held out). Groups: bottle test/good, bottle defects (20), solar inspect (16), magnetic tile
test/good (20). Backbone only (the check does not depend on the trained FOD model). About 1-2 min on 2 idle cores.

    .venv/bin/python bench/familiarity_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fod_app.backbone import create_feature_extractor  # noqa: E402
from fod_app.data import list_images, load_images  # noqa: E402
from fod_app.familiarity import descriptors, fit_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets"


def main() -> None:
    backbone = create_feature_extractor("tf_efficientnet_lite0", device=torch.device("cpu"))

    def describe(paths: list[Path]) -> torch.Tensor:
        arrays = np.stack([a for _, a in load_images(paths, 256).images])
        with torch.inference_mode():
            parts = [descriptors(backbone(torch.as_tensor(arrays[i : i + 4]))) for i in range(0, len(arrays), 4)]
        return torch.cat(parts)

    bottle_train = describe(list_images(DATA / "mvtec_bottle" / "train" / "good")[:40])
    solar_train = describe(list_images(REPO / "sample_data" / "train_good"))
    groups = {
        "bottle test/good": describe(list_images(DATA / "mvtec_bottle" / "test" / "good")),
        "bottle defects": describe(list_images(DATA / "mvtec_bottle" / "test" / "broken_large")[:10]
                                   + list_images(DATA / "mvtec_bottle" / "test" / "contamination")[:10]),
        "solar inspect (6 good, 10 defect)": describe(list_images(REPO / "sample_data" / "inspect")),
        "magnetic tile test/good": describe(list_images(DATA / "magnetic_tile" / "test" / "good")[:20]),
    }
    for model, reference in (
        ("bottle", fit_reference(bottle_train[:30], bottle_train[30:])),
        ("solar cells", fit_reference(solar_train[:48], solar_train[48:])),
    ):
        print(f"\nreference: {model}  (limit {reference.limit:.3f}; held-out max "
              f"{max(reference.holdout_distances) / reference.limit:.2f} units)")
        for name, values in groups.items():
            units = reference.units(values)
            print(f"  {name:36s} min {units.min():6.2f}  max {units.max():6.2f}  flagged {int((units >= 1).sum())}"
                  f"/{len(units)}")


if __name__ == "__main__":
    main()
