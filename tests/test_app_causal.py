"""The Causal basis page extracts a basis with live progress; Home picks a basis folder."""

import json
from pathlib import Path

import pytest
import streamlit as st
from helpers import write_corpus
from streamlit.testing.v1 import AppTest

import lenskit_app.state as S
from lenskit.causal.config import CausalBasisConfig
from lenskit.causal.extraction import extract_causal_basis
from lenskit.lenses import get_lens
from lenskit.lenses.basis import INDEX_FILE, layer_file, read_index
from lenskit.lenses.tuned import TunedLens
from lenskit_app import jobs
from lenskit_app.paths import DIRS_ENV, saved_lenses

ROOT = Path(__file__).resolve().parents[1]
PAGE = "pages/causal_basis.py"
OUT_KEY = "causal_out_tiny-llama"
TINY = {
    "Directions (k)": 2,
    "Tokens per sequence": 32,
    "Training tokens": 128,
    "Held-out tokens": 64,
    "Most iterations per direction": 8,
}


@pytest.fixture()
def workdir(tmp_path, monkeypatch, tiny_llama):
    """The only folder the app may use: a little Shakespeare and a tuned lens of tiny-llama."""
    monkeypatch.setenv(DIRS_ENV, str(tmp_path))
    write_corpus(tmp_path / "corpus")
    TunedLens.untrained(tiny_llama).save(tmp_path / "tuned")
    return tmp_path.resolve()


def _page(page, workdir, model="tiny-llama", paths=None):
    """The whole app (so pages share one session) with the tuned lens chosen, on ``page``."""
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.session_state[S.MODEL] = model
    at.session_state[S.LENS_PATHS] = {"tuned": str(workdir / "tuned"), **(paths or {})}
    at.run()
    at.switch_page(page)
    return at.run()


def _errors(at):
    assert not at.exception, at.exception
    return [e.value for e in at.error]


def _button(at, label):
    return next(b for b in at.button if b.label == label)


def _settings(at, workdir, layer):
    """Tiny settings, the test corpus and ``layer``, on the extract form."""
    at.radio(key="causal_corpus_kind").set_value("File or folder").run()
    at.text_input(key="causal_corpus_path").set_value(str(workdir / "corpus")).run()
    for box in at.number_input:
        if box.label in TINY:
            box.set_value(TINY[box.label])
    next(b for b in at.number_input if b.label == "Layer to extract").set_value(layer)
    return at.run()


def _extract_into_folder(model, workdir, out, layer=1):
    tuned = get_lens("tuned", model, path=str(workdir / "tuned"))
    config = CausalBasisConfig(k=1, tokens=64, eval_tokens=32, seq_len=32, max_iter=3)
    extract_causal_basis(
        model, tuned, layer, config, str(workdir / "corpus"), out=out, progress=False
    )


def test_extract_a_layer_then_another_into_the_same_folder(workdir, monkeypatch):
    reports = []
    real = jobs.extract_basis

    def recorded(*args, on_progress, **kwargs):
        return real(*args, on_progress=lambda p: (reports.append(p), on_progress(p)), **kwargs)

    monkeypatch.setattr(jobs, "extract_basis", recorded)
    at = _page(PAGE, workdir)
    assert _errors(at) == [] and any("no causal basis is shipped" in i.value for i in at.info)
    out = workdir / "lenses" / "tiny-llama" / "causal-basis-1"
    assert at.text_input(key=OUT_KEY).value == str(out)
    _button(_settings(at, workdir, 2), "Extract").click().run()
    assert _errors(at) == []
    assert "Extracted layer 2" in at.success[0].value
    assert (out / layer_file(2)).is_file() and list(read_index(out).layers) == [2]
    assert at.session_state[S.LENS_PATHS][S.CAUSAL_KIND] == str(out)
    phases = [p.phase for p in reports]
    assert phases[0] == "capture" and phases[-2:] == ["measure", "done"]
    assert "search" in phases and reports[-1].fraction == 1.0
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(charts) == 2 and {t["name"] for t in charts[0]["data"]} == {"lens", "model"}
    assert next(s for s in at.selectbox if s.label == "Layer").options == ["2"]

    # the folder stays the output: the next layer is added to it, and the page shows both
    assert at.text_input(key=OUT_KEY).value == str(out)
    next(b for b in at.number_input if b.label == "Layer to extract").set_value(0)
    _button(at.run(), "Extract").click().run()
    assert _errors(at) == []
    assert sorted(read_index(out).layers) == [0, 2]
    picker = next(s for s in at.selectbox if s.label == "Layer")
    assert picker.options == ["0", "2"] and picker.value == 0


def test_stop_keeps_the_folder_as_it_was(workdir, monkeypatch):
    real = jobs.extract_basis

    def stopped(*args, on_progress, **kwargs):
        def report(p):
            on_progress(p)
            if p.phase == "search":
                st.rerun()  # what a click on Stop does: the script is rerun from this draw

        return real(*args, on_progress=report, **kwargs)

    monkeypatch.setattr(jobs, "extract_basis", stopped)
    at = _settings(_page(PAGE, workdir), workdir, 1)
    out = Path(at.text_input(key=OUT_KEY).value)
    _button(at, "Extract").click().run()
    assert _errors(at) == []
    assert at.session_state[S.CAUSAL_RUN]["status"] == "stopped"
    assert any("stopped before it finished" in w.value for w in at.warning)
    assert not (out / INDEX_FILE).exists()
    assert not at.session_state[S.LENS_PATHS].get(S.CAUSAL_KIND)


