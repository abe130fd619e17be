"""The results page, results/RESULTS.md: every recorded cell beside the paper's number under both ranking protocols,
what holds so far of the paper's claims, and the rule that says what counts as a win (docs/results.md).

    python experiments.py report          # records every finished run (cells.record_all), then writes the page

Generated from results/cells/*.json (cells.py writes them) and results/baselines.json (baselines.py); the section
"Which protocol" comes from analyses.py.
"""
import glob
import math
import os
import statistics

import analyses as A
import baselines as B
import cells as C
import runs as R
import uniform_seqrec as U

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
    return f"{verdict} ({compared(seeds_by_loss, shown, test)})", verdict


def compared(seeds_by_name, shown, test):
    """The numbers behind a verdict: 'uniform 0.0342 ± 0.0014, 3 seeds; infonce 0.0330 ± 0.0008, 3 seeds; Welch's t
    1.29, df 3.2, p 0.28' for the names shown, the test's part only where decide() made it."""
    numbers = "; ".join(f"{name} {mean_sd(seeds_by_name[name])}" for name in shown)
    return numbers + (f"; Welch's t {test[0]:.2f}, df {test[1]:.1f}, p {test[2]:.2g}" if test else "")


def pair_line(seeds_by_kind):
    """The rule between a side study's cell and its partner, from their per-seed test NDCG@10 ({kind: values}, two
    kinds, each with a seed): '<kind> wins (...)' where decide() separates them, 'tie (...)' where it does not, 'not
    decided: one seed (...)' where either has one seed; the better by mean first."""
    best, runner_up = two_best(seeds_by_kind)
    outcome, test = decide(seeds_by_kind[best], seeds_by_kind[runner_up])
    verdict = {"win": f"{best} wins", "tie": "tie", "one seed": "not decided: one seed"}[outcome]
    return f"{verdict} ({compared(seeds_by_kind, [best, runner_up], test)})"


# ---------------------------------------------------------------------------------------------------------------
# The results page
# ---------------------------------------------------------------------------------------------------------------

def machine_label(machine, sessions=None):
    """A record's machine in a few words: 'AMD EPYC (family 25, model 17), AVX512, torch 2.13.0, 1 thread' (a GPU
    run: its name and torch); what a run did not record is said, never filled in from this machine. A run whose
    sessions (its record's, where several machines or commits trained it) name more than one machine: 'mixed: '
    and each machine with its epochs."""
    stretches = []                                                          # [machine, first epoch, last epoch]
    for session in sessions if isinstance(sessions, list) else []:
        if stretches and R.same_machine(stretches[-1][0], session.get("machine")):
            stretches[-1][2] = session.get("last_epoch")                    # the same machine, another commit
        else:
            stretches.append([session.get("machine"), session.get("first_epoch"), session.get("last_epoch")])
    if len(stretches) > 1:
        return "mixed: " + "; ".join(f"{R.machine_label(m)} (epoch{f's {a}-{b}' if a != b else f' {a}'})"
                                     for m, a, b in stretches)
    return R.machine_label(machine)


def commits(entry):
    """A record's commit, or where several commits trained its run (its sessions), each in the order they did."""
    named = [s.get("commit", "not recorded") for s in entry.get("sessions", []) if isinstance(s, dict)]
    return ", ".join(dict.fromkeys(named)) if len(set(named)) > 1 else entry["commit"]


def show(values, paper):
    """'ours (±sd) / relative difference to the paper' for one metric (no difference where the paper has no number:
    paper None), or 'not run'."""
    if not values:
        return "not run"
    mean = statistics.mean(values)
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{mean:.4f}{spread}" + (f" ({100 * (mean - paper) / paper:+.0f}%)" if paper is not None else "")




