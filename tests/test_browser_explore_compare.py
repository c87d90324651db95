"""Real-browser tests at 1280 px: the side-by-side explorer, no request leaving 127.0.0.1 on any page, and every page
URL typed by hand. Uses the session's test model and Debian's Chromium (see test_browser_explore.py)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_browser_explore import _wait_idle, app_server

pytestmark = pytest.mark.browser

PAGES = {"home": "FOD Inspector", "train": "Train a model", "inspect": "Inspect parts",
         "explore": "Explore correlations", "evaluate": "Evaluate", "models": "Models"}
LOCAL = ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:", "about:")
# Text cut off by its box (numbers shown as "10.…", titles, button labels, table cells): elements whose content is
# wider than the element while overflow hides it.
CUT_OFF_SELECTOR = ("[data-testid='stMetricValue'], [data-testid='stMetricLabel'], button, "
                    "[data-testid='stMarkdownContainer'] p, th, td, [data-testid='stWidgetLabel']")
CUT_OFF_JS = """(selector) => [...document.querySelectorAll(selector)]
  .filter(e => e.offsetParent !== null && e.scrollWidth > e.clientWidth + 1
               && getComputedStyle(e).overflow !== 'visible')
  .map(e => (e.getAttribute('data-testid') || e.tagName) + ': ' + e.innerText.slice(0, 60))"""


def cut_off_text(page) -> list[str]:
    """Visible texts on ``page`` cut off by their box (empty when every number, title and label fits)."""
    return page.evaluate(CUT_OFF_JS, CUT_OFF_SELECTOR)


@pytest.fixture
def app_url(trained_models_dir: Path, tmp_path: Path) -> Iterator[str]:
    with app_server(tmp_path, FOD_MODELS_DIR=str(trained_models_dir)) as url:
        yield url


def _wait_for_explorer(page) -> None:
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 4", timeout=300_000)
    _wait_idle(page)


def test_every_page_url_typed_by_hand_works_and_nothing_leaves_loopback(app_url: str, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(LOCAL) else outside.append(r.url))
    for path, heading in PAGES.items():
        page.goto(f"{app_url}/{path}")
        _wait_idle(page)
        if path == "explore":
            _wait_for_explorer(page)
        page.get_by_role("heading", name=re.compile(heading)).first.wait_for(timeout=120_000)
        assert not page.get_by_test_id("stException").count(), path
        # the router's navigation, not the raw pages/ file list
        nav = page.get_by_test_id("stSidebarNavItems").inner_text()
        assert "Explore correlations" in nav and "4_explore" not in nav and "3 inspect" not in nav.lower(), nav
        if path == "inspect":
            page.get_by_role("button", name="Try the sample images").click()
            page.get_by_text("Results (highest score first)").wait_for(timeout=300_000)
            _wait_idle(page)
        assert cut_off_text(page) == [], path
    page.goto(f"{app_url}/")
    _wait_idle(page)
    page.get_by_role("heading", name=re.compile("FOD Inspector")).first.wait_for(timeout=120_000)
    assert outside == [], outside


def test_side_by_side_explorer_pins_compares_and_adds_up(app_url: str, browser) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"{app_url}/explore")
    _wait_for_explorer(page)
    table = page.get_by_test_id("stTable").first
    headers = table.locator("thead th").all_inner_texts()
    assert any(h.startswith("A · row") for h in headers) and any(h.startswith("B · row") for h in headers), headers

    def column_values(index: int) -> dict[str, str]:
        rows = table.locator("tbody tr").all()
        return {r.locator("th").inner_text().strip(): r.locator("td").nth(index).inner_text().strip() for r in rows}

    for index in (0, 1):  # A and B: the terms add up to the patch score
        values = column_values(index)
        names = ("Reconstruction", "Intra (reversed)", "Inter", "Nearest good patch")
        terms = [float(values[k]) for k in names if k in values]
        assert terms and sum(terms) == pytest.approx(float(values["= Patch score"]), abs=2e-3), values
    # the comparison figure: eight panels (titles) in one heat map, so one colour scale, with a visible colour bar
    info = page.evaluate("""() => { const plots = [...document.querySelectorAll('.js-plotly-plot')];
        const gd = plots.find(p => ((p.layout || {}).annotations || []).filter(
            a => /^Intra (correlation|target)|^Inter (correlation|target)/.test(a.text)).length === 8);
        if (!gd) return null;
        return {heatmaps: gd.data.filter(t => t.type === 'heatmap').length,
                bars: gd.querySelectorAll('.colorbar').length}; }""")
    assert info == {"heatmaps": 1, "bars": 1}, info
    before = column_values(1)
    # click another patch: B changes, A stays
    a_header = headers[1] if headers[1].startswith("A") else headers[0]
    page.evaluate("document.querySelectorAll('.js-plotly-plot')[0].scrollIntoView({block: 'center'})")
    page.wait_for_timeout(300)
    x, y = page.evaluate(
        """([x, y]) => { const gd = document.querySelectorAll('.js-plotly-plot')[0]; const L = gd._fullLayout;
            const r = gd.getBoundingClientRect();
            return [r.left + L.xaxis._offset + L.xaxis.l2p(x), r.top + L.yaxis._offset + L.yaxis.l2p(y)]; }""", [4, 6])
    page.mouse.move(x, y)
    page.wait_for_timeout(300)
    started = time.perf_counter()
    page.mouse.click(x, y)
    page.get_by_text("Patch row 6, column 4").first.wait_for(timeout=30_000)
    print(f"\n[browser] patch click -> view updated in {time.perf_counter() - started:.2f} s")
    _wait_idle(page)
    table = page.get_by_test_id("stTable").first
    headers = table.locator("thead th").all_inner_texts()
    assert a_header in headers and any(h.startswith("B · row 6, col 4") for h in headers), headers
    assert column_values(1) != before
    # pin B as A: both columns show the same patch
    page.get_by_role("button", name="Pin B as A").click()
    _wait_idle(page)
    headers = page.get_by_test_id("stTable").first.locator("thead th").all_inner_texts()
    assert any(h.startswith("A · row 6, col 4") for h in headers), headers
    assert not page.get_by_test_id("stException").count()
    # the model-quality note and the export buttons are on the page
    assert page.get_by_text("Download view (PNG)").count() and page.get_by_text("Download numbers (JSON)").count()
    with page.expect_download() as download:
        page.get_by_text("Download numbers (JSON)").click()
    assert download.value.suggested_filename.endswith(".json")
