"""The paper's experiments as cells: which runs make each table cell, running them, recording them, and the
hyperparameter choice from the tuning runs.

A cell is one training run of uniform_seqrec.py; its run folder is the default one
(runs/<data>-<model>-<loss>-<hash of the configuration>), so cells with the same configuration share a run (Table 2
row (e), Table 3 beta 0.05 and Table 1 SASRec + uniform are one run). Each finished cell is recorded as
results/cells/<cell id>-seed<seed>.json with its metrics, configuration, seed, commit, device, the machine that
trained it (CPU model or GPU name, torch version; from its metrics.json) and wall time. experiments.py is the
command line (list, run, choose, rescore, report); report.py writes the results page from the records.
"""
import glob
import json
import math
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # before torch's import: see uniform_seqrec.py
import torch

import runs as R
import uniform_seqrec as U
from data_prep import BENCHMARKS, DataError, read_sequences

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
# Beyond the paper, on Beauty, two studies of SASRec against Table 1's cell of each loss, one choice changed:
# - regime (issue 32): trained per user and packed (--examples users --pack), as the README tells SASRec users to
#   train per user: the fast way it offers (an epoch 3.2x to 4.5x faster on one thread, docs/performance.md). It
#   differs from its partner in the examples and the packing together, which is what a user of the fast way changes;
#   the packed path alone was compared on one seed (docs/results.md, "The packed path").
# - block (issue 35): the original SASRec's blocks (--block original), in Table 1's default length groups, so that it
#   differs from its partner in the block alone. BCE, whose gap to the paper is unexplained, and the uniformity loss.
REGIME_LOSSES = LOSSES
REGIME_FLAGS = ["--examples", "users", "--pack"]
BLOCK_LOSSES = ["bce", "uniform"]
BLOCK_FLAGS = ["--block", "original"]
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
    table3/beauty/0.01, regime/beauty/bce or tune/beauty/sasrec/bce/lr=2e-4,dim=128,layers=2."""
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
    if table == "regime":                                                   # Table 1's SASRec, trained per user
        return [*cell_arguments(f"table1/{dataset}/sasrec/{rest[0]}", hyperparameters), *REGIME_FLAGS]
    if table == "block":                                                    # Table 1's SASRec, the original's block
        return [*cell_arguments(f"table1/{dataset}/sasrec/{rest[0]}", hyperparameters), *BLOCK_FLAGS]
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
    """Cell ids of a table (table1, table2, table3, figure1, infonce, caser-none, negatives, readme, regime, block,
    tune, all), narrowed to datasets and models."""
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
    # The side studies after CE's cells, for the same reason: added later, so last in `all`
    if what in ("regime", "all") and "beauty" in datasets and "sasrec" in models:
        found += [f"regime/beauty/{loss}" for loss in REGIME_LOSSES]
    if what in ("block", "all") and "beauty" in datasets and "sasrec" in models:
        found += [f"block/beauty/{loss}" for loss in BLOCK_LOSSES]
    if what == "tune":
        found += [cell for d in datasets for m in models for loss in LOSSES for cell in tuning_grid(d, m, loss)]
        # CE's grids after all the others, as in Table 1: every earlier tuning cell keeps its line of the list
        found += [cell for d in datasets for m in models for cell in tuning_grid(d, m, CE)]
    return list(dict.fromkeys(found))                                       # in order, without repeats


def tuning_grid(dataset, model, loss):
    """The tuning cells of one Table 1 cell, one per grid point: lr, then dim, then layers (= heads) rising, the
    last fastest; Caser has no depth, so lr x dim."""
    layers = ["1"] if model == "caser" else TUNE_LAYERS
    return [f"tune/{dataset}/{model}/{loss}/lr={lr},dim={dim},layers={n}" for lr in TUNE_LR for dim in TUNE_DIM
            for n in layers]


def run_folder(cell, seed, hyperparameters):
    """The default run folder uniform_seqrec.py gives a cell, or None when its data file is missing."""
    try:
        return R.configure([*cell_arguments(cell, hyperparameters), *seed_arguments(cell, seed)])[1]
    except (R.ConfigError, DataError):
        return None


def cell_settings(cell, hyperparameters=None, seed=1):
    """The configuration a cell's run has now, as uniform_seqrec.py resolves it (the cell's flags, its row of
    results/hyperparameters.tsv, the defaults; configure() without its data file, so a checkout without the data
    reads it too)."""
    hyperparameters = read_hyperparameters() if hyperparameters is None else hyperparameters
    argv = [*cell_arguments(cell, hyperparameters), *seed_arguments(cell, seed)]
    if tuple(argv) not in SETTINGS_READ:                                    # the page asks for a cell's many times
        config = vars(R.build_parser().parse_args(argv))
        config.update(asdict(U.Config(**{key: config[key] for key in R.CONFIG_DEFAULTS})))
        SETTINGS_READ[tuple(argv)] = config
    return dict(SETTINGS_READ[tuple(argv)])


SETTINGS_READ = {}                                                          # cell_settings' argv -> configuration


def other_length(cell, seed, found, hyperparameters=None):
    """[(key, the run's value, the cell's)] for the epochs and patience where a run folder's configuration (`found`:
    its config.json or metrics.json's) differs from what the cell asks: a command asking for more extends the
    cell's folder in place (runs.extended_folder), and that longer run is not the cell's. A key the run does not
    hold counts as the cell's."""
    wanted = cell_settings(cell, hyperparameters, seed)
    return [(key, found[key], wanted[key]) for key in R.EXTENDABLE_KEYS if key in found and found[key] != wanted[key]]