def baseline_rows(datasets, protocol="all_items"):
    """The two non-neural baselines of results/baselines.json as rows of table_rows()'s shape (no paper value)."""
    found = B.read_baselines()
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
            runs = C.recorded(cell, protocol) if cell else []
            paper_hr, paper_ndcg = paper_rows[label][column]
            one_way = not runs and cell and C.recorded(cell, "all_items")     # its folder was gone: ranked one way
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
        runs = C.recorded(cell, protocol)
        return statistics.mean(r[1] for r in runs) if runs else None

    verdicts, groups, partial = [], [], []
    for column, d in enumerate(C.DATASETS):
        for m in C.MODELS:
            seeds = {loss: [r[1] for r in C.recorded(f"table1/{d}/{m}/{loss}", protocol)] for loss in C.LOSSES}
            seeds = {loss: values for loss, values in seeds.items() if values}
            if len(seeds) == len(C.LOSSES):
                line, verdict = group_line(seeds, complete=True)
                verdicts.append(verdict)
                groups.append(f"  - {m} on {d}: {line}")
            elif len(seeds) > 1:
                paper = {loss: C.PAPER_TABLE1[m, loss][column][1] for loss in seeds}
                partial.append(f"  - {m} on {d}, partial (ranked this way so far: {', '.join(seeds)}): "
                               f"{group_line(seeds, complete=False)[0]}; the paper's order {best_first(paper)}")
    counts = ", ".join(f"{word} in {verdicts.count(word)}" for word in ("win", "tie", "loss"))
    lines.append(f"- The uniformity loss against the other losses per backbone x dataset (test NDCG@10, mean ± sd and "
                 f"seeds of each; {RULE}): "
                 + (f"{counts} of {len(verdicts)} complete groups; not decided (one seed) in "
                    f"{verdicts.count('not decided: one seed')}" if verdicts else "none complete yet"))
    lines += groups + partial
    # CE beside the paper's claim, not in it: the count above stays "best of the paper's four losses"
    against_ce = [(f"{m} on {d}", mean_ndcg(f"table1/{d}/{m}/uniform"), mean_ndcg(f"table1/{d}/{m}/{C.CE}"))
                  for d in C.DATASETS for m in C.MODELS]
    against_ce = [(group, uniform, ce) for group, uniform, ce in against_ce if uniform is not None and ce is not None]
    lines.append(f"- Beside it, beyond the paper (CE, softmax over every item, is not one of the four losses counted "
                 f"above): the uniformity loss above CE (test NDCG@10) in {sum(u > c for _, u, c in against_ce)} of "
                 f"{len(against_ce)} backbone x dataset groups where both have run"
                 + (" (none yet)" if not against_ce else "")
                 + "".join(f"; {group}: uniformity {u:.4f}, CE {c:.4f}" for group, u, c in against_ce))
    for column, d in enumerate(("beauty", "toys")):
        lines.append(order_against_paper(f"Table 2 on {d}",
                                         {row: mean_ndcg(f"table2/{d}/{row}") for row in C.ABLATIONS},
                                         {row: C.PAPER_TABLE2[row][column][1] for row in C.ABLATIONS}, "rows"))
        lines.append(order_against_paper(f"Table 3 on {d}", {b: mean_ndcg(f"table3/{d}/{b}") for b in C.BETAS},
                                         {b: C.PAPER_TABLE3[b][column][1] for b in C.BETAS}, "betas", peak="beta"))
    for column, d in enumerate(C.DATASETS):
        ours = {m: mean_ndcg(f"table1/{d}/{m}/uniform") for m in C.MODELS}
        if any(v is not None for v in ours.values()):
            lines.append(order_against_paper(f"Backbones with the uniformity loss on {d}", ours,
                                             {m: C.PAPER_TABLE1[m, "uniform"][column][1] for m in C.MODELS},
                                             "backbones"))
    return lines


def both_protocols(entry, sep, one_way):
    """A record's test HR@10 and NDCG@10 under each protocol (uniform_seqrec.PROTOCOLS' order), joined by `sep`;
    `one_way` for a protocol it was not ranked under."""
    tests = (C.recorded_test(entry, protocol) for protocol in U.PROTOCOLS)
    return [f"{t['HR@10']:.4f}{sep}{t['NDCG@10']:.4f}" if t else one_way for t in tests]


def negatives_row(loss, kind, cell):
    """One row of the negatives table: a cell's test metrics under both protocols and its own-first share."""
    path = C.record_path(cell, 1)
    if not os.path.isfile(path):
        return f"| {loss} | {kind} | not run | not run | | {cell} |"
    entry = C.read_record(path)
    shown = both_protocols(entry, " / ", "ranked one way")
    share = entry.get("top_item_in_history", {}).get("test")
    own = f"{100 * share:.0f}%" if share is not None else "-"
    return f"| {loss} | {kind} | {shown[0]} | {shown[1]} | {own} | {cell} |"


