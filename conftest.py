"""Shared by the test files: where the benchmark files are, and a slice of the real Beauty file (its first
BEAUTY_SLICE_USERS users, set per file).

The data folder is ./data next to this file (where `python data_prep.py all` puts the files), or the folder named
by the environment variable UNIFORM_SEQREC_DATA, as for uniform_seqrec.py and data_prep.py. A test that needs a
missing file is skipped, naming the file and the command that gets it."""
import itertools
import os

import pytest

from data_prep import DATA_DIR_VARIABLE, benchmark_path

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.environ.get(DATA_DIR_VARIABLE) or os.path.join(HERE, "data")
BEAUTY = benchmark_path("beauty", DATA_DIR)


def missing(name):
    """The skip reason of a test that needs benchmark `name`, or None when its file is there."""
    path = benchmark_path(name, DATA_DIR)
    if os.path.isfile(path):
        return None
    command = f"python data_prep.py {name}" + (f" --data-dir {DATA_DIR}" if os.environ.get(DATA_DIR_VARIABLE) else "")
    return f"{path} not found; get it with: {command}"


def needs(name):
    """Mark a test that reads benchmark `name` from DATA_DIR: skipped, saying why, when the file is missing."""
    return pytest.mark.skipif(missing(name) is not None, reason=missing(name) or "")


@pytest.fixture(scope="module")
def beauty_slice(request, tmp_path_factory):
    if missing("beauty"):
        pytest.skip(missing("beauty"))
    path = tmp_path_factory.mktemp("data") / "beauty_slice.txt"
    with open(BEAUTY) as f:
        path.write_text("".join(itertools.islice(f, request.module.BEAUTY_SLICE_USERS)))
    return str(path)


def backbone(name, num_items, num_users=0, max_len=20, **settings):
    """uniform_seqrec.build_model from a configuration that holds only what the backbones read (small by default)."""
    import uniform_seqrec
    config = {"model": name, "dim": 16, "layers": 2, "heads": 2, "dropout": 0.5, "caser_window": 4,
              "caser_activation": "relu", "caser_users": num_users > 0, "caser_output_table": False, **settings}
    return uniform_seqrec.build_model(config, num_items, num_users, max_len)
