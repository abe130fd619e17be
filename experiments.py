"""The paper's experiments: which runs make each table cell, running them, and the results page.

    python experiments.py list table1 --datasets beauty --models sasrec --seeds 1   # cell ids, one per line
    python experiments.py run table1/beauty/sasrec/uniform --seed 1                  # one cell (resumable)
    python experiments.py report                                                     # results/RESULTS.md
    python experiments.py figure1                                                    # results/figure1*.png
    python experiments.py list tune ...  /  python experiments.py choose             # hyperparameter search
    python experiments.py repeats --dataset yelp RUN_DIR...                          # NDCG@10 from repeated items

run_all.sh drives these. A cell is one training run of uniform_seqrec.py; its run folder is the default one
(runs/<data>-<model>-<loss>-<hash of the configuration>), so cells with the same configuration share a run (Table 2
row (e), Table 3 beta 0.05 and Table 1 SASRec + uniform are one run). Each finished cell is recorded as
results/cells/<cell id>-seed<seed>.json with its metrics, configuration, seed, commit, device, the machine that
trained it (CPU model or GPU name, torch version; from its metrics.json) and wall time.
"""
import glob
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings

if __name__ == "__main__":  # started as a program: Ctrl-C while torch loads is one line (main takes over after)
    signal.signal(signal.SIGINT, lambda *_: (print("experiments.py: interrupted while starting; nothing was "
                                                   "changed", file=sys.stderr), sys.exit(130)))
    try:  # a deleted working directory: importing torch would end in "oneMKL FATAL ERROR: Cannot load ..."
        __import__("os").getcwd()
    except FileNotFoundError:
        print("experiments.py: error: the working directory no longer exists (deleted or moved); cd into a "
              "folder that exists and run again", file=sys.stderr)
        sys.exit(2)
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # before torch: see uniform_seqrec.py
import torch

import runs as R
import uniform_seqrec as U

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
HYPERPARAMETERS = os.path.join(RESULTS, "hyperparameters.tsv")
DATASETS = ["beauty", "toys", "sports", "yelp"]
MODELS = ["gru4rec", "caser", "sasrec"]
MODEL_NAMES = {"gru4rec": "GRU4Rec", "caser": "Caser", "sasrec": "SASRec"}
LOSSES = ["bce", "bpr", "infonce", "uniform"]  # the paper's four: its Table 1, its claims, the tuning grid
# Beyond the paper, a fifth row per backbone in Table 1: full-softmax cross-entropy over every item (RecBole's SASRec
# default). The paper has no number for it, and the page's "which loss is best" counts stay over the paper's four
# (CE is shown beside them), so that the paper's claim keeps its meaning.
CE = "ce"
TABLE1_LOSSES = LOSSES + [CE]
ABLATIONS = {  # Table 2: row -> (loss, flags); (a) is Table 1's SASRec + BCE cell, (e) its SASRec + uniform cell
    "a": ("bce", []), "b": ("uniform", ["--no-hom", "--no-het"]), "c": ("uniform", ["--no-het"]),
    "d": ("uniform", ["--no-hom"]), "e": ("uniform", []), "f": ("uniform", ["--no-rec"]),
    "g": ("uniform", ["--no-normalize"]),
}
BETAS = ["0.1", "0.05", "0.01", "0.005", "0.001"]  # Table 3
# Beyond the paper, on Beauty: InfoNCE with K negatives per history (1 is BPR, and the batch's 256 is Table 1's
# InfoNCE cell), and Caser without the ReLU on its last layer (the variant that beats the paper's Caser).
INFONCE_NEGATIVES = ["4", "16"]
# Beyond the paper, on Toys: SASRec with negatives that may be the user's own items (--negatives any), the way the
# authors' code and RecBole draw them, against Table 1's (none of the user's training items).
NEGATIVES_LOSSES = ["bce", "uniform"]
# What a first-time user gets: the README's own command (every default: lr 3e-4, seed 42), and the same with BCE.
README_LOSSES = ["uniform", "bce"]
# The tuning grid: a stated subset of the paper's appendix B grid (lr x dim x layers = heads), beta fixed at 0.05
# (Table 3 studies beta on its own). 12 runs per SASRec / GRU4Rec cell, 6 per Caser cell.
TUNE_LR, TUNE_DIM, TUNE_LAYERS = ["1e-4", "2e-4", "3e-4"], ["64", "128"], ["1", "2"]

# The paper's numbers: (HR@10, NDCG@10)
PAPER_TABLE1 = {
    ("gru4rec", "bce"): [(.0369, .0185), (.0298, .0164), (.0148, .0076), (.0273, .0136)],
    ("gru4rec", "bpr"): [(.0472, .0248), (.0492, .0276), (.0283, .0153), (.0368, .0190)],
    ("gru4rec", "infonce"): [(.0365, .0169), (.0282, .0141), (.0314, .0153), (.0482, .0241)],
    ("gru4rec", "uniform"): [(.0702, .0373), (.0705, .0385), (.0365, .0193), (.0665, .0378)],
    ("caser", "bce"): [(.0348, .0172), (.0250, .0125), (.0218, .0110), (.0251, .0121)],
    ("caser", "bpr"): [(.0332, .0159), (.0298, .0140), (.0165, .0083), (.0644, .0342)],
    ("caser", "infonce"): [(.0421, .0172), (.0371, .0149), (.0245, .0107), (.0643, .0333)],
    ("caser", "uniform"): [(.0544, .0258), (.0416, .0174), (.0261, .0116), (.0658, .0357)],
    ("sasrec", "bce"): [(.0522, .0278), (.0604, .0295), (.0301, .0145), (.0507, .0278)],
    ("sasrec", "bpr"): [(.0594, .0261), (.0662, .0309), (.0337, .0150), (.0552, .0326)],
    ("sasrec", "infonce"): [(.0588, .0261), (.0677, .0305), (.0367, .0165), (.0593, .0334)],
    ("sasrec", "uniform"): [(.0821, .0371), (.0896, .0411), (.0471, .0214), (.0668, .0405)],
}
PAPER_TABLE2 = {  # row -> [Beauty, Toys]
    "a": [(.0522, .0278), (.0604, .0295)], "b": [(.0233, .0113), (.0181, .0093)],
    "c": [(.0786, .0362), (.0865, .0394)], "d": [(.0416, .0205), (.0399, .0204)],
    "e": [(.0821, .0371), (.0896, .0411)], "f": [(.0028, .0015), (.0023, .0011)],
    "g": [(.0534, .0257), (.0614, .0301)],
}
PAPER_TABLE3 = {"0.1": [(.0785, .0358), (.0854, .0389)], "0.05": [(.0821, .0371), (.0896, .0411)],
                "0.01": [(.0658, .0314), (.0708, .0331)], "0.005": [(.0557, .0268), (.0582, .0280)],
                "0.001": [(.0353, .0168), (.0320, .0158)]}


# ---------------------------------------------------------------------------------------------------------------
# Cells: id -> command-line arguments of uniform_seqrec.py
# ---------------------------------------------------------------------------------------------------------------

MAX_SEED = 20  # the results page reads seeds 1..MAX_SEED


def hyperparameter_row(fields):
    """The flags of one row of results/hyperparameters.tsv, or a ValueError saying what is wrong with it."""
    if len(fields) != 8:
        raise ValueError(f"{len(fields)} fields, not the 8 of the header (dataset model loss lr dim layers heads "
                         f"beta)")
    dataset, model, loss, lr, dim, layers, heads, beta = fields
    for value, known in ((dataset, DATASETS), (model, MODELS), (loss, TABLE1_LOSSES)):
        if value not in known:
            raise ValueError(f"'{value}' is not one of {', '.join(known)}")
    for name, value in (("dim", dim), ("layers", layers), ("heads", heads)):
        if not (value.isdigit() and int(value) > 0):
            raise ValueError(f"{name} '{value}' is not a positive whole number")
    for name, value, smallest in (("lr", lr, 0.0), ("beta", beta, 0.0)):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name} '{value}' is not a number") from None
        if not (math.isfinite(number) and (number > smallest or name == "beta" and number == 0)):
            raise ValueError(f"{name} {value} is out of range")
    return ["--lr", lr, "--dim", dim, "--layers", layers, "--heads", heads,
            *(["--beta", beta] if loss == "uniform" else [])]


