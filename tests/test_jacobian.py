"""The Jacobian lens: TransformerLens's JacobianLens behind lenskit's Lens protocol."""

from __future__ import annotations

import base64
import io
import json
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

import lenskit
from lenskit import cli
from lenskit.commands.trajectory import format_table
from lenskit.errors import LenskitError
from lenskit.lenses.jacobian import JLens, shipped_jlens_path
from lenskit.residual import capture, tokenize
from lenskit.training import jacobian as jacobian_fit
from lenskit.training.jacobian import PROGRESS_KEY, fit_jacobian_lens, partial_path

PROMPT = "The Jacobian lens reads every layer through the final residual."
PROMPTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "Now is the winter of our discontent made glorious summer by this sun of York; and all",
    "All the world's a stage, and all the men and women merely players: they have their exits",
]
SEQ = 32  # tokens per prompt: 16 skipped, 15 averaged


@pytest.fixture(scope="module")
def fitted(tiny_llama, tmp_path_factory) -> JLens:
    """A lens fitted by lenskit on two prompts, stored in fp32."""
    out = tmp_path_factory.mktemp("fit") / "lens.pt"
    return fit_jacobian_lens(
        tiny_llama, PROMPTS, n_prompts=2, seq_len=SEQ, out=out, progress=False, dtype=torch.float32
    )


def rows_of(model, prompt: str = PROMPT) -> torch.Tensor:
    return capture(model, tokenize(model, prompt)).lens_rows()[:, 0]


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and ": " in message
    return message


# --- the lens ----------------------------------------------------------------------------


def test_registered():
    assert "jacobian" in lenskit.available_lenses()
    assert lenskit.lenses.lens_class("jacobian") is JLens


def test_identity_matrices_read_exactly_as_the_logit_lens(tiny_model):
    jlens, logit = JLens.identity(tiny_model), lenskit.get_lens("logit", tiny_model)
    rows = rows_of(tiny_model)
    n = tiny_model.cfg.n_layers
    assert jlens.covered_layers() == list(range(1, n + 1))
    with torch.no_grad():
        for row in range(1, n + 1):
            assert torch.equal(jlens(rows[row], row), logit(rows[row], row))


def test_transform_is_the_fitted_matrix(fitted):
    h = torch.randn(3, 5, 64)
    for row in (1, 2, 3):
        expected = h @ fitted.tl.jacobians[row - 1].T
        assert torch.allclose(fitted.transform_hidden(h, row), expected, atol=1e-6)
    assert torch.equal(fitted.transform_hidden(h, 4), h)  # the output row: the identity
    assert fitted.tl_layer(1) == 0 and fitted.tl_layer(4) is None


def test_readout_equals_transformer_lens_readout(tiny_llama, fitted):
    tokens = tokenize(tiny_llama, PROMPT)
    rows = rows_of(tiny_llama)
    ours = {r: fitted(rows[r], r) for r in fitted.covered_layers()}
    theirs = fitted.tl.readout(tiny_llama, tokens, return_full_logits=True, top_k=5)
    n = tiny_llama.cfg.n_layers
    assert sorted(theirs.lens_logits) == list(range(n))
    for layer, logits in theirs.lens_logits.items():  # TL layer l = output of block l
        torch.testing.assert_close(ours[layer + 1], logits, atol=1e-5, rtol=1e-5)
        top = ours[layer + 1].topk(5).indices
        assert torch.equal(top[:, 0], theirs.lens_topk_indices[layer][:, 0])


