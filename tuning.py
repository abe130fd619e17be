"""Successive halving over the tuning grid: one backbone on one dataset, loss by loss, each loss's 12 grid points
(cells.tuning_grid: lr {1e-4, 2e-4, 3e-4} x dim {64, 128} x layers = heads {1, 2}) trained in rungs of growing
length, the best of each rung trained further, and the best one to early stopping.

    python experiments.py halving                          # Beauty, SASRec: BCE, BPR, the uniformity loss, CE
    python experiments.py halving --losses uniform,ce      # some of them, in this order
    python experiments.py halving --report                 # each loss's table so far; trains nothing

The schedule (RUNG_EPOCHS): rung 1 trains every grid point to epoch 6, rung 2 the best third of the grid (4 of 12)
to epoch 24, rung 3 the best one to early stopping (patience 20, at most 300 epochs: the defaults). "Best" is the
best validation NDCG@10 within the rung just done (epochs 1-6, then 1-24, from each run folder's log.jsonl), so
that a point trained further before (by `./run_all.sh tune`, say) is judged on the same epochs as the others; a tie
goes to the earlier grid point (lr, then dim, then layers rising). The budget, the same for every loss: 12 x 6 +
4 x 18 = 144 epochs for rungs 1 and 2, and the final run's epochs past 24, at most 276: at most 420 epochs a loss.
Caser's grid has 6 points (no depth; advancing: 6, 2, 1): 6 x 6 + 2 x 18 = 72 in rungs 1 and 2, at most 348.

Each grid point is its tuning cell's own run (seed 1, trained through cells.run_cell as `experiments.py run` trains
it): a rung trains with uniform_seqrec.py's --pause-after, which leaves the run paused at the rung's last epoch, and
the next rung resumes it in the same folder. A point has done a rung when its folder has trained that far or its run
has finished (early stopping may end it sooner, and so may a non-finite loss after its first epoch: uniform_seqrec.py
then tests its best state) or stopped on a non-finite loss in its first epoch (its folder's stopped.json: it would
stop there again, so it is done for every rung, with no rows, ranked last). Resumable and idempotent: the
command again continues where it stopped, and trains nothing once every rung is done. A loss's finished final run
is recorded as its tuning cell's record (results/cells/, as `report` records a table's cell), and its table as
results/halving/<dataset>-<model>-<loss>.json: both outlive the run folders (the saved table stands for them, in
the report and for training, unless they show the grid further along). results/RESULTS.md shows neither but
the record's line among the runs behind the cells.
"""
import json
import math
import os
import sys
import time

import cells as C
import runs as R

DATASET, MODEL = "beauty", "sasrec"
LOSSES = ["bce", "bpr", "uniform", "ce"]        # issue 35: the paper's BCE and BPR, its uniformity loss, and CE
RUNG_EPOCHS = (6, 24, None)                     # the last epoch each rung trains to; None: to early stopping
SHARE = 3                                       # a rung after the first trains the best 1/SHARE of the grid
SEED = 1                                        # the tuning runs' seed (`choose` reads seed 1 too)
METRICS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")


# ---------------------------------------------------------------------------------------------------------------
# Who advances: pure functions of the grid points' logs
# ---------------------------------------------------------------------------------------------------------------

def advancing(grid_size, rung):
    """How many grid points train in a rung (0-based): all in the first, then the best third of the grid (rounded
    up: SASRec's 12 -> 4, Caser's 6 -> 2), and one in the last."""
    return 1 if rung == len(RUNG_EPOCHS) - 1 else math.ceil(grid_size / SHARE ** rung)


def best_within(rows, last_epoch):
    """The best validation NDCG@10 of a run's log rows up to last_epoch (None: all of them); None without any."""
    values = [row["valid_NDCG@10"] for row in rows if last_epoch is None or row["epoch"] <= last_epoch]
    return max(values) if values else None


