"""Time to the new figure in a real headless Chromium, after typing a fresh 64-token prompt.

The app runs as ``streamlit run app.py`` and Chromium (Debian's ``/usr/bin/chromium``,
driven by Playwright) runs on the same machine, so the browser's own rendering shares the
two cores with the computation; with the browser on another machine, as when a user
opens a served app, the time is closer to ``bench_app.py``'s script time.

The model is warmed on Home first. Each page is opened once, then for every fresh prompt
the timer runs from leaving the prompt box (which applies the edit) until the rerun it
starts has finished and its figures are on the page.

Run: ``python benchmarks/bench_browser.py [--repeats 3]``.
Writes ``benchmarks/results/browser.json`` and prints medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHROMIUM = "/usr/bin/chromium"
RUNNING = '[data-testid="stStatusWidget"]'  # Streamlit's "Running..." while a script runs


def _prompts(n: int, first_seed: int) -> list[str]:
    sys.path.insert(0, str(HERE))
    from bench_app import _prompt

    import lenskit

    model = lenskit.load_model()
    out, seed = [], first_seed
    while len(out) < n:
        with contextlib.suppress(SystemExit):  # no 64-token cut at this offset
            out.append(_prompt(model, seed))
        seed += 1
    return out


def _serve() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(240):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the app did not start")


def _time_prompt(page: object, prompt: str) -> float:
    """Seconds from applying ``prompt`` until the rerun it starts has drawn its figures."""
    page.get_by_label("Prompt").fill(prompt)
    start = time.perf_counter()
    page.locator("h1").first.click()  # leaving the box applies the edit
    page.wait_for_selector(RUNNING, timeout=30_000)  # the rerun has started
    page.wait_for_selector(RUNNING, state="detached", timeout=300_000)
    seconds = time.perf_counter() - start
    if page.locator(".js-plotly-plot").count() == 0:
        raise SystemExit("the rerun drew no figure")
    return seconds


def main() -> None:
    """Serve the app, warm it, and time each page on fresh prompts."""
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    pages = {
        "trajectory": "Trajectory page (logit lens, as it opens)",
        "compare": "Compare page (default lenses, as it opens)",
    }
    prompts = _prompts(len(pages) * (args.repeats + 1), first_seed=700)
    proc, url = _serve()
    results: dict[str, object] = {"prompt_tokens": 64, "browser": "headless Chromium, same machine"}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, timeout=240_000)
            page.get_by_text("ready", exact=False).first.wait_for(timeout=240_000)
            for i, (path, name) in enumerate(pages.items()):
                page.goto(f"{url}/{path}", timeout=120_000)
                try:
                    page.locator(".js-plotly-plot").first.wait_for(timeout=240_000)
                except Exception:
                    page.screenshot(path="/tmp/bench_browser_fail.png", full_page=True)
                    raise
                mine = prompts[i * (args.repeats + 1) : (i + 1) * (args.repeats + 1)]
                _time_prompt(page, mine[0])  # the page's lenses load on the first prompt
                times = [_time_prompt(page, p) for p in mine[1:]]
                results[name] = {"seconds": times, "median_s": statistics.median(times)}
                print(f"{name:45s} median {statistics.median(times):.2f} s  {times}")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "browser.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
