"""A second family of recommenders, with no learned parameters: item popularity and first-order item transitions,
ranked on the paper's protocol. They say how hard each dataset is; the results page shows them in every table.

    python experiments.py baselines          # results/baselines.json, every dataset present (CPU, minutes)

Both count only the training parts s[:n-2] (no validation or test item), and both are ranked exactly as the
models are: every item, ties against the target, nothing masked (and again with the history's items excluded, as
uniform_seqrec.PROTOCOLS ranks the models both ways).
"""
import json
import os
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # before torch's import: see uniform_seqrec.py
import torch

import cells as C
import runs as R
import uniform_seqrec as U
from data_prep import benchmark_path, default_data_dir, read_sequences

BASELINES = os.path.join(C.RESULTS, "baselines.json")
RECENT_ITEMS = 3                                   # the item-transition baseline looks at the last 3 items
DECAYS = [0.0, 0.25, 0.5, 1.0]                     # weight of the k-th most recent item: decay ** k (0 ** 0 = 1)
TIE_BREAK = 1e-3  # popularity / (max + 1) scaled below any difference of transition scores (multiples of 1/16)


def training_part_items(flat, starts, lengths):
    """The item ids of every user's training part s[:n-2], user by user, repeats kept (a Yelp user can visit a place
    twice). The part is the one uniform_seqrec.training_item_codes reads, which keeps each (user, item) once: given
    every position's own index as its "item" (all distinct, so none is dropped), its codes user * (P + 1) + position
    give back the positions."""
    positions = torch.arange(len(flat))                                     # P = len(flat) "items", 0 .. P - 1
    codes = U.training_item_codes(positions, starts, lengths, len(flat))
    return flat[codes % (len(flat) + 1)]


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


def ranks(score, batches, mask_seen=False):
    """Every user's target rank in the (histories, users, targets) batches' order under a scoring function of
    ((B, T) histories, (B,) users) that returns a new (B, N + 1) tensor each call (uniform_seqrec.rank_of_targets
    overwrites it). Ranked as uniform_seqrec.target_ranks ranks a model's scores (mask_seen: the history's items
    excluded), which needs a model: a baseline has no vectors to score by."""
    found = []
    for histories, users, targets in batches:
        scores = score(histories, users)
        scores[:, 0] = float("-inf")                                        # padding is no item
        if mask_seen:
            scores.scatter_(1, histories, float("-inf"))
        found.append(U.rank_of_targets(scores, targets))
    return torch.cat(found)


def baseline_metrics(score, flat, starts, lengths, split, mask_seen=False):
    """HR and NDCG at 5, 10, 20 of a scoring function of (B, T) histories and (B,) users."""
    return U.metrics_from_ranks(ranks(score, U.evaluation_batches(flat, starts, lengths, 50, split), mask_seen))


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
    for dataset in C.DATASETS:
        data_path = benchmark_path(dataset, default_data_dir())
        if not os.path.isfile(data_path):
            print(f"  {dataset}: {data_path} not found, skipped (python data_prep.py {dataset})")
            continue
        started = time.time()
        found[dataset] = dataset_baselines(read_sequences(data_path))
        found[dataset]["seconds"] = round(time.time() - started, 1)
        print(f"  {dataset}: popularity test NDCG@10 {found[dataset]['popularity']['test']['NDCG@10']:.4f}, "
              f"item transitions {found[dataset]['transitions']['test']['NDCG@10']:.4f} "
              f"(decay {found[dataset]['transitions']['decay']:g}), {found[dataset]['seconds']:.0f} s")
    with open(path or BASELINES, "w") as f:
        json.dump(found, f, indent=1)
        f.write("\n")
    print(f"wrote {path or BASELINES}")


def read_baselines():
    """results/baselines.json, or {} before `experiments.py baselines` has run."""
    if not os.path.isfile(BASELINES):
        return {}
    return R.read_json(BASELINES, "run python experiments.py baselines to write it again")