def beyond_the_paper():
    """Two comparisons the paper does not make, on Beauty: InfoNCE with K negatives, and Caser's last layer."""
    def test_of(cell):
        runs = C.recorded(cell)
        if not runs:
            return "not run | not run"
        spread = lambda i: f" ± {statistics.stdev(r[i] for r in runs):.4f}" if len(runs) > 1 else ""
        return " | ".join(f"{statistics.mean(r[i] for r in runs):.4f}{spread(i)}" for i in (0, 1))
    negatives = [("1 (this is BPR)", "table1/beauty/sasrec/bpr"),
                 *((k, f"infonce/beauty/{k}") for k in C.INFONCE_NEGATIVES),
                 ("256, the whole batch (Table 1's InfoNCE)", "table1/beauty/sasrec/infonce"),
                 ("the uniformity loss, for comparison", "table1/beauty/sasrec/uniform")]
    caser = [(loss, f"table1/beauty/caser/{loss}", f"caser-none/beauty/{loss}") for loss in C.LOSSES]

    def first_run(loss):
        """The README's command's row: its result both ways beside the lr 1e-3 cell's."""
        path = C.record_path(f"readme/beauty/{loss}", 1)
        entry = C.read_record(path) if os.path.isfile(path) else None
        both = (" | ".join(both_protocols(entry, " | ", "- | -"))
                + f" | {entry['best_epoch']} / {entry['epochs']} | {entry['wall_seconds'] / 60:.0f} min"
                if entry else "not run | not run | not run | not run | | ")
        paper = C.PAPER_TABLE1["sasrec", loss][0]
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
            *(f"| {loss} | {C.PAPER_TABLE1['caser', loss][0][0]:.4f} | {test_of(relu).split(' | ')[0]} | "
              f"{test_of(none).split(' | ')[0]} | {C.PAPER_TABLE1['caser', loss][0][1]:.4f} | "
              f"{test_of(relu).split(' | ')[1]} | {test_of(none).split(' | ')[1]} |" for loss, relu, none in caser),
            "",
            "## Beyond the paper: negatives that may be the user's own items (SASRec, Toys)", "",
            "Table 1 draws no negative from the user's training items (spec §2, as S3-Rec); the authors' code and "
            "RecBole exclude only the example's own positive (`--negatives any`). Test HR@10 / NDCG@10; \"own\": "
            "the share of test users whose top item is one of their own.", "",
            "| loss | negatives | every item ranked | history excluded | own | cell |", "|---|---|---|---|---|---|",
            *(negatives_row(loss, kind, cell) for loss in C.NEGATIVES_LOSSES for kind, cell in
              (("unseen (Table 1)", f"table1/toys/sasrec/{loss}"), ("any", f"negatives/toys/{loss}"))),
            "",
            "## What a first-time user gets: the README's own command (SASRec, Beauty)", "",
            "`python uniform_seqrec.py --model sasrec --loss uniform --data beauty` exactly as written (every default: "
            "lr 3e-4, inside the paper's grid; seed 42), and the same with `--loss bce`; beside them the lr 1e-3 cells "
            "of Table 1 (every item ranked).", "",
            "| loss | paper HR@10 / NDCG@10 | HR@10 | NDCG@10 | history excluded: HR@10 | NDCG@10 | best epoch / "
            "epochs | wall | lr 1e-3 cell: HR@10 | NDCG@10 |", "|---|---|---|---|---|---|---|---|---|---|",
            *(first_run(loss) for loss in C.README_LOSSES),
            ""]


PAIR_RULE = (f"Test NDCG@10 of the two by the page's rule (docs/results.md, \"What counts as a win\"): Welch's "
             f"t-test over their seeds, two-sided p < {LEVEL:g} a win, else a tie; fewer than 2 seeds of either: not "
             f"decided.")
STUDY_TIMES = ("Test HR@10 and NDCG@10, mean ± sd and the seeds; best epoch / epochs of each seed, in seed order. "
               "Times from each record, on its own machine and load (the last table names the machine): its wall "
               "time over its epochs, training and validation together; the time to the best state is estimated as "
               "wall time x best epoch / epochs. Compare times only between runs of one machine and load.")


