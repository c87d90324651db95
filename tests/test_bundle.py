"""Bundle round trip and refusal of tampered, truncated, mismatched or pickled bundles."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fod_app.bundle import (
    METADATA_FILE,
    WEIGHTS_FILE,
    BundleError,
    delete_bundle,
    export_bundle_zip,
    import_bundle_zip,
    list_bundles,
    load_bundle,
    read_metadata,
    rename_bundle,
    save_bundle,
)
from fod_app.data import list_images, load_images

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundle_dir(models_env_copy: Path) -> Path:
    return models_env_copy


def _edit_json(folder: Path, change) -> None:
    meta = json.loads((folder / METADATA_FILE).read_text())
    change(meta)
    (folder / METADATA_FILE).write_text(json.dumps(meta))


def test_round_trip_gives_identical_scores(bundle_dir: Path, tmp_path: Path):
    detector = load_bundle("test-model", root=bundle_dir, device="cpu")
    images = [img for _, img in load_images(list_images(REPO / "sample_data" / "inspect")[:3], 256).images]
    before = detector.raw_scores(images)
    out = tmp_path / "saved"
    save_bundle(detector, "copy", root=out)
    again = load_bundle("copy", root=out, device="cpu")
    np.testing.assert_allclose(again.raw_scores(images), before, rtol=1e-5)
    meta = read_metadata("copy", root=out)
    for key in ("format_version", "config", "calibration", "backbone", "training", "weights", "data", "created"):
        assert key in meta
    assert meta["backbone"]["weights_sha256"] and meta["calibration"]["threshold"] > 0
    # no temporary folders left behind
    assert [p.name for p in out.iterdir()] == ["copy"]


def test_truncated_weights_refused(bundle_dir: Path):
    weights = bundle_dir / "test-model" / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BundleError, match="wrong size"):
        load_bundle("test-model", root=bundle_dir)


def test_modified_weights_refused_by_checksum(bundle_dir: Path):
    weights = bundle_dir / "test-model" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle("test-model", root=bundle_dir)


def test_pickle_renamed_to_bundle_is_refused_never_unpickled(bundle_dir: Path, tmp_path: Path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    weights = bundle_dir / "test-model" / WEIGHTS_FILE
    payload = pickle.dumps({"x": Exploit()})
    weights.write_bytes(payload)
    _edit_json(bundle_dir / "test-model", lambda m: m["weights"].update(bytes=len(payload)))
    with pytest.raises(BundleError):
        load_bundle("test-model", root=bundle_dir)
    assert not marker.exists()


def test_pickle_with_matching_checksum_is_refused_as_not_safetensors(bundle_dir: Path):
    import hashlib

    weights = bundle_dir / "test-model" / WEIGHTS_FILE
    payload = pickle.dumps({"weights": [1, 2, 3]})
    weights.write_bytes(payload)
    _edit_json(
        bundle_dir / "test-model",
        lambda m: m["weights"].update(bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest()),
    )
    with pytest.raises(BundleError, match="not a valid safetensors"):
        load_bundle("test-model", root=bundle_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format_version=99), "format version 99"),
        (lambda m: m.update(format="something-else"), "not an FOD Inspector bundle"),
        (lambda m: m["config"].update(backbone="tf_efficientnet_lite2"), "backbone"),
        (lambda m: m["config"].update(d_models=[32, 64]), "shape"),
        (lambda m: m["config"].update(n_layers=3), "do not fit"),
        (lambda m: m["config"].update(bogus=1), "unknown config keys"),
        (lambda m: m["calibration"].update(threshold=-1.0), "non-positive threshold"),
        (lambda m: m["backbone"].update(weights_sha256="0" * 64), "different"),
        (lambda m: m.pop("calibration"), "calibration"),
    ],
)
def test_edited_metadata_is_refused_with_a_clear_message(bundle_dir: Path, change, message):
    _edit_json(bundle_dir / "test-model", change)
    with pytest.raises(BundleError, match=message):
        load_bundle("test-model", root=bundle_dir)


def test_non_json_metadata_and_missing_files(bundle_dir: Path):
    (bundle_dir / "test-model" / METADATA_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle("test-model", root=bundle_dir)
    with pytest.raises(BundleError, match="No model named"):
        load_bundle("nope", root=bundle_dir)
    with pytest.raises(BundleError, match="Invalid model name"):
        load_bundle("../etc", root=bundle_dir)


def test_list_rename_delete_export_import(bundle_dir: Path, tmp_path: Path):
    (bundle_dir / ".tmp-half-written").mkdir()  # a crashed save: never listed
    (bundle_dir / "broken").mkdir()
    names = {b.name: b for b in list_bundles(bundle_dir)}
    assert set(names) == {"test-model", "broken"}
    assert names["broken"].error and "no bundle.json" in names["broken"].error
    data = export_bundle_zip("test-model", root=bundle_dir)
    rename_bundle("test-model", "renamed", root=bundle_dir)
    assert read_metadata("renamed", root=bundle_dir)["name"] == "renamed"
    with pytest.raises(BundleError, match="already exists"):
        rename_bundle("renamed", "broken", root=bundle_dir)
    imported = import_bundle_zip(data, root=bundle_dir)
    assert imported == "test-model" and load_bundle("test-model", root=bundle_dir)
    with pytest.raises(BundleError, match="already exists"):
        import_bundle_zip(data, root=bundle_dir)
    delete_bundle("renamed", root=bundle_dir)
    assert not (bundle_dir / "renamed").exists()
    with pytest.raises(BundleError, match="not a zip"):
        import_bundle_zip(b"garbage", root=bundle_dir)


def test_save_failure_leaves_previous_bundle_intact(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch):
    import errno

    import fod_app.bundle as bundle_module

    detector = load_bundle("test-model", root=bundle_dir, device="cpu")
    before = (bundle_dir / "test-model" / WEIGHTS_FILE).read_bytes()

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle_module, "save_file", disk_full)
    with pytest.raises(BundleError, match="disk is full"):
        save_bundle(detector, "test-model", root=bundle_dir)
    assert (bundle_dir / "test-model" / WEIGHTS_FILE).read_bytes() == before
    assert not [p for p in bundle_dir.iterdir() if p.name.startswith(".tmp-")]
    load_bundle("test-model", root=bundle_dir)


def test_bundle_weights_are_finite_float32(bundle_dir: Path):
    from safetensors.torch import load_file

    tensors = load_file(str(bundle_dir / "test-model" / WEIGHTS_FILE))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    shutil.rmtree(bundle_dir / "test-model")
    assert list_bundles(bundle_dir) == []
