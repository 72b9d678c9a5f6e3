"""End to end in a real headless Chromium: start the app, type a prompt, find the heatmap.

The 1600 px tests also write the README's screenshots (``docs/screenshots/*.png``).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
SCREENSHOTS = ROOT / "docs" / "screenshots"  # the README's pictures, made here from the app
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# 38 tokens with the BOS: the Compare page shows the last 32 by default.
LONG_PROMPT = (
    "The Eiffel Tower is in Paris, the capital of France. The Colosseum stands in Rome, "
    "the capital of Italy. The Brandenburg Gate is in Berlin, the capital of"
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    """One app server for the module's tests (each browser page is its own session)."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "app.py",
            "--server.port",
            str(port),
            "--server.headless",
            "true",
            "--browser.gatherUsageStats",
            "false",
            "--server.fileWatcherType",  # no "File change" banner in the screenshots
            "none",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)
def test_type_a_prompt_and_see_the_heatmap(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, timeout=120_000)
            box = page.get_by_label("Prompt")
            box.wait_for(timeout=240_000)  # the first start may convert the model
            box.fill("The Eiffel Tower is in the city of")
            box.press("Control+Enter")
            page.get_by_text("ready", exact=False).first.wait_for(timeout=120_000)
            page.get_by_role("link", name="Trajectory").click()
            page.locator(".js-plotly-plot").first.wait_for(timeout=180_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ARTIFACTS / "app-trajectory.png"), full_page=True)
            assert page.locator(".js-plotly-plot .heatmaplayer, .js-plotly-plot .hm").count() > 0
            assert "Eiffel" in page.content()
            # Every later edit of the prompt redraws the heatmap too (none is dropped).
            for word in ("Rome", "Madrid", "Lisbon"):
                box = page.get_by_label("Prompt")
                box.fill(f"The city we visited last year was {word}, and")
                page.locator("h1").first.click()  # leaving the box applies the edit
                page.locator(".js-plotly-plot .xtick text", has_text=word).first.wait_for(
                    timeout=120_000
                )
        finally:
            browser.close()


def _shot(page, name, height=None):
    """A screenshot of the whole page at 1600 px wide, for the README."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    if height:
        page.set_viewport_size({"width": 1600, "height": height})
        page.wait_for_timeout(1500)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _download(page, label):
    """Click the first download button named ``label``; the file's name and bytes."""
    with page.expect_download(timeout=120_000) as info:
        page.get_by_role("button", name=label, exact=True).first.click()
    return info.value.suggested_filename, Path(info.value.path()).read_bytes()


def _open(page, name):
    page.get_by_role("link", name=name).first.click()
    page.locator(".js-plotly-plot").first.wait_for(timeout=240_000)
    page.wait_for_timeout(2500)


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)
def test_pages_at_1600_px_four_lenses_one_click_to_a_position_and_downloads(app_url):
    """The default four lenses on a 32-token range at 1600 px: legible, clickable, exportable."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200}, accept_downloads=True)
            page.goto(app_url, timeout=120_000)
            box = page.get_by_label("Prompt")
            box.wait_for(timeout=240_000)
            box.fill(LONG_PROMPT)
            page.locator("h1").first.click()
            page.get_by_text("ready", exact=False).first.wait_for(timeout=120_000)
            page.wait_for_timeout(1500)
            _shot(page, "home")

            _open(page, "Trajectory")
            _shot(page, "trajectory", 1500)
            # The figure as the server's Chromium draws it: a real PNG and a real SVG.
            name, data = _download(page, "PNG")
            assert name.endswith(".png") and data.startswith(b"\x89PNG\r\n\x1a\n")
            name, data = _download(page, "SVG")
            assert name.endswith(".svg") and ET.fromstring(data).tag.endswith("}svg")
            assert b"input token" in data  # labels are text, not pixels
            name, data = _download(page, "CSV")
            assert name.endswith(".csv") and len(data) > 1000

            _open(page, "Compare")
            # The four lenses, stacked in one figure (waited for: the page may still be
            # reading them while the previous page's figure is on screen).
            page.wait_for_function(
                "() => document.querySelector('.js-plotly-plot')"
                "?.querySelectorAll('.hm').length === 4",
                timeout=240_000,
            )
            page.wait_for_timeout(1500)
            chart = page.locator(".js-plotly-plot").first
            # Cell labels are drawn (11 px) in every panel, not colour alone.
            sizes = chart.locator(".hm text, .heatmaplayer text").evaluate_all(
                "els => els.map(e => parseFloat(getComputedStyle(e).fontSize))"
            )
            assert len(sizes) > 4 * 32 and min(sizes) >= 11
            _shot(page, "compare", 4600)
            # One click on a cell: the position in depth follows it.
            area = chart.locator(".nsewdrag").first.bounding_box()
            page.mouse.click(area["x"] + area["width"] * 0.25, area["y"] + area["height"] * 0.5)
            page.wait_for_function(
                "() => [...document.querySelectorAll('.gtitle')].some("
                "t => /position \\d+/.test(t.textContent) && !t.textContent.includes("
                "'position 37'))",
                timeout=120_000,
            )
            page.wait_for_timeout(2000)
            _shot(page, "compare-position", 4600)
            assert _download(page, "Parquet")[0].endswith(".parquet")

            page.set_viewport_size({"width": 1600, "height": 1200})
            _open(page, "Causal basis")
            _shot(page, "causal-basis", 2200)
            assert _download(page, "HTML")[0].endswith(".html")
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)
def test_a_small_evaluation_and_the_train_form_at_1600_px(app_url):
    """Evaluate the logit and tuned lenses on 256 tokens of the default corpus; its figure."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1200}, accept_downloads=True)
            page.goto(app_url, timeout=120_000)
            page.get_by_label("Prompt").wait_for(timeout=240_000)
            page.get_by_role("link", name="Evaluate").first.click()
            page.get_by_label("Tokens", exact=True).wait_for(timeout=240_000)
            for kind in ("jacobian", "tuned-with-causal-basis"):
                page.get_by_role("button", name=f"Remove {kind}").click()
                page.wait_for_timeout(1000)
            for label, value in (("Tokens", "256"), ("Tokens per sequence", "64")):
                box = page.get_by_label(label, exact=True)
                box.fill(value)
                box.press("Enter")
                page.wait_for_timeout(1000)
            page.get_by_role("button", name="Run", exact=True).click()
            chart = page.locator(".js-plotly-plot").first
            chart.wait_for(timeout=600_000)
            page.wait_for_timeout(2000)
            legend = chart.locator(".legendtext").all_text_contents()
            assert {"logit", "tuned"} <= set(legend)
            assert "256 tokens" in page.content()
            _shot(page, "evaluate", 1700)

            page.set_viewport_size({"width": 1600, "height": 1200})
            page.get_by_role("link", name="Train").first.click()
            page.get_by_role("button", name="Start", exact=True).wait_for(timeout=240_000)
            page.get_by_text("More settings").click()  # every setting in view
            page.wait_for_timeout(1500)
            _shot(page, "train", 800)
        finally:
            browser.close()
