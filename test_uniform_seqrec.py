"""Tests of uniform_seqrec.py: every loss against a slow loop, metrics against brute force, no leakage, causal
backbones, training that learns, and the command line on a slice of a real benchmark file.

    python -m pytest -q      (the benchmark files in ./data, or in $UNIFORM_SEQREC_DATA)
"""
import dataclasses
import glob
import inspect
import itertools
import json
import math
import os

import pytest
import torch

import runs as R
import uniform_seqrec as U
from conftest import BEAUTY, backbone, needs
from data_prep import read_sequences

BEAUTY_SLICE_USERS = 600  # the conftest.py fixture beauty_slice
HERE = os.path.dirname(os.path.abspath(__file__))


def vectors(rows, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g, dtype=torch.float64).requires_grad_()


def gradients(loss, tensors):
    return torch.autograd.grad(loss, tensors)


# ----------------------------------------------------------------------------------------------------------------
# Losses against obviously-correct loops
# ----------------------------------------------------------------------------------------------------------------

def slow_bce(pos, neg):
    total = 0
    for b in range(len(pos)):
        total = total - torch.log(torch.sigmoid(pos[b])) - torch.log(1 - torch.sigmoid(neg[b]))
    return total


def slow_bpr(pos, neg):
    return sum(-torch.log(torch.sigmoid(pos[b] - neg[b])) for b in range(len(pos)))


def slow_infonce(pos, neg_matrix, same):
    total = 0
    for b in range(len(pos)):
        candidates = [pos[b]] + [neg_matrix[b, j] for j in range(neg_matrix.shape[1]) if not same[b, j]]
        total = total - (pos[b] - torch.log(sum(torch.exp(c) for c in candidates)))
    return total


def slow_ce(h, table, positives):
    """-log softmax of each history's positive over items 1..N, one item at a time (row 0 of the table, padding,
    is no class)."""
    total = 0
    for b in range(len(h)):
        denominator = sum(torch.exp(h[b] @ table[n]) for n in range(1, len(table)))
        total = total - (h[b] @ table[positives[b]] - torch.log(denominator))
    return total


def slow_uniformity(h, p, n, beta, t, normalize=True, rec=True, hom=True, het=True):
    if normalize:
        h, p, n = ([v / torch.sqrt((v * v).sum()) for v in m] for m in (h, p, n))
    else:
        h, p, n = list(h), list(p), list(n)
    G = lambda x, y: torch.exp(-t * ((x - y) ** 2).sum())
    total = 0
    if rec:
        for b in range(len(h)):
            total = total - torch.log(torch.sigmoid(h[b] @ p[b])) - torch.log(1 - torch.sigmoid(h[b] @ n[b]))
    if hom:
        items = p + n                                                        # D_I: positives and negatives
        for group in (h, items):
            for x in range(len(group)):
                for y in range(x + 1, len(group)):                           # unordered pairs, no self-pairs
                    total = total + beta * G(group[x], group[y])
    if het:
        for x in range(len(h)):
            for y in range(len(n)):                                          # every history with every negative
                total = total + beta * G(h[x], n[y])
    return total


def test_score_is_the_dot_product_or_the_cosine_of_every_pair_it_is_given():
    """Eq. 1 (with cosine=True eq. 3) against a loop, for the three ways vectors pair up: history b with item b,
    each history with K items of its own (training), every history with one set of items (evaluation)."""
    h, paired, own, shared = vectors(4, seed=23), vectors(4, seed=26), vectors(12, seed=24).view(4, 3, 6), \
        vectors(5, seed=25)
    for cosine in (False, True):
        f = (lambda v: v / v.norm()) if cosine else (lambda v: v)
        one, per_history, every = U.score(h, paired, cosine), U.score(h[:, None], own, cosine), \
            U.score(h[:, None], shared, cosine)
        assert one.shape == (4,) and per_history.shape == (4, 3) and every.shape == (4, 5)
        for b in range(4):
            assert torch.allclose(one[b], f(h[b]) @ f(paired[b]))
            for k in range(3):
                assert torch.allclose(per_history[b, k], f(h[b]) @ f(own[b, k]))
            for m in range(5):
                assert torch.allclose(every[b, m], f(h[b]) @ f(shared[m]))
        assert torch.allclose(U.score(h[:, None], shared.expand(4, 5, 6), cosine), every)  # the product = the rule
        assert torch.equal(U.score_all(h, shared, cosine), every)                # score_all is that product


def test_bce_and_bpr_match_loops():
    pos, neg = vectors(7, 1, seed=1)[:, 0], vectors(7, 1, seed=2)[:, 0]
    for fast, slow in ((U.bce_loss, slow_bce), (U.bpr_loss, slow_bpr)):
        a, b = fast(pos, neg), slow(pos, neg)
        assert torch.allclose(a, b)
        for ga, gb in zip(gradients(a, (pos, neg)), gradients(b, (pos, neg))):
            assert torch.allclose(ga, gb)


def test_infonce_matches_loop_and_drops_the_positive_among_negatives():
    pos, neg = vectors(5, 1, seed=3)[:, 0], vectors(5, 5, seed=4)
    same = torch.zeros(5, 5, dtype=torch.bool)
    same[0, 3] = same[2, 2] = True
    a, b = U.infonce_loss(pos, neg, same), slow_infonce(pos, neg, same)
    assert torch.allclose(a, b)
    for ga, gb in zip(gradients(a, (pos, neg)), gradients(b, (pos, neg))):
        assert torch.allclose(ga, gb)
    assert gradients(U.infonce_loss(pos, neg, same), (neg,))[0][0, 3] == 0   # a masked candidate gets no gradient


def test_ce_matches_loop_over_every_item_and_padding_is_never_a_class():
    h, table = vectors(5, seed=27), vectors(9, seed=28)                       # 8 items and the padding row 0
    positives = torch.tensor([1, 8, 3, 3, 5])                                 # the first and last id, one twice
    a, b = U.ce_loss(h @ table.T, positives), slow_ce(h, table, positives)
    assert torch.allclose(a, b)
    fast_grads = gradients(a, (h, table))
    for ga, gb in zip(fast_grads, gradients(b, (h, table))):
        assert torch.allclose(ga, gb)
    assert not fast_grads[1][0].any()                                         # the padding row learns nothing
    moved = table.detach().clone()
    moved[0] = 100.0                                                          # a padding score that would dominate
    assert torch.allclose(U.ce_loss(h @ moved.T, positives), a)


def test_ce_in_the_training_step_scores_every_item_and_reads_no_negatives():
    model = U.SASRec(20, dim=8, layers=1, heads=1).double()
    h, table = vectors(6, 8, seed=29), model.items.weight
    positives = torch.tensor([1, 2, 3, 4, 5, 20])
    loss = U.batch_loss(model, h, positives, torch.tensor([7, 8, 9, 10, 11, 12]), {"loss": "ce"})
    assert torch.allclose(loss, slow_ce(h, table, positives))
    assert torch.equal(loss, U.batch_loss(model, h, positives, torch.tensor([2, 2, 2, 2, 2, 2]), {"loss": "ce"}))
    assert not U.scores_are_cosines({"loss": "ce", "normalize": True})        # ranked by dot products, as trained


def infonce_config(k):
    return {"loss": "infonce", "infonce_negatives": k}


def test_infonce_with_one_negative_is_bpr():
    model = U.SASRec(20, dim=8, layers=1, heads=1).double()
    h = vectors(6, 8, seed=21)
    positives, negatives = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([7, 8, 9, 10, 11, 3])
    one = U.batch_loss(model, h, positives, negatives, infonce_config(1))
    bpr = U.batch_loss(model, h, positives, negatives, {"loss": "bpr"})
    assert torch.allclose(one, bpr, rtol=1e-12)
    for ga, gb in zip(gradients(one, (h, model.items.weight)), gradients(bpr, (h, model.items.weight))):
        assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-14)


def test_infonce_with_k_negatives_matches_loop():
    """Each history b sees the negatives of batch slots b, b+1, ..., b+K-1 (cyclically); one equal to its positive
    is dropped."""
    model = U.SASRec(20, dim=8, layers=1, heads=1).double()
    h = vectors(6, 8, seed=22)
    positives, negatives = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([7, 8, 1, 10, 11, 12])  # slot 2's is 0's
    table = model.items.weight
    for k in (2, 3, 5):
        loss = U.batch_loss(model, h, positives, negatives, infonce_config(k))
        slow = 0
        for b in range(6):
            slots = [(b + o) % 6 for o in range(k)]
            candidates = [h[b] @ table[positives[b]]] + [h[b] @ table[negatives[j]] for j in slots
                                                         if negatives[j] != positives[b]]
            slow = slow - (candidates[0] - torch.log(sum(torch.exp(c) for c in candidates)))
        assert torch.allclose(loss, slow)
    everything = U.batch_loss(model, h, positives, negatives, infonce_config(None))   # h @ n.T, all B
    chosen = U.infonce_candidates(6, 6, "cpu")                                           # all B, rotated
    n = table[negatives]
    rotated = U.infonce_loss((h * table[positives]).sum(-1), (h[:, None] * n[chosen]).sum(-1),
                             positives[:, None] == negatives[chosen])
    assert torch.allclose(rotated, everything)