def test_incremental_fit_equals_one_transformer_lens_fit(tiny_llama, fitted):
    joint = TLJacobianLens.fit(
        tiny_llama, PROMPTS[:2], corpus="prompts", max_seq_len=SEQ, show_progress=False
    )
    assert fitted.n_prompts == joint.n_prompts == 2
    assert fitted.tl.source_layers == joint.source_layers == [0, 1, 2]
    for layer in joint.source_layers:
        torch.testing.assert_close(
            fitted.tl.jacobians[layer], joint.jacobians[layer], atol=1e-6, rtol=1e-5
        )
    assert not torch.allclose(joint.jacobians[0], torch.eye(64), atol=1e-2)  # a real fit
    progress = fitted.metadata[PROGRESS_KEY]
    assert progress["prompts_done"] == 2 and len(progress["seconds_per_prompt"]) == 2


# --- files ------------------------------------------------------------------------------


def test_save_load_round_trip(tiny_llama, fitted, tmp_path):
    fitted.save(tmp_path / "f32.pt", dtype=torch.float32)
    same = lenskit.get_lens("jacobian", tiny_llama, path=str(tmp_path / "f32.pt"))
    for layer, matrix in fitted.tl.jacobians.items():
        assert torch.equal(same.tl.jacobians[layer], matrix)
    assert same.metadata == fitted.metadata and same.n_prompts == 2
    fitted.save(tmp_path)  # a folder: lens.pt in it, fp16
    half = JLens.load(tiny_llama, tmp_path)
    assert half.source == str(tmp_path / "lens.pt")
    for layer, matrix in fitted.tl.jacobians.items():
        torch.testing.assert_close(half.tl.jacobians[layer], matrix, atol=2e-3, rtol=1e-3)


def test_lenskit_artifact_loads_with_transformer_lens(tiny_llama, fitted, tmp_path):
    fitted.save(tmp_path)
    payload = torch.load(tmp_path / "lens.pt", weights_only=True)
    assert {"J", "n_prompts", "source_layers", "d_model", "metadata"} <= set(payload)
    assert payload["J"][0].dtype == torch.float16 and payload["source_layers"] == [0, 1, 2]
    tl = TLJacobianLens.from_pretrained(str(tmp_path), model=tiny_llama)  # validates too
    assert tl.n_prompts == 2 and tl.metadata["lenskit"]["model"] == "tiny-llama"
    readout = tl.readout(tiny_llama, PROMPT, top_k=3)
    assert sorted(readout.lens_topk_indices) == [0, 1, 2, 3]


def test_lenskit_fit_read_back_by_transformer_lens_gives_the_same_readout(
    tiny_llama, fitted, tmp_path
):
    """TransformerLens's own ``JacobianLens.load`` + ``readout`` on lenskit-written files."""
    tokens = tokenize(tiny_llama, PROMPT)
    rows = rows_of(tiny_llama)
    fitted.save(tmp_path / "half.pt")  # the shipped format: fp16
    for file, lens in (
        (fitted.source, fitted),
        (tmp_path / "half.pt", JLens.load(tiny_llama, tmp_path / "half.pt")),
    ):
        tl = TLJacobianLens.load(str(file))  # no lenskit in between
        assert tl.source_layers == [0, 1, 2] and tl.n_prompts == 2
        assert tl.metadata["model_name"] == tiny_llama.cfg.model_name == "tiny-llama"
        theirs = tl.readout(tiny_llama, tokens, return_full_logits=True, top_k=3)
        for layer, logits in theirs.lens_logits.items():
            ours = lens(rows[layer + 1], layer + 1)
            torch.testing.assert_close(ours, logits, atol=1e-5, rtol=1e-5)
            assert torch.equal(ours.topk(3).indices, theirs.lens_topk_indices[layer])


def test_shipped_lens_records_the_portable_model_name():
    file = shipped_jlens_path("smollm2-135m")
    if not file.is_file():
        pytest.skip("no J-lens shipped for smollm2-135m in this checkout")
    meta = TLJacobianLens.load(str(file)).metadata
    assert meta["model_name"] == meta["lenskit"]["model"] == "smollm2-135m"
    assert not any(isinstance(v, str) and v.startswith("/") for v in meta.values())


