"""Runs that survive interruption, repeat exactly, and refuse bad input with one line (exit code 2)."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import runs as R
import uniform_seqrec as U
from conftest import BEAUTY as BEAUTY_PATH, DATA_DIR, backbone, needs

HERE = os.path.dirname(os.path.abspath(__file__))
BEAUTY_SLICE_USERS = 1500  # the conftest.py fixture beauty_slice
SMALL = ["--model", "sasrec", "--dim", "16", "--layers", "1", "--heads", "1", "--device", "cpu", "--lr", "1e-3"]


def run_cli(*args, timeout=300):
    """The command line as a user runs it: a separate process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(HERE, "uniform_seqrec.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=HERE)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the problem, exit code 2, nothing left behind
# ----------------------------------------------------------------------------------------------------------------

GOOD = "1 1 2 3 4\n2 2 3 4 5\n3 3 4 5 1 2\n"
BAD_FILES = [
    ("empty", "", "is empty"),
    ("not an integer", "1 1 2 3\n2 2 x 4\n", "line 2: 'x' is not an integer id"),
    ("a float", "1 1 2.5 3\n", "line 1: '2.5' is not an integer id"),
    ("negative id", "1 1 2 3\n2 2 -3 4\n", "line 2: id -3 is invalid"),
    ("item id 0", "1 1 0 3 4\n", "line 1: id 0 is invalid"),
    ("user id 0", "0 1 2 3 4\n", "line 1: id 0 is invalid"),
    ("too short", "1 1 2 3\n2 5 6\n", "line 2: user 2 has 2 item(s); at least 3"),
    ("only a user", "1 1 2 3\n2\n", "line 2: user 2 has 0 item(s)"),
    ("user twice", "1 1 2 3\n1 2 3 4\n", "line 2: user 1 already appears on line 1"),
    ("not text", "1 1 2 3\n2 \xe9 3 4\n", "line 2: byte 0xe9 at column 3 is not UTF-8 text"),
    ("id beyond 64 bits", "1 1 2 3\n2 2 99999999999999999999999 4\n",
     "line 2: id 99999999999999999999999 is too large (ids go up to 2**63 - 1)"),
    ("id of 5000 digits", "1 1 2 3\n2 2 " + "9" * 5000 + " 4\n",
     "line 2: id 99999999999999999999...(5000 characters) is too large"),
    ("user id beyond 64 bits", "1 1 2 3\n18446744073709551616 2 3 4\n", "line 2: id 18446744073709551616 is too large"),
    ("NUL byte", "1 1 2 3\n2 2\x003 4\n", "line 2: NUL byte at column 4"),
    ("NUL padding", "1 1 2 3\n2 2 3 4\n" + "\x00" * 512, "line 3: NUL byte at column 1"),
    ("UTF-16 without byte-order mark", "1 1 2 3\n".encode("utf-16-le").decode("latin-1"),
     "looks like UTF-16 without a byte-order mark"),
    ("UTF-16 cut off", "\ufeff1 1 2 3\n".encode("utf-16-le").decode("latin-1") + "x",
     "UTF-16-LE byte-order mark, but byte"),
    ("comma-separated", "1,1,2,3\n",
     "line 1: '1,1,2,3' is not an integer id (ids are separated by spaces or tabs, not commas)"),
    ("superscript digit", "1 1 2 3\n2 2 3 \u00b2\n".encode().decode("latin-1"),
     "line 2: '\u00b2' is not an integer id"),
    ("only blank lines", "\n \n\t\n", "is empty"),
    ("item ids far beyond the number of items", "1 1 2 3\n2 2 3 1000000000000\n",
     "most of it for evaluation (1,024 users x 1,000,000,000,001 scores) (item ids run up to 1,000,000,000,000 for 4 "
     "items: number them 1..4)"),
]


@pytest.mark.parametrize("content,expected", [(c, e) for _, c, e in BAD_FILES], ids=[n for n, _, _ in BAD_FILES])
def test_bad_data_file_is_one_line_error(tmp_path, capsys, content, expected):
    path = tmp_path / "data.txt"
    path.write_bytes(content.encode("latin-1"))
    code = R.main(["--data", str(path), "--out", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()                                     # nothing created for a bad file


BAD_FLAGS = [
    (["--model", "bert4rec"], "argument --model: invalid choice: 'bert4rec'"),
    (["--loss", "mse"], "argument --loss: invalid choice: 'mse'"),
    (["--data", "movielens"], "unknown dataset 'movielens'"),
    (["--data", "/no/such/file.txt"], "no such data file: /no/such/file.txt"),
    (["--lr", "0"], "--lr must be positive (got 0.0)"),
    (["--lr", "nan"], "--lr must be positive (got nan)"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--batch-size", "-4"], "--batch-size must be positive"),
    (["--max-len", "0"], "--max-len must be positive"),
    (["--dim", "0"], "--dim must be positive"),
    (["--patience", "0"], "--patience must be positive"),
    (["--beta", "-0.1"], "--beta must be a finite number >= 0"),
    (["--t", "-2"], "--t must be a finite number >= 0"),
    (["--heads", "3"], "--heads 3 does not divide --dim 16"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--loss", "bce", "--no-hom"], "--no-hom only applies to --loss uniform"),
    (["--loss", "ce", "--no-het"], "--no-het only applies to --loss uniform"),
    (["--loss", "ce", "--negatives", "any"], "--negatives only applies to losses with sampled negatives, not --loss"),
    (["--loss", "ce", "--infonce-negatives", "8"], "--infonce-negatives only applies to --loss infonce"),
    (["--no-rec", "--no-hom", "--no-het"], "leave no loss to train"),
    (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    # every number at its edges: zero, negative, nan, inf, beyond the machine's integers, beyond its memory
    (["--lr", "inf"], "--lr must be finite (got inf)"),
    (["--lr", "1e400"], "--lr must be finite (got inf)"),
    (["--lr=-inf"], "--lr must be positive (got -inf)"),
    (["--beta", "nan"], "--beta must be a finite number >= 0 (got nan)"),
    (["--beta", "inf"], "--beta must be a finite number >= 0 (got inf)"),
    (["--t", "nan"], "--t must be a finite number >= 0 (got nan)"),
    (["--t", "inf"], "--t must be a finite number >= 0 (got inf)"),
    (["--dropout", "nan"], "--dropout must be in [0, 1) (got nan)"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1) (got -0.1)"),
    (["--dropout", "inf"], "--dropout must be in [0, 1) (got inf)"),
    (["--heads", "0"], "--heads must be positive (got 0)"),
    (["--layers", "-1"], "--layers must be positive (got -1)"),
    (["--caser-window", "0"], "--caser-window must be positive (got 0)"),
    (["--length-groups", "0"], "--length-groups must be positive (got 0)"),
    (["--epochs", "0"], "--epochs must be positive (got 0)"),
    (["--pause-after", "0"], "--pause-after must be an epoch from 1 to 2**63 - 1 (got 0)"),
    (["--pause-after", str(2 ** 63)], "--pause-after must be an epoch from 1 to 2**63 - 1"),
    (["--max-len", str(2 ** 63)], "--max-len 9223372036854775808 is too large (integers go up to 2**63 - 1)"),
    (["--batch-size", str(10 ** 30)], f"--batch-size {10 ** 30} is too large"),
    (["--epochs", str(10 ** 30)], f"--epochs {10 ** 30} is too large"),
    (["--seed", str(2 ** 64)],
     "--seed must be from -2**63 to 2**64 - 1, the seeds torch takes (got 18446744073709551616)"),
    (["--seed", str(-2 ** 63 - 1)], "--seed must be from -2**63 to 2**64 - 1"),
    (["--dim", str(10 ** 9)], "most of it for the model's weights (--layers 1, --dim 1000000000)"),
    (["--dim", str(10 ** 12)], "training would need about"),
    (["--layers", str(10 ** 9)], "training would need about"),
    (["--model", "gru4rec", "--layers", str(10 ** 9)], "training would need about"),
    (["--model", "caser", "--caser-window", str(10 ** 9)], "training would need about"),
]


def exit_code_of_main(args):
    """main() returns its exit code; argparse exits by itself (SystemExit) for flags it rejects."""
    try:
        return R.main(args)
    except SystemExit as exit:
        return exit.code


@pytest.mark.parametrize("flags,expected", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_error(tmp_path, capsys, flags, expected):
    path = tmp_path / "data.txt"
    path.write_text(GOOD)
    code = exit_code_of_main(["--data", str(path), "--out", str(tmp_path / "run"), *SMALL, *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


BAD_DEVICES = [  # (--device, what torch reports about CUDA: (is_available, device_count), expected)
    ("cuda", (False, 0), "--device cuda: CUDA is not available on this machine"),
    ("cuda:0", (False, 0), "--device cuda:0: CUDA is not available on this machine"),
    ("cuda:2", (True, 1), "--device cuda:2: this machine has 1 CUDA device(s), cuda:0 to cuda:0"),
    ("tpu", None, "--device 'tpu' is not a device name torch knows (auto, cpu, cuda, cuda:N, mps)"),
    ("gpu", None, "--device 'gpu' is not a device name torch knows"),
    ("cuda:x", None, "--device 'cuda:x' is not a device name torch knows"),
    ("", None, "--device '' is not a device name torch knows"),
    ("meta", None, "--device meta: there is no meta device to train on here"),
]


@pytest.mark.parametrize("device,cuda,expected", BAD_DEVICES, ids=[d or "empty" for d, _, _ in BAD_DEVICES])
def test_a_device_that_is_unknown_or_absent_is_one_line(tmp_path, capsys, monkeypatch, device, cuda, expected):
    if cuda is not None:                                                        # the same on a machine with a GPU
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda[0])
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda[1])
    path = tmp_path / "data.txt"
    path.write_text(GOOD)
    code = exit_code_of_main(["--data", str(path), "--out", str(tmp_path / "run"), *SMALL, "--device", device])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err and "Traceback" not in err
    if cuda is not None:                                                        # and how to see the devices
        assert "see which there are with: python -c" in err
    assert not (tmp_path / "run").exists()


def test_a_batch_beyond_the_machines_memory_is_one_line(tmp_path, capsys, monkeypatch):
    """--batch-size 10**12 means one batch of every example: the uniformity loss's (2B)^2 potentials of 20,000
    triplets need ~60 GiB. On a machine of 16 GiB (whatever this one has) that is refused before anything starts."""
    path = tmp_path / "data.txt"
    path.write_text("".join(f"{u} " + " ".join(str(1 + (u * 7 + k * 13) % 500) for k in range(13)) + "\n"
                            for u in range(1, 2001)))                           # 2,000 users x 10 examples
    monkeypatch.setattr(R, "device_memory", lambda device: 16 * 2 ** 30)
    code = R.main(["--data", str(path), "--out", str(tmp_path / "run"), *SMALL, "--batch-size", str(10 ** 12)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "more than the 16.0 GiB of cpu" in err
    assert "most of it for one batch (20,000 triplets, histories of up to 12 items; --batch-size 1000000000000" in err
    assert not (tmp_path / "run").exists()


def test_ces_logits_count_in_the_memory_estimate_and_a_batch_of_them_too_large_is_one_line(tmp_path, capsys,
                                                                                               monkeypatch):
    """CE's B x (N + 1) logits are a term of the batch, growing with the batch and with the ids; where they could
    never fit, the one line names them (and ids that run far beyond the number of items)."""
    sequences = [[1 + (u * 7 + k * 13) % 500 for k in range(13)] for u in range(200)]   # 2,000 examples
    config = lambda loss, batch: R.configure(["--data", small_data(tmp_path), *SMALL, "--loss", loss,
                                              "--batch-size", str(batch)])[0]
    extra = lambda batch, ids: (sum(R.memory_estimate(config("ce", batch), ids).values())
                                - sum(R.memory_estimate(config("bce", batch), ids).values()))
    wider = [s[:-1] + [2 * 501 - 1] for s in sequences]                      # ids up to 1,001: twice the rows
    assert extra(64, sequences) > 0
    assert extra(128, sequences) == 2 * extra(64, sequences) and extra(64, wider) == 2 * extra(64, sequences)
    assert any("logits (--loss ce)" in term for term in R.memory_estimate(config("ce", 64), sequences))
    assert not any("logits" in term for term in R.memory_estimate(config("bce", 64), sequences))

    path = tmp_path / "sparse.txt"                                           # 500 items, ids up to 100,000
    path.write_text("".join(f"{u + 1} " + " ".join(map(str, s[:-1] + [100_000])) + "\n"
                            for u, s in enumerate(sequences)))
    monkeypatch.setattr(R, "device_memory", lambda device: 2 * 2 ** 30)   # the logits of all 2,000: about 4 GB
    code = R.main(["--data", str(path), "--out", str(tmp_path / "run"), *SMALL, "--loss", "ce", "--batch-size",
                   str(10 ** 12)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "more than the 2.0 GiB of cpu" in err
    assert "x 100,001 logits (--loss ce) (item ids run up to 100,000 for" in err
    assert not (tmp_path / "run").exists()


def small_data(tmp_path, users=40, items=30):
    path = tmp_path / "small.txt"
    path.write_text("".join(f"{u} " + " ".join(str(1 + (u * 7 + k * 11) % items) for k in range(5 + u % 9)) + "\n"
                            for u in range(1, users + 1)))
    return str(path)


def test_a_history_length_far_beyond_any_history_trains_as_the_longest(tmp_path):
    """Nothing pads beyond the longest history or allocates for positions no history has: --max-len 10**9 trains
    (old code: a 64 GB position table), and exactly as --max-len = the longest history (12 items here)."""
    data, metrics = small_data(tmp_path), {}
    for max_len in (str(10 ** 9), "12"):
        out = tmp_path / max_len
        assert R.main(["--data", data, "--out", str(out), *SMALL, "--epochs", "2", "--max-len", max_len]) == 0
        metrics[max_len] = json.loads((out / "metrics.json").read_text())["test"]
    assert metrics[str(10 ** 9)] == metrics["12"]


def test_a_seed_anywhere_in_torchs_range_trains_as_torch_takes_it(tmp_path):
    """torch takes seeds modulo 2**64: -1 is 2**64 - 1. Both train (2**64 - 1 overflowed at epoch 1 before) and give
    the same numbers."""
    data, metrics = small_data(tmp_path), {}
    for seed in ("-1", str(2 ** 64 - 1)):
        out = tmp_path / seed
        assert R.main(["--data", data, "--out", str(out), *SMALL, "--epochs", "2", "--seed", seed]) == 0
        metrics[seed] = json.loads((out / "metrics.json").read_text())["test"]
    assert metrics["-1"] == metrics[str(2 ** 64 - 1)]


def test_item_ids_that_never_occur_are_named_when_training_starts(tmp_path, capsys):
    """Issue 33, item 5: ids with gaps (1, 5 and 1000 only) give an item table, negatives and rankings of every id up
    to the largest; training says in one line how many of them never occur. Ids 1..N all used: no such line."""
    gaps = tmp_path / "gaps.txt"
    sequences = [[1, 5, 1000, 1, 5], [5, 1000, 1, 5, 1000], [1000, 5, 1, 5]]
    gaps.write_text("".join(f"{u} " + " ".join(map(str, items)) + "\n" for u, items in enumerate(sequences, 1)))
    largest, distinct = max(map(max, sequences)), len(set(sum(sequences, [])))
    assert R.main(["--data", str(gaps), "--out", str(tmp_path / "run"), *SMALL, "--epochs", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "never occur" in line]
    assert lines == [f"{largest - distinct:,} of the item ids 1..{largest:,} never occur in {gaps} (it has {distinct} "
                     f"distinct items); they are trained and ranked as items all the same (number the items "
                     f"1..{distinct} to leave them out)"]
    assert R.main(["--data", small_data(tmp_path), "--out", str(tmp_path / "dense"), *SMALL, "--epochs", "1"]) == 0
    assert "never occur" not in capsys.readouterr().out


def test_a_folder_instead_of_a_file(tmp_path, capsys):
    assert R.main(["--data", str(tmp_path), *SMALL]) == 2
    assert "is a folder, not a data file" in capsys.readouterr().err


def test_data_that_is_not_a_regular_file_is_one_line(tmp_path):
    """Issue 33, item 4: a pipe (here a named one; --data /dev/stdin in a pipeline is another) gives its bytes once,
    so the run's fingerprint was of 0 bytes and a later run fed other data passed for it. It is refused, unopened
    (opening a named pipe would wait for a writer), and nothing is made."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    result = run_cli("--data", str(pipe), "--out", str(tmp_path / "run"), *SMALL, timeout=120)  # a process: opening
    assert result.returncode == 2 and result.stderr == (                          # the pipe would wait forever
        f"uniform_seqrec.py: error: {pipe} is not a regular file (a pipe, socket or device): a run's data is read to "
        f"train and again for its fingerprint, which a pipe cannot give twice; save it to a file and give that\n")
    assert not (tmp_path / "run").exists()
    with pytest.raises(R.DataError, match="is not a regular file"):
        R.data_fingerprint(str(pipe))


def test_errors_from_a_real_process_have_no_traceback(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("1 1 2 3\n2 2 x 4\n")
    for args in (["--data", str(path)], ["--model", "bert4rec"], ["--data", "beauty", "--data-dir", str(tmp_path)]):
        result = run_cli(*args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert result.stderr.startswith("uniform_seqrec.py: error: ")


def test_a_closed_output_ends_the_output_not_the_training(tmp_path):
    """Issue 33, item 6: `uniform_seqrec.py ... | head -1` closes the output after the first line; the run trains on
    to its result (it died with a BrokenPipeError after its first epoch)."""
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "uniform_seqrec.py"), "--data",
                                small_data(tmp_path), "--out", str(run), *SMALL, "--epochs", "3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = process.stdout.readline()                                           # as head -1 does
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=300) == 0 and "40 users, 30 items" in first and err == "", err
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.parametrize("args, expected", [
    (["--steps", "0"], "--steps must be positive (got 0)"),                       # was a ZeroDivisionError
    (["--rounds", "0"], "--rounds must be positive (got 0)"),
    (["--threads", "0"], "--threads must be positive (got 0)"),
    (["--length-groups", "0"], "--length-groups must be positive (got 0)"),       # was read as the default
    (["--sections", "loss,bogus"], "--sections: unknown section 'bogus' (known: loss, train, eval, memory"),
    (["--device", "tpu"], "--device 'tpu' is not a device name torch knows"),    # was a ConfigError traceback
    (["--data-dir", "{tmp}"], "Beauty.txt not found; get it with: python data_prep.py beauty --data-dir"),
    (["--data-dir", "{tmp}/bad"], "bad/Beauty.txt line 1: "),
])
def test_bench_refuses_bad_input_with_one_line(tmp_path, capsys, args, expected):
    """Issue 33, item 7: bench.py's bad input is one line and exit 2, as for the other commands, before any
    measurement (--sections bogus printed an empty table and exited 0)."""
    import bench
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "Beauty.txt").write_text("1 1 2 x\n")
    try:
        code = bench.main([arg.format(tmp=tmp_path) for arg in args])
    except SystemExit as exit:                                                      # argparse's error
        code = exit.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and expected in err, err
    assert err.startswith("bench.py: error: ")


def test_bench_recbole_section_without_recbole_says_in_one_line_how_to_install_it(tmp_path, capsys, monkeypatch):
    """RecBole is optional (not in requirements.txt, not installed in CI): `--sections recbole` without it is one
    line naming the install command, exit 2, before any section runs. Where RecBole is installed, its import is made
    to fail: None in sys.modules stops `import recbole...` (and its cached modules are set aside)."""
    import bench
    for name in [name for name in sys.modules if name.split(".")[0] == "recbole"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "recbole", None)
    (tmp_path / "Beauty.txt").write_text("1 1 2 3 4 5\n2 2 3 4 5 1\n")
    code = bench.main(["--device", "cpu", "--data-dir", str(tmp_path), "--sections", "loss,recbole"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("bench.py: error: the recbole section needs RecBole 1.2.1, an optional package (no module "
                          "'recbole'): pip install --no-deps recbole==1.2.1 && pip install pandas "), err
    assert err.rstrip("\n").endswith(bench.RECBOLE_INSTALL)


def test_a_recbole_count_mismatch_still_prints_the_other_sections_rows(tmp_path, capsys, monkeypatch):
    """RecBole's example count differing from ours ends the recbole section with one line (exit 2), after the
    table of the rows the sections before it measured, which are not thrown away."""
    import bench
    (tmp_path / "Beauty.txt").write_text("1 1 2 3 4 5\n2 2 3 4 5 1\n")
    monkeypatch.setattr(bench, "import_recbole", lambda device: "recbole")
    monkeypatch.setattr(bench, "bench_loss", lambda device, rows: rows.append(("loss", "a row", "1 ms", "")))
    monkeypatch.setattr(bench, "bench_dropout", lambda device, rows: None)

    def mismatch(*args):
        raise bench.DataError("RecBole's epoch has 9 examples, ours 8: not the same training part")
    monkeypatch.setattr(bench, "bench_recbole", mismatch)
    code = bench.main(["--device", "cpu", "--data-dir", str(tmp_path), "--sections", "loss,recbole"])
    out, err = capsys.readouterr()
    assert code == 2 and out.splitlines()[-1] == "| loss | a row | 1 ms |  |"
    assert err == "bench.py: error: RecBole's epoch has 9 examples, ours 8: not the same training part\n"


def test_errors_stay_one_line_without_numpy():
    """numpy is not a dependency, and torch warns at import when it is missing: that warning must not become a
    second line of every error. The process below cannot import numpy, as on a machine with torch alone."""
    no_numpy = "import runpy, sys; sys.modules['numpy'] = None; sys.argv = sys.argv[1:]; " \
               "runpy.run_path(sys.argv[0], run_name='__main__')"
    for script, args in (("uniform_seqrec.py", ["--model", "bert4rec"]), ("experiments.py", ["bogus"])):
        result = subprocess.run([sys.executable, "-c", no_numpy, os.path.join(HERE, script), *args],
                                capture_output=True, text=True, timeout=120, cwd=HERE)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"{script}: error: ")


def test_the_program_loads_uniform_seqrec_py_once():
    """`python uniform_seqrec.py` runs the file as the program (__main__), and runs.py's `import uniform_seqrec`
    gets that module: the file is not loaded a second time (python -X importtime lists every module loaded), and
    runs.py's functions call the program's own copy of the method."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-X", "importtime", os.path.join(HERE, "uniform_seqrec.py"), "--help"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=HERE)
    assert result.returncode == 0 and result.stdout.startswith("usage: uniform_seqrec.py")
    loaded = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "runs" in loaded and "data_prep" in loaded and "uniform_seqrec" not in loaded
    as_program = ("import runpy, sys; sys.argv = ['uniform_seqrec.py', '--help']\n"
                  "try:\n    runpy.run_path('uniform_seqrec.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
                  "import runs\nprint(runs.U is sys.modules['uniform_seqrec'], runs.U.train.__module__)")
    result = subprocess.run([sys.executable, "-c", as_program], capture_output=True, text=True, timeout=120, env=env,
                            cwd=HERE)
    assert result.stdout.splitlines()[-1] == "True __main__", result.stderr


# what text editors and spreadsheets leave behind, where the meaning is clear: the same three users as GOOD
EDITED_FILES = [
    ("CRLF line endings", GOOD.replace("\n", "\r\n").encode()),
    ("CR line endings", GOOD.replace("\n", "\r").encode()),
    ("UTF-8 byte-order mark", b"\xef\xbb\xbf" + GOOD.encode()),
    ("UTF-16 LE with byte-order mark, tabs, CRLF (Excel's Unicode Text)",
     GOOD.replace(" ", "\t").replace("\n", "\r\n").encode("utf-16")),
    ("UTF-16 BE with byte-order mark", b"\xfe\xff" + GOOD.encode("utf-16-be")),
    ("trailing spaces and tabs", GOOD.replace("\n", " \t \n").encode()),
    ("no final newline", GOOD.rstrip("\n").encode()),
    ("blank lines", ("\n" + GOOD.replace("\n", "\n \t\n", 1) + "\n\n").encode()),
    ("non-breaking spaces", GOOD.replace(" ", "\u00a0").encode()),
    ("leading zeros", GOOD.replace(" 1", " 0001").encode()),
    ("DOS end-of-file mark", GOOD.encode() + b"\x1a"),
]


@pytest.mark.parametrize("content", [c for _, c in EDITED_FILES], ids=[n for n, _ in EDITED_FILES])
def test_what_editors_leave_behind_is_accepted(tmp_path, content):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    assert R.read_sequences(str(path)) == [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 1, 2]]


def test_resume_of_a_folder_with_another_configuration_is_refused(tmp_path, capsys, beauty_slice):
    run = tmp_path / "run"
    assert R.main(["--data", beauty_slice, "--epochs", "1", "--out", str(run), *SMALL]) == 0
    capsys.readouterr()
    assert R.main(["--resume", str(run), "--lr", "5e-4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "that run has --lr 0.001, this command asks for 0.0005" in err
    assert R.main(["--data", beauty_slice, "--epochs", "1", "--out", str(run), *SMALL, "--dim", "32"]) == 2
    assert "holds a run with --dim 16, not 32; choose another --out" in capsys.readouterr().err
    assert R.main(["--resume", str(tmp_path)]) == 2
    assert "no config.json there" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Run folders that cannot be created or written, full disks, damaged files, checkpoints from another device
# ----------------------------------------------------------------------------------------------------------------

def one_line_error(capsys, code, expected):
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    return err


def folder_state(folder):
    """Every file of a folder with its bytes: to check that a refused command changed nothing."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_a_run_folder_that_cannot_be_created_is_one_line_and_leaves_nothing(tmp_path, capsys):
    data = small_data(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    code = R.main(["--data", data, "--out", str(tmp_path / "afile" / "run"), *SMALL])
    one_line_error(capsys, code, f"cannot create the run folder {tmp_path / 'afile' / 'run'} (Not a directory)")
    code = R.main(["--data", data, "--out", str(tmp_path / "afile"), *SMALL])
    one_line_error(capsys, code, f"{tmp_path / 'afile'} is a file, not a run folder; choose another --out")
    assert sorted(os.listdir(tmp_path)) == ["afile", "small.txt"] and (tmp_path / "afile").read_text() == "keep me"


def test_a_full_disk_at_the_start_leaves_no_folder(tmp_path, capsys, monkeypatch):
    real_replace = os.replace

    def full(source, target):
        if str(target).endswith("config.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", full)
    code = R.main(["--data", small_data(tmp_path), "--out", str(tmp_path / "runs" / "run"), *SMALL])
    one_line_error(capsys, code, f"cannot write {tmp_path / 'runs' / 'run' / 'config.json'} (No space left on device)")
    assert sorted(os.listdir(tmp_path)) == ["small.txt"]                       # both folders it made are gone


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    """torch.save fails in epoch 2 after writing part of the file: one line, the partial file is gone, the
    checkpoint of epoch 1 is whole, and the same command resumes from it once there is room again."""
    real_save, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    args = ["--data", small_data(tmp_path), "--out", str(run), *SMALL, "--epochs", "3"]
    code = R.main(args)
    err = one_line_error(capsys, code, f"cannot write {run / 'checkpoint.pt'} (No space left on device)")
    assert err.rstrip().endswith("the run folder keeps the checkpoint of epoch 1")
    assert sorted(os.listdir(run)) == [".lock", "checkpoint.pt", "config.json", "log.jsonl"]  # no .partial
    assert real_load(run / "checkpoint.pt")["state"]["epoch"] == 1
    monkeypatch.setattr(torch, "save", real_save)
    assert R.main(args) == 0
    assert "resuming" in capsys.readouterr().out and (run / "metrics.json").is_file()


def test_a_full_disk_in_torchs_words_is_said_plainly(tmp_path, capsys, monkeypatch):
    """Issue 33, item 13: torch.save reports a full disk as a RuntimeError in its own words; the line says "No space
    left on device", not torch's internals, and at the first epoch that no checkpoint is kept yet (it said "keeps the
    checkpoint of epoch 0"). A failure with room on the disk still quotes torch."""
    def save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 part of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", save)
    free = {"bytes": 0}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=free["bytes"]))
    run = tmp_path / "run"
    args = ["--data", small_data(tmp_path), "--out", str(run), *SMALL, "--epochs", "2"]
    err = one_line_error(capsys, R.main(args), f"cannot write {run / 'checkpoint.pt'} (No space left on device); 0 "
                                               f"bytes free on its disk; no epoch's checkpoint was written yet, so "
                                               f"the same command starts the run from its beginning")
    assert "enforce fail" not in err and "epoch 0" not in err
    assert sorted(os.listdir(run)) == [".lock", "config.json"]                     # no partial file
    free["bytes"] = 10 ** 9
    one_line_error(capsys, R.main(args), "(torch could not write it: RuntimeError: [enforce fail at inline_container")


def real_load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture
def finished_run(tmp_path, capsys):
    """A finished one-epoch run on small data: (run folder, its command line)."""
    run = tmp_path / "run"
    args = ["--data", small_data(tmp_path), "--out", str(run), *SMALL, "--epochs", "1"]
    assert R.main(args) == 0
    capsys.readouterr()
    return run, args


def garbled(data):
    return bytes(b ^ 0x5A for b in data)


DAMAGES = [
    ("truncated", lambda data: data[:len(data) // 2]),
    ("empty", lambda data: b""),
    ("garbled", garbled),
    ("text", lambda data: b"not a checkpoint\n"),
]


@pytest.mark.parametrize("damage", [d for _, d in DAMAGES], ids=[n for n, _ in DAMAGES])
def test_a_damaged_checkpoint_is_one_line_and_the_folder_is_kept(finished_run, capsys, damage):
    run, args = finished_run
    (run / "metrics.json").unlink()                                            # unfinished: it must load the checkpoint
    (run / "checkpoint.pt").write_bytes(damage((run / "checkpoint.pt").read_bytes()))
    before = folder_state(run)
    for command in (args, ["--resume", str(run)]):
        one_line_error(capsys, R.main(command), f"{run / 'checkpoint.pt'} is damaged or not this run's checkpoint (")
        assert folder_state(run) == before


def test_a_checkpoint_of_another_model_is_one_line(finished_run, capsys):
    run, args = finished_run
    (run / "metrics.json").unlink()
    checkpoint = real_load(run / "checkpoint.pt")
    checkpoint["model"]["items.weight"] = checkpoint["model"]["items.weight"][:5]   # another data file's table
    torch.save(checkpoint, run / "checkpoint.pt")
    before = folder_state(run)
    err = one_line_error(capsys, R.main(args), "is damaged or not this run's checkpoint (RuntimeError: Error(s) in "
                                               "loading state_dict for SASRec: size mismatch for items.weight")
    assert "remove it to train this run from its start" in err and folder_state(run) == before


def test_damaged_json_files_of_a_run_folder_are_one_line(finished_run, capsys):
    run, args = finished_run
    metrics = (run / "metrics.json").read_text()
    (run / "metrics.json").write_text(metrics[:20])
    one_line_error(capsys, R.main(args), f"{run / 'metrics.json'} is damaged or unreadable (JSONDecodeError")
    (run / "metrics.json").write_text("[]")
    one_line_error(capsys, R.main(args), f"{run / 'metrics.json'} is damaged (not a JSON object)")
    (run / "metrics.json").write_text(metrics)
    (run / "config.json").write_text((run / "config.json").read_text()[:20])
    before = folder_state(run)
    one_line_error(capsys, R.main(args), f"{run / 'config.json'} is damaged or unreadable (JSONDecodeError")
    one_line_error(capsys, R.main(["--resume", str(run)]), "this folder cannot be resumed")
    assert folder_state(run) == before


@pytest.mark.parametrize("value", ["0.05", None, [0.05], True])
def test_a_finished_runs_metrics_that_are_not_numbers_are_one_line(finished_run, capsys, value):
    """Issue 33, item 8: a test metric that is not a number is a damaged metrics.json (one line), not a traceback in
    the "is finished" line."""
    run, args = finished_run
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["test"]["NDCG@10"] = value
    (run / "metrics.json").write_text(json.dumps(metrics))
    before = folder_state(run)
    for command in (args, ["--resume", str(run)]):
        one_line_error(capsys, R.main(command), f"{run / 'metrics.json'} has no test results")
        assert folder_state(run) == before


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(finished_run, capsys, monkeypatch):
    """The checkpoint's tensors are tagged as saved on cuda:0, as a GPU run writes them (torch names each storage's
    device in the file). On this CPU the run still resumes: every tensor is loaded onto the run's device."""
    run, args = finished_run
    result = json.loads((run / "metrics.json").read_text())["test"]
    (run / "metrics.json").unlink()
    checkpoint = real_load(run / "checkpoint.pt")
    registry = torch.serialization._package_registry
    monkeypatch.setattr(torch.serialization, "_package_registry",
                        [(0, lambda storage: "cuda:0", lambda obj, location: None), *registry])
    torch.save(checkpoint, run / "checkpoint.pt")
    monkeypatch.setattr(torch.serialization, "_package_registry", registry)
    if not torch.cuda.is_available():                                          # it really names a GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(run / "checkpoint.pt", weights_only=False)
    assert R.main(args) == 0                                                   # loads it, tests the best state
    assert json.loads((run / "metrics.json").read_text())["test"] == result


# ----------------------------------------------------------------------------------------------------------------
# Non-finite loss
# ----------------------------------------------------------------------------------------------------------------

def poison(monkeypatch, data, epoch, step):
    """batch_loss made NaN at `step` of `epoch` of a run on `data` (SMALL's batch of 256); returns the list of calls,
    which a test resets to replay an epoch."""
    real_loss, calls = U.batch_loss, []
    steps_per_epoch = -(-sum(len(s) - 3 for s in R.read_sequences(data)) // 256)

    def poisoned(*args):
        calls.append(None)
        value = real_loss(*args)
        return value * float("nan") if len(calls) == steps_per_epoch * (epoch - 1) + step else value

    monkeypatch.setattr(U, "batch_loss", poisoned)
    return calls


def best_state_as_tested(run, data):
    """Both protocols' test metrics of the best state in run's checkpoint, ranked here."""
    config = json.loads((run / "config.json").read_text())
    flat, starts, lengths, num_items = U.flatten_sequences(R.read_sequences(data), "cpu")
    max_len = U.history_limit(config, lengths)
    model = U.build_model(config, num_items, len(lengths), max_len)
    model.load_state_dict(real_load(run / "checkpoint.pt")["best_model"])
    return U.evaluate_protocols(model, U.evaluation_batches(flat, starts, lengths, max_len, "test"), True)


@pytest.mark.parametrize("what", ["loss", "validation scores"])
def test_non_finite_numbers_after_an_epoch_end_training_and_the_best_state_is_tested(tmp_path, capsys, monkeypatch,
                                                                                     what):
    """NaN at epoch 3 (the loss at its step 1, or validation's scores) ends training as early stopping would: the
    broken epoch is not kept, the best state of epochs 1-2 is tested under both protocols, metrics.json says why it
    stopped, and the same command (more epochs too: it would stop there again) finds the run finished."""
    data, run = small_data(tmp_path), tmp_path / "run"
    args = ["--data", data, "--out", str(run), *SMALL, "--epochs", "5"]
    if what == "loss":
        poison(monkeypatch, data, epoch=3, step=1)
        reason = "non-finite loss at epoch 3, step 1"
    else:
        real_evaluate, validations = U.evaluate, []

        def evaluate(*a, **k):
            validations.append(None)
            if len(validations) == 3:
                raise FloatingPointError("the model produced non-finite scores during evaluation")
            return real_evaluate(*a, **k)
        monkeypatch.setattr(U, "evaluate", evaluate)
        reason = "non-finite validation scores at epoch 3"
    assert R.main(args) == 0
    out = capsys.readouterr().out
    checkpoint = real_load(run / "checkpoint.pt")
    best = checkpoint["state"]["best_epoch"]
    assert f"stopped: {reason}; the best state (epoch {best}) is tested\n" in out
    assert f"test (best epoch {best}; training stopped: {reason}): " in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stopped"] == reason and metrics["epochs"] == 2 and metrics["best_epoch"] == best
    assert checkpoint["state"]["epoch"] == 2 and len((run / "log.jsonl").read_text().splitlines()) == 2
    assert not (run / "stopped.json").exists()
    assert {p: metrics["protocols"][p]["test"] for p in U.PROTOCOLS} == best_state_as_tested(run, data)
    monkeypatch.setattr(U, "train", lambda *a: pytest.fail("trained again"))
    for again in (args, [*args[:-1], "9"]):
        assert R.main(again) == 0
        assert f"{run} is finished (training stopped: {reason}): test HR@5" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text()) == metrics


def test_a_non_finite_first_epoch_stops_with_one_line_and_a_marker(tmp_path, capsys, monkeypatch):
    """With no epoch finished there is no best state to test: exit 1, one line naming the epoch and step, and
    stopped.json (tuning.py's halving reads it); a resume stops there again. A resume that gets past the epoch removes
    the marker before it writes the checkpoint, so a kill in between leaves no marker of an epoch that passed."""
    data, run = small_data(tmp_path), tmp_path / "run"
    args = ["--data", data, "--out", str(run), *SMALL, "--epochs", "2"]
    real_loss, calls = U.batch_loss, poison(monkeypatch, data, epoch=1, step=1)
    marker = {"reason": "non-finite loss", "epoch": 1, "error": "non-finite loss at epoch 1, step 1"}
    for _ in range(2):                                                       # resumed: the same epoch stops the same
        calls.clear()
        code = R.main(args)
        err = capsys.readouterr().err
        assert code == 1 and err == ("uniform_seqrec.py: stopped: non-finite loss at epoch 1, step 1; no epoch had "
                                     "finished\n")
        assert json.loads((run / "stopped.json").read_text()) == marker
        assert not (run / "metrics.json").exists() and not (run / "checkpoint.pt").exists()
    monkeypatch.setattr(U, "batch_loss", real_loss)                         # past that epoch from here on
    real_save = R.save_atomically

    def killed(obj, path):
        if path.endswith("checkpoint.pt"):
            raise KeyboardInterrupt
        return real_save(obj, path)
    monkeypatch.setattr(R, "save_atomically", killed)
    assert R.main(args) == 130 and not (run / "stopped.json").exists() and not (run / "checkpoint.pt").exists()
    monkeypatch.setattr(R, "save_atomically", real_save)
    assert R.main(args) == 0 and (run / "metrics.json").exists() and not (run / "stopped.json").exists()


def test_a_device_failure_before_training_is_one_line(tmp_path, capsys, monkeypatch):
    """A RuntimeError before the run's first epoch (CUDA out of memory while the statistics' sample is copied to the
    device) is one line with the remedy, exit 1, no traceback."""
    def out_of_memory(config, sequences):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(R, "epoch_statistics", out_of_memory)
    code = R.main(["--data", small_data(tmp_path), "--out", str(tmp_path / "run"), *SMALL])
    err = capsys.readouterr().err
    assert code == 1 and err == ("uniform_seqrec.py: stopped: cpu ran out of memory (RuntimeError: CUDA out of memory. "
                                 "Tried to allocate 2.00 GiB); a smaller --batch-size or --dim needs less (another "
                                 "run); training had not started, and its run folder keeps what it held\n")


# ----------------------------------------------------------------------------------------------------------------
# Same seed, same numbers; killed and resumed, same numbers
# ----------------------------------------------------------------------------------------------------------------

def final_metrics(run):
    metrics = json.loads((run / "metrics.json").read_text())
    return metrics["test"], metrics["valid"], metrics["best_epoch"], metrics["epochs"]


def test_same_seed_same_metrics_and_another_seed_differs(tmp_path, beauty_slice):
    runs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        result = run_cli("--data", beauty_slice, "--epochs", "3", "--seed", seed, "--out", str(tmp_path / name), *SMALL)
        assert result.returncode == 0, result.stderr
        runs[name] = final_metrics(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"][:2] != runs["c"][:2]


def test_killed_run_resumes_to_the_same_metrics(tmp_path, beauty_slice):
    args = ["--data", beauty_slice, "--epochs", "8", "--patience", "8", "--seed", "3", *SMALL]
    whole = run_cli(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "uniform_seqrec.py"), *args, "--out", str(run)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=HERE)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    epochs_done = torch.load(run / "checkpoint.pt", weights_only=False)["state"]["epoch"]  # the log may be a line short
    assert process.returncode == -signal.SIGKILL and 1 <= epochs_done < 8 and not (run / "metrics.json").exists()

    resumed = run_cli("--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} after epoch {epochs_done}" in resumed.stdout
    assert final_metrics(run) == final_metrics(tmp_path / "whole")
    log_whole = (tmp_path / "whole" / "log.jsonl").read_text().splitlines()
    log_resumed = (run / "log.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if not k.endswith("seconds")} for r in rows]
    assert strip(log_resumed) == strip(log_whole)

    # re-running the original command (same folder) also finds it finished, not retrained
    again = run_cli(*args, "--out", str(run))
    assert again.returncode == 0 and "is finished" in again.stdout


def test_a_kill_between_the_checkpoint_and_the_log_leaves_a_complete_log_after_resume(tmp_path, monkeypatch,
                                                                                    beauty_slice):
    """A SIGKILL after checkpoint.pt's rename and before log.jsonl's in the last epoch (simulated: the log's write of
    epoch 3 never happens, a stale .partial stays): resuming completes the log from the checkpoint, though no epoch
    is left to train, and removes the .partial."""
    args = ["--data", beauty_slice, "--epochs", "3", "--seed", "3", *SMALL]
    assert R.main([*args, "--out", str(tmp_path / "whole")]) == 0
    run = tmp_path / "killed"
    real_save = R.save_atomically

    class Killed(BaseException):
        pass

    def save(obj, path):
        if path.endswith("log.jsonl") and obj.count("\n") == 3:
            open(path + ".partial", "w").write(obj[:10])
            raise Killed
        real_save(obj, path)
    monkeypatch.setattr(R, "save_atomically", save)
    with pytest.raises(Killed):
        R.main([*args, "--out", str(run)])
    monkeypatch.setattr(R, "save_atomically", real_save)
    assert len((run / "log.jsonl").read_text().splitlines()) == 2 and (run / "log.jsonl.partial").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["state"]["epoch"] == 3
    assert R.main([*args, "--out", str(run)]) == 0
    strip = lambda path: [{k: v for k, v in json.loads(r).items() if not k.endswith("seconds")}
                          for r in path.read_text().splitlines()]
    assert strip(run / "log.jsonl") == strip(tmp_path / "whole" / "log.jsonl") and len(strip(run / "log.jsonl")) == 3
    assert not (run / "log.jsonl.partial").exists()
    assert final_metrics(run) == final_metrics(tmp_path / "whole")


class HeldByAnotherProcess:
    """The run folder's lock held by another process, as while it trains the run."""

    def __init__(self, run):
        self.run = run

    def __enter__(self):
        self.holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                                        "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                                        str(self.run / ".lock")], stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout.readline().strip() == "locked"

    def __exit__(self, *_):
        self.holder.kill()
        self.holder.wait()
        self.holder.stdout.close()


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, capsys, beauty_slice):
    run = tmp_path / "run"
    args = ["--data", beauty_slice, "--epochs", "1", "--out", str(run), *SMALL]
    config, run_dir = R.configure(args)
    R.prepare_run_dir(config, run_dir)
    with HeldByAnotherProcess(run):
        assert R.main(args) == 2
        assert "is in use by another running process" in capsys.readouterr().err
    assert R.main(args) == 0                                                    # the lock dies with its process


def test_extending_a_run_another_process_trains_changes_nothing_in_its_folder(tmp_path, capsys):
    """Issue 33, item 2: asking for more epochs of a run that another process is training is refused before a line
    says "extending" and before config.json takes the new limit; the other process's finished result then stays
    the run's result (the rewritten limit had made the original command delete it and train on)."""
    run = tmp_path / "run"
    args = ["--data", small_data(tmp_path), *SMALL, "--out", str(run)]
    assert R.main([*args, "--epochs", "1"]) == 0
    before = folder_state(run)
    capsys.readouterr()
    with HeldByAnotherProcess(run):
        code = R.main([*args, "--epochs", "3"])
        out, err = capsys.readouterr()
        assert code == 2 and "is in use by another running process" in err and "extending" not in out, (out, err)
        assert folder_state(run) == before
    assert R.main([*args, "--epochs", "1"]) == 0                                # the original command, later
    assert "is finished" in capsys.readouterr().out
    assert folder_state(run) == before


# ----------------------------------------------------------------------------------------------------------------
# Progress within an epoch: one updating line on a terminal, nothing anywhere else
# ----------------------------------------------------------------------------------------------------------------

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_updating_terminal_line_at_most_once_an_interval(tmp_path):
    sequences = R.read_sequences(small_data(tmp_path, users=200))
    config, _ = R.configure(["--data", str(tmp_path / "small.txt"), *SMALL, "--batch-size", "16"])
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    data = U.training_data(flat, starts, lengths, num_items, 50)
    model = backbone("sasrec", num_items, max_len=50, layers=1, heads=1)
    optimizer = U.adam(model, 1e-3, torch.device("cpu"))
    steps = -(-len(data.target_at) // 16)
    screen = Terminal()
    progress = R.ProgressLine(screen, interval=1.0)
    ticks = iter(range(10 ** 6))
    progress.clock = lambda: next(ticks) / 4                                   # a clock that ticks 0.25 s a reading
    progress.start("epoch 1")
    U.train_epoch(model, optimizer, data, config, 1, lambda done, total: done and progress.step(done, total))
    updates = screen.getvalue().split("\r")[1:]
    assert len(updates) == steps // 4 and steps > 40                           # once a second, not once a step
    assert updates[0] == f"epoch 1: 4/{steps} steps, 0:{round((steps - 4) / 4):02d} left"  # 1 s for 4 steps
    assert updates[-1].startswith(f"epoch 1: {steps // 4 * 4}/{steps} steps, 0:0")
    assert all(len(new) >= len(old.rstrip()) for old, new in zip(updates, updates[1:]))  # each covers the last
    progress.clear()
    assert screen.getvalue().endswith("\r" + " " * len(updates[-1]) + "\r")


def test_no_progress_where_the_output_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    init = R.ProgressLine.__init__
    monkeypatch.setattr(R.ProgressLine, "__init__", lambda self, stream=None, interval=1.0: init(
        self, stream, interval=0.0))                                           # would update every step
    run = tmp_path / "run"
    assert R.main(["--data", small_data(tmp_path, users=200), "--out", str(run), *SMALL, "--epochs", "2",
                   "--batch-size", "16"]) == 0
    captured = capsys.readouterr()                                             # pytest's capture: not a terminal
    assert captured.err == "" and "steps" not in captured.out and "\r" not in captured.out
    assert "steps" not in (run / "log.jsonl").read_text()



# ----------------------------------------------------------------------------------------------------------------
# A run knows its data, can be extended, resumes from anywhere; a missing benchmark is fetched
# ----------------------------------------------------------------------------------------------------------------

def test_a_run_folder_refuses_other_data_with_one_line(tmp_path, capsys):
    data = small_data(tmp_path)
    args = ["--data", data, "--out", str(tmp_path / "run"), *SMALL, "--epochs", "1"]
    assert R.main(args) == 0
    result = (tmp_path / "run" / "metrics.json").read_text()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data_fingerprint"] == {"bytes": os.path.getsize(data), "sha256": R.sha256_of(data)}
    with open(data, "a") as f:
        f.write("99 1 2 3 4 5\n")                                                # edited since
    capsys.readouterr()
    for more in ([], ["--epochs", "2"]):                                         # reporting it, resuming it
        assert R.main([*args, *more]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "was trained on other data" in err
    assert (tmp_path / "run" / "metrics.json").read_text() == result             # nothing changed


@needs("beauty")
def test_a_folder_from_before_fingerprints_is_accepted_only_for_the_published_file(tmp_path):
    config, _ = R.configure(["--data", "beauty", "--data-dir", DATA_DIR, "--device", "cpu"])
    run = str(tmp_path / "run")
    R.prepare_run_dir(dict(config), run)
    saved = json.loads(open(os.path.join(run, "config.json")).read())
    legacy = {k: v for k, v in saved.items() if k != "data_fingerprint"}
    open(os.path.join(run, "config.json"), "w").write(json.dumps(legacy))
    R.prepare_run_dir(dict(config), run)                                         # the published Beauty.txt: accepted
    assert json.loads(open(os.path.join(run, "config.json")).read())["data_fingerprint"] == saved["data_fingerprint"]
    open(os.path.join(run, "config.json"), "w").write(json.dumps(legacy))
    other = tmp_path / "other"
    other.mkdir()
    (other / "Beauty.txt").write_text("".join(open(BEAUTY_PATH).readlines()[:-1]))  # one user less
    edited, _ = R.configure(["--data", "beauty", "--data-dir", str(other), "--device", "cpu"])
    with pytest.raises(R.ConfigError, match="does not record the data it was trained on"):
        R.prepare_run_dir(edited, run)


def test_asking_for_more_epochs_or_patience_extends_the_run_in_its_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = small_data(tmp_path)
    base = ["--data", data, *SMALL, "--patience", "1", "--seed", "5"]
    assert R.main([*base, "--epochs", "2"]) == 0
    folder = R.configure([*base, "--epochs", "2"])[1]
    assert R.main([*base, "--epochs", "4", "--patience", "3"]) == 0
    out = capsys.readouterr().out
    assert f"extending {folder} to --epochs 4 (was 2), --patience 3 (was 1)" in out
    assert os.listdir(tmp_path / "runs") == [os.path.basename(folder)]           # no second folder
    assert f"resuming {folder} after epoch 2" in out
    assert R.main([*base, "--epochs", "4", "--patience", "3", "--out", str(tmp_path / "straight")]) == 0
    assert final_metrics(tmp_path / folder) == final_metrics(tmp_path / "straight")
    assert R.main([*base, "--epochs", "2"]) == 0                                  # never shortened: finished
    assert "is finished" in capsys.readouterr().out


def test_a_paused_run_keeps_its_folder_and_resumes_to_the_uninterrupted_runs_log_and_result(tmp_path, monkeypatch,
                                                                                           capsys):
    """--pause-after N trains to epoch N, saves it and stops with exit 0 and one line, testing nothing; the same
    command with a larger N, then without it, continues in the same folder (the flag is no part of the
    configuration) to the log and result of a run never paused."""
    monkeypatch.chdir(tmp_path)
    base = ["--data", small_data(tmp_path), *SMALL, "--epochs", "6", "--patience", "6", "--seed", "5"]
    folder = R.configure(base)[1]
    assert R.configure([*base, "--pause-after", "2"])[1] == folder
    for pause, done in (("2", 2), ("4", 4), ("3", 4)):                    # a smaller N than done: trains nothing
        capsys.readouterr()
        assert R.main([*base, "--pause-after", pause]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[-1] == (f"{folder}: paused after epoch {done}" + (
            f" (already past --pause-after {pause})" if int(pause) < done else "") + ", not tested yet; the same "
            "command without --pause-after, or with a larger one, continues it")
        assert len((tmp_path / folder / "log.jsonl").read_text().splitlines()) == done
        assert not (tmp_path / folder / "metrics.json").exists() and "test (best epoch" not in out
    assert "pause_after" not in (tmp_path / folder / "config.json").read_text()
    assert R.main(base) == 0
    assert f"resuming {folder} after epoch 4" in capsys.readouterr().out
    assert os.listdir(tmp_path / "runs") == [os.path.basename(folder)]
    assert R.main([*base, "--out", str(tmp_path / "straight")]) == 0
    strip = lambda path: [{k: v for k, v in json.loads(r).items() if not k.endswith("seconds")}
                          for r in path.read_text().splitlines()]
    assert strip(tmp_path / folder / "log.jsonl") == strip(tmp_path / "straight" / "log.jsonl")
    assert len(strip(tmp_path / "straight" / "log.jsonl")) == 6
    assert final_metrics(tmp_path / folder) == final_metrics(tmp_path / "straight")
    assert "pause_after" not in (tmp_path / folder / "metrics.json").read_text()
    assert R.main([*base, "--pause-after", "2"]) == 0                            # finished: says so, as without it
    assert "is finished" in capsys.readouterr().out


def test_a_finished_run_extended_with_a_pause_it_is_past_is_left_as_it_is(tmp_path, capsys):
    """A finished run asked for more epochs with --pause-after N at or below the epochs it trained: one line, exit
    0, its metrics.json and config.json as they were; with N above them, it is extended and paused at N."""
    run = tmp_path / "run"
    base = ["--data", small_data(tmp_path), *SMALL, "--patience", "50", "--out", str(run)]
    assert R.main([*base, "--epochs", "3"]) == 0
    kept = {name: (run / name).read_text() for name in ("metrics.json", "config.json", "log.jsonl")}
    for pause in ("2", "3"):
        capsys.readouterr()
        assert R.main([*base, "--epochs", "5", "--pause-after", pause]) == 0
        assert capsys.readouterr().out == (
            f"{run} is already past --pause-after {pause} (finished: 3 epochs); left as it is\n")
        assert {name: (run / name).read_text() for name in kept} == kept
    assert R.main([*base, "--epochs", "5", "--pause-after", "4"]) == 0
    assert "paused after epoch 4" in capsys.readouterr().out and not (run / "metrics.json").exists()
    assert json.loads((run / "config.json").read_text())["epochs"] == 5


@pytest.mark.parametrize("limits", [["--epochs", "3"], ["--epochs", "50", "--patience", "1"]],
                         ids=["epochs", "early stopping"])
def test_a_run_that_stops_by_itself_by_its_pause_epoch_is_tested_as_usual(tmp_path, limits):
    """Early stopping (or --epochs) that ends the run at or before --pause-after N: the run finishes, tested, as
    without the flag."""
    run = tmp_path / "run"
    assert R.main(["--data", small_data(tmp_path), *SMALL, *limits, "--out", str(run), "--pause-after", "30"]) == 0
    assert (run / "metrics.json").exists()
    assert json.loads((run / "metrics.json").read_text())["epochs"] < 30


def test_resume_works_from_another_working_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    small_data(tmp_path / "a")
    assert R.main(["--data", "small.txt", "--out", "run", *SMALL, "--epochs", "1"]) == 0
    monkeypatch.chdir(tmp_path / "b")
    capsys.readouterr()
    assert R.main(["--resume", str(tmp_path / "a" / "run"), "--epochs", "2"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())["epochs"] == 2


def test_a_files_spellings_are_one_run_folder_and_folders_named_as_typed_are_still_found(tmp_path, monkeypatch,
                                                                                        capsys):
    """tiny.txt, ./tiny.txt and its absolute path are one run folder (old code: three), named by the file's absolute
    path: a path typed in that form keeps its hash. A folder named by a relative path as typed (as every earlier
    one was) is still found, finished, extended and resumed from another working directory."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    small_data(tmp_path / "a")
    absolute = str(tmp_path / "a" / "small.txt")
    spellings = ["small.txt", "./small.txt", absolute]
    one = lambda data, *more: R.configure(["--data", data, *SMALL, "--epochs", "1", *more])
    assert len({one(data)[1] for data in spellings}) == 1
    config, folder = one(absolute)
    assert folder.endswith(R.configuration_id({**config, "data": absolute}))      # the hash old code gave it
    assert R.main(["--data", "small.txt", *SMALL, "--epochs", "1"]) == 0
    for data in spellings[1:]:
        capsys.readouterr()
        assert R.main(["--data", data, *SMALL, "--epochs", "1"]) == 0
        assert f"{folder} is finished" in capsys.readouterr().out
    assert os.listdir("runs") == [os.path.basename(folder)]

    # a folder of old code, named by --data ./small.txt as typed and recording that spelling, with seed 2
    config = one("./small.txt", "--seed", "2")[0]
    old = os.path.join("runs", f"small-sasrec-{config['loss']}-"
                               f"{R.configuration_id({**config, 'data': './small.txt'})}")
    assert R.main(["--data", "small.txt", *SMALL, "--epochs", "1", "--seed", "2", "--out", old]) == 0
    saved = json.loads(open(os.path.join(old, "config.json")).read())
    open(os.path.join(old, "config.json"), "w").write(json.dumps({**saved, "data": "./small.txt"}))
    assert one("./small.txt", "--seed", "2")[1] == old                            # found by its old name
    capsys.readouterr()
    assert R.main(["--data", "./small.txt", *SMALL, "--epochs", "1", "--seed", "2"]) == 0
    assert f"{old} is finished" in capsys.readouterr().out
    assert R.main(["--data", absolute, *SMALL, "--epochs", "2", "--seed", "2"]) == 0   # another spelling, more epochs
    out = capsys.readouterr().out
    assert f"extending {old} to --epochs 2 (was 1)" in out and f"resuming {old} after epoch 1" in out
    assert json.loads(open(os.path.join(old, "config.json")).read())["data"] == "./small.txt"   # its own spelling
    assert json.loads(open(os.path.join(old, "metrics.json")).read())["config"]["data"] == "./small.txt"
    assert len(os.listdir("runs")) == 2
    folder_of_old = os.path.abspath(old)
    monkeypatch.chdir(tmp_path / "b")                                              # ./small.txt is not here
    assert R.main(["--resume", folder_of_old, "--epochs", "3"]) == 0
    assert f"resuming {folder_of_old} after epoch 2" in capsys.readouterr().out
    assert R.main(["--resume", folder_of_old, "--epochs", "4", "--data", "../a/small.txt"]) == 0   # where it is now
    assert json.loads(open(os.path.join(folder_of_old, "metrics.json")).read())["epochs"] == 4

    # another file is other data, however alike its settings: a folder of its own, not a refusal
    monkeypatch.chdir(tmp_path / "a")
    (tmp_path / "a" / "other.txt").write_text(open(absolute).read() + "99 1 2 3 4 5\n")
    assert R.main(["--data", "other.txt", *SMALL, "--epochs", "2"]) == 0
    assert len(os.listdir("runs")) == 3


@needs("beauty")
def test_a_missing_benchmark_is_fetched_and_without_network_the_remedy_is_named(tmp_path, monkeypatch, capsys):
    real_download = R.download
    monkeypatch.setattr(R, "download", lambda name, data_dir, log: real_download(name, data_dir, DATA_DIR, log))
    empty = tmp_path / "data"
    config, _ = R.configure(["--data", "beauty", "--data-dir", str(empty), "--device", "cpu"], fetch=True)
    assert config["data_path"] == str(empty / "Beauty.txt") and R.sha256_of(config["data_path"]) == R.BENCHMARKS[
        "beauty"][1]
    assert capsys.readouterr().out.count("\n") == 1                               # said so in one line
    monkeypatch.setattr(R, "download", lambda name, data_dir, log: real_download(name, data_dir,
                                                                                  "http://127.0.0.1:9/", log))
    code = R.main(["--data", "beauty", "--data-dir", str(tmp_path / "none"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "without network, copy Beauty.txt into" in err
    assert not (tmp_path / "none" / "Beauty.txt").exists()


@pytest.mark.parametrize("edit, expected", [
    (lambda c: {**c, "model": "bert4rec"}, "'model' is 'bert4rec', not one of gru4rec, caser, sasrec"),
    (lambda c: {**c, "loss": "sce"}, "'loss' is 'sce', not one of bce, bpr, infonce, uniform, ce"),
    (lambda c: {**c, "lr": "fast"}, "'lr' is 'fast', not a number"),
    (lambda c: {**c, "dim": 6.5}, "'dim' is 6.5, not a whole number"),
    (lambda c: {**c, "normalize": 1}, "'normalize' is 1, not true or false"),
    (lambda c: {k: v for k, v in c.items() if k != "seed"}, "'seed' is missing"),
    (lambda c: {**c, "dropout": 1.5}, "--dropout must be in [0, 1) (got 1.5)"),
])
def test_a_run_folders_config_with_wrong_types_or_names_is_one_line(tmp_path, capsys, edit, expected):
    """Today's config.json of a run, edited: resuming it is refused with one line (it trained SASRec for an unknown
    model before)."""
    run = tmp_path / "run"
    assert R.main(["--data", small_data(tmp_path), "--out", str(run), *SMALL, "--epochs", "1"]) == 0
    path = run / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    capsys.readouterr()
    assert R.main(["--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_a_data_file_without_a_training_example_is_one_line(tmp_path, capsys):
    path = tmp_path / "three.txt"
    path.write_text("1 1 2 3\n2 4 5 6\n")                                    # 3 items each: none to train on
    assert R.main(["--data", str(path), "--out", str(tmp_path / "run"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "there is no training example" in err


def test_ctrl_c_while_the_program_starts_is_one_line(tmp_path):
    """SIGINT while torch is being imported (a stand-in torch that waits, so the moment is certain)."""
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"import pathlib, time\npathlib.Path({str(tmp_path / 'importing')!r}).touch()\n"
                                      "time.sleep(60)\n")
    for script in ("uniform_seqrec.py", "experiments.py"):
        (tmp_path / "importing").unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, os.path.join(HERE, script), "--help"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
        deadline = time.time() + 60
        while not (tmp_path / "importing").exists() and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 130 and err == f"{script}: interrupted while starting; nothing was changed\n"


# ----------------------------------------------------------------------------------------------------------------
# The suite itself (conftest.py): one torch thread, and Ctrl-C stops it
# ----------------------------------------------------------------------------------------------------------------

def test_the_tests_run_on_one_torch_thread_unless_told_otherwise():
    """Issue 33, item 9: with torch's default threads the suite's trainings took 150 to 220 s an epoch on a busy
    2-core machine; conftest.py sets one, for the tests and the programs they start (OMP_NUM_THREADS)."""
    check = "import conftest, os, torch; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])"
    for given, expected in ((None, "1 1"), ("2", "2 2")):
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=HERE,
                                env={**env, **({"OMP_NUM_THREADS": given} if given else {})}, timeout=120)
        assert result.stdout.split("\n")[0] == expected, result.stderr


def test_ctrl_c_stops_the_suite_even_where_the_code_under_test_catches_it(tmp_path):
    """Issue 33, item 9: runs.main catches KeyboardInterrupt (one line, exit 130), so Ctrl-C during a test that
    trains failed that test and the suite went on. Here a training is interrupted in a pytest run of two tests:
    the run stops after the first (exit 130), and the second never starts."""
    tests = tmp_path / "test_interrupted.py"
    tests.write_text(f"""import os, signal, time
import runs as R
import uniform_seqrec as U


def test_interrupted_training(tmp_path, monkeypatch):
    (tmp_path / "data.txt").write_text({GOOD!r})
    monkeypatch.setattr(U, "train", lambda *args: os.kill(os.getpid(), signal.SIGINT) or time.sleep(30))  # Ctrl-C
    assert R.main(["--data", str(tmp_path / "data.txt"), "--out", str(tmp_path / "run"), "--dim", "8"]) == 130


def test_the_next_one():
    open({str(tmp_path / "next_ran")!r}, "w").close()
""")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                             str(tests)], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert result.returncode == 130 and "interrupted (Ctrl-C)" in result.stdout, result.stdout + result.stderr
    assert not (tmp_path / "next_ran").exists()


def test_the_readme_gives_the_cpu_only_torch_install_beside_requirements():
    """Issue 33, item 11: `pip install -r requirements.txt` pulls torch's CUDA build on Linux, GPU or not; the README
    and requirements.txt give the CPU-only install beside it, as a command to copy."""
    command = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    with open(os.path.join(HERE, "README.md")) as f:
        setup = f.read().split("## Data")[0]
    assert f"    {command} && pip install -r requirements.txt\n" in setup
    with open(os.path.join(HERE, "requirements.txt")) as f:
        assert command in f.read()


def test_a_deleted_working_directory_is_one_line(tmp_path):
    """Issue 33, item 13: started in a folder that has been deleted, the programs ended in "Intel oneMKL FATAL ERROR:
    Cannot load libtorch_cpu.so" while loading torch; they say what is wrong in one line first."""
    for script in ("uniform_seqrec.py", "experiments.py"):
        gone = tmp_path / f"gone-{script}"
        gone.mkdir()
        result = subprocess.run(["bash", "-c", 'cd "$1" && rmdir "$1" && exec "$2" "$3" --help', "-", str(gone),
                                 sys.executable, os.path.join(HERE, script)], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and result.stderr == (
            f"{script}: error: the working directory no longer exists (deleted or moved); cd into a folder that "
            f"exists and run again\n"), result.stderr