@pytest.mark.parametrize("flags", [{}, {"normalize": False}, {"rec": False}, {"hom": False}, {"het": False},
                                   {"hom": False, "het": False}])
def test_uniformity_loss_matches_loop(flags):
    h, p, n = vectors(5, seed=5), vectors(5, seed=6), vectors(5, seed=7)
    if flags.get("normalize") is False:                                       # raw vectors: keep potentials non-zero
        h, p, n = (v.detach().mul(0.3).requires_grad_() for v in (h, p, n))
    a = U.uniformity_loss(h, p, n, beta=0.3, t=1.5, **flags)
    b = slow_uniformity(h, p, n, 0.3, 1.5, **flags)
    assert torch.allclose(a, b)
    for ga, gb in zip(gradients(a, (h, p, n)), gradients(b, (h, p, n))):
        assert torch.allclose(ga, gb)


def test_uniformity_defaults_are_beta_005_and_t_2():
    h, p, n = vectors(4, seed=8), vectors(4, seed=9), vectors(4, seed=10)
    assert torch.allclose(U.uniformity_loss(h, p, n), slow_uniformity(h, p, n, 0.05, 2.0))


def test_uniformity_loss_in_float32_at_paper_batch_size_matches_float64():
    """torch.cdist switches to a matrix-product formula above 25 rows; check it at B = 256 against float64."""
    h, p, n = (vectors(256, 64, seed=s) for s in (11, 12, 13))
    exact = U.uniformity_loss(h, p, n)
    single = U.uniformity_loss(h.float(), p.float(), n.float())
    assert torch.allclose(single.double(), exact, rtol=1e-4)


def test_ablation_row_a_is_plain_bce():
    h, p, n = vectors(6, seed=14), vectors(6, seed=15), vectors(6, seed=16)
    row_a = U.uniformity_loss(h, p, n, normalize=False, hom=False, het=False)
    assert torch.allclose(row_a, U.bce_loss((h * p).sum(-1), (h * n).sum(-1)))


