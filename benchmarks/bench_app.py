"""Time to the first figure on the app's Trajectory and Compare pages, model warm.

Each page runs under Streamlit's ``AppTest`` (the same script a browser session runs)
with the embedded SmolLM2 already loaded: the user types a fresh 64-token prompt, so the
lenses' readouts are computed, never served from ``st.cache_data``. The time is one
full script rerun: widgets, the lens readouts, and the plotly figures.

The pages read only the cells they show. Each page is timed twice per prompt: as it
opens (Trajectory: every layer, the last 32 tokens; Compare: logit, tuned,
tuned-with-causal-basis and jacobian lenses, every second layer, the last 16 tokens),
and then widened to every layer and all 64 tokens (a rerun that reads the new cells).

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
    ids = model.tokenizer(text[:20000], add_special_tokens=False)["input_ids"]
    start = (97 * seed) % (len(ids) - 2 * PROMPT_TOKENS)
    for n in range(PROMPT_TOKENS - 1, PROMPT_TOKENS + 8):
        prompt = model.tokenizer.decode(ids[start : start + n])
        if tokenize(model, prompt).shape[-1] == PROMPT_TOKENS:
            return prompt
    raise SystemExit("could not cut a 64-token prompt")


def _check(at: object, page: str) -> None:
    if at.exception or at.error or not at.get("plotly_chart"):
        raise SystemExit(f"{page} did not draw: {at.exception or [e.value for e in at.error]}")


def _time_page(page: str, warm_prompt: str, prompt: str) -> tuple[float, float]:
    """Seconds to the figures after typing a fresh prompt, and after widening to every cell.

    The page first runs once on ``warm_prompt``: that run pays AppTest's own start-up (it
    scans every installed package for Streamlit components, about 1.5 s here, which a
    running app server does once at launch), so the timed reruns are the user's.
    """
    from streamlit.testing.v1 import AppTest

    import lenskit_app.state as S

    at = AppTest.from_file(str(ROOT / page), default_timeout=600)
    at.session_state[S.MODEL] = "smollm2-135m"
    at.session_state[S.PROMPT] = warm_prompt
    at.run()
    _check(at, page)
    at.text_area[0].set_value(prompt)  # the user types a new prompt
    start = time.perf_counter()
    at.run()
    opened = time.perf_counter() - start
    _check(at, page)
    stride, tokens = (s for s in at.slider if s.label in ("Layer stride", "Token range"))
    if tokens.max != PROMPT_TOKENS:
        raise SystemExit(f"{page}: the prompt is {tokens.max} tokens, not {PROMPT_TOKENS}")
    stride.set_value(1)
    tokens.set_value((0, tokens.max))
    start = time.perf_counter()
    at.run()
    widened = time.perf_counter() - start
    _check(at, page)
    return opened, widened


def main() -> None:
    """Warm the model, then time each page on fresh prompts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from lenskit_app.loaders import load_model

    model = load_model("smollm2-135m", "cpu", "float32")  # warm: st.cache_resource
    _time_page("pages/trajectory.py", _prompt(model, 99), _prompt(model, 97))  # load lenses
    _time_page("pages/compare.py", _prompt(model, 98), _prompt(model, 96))
    pages = {
        "trajectory (logit lens)": "pages/trajectory.py",
        "compare (default lenses)": "pages/compare.py",
    }
    results: dict[str, object] = {"prompt_tokens": PROMPT_TOKENS}
    for i, (name, page) in enumerate(pages.items()):
        runs = [
            _time_page(page, _prompt(model, 50 + 10 * i + r), _prompt(model, 10 * i + r))
            for r in range(args.repeats)
        ]
        for view, times in (
            ("as opened", [o for o, _ in runs]),
            ("every layer, all 64 tokens", [w for _, w in runs]),
        ):
            key = f"{name}, {view}"
            results[key] = {"seconds": times, "median_s": statistics.median(times)}
            print(f"{key:58s} median {statistics.median(times):.2f} s  {times}")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "app.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