def has_done(point, last_epoch):
    """Whether a grid point has done a rung that trains to last_epoch (None: to early stopping): its run has
    finished (early stopping or non-finite numbers may end it before last_epoch), or stopped on non-finite numbers
    in its first epoch (done for every rung: its epochs re-seed from (seed, epoch), so it stops there again), or it
    has trained that far (paused there, or beyond). A marker of a later epoch (stopped.json as uniform_seqrec.py
    wrote it before it tested such runs) does not count: training the point again finishes it."""
    return bool(point["finished"] or (point.get("stopped") and not point["epochs"])
                or (last_epoch is not None and point["epochs"] >= last_epoch))


def ranked(points, indices, last_epoch):
    """indices (into points), best first by their best validation NDCG@10 up to last_epoch; ties, and points with
    no epoch yet (last), in grid order: the same folders always give the same order."""
    best = {i: best_within(points[i]["rows"], last_epoch) for i in indices}
    return sorted(indices, key=lambda i: (best[i] is None, -(best[i] or 0.0), i))


def rungs_of(points):
    """The rungs opened so far: [{"epochs": the rung's last epoch, "points": the indices of the grid points that
    train in it (the first: all; then the best of the rung before, best first), "done": whether all have done it}].
    A rung opens when the one before is done."""
    opened, cohort = [], list(range(len(points)))
    for rung, last_epoch in enumerate(RUNG_EPOCHS):
        if rung:
            cohort = ranked(points, cohort, RUNG_EPOCHS[rung - 1])[:advancing(len(points), rung)]
        done = all(has_done(points[i], last_epoch) for i in cohort)
        opened.append({"epochs": last_epoch, "points": cohort, "done": done})
        if not done:
            break
    return opened


def standing(dataset, model, loss, points):
    """A loss's halving as its table shows it, JSON-ready (results/halving/ keeps it): each grid point's epochs and
    its best validation NDCG@10 in each rung it trained in (None in the others), the rungs, the chosen cell (once
    the last rung has opened), whether its run has finished, and the epochs of every grid point's run together."""
    rungs = rungs_of(points)
    last = len(rungs) == len(RUNG_EPOCHS)
    return {"dataset": dataset, "model": model, "loss": loss, "seed": SEED, "rung_epochs": list(RUNG_EPOCHS),
            "points": [{"cell": p["cell"], "epochs": p["epochs"], "finished": p["finished"], "stopped": p["stopped"],
                        "best": [best_within(p["rows"], r["epochs"]) if i in r["points"] else None for r in rungs]}
                       for i, p in enumerate(points)],
            "rungs": rungs, "chosen": points[rungs[-1]["points"][0]]["cell"] if last else None,
            "finished": last and rungs[-1]["done"], "epochs_spent": sum(p["epochs"] for p in points)}


# ---------------------------------------------------------------------------------------------------------------
# The run folders, and the saved table
# ---------------------------------------------------------------------------------------------------------------

def run_folders(grid):
    """The run folder of each grid point; a one-line ConfigError when the dataset's file is missing."""
    folders = [C.run_folder(cell, SEED, {}) for cell in grid]
    if None in folders:                          # configure says why in one line, with the command that gets the file
        R.configure(C.cell_arguments(grid[folders.index(None)], {}))
    return folders


def read_point(cell, run_dir):
    """A grid point as the functions above read it: its log's epochs and validation NDCG@10 (none without a
    folder), how many epochs it has trained, whether its run has finished (metrics.json), and why it stopped, if
    non-finite numbers stopped it before it could be tested (stopped.json, written by uniform_seqrec.py: "non-finite
    loss at epoch 1"), else None. A marker that its log or metrics.json has superseded (left by a kill, or by code
    from before) is not read."""
    finished = bool(run_dir) and os.path.isfile(os.path.join(run_dir, "metrics.json"))
    rewrite = (f"rewrite it from the run's checkpoint: remove {os.path.join(run_dir, 'metrics.json')}, then "
               f"python uniform_seqrec.py --resume {run_dir} (which tests its best state again, training nothing)"
               if finished else f"rewrite it from the run's checkpoint: python uniform_seqrec.py --resume {run_dir} "
               f"--pause-after 1 (which pauses at once, training nothing)") if run_dir else ""
    rows = [{"epoch": r["epoch"], "valid_NDCG@10": r["valid_NDCG@10"]} for r in C.read_log(run_dir, rewrite) or []]
    epochs = max((r["epoch"] for r in rows), default=0)
    return {"cell": cell, "rows": rows, "epochs": epochs, "finished": finished,
            "stopped": None if finished else stopped_reason(run_dir, epochs)}


