"""Batch scoring on Ray Data: ``python -m fod_app detect --model NAME SRC --engine ray [--workers N] [--address]``.

The driver lists the images and hashes their content; images whose hash the inspection history already holds
for this model version are not scored again (a rerun after a crash resumes). The rest flow through a Ray Data
pipeline: ``map_batches`` with an actor class (:class:`BatchScorer`) that loads the model once per actor and
scores whole batches; Ray Data's streaming executor bounds the batches in flight (back-pressure), so memory stays
flat however large the folder. The driver consumes results as they come, prints progress, records them in the
history (``source="ray"``) in chunks and finally writes the same CSV as the local path.

Default: a local Ray started on this machine (``ray.init(num_cpus=..., include_dashboard=False)``, loopback
only). ``--address`` joins an existing cluster (``ray://head:10001`` through Ray Client, or ``auto``); its
workers need this package, its dependencies and the models folder (shared storage) at the same path.
No Streamlit here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

#: Images handed to an actor at once (the local path's batch size too).
DEFAULT_BATCH = 8
#: History rows written per transaction.
RECORD_CHUNK = 64


class BatchScorer:
    """Ray Data actor: loads the model once, then scores batches of image paths.

    ``__call__`` takes a batch ``{"path": (n,), "sha256": (n,)}`` and returns per image: score and raw score,
    verdict, error (empty when scored) and the model-input thumbnail, heat-map overlay and map as PNG bytes.
    """

    def __init__(self, model_name: str, models_dir: str, threshold_units: float, device: str = "cpu",
                 threads: int = 1) -> None:
        import torch

        from .bundle import load_bundle

        torch.set_num_threads(max(1, threads))
        self.detector = load_bundle(model_name, root=Path(models_dir), device=device)
        self.threshold_units = threshold_units

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .data import ImageLoadError, load_image, prepare_image
        from .records import encode_map_png, png_bytes
        from .visualize import overlay

        size = self.detector.config.image_size
        paths = [str(p) for p in batch["path"]]
        n = len(paths)
        out: dict[str, list[Any]] = {
            "score": [np.nan] * n, "raw_score": [np.nan] * n, "familiarity": [np.nan] * n, "verdict": [""] * n,
            "error": [""] * n,
            "thumbnail_png": [b""] * n, "heatmap_png": [b""] * n, "map_png": [b""] * n,
        }
        images, positions = [], []
        for i, path in enumerate(paths):
            try:
                images.append((path, prepare_image(load_image(path), size)))
                positions.append(i)
            except ImageLoadError as err:
                out["error"][i] = str(err)
        results = self.detector.inspect(images, batch_size=max(1, len(images)), threshold_units=self.threshold_units)
        for i, (result, (_, image)) in zip(positions, zip(results, images)):
            out["score"][i], out["raw_score"][i], out["verdict"][i] = result.score, result.raw_score, result.verdict
            out["familiarity"][i] = np.nan if result.familiarity is None else result.familiarity  # wrong-part check
            out["thumbnail_png"][i] = png_bytes(image)
            out["heatmap_png"][i] = png_bytes(overlay(image, result.anomaly_map, 0.5))
            out["map_png"][i] = encode_map_png(result.anomaly_map)
        columns = {"path": np.asarray(paths, dtype=object), "sha256": np.asarray(batch["sha256"], dtype=object)}
        for key, values in out.items():
            numeric = key in ("score", "raw_score", "familiarity")
            columns[key] = np.asarray(values, dtype=np.float64 if numeric else object)
        return columns


@dataclass
class Row:
    """One input image's outcome (scored now, taken from the history, or unreadable)."""

    path: str
    sha256: str
    score: float | None = None
    verdict: str = ""
    error: str = ""
    from_history: bool = False
    familiarity: float | None = None  # wrong-part distance (1.0 = the limit); None: not checked


class StoredScore(NamedTuple):
    """What the history holds of an image a model version already scored."""

    score: float  # threshold units
    raw_score: float | None
    familiarity: float | None  # wrong-part distance (1.0 = the limit); None: not checked or not recorded


