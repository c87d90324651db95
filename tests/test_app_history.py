"""AppTest: Inspect records into the history and reopens it; History page; review → recalibrate → compare."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from fod_app.bundle import read_metadata
from fod_app.history import HistoryStore

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "app.py"
SAMPLES = REPO / "sample_data" / "inspect"
TIMEOUT = 180


@pytest.fixture(autouse=True)
def cpu_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOD_DEVICE", "cpu")


def _app(page: str) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.switch_page(page).run()
    _ok(at)
    return at


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _png(name: str) -> tuple[str, bytes, str]:
    return (name, (SAMPLES / name).read_bytes(), "image/png")


def _table(at: AppTest):
    return next(df.value for df in at.dataframe if "Verdict" in df.value.columns)


def _text(at: AppTest) -> str:
    return "\n".join(str(m.value) for m in [*at.markdown, *at.info, *at.warning, *at.success, *at.error, *at.caption])


def _button(at: AppTest, label: str):
    return next(b for b in at.button if b.label.startswith(label))


def test_added_file_alone_is_inspected_and_the_run_is_extended(models_env: Path, isolated_history: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from fod_app.inference import Detector

    seen: list[str] = []
    original = Detector.inspect

    def counting(self, named_images, *args, **kwargs):
        def names():
            for name, image in named_images:
                seen.append(name)
                yield name, image
        return original(self, names(), *args, **kwargs)

    monkeypatch.setattr(Detector, "inspect", counting)
    at = _app("pages/3_inspect.py")
    at.file_uploader(key="inspect_uploads").set_value([_png("good_01.png"), _png("defect_01.png")]).run()
    _ok(at)
    assert sorted(seen) == ["defect_01.png", "good_01.png"]
    at.file_uploader(key="inspect_uploads").set_value(
        [_png("good_01.png"), _png("defect_01.png"), _png("defect_03.png")]).run()
    _ok(at)
    assert seen[2:] == ["defect_03.png"], "only the added file is inspected"
    assert len(_table(at)) == 3
    store = HistoryStore(isolated_history)
    (summary,) = store.runs()
    run = store.run(summary.run_id)
    assert sorted(i.file_name for i in run.images) == ["defect_01.png", "defect_03.png", "good_01.png"]
    assert run.source == "app" and run.model_version == read_metadata("test-model")["model_version"]
    assert at.query_params["run"] in (summary.run_id, [summary.run_id])


def test_reload_and_page_change_reopen_the_last_run(models_env: Path) -> None:
    at = _app("pages/3_inspect.py")
    at.file_uploader(key="inspect_uploads").set_value([_png("good_01.png"), _png("defect_03.png")]).run()
    _ok(at)
    before = _table(at)
    # another page and back: the uploader is empty then, the results stay
    at.switch_page("pages/4_explore.py").run()
    _ok(at)
    at.switch_page("pages/3_inspect.py").run()
    _ok(at)
    assert list(_table(at)["File"]) == list(before["File"])
    # a reload is a new session: the run comes back from the history
    fresh = _app("pages/3_inspect.py")
    after = _table(fresh)
    assert list(after["File"]) == list(before["File"])
    assert list(after["Score"]) == pytest.approx(list(before["Score"]), abs=1e-3)
    assert "Showing the last inspection" in _text(fresh)


def test_review_recalibrate_and_compare_on_the_history_page(models_env_copy: Path, isolated_history: Path) -> None:
    at = _app("pages/3_inspect.py")
    names = ["good_01.png", "good_03.png", "defect_01.png", "defect_03.png", "defect_05.png", "defect_07.png"]
    at.file_uploader(key="inspect_uploads").set_value([_png(n) for n in names]).run()
    _ok(at)
    table = _table(at)
    ng = table[table["Verdict"] == "NG"].sort_values("Score")
    assert len(ng), table
    lowest_ng = ng.iloc[0]["File"]
    old_version = read_metadata("test-model")["model_version"]

    at.switch_page("pages/7_history.py").run()
    _ok(at)
    runs_table = next(df.value for df in at.dataframe if "Run" in df.value.columns)
    assert len(runs_table) == 1 and runs_table["Images"][0] == len(names)
    # review the lowest-scoring NG image as a false reject
    view_key = next(s.key for s in at.selectbox if s.key.startswith("history_view_"))
    at.selectbox(key=view_key).set_value(lowest_ng).run()
    assert f"**{lowest_ng}**" in _text(at)
    reviewer = next(t for t in at.text_input if t.label == "Reviewer")
    reviewer.input("Quinn").run()
    next(t for t in at.text_input if t.label == "Note (optional)").input("label print only").run()
    _button(at, "Mark as good (false reject)").click().run()
    _ok(at)
    assert "reviewed as good (false reject)" in _text(at)
    review = HistoryStore(isolated_history).reviewed_images(label="good")
    assert [(i.file_name, i.review.reviewer, i.review.note) for i in review] == [
        (lowest_ng, "Quinn", "label print only")]

    # recalibrate: the proposal is shown first, applied on click, logged
    assert "Recalibrate test-model" in _text(at)
    _button(at, "Apply the new threshold").click().run()
    _ok(at)
    meta = read_metadata("test-model")
    assert meta["model_version"] == f"{old_version}-c1" and meta["calibration_revision"] == 1
    kept = [p.name for p in models_env_copy.iterdir() if p.name.startswith("test-model.previous-")]
    assert len(kept) == 1 and read_metadata(kept[0])["model_version"] == old_version
    log = HistoryStore(isolated_history).audit_log("test-model")
    assert {e.what for e in log} == {"threshold", "model_version"} and all(e.who == "Quinn" for e in log)

    # compare the run (old version) with the recalibrated model: the reviewed image passes now
    at.selectbox(key="history_compare_model").set_value("test-model").run()
    _button(at, "Compare").click().run()
    _ok(at)
    text = _text(at)
    assert "image(s) change verdict" in text
    changed = next(df.value for df in at.dataframe if "Verdict B" in df.value.columns)
    assert lowest_ng in list(changed["File"])
    row = changed[changed["File"] == lowest_ng].iloc[0]
    assert (row["Verdict A"], row["Verdict B"]) == ("NG", "OK")
    counts = next(df.value for df in at.dataframe if "Misses (reviewed defective, OK)" in df.value.columns)
    assert list(counts["False rejects (reviewed good, NG)"]) == [1, 0]


def test_corrupt_history_the_app_still_works(models_env: Path, isolated_history: Path) -> None:
    isolated_history.parent.mkdir(parents=True, exist_ok=True)
    isolated_history.write_bytes(b"not a database" * 500)
    at = _app("pages/3_inspect.py")
    at.file_uploader(key="inspect_uploads").set_value([_png("good_01.png")]).run()
    _ok(at)
    assert len(_table(at)) == 1
    warning = " ".join(str(w.value) for w in at.warning)
    assert "Inspection history is unavailable" in warning and "damaged" in warning
    at.switch_page("pages/7_history.py").run()
    _ok(at)
    assert "Inspection history is unavailable" in " ".join(str(e.value) for e in at.error)


def test_retrain_with_reviewed_images_starts_a_job(models_env_copy: Path, isolated_history: Path,
                                                   fresh_jobs: None) -> None:
    from fod_app.jobs import get_job_manager

    at = _app("pages/3_inspect.py")
    at.file_uploader(key="inspect_uploads").set_value([_png("good_01.png"), _png("defect_01.png")]).run()
    at.switch_page("pages/7_history.py").run()
    _ok(at)
    next(t for t in at.text_input if t.label == "Reviewer").input("Quinn").run()
    _button(at, "Mark as good (false reject)").click().run()
    _ok(at)
    assert "1 reviewed good image(s)" in _text(at)
    _button(at, "Start retraining").click().run()
    _ok(at)
    assert "Training 'test-model-retrained' started" in _text(at)
    job = get_job_manager().latest()
    original = sorted((REPO / "sample_data" / "train_good").glob("*.png"))
    assert job is not None and job.spec.name == "test-model-retrained"
    assert len(job.spec.sources) == len(original) + 1 and str(job.spec.sources[-1]).endswith("-input.png")
    log = HistoryStore(isolated_history).audit_log("test-model")
    assert log[0].what == "retrain" and log[0].new == "test-model-retrained"
