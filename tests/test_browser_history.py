"""Real-browser tests (Debian Chromium, 1280 px wide) of the inspection history in the app:

* files added to an upload in two steps: every viewer entry shows its own row's image (selector, caption and heat
  map title agree with the results CSV);
* Inspect → Explore → back keeps the results, and a reload reopens them from the history;
* review → recalibrate → compare on the History page shows the verdict that changes.

One server (module scope) with a private copy of the session's test model and its own history database.
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import time
from pathlib import Path

import pytest
from test_browser_explore import _wait_idle, app_server
from test_browser_explore_compare import cut_off_text

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_data" / "inspect"
SHOTS = REPO / "test-artifacts" / "screenshots"
VIEWPORT = {"width": 1280, "height": 1000}
LABEL = re.compile(r"^(?P<file>\S+) — score (?P<score>[0-9.]+) — (?P<verdict>OK|NG|REVIEW)$")


@pytest.fixture(scope="module")
def server(trained_models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("browser_history")
    models = root / "models"
    shutil.copytree(trained_models_dir, models)
    _threshold_below_the_clearest_defect(models)
    history = root / "history.sqlite3"
    with app_server(root, FOD_MODELS_DIR=str(models), FOD_HISTORY_DB=str(history)) as url:
        yield url, models, history


CLEAREST = ["good_01.png", "defect_03.png", "defect_08.png", "defect_10.png"]


def _threshold_below_the_clearest_defect(models: Path) -> None:
    """Put the copy's threshold just below its highest score on ``CLEAREST``, so the review test has an NG image.

    The session model is a 2-epoch model whose calibrated threshold (a wide margin on 4-5 held-out images) may pass
    every sample image; the review loop needs a rejected part whatever the training machine produced.
    """
    from fod_app.bundle import load_bundle, update_metadata
    from fod_app.calibration import Calibration
    from fod_app.data import load_image, prepare_image

    detector = load_bundle("test-model", root=models, device="cpu")
    size = detector.config.image_size
    raw = detector.raw_scores(prepare_image(load_image(SAMPLES / n), size) for n in CLEAREST)
    calibration = Calibration.from_dict(detector.metadata["calibration"])
    calibration.threshold = 0.95 * float(raw.max())
    calibration.review_threshold = None
    update_metadata("test-model", {"calibration": calibration.to_dict()}, root=models)


def _open(browser, url: str, path: str = ""):
    page = browser.new_page(viewport=VIEWPORT, accept_downloads=True)
    page.goto(f"{url}/{path}")
    _wait_idle(page)
    return page


def _upload(page, names: list[str], total: int | None = None) -> None:
    """Add ``names`` to the upload and wait until the page shows the new inspection of ``total`` images.

    A new session reopens the last run from the history, so "Results" is on the page before the upload is even
    sent: wait for the reopened-run note to go and the "Images" count to be the new batch's, not for a heading.
    """
    uploader = page.get_by_test_id("stFileUploaderDropzoneInput")
    uploader.wait_for(state="attached", timeout=180_000)  # the first page load also loads the model
    uploader.set_input_files([str(SAMPLES / n) for n in names])
    page.wait_for_function(
        """n => !document.body.innerText.includes('Showing the last inspection') && Array.from(
               document.querySelectorAll('[data-testid="stMetric"]')).some(m =>
               m.querySelector('[data-testid="stMetricLabel"]')?.innerText.trim() === 'Images' &&
               m.querySelector('[data-testid="stMetricValue"]')?.innerText.trim() === String(n))""",
        arg=total or len(names), timeout=120_000,
    )
    _wait_idle(page)


def _selectbox(page, label: str):
    return page.get_by_test_id("stSelectbox").filter(has=page.get_by_text(label, exact=True)).first


def _open_dropdown(page, label: str) -> None:
    for _ in range(3):
        page.mouse.click(5, 5)  # blur whatever had the focus, so the click opens the list
        page.wait_for_timeout(200)
        _selectbox(page, label).click()
        try:
            page.get_by_role("option").first.wait_for(timeout=5_000)
            return
        except Exception:  # noqa: BLE001 - the list did not open; try again
            continue
    raise AssertionError(f"the {label!r} list does not open")


def _choose(page, label: str, option: str) -> None:
    _open_dropdown(page, label)
    page.get_by_role("option", name=option, exact=True).click()
    _wait_idle(page)


def _options(page, label: str) -> list[str]:
    _open_dropdown(page, label)
    options = [o.inner_text().strip() for o in page.get_by_role("option").all()]
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)
    return options


def _shown(page) -> tuple[str, str, str]:
    """(selector text, viewer caption, heat-map title) as the browser shows them."""
    texts = _selectbox(page, "Image").evaluate(
        "e => [e.innerText, ...Array.from(e.querySelectorAll('input')).map(i => i.value)].join('\\n')")
    found = [line.strip() for line in texts.splitlines() if LABEL.match(line.strip())]
    assert found, texts
    selected = found[0]
    caption = page.get_by_test_id("stMarkdownContainer").filter(has_text=re.compile(r"^Showing: ")).first
    title = page.locator(".js-plotly-plot .gtitle").filter(has_text="Heat map —").first.text_content()
    return selected, caption.inner_text().strip(), title.strip()


def _csv_rows(page) -> dict[str, float]:
    with page.expect_download() as info:
        page.get_by_role("button", name="Download results (CSV)").click()
    rows = csv.DictReader(io.StringIO(Path(info.value.path()).read_text(encoding="utf-8")))
    return {r["file"]: float(r["score"]) for r in rows}


def _check_viewer(page, rows: dict[str, float]) -> None:
    selected, caption, title = _shown(page)
    match = LABEL.match(selected)
    assert match, selected
    name, score = match["file"], float(match["score"])
    assert caption == f"Showing: {selected}", (selected, caption)
    assert title == f"Heat map — {name} — score {match['score']}", (selected, title)
    assert abs(rows[name] - score) < 0.006, (name, rows[name], score)


def test_two_step_upload_viewer_always_shows_the_selected_row(server, browser) -> None:
    url, _, _ = server
    started = time.perf_counter()
    page = _open(browser, url, "inspect")
    _upload(page, ["good_01.png", "defect_01.png"])
    first = _options(page, "Image")
    assert len(first) == 2
    _choose(page, "Image", first[-1])  # the user looks at the lower-scoring image, then adds files
    _upload(page, ["defect_03.png", "good_03.png"], total=4)
    rows = _csv_rows(page)
    assert set(rows) == {"good_01.png", "defect_01.png", "defect_03.png", "good_03.png"}
    _check_viewer(page, rows)  # what is shown right after adding
    assert LABEL.match(_shown(page)[0])["file"] == LABEL.match(first[-1])["file"], "the selection is kept"
    options = _options(page, "Image")
    assert len(options) == 4
    for option in options:
        _choose(page, "Image", option)
        _check_viewer(page, rows)
        assert _shown(page)[0] == option
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "history_viewer.png"), full_page=True)
    assert not page.get_by_test_id("stException").count()
    print(f"\n[browser] two-step upload viewer check: {time.perf_counter() - started:.1f} s")


def test_results_survive_explore_and_reload(server, browser) -> None:
    url, _, _ = server
    started = time.perf_counter()
    page = _open(browser, url, "inspect")
    _upload(page, ["good_01.png", "defect_05.png"])
    before = _csv_rows(page)
    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Explore correlations").click()
    _wait_idle(page)
    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Inspect").click()
    _wait_idle(page)
    page.get_by_text("Results (highest score first)").first.wait_for(timeout=60_000)
    assert _csv_rows(page) == before
    assert "run=" in page.url
    page.reload()
    _wait_idle(page)
    page.get_by_text("Showing the last inspection").first.wait_for(timeout=60_000)
    after = _csv_rows(page)
    assert set(after) == set(before)
    assert all(abs(after[k] - before[k]) < 1e-3 for k in before)
    _check_viewer(page, after)
    assert not page.get_by_test_id("stException").count()
    print(f"\n[browser] explore and reload: {time.perf_counter() - started:.1f} s")


def test_review_recalibrate_compare(server, browser) -> None:
    url, models, _ = server
    started = time.perf_counter()
    page = _open(browser, url, "inspect")
    _upload(page, CLEAREST)
    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="History").click()
    _wait_idle(page)
    page.get_by_text("Improve the model from reviews").first.wait_for(timeout=60_000)
    ng = [o for o in _options(page, "Image") if o.endswith("— NG")]
    assert ng, "the run has NG images"
    target = ng[-1]  # the lowest-scoring NG image: a reviewer says it is a good part
    name = LABEL.match(target)["file"]
    _choose(page, "Image", target)
    page.get_by_label("Reviewer").fill("Quinn")
    page.get_by_label("Reviewer").press("Enter")
    _wait_idle(page)
    page.get_by_role("button", name="Mark as good (false reject)").click()
    _wait_idle(page)
    page.get_by_text("reviewed as good (false reject)").first.wait_for(timeout=30_000)
    page.get_by_text("Recalibrate test-model").first.wait_for(timeout=30_000)
    page.get_by_role("button", name=re.compile("Apply the new threshold")).click()
    _wait_idle(page)
    page.get_by_text("the previous version is kept as model").first.wait_for(timeout=30_000)
    assert any(p.name.startswith("test-model.previous-") for p in models.iterdir())
    _choose(page, "Version B: model", "test-model")
    page.get_by_role("button", name="Compare").click()
    _wait_idle(page)
    summary = page.get_by_text(re.compile(r"image\(s\) change verdict")).first
    summary.wait_for(timeout=60_000)
    changes = int(re.search(r"(\d+) image\(s\) change verdict", summary.inner_text()).group(1))
    assert changes >= 1
    page.wait_for_selector("[data-testid='stPlotlyChart']")
    assert cut_off_text(page) == []  # the History page with a review, a recalibration and a comparison
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "history_compare.png"), full_page=True)
    assert not page.get_by_test_id("stException").count()
    print(f"\n[browser] review, recalibrate, compare ({name}, {changes} change(s)): "
          f"{time.perf_counter() - started:.1f} s")