def test_transformer_lens_artifacts_and_reference_checkpoints_load(tiny_llama, tmp_path):
    tl = TLJacobianLens.fit(
        tiny_llama, PROMPTS[:1], corpus="x", max_seq_len=SEQ, source_layers=[1], show_progress=False
    )
    tl.save(str(tmp_path / "tl.pt"))
    lens = JLens.load(tiny_llama, tmp_path / "tl.pt")
    assert lens.covered_layers() == [2, 4]
    d = 64  # the reference package's running-sum checkpoint, no metadata at all
    torch.save(
        {
            "jacobian_sum": {0: 3 * torch.eye(d), 2: torch.ones(d, d)},
            "n_done": 3,
            "next_idx": 3,
            "source_layers": [0, 2],
            "target_layer": 3,
            "skip_first": 16,
        },
        tmp_path / "ckpt.pt",
    )
    ckpt = JLens.load(tiny_llama, tmp_path / "ckpt.pt")
    assert ckpt.covered_layers() == [1, 3, 4] and ckpt.n_prompts == 3
    assert torch.equal(ckpt.tl.jacobians[0], torch.eye(d))


def test_portable_model_names(tiny_llama, fitted, tmp_path):
    """A lens fitted on a cached folder loads where the folder lives elsewhere."""
    tl = TLJacobianLens(
        fitted.tl.jacobians,
        n_prompts=2,
        d_model=64,
        metadata={"model_name": "/elsewhere/models/tiny-llama"},
    )
    tl.save(str(tmp_path / "moved.pt"))
    lens = JLens.load(tiny_llama, tmp_path / "moved.pt")
    assert lens.metadata["model_name"] == "/elsewhere/models/tiny-llama"
    lens.tl.readout(tiny_llama, PROMPT)  # TransformerLens accepts it for this session
    lens.save(tmp_path / "again.pt")  # the file keeps the recorded name
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert again["metadata"]["model_name"] == "/elsewhere/models/tiny-llama"


# --- coverage -----------------------------------------------------------------------------


def test_uncovered_rows_error_and_show_in_trajectories(tiny_llama, fitted):
    partial = JLens.from_tl(
        tiny_llama, TLJacobianLens({1: fitted.tl.jacobians[1]}, n_prompts=2, d_model=64)
    )
    assert partial.covered_layers() == [2, 4]
    for row in (0, 1, 3):
        assert not partial.covers(row)
        with pytest.raises(LenskitError, match=rf"does not cover layer {row}: use one of") as e:
            partial(torch.zeros(64), row)
        one_line(e)
    with pytest.raises(LenskitError, match="out of range"):
        partial(torch.zeros(64), 5)
    for lens in (partial, fitted):
        traj = lenskit.trajectory(tiny_llama, lens, PROMPT, target=" ")
        covered = [lens.covers(r) for r in range(5)]
        assert traj.covered.tolist() == covered
        for row, yes in enumerate(covered):
            assert bool(torch.isnan(traj.entropy[row]).all()) is not yes
            assert bool(torch.isnan(traj.kl_to_final[row]).all()) is not yes
        assert float(traj.kl_to_final[4].abs().max()) < 1e-4  # the output row is the model
        assert "(not covered by this lens)" in format_table(traj)
        frame = traj.to_frame()
        assert not frame[~frame.covered].kl_to_final_bits.notna().any()


# --- bad input ---------------------------------------------------------------------------


