"""Tests of run_all.sh's input checks and exit status, each on a copy of it in tmp_path with a stand-in `python`
that records its calls and trains nothing (one test lets the real experiments.py list the cells)."""
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CELLS = ["table1/toys/sasrec/bce", "table1/toys/sasrec/bpr", "table1/toys/sasrec/uniform"]
# The stand-in: each call appends "ARGS OMP=..." to calls.txt; `list` prints CELLS (or runs the real experiments.py
# when REAL_PYTHON is set); `run` of the bpr cell fails with exit 2 when the file `fail` exists, as does any run
# with --device nosuch (uniform_seqrec.py refuses an unknown device so); `halving` fails (exit 1) when `fail` exists.
STAND_IN = f"""#!/bin/sh
echo "$* OMP=${{OMP_NUM_THREADS-unset}}" >> calls.txt
case "$2" in
  list) if [ -n "${{REAL_PYTHON:-}}" ]; then exec "$REAL_PYTHON" "$@"; fi
        if [ -f list-fails ]; then echo "experiments.py list: error: bad" >&2; exit 2; fi
        printf "%s 1\\n" {" ".join(CELLS)} ;;
  run) case " $* " in *" --device nosuch "*) echo "uniform_seqrec.py: error: bad device" >&2; exit 2;; esac
       if [ "$3" = {CELLS[1]} ] && [ -f fail ]; then echo "crashed" >&2; exit 2; fi
       echo "trained $3" ;;
  halving) case " $* " in *" --report "*) echo "table of $4 $6" ;;
                          *) if [ -f fail ]; then echo "crashed" >&2; exit 1; fi; echo "halved $4 $6" ;; esac ;;
  *) echo "wrote $2" ;;
esac
"""