def study_row(loss_label, kind_label, cell):
    """One row of a side study's table: a cell's test metrics under both protocols over its recorded seeds, each
    seed's best epoch / epochs, the mean seconds per epoch and minutes to the best state (estimated), the cell."""
    entries = sorted(C.cell_records(cell)[0], key=lambda e: e["seed"])
    if not entries:
        return f"| {loss_label} | {kind_label} | not run | not run | not run | not run | | | | {cell} |"
    tests = []
    for protocol in U.PROTOCOLS:
        runs = C.recorded(cell, protocol)
        tests += [show([r[0] for r in runs], None), mean_sd([r[1] for r in runs])] if runs else ["ranked one way"] * 2
    epochs = ", ".join(f"{e['best_epoch']} / {e['epochs']}" for e in entries)
    per_epoch = statistics.mean(e["wall_seconds"] / e["epochs"] for e in entries)
    to_best = statistics.mean(e["wall_seconds"] * e["best_epoch"] / e["epochs"] for e in entries) / 60
    return (f"| {loss_label} | {kind_label} | {' | '.join(tests)} | {epochs} | {per_epoch:.0f} | {to_best:.0f} | "
            f"{cell} |")


# What a side study and its partner must share besides the study's own flag (examples and pack, or block): a row of
# results/hyperparameters.tsv that `choose` rewrites after the partner's seeds were trained would pair other settings.
SHARED_SETTINGS = C.SHARED_SETTINGS


def setting_mismatch(cells):
    """'' when every counted seed of `cells` (C.cell_records) has one value of each SHARED_SETTINGS key its record
    holds, else the keys that differ with their values, e.g. 'lr 0.0003, 0.001'."""
    records = [entry for cell in cells for entry in C.cell_records(cell)[0]]
    values = {key: sorted({str(r["config"][key]) for r in records if key in r["config"]}) for key in SHARED_SETTINGS}
    return "; ".join(f"{key} {', '.join(found)}" for key, found in values.items() if len(found) > 1)


def side_study(title, about, kinds, losses):
    """A side study's section on Beauty: per loss, the study's cell beside its partner, Table 1's SASRec cell (rows of
    study_row()), then the rule between the two per loss and protocol (pair_line()). kinds: [(kind, row label, the
    cell of a loss)], the study's first. No section until one of the study's own runs is recorded, so that the page
    stays as it was before the study."""
    if not any(glob.glob(C.record_path(kinds[0][2](loss), "*")) for loss in losses):
        return []
    rows, verdicts = [], []
    for loss in losses:
        paper_hr, paper_ndcg = C.PAPER_TABLE1["sasrec", loss][C.DATASETS.index("beauty")]
        rows += [study_row(f"{loss} (paper {paper_hr:.4f} / {paper_ndcg:.4f})", label, cell_of(loss))
                 for _, label, cell_of in kinds]
        mismatch = setting_mismatch([cell_of(loss) for _, _, cell_of in kinds])
        if mismatch:
            verdicts.append(f"- {loss}: not one setting, so not a side-by-side: its runs differ in {mismatch}")
        for protocol in U.PROTOCOLS:
            seeds = {kind: [r[1] for r in C.recorded(cell_of(loss), protocol)] for kind, _, cell_of in kinds}
            missing = " or ".join(kind for kind, values in seeds.items() if not values)
            verdicts.append(f"- {loss}, {C.PROTOCOL_TITLES[protocol]}: "
                            + (f"not decided: no {missing} seed ranked this way yet" if missing else pair_line(seeds)))
    return [f"## Beyond the paper: {title} (SASRec, Beauty)", "", about, STUDY_TIMES, "",
            "| loss (paper HR@10 / NDCG@10) | | every item ranked: HR@10 | NDCG@10 | history excluded: HR@10 | NDCG@10 "
            "| best epoch / epochs | s / epoch | min to the best state (est.) | cell |", "|" + "---|" * 10,
            *rows, "", PAIR_RULE, "", *verdicts, ""]


