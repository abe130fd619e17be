"""The figures, from the runs' per-epoch logs: Figure 1 (normalized BCE's collapse) and the alignment-uniformity
plane (Wang & Isola). Each writes its numbers as JSON, and a PNG when matplotlib is installed.

    python experiments.py figure1                                   # results/figure1.png and .json
    python experiments.py figure-alignment --dataset toys           # results/alignment_uniformity_toys.png and .json
"""
import glob
import json
import os
import sys

import cells as C

# ---------------------------------------------------------------------------------------------------------------
# Figure 1
# ---------------------------------------------------------------------------------------------------------------

def figure_run_log(cell):
    """(per-epoch log, finished?) of a cell's seed-1 run: its recorded run, else its run folder so far, else None."""
    recorded_runs = sorted(glob.glob(C.record_path(cell, "*")))[:1]
    if recorded_runs:
        run_dir = os.path.join(C.HERE, C.read_record(recorded_runs[0])["run_dir"])
    else:
        run_dir = C.run_folder(cell, 1, C.read_hyperparameters())
    log = C.read_log(run_dir)
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
    out_dir = out_dir or C.RESULTS
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
    out_dir = out_dir or C.RESULTS
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
                 title=f"{C.MODEL_NAMES[model]} on {dataset.capitalize()}: {which} vectors")
    axes[0].legend(fontsize=8)
    figure.suptitle("Each run's epochs (circle: epoch 1, star: best validation epoch); lower is better on both axes",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(name + ".png", dpi=120)
    print(f"wrote {name}.png and .json")