def read_hyperparameters(path=None):
    """(dataset, model, loss) -> flags, from the committed table; a missing row means the CLI defaults. A row that
    is not as the header says is a one-line ConfigError naming its line."""
    path, chosen = path or HYPERPARAMETERS, {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise R.ConfigError(f"{path} cannot be read ({R.one_line(err)})") from None
        for number, line in enumerate(lines, 1):
            fields = line.split("#")[0].split()
            if fields and fields[0] != "dataset":
                try:
                    flags = hyperparameter_row(fields)
                except ValueError as err:
                    raise R.ConfigError(f"{path} line {number}: {err}") from None
                if tuple(fields[:3]) in chosen:
                    raise R.ConfigError(f"{path} line {number}: a second row for {' '.join(fields[:3])}")
                chosen[tuple(fields[:3])] = flags
    return chosen


def tuning_point(cell):
    """The values of a tuning cell id: tune/beauty/sasrec/bce/lr=2e-4,dim=128,layers=2 -> {'lr': '2e-4', ...}."""
    return dict(pair.split("=") for pair in cell.split("/")[-1].split(","))


def cell_arguments(cell, hyperparameters):
    """The uniform_seqrec.py flags of a cell id such as table1/beauty/sasrec/uniform, table2/toys/c,
    table3/beauty/0.01 or tune/beauty/sasrec/bce/lr=2e-4,dim=128,layers=2."""
    table, dataset, *rest = cell.split("/")
    if table == "table1":
        model, loss = rest
        return ["--data", dataset, "--model", model, "--loss", loss, *hyperparameters.get((dataset, model, loss), [])]
    if table == "table2":
        loss, flags = ABLATIONS[rest[0]]
        return ["--data", dataset, "--model", "sasrec", "--loss", loss,
                *hyperparameters.get((dataset, "sasrec", loss), []), *flags]
    if table == "table3":
        tuned = hyperparameters.get((dataset, "sasrec", "uniform"), [])
        tuned = [f for i, f in enumerate(tuned) if "--beta" not in tuned[max(0, i - 1):i + 1]]  # drop --beta X
        return ["--data", dataset, "--model", "sasrec", "--loss", "uniform", *tuned, "--beta", rest[0]]
    if table == "infonce":
        return [*cell_arguments(f"table1/{dataset}/sasrec/infonce", hyperparameters), "--infonce-negatives", rest[0]]
    if table == "caser-none":
        return [*cell_arguments(f"table1/{dataset}/caser/{rest[0]}", hyperparameters), "--caser-activation", "none"]
    if table == "negatives":                                                # Table 1's SASRec, other negatives
        return [*cell_arguments(f"table1/{dataset}/sasrec/{rest[0]}", hyperparameters), "--negatives", "any"]
    if table == "readme":                                                   # the README's command, as written
        return ["--data", dataset, "--model", "sasrec", "--loss", rest[0]]
    if table == "tune":
        model, loss, _ = rest
        values = tuning_point(cell)
        return ["--data", dataset, "--model", model, "--loss", loss, "--lr", values["lr"], "--dim", values["dim"],
                "--layers", values["layers"], "--heads", values["layers"]]
    raise ValueError(f"unknown cell {cell}")


def seed_arguments(cell, seed):
    """The --seed flag of a cell's run; none for seed 1 of a readme cell, which is the README's command exactly as a
    first-time user types it (its default seed, 42)."""
    return [] if cell.startswith("readme/") and seed == 1 else ["--seed", str(seed)]


def cells(what, datasets, models):
    """Cell ids of a table (table1, table2, table3, figure1, infonce, caser-none, tune, all), narrowed to datasets
    and models."""
    found = []
    if what in ("table1", "all"):
        found += [f"table1/{d}/{m}/{loss}" for d in datasets for m in models for loss in LOSSES]
    if what in ("table2", "all") and "sasrec" in models:
        found += [f"table2/{d}/{row}" for d in datasets if d in ("beauty", "toys") for row in ABLATIONS]
    if what in ("table3", "all") and "sasrec" in models:
        found += [f"table3/{d}/{beta}" for d in datasets if d in ("beauty", "toys") for beta in BETAS]
    if what in ("figure1", "all") and "beauty" in datasets and "sasrec" in models:
        found += ["table2/beauty/a", "table2/beauty/b"]  # Figure 1 reads these two runs' per-epoch logs
    if what in ("infonce", "all") and "beauty" in datasets and "sasrec" in models:
        found += [f"infonce/beauty/{k}" for k in INFONCE_NEGATIVES]
    if what in ("caser-none", "all") and "beauty" in datasets and "caser" in models:
        found += [f"caser-none/beauty/{loss}" for loss in LOSSES]
    if what in ("negatives", "all") and "toys" in datasets and "sasrec" in models:
        found += [f"negatives/toys/{loss}" for loss in NEGATIVES_LOSSES]
    if what in ("readme", "all") and "beauty" in datasets and "sasrec" in models:
        found += [f"readme/beauty/{loss}" for loss in README_LOSSES]
    if what in ("table1", "all"):
        # CE's cells after all the others, so that every earlier cell keeps its line of a one-seed list (a Slurm
        # array task runs the N-th: SLURM_ARRAY_TASK_ID=N names the same cell as before CE was added)
        found += [f"table1/{d}/{m}/{CE}" for d in datasets for m in models]
    if what == "tune":
        for d in datasets:
            for m in models:
                for loss in LOSSES:
                    layers = ["1"] if m == "caser" else TUNE_LAYERS
                    found += [f"tune/{d}/{m}/{loss}/lr={lr},dim={dim},layers={n}"
                              for lr in TUNE_LR for dim in TUNE_DIM for n in layers]
    return list(dict.fromkeys(found))                                       # in order, without repeats


def run_folder(cell, seed, hyperparameters):
    """The default run folder uniform_seqrec.py gives a cell, or None when its data file is missing."""
    try:
        return R.configure([*cell_arguments(cell, hyperparameters), *seed_arguments(cell, seed)])[1]
    except (R.ConfigError, R.DataError):
        return None


def unique_runs(cell_ids, seed):
    """The first cell of each distinct configuration: cells sharing one never train at the same time."""
    hyperparameters, seen, kept = read_hyperparameters(), set(), []
    for cell in cell_ids:
        folder = run_folder(cell, seed, hyperparameters) or cell
        if folder not in seen:
            seen.add(folder)
            kept.append(cell)
    return kept


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record_path(cell, seed):
    return os.path.join(RESULTS, "cells", f"{cell.replace('/', '__')}-seed{seed}.json")


LOG_KEYS = {"epoch": int, "valid_NDCG@10": float}                    # what every reader of a row needs of it


def read_log(run_dir):
    """The per-epoch records of a run folder's log.jsonl, or None when it has none; a RunFolderError naming the
    line when one is not such a record."""
    path = run_dir and os.path.join(run_dir, "log.jsonl")
    if not path or not os.path.isfile(path):
        return None
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    row = json.loads(line)
                    if not (isinstance(row, dict) and all(isinstance(row.get(k), (int, float) if kind is float else
                                                                     kind) for k, kind in LOG_KEYS.items())):
                        raise ValueError(f"line {number} is not an epoch's record ({', '.join(LOG_KEYS)})")
                    rows.append(row)
    except (OSError, ValueError) as err:                                    # JSONDecodeError, UnicodeDecodeError
        raise R.RunFolderError(f"{path} is damaged ({R.one_line(err)}); resuming the run rewrites it") from None
    return rows


RECORD_KEYS = {"cell": str, "seed": int, "test": dict, "valid": dict, "best_epoch": int, "epochs": int,
               "device": str, "wall_seconds": (int, float), "commit": str, "run_dir": str, "config": dict}


def read_record(path):
    """A cell's record in results/cells/, or a one-line RunFolderError naming the file and what is wrong."""
    entry = R.read_json(path, f"restore it from git (git checkout -- {os.path.relpath(path, HERE)})")
    wrong = [k for k, kind in RECORD_KEYS.items() if not isinstance(entry.get(k), kind)]
    wrong += [f"test {k}" for k in ("HR@10", "NDCG@10") if not isinstance(entry.get("test", {}).get(k), (int, float))]
    wrong += [f"config {k}" for k in ("lr", "dim", "layers", "heads", "beta")
              if not isinstance(entry.get("config", {}).get(k), (int, float))]
    if wrong:
        raise R.RunFolderError(f"{path} is damaged (no valid {wrong[0]}); restore it from git (git checkout -- "
                               f"{os.path.relpath(path, HERE)})")
    return entry


METRICS_KEYS = {"test": dict, "valid": dict, "best_epoch": int, "epochs": int, "device": str, "config": dict}


def read_metrics(run_dir):
    """A finished run folder's metrics.json, or a one-line RunFolderError naming what is wrong with it."""
    path = os.path.join(run_dir, "metrics.json")
    metrics = R.read_json(path, "remove it to test the run's best state again")
    wrong = [k for k, kind in METRICS_KEYS.items() if not isinstance(metrics.get(k), kind)]
    wrong += [f"{split} NDCG@10" for split in ("test", "valid")
              if not isinstance(metrics.get(split, {}).get("NDCG@10"), (int, float))]
    if wrong:
        raise R.RunFolderError(f"{path} is damaged (no valid {wrong[0]}); remove it to test the run's best state "
                               f"again (python uniform_seqrec.py --resume {run_dir})")
    return metrics


def run_data(cell, seed, config):
    """The data fingerprint of a cell's run, checked against the file the cell reads now (a ConfigError when they
    differ: a run on other data is never reported as the cell's)."""
    current = R.configure([*cell_arguments(cell, read_hyperparameters()), *seed_arguments(cell, seed)])[0]
    current["data_fingerprint"] = R.data_fingerprint(current["data_path"])
    R.check_same_data(current, config, f"the run of {cell} seed {seed}")
    return current["data_fingerprint"], current["data_path"]


def wall_seconds(run_dir, log):
    """The seconds a run's epochs took, trained and evaluated, from its log."""
    seconds = [r.get("train_seconds") for r in log or []] + [r.get("eval_seconds") for r in log or []]
    if not log or not all(isinstance(t, (int, float)) for t in seconds):
        raise R.RunFolderError(f"{run_dir}/log.jsonl lacks the epochs' times; resuming the run rewrites it")
    return round(sum(seconds), 1)


def write_record(cell, seed, entry):
    path = record_path(cell, seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    R.save_atomically(json.dumps(entry, indent=2) + "\n", path)


def recorded_ranking(cell, seed, run_dir, metrics, fingerprint):
    """The re-ranked part of the cell's record when it already records this very run (the same folder, epochs, test
    metrics and data) with both splits of every protocol, else None: a report ranks only the runs that finished
    since, not every finished run again."""
    path = record_path(cell, seed)
    try:
        entry = read_record(path) if os.path.isfile(path) else None
    except R.RunFolderError:
        return None
    if not entry or (entry["run_dir"], entry["epochs"], entry["best_epoch"], entry["test"],
                     entry["config"].get("data_fingerprint")) != (os.path.relpath(run_dir, HERE), metrics["epochs"],
                                                                  metrics["best_epoch"], metrics["test"], fingerprint):
        return None
    protocols, top_seen = entry.get("protocols"), entry.get("top_item_in_history")
    both_splits = lambda part: isinstance(part, dict) and {"test", "valid"} <= part.keys()
    if not (isinstance(protocols, dict) and all(both_splits(protocols.get(name)) for name in U.PROTOCOLS)
            and both_splits(top_seen)):
        return None
    return {"protocols": protocols, "top_item_in_history": top_seen}


def machine_of(metrics):
    """The machine that trained a run, from its metrics.json: {"device", "name" (the GPU's name on CUDA, else the
    CPU's model; None where the run's metrics.json predates naming it), "torch", "threads", "cpu_capability" (the
    vector kernels torch ran on the CPU)}, or None where metrics.json names no settings at all. Read from the run,
    never from the machine that records it: a run folder can be recorded elsewhere than where it trained."""
    settings = metrics.get("device_settings")
    if not isinstance(settings, dict):
        return None
    on_gpu = str(settings.get("device", "")).startswith("cuda")
    return {"device": settings.get("device"), "name": settings.get("name" if on_gpu else "cpu"),
            "torch": settings.get("torch"), "threads": settings.get("threads"),
            "cpu_capability": settings.get("cpu_capability")}


def machine_label(machine):
    """A record's machine in a few words: 'AMD EPYC (family 25, model 17), AVX512, torch 2.13.0, 1 thread' (a GPU
    run: its name and torch); what a run did not record is said, never filled in from this machine."""
    if not isinstance(machine, dict):
        return "machine not recorded"
    on_cpu = not str(machine.get("device")).startswith("cuda")
    threads, capability = machine.get("threads"), machine.get("cpu_capability")
    return ", ".join([machine.get("name") or f"{machine.get('device')} (model not recorded)",
                      *([capability] if on_cpu and capability else []),
                      f"torch {machine.get('torch') or 'not recorded'}",
                      *([f"{threads} thread{'s' * (threads != 1)}"] if on_cpu and isinstance(threads, int) else [])])


def published_sha256(dataset):
    """The SHA-256 of a benchmark's published file (data_prep.BENCHMARKS, docs/datasets.md)."""
    return R.BENCHMARKS[dataset][1]


def check_published(cell, fingerprint, data_path):
    """A ConfigError unless the cell's run was trained on the published file of its benchmark: the results page puts
    every record beside the paper's numbers, and a run on other data (an edited or rebuilt Beauty.txt in the data
    folder) would take the benchmark's place on it."""
    dataset = cell.split("/")[1]
    if fingerprint["sha256"] != published_sha256(dataset):
        raise R.ConfigError(f"its run was trained on {data_path} (SHA-256 {fingerprint['sha256'][:12]}...), which is "
                            f"not the published {R.BENCHMARKS[dataset][0]} (SHA-256 "
                            f"{published_sha256(dataset)[:12]}..., docs/datasets.md): only runs on the published "
                            f"files are recorded for the results page")


def record(cell, seed, run_dir):
    """Write the cell's JSON from its finished run folder: its metrics under both protocols, the best state's
    validation metrics, the data file's fingerprint, and how often its top item is one of the user's own. A run on
    other data than the published benchmark file is refused (check_published); its cell's record stays as it was."""
    metrics = read_metrics(run_dir)
    config = metrics["config"]
    fingerprint, data_path = run_data(cell, seed, config)
    check_published(cell, fingerprint, data_path)
    log = read_log(run_dir)
    commit_file = os.path.join(run_dir, "commit.txt")
    commit = open(commit_file).read().strip() if os.path.isfile(commit_file) else git_commit()
    ranked = (recorded_ranking(cell, seed, run_dir, metrics, fingerprint)
              or rescore(run_dir, R.read_sequences(data_path)))
    ranked["protocols"] = metrics.get("protocols") or ranked["protocols"]  # as ranked on the training device
    entry = {"cell": cell, "seed": seed, "test": metrics["test"], "valid": metrics["valid"], **ranked,
             "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs"], "device": metrics["device"],
             "machine": machine_of(metrics), "wall_seconds": wall_seconds(run_dir, log), "commit": commit,
             "run_dir": os.path.relpath(run_dir, HERE), "config": {**config, "data_fingerprint": fingerprint}}
    write_record(cell, seed, entry)


def rescore_recorded(cells_given=()):
    """Add both protocols (and the top-item share) to the record of every recorded cell whose run folder is still
    here, changing nothing else; print the cells whose folder is gone. A re-ranking whose all-items test metrics
    differ from the record's is refused (it would not be the recorded run)."""
    records = [(path, read_record(path)) for path in sorted(glob.glob(os.path.join(RESULTS, "cells", "*.json")))]
    unrecorded = [cell for cell in cells_given if cell not in {entry["cell"] for _, entry in records}]
    if unrecorded:                                           # a typo rescored nothing and said nothing
        known = cell_ids_known()
        what = "has no record in results/cells/" if unrecorded[0] in known else \
            "is not a cell (`experiments.py list all` prints them)"
        raise R.ConfigError(f"'{unrecorded[0]}' {what}; nothing was rescored")
    gone, rescored = [], 0
    for path, entry in records:
        if cells_given and entry["cell"] not in cells_given:
            continue
        run_dir = os.path.join(HERE, entry["run_dir"])
        if not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
            gone.append(f"{entry['cell']} seed {entry['seed']}")
            continue
        folder_config = R.read_json(os.path.join(run_dir, "config.json"), "not a run folder of uniform_seqrec.py?")
        fingerprint, data_path = run_data(entry["cell"], entry["seed"], folder_config)
        ranked = rescore(run_dir, R.read_sequences(data_path))
        again = ranked["protocols"]["all_items"]["test"]
        if max(abs(again[k] - entry["test"][k]) for k in entry["test"]) > 2e-4:  # a few users (a GPU run's rounding)
            raise R.RunFolderError(f"{run_dir} ranks differently from {path}: not the recorded run")
        write_record(entry["cell"], entry["seed"], {**entry, **ranked,
                                                     "config": {**entry["config"], "data_fingerprint": fingerprint}})
        print(f"rescored {entry['cell']} seed {entry['seed']}: history excluded, test NDCG@10 "
              f"{ranked['protocols']['history_excluded']['test']['NDCG@10']:.4f}")
        rescored += 1
    print(f"rescored {rescored} of {sum(not cells_given or e['cell'] in cells_given for _, e in records)} records")
    if gone:
        print(f"{len(gone)} recorded cells have no run folder here, so one protocol only: {', '.join(gone)}")


def in_use(run_dir):
    """Whether another process holds the run folder's lock (is training it now)."""
    if not os.path.isfile(os.path.join(run_dir, ".lock")):
        return False
    try:
        R.lock_run_dir(run_dir).close()
        return False
    except R.ConfigError:
        return True


def cell_ids_known():
    """Every cell id of every table and of the tuning grid."""
    return cells("all", DATASETS, MODELS) + cells("tune", DATASETS, MODELS)


def run_cell(cell, seed, device):
    """Train one cell (resuming it, or doing nothing when it is finished); `report` records it. A cell that another
    process is training is left to it: exit status 0, so that a job array or a second run_all.sh does not count
    it as a failure."""
    if cell not in cell_ids_known():
        raise R.ConfigError(f"unknown cell '{cell}' (`experiments.py list all` prints them)")
    arguments = [*cell_arguments(cell, read_hyperparameters()), *seed_arguments(cell, seed)]
    run_dir = R.configure(arguments)[1]                                     # a ConfigError if its data file is missing
    if in_use(run_dir):
        print(f"[{time.strftime('%H:%M:%S')}] {cell} seed {seed}: {run_dir} is being trained by another process; "
              f"left to it", flush=True)
        return 0
    os.makedirs(run_dir, exist_ok=True)
    commit_file = os.path.join(run_dir, "commit.txt")
    if not os.path.isfile(commit_file):
        with open(commit_file, "w") as f:
            f.write(git_commit() + "\n")
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {cell} seed {seed}: {' '.join(arguments)}", flush=True)
    code = R.main([*arguments, *(["--device", device] if device else [])])
    if code == 2 and in_use(run_dir):                                       # another process took it meanwhile
        code = 0
    print(f"[{time.strftime('%H:%M:%S')}] {cell} seed {seed}: exit {code} after {time.time() - started:.0f}s",
          flush=True)
    return code


def record_all(max_seed=MAX_SEED):
    """Record every cell of every table whose run has finished, for seeds 1..max_seed. Returns how many could not
    be recorded (each said so in one line)."""
    hyperparameters, failed = read_hyperparameters(), 0
    for cell in cells("all", DATASETS, MODELS):
        for seed in range(1, max_seed + 1):
            run_dir = run_folder(cell, seed, hyperparameters)
            if run_dir and os.path.isfile(os.path.join(run_dir, "metrics.json")):
                try:
                    record(cell, seed, run_dir)
                except R.ConfigError as err:                                 # one cell's run, not the whole page
                    print(f"not recorded: {cell} seed {seed}: {err}", file=sys.stderr)
                    failed += 1
    return failed


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameter choice from the tuning runs
# ---------------------------------------------------------------------------------------------------------------

CHOSEN_HEADER = ["# Chosen by `./run_all.sh tune`: best validation NDCG@10 over lr {1e-4, 2e-4, 3e-4}",
                 "# x dim {64, 128} x layers = heads {1, 2} (Caser: lr x dim), beta 0.05, batch 256, max length 50,",
                 "# dropout 0.5, seed 1.",
                 "dataset\tmodel\tloss\tlr\tdim\tlayers\theads\tbeta\t# valid NDCG@10, grid points finished"]


def choose():
    """Pick, per (dataset, model, loss), the tuning point with the best validation NDCG@10, and put it in
    results/hyperparameters.tsv in place of that cell's row. Only a cell with finished tuning runs gets a new row:
    every other row (and comment) of the file is kept as it is, and the output names the rows that changed and
    those kept. A choice made before every point of its grid has finished says so, in its row and on the screen."""
    best, finished, points = {}, {}, {}
    for cell in cells("tune", DATASETS, MODELS):
        key = tuple(cell.split("/")[1:4])                                   # (dataset, model, loss)
        points[key] = points.get(key, 0) + 1
        run_dir = run_folder(cell, 1, {})
        if not run_dir or not os.path.isfile(os.path.join(run_dir, "metrics.json")):
            continue
        metrics = read_metrics(run_dir)
        finished[key] = finished.get(key, 0) + 1
        if key not in best or metrics["valid"]["NDCG@10"] > best[key][1]:
            best[key] = (metrics["config"], metrics["valid"]["NDCG@10"])
    before = read_hyperparameters()                                         # a malformed row: one line, no write
    if not best:
        print(f"no tuning run has finished: {HYPERPARAMETERS} is unchanged ({len(before)} rows kept; "
              f"./run_all.sh tune trains them)")
        return
    rows = {key: "\t".join([*key, f"{config['lr']:g}", str(config["dim"]), str(config["layers"]),
                            str(config["heads"]), f"{config['beta']:g}",
                            f"# {ndcg:.4f}, {finished[key]} of {points[key]}"]) for key, (config, ndcg) in best.items()}
    if os.path.isfile(HYPERPARAMETERS):
        with open(HYPERPARAMETERS, encoding="utf-8") as f:
            lines = f.read().splitlines()
    else:
        lines = list(CHOSEN_HEADER)
    written, replaced = [], set()
    for line in lines:
        key = tuple(line.split("#")[0].split()[:3])
        if key in rows:                                                     # a row of a cell chosen now
            written.append(rows[key])
            replaced.add(key)
        else:
            written.append(line)
    written += [rows[key] for key in sorted(rows) if key not in replaced]  # cells that had no row
    R.save_atomically("\n".join(written) + "\n", HYPERPARAMETERS)
    after = read_hyperparameters()
    print(f"wrote {HYPERPARAMETERS}: {len(best)} rows chosen from finished tuning runs, "
          f"{len(before.keys() - best.keys())} kept")
    for key in sorted(best):
        old = " ".join(before[key]) if key in before else "the defaults (no row)"
        new = " ".join(after[key])
        what = f"changed from {old} to {new}" if old != new else f"unchanged, {new}"
        partly = (f"; chosen from {finished[key]} of {points[key]} grid points, the rest have not finished"
                  if finished[key] < points[key] else "")
        print(f"  {'/'.join(key)}: {what}{partly}")
    kept = sorted(before.keys() - best.keys())
    if kept:
        print(f"  kept (no finished tuning run): {', '.join('/'.join(key) for key in kept)}")


# ---------------------------------------------------------------------------------------------------------------
# Non-neural baselines on the paper's protocol: they say how hard each dataset is
# ---------------------------------------------------------------------------------------------------------------
# Both count only the training parts s[:n-2] (no validation or test item), and both are ranked exactly as the
# models are: every item, ties against the target, nothing masked.

BASELINES = os.path.join(RESULTS, "baselines.json")
RECENT_ITEMS = 3                                   # the item-transition baseline looks at the last 3 items
DECAYS = [0.0, 0.25, 0.5, 1.0]                     # weight of the k-th most recent item: decay ** k (0 ** 0 = 1)
TIE_BREAK = 1e-3  # popularity / (max + 1) scaled below any difference of transition scores (multiples of 1/16)


def training_part_items(flat, starts, lengths):
    """The item ids of every user's training part s[:n-2], concatenated."""
    users = torch.repeat_interleave(torch.arange(len(lengths)), lengths - 2)
    first = torch.cumsum(lengths - 2, 0) - (lengths - 2)
    return flat[starts[users] + torch.arange(len(users)) - first[users]]


def item_popularity(flat, starts, lengths, num_items):
    """(N + 1,) how often each item occurs in the training parts."""
    return torch.bincount(training_part_items(flat, starts, lengths), minlength=num_items + 1).double()


def item_transitions(flat, starts, lengths, num_items):
    """Counts of b directly following a in a training part, as compressed rows: (row_starts (N + 2,), followers,
    counts); the followers of item a are followers[row_starts[a]:row_starts[a + 1]]."""
    ends, _, _ = U.training_examples(starts, lengths, 1)                    # (s[t-1], s[t]) for t = 1 .. n-3
    pairs, counts = torch.unique(flat[ends - 1] * (num_items + 1) + flat[ends], return_counts=True)  # sorted
    row_starts = torch.cat([torch.zeros(1, dtype=torch.long),
                            torch.cumsum(torch.bincount(pairs // (num_items + 1), minlength=num_items + 1), 0)])
    return row_starts, pairs % (num_items + 1), counts.double()


def recent_items(histories, k):
    """(B, T) right-padded -> (B, k): the most recent item first, 0 where the history is shorter."""
    last = (histories > 0).sum(1, keepdim=True) - 1 - torch.arange(k)      # (B, k)
    return torch.where(last >= 0, histories.gather(1, last.clamp(min=0)), 0)


def transition_scores(histories, transitions, popularity, decay):
    """(B, N + 1): sum over the last RECENT_ITEMS items a_k (k = 0 most recent) of decay^k * count(a_k -> item),
    popularity breaking the ties (among them the items never seen after any recent item). Vectorised over the
    followers of all recent items of the batch (padding, item 0, has none)."""
    row_starts, followers, counts = transitions
    recent = recent_items(histories, RECENT_ITEMS).flatten()                # (B K,)
    weights = torch.tensor([decay ** k for k in range(RECENT_ITEMS)], dtype=torch.float64).repeat(len(histories))
    first, number = row_starts[recent], row_starts[recent + 1] - row_starts[recent]  # (B K,) each
    query = torch.repeat_interleave(torch.arange(len(recent)), number)      # one entry per (recent item, follower)
    entry = first[query] + torch.arange(len(query)) - (torch.cumsum(number, 0) - number)[query]
    row = query // RECENT_ITEMS                                             # the history it counts for
    scores = TIE_BREAK * (popularity / (popularity.max() + 1)).repeat(len(histories), 1)  # (B, N + 1)
    scores.view(-1).index_add_(0, row * scores.shape[1] + followers[entry], weights[query] * counts[entry])
    return scores


def ranks_and_repeats(score, flat, starts, lengths, split, max_len=50, mask_seen=False):
    """Every user's target rank under a scoring function of ((B, T) histories, (B,) users), ranked like the models
    (mask_seen: the history's items excluded), and whether the target repeats an item of its history
    (repeat_kinds)."""
    ranks, kinds = [], []
    for histories, users, targets in U.evaluation_batches(flat, starts, lengths, max_len, split):
        scores = score(histories, users)
        scores[:, 0] = float("-inf")                                        # padding is no item
        if mask_seen:
            scores.scatter_(1, histories, float("-inf"))
        ranks.append(U.rank_of_targets(scores, targets))
        kinds.append(repeat_kinds(histories, targets))
    return torch.cat(ranks), torch.cat(kinds)


def baseline_metrics(score, flat, starts, lengths, split, mask_seen=False):
    """HR and NDCG at 5, 10, 20 of a scoring function of (B, T) histories and (B,) users."""
    return U.metrics_from_ranks(ranks_and_repeats(score, flat, starts, lengths, split, mask_seen=mask_seen)[0])


def dataset_baselines(sequences):
    """{'popularity': {valid, test}, 'transitions': {decay, valid, test, valid_by_decay}} for one dataset, every item
    ranked; each also under "history_excluded" (the same keys, the history's items excluded; the decay chosen on
    that protocol's validation)."""
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    popularity = item_popularity(flat, starts, lengths, num_items)
    transitions = item_transitions(flat, starts, lengths, num_items)
    by_popularity = lambda histories, _: popularity.expand(len(histories), -1).clone()
    by_transitions = lambda decay: lambda h, _: transition_scores(h, transitions, popularity, decay)
    result = {"popularity": {}, "transitions": {}}
    for protocol, mask_seen in U.PROTOCOLS.items():
        popular = {split: baseline_metrics(by_popularity, flat, starts, lengths, split, mask_seen)
                   for split in ("valid", "test")}
        valid = {decay: baseline_metrics(by_transitions(decay), flat, starts, lengths, "valid", mask_seen)
                 for decay in DECAYS}
        decay = max(DECAYS, key=lambda d: valid[d]["NDCG@10"])              # chosen on validation NDCG@10
        transitions_result = {"decay": decay, "valid": valid[decay],
                              "test": baseline_metrics(by_transitions(decay), flat, starts, lengths, "test", mask_seen),
                              "valid_by_decay": {str(d): v["NDCG@10"] for d, v in valid.items()}}
        if protocol == "all_items":
            result["popularity"].update(popular)
            result["transitions"].update(transitions_result)
        else:
            result["popularity"][protocol], result["transitions"][protocol] = popular, transitions_result
    return result


def baselines(path=None):
    """Write results/baselines.json for every dataset whose file is present (seconds each, CPU)."""
    found = {}
    for dataset in DATASETS:
        data_path = R.benchmark_path(dataset, R.default_data_dir())
        if not os.path.isfile(data_path):
            print(f"  {dataset}: {data_path} not found, skipped (python data_prep.py {dataset})")
            continue
        started = time.time()
        found[dataset] = dataset_baselines(R.read_sequences(data_path))
        found[dataset]["seconds"] = round(time.time() - started, 1)
        print(f"  {dataset}: popularity test NDCG@10 {found[dataset]['popularity']['test']['NDCG@10']:.4f}, "
              f"item transitions {found[dataset]['transitions']['test']['NDCG@10']:.4f} "
              f"(decay {found[dataset]['transitions']['decay']:g}), {found[dataset]['seconds']:.0f} s")
    with open(path or BASELINES, "w") as f:
        json.dump(found, f, indent=1)
        f.write("\n")
    print(f"wrote {path or BASELINES}")


# ---------------------------------------------------------------------------------------------------------------
# Repeats: how much of a score comes from targets the user already had (Yelp keeps repeated visits; the Amazon
# files have none)
# ---------------------------------------------------------------------------------------------------------------

REPEAT_KINDS = ["repeats the history's last item", "repeats an earlier item", "is new to the history"]


def repeat_kinds(histories, targets):
    """(B,) index into REPEAT_KINDS of each target against its (B, T) right-padded history (the T items given)."""
    last = recent_items(histories, 1)[:, 0]
    earlier = (histories == targets[:, None]).any(1)
    return torch.where(last == targets, 0, torch.where(earlier, 1, 2))


def ndcg_by_repeat(ranks, kinds, k=10):
    """Per kind: (share of users, HR@k among them, share ranked first among them, their part of the overall NDCG@k);
    the parts add up to NDCG@k."""
    ranks = ranks.double()
    gains = torch.where(ranks < k, 1.0 / torch.log2(ranks + 2.0), 0.0)
    rate = lambda hits: hits.double().mean().item() if len(hits) else 0.0
    parts = []
    for kind in range(len(REPEAT_KINDS)):
        mine = kinds == kind
        parts.append((rate(mine), rate(ranks[mine] < k), rate(ranks[mine] == 0), gains[mine].sum().item() / len(ranks)))
    return parts


def best_state(run_dir, num_items, lengths):
    """A run folder's model at its best validation state (on the CPU, in eval mode), its configuration, and the
    history length it was trained with."""
    if not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        raise R.RunFolderError(f"{run_dir} has no checkpoint.pt: not a run folder of uniform_seqrec.py")
    config = R.read_json(os.path.join(run_dir, "config.json"), "not a run folder of uniform_seqrec.py?")
    max_len = U.history_limit(config, lengths)
    model = U.build_model(config, num_items, len(lengths), max_len)
    try:  # whatever a damaged checkpoint, or one trained on other data, raises
        checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=False)
        model.load_state_dict(checkpoint["best_model"])
    except Exception as err:
        raise R.RunFolderError(f"{run_dir}/checkpoint.pt does not load onto this data's model ({R.one_line(err)})")
    return model.eval(), config, max_len


def best_state_scorer(run_dir, num_items, lengths):
    """The scoring function of a run folder's best validation state, scoring as its evaluation does, and the
    history length it was trained with."""
    model, config, max_len = best_state(run_dir, num_items, lengths)
    cosine, table = U.scores_are_cosines(config), model.output_items().weight
    return torch.no_grad()(lambda h, users: U.score(model.encode(h, users=users)[:, None], table, cosine)), max_len


def rescore(run_dir, sequences):
    """What a later analysis needs of a run folder's best state, ranked again: {"protocols": {protocol: {"test",
    "valid"}}, as train() returns them, "top_item_in_history": {split: the share of users whose top-ranked item,
    every item ranked, is an item of their own history}}."""
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    model, config, max_len = best_state(run_dir, num_items, lengths)
    cosine, table = U.scores_are_cosines(config), model.output_items().weight
    protocols, top_seen = {name: {} for name in U.PROTOCOLS}, {}
    for split in ("test", "valid"):
        batches = U.evaluation_batches(flat, starts, lengths, max_len, split)
        for name, metrics in U.evaluate_protocols(model, batches, cosine).items():
            protocols[name][split] = metrics
        with torch.no_grad():
            seen = [(histories == U.score(model.encode(histories, users=users)[:, None], table, cosine)[:, 1:]
                     .argmax(1, keepdim=True) + 1).any(1) for histories, users, _ in batches]
        top_seen[split] = torch.cat(seen).double().mean().item()
    return {"protocols": protocols, "top_item_in_history": top_seen}


def repeats(dataset, run_dirs):
    """Print, for the test split of a dataset, how much of each NDCG@10 comes from targets that repeat a history
    item: the item-transition baseline (its decay from results/baselines.json), the same with the history's last
    item ranked first, and the best state of each given run folder."""
    data_path = R.data_path_of({"data": dataset, "data_dir": R.default_data_dir()})
    decay = read_baselines().get(dataset, {}).get("transitions", {}).get("decay")
    if decay is None:
        raise R.ConfigError(f"{BASELINES} has no {dataset}: run python experiments.py baselines first")
    flat, starts, lengths, num_items = U.flatten_sequences(R.read_sequences(data_path), "cpu")
    popularity = item_popularity(flat, starts, lengths, num_items)
    transitions = item_transitions(flat, starts, lengths, num_items)
    by_transitions = lambda h, _: transition_scores(h, transitions, popularity, decay)
    last_first = lambda h, users: by_transitions(h, users).scatter_(1, recent_items(h, 1), float("inf"))
    scorers = [("item transitions", by_transitions, 50), ("item transitions, last item first", last_first, 50)]
    scorers += [(run_dir, *best_state_scorer(run_dir, num_items, lengths)) for run_dir in run_dirs]
    for name, score, max_len in scorers:
        ranks, kinds = ranks_and_repeats(score, flat, starts, lengths, "test", max_len)
        print(f"{name}: test NDCG@10 {U.metrics_from_ranks(ranks)['NDCG@10']:.4f}, of which")
        for kind, (share, hit_rate, first, part) in zip(REPEAT_KINDS, ndcg_by_repeat(ranks, kinds)):
            print(f"  {part:.4f} from the {share:.1%} of users whose target {kind} (HR@10 {hit_rate:.3f}, ranked "
                  f"first {first:.3f} among them)")


# ---------------------------------------------------------------------------------------------------------------
# What counts as a win: Welch's t-test over the seeds (docs/results.md, "What counts as a win"). The standard library
# only, no scipy: Student's t distribution through the regularized incomplete beta function.
# ---------------------------------------------------------------------------------------------------------------

LEVEL = 0.05                                      # a difference is a win where the two-sided p is below this


def incomplete_beta(a, b, x):
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1, by its continued fraction
    (Numerical Recipes, section 6.4, evaluated by the modified Lentz method). The fraction converges fast for
    x < (a + 1) / (a + b + 2); above that, I_x(a, b) = 1 - I_{1-x}(b, a) puts it there."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300                                                           # keeps Lentz's divisions finite
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),            # the even step d_2m
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # the odd step d_2m+1
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return math.exp(log_front) * fraction / a
    raise ArithmeticError(f"the incomplete beta fraction did not converge (a {a}, b {b}, x {x})")


def student_t_two_sided(t, df):
    """P(|T| >= |t|) for Student's t distribution with df > 0 degrees of freedom (any real df, as Welch's test
    needs): I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2, 0.5, df / (df + t * t))


def welch(first, second):
    """Welch's t-test of two samples (each of 2 or more values) for a difference of means: (t, degrees of freedom
    by Welch-Satterthwaite, two-sided p). Welch's, not Student's: the seeds of two losses need not spread alike.
    Two samples that do not vary at all give p 0 where their means differ and 1 where they do not."""
    shares = [statistics.variance(x) / len(x) for x in (first, second)]    # squared standard errors
    difference = statistics.mean(first) - statistics.mean(second)
    if sum(shares) == 0:
        return (math.copysign(math.inf, difference) if difference else 0.0), math.inf, float(difference == 0)
    t = difference / math.sqrt(sum(shares))
    df = sum(shares) ** 2 / sum(v * v / (len(x) - 1) for v, x in zip(shares, (first, second)))
    return t, df, student_t_two_sided(t, df)


def decide(first, second, level=LEVEL):
    """The rule, for two losses' per-seed test NDCG@10 (first the better by mean): 'win' where Welch's test gives a
    two-sided p below `level`, 'tie' where it does not, 'one seed' where either has fewer than 2 seeds (one seed
    has no spread to test: it cannot say how far another seed, or another machine, would move it). Returns
    (outcome, the test's (t, df, p) or None)."""
    if min(len(first), len(second)) < 2:
        return "one seed", None
    test = welch(first, second)
    return ("win" if test[2] < level else "tie"), test


def two_best(seeds_by_loss):
    """The two losses with the highest mean (their per-seed values in seeds_by_loss), the better first."""
    ranked = sorted(seeds_by_loss, key=lambda loss: statistics.mean(seeds_by_loss[loss]), reverse=True)
    return ranked[0], ranked[1]


def uniformity_verdict(best, runner_up, outcome):
    """What a group says of the claim "the uniformity loss is best": 'win' where it is best and the test separates
    it from the runner-up, 'tie' where it is one of the two best and the test does not separate them, 'loss'
    otherwise (another loss wins, or two others tie for best), and 'not decided: one seed' where the test cannot
    be made."""
    if outcome == "one seed":
        return "not decided: one seed"
    if outcome == "win":
        return "win" if best == "uniform" else "loss"
    return "tie" if "uniform" in (best, runner_up) else "loss"


def mean_sd(values):
    """'0.0342 ± 0.0014, 3 seeds', or '0.0422, 1 seed'."""
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}, {len(values)} seed{'s' * (len(values) != 1)}"


def group_line(seeds_by_loss, complete):
    """One group's verdict and its numbers: 'tie (uniform 0.0342 ± 0.0014, 3 seeds; infonce 0.0330 ± 0.0008, 3 seeds;
    Welch's t 1.29, df 3.2, p 0.28)': the two best by mean first, then the uniformity loss where it is not one of
    them. A partial group (not every loss ranked this way yet) gets the outcome between its two best so far instead
    of a verdict."""
    best, runner_up = two_best(seeds_by_loss)
    outcome, test = decide(seeds_by_loss[best], seeds_by_loss[runner_up])
    if complete:
        verdict = uniformity_verdict(best, runner_up, outcome)
    else:
        verdict = {"one seed": "not decided: one seed", "win": f"so far {best} wins",
                   "tie": f"so far {best} and {runner_up} tie"}[outcome]
    shown = [best, runner_up] + (["uniform"] if "uniform" in seeds_by_loss and "uniform" not in (best, runner_up)
                                 else [])
    numbers = "; ".join(f"{loss} {mean_sd(seeds_by_loss[loss])}" for loss in shown)
    welch_part = f"; Welch's t {test[0]:.2f}, df {test[1]:.1f}, p {test[2]:.2g}" if test else ""
    return f"{verdict} ({numbers}{welch_part})", verdict


# ---------------------------------------------------------------------------------------------------------------
# The results page
# ---------------------------------------------------------------------------------------------------------------

PROTOCOL_TITLES = {"all_items": "every item ranked", "history_excluded": "the history's items excluded"}


def recorded_test(entry, protocol="all_items"):
    """A record's test metrics under a protocol (uniform_seqrec.PROTOCOLS), or None when it was ranked one way only
    (records from before both were kept rank every item: `test`)."""
    found = entry.get("protocols", {}).get(protocol, {}).get("test")
    if found is None and protocol == ("history_excluded" if entry["config"].get("mask_seen") else "all_items"):
        found = entry["test"]
    return found


def recorded(cell, protocol="all_items"):
    """The test (HR@10, NDCG@10) of every recorded seed of a cell under a protocol (seeds ranked one way only are
    left out of the other)."""
    found = []
    for path in sorted(glob.glob(record_path(cell, "*"))):
        test = recorded_test(read_record(path), protocol)
        if test is not None:
            found.append((test["HR@10"], test["NDCG@10"]))
    return found


def show(values, paper):
    """'ours (±sd) / relative difference to the paper' for one metric (no difference where the paper has no number:
    paper None), or 'not run'."""
    if not values:
        return "not run"
    mean = statistics.mean(values)
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{mean:.4f}{spread}" + (f" ({100 * (mean - paper) / paper:+.0f}%)" if paper is not None else "")


def read_baselines():
    """results/baselines.json, or {} before `experiments.py baselines` has run."""
    if not os.path.isfile(BASELINES):
        return {}
    return R.read_json(BASELINES, "run python experiments.py baselines to write it again")


def baseline_rows(datasets, protocol="all_items"):
    """The two non-neural baselines of results/baselines.json as rows of table_rows()'s shape (no paper value)."""
    found = read_baselines()
    rows = []
    for key, label in (("popularity", "popularity (no model)"), ("transitions", "item transitions (no model)")):
        fields = [label]
        for dataset in datasets:
            baseline = found.get(dataset, {}).get(key, {})
            test = (baseline if protocol == "all_items" else baseline.get(protocol, {})).get("test")
            fields += ["-", f"{test['HR@10']:.4f}" if test else "not run", "-",
                       f"{test['NDCG@10']:.4f}" if test else "not run"]
        rows.append("| " + " | ".join(fields) + " |")
    return rows


def table_rows(row_cells, paper_rows, columns, protocol="all_items"):
    """Markdown rows: label, then for each column 'paper HR | ours HR | paper NDCG | ours NDCG'; a row whose paper
    values are None (beyond the paper) shows '-' for them."""
    rows = []
    for label, cell_of_column in row_cells:
        fields = [label]
        for column, cell in enumerate(cell_of_column):
            runs = recorded(cell, protocol) if cell else []
            paper_hr, paper_ndcg = paper_rows[label][column]
            one_way = not runs and cell and recorded(cell, "all_items")     # its folder was gone: ranked one way
            paper_text = lambda value: "-" if value is None else f"{value:.4f}"
            fields += [paper_text(paper_hr), "ranked one way" if one_way else show([r[0] for r in runs], paper_hr),
                       paper_text(paper_ndcg), "ranked one way" if one_way else show([r[1] for r in runs], paper_ndcg)]
        rows.append("| " + " | ".join(fields) + " |")
    header = "| | " + " | ".join(f"{c} HR@10 paper | ours | NDCG@10 paper | ours" for c in columns) + " |"
    return [header, "|" + "---|" * (1 + 4 * len(columns)), *rows]


def best_first(scores):
    """The keys of the scores that are not None, best first, joined by ' > '."""
    return " > ".join(sorted((k for k, v in scores.items() if v is not None), key=scores.get, reverse=True))


def order_against_paper(label, ours, paper, names, peak=None):
    """One line of claims(): the entries of `ours` that have run (not None) ordered by NDCG@10, beside the paper's
    order of the same entries. Once all have run and `peak` names the entries (e.g. "beta"), the line also says
    which entry is best in ours and in the paper's."""
    paper = {k: paper[k] for k in ours if ours[k] is not None}
    if len(paper) < len(ours):
        done = f"{names} run so far ({', '.join(paper) or 'none'})"
    elif peak:
        done = (f"NDCG@10 peaks at {peak} {max(ours, key=ours.get)} (paper: {max(paper, key=paper.get)}); "
                f"all {names}")
    else:
        done = f"all {names}"
    return f"- {label}, {done}, by NDCG@10: ours {best_first(ours) or '-'}; paper {best_first(paper) or '-'}"


RULE = (f"the rule (docs/results.md, \"What counts as a win\"): Welch's t-test over the seeds of the group's two "
        f"best losses by mean, two-sided p < {LEVEL:g} a win, else a tie; fewer than 2 seeds of either: not decided")


def claims(protocol="all_items"):
    """Which of the paper's claims hold on the cells run so far (partial groups are compared on what has run);
    whether the uniformity loss is best in a backbone x dataset group is decided by the rule (decide())."""
    lines = []
    def mean_ndcg(cell):
        runs = recorded(cell, protocol)
        return statistics.mean(r[1] for r in runs) if runs else None

    verdicts, groups, partial = [], [], []
    for column, d in enumerate(DATASETS):
        for m in MODELS:
            seeds = {loss: [r[1] for r in recorded(f"table1/{d}/{m}/{loss}", protocol)] for loss in LOSSES}
            seeds = {loss: values for loss, values in seeds.items() if values}
            if len(seeds) == len(LOSSES):
                line, verdict = group_line(seeds, complete=True)
                verdicts.append(verdict)
                groups.append(f"  - {m} on {d}: {line}")
            elif len(seeds) > 1:
                paper = {loss: PAPER_TABLE1[m, loss][column][1] for loss in seeds}
                partial.append(f"  - {m} on {d}, partial (ranked this way so far: {', '.join(seeds)}): "
                               f"{group_line(seeds, complete=False)[0]}; the paper's order {best_first(paper)}")
    counts = ", ".join(f"{word} in {verdicts.count(word)}" for word in ("win", "tie", "loss"))
    lines.append(f"- The uniformity loss against the other losses per backbone x dataset (test NDCG@10, mean ± sd and "
                 f"seeds of each; {RULE}): "
                 + (f"{counts} of {len(verdicts)} complete groups; not decided (one seed) in "
                    f"{verdicts.count('not decided: one seed')}" if verdicts else "none complete yet"))
    lines += groups + partial
    # CE beside the paper's claim, not in it: the count above stays "best of the paper's four losses"
    against_ce = [(f"{m} on {d}", mean_ndcg(f"table1/{d}/{m}/uniform"), mean_ndcg(f"table1/{d}/{m}/{CE}"))
                  for d in DATASETS for m in MODELS]
    against_ce = [(group, uniform, ce) for group, uniform, ce in against_ce if uniform is not None and ce is not None]
    lines.append(f"- Beside it, beyond the paper (CE, softmax over every item, is not one of the four losses counted "
                 f"above): the uniformity loss above CE (test NDCG@10) in {sum(u > c for _, u, c in against_ce)} of "
                 f"{len(against_ce)} backbone x dataset groups where both have run"
                 + (" (none yet)" if not against_ce else "")
                 + "".join(f"; {group}: uniformity {u:.4f}, CE {c:.4f}" for group, u, c in against_ce))
    for column, d in enumerate(("beauty", "toys")):
        lines.append(order_against_paper(f"Table 2 on {d}", {row: mean_ndcg(f"table2/{d}/{row}") for row in ABLATIONS},
                                         {row: PAPER_TABLE2[row][column][1] for row in ABLATIONS}, "rows"))
        lines.append(order_against_paper(f"Table 3 on {d}", {b: mean_ndcg(f"table3/{d}/{b}") for b in BETAS},
                                         {b: PAPER_TABLE3[b][column][1] for b in BETAS}, "betas", peak="beta"))
    for column, d in enumerate(DATASETS):
        ours = {m: mean_ndcg(f"table1/{d}/{m}/uniform") for m in MODELS}
        if any(v is not None for v in ours.values()):
            lines.append(order_against_paper(f"Backbones with the uniformity loss on {d}", ours,
                                             {m: PAPER_TABLE1[m, "uniform"][column][1] for m in MODELS}, "backbones"))
    return lines


def both_protocols(entry, sep, one_way):
    """A record's test HR@10 and NDCG@10 under each protocol (uniform_seqrec.PROTOCOLS' order), joined by `sep`;
    `one_way` for a protocol it was not ranked under."""
    tests = (recorded_test(entry, protocol) for protocol in U.PROTOCOLS)
    return [f"{t['HR@10']:.4f}{sep}{t['NDCG@10']:.4f}" if t else one_way for t in tests]


def negatives_row(loss, kind, cell):
    """One row of the negatives table: a cell's test metrics under both protocols and its own-first share."""
    path = record_path(cell, 1)
    if not os.path.isfile(path):
        return f"| {loss} | {kind} | not run | not run | | {cell} |"
    entry = read_record(path)
    shown = both_protocols(entry, " / ", "ranked one way")
    share = entry.get("top_item_in_history", {}).get("test")
    own = f"{100 * share:.0f}%" if share is not None else "-"
    return f"| {loss} | {kind} | {shown[0]} | {shown[1]} | {own} | {cell} |"


def beyond_the_paper():
    """Two comparisons the paper does not make, on Beauty: InfoNCE with K negatives, and Caser's last layer."""
    def test_of(cell):
        runs = recorded(cell)
        if not runs:
            return "not run | not run"
        spread = lambda i: f" ± {statistics.stdev(r[i] for r in runs):.4f}" if len(runs) > 1 else ""
        return " | ".join(f"{statistics.mean(r[i] for r in runs):.4f}{spread(i)}" for i in (0, 1))
    negatives = [("1 (this is BPR)", "table1/beauty/sasrec/bpr"),
                 *((k, f"infonce/beauty/{k}") for k in INFONCE_NEGATIVES),
                 ("256, the whole batch (Table 1's InfoNCE)", "table1/beauty/sasrec/infonce"),
                 ("the uniformity loss, for comparison", "table1/beauty/sasrec/uniform")]
    caser = [(loss, f"table1/beauty/caser/{loss}", f"caser-none/beauty/{loss}") for loss in LOSSES]

    def first_run(loss):
        """The README's command's row: its result both ways beside the lr 1e-3 cell's."""
        path = record_path(f"readme/beauty/{loss}", 1)
        entry = read_record(path) if os.path.isfile(path) else None
        both = (" | ".join(both_protocols(entry, " | ", "- | -"))
                + f" | {entry['best_epoch']} / {entry['epochs']} | {entry['wall_seconds'] / 60:.0f} min"
                if entry else "not run | not run | not run | not run | | ")
        paper = PAPER_TABLE1["sasrec", loss][0]
        return f"| {loss} | {paper[0]:.4f} / {paper[1]:.4f} | {both} | {test_of(f'table1/beauty/sasrec/{loss}')} |"
    return ["## Beyond the paper: how many negatives InfoNCE sees (SASRec, Beauty)", "",
            "Each history's own negative and the next K - 1 of its batch (each an independent uniform draw); "
            "the paper does not say "
            "what its InfoNCE saw (its SASRec + InfoNCE: HR@10 0.0588, NDCG@10 0.0261).", "",
            "| negatives per history (K) | test HR@10 | test NDCG@10 | cell |", "|---|---|---|---|",
            *(f"| {k} | {test_of(cell)} | {cell} |" for k, cell in negatives), "",
            "## Beyond the paper: Caser's last layer (Beauty)", "",
            "The original Caser (and RecBole's) has a ReLU on its fully connected layer, our default; without it, "
            "history vectors can point anywhere on the sphere (`--caser-activation none`).", "",
            "| loss | paper HR@10 | ReLU (default) HR@10 | none HR@10 | paper NDCG@10 | ReLU NDCG@10 | none NDCG@10 |",
            "|---|---|---|---|---|---|---|",
            *(f"| {loss} | {PAPER_TABLE1['caser', loss][0][0]:.4f} | {test_of(relu).split(' | ')[0]} | "
              f"{test_of(none).split(' | ')[0]} | {PAPER_TABLE1['caser', loss][0][1]:.4f} | "
              f"{test_of(relu).split(' | ')[1]} | {test_of(none).split(' | ')[1]} |" for loss, relu, none in caser),
            "",
            "## Beyond the paper: negatives that may be the user's own items (SASRec, Toys)", "",
            "Table 1 draws no negative from the user's training items (spec §2, as S3-Rec); the authors' code and "
            "RecBole exclude only the example's own positive (`--negatives any`). Test HR@10 / NDCG@10; \"own\": "
            "the share of test users whose top item is one of their own.", "",
            "| loss | negatives | every item ranked | history excluded | own | cell |", "|---|---|---|---|---|---|",
            *(negatives_row(loss, kind, cell) for loss in NEGATIVES_LOSSES for kind, cell in
              (("unseen (Table 1)", f"table1/toys/sasrec/{loss}"), ("any", f"negatives/toys/{loss}"))),
            "",
            "## What a first-time user gets: the README's own command (SASRec, Beauty)", "",
            "`python uniform_seqrec.py --model sasrec --loss uniform --data beauty` exactly as written (every default: "
            "lr 3e-4, inside the paper's grid; seed 42), and the same with `--loss bce`; beside them the lr 1e-3 cells "
            "of Table 1 (every item ranked).", "",
            "| loss | paper HR@10 / NDCG@10 | HR@10 | NDCG@10 | history excluded: HR@10 | NDCG@10 | best epoch / "
            "epochs | wall | lr 1e-3 cell: HR@10 | NDCG@10 |", "|---|---|---|---|---|---|---|---|---|---|",
            *(first_run(loss) for loss in README_LOSSES),
            ""]


def paper_cells():
    """(table, dataset, model, cell id, the paper's (HR@10, NDCG@10)) of every cell of Tables 1-3 (cells that share a
    run are listed once per table, as the tables show them)."""
    found = [("table1", d, m, f"table1/{d}/{m}/{loss}", PAPER_TABLE1[m, loss][c])
             for c, d in enumerate(DATASETS) for m in MODELS for loss in LOSSES]
    found += [("table2", d, "sasrec", f"table2/{d}/{row}", PAPER_TABLE2[row][c])
              for c, d in enumerate(("beauty", "toys")) for row in ABLATIONS if row not in "ae"]
    found += [("table3", d, "sasrec", f"table3/{d}/{b}", PAPER_TABLE3[b][c])
              for c, d in enumerate(("beauty", "toys")) for b in BETAS if b != "0.05"]
    return found


def protocol_evidence():
    """Markdown: for each dataset and protocol, how the cells ranked both ways land against the paper (within 10% and
    25%, median absolute difference, per metric), and each cell's NDCG@10 / HR@10 beside the paper's. Only cells
    with both protocols recorded count, so that the two protocols are compared on the same cells. (Table 2's rows
    (a) and (e) and Table 3's 0.05 are Table 1 cells and count once.)"""
    both = [(table, d, m, cell, paper, [recorded(cell, p) for p in U.PROTOCOLS])
            for table, d, m, cell, paper in paper_cells()]
    both = [(table, d, m, cell, paper, [statistics.mean(r[i] for r in runs) for runs in per_protocol for i in (0, 1)])
            for table, d, m, cell, paper, per_protocol in both if all(per_protocol)]
    lines = ["| dataset | cells | protocol | HR@10 within 10% / 25% | median abs. diff. | NDCG@10 within 10% / 25% | "
             "median abs. diff. |", "|---|---|---|---|---|---|---|"]
    for d in DATASETS:
        mine = [row for row in both if row[1] == d]
        for index, protocol in enumerate(U.PROTOCOLS):
            fields = []
            for metric in (0, 1):
                off = [abs(row[5][2 * index + metric] / row[4][metric] - 1) for row in mine]
                fields.append(f"{sum(o <= 0.10 for o in off)} / {sum(o <= 0.25 for o in off)}" if off else "-")
                fields.append(f"{100 * statistics.median(off):.0f}%" if off else "-")
            lines.append(f"| {d} | {len(mine)} | {PROTOCOL_TITLES[protocol]} | " + " | ".join(fields) + " |")
    lines += ["", "NDCG@10 / HR@10 of every recorded cell beside the paper's (where inside the top 10 the targets sit; "
              "a protocol moves it), and the share of test users whose top-ranked item (every item ranked) is one of "
              "their own history's, where the run folder was there to tell:", "",
              "| cell | paper | ours, every item ranked | ours, history excluded | paper NDCG@10 | ours, every item | "
              "ours, history excluded | top item the user's own |", "|---|---|---|---|---|---|---|---|"]
    for table, d, m, cell, paper in paper_cells():
        per_protocol = [recorded(cell, p) for p in U.PROTOCOLS]
        if not per_protocol[0]:
            continue
        ratio, value = [], []
        for runs in per_protocol:
            if runs:
                hr, ndcg = (statistics.mean(r[i] for r in runs) for i in (0, 1))
                ratio.append(f"{ndcg / hr:.3f}")
                value.append(f"{ndcg:.4f} ({100 * (ndcg / paper[1] - 1):+.0f}%)")
            else:
                ratio.append("ranked one way")
                value.append("ranked one way")
        shares = [read_record(p).get("top_item_in_history", {}).get("test")
                  for p in sorted(glob.glob(record_path(cell, "*")))]
        shares = [x for x in shares if x is not None]
        lines.append(f"| {cell} | {paper[1] / paper[0]:.3f} | {ratio[0]} | {ratio[1]} | {paper[1]:.4f} | {value[0]} | "
                     f"{value[1]} | {f'{100 * statistics.mean(shares):.0f}%' if shares else '-'} |")
    return lines


def ranked_one_way():
    """'cell seed N' of every record that holds one protocol only (its run folder was gone before both were kept)."""
    found = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "cells", "*.json"))):
        entry = read_record(path)
        if "protocols" not in entry:
            found.append(f"{entry['cell']} seed {entry['seed']}")
    return found