def _write_bad(folder: Path, how: str, good: dict) -> Path:
    file = folder / f"{how}.pt"
    payload = {**good, "J": dict(good["J"])}
    if how == "garbage":
        file.write_bytes(b"not a torch file at all")
        return file
    if how == "truncated":
        buffer = io.BytesIO()
        torch.save(good, buffer)
        file.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        return file
    if how == "code":  # a pickle that would run code: weights_only refuses it
        with zipfile.ZipFile(file, "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps(print))
        return file
    if how == "no-J":
        payload.pop("J")
    elif how == "d_model":
        payload["J"] = {k: torch.eye(32) for k in payload["J"]}
        payload["d_model"] = 32
    elif how == "shape":
        payload["J"][1] = torch.eye(32)
    elif how == "layers":
        payload["J"][7] = torch.eye(64)
    elif how == "nan":
        payload["J"][2] = torch.full((64, 64), math.nan)
    elif how == "model":
        payload["metadata"] = {
            **payload["metadata"],
            "lenskit": {"model": "gemma-2-2b"},
            "model_name": "google/gemma-2-2b",
        }
    elif how == "target":
        payload["metadata"] = {**payload["metadata"], "target_layer": 11}
    torch.save(payload, file)
    return file


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("garbage", "is not a readable J-lens"),
        ("truncated", "is not a readable J-lens"),
        ("code", "is not a readable J-lens"),
        ("no-J", "is not a readable J-lens"),
        ("d_model", "fitted for d_model 32, this model .tiny-llama. has 64"),
        ("shape", "is not a readable J-lens"),
        ("layers", r"block outputs \[7\], outside 0..2"),
        ("nan", "NaN or inf in layer 2"),
        ("model", "fitted for gemma-2-2b, not this model"),
        ("target", "a model with 12 layers, this model .tiny-llama. has 4"),
    ],
)
def test_bad_files_raise_one_line_errors(tiny_llama, fitted, tmp_path, how, message):
    fitted.save(tmp_path / "good.pt")
    good = torch.load(tmp_path / "good.pt", weights_only=True)
    file = _write_bad(tmp_path, how, good)
    with pytest.raises(LenskitError, match=message) as err:
        lenskit.get_lens("jacobian", tiny_llama, path=str(file))
    one_line(err)


def test_missing_lenses_say_how_to_fit_one(tiny_llama, tmp_path):
    with pytest.raises(
        LenskitError,
        match="no J-lens is shipped for tiny-llama: fit one with "
        "`lenskit fit-jacobian --model tiny-llama",
    ) as err:
        lenskit.get_lens("jacobian", tiny_llama)
    one_line(err)
    with pytest.raises(LenskitError, match=r"no J-lens file at .*lenskit fit-jacobian"):
        lenskit.get_lens("jacobian", tiny_llama, path=str(tmp_path / "none.pt"))
    with pytest.raises(LenskitError, match="takes only path="):
        lenskit.get_lens("jacobian", tiny_llama, top_k=3)
    assert shipped_jlens_path("tiny-llama") is None


def test_lens_for_another_model_is_refused(tiny_gpt2, fitted, tmp_path):
    fitted.save(tmp_path / "llama.pt")
    with pytest.raises(LenskitError, match=r"fitted for|vocabulary|layers") as err:
        JLens.load(tiny_gpt2, tmp_path / "llama.pt")
    one_line(err)


# --- fitting ----------------------------------------------------------------------------


def test_interrupted_fit_resumes_to_the_same_lens(
    tiny_llama, fitted, tmp_path, monkeypatch, capsys
):
    real, calls = jacobian_fit._fit_one, []

    def interrupt_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(jacobian_fit, "_fit_one", interrupt_second)
    out = tmp_path / "lens.pt"
    with pytest.raises(KeyboardInterrupt):
        fit_jacobian_lens(
            tiny_llama, PROMPTS, n_prompts=2, seq_len=SEQ, out=out, dtype=torch.float32
        )
    assert "kept 1 finished prompts" in capsys.readouterr().err
    assert not out.exists()
    kept = TLJacobianLens.load(str(partial_path(out)))
    assert kept.n_prompts == 1 and kept.metadata[PROGRESS_KEY]["prompts_done"] == 1
    monkeypatch.setattr(jacobian_fit, "_fit_one", real)
    lens = fit_jacobian_lens(
        tiny_llama, PROMPTS, n_prompts=2, seq_len=SEQ, out=out, progress=False, dtype=torch.float32
    )
    assert not partial_path(out).exists() and lens.n_prompts == 2
    for layer, matrix in fitted.tl.jacobians.items():
        torch.testing.assert_close(lens.tl.jacobians[layer], matrix, atol=1e-6, rtol=1e-6)