def test_uniformity_gradients_finite_when_an_item_repeats():
    base = vectors(4, 8, seed=17).detach()
    for rows in (4, 40):                                                      # both cdist code paths (<= 25, > 25)
        h = base.repeat(rows // 4, 1).float().requires_grad_()               # every history repeated
        p = h.detach().clone().requires_grad_()                               # positives equal to the histories
        n = p.detach().clone().requires_grad_()                               # negatives equal to the positives
        loss = U.uniformity_loss(h, p, n)
        grads = gradients(loss, (h, p, n))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


def test_loss_functions_work_copied_alone_with_only_torch():
    functions = (U.score, U.score_all, U.bce_loss, U.bpr_loss, U.infonce_loss, U.ce_loss, U.gaussian_potential,
                 U.uniformity_loss)
    source = "import torch\n\n" + "\n\n".join(inspect.getsource(f) for f in functions)
    namespace = {}
    exec(compile(source, "copied_losses.py", "exec"), namespace)             # noqa: S102 - the point of the test
    assert set(namespace) - {"__builtins__"} == {"torch", *(f.__name__ for f in functions)}
    h, p, n = vectors(6, seed=18), vectors(6, seed=19), vectors(6, seed=20)
    assert torch.equal(namespace["uniformity_loss"](h, p, n), U.uniformity_loss(h, p, n))
    assert torch.equal(namespace["uniformity_loss"](h, p, n, 0.1, 3.0, het=False),
                       U.uniformity_loss(h, p, n, 0.1, 3.0, het=False))
    pos, neg = (h * p).sum(-1), (h * n).sum(-1)
    assert torch.equal(namespace["bpr_loss"](pos, neg), U.bpr_loss(pos, neg))
    assert torch.equal(namespace["infonce_loss"](pos, h @ n.T, torch.eye(6, dtype=torch.bool)),
                       U.infonce_loss(pos, h @ n.T, torch.eye(6, dtype=torch.bool)))
    positives = torch.tensor([1, 5, 2, 2, 4, 3])
    assert torch.equal(namespace["ce_loss"](h @ n.T, positives), U.ce_loss(h @ n.T, positives))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation against brute force
# ----------------------------------------------------------------------------------------------------------------

class FixedScorer(torch.nn.Module):
    """A 'model' whose history vector is a lookup by the history's last item: scores are fully controlled."""

    def __init__(self, history_table, item_table):
        super().__init__()
        self.history_table = torch.nn.Parameter(history_table)
        self.items = torch.nn.Embedding.from_pretrained(item_table)

    def output_items(self):
        return self.items

    def encode(self, histories, users=None):
        return self.history_table[U.last_real_state(histories[:, :, None].float(), histories)[:, 0].long()]


def brute_force_metrics(scores, targets, histories, mask_seen, k):
    hits, gains = [], []
    for row, target, history in zip(scores.tolist(), targets, histories):
        row = list(row)
        row[0] = -math.inf
        if mask_seen:
            for item in history:
                row[item] = -math.inf
        rank = sum(1 for item, s in enumerate(row) if item != target and s >= row[target])
        if row[target] == -math.inf:                                          # masked: cannot be recommended
            rank = math.inf
        hits.append(1.0 if rank < k else 0.0)
        gains.append(1 / math.log2(rank + 2) if rank < k else 0.0)
    return sum(hits) / len(hits), sum(gains) / len(gains)


@pytest.mark.parametrize("mask_seen", [False, True])
@pytest.mark.parametrize("cosine", [False, True])
def test_metrics_match_brute_force(mask_seen, cosine):
    g = torch.Generator().manual_seed(0)
    num_items, users = 30, 40
    items = torch.randn(num_items + 1, 4, generator=g)
    items[5] = items[6]                                                       # a tie between two items
    history_table = torch.randn(num_items + 1, 4, generator=g)
    histories = [torch.randint(1, num_items + 1, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(users)]
    targets = torch.randint(1, num_items + 1, (users,), generator=g)
    targets[:3] = torch.tensor([5, 6, histories[3][-1]])                     # tied targets, a target seen before
    histories[3].append(int(targets[3]))
    width = max(map(len, histories))
    padded = torch.tensor([h + [0] * (width - len(h)) for h in histories])
    model = FixedScorer(history_table, items)
    batches = [(padded[:17], None, targets[:17]), (padded[17:], None, targets[17:])]
    result = U.evaluate(model, batches, cosine=cosine, mask_seen=mask_seen)
    h, table = model.encode(padded), model.items.weight
    if cosine:
        h, table = h / h.norm(dim=-1, keepdim=True), table / table.norm(dim=-1, keepdim=True)
    scores = h @ table.T
    for k in (5, 10, 20):
        hr, ndcg = brute_force_metrics(scores.detach(), targets.tolist(), histories, mask_seen, k)
        assert result[f"HR@{k}"] == pytest.approx(hr) and result[f"NDCG@{k}"] == pytest.approx(ndcg)


def test_constant_scorer_scores_zero_and_perfect_scorer_scores_one():
    num_items = 50
    histories = torch.tensor([[1, 2], [3, 0], [4, 5]])
    targets = torch.tensor([7, 8, 9])
    constant = FixedScorer(torch.ones(num_items + 1, 3), torch.ones(num_items + 1, 3))
    result = U.evaluate(constant, [(histories, None, targets)], cosine=False)
    assert all(v == 0 for v in result.values())
    # history vector of the user = one-hot of its target; items one-hot: the target alone scores 1
    one_hot = torch.eye(num_items + 1)
    history_table = torch.zeros(num_items + 1, num_items + 1)
    history_table[2], history_table[3], history_table[5] = one_hot[7], one_hot[8], one_hot[9]
    perfect = FixedScorer(history_table, one_hot)
    result = U.evaluate(perfect, [(histories, None, targets)], cosine=True)
    assert result["HR@5"] == result["NDCG@5"] == result["NDCG@20"] == 1.0


def test_mask_seen_makes_a_repeated_target_unreachable():
    one_hot = torch.eye(6)
    history_table = torch.zeros(6, 6)
    history_table[2] = one_hot[2]                                             # user's vector points at item 2
    model = FixedScorer(history_table, one_hot)
    batch = [(torch.tensor([[1, 2]]), None, torch.tensor([2]))]                     # target 2 is also in the history
    assert U.evaluate(model, batch, cosine=False)["HR@5"] == 1.0
    assert U.evaluate(model, batch, cosine=False, mask_seen=True)["HR@20"] == 0.0


def test_non_finite_scores_are_an_error_not_a_hit():
    table = torch.ones(6, 3)
    table[4, 0] = float("nan")
    model = FixedScorer(torch.ones(6, 3), table)
    with pytest.raises(FloatingPointError):
        U.evaluate(model, [(torch.tensor([[1, 2]]), None, torch.tensor([4]))], cosine=False)


# ----------------------------------------------------------------------------------------------------------------
# Data: split, leakage, negatives
# ----------------------------------------------------------------------------------------------------------------

def toy_sequences(users=30, held_out_base=1000, seed=0):
    """Sequences whose validation and test items are ids >= held_out_base, used nowhere else."""
    g = torch.Generator().manual_seed(seed)
    sequences = []
    for u in range(users):
        n = int(torch.randint(3, 70, (1,), generator=g))
        train = torch.randint(1, 40, (n - 2,), generator=g).tolist()
        sequences.append(train + [held_out_base + 2 * u, held_out_base + 2 * u + 1])
    return sequences


def test_flattened_sequences_and_training_data_hold_what_they_say():
    sequences = toy_sequences()
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    assert flat[0] == 0 and num_items == max(max(s) for s in sequences)
    assert [flat[a:a + n].tolist() for a, n in zip(starts.tolist(), lengths.tolist())] == sequences
    data = U.training_data(flat, starts, lengths, num_items, 50)
    ends, history_lengths, users = U.training_examples(starts, lengths, 50)
    assert data.flat is flat and data.num_items == num_items
    assert torch.equal(data.target_at, ends) and torch.equal(data.history_lengths, history_lengths)
    assert torch.equal(data.users, users)
    assert torch.equal(data.avoided, U.training_item_codes(flat, starts, lengths, num_items))


def test_training_examples_are_exactly_the_prefixes_of_the_training_part():
    sequences = toy_sequences()
    flat, starts, lengths, _ = U.flatten_sequences(sequences, "cpu")
    ends, history_lengths, users = U.training_examples(starts, lengths, max_len=50)
    width = int(history_lengths.max())
    histories = U.gather_histories(flat, ends, history_lengths, width)
    produced = sorted((int(u), tuple(h[h > 0].tolist()), int(flat[e])) for u, h, e in zip(users, histories, ends))
    expected = sorted((u, tuple(s[max(0, t - 50):t]), s[t])
                      for u, s in enumerate(sequences) for t in range(1, len(s) - 2))
    assert produced == expected


def test_no_validation_or_test_item_reaches_training():
    sequences = toy_sequences()
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    ends, history_lengths, users = U.training_examples(starts, lengths, 50)
    seen = set()
    for batch, sizes, widths in U.epoch_batches(torch.randperm(len(ends)), history_lengths, 16, 3):
        for e, n, w in zip(ends[batch].split(sizes), history_lengths[batch].split(sizes), widths):
            seen.update(U.gather_histories(flat, e, n, w).flatten().tolist())
        seen.update(flat[ends[batch]].tolist())
    assert max(seen) < 1000


def test_evaluation_histories_are_the_leave_one_out_ones():
    sequences = toy_sequences()
    flat, starts, lengths, _ = U.flatten_sequences(sequences, "cpu")
    for split, cut in (("valid", 2), ("test", 1)):
        ((histories, users, targets),) = U.evaluation_batches(flat, starts, lengths, 50, split, batch_size=10_000)
        produced = sorted((tuple(h[h > 0].tolist()), int(t)) for h, t in zip(histories, targets))
        expected = sorted((tuple(s[:len(s) - cut][-50:]), s[len(s) - cut]) for s in sequences)
        assert produced == expected


def test_negatives_avoid_each_users_training_items():
    g = torch.Generator().manual_seed(1)
    num_items = 12
    # users that own most of the catalogue force many rejections
    sequences = [torch.randperm(num_items, generator=g)[:int(torch.randint(3, 11, (1,), generator=g))].add(1).tolist()
                 for _ in range(50)]
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    avoided = U.training_item_codes(flat, starts, lengths, num_items)
    users = torch.arange(len(sequences)).repeat_interleave(200)
    negatives = U.sample_negatives(users, avoided, num_items, torch.Generator().manual_seed(2))
    for user, negative in zip(users.tolist(), negatives.tolist()):
        assert 1 <= negative <= num_items and negative not in sequences[user][:-2]
    # held-out items are allowed as negatives (spec §2: excluding them would use held-out data)
    allowed = {(u, i) for u, s in enumerate(sequences) for i in s[-2:] if i not in s[:-2]}
    assert allowed & set(zip(users.tolist(), negatives.tolist()))


def test_epoch_batches_keep_every_example_once_and_groups_sorted():
    history_lengths = torch.randint(1, 51, (1000,))
    order = torch.randperm(1000)
    batches = U.epoch_batches(order, history_lengths, 256, 8)
    assert [len(b) for b, _, _ in batches] == [256, 256, 256, 232]
    for (batch, sizes, widths), chunk in zip(batches, order.split(256)):
        assert sorted(batch.tolist()) == sorted(chunk.tolist())              # the same triplets as the random cut
        assert widths == [int(g.max()) for g in history_lengths[batch].split(sizes)]


# ----------------------------------------------------------------------------------------------------------------
# Backbones: padding and the future cannot change a history vector
# ----------------------------------------------------------------------------------------------------------------

def make_model(name, num_items=50):
    """A backbone by name; "sasrec-original" is SASRec with the original's blocks (--block original)."""
    torch.manual_seed(0)
    if name == "sasrec-original":
        return backbone("sasrec", num_items, block="original").eval()
    return backbone(name, num_items).eval()


@pytest.mark.parametrize("name", ["gru4rec", "caser", "sasrec", "sasrec-original"])
def test_grouped_encoding_equals_each_history_alone(name):
    """encode_batch (length groups, one item lookup for all groups) gives each history's own vector and gradient.
    In float64: in float32 the LayerNorms of small vectors amplify summation-order differences to ~1e-3."""
    model = make_model(name).double()
    sequences = [[3, 4], [4, 9, 2, 7, 8], [7, 1, 2, 8, 5, 6, 10, 11], [11, 12, 13], [5, 6, 7, 8]]
    flat, starts, lengths, _ = U.flatten_sequences(sequences, "cpu")
    ends, history_lengths, _ = U.training_examples(starts, lengths, 20)
    (batch, sizes, widths), = U.epoch_batches(torch.arange(len(ends)), history_lengths, len(ends), 3)
    assert len(sizes) == 3 and len(set(widths)) > 1
    grouped = U.encode_batch(model, flat, ends[batch], history_lengths[batch], sizes, widths)
    grouped.square().sum().backward()
    grouped_gradient, model.items.weight.grad = model.items.weight.grad.clone(), None
    alone = torch.cat([model.encode(U.gather_histories(flat, ends[b:b + 1], history_lengths[b:b + 1],
                                                       int(history_lengths[b]))) for b in batch.tolist()])
    alone.square().sum().backward()
    assert torch.allclose(grouped, alone, atol=1e-10)
    assert torch.allclose(grouped_gradient, model.items.weight.grad, atol=1e-10)


def test_grouped_encoding_gives_each_group_its_users():
    """A Caser with a user embedding, encoded in groups (--length-groups > 1), reads each history's own user."""
    model = caser_variant(num_users=5).double()
    sequences = [[3, 4, 5, 6], [4, 9, 2, 7, 8], [7, 1, 2, 8, 5, 6, 10, 11], [11, 12, 13, 14], [5, 6, 7, 8, 9]]
    flat, starts, lengths, _ = U.flatten_sequences(sequences, "cpu")
    ends, history_lengths, users = U.training_examples(starts, lengths, 20)
    (batch, sizes, widths), = U.epoch_batches(torch.arange(len(ends)), history_lengths, len(ends), 3)
    with torch.no_grad():
        grouped = U.encode_batch(model, flat, ends[batch], history_lengths[batch], sizes, widths, users[batch])
        alone = torch.cat([model.encode(U.gather_histories(flat, ends[b:b + 1], history_lengths[b:b + 1],
                                                           int(history_lengths[b])), users=users[b:b + 1])
                           for b in batch.tolist()])
    assert len(sizes) == 3 and torch.allclose(grouped, alone, atol=1e-10)


def test_packed_batches_give_every_history_its_own_cells_within_one_row():
    """packed_batches: the same random cut into batches as without packing; each history in a slot of the smallest
    size that holds it, inside one row, and no two slots sharing a cell."""
    torch.manual_seed(0)
    history_lengths = torch.cat([torch.randint(1, 51, (900,)), torch.full((100,), 50), torch.ones(24, dtype=int)])
    order = torch.randperm(len(history_lengths))
    batches = U.packed_batches(order, history_lengths, 256, 50)
    assert [len(b) for b, _, _ in batches] == [256, 256, 256, 256]
    sizes = torch.tensor(U.slot_sizes(50))
    for (batch, first, rows), chunk in zip(batches, order.split(256)):
        assert torch.equal(batch, chunk)
        lengths = history_lengths[batch]
        slot = sizes[torch.searchsorted(sizes, lengths)]
        assert (first % 50 + slot <= 50).all()                              # a slot never crosses into the next row
        used = torch.zeros(rows * 50, dtype=torch.int)
        for start, size in zip(first.tolist(), slot.tolist()):
            used[start:start + size] += 1
        assert used.max() == 1                                               # no cell is two slots'
        loose = sum(-(-int((slot == s).sum()) // (50 // s)) for s in sizes.tolist())
        assert rows == loose                                                 # each size's rows, each full but its last


def test_slot_sizes_fill_a_row():
    assert U.slot_sizes(50) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 25, 50]
    assert U.slot_sizes(1) == [1] and U.slot_sizes(7) == [1, 2, 3, 7]


def packed_and_alone(model, sequences, max_len=20, batch_size=None):
    flat, starts, lengths, _ = U.flatten_sequences(sequences, "cpu")
    ends, history_lengths, _ = U.training_examples(starts, lengths, max_len)
    width = int(history_lengths.max())
    (batch, first, rows), *_ = U.packed_batches(torch.randperm(len(ends)), history_lengths,
                                                batch_size or len(ends), width)
    packed = U.encode_packed(model, flat, ends[batch], history_lengths[batch], first, rows, width)
    alone = torch.cat([model.encode(U.gather_histories(flat, ends[b:b + 1], history_lengths[b:b + 1],
                                                       int(history_lengths[b]))) for b in batch.tolist()])
    return packed, alone, rows, width


def test_packed_encoding_equals_each_history_alone():
    """--pack: several histories to a row, each attending only to its own earlier positions, give each history the
    vector and gradient it has alone (float64, as for the length groups)."""
    model = make_model("sasrec").double()
    sequences = [[3, 4, 5], [4, 9, 2, 7, 8], [7, 1, 2, 8, 5, 6, 10, 11, 3, 4, 5, 6, 7], [11, 12, 13, 14],
                 [5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    packed, alone, rows, width = packed_and_alone(model, sequences)
    assert rows * width < len(packed) * width                              # rows were shared
    packed.square().sum().backward()
    packed_gradient, model.items.weight.grad = model.items.weight.grad.clone(), None
    alone.square().sum().backward()
    assert torch.allclose(packed, alone, atol=1e-10)
    assert torch.allclose(packed_gradient, model.items.weight.grad, atol=1e-10)


def test_packed_training_draws_masks_from_bits_and_learns_the_same_thing():
    """The packed path's dropout masks (random_keep) drop at rate p exactly for p = 0.5; and a packed training
    epoch on a toy problem lowers the loss as the padded one does."""
    torch.manual_seed(0)
    keep = U.random_keep((400, 500), 0.5, "cpu")
    assert abs(keep.float().mean().item() - 0.5) < 0.005
    assert abs(U.random_keep((200_000,), 0.3, "cpu").float().mean().item() - 0.7) < 0.005
    dropout = U.Dropout(0.5)
    dropout.from_bits = True
    y = dropout(torch.ones(100_000))
    assert set(y.unique().tolist()) == {0.0, 2.0} and abs(y.mean().item() - 1) < 0.02
    sequences = [[(start + k) % 30 + 1 for k in range(length)] for start, length in
                 zip(torch.randint(0, 30, (80,)).tolist(), torch.randint(5, 15, (80,)).tolist())]
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    data = U.training_data(flat, starts, lengths, num_items, 12)
    config = {"seed": 1, "batch_size": 64, "length_groups": 4, "loss": "bce", "beta": 0.05, "t": 2.0,
              "normalize": True, "rec": True, "hom": True, "het": True, "infonce_negatives": None}
    first_and_last = {}
    for pack in (False, True):
        torch.manual_seed(0)
        model = U.SASRec(num_items, 16, 1, 1, 0.1, 12)
        optimizer = U.adam(model, 1e-2, torch.device("cpu"))
        losses = [U.train_epoch(model, optimizer, data, {**config, "pack": pack}, epoch).sum().item()
                  for epoch in range(1, 9)]
        first_and_last[pack] = losses[0], losses[-1]
    for first, last in first_and_last.values():
        assert last < 0.7 * first                                            # both learn next = previous + 1
    assert first_and_last[True] != first_and_last[False]                     # the packed path ran (other draws)


def test_pack_leaves_earlier_run_folders_and_is_refused_elsewhere(tmp_path):
    setting = ["--loss", "uniform", "--lr", "1e-3", "--dim", "64", "--layers", "2", "--heads", "2", "--seed", "1",
               "--beta", "0.05"]
    assert configured(tmp_path, *setting)[1] == "runs/beauty-sasrec-uniform-cf8b73ff"
    packed, folder = configured(tmp_path, *setting, "--pack")
    assert packed["pack"] and folder != "runs/beauty-sasrec-uniform-cf8b73ff"
    with pytest.raises(R.ConfigError, match="--pack only applies to --model sasrec"):
        configured(tmp_path, "--model", "gru4rec", "--pack")
    with pytest.raises(ValueError, match="pack=True only applies to SASRec"):
        U.Config(model="caser", pack=True)                                   # from Python as from the command line


# ----------------------------------------------------------------------------------------------------------------
# The per-user regime (--examples users): one causal pass over each user's training part
# ----------------------------------------------------------------------------------------------------------------

def numbered_sequences(users=40, seed=0):
    """Sequences of 5 to 40 items whose ids are all distinct, so that an id names its place in `flat`."""
    g = torch.Generator().manual_seed(seed)
    sequences, next_id = [], 1
    for length in torch.randint(5, 41, (users,), generator=g).tolist():
        sequences.append(list(range(next_id, next_id + length)))
        next_id += length
    return sequences


class Identity(torch.nn.Module):
    """A stand-in backbone whose state at a cell is the item there (its id), for checking what the layouts read."""

    def __init__(self, num_items):
        super().__init__()
        self.items = torch.nn.Embedding.from_pretrained(torch.arange(num_items + 1.0)[:, None])

    def states(self, x, steps_back, blocked):
        return x

    def sequence_states(self, x, histories):
        return x


def user_epoch(sequences, max_len, batch_size, groups, seed=0):
    """(flat, data, batches) of the per-user regime's epoch on `sequences`: packed (groups None) or grouped."""
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    data = U.training_data(flat, starts, lengths, num_items, max_len, examples="users")
    order = torch.randperm(len(data.window_ends), generator=torch.Generator().manual_seed(seed))
    return flat, data, U.user_batches(data.window_ends[order], data.history_lengths, batch_size, data.widest, groups)


def wide_model(name, num_items):
    """make_model's backbone, with a position table for windows of up to 50 inputs."""
    torch.manual_seed(0)
    block = "original" if name == "sasrec-original" else "pre-ln"
    return backbone(name.split("-")[0], num_items, max_len=50, block=block).eval()


def batch_states(model, flat, data, windows, first, layout):
    at, lengths = data.target_at[windows], data.history_lengths[windows]
    if len(layout) == 1:
        return U.packed_states(model, flat, at, lengths, first, *layout, data.widest)
    return U.grouped_states(model, flat, at, lengths, *layout)


@pytest.mark.parametrize("groups", [None, 3])
@pytest.mark.parametrize("max_len", [50, 7])
def test_user_batches_hold_every_prefix_pair_once_in_batches_of_whole_windows(groups, max_len):
    """An epoch of the per-user regime trains exactly the per-prefix (history's last item, positive) pairs, each
    once (a multiset comparison); in batches of whole windows of about batch_size triplets; a triplet's cell holds
    its history's last item, its example names its positive; with max_len 7 users are cut into windows, counted back
    from their last input, and every pair is still there once."""
    sequences = numbered_sequences()
    flat, data, batches = user_epoch(sequences, max_len, 64, groups)
    model = Identity(int(flat.max()))
    expected = sorted((s[t - 1], s[t]) for s in sequences for t in range(1, len(s) - 2))
    produced, windows_seen = [], []
    for windows, first, examples, cells, layout in batches:
        read = batch_states(model, flat, data, windows, first, layout)[cells, 0].long()   # the item at each cell
        assert torch.equal(read, flat[data.target_at[examples] - 1])                   # the history's last item
        produced += list(zip(read.tolist(), flat[data.target_at[examples]].tolist()))
        windows_seen += windows.tolist()
        assert len(examples) == int(data.history_lengths[windows].sum())           # every triplet of its windows
    assert sorted(produced) == expected
    assert sorted(windows_seen) == data.window_ends.tolist()                     # each window once
    sizes = [len(examples) for _, _, examples, _, _ in batches]
    window = int(data.history_lengths.max())
    assert all(64 - window < size < 64 + window for size in sizes[:-1]) and sum(sizes) == len(data.target_at)
    lengths = data.history_lengths[data.window_ends]
    assert lengths.max() <= max_len and (max_len == 50) == (len(data.window_ends) == len(sequences))
    ends = data.target_at[data.window_ends]
    user_ends = {int(U.flatten_sequences(sequences, "cpu")[1][u]) + len(s) - 3 for u, s in enumerate(sequences)}
    assert user_ends <= set(ends.tolist())                                       # a user's last window ends its part


@pytest.mark.parametrize("name,groups", [("sasrec", None), ("sasrec", 3), ("sasrec-original", None),
                                         ("gru4rec", 3)])
def test_a_per_user_state_is_the_per_prefix_vector_of_its_window_with_positions_zeroed(name, groups):
    """float64: every per-user state equals the history vector encode() gives the same items alone, the window's
    items up to its cell (all of the prefix within max_len), once SASRec's position table is zeroed; with the table,
    only at a window's last cell (steps back 0 in both), since earlier cells count back from the window's end. The
    gradients agree too."""
    sequences = numbered_sequences(users=12)
    for max_len in (50, 6):
        model = wide_model(name, sum(map(len, sequences))).double()
        flat, data, batches = user_epoch(sequences, max_len, 40, groups)
        for zeroed in (False, True) if name != "gru4rec" else (False,):
            if zeroed:
                torch.nn.init.zeros_(model.positions.weight)
            for windows, first, examples, cells, layout in batches:
                states = batch_states(model, flat, data, windows, first, layout)[cells]
                window_first = torch.repeat_interleave(windows - data.history_lengths[windows] + 1,
                                                       data.history_lengths[windows])
                seen = examples - window_first + 1                              # the window's items up to the cell
                alone = torch.cat([model.encode(U.gather_histories(flat, data.target_at[e:e + 1], seen[j:j + 1],
                                                                   int(seen[j]))) for j, e in enumerate(examples)])
                last = torch.isin(examples, windows)
                assert torch.allclose(states[last], alone[last], atol=1e-10)
                if zeroed or name == "gru4rec":
                    assert torch.allclose(states, alone, atol=1e-10)
                    states.square().sum().backward()
                    per_user, model.items.weight.grad = model.items.weight.grad.clone(), None
                    alone.square().sum().backward()
                    assert torch.allclose(per_user, model.items.weight.grad, atol=1e-10)
                    model.zero_grad(set_to_none=True)
                else:
                    assert not torch.allclose(states[~last], alone[~last], atol=1e-6)
                if max_len == 50:
                    assert torch.equal(seen, data.history_lengths[examples])      # the whole prefix


@pytest.mark.parametrize("name,groups", [("sasrec", None), ("sasrec", 3), ("gru4rec", 3)])
def test_a_per_user_state_never_sees_a_later_item(name, groups):
    """Changing a user's later inputs leaves every state before them as it was (positions and all) and changes
    those at and after them."""
    sequences = numbered_sequences(users=12)
    model = wide_model(name, sum(map(len, sequences)))
    flat, data, batches = user_epoch(sequences, 50, 40, groups)
    windows, first, examples, cells, layout = batches[0]
    window = int(windows[torch.argmax(data.history_lengths[windows])])
    changed_from = int(data.target_at[window]) - 3                          # the window's last three inputs
    other = flat.clone()
    other[changed_from:changed_from + 3] = torch.tensor([1, 2, 3])
    with torch.no_grad():
        before = batch_states(model, flat, data, windows, first, layout)[cells]
        after = batch_states(model, other, data, windows, first, layout)[cells]
    inputs = data.target_at[examples] - 1
    same_window = (examples <= window) & (examples > window - data.history_lengths[window])
    earlier = ~same_window | (inputs < changed_from)
    assert torch.allclose(before[earlier], after[earlier], atol=1e-6)
    assert not torch.isclose(before[~earlier], after[~earlier], atol=1e-6).all(1).any()


@pytest.mark.parametrize("name,pack", [("sasrec", True), ("sasrec", False), ("gru4rec", False)])
def test_per_user_training_learns(name, pack):
    """A per-user epoch on a toy problem (next = previous + 1) lowers the loss as the per-prefix one does; the
    epoch's steps are about as many as per-prefix (batches of about batch_size triplets)."""
    torch.manual_seed(0)
    sequences = [[(start + k) % 30 + 1 for k in range(length)] for start, length in
                 zip(torch.randint(0, 30, (80,)).tolist(), torch.randint(5, 15, (80,)).tolist())]
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    data = U.training_data(flat, starts, lengths, num_items, 12, examples="users")
    config = {"seed": 1, "batch_size": 64, "length_groups": 4, "loss": "bce", "beta": 0.05, "t": 2.0,
              "normalize": True, "rec": True, "hom": True, "het": True, "infonce_negatives": None, "pack": pack}
    losses = {}
    for examples in ("prefixes", "users"):
        torch.manual_seed(0)
        model = backbone(name, num_items, max_len=12, layers=1, dropout=0.1)
        optimizer = U.adam(model, 1e-2, torch.device("cpu"))
        losses[examples] = [U.train_epoch(model, optimizer, data, {**config, "examples": examples}, epoch)
                            for epoch in range(1, 9)]
    for epochs in losses.values():
        assert epochs[-1].sum() < 0.7 * epochs[0].sum()
    assert abs(len(losses["users"][0]) - len(losses["prefixes"][0])) <= 2


def test_examples_users_gets_its_own_run_folder_and_is_refused_for_caser(tmp_path):
    setting = ["--loss", "uniform", "--lr", "1e-3", "--dim", "64", "--layers", "2", "--heads", "2", "--seed", "1",
               "--beta", "0.05"]
    assert configured(tmp_path, *setting, "--examples", "prefixes")[1] == "runs/beauty-sasrec-uniform-cf8b73ff"
    users, folder = configured(tmp_path, *setting, "--examples", "users", "--pack")
    assert users["examples"] == "users" and folder not in ("runs/beauty-sasrec-uniform-cf8b73ff",
                                                           configured(tmp_path, *setting, "--pack")[1])
    with pytest.raises(R.ConfigError, match="^--examples users only applies to GRU4Rec and SASRec$"):
        configured(tmp_path, "--model", "caser", "--examples", "users")
    with pytest.raises(ValueError, match="only applies to GRU4Rec and SASRec"):
        U.Config(model="caser", examples="users")


@pytest.mark.parametrize("name", ["gru4rec", "caser", "sasrec", "sasrec-original"])
def test_padding_does_not_change_history_vectors(name):
    model = make_model(name)
    histories = [[3], [4, 9], [7, 1, 2, 8, 5, 6], [11, 12, 13]]
    narrow = torch.tensor([h + [0] * (6 - len(h)) for h in histories])
    wide = torch.nn.functional.pad(narrow, (0, 9))
    with torch.no_grad():
        alone = torch.cat([model.encode(torch.tensor([h])) for h in histories])
        assert torch.allclose(model.encode(narrow), alone, atol=1e-6)
        assert torch.allclose(model.encode(wide), alone, atol=1e-6)
        assert torch.isfinite(model.encode(wide)).all()


@pytest.mark.parametrize("name", ["gru4rec", "sasrec", "sasrec-original"])
def test_states_do_not_see_later_items(name):
    model = make_model(name)
    history = torch.tensor([[5, 6, 7, 8, 9, 10]])
    changed = history.clone()
    changed[0, 4:] = torch.tensor([20, 21])
    with torch.no_grad():
        before = model.sequence_states(model.items(history), history)
        after = model.sequence_states(model.items(changed), changed)
    assert torch.allclose(before[0, :4], after[0, :4], atol=1e-6)
    assert not torch.allclose(before[0, 4:], after[0, 4:])


def test_the_original_sasrec_block_matches_a_loop_over_positions():
    """--block original, one block, one head, against a loop: the query of position j is LN_a(x_j), its keys and
    values the unnormalized x_0..x_j; the residual adds LN_a(x_j); then y = LN_f(.) and y + feed_forward(y)."""
    torch.manual_seed(3)
    block = U.TransformerBlock(8, 1, dropout=0.0, original=True).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64) * 3 + 1                  # far from normalized: LN matters
    W, b = block.attention.qkv.weight, block.attention.qkv.bias
    expected = torch.empty_like(x)
    with torch.no_grad():
        for n in range(2):
            for j in range(5):
                query = block.attention_norm(x[n, j])
                q = W[:8] @ query + b[:8]
                keys = [W[8:16] @ x[n, i] + b[8:16] for i in range(j + 1)]
                values = [W[16:] @ x[n, i] + b[16:] for i in range(j + 1)]
                weights = torch.softmax(torch.stack([q @ k / 8 ** 0.5 for k in keys]), 0)
                attended = block.attention.out(sum(w * v for w, v in zip(weights, values)))
                y = block.feed_forward_norm(query + attended)
                expected[n, j] = y + block.feed_forward(y)
        future = torch.ones(5, 5, dtype=torch.bool).triu(1)
        assert torch.allclose(block(x, future), expected, atol=1e-10)


def test_the_two_sasrec_blocks_share_their_weights_and_differ():
    """Same weights (names and shapes), other outputs: --block original is another model, not another name."""
    pre, original = make_model("sasrec"), make_model("sasrec-original")
    assert {k: v.shape for k, v in pre.state_dict().items()} == {k: v.shape for k, v in original.state_dict().items()}
    original.load_state_dict(pre.state_dict())
    histories = torch.tensor([[1, 2, 3], [4, 5, 0]])
    with torch.no_grad():
        assert not torch.allclose(pre.encode(histories), original.encode(histories), atol=1e-3)


def test_sasrec_history_vector_depends_on_order_and_content():
    model = make_model("sasrec")
    with torch.no_grad():
        a, b, c = (model.encode(torch.tensor([h])) for h in ([1, 2, 3], [2, 1, 3], [1, 2, 4]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_sasrec_input_is_item_times_sqrt_d_plus_position():
    model = backbone("sasrec", 50, layers=0).eval()
    with torch.no_grad():
        h = model.encode(torch.tensor([[7, 3, 0]]))                          # no blocks: the final LayerNorm only
        expected = model.final_norm(model.items.weight[3] * 4.0 + model.positions.weight[0])  # sqrt(16) = 4
    assert torch.allclose(h[0], expected, atol=1e-6)


def test_sasrec_drops_out_where_the_original_does():
    """Embedding sum, attention weights, and twice in each feed-forward net; not the attention's output."""
    model = make_model("sasrec").train()                                    # 2 blocks
    shapes = []
    for module in model.modules():
        if isinstance(module, U.Dropout):
            module.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    model.encode(torch.tensor([[1, 2, 3], [4, 5, 0]]))
    per_block = [(2, 2, 3, 3), (2, 3, 16), (2, 3, 16)]                      # weights (B, h, T, T), feed-forward x 2
    assert shapes == [(2, 3, 16)] + 2 * per_block


def test_caser_reads_only_its_last_window():
    model = make_model("caser")                                               # window 4
    with torch.no_grad():
        a = model.encode(torch.tensor([[9, 8, 1, 2, 3, 4]]))
        b = model.encode(torch.tensor([[30, 1, 2, 3, 4, 0]]))
        c = model.encode(torch.tensor([[1, 2, 3, 5, 0, 0]]))
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c)


def caser_variant(activation="relu", num_users=0, output_table=False, num_items=50):
    torch.manual_seed(0)
    return backbone("caser", num_items, num_users, layers=1, caser_activation=activation,
                    caser_output_table=output_table).eval()


def test_caser_switches_change_what_they_say():
    histories, users = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0]]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        relu, none = caser_variant("relu").encode(histories), caser_variant("none").encode(histories)
        assert (relu >= 0).all() and (none < 0).any()                       # ReLU on the last layer, or not
        with_users = caser_variant(num_users=3)
        a = with_users.encode(histories, users=users)
        b = with_users.encode(histories, users=torch.tensor([1, 1, 1]))
        assert torch.allclose(a[1], b[1]) and not torch.allclose(a[0], b[0])  # the user changes the vector
    own = caser_variant(output_table=True)
    plain = caser_variant()
    assert own.output_items() is not own.items and plain.output_items() is plain.items
    config = {"loss": "bce"}
    loss = U.batch_loss(own, own.encode(histories), torch.tensor([7, 8, 9]), torch.tensor([10, 11, 12]), config)
    loss.backward()
    assert own.scored_items.weight.grad[7:13].abs().sum() > 0              # scoring reads the output table
    assert own.items.weight.grad[7:13].abs().sum() == 0                     # not the input table


def test_evaluation_scores_with_the_output_table_and_reads_users():
    sequences = [[1, 2, 3, 4, 5], [6, 7, 8, 9], [2, 4, 6, 8, 10], [3, 5, 7], [11, 13, 40], [41, 42, 43, 44, 45]]
    model = caser_variant(num_users=6, output_table=True)
    flat, starts, lengths, _ = U.flatten_sequences(sequences, "cpu")
    batches = U.evaluation_batches(flat, starts, lengths, 20, "test")
    result = U.evaluate(model, batches, cosine=True)
    (histories, users, targets), = batches
    with torch.no_grad():
        h = torch.nn.functional.normalize(model.encode(histories, users=users), dim=-1)
        scores = h @ torch.nn.functional.normalize(model.scored_items.weight, dim=-1).T
    scores[:, 0] = float("-inf")
    for k in (5, 10, 20):
        hr, ndcg = brute_force_metrics(scores, targets.tolist(), histories.tolist(), False, k)
        assert result[f"HR@{k}"] == pytest.approx(hr) and result[f"NDCG@{k}"] == pytest.approx(ndcg)


def test_alignment_is_the_mean_squared_distance_of_normalized_training_pairs():
    sequences = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [2, 4, 6, 8, 10, 12, 14]]
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    model = make_model("sasrec", num_items=14)
    sample = R.statistics_sample(flat, starts, lengths, num_items, 20)
    expected_pairs = sorted((tuple(s[:t]), s[t]) for s in sequences for t in range(1, len(s) - 2))
    pairs = sorted((tuple(h[h > 0].tolist()), int(p)) for h, p in zip(sample["pair_histories"], sample["positives"]))
    assert pairs == expected_pairs                                          # training pairs only, all of them here
    with torch.no_grad():
        total = 0.0
        for history, positive in expected_pairs:
            h = model.encode(torch.tensor([history]))[0]
            total += ((h / h.norm() - model.items.weight[positive] / model.items.weight[positive].norm()) ** 2).sum()
    assert R.embedding_statistics(model, sample)["alignment"] == pytest.approx(total.item() / len(pairs), rel=1e-5)


@pytest.mark.parametrize("loss", ["bce", "uniform"])
def test_training_and_evaluation_score_a_pair_alike(loss, monkeypatch):
    """The score the training loss gives (history, positive) is the score evaluation ranks that item by: a dot
    product with BCE, a cosine with the uniformity loss."""
    model = make_model("sasrec")                                             # eval(): no dropout
    histories, positives, negatives = torch.tensor([[1, 2, 3], [4, 5, 0], [6, 0, 0]]), torch.tensor([7, 8, 9]), \
        torch.tensor([10, 11, 12])
    config = {"loss": loss, "beta": 0.05, "t": 2.0, "normalize": True, "rec": True, "hom": False, "het": False}
    seen, rank_of_targets = {}, U.rank_of_targets
    monkeypatch.setattr(U, "bce_loss", lambda pos, neg: seen.setdefault("training", pos.detach()).sum())
    U.batch_loss(model, model.encode(histories), positives, negatives, config)

    def recording_rank(scores, targets):
        seen["evaluation"] = scores.gather(1, targets[:, None])[:, 0]
        return rank_of_targets(scores, targets)

    monkeypatch.setattr(U, "rank_of_targets", recording_rank)
    U.evaluate(model, [(histories, None, positives)], cosine=U.scores_are_cosines(config))
    assert torch.allclose(seen["training"], seen["evaluation"], atol=1e-6)
    with torch.no_grad():
        h, i = model.encode(histories), model.items(positives)
    assert torch.allclose(seen["training"], (h * i).sum(-1) if loss == "bce" else torch.cosine_similarity(h, i))


def test_dropout_drops_at_rate_p_keeps_the_mean_and_is_off_in_eval():
    torch.manual_seed(0)
    dropout, x = U.Dropout(0.3), torch.ones(200_000)
    y = dropout(x)
    assert abs((y == 0).float().mean().item() - 0.3) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.7)) and abs(y.mean().item() - 1) < 0.01
    assert torch.equal(dropout.eval()(x), x)


