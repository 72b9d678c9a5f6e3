"""Progress callbacks: what training and evaluation report, and stopping a run from one."""

import math

import pytest
import torch
from helpers import small

from lenskit.evaluation import evaluate
from lenskit.lenses.logit import LogitLens
from lenskit.models import ModelAdapter
from lenskit.progress import Progress
from lenskit.training import CHECKPOINT_FILE, checkpoint_config, train_tuned_lens


class Halt(BaseException):
    """Like the exception Streamlit raises in a script to rerun it: not an ``Exception``."""


def test_progress_fraction_and_eta():
    p = Progress("fine-tune", 100, 400, 50.0, 2.0, 1.5)
    assert p.fraction == 0.25 and p.eta_seconds == pytest.approx(6.0)
    assert math.isnan(Progress("closed-form", 0, 10, 0.0, 0.0).eta_seconds)
    assert Progress("evaluate", 5, 0, 1.0, 1.0).fraction == 1.0


def test_training_reports_every_batch_and_step(tiny_llama, corpus_dir, tmp_path):
    config = small(corpus_dir)
    seen: list[Progress] = []
    train_tuned_lens(tiny_llama, config, tmp_path, progress=False, on_progress=seen.append)
    closed = [p for p in seen if p.phase == "closed-form"]
    steps = [p for p in seen if p.phase == "fine-tune"]
    assert [p.done for p in closed] == [64 * (i + 1) for i in range(512 // 64)]
    assert {p.total for p in closed} == {512}
    assert [p.done for p in steps] == [64 * (i + 1) for i in range(config.steps)]
    assert all(p.kl_bits is not None and p.kl_bits > 0 for p in steps)
    assert all(p.kl_bits is None for p in closed)
    assert all(p.tokens_per_s > 0 for p in seen)
    assert [p.seconds for p in seen] == sorted(p.seconds for p in seen)


@pytest.fixture(scope="module")
def whole(tiny_llama, corpus_dir, tmp_path_factory):
    """The lens of an uninterrupted run."""
    config = small(corpus_dir)
    return train_tuned_lens(
        tiny_llama, config, tmp_path_factory.mktemp("whole"), progress=False
    ).lens


@pytest.mark.parametrize(("phase", "call"), [("fine-tune", 2), ("closed-form", 3)])
def test_a_stop_from_the_callback_keeps_a_checkpoint_and_resume_matches(
    tiny_llama, corpus_dir, tmp_path, whole, phase, call
):
    config = small(corpus_dir)
    calls = []

    def stop(p: Progress) -> None:
        calls.append(p.phase)
        if calls.count(phase) == call:
            raise Halt

    with pytest.raises(Halt):
        train_tuned_lens(tiny_llama, config, tmp_path / "cut", progress=False, on_progress=stop)
    state = torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=True)
    assert (state["phase"], state["step" if phase == "fine-tune" else "done"]) == (
        "kl" if phase == "fine-tune" else "lstsq",
        call,
    )  # the work up to the stop is kept
    assert checkpoint_config(tmp_path / "cut") == config
    assert checkpoint_config(tmp_path / "nothing") is None
    resumed = train_tuned_lens(tiny_llama, config, tmp_path / "cut", resume=True, progress=False)
    for a, b in zip(whole.parameters(), resumed.lens.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_evaluation_reports_tokens_read(tiny_llama, corpus_dir):
    seen: list[Progress] = []
    lens = LogitLens(ModelAdapter(tiny_llama))
    result = evaluate(
        tiny_llama,
        [lens],
        str(corpus_dir),
        tokens=320,
        seq_len=32,
        batch_size=4,
        progress=False,
        on_progress=seen.append,
    )
    assert [p.done for p in seen] == [128, 256, 320]
    assert {p.total for p in seen} == {result.tokens} and {p.phase for p in seen} == {"evaluate"}
    with pytest.raises(Halt):
        evaluate(
            tiny_llama,
            [lens],
            str(corpus_dir),
            tokens=320,
            seq_len=32,
            progress=False,
            on_progress=lambda p: (_ for _ in ()).throw(Halt),
        )
