"""Shared fixtures: tiny random models built in code, and the embedded SmolLM2 (slow)."""

from __future__ import annotations

import os

import pytest
from helpers import write_corpus

import lenskit

# Tests compare against float64 references at float32 tolerances: the readout runs in
# float32 here; the fast path's accuracy has tests of its own (tests/test_readout.py).
os.environ["LENSKIT_PRECISION"] = "exact"
# The suite runs the command line in its own long process: leave malloc as it is there
# (tests/test_allocator.py checks the setting in processes of its own).
os.environ["LENSKIT_RETAIN_MEMORY"] = "0"


@pytest.fixture(scope="session")
def tiny_llama():
    return lenskit.load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_gpt2():
    return lenskit.load_model("tiny-gpt2")


@pytest.fixture(scope="session", params=["tiny-llama", "tiny-gpt2"])
def tiny_model(request, tiny_llama, tiny_gpt2):
    return {"tiny-llama": tiny_llama, "tiny-gpt2": tiny_gpt2}[request.param]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A small corpus folder (see :func:`helpers.write_corpus`); tests only read it."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def smollm2():
    return lenskit.load_model("smollm2-135m")
