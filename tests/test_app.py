"""Every app page under Streamlit's AppTest, with a tiny model and the real default model."""

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from helpers import write_corpus
from streamlit.testing.v1 import AppTest

import lenskit_app.state as S
from lenskit.training import CHECKPOINT_FILE
from lenskit_app import jobs
from lenskit_app.paths import DIRS_ENV

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["app.py", "pages/trajectory.py", "pages/compare.py"]  # the pages that read a prompt
ALL_PAGES = [*PAGES, "pages/evaluate.py", "pages/train.py", "pages/causal_basis.py"]


def _run(page, model="tiny-llama", prompt="Hello there, friend", **state):
    at = AppTest.from_file(str(ROOT / page), default_timeout=300)
    at.session_state[S.MODEL] = model
    at.session_state[S.PROMPT] = prompt
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


@pytest.mark.parametrize("page", ALL_PAGES)
def test_pages_run_on_a_tiny_model(page):
    at = _run(page)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def test_home_lists_lenses():
    at = _run("app.py")
    text = " ".join(m.value for m in at.markdown)
    assert "**logit** — ready" in text and "tiny-llama" in text


def test_trajectory_page_draws_a_heatmap_and_the_numbers_on_request():
    at = _run("pages/trajectory.py")
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    assert [t["type"] for t in json.loads(charts[0].proto.spec)["data"]] == ["heatmap"]
    assert not at.dataframe
    at.toggle[0].set_value(True).run()
    frame = at.dataframe[0].value
    n_rows = json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["z"]["shape"]
    assert len(frame) == int(n_rows.split(",")[0]) * int(n_rows.split(",")[1])


def test_pages_read_only_the_shown_cells_and_follow_the_sliders(workdir, tiny_llama):
    from lenskit.lenses.tuned import TunedLens

    TunedLens.untrained(tiny_llama).save(workdir / "lens")
    paths = {S.LENS_PATHS: {"tuned": str(workdir / "lens")}}
    prompt = "Hello there, friend, how are you today?"
    for page, kinds in (("pages/trajectory.py", 1), ("pages/compare.py", 2)):
        at = _run(page, prompt=prompt, **paths)
        n_tokens = at.slider[1].max
        at.slider[0].set_value(2).run()  # layer stride: rows 0, 2 and the output (tiny: 5 rows)
        at.slider[1].set_value((3, 9)).run()
        assert not at.exception and not at.error, (page, at.exception, at.error)
        spec = json.loads(at.get("plotly_chart")[0].proto.spec)
        heatmaps = [t for t in spec["data"] if t["type"] == "heatmap"]
        assert len(heatmaps) == kinds
        for trace in heatmaps:
            z = trace["z"]
            values = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"])
            assert z["shape"] == "3, 6" and np.isfinite(values).any()
        at.slider[1].set_value((0, n_tokens)).run()
        assert not at.exception and not at.error, (page, at.error)


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
    assert any("local Hugging Face cache" in e.value for e in at.error)


HOME = ROOT / "pages" / "home.py"