# ----------------------------------------------------------------------------------------------------------------
# Training: every backbone with every loss learns on a tiny problem
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,loss", list(itertools.product(["gru4rec", "caser", "sasrec"],
                                                              ["bce", "bpr", "infonce", "uniform", "ce"])))
def test_every_backbone_and_loss_learns(name, loss):
    torch.manual_seed(0)
    model = backbone(name, 40, max_len=10, layers=1, dropout=0.0, caser_window=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = {"loss": loss, "beta": 0.05, "t": 2.0, "normalize": True, "rec": True, "hom": True, "het": True,
              "infonce_negatives": None}
    histories = torch.randint(1, 41, (32, 6))
    positives = histories[:, -1] % 40 + 1                                    # a learnable rule: next = last + 1
    negatives = torch.randint(1, 41, (32,))
    losses = []
    for _ in range(30):
        value = U.batch_loss(model, model.encode(histories), positives, negatives, config)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < 0.8 * losses[0]


# ----------------------------------------------------------------------------------------------------------------
# The command line on a slice of real Beauty (the fixture beauty_slice is in conftest.py)
# ----------------------------------------------------------------------------------------------------------------

def test_command_line_trains_and_reports_on_real_data(beauty_slice, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", beauty_slice, "--model", "sasrec", "--loss", "uniform", "--epochs", "3", "--dim", "16",
            "--out", str(out), "--device", "cpu", "--lr", "1e-3"]
    assert R.main(args) == 0
    printed = capsys.readouterr().out
    assert "epoch   3" in printed and "test (best epoch" in printed and "(the history excluded: HR@5" in printed
    assert printed.splitlines()[-1] == f"its result: {out / 'metrics.json'}"          # the last line says where
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) == {f"{m}@{k}" for m in ("HR", "NDCG") for k in (5, 10, 20)}
    assert 0 <= metrics["test"]["NDCG@10"] <= metrics["test"]["HR@10"] <= metrics["test"]["HR@20"] <= 1
    assert metrics["epochs"] == 3 and 1 <= metrics["best_epoch"] <= 3
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2, 3]
    assert json.loads((out / "config.json").read_text())["loss"] == "uniform"
    assert (out / "checkpoint.pt").is_file()
    # running the same command again finds the finished run instead of training again
    assert R.main(args) == 0
    assert "is finished" in capsys.readouterr().out