def extended_by_running(differing):
    """Whether the cell's own run extends a folder of other epochs or patience (other_length's `differing`): each of
    its values is at most the cell's."""
    return all(isinstance(value, int) and value <= asked for _, value, asked in differing)


def not_the_cells_run(cell, seed, run_dir, differing):
    """The one line that refuses a run folder of other epochs or patience (other_length's `differing`) as the
    cell's, and how to restore the cell."""
    theirs = ", ".join(f"--{key} {value}" for key, value, _ in differing)
    wanted = ", ".join(f"--{key} {value}" for key, _, value in differing)
    what = f"{run_dir} holds a run with {theirs}, not the {wanted} of {cell} seed {seed}"
    if extended_by_running(differing):
        return (f"{what}: not the cell's run, so not recorded as it; `python experiments.py run {cell} --seed {seed}` "
                f"extends it to the cell's")
    return (f"{what} (a command asking for more extended the cell's folder in place): not the cell's run, so neither "
            f"recorded nor reported as it; to restore the cell, move the folder aside (mv {run_dir} "
            f"{run_dir}-longer; `python uniform_seqrec.py --resume {run_dir}-longer` goes on with that run) and run "
            f"`python experiments.py run {cell} --seed {seed}` again")


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


def read_log(run_dir, remedy="resuming the run rewrites it"):
    """The per-epoch records of a run folder's log.jsonl, or None when it has none; a RunFolderError naming the
    line when one is not such a record, and the remedy."""
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
        raise R.RunFolderError(f"{path} is damaged ({R.one_line(err)}); {remedy}") from None
    return rows


def part_of(found, key):
    """found[key] where it is a JSON object, else {} (its checks then name it: a list there is damage too)."""
    return found.get(key) if isinstance(found.get(key), dict) else {}


RECORD_KEYS = {"cell": str, "seed": int, "test": dict, "valid": dict, "best_epoch": int, "epochs": int,
               "device": str, "wall_seconds": (int, float), "commit": str, "run_dir": str, "config": dict}


def read_record(path):
    """A cell's record in results/cells/, or a one-line RunFolderError naming the file and what is wrong."""
    entry = R.read_json(path, f"restore it from git (git checkout -- {os.path.relpath(path, HERE)})")
    wrong = [k for k, kind in RECORD_KEYS.items() if not isinstance(entry.get(k), kind)]
    wrong += [f"test {k}" for k in ("HR@10", "NDCG@10") if not isinstance(part_of(entry, "test").get(k), (int, float))]
    wrong += [f"config {k}" for k in ("lr", "dim", "layers", "heads", "beta")
              if not isinstance(part_of(entry, "config").get(k), (int, float))]
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
              if not isinstance(part_of(metrics, split).get("NDCG@10"), (int, float))]
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
    """The machine that trained a run (its last session), from its metrics.json: {"device", "name" (the GPU's name on
    CUDA, else the CPU's model; None where the run's metrics.json predates naming it), "torch", "threads",
    "cpu_capability" (the vector kernels torch ran on the CPU)} (runs.machine), or None where metrics.json names no
    settings at all. Read from the run, never from the machine that records it: a run folder can be recorded
    elsewhere than where it trained."""
    return R.machine(metrics.get("device_settings"))