def test_home_model_box_keeps_every_edit(monkeypatch, home=HOME):
    """Two edits in a row of the model box: the second is kept as the first was."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    at = AppTest.from_file(str(home), default_timeout=300).run()
    at.selectbox[0].set_value("Other (local folder or Hugging Face id)…").run()
    for typed in ("no-such-org/x", "/etc", "no-such-org/y"):
        at.text_input[0].set_value(typed).run()
        assert not at.exception, at.exception
        assert at.session_state[S.MODEL] == typed
        assert at.text_input[0].value == typed
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and typed in errors[0], errors


@pytest.mark.slow
@pytest.mark.parametrize("page", ALL_PAGES)
def test_pages_run_on_the_default_model(page):
    at = _run(page, model="smollm2-135m", prompt="The capital of France is")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]


def _spec(chart):
    return json.loads(chart.proto.spec)


def test_compare_page_stacks_the_lenses_and_reads_one_position_in_depth(workdir, tiny_llama):
    from lenskit.lenses.tuned import TunedLens

    TunedLens.untrained(tiny_llama).save(workdir / "lens")
    at = _run(
        "pages/compare.py",
        prompt="Hello there, friend, how are you?",
        **{S.LENS_PATHS: {"tuned": str(workdir / "lens")}},
    )
    assert _errors(at) == []
    stacked, position, prob, rank, divergence = (_spec(c) for c in at.get("plotly_chart"))
    heatmaps = [t for t in stacked["data"] if t["type"] == "heatmap"]
    assert [t["yaxis"] for t in heatmaps] == ["y", "y2"]  # stacked panels, one x axis
    assert {t["xaxis"] for t in stacked["data"]} == {"x"}
    assert stacked["layout"]["hoversubplots"] == "axis"  # one hover shows every lens
    assert [t["type"] for t in stacked["data"][2:]] == ["scatter", "scatter"]  # clickable
    # The per-position view: every lens's top-k at the last position, every layer.
    n_tokens = int(at.slider[1].max)
    picker = next(s for s in at.selectbox if s.label == "Position")
    assert picker.value == n_tokens - 1
    assert [t["name"] for t in position["data"]] == ["logit", "tuned"]
    assert f"position {n_tokens - 1}" in position["layout"]["title"]["text"]
    assert {t["name"] for t in prob["data"]} == {"logit", "tuned"}
    assert "rank" in rank["layout"]["yaxis"]["title"]["text"]
    assert [t["type"] for t in divergence["data"]] == ["heatmap"]
    picker.set_value(3).run()
    assert _errors(at) == []
    assert "position 3 " in _spec(at.get("plotly_chart")[1])["layout"]["title"]["text"]
    shapes = _spec(at.get("plotly_chart")[0])["layout"]["shapes"]
    assert [(s["x0"], s["yref"]) for s in shapes] == [(2.5, "y"), (2.5, "y2")]  # outlined
    labels = [b.label for b in at.get("download_button")]
    assert labels.count("HTML") == 3 and labels.count("Parquet") == 3 and "CSV" in labels


def test_trajectory_page_offers_every_download():
    at = _run("pages/trajectory.py", prompt="Hello there")
    assert _errors(at) == []
    labels = [b.label for b in at.get("download_button")]
    assert {"HTML", "CSV", "CSV metadata", "Parquet"} <= set(labels)


# --- Train, Evaluate and the lens picker, in a folder the app is allowed to use ------------

TINY_TRAIN = {
    "Tokens per sequence": 32,
    "Tokens per step": 64,
    "Fine-tuning tokens": 128,
    "Closed-form tokens": 256,
    "Held-out tokens (report)": 64,
    "Validation tokens": 32,
}


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """The only folder the app may use, holding a few kilobytes of Shakespeare."""
    monkeypatch.setenv(DIRS_ENV, str(tmp_path))
    write_corpus(tmp_path / "corpus")
    return tmp_path.resolve()


def _page(page, model="tiny-llama", **state):
    """The whole app (so pages share one session), switched to ``page``."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.session_state[S.MODEL] = model
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    at.switch_page(page)
    return at.run()


def _button(at, label):
    return next(b for b in at.button if b.label == label)


def _errors(at):
    assert not at.exception, at.exception
    return [e.value for e in at.error]


def _corpus(at, key, path):
    at.radio(key=f"{key}_corpus_kind").set_value("File or folder").run()
    return at.text_input(key=f"{key}_corpus_path").set_value(str(path)).run()


def _train_page(corpus):
    at = _corpus(_page("pages/train.py"), "train", corpus)
    for box in at.number_input:
        if box.label in TINY_TRAIN:
            box.set_value(TINY_TRAIN[box.label])
    return at.run()


def test_train_page_trains_a_lens_that_every_page_then_uses(workdir):
    at = _train_page(workdir / "corpus")
    out = workdir / "lenses" / "tiny-llama" / "tuned-1"
    assert at.text_input(key="train_out_tiny-llama").value == str(out)
    _button(at, "Start").click().run()
    assert _errors(at) == []
    assert "Trained" in at.success[0].value
    assert (out / "config.json").is_file() and not (out / CHECKPOINT_FILE).exists()
    assert at.session_state[S.LENS_PATHS]["tuned"] == str(out)
    assert at.text_input(key="train_out_tiny-llama").value.endswith("tuned-2")  # a fresh one

    at.switch_page("pages/home.py").run()
    picker = next(s for s in at.selectbox if s.label == "tuned lens")
    assert picker.value == str(out) and str(out) in picker.options
    assert any("**tuned** — ready" in m.value for m in at.markdown)
    at.switch_page("pages/trajectory.py").run()
    at.selectbox[0].set_value("tuned").run()
    assert _errors(at) == [] and len(at.get("plotly_chart")) == 1


