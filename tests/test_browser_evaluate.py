"""Real browser (Debian Chromium via Playwright) at 1280 px: evaluate a plain good/ + defect/ folder given as a
server path under a data root, then click through to a false reject (or miss) and see photo, heat map and score.

Screenshot: test-artifacts/screenshots/evaluate_click_through.png.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_browser_explore import ARGS, CHROMIUM, _wait_idle, app_server
from test_browser_explore_compare import cut_off_text
from test_evaluate_folders import make_plain_set

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-artifacts" / "screenshots"


def test_evaluate_plain_folder_and_click_through_to_an_error(trained_models_dir: Path, tmp_path: Path) -> None:
    assert CHROMIUM, "Chromium is not installed: apt-get install chromium (test.sh does this)"
    from playwright import sync_api

    data_root = tmp_path / "data"
    folder = make_plain_set(data_root / "bottle_parts")
    env = {"FOD_MODELS_DIR": str(trained_models_dir), "FOD_DATA_ROOTS": str(data_root),
           "FOD_HISTORY_DB": str(tmp_path / "history.sqlite3")}
    SHOTS.mkdir(parents=True, exist_ok=True)
    with app_server(tmp_path, **env) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{url}/evaluate")
            _wait_idle(page)
            box = page.get_by_role("textbox", name="Folder on the server")
            box.wait_for(timeout=180_000)
            box.fill(str(folder))
            box.press("Enter")
            _wait_idle(page)
            page.get_by_text("Image-level metrics only").first.wait_for(timeout=60_000)
            page.get_by_role("button", name="Evaluate", exact=True).click()
            page.get_by_text("Evaluated 6 images").first.wait_for(timeout=300_000)
            # the results render below the success line while the script still runs: wait for each of them
            # (reading the body once right after the success line raced with the rendering on a slow CI machine)
            page.get_by_text("What each branch contributes").first.wait_for(timeout=120_000)
            _wait_idle(page)
            metric = page.locator("[data-testid='stMetric']").filter(has_text="Pixel AUROC").first
            assert metric.inner_text().count("— (no masks)") == 1, metric.inner_text()

            # click through: the group with errors, then the photo, heat map and score of its first image
            radio = page.get_by_test_id("stRadio").filter(has_text="False rejects")
            counts = {name: int(n) for name, n in re.findall(r"(Misses|False rejects) \((\d+)\)", radio.inner_text())}
            assert any(counts.values()), f"no miss and no false reject at the calibrated threshold: {counts}"
            group = "False rejects" if counts["False rejects"] else "Misses"
            radio.get_by_text(f"{group} ({counts[group]})").click()
            _wait_idle(page)
            photo = page.locator("[data-testid='stImageContainer']").filter(has_text="Photo:").first
            heat = page.locator("[data-testid='stImageContainer']").filter(has_text="Heat map").first
            photo.scroll_into_view_if_needed()
            photo.wait_for(timeout=30_000)
            heat.wait_for(timeout=30_000)
            page.wait_for_timeout(500)
            p_box, h_box = photo.locator("img").bounding_box(), heat.locator("img").bounding_box()
            assert p_box and h_box and p_box["width"] > 100
            assert abs(p_box["width"] - h_box["width"]) <= 2 and abs(p_box["height"] - h_box["height"]) <= 2
            caption = photo.inner_text()
            assert re.search(r"Photo: (good|defect)/\S+\.png", caption), caption
            score = page.locator("[data-testid='stMetric']").filter(has_text="Score").first.inner_text()
            assert re.search(r"\d+\.\d{3}", score), score
            expected_folder = "good/" if group == "False rejects" else "defect/"
            assert expected_folder in caption
            assert cut_off_text(page) == []  # metrics, tables and labels of the results fit at 1280 px
            page.screenshot(path=str(SHOTS / "evaluate_click_through.png"), full_page=True)
            assert not page.get_by_test_id("stException").count()
        finally:
            browser.close()
