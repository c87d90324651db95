"""Inspection history: every run, image verdict, review, evaluation and threshold/model change, in SQLite.

One database file (``history_path()``: ``$FOD_HISTORY_DB``, else ``<models folder>/history/history.sqlite3``);
thumbnails and heat maps are PNG files in a folder beside it (``<db stem>-files/<run id>/``), never blobs.

Safe for several writers at once (threads and processes: the app, the CLI, a REST server): WAL journal, one
short ``BEGIN IMMEDIATE`` transaction per write, a busy timeout, and a fresh connection per call. The schema
version is ``PRAGMA user_version``; older databases are migrated step by step on open. A corrupt, read-only or
locked database raises :class:`HistoryError` with a one-line message. No Streamlit here.
"""

from __future__ import annotations

import json
import math
import os
import random
import sqlite3
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HISTORY_ENV = "FOD_HISTORY_DB"
DB_FILE = "history.sqlite3"
BUSY_TIMEOUT_S = 15.0
VERDICTS = ("OK", "REVIEW", "NG")
REVIEW_LABELS = ("good", "defective")  # "good" = a false reject, "defective" = a miss

#: Schema migrations; ``MIGRATIONS[i]`` takes the database from ``user_version`` i to i + 1.
MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: runs and their images (the first released schema)
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        created TEXT NOT NULL,
        source TEXT NOT NULL,
        model_name TEXT NOT NULL,
        model_version TEXT NOT NULL,
        weights_sha256 TEXT NOT NULL,
        threshold REAL NOT NULL,
        review_threshold REAL,
        user TEXT
    );
    CREATE INDEX runs_created ON runs(created);
    CREATE INDEX runs_model ON runs(model_name, created);
    CREATE TABLE images (
        image_id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
        position INTEGER NOT NULL,
        file_name TEXT NOT NULL,
        content_sha256 TEXT NOT NULL,
        score REAL NOT NULL,
        verdict TEXT NOT NULL,
        thumbnail_path TEXT,
        heatmap_path TEXT
    );
    CREATE INDEX images_run ON images(run_id, position);
    CREATE INDEX images_hash ON images(content_sha256);
    """,
    # 1 -> 2: raw scores and extras per image, decision threshold per run, reviews, audit log, evaluations
    """
    ALTER TABLE images ADD COLUMN raw_score REAL;
    ALTER TABLE images ADD COLUMN extra TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE images ADD COLUMN map_path TEXT;
    ALTER TABLE runs ADD COLUMN threshold_units REAL NOT NULL DEFAULT 1.0;
    CREATE TABLE reviews (
        review_id INTEGER PRIMARY KEY AUTOINCREMENT,
        image_id INTEGER NOT NULL REFERENCES images(image_id) ON DELETE CASCADE,
        label TEXT NOT NULL CHECK (label IN ('good', 'defective')),
        note TEXT NOT NULL DEFAULT '',
        reviewer TEXT NOT NULL DEFAULT '',
        created TEXT NOT NULL
    );
    CREATE INDEX reviews_image ON reviews(image_id, review_id);
    CREATE TABLE audit (
        audit_id INTEGER PRIMARY KEY AUTOINCREMENT,
        created TEXT NOT NULL,
        who TEXT NOT NULL,
        model_name TEXT NOT NULL,
        what TEXT NOT NULL,
        old TEXT,
        new TEXT,
        why TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE evaluations (
        evaluation_id TEXT PRIMARY KEY,
        created TEXT NOT NULL,
        model_name TEXT NOT NULL,
        model_version TEXT NOT NULL,
        dataset_name TEXT NOT NULL,
        dataset_path TEXT NOT NULL,
        n_good INTEGER NOT NULL,
        n_defect INTEGER NOT NULL,
        metrics TEXT NOT NULL,
        threshold_units REAL NOT NULL,
        image_level_only INTEGER NOT NULL
    );
    CREATE INDEX evaluations_model ON evaluations(model_name, created);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class HistoryError(RuntimeError):
    """The history database cannot be used (corrupt, read-only, locked, newer schema); one-line message."""


def history_path() -> Path:
    """``$FOD_HISTORY_DB``, else ``<models folder>/history/history.sqlite3``."""
    configured = os.environ.get(HISTORY_ENV, "").strip()
    if configured:
        return Path(configured).expanduser()
    from .bundle import models_dir

    return models_dir() / "history" / DB_FILE


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _time_text(value: datetime | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if value.tzinfo is None:
        value = value.astimezone()
    return value.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass
class ImageRecord:
    """One inspected image to record. ``score`` in threshold units (1.0 = the calibrated threshold)."""

    file_name: str
    content_sha256: str
    score: float
    verdict: str  # "OK" | "REVIEW" | "NG"
    raw_score: float | None = None
    thumbnail_png: bytes | None = None  # the prepared (model-input) image as PNG
    heatmap_png: bytes | None = None  # the heat-map overlay as PNG
    extra: dict = field(default_factory=dict)  # e.g. {"unfamiliar": True}
    map_png: bytes | None = None  # the anomaly map (S, S) as 16-bit PNG (see fod_app.records)


@dataclass
class Review:
    """A human judgement of one recorded image: ``label`` "good" (a false reject) or "defective" (a miss)."""

    review_id: int
    image_id: int
    label: str
    note: str
    reviewer: str
    created: str


@dataclass
class StoredImage:
    """A recorded image; ``thumbnail_path``/``heatmap_path`` are absolute file paths (or None)."""

    image_id: int
    run_id: str
    position: int
    file_name: str
    content_sha256: str
    score: float
    raw_score: float | None
    verdict: str
    thumbnail_path: Path | None
    heatmap_path: Path | None
    extra: dict
    review: Review | None = None  # the latest review, if any
    map_path: Path | None = None


@dataclass
class RunSummary:
    """One recorded inspection run (without its images)."""

    run_id: str
    created: str  # ISO 8601, UTC
    source: str
    model_name: str
    model_version: str
    weights_sha256: str
    threshold: float  # raw calibrated threshold of the model
    review_threshold: float | None  # start of the review band, threshold units
    threshold_units: float  # decision threshold used, threshold units
    user: str | None
    n_images: int = 0
    n_ok: int = 0
    n_review: int = 0
    n_ng: int = 0


@dataclass
class Run(RunSummary):
    """A run with its images, in the order recorded."""

    images: list[StoredImage] = field(default_factory=list)


@dataclass
class EvaluationRecord:
    """One stored evaluation of a model on a labelled data set."""

    evaluation_id: str
    created: str
    model_name: str
    model_version: str
    dataset_name: str
    dataset_path: str
    n_good: int
    n_defect: int
    metrics: dict
    threshold_units: float
    image_level_only: bool


@dataclass
class AuditEntry:
    """A change of a model's threshold or version: who, when, old -> new, why."""

    audit_id: int
    created: str
    who: str
    model_name: str
    what: str
    old: str | None
    new: str | None
    why: str


def _one_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


class HistoryStore:
    """The history database at ``path`` (default :func:`history_path`); creates or migrates it on open."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else history_path()
        self.files_dir = self.path.parent / f"{self.path.stem}-files"
        self._opened = False
        where = f"The inspection history {self.path}"
        if self.path.is_dir():
            raise HistoryError(f"{where} is a folder, not a database file; set {HISTORY_ENV} to a file path.")
        if self.path.exists() and not (self.path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)):
            raise HistoryError(f"{where} is read-only; history is unavailable (make it writable or set {HISTORY_ENV}).")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise HistoryError(f"{where} cannot be created: {_one_line(err)}.") from err
        self._migrate()

    # ------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        fresh = not self.path.exists()
        try:
            if fresh:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            mode = self._journal_mode_wal(conn)
            if str(mode).lower() != "wal":
                conn.close()
                raise HistoryError(f"The inspection history {self.path} cannot use WAL journaling (mode {mode}).")
            conn.execute("PRAGMA synchronous = NORMAL")
        except (sqlite3.Error, OSError) as err:
            raise self._error(err) from err
        if fresh and self._opened:  # the file was removed while in use (history cleared): a new, empty one
            try:
                self._apply_migrations(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    @staticmethod
    def _journal_mode_wal(conn: sqlite3.Connection) -> str:
        """Switch ``conn``'s file to WAL and return the mode SQLite reports.

        Hand-written retry: when several processes open a brand-new file at once, SQLite can answer
        ``PRAGMA journal_mode = WAL`` with "database is locked" at once, without calling the busy handler
        (reproduced: 8 processes on a fresh file, 31 failures in 200 trials; none with this retry)."""
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as err:
                text = str(err).lower()
                if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02 + 0.03 * random.random())

    def _error(self, err: BaseException) -> HistoryError:
        text = _one_line(err)
        where = f"The inspection history {self.path}"
        lowered = text.lower()
        if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
            return HistoryError(
                f"{where} is damaged (not a valid SQLite database); move it away to start a new history, "
                "or restore a backup."
            )
        if "readonly" in lowered or "read-only" in lowered:
            return HistoryError(
                f"{where} is read-only; history is unavailable (make it writable or set {HISTORY_ENV})."
            )
        if "locked" in lowered or "busy" in lowered:
            return HistoryError(
                f"{where} is busy (locked by another program for over {BUSY_TIMEOUT_S:.0f} s); try again."
            )
        if "unable to open" in lowered:
            return HistoryError(f"{where} cannot be opened ({text}); check the path and its permissions.")
        return HistoryError(f"{where} could not be used: {text}.")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        except sqlite3.Error as err:
            raise self._error(err) from err
        finally:
            conn.close()

    @contextmanager
    def _immediate(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction on ``conn``: committed on success, rolled back on any error;
        SQLite errors become ``HistoryError``."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            raise self._error(err) from err

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A new connection in one ``_immediate`` transaction, closed afterwards."""
        conn = self._connect()
        try:
            with self._immediate(conn):
                yield conn
        finally:
            conn.close()

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            self._apply_migrations(conn)
        finally:
            conn.close()
        self._opened = True

    def _apply_migrations(self, conn: sqlite3.Connection) -> None:
        """Bring the schema to SCHEMA_VERSION in one ``BEGIN IMMEDIATE`` transaction (concurrent openers wait)."""
        with self._immediate(conn):
            self._migration_steps(conn)

    def _migration_steps(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"The inspection history {self.path} has schema version {version}; this FOD Inspector reads up "
                f"to {SCHEMA_VERSION}. Update FOD Inspector or set {HISTORY_ENV} to another file."
            )
        if version == 0:  # a fresh file must be empty; anything else is not ours
            tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
            if tables:
                raise HistoryError(
                    f"The inspection history {self.path} is an SQLite file of another program; set "
                    f"{HISTORY_ENV} to another file."
                )
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {step + 1}")

    def schema_version(self) -> int:
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # ------------------------------------------------------------------ runs
    def _write_files(self, run_id: str, images: list[ImageRecord]) -> list[tuple[str | None, ...]]:
        """PNG files for each image (before the rows that name them); relative paths or None."""
        folder = self.files_dir / run_id
        paths: list[tuple[str | None, ...]] = []
        for image in images:
            names: list[str | None] = []
            key = uuid.uuid4().hex[:12]
            for kind, data in (("input", image.thumbnail_png), ("heatmap", image.heatmap_png),
                               ("map", image.map_png)):
                if data is None:
                    names.append(None)
                    continue
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"{key}-{kind}.png").write_bytes(data)
                except OSError as err:
                    raise HistoryError(f"Could not store image files in {folder}: {_one_line(err)}.") from err
                names.append(f"{run_id}/{key}-{kind}.png")
            paths.append(tuple(names))
        return paths

    @staticmethod
    def _check_image(image: ImageRecord) -> None:
        if image.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {image.verdict!r}")
        if not math.isfinite(float(image.score)):
            raise ValueError(f"score of {image.file_name!r} is not finite")

    def _insert_images(self, conn: sqlite3.Connection, run_id: str, images: list[ImageRecord],
                       files: list[tuple[str | None, ...]]) -> None:
        start = conn.execute(
            "SELECT coalesce(max(position) + 1, 0) FROM images WHERE run_id = ?", (run_id,)
        ).fetchone()[0]
        conn.executemany(
            "INSERT INTO images (run_id, position, file_name, content_sha256, score, raw_score, verdict, "
            "thumbnail_path, heatmap_path, map_path, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (run_id, start + i, img.file_name, img.content_sha256, float(img.score),
                 None if img.raw_score is None else float(img.raw_score), img.verdict, thumb, heat, amap,
                 json.dumps(img.extra or {}, default=str))
                for i, (img, (thumb, heat, amap)) in enumerate(zip(images, files))
            ],
        )

    def record_run(
        self,
        *,
        source: str,
        model_name: str,
        model_version: str,
        weights_sha256: str,
        threshold: float,
        review_threshold: float | None,
        images: list[ImageRecord],
        user: str | None = None,
        threshold_units: float = 1.0,
    ) -> str:
        """Record one inspection run with its images (one transaction); returns its run id."""
        for image in images:
            self._check_image(image)
        run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        files = self._write_files(run_id, images)
        with self._write() as conn:
            conn.execute(
                "INSERT INTO runs (run_id, created, source, model_name, model_version, weights_sha256, threshold, "
                "review_threshold, user, threshold_units) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, _now(), source, model_name, model_version, weights_sha256, float(threshold),
                 None if review_threshold is None else float(review_threshold), user, float(threshold_units)),
            )
            self._insert_images(conn, run_id, images, files)
        return run_id

    def add_images(self, run_id: str, images: list[ImageRecord]) -> None:
        """Append images to an existing run (REST / streaming)."""
        for image in images:
            self._check_image(image)
        with self._read() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                raise HistoryError(f"No inspection run {run_id!r} in the history.")
        files = self._write_files(run_id, images)
        with self._write() as conn:
            self._insert_images(conn, run_id, images, files)

    _SUMMARY = (
        "SELECT r.*, count(i.image_id) AS n_images, "
        "coalesce(sum(i.verdict = 'OK'), 0) AS n_ok, coalesce(sum(i.verdict = 'REVIEW'), 0) AS n_review, "
        "coalesce(sum(i.verdict = 'NG'), 0) AS n_ng FROM runs r LEFT JOIN images i ON i.run_id = r.run_id "
    )

    @staticmethod
    def _summary(row: sqlite3.Row) -> RunSummary:
        return RunSummary(
            row["run_id"], row["created"], row["source"], row["model_name"], row["model_version"],
            row["weights_sha256"], row["threshold"], row["review_threshold"], row["threshold_units"], row["user"],
            row["n_images"], row["n_ok"], row["n_review"], row["n_ng"],
        )

    def runs(
        self,
        *,
        model_name: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        verdict: str | None = None,
        source: str | None = None,
        user: str | None = None,
        limit: int = 200,
    ) -> list[RunSummary]:
        """Runs, newest first; ``verdict`` keeps runs with at least one image of that verdict."""
        where, params = [], []
        if model_name:
            where.append("r.model_name = ?")
            params.append(model_name)
        if since is not None:
            where.append("r.created >= ?")
            params.append(_time_text(since))
        if until is not None:
            where.append("r.created < ?")
            params.append(_time_text(until))
        if source:
            where.append("r.source = ?")
            params.append(source)
        if user:
            where.append("r.user = ?")
            params.append(user)
        if verdict:
            where.append("EXISTS (SELECT 1 FROM images v WHERE v.run_id = r.run_id AND v.verdict = ?)")
            params.append(verdict)
        sql = self._SUMMARY + (f"WHERE {' AND '.join(where)} " if where else "")
        sql += "GROUP BY r.run_id ORDER BY r.created DESC LIMIT ?"
        with self._read() as conn:
            return [self._summary(row) for row in conn.execute(sql, (*params, int(limit)))]

    def model_names(self) -> list[str]:
        """Model names that have recorded runs."""
        with self._read() as conn:
            return [row[0] for row in conn.execute("SELECT DISTINCT model_name FROM runs ORDER BY model_name")]

    def _image(self, row: sqlite3.Row, review: Review | None) -> StoredImage:
        def absolute(rel: str | None) -> Path | None:
            return None if rel is None else self.files_dir / rel

        return StoredImage(
            row["image_id"], row["run_id"], row["position"], row["file_name"], row["content_sha256"], row["score"],
            row["raw_score"], row["verdict"], absolute(row["thumbnail_path"]), absolute(row["heatmap_path"]),
            json.loads(row["extra"] or "{}"), review, absolute(row["map_path"]),
        )

    @staticmethod
    def _review(row: sqlite3.Row) -> Review:
        return Review(row["review_id"], row["image_id"], row["label"], row["note"], row["reviewer"], row["created"])

    def _latest_reviews(self, conn: sqlite3.Connection, image_ids: list[int]) -> dict[int, Review]:
        reviews: dict[int, Review] = {}
        for start in range(0, len(image_ids), 500):
            chunk = image_ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(
                f"SELECT * FROM reviews WHERE image_id IN ({marks}) ORDER BY review_id", chunk
            ):
                reviews[row["image_id"]] = self._review(row)  # later rows win: the latest review
        return reviews

    def run(self, run_id: str) -> Run:
        """A run with its images (each with its latest review); HistoryError when unknown."""
        with self._read() as conn:
            head = conn.execute(self._SUMMARY + "WHERE r.run_id = ? GROUP BY r.run_id", (run_id,)).fetchone()
            if head is None:
                raise HistoryError(f"No inspection run {run_id!r} in the history.")
            rows = conn.execute("SELECT * FROM images WHERE run_id = ? ORDER BY position", (run_id,)).fetchall()
            reviews = self._latest_reviews(conn, [row["image_id"] for row in rows])
        summary = self._summary(head)
        return Run(**vars(summary), images=[self._image(row, reviews.get(row["image_id"])) for row in rows])

    def latest_run(self, *, source: str | None = None, user: str | None = None) -> RunSummary | None:
        """The newest run (optionally of one source / user), or None."""
        newest = self.runs(source=source, user=user, limit=1)
        return newest[0] if newest else None

    def image(self, image_id: int) -> StoredImage:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM images WHERE image_id = ?", (int(image_id),)).fetchone()
            if row is None:
                raise HistoryError(f"No recorded image {image_id} in the history.")
            review = self._latest_reviews(conn, [int(image_id)]).get(int(image_id))
        return self._image(row, review)

    def delete_run(self, run_id: str) -> None:
        """Remove a run, its images and reviews, and its files."""
        import shutil

        with self._write() as conn:
            conn.execute("DELETE FROM reviews WHERE image_id IN (SELECT image_id FROM images WHERE run_id = ?)",
                         (run_id,))
            conn.execute("DELETE FROM images WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        shutil.rmtree(self.files_dir / run_id, ignore_errors=True)

    # ------------------------------------------------------------------ reviews
    def add_review(self, image_id: int, label: str, note: str = "", reviewer: str = "") -> int:
        """Record a human judgement of a recorded image ("good" = false reject, "defective" = miss)."""
        if label not in REVIEW_LABELS:
            raise ValueError(f"review label must be one of {REVIEW_LABELS}, got {label!r}")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM images WHERE image_id = ?", (int(image_id),)).fetchone() is None:
                raise HistoryError(f"No recorded image {image_id} in the history.")
            cursor = conn.execute(
                "INSERT INTO reviews (image_id, label, note, reviewer, created) VALUES (?, ?, ?, ?, ?)",
                (int(image_id), label, str(note or "").strip(), str(reviewer or "").strip(), _now()),
            )
            return int(cursor.lastrowid)

    def reviewed_images(
        self, *, model_name: str | None = None, weights_sha256: str | None = None, label: str | None = None
    ) -> list[StoredImage]:
        """Images whose latest review has ``label`` (any when None), of runs of that model / those weights.

        One entry per content hash (the most recently reviewed), so an image inspected twice counts once.
        """
        where, params = [], []
        if model_name:
            where.append("r.model_name = ?")
            params.append(model_name)
        if weights_sha256:
            where.append("r.weights_sha256 = ?")
            params.append(weights_sha256)
        sql = (
            "SELECT i.* FROM images i JOIN runs r ON r.run_id = i.run_id "
            "WHERE EXISTS (SELECT 1 FROM reviews v WHERE v.image_id = i.image_id)"
            + "".join(f" AND {w}" for w in where)
        )
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
            reviews = self._latest_reviews(conn, [row["image_id"] for row in rows])
        latest: dict[str, StoredImage] = {}
        for row in rows:
            image = self._image(row, reviews.get(row["image_id"]))
            if image.review is None:
                continue
            seen = latest.get(image.content_sha256)
            if seen is None or (seen.review and image.review.review_id > seen.review.review_id):
                latest[image.content_sha256] = image
        return [img for img in latest.values() if label is None or (img.review and img.review.label == label)]

    def labels_by_hash(self) -> dict[str, str]:
        """Content hash -> the latest review label, over the whole history."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT i.content_sha256, v.label FROM reviews v JOIN images i ON i.image_id = v.image_id "
                "ORDER BY v.review_id"
            ).fetchall()
        return {row[0]: row[1] for row in rows}

    # ------------------------------------------------------------------ audit log
    def audit(self, *, who: str, model_name: str, what: str, old: Any, new: Any, why: str = "") -> int:
        """Log a change of a model's threshold or version (who, when, old -> new, why)."""
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO audit (created, who, model_name, what, old, new, why) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_now(), who or "unknown", model_name, what, None if old is None else str(old),
                 None if new is None else str(new), why or ""),
            )
            return int(cursor.lastrowid)

    def audit_log(self, model_name: str | None = None, limit: int = 500) -> list[AuditEntry]:
        """Audit entries, newest first."""
        sql = "SELECT * FROM audit" + (" WHERE model_name = ?" if model_name else "")
        params: list[Any] = [model_name] if model_name else []
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY audit_id DESC LIMIT ?", (*params, int(limit))).fetchall()
        return [AuditEntry(r["audit_id"], r["created"], r["who"], r["model_name"], r["what"], r["old"], r["new"],
                           r["why"]) for r in rows]

    # ------------------------------------------------------------------ evaluations
    def record_evaluation(
        self,
        *,
        model_name: str,
        model_version: str,
        dataset_name: str,
        dataset_path: str,
        n_good: int,
        n_defect: int,
        metrics: dict,
        threshold_units: float,
        image_level_only: bool,
    ) -> str:
        """Store one evaluation (never overwrites an earlier one); returns its id."""
        evaluation_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]
        with self._write() as conn:
            conn.execute(
                "INSERT INTO evaluations (evaluation_id, created, model_name, model_version, dataset_name, "
                "dataset_path, n_good, n_defect, metrics, threshold_units, image_level_only) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (evaluation_id, _now(), model_name, model_version, dataset_name, dataset_path, int(n_good),
                 int(n_defect), json.dumps(metrics, default=_json_default), float(threshold_units),
                 int(bool(image_level_only))),
            )
        return evaluation_id

    def evaluations(self, model_name: str | None = None) -> list[EvaluationRecord]:
        """Stored evaluations, newest first."""
        sql = "SELECT * FROM evaluations" + (" WHERE model_name = ?" if model_name else "")
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY created DESC", [model_name] if model_name else []).fetchall()
        return [
            EvaluationRecord(
                r["evaluation_id"], r["created"], r["model_name"], r["model_version"], r["dataset_name"],
                r["dataset_path"], r["n_good"], r["n_defect"], json.loads(r["metrics"]), r["threshold_units"],
                bool(r["image_level_only"]),
            )
            for r in rows
        ]


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars/arrays and other odd values in metrics (NaN stays NaN)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def open_history(path: Path | None = None) -> tuple[HistoryStore | None, str | None]:
    """``(store, None)``, or ``(None, one-line reason)`` when the history is unavailable (callers go on)."""
    try:
        return HistoryStore(path), None
    except HistoryError as err:
        return None, str(err)