def unfinished_runs(max_seed=MAX_SEED):
    """(cell, seed, epochs done, best epoch, its validation NDCG@10) of every run started but not finished."""
    found, hyperparameters = [], read_hyperparameters()
    for cell in unique_runs(cells("all", DATASETS, MODELS), 1):
        for seed in range(1, max_seed + 1):
            run_dir = run_folder(cell, seed, hyperparameters)
            epochs = read_log(run_dir)
            if epochs and not os.path.isfile(os.path.join(run_dir, "metrics.json")):
                best = max(epochs, key=lambda r: r["valid_NDCG@10"])
                found.append((cell, seed, len(epochs), best["epoch"], best["valid_NDCG@10"]))
    return found


UNFINISHED_TITLE = "## Runs started but not finished (not in the tables above)"


def tables(protocol):
    """The markdown of Tables 1-3 under one protocol, with the baselines ranked the same way."""
    datasets_title = ["Beauty", "Toys", "Sports", "Yelp"]
    pairs = [(m, loss) for m in MODELS for loss in TABLE1_LOSSES]
    title = PROTOCOL_TITLES[protocol]
    paper = lambda m, loss: PAPER_TABLE1[m, loss] if loss != CE else [(None, None)] * len(DATASETS)
    table1 = table_rows([(f"{m} {loss}", [f"table1/{d}/{m}/{loss}" for d in DATASETS]) for m, loss in pairs],
                        {f"{m} {loss}": paper(m, loss) for m, loss in pairs}, datasets_title, protocol)
    table2 = table_rows([(row, [f"table2/{d}/{row}" for d in ("beauty", "toys")]) for row in ABLATIONS],
                        PAPER_TABLE2, ["Beauty", "Toys"], protocol)
    table3 = table_rows([(beta, [f"table3/{d}/{beta}" for d in ("beauty", "toys")]) for beta in BETAS],
                        PAPER_TABLE3, ["Beauty", "Toys"], protocol)
    return [f"## Table 1: backbones x losses ({title})", "",
            "Each backbone's fifth row, ce, is beyond the paper: full-softmax cross-entropy over every item (RecBole's "
            "SASRec default), which the paper did not run, so it has no paper number; \"What holds\" counts the "
            "paper's four losses and shows CE beside them.", "",
            *table1, *baseline_rows(DATASETS, protocol), "",
            f"## Table 2: ablation of the loss (SASRec; rows as in the paper; {title})", "",
            "(a) BCE; (b) normalized BCE; (c) + L_hom; (d) + L_het; (e) the full loss; (f) no L_rec; "
            "(g) no normalization.", "", *table2, *baseline_rows(["beauty", "toys"], protocol), "",
            f"## Table 3: beta (SASRec; {title})", "", *table3, *baseline_rows(["beauty", "toys"], protocol), ""]