def test_fit_extends_and_refuses_other_settings(tiny_llama, tmp_path):
    out = tmp_path / "lens.pt"
    one = fit_jacobian_lens(
        tiny_llama, PROMPTS, n_prompts=1, seq_len=SEQ, out=out, progress=False, dtype=torch.float32
    )
    first = one.tl.jacobians[0].clone()
    three = fit_jacobian_lens(
        tiny_llama, PROMPTS, n_prompts=3, seq_len=SEQ, out=out, progress=False, dtype=torch.float32
    )
    assert three.n_prompts == 3 and three.metadata[PROGRESS_KEY]["prompts_done"] == 3
    assert not torch.allclose(three.tl.jacobians[0], first)
    same = fit_jacobian_lens(
        tiny_llama, PROMPTS, n_prompts=3, seq_len=SEQ, out=out, progress=False
    )  # nothing left to do
    assert torch.equal(same.tl.jacobians[0], three.tl.jacobians[0])
    cases = [
        (dict(n_prompts=2), "already holds a fit on 3 prompts"),
        (dict(n_prompts=3, seq_len=SEQ + 8), "fitted with max_seq_len=32, this fit has 40"),
        (dict(n_prompts=3, skip_first_positions=4), "skip_first_positions=16"),
    ]
    for changes, message in cases:
        with pytest.raises(LenskitError, match=message) as err:
            fit_jacobian_lens(
                tiny_llama, PROMPTS, out=out, progress=False, **{"seq_len": SEQ, **changes}
            )
        one_line(err)
    with pytest.raises(LenskitError, match="first 3 prompts differ"):
        fit_jacobian_lens(
            tiny_llama, PROMPTS[::-1], n_prompts=3, seq_len=SEQ, out=out, progress=False
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_prompts=0), "n_prompts must be >= 1"),
        (dict(n_prompts=1, seq_len=10), "seq_len 10 must be in 18..128"),
        (dict(n_prompts=1, seq_len=500), "seq_len 500 must be in 18..128"),
        (dict(n_prompts=4), "3 prompts given, 4 asked for"),
    ],
)
def test_bad_fit_settings(tiny_llama, tmp_path, kwargs, message):
    with pytest.raises(LenskitError, match=message) as err:
        fit_jacobian_lens(
            tiny_llama, PROMPTS, out=tmp_path / "x.pt", progress=False, **{"seq_len": SEQ, **kwargs}
        )
    one_line(err)
    with pytest.raises(LenskitError, match="prompt 0 is 4 tokens"):
        fit_jacobian_lens(tiny_llama, ["abc"], n_prompts=1, seq_len=SEQ, out=tmp_path / "y.pt")


def test_corpus_prompts_do_not_depend_on_their_number(tiny_llama, corpus_dir):
    two, name = jacobian_fit.fit_prompts(tiny_llama, str(corpus_dir), n_prompts=2, seq_len=SEQ)
    five, _ = jacobian_fit.fit_prompts(tiny_llama, str(corpus_dir), n_prompts=5, seq_len=SEQ)
    assert five[:2] == two and len(set(five)) == 5 and name == str(corpus_dir)
    assert all(tiny_llama.to_tokens(p).shape[-1] == SEQ for p in five)  # BOS + 31 bytes


