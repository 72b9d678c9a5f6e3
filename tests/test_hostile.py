"""lenskit used as a hostile user would: bad input, corrupt files, path tricks.

One table per way in: the command line (exit status 2, one line on stderr, nothing written),
the lens loaders (one-line ``LenskitError``), and the app's path checks (one-line refusal,
the same words whether an outside path exists or not). Every case also checks that nothing
under the test's outside folder was opened: an audit hook records every file Python opens
and every folder it lists, and the safetensors reader (which opens files outside Python) is
watched too.

To add a case, add a row to the table of the way in it uses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import randomised

import lenskit
from lenskit.cli import main
from lenskit.errors import LenskitError
from lenskit.io import check_output, check_path_limits
from lenskit.lenses.basis import CausalBasis
from lenskit.lenses.basis_index import INDEX_FILE, BasisIndex
from lenskit.lenses.jacobian import JLens
from lenskit_app import paths
from lenskit_app.paths import DIRS_ENV

ROOT = Path(__file__).resolve().parents[1]
LONG = "a" * 300  # one name over every common file system's 255-byte limit
KIND = "tuned-with-causal-basis"

# --- what was opened: an audit hook (Python's own opens) plus the safetensors reader ------

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    global _OPENED
    if _OPENED is not None and event in ("open", "os.listdir", "os.scandir") and args:
        target = args[0]
        if isinstance(target, (str, bytes, os.PathLike)):
            seen, _OPENED = _OPENED, None  # no events of our own while resolving
            try:
                seen.append(os.path.realpath(os.fsdecode(target)))  # where it led then
            finally:
                _OPENED = seen


sys.addaudithook(_audit)


@pytest.fixture()
def opened(monkeypatch):
    """The paths opened or listed while the test runs (absolute where Python made them so)."""
    global _OPENED
    import safetensors.torch

    seen: list[str] = []
    real = safetensors.torch.load_file

    def spy(file, *args, **kwargs):
        seen.append(os.path.realpath(os.fspath(file)))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", spy)
    _OPENED = seen
    yield seen
    _OPENED = None


def _under(path: str, folder: Path) -> bool:
    """Whether ``path`` (resolved when it was opened) lies in ``folder``."""
    return Path(path).is_relative_to(folder.resolve())


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and time: what was written."""
    global _OPENED
    watching, _OPENED = _OPENED, None  # the test's own listing is not the code's reading
    try:
        return _listing(folder)
    finally:
        _OPENED = watching


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            out[str(path)] = (-1, 0)
            continue
        stat = path.stat()
        out[str(path)] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return out


# --- the world: an allowed folder, an outside folder, lenses of every kind ---------------


@dataclass
class World:
    root: Path  # the test's folder; nothing in it may change for a refused input
    ok: Path  # the app's allowed folder
    secret: Path  # outside it: nothing here may be opened
    model: object
    tuned: Path  # a tuned lens folder (inside)
    basis: Path  # a causal-basis folder (inside) recording ``tuned``
    jlens: Path  # a J-lens file (inside)

    def copy(self, what: Path, name: str) -> Path:
        """A copy of a lens under ``ok`` to break."""
        target = self.ok / name
        (shutil.copytree if what.is_dir() else shutil.copy)(what, target)
        return target


def _write_basis(model, folder: Path, tuned: Path, layer: int = 1, k: int = 3) -> None:
    adapter = lenskit.ModelAdapter(model)
    gen = torch.Generator().manual_seed(layer)
    q, _ = torch.linalg.qr(torch.randn(adapter.d_model, k, generator=gen, dtype=torch.float64))
    settings = {
        "model": adapter.name,
        "model_shape": {
            "architecture": adapter.architecture,
            "n_layers": adapter.n_layers,
            "d_model": adapter.d_model,
            "d_vocab": adapter.d_vocab,
        },
        "lens": {"kind": "tuned", "path": str(tuned.resolve()), "shipped": False},
    }
    CausalBasis(
        layer=layer,
        basis=q.T.float(),
        mean=torch.zeros(adapter.d_model),
        lens_influence=torch.tensor([3.0, 2.0, 1.0][:k]),
        train_influence=torch.tensor([3.0, 2.0, 1.0][:k]),
        settings=settings,
    ).save(folder)


