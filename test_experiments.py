"""Tests of experiments.py: the cells of the paper's tables, and the results page built from recorded cells."""
import glob
import errno
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest

import analyses as A
import baselines as B
import cells as C
import experiments as E
import figures as F
import report as P
import torch
import runs as R
import uniform_seqrec as U
from conftest import DATA_DIR, needs
from data_prep import sha256_of

HERE = os.path.dirname(os.path.abspath(__file__))


def test_the_tables_have_the_papers_cells():
    table1 = C.cells("table1", C.DATASETS, C.MODELS)
    paper = [f"table1/{d}/{m}/{loss}" for d in C.DATASETS for m in C.MODELS for loss in ("bce", "bpr", "infonce",
                                                                                          "uniform")]
    assert table1[:len(paper)] == paper                                       # every paper cell on its old line
    assert table1[len(paper):] == [f"table1/{d}/{m}/ce" for d in C.DATASETS for m in C.MODELS]  # then CE's
    everything = C.cells("all", C.DATASETS, C.MODELS)
    studies = C.cells("regime", C.DATASETS, C.MODELS) + C.cells("block", C.DATASETS, C.MODELS)
    assert everything[-len(studies):] == studies                              # the side studies, added after CE
    assert everything[-len(studies) - len(C.DATASETS) * len(C.MODELS):-len(studies)] == table1[len(paper):]
    assert len(C.cells("table2", C.DATASETS, C.MODELS)) == 14
    assert len(C.cells("table3", C.DATASETS, C.MODELS)) == 10
    assert C.cells("table2", ["sports"], C.MODELS) == [] and C.cells("table2", C.DATASETS, ["gru4rec"]) == []
    tune = C.cells("tune", ["beauty"], C.MODELS)
    paper_tune = [cell for m in C.MODELS for loss in ("bce", "bpr", "infonce", "uniform")
                  for cell in C.tuning_grid("beauty", m, loss)]
    assert len(paper_tune) == 4 * (12 + 12 + 6) and tune[:len(paper_tune)] == paper_tune     # on their old lines
    assert tune[len(paper_tune):] == [c for m in C.MODELS for c in C.tuning_grid("beauty", m, "ce")]  # then CE's
    grid = C.tuning_grid("beauty", "sasrec", "ce")
    assert len(set(grid)) == 12 and grid[:3] == ["tune/beauty/sasrec/ce/lr=1e-4,dim=64,layers=1",
                                                 "tune/beauty/sasrec/ce/lr=1e-4,dim=64,layers=2",
                                                 "tune/beauty/sasrec/ce/lr=1e-4,dim=128,layers=1"]
    assert C.cell_arguments(grid[-1], {}) == ["--data", "beauty", "--model", "sasrec", "--loss", "ce", "--lr",
                                              "3e-4", "--dim", "128", "--layers", "2", "--heads", "2"]