def side_studies():
    """The two side studies of SASRec on Beauty against Table 1's cells: the per-user regime and the original block."""
    partner = lambda loss: f"table1/beauty/sasrec/{loss}"
    return [*side_study("trained per user, packed",
                        "Table 1's SASRec cell of each loss (per prefix, the default: every prefix of a user's "
                        "training part its own example, encoded alone) beside the same setting trained per user and "
                        "packed, `--examples users --pack` (each user's training part read in one causal pass, a "
                        "triplet at every position; the README's fast way; `./run_all.sh regime`).",
                        [("per-user", "per user, packed", lambda loss: f"regime/beauty/{loss}"),
                         ("per-prefix", "per prefix (Table 1)", partner)], C.REGIME_LOSSES),
            *side_study("the original SASRec's block",
                        "Table 1's SASRec cell (GPT-2's pre-LayerNorm blocks, x + f(LN(x))) beside the same setting "
                        "with the original SASRec's blocks, `--block original` (LayerNorm on the attention's queries "
                        "only, residuals adding the normalized input; docs/decisions.md; `./run_all.sh block`).",
                        [("original", "original block", lambda loss: f"block/beauty/{loss}"),
                         ("pre-LN", "pre-LN block (Table 1)", partner)], C.BLOCK_LOSSES)]


def not_counted():
    """One line per Table 1-3 cell with records made under another setting than its configuration now (C.cell_records),
    naming their seeds and the values that differ: '- table1/beauty/sasrec/bce: seed 2 (lr 0.0003); the cell now: lr
    0.001'."""
    lines = []
    for cell in C.cells("all", C.DATASETS, C.MODELS):
        apart = C.cell_records(cell)[1] if cell.startswith(C.COUNTED_TABLES) else []
        if apart:
            now = {key: value for _, differing in apart for key, _, value in differing}
            lines.append(f"- {cell}: " + ", ".join(
                f"seed {entry['seed']} ({', '.join(f'{key} {value}' for key, value, _ in differing)})"
                for entry, differing in sorted(apart, key=lambda pair: pair[0]["seed"]))
                + "; the cell now: " + ", ".join(f"{key} {value}" for key, value in now.items()))
    return lines


NOT_COUNTED = ("Records under another setting, not counted: made before `python experiments.py choose` changed the "
               "cell's row of results/hyperparameters.tsv (or its flags changed), so the tables and verdicts on this "
               "page leave them out; `python experiments.py run CELL --seed SEED` trains the seed at the cell's "
               "setting now, and `report` records it in their place:")


def ranked_one_way():
    """'cell seed N' of every record that holds one protocol only (its run folder was gone before both were kept)."""
    found = []
    for path in sorted(glob.glob(os.path.join(C.RESULTS, "cells", "*.json"))):
        entry = C.read_record(path)
        if "protocols" not in entry:
            found.append(f"{entry['cell']} seed {entry['seed']}")
    return found


def unfinished_runs(max_seed=C.MAX_SEED):
    """(cell, seed, epochs done, best epoch, its validation NDCG@10) of every run started but not finished."""
    found, hyperparameters = [], C.read_hyperparameters()
    for cell in C.unique_runs(C.cells("all", C.DATASETS, C.MODELS), 1):
        for seed in range(1, max_seed + 1):
            run_dir = C.run_folder(cell, seed, hyperparameters)
            epochs = C.read_log(run_dir)
            if epochs and not os.path.isfile(os.path.join(run_dir, "metrics.json")):
                best = max(epochs, key=lambda r: r["valid_NDCG@10"])
                found.append((cell, seed, len(epochs), best["epoch"], best["valid_NDCG@10"]))
    return found


UNFINISHED_TITLE = "## Runs started but not finished (not in the tables above)"


def tables(protocol):
    """The markdown of Tables 1-3 under one protocol, with the baselines ranked the same way."""
    datasets_title = ["Beauty", "Toys", "Sports", "Yelp"]
    pairs = [(m, loss) for m in C.MODELS for loss in C.TABLE1_LOSSES]
    title = C.PROTOCOL_TITLES[protocol]
    paper = lambda m, loss: C.PAPER_TABLE1[m, loss] if loss != C.CE else [(None, None)] * len(C.DATASETS)
    table1 = table_rows([(f"{m} {loss}", [f"table1/{d}/{m}/{loss}" for d in C.DATASETS]) for m, loss in pairs],
                        {f"{m} {loss}": paper(m, loss) for m, loss in pairs}, datasets_title, protocol)
    table2 = table_rows([(row, [f"table2/{d}/{row}" for d in ("beauty", "toys")]) for row in C.ABLATIONS],
                        C.PAPER_TABLE2, ["Beauty", "Toys"], protocol)
    table3 = table_rows([(beta, [f"table3/{d}/{beta}" for d in ("beauty", "toys")]) for beta in C.BETAS],
                        C.PAPER_TABLE3, ["Beauty", "Toys"], protocol)
    return [f"## Table 1: backbones x losses ({title})", "",
            "Each backbone's fifth row, ce, is beyond the paper: full-softmax cross-entropy over every item (RecBole's "
            "SASRec default), which the paper did not run, so it has no paper number; \"What holds\" counts the "
            "paper's four losses and shows CE beside them.", "",
            *table1, *baseline_rows(C.DATASETS, protocol), "",
            f"## Table 2: ablation of the loss (SASRec; rows as in the paper; {title})", "",
            "(a) BCE; (b) normalized BCE; (c) + L_hom; (d) + L_het; (e) the full loss; (f) no L_rec; "
            "(g) no normalization.", "", *table2, *baseline_rows(["beauty", "toys"], protocol), "",
            f"## Table 3: beta (SASRec; {title})", "", *table3, *baseline_rows(["beauty", "toys"], protocol), ""]


