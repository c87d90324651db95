"""The inspection-history database: records, filters, reviews, audit, evaluations, migration, concurrency, errors."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fod_app.history import MIGRATIONS, SCHEMA_VERSION, HistoryError, HistoryStore, ImageRecord, history_path


def _images(n: int, prefix: str = "img", png: bytes | None = None) -> list[ImageRecord]:
    verdicts = ["OK", "REVIEW", "NG"]
    return [
        ImageRecord(f"{prefix}_{i}.png", f"{prefix}-hash-{i}", 0.5 + 0.4 * i, verdicts[i % 3], raw_score=0.1 * (i + 1),
                    thumbnail_png=png, heatmap_png=png, extra={"i": i})
        for i in range(n)
    ]


def _record(store: HistoryStore, images: list[ImageRecord], model: str = "bottle", version: str = "v1") -> str:
    return store.record_run(source="cli", model_name=model, model_version=version, weights_sha256="w" * 64,
                            threshold=0.42, review_threshold=0.8, images=images, user="ann")


def test_record_and_read_back_with_files_beside_the_db(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "h" / "history.sqlite3")
    png = b"\x89PNG fake"
    run_id = _record(store, _images(3, png=png))
    run = store.run(run_id)
    assert (run.model_name, run.model_version, run.threshold, run.review_threshold, run.user) == (
        "bottle", "v1", 0.42, 0.8, "ann")
    assert [i.file_name for i in run.images] == ["img_0.png", "img_1.png", "img_2.png"]
    assert [i.verdict for i in run.images] == ["OK", "REVIEW", "NG"]
    assert run.images[1].raw_score == pytest.approx(0.2) and run.images[2].extra == {"i": 2}
    assert (run.n_images, run.n_ok, run.n_review, run.n_ng) == (3, 1, 1, 1)
    for image in run.images:
        assert image.thumbnail_path.read_bytes() == png and image.heatmap_path.read_bytes() == png
        assert image.thumbnail_path.parent.parent == tmp_path / "h" / "history-files"
    # no blobs in the database: it stays small
    assert (tmp_path / "h" / "history.sqlite3").stat().st_size < 64 * 1024
    store.add_images(run_id, _images(2, prefix="more"))
    run = store.run(run_id)
    assert [i.position for i in run.images] == [0, 1, 2, 3, 4] and run.images[-1].file_name == "more_1.png"
    assert run.images[-1].thumbnail_path is None
    with pytest.raises(HistoryError, match="No inspection run"):
        store.add_images("nope", _images(1))
    with pytest.raises(ValueError, match="verdict"):
        _record(store, [ImageRecord("a.png", "h", 1.0, "MAYBE")])


def test_filters_latest_run_and_delete(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history.sqlite3")
    a = _record(store, [ImageRecord("a.png", "ha", 0.3, "OK")], model="bottle")
    b = _record(store, [ImageRecord("b.png", "hb", 2.0, "NG")], model="tile")
    c = store.record_run(source="app", model_name="bottle", model_version="v2", weights_sha256="x",
                         threshold=1.0, review_threshold=None, images=[ImageRecord("c.png", "hc", 0.9, "REVIEW")])
    assert [r.run_id for r in store.runs()] == [c, b, a]
    assert [r.run_id for r in store.runs(model_name="bottle")] == [c, a]
    assert [r.run_id for r in store.runs(verdict="NG")] == [b]
    assert [r.run_id for r in store.runs(source="app")] == [c]
    now = datetime.now(UTC)
    assert len(store.runs(since=now - timedelta(hours=1), until=now + timedelta(hours=1))) == 3
    assert store.runs(since=now + timedelta(hours=1)) == []
    assert store.latest_run(source="app").run_id == c and store.latest_run(source="cli").run_id == b
    assert store.model_names() == ["bottle", "tile"]
    store.delete_run(b)
    assert [r.run_id for r in store.runs()] == [c, a]
    with pytest.raises(HistoryError, match="No inspection run"):
        store.run(b)


def test_reviews_audit_and_evaluations(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "history.sqlite3")
    run = store.run(_record(store, _images(3)))
    ng = run.images[2]
    store.add_review(ng.image_id, "good", note="scratch on the label only", reviewer="bob")
    store.add_review(run.images[0].image_id, "defective", reviewer="bob")
    with pytest.raises(ValueError, match="label"):
        store.add_review(ng.image_id, "meh")
    with pytest.raises(HistoryError, match="No recorded image"):
        store.add_review(10**6, "good")
    assert store.run(run.run_id).images[2].review.note == "scratch on the label only"
    good = store.reviewed_images(weights_sha256="w" * 64, label="good")
    assert [i.file_name for i in good] == ["img_2.png"] and good[0].raw_score == pytest.approx(0.3)
    assert store.reviewed_images(weights_sha256="other", label="good") == []
    # the same image inspected again and re-reviewed: counted once, latest label wins
    again = store.run(_record(store, _images(3)))
    store.add_review(again.images[2].image_id, "defective", reviewer="carol")
    assert store.reviewed_images(label="good") == []
    assert store.labels_by_hash() == {"img-hash-0": "defective", "img-hash-2": "defective"}

    store.audit(who="bob", model_name="bottle", what="threshold", old=0.42, new=0.47, why="2 reviewed false rejects")
    store.audit(who="bob", model_name="tile", what="model_version", old="a", new="b")
    log = store.audit_log("bottle")
    assert len(log) == 1 and (log[0].who, log[0].old, log[0].new) == ("bob", "0.42", "0.47")
    assert [e.model_name for e in store.audit_log()] == ["tile", "bottle"]

    import numpy as np

    first = store.record_evaluation(model_name="bottle", model_version="v1", dataset_name="bottle", dataset_path="/d",
                                    n_good=20, n_defect=63, metrics={"image_auroc": np.float64(0.987)},
                                    threshold_units=1.0, image_level_only=False)
    store.record_evaluation(model_name="bottle", model_version="v1", dataset_name="small", dataset_path="upload",
                            n_good=5, n_defect=5, metrics={"image_auroc": 1.0}, threshold_units=1.2,
                            image_level_only=True)
    records = store.evaluations("bottle")
    assert [r.dataset_name for r in records] == ["small", "bottle"]  # both kept, newest first
    assert records[1].evaluation_id == first and records[1].metrics["image_auroc"] == pytest.approx(0.987)
    assert records[0].image_level_only is True and records[1].n_defect == 63


def test_history_path_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FOD_HISTORY_DB", raising=False)
    monkeypatch.setenv("FOD_MODELS_DIR", str(tmp_path / "models"))
    assert history_path() == tmp_path / "models" / "history" / "history.sqlite3"
    monkeypatch.setenv("FOD_HISTORY_DB", str(tmp_path / "elsewhere.db"))
    assert history_path() == tmp_path / "elsewhere.db"
    assert HistoryStore().path == tmp_path / "elsewhere.db"


def test_migration_from_schema_version_1(tmp_path: Path) -> None:
    """A database written by the first schema (runs + images only) is migrated in place, its data kept."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO runs VALUES ('old-run', '2025-01-02T03:04:05+00:00', 'cli', 'bottle', 'abc', 'w', "
                 "0.5, 0.8, NULL)")
    conn.execute("INSERT INTO images (run_id, position, file_name, content_sha256, score, verdict) "
                 "VALUES ('old-run', 0, 'x.png', 'hx', 1.5, 'NG')")
    conn.commit()
    conn.close()
    store = HistoryStore(path)
    assert store.schema_version() == SCHEMA_VERSION == 2
    old = store.run("old-run")
    assert old.threshold_units == 1.0 and old.images[0].raw_score is None and old.images[0].extra == {}
    store.add_review(old.images[0].image_id, "good", reviewer="ann")  # new tables work on the old data
    assert store.run("old-run").images[0].review.label == "good"
    HistoryStore(path)  # opening again is a no-op
    assert store.schema_version() == 2


