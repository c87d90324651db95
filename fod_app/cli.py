"""Command line: ``python -m fod_app train|detect|evaluate|models`` — a thin shell over the engine.

User errors print one line to stderr and exit with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import AUGMENTATIONS, DEFAULT_PRESET, EXPOSURES, PRESETS, SCORE_MODES
from .variants import VARIANTS


class UserError(Exception):
    """An error the user can fix; printed as one line."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .archive import ArchiveError
    from .backbone import BackboneWeightsError
    from .bundle import BundleError
    from .data import DatasetError, ImageLoadError
    from .ignore_regions import IgnoreRegionsError

    return (
        UserError, BundleError, DatasetError, ImageLoadError, BackboneWeightsError, ArchiveError, IgnoreRegionsError,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fod_app", description="FOD Inspector: anomaly detection on images."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on a folder of good images (or an MVTec category)")
    train.add_argument("data", help="folder of good images, or an MVTec-layout category (uses train/good)")
    train.add_argument("--name", required=True, help="model name (stored under models/<name>)")
    train.add_argument(
        "--replace",
        "--force",
        action="store_true",
        help="replace an existing model of that name (without it, an existing name is refused before training)",
    )
    train.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    train.add_argument("--epochs", type=int, help="override the preset's budget in passes over the images")
    train.add_argument("--min-steps", type=int, help="at least this many optimisation steps (small sets)")
    train.add_argument("--max-steps", type=int, help="at most this many optimisation steps (0: no cap)")
    train.add_argument(
        "--selfcheck-every", type=int, help="self-check every N steps for early stopping (0: only at the end)"
    )
    train.add_argument(
        "--augment", choices=list(AUGMENTATIONS),
        help="flips: also train on flipped copies (only for parts whose orientation does not matter)",
    )
    train.add_argument(
        "--exposure", choices=list(EXPOSURES),
        help="even: even out each photo's brightness and contrast before the backbone (lines whose lighting drifts); "
        "auto (the cpu preset's): only when the good photos' light varies; as_taken: never",
    )
    train.add_argument(
        "--score-mode",
        choices=list(SCORE_MODES),
        help="how branches combine into the score (auto: chosen by the self-check; product: paper Eq. 12)",
    )
    train.add_argument("--batch-size", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--variant", choices=list(VARIANTS))
    train.add_argument("--backbone", help="timm model name (default: the preset's)")
    train.add_argument("--weights", help="local weights file for --backbone (.safetensors or .pth)")
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument(
        "--ignore-rect", action="append", default=[], metavar="X0,Y0,X1,Y1",
        help="ignore this rectangle (fractions of width/height, e.g. 0,0,0.2,1 = left fifth); repeatable",
    )
    train.add_argument("--ignore-mask", help="ignore the white pixels of this mask image (any size)")
    train.add_argument("--quiet", action="store_true")

    ignore = sub.add_parser("ignore", help="set or clear a trained model's ignore regions (fixtures, labels, edges)")
    ignore.add_argument("--model", required=True)
    ignore.add_argument("--rect", action="append", default=[], metavar="X0,Y0,X1,Y1",
                        help="rectangle in fractions of width/height; repeatable")
    ignore.add_argument("--mask", help="mask image: white pixels are ignored")
    ignore.add_argument("--clear", action="store_true", help="remove the model's ignore regions")

    detect = sub.add_parser("detect", help="score images with a trained model")
    detect.add_argument("--model", required=True)
    detect.add_argument("paths", nargs="+", help="image files or folders")
    detect.add_argument("--csv", help="write results to this CSV file")
    detect.add_argument("--maps", help="write heat-map overlays (PNG) to this folder")
    detect.add_argument(
        "--threshold", type=float, default=1.0, help="decision threshold in threshold units (finite, > 0)"
    )
    detect.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    detect.add_argument(
        "--db", help="inspection history database (default: $FOD_HISTORY_DB, else <models folder>/history/)"
    )
    detect.add_argument("--no-history", action="store_true", help="do not record this run in the history")
    add_engine_arguments(detect)

    evaluate = sub.add_parser(
        "evaluate", help="evaluate a model on labelled images: good/ + defect/ folders, an MVTec category, or a zip"
    )
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument(
        "data",
        help="folder with good/ (or ok/) next to defect/ (or ng/, or one folder per defect type), optional "
        "ground_truth/<folder>/<image>_mask.png masks; or an MVTec category (test/<type>, ground_truth/<type>); "
        "or a .zip of either",
    )
    evaluate.add_argument("--json", help="write the metrics to this JSON file")
    evaluate.add_argument("--csv", help="write per-image results to this CSV file")
    evaluate.add_argument("--html", help="write a self-contained HTML report to this file")
    evaluate.add_argument(
        "--threshold", type=float, default=1.0,
        help="NG threshold for the counts and files, in threshold units (default 1.0 = the calibrated one)",
    )
    evaluate.add_argument(
        "--db", help="history database for the evaluation record (default: $FOD_HISTORY_DB, else <models>/history/)"
    )
    evaluate.add_argument("--no-history", action="store_true", help="do not store this evaluation as a record")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    sub.add_parser("models", help="list trained models")
    add_deploy_parsers(sub)
    return parser


def add_engine_arguments(detect: argparse.ArgumentParser) -> None:
    """``detect --engine ray [--workers N] [--address ADDR]`` (see fod_app.batch_ray)."""
    detect.add_argument(
        "--engine", default="local", choices=["local", "ray"],
        help="local: this process; ray: Ray Data actors (a local Ray on this machine, or --address)",
    )
    detect.add_argument(
        "--workers", type=int, default=2, help="--engine ray: scoring actors (each loads the model once)"
    )
    detect.add_argument(
        "--address", help="--engine ray: join this Ray cluster (e.g. ray://head:10001 or auto) instead of a local Ray"
    )
    detect.add_argument("--batch-size", type=int, default=8, help="--engine ray: images per batch")


def add_deploy_parsers(sub: Any) -> None:
    """The ``export`` and ``serve`` subcommands (fod_app.export, fod_app.serve)."""
    export = sub.add_parser("export", help="export a model to ONNX (refused unless it matches PyTorch)")
    export.add_argument("--model", required=True)
    export.add_argument("--format", default="onnx", choices=["onnx"])
    export.add_argument("--out", required=True, help="output file (.onnx)")
    export.add_argument(
        "--images", help="folder of extra images for the parity check (needed if the training folder is gone)"
    )
    export.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])

    serve = sub.add_parser("serve", help="serve a model over HTTP (POST /inspect, GET /health, GET /model)")
    serve.add_argument("--model", required=True)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    serve.add_argument("--port", type=int, default=8600)
    serve.add_argument(
        "--token", help="bearer token clients must send (default: $FOD_API_TOKEN); required off loopback"
    )
    serve.add_argument("--max-bytes", type=int, help="largest accepted request body in bytes (default 20 MB)")
    serve.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    serve.add_argument(
        "--db", help="inspection history database (default: $FOD_HISTORY_DB, else <models folder>/history/)"
    )