def scored_in_history(store: Any, model_name: str, model_version: str) -> dict[str, StoredScore]:
    """content hash -> score, raw score and wrong-part figure of images this model version already scored."""
    known: dict[str, StoredScore] = {}
    for summary in store.runs(model_name=model_name, limit=1_000_000):
        if summary.model_version != model_version:
            continue
        for image in store.run(summary.run_id).images:
            familiarity = image.extra.get("familiarity")
            known.setdefault(image.content_sha256, StoredScore(
                image.score, image.raw_score, None if familiarity is None else float(familiarity)))
    return known


def start_ray(workers: int, address: str | None) -> bool:
    """Connect to ``address`` or start a local Ray (loopback, no dashboard); True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                         os.environ.get("PYTHONPATH")]))}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=max(workers, 1), include_dashboard=False, log_to_driver=False, runtime_env=env,
                 configure_logging=False)
    return True


def score_with_ray(
    paths: list[Path],
    model_name: str,
    models_dir: Path,
    *,
    threshold_units: float = 1.0,
    workers: int = 2,
    batch_size: int = DEFAULT_BATCH,
    device: str = "cpu",
    skip: dict[str, StoredScore] | None = None,
    on_batch: Any = None,
    hashes: list[str] | None = None,
) -> list[Row]:
    """Score ``paths`` on Ray (already started); ``skip`` hashes are not scored. ``on_batch(columns)`` gets every
    result batch as it arrives (for history and progress). Returns one ``Row`` per path, input order."""
    import ray.data

    from .records import sha256_file

    hashes = hashes or [sha256_file(p) for p in paths]
    rows = [Row(str(p), h) for p, h in zip(paths, hashes)]
    todo = [{"path": str(p), "sha256": h} for p, h in zip(paths, hashes) if not (skip and h in skip)]
    by_path = {row.path: row for row in rows}
    if todo:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        dataset = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo) // batch_size, 200)))
        scored = dataset.map_batches(
            BatchScorer,
            fn_constructor_kwargs={"model_name": model_name, "models_dir": str(models_dir),
                                   "threshold_units": threshold_units, "device": device},
            batch_size=batch_size,
            batch_format="numpy",
            # a fixed pool; at most 2 batches queued per actor: back-pressure on the block stream
            compute=ray.data.ActorPoolStrategy(size=max(1, workers), max_tasks_in_flight_per_actor=2),
            num_cpus=1,
            num_gpus=1 if device == "cuda" else 0,
        )
        for columns in scored.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1):
            for i, path in enumerate(columns["path"]):
                row = by_path[str(path)]
                row.error = str(columns["error"][i])
                if not row.error:
                    row.score, row.verdict = float(columns["score"][i]), str(columns["verdict"][i])
                    familiarity = float(columns["familiarity"][i])
                    row.familiarity = familiarity if np.isfinite(familiarity) else None
            if on_batch is not None:
                on_batch(columns)
    return rows


def detect_with_ray(args: argparse.Namespace, paths: list[Path]) -> int:
    """The ``detect --engine ray`` command: score, record, print, write the CSV. Exit code as the local path."""
    import ray

    from .bundle import models_dir, read_metadata
    from .calibration import Calibration, verdict
    from .cli import UserError, _user_name, printable_name, write_results_csv
    from .history import HistoryError, HistoryStore, ImageRecord
    from .records import familiarity_extra, model_identity, sha256_file

    if args.workers < 1:
        raise UserError("--workers must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    root = models_dir()
    meta = read_metadata(args.model, root)
    identity = model_identity(meta)
    calibration = Calibration.from_dict(meta["calibration"])
    review = None if calibration.review_threshold is None else calibration.review_threshold / calibration.threshold
    store = None
    if not args.no_history:
        try:
            store = HistoryStore(Path(args.db) if args.db else None)
        except HistoryError as err:
            print(f"warning: this run is not recorded in the history: {err}", file=sys.stderr)
    skip = scored_in_history(store, identity["model_name"], identity["model_version"]) if store else {}
    device = "cuda" if args.device == "cuda" else "cpu"
    if args.device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    maps_dir = Path(args.maps) if args.maps else None
    if maps_dir:
        maps_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    run_id: str | None = None
    pending: list[ImageRecord] = []
    done = 0
    hashes = [sha256_file(p) for p in paths]
    total_new = sum(h not in skip for h in hashes)
    if total_new:
        where = f"cluster {args.address}" if args.address else "local"
        print(f"starting Ray ({where}, {args.workers} workers)...", file=sys.stderr)
    we_started = start_ray(args.workers, args.address) if total_new else False

    def flush() -> None:
        nonlocal run_id, pending, store
        if not pending or store is None:
            pending = []
            return
        try:
            if run_id is None:
                run_id = store.record_run(source="ray", **identity, threshold=calibration.threshold,
                                          review_threshold=review, images=pending, user=_user_name(),
                                          threshold_units=args.threshold)
            else:
                store.add_images(run_id, pending)
        except HistoryError as err:
            print(f"warning: the history could not be written: {err}", file=sys.stderr)
            store = None
        pending = []

    def on_batch(columns: dict[str, np.ndarray]) -> None:
        nonlocal done
        for i, path in enumerate(columns["path"]):
            done += 1
            error = str(columns["error"][i])
            if error:
                print(f"{printable_name(str(path))}: unreadable: {printable_name(error)}", file=sys.stderr)
                continue
            pending.append(ImageRecord(
                file_name=printable_name(str(path)), content_sha256=str(columns["sha256"][i]),
                score=float(columns["score"][i]), verdict=str(columns["verdict"][i]),
                raw_score=float(columns["raw_score"][i]), thumbnail_png=columns["thumbnail_png"][i] or None,
                heatmap_png=columns["heatmap_png"][i] or None, map_png=columns["map_png"][i] or None,
                extra={"engine": "ray", **familiarity_extra(float(columns["familiarity"][i]))},
            ))
            if maps_dir:
                (maps_dir / (Path(str(path)).stem + "_heatmap.png")).write_bytes(columns["heatmap_png"][i])
        if len(pending) >= RECORD_CHUNK:
            flush()
        elapsed = time.perf_counter() - started
        print(f"scored {done}/{total_new} ({done / max(elapsed, 1e-9):.1f} images/s)", file=sys.stderr)

    try:
        if len(hashes) - total_new:
            print(f"{len(hashes) - total_new} of {len(hashes)} images were already scored by this model version "
                  f"(history); scoring the other {total_new}", file=sys.stderr)
        rows = score_with_ray(paths, args.model, root, threshold_units=args.threshold, workers=args.workers,
                              batch_size=args.batch_size, device=device, skip=skip, on_batch=on_batch,
                              hashes=hashes)
        flush()
    finally:
        if we_started:
            ray.shutdown()
    skipped = 0
    for row in rows:
        if row.score is None and not row.error and row.sha256 in skip:
            stored = skip[row.sha256]
            row.score, row.familiarity, row.from_history = stored.score, stored.familiarity, True
            row.verdict = verdict(row.score, args.threshold, review)
            skipped += 1
    print(f"{'verdict':8} {'score':>7}  file")
    scored = [row for row in rows if row.score is not None]
    for row in scored:
        note = "  (from history)" if row.from_history else ""
        print(f"{row.verdict:8} {row.score:7.3f}  {printable_name(row.path)}{note}")
    if args.csv:
        write_results_csv(args.csv, [(row.path, row.score, row.verdict, row.familiarity) for row in scored],
                          args.threshold, meta)
    failures = sum(bool(row.error) for row in rows)
    n_ng = sum(row.verdict == "NG" for row in scored)
    if run_id:
        print(f"recorded in the history as run {run_id}", file=sys.stderr)
    print(f"{len(scored)} images: {n_ng} NG, {len(scored) - n_ng} OK/REVIEW; {failures} unreadable; "
          f"{skipped} already scored (taken from the history); {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 1 if failures and not scored else 0