def test_newer_schema_and_foreign_sqlite_are_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    with pytest.raises(HistoryError, match="schema version 7"):
        HistoryStore(newer)
    foreign = tmp_path / "foreign.sqlite3"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(HistoryError, match="another program"):
        HistoryStore(foreign)


def test_corrupt_file_gives_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.write_bytes(b"this is not an sqlite database at all" * 100)
    with pytest.raises(HistoryError) as info:
        HistoryStore(path)
    message = str(info.value)
    assert "\n" not in message and "damaged" in message and str(path) in message


def test_read_only_file_gives_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    _record(HistoryStore(path), _images(1))
    path.chmod(0o444)
    try:
        with pytest.raises(HistoryError) as info:
            HistoryStore(path)
    finally:
        path.chmod(0o644)
    assert "\n" not in str(info.value) and "read-only" in str(info.value)


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="is a folder"):
        HistoryStore(tmp_path)


def test_concurrent_threads(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            store = HistoryStore(path)
            for j in range(10):
                _record(store, _images(3, prefix=f"t{k}-{j}"))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    runs = HistoryStore(path).runs(limit=1000)
    assert len(runs) == 40 and all(r.n_images == 3 for r in runs)


def _process_writer(path: str, k: int, n_runs: int) -> None:
    store = HistoryStore(Path(path))
    for j in range(n_runs):
        run_id = store.record_run(source="cli", model_name=f"m{k % 2}", model_version="v", weights_sha256="w",
                                  threshold=1.0, review_threshold=None, images=_images(4, prefix=f"p{k}-{j}"))
        store.add_images(run_id, _images(1, prefix=f"p{k}-{j}-extra"))
        if j % 5 == 0:
            image = store.run(run_id).images[0]
            store.add_review(image.image_id, "good", reviewer=f"proc{k}")
            store.audit(who=f"proc{k}", model_name=f"m{k % 2}", what="threshold", old=1, new=2)


def test_parallel_writer_processes_do_not_corrupt(tmp_path: Path) -> None:
    """Four processes write at once into a fresh file (creating the schema concurrently): nothing lost."""
    path = tmp_path / "history.sqlite3"
    n_procs, n_runs = 4, 15
    # Separate interpreters (not multiprocessing: its "spawn" re-runs __main__, which under AppTest is a page script)
    tests_dir = Path(__file__).resolve().parent
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; from test_history import _process_writer; "
        "_process_writer(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tests_dir.parent), str(tests_dir), str(path), str(k),
                          str(n_runs)])
        for k in range(n_procs)
    ]
    assert [p.wait(timeout=240) for p in procs] == [0] * n_procs
    store = HistoryStore(path)
    runs = store.runs(limit=10_000)
    assert len(runs) == n_procs * n_runs and all(r.n_images == 5 for r in runs)
    assert len({r.run_id for r in runs}) == n_procs * n_runs
    assert len(store.audit_log()) == n_procs * 3
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        positions = conn.execute("SELECT run_id, group_concat(position) FROM images GROUP BY run_id").fetchall()
    assert all(sorted(map(int, p.split(","))) == [0, 1, 2, 3, 4] for _, p in positions)