def test_stop_keeps_a_checkpoint_and_resume_finishes_the_run(workdir, monkeypatch):
    real = jobs.train_lens

    def stopped_after_one_step(model, config, out, *, resume, on_progress):
        def report(progress):
            on_progress(progress)
            if progress.phase == "fine-tune" and not resume:
                st.rerun()  # what a click on Stop does: the script is rerun from this draw

        return real(model, config, out, resume=resume, on_progress=report)

    monkeypatch.setattr(jobs, "train_lens", stopped_after_one_step)
    at = _train_page(workdir / "corpus")
    out = Path(at.text_input(key="train_out_tiny-llama").value)
    _button(at, "Start").click().run()
    assert _errors(at) == []
    assert at.session_state[S.TRAIN]["status"] == "stopped"
    assert not (out / "config.json").exists()
    assert torch.load(out / CHECKPOINT_FILE, weights_only=True)["step"] == 1  # kept to the stop
    assert any("Training stopped" in w.value and "Resume" in w.value for w in at.warning)
    assert _button(at, "Start").disabled and not _button(at, "Resume").disabled
    _button(at, "Resume").click().run()
    assert _errors(at) == []
    assert (out / "config.json").is_file() and not (out / CHECKPOINT_FILE).exists()
    assert at.session_state[S.LENS_PATHS]["tuned"] == str(out)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("missing", "no file or folder at"),
        ("..", "outside the folders the app may use"),
        ("corpus/../../x", "outside the folders the app may use"),
        ("/etc", "outside"),
    ],
)
def test_a_bad_corpus_path_is_an_error_beside_the_whole_form(workdir, path, message):
    for page, key, action in (
        ("pages/train.py", "train", "Start"),
        ("pages/evaluate.py", "eval", "Run"),
    ):
        at = _corpus(_page(page), key, workdir / path)
        errors = _errors(at)
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0]
        boxes = [b.label for b in at.number_input]  # the rest of the form stays in view
        assert ("Fine-tuning tokens" if key == "train" else "Tokens") in boxes
        assert _button(at, action).disabled  # and nothing runs on the bad path
        at.text_input(key=f"{key}_corpus_path").set_value(str(workdir / "corpus")).run()
        assert _errors(at) == [] and not _button(at, action).disabled


def test_an_unreadable_corpus_is_an_error_when_training_starts(workdir):
    (workdir / "bad.txt").write_bytes(b"\xff\xfe\x00 not text \xc3")
    at = _train_page(workdir / "bad.txt")
    _button(at, "Start").click().run()
    errors = _errors(at)
    assert len(errors) == 1 and "is not UTF-8 text" in errors[0], errors
    assert at.session_state[S.TRAIN]["status"] == "failed"


def test_an_output_folder_outside_is_refused(workdir):
    at = _page("pages/train.py")
    at.text_input(key="train_out_tiny-llama").set_value(str(workdir.parent / "elsewhere")).run()
    errors = _errors(at)
    assert len(errors) == 1 and "outside the folders the app may use" in errors[0]
    assert str(workdir) in errors[0] and DIRS_ENV in errors[0]
    assert "Fine-tuning tokens" in [b.label for b in at.number_input]  # the form stays
    assert _button(at, "Start").disabled
    assert not (workdir.parent / "elsewhere").exists()


def test_home_refuses_a_lens_path_outside(workdir, tiny_llama):
    from lenskit.lenses.tuned import TunedLens

    outside = workdir.parent / f"{workdir.name}-lens"
    TunedLens.untrained(tiny_llama).save(outside)
    at = _page("pages/home.py")
    next(s for s in at.selectbox if s.label == "tuned lens").set_value("<other>").run()
    at.text_input(key="lens_path_tuned").set_value(str(outside)).run()
    errors = _errors(at)
    assert len(errors) == 1 and "outside the folders the app may use" in errors[0]
    assert not at.session_state[S.LENS_PATHS].get("tuned")


def test_home_says_when_a_lens_is_for_another_model(workdir, tiny_gpt2):
    from lenskit.lenses.tuned import TunedLens

    TunedLens.untrained(tiny_gpt2).save(workdir / "gpt2-lens")
    at = _page("pages/home.py")
    next(s for s in at.selectbox if s.label == "tuned lens").set_value("<other>").run()
    at.text_input(key="lens_path_tuned").set_value(str(workdir / "gpt2-lens")).run()
    errors = _errors(at)
    assert len(errors) == 1 and "3 layers" in errors[0] and "use a lens trained for" in errors[0]