def published_sha256(dataset):
    """The SHA-256 of a benchmark's published file (data_prep.BENCHMARKS, docs/datasets.md)."""
    return BENCHMARKS[dataset][1]


def check_published(cell, fingerprint, data_path):
    """A ConfigError unless the cell's run was trained on the published file of its benchmark: the results page puts
    every record beside the paper's numbers, and a run on other data (an edited or rebuilt Beauty.txt in the data
    folder) would take the benchmark's place on it."""
    dataset = cell.split("/")[1]
    if fingerprint["sha256"] != published_sha256(dataset):
        raise R.ConfigError(f"its run was trained on {data_path} (SHA-256 {fingerprint['sha256'][:12]}...), which is "
                            f"not the published {BENCHMARKS[dataset][0]} (SHA-256 "
                            f"{published_sha256(dataset)[:12]}..., docs/datasets.md): only runs on the published "
                            f"files are recorded for the results page")


def run_commit(run_dir):
    """The commit a run folder was started from: its commit.txt (run_cell writes it), "unknown" where that is empty
    or unreadable; without one (a folder uniform_seqrec.py started), this checkout's."""
    path = os.path.join(run_dir, "commit.txt")
    if not os.path.isfile(path):
        return git_commit()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"


def record(cell, seed, run_dir):
    """Write the cell's JSON from its finished run folder: its metrics under both protocols, the best state's
    validation metrics, the data file's fingerprint, how often its top item is one of the user's own, and why
    training stopped where non-finite numbers ended it ("stopped", as its metrics.json says). Its machine and commit
    are its last session's; where several machines or commits trained it, "sessions" names each and its epochs (the
    commit of the first start, commit.txt, where no session names one). A run on other data than the published
    benchmark file is refused (check_published), and so is a run of other epochs or patience than the cell's
    (other_length: a longer run that took over its folder); its cell's record stays as it was."""
    metrics = read_metrics(run_dir)
    config = metrics["config"]
    differing = other_length(cell, seed, config)
    if differing:                                                           # a longer run in the cell's folder
        raise R.ConfigError(not_the_cells_run(cell, seed, run_dir, differing))
    fingerprint, data_path = run_data(cell, seed, config)
    check_published(cell, fingerprint, data_path)
    log = read_log(run_dir)
    commit = run_commit(run_dir)
    sessions = metrics.get("sessions")           # where more than one machine or commit trained it: the last's
    if isinstance(sessions, list) and sessions and isinstance(sessions[-1], dict) and sessions[-1].get("commit"):
        commit = sessions[-1]["commit"]
    ranked = (recorded_ranking(cell, seed, run_dir, metrics, fingerprint)
              or rescore(run_dir, read_sequences(data_path)))
    ranked["protocols"] = metrics.get("protocols") or ranked["protocols"]  # as ranked on the training device
    entry = {"cell": cell, "seed": seed, "test": metrics["test"], "valid": metrics["valid"], **ranked,
             "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs"], "device": metrics["device"],
             "machine": machine_of(metrics), "wall_seconds": wall_seconds(run_dir, log), "commit": commit,
             "run_dir": os.path.relpath(run_dir, HERE), "config": {**config, "data_fingerprint": fingerprint},
             **({"stopped": metrics["stopped"]} if isinstance(metrics.get("stopped"), str) else {}),
             **({"sessions": sessions} if isinstance(sessions, list) else {})}
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
        ranked = rescore(run_dir, read_sequences(data_path))
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
    """Whether another process holds the run folder's lock (is training it now). A lock that cannot be taken for
    another reason (no permission to open .lock, a file system without locks) is a one-line RunFolderError: that
    is not another process training it."""
    if not os.path.isfile(os.path.join(run_dir, ".lock")):
        return False
    try:
        R.lock_run_dir(run_dir).close()
        return False
    except R.RunFolderError as err:                                         # .lock could not be opened
        raise R.RunFolderError(f"{err}; whether another process trains it cannot be told, so it was not run") \
            from None
    except R.ConfigError:                                                   # another process holds the lock
        return True
    except OSError as err:                                                  # flock itself failed
        raise R.RunFolderError(f"cannot lock the run folder {run_dir} ({err.strerror or err}); whether another "
                               f"process trains it cannot be told, so it was not run") from None


