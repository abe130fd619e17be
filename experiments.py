"""The paper's experiments: which runs make each table cell, running them, and the results page.

    python experiments.py list table1 --datasets beauty --models sasrec --seeds 1   # cell ids, one per line
    python experiments.py run table1/beauty/sasrec/uniform --seed 1                  # one cell (resumable)
    python experiments.py report                                                     # results/RESULTS.md
    python experiments.py figure1                                                    # results/figure1*.png
    python experiments.py list tune ...  /  python experiments.py choose             # hyperparameter search
    python experiments.py halving  /  python experiments.py halving --report         # the search by halving
    python experiments.py repeats --dataset yelp RUN_DIR...                          # NDCG@10 from repeated items

run_all.sh drives these. This file is the command line only; each command's program has its own file:
cells.py (the cell catalogue, running and recording cells, `choose`, `rescore`), tuning.py (`halving`: the tuning
grid by successive halving), baselines.py (popularity and item transitions), analyses.py (`repeats`, and which
protocol the paper used), report.py (results/RESULTS.md, its claims and the win rule) and figures.py (`figure1`,
`figure-alignment`).
"""
import signal
import sys
import warnings

if __name__ == "__main__":                     # before torch loads: Ctrl-C and a deleted directory (data_prep.py)
    from data_prep import start_program
    start_program("experiments.py")
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # before torch (the modules below import it)

import analyses as A
import baselines as B
import cells as C
import figures as F
import report as P
import runs as R
import tuning as T
from data_prep import DataError, OneLineErrorParser


def main(argv=None):
    parser = OneLineErrorParser(prog="experiments.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="print cell ids, one per line (seeds as a second field)")
    listing.add_argument("what", choices=["table1", "table2", "table3", "figure1", "infonce", "caser-none",
                                          "negatives", "readme", "regime", "block", "tune", "all"])
    listing.add_argument("--datasets", default=",".join(C.DATASETS))
    listing.add_argument("--models", default=",".join(C.MODELS))
    listing.add_argument("--seeds", type=int, default=1)
    running = commands.add_parser("run", help="run one cell (skipped when finished) and record it")
    running.add_argument("cell")
    running.add_argument("--seed", type=int, default=1)
    running.add_argument("--device", default=None)
    commands.add_parser("choose", help="write results/hyperparameters.tsv from the tuning runs")
    halving = commands.add_parser(
        "halving", help="tune one backbone on one dataset by successive halving over the tuning grid, loss by loss "
                        "(resumable), and print each loss's table",
        description="Successive halving over the tuning grid (lr 1e-4, 2e-4, 3e-4 x dim 64, 128 x layers = heads "
                    "1, 2; seed 1), loss by loss: rung 1 trains every grid point to epoch 6, rung 2 the best third "
                    "to epoch 24, rung 3 the best one to early stopping (patience 20, at most 300 epochs); best: "
                    "the best validation NDCG@10 within the rung's epochs, a tie to the earlier grid point. At most "
                    "420 epochs a loss (144 in rungs 1-2); Caser's 6-point grid (no depth): at most 348 (72 in rungs "
                    "1-2). Each grid point is its tuning cell's run folder, paused "
                    "at a rung's end; run again, the command continues where it stopped and trains nothing once "
                    "done. A finished loss is recorded in results/cells/ (its tuning cell) and results/halving/.")
    halving.add_argument("--dataset", default=T.DATASET, choices=C.DATASETS, help=f"the dataset (default: {T.DATASET})")
    halving.add_argument("--model", default=T.MODEL, choices=C.MODELS, help=f"the backbone (default: {T.MODEL})")
    halving.add_argument("--losses", default=",".join(T.LOSSES),
                         help=f"comma-separated, halved in this order, of {', '.join(C.TABLE1_LOSSES)} (default: "
                              f"{','.join(T.LOSSES)})")
    halving.add_argument("--device", default=None, help="the device every run trains on (default: uniform_seqrec.py's "
                                                        "choice)")
    halving.add_argument("--report", action="store_true", help="print each loss's table so far and train nothing")
    commands.add_parser("report", help="record every finished run of a cell, then write results/RESULTS.md")
    rescoring = commands.add_parser("rescore", help="add both ranking protocols to the records of the given cells "
                                                    "(default: all) whose run folders are still here")
    rescoring.add_argument("cells", nargs="*")
    commands.add_parser("baselines", help="write results/baselines.json: popularity and item transitions (CPU, "
                                          "40 s to 2.5 min per dataset)")
    commands.add_parser("figure1", help="write results/figure1.png (needs matplotlib) and figure1.json")
    alignment = commands.add_parser("figure-alignment", help="write results/alignment_uniformity_<dataset>.png "
                                                             "(needs matplotlib) and .json from one backbone's runs")
    alignment.add_argument("--dataset", default="toys", choices=C.DATASETS)
    alignment.add_argument("--model", default="sasrec", choices=C.MODELS)
    repeating = commands.add_parser("repeats", help="print how much of each test NDCG@10 comes from targets that "
                                                    "repeat a history item: baselines and the given run folders")
    repeating.add_argument("--dataset", default="yelp", choices=C.DATASETS)
    repeating.add_argument("run_dirs", nargs="*")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)               # Ctrl-C is KeyboardInterrupt again
    try:
        return command(args)
    except (R.ConfigError, DataError) as err:                            # bad input: one line, never a traceback
        print(f"experiments.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nexperiments.py: interrupted (a training keeps its last finished epoch; run the same command to "
              "resume)", file=sys.stderr)
        return 130


def command(args):
    """Carry out one parsed command line; its exit status."""
    for name in ("seed", "seeds"):
        if getattr(args, name, 1) is not None and not 1 <= getattr(args, name, 1) <= C.MAX_SEED:
            raise R.ConfigError(f"--{name} must be from 1 to {C.MAX_SEED}, the seeds the results page reads "
                                f"(got {getattr(args, name)})")
    if args.command == "list":
        datasets, models = args.datasets.split(","), args.models.split(",")
        for value, known in [(d, C.DATASETS) for d in datasets] + [(m, C.MODELS) for m in models]:
            if value not in known:
                raise R.ConfigError(f"'{value}' is not one of {', '.join(known)}")
        for seed in range(1, args.seeds + 1):
            for cell in C.unique_runs(C.cells(args.what, datasets, models), seed):
                print(cell, seed)
    elif args.command == "run":
        return C.run_cell(args.cell, args.seed, args.device)
    elif args.command == "choose":
        C.choose()
    elif args.command == "halving":
        losses = args.losses.split(",")
        for loss in losses:
            if loss not in C.TABLE1_LOSSES:
                raise R.ConfigError(f"--losses: '{loss}' is not one of {', '.join(C.TABLE1_LOSSES)}")
        if len(set(losses)) < len(losses):
            raise R.ConfigError(f"--losses names a loss twice ({args.losses})")
        if args.report:
            print("\n".join(T.tables(args.dataset, args.model, losses)))
            return 0
        return T.halving(args.dataset, args.model, losses, args.device)
    elif args.command == "baselines":
        B.baselines()
    elif args.command == "rescore":
        C.rescore_recorded(args.cells)
    elif args.command == "report":
        failed = C.record_all()
        P.report(unfinished=P.unfinished_runs())
        return 2 if failed else 0
    elif args.command == "figure-alignment":
        F.figure_alignment(args.dataset, args.model)
    elif args.command == "repeats":
        A.repeats(args.dataset, args.run_dirs)
    else:
        F.figure1()
    return 0


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):                                          # not on Windows
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)                      # `experiments.py list | head` ends quietly
    sys.exit(main())