def unfinished_section(unfinished, previous_page):
    """The page's list of runs in progress: from the local run folders, or, where there are none (a fresh clone),
    the list the committed page had, unchanged."""
    if not os.path.isdir(os.path.join(HERE, "runs")) and os.path.isfile(previous_page):
        with open(previous_page) as f:
            old = f.read()
        return old[old.index(UNFINISHED_TITLE):].rstrip("\n").split("\n") + [""] if UNFINISHED_TITLE in old else []
    if not unfinished:
        return []
    return [UNFINISHED_TITLE, "",
            "Validation numbers only, so far; `python experiments.py run CELL --seed SEED` (or `./run_all.sh`) "
            "resumes each from its last finished epoch.", "",
            "| cell | seed | epochs done | best epoch so far | its validation NDCG@10 |", "|---|---|---|---|---|",
            *(f"| {c} | {s} | {n} | {b} | {v:.4f} |" for c, s, n, b, v in unfinished), ""]


def report(path=None, unfinished=()):
    path = path or os.path.join(RESULTS, "RESULTS.md")
    entries = [read_record(p) for p in sorted(glob.glob(os.path.join(RESULTS, "cells", "*.json")))]
    runs = ["| cell | seed | lr | dim | layers | heads | beta | best epoch / epochs | device | machine | wall | "
            "commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        c = e["config"]
        runs.append(f"| {e['cell']} | {e['seed']} | {c['lr']:g} | {c['dim']} | {c['layers']} | {c['heads']} | "
                    f"{c['beta']:g} | {e['best_epoch']} / {e['epochs']} | {e['device']} | "
                    f"{machine_label(e.get('machine'))} | {e['wall_seconds'] / 60:.0f} min | {e['commit']} |")
    one_way = ranked_one_way()
    text = "\n".join([
        "# Results beside the paper's",
        "",
        "Generated by `python experiments.py report` from `results/cells/*.json`; do not edit by hand.",
        "Each cell: test HR@10 and NDCG@10 for every user, with the relative difference to the paper in brackets;",
        "mean ± sd where several seeds ran. Every table comes twice, once per ranking protocol (the paper does",
        "not say which it used): every item ranked, and the items of the user's history excluded first (as the",
        "S3-Rec code these data files come from does; a target that repeats a history item then cannot be hit).",
        "\"not run\" marks a cell with no finished run; the command that fills it is in the README.",
        "The rows marked \"no model\" are two baselines on the same protocol (`python experiments.py baselines`):",
        "item popularity, and first-order item transitions (how often each item followed the user's last three",
        "items in the training parts, weighted decay^k, decay chosen on validation; popularity breaks ties).",
        "A seed's numbers repeat exactly only on the machine that made them (docs/results.md, \"What counts as a",
        "win\"); the last table names each run's machine where its record holds it.",
        "",
        *(f"## What holds so far ({PROTOCOL_TITLES[p]})\n\n" + "\n".join(claims(p)) + "\n" for p in U.PROTOCOLS),
        "## Which protocol: the cells ranked both ways against the paper", "",
        "Only cells with both protocols recorded; Table 2 (a), (e) and Table 3's 0.05 are Table 1 cells and count",
        "once. docs/results.md reads these numbers.", "",
        *protocol_evidence(), "",
        *tables("all_items"),
        *tables("history_excluded"),
        *(["Ranked one way only (every item ranked; their run folders were gone before both protocols were kept): "
           + ", ".join(one_way) + ".", ""] if one_way else []),
        *beyond_the_paper(),
        "## Runs behind the cells", "", *runs, "",
        *unfinished_section(unfinished, path),
    ])
    os.makedirs(RESULTS, exist_ok=True)
    R.save_atomically(text, path)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------------
# Figure 1
# ---------------------------------------------------------------------------------------------------------------

def figure_run_log(cell):
    """(per-epoch log, finished?) of a cell's seed-1 run: its recorded run, else its run folder so far, else None."""
    recorded_runs = sorted(glob.glob(record_path(cell, "*")))[:1]
    if recorded_runs:
        run_dir = os.path.join(HERE, read_record(recorded_runs[0])["run_dir"])
    else:
        run_dir = run_folder(cell, 1, read_hyperparameters())
    log = read_log(run_dir)
    return (log, bool(recorded_runs)) if log is not None else None


def write_figure_data(name, data):
    """Write a figure's numbers to name.json; return matplotlib.pyplot to draw name.png, or None (and say so) when
    matplotlib is not installed: the numbers are the result, the picture an optional view of them."""
    os.makedirs(os.path.dirname(name), exist_ok=True)
    with open(name + ".json", "w") as f:
        json.dump(data, f, indent=1)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {name}.json (install matplotlib for the PNG: pip install matplotlib)")
        return None
    return plt


def figure1(out_dir=None):
    """(a) validation NDCG@10 per epoch of unnormalized BCE (Table 2 (a)) and normalized BCE ((b)), Beauty;
    (b, c) histograms of pairwise cosine similarity of history and item vectors of the normalized run, at its
    first epoch and at its best epoch. Writes figure1.json always and figure1.png when matplotlib is installed."""
    out_dir = out_dir or RESULTS
    logs, finished = {}, {}
    for row, label in (("a", "unnormalized BCE"), ("b", "normalized BCE")):
        found = figure_run_log(f"table2/beauty/{row}")
        if found:
            logs[label], finished[label] = found
    if "normalized BCE" not in logs:
        sys.exit("figure1: Table 2 row (b) on Beauty has not been run yet: ./run_all.sh figure1")
    normalized = logs["normalized BCE"]
    best = max(normalized, key=lambda r: r["valid_NDCG@10"])
    early, late = normalized[0], best
    data = {"validation_ndcg10": {k: [r["valid_NDCG@10"] for r in v] for k, v in logs.items()},
            "histogram_bins": [-1 + 2 * i / 40 for i in range(41)],
            "early_epoch": early["epoch"], "late_epoch": late["epoch"],
            **{f"{what}_{when}": row[f"{what}_cosine_histogram"] for what in ("history", "item")
               for when, row in (("early", early), ("late", late))},
            "uniformity_per_epoch": {k: [r["history_uniformity"] for r in v] for k, v in logs.items()},
            "finished": finished}
    plt = write_figure_data(os.path.join(out_dir, "figure1"), data)
    if plt is None:
        return
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, values in data["validation_ndcg10"].items():
        unfinished = "" if data["finished"][label] else f" (unfinished, {len(values)} epochs)"
        axes[0].plot(range(1, len(values) + 1), values, label=label + unfinished)
    axes[0].set(title="(a) validation NDCG@10, Beauty, SASRec", xlabel="epoch", ylabel="NDCG@10")
    axes[0].legend()
    centers = [(a + b) / 2 for a, b in zip(data["histogram_bins"], data["histogram_bins"][1:])]
    for axis, what, title in ((axes[1], "history", "(b) history vectors"), (axes[2], "item", "(c) item vectors")):
        for when in ("early", "late"):
            counts = data[f"{what}_{when}"]
            total = sum(counts)
            axis.plot(centers, [c / total for c in counts], label=f"epoch {data[f'{when}_epoch']}")
        axis.set(title=f"{title}, normalized BCE", xlabel="pairwise cosine similarity", ylabel="share of pairs")
        axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(out_dir, "figure1.png"), dpi=120)
    print(f"wrote {out_dir}/figure1.png and figure1.json")


