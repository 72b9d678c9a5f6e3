"""Every app page under Streamlit's AppTest, with a tiny model and the real default model."""

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import app_state as S

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["app.py", "pages/trajectory.py", "pages/compare.py"]


def _run(page, model="tiny-llama", prompt="Hello there, friend", **state):
    at = AppTest.from_file(str(ROOT / page), default_timeout=300)
    at.session_state[S.MODEL] = model
    at.session_state[S.PROMPT] = prompt
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


@pytest.mark.parametrize("page", PAGES)
def test_pages_run_on_a_tiny_model(page):
    at = _run(page)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def test_home_lists_lenses():
    at = _run("app.py")
    text = " ".join(m.value for m in at.markdown)
    assert "**logit** — ready" in text and "tiny-llama" in text


def test_trajectory_page_draws_a_heatmap():
    at = _run("pages/trajectory.py")
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    assert [t["type"] for t in json.loads(charts[0].proto.spec)["data"]] == ["heatmap"]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("   ", "prompt is empty"), ("x" * 200, "longer than the model's context")],
)
def test_bad_prompts_show_an_error_not_a_traceback(prompt, message):
    for page in PAGES:
        at = _run(page, prompt=prompt)
        assert not at.exception
        assert any(message in e.value for e in at.error), (page, [e.value for e in at.error])


def test_unknown_model_offline_is_an_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = _run("app.py", model="nobody/none-such-xyz")
    assert not at.exception
    assert any("not in the local Hugging Face cache" in e.value for e in at.error)


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_pages_run_on_the_default_model(page):
    at = _run(page, model="smollm2-135m", prompt="The capital of France is")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def test_compare_page_with_a_saved_tuned_lens(tmp_path, tiny_llama):
    from lenskit.lenses.tuned import TunedLens

    TunedLens.untrained(tiny_llama).save(tmp_path / "lens")
    at = _run("pages/compare.py", **{S.LENS_PATHS: {"tuned": str(tmp_path / "lens")}})
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(specs) == 2  # the side-by-side heatmaps and the divergence map
    assert [t["type"] for t in specs[0]["data"]] == ["heatmap", "heatmap"]
    assert [t["type"] for t in specs[1]["data"]] == ["heatmap"]
