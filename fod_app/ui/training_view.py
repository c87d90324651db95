"""Training job panels shared by the Home and Train pages: live progress (polled) and the result summary."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from ..calibration import LOW_SYNTHETIC_CATCH, margin_note, rule_text
from ..jobs import CANCELLED, DONE, FAILED, Job, JobResult, busy_message, get_job_manager
from ..selfcheck import describe
from .common import active_model, session_id, set_active_model

INSPECT_PAGE = "pages/3_inspect.py"
POLL_EVERY = "1s"
WATCHED_KEY = "jobs_watched"  # ids of jobs this session has seen running (it gets their outcome)
DECIDED_KEY = "jobs_decided"  # "use the new model now?" prompts answered in this session

PRESET_LABELS = {"quick": "Quick", "cpu": "Standard", "paper": "Full (paper)"}

LOSS_TEXT = {
    "reconstruction": "Reconstruction error",
    "intra_divergence": "Pattern match (within image)",
    "intra_entropy": "Pattern focus (within image)",
    "inter_divergence": "Pattern match (vs. reference)",
    "inter_entropy": "Pattern focus (vs. reference)",
}


def duration(seconds: float | None) -> str:
    """'45 s', '3 min 05 s', '1 h 02 min'."""
    if seconds is None or not np.isfinite(seconds):
        return "–"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


def preset_label(preset: str | None) -> str:
    """'Standard (cpu)' etc.: the Train page's name of a preset, with the engine's name."""
    if preset in PRESET_LABELS:
        return f"{PRESET_LABELS[preset]} ({preset})"
    return str(preset or "custom")


def percent(value: float) -> str:
    return f"{value * 100:.0f}%" if value >= 0.01 or value == 0 else f"{value * 100:.1f}%"


# --------------------------------------------------------------------------- charts


def loss_figure(job: Job, terms: tuple[str, ...] = ("reconstruction",), height: int = 260) -> go.Figure | None:
    """Per-step training curves of ``terms`` (one panel each); None before the first step."""
    history = job.history()
    if not history:
        return None
    terms = tuple(t for t in terms if t in history[-1].losses)
    if not terms:
        return None
    steps = [h.step for h in history]
    # At most three panels a row, titles on two lines in a small font: five titles in one row of a 1280 px page
    # ran into each other.
    n_cols = min(3, len(terms))
    n_rows = -(-len(terms) // n_cols)
    titles = [LOSS_TEXT.get(t, t).replace(" (", "<br>(") for t in terms]
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=0.3 if n_rows > 1 else 0.1)
    mode = "lines+markers" if len(steps) <= 40 else "lines"  # a single step must still show as a dot
    for index, term in enumerate(terms):
        row, col = divmod(index, n_cols)
        values = [h.losses.get(term, np.nan) for h in history]
        fig.add_trace(go.Scatter(x=steps, y=values, mode=mode, name=LOSS_TEXT.get(term, term)), row=row + 1,
                      col=col + 1)
        fig.update_xaxes(title_text="training step", title_font=dict(size=11), row=row + 1, col=col + 1)
    fig.update_annotations(font=dict(size=12))
    fig.update_yaxes(automargin=True)
    fig.update_layout(height=height * n_rows, margin=dict(l=45, r=10, t=50, b=40), showlegend=False)
    return fig


#: The histogram's x axis ends here (threshold units); higher synthetic-defect scores are drawn in the last bin.
HISTOGRAM_MAX = 3.0


def score_histogram(result: JobResult) -> go.Figure:
    """Histograms of held-out good-image scores and of the self-check's synthetic defects (threshold units), with
    the threshold line at 1.0."""
    scores = np.asarray(result.good_scores, dtype=float)
    synthetic = np.asarray(result.synthetic_scores, dtype=float)
    highest = max([float(v.max()) for v in (scores, synthetic) if v.size], default=1.0)
    upper = max(1.3, min(highest * 1.1, HISTOGRAM_MAX))
    bins = dict(start=0.0, end=upper, size=upper / 30)
    fig = go.Figure(
        go.Histogram(
            x=scores,
            xbins=bins,
            marker_color="#4c9a2a",
            name="held-back good images",
            hovertemplate="score %{x}<br>%{y} good image(s)<extra></extra>",
        )
    )
    if synthetic.size:
        fig.add_trace(go.Histogram(
            x=np.minimum(synthetic, upper * 0.999), xbins=bins, marker_color="#c62828", opacity=0.6,
            name="synthetic defects on them", hovertemplate="score %{x}<br>%{y} synthetic defect(s)<extra></extra>",
        ))
    fig.add_vline(x=1.0, line_color="#d62728", line_width=2, line_dash="dash",
                  annotation_text="threshold (1.0)", annotation_position="top")
    fig.update_layout(
        height=280,
        margin=dict(l=10, r=10, t=30, b=10),
        xaxis_title="score (1.0 = threshold; above = flagged)",
        yaxis_title="images",
        xaxis_range=[0, upper],
        bargap=0.05,
        barmode="overlay",
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, xanchor="left"),
    )
    return fig


# --------------------------------------------------------------------------- session bookkeeping


def watch_job(job: Job) -> None:
    """Remember that this session saw ``job`` running, so it is told the outcome."""
    watched = st.session_state.setdefault(WATCHED_KEY, [])
    if job.id not in watched:
        watched.append(job.id)


def watched(job: Job) -> bool:
    return job.id in st.session_state.get(WATCHED_KEY, [])


def decide(key: str) -> None:
    """Mark the "use the new model now?" prompt ``key`` as answered."""
    decided = st.session_state.setdefault(DECIDED_KEY, [])
    if key not in decided:
        decided.append(key)


def decided(key: str) -> bool:
    return key in st.session_state.get(DECIDED_KEY, [])


# --------------------------------------------------------------------------- panels


def time_left(job: Job) -> str:
    """'3 min 05 s', 'almost done' or 'estimating…' (see ``Job.eta_s``)."""
    if job.phase in ("calibration", "saving"):
        return "almost done"
    return duration(job.eta_s) if job.eta_s is not None else "estimating…"


def _progress_body(job: Job) -> None:
    st.progress(job.fraction, text=f"{job.phase_text}… {percent(job.fraction)}")
    cols = st.columns(3)
    cols[0].metric("Elapsed", duration(job.elapsed_s))
    cols[1].metric("Time left (learning step)", time_left(job), help=job.eta_note() or None)
    epoch, epochs = job.epoch
    cols[2].metric("Training round (epoch)", f"{epoch} of {epochs}" if epoch else f"– of {epochs}")
    note = job.eta_note()
    if note:
        st.caption(note)
    fig = loss_figure(job)
    if fig is not None:
        st.caption(
            "**Reconstruction error** — how far the model's re-drawing of good parts is from the real thing. "
            "It should drop and then flatten out; a flat line from the start or a rising one means something is off."
        )
        st.plotly_chart(fig, key=f"loss_{job.id}", config={"displayModeBar": False})
        with st.expander("All training curves (for specialists)"):
            terms = tuple(LOSS_TEXT)
            full = loss_figure(job, terms, height=240)
            if full is not None:
                st.plotly_chart(full, key=f"loss_all_{job.id}", config={"displayModeBar": False})
    elif job.phase in ("loading", "features", "reference"):
        st.caption("The loss curves appear once the learning step starts.")


def started_by_text(job: Job, me: str) -> str:
    """'You started it at 09:12' / 'Started at 09:12 in another browser tab or by another user'."""
    if job.owned_by(me):
        return f"You started it at {job.started_clock()} in this browser tab."
    return (
        f"Started at {job.started_clock()} in another browser tab or by another user (a reloaded tab counts as "
        "another one)."
    )


def cancel_controls(job: Job, me: str, key: str) -> None:
    """Cancel button: at once for the tab that started the job; for anyone else after a confirmation.

    The buttons act in ``on_click`` callbacks, which run before the next (fragment) rerun, so a click is not lost
    to the polling fragment redrawing the button.
    """
    if job.cancel_requested:
        st.info("Stopping… the model will not be saved.", icon=":material/block:")
        return
    if job.owned_by(me):
        st.button("Cancel training", key=f"cancel_{key}", icon=":material/stop_circle:",
                  on_click=job.cancel, kwargs={"by": me})
        return
    asking = f"confirm_cancel_{key}"
    if not st.session_state.get(asking):
        st.button("Cancel training…", key=f"cancel_{key}", icon=":material/stop_circle:",
                  help="This training was started elsewhere; you will be asked to confirm.",
                  on_click=_set_state, args=(asking, True))
        return
    st.warning(
        f"Stop the training of “{job.name}”? It was started at {job.started_clock()} in another browser tab or by "
        "another user; nothing will be saved.",
        icon=":material/warning:",
    )
    yes, no = st.columns(2)
    yes.button("Yes, stop it", key=f"cancel_yes_{key}", type="primary", on_click=_confirm_cancel,
               args=(job, me, asking))
    no.button("No, let it run", key=f"cancel_no_{key}", on_click=_set_state, args=(asking, False))


def _set_state(key: str, value: Any) -> None:
    st.session_state[key] = value


def _confirm_cancel(job: Job, me: str, asking: str) -> None:
    st.session_state[asking] = False
    job.cancel(by=me)


def job_panel(job: Job, on_finished: Callable[[Job], None] | None = None) -> None:
    """Live view of a job (any session's), polled every second while it runs; summary when finished.

    ``on_finished(job)`` runs once per job when it is first seen finished.
    """
    run_every = POLL_EVERY if job.active else None
    me = session_id()
    if job.active:
        watch_job(job)

    @st.fragment(run_every=run_every)
    def _panel() -> None:
        if job.active:
            st.subheader(f"Training “{job.name}”")
            st.caption(started_by_text(job, me))
            _progress_body(job)
            cancel_controls(job, me, job.id)
            return
        seen_key = f"finished_seen_{job.id}"
        if not st.session_state.get(seen_key):
            st.session_state[seen_key] = True
            if on_finished is not None:
                on_finished(job)
            if run_every is not None:
                st.rerun(scope="app")  # refresh the whole page (sidebar, buttons) once
        finished_summary(job)

    _panel()


def finished_summary(job: Job) -> None:
    """Outcome of a finished job: calibration summary, or why it failed / that it was cancelled."""
    if job.state == CANCELLED:
        st.info(f"Training of “{job.name}” was cancelled. Nothing was saved.", icon=":material/block:")
        return
    if job.state == FAILED:
        st.error(f"Training of “{job.name}” failed: {job.error}", icon=":material/error:")
        return
    if job.state != DONE or job.result is None:
        return
    calibration_summary(job.result)


def self_check_summary(record: dict[str, Any] | None) -> None:
    """The self-check sentence of a model and, when its self-check AUROC is poor, the warning.

    Shared by the training outcome (Home and Train pages) and the Models page, so the text lives in one place
    (``fod_app.selfcheck.describe``). ``record`` is the bundle's ``self_check`` metadata; None for old models.
    """
    message, warning = describe(record)
    st.markdown(message)
    if warning:
        st.warning(warning, icon=":material/warning:")


def calibration_summary(result: JobResult) -> None:
    st.success(
        f"Model **{result.model_name}** is ready: trained on {result.n_train} good images in "
        f"{duration(result.seconds)} ({result.device}).",
        icon=":material/check_circle:",
    )
    if result.self_check is not None:
        self_check_summary(result.self_check)
    if result.failures:
        with st.expander(f"{len(result.failures)} file(s) could not be read and were left out"):
            for name, reason in result.failures:
                st.markdown(f"- **{name}**: {reason}")
    strictness_summary(result)


def strictness_summary(result: JobResult, key: str = "") -> None:
    """Threshold, design and observed false-reject rates and the held-back good-score histogram.

    Shown after training and, from the bundle metadata (``JobResult.from_metadata``), on the Models page.
    """
    n_over = int(round(result.observed_false_reject_rate * result.n_calibration))
    st.markdown("#### How strict is the model?")
    st.markdown(
        f"{result.n_calibration} good images were held back from training and scored afterwards to set the "
        "**threshold**: a part whose score is above it is flagged as *not OK*. Scores are shown relative to "
        "the threshold, so **1.0 is the threshold** for every model."
        + (f" Then they joined the memory bank of good patches (each half had been scored with the other half in "
           f"it), so all {result.n_bank_images} good images count when a part is inspected."
           if result.n_bank_images > result.n_train else "")
    )
    note = margin_note(result.n_calibration)
    if note:
        st.info(note, icon=":material/info:")
    catch = result.synthetic_catch_rate
    cols = st.columns(3)
    cols[0].metric(
        "Threshold",
        "1.0",
        help=f"Internally {result.threshold:.4g} on the model's raw scale; shown as 1.0 everywhere in the app.",
    )
    cols[1].metric(
        "Expected false rejects",
        percent(result.expected_false_reject_rate),
        help="A false reject is a good part flagged as not OK. The threshold is set so that about this share "
        f"of good parts score above it ({result.quantile:.0%} of good parts stay below).",
    )
    cols[2].metric(
        "Held-back good images above the threshold",
        f"{n_over} of {result.n_calibration} ({percent(result.observed_false_reject_rate)})",
        help="Observed on the good images held back from training.",
    )
    how = rule_text(result.threshold_rule, result.quantile)
    if how:
        st.caption(f"**How the threshold was set**: {how}.")
    if catch is not None:
        n_synthetic = len(result.synthetic_scores)
        st.markdown(
            f"**Synthetic defects caught at this threshold: {percent(catch)}** ({round(catch * n_synthetic)} of the "
            f"{n_synthetic} that the self-check made on the held-back good images: patches and scars from other good "
            "images, blended texture). A label-free estimate of what the threshold lets through: real defects "
            "differ, and subtle ones are caught less often."
        )
    st.plotly_chart(
        score_histogram(result), key=f"hist_{key}{result.model_name}", config={"displayModeBar": False}
    )
    st.caption(
        "Each bar counts held-back good images (green) or synthetic defects made on them (red) with that score. "
        "Good parts should sit well left of the dashed threshold line and defects right of it; green bars close "
        "to it mean normal variation is near the limit."
    )
    if catch is not None and catch < LOW_SYNTHETIC_CATCH:
        st.warning(
            f"At this threshold the model flags only {percent(catch)} of the synthetic defects: many real defects "
            "may pass too. On **Inspect** you can lower the threshold and see what it costs in false rejects; "
            "reviewed parts on **History** can recalibrate it, and more good images give a tighter threshold.",
            icon=":material/warning:",
        )
    notes = []
    if n_over == 1 and result.n_calibration < round(1 / max(result.expected_false_reject_rate, 1e-9)):
        notes.append(
            f"1 of {result.n_calibration} above the threshold is expected here: with so few held-back images the "
            "threshold lies between the two highest scores, so the highest one is always just above it. On many "
            f"parts, about {percent(result.expected_false_reject_rate)} of good ones will be flagged."
        )
    if result.n_calibration < 20:
        notes.append(
            f"Only {result.n_calibration} good images were held back, so the threshold is a rough estimate. "
            "Training on more good images makes it more reliable."
        )
    for note in notes:
        st.caption(note)


def model_ready_actions(model_name: str, key: str, decision_key: str | None = None) -> None:
    """After a successful training: "use the new model now?" — the active model never changes silently."""
    if active_model() == model_name:
        st.success(f"“{model_name}” is the active model: Inspect, Explore and Evaluate use it.",
                   icon=":material/check:")
        if st.button("Inspect images with it", key=f"inspect_{key}", type="primary", icon=":material/arrow_forward:"):
            st.switch_page(INSPECT_PAGE)
        return
    model_ready_prompt(model_name, key, decision_key or key)


def model_ready_prompt(model_name: str, key: str, decision_key: str, compact: bool = False) -> None:
    """'Use “X” now? The active model is still Y' with Yes / Yes and inspect / No, keep Y."""
    current = active_model()
    st.markdown(
        f"**Use “{model_name}” now?** The active model is still **{current or 'none'}**; it changes only when you "
        "say so."
    )
    slots = [st.container() for _ in range(3)] if compact else list(st.columns([1, 1, 1, 1]))[:3]
    slots[0].button("Yes, use it now", key=f"activate_{key}", icon=":material/check:", type="primary",
                    on_click=_use_model, args=(model_name, decision_key))
    if not compact and slots[1].button("Use it and inspect images", key=f"inspect_{key}",
                                       icon=":material/arrow_forward:"):
        set_active_model(model_name)
        decide(decision_key)
        st.switch_page(INSPECT_PAGE)
    if current:
        slots[2].button(f"No, keep {current}", key=f"keep_{key}", on_click=decide, args=(decision_key,))


def _use_model(model_name: str, decision_key: str) -> None:
    """Callback of "Yes, use it now": runs before the rerun, so every part of the page shows the new choice."""
    set_active_model(model_name)
    decide(decision_key)


def busy_panel(owner: str) -> Job | None:
    """If another session's job runs, show the busy message (polled, so it clears itself); return that job."""
    running = get_job_manager().active()
    if running is None or running.owner == owner:
        return None

    @st.fragment(run_every=POLL_EVERY)
    def _busy() -> None:
        job = get_job_manager().active()
        if job is None:
            st.rerun(scope="app")
        st.warning(busy_message(job, owner), icon=":material/hourglass_top:")

    _busy()
    return running