def test_an_output_folder_outside_is_refused(workdir):
    at = _page(PAGE, workdir)
    at.text_input(key=OUT_KEY).set_value(str(workdir.parent / "elsewhere")).run()
    errors = _errors(at)
    assert len(errors) == 1 and "outside the folders the app may use" in errors[0]
    assert "\n" not in errors[0] and DIRS_ENV in errors[0]
    assert _button(at, "Extract").disabled  # the form stays in view; nothing runs
    assert not (workdir.parent / "elsewhere").exists()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("other-lens", "never mixes models or lenses"),
        ("other-files", "holds other files and no causal basis"),
    ],
)
def test_a_folder_that_cannot_take_the_basis_is_an_error(workdir, tiny_llama, setup, message):
    out = workdir / "taken"
    if setup == "other-lens":  # a basis of another tuned lens of the same model
        TunedLens.untrained(tiny_llama).save(workdir / "other-tuned")
        other = get_lens("tuned", tiny_llama, path=str(workdir / "other-tuned"))
        extract_causal_basis(
            tiny_llama,
            other,
            1,
            CausalBasisConfig(k=1, tokens=64, eval_tokens=32, seq_len=32, max_iter=3),
            str(workdir / "corpus"),
            out=out,
            progress=False,
        )
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine", encoding="utf-8")
    before = sorted(p.name for p in out.iterdir())
    at = _settings(_page(PAGE, workdir), workdir, 2)
    at.text_input(key=OUT_KEY).set_value(str(out)).run()
    _button(at, "Extract").click().run()
    errors = _errors(at)
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
    assert sorted(p.name for p in out.iterdir()) == before
    assert at.session_state[S.CAUSAL_RUN]["status"] == "failed"


def test_without_a_tuned_lens_the_page_says_how_to_get_one(workdir):
    at = _page(PAGE, workdir, paths={"tuned": None})
    assert _errors(at) == []
    assert any("Train page" in i.value for i in at.info)
    assert not [b for b in at.button if b.label == "Extract"]


def test_home_picker_lists_saved_basis_folders(workdir, tiny_llama):
    out = workdir / "lenses" / "tiny-llama" / "causal-basis-1"
    _extract_into_folder(tiny_llama, workdir, out)
    assert saved_lenses("tiny-llama", S.CAUSAL_KIND) == [str(out)]
    assert saved_lenses("tiny-llama", "tuned") == []
    at = _page("pages/home.py", workdir)
    picker = next(s for s in at.selectbox if s.label == f"{S.CAUSAL_KIND} lens")
    assert str(out) in picker.options
    picker.set_value(str(out)).run()
    assert _errors(at) == []
    assert at.session_state[S.LENS_PATHS][S.CAUSAL_KIND] == str(out)
    assert any(f"**{S.CAUSAL_KIND}** — ready" in m.value for m in at.markdown)
    at.switch_page(PAGE).run()
    assert _errors(at) == [] and next(s for s in at.selectbox if s.label == "Layer").options == [
        "1"
    ]


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("outside", "outside the folders the app may use"),
        ("not-a-basis", "has no basis.json"),
    ],
)
def test_home_picker_refuses_a_bad_basis_folder_in_one_line(workdir, where, message):
    folder = workdir.parent / f"{workdir.name}-basis" if where == "outside" else workdir / "x"
    folder.mkdir()
    at = _page("pages/home.py", workdir)
    next(s for s in at.selectbox if s.label == f"{S.CAUSAL_KIND} lens").set_value("<other>").run()
    at.text_input(key=f"lens_path_{S.CAUSAL_KIND}").set_value(str(folder)).run()
    errors = _errors(at)
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
    if where == "not-a-basis":  # the Causal basis page says it as well, as an error
        at.switch_page(PAGE).run()
        assert any(message in e for e in _errors(at))


def test_page_and_cli_defaults_come_from_the_config(workdir):
    from lenskit.causal.config import QUICK
    from lenskit.cli import build_parser

    at = _page(PAGE, workdir)
    boxes = {b.label: b.value for b in at.number_input}
    assert boxes["Directions (k)"] == QUICK.k
    assert boxes["Tokens per sequence"] == QUICK.seq_len
    assert boxes["Training tokens"] == QUICK.tokens
    assert boxes["Held-out tokens"] == QUICK.eval_tokens
    assert boxes["Seed"] == QUICK.seed
    assert boxes["Most iterations per direction"] == QUICK.max_iter
    assert next(s for s in at.selectbox if s.label == "Ablation").value == QUICK.ablation
    measure = next(c for c in at.checkbox if c.label.startswith("Measure the influence"))
    assert measure.value == QUICK.model_influence
    args = build_parser().parse_args(["causal-basis", "--layer", "1", "--out", "x"])
    for name, value in CausalBasisConfig().to_dict().items():
        assert getattr(args, name) == value, name