@pytest.fixture()
def world(tmp_path, tiny_llama, monkeypatch) -> World:
    ok, secret = tmp_path / "ok", tmp_path / "secret"
    ok.mkdir()
    secret.mkdir()
    tuned = randomised(tiny_llama).save(ok / "tuned")
    _write_basis(tiny_llama, ok / "basis", tuned)
    jlens = JLens.identity(tiny_llama).save(ok / "j.pt")
    # outside: a tuned lens, a basis layer file and a model folder that all load
    randomised(tiny_llama, seed=1).save(secret / "tuned")
    shutil.copy(ok / "basis" / "layer_1.safetensors", secret / "layer_1.safetensors")
    (secret / "model").mkdir()
    (secret / "model" / "config.json").write_text('{"model_type": "gpt2"}')
    monkeypatch.setenv(DIRS_ENV, str(ok))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return World(tmp_path, ok, secret, tiny_llama, tuned, ok / "basis", jlens)


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


# --- file breakers ------------------------------------------------------------------------


def _edit_json(file: Path, change: Callable[[dict], object]) -> Path:
    data = json.loads(file.read_text())
    result = change(data)
    file.write_text(json.dumps(data if result is None else result))
    return file.parent


def _basis(change: Callable[[dict], object]) -> Callable[[World], Path]:
    def make(w: World) -> Path:
        return _edit_json(w.copy(w.basis, "bad-basis") / INDEX_FILE, change)

    return make


def _layer(change: Callable[[dict], object]) -> Callable[[World], Path]:
    return _basis(lambda d: change(d["layers"]["1"]))


def _tuned(change: Callable[[dict], object]) -> Callable[[World], Path]:
    def make(w: World) -> Path:
        return _edit_json(w.copy(w.tuned, "bad-tuned") / "config.json", change)

    return make


def _jlens(change: Callable[[dict], None]) -> Callable[[World], Path]:
    def make(w: World) -> Path:
        payload = torch.load(w.jlens, weights_only=True)
        change(payload)
        target = w.ok / "bad.pt"
        torch.save(payload, target)
        return target

    return make