def test_run_all_runs_every_listed_cell_with_its_own_log(tmp_path):
    """run_all.sh with a stand-in `python` that lists two cells and records each call: each cell runs once, with
    its seed, and writes its own log named after the cell (a tuning cell's '=' and ',' included)."""
    shutil.copy(os.path.join(HERE, "run_all.sh"), tmp_path)
    (tmp_path / "bin").mkdir()
    stand_in = tmp_path / "bin" / "python"
    stand_in.write_text('#!/bin/sh\n'
                        'if [ "$2" = list ]; then\n'
                        '  printf "%s 1\\n" table2/beauty/a "tune/toys/caser/bpr/lr=1e-4,dim=64"\n'
                        'else echo "called $*"; fi\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "JOBS": "2"}
    done = subprocess.run(["bash", str(tmp_path / "run_all.sh"), "table2"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split("\n")[:2]) == ["done    table2/beauty/a seed 1",
                                                    "done    tune/toys/caser/bpr/lr=1e-4,dim=64 seed 1"]
    logs = {p.name: p.read_text() for p in (tmp_path / "runs" / "logs").iterdir()}
    assert logs == {"table2_beauty_a-seed1.log": "called experiments.py run table2/beauty/a --seed 1\n",
                    "tune_toys_caser_bpr_lr-1e-4.dim-64-seed1.log":
                        "called experiments.py run tune/toys/caser/bpr/lr=1e-4,dim=64 --seed 1\n"}


def test_cell_arguments_follow_the_papers_rows():
    tuned = {("toys", "sasrec", "uniform"): ["--lr", "2e-4", "--dim", "128", "--layers", "1", "--heads", "1",
                                             "--beta", "0.01"],
             ("toys", "sasrec", "bce"): ["--lr", "1e-4", "--dim", "64", "--layers", "2", "--heads", "2"]}
    assert C.cell_arguments("table1/toys/caser/bpr", tuned) == ["--data", "toys", "--model", "caser", "--loss", "bpr"]
    assert C.cell_arguments("table2/toys/a", tuned)[-8:] == tuned["toys", "sasrec", "bce"]
    assert C.cell_arguments("table2/toys/b", tuned)[-2:] == ["--no-hom", "--no-het"]
    assert C.cell_arguments("table2/toys/g", tuned)[6:] == [*tuned["toys", "sasrec", "uniform"], "--no-normalize"]
    table3 = C.cell_arguments("table3/toys/0.005", tuned)
    assert table3.count("--beta") == 1 and table3[-2:] == ["--beta", "0.005"] and "128" in table3
    assert C.cell_arguments("tune/yelp/gru4rec/infonce/lr=3e-4,dim=128,layers=2", {})[6:] == [
        "--lr", "3e-4", "--dim", "128", "--layers", "2", "--heads", "2"]


def test_the_side_studies_are_table1s_sasrec_cell_with_one_choice_changed():
    """Issue 32 part 2 and issue 35 part 3: regime/beauty/<loss> is Table 1's SASRec cell (its tuned flags) trained
    per user and packed, block/beauty/<loss> the same with the original block (length groups, as its partner), and
    both come after every cell of before in `all`, so that each earlier cell keeps its line (a Slurm array task)."""
    tuned = {("beauty", "sasrec", "bce"): ["--lr", "2e-4", "--dim", "128", "--layers", "1", "--heads", "1"],
             ("beauty", "sasrec", "uniform"): ["--lr", "1e-4", "--dim", "64", "--layers", "2", "--heads", "2",
                                               "--beta", "0.01"]}
    assert C.cell_arguments("regime/beauty/bce", tuned) == [
        "--data", "beauty", "--model", "sasrec", "--loss", "bce", "--lr", "2e-4", "--dim", "128", "--layers", "1",
        "--heads", "1", "--examples", "users", "--pack"]
    assert C.cell_arguments("regime/beauty/bpr", tuned) == [
        "--data", "beauty", "--model", "sasrec", "--loss", "bpr", "--examples", "users", "--pack"]  # no row: defaults
    assert C.cell_arguments("block/beauty/uniform", tuned) == [
        "--data", "beauty", "--model", "sasrec", "--loss", "uniform", "--lr", "1e-4", "--dim", "64", "--layers", "2",
        "--heads", "2", "--beta", "0.01", "--block", "original"]
    assert C.cells("regime", C.DATASETS, C.MODELS) == [f"regime/beauty/{loss}" for loss in ("bce", "bpr", "infonce",
                                                                                           "uniform")]
    assert C.cells("block", C.DATASETS, C.MODELS) == ["block/beauty/bce", "block/beauty/uniform"]
    assert C.cells("regime", ["toys"], C.MODELS) == [] and C.cells("block", ["beauty"], ["gru4rec", "caser"]) == []
    earlier = ["table1", "table2", "table3", "figure1", "infonce", "caser-none", "negatives", "readme"]
    table1 = C.cells("table1", C.DATASETS, C.MODELS)
    before = list(dict.fromkeys([*table1[:48], *(cell for what in earlier[1:]
                                                 for cell in C.cells(what, C.DATASETS, C.MODELS)), *table1[48:]]))
    assert C.cells("all", C.DATASETS, C.MODELS) == [*before, *C.cells("regime", C.DATASETS, C.MODELS),
                                                    *C.cells("block", C.DATASETS, C.MODELS)]
    assert {"regime/beauty/infonce", "block/beauty/bce"} <= set(C.cell_ids_known())  # `run` and `report` know them


def test_hyperparameter_table_is_read(tmp_path):
    path = tmp_path / "h.tsv"
    path.write_text("# comment\ndataset\tmodel\tloss\tlr\tdim\tlayers\theads\tbeta\n"
                    "beauty\tsasrec\tuniform\t1e-3\t64\t2\t2\t0.05\t# 0.0400\n"
                    "beauty\tcaser\tbce\t1e-4\t32\t1\t1\t0.05\n")
    table = C.read_hyperparameters(str(path))
    assert table["beauty", "sasrec", "uniform"] == ["--lr", "1e-3", "--dim", "64", "--layers", "2", "--heads", "2",
                                                    "--beta", "0.05"]
    assert "--beta" not in table["beauty", "caser", "bce"]


def test_choose_keeps_the_best_validation_point_and_says_how_many_ran(tmp_path, monkeypatch, capsys):
    grid = C.cells("tune", ["toys"], ["sasrec"])
    bce = [cell for cell in grid if "/bce/" in cell]
    scores = {bce[0]: 0.010, bce[5]: 0.030, bce[7]: 0.020}                 # 3 of 12 points of one cell finished
    folders = {}
    for i, (cell, ndcg) in enumerate(scores.items()):
        values = C.tuning_point(cell)
        folders[cell] = tmp_path / f"run{i}"
        folders[cell].mkdir()
        config = {"lr": float(values["lr"]), "dim": int(values["dim"]), "layers": int(values["layers"]),
                  "heads": int(values["layers"]), "beta": 0.05}
        (folders[cell] / "metrics.json").write_text(json.dumps({"config": config, "valid": {"NDCG@10": ndcg},
                                                                "test": {"NDCG@10": ndcg}, "best_epoch": 3,
                                                                "epochs": 23, "device": "cpu"}))
    monkeypatch.setattr(C, "run_folder", lambda cell, seed, hyperparameters: str(folders.get(cell, tmp_path / "no")))
    monkeypatch.setattr(C, "HYPERPARAMETERS", str(tmp_path / "h.tsv"))
    C.choose()
    assert "toys/sasrec/bce: changed from the defaults (no row) to" in capsys.readouterr().out
    best = C.tuning_point(bce[5])
    assert C.read_hyperparameters(str(tmp_path / "h.tsv")) == {
        ("toys", "sasrec", "bce"): ["--lr", f"{float(best['lr']):g}", "--dim", best["dim"], "--layers",
                                    best["layers"], "--heads", best["layers"]]}
    assert "# 0.0300, 3 of 12" in (tmp_path / "h.tsv").read_text()


def test_choose_replaces_only_the_rows_of_cells_with_finished_tuning_runs(tmp_path, monkeypatch, capsys):
    """Issue 33, item 1: without a finished tuning run, choose leaves the committed per-cell settings as they are
    (it wrote an empty table); with one cell's runs finished, only that cell's row changes, and the output says
    which rows changed and which were kept."""
    table = tmp_path / "h.tsv"
    committed = open(C.HYPERPARAMETERS, encoding="utf-8").read()
    table.write_text(committed)
    monkeypatch.setattr(C, "HYPERPARAMETERS", str(table))
    monkeypatch.setattr(C, "run_folder", lambda cell, seed, hyperparameters: str(tmp_path / "none"))
    rows = C.read_hyperparameters(str(table))
    assert len(rows) == 60                                                  # 48 cells of the paper's losses, 12 CE
    C.choose()
    out = capsys.readouterr().out
    assert table.read_text() == committed and "no tuning run has finished" in out and "(60 rows kept" in out
    tuned = next(cell for cell in C.cells("tune", ["toys"], ["sasrec"]) if "/bce/lr=2e-4,dim=128,layers=1" in cell)
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "metrics.json").write_text(json.dumps({
        "config": {"lr": 2e-4, "dim": 128, "layers": 1, "heads": 1, "beta": 0.05}, "valid": {"NDCG@10": 0.02},
        "test": {"NDCG@10": 0.02}, "best_epoch": 3, "epochs": 23, "device": "cpu"}))
    monkeypatch.setattr(C, "run_folder", lambda cell, seed, hyperparameters: str(
        tmp_path / ("tuned" if cell == tuned else "none")))
    C.choose()
    out = capsys.readouterr().out
    after = C.read_hyperparameters(str(table))
    assert after.keys() == rows.keys()
    assert {key for key in rows if after[key] != rows[key]} == {("toys", "sasrec", "bce")}
    assert after["toys", "sasrec", "bce"][:6] == ["--lr", "0.0002", "--dim", "128", "--layers", "1"]
    changed = [line for line, old in zip(table.read_text().splitlines(), committed.splitlines()) if line != old]
    assert len(changed) == 1 and changed[0].startswith("toys\tsasrec\tbce\t")
    assert "toys/sasrec/bce: changed from --lr 1e-3" in out
    assert "1 rows chosen from finished tuning runs, 59 kept" in out
    assert "kept (no finished tuning run): beauty/caser/bce, " in out


@needs("beauty")
def test_cells_sharing_a_configuration_train_once(monkeypatch):
    monkeypatch.setenv("UNIFORM_SEQREC_DATA", DATA_DIR)
    monkeypatch.setattr(R, "default_data_dir", lambda: DATA_DIR)
    monkeypatch.setattr(C, "read_hyperparameters", lambda path=None: {})
    kept = C.unique_runs(["table1/beauty/sasrec/uniform", "table2/beauty/e", "table3/beauty/0.05",
                          "table3/beauty/0.1", "table2/beauty/a", "table1/beauty/sasrec/bce"], seed=1)
    assert kept == ["table1/beauty/sasrec/uniform", "table3/beauty/0.1", "table2/beauty/a"]


def write_cell(results, cell, seed, hr, ndcg):
    """A record of the cell made at its setting now (results/hyperparameters.tsv, or what a test put in its place):
    a Table 1-3 cell counts only such records."""
    path = os.path.join(results, "cells", f"{cell.replace('/', '__')}-seed{seed}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    settings = C.cell_settings(cell)
    config = {key: settings[key] for key in ("lr", "dim", "layers", "heads", "beta")}
    with open(path, "w") as f:
        json.dump({"cell": cell, "seed": seed, "test": {"HR@10": hr, "NDCG@10": ndcg}, "valid": {}, "best_epoch": 5,
                   "epochs": 25, "device": "cpu", "wall_seconds": 600, "commit": "abc1234", "config": config,
                   "run_dir": "runs/gone"}, f)


def test_results_page_shows_ours_beside_the_papers(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    write_cell(tmp_path, "table1/beauty/sasrec/uniform", 1, 0.0800, 0.0400)
    write_cell(tmp_path, "table1/beauty/sasrec/uniform", 2, 0.0842, 0.0420)
    for loss, ndcg in (("bce", 0.02), ("bpr", 0.03), ("infonce", 0.035)):
        write_cell(tmp_path, f"table1/beauty/sasrec/{loss}", 1, 0.05, ndcg)
    P.report(str(tmp_path / "RESULTS.md"))
    page = (tmp_path / "RESULTS.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| sasrec uniform |"))
    # Beauty: paper .0821 / .0371; ours mean .0821 (sd .0030) and .0410 (sd .0014), +0% and +11%
    assert "| 0.0821 | 0.0821 ± 0.0030 (+0%) | 0.0371 | 0.0410 ± 0.0014 (+11%) |" in row
    assert row.count("not run") == 6                                          # Toys, Sports, Yelp: HR and NDCG
    # two seeds of the uniformity loss but one of InfoNCE, the runner-up: the test cannot be made
    assert "win in 0, tie in 0, loss in 0 of 1 complete groups; not decided (one seed) in 1" in page
    assert ("  - sasrec on beauty: not decided: one seed (uniform 0.0410 ± 0.0014, 2 seeds; infonce 0.0350, 1 seed)"
            in page)
    assert ("| table1/beauty/sasrec/uniform | 2 | 0.001 | 64 | 2 | 2 | 0.05 | 5 / 25 | cpu | machine not recorded | "
            "10 min | abc1234 |") in page
    assert "not finished" not in page                                         # no such section without runs


def test_ce_is_a_row_without_a_paper_number_and_stays_out_of_the_papers_claim(tmp_path, monkeypatch):
    """CE above the uniformity loss does not turn "the uniformity loss is best" (of the paper's four) into a "no":
    it is shown beside that count, with its own."""
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    for loss, ndcg in (("bce", 0.02), ("bpr", 0.03), ("infonce", 0.035), ("uniform", 0.04), ("ce", 0.05)):
        write_cell(tmp_path, f"table1/beauty/sasrec/{loss}", 1, 0.06, ndcg)
    write_cell(tmp_path, "table1/toys/gru4rec/ce", 1, 0.07, 0.03)             # CE alone in its group
    lines = P.claims()
    assert lines[0].endswith("win in 0, tie in 0, loss in 0 of 1 complete groups; not decided (one seed) in 1")
    assert lines[1] == "  - sasrec on beauty: not decided: one seed (uniform 0.0400, 1 seed; infonce 0.0350, 1 seed)"
    assert ("- Beside it, beyond the paper (CE, softmax over every item, is not one of the four losses counted above): "
            "the uniformity loss above CE (test NDCG@10) in 0 of 1 backbone x dataset groups where both have run; "
            "sasrec on beauty: uniformity 0.0400, CE 0.0500") in lines
    P.report(str(tmp_path / "RESULTS.md"))
    page = (tmp_path / "RESULTS.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| sasrec ce |")]
    assert len(rows) == 2                                                     # one per protocol's Table 1
    assert rows[0].startswith("| sasrec ce | - | 0.0600 | - | 0.0500 | - | not run | - | not run |")
    assert "%" not in rows[0]                                                 # no difference to a paper number
    assert [line for line in page.splitlines() if line.startswith("| gru4rec ce |")][0].startswith(
        "| gru4rec ce | - | not run | - | not run | - | 0.0700 | - | 0.0300 |")
    assert "| caser ce | - | not run | - | not run | - | not run |" in page


def test_claims_compare_the_order_of_what_has_run(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    # Table 2 on Beauty, three rows; the paper's NDCG@10 order of these is e (.0371) > a (.0278) > b (.0113)
    for row, ndcg in (("a", 0.030), ("b", 0.040), ("e", 0.020)):
        write_cell(tmp_path, f"table2/beauty/{row}", 1, 0.05, ndcg)
    for beta, ndcg in (("0.1", 0.02), ("0.001", 0.03)):                      # paper: 0.1 .0358 > 0.001 .0168
        write_cell(tmp_path, f"table3/beauty/{beta}", 1, 0.05, ndcg)
    for beta, ndcg in (("0.1", 0.02), ("0.05", 0.03), ("0.01", 0.04), ("0.005", 0.01), ("0.001", 0.005)):
        write_cell(tmp_path, f"table3/toys/{beta}", 1, 0.05, ndcg)
    for loss, ndcg in (("bce", 0.01), ("bpr", 0.03)):                       # paper: bpr .0140 > bce .0125
        write_cell(tmp_path, f"table1/toys/caser/{loss}", 1, 0.05, ndcg)
    lines = P.claims()
    assert "- Table 2 on beauty, rows run so far (a, b, e), by NDCG@10: ours b > a > e; paper e > a > b" in lines
    assert ("  - caser on toys, partial (ranked this way so far: bce, bpr): not decided: one seed (bpr 0.0300, 1 seed; "
            "bce 0.0100, 1 seed); the paper's order bpr > bce") in lines
    assert lines[0].endswith("not decided): none complete yet")
    assert ("- Table 3 on beauty, betas run so far (0.1, 0.001), by NDCG@10: ours 0.001 > 0.1; "
            "paper 0.1 > 0.001") in lines
    assert ("- Table 3 on toys, NDCG@10 peaks at beta 0.01 (paper: 0.05); all betas, by NDCG@10: "
            "ours 0.01 > 0.05 > 0.1 > 0.005 > 0.001; paper 0.05 > 0.1 > 0.01 > 0.005 > 0.001") in lines


def test_results_page_lists_unfinished_runs_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    P.report(str(tmp_path / "RESULTS.md"), unfinished=[("table1/beauty/sasrec/bpr", 1, 17, 15, 0.01834)])
    page = (tmp_path / "RESULTS.md").read_text()
    assert "| table1/beauty/sasrec/bpr | 1 | 17 | 15 | 0.0183 |" in page
    row = next(line for line in page.splitlines() if line.startswith("| sasrec bpr |"))
    assert row.count("not run") == 8                                          # unfinished: no test number


def write_ranked_cell(results, cell, seed, every_item, excluded, best_epoch, epochs, wall_seconds):
    """A record ranked both ways ((HR@10, NDCG@10) of each), with its epochs and wall time; excluded None: ranked
    every item only, as the records from before both protocols were kept."""
    write_cell(results, cell, seed, *every_item)
    path = C.record_path(cell, seed)
    entry = {**json.loads(open(path).read()), "best_epoch": best_epoch, "epochs": epochs, "wall_seconds": wall_seconds}
    if excluded:
        entry["protocols"] = {name: {"test": {"HR@10": hr, "NDCG@10": ndcg}}
                              for name, (hr, ndcg) in (("all_items", every_item), ("history_excluded", excluded))}
    open(path, "w").write(json.dumps(entry))


STUDY_ROWS = [  # the seeds of two losses of the regime study and their partners: cell, seed, every item, excluded, ...
    ("regime/beauty/bce", 1, (0.0460, 0.0200), (0.0520, 0.0280), 60, 80, 800),
    ("regime/beauty/bce", 2, (0.0470, 0.0205), (0.0530, 0.0290), 70, 90, 900),
    ("regime/beauty/bce", 3, (0.0465, 0.0210), (0.0520, 0.0280), 65, 85, 850),
    ("table1/beauty/sasrec/bce", 1, (0.0448, 0.0190), None, 103, 123, 5831.8),  # ranked one way
    ("table1/beauty/sasrec/bce", 2, (0.0450, 0.0195), (0.0500, 0.0260), 80, 100, 4000),
    ("table1/beauty/sasrec/bce", 3, (0.0440, 0.0185), (0.0510, 0.0270), 90, 110, 4500),
    ("regime/beauty/uniform", 1, (0.0700, 0.0300), (0.0800, 0.0450), 100, 120, 1500),
    ("table1/beauty/sasrec/uniform", 1, (0.0724, 0.0327), (0.0850, 0.0500), 42, 62, 3169)]


def test_a_side_study_is_shown_beside_table1s_cells_once_one_of_its_runs_is_recorded(tmp_path, monkeypatch):
    """Issue 32 part 2: per loss, the study's cell and Table 1's side by side under both protocols (mean ± sd, the
    seeds), each seed's epochs, s / epoch and the estimated time to the best state, and the page's rule between the
    two; no section until one of the study's own runs is recorded (the page as it was before the study)."""
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    for row in STUDY_ROWS[3:6] + STUDY_ROWS[7:]:                               # the partners alone: no section
        write_ranked_cell(tmp_path, *row)
    assert P.side_studies() == []
    for row in STUDY_ROWS[:3] + STUDY_ROWS[6:7]:
        write_ranked_cell(tmp_path, *row)
    P.report(str(tmp_path / "RESULTS.md"))
    page = (tmp_path / "RESULTS.md").read_text()
    assert "## Beyond the paper: trained per user, packed (SASRec, Beauty)" in page
    assert "original SASRec's block" not in page                              # none of its runs recorded
    lines = page[page.index("## Beyond the paper: trained per user"):page.index("## Runs behind")].rstrip().split("\n")
    assert lines[5:7] == [
        "| loss (paper HR@10 / NDCG@10) | | every item ranked: HR@10 | NDCG@10 | history excluded: HR@10 | NDCG@10 | "
        "best epoch / epochs | s / epoch | min to the best state (est.) | cell |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    assert lines[7:11] == [
        "| bce (paper 0.0522 / 0.0278) | per user, packed | 0.0465 ± 0.0005 | 0.0205 ± 0.0005, 3 seeds | "
        "0.0523 ± 0.0006 | 0.0283 ± 0.0006, 3 seeds | 60 / 80, 70 / 90, 65 / 85 | 10 | 11 | regime/beauty/bce |",
        "| bce (paper 0.0522 / 0.0278) | per prefix (Table 1) | 0.0446 ± 0.0005 | 0.0190 ± 0.0005, 3 seeds | "
        "0.0505 ± 0.0007 | 0.0265 ± 0.0007, 2 seeds | 103 / 123, 80 / 100, 90 / 110 | 43 | 65 | "
        "table1/beauty/sasrec/bce |",
        "| bpr (paper 0.0594 / 0.0261) | per user, packed | not run | not run | not run | not run | | | | "
        "regime/beauty/bpr |",
        "| bpr (paper 0.0594 / 0.0261) | per prefix (Table 1) | not run | not run | not run | not run | | | | "
        "table1/beauty/sasrec/bpr |"]
    p_bce = P.welch([0.0200, 0.0205, 0.0210], [0.0190, 0.0195, 0.0185])[2]    # the page's own test, not a second
    assert p_bce < P.LEVEL
    assert lines[-8:] == [
        f"- bce, every item ranked: per-user wins (per-user 0.0205 ± 0.0005, 3 seeds; per-prefix 0.0190 ± 0.0005, "
        f"3 seeds; Welch's t 3.67, df 4.0, p {p_bce:.2g})",
        "- bce, the history's items excluded: tie (per-user 0.0283 ± 0.0006, 3 seeds; per-prefix 0.0265 ± 0.0007, 2 "
        "seeds; Welch's t 3.05, df 1.9, p 0.099)",
        "- bpr, every item ranked: not decided: no per-user or per-prefix seed ranked this way yet",
        "- bpr, the history's items excluded: not decided: no per-user or per-prefix seed ranked this way yet",
        "- infonce, every item ranked: not decided: no per-user or per-prefix seed ranked this way yet",
        "- infonce, the history's items excluded: not decided: no per-user or per-prefix seed ranked this way yet",
        "- uniform, every item ranked: not decided: one seed (per-prefix 0.0327, 1 seed; per-user 0.0300, 1 seed)",
        "- uniform, the history's items excluded: not decided: one seed (per-prefix 0.0500, 1 seed; per-user 0.0450, "
        "1 seed)"]
    write_ranked_cell(tmp_path, "block/beauty/uniform", 1, (0.0750, 0.0350), (0.0870, 0.0510), 50, 70, 3500)
    block = P.side_studies()
    assert block[block.index("## Beyond the paper: the original SASRec's block (SASRec, Beauty)") + 9] == (
        "| uniform (paper 0.0821 / 0.0371) | original block | 0.0750 | 0.0350, 1 seed | 0.0870 | 0.0510, 1 seed | "
        "50 / 70 | 50 | 42 | block/beauty/uniform |")
    assert "- bce, every item ranked: not decided: no original seed ranked this way yet" in block
    assert not any("not one setting" in line for line in block)
    path = C.record_path("block/beauty/uniform", 1)                           # trained after `choose` changed lr
    entry = json.loads(open(path).read())
    entry["config"]["lr"] = 3e-4
    open(path, "w").write(json.dumps(entry))
    assert ("- uniform: not one setting, so not a side-by-side: its runs differ in lr 0.0003, 0.001"
            in P.side_studies())


def test_the_committed_page_is_what_the_committed_records_make(tmp_path, monkeypatch):
    """results/RESULTS.md regenerates byte-identically from results/cells/ in a checkout without run folders (its
    runs in progress kept from the committed page): a section shown with no record of its own (a side study's before
    its first run) would change every committed page."""
    committed = os.path.join(HERE, "results", "RESULTS.md")
    page = tmp_path / "RESULTS.md"
    shutil.copy(committed, page)
    monkeypatch.setattr(C, "HERE", str(tmp_path))                                 # no runs/ folder here
    P.report(str(page))
    assert page.read_text() == open(committed, encoding="utf-8").read()


def test_unfinished_runs_are_found_from_their_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sequences = tmp_path / "data"
    sequences.mkdir()
    (sequences / "Beauty.txt").write_text("".join(f"{u} 1 2 3 4\n" for u in range(1, 6)))
    monkeypatch.setenv("UNIFORM_SEQREC_DATA", str(sequences))
    monkeypatch.setattr(C, "read_hyperparameters", lambda: {})
    run_dir = C.run_folder("table1/beauty/sasrec/bpr", 1, {})
    os.makedirs(run_dir)
    rows = [{"epoch": e, "valid_NDCG@10": v} for e, v in ((1, 0.01), (2, 0.03), (3, 0.02))]
    with open(os.path.join(run_dir, "log.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    assert P.unfinished_runs(max_seed=2) == [("table1/beauty/sasrec/bpr", 1, 3, 2, 0.03)]
    open(os.path.join(run_dir, "metrics.json"), "w").write("{}")
    assert P.unfinished_runs(max_seed=2) == []


def test_figure1_numbers_are_written_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    monkeypatch.setattr(C, "HERE", str(tmp_path))
    histogram = [0] * 40
    for row in ("a", "b"):
        run = tmp_path / "runs" / row
        run.mkdir(parents=True)
        rows = [{"epoch": e, "valid_NDCG@10": 0.01 * e if row == "a" else 0.005 * e + (e == 2) * 0.1,
                 "history_cosine_histogram": histogram[:39] + [e], "item_cosine_histogram": [e] + histogram[1:],
                 "history_uniformity": -e} for e in (1, 2, 3)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_cell(tmp_path, f"table2/beauty/{row}", 1, 0.05, 0.02)
        path = tmp_path / "cells" / f"table2__beauty__{row}-seed1.json"
        entry = json.loads(path.read_text())
        path.write_text(json.dumps({**entry, "run_dir": f"runs/{row}"}))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)       # as if it were not installed
    F.figure1(str(tmp_path))
    data = json.loads((tmp_path / "figure1.json").read_text())
    assert data["validation_ndcg10"]["unnormalized BCE"] == [0.01, 0.02, 0.03]
    assert (data["early_epoch"], data["late_epoch"]) == (1, 2)                # late = best validation epoch of (b)
    assert data["history_late"][-1] == 2 and data["item_early"][0] == 1
    assert not (tmp_path / "figure1.png").exists()
    assert data["finished"] == {"unnormalized BCE": True, "normalized BCE": True}


def test_figure1_falls_back_to_an_unfinished_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(C, "HERE", str(tmp_path))
    histogram = [1] * 40
    folders = {"table2/beauty/a": None, "table2/beauty/b": tmp_path / "runs" / "b"}
    monkeypatch.setattr(C, "run_folder", lambda cell, seed, hyperparameters: folders[cell] and str(folders[cell]))
    folders["table2/beauty/b"].mkdir(parents=True)
    rows = [{"epoch": e, "valid_NDCG@10": 0.01 * e, "history_cosine_histogram": histogram,
             "item_cosine_histogram": histogram, "history_uniformity": -e} for e in (1, 2)]
    (folders["table2/beauty/b"] / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    F.figure1(str(tmp_path))
    data = json.loads((tmp_path / "figure1.json").read_text())
    assert data["validation_ndcg10"] == {"normalized BCE": [0.01, 0.02]}   # row (a) has no run at all
    assert data["finished"] == {"normalized BCE": False}


def brute_force_baseline(sequences, split, decay):
    """Popularity and item-transition metrics by loops over users and items (HR@k, NDCG@k for k = 5, 10)."""
    num_items = max(max(s) for s in sequences)
    popularity, follows = [0] * (num_items + 1), {}
    for s in sequences:
        part = s[:-2]                                                       # training part only
        for item in part:
            popularity[item] += 1
        for a, b in zip(part, part[1:]):
            follows[a, b] = follows.get((a, b), 0) + 1
    results = {}
    for name in ("popularity", "transitions"):
        hits, gains = {5: [], 10: []}, {5: [], 10: []}
        for s in sequences:
            cut = 2 if split == "valid" else 1
            history, target = s[:len(s) - cut], s[len(s) - cut]
            recent = history[::-1][:3]
            def score(item):
                tie = 1e-3 * popularity[item] / (max(popularity) + 1)
                if name == "popularity":
                    return popularity[item]
                return sum(decay ** k * follows.get((a, item), 0) for k, a in enumerate(recent)) + tie
            rank = sum(1 for item in range(1, num_items + 1) if item != target and score(item) >= score(target))
            for k in (5, 10):
                hits[k].append(rank < k)
                gains[k].append(1 / math.log2(rank + 2) if rank < k else 0)
        results[name] = {f"{m}@{k}": sum(v[k]) / len(v[k]) for m, v in (("HR", hits), ("NDCG", gains)) for k in (5, 10)}
    return results


def test_baselines_match_brute_force():
    g = random.Random(0)
    sequences = [[g.randint(1, 12) for _ in range(g.randint(5, 9))] for _ in range(40)]
    sequences = [list(dict.fromkeys(s)) for s in sequences]                 # no repeats, as on Amazon
    sequences = [s for s in sequences if len(s) >= 5]
    found = B.dataset_baselines(sequences)
    for split in ("valid", "test"):
        expected = brute_force_baseline(sequences, split, found["transitions"]["decay"])
        for name in ("popularity", "transitions"):
            for key, value in expected[name].items():
                assert found[name][split][key] == pytest.approx(value), (split, name, key)
    assert found["transitions"]["valid"]["NDCG@10"] == max(found["transitions"]["valid_by_decay"].values())


def test_popularity_counts_every_training_item_with_its_repeats():
    """training_part_items reads uniform_seqrec.training_item_codes' part (s[:n-2]) but keeps an item a user had twice
    (Yelp's revisits), as a loop over the training parts does."""
    g = random.Random(4)
    sequences = [[g.randint(1, 6) for _ in range(g.randint(3, 9))] for _ in range(50)]   # repeats, 3 items or more
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    assert B.training_part_items(flat, starts, lengths).tolist() == [i for s in sequences for i in s[:-2]]
    popularity = B.item_popularity(flat, starts, lengths, num_items)
    assert popularity.tolist() == [sum(s[:-2].count(i) for s in sequences) for i in range(num_items + 1)]


def test_a_baseline_is_ranked_as_uniform_seqrec_ranks_a_model():
    """baselines.ranks, given a model's scores as a scoring function, gives uniform_seqrec.target_ranks' ranks under
    both protocols (ties against the target, padding never an item)."""
    g = random.Random(5)
    sequences = [[g.randint(1, 9) for _ in range(g.randint(4, 8))] for _ in range(40)]
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    torch.manual_seed(0)
    model = U.build_model({"model": "sasrec", "dim": 8, "layers": 1, "heads": 1, "dropout": 0.5}, num_items,
                          len(lengths), 10).eval()
    with torch.no_grad():
        model.output_items().weight[3] = model.output_items().weight[4]   # a tie between two items
    table = model.output_items().weight
    score = torch.no_grad()(lambda h, users: U.score_all(model.encode(h, users=users), table))
    batches = U.evaluation_batches(flat, starts, lengths, 10, "test", batch_size=16)
    for mask_seen in (False, True):
        assert torch.equal(B.ranks(score, batches, mask_seen), U.target_ranks(model, batches, False, (mask_seen,))[0])


def test_a_slurm_array_task_runs_only_its_line_of_the_list(tmp_path):
    """With SLURM_ARRAY_TASK_ID=N, run_all.sh runs the N-th cell of the narrowed list and nothing else (no report);
    past the end of the list it does nothing and succeeds; a failed cell fails the task."""
    shutil.copy(os.path.join(HERE, "run_all.sh"), tmp_path)
    (tmp_path / "bin").mkdir()
    stand_in = tmp_path / "bin" / "python"
    stand_in.write_text('#!/bin/sh\n'
                        'echo "$*" >> calls.txt\n'
                        'if [ "$2" = list ]; then printf "%s 1\\n" table1/toys/sasrec/bce table1/toys/sasrec/bpr; fi\n'
                        'if [ "$3" = table1/toys/sasrec/bpr ] && [ -f fail ]; then exit 1; fi\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "DATASETS": "toys",
           "MODELS": "sasrec"}
    run = lambda task: subprocess.run(["bash", str(tmp_path / "run_all.sh"), "table1"], cwd=tmp_path,
                                      env={**env, "SLURM_ARRAY_TASK_ID": str(task)}, capture_output=True, text=True)
    done = run(2)
    assert done.returncode == 0 and done.stdout == "done    table1/toys/sasrec/bpr seed 1\n", done.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls == ["experiments.py list table1 --datasets toys --models sasrec --seeds 1",
                     "experiments.py run table1/toys/sasrec/bpr --seed 1"]          # no other cell, no report
    assert run(3).returncode == 0 and "shorter; nothing to do" in run(3).stdout
    (tmp_path / "fail").touch()
    assert run(2).returncode == 1


def test_an_unknown_cell_or_a_missing_data_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNIFORM_SEQREC_DATA", str(tmp_path))                # no data files there
    monkeypatch.setattr(R, "main", lambda argv, commit=None: pytest.fail("trained a cell that cannot run"))
    for cell in ["bogus", "table1/beauty/sasrec", "table1/nope/sasrec/uniform", "table2/beauty/z"]:
        assert E.main(["run", cell]) == 2
        assert capsys.readouterr().err == f"experiments.py: error: unknown cell '{cell}' (`experiments.py list " \
                                          f"all` prints them)\n"
    assert E.main(["run", "table1/beauty/sasrec/bce"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("experiments.py: error: ") and "Beauty.txt not found" in error and error.count("\n") == 1


def test_a_cell_another_process_is_training_is_left_to_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "Beauty.txt").write_text("".join(f"{u} 1 2 3 4\n" for u in range(1, 6)))
    monkeypatch.setenv("UNIFORM_SEQREC_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(C, "read_hyperparameters", lambda: {})
    run_dir = C.run_folder("table1/beauty/sasrec/bpr", 1, {})
    os.makedirs(run_dir)
    held = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                             "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
                             os.path.join(run_dir, ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline() == "locked\n"
        monkeypatch.setattr(R, "main", lambda argv, commit=None: pytest.fail("trained a folder another process holds"))
        assert C.run_cell("table1/beauty/sasrec/bpr", 1, None) == 0
        assert "is being trained by another process; left to it" in capsys.readouterr().out
    finally:
        held.kill()
        held.wait()
    assert not C.in_use(run_dir)


def test_a_run_folder_that_cannot_be_locked_or_written_is_one_line_and_a_failure(tmp_path, monkeypatch, capsys):
    """A .lock that cannot be opened (no permission) is not another process training the cell: one line and exit
    status 2, so that run_all.sh counts the cell as failed, not done; so is a run folder that cannot be made, or
    whose commit.txt cannot be written (written whole or not at all; an empty one, from before, is written again)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "Beauty.txt").write_text("".join(f"{u} 1 2 3 4\n" for u in range(1, 6)))
    monkeypatch.setenv("UNIFORM_SEQREC_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(C, "read_hyperparameters", lambda path=None: {})
    monkeypatch.setattr(R, "main", lambda argv, commit=None: pytest.fail("trained a cell whose folder cannot be used"))
    cell = "table1/beauty/sasrec/bpr"
    run_dir = C.run_folder(cell, 1, {})
    (tmp_path / "runs").write_text("")                                        # a file where the folder goes
    assert E.main(["run", cell]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"experiments.py: error: cannot write in the run folder {run_dir} (")
    os.remove(tmp_path / "runs")
    refused, real_open = [".lock"], open

    def refusing_open(path, *args, **kwargs):
        if str(path).endswith(refused[0]):
            error = errno.EACCES if refused[0] == ".lock" else errno.ENOSPC
            raise OSError(error, os.strerror(error), str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(R, "open", refusing_open, raising=False)              # runs.py's own open
    os.makedirs(run_dir)
    open(os.path.join(run_dir, ".lock"), "w").close()
    assert E.main(["run", cell]) == 2
    out, err = capsys.readouterr()
    assert "left to it" not in out and err.count("\n") == 1
    assert err.startswith(f"experiments.py: error: cannot write in the run folder {run_dir} (Permission denied); "
                          f"whether another process trains it cannot be told, so it was not run")
    refused[0] = "commit.txt.partial"                                         # a full disk
    assert E.main(["run", cell]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"experiments.py: error: cannot write {os.path.join(run_dir, 'commit.txt')} (No space left")
    assert sorted(os.listdir(run_dir)) == [".lock"]                           # no commit.txt, not even empty
    refused[0] = "nothing is refused"
    open(os.path.join(run_dir, "commit.txt"), "w").close()                    # empty, from a write that failed
    monkeypatch.setattr(R, "main", lambda argv, commit=None: 0)
    assert E.main(["run", cell]) == 0
    assert open(os.path.join(run_dir, "commit.txt")).read() == C.git_commit() + "\n"


def test_records_under_another_setting_than_the_cells_row_are_not_counted_and_are_named(tmp_path, monkeypatch):
    """After `choose` rewrites a row of results/hyperparameters.tsv, a cell's seeds trained before keep their records:
    Tables 1-3 and the verdicts count only the records at the cell's setting now, and the page names the others, one
    line per cell. A setting a record does not hold (a record from before it existed) counts as the same."""
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    cell = "table1/beauty/sasrec/bce"
    for seed, hr, ndcg, config in ((1, 0.05, 0.020, {}), (2, 0.09, 0.060, {"lr": 3e-4}),
                                   (3, 0.07, 0.040, {"negatives": "unseen", "dropout": 0.5})):
        write_cell(tmp_path, cell, seed, hr, ndcg)
        entry = json.loads(open(C.record_path(cell, seed)).read())
        entry["config"].update(config)
        open(C.record_path(cell, seed), "w").write(json.dumps(entry))
    write_cell(tmp_path, "table1/beauty/sasrec/bpr", 1, 0.05, 0.025)
    assert C.recorded(cell) == [(0.05, 0.020), (0.07, 0.040)]                 # seeds 1 and 3
    assert P.not_counted() == [f"- {cell}: seed 2 (lr 0.0003); the cell now: lr 0.001"]
    P.report(str(tmp_path / "RESULTS.md"))
    page = (tmp_path / "RESULTS.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| sasrec bce |"))
    assert row.startswith("| sasrec bce | 0.0522 | 0.0600 ± 0.0141 (+15%) | 0.0278 | 0.0300 ± 0.0141 (+8%) |")
    assert ("  - sasrec on beauty, partial (ranked this way so far: bce, bpr): not decided: one seed (bce 0.0300 ± "
            "0.0141, 2 seeds; bpr 0.0250, 1 seed)") in page
    assert page.count(f"- {cell}: seed 2 (lr 0.0003); the cell now: lr 0.001\n") == 1 and P.NOT_COUNTED in page
    assert all(f"| {cell} | {seed} | " in page for seed in (1, 2, 3))           # the runs table lists every record
    table = tmp_path / "hyperparameters.tsv"                                   # `choose` puts lr 3e-4 in the row
    table.write_text(open(C.HYPERPARAMETERS).read().replace("beauty\tsasrec\tbce\t1e-3", "beauty\tsasrec\tbce\t3e-4"))
    monkeypatch.setattr(C, "HYPERPARAMETERS", str(table))
    assert C.recorded(cell) == [(0.09, 0.060)]
    assert P.not_counted() == [f"- {cell}: seed 1 (lr 0.001), seed 3 (lr 0.001); the cell now: lr 0.0003"]


def test_alignment_figure_keeps_the_runs_that_logged_alignment(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS", str(tmp_path / "results"))
    logs = {"table1/toys/sasrec/uniform": [{"epoch": e, "valid_NDCG@10": v, "alignment": 1.0 - 0.1 * e,
                                            "history_uniformity": -e, "item_uniformity": -2 * e}
                                           for e, v in ((1, 0.01), (2, 0.03), (3, 0.02))],
            "table1/toys/sasrec/bce": [{"epoch": 1, "valid_NDCG@10": 0.01, "history_uniformity": -1,
                                        "item_uniformity": -1}]}              # from before the statistic existed
    monkeypatch.setattr(F, "figure_run_log", lambda cell: (logs[cell], cell.endswith("uniform")) if cell in logs
                        else None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    F.figure_alignment("toys")
    data = json.loads((tmp_path / "results" / "alignment_uniformity_toys.json").read_text())
    assert list(data) == ["uniformity loss"]
    run = data["uniformity loss"]
    assert run["best_epoch"] == 2 and run["alignment"] == [0.9, 0.8, 0.7] and run["item_uniformity"] == [-2, -4, -6]
    assert run["finished"] is True


def test_repeat_kinds_and_their_parts_of_ndcg_match_a_loop():
    g = random.Random(1)
    histories, targets, ranks = [], [], []
    for _ in range(300):
        history = [g.randint(1, 6) for _ in range(g.randint(1, 5))]
        histories.append(history + [0] * (5 - len(history)))                # right-padded, as evaluation gives them
        targets.append(g.randint(1, 6))
        ranks.append(g.choice([0, 1, 3, 9, 10, 40]))
    kinds = A.repeat_kinds(torch.tensor(histories), torch.tensor(targets))
    expected = [0 if [i for i in h if i][-1] == t else 1 if t in h else 2 for h, t in zip(histories, targets)]
    assert kinds.tolist() == expected
    parts = A.ndcg_by_repeat(torch.tensor(ranks, dtype=torch.float64), kinds)
    for kind, (share, hit_rate, first, part) in enumerate(parts):
        mine = [r for r, k in zip(ranks, expected) if k == kind]
        assert share == pytest.approx(len(mine) / len(ranks))
        assert hit_rate == pytest.approx(sum(r < 10 for r in mine) / len(mine))
        assert first == pytest.approx(sum(r == 0 for r in mine) / len(mine))
        assert part == pytest.approx(sum(1 / math.log2(r + 2) for r in mine if r < 10) / len(ranks))
    overall = U.metrics_from_ranks(torch.tensor(ranks, dtype=torch.float64))["NDCG@10"]
    assert sum(part for *_, part in parts) == pytest.approx(overall)


def test_a_run_folders_best_state_ranks_as_its_test_did(tmp_path):
    """best_state_ranks rebuilds a run's best state from its folder: ranked with ranks_and_repeats, the test
    metrics are the ones the run recorded (a repeat-heavy file, so every kind of target occurs)."""
    g = random.Random(2)
    data = tmp_path / "repeats.txt"
    data.write_text("".join(f"{u} " + " ".join(str(g.randint(1, 15)) for _ in range(g.randint(5, 9))) + "\n"
                            for u in range(1, 61)))
    run = tmp_path / "run"
    assert R.main(["--data", str(data), "--out", str(run), "--model", "sasrec", "--dim", "16", "--layers", "1",
                   "--heads", "1", "--device", "cpu", "--epochs", "3", "--loss", "uniform"]) == 0
    flat, starts, lengths, num_items = U.flatten_sequences(R.read_sequences(str(data)), "cpu")
    rank, max_len = A.best_state_ranks(str(run), num_items, lengths)
    ranks, kinds = A.ranks_and_repeats(rank, flat, starts, lengths, "test", max_len)
    with open(run / "metrics.json") as f:
        recorded_test = json.load(f)["test"]
    assert U.metrics_from_ranks(ranks) == pytest.approx(recorded_test)
    assert set(kinds.tolist()) == {0, 1, 2}
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(R.RunFolderError, match="does not load"):
        A.best_state_ranks(str(run), num_items, lengths)
    with pytest.raises(R.RunFolderError, match="no checkpoint.pt"):
        A.best_state_ranks(str(tmp_path), num_items, lengths)


# ----------------------------------------------------------------------------------------------------------------
# Both ranking protocols in every record; a run on other data is never recorded as a cell
# ----------------------------------------------------------------------------------------------------------------

TINY = ["--epochs", "2", "--dim", "8", "--layers", "1", "--heads", "1"]


def small_beauty_checkout(tmp_path, monkeypatch, seed, users):
    """A small repeat-heavy file named Beauty.txt (`users` users of 5 to 9 items out of 25, drawn from `seed`) in
    tmp_path/data, found through UNIFORM_SEQREC_DATA, with tmp_path as the working folder, the project's folder and
    results/'s parent, and the file taken as the published one (records take only that). Returns its path."""
    g = random.Random(seed)
    data = tmp_path / "data" / "Beauty.txt"
    data.parent.mkdir()
    data.write_text("".join(f"{u} " + " ".join(str(g.randint(1, 25)) for _ in range(g.randint(5, 9))) + "\n"
                            for u in range(1, users + 1)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UNIFORM_SEQREC_DATA", str(data.parent))
    monkeypatch.setattr(C, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(C, "HERE", str(tmp_path))
    published = sha256_of(str(data))
    monkeypatch.setattr(C, "published_sha256", lambda dataset: published)
    return data


@pytest.fixture
def tiny_cell(tmp_path, monkeypatch):
    """A trained run of table1/beauty/sasrec/uniform on a small repeat-heavy file named Beauty.txt (2 epochs),
    with results/ in tmp_path. Returns (run folder, data file)."""
    data = small_beauty_checkout(tmp_path, monkeypatch, seed=3, users=80)
    monkeypatch.setattr(C, "read_hyperparameters", lambda path=None: {("beauty", "sasrec", "uniform"): TINY})
    monkeypatch.setattr(C, "cells", lambda what, datasets, models: ["table1/beauty/sasrec/uniform"])
    assert C.run_cell("table1/beauty/sasrec/uniform", 1, "cpu") == 0
    return tmp_path / C.run_folder("table1/beauty/sasrec/uniform", 1, C.read_hyperparameters()), data


def test_a_record_holds_both_protocols_and_its_data(tiny_cell):
    run_dir, data = tiny_cell
    C.record_all(max_seed=1)
    entry = json.loads(open(C.record_path("table1/beauty/sasrec/uniform", 1)).read())
    flat, starts, lengths, num_items = U.flatten_sequences(R.read_sequences(str(data)), "cpu")
    model, config, max_len = C.best_state(str(run_dir), num_items, lengths)
    for split in ("test", "valid"):
        batches = U.evaluation_batches(flat, starts, lengths, max_len, split)
        for protocol, mask_seen in U.PROTOCOLS.items():
            assert entry["protocols"][protocol][split] == pytest.approx(U.evaluate(model, batches, True, mask_seen))
    assert entry["protocols"]["all_items"]["test"] == entry["test"]
    assert entry["protocols"]["history_excluded"]["test"] != entry["test"]          # repeats: masking matters
    assert entry["config"]["data_fingerprint"] == {"bytes": data.stat().st_size, "sha256": sha256_of(str(data))}
    assert 0 <= entry["top_item_in_history"]["test"] <= 1
    assert entry["machine"] == {"device": "cpu", "name": R.cpu_model(), "torch": torch.__version__,  # what trained it
                                "threads": torch.get_num_threads(),
                                "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    assert "sessions" not in entry and "stopped" not in entry                 # one machine and commit; not stopped


def test_a_report_ranks_again_only_a_run_its_record_does_not_hold(tiny_cell, monkeypatch):
    run_dir, _ = tiny_cell
    C.record_all(max_seed=1)
    path = C.record_path("table1/beauty/sasrec/uniform", 1)
    first = json.loads(open(path).read())
    ranked, rescore = [], C.rescore
    monkeypatch.setattr(C, "rescore", lambda *args: ranked.append(args) or rescore(*args))
    C.record_all(max_seed=1)                                                      # the same run: nothing ranked
    assert ranked == [] and json.loads(open(path).read()) == first
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["epochs"] += 1                                                        # as if the run was extended
    metrics_path.write_text(json.dumps(metrics))
    C.record_all(max_seed=1)
    assert len(ranked) == 1 and json.loads(open(path).read())["epochs"] == first["epochs"] + 1
    del first["protocols"]                                                        # a record from before: ranked
    open(path, "w").write(json.dumps(first))
    C.record_all(max_seed=1)
    assert len(ranked) == 2 and "protocols" in json.loads(open(path).read())


def test_a_run_ended_by_a_non_finite_loss_is_recorded_and_shown_as_stopped(tmp_path, monkeypatch):
    """A cell's run whose loss turns NaN in epoch 2 of 2 is tested at its best state (epoch 1): its record says why
    it stopped, and the results page's row of it too."""
    data = small_beauty_checkout(tmp_path, monkeypatch, seed=3, users=80)
    monkeypatch.setattr(C, "read_hyperparameters", lambda path=None: {("beauty", "sasrec", "uniform"): TINY})
    monkeypatch.setattr(C, "cells", lambda what, datasets, models: ["table1/beauty/sasrec/uniform"])
    first_epoch = -(-sum(len(s) - 3 for s in R.read_sequences(str(data))) // 256)    # its steps
    real_loss, calls = U.batch_loss, []

    def poisoned(*args):
        calls.append(None)
        return real_loss(*args) * (float("nan") if len(calls) == first_epoch + 1 else 1.0)   # epoch 2, step 1
    monkeypatch.setattr(U, "batch_loss", poisoned)
    assert C.run_cell("table1/beauty/sasrec/uniform", 1, "cpu") == 0
    assert C.record_all(max_seed=1) == 0
    entry = json.loads(open(C.record_path("table1/beauty/sasrec/uniform", 1)).read())
    assert entry["stopped"] == "non-finite loss at epoch 2, step 1" and (entry["best_epoch"], entry["epochs"]) == (1, 1)
    P.report(str(tmp_path / "RESULTS.md"))
    rows = [line for line in (tmp_path / "RESULTS.md").read_text().splitlines()
            if line.startswith("| table1/beauty/sasrec/uniform | 1 | ")]
    assert len(rows) == 1 and " | 1 / 1 (stopped: non-finite loss at epoch 2, step 1) | cpu | " in rows[0]


def test_a_run_trained_on_two_machines_and_commits_records_both(tmp_path, monkeypatch):
    """A cell's run paused after epoch 1 on one machine and commit, finished on another: its record names both
    sessions, its machine and commit are the last's, and the results page's row says "mixed" and both commits.
    (One machine and commit throughout: no sessions, test_a_record_holds_both_protocols_and_its_data.)"""
    small_beauty_checkout(tmp_path, monkeypatch, seed=3, users=80)
    monkeypatch.setattr(C, "read_hyperparameters", lambda path=None: {("beauty", "sasrec", "uniform"): TINY})
    monkeypatch.setattr(C, "cells", lambda what, datasets, models: ["table1/beauty/sasrec/uniform"])
    machines = {}
    for session, (cpu, commit, pause) in enumerate((("Fake CPU A", "aaaa111", 1), ("Fake CPU B", "bbbb222", None))):
        monkeypatch.setattr(R, "cpu_model", lambda: cpu)
        monkeypatch.setattr(C, "git_commit", lambda: commit)
        machines[session] = R.machine(R.device_settings("cpu"))
        assert C.run_cell("table1/beauty/sasrec/uniform", 1, "cpu", pause_after=pause) == 0
    assert C.record_all(max_seed=1) == 0
    entry = json.loads(open(C.record_path("table1/beauty/sasrec/uniform", 1)).read())
    assert entry["sessions"] == [{"first_epoch": 1, "last_epoch": 1, "machine": machines[0], "commit": "aaaa111"},
                                 {"first_epoch": 2, "last_epoch": 2, "machine": machines[1], "commit": "bbbb222"}]
    assert entry["machine"] == machines[1] and entry["commit"] == "bbbb222"
    P.report(str(tmp_path / "RESULTS.md"))
    rows = [line for line in (tmp_path / "RESULTS.md").read_text().splitlines()
            if line.startswith("| table1/beauty/sasrec/uniform | 1 | ")]
    assert len(rows) == 1 and rows[0].endswith(f" | cpu | mixed: {R.machine_label(machines[0])} (epoch 1); "
                                               f"{R.machine_label(machines[1])} (epoch 2) | "
                                               f"{entry['wall_seconds'] / 60:.0f} min | aaaa111, bbbb222 |")


def test_a_run_on_data_that_is_not_the_published_file_is_never_recorded(tiny_cell, monkeypatch, capsys):
    """Issue 33, item 3: a run of a cell on a data file that is not the benchmark's published one (here the tiny
    Beauty.txt, its fingerprint unlike docs/datasets.md's) leaves the cell's record as it was, and says so."""
    run_dir, data = tiny_cell
    C.record_all(max_seed=1)
    path = C.record_path("table1/beauty/sasrec/uniform", 1)
    recorded = open(path).read()
    monkeypatch.setattr(C, "published_sha256", lambda dataset: R.BENCHMARKS[dataset][1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["test"]["NDCG@10"] = 0.5                                              # the numbers it would record
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    capsys.readouterr()
    assert C.record_all(max_seed=1) == 1
    assert open(path).read() == recorded
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not recorded: table1/beauty/sasrec/uniform seed 1: its run was trained on" in err
    assert f"not the published Beauty.txt (SHA-256 {R.BENCHMARKS['beauty'][1][:12]}" in err


def test_a_run_trained_on_other_data_is_not_recorded_nor_reported_finished(tiny_cell, capsys):
    run_dir, data = tiny_cell
    data.write_text(data.read_text() + "81 1 2 3 4 5\n")                           # the file changed since
    C.record_all(max_seed=1)
    assert not os.path.exists(C.record_path("table1/beauty/sasrec/uniform", 1))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not recorded: table1/beauty/sasrec/uniform seed 1" in err
    assert "trained on other data" in err
    code = R.main([*C.cell_arguments("table1/beauty/sasrec/uniform", C.read_hyperparameters()), "--seed", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "was trained on other data" in err


def test_a_longer_run_that_took_over_a_cells_folder_is_neither_recorded_nor_run_as_the_cell(tiny_cell, tmp_path,
                                                                                             monkeypatch, capsys):
    """uniform_seqrec.py given a cell's flags and more epochs and patience extends the cell's folder in place (by
    design: neither is in the folder's hash). That run is not the cell's: `report` keeps the cell's record and says
    so in one line, and `run` exits non-zero with the same line instead of printing the longer run's numbers as the
    cell's; moving the folder aside, as the line says, restores the cell. More patience alone for a run that its
    --epochs ended changes no result: that is still the cell's run."""
    run_dir, _ = tiny_cell
    cell, folder, main = "table1/beauty/sasrec/uniform", os.path.relpath(run_dir), R.main
    arguments = [*C.cell_arguments(cell, C.read_hyperparameters()), "--seed", "1"]
    assert C.record_all(max_seed=1) == 0
    path = C.record_path(cell, 1)
    recorded = json.loads(open(path).read())
    assert R.main([*arguments, "--patience", "40"]) == 0                      # finished by --epochs 2: it stands
    assert json.loads((run_dir / "config.json").read_text())["patience"] == 40
    assert C.record_all(max_seed=1) == 0 and json.loads(open(path).read()) == recorded
    assert R.main([*arguments, "--epochs", "3", "--patience", "40"]) == 0      # epoch 3, in the cell's folder
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3
    capsys.readouterr()
    line = f"{folder} holds a run with --epochs 3, --patience 40, not the --epochs 2, --patience 20 of {cell} seed 1 "
    assert C.record_all(max_seed=1) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"not recorded: {cell} seed 1: {line}")
    assert f"to restore the cell, move the folder aside (mv {folder} {folder}-longer;" in err
    assert json.loads(open(path).read()) == recorded                           # the cell's record kept
    assert E.main(["report"]) == 2
    page = (tmp_path / "results" / "RESULTS.md").read_text()
    assert f"| {cell} | 1 | " in page and f"| {recorded['best_epoch']} / 2 | cpu |" in page
    monkeypatch.setattr(R, "main", lambda argv, commit=None: pytest.fail("ran the cell in a longer run's folder"))
    capsys.readouterr()
    assert E.main(["run", cell, "--seed", "1"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"experiments.py: error: {line}") and "finished" not in out
    monkeypatch.setattr(R, "main", main)
    os.rename(run_dir, f"{run_dir}-longer")                                    # as the line says
    assert C.run_cell(cell, 1, "cpu") == 0 and C.record_all(max_seed=1) == 0
    again = json.loads(open(path).read())
    assert again["epochs"] == 2 and again["test"] == pytest.approx(recorded["test"], rel=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())               # a shorter run: running extends it
    metrics["config"]["patience"] = 5
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    capsys.readouterr()
    assert C.record_all(max_seed=1) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{folder} holds a run with --patience 5, not the --patience 20 of {cell}" in err
    assert f"`python experiments.py run {cell} --seed 1` extends it to the cell's" in err
    assert json.loads(open(path).read()) == again


def test_an_empty_commit_file_is_recorded_as_an_unknown_commit(tiny_cell):
    run_dir, _ = tiny_cell
    assert (run_dir / "commit.txt").read_text() == C.git_commit() + "\n"
    (run_dir / "commit.txt").write_text("")                                   # a write that failed, before
    C.record_all(max_seed=1)
    assert json.loads(open(C.record_path("table1/beauty/sasrec/uniform", 1)).read())["commit"] == "unknown"


def test_rescore_adds_both_protocols_and_changes_nothing_else(tiny_cell, capsys):
    run_dir, _ = tiny_cell
    C.record_all(max_seed=1)
    path = C.record_path("table1/beauty/sasrec/uniform", 1)
    full = json.loads(open(path).read())
    legacy = {k: v for k, v in full.items() if k not in ("protocols", "top_item_in_history")}
    legacy["config"] = {k: v for k, v in full["config"].items() if k != "data_fingerprint"}
    legacy["commit"] = "0000000"                                                 # something only the record has
    open(path, "w").write(json.dumps(legacy))
    gone = {**legacy, "cell": "table1/beauty/caser/bce", "run_dir": "runs/no-such-folder"}
    open(C.record_path("table1/beauty/caser/bce", 1), "w").write(json.dumps(gone))
    C.rescore_recorded()
    assert json.loads(open(path).read()) == {**full, "commit": "0000000"}
    assert "table1/beauty/caser/bce seed 1" in capsys.readouterr().out
    assert P.ranked_one_way() == ["table1/beauty/caser/bce seed 1"]


def test_the_results_page_shows_both_protocols(tiny_cell, tmp_path):
    C.record_all(max_seed=1)
    write_cell(str(tmp_path / "results"), "table1/beauty/caser/bce", 1, 0.03, 0.015)  # ranked one way only
    P.report(str(tmp_path / "RESULTS.md"))
    page = (tmp_path / "RESULTS.md").read_text()
    entry = json.loads(open(C.record_path("table1/beauty/sasrec/uniform", 1)).read())
    masked = entry["protocols"]["history_excluded"]["test"]["NDCG@10"]
    first, second = page.index("## Table 1: backbones x losses (every item ranked)"), page.index(
        "## Table 1: backbones x losses (the history's items excluded)")
    assert f"{entry['test']['NDCG@10']:.4f}" in page[first:second] and f"{masked:.4f}" in page[second:]
    caser_row = next(line for line in page[second:].splitlines() if line.startswith("| caser bce |"))
    assert "ranked one way" in caser_row and "table1/beauty/caser/bce seed 1" in page
    assert "| beauty | 1 | every item ranked |" in page                         # the evidence counts the one cell
    ratio = entry["test"]["NDCG@10"] / entry["test"]["HR@10"]
    masked_ratio = masked / entry["protocols"]["history_excluded"]["test"]["HR@10"]
    assert f"| table1/beauty/sasrec/uniform | {0.0371 / 0.0821:.3f} | {ratio:.3f} | {masked_ratio:.3f} |" in page
    assert f"| table1/beauty/caser/bce | {0.0172 / 0.0348:.3f} | 0.500 | ranked one way |" in page
    share = entry["top_item_in_history"]["test"]
    assert f"({100 * (masked / 0.0371 - 1):+.0f}%) | {100 * share:.0f}% |" in page


def test_a_fresh_clone_keeps_the_pages_runs_in_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "HERE", str(tmp_path))                                # no runs/ folder here
    monkeypatch.setattr(C, "RESULTS", str(tmp_path / "results"))
    page = tmp_path / "RESULTS.md"
    page.write_text(f"# old page\n\n{P.UNFINISHED_TITLE}\n\n| cell | seed |\n| table2/toys/c | 1 |\n")
    P.report(str(page))
    assert page.read_text().endswith(f"{P.UNFINISHED_TITLE}\n\n| cell | seed |\n| table2/toys/c | 1 |\n")
    (tmp_path / "runs").mkdir()                                                  # local runs: the list is theirs
    P.report(str(page))
    assert P.UNFINISHED_TITLE not in page.read_text()


# ----------------------------------------------------------------------------------------------------------------
# Every file and argument experiments.py reads: wrong contents are one line and exit 2, never a traceback
# ----------------------------------------------------------------------------------------------------------------

HEADER = "dataset\tmodel\tloss\tlr\tdim\tlayers\theads\tbeta\n"


@pytest.mark.parametrize("row, expected", [
    ("beauty sasrec bce 1e-3 64 2 2", "7 fields, not the 8"),
    ("beauty sasrec bce 1e-3 64 2 2 0.05 9", "9 fields, not the 8"),
    ("Beauty sasrec bce 1e-3 64 2 2 0.05", "'Beauty' is not one of beauty"),
    ("beauty bert4rec bce 1e-3 64 2 2 0.05", "'bert4rec' is not one of gru4rec"),
    ("beauty sasrec sce 1e-3 64 2 2 0.05", "'sce' is not one of bce, bpr, infonce, uniform, ce"),
    ("beauty sasrec bce fast 64 2 2 0.05", "lr 'fast' is not a number"),
    ("beauty sasrec bce 0 64 2 2 0.05", "lr 0 is out of range"),
    ("beauty sasrec bce nan 64 2 2 0.05", "lr nan is out of range"),
    ("beauty sasrec bce 1e-3 6.4 2 2 0.05", "dim '6.4' is not a positive whole number"),
    ("beauty sasrec bce 1e-3 64 0 2 0.05", "layers '0' is not a positive whole number"),
    ("beauty sasrec bce 1e-3 64 2 -2 0.05", "heads '-2' is not a positive whole number"),
    ("beauty sasrec uniform 1e-3 64 2 2 -1", "beta -1 is out of range"),
    ("beauty sasrec bce 1e-3 64 2 2 0.05\nbeauty sasrec bce 1e-4 64 2 2 0.05", "line 4: a second row for beauty"),
])
def test_a_malformed_hyperparameter_row_is_one_line_naming_its_line(tmp_path, monkeypatch, capsys, row, expected):
    table = tmp_path / "h.tsv"
    table.write_text("# comment\n" + HEADER + row + "\n")
    monkeypatch.setattr(C, "HYPERPARAMETERS", str(table))
    assert E.main(["run", "table1/beauty/sasrec/bce"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"experiments.py: error: {table} line ") and expected in err


def test_the_committed_hyperparameter_table_reads():
    """A row for every Table 1 cell, and each CE row at its backbone x dataset group's setting (the paper's four
    share one), so that CE is compared on the same footing."""
    chosen = C.read_hyperparameters()
    assert set(chosen) == {tuple(cell.split("/")[1:]) for cell in C.cells("table1", C.DATASETS, C.MODELS)}
    for d in C.DATASETS:
        for m in C.MODELS:
            assert chosen[d, m, "ce"] == chosen[d, m, "bce"] == chosen[d, m, "bpr"] == chosen[d, m, "infonce"]


def test_every_recorded_cell_still_names_its_run_folder(tmp_path, monkeypatch):
    """Run folders are found by the configuration's hash: a new choice (--loss ce) or a new cell must move none of
    the recorded ones (results/cells/*.json, each naming its folder)."""
    for name, *_ in R.BENCHMARKS.values():
        (tmp_path / name).touch()                                             # configure() checks only that it exists
    monkeypatch.setenv("UNIFORM_SEQREC_DATA", str(tmp_path))
    hyperparameters, records = C.read_hyperparameters(), sorted(glob.glob(os.path.join(HERE, "results", "cells",
                                                                                      "*.json")))
    assert records
    for path in records:
        entry = C.read_record(path)
        assert C.run_folder(entry["cell"], entry["seed"], hyperparameters) == entry["run_dir"], path
    # the side studies' runs are folders of their own, none of them a recorded one or their partner's
    studies = C.cells("regime", C.DATASETS, C.MODELS) + C.cells("block", C.DATASETS, C.MODELS)
    folders = {C.run_folder(cell, 1, hyperparameters) for cell in studies}
    partners = {C.run_folder(f"table1/beauty/sasrec/{cell.split('/')[-1]}", 1, hyperparameters) for cell in studies}
    assert len(folders) == len(studies) and None not in folders
    assert not folders & (partners | {C.read_record(path)["run_dir"] for path in records})


@pytest.mark.parametrize("damage, expected", [
    (lambda e: "not json", "is damaged or unreadable"),
    (lambda e: [e], "is damaged (not a JSON object)"),
    (lambda e: {k: v for k, v in e.items() if k != "test"}, "no valid test"),
    (lambda e: {**e, "test": {"HR@10": "high"}}, "no valid test HR@10"),
    (lambda e: {**e, "seed": "1"}, "no valid seed"),
    (lambda e: {**e, "config": {**e["config"], "lr": None}}, "no valid config lr"),
    (lambda e: {**e, "test": [0.1, 0.05]}, "no valid test"),                 # not an object: no AttributeError
    (lambda e: {**e, "config": [1e-3]}, "no valid config"),
])
def test_a_damaged_record_is_one_line_naming_it(tmp_path, monkeypatch, capsys, damage, expected):
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    monkeypatch.setattr(C, "HERE", str(tmp_path))
    write_cell(str(tmp_path), "table1/beauty/sasrec/bce", 1, 0.04, 0.02)
    path = tmp_path / "cells" / "table1__beauty__sasrec__bce-seed1.json"
    damaged = damage(json.loads(path.read_text()))
    path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    monkeypatch.setattr(C, "record_all", lambda: 0)
    assert E.main(["report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and expected in err and "restore it from git" in err


@pytest.mark.parametrize("contents, expected", [
    ("not json\n", "is damaged"),
    ('{"epoch": 1}\n', "line 1 is not an epoch's record"),
    ('{"epoch": 1, "valid_NDCG@10": 0.1}\n[1]\n', "line 2 is not an epoch's record"),
])
def test_a_damaged_log_is_one_line(tmp_path, monkeypatch, capsys, contents, expected):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text(contents)
    monkeypatch.setattr(C, "run_folder", lambda cell, seed, hyperparameters: str(run))
    monkeypatch.setattr(C, "record_all", lambda: 0)
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    assert E.main(["report"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "log.jsonl" in err and expected in err


@pytest.mark.parametrize("metrics, expected", [
    ("{", "is damaged or unreadable"), ("{}", "no valid test"),
    (json.dumps({"test": {}, "valid": {}, "best_epoch": 1, "epochs": 2, "device": "cpu", "config": {}}),
     "no valid test NDCG@10"),
    (json.dumps({"test": [], "valid": {}, "best_epoch": 1, "epochs": 2, "device": "cpu", "config": {}}),
     "no valid test"),                                                         # not an object: no AttributeError
    (json.dumps({"test": {"NDCG@10": 0.1}, "valid": [], "best_epoch": 1, "epochs": 2, "device": "cpu",
                 "config": {}}), "no valid valid"),
    (json.dumps({"test": {"NDCG@10": 0.1}, "valid": {"NDCG@10": 0.1}, "best_epoch": 1, "epochs": 2, "device": "cpu",
                 "config": []}), "no valid config"),
])
def test_a_damaged_metrics_file_is_one_line(tiny_cell, monkeypatch, capsys, metrics, expected):
    run_dir, _ = tiny_cell
    (run_dir / "metrics.json").write_text(metrics)
    assert E.main(["report"]) == 2                                              # the page is written all the same
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("not recorded: table1/beauty/sasrec/uniform seed 1: ")
    assert "metrics.json is damaged" in err and expected in err


@pytest.mark.parametrize("argv, expected", [
    (["run", "table1/beauty/sasrec/bce", "--seed", "0"], "--seed must be from 1 to 20"),
    (["run", "table1/beauty/sasrec/bce", "--seed", "21"], "--seed must be from 1 to 20"),
    (["list", "table1", "--seeds", "-1"], "--seeds must be from 1 to 20"),
    (["list", "table1", "--datasets", "beauty,nope"], "'nope' is not one of beauty"),
    (["list", "table1", "--models", ""], "'' is not one of gru4rec"),
    # issue 33, item 8: rescore of a cell that is no cell, or has no record, printed nothing and exited 0
    (["rescore", "no/such/cell"], "'no/such/cell' is not a cell (`experiments.py list all` prints them); nothing was"),
    (["rescore", "tune/beauty/sasrec/bce/lr=1e-4,dim=64,layers=1"], "has no record in results/cells/; nothing was"),
    (["halving", "--losses", "bce,nope"], "--losses: 'nope' is not one of bce, bpr, infonce, uniform, ce"),
    (["halving", "--losses", "ce,bce,ce"], "--losses names a loss twice (ce,bce,ce)"),
])
def test_an_argument_out_of_range_is_one_line(capsys, argv, expected):
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err


def test_the_readme_cells_are_the_readmes_command_exactly(tmp_path, monkeypatch):
    """Seed 1 of readme/beauty/uniform is what a first-time user's command trains: the same run folder."""
    (tmp_path / "Beauty.txt").write_text("1 1 2 3 4\n")
    monkeypatch.setenv("UNIFORM_SEQREC_DATA", str(tmp_path))
    readme = open(os.path.join(os.path.dirname(E.__file__), "README.md")).read()
    assert "python uniform_seqrec.py --model sasrec --loss uniform --data beauty" in readme
    typed = R.configure(["--model", "sasrec", "--loss", "uniform", "--data", "beauty"])
    assert C.run_folder("readme/beauty/uniform", 1, {("beauty", "sasrec", "uniform"): ["--lr", "1"]}) == typed[1]
    assert typed[0]["lr"] == 3e-4 and typed[0]["seed"] == 42
    assert C.run_folder("readme/beauty/uniform", 2, {}) == R.configure(
        ["--model", "sasrec", "--loss", "uniform", "--data", "beauty", "--seed", "2"])[1]
    assert C.cells("readme", C.DATASETS, C.MODELS) == ["readme/beauty/uniform", "readme/beauty/bce"]
    assert C.cell_arguments("negatives/toys/bce", {}) == [*C.cell_arguments("table1/toys/sasrec/bce", {}),
                                                         "--negatives", "any"]
    assert set(C.cells("readme", C.DATASETS, C.MODELS)) <= set(C.cells("all", C.DATASETS, C.MODELS))


# ----------------------------------------------------------------------------------------------------------------
# What counts as a win: Welch's t-test over the seeds, Student's t from the standard library
# ----------------------------------------------------------------------------------------------------------------

# Upper-tail critical values t(alpha, df) of Student's t distribution, rounded to 3 decimals, from the NIST/SEMATECH
# e-Handbook of Statistical Methods, section 1.3.6.7.2 ("Critical Values of the Student's t Distribution"):
# P(T > t) = alpha, so the two-sided p at t is 2 alpha. Left out: its df 1, alpha 0.001 entry, 318.313, which is
# 0.004 above the exact quantile tan(pi (1/2 - 0.001)) = 318.309 (df 1 is checked against its closed form below).
T_TABLE = {  # df -> {alpha: t}
    1: {0.10: 3.078, 0.05: 6.314, 0.025: 12.706, 0.01: 31.821, 0.005: 63.657},
    2: {0.10: 1.886, 0.05: 2.920, 0.025: 4.303, 0.01: 6.965, 0.005: 9.925, 0.001: 22.327},
    3: {0.10: 1.638, 0.05: 2.353, 0.025: 3.182, 0.01: 4.541, 0.005: 5.841, 0.001: 10.215},
    5: {0.10: 1.476, 0.05: 2.015, 0.025: 2.571, 0.01: 3.365, 0.005: 4.032, 0.001: 5.893},
    10: {0.10: 1.372, 0.05: 1.812, 0.025: 2.228, 0.01: 2.764, 0.005: 3.169, 0.001: 4.144},
    30: {0.10: 1.310, 0.05: 1.697, 0.025: 2.042, 0.01: 2.457, 0.005: 2.750, 0.001: 3.385},
}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_student_t_matches_the_t_table(df):
    for alpha, t in T_TABLE[df].items():
        # the table rounds t to 3 decimals: the exact quantile lies within 0.0005 of it, so p brackets 2 alpha there
        assert P.student_t_two_sided(t + 0.0005, df) < 2 * alpha < P.student_t_two_sided(t - 0.0005, df)


def test_student_t_matches_its_closed_forms():
    """df 1 is the Cauchy distribution, P(|T| >= t) = 1 - 2 atan(t) / pi; df 2 has P(|T| >= t) = 1 - t / sqrt(2 +
    t^2); and I_x(a, 1) = x^a, I_x(1, b) = 1 - (1 - x)^b check both branches of the continued fraction."""
    for t in (0.0, 0.01, 0.3, 1.0, 2.5, 7.0, 40.0, 1e4):
        assert P.student_t_two_sided(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-12, abs=1e-15)
        assert P.student_t_two_sided(-t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-12, abs=1e-15)
    for a in (0.5, 1.0, 3.7, 20.0):
        for x in (0.001, 0.2, 0.5, 0.8, 0.999):
            assert P.incomplete_beta(a, 1.0, x) == pytest.approx(x ** a, rel=1e-12)
            assert P.incomplete_beta(1.0, a, x) == pytest.approx(1 - (1 - x) ** a, rel=1e-12)
    assert P.incomplete_beta(2.0, 3.0, 0.0) == 0.0 and P.incomplete_beta(2.0, 3.0, 1.0) == 1.0
    assert P.student_t_two_sided(math.inf, 3.3) == 0.0


def t_density(x, df):
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (
        1 + x * x / df) ** (-(df + 1) / 2)


def test_student_t_matches_a_brute_force_integral_of_its_density():
    """Welch's degrees of freedom are not whole numbers: P(|T| >= t) = 1 - 2 * integral of the density from 0 to t,
    by Simpson's rule on 4000 intervals."""
    for df in (0.8, 1.3, 2.7, 4.5, 11.2, 37.9):
        for t in (0.05, 0.7, 1.5, 3.0, 8.0):
            n, h = 4000, t / 4000
            simpson = h / 3 * sum((1 if i in (0, n) else 4 if i % 2 else 2) * t_density(i * h, df)
                                  for i in range(n + 1))
            assert P.student_t_two_sided(t, df) == pytest.approx(1 - 2 * simpson, rel=1e-8, abs=1e-12)


def test_welch_is_students_test_where_the_seeds_spread_alike():
    """Equal sizes and equal variances: Welch's t is Student's pooled t and its df is n1 + n2 - 2; and it does not
    change when every value is scaled or shifted alike."""
    first, second = [0.031, 0.034, 0.037], [0.030, 0.027, 0.033]                 # both: sd 0.003
    t, df, p = P.welch(first, second)
    pooled = math.sqrt((statistics_variance(first) + statistics_variance(second)) / 2 * (1 / 3 + 1 / 3))
    assert t == pytest.approx((sum(first) - sum(second)) / 3 / pooled) and df == pytest.approx(4)
    assert p == pytest.approx(P.student_t_two_sided(t, 4))
    scaled = P.welch([10 * x + 1 for x in first], [10 * x + 1 for x in second])
    assert scaled == pytest.approx((t, df, p))
    assert P.welch(second, first) == pytest.approx((-t, df, p))
    assert P.welch([0.03, 0.03], [0.02, 0.02])[2] == 0.0 and P.welch([0.03, 0.03], [0.03, 0.03])[2] == 1.0


def statistics_variance(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def write_group(results, dataset, model, seeds_by_loss):
    for loss, values in seeds_by_loss.items():
        for seed, ndcg in enumerate(values, 1):
            write_cell(results, f"table1/{dataset}/{model}/{loss}", seed, 2 * ndcg, ndcg)


def test_the_rule_says_win_tie_loss_or_not_decided(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    others = {"bce": [0.010, 0.011], "bpr": [0.012]}                              # far below: never the two best
    # clearly separated seeds: a win; overlapping ones: a tie; one seed of the runner-up: not decided; InfoNCE
    # clearly ahead: a loss
    write_group(tmp_path, "beauty", "sasrec", {**others, "uniform": [0.040, 0.041, 0.042],
                                               "infonce": [0.030, 0.031, 0.032]})
    write_group(tmp_path, "toys", "sasrec", {**others, "uniform": [0.040, 0.030, 0.036],
                                             "infonce": [0.034, 0.036, 0.033]})
    write_group(tmp_path, "sports", "sasrec", {**others, "uniform": [0.040, 0.041, 0.042], "infonce": [0.030]})
    write_group(tmp_path, "yelp", "sasrec", {**others, "uniform": [0.020, 0.021], "infonce": [0.030, 0.031]})
    write_group(tmp_path, "yelp", "caser", {**others, "uniform": [0.005], "infonce": [0.020, 0.021, 0.022]})
    lines = P.claims()
    verdict = lambda group: next(line for line in lines if line.startswith(f"  - {group}: ")).split(": ", 1)[1]
    assert verdict("sasrec on beauty").startswith("win (uniform 0.0410 ± 0.0010, 3 seeds; infonce 0.0310 ± 0.0010, "
                                                  "3 seeds; Welch's t 12.25, df 4.0, p ")
    assert verdict("sasrec on toys").startswith("tie (uniform 0.0353 ± 0.0050, 3 seeds; infonce 0.0343 ± 0.0015, ")
    assert verdict("sasrec on sports") == "not decided: one seed (uniform 0.0410 ± 0.0010, 3 seeds; infonce 0.0300, " \
                                          "1 seed)"
    assert verdict("sasrec on yelp").startswith("loss (infonce 0.0305 ± 0.0007, 2 seeds; uniform 0.0205 ± 0.0007, ")
    # the uniformity loss last: shown after the two best; BPR (one seed) is the runner-up, so not decided
    assert verdict("caser on yelp") == ("not decided: one seed (infonce 0.0210 ± 0.0010, 3 seeds; bpr 0.0120, 1 seed; "
                                        "uniform 0.0050, 1 seed)")
    assert "win in 1, tie in 1, loss in 1 of 5 complete groups; not decided (one seed) in 2" in lines[0]
    assert "p < 0.05 a win, else a tie" in lines[0]
    p = float(verdict("sasrec on beauty").split(" p ")[1].rstrip(")"))
    assert p < P.LEVEL and p == pytest.approx(P.welch([0.040, 0.041, 0.042], [0.030, 0.031, 0.032])[2], rel=0.03)


def test_a_records_machine_is_shown_and_never_guessed(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS", str(tmp_path))
    write_cell(tmp_path, "table1/beauty/sasrec/bce", 1, 0.05, 0.02)               # an old record: no machine
    write_cell(tmp_path, "table1/beauty/sasrec/bpr", 1, 0.05, 0.02)
    path = C.record_path("table1/beauty/sasrec/bpr", 1)
    entry = json.loads(open(path).read())
    metrics = {"device_settings": {"device": "cpu", "torch": "2.13.0", "threads": 1, "cpu": "Some CPU 1234",
                                   "cpu_capability": "AVX2"}}
    open(path, "w").write(json.dumps({**entry, "machine": C.machine_of(metrics)}))
    P.report(str(tmp_path / "RESULTS.md"))
    page = (tmp_path / "RESULTS.md").read_text()
    assert "| 5 / 25 | cpu | machine not recorded | 10 min |" in page
    assert "| 5 / 25 | cpu | Some CPU 1234, AVX2, torch 2.13.0, 1 thread | 10 min |" in page
    gpu = {"device": "cuda", "torch": "2.13.0", "threads": 16, "cpu": "Some CPU", "name": "Some GPU"}
    assert P.machine_label(C.machine_of({"device_settings": gpu})) == "Some GPU, torch 2.13.0"
    before = {"device": "cpu", "torch": "2.13.0", "threads": 2}                   # metrics.json before the CPU model
    assert P.machine_label(C.machine_of({"device_settings": before})) == "cpu (model not recorded), torch 2.13.0, " \
                                                                          "2 threads"
    assert C.machine_of({}) is None


# ----------------------------------------------------------------------------------------------------------------
# Successive halving over the tuning grid (tuning.py, `experiments.py halving`)
# ----------------------------------------------------------------------------------------------------------------

import tuning as T  # noqa: E402


def test_halving_trains_each_rung_recording_the_final_run_and_a_second_call_trains_nothing(tmp_path, monkeypatch,
                                                                                          capsys):
    """The real runner on a small file named Beauty.txt, rungs to epoch 1 and 2 and runs of at most 4 epochs: the
    rungs' runs pause in the grid points' own folders, the best advance, the chosen one's run finishes and is
    recorded; the command again trains nothing; and without the run folders its table reads the same from
    results/."""
    data = small_beauty_checkout(tmp_path, monkeypatch, seed=4, users=60)
    monkeypatch.setattr(T, "RUNG_EPOCHS", (1, 2, None))
    arguments = C.cell_arguments
    monkeypatch.setattr(C, "cell_arguments", lambda cell, h: [*arguments(cell, h), "--epochs", "4", "--device", "cpu"])
    grid = C.tuning_grid("beauty", "sasrec", "bce")
    assert E.main(["halving", "--losses", "bce"]) == 0
    out = capsys.readouterr().out
    folders = [C.run_folder(cell, 1, {}) for cell in grid]
    epochs = [T.read_point(cell, folder)["epochs"] for cell, folder in zip(grid, folders)]
    finished = [os.path.isfile(os.path.join(folder, "metrics.json")) for folder in folders]
    assert sorted(epochs) == [1] * 8 + [2] * 3 + [max(epochs)] and finished.count(True) == 1, epochs
    chosen = grid[finished.index(True)]
    assert "paused after epoch 1" in out and "paused after epoch 2" in out
    record = C.read_record(C.record_path(chosen, 1))
    assert record["cell"] == chosen and set(record["protocols"]) == set(U.PROTOCOLS)
    saved = json.loads((tmp_path / "results" / "halving" / "beauty-sasrec-bce.json").read_text())
    assert saved["chosen"] == chosen and saved["epochs_spent"] == sum(epochs) and saved["finished"]
    table = T.tables("beauty", "sasrec", ["bce"])
    assert f"chosen: {chosen.split('/')[-1]}; {sum(epochs)} epochs trained, all grid points together" in table
    P.report(str(tmp_path / "with.md"))                                   # the results page: one row more, no more
    os.rename(C.record_path(chosen, 1), tmp_path / "record.json")
    P.report(str(tmp_path / "without.md"))
    os.rename(tmp_path / "record.json", C.record_path(chosen, 1))
    with_record, without = ((tmp_path / f"{n}.md").read_text().splitlines() for n in ("with", "without"))
    added = [line for line in with_record if line not in without]
    assert len(with_record) == len(without) + 1 and len(added) == 1 and added[0].startswith(f"| {chosen} | 1 | ")
    assert with_record.index(added[0]) > with_record.index("## Runs behind the cells")
    monkeypatch.setattr(R, "main", lambda argv, commit=None: pytest.fail(f"trained again: {argv}"))
    assert E.main(["halving", "--losses", "bce"]) == 0
    assert T.tables("beauty", "sasrec", ["bce"]) == table
    shutil.rmtree(tmp_path / "runs")
    assert T.tables("beauty", "sasrec", ["bce"]) == table                     # from results/ alone
    assert E.main(["halving", "--losses", "bce"]) == 0                        # not trained again either
    assert "finished before, as results/halving/beauty-sasrec-bce.json says" in capsys.readouterr().out


def fake_point(folder, ndcgs, finished=False, stopped=None):
    """A grid point's run folder by hand: log.jsonl with one row per validation NDCG@10 (epochs 1, 2, ...), and a
    metrics.json (both protocols) when its run has finished, saying why it stopped when non-finite numbers ended it
    (stopped: "non-finite loss at epoch 3, step 2")."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.write("".join(json.dumps({"epoch": e, "valid_NDCG@10": v}) + "\n" for e, v in enumerate(ndcgs, 1)))
    if not finished and os.path.exists(os.path.join(folder, "metrics.json")):
        os.remove(os.path.join(folder, "metrics.json"))
    if finished:
        best = max(range(len(ndcgs)), key=lambda e: (ndcgs[e], -e)) + 1
        test = {k: 0.01 * best for k in T.METRICS}
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump({"test": test, "valid": {"NDCG@10": max(ndcgs)}, "best_epoch": best, "epochs": len(ndcgs),
                       "device": "cpu", "config": {"mask_seen": False},
                       "protocols": {"all_items": {"test": test}, "history_excluded": {"test": {
                           k: v / 2 for k, v in test.items()}}}, **({"stopped": stopped} if stopped else {})}, f)


@pytest.fixture
def fake_grid(tmp_path, monkeypatch):
    """The grid points of beauty/sasrec/bce in folders under tmp_path (C.run_folder), results/ there too; returns
    (grid, folders)."""
    grid = C.tuning_grid("beauty", "sasrec", "bce")
    folders = {cell: str(tmp_path / "runs" / f"point{i}") for i, cell in enumerate(grid)}
    monkeypatch.setattr(C, "run_folder", lambda cell, seed, hyperparameters: folders.get(cell, str(tmp_path / "none")))
    monkeypatch.setattr(C, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(C, "HERE", str(tmp_path))
    return grid, [folders[cell] for cell in grid]


def test_halving_advances_the_best_within_each_rungs_epochs_and_breaks_ties_by_grid_order(fake_grid):
    """Rung 2 takes the best 4 of 12 by their best validation NDCG@10 in epochs 1-6: a point that is better only at
    epoch 7 stays out, a tie at the cut goes to the earlier grid point, and a run that early stopping ended at
    epoch 4 has done the rung. Rung 3 takes the best of those 4 in epochs 1-24, a tie to the earlier point."""
    grid, folders = fake_grid
    rung1 = [.10, .30, .20, .05, .25, .05, .15, .35, .12, .20, .09, .08]    # 2 and 9 tie at the cut
    for i, best in enumerate(rung1):
        fake_point(folders[i], [best / 2] * 5 + [best] + ([.99, .99] if i == 10 else []), finished=False)
    fake_point(folders[3], [.05, .01, .01, .01], finished=True)             # early-stopped before epoch 6
    found = T.standing("beauty", "sasrec", "bce", [T.read_point(c, f) for c, f in zip(grid, folders)])
    assert [r["points"] for r in found["rungs"]] == [list(range(12)), [7, 1, 4, 2]]
    assert [r["done"] for r in found["rungs"]] == [True, False] and found["chosen"] is None
    assert found["points"][10]["best"] == [.09, None] and found["points"][7]["best"] == [.35, .35]
    assert found["epochs_spent"] == 10 * 6 + 8 + 4
    for i, best in ((7, .40), (1, .50), (4, .45), (2, .50)):                 # 1 and 2 tie: 1 goes on
        fake_point(folders[i], [rung1[i]] * 6 + [best] * 18 + ([.99] if i == 4 else []))
    found = T.standing("beauty", "sasrec", "bce", [T.read_point(c, f) for c, f in zip(grid, folders)])
    assert [r["points"] for r in found["rungs"]][1:] == [[7, 1, 4, 2], [1]] and found["chosen"] == grid[1]
    assert not found["finished"]
    fake_point(folders[1], [rung1[1]] * 6 + [.50] * 18 + [.6] * 3, finished=True)
    found = T.standing("beauty", "sasrec", "bce", [T.read_point(c, f) for c, f in zip(grid, folders)])
    assert found["finished"] and found["points"][1]["best"] == [.30, .50, .6]


def test_halving_trains_only_what_each_rung_lacks_and_a_second_call_nothing(fake_grid, monkeypatch, capsys):
    """The scheduler with a stand-in runner that writes log rows (grid point i scores i / 100 + epoch / 10000, so
    the last points advance): rung 1 trains the points not yet at epoch 6 (one is there, one half-way), rung 2 the
    best 4 to epoch 24, rung 3 the best to the end; the final run is recorded and the table saved; the same call
    again trains nothing and gives the same table."""
    grid, folders = fake_grid
    score = lambda i, epochs: [i / 100 + e / 10000 for e in range(1, epochs + 1)]
    fake_point(folders[0], score(0, 6))
    fake_point(folders[5], score(5, 3))
    calls, recorded = [], []

    def run_cell(cell, seed, device, pause_after=None):
        calls.append((grid.index(cell), pause_after))
        i = grid.index(cell)
        fake_point(folders[i], score(i, pause_after or 30), finished=pause_after is None)
        return 0
    monkeypatch.setattr(C, "run_cell", run_cell)
    monkeypatch.setattr(C, "record", lambda cell, seed, run_dir: recorded.append((cell, seed, run_dir)))
    assert T.halving("beauty", "sasrec", ["bce"]) == 0
    assert calls == [(i, 6) for i in range(1, 12) if i != 0] + [(i, 24) for i in (11, 10, 9, 8)] + [(11, None)]
    assert recorded == [(grid[11], 1, folders[11])]
    saved = json.loads(open(T.saved_path("beauty", "sasrec", "bce")).read())
    assert saved["chosen"] == grid[11] and saved["epochs_spent"] == 8 * 6 + 3 * 24 + 30
    out = capsys.readouterr().out
    assert "rung 1 (to epoch 6), 12 of 12 grid points, 11 to train" in out
    table = T.tables("beauty", "sasrec", ["bce"])
    calls.clear()
    assert T.halving("beauty", "sasrec", ["bce"]) == 0 and calls == []
    assert "finished before, as results/halving/beauty-sasrec-bce.json says" in capsys.readouterr().out
    assert T.tables("beauty", "sasrec", ["bce"]) == table


def test_a_finished_halving_whose_run_folders_are_partly_gone_reads_its_saved_table(fake_grid, monkeypatch, capsys):
    """Its table saved in results/halving/, a finished halving with some of its run folders gone trains nothing and
    reports as saved (not a halving started over); folders that show the same grid further along (the chosen run
    trained on) are reported as they stand."""
    grid, folders = fake_grid
    score = lambda i, epochs: [i / 100 + e / 10000 for e in range(1, epochs + 1)]

    def run_cell(cell, seed, device, pause_after=None):
        i = grid.index(cell)
        fake_point(folders[i], score(i, pause_after or 30), finished=pause_after is None)
        return 0
    monkeypatch.setattr(C, "run_cell", run_cell)
    monkeypatch.setattr(C, "record", lambda cell, seed, run_dir: None)
    assert T.halve("beauty", "sasrec", "bce") == 0
    table = T.tables("beauty", "sasrec", ["bce"])
    fake_point(folders[11], score(11, 40), finished=True)                    # trained on: 10 epochs more
    assert "| lr=3e-4,dim=128,layers=2 | 40 (finished) | 0.1106 | 0.1124 | 0.1140 |" in T.tables(
        "beauty", "sasrec", ["bce"])
    fake_point(folders[11], score(11, 30), finished=True)
    for folder in folders[:6] + folders[9:11]:
        shutil.rmtree(folder)
    monkeypatch.setattr(C, "run_cell", lambda *args, **kwargs: pytest.fail("trained a finished halving again"))
    assert T.halve("beauty", "sasrec", "bce") == 0
    assert "its run folders show it no further along: nothing to train" in capsys.readouterr().out
    assert T.tables("beauty", "sasrec", ["bce"]) == table
    assert E.main(["halving", "--losses", "bce", "--report"]) == 0 and "\n".join(table) in capsys.readouterr().out


def test_halving_stops_before_the_next_rung_when_a_run_failed_or_another_process_holds_one(fake_grid, monkeypatch,
                                                                                          capsys):
    """A failed run leaves the rung's other runs to train, and stops the loss before choosing; so does a run that
    another process is training (run_cell leaves it to that process, exit 0). Ctrl-C in a run stops everything."""
    grid, folders = fake_grid
    trained = []

    def run_cell(cell, seed, device, pause_after=None):
        i = grid.index(cell)
        trained.append(i)
        if i == 2:
            return 1
        if i != 5:                                                            # 5: another process has it
            fake_point(folders[i], [i / 100] * pause_after)
        return 0
    monkeypatch.setattr(C, "run_cell", run_cell)
    monkeypatch.setattr(C, "record", lambda *args: pytest.fail("recorded an unfinished halving"))
    assert T.halve("beauty", "sasrec", "bce") == 1
    assert trained == list(range(12))
    assert capsys.readouterr().err.split("] ", 1)[1] == (
        f"halving beauty/sasrec/bce: rung 1 is not done: 1 failed (their lines above say why): {grid[2]} (exit 1); "
        f"1 is being trained by another process: {grid[5]}; the same command continues from there\n")
    trained.clear()
    assert T.halve("beauty", "sasrec", "bce") == 1 and trained == [2, 5]     # the rest are done
    monkeypatch.setattr(C, "run_cell", lambda cell, seed, device, pause_after=None: 130)
    assert E.main(["halving", "--losses", "bce,bpr"]) == 130
    assert capsys.readouterr().err.endswith("experiments.py: interrupted (a training keeps its last finished epoch; "
                                            "run the same command to resume)\n")


def stop_point(folder, ndcgs, epoch):
    """A grid point whose run stopped on a non-finite loss at `epoch`, as uniform_seqrec.py leaves it: after an
    epoch, a finished run (metrics.json says why); in the first, stopped.json and no rows. `ndcgs`: the rows before."""
    fake_point(folder, ndcgs, finished=epoch > 1, stopped=f"non-finite loss at epoch {epoch}, step 2")
    if epoch == 1:
        with open(os.path.join(folder, "stopped.json"), "w") as f:
            json.dump({"reason": "non-finite loss", "epoch": 1, "error": "non-finite loss at epoch 1, step 2"}, f)


def test_stopped_points_are_done_for_every_rung_with_rows_ranked_as_any_and_without_last(fake_grid):
    """The pure functions: a point stopped at epoch 3 (finished, 2 rows) is done for every rung and ranked by its rows
    (here the best of rung 1, so it goes on and is chosen); one stopped at epoch 1 (no rows) is done for every rung
    and ranked last, with points that have no rows either; a marker of epoch 3 beside 2 rows without metrics.json (as
    uniform_seqrec.py left such runs before it tested them) is not done, since training it again finishes it; a
    marker that the log has passed (a kill before it was removed) is not read."""
    grid, folders = fake_grid
    stop_point(folders[0], [.5, .6], epoch=3)
    stop_point(folders[1], [], epoch=1)
    fake_point(folders[2], [.1] * 6)
    read = lambda: [T.read_point(c, f) for c, f in zip(grid, folders)]
    points = read()
    assert points[0]["finished"] and points[0]["stopped"] is None and points[0]["epochs"] == 2
    assert points[1]["stopped"] == "non-finite loss at epoch 1" and points[1]["epochs"] == 0
    assert all(T.has_done(points[i], last) for i in (0, 1) for last in T.RUNG_EPOCHS)
    assert not T.has_done(points[3], 6)                                      # not started
    assert T.ranked(points, list(range(4)), 6) == [0, 2, 1, 3]              # no rows: last, in grid order
    for i in range(3, 12):
        fake_point(folders[i], [.2] * 24)
    found = T.standing("beauty", "sasrec", "bce", read())
    assert [r["points"] for r in found["rungs"]] == [list(range(12)), [0, 3, 4, 5], [0]]
    assert found["chosen"] == grid[0] and found["finished"]
    assert found["points"][1] == {"cell": grid[1], "epochs": 0, "finished": False,
                                  "stopped": "non-finite loss at epoch 1", "best": [None, None, None]}
    os.remove(os.path.join(folders[0], "metrics.json"))                      # before: a marker, no result
    with open(os.path.join(folders[0], "stopped.json"), "w") as f:
        json.dump({"reason": "non-finite loss", "epoch": 3, "error": "non-finite loss at epoch 3, step 2"}, f)
    points = read()
    assert points[0]["stopped"] == "non-finite loss at epoch 3" and not T.has_done(points[0], 6)
    assert T.rungs_of(points)[0]["done"] is False
    fake_point(folders[0], [.5, .6, .7])                                     # the log has passed the marker
    assert read()[0]["stopped"] is None


@pytest.mark.parametrize("chosen_stops", [False, True], ids=["another point", "the chosen point"])
def test_a_run_stopped_by_a_non_finite_loss_is_done_for_every_rung(fake_grid, monkeypatch, capsys, chosen_stops):
    """Runs as uniform_seqrec.py ends them on a non-finite loss: point 3 in its first epoch (exit 1, stopped.json, no
    rows: done for every rung, ranked last, a line says so), point 11 at epoch 3 (exit 0, finished with its best
    state tested: ranked by its two rows; when they are the best of rung 1 it goes on, is chosen and recorded as any
    finished point); its table row says where it stopped, the stopped one's and the final run's line why."""
    grid, folders = fake_grid
    stops = {3: 1, 11: 3}                                                     # grid point -> the epoch it stops at
    score = lambda i, epochs: [(i if i != 11 or chosen_stops else 0) / 100 + e / 10000 for e in range(1, epochs + 1)]
    calls, recorded = [], []

    def run_cell(cell, seed, device, pause_after=None):
        i = grid.index(cell)
        calls.append(i)
        if i in stops:
            stop_point(folders[i], score(i, stops[i] - 1), stops[i])
            return 1 if stops[i] == 1 else 0
        fake_point(folders[i], score(i, pause_after or 30), finished=pause_after is None)
        return 0
    monkeypatch.setattr(C, "run_cell", run_cell)
    monkeypatch.setattr(C, "record", lambda cell, seed, run_dir: recorded.append(cell))
    assert T.halve("beauty", "sasrec", "bce") == 0
    assert calls == list(range(12)) + ([10, 9, 8] if chosen_stops else [10, 9, 8, 7, 10])
    err = capsys.readouterr().err
    assert err.split("] ", 1)[1] == (f"halving beauty/sasrec/bce: {grid[3]} stopped: non-finite loss at epoch 1; "
                                     f"with no epoch to test, it counts as done for every rung and ranks last "
                                     f"(resuming it stops it there again)\n")
    assert recorded == [grid[11] if chosen_stops else grid[10]]
    table = T.tables("beauty", "sasrec", ["bce"])
    assert "| lr=1e-4,dim=128,layers=2 | 0 (stopped: non-finite loss at epoch 1) |  |  |  |" in table
    row = f"| lr=3e-4,dim=128,layers=2 | 2 (finished) | {0.1102 if chosen_stops else 0.0002}"
    assert any(line.startswith(row) for line in table), table
    assert any(line.startswith("its run: best epoch 2 of 2 (training stopped: non-finite loss at epoch 3, step 2)")
               for line in table) == chosen_stops


def test_a_halving_whose_every_point_stops_in_its_first_epoch_ends_with_one_line(fake_grid, monkeypatch, capsys):
    """Only when no grid point has a validated epoch is a point without one chosen: the halving says so in one line
    and exits 1, records nothing, and the same call again trains nothing and ends the same way."""
    grid, folders = fake_grid
    calls = []

    def run_cell(cell, seed, device, pause_after=None):
        calls.append(cell)
        stop_point(folders[grid.index(cell)], [], epoch=1)
        return 1
    monkeypatch.setattr(C, "run_cell", run_cell)
    monkeypatch.setattr(C, "record", lambda *args: pytest.fail("recorded a run with no result"))
    for trained in (grid, []):
        calls.clear()
        assert T.halve("beauty", "sasrec", "bce") == 1 and calls == trained
        last = capsys.readouterr().err.splitlines()[-1].split("] ", 1)[1]
        assert last == (f"halving beauty/sasrec/bce: no grid point has a validated epoch (the chosen point {grid[0]} "
                        f"stopped: non-finite loss at epoch 1), so there is no result to record; the same command "
                        f"ends the same way (its run stops there again)")
    assert not os.path.exists(T.saved_path("beauty", "sasrec", "bce"))
    assert any(line.startswith(f"chosen: {T.point_name(grid[0])} (stopped: non-finite loss at epoch 1; no test "
                               f"result)") for line in T.tables("beauty", "sasrec", ["bce"]))


@pytest.mark.parametrize("finished", [False, True], ids=["paused", "finished"])
def test_a_damaged_log_of_a_grid_point_names_the_command_that_rewrites_it(tmp_path, capsys, finished):
    """A grid point's damaged log.jsonl stops the halving with a one-line error whose command rewrites it from the
    checkpoint, training nothing: the paused run resumed with --pause-after 1, the finished one re-tested."""
    g = random.Random(5)
    data = tmp_path / "small.txt"
    data.write_text("".join(f"{u} " + " ".join(str(g.randint(1, 25)) for _ in range(7)) + "\n" for u in range(1, 41)))
    run = str(tmp_path / "run")
    pause = [] if finished else ["--pause-after", "2"]
    assert R.main(["--data", str(data), "--model", "sasrec", "--dim", "16", "--layers", "1", "--heads", "1",
                   "--device", "cpu", "--epochs", "2" if finished else "4", "--out", run, *pause]) == 0
    rows = T.read_point("cell", run)["rows"]
    with open(os.path.join(run, "log.jsonl"), "a") as f:
        f.write("{not json\n")
    with pytest.raises(R.RunFolderError) as error:
        T.read_point("cell", run)
    message = str(error.value)
    assert message.startswith(f"{run}/log.jsonl is damaged (") and "\n" not in message
    command = message.split("python uniform_seqrec.py ", 1)[1].split(" (which")[0].split()
    if finished:
        assert f"remove {run}/metrics.json, then" in message
        os.remove(os.path.join(run, "metrics.json"))
    assert command == ["--resume", run] + ([] if finished else ["--pause-after", "1"])
    capsys.readouterr()
    assert R.main(command) == 0
    assert ("test (best epoch" if finished else "paused after epoch 2") in capsys.readouterr().out
    assert T.read_point("cell", run)["rows"] == rows and T.read_point("cell", run)["finished"] == finished


def test_the_halving_table_shows_each_rung_the_choice_and_both_protocols(fake_grid, capsys):
    grid, folders = fake_grid
    for i in range(12):
        fake_point(folders[i], [i / 100] * (24 if i >= 8 else 6))
    fake_point(folders[11], [.11] * 24 + [.2] + [.1] * 20, finished=True)    # best epoch 25 of 45
    assert E.main(["halving", "--losses", "bce,ce", "--report"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "## beauty sasrec bce: finished" in out and "## beauty sasrec ce: not started" in out
    assert "| grid point | epochs | rung 1 (to epoch 6) | rung 2 (to epoch 24) | rung 3 (to early stopping) |" in out
    assert "| lr=1e-4,dim=64,layers=1 | 6 | 0.0000 |  |  |" in out
    assert "| lr=3e-4,dim=128,layers=1 | 24 | 0.1000 | 0.1000 |  |" in out
    assert "| lr=3e-4,dim=128,layers=2 | 45 (finished) | 0.1100 | 0.1100 | 0.2000 |" in out
    assert f"chosen: lr=3e-4,dim=128,layers=2; {8 * 6 + 3 * 24 + 45} epochs trained, all grid points together" in out
    assert "its run: best epoch 25 of 45; test:" in out
    assert "- every item ranked: HR@5 0.2500  NDCG@5 0.2500  HR@10 0.2500  NDCG@10 0.2500  HR@20 0.2500  " \
           "NDCG@20 0.2500" in out
    assert "- the history's items excluded: HR@5 0.1250  NDCG@5 0.1250  HR@10 0.1250  NDCG@10 0.1250  " \
           "HR@20 0.1250  NDCG@20 0.1250" in out
    assert out[-2:] == ["| bce | lr=3e-4,dim=128,layers=2 | 165 | 25 / 45 | 0.2500 / 0.2500 | 0.1250 / 0.1250 |",
                        "| ce | not started |  |  |  |  |"]
    fake_point(folders[11], [.11] * 24 + [.2])                                # still training in rung 3
    assert E.main(["halving", "--losses", "bce", "--report"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "## beauty sasrec bce: in rung 3 (to early stopping), 0 of its 1 grid points done" in out
    assert out[-1] == "| bce | lr=3e-4,dim=128,layers=2 | 145 |  |  |  |"


def test_halving_without_its_data_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UNIFORM_SEQREC_DATA", str(tmp_path))                # no data files there
    monkeypatch.setattr(C, "run_cell", lambda *args, **kwargs: pytest.fail("trained without its data"))
    assert E.main(["halving", "--dataset", "toys"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("experiments.py: error: ") and "Toys_and_Games.txt not found" in error
    assert error.count("\n") == 1


@pytest.mark.parametrize("contents", ["not json", "[]", '{"points": [], "rungs": []}'])
def test_a_damaged_halving_table_is_one_line(fake_grid, capsys, contents):
    path = T.saved_path("beauty", "sasrec", "bce")                          # no run folders: the report reads it
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write(contents)
    assert E.main(["halving", "--losses", "bce", "--report"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"experiments.py: error: {path} is damaged") and error.count("\n") == 1
    assert "restore it from git" in error
