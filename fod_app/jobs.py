"""Process-wide background training jobs for the web app (no Streamlit here).

One training runs at a time per server process. A page calls :func:`get_job_manager` and
``start(spec)``; a worker thread loads the images, calls :func:`fod_app.training.train` and
:func:`fod_app.bundle.save_bundle`, and records progress in the :class:`Job`. Pages poll the job
(e.g. from an ``st.fragment(run_every=...)``); the worker never touches Streamlit.

* A second ``start`` while a job is queued or running raises :class:`BusyError` with a message that
  can be shown to the user as it is.
* ``Job.cancel()`` stops training at the next step; a cancelled job never leaves a bundle.
* Failures keep a one-paragraph message for the user in ``Job.error``; the traceback goes to the log.
* ``$FOD_DEMO_EPOCHS`` (int) overrides the epoch budget of every job (browser tests keep training short).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .calibration import Calibration
from .config import DEFAULT_PRESET, FODConfig, create_config

log = logging.getLogger(__name__)

DEMO_EPOCHS_ENV = "FOD_DEMO_EPOCHS"
#: Most loss-history points kept per job; older points are thinned (every other one dropped).
MAX_HISTORY = 4000

#: The ETA uses the pace of the last this-many training steps (a self-check runs every 50 steps in the cpu preset,
#: so the window includes its cost).
ETA_WINDOW_STEPS = 50
#: Fewest measured steps before an ETA is given at all.
ETA_MIN_STEPS = 3

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ACTIVE_STATES = (QUEUED, RUNNING)

#: Share of the overall progress bar given to each phase (start, width); training dominates.
_PHASE_SPAN = {
    "queued": (0.0, 0.0),
    "loading": (0.0, 0.05),
    "features": (0.05, 0.10),
    "reference": (0.15, 0.0),
    "training": (0.15, 0.80),
    "calibration": (0.95, 0.0),
    "saving": (0.97, 0.0),
    "done": (1.0, 0.0),
}

#: Plain-language text per phase, for people who do not know the training internals.
PHASE_TEXT = {
    "queued": "Waiting to start",
    "loading": "Reading the good images",
    "features": "Looking at each good image with the pre-trained network",
    "reference": "Building the reference picture of a good part",
    "training": "Learning what good parts look like",
    "calibration": "Setting the threshold from good images held back from training",
    "saving": "Saving the model",
    "done": "Finished",
}


class BusyError(RuntimeError):
    """Another training job is running; the message is ready to show to the user."""


class JobError(RuntimeError):
    """A training job could not be started (bad settings); the message is ready to show."""


@dataclass
class TrainingSpec:
    """What to train. ``sources`` are image paths or ``(name, bytes)`` pairs (uploads copied to memory)."""

    name: str
    sources: list[Any]
    preset: str = DEFAULT_PRESET
    epochs: int | None = None
    backbone: str | None = None
    seed: int | None = None
    owner: str = ""
    source_label: str = ""
    device: str | None = None
    weights: str | None = None
    augment: str | None = None
    exposure: str | None = None

    def build_config(self) -> FODConfig:
        """The config this spec trains with (``$FOD_DEMO_EPOCHS`` wins over ``epochs``)."""
        overrides: dict[str, Any] = dict(
            epochs=effective_epochs(self.epochs), backbone=self.backbone, seed=self.seed, augment=self.augment,
            exposure=self.exposure,
        )
        if demo_epochs() is not None:  # a demo/test server: the epoch count is the whole budget, one self-check
            overrides.update(min_steps=0, selfcheck_every=0)
        return create_config(self.preset, **overrides)


def demo_epochs() -> int | None:
    """``$FOD_DEMO_EPOCHS`` as a positive int, or None when unset/invalid."""
    raw = os.environ.get(DEMO_EPOCHS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", DEMO_EPOCHS_ENV, raw)
        return None
    return value if value >= 1 else None


def effective_epochs(requested: int | None) -> int | None:
    """The epoch budget actually used: ``$FOD_DEMO_EPOCHS`` if set, else ``requested``."""
    override = demo_epochs()
    return override if override is not None else requested


@dataclass
class JobResult:
    """What a finished job produced: the saved model and its calibration summary (threshold units).

    ``self_check`` is the model's label-free self-check record (``fod_app.selfcheck``), None if none was recorded.
    """

    model_name: str
    model_path: str
    threshold: float
    quantile: float
    expected_false_reject_rate: float
    observed_false_reject_rate: float
    good_scores: list[float]
    n_images: int
    n_train: int
    n_calibration: int
    seconds: float
    device: str
    failures: list[tuple[str, str]] = field(default_factory=list)
    self_check: dict[str, Any] | None = None
    synthetic_scores: list[float] = field(default_factory=list)  # self-check synthetic defects, threshold units
    synthetic_catch_rate: float | None = None  # share of them at or above the threshold (None: none recorded)
    n_bank_images: int = 0  # images in the memory bank of good patches (all of them when held-out images join it)
    threshold_rule: str = ""  # how the threshold was set (``calibration.THRESHOLD_RULES``; "" for older models)

    @classmethod
    def from_metadata(
        cls, meta: dict[str, Any], model_path: str = "", failures: list[tuple[str, str]] | None = None
    ) -> JobResult:
        """The calibration summary of any saved model, from its bundle metadata (threshold units).

        The same summary the training job shows, so the Models page can show it for every model any time later.
        """
        import numpy as np

        calibration = meta.get("calibration") or {}
        training = meta.get("training") or {}
        threshold = float(calibration.get("threshold", 1.0))
        quantile = float(calibration.get("quantile", 0.99))
        units = [float(s) / threshold for s in calibration.get("good_scores", [])]
        recorded = Calibration.from_dict(calibration) if calibration else None
        return cls(
            model_name=str(meta.get("name", "")),
            model_path=model_path,
            threshold=threshold,
            quantile=quantile,
            expected_false_reject_rate=1.0 - quantile,
            observed_false_reject_rate=float(np.mean(np.asarray(units) >= 1.0)) if units else 0.0,
            good_scores=units,
            n_images=int(training.get("n_images", 0)),
            n_train=int(training.get("n_train", 0)),
            n_calibration=int(training.get("n_calibration", len(units))),
            seconds=float(training.get("seconds_total", 0.0)),
            device=str(training.get("device", "?")),
            failures=list(failures or []),
            self_check=meta.get("self_check"),
            synthetic_scores=[float(s) / threshold for s in calibration.get("synthetic_scores") or []],
            synthetic_catch_rate=recorded.synthetic_catch_rate() if recorded else None,
            n_bank_images=int(training.get("n_bank_images", training.get("n_train", 0))),
            threshold_rule=recorded.rule if recorded else "",
        )


@dataclass
class HistoryPoint:
    step: int
    epoch: int
    losses: dict[str, float]


class Job:
    """One training run. All attributes are safe to read from any thread via the properties."""

    def __init__(self, spec: TrainingSpec, config: FODConfig) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.spec = spec
        self.config = config
        self.owner = spec.owner
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._lock = threading.Lock()
        self._state = QUEUED
        self._phase = "queued"
        self._progress: Any = None
        self._history: list[HistoryPoint] = []
        self._history_stride = 1
        self._epoch = (0, config.epochs)
        self._error: str | None = None
        self._result: JobResult | None = None
        self._failures: list[tuple[str, str]] = []
        self._step_times: list[tuple[float, int]] = []  # (time.time(), step) of recent training steps
        self._cancelled_by: str | None = None
        self._finished = threading.Event()
        self.thread: threading.Thread | None = None
        from .training import CancelToken

        self.cancel_token = CancelToken()

    # ---------------------------------------------------------------- read side
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def phase(self) -> str:
        with self._lock:
            return self._phase

    @property
    def phase_text(self) -> str:
        return PHASE_TEXT.get(self.phase, self.phase)

    @property
    def progress(self) -> Any:
        """The latest :class:`fod_app.training.Progress` (None before the first report)."""
        with self._lock:
            return self._progress

    @property
    def error(self) -> str | None:
        with self._lock:
            return self._error

    @property
    def result(self) -> JobResult | None:
        with self._lock:
            return self._result

    @property
    def failures(self) -> list[tuple[str, str]]:
        """Files that could not be read (left out of training)."""
        with self._lock:
            return list(self._failures)

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_token.cancelled

    def history(self) -> list[HistoryPoint]:
        """Per-step loss terms so far (thinned evenly to at most MAX_HISTORY points)."""
        with self._lock:
            return list(self._history)

    @property
    def fraction(self) -> float:
        """Overall progress 0..1 across all phases."""
        with self._lock:
            if self._state == DONE:
                return 1.0
            start, width = _PHASE_SPAN.get(self._phase, (0.0, 0.0))
            inner = getattr(self._progress, "fraction", 0.0) if self._progress is not None else 0.0
            if self._progress is not None and getattr(self._progress, "phase", None) != self._phase:
                inner = 0.0
            return max(0.0, min(1.0, start + width * float(inner or 0.0)))

    @property
    def epoch(self) -> tuple[int, int]:
        """(current epoch, epochs) of the learning step; (0, epochs) before it starts."""
        with self._lock:
            return self._epoch

    @property
    def pace_s(self) -> tuple[float, int] | None:
        """(seconds per training step, steps measured) over the last ``ETA_WINDOW_STEPS`` steps; None before
        ``ETA_MIN_STEPS`` steps. Measured wall time between step reports, so self-checks and a busy machine count."""
        with self._lock:
            samples = list(self._step_times)
        if len(samples) < ETA_MIN_STEPS:
            return None
        (t0, s0), (t1, s1) = samples[0], samples[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return (t1 - t0) / (s1 - s0), s1 - s0

    @property
    def eta_s(self) -> float | None:
        """Seconds left in the learning step: remaining steps x the measured recent pace (None when unknown).

        Recomputed on every read, so it follows the machine's load. The self-check may stop training earlier.
        """
        progress, pace = self.progress, self.pace_s
        if progress is None or self.phase != "training" or pace is None:
            return None
        with self._lock:
            last_time = self._step_times[-1][0] if self._step_times else time.time()
        remaining = max(0, int(progress.steps) - int(progress.step))
        return max(0.0, pace[0] * remaining - (time.time() - last_time))

    def eta_note(self) -> str:
        """What the time-left figure assumes, in plain words."""
        progress, pace = self.progress, self.pace_s
        if self.phase in ("queued", "loading", "features", "reference"):
            return (
                "Time left is estimated once the learning step has run a few steps: it is measured on this "
                "machine, not guessed in advance."
            )
        if self.phase != "training" or progress is None or pace is None:
            return ""
        seconds, measured = pace
        remaining = max(0, int(progress.steps) - int(progress.step))
        every = self.config.selfcheck_interval(int(progress.steps))  # 0: one self-check, at the end
        early = " Training may stop earlier when the self-check stops improving." if every else ""
        included = "self-checks included" if every else "the self-check at the end comes on top"
        if every and int(progress.step) <= every:
            included = f"the first self-check, at step {every}, is not measured yet, so this is on the low side"
        return (
            f"Assumes the remaining {remaining} of {progress.steps} learning steps run at the pace of the last "
            f"{measured} ({seconds:.2f} s per step; {included}) and that the machine stays as busy as "
            f"now; a few seconds for setting the threshold and saving come on top.{early}"
        )

    @property
    def elapsed_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.time()) - self.started_at

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (done, failed or cancelled); False on timeout."""
        return self._finished.wait(timeout)

    def started_clock(self) -> str:
        """Local HH:MM the job was started."""
        return datetime.fromtimestamp(self.started_at or self.created_at).strftime("%H:%M")

    # ---------------------------------------------------------------- control
    def cancel(self, by: str | None = None) -> None:
        """Ask the worker to stop; training ends at its next step and nothing is saved.

        ``by`` is the session id that asked (the owner, or another session after a confirmation).
        """
        with self._lock:
            if self._cancelled_by is None:
                self._cancelled_by = by or ""
        self.cancel_token.cancel()

    @property
    def cancelled_by(self) -> str | None:
        """Session id that asked to cancel ('' when unknown); None when nobody did."""
        with self._lock:
            return self._cancelled_by

    def owned_by(self, session: str | None) -> bool:
        """True when ``session`` started this job."""
        return bool(session) and session == self.owner

    # ---------------------------------------------------------------- worker side
    def _set(self, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self, f"_{key}", value)

    def _report(self, progress: Any) -> None:
        with self._lock:
            self._progress = progress
            if self._phase not in ("saving",):
                self._phase = progress.phase if progress.phase != "done" else "saving"
            if progress.phase == "training":
                self._epoch = (progress.epoch, progress.epochs)
                if progress.step:
                    self._step_times.append((time.time(), int(progress.step)))
                    if len(self._step_times) > ETA_WINDOW_STEPS + 1:
                        del self._step_times[0]
            if progress.phase == "training" and progress.losses:
                if progress.step % self._history_stride == 0:
                    self._history.append(HistoryPoint(progress.step, progress.epoch, dict(progress.losses)))
                    if len(self._history) > MAX_HISTORY:
                        self._history = self._history[::2]
                        self._history_stride *= 2