class _Payload:
    """A pickle that would create ``MARKER`` if a loader ever ran it."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_params(w: World) -> Path:
    folder = w.copy(w.tuned, "evil-tuned")
    _Payload.marker = str(w.root / "MARKER")
    (folder / "params.safetensors").unlink(missing_ok=True)
    torch.save({"0.weight": _Payload()}, folder / "params.pt")
    return folder


def _pickle_jlens(w: World) -> Path:
    _Payload.marker = str(w.root / "MARKER")
    torch.save({"J": {0: _Payload()}, "n_prompts": 1, "d_model": 64}, w.ok / "evil.pt")
    return w.ok / "evil.pt"


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda d: d.__setitem__(key, value)


# --- table 1: lens files of every format, read by the library -----------------------------

FILES = [
    # basis.json (issue: layer keys, entries, paths out of the folder, every field)
    ("basis-key-word", KIND, _basis(lambda d: d["layers"].__setitem__("x", {})), "layer keys"),
    (
        "basis-key-negative",
        KIND,
        _basis(lambda d: d["layers"].__setitem__("-1", d["layers"].pop("1"))),
        "layer keys must be integers >= 0",
    ),
    (
        "basis-key-padded",
        KIND,
        _basis(lambda d: d["layers"].__setitem__("01", d["layers"].pop("1"))),
        "layer keys",
    ),
    (
        "basis-layer-past-model",
        KIND,
        _basis(lambda d: d["layers"].__setitem__("9", d["layers"].pop("1"))),
        "layer 9 is not a block input",
    ),
    (
        "basis-entry-list",
        KIND,
        _basis(lambda d: d["layers"].__setitem__("1", [1, 2])),
        "entry must be an object",
    ),
    (
        "basis-entry-string",
        KIND,
        _basis(lambda d: d["layers"].__setitem__("1", "x")),
        "entry must be an object",
    ),
    ("basis-file-dotdot", KIND, _layer(_set("file", "../secret/layer_1.safetensors")), "plain"),
    ("basis-file-absolute", KIND, _layer(_set("file", "/etc/passwd.safetensors")), "plain"),
    ("basis-file-dotdot-only", KIND, _layer(_set("file", "..")), "plain"),
    ("basis-k-zero", KIND, _layer(_set("k", 0)), "k must be an integer >= 1"),
    ("basis-k-float", KIND, _layer(_set("k", 3.0)), "k must be an integer"),
    ("basis-influence-short", KIND, _layer(_set("lens_influence", [1.0])), "lens_influence"),
    ("basis-influence-text", KIND, _layer(_set("train_influence", ["a"] * 3)), "numbers"),
    ("basis-found-at", KIND, _layer(_set("found_at", [0, 0, 0])), "found_at"),
    ("basis-iterations", KIND, _layer(_set("iterations", [-1, 0, 0])), "iterations"),
    ("basis-converged", KIND, _layer(_set("converged", [1, 1, 1])), "converged"),
    ("basis-spearman", KIND, _layer(_set("spearman", 7)), "spearman"),
    ("basis-settings", KIND, _layer(_set("settings", [])), "settings"),
    ("basis-unknown-field", KIND, _layer(_set("code", "x")), "unknown fields"),
    ("basis-lens-list", KIND, _basis(_set("lens", [])), "lens must be an object"),
    ("basis-lens-kind", KIND, _basis(lambda d: d["lens"].__setitem__("kind", 3)), "lens.kind"),
    ("basis-shape", KIND, _basis(lambda d: d["model_shape"].__setitem__("n_layers", "4")), "n_l"),
    ("basis-model", KIND, _basis(_set("model", None)), "model must be"),
    ("basis-format", KIND, _basis(_set("format", "other")), "format"),
    ("basis-version", KIND, _basis(_set("version", 2)), "version 2"),
    ("basis-not-object", KIND, _basis(lambda d: [d]), "must be an object"),
    ("basis-layers-list", KIND, _basis(_set("layers", [])), "layers must be an object"),
    # tuned config.json
    ("tuned-d-model-negative", "tuned", _tuned(_set("d_model", -1)), "d_model must be"),
    ("tuned-d-model-text", "tuned", _tuned(_set("d_model", "64")), "d_model must be"),
    ("tuned-layers-bool", "tuned", _tuned(_set("num_hidden_layers", True)), "num_hidden_layers"),
    ("tuned-bias-text", "tuned", _tuned(_set("bias", "yes")), "bias must be"),
    ("tuned-lens-type", "tuned", _tuned(_set("lens_type", "other")), "not a 'linear_tuned_lens'"),
    ("tuned-vocab", "tuned", _tuned(lambda d: d["lenskit"].__setitem__("d_vocab", 0)), "d_vocab"),
    ("tuned-lenskit-list", "tuned", _tuned(_set("lenskit", [])), "lenskit must be"),
    ("tuned-array", "tuned", _tuned(lambda d: [d]), "must be a JSON object"),
    ("tuned-pickle", "tuned", _pickle_params, "truncated or corrupt"),
    # Jacobian lens header
    ("jlens-n-prompts-negative", "jacobian", _jlens(_set("n_prompts", -3)), "n_prompts"),
    ("jlens-n-prompts-zero", "jacobian", _jlens(_set("n_prompts", 0)), "n_prompts"),
    ("jlens-d-model", "jacobian", _jlens(_set("d_model", 0)), "not a readable J-lens"),
    (
        "jlens-negative-layer",
        "jacobian",
        _jlens(lambda p: p["J"].__setitem__(-1, p["J"].pop(0))),
        "each source layer",
    ),
    (
        "jlens-target",
        "jacobian",
        _jlens(lambda p: p["metadata"].__setitem__("target_layer", -2)),
        "target_layer",
    ),
    (
        "jlens-model-name",
        "jacobian",
        _jlens(lambda p: p["metadata"].__setitem__("model_name", 5)),
        "model_name",
    ),
    (
        "jlens-lenskit-layers",
        "jacobian",
        _jlens(lambda p: p["metadata"]["lenskit"].__setitem__("n_layers", "4")),
        "lenskit.n_layers",
    ),
    ("jlens-pickle", "jacobian", _pickle_jlens, "not a readable J-lens"),
]


@pytest.mark.parametrize(
    ("kind", "make", "message"), [r[1:] for r in FILES], ids=[r[0] for r in FILES]
)
def test_bad_lens_files_give_one_line(world, opened, kind, make, message):
    path = make(world)
    before = _tree(world.root)
    with pytest.raises(LenskitError) as err:
        lenskit.get_lens(kind, world.model, path=str(path))
    assert message in one_line(str(err.value))
    assert _tree(world.root) == before  # nothing written, no payload ran
    assert not (world.root / "MARKER").exists()
    assert not [p for p in opened if _under(p, world.secret)]


def test_the_well_formed_files_load(world):
    for kind, path in (("tuned", world.tuned), (KIND, world.basis), ("jacobian", world.jlens)):
        assert lenskit.get_lens(kind, world.model, path=str(path)).kind == kind
    index = BasisIndex.from_dict(json.loads((world.basis / INDEX_FILE).read_text()))
    assert BasisIndex.from_dict(index.to_dict()) == index


def test_a_basis_layer_below_zero_is_refused_before_any_file(world):
    with pytest.raises(LenskitError, match="layer must be an integer >= 0") as err:
        CausalBasis.load(world.basis, -1)
    assert "extract layer -1" not in str(err.value)


# --- table 2: the command line -------------------------------------------------------------


def _traj(*extra: str) -> list[str]:
    return ["trajectory", "--model", "tiny-llama", "--prompt", "Hello", *extra]


def _out(command: str, *extra: str) -> Callable[[World], list[str]]:
    base = {
        "train": ["train", "--model", "tiny-llama", "--tokens", "2048"],
        "fit-jacobian": ["fit-jacobian", "--model", "tiny-llama", "--prompts", "1"],
        "causal-basis": ["causal-basis", "--model", "tiny-llama", "--layer", "1"],
        "eval": ["eval", "--model", "tiny-llama", "--tokens", "64"],
    }[command]
    return lambda w: [*base, *extra]


CLI = [
    # earlier issues: bad text and names
    ("empty-prompt", lambda w: ["trajectory", "--model", "tiny-llama", "--prompt", ""], "empty"),
    ("unknown-lens", lambda w: _traj("--lens", "nope"), "unknown lens kind"),
    ("bad-spec", lambda w: _traj("--lens", "tuned:"), "bad lens spec"),
    ("long-prompt", lambda w: _traj("--prompt", "x" * 300), "longer than the model's context"),
    # item 12: the rows and positions a trajectory computes (memory stays bounded by them)
    ("rows-outside", lambda w: _traj("--rows", "99"), "outside 0..4"),
    ("rows-not-a-list", lambda w: _traj("--rows", "x"), "is not a list of rows"),
    ("positions-empty", lambda w: _traj("--positions", "5:2"), "select no positions"),
    ("target-two-tokens", lambda w: _traj("--target", "xy"), "not one"),
    ("uncached-model", lambda w: _traj("--model", "nobody/none-such-xyz"), "not in the local"),
    ("missing-lens", lambda w: _traj("--lens", f"tuned:{w.root}/none"), "no tuned lens folder"),
    # sub-layer rows: unknown points, and a family with no stream between attention and MLP
    ("points-unknown", lambda w: _traj("--points", "resid_mud"), "names resid_mud point"),
    ("points-unknown-eval", _out("eval", "--points", "mid", "--out", "o"), "names mid point"),
    (
        "points-parallel-family",
        lambda w: _traj("--model", "tiny-gpt-neox", "--points", "resid_pre,resid_mid"),
        "runs attention and MLP in parallel",
    ),
    # names and paths over the system's limits (Errno 36 before)
    ("long-model", lambda w: _traj("--model", f"{w.root}/{LONG}"), "--model has a name"),
    ("long-lens", lambda w: _traj("--lens", f"tuned:{w.root}/{LONG}"), "--lens has a name"),
    ("long-json", lambda w: _traj("--json", f"{w.root}/{LONG}.json"), "--json has a name"),
    ("long-data", _out("eval", "--data", LONG, "--out", "o"), "--data has a name"),
    ("long-out-train", _out("train", "--out", LONG), "--out has a name"),
    ("long-out-jacobian", _out("fit-jacobian", "--out", LONG), "--out has a name"),
    ("long-out-basis", _out("causal-basis", "--out", LONG), "--out has a name"),
    ("long-out-eval", _out("eval", "--out", LONG), "--out has a name"),
    ("long-path", lambda w: _traj("--json", "/".join(["d" * 200] * 25)), "over the system's"),
    # outputs checked before the work (a traceback after the work before)
    ("json-is-folder", lambda w: _traj("--json", str(w.ok)), "is a folder"),
    ("json-under-file", lambda w: _traj("--json", f"{w.jlens}/x.json"), "cannot be created"),
    ("out-is-file-train", _out("train", "--out", "ok/j.pt"), "is a file"),
    ("out-is-file-basis", _out("causal-basis", "--out", "ok/j.pt"), "is a file"),
    ("out-under-file-eval", _out("eval", "--out", "ok/j.pt/x"), "cannot be created"),
    ("figures-under-file", _out("causal-basis", "--out", "n", "--figures", "ok/j.pt/f"), "cannot"),
    # corrupt files and payloads through the command line
    ("pickle-tuned", lambda w: _traj("--lens", f"tuned:{_pickle_params(w)}"), "corrupt"),
    ("pickle-jlens", lambda w: _traj("--lens", f"jacobian:{_pickle_jlens(w)}"), "not a readable"),
    (
        "basis-out-of-folder",
        lambda w: _traj("--lens", f"{KIND}:{_layer(_set('file', '../secret/x.safetensors'))(w)}"),
        "plain *.safetensors file name",
    ),
    (
        "jlens-n-prompts",
        lambda w: _traj("--lens", f"jacobian:{_jlens(_set('n_prompts', -3))(w)}"),
        "n_prompts must be an integer >= 1",
    ),
]


@pytest.mark.parametrize(("argv", "message"), [r[1:] for r in CLI], ids=[r[0] for r in CLI])
def test_bad_command_lines_exit_2_with_one_line(world, opened, capsys, argv, message):
    args = argv(world)
    before = _tree(world.root)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in one_line(err)
    assert _tree(world.root) == before  # nothing written anywhere, no payload ran
    assert not [p for p in opened if _under(p, world.secret)]


def test_a_training_folder_in_use_is_refused_in_one_line(world, capsys):
    from lenskit.training.lock import FolderLock

    busy = world.root / "busy"
    with FolderLock(busy):  # item 3: another run holds the folder
        before = _tree(world.root)
        code = main(
            [
                "train",
                "--model",
                "tiny-llama",
                "--tokens",
                "0",
                "--seq-len",
                "32",
                "--lstsq-tokens",
                "64",
                "--eval-tokens",
                "32",
                "--val-tokens",
                "0",
                "--out",
                str(busy),
            ]
        )
        after = _tree(world.root)
    assert code == 2 and "is in use by another training run" in one_line(capsys.readouterr().err)
    assert after == before


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ([1, 10**6], "outside the model's vocabulary"),  # item 10: IndexError before
        ([-1, 2], "outside the model's vocabulary"),
        ([1.0, 2.0], "must be integers"),  # silently truncated before
    ],
)
def test_bad_token_ids_give_one_line(world, ids, message):
    import torch

    lens = lenskit.get_lens("logit", world.model)
    with pytest.raises(LenskitError) as err:
        lenskit.trajectory(world.model, lens, torch.tensor(ids))
    assert message in one_line(str(err.value))


def test_the_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lenskit.cli", *_traj("--json", f"{tmp_path}/{LONG}")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--json has a name" in one_line(proc.stderr)


# --- table 3: the app's path checks ----------------------------------------------------------


def _same_refusal(w: World, check: Callable[[str], object], inside_secret: str) -> str:
    """The refusal for an existing and a missing outside path: equal but for the path."""
    messages = []
    for target in (w.secret / inside_secret, w.secret / "none-such"):
        with pytest.raises(LenskitError) as err:
            check(str(target))
        messages.append(one_line(str(err.value)).replace(str(target), "PATH"))
    assert messages[0] == messages[1]
    return messages[0]


APP = [
    # item 1: paths a causal-basis folder names
    (
        "basis-records-outside-tuned",
        lambda w: paths.lens_options(
            KIND, str(_basis(lambda d: d["lens"].__setitem__("path", str(w.secret / "tuned")))(w))
        ),
        "tuned lens named in",
    ),
    (
        "basis-layer-file-dotdot",
        lambda w: paths.lens_options(
            KIND, str(_layer(_set("file", "../secret/layer_1.safetensors"))(w))
        ),
        "plain *.safetensors",
    ),
    (
        "basis-layer-file-absolute",
        lambda w: paths.lens_options(
            KIND, str(_layer(_set("file", str(w.secret / "layer_1.safetensors")))(w))
        ),
        "plain *.safetensors",
    ),
    (
        "basis-layer-file-link-out",
        lambda w: paths.lens_options(KIND, str(_link_layer_out(w))),
        "links outside",
    ),
    (
        "basis-folder-outside",
        lambda w: paths.lens_options(KIND, str(w.secret)),
        "outside the folders the app may use",
    ),
    # item 2: models
    ("model-etc", lambda w: paths.check_model("/etc"), "outside the folders"),
    ("model-outside", lambda w: paths.check_model(str(w.secret / "model")), "outside the folders"),
    ("model-dotdot", lambda w: paths.check_model("ok/../secret/model"), "outside the folders"),
    ("model-home", lambda w: paths.check_model("~"), "outside the folders"),
    (
        "model-uncached-id",
        lambda w: paths.check_model("nobody/none-such-xyz"),
        "not in the local Hugging Face cache",
    ),
    # item 6: names over the limits in the path boxes
    ("long-lens-box", lambda w: paths.lens_file(f"ok/{LONG}"), "over the system's limit"),
    ("long-corpus-box", lambda w: paths.corpus_path(f"ok/{LONG}"), "over the system's limit"),
    ("long-out-box", lambda w: paths.out_path(f"ok/{LONG}"), "over the system's limit"),
    ("long-model-box", lambda w: paths.check_model(f"ok/{LONG}"), "over the system's limit"),
    # item 8: link loops, inside a folder and as the allowed folder itself
    ("loop-path", lambda w: paths.check_path(str(_loop(w.ok))), "cannot be resolved"),
    ("loop-in-folder", lambda w: (_loop(w.ok / "sub"), paths.check_path("ok/sub")), "in a loop"),
    ("loop-root", lambda w: _with_root(_loop(w.root / "r"), "ok/x"), "no usable folder"),
    # earlier issues: typed paths
    ("outside", lambda w: paths.check_path(str(w.secret)), "outside the folders"),
    ("dotdot", lambda w: paths.check_path("ok/../secret"), "outside the folders"),
    ("empty", lambda w: paths.check_path("  "), "is empty"),
    ("nul", lambda w: paths.check_path("ok/a\x00b"), "NUL"),
    ("link-out", lambda w: paths.check_path(str(_link(w.ok / "l", w.secret))), "outside"),
    ("corpus-missing", lambda w: paths.corpus_path("ok/none-such.txt"), "no file or folder"),
    ("out-is-file", lambda w: paths.out_path("ok/j.pt"), "is a file"),
    ("out-in-package", lambda w: _with_root(ROOT, str(ROOT / "lenskit" / "x")), "inside"),
]


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _loop(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return _link(folder / "loop", folder / "loop")


def _link_layer_out(w: World) -> Path:
    folder = w.copy(w.basis, "linked")
    (folder / "layer_1.safetensors").unlink()
    _link(folder / "layer_1.safetensors", w.secret / "layer_1.safetensors")
    return folder


def _with_root(root: Path, path: str) -> object:
    os.environ[DIRS_ENV] = str(root)  # restored by the world fixture's monkeypatch
    return paths.out_path(path)


@pytest.mark.parametrize(("check", "message"), [r[1:] for r in APP], ids=[r[0] for r in APP])
def test_app_path_tricks_are_refused_in_one_line(world, opened, check, message):
    with pytest.raises(LenskitError) as err:
        check(world)
    assert message in one_line(str(err.value))
    assert not [p for p in opened if _under(p, world.secret)]


@pytest.mark.parametrize(
    ("what", "check", "name"),
    [
        ("model", paths.check_model, "model"),
        ("lens", paths.lens_file, "tuned"),
        ("corpus", paths.corpus_path, "tuned/config.json"),
        ("output", paths.out_path, "tuned"),
    ],
)
def test_refusals_do_not_say_whether_an_outside_path_exists(world, what, check, name):
    assert "outside the folders" in _same_refusal(world, check, name)


def test_the_recorded_tuned_lens_is_refused_alike_whether_it_exists_or_not(world):
    def options(target: str) -> object:
        folder = world.ok / "basis-out"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(world.basis, folder)
        _edit_json(folder / INDEX_FILE, lambda d: d["lens"].__setitem__("path", target))
        return paths.lens_options(KIND, str(folder))

    assert "tuned lens named in" in _same_refusal(world, options, "tuned")


def test_allowed_sources_stay_allowed(world, monkeypatch):
    assert paths.check_model("tiny-llama") == "tiny-llama"
    assert paths.check_model("smollm2-135m") == "smollm2-135m"
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}"
    )
    assert paths.check_model("org/cached-model") == "org/cached-model"
    (world.ok / "m").mkdir()
    assert paths.check_model("ok/m") == "ok/m"
    assert paths.lens_options(KIND, str(world.basis)) == {
        "path": str(world.basis.resolve()),
        "tuned": str(world.tuned.resolve()),
    }
    assert paths.lens_options("tuned", None) == {}


def test_the_app_loads_a_basis_only_with_its_checked_tuned_lens(world):
    options = paths.lens_options(KIND, str(world.basis))
    lens = lenskit.get_lens(KIND, world.model, **options)
    assert lens.tuned.source == str(world.tuned.resolve())


# --- the app itself: Home refuses outside models and lens files ------------------------------


def _home(world: World, **state) -> object:
    from streamlit.testing.v1 import AppTest

    import lenskit_app.state as S

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.session_state[S.PROMPT] = "Hello there"
    at.session_state[S.MODEL] = "tiny-llama"
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def test_home_refuses_a_model_folder_outside(world, opened):
    import lenskit_app.state as S

    at = _home(world, **{S.MODEL: str(world.secret / "model")})
    assert not at.exception
    assert any("outside the folders the app may use" in e.value for e in at.error)
    assert not [p for p in opened if _under(p, world.secret)]


def test_home_never_calls_a_basis_with_an_outside_tuned_lens_ready(world, opened):
    import lenskit_app.state as S

    folder = _basis(lambda d: d["lens"].__setitem__("path", str(world.secret / "tuned")))(world)
    at = _home(world, **{S.LENS_PATHS: {KIND: str(folder)}})
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert f"**{KIND}** — ready" not in text
    assert any("tuned lens named in" in e.value for e in at.error)
    assert not [p for p in opened if _under(p, world.secret)]


# --- outputs: checked before any work ----------------------------------------------------------


def test_check_output_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b" / "c.json"
    assert check_output(target, "--json") == target
    assert list(tmp_path.iterdir()) == []
    assert check_path_limits("x" * 255, "--out") == "x" * 255


# --- tests that never run: the CI skip check and the test extras ------------------------------


def _junit(tmp_path: Path, reason: str) -> str:
    suite = ET.Element("testsuite")
    case = ET.SubElement(suite, "testcase", classname="tests.t", name="test_x")
    ET.SubElement(case, "skipped", type="pytest.skip", message=reason)
    ET.SubElement(suite, "testcase", classname="tests.t", name="test_y")
    file = tmp_path / "report.xml"
    ET.ElementTree(suite).write(file)
    return str(file)


def test_ci_fails_on_an_unexpected_skip(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / ".ci"))
    try:
        import check_skips
    finally:
        sys.path.remove(str(ROOT / ".ci"))
    assert check_skips.main(["x", _junit(tmp_path, "could not import 'scipy'")]) == 1
    assert "unexpected skip: tests.t::test_x" in capsys.readouterr().err
    assert check_skips.main(["x", _junit(tmp_path, "needs CUDA")]) == 0
    assert ".ci/check_skips.py" in (ROOT / ".ci" / "run").read_text()


def test_the_test_extras_hold_what_every_test_imports():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]["test"]
    names = {re.split(r"[<>=\[; ]", e, maxsplit=1)[0].lower() for e in extras}
    assert "scipy" in names
    import scipy.stats  # the causal-basis cross-check's reference

    assert scipy.stats.spearmanr([1, 2, 3], [1, 3, 2]).statistic == pytest.approx(0.5)
