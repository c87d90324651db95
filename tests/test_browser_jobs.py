"""Real Chromium at 1280 px: a training job belongs to the server, not to the tab.

Start the demo training from Home, reload the tab: the job is still shown (sidebar, any page) with its progress
and a measured time left; the reloaded tab can cancel it after confirming; nothing is saved.
Screenshots go to test-artifacts/screenshots/jobs_*.png.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_browser_explore import ARGS, CHROMIUM, _wait_idle, app_server
from test_browser_explore_compare import cut_off_text

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-artifacts" / "screenshots"


def test_training_survives_a_reload_and_is_cancelled_from_the_new_tab(tmp_path: Path) -> None:
    assert CHROMIUM, "Chromium is not installed: apt-get install chromium (test.sh does this)"
    from playwright import sync_api

    models = tmp_path / "models"
    SHOTS.mkdir(parents=True, exist_ok=True)
    # a long epoch budget, so the job is still learning when it is cancelled
    with app_server(tmp_path, FOD_MODELS_DIR=str(models), FOD_DEMO_EPOCHS="400") as url, \
            sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url, wait_until="domcontentloaded", timeout=180_000)
            _wait_idle(page)
            page.get_by_role("button", name="Train demo model on sample data").click()
            sidebar = page.locator("[data-testid='stSidebar']")
            sidebar.get_by_text("Training “demo-solar-cells”").wait_for(timeout=120_000)
            sidebar.get_by_text("Yours (this tab).").wait_for(timeout=60_000)

            page.reload(wait_until="domcontentloaded", timeout=180_000)  # a loaded machine is slow
            # (no wait for an idle script here: while a job runs, the polling fragments rerun all the time)
            sidebar = page.locator("[data-testid='stSidebar']")
            sidebar.get_by_text("Training “demo-solar-cells”").wait_for(timeout=60_000)
            sidebar.get_by_text("Started in another tab or by another user.").wait_for(timeout=60_000)
            sidebar.locator("[data-testid='stProgress']").first.wait_for(timeout=60_000)
            assert sidebar.locator("[data-testid='stProgress']").count() == 1
            # progress (phase and percentage) and the time left: "estimating…" until learning steps are measured
            # (on a loaded 2-core machine the feature phase alone can take minutes), then a measured figure
            sidebar.get_by_text(re.compile(r"… \d+%")).first.wait_for(timeout=60_000)
            sidebar.get_by_text(re.compile(r"Time left \(learning step\): (estimating…|almost done|\d+ (s|min))"))\
                .wait_for(timeout=60_000)
            assert cut_off_text(page) == []  # sidebar progress and time left fit
            page.screenshot(path=str(SHOTS / "jobs_1_after_reload.png"), full_page=True)

            # the Train page of the reloaded tab shows the same job, not a new form
            page.goto(f"{url}/train", wait_until="domcontentloaded", timeout=180_000)
            page.get_by_role("heading", name="Training “demo-solar-cells”").wait_for(timeout=60_000)
            assert page.get_by_text("Where are your good images?").count() == 0

            # cancel from the new tab: asks first
            page.locator("[data-testid='stSidebar']").get_by_role("button", name="Cancel training…").click()
            page.get_by_text("Stop the training of “demo-solar-cells”?").first.wait_for(timeout=60_000)
            stopping = page.get_by_text("Stopping… the model will not be saved.").first
            done = stopping.or_(sidebar.get_by_text("was cancelled"))
            for _ in range(4):  # a click can land while a polling fragment redraws the button; try again
                yes = page.get_by_role("button", name="Yes, stop it").first
                if yes.is_visible():
                    yes.click()
                try:
                    done.wait_for(timeout=30_000)
                    break
                except sync_api.TimeoutError:
                    continue
            done.wait_for(timeout=10_000)
            # the worker stops at its next check (per image batch / learning step): slow on a loaded machine
            sidebar = page.locator("[data-testid='stSidebar']")
            sidebar.get_by_text("Training of “demo-solar-cells” was cancelled").wait_for(timeout=400_000)
            # the page refreshes once: the Train page of this tab (which watched the job) shows the outcome
            main = page.locator("[data-testid='stMain']")
            main.get_by_text("Training of “demo-solar-cells” was cancelled. Nothing was saved.").wait_for(timeout=60000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(SHOTS / "jobs_2_cancelled.png"), full_page=True)
            assert not (models / "demo-solar-cells").exists(), "a cancelled job saves nothing"
        finally:
            browser.close()
