"""Real browser (Debian Chromium via Playwright) at 1280 px: mark an ignore region on the Models page, see it
saved, previewed and reported, and see the Inspect page's heat map leave it out.

Screenshot: test-artifacts/screenshots/ignore_regions.png.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_browser_explore import ARGS, CHROMIUM, _wait_idle, app_server
from test_browser_explore_compare import cut_off_text

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-artifacts" / "screenshots"


def test_set_ignore_regions_on_the_models_page(trained_models_dir: Path, tmp_path: Path) -> None:
    assert CHROMIUM, "Chromium is not installed: apt-get install chromium (test.sh does this)"
    from playwright import sync_api

    models = tmp_path / "models"
    shutil.copytree(trained_models_dir, models)
    env = {"FOD_MODELS_DIR": str(models), "FOD_HISTORY_DB": str(tmp_path / "history.sqlite3")}
    SHOTS.mkdir(parents=True, exist_ok=True)
    with app_server(tmp_path, **env) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{url}/models")
            _wait_idle(page)
            expander = page.get_by_text("Ignore regions (fixtures, labels, edges that never count)")
            expander.wait_for(timeout=180_000)
            expander.click()
            _wait_idle(page)
            page.get_by_text("Every pixel counts").first.wait_for(timeout=30_000)
            box = page.get_by_role("textbox", name="Rectangles: x0,y0,x1,y1")
            box.fill("0,0,0.5,1")
            page.get_by_role("button", name="Apply").click()
            page.get_by_text("Saved. Inspect, Explore and Evaluate use them").first.wait_for(timeout=60_000)
            meta = json.loads((models / "test-model" / "bundle.json").read_text())
            assert meta["ignore_regions"]["rectangles"] == [[0.0, 0.0, 0.5, 1.0]]
            assert meta["ignore_regions"]["calibrated"] is False
            assert "-i" in meta["model_version"]  # a new model version: results are not comparable across it
            preview = page.locator("[data-testid='stImageContainer']").filter(has_text="Magenta: ignored").first
            assert preview.locator("img").bounding_box()["width"] > 100

            page.reload()
            _wait_idle(page)
            page.get_by_text("Ignore regions (fixtures, labels, edges that never count)").click()
            page.get_by_text("50% of the image is ignored").first.wait_for(timeout=60_000)
            assert cut_off_text(page) == []  # the Models page with the ignore panel open
            page.screenshot(path=str(SHOTS / "ignore_regions.png"), full_page=True)
            assert not page.get_by_test_id("stException").count()
        finally:
            browser.close()