def test_cli_fits_and_the_trajectory_reads_it(corpus_dir, tmp_path, capsys):
    out = tmp_path / "lens.pt"
    argv = [
        "fit-jacobian",
        "--model",
        "tiny-llama",
        "--data",
        str(corpus_dir),
        "--prompts",
        "1",
        "--seq-len",
        str(SEQ),
        "--out",
        str(out),
        "--quiet",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 prompts of 32 tokens, rows 1..4" in printed and f"wrote {out}" in printed
    assert (
        cli.main(
            ["trajectory", "--model", "tiny-llama", "--lens", f"jacobian:{out}", "--prompt", PROMPT]
        )
        == 0
    )
    assert "L0  (not covered by this lens)" in capsys.readouterr().out
    assert cli.main([*argv[:-5], "--seq-len", "8", "--out", str(out)]) == 2
    assert "seq_len 8 must be in 18..128" in capsys.readouterr().err


def test_compare_page_shows_logit_tuned_and_jacobian_by_default(
    tiny_llama, fitted, tmp_path, monkeypatch
):
    from streamlit.testing.v1 import AppTest

    import lenskit_app.state as S
    from lenskit.lenses.tuned import TunedLens
    from lenskit_app.paths import DIRS_ENV

    monkeypatch.setenv(DIRS_ENV, str(tmp_path))  # the app reads lenses only there

    TunedLens.untrained(tiny_llama).save(tmp_path / "tuned")
    fitted.save(tmp_path / "jlens.pt")
    page = Path(__file__).resolve().parents[1] / "pages" / "compare.py"
    at = AppTest.from_file(str(page), default_timeout=300)
    at.session_state[S.MODEL] = "tiny-llama"
    at.session_state[S.PROMPT] = "Hello there, friend"
    at.session_state[S.LENS_PATHS] = {
        "tuned": str(tmp_path / "tuned"),
        "jacobian": str(tmp_path / "jlens.pt"),
    }
    at.run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.multiselect[0].value == ["logit", "tuned", "jacobian"]
    assert at.multiselect[0].max_selections == 4
    heatmaps = json.loads(at.get("plotly_chart")[0].proto.spec)
    kinds = [t["type"] for t in heatmaps["data"]]
    assert kinds == ["heatmap"] * 3 + ["scatter"] * 3  # the panels, then their click markers
    z = heatmaps["data"][2]["z"]  # plotly's typed array: base64 of the values
    jlens = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(
        [int(n) for n in z["shape"].split(",")]
    )
    assert np.isnan(jlens[0]).all() and not np.isnan(jlens[1:]).any()  # L0 blank, not logit


# --- the shipped lens (SmolLM2) ---------------------------------------------------------------


@pytest.mark.slow
def test_shipped_smollm2_lens_reads_a_prompt(smollm2):
    if not shipped_jlens_path("smollm2-135m").is_file():
        pytest.skip("no J-lens shipped for smollm2-135m in this checkout")
    lens = lenskit.get_lens("jacobian", smollm2)
    assert lens.covered_layers() == list(range(1, 31)) and lens.n_prompts >= 1
    prompt = "The Eiffel Tower is in the city of"
    traj = lenskit.trajectory(smollm2, lens, prompt, target=" Paris")
    assert not bool(traj.covered[0]) and bool(traj.covered[1:].all())
    assert float(traj.kl_to_final[30, -1]) < 1e-3
    theirs = lens.tl.readout(smollm2, prompt, layers=[20], positions=[-1], return_full_logits=True)
    rows = rows_of(smollm2, prompt)
    ours = lens(rows[21, -1:], 21)
    torch.testing.assert_close(ours, theirs.lens_logits[20], atol=1e-4, rtol=1e-4)
    # TransformerLens alone reads the shipped file for lenskit's model: the recorded name
    # is the model's cfg.model_name, so validate_model passes with no lenskit override
    assert smollm2.cfg.model_name == "smollm2-135m"
    alone = TLJacobianLens.load(str(shipped_jlens_path("smollm2-135m")))
    direct = alone.readout(smollm2, prompt, layers=[20], positions=[-1], return_full_logits=True)
    torch.testing.assert_close(direct.lens_logits[20], theirs.lens_logits[20], atol=0, rtol=0)
