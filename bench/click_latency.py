"""Click latency of the Explore and Inspect pages in a real browser (Playwright + Debian Chromium).

Starts ``streamlit run app.py`` on a free loopback port with the models in ``--models-dir``, then repeats each
interaction ``--repeats`` times and prints the median (and all) latencies in seconds. A latency is the time from
the click until the page has settled: the script run is over and nothing in the main area has changed for
``QUIET_MS``, measured from the action's last click as the browser registered it (a ``pointerup`` listener), so
opening a drop-down list or moving to a patch is not counted. The settle wait itself is not counted (the time of the
last change is). Also printed: when the browser was told that the server's (fragment) run was over.

    .venv/bin/python bench/click_latency.py --models-dir models --repeats 5 --json bench/results/click_latency.json

Interactions whose first run computes something (first explanation of an image, inspecting a batch) are listed
separately as "first" and are not part of the under-a-second target. Needs at least one full FOD model; with two
or more models the Inspect model switch is measured too (between the first two).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET_MS = 600
SCRIPT_DONE: list[float] = []  # per timed click: seconds until the server's run was over
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]

# Records the time of the last change in the main area and of every script-state change (page clock, ms).
OBSERVER_JS = """() => {
  if (window.__latency) return;
  const main = document.querySelector("[data-testid='stMain']") || document.body;
  window.__latency = {last: performance.now(), states: [], clicks: []};
  // The user's last click as the browser saw it (capturing, before any widget handles it): latency starts here.
  document.addEventListener('pointerup', () => { window.__latency.clicks.push(performance.now()); }, true);
  new MutationObserver(() => { window.__latency.last = performance.now(); })
    .observe(main, {subtree: true, childList: true, attributes: true, characterData: true});
  const app = document.querySelector("[data-testid='stApp']");
  new MutationObserver(() => {
    window.__latency.states.push([performance.now(), app.getAttribute('data-test-script-state')]);
  }).observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});
}"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(models_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "FOD_MODELS_DIR": str(models_dir), "FOD_DEVICE": os.environ.get("FOD_DEVICE", "cpu")}
    log = open(log_path, "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless",
         "true", "--browser.gatherUsageStats", "false"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
            return server, url
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(log_path.read_text()) from None
            time.sleep(0.5)


def settle(page, timeout_s: float = 300.0) -> None:
    """Wait until the script is not running and the main area has been quiet for QUIET_MS."""
    page.wait_for_timeout(150)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = page.evaluate("""() => [document.querySelector("[data-testid='stApp']")
            .getAttribute('data-test-script-state'), performance.now() - window.__latency.last]""")
        if state[0] == "notRunning" and state[1] >= QUIET_MS:
            return
        page.wait_for_timeout(100)
    raise TimeoutError("the page did not settle")


def timed(page, action, timeout_s: float = 300.0) -> float:
    """Seconds from just before ``action()`` until the last change of the main area once the page settled."""
    page.evaluate(OBSERVER_JS)
    settle(page, timeout_s)
    start = page.evaluate("performance.now()")
    action()
    page.wait_for_timeout(250)  # let the rerun start
    settle(page, timeout_s)
    last, states, clicks = page.evaluate("[window.__latency.last, window.__latency.states, window.__latency.clicks]")
    # Opening a drop-down or moving the mouse onto a patch is the user's time, not the app's: the latency starts at
    # the last click of the action (falls back to the start of the action if the browser saw no pointer event).
    clicks = [t for t in clicks if t >= start]
    start = clicks[-1] if clicks else start
    # When the server said the (fragment) run was over: the rest of the latency is the browser drawing the result.
    done = [t for t, state in states if t >= start and state == "notRunning"]
    SCRIPT_DONE.append(max(0.0, (done[-1] - start) / 1000.0) if done else float("nan"))
    return max(0.0, (last - start) / 1000.0)


def _open_list(page, label: str) -> None:
    """Open the selectbox ``label``'s list (blur whatever has the focus first; retry: a focused box may not open)."""
    for _ in range(3):
        page.mouse.click(5, 5)
        page.wait_for_timeout(100)
        page.get_by_role("combobox", name=label, exact=True).first.click()
        try:
            page.get_by_role("option").first.wait_for(timeout=3_000)
            return
        except Exception:  # noqa: BLE001 - the list did not open; try again
            continue
    raise RuntimeError(f"the {label!r} list does not open")


def choose(page, label: str, option: str) -> None:
    """Open the selectbox whose label is ``label`` and click ``option``."""
    _open_list(page, label)
    page.get_by_role("option", name=option, exact=True).first.click()


def choose_nth(page, label: str, index: int) -> None:
    """Open the selectbox ``label`` and click its option number ``index`` (0-based)."""
    _open_list(page, label)
    page.get_by_role("option").nth(index).click()


def patch_click(page, chart_index: int, row: int, col: int) -> None:
    page.evaluate(f"document.querySelectorAll('.js-plotly-plot')[{chart_index}].scrollIntoView({{block: 'center'}})")
    page.wait_for_timeout(200)
    x, y = page.evaluate(
        """([i, x, y]) => { const gd = document.querySelectorAll('.js-plotly-plot')[i]; const L = gd._fullLayout;
            const r = gd.getBoundingClientRect();
            return [r.left + L.xaxis._offset + L.xaxis.l2p(x), r.top + L.yaxis._offset + L.yaxis.l2p(y)]; }""",
        [chart_index, col, row])
    page.mouse.move(x, y)
    page.wait_for_timeout(150)
    page.mouse.click(x, y)


def measure(page, name: str, actions: list, results: dict) -> None:
    times, server = [], []
    for action in actions:
        times.append(round(timed(page, action), 3))
        server.append(round(SCRIPT_DONE[-1], 3))
    results[name] = {"median_s": round(statistics.median(times), 3), "runs_s": times,
                     "script_done_median_s": round(statistics.median(server), 3)}
    print(f"{name:<44} median {results[name]['median_s']:6.2f} s (server run over after "
          f"{results[name]['script_done_median_s']:.2f} s)   runs {times}", flush=True)


def explore(page, url: str, repeats: int, results: dict) -> None:
    page.goto(f"{url}/explore")
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 4", timeout=600_000)
    page.evaluate(OBSERVER_JS)
    settle(page, 600)
    page.get_by_text("Transformer layer", exact=True).first.scroll_into_view_if_needed()
    alternate = [(i % 2) for i in range(repeats)]
    measure(page, "explore: transformer layer drop-down",
            [lambda i=i: choose(page, "Transformer layer", f"Layer {2 - i} of 2") for i in alternate], results)
    measure(page, "explore: attention head drop-down",
            [lambda i=i: choose(page, "Attention head", "Head 1" if i == 0 else "Average of heads") for i in alternate],
            results)
    measure(page, "explore: level drop-down", [lambda i=i: choose_nth(page, "Level", 1 - i) for i in alternate],
            results)
    cells = [(5 + 3 * i, 7 + 2 * i) for i in range(repeats)]
    measure(page, "explore: click a patch", [lambda rc=rc: patch_click(page, 0, *rc) for rc in cells], results)
    measure(page, "explore: log-colours toggle", [lambda: page.get_by_text("Log colours", exact=True).click()
                                                  for _ in range(repeats)], results)
    measure(page, "explore: swap A and B button", [lambda: page.get_by_role("button", name="Swap A ↔ B").click()
                                                   for _ in range(repeats)], results)
    samples = ["defect_02.png", "defect_01.png"]
    measure(page, "explore: sample image (first explanation)",
            [lambda: choose(page, "Sample image", samples[0])], results)
    measure(page, "explore: sample image (already explained)",
            [lambda i=i: choose(page, "Sample image", samples[(i + 1) % 2]) for i in range(repeats)], results)


def inspect(page, url: str, repeats: int, results: dict, models: list[str]) -> None:
    page.goto(f"{url}/inspect")
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=300_000)
    page.evaluate(OBSERVER_JS)
    settle(page)
    measure(page, "inspect: sample images (new batch)",
            [lambda: page.get_by_role("button", name="Try the sample images").click()], results)
    measure(page, "inspect: REVIEW checkbox",
            [lambda: page.get_by_text("Send borderline parts to manual REVIEW").click() for _ in range(repeats)],
            results)
    measure(page, "inspect: heat-map image selector",
            [lambda i=i: choose_nth(page, "Image", 1 + i % 3) for i in range(repeats)], results)
    if len(models) >= 2:
        pair = [models[1], models[0]]
        measure(page, "inspect: switch model (first time)", [lambda: choose(page, "Model", pair[0])], results)
        measure(page, "inspect: switch model (back and forth)",
                [lambda i=i: choose(page, "Model", pair[(i + 1) % 2]) for i in range(repeats)], results)