@needs("beauty")
def test_real_beauty_split_sizes():
    sequences = read_sequences(BEAUTY)
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    ends, _, _ = U.training_examples(starts, lengths, 50)
    assert (len(sequences), num_items) == (22_363, 12_101)
    assert len(ends) == 198_502 - 3 * 22_363                                  # n - 3 examples per user


def configured(tmp_path, *args):
    (tmp_path / "Beauty.txt").touch()                                        # configure() checks only that it exists
    return R.configure(["--data", "beauty", "--data-dir", str(tmp_path), *args])


def test_flags_added_later_leave_earlier_run_folders_where_they_were(tmp_path):
    """Folder names of recorded and running cells (results/cells/*.json) from before --infonce-negatives and the
    Caser switches existed: a flag at its default must not move them."""
    setting = ["--lr", "1e-3", "--dim", "64", "--layers", "2", "--heads", "2", "--seed", "1"]
    assert configured(tmp_path, "--loss", "infonce", *setting)[1] == "runs/beauty-sasrec-infonce-b589e956"
    assert configured(tmp_path, "--loss", "uniform", *setting, "--beta", "0.05")[1] == (
        "runs/beauty-sasrec-uniform-cf8b73ff")
    assert configured(tmp_path, "--loss", "uniform", *setting, "--beta", "0.05", "--no-normalize")[1] == (
        "runs/beauty-sasrec-uniform-90c8fafd")
    whole_batch = configured(tmp_path, "--loss", "infonce", *setting, "--infonce-negatives", "256")
    assert whole_batch[1] == "runs/beauty-sasrec-infonce-b589e956" and whole_batch[0]["infonce_negatives"] is None
    assert configured(tmp_path, "--loss", "infonce", *setting, "--infonce-negatives", "16")[1] != whole_batch[1]
    for loss in ("infonce", "ce"):                                            # --block at its default: no new folder
        assert configured(tmp_path, "--loss", loss, *setting, "--block", "pre-ln")[1] == (
            configured(tmp_path, "--loss", loss, *setting)[1])
    assert configured(tmp_path, "--loss", "infonce", *setting, "--block", "original")[1] != whole_batch[1]
    assert configured(tmp_path, "--loss", "infonce", *setting, "--pause-after", "6")[1] == whole_batch[1]  # no setting


