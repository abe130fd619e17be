"""Shared by the test files: where the benchmark files are, and a slice of the real Beauty file (its first
BEAUTY_SLICE_USERS users, set per file); one torch thread; Ctrl-C stops the suite.

The data folder is ./data next to this file (where `python data_prep.py all` puts the files), or the folder named
by the environment variable UNIFORM_SEQREC_DATA, as for uniform_seqrec.py and data_prep.py. A test that needs a
missing file is skipped, naming the file and the command that gets it."""
import itertools
import os
import signal
import warnings

import pytest

# One thread, in this process and in the programs the tests start, unless OMP_NUM_THREADS says otherwise: the tests'
# trainings are small, and torch's default (a thread per core) made each epoch 150 to 220 s on a busy 2-core machine
# where one thread finished the suite in minutes (issue 33).
if not os.environ.get("OMP_NUM_THREADS", "").isdigit() or os.environ["OMP_NUM_THREADS"] == "0":
    os.environ["OMP_NUM_THREADS"] = "1"
# numpy is not a dependency: torch warns once, at import, that it is missing (uniform_seqrec.py silences the same line)
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402 - after the lines above

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def ctrl_c_stops_the_suite(monkeypatch):
    """Ctrl-C during a test ends the whole run. The programs under test catch KeyboardInterrupt to end in one line
    (exit 130), so pytest never saw it: the test failed and the next began. Every SIGINT handler installed during
    the test (the default one, runs.main's) is wrapped to note the signal, and the run stops after the test."""
    pressed, install = [], signal.signal

    def noting(handler):
        def handle(signum, frame):
            pressed.append(signum)
            if callable(handler):
                return handler(signum, frame)
            raise KeyboardInterrupt
        return handle

    def signal_noting(signum, handler):
        return install(signum, noting(handler) if signum == signal.SIGINT and callable(handler) else handler)

    before = install(signal.SIGINT, noting(signal.getsignal(signal.SIGINT)))
    monkeypatch.setattr(signal, "signal", signal_noting)
    yield
    install(signal.SIGINT, before)
    if pressed:
        pytest.exit("interrupted (Ctrl-C)", returncode=130)

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