def _simultaneous_opener(folder: str, k: int, n_files: int, t0: float) -> None:
    """Open file i of ``folder`` at wall time ``t0 + 0.1 i`` (all processes at the same instant) and record a run."""
    import time

    for i in range(n_files):
        while time.time() < t0 + 0.1 * i:
            pass
        _record(HistoryStore(Path(folder) / f"h{i}.sqlite3"), _images(1, prefix=f"p{k}"))


def test_processes_opening_a_new_file_at_the_same_instant_all_succeed(tmp_path: Path) -> None:
    """Eight processes create the same new history file at the same instant, 30 times: SQLite can refuse the switch to
    WAL at once ("database is locked", no busy wait); before the retry this failed about one trial in seven."""
    import time

    n_procs, n_files = 8, 30
    tests_dir = Path(__file__).resolve().parent
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; from test_history import _simultaneous_opener; "
        "_simultaneous_opener(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))"
    )
    t0 = time.time() + 3.0  # time for every interpreter to start before the first file
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tests_dir.parent), str(tests_dir), str(tmp_path), str(k),
                          str(n_files), repr(t0)], stderr=subprocess.PIPE, text=True)
        for k in range(n_procs)
    ]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0] * n_procs, [err.strip().splitlines()[-1:] for _, err in results]
    for i in range(n_files):
        assert len(HistoryStore(tmp_path / f"h{i}.sqlite3").runs(limit=100)) == n_procs


def test_history_removed_while_in_use_starts_again_empty(tmp_path: Path) -> None:
    path = tmp_path / "history" / "history.sqlite3"
    store = HistoryStore(path)
    _record(store, _images(1))
    import shutil

    shutil.rmtree(tmp_path / "history")  # what "rm -r models/history" does while the app runs
    assert store.runs() == []
    run_id = _record(store, _images(2, png=b"png"))
    assert store.run(run_id).images[1].thumbnail_path.read_bytes() == b"png"
    assert store.schema_version() == SCHEMA_VERSION