def cmd_train(args: argparse.Namespace) -> int:
    import numpy as np

    from .backbone import create_feature_extractor
    from .bundle import models_dir, save_bundle, validate_name
    from .calibration import LOW_SYNTHETIC_CATCH, rule_text
    from .config import create_config
    from .data import check_enough_images, dataset_fingerprint, load_images, resolve_training_images
    from .exposure import describe as describe_exposure
    from .selfcheck import describe
    from .training import cpu_time_warning, train

    validate_name(args.name)
    existing = models_dir() / args.name
    if (existing.exists() or existing.is_symlink()) and not args.replace:
        raise UserError(
            f"A model named {args.name!r} already exists in {existing.parent}; nothing was trained. Use --replace "
            "to replace it (the old one is then deleted), or choose another --name."
        )
    config = create_config(
        args.preset,
        epochs=args.epochs,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
        selfcheck_every=args.selfcheck_every,
        score_mode=args.score_mode,
        augment=args.augment,
        exposure=args.exposure,
        batch_size=args.batch_size,
        seed=args.seed,
        variant=args.variant,
        backbone=args.backbone,
    )
    if args.weights:  # checked before any work: a file that cannot be used fails now, not after loading images
        create_feature_extractor(config.backbone, weights=args.weights, device="cpu")
    regions = _ignore_regions_from_args(args.ignore_rect, args.ignore_mask, config.image_size)
    paths = resolve_training_images(args.data)
    report = load_images(paths, config.image_size, compact=True)  # uint8: a quarter of the memory
    for name, reason in report.failures:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    check_enough_images(len(report.images))
    slow = cpu_time_warning(config, len(report.images), args.device)
    if slow:
        print(f"warning: {slow}", file=sys.stderr)
    arrays = [img for _, img in report.images]
    if all(np.array_equal(arrays[0], other) for other in arrays[1:]):
        print(
            f"warning: all {len(arrays)} training images are identical; the model cannot learn how good parts "
            "vary and will flag normal variation. Use photos of several different good parts.",
            file=sys.stderr,
        )

    def progress(p: Any) -> None:
        if args.quiet:
            return
        if p.phase == "training" and ("self-check" in p.message or p.step == p.steps):
            losses = " ".join(f"{k}={v:.3f}" for k, v in p.losses.items())
            eta = f" eta {p.eta_s:.0f}s" if p.eta_s is not None else ""
            print(f"{p.message} {losses}{eta}", file=sys.stderr)
        elif p.phase in ("features", "calibration") and p.step == 0:
            print(p.message, file=sys.stderr)

    meta = {
        "data": {
            "source": str(Path(args.data).resolve()),
            "fingerprint": dataset_fingerprint(paths),
            "n_unreadable": len(report.failures),
        }
    }
    detector = train(
        [img for _, img in report.images],
        config,
        device=args.device,
        weights=args.weights,
        progress=progress,
        metadata=meta,
        ignore_regions=regions,
    )
    if args.weights:
        detector.metadata["backbone"]["weights_path"] = str(Path(args.weights).resolve())
    from .review import log_model_saved, saved_version

    previous = saved_version(args.name) if args.replace else None
    folder = save_bundle(detector, args.name, replace=args.replace)
    log_model_saved(previous, detector.metadata, _user_name(), "retrained with `train --replace` (CLI)")
    cal = detector.calibration
    t = detector.metadata["training"]
    print(f"saved model {args.name!r} to {folder}")
    print(
        f"trained on {t['n_train']} images, calibrated on {t['n_calibration']} held-out good images"
        f"{' (then added to the memory bank)' if t.get('n_bank_images', 0) > t['n_train'] else ''} "
        f"in {t['seconds_total']:.0f}s ({t['device']}); threshold {cal.threshold:.4g} "
        f"(quantile {cal.quantile:.2f} of held-out good scores)"
    )
    how = rule_text(cal.rule, cal.quantile)
    if how:
        print(f"threshold set by {how}")
    print(f"exposure: {describe_exposure(t.get('exposure'))}")
    record = detector.metadata.get("self_check")
    if record is not None:
        message, warning = describe(record)
        print(message)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    catch = cal.synthetic_catch_rate()
    if catch is not None:
        print(f"at the threshold: {100 * catch:.0f}% of the {len(cal.synthetic_scores)} self-check synthetic defects "
              "flagged (a label-free estimate; real defects differ)")
        if catch < LOW_SYNTHETIC_CATCH:
            print("warning: the threshold lets most synthetic defects pass; many real defects may pass too "
                  "(lower it with --threshold, or recalibrate from reviewed parts)", file=sys.stderr)
    return 0