def read_points(grid, folders):
    """read_point of every grid point, in grid order."""
    return [read_point(cell, folder) for cell, folder in zip(grid, folders)]


def stopped_reason(run_dir, epochs=0):
    """'non-finite loss at epoch 1' when the run folder's stopped.json says so of an epoch past `epochs` (those its
    log holds), else None."""
    path = run_dir and os.path.join(run_dir, "stopped.json")
    if not path or not os.path.isfile(path):
        return None
    marker = R.read_json(path, "remove it: resuming the run writes it again if the run stops again")
    if not (isinstance(marker, dict) and isinstance(marker.get("reason"), str) and isinstance(marker.get("epoch"),
                                                                                            int)):
        raise R.RunFolderError(f"{path} is damaged; remove it: resuming the run writes it again if the run stops "
                               f"again")
    return f"{marker['reason']} at epoch {marker['epoch']}" if marker["epoch"] > epochs else None


def saved_path(dataset, model, loss):
    return os.path.join(C.RESULTS, "halving", f"{dataset}-{model}-{loss}.json")


STANDING_KEYS = {"points": list, "rungs": list, "rung_epochs": list, "finished": bool, "epochs_spent": int}


def read_saved(dataset, model, loss):
    """The table results/halving/ keeps of a loss's finished halving, or None; a one-line error when damaged."""
    path = saved_path(dataset, model, loss)
    if not os.path.isfile(path):
        return None
    saved = R.read_json(path, f"restore it from git (git checkout -- {os.path.relpath(path, C.HERE)})")
    if not all(isinstance(saved.get(k), kind) for k, kind in STANDING_KEYS.items()) or not isinstance(
            saved.get("chosen"), str):
        raise R.RunFolderError(f"{path} is damaged (not a halving's table); restore it from git (git checkout -- "
                               f"{os.path.relpath(path, C.HERE)})")
    return saved


def known(dataset, model, loss, grid, points):
    """(standing, whether it is the saved table) of a loss: as results/halving/ saved its finished halving, unless
    its grid's run folders show the same grid further along (every point as far as saved, some further): a checkout
    without the folders, or with only some of them, reads the saved table, not a halving that would start over. Else
    from the run folders where any has trained, else None."""
    saved = read_saved(dataset, model, loss)
    found = standing(dataset, model, loss, points) if any(
        p["epochs"] or p["finished"] or p["stopped"] for p in points) else None
    further = found and [p["cell"] for p in saved["points"]] == grid and all(
        p["epochs"] >= q["epochs"] for p, q in zip(points, saved["points"])) if saved else True
    if saved and not (further and found["epochs_spent"] > saved["epochs_spent"]):
        return saved, True
    return found, False


def current(dataset, model, loss):
    """(standing, the chosen point's run folder or None) of a loss (known)."""
    grid = C.tuning_grid(dataset, model, loss)
    folders = [C.run_folder(cell, SEED, {}) for cell in grid]
    found = known(dataset, model, loss, grid, read_points(grid, folders))[0]
    return found, found and found["chosen"] and folders[grid.index(found["chosen"])]


def final_result(found, run_dir):
    """The chosen point's finished run, as its metrics.json (run_dir) or its record in results/cells/ holds it
    (both have "protocols", "best_epoch" and "epochs"), or None before it has finished."""
    if not found["finished"]:
        return None
    if run_dir and os.path.isfile(os.path.join(run_dir, "metrics.json")):
        return C.read_metrics(run_dir)
    path = C.record_path(found["chosen"], SEED)
    return C.read_record(path) if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------------------------------
# Training the rungs
# ---------------------------------------------------------------------------------------------------------------

def say(line, stream=None):
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=stream or sys.stdout, flush=True)


def rung_title(rung, rung_epochs=None):
    """'rung 2 (to epoch 24)', 'rung 3 (to early stopping)'."""
    epochs = (rung_epochs or RUNG_EPOCHS)[rung]
    return f"rung {rung + 1} (to {f'epoch {epochs}' if epochs else 'early stopping'})"