class TrainingJobManager:
    """Runs at most one training job at a time in a background thread; keeps the recent jobs."""

    def __init__(self, keep: int = 20) -> None:
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._keep = keep

    def start(self, spec: TrainingSpec) -> Job:
        """Start training ``spec`` in the background; raises BusyError / JobError (clear messages)."""
        from .bundle import BundleError, check_models_dir, validate_name
        from .data import MIN_TRAIN_IMAGES

        try:
            validate_name(spec.name)
            check_models_dir(writable=True)  # before any work, not after the whole training run
        except BundleError as err:
            raise JobError(str(err)) from err
        if len(spec.sources) < MIN_TRAIN_IMAGES:
            raise JobError(
                f"Need at least {MIN_TRAIN_IMAGES} good images to train; got {len(spec.sources)}. "
                "Add more photos of defect-free parts."
            )
        try:
            config = spec.build_config()
        except ValueError as err:
            raise JobError(f"Invalid training settings: {err}") from err
        with self._lock:
            running = self.active()
            if running is not None:
                raise BusyError(busy_message(running, spec.owner))
            job = Job(spec, config)
            self._jobs[job.id] = job
            self._prune()
            thread = threading.Thread(target=self._run, args=(job,), name=f"fod-train-{job.id}", daemon=True)
            job.thread = thread
            thread.start()
        return job

    def active(self) -> Job | None:
        """The queued or running job, if any."""
        return next((j for j in self.jobs() if j.active), None)

    def get(self, job_id: str | None) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id) if job_id else None

    def latest(self, owner: str | None = None) -> Job | None:
        """The most recently started job (of ``owner``, when given)."""
        jobs = [j for j in self.jobs() if owner is None or j.owner == owner]
        return jobs[-1] if jobs else None

    def jobs(self) -> list[Job]:
        """All remembered jobs, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def _prune(self) -> None:
        finished = [j for j in self.jobs() if not j.active]
        for job in finished[: max(0, len(self._jobs) - self._keep)]:
            self._jobs.pop(job.id, None)

    # ---------------------------------------------------------------- worker
    def _run(self, job: Job) -> None:
        job.started_at = time.time()
        job._set(state=RUNNING, phase="loading")
        try:
            result = _train_and_save(job)
        except _Cancelled:
            job._set(state=CANCELLED, phase="done")
            log.info("training job %s (%s) cancelled", job.id, job.name)
        except BaseException as err:  # noqa: BLE001 - the worker must never die silently
            from .training import TrainingCancelled

            if isinstance(err, TrainingCancelled):
                job._set(state=CANCELLED, phase="done")
                log.info("training job %s (%s) cancelled", job.id, job.name)
            else:
                log.error("training job %s (%s) failed:\n%s", job.id, job.name, traceback.format_exc())
                job._set(state=FAILED, error=user_message(err))
        else:
            job._set(state=DONE, phase="done", result=result)
        finally:
            job.finished_at = time.time()
            job.spec.sources = []  # free uploaded bytes
            job._finished.set()


class _Cancelled(Exception):
    pass


def _train_and_save(job: Job) -> JobResult:
    from .bundle import save_bundle
    from .data import check_enough_images, dataset_fingerprint, load_images
    from .training import Progress, train

    spec, config = job.spec, job.config
    total = len(spec.sources)
    job._report(Progress("loading", steps=total, message="Reading images"))

    def sources_checking_cancel() -> Any:
        for done, source in enumerate(spec.sources):
            if job.cancel_requested:
                raise _Cancelled()
            job._report(
                Progress(
                    "loading",
                    step=done,
                    steps=total,
                    fraction=done / max(total, 1),
                    message=f"Reading images {done}/{total}",
                )
            )
            yield source

    report = load_images(sources_checking_cancel(), config.image_size, compact=True)  # uint8: 1/4 of the memory
    job._set(failures=list(report.failures))
    for name, reason in report.failures:
        log.info("job %s: skipped %s: %s", job.id, name, reason)
    check_enough_images(len(report.images))
    if job.cancel_requested:
        raise _Cancelled()
    fingerprint_items = [_fingerprint_item(s) for s in spec.sources]
    metadata = {
        "data": {
            "source": spec.source_label,
            "fingerprint": dataset_fingerprint(fingerprint_items),
            "n_files": len(spec.sources),
            "n_unreadable": len(report.failures),
        },
        "app": {"job_id": job.id, "requested_epochs": spec.epochs, "demo_epochs": demo_epochs()},
    }
    device = spec.device or os.environ.get("FOD_DEVICE", "auto")
    detector = train(
        [arr for _, arr in report.images],
        config,
        device=device,
        weights=spec.weights,
        progress=job._report,
        cancel=job.cancel_token,
        metadata=metadata,
    )
    if spec.weights:
        detector.metadata["backbone"]["weights_path"] = str(Path(spec.weights).resolve())
    if job.cancel_requested:
        raise _Cancelled()
    job._set(phase="saving")
    from .review import log_model_saved, saved_version  # audit log of a replaced model (inspection history)

    previous = saved_version(spec.name)
    folder = save_bundle(detector, spec.name)  # sets detector.metadata to the saved bundle's metadata
    log_model_saved(previous, detector.metadata, spec.owner or None, f"retrained in the app (job {job.id})")
    return JobResult.from_metadata(detector.metadata, str(folder), list(report.failures))


def _fingerprint_item(source: Any) -> Any:
    """A source as ``dataset_fingerprint`` takes it: path, or (name, bytes)."""
    if isinstance(source, (str, Path)):
        return source
    if isinstance(source, tuple):
        name, content = source
        return (str(name), content if isinstance(content, (str, Path)) else bytes(content))
    if hasattr(source, "getvalue"):
        return (str(getattr(source, "name", "")), bytes(source.getvalue()))
    return bytes(source)


def last_training_seconds(model_name: str) -> float | None:
    """How long the saved model ``model_name`` took to train (bundle metadata), None when unknown or absent."""
    from .bundle import BundleError, read_metadata

    try:
        seconds = (read_metadata(model_name).get("training") or {}).get("seconds_total")
    except (BundleError, OSError):
        return None
    return float(seconds) if isinstance(seconds, (int, float)) and seconds > 0 else None


def user_message(err: BaseException) -> str:
    """A message for people, not programmers: the engine's own clear errors as they are, else a summary."""
    from .bundle import BundleError
    from .data import DatasetError, ImageLoadError

    clear: tuple[type[BaseException], ...] = (BundleError, DatasetError, ImageLoadError, JobError)
    try:
        from .backbone import BackboneWeightsError

        clear = (*clear, BackboneWeightsError)
    except ImportError:  # pragma: no cover - backbone module missing
        pass
    if isinstance(err, clear):
        return str(err)
    if isinstance(err, MemoryError) or "out of memory" in str(err).lower():
        return (
            "Training ran out of memory. Use fewer or smaller images, the 'cpu' or 'quick' preset, "
            "or ask an administrator for a machine with more memory."
        )
    if isinstance(err, OSError) and getattr(err, "errno", None) == 28:
        return "The disk is full; the model could not be saved. Free some space and train again."
    if isinstance(err, ValueError) and str(err):
        return f"Training could not run: {err}"
    return (
        f"Training stopped because of an unexpected problem ({type(err).__name__}). Nothing was saved. "
        "Try again; if it happens again, send the server log to your administrator."
    )


def busy_message(job: Job, owner: str | None = None) -> str:
    """'A training job is already running (started by another session at HH:MM, N% done). ...'"""
    who = "by you" if owner and owner == job.owner else "by another session"
    return (
        f"A training job is already running (started {who} at {job.started_clock()}, "
        f"{job.fraction * 100:.0f}% done). Try again when it finishes."
    )


_manager: TrainingJobManager | None = None
_manager_lock = threading.Lock()


def get_job_manager() -> TrainingJobManager:
    """The process-wide job manager (created on first use)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = TrainingJobManager()
        return _manager


def reset_job_manager(timeout: float = 60.0) -> None:
    """Cancel and wait for any running job, then forget all jobs (tests)."""
    global _manager
    with _manager_lock:
        manager, _manager = _manager, None
    if manager is not None:
        running = manager.active()
        if running is not None:
            running.cancel()
            running.wait(timeout)
