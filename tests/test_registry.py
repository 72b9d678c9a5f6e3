import pytest

import lenskit
from lenskit.errors import LenskitError
from lenskit.lenses import Lens, lens_class, parse_lens_spec, register_lens
from lenskit.lenses.base import _REGISTRY


def test_logit_is_registered():
    assert "logit" in lenskit.available_lenses()
    assert lens_class("logit").kind == "logit"


def test_unknown_kind_names_the_known_ones(tiny_llama):
    with pytest.raises(LenskitError, match=r"unknown lens kind 'nope': use one of .*logit"):
        lenskit.get_lens("nope", tiny_llama)


def test_logit_lens_takes_no_options(tiny_llama):
    with pytest.raises(LenskitError, match="takes no options"):
        lenskit.get_lens("logit", tiny_llama, path="x")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("logit", ("logit", {})), ("logit:some/dir", ("logit", {"path": "some/dir"}))],
)
def test_parse_lens_spec(spec, expected):
    assert parse_lens_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", ":x", "logit:"])
def test_bad_specs(spec):
    with pytest.raises(LenskitError):
        parse_lens_spec(spec)


def test_a_new_kind_registers_without_changes_elsewhere(tiny_llama):
    @register_lens("test-double")
    class Doubling(Lens):
        @classmethod
        def from_model(cls, model, **options):
            return cls(lenskit.ModelAdapter(model))

        def transform_hidden(self, h, layer):
            return 2 * h

    try:
        assert "test-double" in lenskit.available_lenses()
        lens = lenskit.get_lens("test-double", tiny_llama)
        traj = lenskit.trajectory(tiny_llama, lens, "abc")
        assert traj.lens_kind == "test-double"
    finally:
        _REGISTRY.pop("test-double")
