"""One source per setting: CLI flags and app widgets take their defaults from the configs.

(``lenskit train`` and the Train page are checked in ``test_training.py``; ``causal-basis``
and its page in ``test_app_causal.py``.)
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from lenskit.attribution_config import AttributionConfig
from lenskit.cli import COMMANDS, build_parser
from lenskit.evaluation.config import QUICK, EvalConfig


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_eval_flags_default_to_the_config():
    args = _parse("eval", "--tokens", "64", "--out", "x")
    for name, value in EvalConfig(tokens=64).to_dict().items():
        assert getattr(args, name) == value, name


def test_choices_holding_commas_are_shown_apart():
    train = build_parser(["train"])._subparsers._group_actions[0].choices["train"]
    text = train.format_help()
    assert "{resid_pre|resid_pre,resid_mid}" in text and "{resid_pre,resid_pre" not in text
    assert _parse("train", "--out", "x", "--points", "resid_pre,resid_mid").points == (
        "resid_pre,resid_mid"
    )


def test_attribute_flags_default_to_the_config():
    args = _parse("attribute", "--prompt", "p", "--target", "t")
    for name, value in AttributionConfig().to_dict().items():
        assert getattr(args, name) == value, name


def test_attribute_config_matches_the_function_defaults():
    from lenskit.attribution import attribute

    params = inspect.signature(attribute).parameters
    for name, value in AttributionConfig().to_dict().items():
        assert params[name].default == value, name


def test_eval_config_matches_the_function_defaults():
    from lenskit.evaluation import evaluate

    params = inspect.signature(evaluate).parameters
    config = EvalConfig()
    for name in ("batch_size", "seed", "held_out", "transfer"):
        assert params[name].default == getattr(config, name), name


def test_fit_jacobian_flags_match_the_function_defaults():
    from lenskit.training.jacobian import fit_jacobian_lens

    params = inspect.signature(fit_jacobian_lens).parameters
    args = _parse("fit-jacobian", "--prompts", "1", "--out", "x")
    assert args.seq_len == params["seq_len"].default
    assert args.dim_batch == params["dim_batch"].default
    assert args.skip_first == params["skip_first_positions"].default
    assert args.seed == params["seed"].default
    assert args.dtype == str(params["dtype"].default).removeprefix("torch.")


def test_evaluate_page_defaults_come_from_the_preset(tmp_path, monkeypatch):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    import lenskit_app.state as S
    from lenskit_app.paths import DIRS_ENV

    monkeypatch.setenv(DIRS_ENV, str(tmp_path))
    root = Path(__file__).resolve().parents[1]
    at = AppTest.from_file(str(root / "app.py"), default_timeout=300)
    at.session_state[S.MODEL] = "tiny-llama"
    at.run()
    at.switch_page("pages/evaluate.py")
    at.run()
    assert not at.exception, at.exception
    boxes = {b.label: b.value for b in at.number_input}
    assert boxes["Tokens"] == QUICK.tokens
    assert boxes["Tokens per sequence"] == QUICK.seq_len
    held = next(c for c in at.checkbox if c.label.startswith("Held-out"))
    assert held.value == (QUICK.held_out is not None)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_and_argument_errors_load_no_torch(command):
    code = (
        "import sys\n"
        "from lenskit.cli import main\n"
        f"for argv in (['{command}', '--help'], ['{command}', '--no-such-flag']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, 'transformer_lens' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "False False", proc.stderr[-500:]