@pytest.mark.parametrize("args,fields", [
    ([], {}),
    (["--model", "caser"], {"model": "caser"}),
    (["--model", "gru4rec", "--loss", "infonce", "--infonce-negatives", "300", "--layers", "2", "--t", "3"],
     {"model": "gru4rec", "loss": "infonce", "infonce_negatives": 300, "layers": 2, "t": 3.0}),
    (["--model", "caser", "--caser-activation", "none", "--caser-users", "--mask-seen", "--negatives", "any",
      "--length-groups", "2"], {"model": "caser", "caser_activation": "none", "caser_users": True, "mask_seen": True,
                                "negatives": "any", "length_groups": 2}),
    (["--pack", "--max-len", "20", "--no-het", "--beta", "0.01", "--epochs", "5", "--patience", "2", "--dropout",
      "0.2"], {"pack": True, "max_len": 20, "het": False, "beta": 0.01, "epochs": 5, "patience": 2, "dropout": 0.2}),
    (["--model", "gru4rec", "--examples", "users"], {"model": "gru4rec", "examples": "users"}),
])
def test_a_config_is_what_the_command_line_resolves(tmp_path, args, fields):
    """The method's settings of a command line, resolved by configure(), are the Config of the same fields: every
    key but the run folder's, every value, and so the run folder's name."""
    config, run_dir = configured(tmp_path, *args)
    ours = dataclasses.asdict(U.Config(**fields))
    assert set(config) == set(ours) | {"data_dir", "data_path", "out", "resume", "pause_after"}
    assert ours == {key: config[key] for key in ours}
    assert run_dir.endswith(R.configuration_id(ours))