def unfinished_section(unfinished, previous_page):
    """The page's list of runs in progress: from the local run folders, or, where there are none (a fresh clone),
    the list the committed page had, unchanged."""
    if not os.path.isdir(os.path.join(C.HERE, "runs")) and os.path.isfile(previous_page):
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
    path = path or os.path.join(C.RESULTS, "RESULTS.md")
    entries = [C.read_record(p) for p in sorted(glob.glob(os.path.join(C.RESULTS, "cells", "*.json")))]
    runs = ["| cell | seed | lr | dim | layers | heads | beta | best epoch / epochs | device | machine | wall | "
            "commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        c = e["config"]
        stopped = f" (stopped: {e['stopped']})" if e.get("stopped") else ""     # non-finite numbers ended it
        runs.append(f"| {e['cell']} | {e['seed']} | {c['lr']:g} | {c['dim']} | {c['layers']} | {c['heads']} | "
                    f"{c['beta']:g} | {e['best_epoch']} / {e['epochs']}{stopped} | {e['device']} | "
                    f"{machine_label(e.get('machine'), e.get('sessions'))} | {e['wall_seconds'] / 60:.0f} min | "
                    f"{commits(e)} |")
    one_way, apart = ranked_one_way(), not_counted()
    text = "\n".join([
        "# Results beside the paper's",
        "",
        "Generated by `python experiments.py report` from `results/cells/*.json`; do not edit by hand.",
        "Each cell: test HR@10 and NDCG@10 for every user, with the relative difference to the paper in brackets;",
        "mean ± sd where several seeds ran (the sample sd, n - 1). Every table comes twice, once per ranking",
        "protocol (the paper does not say which it used): every item ranked, and the items of the user's history",
        "excluded first (as the S3-Rec code these data files come from does; a target that repeats a history item",
        "then cannot be hit).",
        "\"not run\" marks a cell with no finished run; the command that fills it is in the README.",
        "The rows marked \"no model\" are two baselines on the same protocol (`python experiments.py baselines`):",
        "item popularity, and first-order item transitions (how often each item followed the user's last three",
        "items in the training parts, weighted decay^k, decay chosen on validation; popularity breaks ties).",
        "A seed's numbers repeat exactly only on the machine that made them (docs/results.md, \"What counts as a",
        "win\"); the last table names each run's machine where its record holds it.",
        "",
        *(f"## What holds so far ({C.PROTOCOL_TITLES[p]})\n\n" + "\n".join(claims(p)) + "\n" for p in U.PROTOCOLS),
        "## Which protocol: the cells ranked both ways against the paper", "",
        "Only cells with both protocols recorded; Table 2 (a), (e) and Table 3's 0.05 are Table 1 cells and count",
        "once. docs/results.md reads these numbers.", "",
        *A.protocol_evidence(), "",
        *tables("all_items"),
        *tables("history_excluded"),
        *([NOT_COUNTED, "", *apart, ""] if apart else []),
        *(["Ranked one way only (every item ranked; their run folders were gone before both protocols were kept): "
           + ", ".join(one_way) + ".", ""] if one_way else []),
        *beyond_the_paper(),
        *side_studies(),
        "## Runs behind the cells", "", *runs, "",
        *unfinished_section(unfinished, path),
    ])
    os.makedirs(C.RESULTS, exist_ok=True)
    R.save_atomically(text, path)
    print(f"wrote {path}")