@pytest.fixture
def run_all(tmp_path):
    """Run a copy of run_all.sh in tmp_path: run_all(*args, **environment) -> the finished process."""
    shutil.copy(os.path.join(HERE, "run_all.sh"), tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text(STAND_IN)
    (tmp_path / "bin" / "python").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("JOBS", "SEEDS", "DATASETS", "MODELS", "DEVICE",
                                                                "SLURM_ARRAY_TASK_ID", "OMP_NUM_THREADS")}
    base["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"

    def run(*args, **environment):
        return subprocess.run(["bash", str(tmp_path / "run_all.sh"), *args], cwd=tmp_path,
                              env={**base, **environment}, capture_output=True, text=True, timeout=60)
    return run


def calls(tmp_path):
    path = tmp_path / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def assert_refused(done, tmp_path, *words):
    """Bad input: exit 2, one line on stderr naming the problem, nothing run or written."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("run_all.sh: error: "), done.stderr
    assert all(word in done.stderr for word in words), done.stderr
    assert not any(" run " in call or "report" in call for call in calls(tmp_path)), calls(tmp_path)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_the_usage_and_runs_nothing(run_all, tmp_path, flag):
    done = run_all(flag)
    assert done.returncode == 0 and done.stderr == ""
    for word in ["./run_all.sh WHAT", "table1", "caser-none", "regime", "block", "JOBS=", "SEEDS=", "DATASETS=",
                 "DEVICE=", "SLURM_ARRAY_TASK_ID=", "Exit status"]:
        assert word in done.stdout, word
    assert "set -euo" not in done.stdout and not done.stdout.startswith("#")
    assert calls(tmp_path) == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args", [["nosuch"], [""], ["--bogus"], ["table1", "table2"]])
def test_an_unknown_or_extra_argument_is_one_line_and_runs_nothing(run_all, tmp_path, args):
    assert_refused(run_all(*args), tmp_path, "argument")
    assert calls(tmp_path) == []


@pytest.mark.parametrize("name, value", [
    *[("JOBS", v) for v in ["0", "-1", "abc", "", "1.5", "08", " 2"]],
    *[("SEEDS", v) for v in ["0", "-1", "", "x", "2.0", "21", "100000000000000000000"]],
    *[("DATASETS", v) for v in ["nosuch", "", ",", "beauty,,toys", "beauty,", "beauty, toys", "Beauty", "beauty\ntoys"]],
    *[("MODELS", v) for v in ["nosuch", "", "sasrec,", "gru4rec;caser", "sasrec,caser,sasrec"]],
    ("DATASETS", "beauty,beauty"),
    *[("SLURM_ARRAY_TASK_ID", v) for v in ["0", "abc", "-1", "1.5", "01"]],
    *[("OMP_NUM_THREADS", v) for v in ["abc", "0", "-2", "1.5"]],
])
def test_a_bad_variable_is_one_line_naming_it_and_runs_nothing(run_all, tmp_path, name, value):
    assert_refused(run_all("table1", **{name: value}), tmp_path, name)
    assert calls(tmp_path) == []                                             # refused before even listing


def test_a_failing_list_stops_before_any_cell_or_the_report(run_all, tmp_path):
    (tmp_path / "list-fails").touch()
    done = run_all("table1")
    assert done.returncode == 2 and done.stderr == "experiments.py list: error: bad\n"
    assert [call.split()[1] for call in calls(tmp_path)] == ["list"]


def test_failed_cells_fail_the_run_after_every_cell_and_the_report(run_all, tmp_path):
    (tmp_path / "fail").touch()
    done = run_all("table1", JOBS="2")
    assert done.returncode == 1, done.stderr
    assert sorted(done.stdout.splitlines()[:3]) == [
        f"FAILED  {CELLS[1]} seed 1 (exit 2, see runs/logs/table1_toys_sasrec_bpr-seed1.log)",
        f"done    {CELLS[0]} seed 1", f"done    {CELLS[2]} seed 1"]
    assert done.stderr == "run_all.sh: 1 of 3 cells FAILED (their FAILED lines above name their logs)\n"
    assert [call.split()[1] for call in calls(tmp_path)] == ["list", "run", "run", "run", "report"]
    (tmp_path / "fail").unlink()
    done = run_all("table1")
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "all 3 cells done" and done.stderr == ""


def test_a_slurm_task_exits_with_its_cells_status(run_all, tmp_path):
    (tmp_path / "fail").touch()
    assert run_all("table1", SLURM_ARRAY_TASK_ID="2").returncode == 2           # the cell's own status
    assert run_all("table1", SLURM_ARRAY_TASK_ID="1").returncode == 0
    past = run_all("table1", SLURM_ARRAY_TASK_ID="99999999999999999999")        # past the end: nothing to do
    assert past.returncode == 0 and "is shorter; nothing to do (it has 3 cells)" in past.stdout
    assert not any("report" in call for call in calls(tmp_path))
    everything = run_all("table1", SLURM_ARRAY_TASK_ID="")                       # empty: not an array task
    assert everything.returncode == 1 and "report" in calls(tmp_path)[-1]


def test_the_device_goes_to_every_cell_and_a_refused_one_counts_as_failed(run_all, tmp_path):
    done = run_all("table1", DEVICE="nosuch")
    assert done.returncode == 1 and "3 of 3 cells FAILED" in done.stderr
    runs = [call for call in calls(tmp_path) if " run " in call]
    assert len(runs) == 3 and all("--device nosuch" in call for call in runs)
    assert run_all("table1", DEVICE="nosuch", SLURM_ARRAY_TASK_ID="1").returncode == 2
    (tmp_path / "calls.txt").unlink()
    assert run_all("table1", DEVICE="").returncode == 0                          # empty: uniform_seqrec.py's choice
    assert not any("--device" in call for call in calls(tmp_path))


def test_jobs_past_the_cells_are_capped_and_share_the_threads(run_all, tmp_path):
    done = run_all("table1", JOBS="99999999999999999999")
    assert done.returncode == 0, done.stderr
    threads = max(1, len(os.sched_getaffinity(0)) // 3)                      # nproc's CPUs shared by the 3 cells
    runs = [call for call in calls(tmp_path) if " run " in call]
    assert len(runs) == 3 and all(call.endswith(f"OMP={threads}") for call in runs), runs


def test_an_empty_omp_num_threads_means_unset(run_all, tmp_path):
    assert run_all("table1", OMP_NUM_THREADS="", JOBS="1").returncode == 0
    listing, *runs = calls(tmp_path)[:4]
    assert listing.endswith("OMP=unset")                                     # OpenMP warns about an empty one
    assert all(call.endswith(f"OMP={len(os.sched_getaffinity(0))}") for call in runs), runs
    (tmp_path / "calls.txt").unlink()
    assert run_all("table1", OMP_NUM_THREADS="3").returncode == 0
    assert all(call.endswith("OMP=3") for call in calls(tmp_path))


@pytest.mark.parametrize("what, environment", [("table2", {"MODELS": "gru4rec"}), ("table3", {"DATASETS": "sports"}),
                                               ("figure1", {"DATASETS": "toys", "MODELS": "sasrec"})])
def test_a_narrowing_that_selects_nothing_is_one_line(run_all, tmp_path, what, environment):
    """With the real experiments.py list: an empty list says which narrowing emptied it, and runs nothing."""
    copy_the_programs(tmp_path)
    done = run_all(what, REAL_PYTHON=sys.executable, **environment)
    assert_refused(done, tmp_path, "nothing to run", f"'{what}' is empty",  # no report: RESULTS.md untouched
                   *[f"{name}={value}" for name, value in environment.items()])


def copy_the_programs(tmp_path):
    """experiments.py and what it imports, beside the copy of run_all.sh: `list` is then the real one."""
    for name in ["experiments.py", "cells.py", "tuning.py", "baselines.py", "analyses.py", "report.py", "figures.py",
                 "uniform_seqrec.py", "runs.py", "data_prep.py"]:
        shutil.copy(os.path.join(HERE, name), tmp_path)


@pytest.mark.parametrize("what, seeds, cells", [
    ("regime", "3", [f"regime/beauty/{loss}" for loss in ("bce", "bpr", "infonce", "uniform")]),
    ("block", "1", ["block/beauty/bce", "block/beauty/uniform"])])
def test_the_side_studies_run_their_cells_for_each_seed_then_the_report(run_all, tmp_path, what, seeds, cells):
    """Issue 32 part 2, issue 35 part 3: `SEEDS=3 ./run_all.sh regime` runs each of its cells with seeds 1-3 (the real
    list, narrowed as any family), then writes the page; a narrowing without Beauty or SASRec selects nothing."""
    copy_the_programs(tmp_path)
    assert_refused(run_all(what, REAL_PYTHON=sys.executable, MODELS="gru4rec,caser"), tmp_path, "nothing to run",
                   f"'{what}' is empty")
    (tmp_path / "calls.txt").unlink()
    done = run_all(what, REAL_PYTHON=sys.executable, SEEDS=seeds, JOBS="1")
    assert done.returncode == 0, done.stderr
    runs = [call.split(" OMP=")[0] for call in calls(tmp_path) if " run " in call]
    assert runs == [f"experiments.py run {cell} --seed {seed}" for seed in range(1, int(seeds) + 1) for cell in cells]
    assert calls(tmp_path)[-1].startswith("experiments.py report")


def test_run_through_a_symlink_works_in_the_scripts_own_folder(run_all, tmp_path):
    """Issue 33, item 12: called through a symlink (here a link to a link, each relative, from another folder),
    run_all.sh works in its own folder, where experiments.py is; it changed into the link's folder."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "bin").mkdir(parents=True)
    (elsewhere / "bin" / "link").symlink_to(os.path.join("..", "..", "run_all.sh"))
    (elsewhere / "reproduce").symlink_to(os.path.join("bin", "link"))
    env = {k: v for k, v in os.environ.items() if k not in ("JOBS", "SEEDS", "DATASETS", "MODELS", "OMP_NUM_THREADS")}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    done = subprocess.run(["./reproduce", "--help"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "./run_all.sh WHAT" in done.stdout, done.stderr
    done = subprocess.run(["./reproduce", "table1"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert [call.split()[1] for call in calls(tmp_path)] == ["list", *["run"] * len(CELLS), "report"]
    assert (tmp_path / "runs" / "logs").is_dir() and not (elsewhere / "runs").exists()
    assert not (elsewhere / "calls.txt").exists()


def test_halving_is_one_process_per_dataset_and_model_logged_then_its_tables(run_all, tmp_path):
    """`./run_all.sh halving`: experiments.py halving for Beauty and SASRec (its defaults), the losses and device
    passed on, every CPU to its one run at a time, its output in its log, then the tables on the terminal."""
    done = run_all("halving", DEVICE="cpu", LOSSES="uniform,ce")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    threads = len(os.sched_getaffinity(0))
    assert calls(tmp_path) == [
        f"experiments.py halving --dataset beauty --model sasrec --losses uniform,ce --device cpu OMP={threads}",
        f"experiments.py halving --dataset beauty --model sasrec --losses uniform,ce --report OMP={threads}"]
    assert done.stdout.splitlines() == ["done    halving beauty sasrec (uniform,ce)", "table of beauty sasrec"]
    assert (tmp_path / "runs" / "logs" / "halving-beauty-sasrec.log").read_text() == "halved beauty sasrec\n"
    (tmp_path / "calls.txt").unlink()
    (tmp_path / "fail").touch()
    done = run_all("halving", DATASETS="beauty,toys", OMP_NUM_THREADS="1")
    assert done.returncode == 1
    assert done.stderr == "run_all.sh: 2 halvings FAILED (their FAILED lines above name their logs)\n"
    assert done.stdout.splitlines()[::2] == [
        "FAILED  halving beauty sasrec (exit 1, see runs/logs/halving-beauty-sasrec.log; the same command continues)",
        "FAILED  halving toys sasrec (exit 1, see runs/logs/halving-toys-sasrec.log; the same command continues)"]
    assert [call.split()[3] for call in calls(tmp_path)] == ["beauty", "beauty", "toys", "toys"]
    assert all("--losses bce,bpr,uniform,ce" in call and call.endswith("OMP=1") for call in calls(tmp_path))


@pytest.mark.parametrize("name, value", [("LOSSES", "nosuch"), ("LOSSES", ""), ("LOSSES", "ce,bce,ce"),
                                         ("SEEDS", "2"), ("SLURM_ARRAY_TASK_ID", "1"), ("MODELS", "bert4rec")])
def test_halving_refuses_what_it_cannot_do_in_one_line(run_all, tmp_path, name, value):
    assert_refused(run_all("halving", **{name: value}), tmp_path, name)
    assert calls(tmp_path) == []
