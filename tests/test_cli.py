import json
import subprocess
import sys

import pytest

from lenskit.cli import main


def test_trajectory_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "t.json"
    code = main(
        [
            "trajectory",
            "--model",
            "tiny-llama",
            "--prompt",
            "Hello",
            "--target",
            "o",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "output" in printed and "p('o')" in printed
    data = json.loads(out.read_text())
    assert data["model"] == "tiny-llama" and data["lens"] == "logit"
    assert len(data["cells"]) == 5 * 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "x", "--lens", "nope"], "unknown lens kind"),
        (["--prompt", "x" * 300], "longer than the model's context"),
        (["--prompt", "x", "--target", "xy"], "not one"),
        (["--prompt", "x", "--model", "nobody/none-such-xyz"], "not in the local"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["trajectory", "--model", "tiny-llama", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_console_script_has_no_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lenskit.cli",
            "trajectory",
            "--model",
            "tiny-llama",
            "--prompt",
            "x",
            "--lens",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown lens kind" in proc.stderr


@pytest.mark.slow
def test_paris_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "out.json"
    code = main(
        [
            "trajectory",
            "--model",
            "smollm2-135m",
            "--lens",
            "logit",
            "--prompt",
            "The capital of France is",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    last = [c for c in data["cells"] if c["layer_label"] == "output"][-1]
    assert last["top1_token"] == " Paris"