def test_a_config_names_the_run_folders_recorded_before_it():
    """Configs of cells recorded before Config existed (test_flags_added_later_leave_earlier_run_folders_where_they
    _were names them by their command lines) hash to the same folders."""
    setting = {"lr": 1e-3, "seed": 1, "device": "cpu"}
    assert R.configuration_id(dataclasses.asdict(U.Config(loss="uniform", **setting))) == "cf8b73ff"
    assert R.configuration_id(dataclasses.asdict(U.Config(loss="uniform", normalize=False, **setting))) == "90c8fafd"
    assert R.configuration_id(dataclasses.asdict(U.Config(loss="infonce", infonce_negatives=256, **setting))) == (
        "b589e956")


@pytest.mark.parametrize("fields,error", [({"model": "bert4rec"}, "unknown model 'bert4rec'")])
def test_a_config_refuses_an_unknown_backbone(fields, error):
    with pytest.raises(ValueError, match=error):
        U.Config(**fields)


def test_the_readmes_python_example_trains_without_a_run_folder(beauty_slice, tmp_path, monkeypatch, capsys):
    """The README's "From Python" code as it stands, on the Beauty slice for 3 epochs at d 16: it prints a line per
    epoch, returns the test metrics, and writes nothing."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    section = readme.split("## From Python\n", 1)[1].split("\n## ", 1)[0]
    code = "\n".join(line[4:] for line in section.split("\n\n`", 1)[0].splitlines() if line.startswith("    "))
    call = 'U.Config(model="sasrec", loss="uniform")'
    assert code.count(call) == 1 and code.count('"data/Beauty.txt"') == 1, code
    code = code.replace(call, 'U.Config(model="sasrec", loss="uniform", epochs=3, dim=16)')
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code.replace('"data/Beauty.txt"', repr(beauty_slice)), "README.md", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert [line.split()[:2] for line in printed.splitlines() if line.startswith("epoch")] == [
        ["epoch", "1"], ["epoch", "2"], ["epoch", "3"]]
    assert "no run folder" in printed and "NDCG@10" in printed
    result = namespace["result"]
    assert result["epochs"] == 3 and 0 <= result["test"]["NDCG@10"] <= result["test"]["HR@10"] <= 1
    assert os.listdir(tmp_path) == []                                        # no run folder, no file


def test_each_backbone_defaults_to_its_originals_depth(tmp_path):
    assert configured(tmp_path, "--model", "sasrec")[0]["layers"] == 2
    assert configured(tmp_path, "--model", "gru4rec")[0]["layers"] == 1
    assert configured(tmp_path, "--model", "gru4rec", "--layers", "2")[0]["layers"] == 2
    caser = configured(tmp_path, "--model", "caser")[0]
    assert caser["caser_activation"] == "relu" and not caser["caser_users"] and not caser["caser_output_table"]


@pytest.mark.parametrize("args,expected", [
    (["--model", "sasrec", "--caser-users"], "--caser-users only applies to --model caser"),
    (["--model", "gru4rec", "--caser-activation", "none"], "--caser-activation only applies to --model caser"),
    (["--model", "gru4rec", "--block", "original"], "--block only applies to --model sasrec"),
    (["--loss", "bpr", "--infonce-negatives", "4"], "--infonce-negatives only applies to --loss infonce"),
    (["--loss", "infonce", "--infonce-negatives", "0"], "--infonce-negatives must be positive (got 0)"),
])
def test_flags_of_one_backbone_or_loss_are_refused_elsewhere(tmp_path, capsys, args, expected):
    (tmp_path / "Beauty.txt").write_text("1 1 2 3\n")
    code = R.main(["--data", "beauty", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err and not (tmp_path / "run").exists()


# The first training step's loss is a function of the initialization, the first batch (order, negatives), its dropout
# masks and the loss alone: another CPU changes it by float rounding only (a float32 sum of 64 examples' losses,
# each a few ulp: ~1e-7 of it), while a real change of the computation moves it by far more. Measured on the twelve
# configurations below (docs/measurements.md): another dropout draw 3e-5 (gru4rec/bce) to 5e-2, another batch order
# 2e-4 to 8e-3, beta 0.045 instead of 0.05 2e-2 to 6e-2. 5e-6 sits between, a factor of 6 from the smallest change.
FIRST_STEP_RELATIVE = 5e-6
# Later steps part on another CPU: Adam's first update is about lr * sign(gradient), so a gradient entry near zero
# that rounding flips moves a weight by 2 lr, and the runs' paths part (caser/uniform's two epoch losses differed by
# 1e-3 on an AVX2-only AMD EPYC). The recorded epoch losses are therefore only a neighbourhood, ten times that wide;
# bit-for-bit equality is asked of two runs on this machine.
EPOCH_RELATIVE = 1e-2


@needs("beauty")
def test_same_seed_same_numbers_as_before_the_method_and_the_runner_were_split(tmp_path):
    """test_seeded_numbers.json was written by the code before uniform_seqrec.py was split in two (its "made_by"
    says how): the same configurations must still give the same run folders (exactly) and the same computation: the
    recorded first-step losses to float rounding (any CPU), the recorded epoch losses in their neighbourhood, and on
    this machine two runs equal bit for bit."""
    with open(os.path.join(HERE, "test_seeded_numbers.json")) as f:
        fixture = json.load(f)
    before = fixture["runs"]
    path = tmp_path / "slice.txt"
    with open(BEAUTY) as f:
        path.write_text("".join(itertools.islice(f, 300)))
    sequences = read_sequences(str(path))
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                          # as the numbers were made: more threads sum in another order
    try:
        replay_before_the_split(before, fixture, path, flat, starts, lengths, num_items)
    finally:
        torch.set_num_threads(threads)


def two_epochs(config, flat, starts, lengths, num_items, dropout_seed_shift=0):
    """Each step's loss of epochs 1 and 2 of a fresh model, and the model; dropout_seed_shift draws other dropout
    masks (the same order and negatives): a real change of the computation, for the tolerance's own check."""
    max_len = U.history_limit(config, lengths)
    data = U.training_data(flat, starts, lengths, num_items, max_len, examples=config.get("examples", "prefixes"))
    torch.manual_seed(config["seed"])
    model = U.build_model(config, num_items, len(lengths), max_len)
    optimizer = U.adam(model, config["lr"], torch.device("cpu"))
    seed_torch = torch.manual_seed                   # what train_epoch seeds the dropout masks with
    torch.manual_seed = lambda seed: seed_torch(seed + dropout_seed_shift)
    try:
        steps = [U.train_epoch(model, optimizer, data, config, epoch).tolist() for epoch in (1, 2)]
    finally:
        torch.manual_seed = seed_torch
    return steps, model, max_len


