"""Review loop engine: recalibration from reviewed false rejects (new version, old kept, audit), bundle rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from fod_app.bundle import BundleError, list_bundles, model_version, read_metadata, validate_name
from fod_app.history import HistoryStore, ImageRecord
from fod_app.review import apply_recalibration, propose_recalibration, retrain_sources


def _run_with_review(store: HistoryStore, meta: dict, raw: float, label: str = "good") -> None:
    threshold = meta["calibration"]["threshold"]
    run_id = store.record_run(source="app", model_name=meta["name"], model_version=meta["model_version"],
                              weights_sha256=meta["weights"]["sha256"], threshold=threshold, review_threshold=0.8,
                              images=[ImageRecord(f"x{raw}.png", f"hash-{raw}", raw / threshold, "NG", raw_score=raw)])
    store.add_review(store.run(run_id).images[0].image_id, label, "fine part", "ann")


def test_recalibrate_keeps_the_old_version_and_logs(models_env_copy: Path, isolated_history: Path) -> None:
    store = HistoryStore(isolated_history)
    meta = read_metadata("test-model")
    assert propose_recalibration(store, "test-model") is None
    old = meta["calibration"]["threshold"]
    _run_with_review(store, meta, raw=1.3 * old)
    _run_with_review(store, meta, raw=5 * old, label="defective")  # a miss: never joins the good scores
    proposal = propose_recalibration(store, "test-model")
    assert proposal is not None and len(proposal.reviewed) == 1
    assert proposal.new_threshold > old and proposal.old_version == meta["model_version"]
    assert read_metadata("test-model")["calibration"]["threshold"] == old  # nothing applied yet
    kept, new_meta = apply_recalibration(store, proposal, who="ann", why="label print")
    assert new_meta["model_version"] == f"{meta['model_version']}-c1" == model_version(new_meta)
    assert new_meta["calibration"]["threshold"] == pytest.approx(proposal.new_threshold)
    assert len(new_meta["calibration"]["good_scores"]) == len(meta["calibration"]["good_scores"]) + 1
    kept_meta = read_metadata(kept)
    assert kept_meta["model_version"] == meta["model_version"] and kept_meta["calibration"]["threshold"] == old
    log = store.audit_log("test-model")
    assert [(e.what, e.who) for e in log] == [("model_version", "ann"), ("threshold", "ann")]
    assert log[0].old == meta["model_version"] and log[0].new == new_meta["model_version"]
    assert log[1].why == "label print"
    # the reviewed image is in the calibration now: no second proposal, and a stale proposal is refused
    assert propose_recalibration(store, "test-model") is None
    with pytest.raises(BundleError, match="changed since"):
        apply_recalibration(store, proposal, who="ann")
    original, extra, problem = retrain_sources(store, "test-model")
    assert problem is None and original and extra == []  # reviews stored without an input image


def test_history_folder_is_not_a_model(models_env_copy: Path) -> None:
    (models_env_copy / "history").mkdir()
    (models_env_copy / "history" / "history.sqlite3").write_bytes(b"")
    assert [b.name for b in list_bundles()] == ["test-model"]
    with pytest.raises(BundleError, match="reserved"):
        validate_name("history")


def test_replacing_a_model_is_audited(models_env_copy: Path, isolated_history: Path) -> None:
    from fod_app.review import log_model_saved, saved_version

    previous = saved_version("test-model")
    new = {**previous, "model_version": "abcdef123456",
           "calibration": {**previous["calibration"], "threshold": 2 * previous["calibration"]["threshold"]}}
    log_model_saved(previous, new, "ann", "retrained")
    log_model_saved(None, new, "ann", "a new model is not a change")
    entries = HistoryStore(isolated_history).audit_log("test-model")
    assert [(e.what, e.new, e.why) for e in entries][0] == ("threshold", f"{new['calibration']['threshold']:.6g}",
                                                            "retrained")
    assert entries[1].what == "model_version" and entries[1].old == previous["model_version"]
    assert saved_version("no-such-model") is None