# ---------------------------------------------------------------------------------------------------------------
# Alignment and uniformity (Wang & Isola): the paper's argument in one picture
# ---------------------------------------------------------------------------------------------------------------

ALIGNMENT_RUNS = [("BCE", "table1/{}/{}/bce"), ("BPR", "table1/{}/{}/bpr"), ("InfoNCE", "table1/{}/{}/infonce"),
                  ("uniformity loss", "table1/{}/{}/uniform"), ("normalized BCE", "table2/{}/b")]  # (b): SASRec


def figure_alignment(dataset="toys", model="sasrec", out_dir=None):
    """Per-epoch trajectories of one backbone's runs on one dataset in the alignment-uniformity plane: x the
    uniformity of history vectors (and, in a second panel, of item vectors), y the alignment of training pairs; each
    run's best validation epoch marked. Runs whose log predates the alignment statistic are left out. Writes
    alignment_uniformity_<dataset>[_<model>].json, and the PNG when matplotlib is installed."""
    out_dir = out_dir or RESULTS
    trajectories = {}
    for label, cell in ALIGNMENT_RUNS:
        if cell.startswith("table2") and model != "sasrec":
            continue
        found = figure_run_log(cell.format(dataset, model))
        rows = [r for r in found[0] if "alignment" in r] if found else []
        if rows:
            best = max(rows, key=lambda r: r["valid_NDCG@10"])["epoch"]
            trajectories[label] = {"epoch": [r["epoch"] for r in rows], "alignment": [r["alignment"] for r in rows],
                                   "history_uniformity": [r["history_uniformity"] for r in rows],
                                   "item_uniformity": [r["item_uniformity"] for r in rows],
                                   "best_epoch": best, "finished": found[1]}
    if not trajectories:
        sys.exit(f"figure-alignment: no {model} run on {dataset} has logged the alignment yet")
    name = os.path.join(out_dir, f"alignment_uniformity_{dataset}" + ("" if model == "sasrec" else f"_{model}"))
    plt = write_figure_data(name, trajectories)
    if plt is None:
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, which in ((axes[0], "history"), (axes[1], "item")):
        for label, run in trajectories.items():
            x, y = run[f"{which}_uniformity"], run["alignment"]
            unfinished = "" if run["finished"] else ", unfinished"
            line, = axis.plot(x, y, marker=".", markersize=3, linewidth=1,
                              label=f"{label} (best epoch {run['best_epoch']}{unfinished})")
            axis.plot(x[0], y[0], "o", color=line.get_color(), fillstyle="none")
            best = run["epoch"].index(run["best_epoch"])
            axis.plot(x[best], y[best], "*", color=line.get_color(), markersize=12)
        axis.set(xlabel=f"uniformity of {which} vectors: log E exp(-2 ||x - y||^2)",
                 ylabel="alignment of training pairs: E ||h - i||^2",
                 title=f"{MODEL_NAMES[model]} on {dataset.capitalize()}: {which} vectors")
    axes[0].legend(fontsize=8)
    figure.suptitle("Each run's epochs (circle: epoch 1, star: best validation epoch); lower is better on both axes",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(name + ".png", dpi=120)
    print(f"wrote {name}.png and .json")


def main(argv=None):
    parser = R.OneLineErrorParser(prog="experiments.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="print cell ids, one per line (seeds as a second field)")
    listing.add_argument("what", choices=["table1", "table2", "table3", "figure1", "infonce", "caser-none",
                                          "negatives", "readme", "tune", "all"])
    listing.add_argument("--datasets", default=",".join(DATASETS))
    listing.add_argument("--models", default=",".join(MODELS))
    listing.add_argument("--seeds", type=int, default=1)
    running = commands.add_parser("run", help="run one cell (skipped when finished) and record it")
    running.add_argument("cell")
    running.add_argument("--seed", type=int, default=1)
    running.add_argument("--device", default=None)
    commands.add_parser("choose", help="write results/hyperparameters.tsv from the tuning runs")
    commands.add_parser("report", help="record every finished run of a cell, then write results/RESULTS.md")
    rescoring = commands.add_parser("rescore", help="add both ranking protocols to the records of the given cells "
                                                    "(default: all) whose run folders are still here")
    rescoring.add_argument("cells", nargs="*")
    commands.add_parser("baselines", help="write results/baselines.json: popularity and item transitions (CPU, "
                                          "40 s to 2.5 min per dataset)")
    commands.add_parser("figure1", help="write results/figure1.png (needs matplotlib) and figure1.json")
    alignment = commands.add_parser("figure-alignment", help="write results/alignment_uniformity_<dataset>.png "
                                                             "(needs matplotlib) and .json from one backbone's runs")
    alignment.add_argument("--dataset", default="toys", choices=DATASETS)
    alignment.add_argument("--model", default="sasrec", choices=MODELS)
    repeating = commands.add_parser("repeats", help="print how much of each test NDCG@10 comes from targets that "
                                                    "repeat a history item: baselines and the given run folders")
    repeating.add_argument("--dataset", default="yelp", choices=DATASETS)
    repeating.add_argument("run_dirs", nargs="*")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)               # Ctrl-C is KeyboardInterrupt again
    try:
        return command(args)
    except (R.ConfigError, R.DataError) as err:                            # bad input: one line, never a traceback
        print(f"experiments.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nexperiments.py: interrupted (a training keeps its last finished epoch; run the same command to "
              "resume)", file=sys.stderr)
        return 130


def command(args):
    """Carry out one parsed command line; its exit status."""
    for name in ("seed", "seeds"):
        if getattr(args, name, 1) is not None and not 1 <= getattr(args, name, 1) <= MAX_SEED:
            raise R.ConfigError(f"--{name} must be from 1 to {MAX_SEED}, the seeds the results page reads "
                                f"(got {getattr(args, name)})")
    if args.command == "list":
        datasets, models = args.datasets.split(","), args.models.split(",")
        for value, known in [(d, DATASETS) for d in datasets] + [(m, MODELS) for m in models]:
            if value not in known:
                raise R.ConfigError(f"'{value}' is not one of {', '.join(known)}")
        for seed in range(1, args.seeds + 1):
            for cell in unique_runs(cells(args.what, datasets, models), seed):
                print(cell, seed)
    elif args.command == "run":
        return run_cell(args.cell, args.seed, args.device)
    elif args.command == "choose":
        choose()
    elif args.command == "baselines":
        baselines()
    elif args.command == "rescore":
        rescore_recorded(args.cells)
    elif args.command == "report":
        failed = record_all()
        report(unfinished=unfinished_runs())
        return 2 if failed else 0
    elif args.command == "figure-alignment":
        figure_alignment(args.dataset, args.model)
    elif args.command == "repeats":
        repeats(args.dataset, args.run_dirs)
    else:
        figure1()
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):                                          # not on Windows
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)                      # `experiments.py list | head` ends quietly
    sys.exit(main())
