"""End to end in a real headless Chromium: start the app, type a prompt, find the heatmap."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def app_url():
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