def folder_length(run_dir):
    """The epochs and patience of a run folder ({} where it has none): its finished run's (metrics.json's config)
    where it has finished, else what its config.json asks for. A damaged file is left to uniform_seqrec.py to
    report."""
    for name, part in (("metrics.json", "config"), ("config.json", None)):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            try:
                found = R.read_json(path, "")
            except R.RunFolderError:
                return {}
            found = part_of(found, part) if part else found
            return {key: found[key] for key in R.EXTENDABLE_KEYS if key in found}
    return {}


def cell_ids_known():
    """Every cell id of every table and of the tuning grid."""
    return cells("all", DATASETS, MODELS) + cells("tune", DATASETS, MODELS)


def run_cell(cell, seed, device, pause_after=None):
    """Train one cell (resuming it, or doing nothing when it is finished); `report` records it. A cell that another
    process is training is left to it: exit status 0, so that a job array or a second run_all.sh does not count
    it as a failure. A folder whose lock cannot be taken for another reason, or that holds a run of more epochs or
    patience than the cell's (a longer run took it over: not_the_cells_run), is a one-line ConfigError, nothing
    trained. pause_after: stop after that epoch, untested (uniform_seqrec.py's --pause-after)."""
    if cell not in cell_ids_known():
        raise R.ConfigError(f"unknown cell '{cell}' (`experiments.py list all` prints them)")
    hyperparameters = read_hyperparameters()
    arguments = [*cell_arguments(cell, hyperparameters), *seed_arguments(cell, seed)]
    run_dir = R.configure(arguments)[1]                                     # a ConfigError if its data file is missing
    differing = other_length(cell, seed, folder_length(run_dir), hyperparameters)
    if not extended_by_running(differing):
        raise R.ConfigError(not_the_cells_run(cell, seed, run_dir, differing))  # a longer run took over its folder
    if in_use(run_dir):
        print(f"[{time.strftime('%H:%M:%S')}] {cell} seed {seed}: {run_dir} is being trained by another process; "
              f"left to it", flush=True)
        return 0
    commit, commit_file = git_commit(), os.path.join(run_dir, "commit.txt")
    try:
        os.makedirs(run_dir, exist_ok=True)
        # the commit of the start that trains the first epoch (the sessions name each start's that trains one:
        # R.main); rewritten until a checkpoint exists, and where empty (a write that failed)
        if (not os.path.isfile(commit_file) or os.path.getsize(commit_file) == 0
                or not os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))):
            R.save_atomically(commit + "\n", commit_file)                # whole or not at all
    except OSError as err:
        raise R.RunFolderError(f"cannot write in the run folder {run_dir} ({err.strerror or err})") from None
    started = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] {cell} seed {seed}: {' '.join(arguments)}", flush=True)
    code = R.main([*arguments, *(["--device", device] if device else []),
                   *(["--pause-after", str(pause_after)] if pause_after else [])], commit=commit)
    try:
        if code == 2 and in_use(run_dir):                                   # another process took it meanwhile
            code = 0
    except R.RunFolderError:                                                # uniform_seqrec.py has said why
        pass
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
# A run folder's best state, ranked again (the records' two protocols; analyses.py's repeats)
# ---------------------------------------------------------------------------------------------------------------

