"""The app's folder rule: typed paths are resolved, then refused outside the allowed folders."""

import os
from pathlib import Path

import pytest

from lenskit.errors import LenskitError
from lenskit.io import cache_dir
from lenskit_app.paths import (
    DIRS_ENV,
    allowed_roots,
    check_path,
    corpus_path,
    folder_name,
    is_allowed,
    lens_home,
    next_lens_dir,
    out_path,
    saved_lenses,
)


@pytest.fixture()
def tree(tmp_path, monkeypatch):
    """An allowed folder ``ok`` beside a forbidden ``secret``; only ``ok`` is configured."""
    ok, secret = tmp_path / "ok", tmp_path / "secret"
    (ok / "sub").mkdir(parents=True)
    secret.mkdir()
    (ok / "sub" / "a.txt").write_text("fine")
    (secret / "b.txt").write_text("private")
    monkeypatch.setenv(DIRS_ENV, str(ok))
    return ok, secret


def test_default_roots_are_the_working_and_cache_folders(monkeypatch):
    monkeypatch.delenv(DIRS_ENV, raising=False)
    assert allowed_roots() == (Path.cwd().resolve(), cache_dir().resolve())


def test_roots_come_from_the_environment(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv(DIRS_ENV, f"{a}{os.pathsep} {b} {os.pathsep}{a}")
    assert allowed_roots() == (a.resolve(), b.resolve())


def test_paths_inside_are_resolved_and_kept(tree):
    ok, _ = tree
    assert check_path(ok / "sub" / "a.txt") == (ok / "sub" / "a.txt").resolve()
    assert check_path(ok) == ok.resolve()
    assert check_path(f"{ok}/sub/../sub/new-folder") == (ok / "sub" / "new-folder").resolve()


def test_paths_outside_are_refused_naming_the_allowed_folders(tree):
    ok, secret = tree
    for path in (secret / "b.txt", secret, ok.parent, "/etc/passwd"):
        with pytest.raises(LenskitError, match="outside the folders the app may use") as err:
            check_path(path, what="corpus")
        message = str(err.value)
        assert "\n" not in message and str(ok.resolve()) in message and DIRS_ENV in message
        assert "corpus" in message


def test_dot_dot_cannot_climb_out(tree):
    ok, _ = tree
    with pytest.raises(LenskitError, match="outside"):
        check_path(f"{ok}/sub/../../secret/b.txt")
    assert not is_allowed(f"{ok}/../secret")


def test_a_symlink_cannot_lead_out(tree):
    ok, secret = tree
    (ok / "link.txt").symlink_to(secret / "b.txt")
    (ok / "linkdir").symlink_to(secret, target_is_directory=True)
    for path in (ok / "link.txt", ok / "linkdir", ok / "linkdir" / "b.txt"):
        with pytest.raises(LenskitError, match="outside"):
            check_path(path)


def test_a_folder_holding_a_link_out_is_refused(tree):
    ok, secret = tree
    (ok / "sub" / "more.txt").symlink_to(secret / "b.txt")
    with pytest.raises(LenskitError, match="links outside"):
        check_path(ok / "sub", what="corpus")
    (ok / "sub" / "more.txt").unlink()
    (ok / "sub" / "inside.txt").symlink_to(ok / "sub" / "a.txt")  # a link that stays in
    assert check_path(ok / "sub") == (ok / "sub").resolve()


def test_relative_paths_start_at_the_working_folder(tree, monkeypatch):
    ok, _ = tree
    monkeypatch.chdir(ok / "sub")
    assert check_path("a.txt") == (ok / "sub" / "a.txt").resolve()
    with pytest.raises(LenskitError, match="outside"):
        check_path("../../secret/b.txt")


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_path_is_refused(tree, text):
    with pytest.raises(LenskitError, match="empty"):
        check_path(text, what="lens")


def test_lenses_go_to_the_cache_when_it_is_allowed(tree, monkeypatch):
    ok, _ = tree
    assert lens_home("nobody/some model") == ok.resolve() / "lenses" / "nobody_some_model"
    monkeypatch.setenv(DIRS_ENV, f"{ok}{os.pathsep}{cache_dir()}")
    assert lens_home("tiny-llama") == cache_dir().resolve() / "lenses" / "tiny-llama"
    assert folder_name("../..") == "model"


def test_saved_lenses_are_found_and_fresh_names_skip_them(tree):
    _, secret = tree
    home = lens_home("tiny-llama")
    assert next_lens_dir("tiny-llama") == home / "tuned-1"
    for name in ("tuned-1", "tuned-2"):
        (home / name).mkdir(parents=True)
        (home / name / "config.json").write_text("{}")
    (home / "half-done").mkdir()  # a run without a lens yet
    (home / "j.pt").write_bytes(b"")
    (secret / "lens").mkdir()
    (secret / "lens" / "config.json").write_text("{}")
    (home / "linked").symlink_to(secret / "lens", target_is_directory=True)
    assert sorted(saved_lenses("tiny-llama", "tuned")) == [
        str(home / "tuned-1"),
        str(home / "tuned-2"),
    ]
    assert saved_lenses("tiny-llama", "jacobian") == [str(home / "j.pt")]
    assert saved_lenses("tiny-gpt2", "tuned") == []
    assert next_lens_dir("tiny-llama") == home / "tuned-3"


def test_corpus_and_output_paths_are_checked(tree):
    ok, secret = tree
    assert corpus_path(ok / "sub") == str((ok / "sub").resolve())
    with pytest.raises(LenskitError, match="no file or folder at"):
        corpus_path(ok / "nothing.txt")
    with pytest.raises(LenskitError, match="outside"):
        corpus_path(secret / "b.txt")
    assert out_path(ok / "new") == (ok / "new").resolve()
    with pytest.raises(LenskitError, match="is a file"):
        out_path(ok / "sub" / "a.txt")


def test_outputs_never_go_into_the_lenskit_package(monkeypatch):
    import lenskit

    package = Path(lenskit.__file__).resolve().parent
    monkeypatch.setenv(DIRS_ENV, str(package.parent))  # e.g. the app started in the repo
    assert out_path(package.parent / "lenses" / "mine") == package.parent / "lenses" / "mine"
    for inside in (package, package / "assets" / "causal_basis" / "smollm2-135m"):
        with pytest.raises(LenskitError, match="inside the lenskit package"):
            out_path(inside)
