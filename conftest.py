"""Shared by the test files: a slice of the real Beauty file (its first BEAUTY_SLICE_USERS users, set per file)."""
import itertools
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BEAUTY = os.path.join(os.environ.get("UNIFORM_SEQREC_DATA") or os.path.join(HERE, "..", "shared", "data"),
                      "Beauty.txt")


@pytest.fixture(scope="module")
def beauty_slice(request, tmp_path_factory):
    if not os.path.isfile(BEAUTY):
        pytest.skip(f"{BEAUTY} not found: run `python data_prep.py beauty` first")
    path = tmp_path_factory.mktemp("data") / "beauty_slice.txt"
    with open(BEAUTY) as f:
        path.write_text("".join(itertools.islice(f, request.module.BEAUTY_SLICE_USERS)))
    return str(path)