def best_state(run_dir, num_items, lengths):
    """A run folder's model at its best validation state (on the CPU, in eval mode), its configuration, and the
    history length it was trained with."""
    if not os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        raise R.RunFolderError(f"{run_dir} has no checkpoint.pt: not a run folder of uniform_seqrec.py")
    config = R.read_json(os.path.join(run_dir, "config.json"), "not a run folder of uniform_seqrec.py?")
    max_len = U.history_limit(config, lengths)
    model = U.build_model(config, num_items, len(lengths), max_len)
    try:  # whatever a damaged checkpoint, or one trained on other data, raises
        checkpoint = R.read_checkpoint(os.path.join(run_dir, "checkpoint.pt"), "cpu")
        model.load_state_dict(checkpoint["best_model"])
    except Exception as err:
        raise R.RunFolderError(f"{run_dir}/checkpoint.pt does not load onto this data's model ({R.one_line(err)})")
    return model.eval(), config, max_len


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
            seen = [(histories == U.score_all(model.encode(histories, users=users), table, cosine)[:, 1:]
                     .argmax(1, keepdim=True) + 1).any(1) for histories, users, _ in batches]
        top_seen[split] = torch.cat(seen).double().mean().item()
    return {"protocols": protocols, "top_item_in_history": top_seen}


# ---------------------------------------------------------------------------------------------------------------
# Reading the records (report.py, analyses.py)
# ---------------------------------------------------------------------------------------------------------------

PROTOCOL_TITLES = {"all_items": "every item ranked", "history_excluded": "the history's items excluded"}


def recorded_test(entry, protocol="all_items"):
    """A record's test metrics under a protocol (uniform_seqrec.PROTOCOLS), or None when it was ranked one way only
    (records from before both were kept rank every item: `test`)."""
    found = entry.get("protocols", {}).get(protocol, {}).get("test")
    if found is None and protocol == ("history_excluded" if entry["config"].get("mask_seen") else "all_items"):
        found = entry["test"]
    return found


# What a record must share with its cell's configuration now to count in a Table 1-3 cell: after `choose` rewrites
# a row of results/hyperparameters.tsv, a cell's seeds trained before keep their records beside the new setting's,
# and averaging the two would mix two settings. A key a record does not hold (records from before the key existed)
# counts as the same. Also what a side study and its partner must share besides the study's own flag (report.py).
SHARED_SETTINGS = ("lr", "dim", "layers", "heads", "beta", "dropout", "max_len", "batch_size", "negatives")
COUNTED_TABLES = ("table1/", "table2/", "table3/")           # the cells whose records are checked against their row


def same_value(recorded_value, now):
    """A record's setting and the cell's now are the same: equal, numbers up to float rounding."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (recorded_value, now))
    return math.isclose(recorded_value, now, rel_tol=1e-9) if numbers else recorded_value == now


def other_settings(entry, settings):
    """[(key, the record's value, the cell's now)] of the SHARED_SETTINGS keys the record holds with another value
    than `settings` (the cell's configuration now, cell_settings)."""
    return [(key, entry["config"][key], settings.get(key)) for key in SHARED_SETTINGS
            if key in entry["config"] and not same_value(entry["config"][key], settings.get(key))]


def cell_records(cell):
    """A cell's records in results/cells/ (in the order of their file names), split into (counted, apart): a Table
    1-3 cell's records made under another setting than its configuration now are apart, each as (record, its
    other_settings); every record of another cell counts."""
    entries = [read_record(path) for path in sorted(glob.glob(record_path(cell, "*")))]
    if not (cell.startswith(COUNTED_TABLES) and entries):
        return entries, []
    settings = cell_settings(cell)
    differing = [(entry, other_settings(entry, settings)) for entry in entries]
    return [entry for entry, other in differing if not other], [(entry, other) for entry, other in differing if other]


def recorded(cell, protocol="all_items"):
    """The test (HR@10, NDCG@10) of every counted seed of a cell (cell_records: not those of a Table 1-3 cell
    under another setting than its row's now) under a protocol (seeds ranked one way only are left out of the
    other)."""
    found = []
    for entry in cell_records(cell)[0]:
        test = recorded_test(entry, protocol)
        if test is not None:
            found.append((test["HR@10"], test["NDCG@10"]))
    return found