def _collect_paths(items: list[str]) -> list[Path]:
    from .data import list_images

    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(list_images(path, recursive=True))
        elif path.exists():
            paths.append(path)
        else:
            raise UserError(f"{item}: no such file or folder")
    if not paths:
        raise UserError("no images found in the given paths")
    return paths


def printable_name(name: str) -> str:
    """``name`` with bytes that are not valid UTF-8 (surrogate escapes from the file system) as ``\\xNN``."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file system decoding makes: escape it as it is
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def looks_like(result: Any) -> str:
    """The wrong-part column of ``detect``: 'training' / 'UNFAMILIAR' (with distance) / '-' (model has no check)."""
    if result.familiarity is None:
        return "-"
    return f"UNFAMILIAR {result.familiarity:.1f}x" if result.unfamiliar else "training"


def cmd_detect(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .calibration import check_threshold
    from .data import ImageLoadError, load_image, names_for, prepare_image
    from .familiarity import summary as familiarity_summary
    from .visualize import overlay, to_pil

    check_threshold(args.threshold, "--threshold")
    if getattr(args, "engine", "local") == "ray":
        return cmd_detect_ray(args)
    detector = load_bundle(args.model, device=args.device)
    size = detector.config.image_size
    paths = _collect_paths(args.paths)
    undecodable = [str(p) for p in paths if printable_name(str(p)) != str(p)]
    for name in undecodable:
        print(
            f"note: file name is not valid UTF-8; its undecodable bytes are shown as \\xNN here and in the CSV: "
            f"{printable_name(name)}",
            file=sys.stderr,
        )
    maps_dir = Path(args.maps) if args.maps else None
    if maps_dir:
        maps_dir.mkdir(parents=True, exist_ok=True)
    rows, failures, images = [], 0, {}

    def readable():
        nonlocal failures
        for path in paths:
            try:
                image = prepare_image(load_image(path), size)
            except ImageLoadError as err:
                failures += 1
                print(f"{printable_name(str(path))}: unreadable: {printable_name(str(err))}", file=sys.stderr)
                continue
            images[str(path)] = image if (maps_dir or recorder) else None
            yield str(path), image

    # heat-map file names: unique even when two inputs share a file name (parent folder prefixed)
    map_names = {str(p): Path(n.replace("/", "_")).stem + "_heatmap.png" for p, n in zip(paths, names_for(paths))}
    recorder = _HistoryRecorder.open(args, detector) if not args.no_history else None
    print(f"{'verdict':8} {'score':>7}  {'looks like':15}  file")
    for result in detector.inspect(readable(), threshold_units=args.threshold):
        print(f"{result.verdict:8} {result.score:7.3f}  {looks_like(result):15}  {printable_name(result.name)}")
        rows.append(result)
        image = images.pop(result.name)
        if maps_dir:
            out = maps_dir / map_names[result.name]
            to_pil(overlay(image, result.anomaly_map, 0.5)).save(out)
        if recorder:
            recorder.add(result, image)
    if recorder:
        recorder.flush()
        if recorder.run_id:
            print(f"recorded in the history as run {recorder.run_id} ({recorder.store.path})", file=sys.stderr)
    if args.csv:
        write_results_csv(args.csv, [(r.name, r.score, r.verdict, r.familiarity) for r in rows], args.threshold,
                          detector.metadata)
    n_ng = sum(r.verdict == "NG" for r in rows)
    print(f"{len(rows)} images: {n_ng} NG, {len(rows) - n_ng} OK/REVIEW; {failures} unreadable", file=sys.stderr)
    wrong_part = familiarity_summary([r.unfamiliar for r in rows])
    if wrong_part:
        print(f"warning: {wrong_part}", file=sys.stderr)
    return 1 if failures and not rows else 0


def _user_name() -> str | None:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


class _HistoryRecorder:
    """Records ``detect`` results in the inspection history, in chunks; a history problem is only a warning."""

    CHUNK = 32

    def __init__(self, store: Any, detector: Any, args: argparse.Namespace) -> None:
        self.store, self.detector, self.args = store, detector, args
        self.run_id: str | None = None
        self.pending: list[Any] = []

    @classmethod
    def open(cls, args: argparse.Namespace, detector: Any) -> _HistoryRecorder | None:
        from .history import HistoryError, HistoryStore

        try:
            return cls(HistoryStore(Path(args.db) if args.db else None), detector, args)
        except HistoryError as err:
            print(f"warning: this run is not recorded in the history: {err}", file=sys.stderr)
            return None

    def add(self, result: Any, image: Any) -> None:
        from .records import image_record, sha256_file

        self.pending.append(
            image_record(result, image, sha256_file(result.name), file_name=printable_name(result.name))
        )
        if len(self.pending) >= self.CHUNK:
            self.flush()

    def flush(self) -> None:
        from .history import HistoryError
        from .records import model_identity

        if not self.pending or self.store is None:
            return
        cal = self.detector.calibration
        try:
            if self.run_id is None:
                self.run_id = self.store.record_run(
                    source="cli", **model_identity(self.detector.metadata), threshold=cal.threshold,
                    review_threshold=None if cal.review_threshold is None else cal.review_threshold / cal.threshold,
                    images=self.pending, threshold_units=self.args.threshold, user=_user_name(),
                )
            else:
                self.store.add_images(self.run_id, self.pending)
        except HistoryError as err:
            print(f"warning: the history could not be written: {err}", file=sys.stderr)
            self.store = None
        self.pending = []


def cmd_evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from .archive import extract_images_from_zip
    from .bundle import load_bundle
    from .calibration import check_threshold
    from .evaluation_data import load_labelled_set

    threshold = check_threshold(args.threshold, "--threshold")
    detector = load_bundle(args.model, device=args.device)
    data = Path(args.data)
    if data.is_file() and data.suffix.lower() == ".zip":
        with tempfile.TemporaryDirectory(prefix="fod-evaluate-") as folder:
            unpacked = extract_images_from_zip(data, folder, keep_structure=True, name=data.name)
            for name, reason in unpacked.skipped:
                print(f"skipped {name}: {reason}", file=sys.stderr)
            return _evaluate_set(args, detector, load_labelled_set(folder), str(data.resolve()), threshold)
    if not data.is_dir():
        raise UserError(f"{args.data}: no such folder or .zip file")
    return _evaluate_set(args, detector, load_labelled_set(data), str(data.resolve()), threshold)


def _evaluate_set(args: argparse.Namespace, detector: Any, dataset: Any, source: str, threshold: float) -> int:
    """Score ``dataset``, print the metrics, write the requested files and store the evaluation record."""
    from .evaluation import evaluate_detector
    from .evaluation_report import evaluation_csv, evaluation_html, evaluation_summary

    report = evaluate_detector(detector, dataset, dataset_path=source)
    version = str(detector.metadata.get("model_version", "?"))
    for name, reason in report.failures:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    r = report.result
    at = report.at_threshold(threshold)
    shown = f"{threshold:g}" if threshold != 1.0 else "1.0"
    if r.n_good and r.n_defective:
        if report.image_level_only:
            print(f"image AUROC {r.image_auroc:.4f}  F1-max {r.f1_max:.4f}  (image level only: no defect masks, "
                  "so no pixel AUROC or AUPRO)")
        else:
            print(
                f"image AUROC {r.image_auroc:.4f}  pixel AUROC {_metric(r.pixel_auroc)}  AUPRO(0.3) "
                f"{_metric(r.aupro)}  F1-max {r.f1_max:.4f}"
            )
            if report.n_defect_with_mask < r.n_defective:
                print(f"  pixel metrics from the {report.n_defect_with_mask} of {r.n_defective} defective images "
                      "that have a mask")
        for defect, value in r.per_type_image_auroc.items():
            print(f"  {defect:20s} image AUROC {value:.4f}")
        branches = "  ".join(f"{name} {_metric(value)}" for name, value in report.branch_auroc.items())
        if branches:
            print(f"image AUROC per branch: {branches}")
    else:
        only = "good" if r.n_good else "defective"
        print(
            f"image AUROC, pixel AUROC, AUPRO and F1-max need both good and defective test images; this set has "
            f"only {only} ones, so they are not reported"
        )
    if r.n_good:
        print(
            f"at the threshold ({shown}): {at['good_rejected']} of {r.n_good} good images rejected "
            f"(false-reject rate {100 * at['false_reject_rate']:.1f}%)"
        )
    if r.n_defective:
        print(
            f"at the threshold ({shown}): {at['defective_detected']} of {r.n_defective} defective images detected "
            f"(detection rate {100 * at['detection_rate']:.1f}%)"
        )
    print(f"{r.n_good} good, {r.n_defective} defective, {report.seconds:.1f}s ({report.speed_text()})")
    if args.json:
        summary = evaluation_summary(report, threshold, args.model, version)
        metrics = {**report.to_dict(), "data": source, "dataset": summary["dataset"], "threshold": threshold,
                   "at_evaluate_threshold": summary["at_evaluate_threshold"]}
        Path(args.json).write_text(json.dumps(metrics, indent=1, allow_nan=False), encoding="utf-8")
    if args.csv:
        Path(args.csv).write_text(evaluation_csv(report, threshold, args.model, version), encoding="utf-8")
    if args.html:
        Path(args.html).write_text(evaluation_html(report, threshold, args.model, version), encoding="utf-8")
    if not args.no_history:
        _record_evaluation(args, report, version, threshold, source)
    return 0


def _record_evaluation(args: argparse.Namespace, report: Any, version: str, threshold: float, source: str) -> None:
    """Store the evaluation as a new record (earlier ones are kept); a history problem is only a warning."""
    from .evaluation_records import save_evaluation
    from .history import HistoryError

    try:
        record_id = save_evaluation(report, args.model, version, threshold, dataset_path=source,
                                    history=Path(args.db) if args.db else None)
    except HistoryError as err:
        print(f"warning: this evaluation is not recorded in the history: {err}", file=sys.stderr)
    else:
        print(f"recorded as evaluation {record_id}", file=sys.stderr)


def _metric(value: float) -> str:
    return "n/a" if value != value else f"{value:.4f}"  # nan: e.g. pixel metrics with only empty masks


def cmd_models(_args: argparse.Namespace) -> int:
    from .bundle import list_bundles, models_dir
    from .evaluation_records import latest_image_auroc

    bundles = list_bundles()
    if not bundles:
        print(f"no models in {models_dir()}")
        return 0
    for info in bundles:
        if info.error:
            print(f"{info.name:24s} UNREADABLE: {info.error}")
            continue
        m = info.metadata or {}
        cfg = m.get("config", {})
        auroc = latest_image_auroc(info.name, m)
        print(
            f"{info.name:24s} {m.get('created', '?'):25s} preset={cfg.get('preset')} backbone={cfg.get('backbone')} "
            f"threshold={m.get('calibration', {}).get('threshold', float('nan')):.4g}"
            + (f" image_auroc={auroc:.4f}" if isinstance(auroc, float) else "")
        )
    return 0


def _ignore_regions_from_args(rects: list[str], mask: str | None, size: int) -> Any:
    """``--ignore-rect``/``--ignore-mask`` (or ``--rect``/``--mask``) -> ``IgnoreRegions`` or None."""
    from .ignore_regions import create_ignore_regions

    mask_bytes = None
    if mask:
        try:
            mask_bytes = Path(mask).read_bytes()
        except OSError as err:
            raise UserError(f"cannot read the mask image {mask}: {err.strerror or err}") from None
    return create_ignore_regions(";".join(rects), mask_bytes, size)


def cmd_ignore(args: argparse.Namespace) -> int:
    from .bundle import read_metadata, set_ignore_regions
    from .config import FODConfig
    from .review import log_model_saved

    who = os.environ.get("USER") or "cli"  # audit log: who changed the model
    previous = read_metadata(args.model)
    size = FODConfig.from_dict(previous["config"]).image_size
    if args.clear:
        if args.rect or args.mask:
            raise UserError("--clear cannot be combined with --rect or --mask")
        log_model_saved(previous, set_ignore_regions(args.model, None), who, "ignore regions cleared (CLI)")
        print(f"model {args.model!r}: ignore regions cleared; every pixel counts again")
        return 0
    regions = _ignore_regions_from_args(args.rect, args.mask, size)
    if regions is None:
        raise UserError("nothing to ignore: give --rect and/or --mask (with white pixels), or --clear")
    log_model_saved(previous, set_ignore_regions(args.model, regions), who, "ignore regions set (CLI)")
    print(
        f"model {args.model!r}: {regions.ignored_fraction(size):.1%} of the image is now ignored. The threshold is "
        "kept from training (conservative: no more false rejects than before); retrain with --ignore-rect/"
        "--ignore-mask to calibrate with the regions."
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .export import export_onnx, folder_images

    detector = load_bundle(args.model, device="cpu")
    extra = folder_images(args.images, detector.config.image_size) if args.images else None
    if args.images and not extra:
        raise UserError(f"{args.images}: no readable images for the parity check")
    print(f"exporting {args.model!r} to ONNX ({args.exporter} exporter) and checking parity...", file=sys.stderr)
    result = export_onnx(detector, args.out, images=extra, exporter=args.exporter)
    print(result.parity.describe(), file=sys.stderr)
    print(f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB) in {result.seconds:.0f}s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import run_server

    return run_server(
        args.model, host=args.host, port=args.port, token=args.token, max_bytes=args.max_bytes,
        device=args.device, db=args.db,
    )


def write_results_csv(
    path: str, rows: list[tuple[str, float, str, float | None]], threshold: float, meta: dict[str, Any]
) -> None:
    """The ``detect`` CSV for (name, score, verdict, familiarity) rows: file, score, verdict, threshold, model,
    model_version, unfamiliar, familiarity (the last two empty when the model has no wrong-part check)."""
    from .familiarity import is_unfamiliar
    from .report import _csv_safe

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["file", "score", "verdict", "threshold", "model", "model_version", "unfamiliar", "familiarity"]
        )
        for name, score, verdict, familiarity in rows:
            writer.writerow([
                _csv_safe(printable_name(name)), f"{score:.4f}", verdict, threshold, meta.get("name"),
                meta.get("model_version"),
                "" if familiarity is None else str(is_unfamiliar(familiarity)).lower(),
                "" if familiarity is None else f"{familiarity:.3f}",
            ])


def cmd_detect_ray(args: argparse.Namespace) -> int:
    from .batch_ray import detect_with_ray

    paths = _collect_paths(args.paths)
    return detect_with_ray(args, paths)


COMMANDS = {"train": cmd_train, "detect": cmd_detect, "evaluate": cmd_evaluate, "models": cmd_models,
            "export": cmd_export, "serve": cmd_serve, "ignore": cmd_ignore}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .bundle import check_models_dir, recover_interrupted_saves

        # before any work: a models folder that is a file (or read-only, for train) fails now, not after training
        root = check_models_dir(writable=args.command in ("train", "ignore"))
        for message in recover_interrupted_saves(root):
            print(f"note: {message}", file=sys.stderr)
        return COMMANDS[args.command](args)
    except _user_error_types() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was saved", file=sys.stderr)
        return 130