def models_page(page, url: str, repeats: int, results: dict, models: list[str]) -> None:
    """Rename a model on the Models page (to ``<name>-renamed`` and back, alternately; it ends with its old name)."""
    page.goto(f"{url}/models")
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=300_000)
    page.evaluate(OBSERVER_JS)
    settle(page)
    original = models[-1]
    names = [original, f"{original}-renamed"]
    choose(page, "Model", original)
    settle(page)

    def rename(i: int) -> None:
        box = page.get_by_label("New name", exact=True).first
        box.fill(names[(i + 1) % 2])
        page.get_by_role("button", name="Rename").first.click()

    measure(page, "models: rename a model", [lambda i=i: rename(i) for i in range(repeats)], results)
    if repeats % 2:  # give it its old name back (not timed)
        rename(repeats)
        settle(page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--pages", default="explore,inspect,models")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("Chromium is not installed: apt-get install chromium")
    models = sorted(p.name for p in args.models_dir.iterdir() if (p / "bundle.json").is_file()) \
        if args.models_dir.is_dir() else []
    if not models:
        sys.exit(f"No model in {args.models_dir}: train one first (python -m fod_app train ...).")
    from playwright import sync_api

    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / "click_latency_server.log"
    server, url = start_server(args.models_dir.resolve(), log_path)
    results: dict = {}
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": 1000})
            if "explore" in args.pages:
                explore(page, url, args.repeats, results)
            if "inspect" in args.pages:
                inspect(page, url, args.repeats, results, models)
            if "models" in args.pages:
                models_page(page, url, args.repeats, results, models)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    record = {"width": args.width, "repeats": args.repeats, "cpu_count": os.cpu_count(),
              "load_average": os.getloadavg(), "models": models, "results": results}
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    print(json.dumps({k: v["median_s"] for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
