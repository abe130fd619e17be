"""Analyses of the recorded runs that the paper does not make: how much of a score comes from targets the user
already had, and which ranking protocol the paper used (the results page's section of that name).

    python experiments.py repeats --dataset yelp RUN_DIR...      # NDCG@10 from repeated items
"""
import glob
import statistics
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # before torch's import: see uniform_seqrec.py
import torch

import baselines as B
import cells as C
import runs as R
import uniform_seqrec as U
from data_prep import default_data_dir, read_sequences


# ---------------------------------------------------------------------------------------------------------------
# Repeats: how much of a score comes from targets the user already had (Yelp keeps repeated visits; the Amazon
# files have none)
# ---------------------------------------------------------------------------------------------------------------

REPEAT_KINDS = ["repeats the history's last item", "repeats an earlier item", "is new to the history"]


def repeat_kinds(histories, targets):
    """(B,) index into REPEAT_KINDS of each target against its (B, T) right-padded history (the T items given)."""
    last = B.recent_items(histories, 1)[:, 0]
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


def ranks_and_repeats(ranks, flat, starts, lengths, split, max_len=50):
    """Every user's target rank, by `ranks` of the split's (histories, users, targets) batches (history length
    max_len), and whether the target repeats an item of its history (repeat_kinds), in the same order."""
    batches = U.evaluation_batches(flat, starts, lengths, max_len, split)
    return ranks(batches), torch.cat([repeat_kinds(h, targets) for h, _, targets in batches])


def best_state_ranks(run_dir, num_items, lengths):
    """The ranking of a run folder's best validation state, a function of evaluation batches: its evaluation's own
    (uniform_seqrec.target_ranks, every item ranked, cosines where training scored cosines); and the history length
    it was trained with."""
    model, config, max_len = C.best_state(run_dir, num_items, lengths)
    return (lambda batches: U.target_ranks(model, batches, U.scores_are_cosines(config))[0]), max_len


def repeats(dataset, run_dirs):
    """Print, for the test split of a dataset, how much of each NDCG@10 comes from targets that repeat a history
    item: the item-transition baseline (its decay from results/baselines.json), the same with the history's last
    item ranked first, and the best state of each given run folder."""
    data_path = R.data_path_of({"data": dataset, "data_dir": default_data_dir()})
    decay = B.read_baselines().get(dataset, {}).get("transitions", {}).get("decay")
    if decay is None:
        raise R.ConfigError(f"{B.BASELINES} has no {dataset}: run python experiments.py baselines first")
    flat, starts, lengths, num_items = U.flatten_sequences(read_sequences(data_path), "cpu")
    popularity = B.item_popularity(flat, starts, lengths, num_items)
    transitions = B.item_transitions(flat, starts, lengths, num_items)
    by_transitions = lambda h, _: B.transition_scores(h, transitions, popularity, decay)
    last_first = lambda h, users: by_transitions(h, users).scatter_(1, B.recent_items(h, 1), float("inf"))
    rankings = [("item transitions", lambda batches: B.ranks(by_transitions, batches), 50),
                ("item transitions, last item first", lambda batches: B.ranks(last_first, batches), 50)]
    rankings += [(run_dir, *best_state_ranks(run_dir, num_items, lengths)) for run_dir in run_dirs]
    for name, rank, max_len in rankings:
        ranks, kinds = ranks_and_repeats(rank, flat, starts, lengths, "test", max_len)
        print(f"{name}: test NDCG@10 {U.metrics_from_ranks(ranks)['NDCG@10']:.4f}, of which")
        for kind, (share, hit_rate, first, part) in zip(REPEAT_KINDS, ndcg_by_repeat(ranks, kinds)):
            print(f"  {part:.4f} from the {share:.1%} of users whose target {kind} (HR@10 {hit_rate:.3f}, ranked "
                  f"first {first:.3f} among them)")


# ---------------------------------------------------------------------------------------------------------------
# Which protocol did the paper use?
# ---------------------------------------------------------------------------------------------------------------

def paper_cells():
    """(table, dataset, model, cell id, the paper's (HR@10, NDCG@10)) of every cell of Tables 1-3 (cells that share a
    run are listed once per table, as the tables show them)."""
    found = [("table1", d, m, f"table1/{d}/{m}/{loss}", C.PAPER_TABLE1[m, loss][c])
             for c, d in enumerate(C.DATASETS) for m in C.MODELS for loss in C.LOSSES]
    found += [("table2", d, "sasrec", f"table2/{d}/{row}", C.PAPER_TABLE2[row][c])
              for c, d in enumerate(("beauty", "toys")) for row in C.ABLATIONS if row not in "ae"]
    found += [("table3", d, "sasrec", f"table3/{d}/{b}", C.PAPER_TABLE3[b][c])
              for c, d in enumerate(("beauty", "toys")) for b in C.BETAS if b != "0.05"]
    return found


def protocol_evidence():
    """Markdown: for each dataset and protocol, how the cells ranked both ways land against the paper (within 10% and
    25%, median absolute difference, per metric), and each cell's NDCG@10 / HR@10 beside the paper's. Only cells
    with both protocols recorded count, so that the two protocols are compared on the same cells. (Table 2's rows
    (a) and (e) and Table 3's 0.05 are Table 1 cells and count once.)"""
    both = [(table, d, m, cell, paper, [C.recorded(cell, p) for p in U.PROTOCOLS])
            for table, d, m, cell, paper in paper_cells()]
    both = [(table, d, m, cell, paper, [statistics.mean(r[i] for r in runs) for runs in per_protocol for i in (0, 1)])
            for table, d, m, cell, paper, per_protocol in both if all(per_protocol)]
    lines = ["| dataset | cells | protocol | HR@10 within 10% / 25% | median abs. diff. | NDCG@10 within 10% / 25% | "
             "median abs. diff. |", "|---|---|---|---|---|---|---|"]
    for d in C.DATASETS:
        mine = [row for row in both if row[1] == d]
        for index, protocol in enumerate(U.PROTOCOLS):
            fields = []
            for metric in (0, 1):
                off = [abs(row[5][2 * index + metric] / row[4][metric] - 1) for row in mine]
                fields.append(f"{sum(o <= 0.10 for o in off)} / {sum(o <= 0.25 for o in off)}" if off else "-")
                fields.append(f"{100 * statistics.median(off):.0f}%" if off else "-")
            lines.append(f"| {d} | {len(mine)} | {C.PROTOCOL_TITLES[protocol]} | " + " | ".join(fields) + " |")
    lines += ["", "NDCG@10 / HR@10 of every recorded cell beside the paper's (where inside the top 10 the targets sit; "
              "a protocol moves it), and the share of test users whose top-ranked item (every item ranked) is one of "
              "their own history's, where the run folder was there to tell:", "",
              "| cell | paper | ours, every item ranked | ours, history excluded | paper NDCG@10 | ours, every item | "
              "ours, history excluded | top item the user's own |", "|---|---|---|---|---|---|---|---|"]
    for table, d, m, cell, paper in paper_cells():
        per_protocol = [C.recorded(cell, p) for p in U.PROTOCOLS]
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
        shares = [C.read_record(p).get("top_item_in_history", {}).get("test")
                  for p in sorted(glob.glob(C.record_path(cell, "*")))]
        shares = [x for x in shares if x is not None]
        lines.append(f"| {cell} | {paper[1] / paper[0]:.3f} | {ratio[0]} | {ratio[1]} | {paper[1]:.4f} | {value[0]} | "
                     f"{value[1]} | {f'{100 * statistics.mean(shares):.0f}%' if shares else '-'} |")
    return lines

