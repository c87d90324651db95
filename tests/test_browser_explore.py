"""Real-browser test of the one thing AppTest cannot drive: clicking a patch in the Explore page's Plotly chart.

Starts ``streamlit run app.py`` on a free port with the session's test model and drives Debian's Chromium
with Playwright. Chromium comes from Debian (``apt-get install chromium``; test.sh installs it); missing -> fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def app_server(tmp_path: Path, **env_overrides: str) -> Iterator[str]:
    """``streamlit run app.py`` on a free loopback port with extra environment; yields its URL."""
    port = _free_port()
    env = {**os.environ, "FOD_DEVICE": "cpu", **env_overrides}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError((tmp_path / "server.log").read_text()) from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def app_url(trained_models_dir: Path, tmp_path: Path) -> Iterator[str]:
    with app_server(tmp_path, FOD_MODELS_DIR=str(trained_models_dir)) as url:
        yield url


def _wait_idle(page) -> None:
    page.wait_for_timeout(400)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=180_000)
    page.wait_for_timeout(600)


def _patch_position(page, row: int, col: int) -> tuple[float, float]:
    """Screen position of patch (row, col) (1-based, as on the axes) in the first Plotly chart."""
    page.evaluate("document.querySelectorAll('.js-plotly-plot')[0].scrollIntoView({block: 'center'})")
    page.wait_for_timeout(300)
    return tuple(page.evaluate(
        """([x, y]) => { const gd = document.querySelectorAll('.js-plotly-plot')[0]; const L = gd._fullLayout;
            const r = gd.getBoundingClientRect();
            return [r.left + L.xaxis._offset + L.xaxis.l2p(x), r.top + L.yaxis._offset + L.yaxis.l2p(y)]; }""",
        [col, row],
    ))


def test_clicking_a_patch_updates_the_explorer(app_url: str) -> None:
    assert CHROMIUM, "Chromium is not installed: apt-get install chromium (test.sh does this)"
    from playwright import sync_api
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(app_url)
            _wait_idle(page)
            page.get_by_test_id("stSidebarNavItems").get_by_role("link", name="Explore correlations").click()
            _wait_idle(page)
            page.wait_for_selector(".js-plotly-plot", timeout=120_000)
            _wait_idle(page)
            for row, col in [(5, 7), (20, 12), (20, 12), (32, 1)]:
                x, y = _patch_position(page, row, col)
                page.mouse.move(x, y)
                page.wait_for_timeout(300)
                started = time.perf_counter()
                page.mouse.click(x, y)
                page.get_by_text(f"Patch row {row}, column {col}").first.wait_for(timeout=20_000)
                print(f"\n[browser] click on patch ({row}, {col}): view updated after "
                      f"{time.perf_counter() - started:.2f} s")
                _wait_idle(page)
                assert page.get_by_label("Row").input_value() == str(row)
                assert page.get_by_label("Column").input_value() == str(col)
            assert not page.get_by_test_id("stException").count()
        finally:
            browser.close()