def replay_before_the_split(before, fixture, path, flat, starts, lengths, num_items):
    for name, expected in before.items():
        model_name, loss = name.split("/")
        config, run_dir = R.configure(["--data", str(path), "--model", model_name, "--loss", loss, "--dim", "16",
                                       "--heads", "1", "--seed", "1", "--device", "cpu", "--batch-size", "64",
                                       "--lr", "1e-3"])
        named_as_then = R.configuration_id({**config, "data": fixture["data"]})  # --data was that path
        assert expected["run_folder"].endswith(named_as_then) and run_dir.endswith(R.configuration_id(config)), name
        steps, model, max_len = two_epochs(config, flat, starts, lengths, num_items)
        assert steps[0][0] == pytest.approx(expected["first_step_loss"], rel=FIRST_STEP_RELATIVE), name
        assert [sum(epoch) for epoch in steps] == pytest.approx(expected["epoch_losses"], rel=EPOCH_RELATIVE), name
        again, model_again, _ = two_epochs(config, flat, starts, lengths, num_items)
        assert again == steps, name                                        # this machine: bit for bit
        for split in ("valid", "test"):
            batches = U.evaluation_batches(flat, starts, lengths, max_len, split)
            both = U.evaluate_protocols(model, batches, U.scores_are_cosines(config))
            assert both == U.evaluate_protocols(model_again, batches, U.scores_are_cosines(config)), (name, split)
            # after the paths part, a few of the 300 users may rank their target otherwise: 6 users at most
            assert both["all_items"] == pytest.approx(expected[split], abs=0.02), (name, split)
            assert both["history_excluded"] == pytest.approx(expected[split + "_masked"], abs=0.02), (name, split)
        if name == "gru4rec/bce":                     # the configuration whose first step other dropout moves least
            other = two_epochs(config, flat, starts, lengths, num_items, dropout_seed_shift=7)[0]
            assert other[0][0] != pytest.approx(expected["first_step_loss"], rel=FIRST_STEP_RELATIVE)


def test_every_recorded_cell_keeps_its_run_folder_name(tmp_path):
    """The configuration hash of every run recorded in results/cells/ is still the one its folder was named by."""
    records = glob.glob(os.path.join(HERE, "results", "cells", "*.json"))
    assert len(records) >= 40
    for path in records:
        with open(path) as f:
            record = json.load(f)
        assert record["run_dir"].endswith(R.configuration_id(record["config"])), path


def test_negatives_any_avoid_only_the_examples_own_positive():
    """--negatives any: every item but the example's positive can be drawn, the user's other items included; the
    default never draws a user's training item."""
    sequences = [[1, 2, 3, 4, 5, 6], [2, 3, 4, 5]]
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    drawn = {"unseen": set(), "any": set()}
    for kind in drawn:
        data = U.training_data(flat, starts, lengths, num_items, 10, kind)
        positives = flat[data.target_at]
        for seed in range(200):
            negatives = U.sample_negatives(data.owners, data.avoided, num_items, torch.Generator().manual_seed(seed))
            assert not (negatives == positives).any()
            drawn[kind] |= {(int(e), int(n)) for e, n in enumerate(negatives)}
    own = {(e, i) for e, u in enumerate(U.training_data(flat, starts, lengths, num_items, 10).users.tolist())
           for i in sequences[u][:-2]}
    assert not drawn["unseen"] & own
    expected_any = {(e, i) for e in range(4) for i in range(1, 7)} - {(e, int(flat[t])) for e, t in
                                                                       enumerate(U.training_data(flat, starts, lengths,
                                                                                                 num_items, 10)
                                                                                 .target_at)}
    assert drawn["any"] == expected_any                                           # own items included
    with pytest.raises(ValueError, match="'unseen' or 'any'"):
        U.training_data(flat, starts, lengths, num_items, 10, "some")