def halve(dataset, model, loss, device=None):
    """Train one loss's halving as far as it goes, rung by rung, then record its final run. The exit status: 0 when
    the final run has finished and is recorded; 1 when a run failed, or is being trained by another process (a line
    says which; the same command continues), or the chosen point's run stopped on non-finite numbers in its first
    epoch, which it is only when no grid point has a validated epoch (a line says so; a run so stopped is done for
    every rung, as it stops there again, so the same command ends the same way at once); 2 when the finished run
    cannot be recorded (not the published data)."""
    grid, name = C.tuning_grid(dataset, model, loss), f"halving {dataset}/{model}/{loss}"
    folders = run_folders(grid)
    points = read_points(grid, folders)
    if known(dataset, model, loss, grid, points)[1]:
        say(f"{name}: finished before, as {os.path.relpath(saved_path(dataset, model, loss), C.HERE)} says, and "
            f"its run folders show it no further along: nothing to train (remove that file to halve again)")
        return 0
    for rung, last_epoch in enumerate(RUNG_EPOCHS):
        cohort = rungs_of(points)[rung]["points"]                           # every rung before is done
        todo = [i for i in cohort if not has_done(points[i], last_epoch)]
        say(f"{name}: {rung_title(rung)}, {len(cohort)} of {len(grid)} grid points, {len(todo)} to train")
        failed = {}                                                         # index -> exit status
        for i in todo:
            code = C.run_cell(grid[i], SEED, device, pause_after=last_epoch)
            if code == 130:                                                 # Ctrl-C: R.main said so in one line
                raise KeyboardInterrupt
            if code:                                                        # the rung's other runs still train
                failed[i] = code
        points = read_points(grid, folders)
        for i in [i for i in failed if has_done(points[i], last_epoch)]:   # done: it would stop there again
            say(f"{name}: {grid[i]} stopped: {points[i]['stopped']}; with no epoch to test, it counts as done for "
                f"every rung and ranks last (resuming it stops it there again)", sys.stderr)
            del failed[i]
        held = [grid[i] for i in cohort if not has_done(points[i], last_epoch) and i not in failed]
        if failed or held:                       # held: run_cell left them to another process that is training them
            why = [f"{len(failed)} failed (their lines above say why): "
                   + ", ".join(f"{grid[i]} (exit {code})" for i, code in failed.items())] if failed else []
            why += [f"{len(held)} {'is' if len(held) == 1 else 'are'} being trained by another process: "
                    f"{', '.join(held)}"] if held else []
            say(f"{name}: rung {rung + 1} is not done: {'; '.join(why)}; the same command continues from there",
                sys.stderr)
            return 1
    found = standing(dataset, model, loss, points)
    chosen = points[grid.index(found["chosen"])]
    if not chosen["finished"]:        # stopped in its first epoch: chosen only when no grid point has an epoch
        say(f"{name}: no grid point has a validated epoch (the chosen point {found['chosen']} stopped: "
            f"{chosen['stopped']}), so there is no result to record; the same command ends the same way (its run "
            f"stops there again)", sys.stderr)
        return 1
    try:
        C.record(found["chosen"], SEED, folders[grid.index(found["chosen"])])
    except R.ConfigError as err:
        say(f"{name}: not recorded: {found['chosen']} seed {SEED}: {err}", sys.stderr)
        return 2
    found["record"] = os.path.relpath(C.record_path(found["chosen"], SEED), C.HERE)
    path = saved_path(dataset, model, loss)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    R.save_atomically(json.dumps(found, indent=2) + "\n", path)
    say(f"{name}: finished; recorded in {found['record']} and {os.path.relpath(path, C.HERE)}")
    return 0


def halving(dataset, model, losses, device=None):
    """Each loss's halving in turn (a loss that cannot go on leaves the next to go on), then the tables. Returns
    the worst exit status of the losses (halve)."""
    status = 0
    for loss in losses:
        status = max(status, halve(dataset, model, loss, device))
    print("\n".join(tables(dataset, model, losses)))
    return status


