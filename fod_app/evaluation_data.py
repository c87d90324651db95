"""Labelled evaluation sets as engineers have them: plain ``good/`` + ``defect/`` folders, or the MVTec layout.

Accepted layouts (folder names compared case-insensitively; the set may sit up to three levels down, e.g. inside
the top folder of a zip):

* **Plain folders**: ``good/`` (or ``ok/``) next to one or more defect folders: ``defect/``, ``ng/`` or one
  folder per defect type (``scratch/``, ``crack/`` ...). Optional masks (white = defect) in
  ``ground_truth/<defect folder>/<image name>_mask.png`` (or ``<image name>.png``, or directly in
  ``ground_truth/``). No ``train/good`` is needed.
* **MVTec AD**: ``test/good/`` + ``test/<defect type>/`` with ``ground_truth/<defect type>/`` masks
  (``train/`` is ignored). A ``test/`` with only ``good/`` is accepted here (false-reject rate only).

Masks are used where present: a defective image without a mask counts for the image-level metrics only;
a set without any mask gives image-level metrics only (``LabelledSet.image_level_only``).
No Streamlit, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .data import (
    IMAGE_EXTENSIONS,
    DatasetError,
    TestItem,
    _child_dir,
    _display_name,
    _find_mask,
    _is_hidden,
    check_mask_sizes,
    list_images,
)

__all__ = [
    "GOOD_FOLDER_NAMES",
    "LAYOUT_HELP",
    "LabelledSet",
    "check_mask_sizes_in",
    "find_labelled_root",
    "load_labelled_set",
]

GOOD_FOLDER_NAMES = ("good", "ok", "normal")
"""Folder names (case-insensitive) that hold defect-free images; every other image folder holds defective ones."""

_NOT_DEFECT_FOLDERS = frozenset({"ground_truth", "masks", "mask", "train", "test"})

LAYOUT_HELP = (
    "Expected: good/ (or ok/) next to defect/ (or ng/, or one folder per defect type), optionally with "
    "ground_truth/<defect folder>/<image>_mask.png masks; or the MVTec AD layout test/good/ + test/<type>/ "
    "+ ground_truth/<type>/."
)


@dataclass
class LabelledSet:
    """Labelled test images: ``items`` (label 0 good, 1 defective; ``mask_path`` where a mask exists)."""

    root: Path
    layout: str  # "folders" | "mvtec"
    test_items: list[TestItem]

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect folder names present (``good`` excluded)."""
        return sorted({t.defect_type for t in self.test_items if t.label == 1})

    @property
    def n_good(self) -> int:
        return sum(1 for t in self.test_items if t.label == 0)

    @property
    def n_defect(self) -> int:
        return sum(1 for t in self.test_items if t.label == 1)

    @property
    def n_defect_with_mask(self) -> int:
        return sum(1 for t in self.test_items if t.label == 1 and t.mask_path is not None)

    @property
    def image_level_only(self) -> bool:
        """True when no defective image has a mask: only image-level metrics can be computed."""
        return self.n_defect_with_mask == 0

    def relative(self, path: Path) -> str:
        """``path`` relative to the set's root, with '/' (for messages and tables)."""
        try:
            return _display_name(path.relative_to(self.root).as_posix())
        except ValueError:
            return _display_name(path.name)


def _is_good_name(name: str) -> bool:
    return name.lower() in GOOD_FOLDER_NAMES


def _image_dirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder`` (links not followed), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name) and not p.is_symlink())


def _has_images(folder: Path) -> bool:
    return any(
        entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS) and not _is_hidden(entry.name)
        for entry in folder.iterdir()
    )


def _good_dir(folder: Path) -> Path | None:
    for child in _image_dirs(folder):
        if _is_good_name(child.name):
            return child
    return None


def _is_mvtec_test(folder: Path) -> bool:
    test = _child_dir(folder, "test")
    return test is not None and any(_image_dirs(test))


def find_labelled_root(folder: str | Path, max_depth: int = 3) -> Path | None:
    """The folder at or below ``folder`` (up to ``max_depth`` levels) holding a labelled set, or None.

    A folder qualifies when it has ``test/<type>/`` (MVTec) or a ``good``/``ok`` folder (plain layout).
    ``train``, ``test`` and ``ground_truth`` folders themselves are never taken as the set's root.
    """
    current = [Path(folder)]
    for _ in range(max_depth + 1):
        for candidate in current:
            if candidate.name.lower() in _NOT_DEFECT_FOLDERS and candidate != Path(folder):
                continue
            if _is_mvtec_test(candidate) or _good_dir(candidate) is not None:
                return candidate
        current = [child for parent in current for child in _image_dirs(parent)
                   if child.name.lower() not in _NOT_DEFECT_FOLDERS]
    return None


def _mask_for(gt_root: Path | None, folder_name: str, stem: str) -> Path | None:
    if gt_root is None:
        return None
    return _find_mask(_child_dir(gt_root, folder_name), stem) or _find_mask(gt_root, stem)


def _items_from(container: Path, gt_root: Path | None) -> list[TestItem]:
    """Good and defective items from the image folders directly inside ``container``."""
    items: list[TestItem] = []
    for folder in _image_dirs(container):
        if folder.name.lower() in _NOT_DEFECT_FOLDERS or (gt_root is not None and folder == gt_root):
            continue
        if _is_good_name(folder.name):
            items.extend(TestItem(path, 0, "good", None) for path in list_images(folder))
        else:
            items.extend(
                TestItem(path, 1, folder.name, _mask_for(gt_root, folder.name, path.stem))
                for path in list_images(folder)
            )
    return items


def load_labelled_set(folder: str | Path) -> LabelledSet:
    """Read a labelled evaluation set (see the module docstring); raise a one-line ``DatasetError`` if unusable."""
    given = Path(folder)
    if not given.is_dir():
        raise DatasetError(f"Folder not found: {given}.")
    root = find_labelled_root(given)
    if root is None:
        raise DatasetError(f"{given.name or given}: no good/ (or ok/) folder found here or below. {LAYOUT_HELP}")
    if _is_mvtec_test(root):
        test = _child_dir(root, "test")
        assert test is not None
        items = _items_from(test, _child_dir(root, "ground_truth"))
        if not items:
            raise DatasetError(f"{root.name}: test/ contains no images. {LAYOUT_HELP}")
        return LabelledSet(root, "mvtec", items)
    good = _good_dir(root)
    assert good is not None
    if not _has_images(good):
        raise DatasetError(f"{root.name}/{good.name}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the good folder.")
    gt_root = _child_dir(root, "ground_truth")
    if gt_root is None and root.name.lower() == "test":  # the test/ folder of an MVTec set was chosen
        gt_root = _child_dir(root.parent, "ground_truth")
    items = _items_from(root, gt_root)
    if not any(item.label for item in items):
        raise DatasetError(
            f"{root.name}: {good.name}/ has images but there is no defect folder with images next to it; add "
            "defect/ (or ng/, or one folder per defect type) with the defective images."
        )
    return LabelledSet(root, "folders", items)


def check_mask_sizes_in(dataset: LabelledSet, items: Sequence[TestItem] | None = None) -> None:
    """Refuse masks whose size differs from their image's (never stretched); the message names the files
    relative to the set's root (``test/crack/a.png``). Read from the file headers only."""
    check_mask_sizes(dataset.test_items if items is None else items, dataset.relative)