def test_evaluate_page_shows_the_table_the_plot_and_downloads(workdir, tiny_llama, monkeypatch):
    from lenskit import evaluation
    from lenskit.lenses.tuned import TunedLens

    calls = []
    real = evaluation.evaluate
    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    TunedLens.untrained(tiny_llama).save(workdir / "lens")  # exactly the logit lens
    at = _corpus(
        _page("pages/evaluate.py", **{S.LENS_PATHS: {"tuned": str(workdir / "lens")}}),
        "eval",
        workdir / "corpus",
    )
    assert at.multiselect[0].value == ["logit", "tuned"]
    next(b for b in at.number_input if b.label == "Tokens").set_value(256)
    next(b for b in at.number_input if b.label == "Tokens per sequence").set_value(32)
    _button(at.run(), "Run").click().run()
    assert _errors(at) == [] and calls == [1]
    frame = at.dataframe[0].value
    assert sorted(set(frame["lens"])) == ["logit", "model", "tuned"] and len(frame) == 2 * 4 + 1
    logit, tuned = (frame[frame["lens"] == k].set_index("layer") for k in ("logit", "tuned"))
    assert tuned["kl_bits"].tolist() == pytest.approx(logit["kl_bits"].tolist(), abs=1e-6)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert {t["name"] for t in spec["data"]} >= {"logit", "tuned"}
    labels = [b.label for b in at.get("download_button")]
    assert labels[:3] == ["CSV", "JSON (with provenance)", "Plot (HTML)"]

    at.selectbox[0].set_value("ce_bits").run()  # a new plot from the cached result
    assert _errors(at) == [] and calls == [1]
    assert (
        "cross-entropy"
        in json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["yaxis"]["title"]["text"]
    )
    next(b for b in at.number_input if b.label == "Tokens").set_value(128)
    _button(at.run(), "Run").click().run()
    assert _errors(at) == [] and calls == [1, 1]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("too-few", "has only"),
        ("csv", "is not a .txt, .md or .jsonl file"),
        ("no-lens", "No lens is chosen"),
        ("outside", "outside the folders the app may use"),
    ],
)
def test_evaluate_page_errors(workdir, setup, message):
    (workdir / "short.txt").write_text("Only a few words here.", encoding="utf-8")
    (workdir / "data.csv").write_text("text\nsome words\n", encoding="utf-8")
    path = {
        "too-few": workdir / "short.txt",
        "csv": workdir / "data.csv",
        "outside": workdir.parent,
    }.get(setup, workdir / "corpus")
    at = _corpus(_page("pages/evaluate.py"), "eval", path)
    if setup == "no-lens":
        at.multiselect[0].set_value([]).run()
    if setup != "outside":
        next(b for b in at.number_input if b.label == "Tokens per sequence").set_value(8)
        _button(at.run(), "Run").click().run()
    errors = _errors(at)
    assert len(errors) == 1 and message in errors[0], errors
    assert not at.dataframe


@pytest.mark.slow
def test_evaluate_page_on_the_default_model(workdir):
    at = _page("pages/evaluate.py", model="smollm2-135m")
    assert {"logit", "tuned"} <= set(at.multiselect[0].value)
    next(b for b in at.number_input if b.label == "Tokens").set_value(256)
    _button(at.run(), "Run").click().run()
    assert _errors(at) == []
    frame = at.dataframe[0].value
    assert {"logit", "tuned", "model"} <= set(frame["lens"])
    tuned, logit = (frame[frame["lens"] == k]["kl_bits"].mean() for k in ("tuned", "logit"))
    assert tuned < logit  # the shipped tuned lens is closer to the output than the logit lens


def test_causal_basis_page_says_how_to_extract_a_basis_for_a_model_without_one():
    at = _run("pages/causal_basis.py")
    assert not at.exception and not at.error
    assert any("lenskit causal-basis" in i.value for i in at.info)


@pytest.mark.slow
def test_causal_basis_page_shows_the_shipped_basis():
    at = _run("pages/causal_basis.py", model="smollm2-135m")
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 2
    assert at.selectbox[0].options == ["6", "12", "18", "24"]
