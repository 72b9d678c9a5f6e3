"""Time to the first figure on the app's Trajectory and Compare pages, model warm.

Each page runs under Streamlit's ``AppTest`` (the same script a browser session runs)
with the embedded SmolLM2 already loaded and a fresh 64-token prompt every time, so the
lenses' readouts are computed, never served from ``st.cache_data``. The time is one
full script run: widgets, the lens readouts, and the plotly figures.

Run: ``python benchmarks/bench_app.py [--repeats 3]``.
Writes ``benchmarks/results/app.json`` and prints medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT_TOKENS = 64


def _prompt(model: object, seed: int) -> str:
    """A prompt of exactly 64 tokens (with BOS): a window of the default corpus."""
    from lenskit.data import default_corpus
    from lenskit.residual import tokenize

    text = max(default_corpus().documents, key=len)
    ids = model.tokenizer(text[: 20000], add_special_tokens=False)["input_ids"]
    start = (97 * seed) % (len(ids) - 2 * PROMPT_TOKENS)
    for n in range(PROMPT_TOKENS - 1, PROMPT_TOKENS + 8):
        prompt = model.tokenizer.decode(ids[start : start + n])
        if tokenize(model, prompt).shape[-1] == PROMPT_TOKENS:
            return prompt
    raise SystemExit("could not cut a 64-token prompt")


def _time_page(page: str, prompt: str, state: dict[str, object]) -> float:
    from streamlit.testing.v1 import AppTest

    import app_state as S

    at = AppTest.from_file(str(ROOT / page), default_timeout=600)
    at.session_state[S.MODEL] = "smollm2-135m"
    at.session_state[S.PROMPT] = prompt
    for key, value in state.items():
        at.session_state[key] = value
    start = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - start
    if at.exception or at.error or not at.get("plotly_chart"):
        raise SystemExit(f"{page} did not draw: {at.exception or [e.value for e in at.error]}")
    return seconds


def main() -> None:
    """Warm the model, then time each page on fresh prompts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import app_state as S

    model = S.load_model("smollm2-135m", "cpu", "float32")  # warm: st.cache_resource
    _time_page("pages/trajectory.py", _prompt(model, 99), {})  # warm the lenses
    _time_page("pages/compare.py", _prompt(model, 98), {})
    pages = {
        "trajectory (logit lens)": ("pages/trajectory.py", {}),
        "compare (default lenses)": ("pages/compare.py", {}),
    }
    results: dict[str, object] = {"prompt_tokens": PROMPT_TOKENS}
    for i, (name, (page, state)) in enumerate(pages.items()):
        times = [_time_page(page, _prompt(model, 10 * i + r), state) for r in range(args.repeats)]
        results[name] = {"seconds": times, "median_s": statistics.median(times)}
        print(f"{name:28s} median {statistics.median(times):.2f} s  {times}")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "app.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