# ---------------------------------------------------------------------------------------------------------------
# The tables
# ---------------------------------------------------------------------------------------------------------------

def point_name(cell):
    return cell.split("/")[-1]


def number(value):
    return "" if value is None else f"{value:.4f}"


def loss_table(found, result):
    """The markdown lines of one loss's halving: every grid point's epochs and best validation NDCG@10 per rung,
    where it stands, the chosen point and, once its run has finished, its test metrics under both protocols."""
    count, rungs = len(found["rung_epochs"]), found["rungs"]
    titles = [rung_title(r, found["rung_epochs"]) for r in range(count)]
    if found["finished"]:
        where = "finished"
    else:
        rung = rungs[-1]
        done = sum(has_done(found["points"][i], rung["epochs"]) for i in rung["points"])
        where = (f"in {rung_title(len(rungs) - 1, found['rung_epochs'])}, {done} of its {len(rung['points'])} grid "
                 f"points done")
    lines = [f"## {found['dataset']} {found['model']} {found['loss']}: {where}", "",
             "Each rung's column: the best validation NDCG@10, within the rung's epochs, of each grid point that "
             "trained in it; the best of a rung advance to the next (a tie: the earlier point). Epochs: what the "
             "point's run folder holds.", "",
             "| grid point | epochs | " + " | ".join(titles) + " |", "|---|---|" + "---|" * count]
    for p in found["points"]:
        best = p["best"] + [None] * (count - len(p["best"]))
        state = " (finished)" if p["finished"] else f" (stopped: {p['stopped']})" if p.get("stopped") else ""
        lines.append(table_row([point_name(p["cell"]), f"{p['epochs']}{state}", *(number(b) for b in best)]))
    lines.append("")
    stopped = found["chosen"] and next(p.get("stopped") for p in found["points"] if p["cell"] == found["chosen"])
    chosen = (f"chosen: {point_name(found['chosen'])}" + (f" (stopped: {stopped}; no test result)" if stopped else "")
              if found["chosen"] else f"chosen: not yet (when rung {count - 1} is done)")
    lines.append(f"{chosen}; {found['epochs_spent']} epochs trained, all grid points together")
    if result:
        stopped = f" (training stopped: {result['stopped']})" if result.get("stopped") else ""
        lines.append(f"its run: best epoch {result['best_epoch']} of {result['epochs']}{stopped}; test:")
        for protocol, title in C.PROTOCOL_TITLES.items():
            test = C.recorded_test(result, protocol) or {}
            lines.append(f"- {title}: " + "  ".join(f"{k} {test[k]:.4f}" for k in METRICS if k in test))
    return lines + [""]


def summary_row(loss, found, result):
    """One loss's line of the last table: its chosen point, the epochs of its grid, and the final run's best epoch
    and test HR@10 / NDCG@10 under both protocols, once it has finished."""
    if found is None:
        return table_row([loss, "not started", "", "", "", ""])
    test = [C.recorded_test(result, p) if result else None for p in C.PROTOCOL_TITLES]
    return table_row([loss, point_name(found["chosen"]) if found["chosen"] else "not yet", found["epochs_spent"],
                      f"{result['best_epoch']} / {result['epochs']}" if result else "",
                      *(f"{t['HR@10']:.4f} / {t['NDCG@10']:.4f}" if t else "" for t in test)])


def table_row(fields):
    return "| " + " | ".join(str(field) for field in fields) + " |"


def tables(dataset, model, losses):
    """Every loss's table (loss_table), then a line a loss (summary_row), as markdown lines."""
    lines, summary = [], []
    for loss in losses:
        found, run_dir = current(dataset, model, loss)
        result = found and final_result(found, run_dir)
        lines += loss_table(found, result) if found else [f"## {dataset} {model} {loss}: not started", ""]
        summary.append(summary_row(loss, found, result))
    return lines + [f"## {dataset} {model}: each loss's chosen point", "",
                    "| loss | chosen | epochs trained | best epoch / epochs | test HR@10 / NDCG@10, every item ranked "
                    "| the history's items excluded |", "|---|---|---|---|---|---|", *summary]
