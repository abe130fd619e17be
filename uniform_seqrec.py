"""uniform-seqrec: reference implementation of "Leveraging Uniformity of Normalized Embeddings for Sequential
Recommendation" (Chung & Kim).

    python uniform_seqrec.py --model sasrec --loss uniform --data beauty

The sections follow the pipeline, from the data file to the command line (not the paper's order; each names the
part of the paper it implements):
  1. Data            leave-one-out split, training triplets (u, i, j), negatives          (appendix A, section 4)
  2. Backbones       GRU4Rec, Caser, SASRec: encode(histories) -> (B, d)                  (section 5.1)
  3. Scores, losses  score (eqs. 1, 3), BCE (eq. 2), BPR, InfoNCE, uniformity loss        (sections 2-4)
  4. Evaluation      HR@K and NDCG@K ranking every item; Figure 1's statistics            (sections 5.1, 3)
  5. Training        Adam, length-grouped batches, early stopping on validation NDCG@10   (appendix B)
  6. Run folders     configuration, checkpoint, resume, one-line errors
  7. Command line

Where the paper is silent, docs/spec.md decides (cited as "spec §n"); the measurements behind the code's own
choices are in docs/measurements.md. Item ids are `histories` (B, T), `positives`, `negatives`, `targets` (B,);
vectors are h (histories), i (positives), j (negatives), (B, d). Nothing runs at import; the score and loss
functions of section 3 need nothing but `import torch`.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import NamedTuple

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

# torch warns at import when numpy is absent; nothing in this project uses numpy, so the line is noise on every
# command (and breaks the one-line errors).
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_prep import BENCHMARKS, DataError, OneLineErrorParser, benchmark_path, default_data_dir, read_sequences


# =============================================================================================================
# 1. Data: leave-one-out split and training triplets (paper appendix A and section 4; spec §1-2)
# =============================================================================================================
#
#   s = [ s0 s1 ... s(n-4) s(n-3) | s(n-2) | s(n-1) ]
#         \___ training part ____/   valid    test
#
#   training example t (t = 1 .. n-3):  history s[:t]   -> positive s[t]
#   validation:                         history s[:n-2] -> target   s[n-2]
#   test:                               history s[:n-1] -> target   s[n-1]   (includes the validation item)
#
# All users' items live in one flat tensor `flat`, with a 0 (padding) at index 0. An example is a pair
# (end, history length): its history is flat[end - length : end] and its target is flat[end]. Histories are cut to
# the last `max_len` items and right-padded with 0 to the width of their batch. `lengths` are the users' sequence
# lengths n, `history_lengths` the examples'; E is the number of training examples.


def flatten_sequences(sequences, device):
    """Lists of item ids, one per user, as one flat tensor: returns (flat, starts, lengths, num_items), the tensors on
    `device`; user u's items are flat[starts[u] : starts[u] + lengths[u]]."""
    lengths = torch.tensor([len(s) for s in sequences])
    starts = 1 + torch.cumsum(lengths, 0) - lengths                        # flat[0] is the padding sentinel
    flat = torch.tensor([0] + [i for s in sequences for i in s])
    num_items = int(flat.max())
    return flat.to(device), starts.to(device), lengths.to(device), num_items


def training_examples(starts, lengths, max_len):
    """Every prefix of every user's training part. Returns (ends, history_lengths, users), each (E,)."""
    per_user = (lengths - 3).clamp(min=0)                                  # t = 1 .. n-3
    users = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), per_user)
    first = torch.cumsum(per_user, 0) - per_user
    t = torch.arange(len(users), device=lengths.device) - first[users] + 1  # 1 .. n-3 within each user
    return starts[users] + t, t.clamp(max=max_len), users


def evaluation_examples(starts, lengths, max_len, split):
    """One example per user: the validation target s[n-2] or the test target s[n-1]. Returns (ends, history_lengths)."""
    history_length = lengths - 2 if split == "valid" else lengths - 1
    return starts + history_length, history_length.clamp(max=max_len)


def gather_histories(flat, ends, history_lengths, width):
    """(B,) ends and lengths -> (B, width) item ids, right-padded with 0."""
    offsets = torch.arange(width, device=flat.device)                      # (width,)
    index = ends[:, None] - history_lengths[:, None] + offsets             # (B, width)
    real = offsets < history_lengths[:, None]
    return flat[torch.where(real, index, 0)]                               # flat[0] == 0: padding


def training_item_keys(flat, starts, lengths, num_items):
    """Sorted keys user * (N + 1) + item of every item in each user's training part s[:n-2] (no held-out item)."""
    users = torch.repeat_interleave(torch.arange(len(lengths), device=flat.device), lengths - 2)
    first = torch.cumsum(lengths - 2, 0) - (lengths - 2)
    position = torch.arange(len(users), device=flat.device) - first[users]
    items = flat[starts[users] + position]
    return torch.unique(users * (num_items + 1) + items)                   # unique() also sorts


def sample_negatives(users, keys, num_items, generator):
    """One negative item id per example, uniform over 1..N minus the user's training items (spec §2; `keys` from
    training_item_keys). Vectorised rejection sampling: redraw only the rejected slots until none is left."""
    negatives = torch.randint(1, num_items + 1, users.shape, device=users.device, generator=generator)
    while True:
        query = users * (num_items + 1) + negatives
        found = keys[torch.searchsorted(keys, query).clamp(max=len(keys) - 1)] == query
        if not found.any():
            return negatives
        negatives[found] = torch.randint(1, num_items + 1, (int(found.sum()),), device=users.device,
                                         generator=generator)


class TrainingData(NamedTuple):
    """What every epoch needs, on the training device. E examples, example e being history -> positive."""
    flat: torch.Tensor               # all users' items, flat[0] = 0 (padding)
    ends: torch.Tensor               # (E,) example e's positive is flat[ends[e]], its history the items before it
    history_lengths: torch.Tensor    # (E,) history lengths, at most max_len
    users: torch.Tensor              # (E,) the user of each example
    keys: torch.Tensor               # training_item_keys(): the items no negative of a user may be
    num_items: int                   # N


def training_data(flat, starts, lengths, num_items, max_len):
    """TrainingData of every user's training part; a DataError when a user leaves no item to draw as a negative."""
    ends, history_lengths, users = training_examples(starts, lengths, max_len)
    keys = training_item_keys(flat, starts, lengths, num_items)
    full_users = (torch.bincount(keys // (num_items + 1), minlength=len(lengths)) == num_items).nonzero()
    if len(full_users):
        raise DataError(f"user on line {int(full_users[0]) + 1} has every item in training: no negative can be drawn")
    return TrainingData(flat, ends, history_lengths, users, keys, num_items)


# =============================================================================================================
# 2. Backbones (section 5.1): item ids in, one vector per history out, one item table for inputs and scoring
# =============================================================================================================

# Item and position tables start N(0, 0.02), as in S3-Rec and BERT: small vectors turn quickly under Adam, and learning
# was faster than from N(0, 1/d) (docs/measurements.md).
EMBEDDING_INIT_STD = 0.02


class Backbone(nn.Module):
    """The contract: `items` is the (N + 1, d) item table (row 0 padding, kept at zero); `encode(histories, users)`
    maps (B, T) right-padded item ids to (B, d) history vectors, and padding never changes a real output. `users`
    (B,) are the histories' user ids, read only by a Caser with a user embedding. `output_items()` is the table
    items are scored with: the input table, except for a Caser with a table of its own. The sequence models, GRU4Rec
    and SASRec, encode in two steps: `sequence_states(items(histories), histories)`, then its last real state."""

    def __init__(self, num_items, dim):
        super().__init__()
        self.items = nn.Embedding(num_items + 1, dim, padding_idx=0)
        nn.init.normal_(self.items.weight, std=EMBEDDING_INIT_STD)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def output_items(self):
        return self.items


class Dropout(nn.Module):
    """Inverted dropout, as nn.Dropout, with the mask drawn by comparing uniform numbers: the same distribution,
    drawn faster on CPU than by torch's Bernoulli sampler (docs/measurements.md; bench.py measures both)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand_like(x).ge_(self.p).div_(1 - self.p)            # 0 or 1 / (1 - p), in one buffer
        return x * keep


def last_real_state(states, histories):
    """(B, T, d) per-position states -> (B, d) state at each history's last real (non-padding) position."""
    last = (histories > 0).sum(1) - 1                                      # (B,)
    return states[torch.arange(len(states), device=states.device), last]


class GRU4Rec(Backbone):
    """Hidasi et al.: item embedding, dropout, a GRU; the history vector is the state after the last item."""

    def __init__(self, num_items, dim=64, layers=1, dropout=0.5):
        super().__init__(num_items, dim)
        self.dropout = Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)

    def sequence_states(self, x, histories):                                # (B, T, d) item vectors -> (B, T, d)
        return self.gru(self.dropout(x))[0]

    def encode(self, histories, users=None):                                # (B, T) item ids -> (B, d)
        return last_real_state(self.sequence_states(self.items(histories), histories), histories)


class Caser(Backbone):
    """Tang & Wang: the last L item vectors as an L x d "image"; vertical convolutions (L x 1) and horizontal
    ones (h x d for h = 1..L, max-pooled over time); dropout; one fully connected layer to d. By default the
    last layer has the original's ReLU. Three switches undo the original's choices, for the
    comparison in the README: activation "none" lets history vectors point anywhere on the sphere; `num_users` > 0
    adds the original's user embedding, joined to the convolutions' output by a second layer (RecBole's form, so
    that history vectors stay d-wide); `output_table` scores items with a table of their own, as the original does
    (its W2), instead of the input table."""

    def __init__(self, num_items, dim=64, dropout=0.5, window=5, vertical=4, horizontal=16, activation="relu",
                 num_users=0, output_table=False):
        super().__init__(num_items, dim)
        self.window = window
        self.vertical = nn.Conv2d(1, vertical, (window, 1))
        self.horizontal = nn.ModuleList(nn.Conv2d(1, horizontal, (h, dim)) for h in range(1, window + 1))
        self.dropout = Dropout(dropout)
        self.project = nn.Linear(vertical * dim + horizontal * window, dim)
        self.activation = nn.ReLU() if activation == "relu" else nn.Identity()
        if num_users:
            self.users = nn.Embedding(num_users, dim)
            nn.init.normal_(self.users.weight, std=EMBEDDING_INIT_STD)
            self.join_user = nn.Linear(2 * dim, dim)
        if output_table:
            self.scored_items = nn.Embedding(num_items + 1, dim, padding_idx=0)
            nn.init.normal_(self.scored_items.weight, std=EMBEDDING_INIT_STD)
            with torch.no_grad():
                self.scored_items.weight[0].zero_()

    def output_items(self):
        return self.scored_items if hasattr(self, "scored_items") else self.items

    def last_items(self, histories):
        """(B, T) right-padded -> (B, L) the last L items, left-padded with 0 when the history is shorter."""
        history_lengths = (histories > 0).sum(1, keepdim=True)             # (B, 1)
        index = history_lengths - self.window + torch.arange(self.window, device=histories.device)  # (B, L)
        return torch.where(index >= 0, histories.gather(1, index.clamp(min=0)), 0)

    def encode(self, histories, users=None):                                # (B, T) item ids -> (B, d)
        image = self.items(self.last_items(histories)).unsqueeze(1)        # (B, 1, L, d)
        vertical = self.vertical(image).flatten(1)                         # (B, 4d): 4 vertical filters
        horizontal = [F.relu(conv(image)).squeeze(3).amax(2) for conv in self.horizontal]  # L x (B, 16)
        z = self.activation(self.project(self.dropout(torch.cat([vertical, *horizontal], 1))))  # (B, d)
        if hasattr(self, "users"):
            z = self.activation(self.join_user(torch.cat([z, self.users(users)], 1)))  # (B, 2d) -> (B, d)
        return z


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position j attends to positions 0..j only. Written out rather than
    F.scaled_dot_product_attention so that the attention weights get the faster Dropout above."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.dropout = Dropout(dropout)                                    # on the attention weights
        self.out = nn.Linear(dim, dim)

    def forward(self, x):                                                  # (B, T, d) -> (B, T, d)
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d/h)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # [i, j] = j > i
        scores = (q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5).masked_fill(future, float("-inf"))  # (B, h, T, T)
        y = self.dropout(scores.softmax(-1)) @ v                           # (B, h, T, d/h)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block as in the original SASRec: attention and a point-wise feed-forward net, residuals.
    Dropout where the original has it: on the attention weights and twice in the feed-forward net, not on the
    attention's output (one more there slowed learning; docs/measurements.md)."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.attention_norm, self.attention = nn.LayerNorm(dim), CausalSelfAttention(dim, heads, dropout)
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), Dropout(dropout), nn.Linear(dim, dim),
                                          Dropout(dropout))

    def forward(self, x):                                                  # (B, T, d) -> (B, T, d)
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.feed_forward_norm(x))


class SASRec(Backbone):
    """Kang & McAuley: item vectors times sqrt(d) plus learned position embeddings, causal self-attention blocks,
    the output at the last real position. Positions count back from the most recent item (0 = most recent), so a
    history means the same whatever its padding. Right padding plus the causal mask: a real position only ever
    sees real items. The sqrt(d) is the original's; without it learning is slower (docs/measurements.md)."""

    def __init__(self, num_items, dim=64, layers=2, heads=2, dropout=0.5, max_len=50):
        super().__init__(num_items, dim)
        self.scale = dim ** 0.5
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.positions.weight, std=EMBEDDING_INIT_STD)
        self.dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)

    def sequence_states(self, x, histories):                                # (B, T, d) item vectors -> (B, T, d)
        T = histories.shape[1]
        history_lengths = (histories > 0).sum(1, keepdim=True)             # (B, 1)
        steps_back = (history_lengths - 1 - torch.arange(T, device=histories.device)).clamp(min=0)  # (B, T)
        x = self.dropout(x * self.scale + self.positions(steps_back))      # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def encode(self, histories, users=None):                                # (B, T) item ids -> (B, d)
        return last_real_state(self.sequence_states(self.items(histories), histories), histories)


def build_model(model, num_items, dim, layers, heads, dropout, max_len, caser_window, caser_activation="relu",
                num_users=0, caser_output_table=False):
    if model == "gru4rec":
        return GRU4Rec(num_items, dim, layers, dropout)
    if model == "caser":
        return Caser(num_items, dim, dropout, window=caser_window, activation=caser_activation, num_users=num_users,
                     output_table=caser_output_table)
    return SASRec(num_items, dim, layers, heads, dropout, max_len)


# =============================================================================================================
# 3. Scores and losses (sections 2-4, eqs. 1-6; spec §4)
# =============================================================================================================
#
# Eq. 1 scores a history and an item by the dot product of their vectors; on unit vectors (eq. 3), as the uniformity
# loss has them, that is their cosine. `score` computes it for training and evaluation alike. Every loss SUMS over the
# batch, as the paper writes them. h, i, j are the (B, d) vectors of a batch's histories, positives and negatives
# (the triplets (u, i, j)); `positives` and `negatives` are item ids. `score`, the four losses and
# `gaussian_potential` need only `import torch`. Three things to know when copying uniformity_loss:
# - L_hom counts each unordered pair once and no vector with itself, half of a literal reading of eq. 4's double sum,
#   as the authors' code does (torch.pdist): so beta means what their beta means.
# - L_rec has 2B terms, L_hom about 5B^2/2 and L_het B^2: beta's weight grows with B (the paper's 0.05 is for B = 256).
# - A model trained on cosines must be ranked by cosines (scores_are_cosines): the loss never sees the vectors'
#   lengths, so a dot product would rank by lengths nothing trained.


def score(h, items, cosine=False):
    """Eq. 1: the score of history vector h for item vector i is h . i; with cosine=True both are first scaled to
    unit length (eq. 3), which makes it their cosine. Vectors pair up as h * items broadcasts: (B, d) and (B, d)
    -> (B,), history b with item b; (B, 1, d) and (B, K, d) -> (B, K), each history with K items of its own;
    (B, 1, d) and (M, d) -> (B, M), every history with the same M items (one matrix product)."""
    if cosine:
        h, items = torch.nn.functional.normalize(h, dim=-1), torch.nn.functional.normalize(items, dim=-1)
    if h.dim() == 3 and items.dim() == 2:
        return h[:, 0] @ items.T                                             # (B, M), no (B, M, d) product
    return (h * items).sum(-1)


def bce_loss(positive_scores, negative_scores):
    """Eq. 2: -sum_b [ log sigmoid(s_ui) + log(1 - sigmoid(s_uj)) ].  (B,), (B,) -> scalar."""
    logsigmoid = torch.nn.functional.logsigmoid
    return -(logsigmoid(positive_scores) + logsigmoid(-negative_scores)).sum()  # log(1 - sigmoid(s)) = logsigmoid(-s)


def bpr_loss(positive_scores, negative_scores):
    """BPR (Rendle et al.): -sum_b log sigmoid(s_ui - s_uj).  (B,), (B,) -> scalar."""
    return -torch.nn.functional.logsigmoid(positive_scores - negative_scores).sum()


def infonce_loss(positive_scores, negative_scores, same_item):
    """InfoNCE (van den Oord et al.), temperature 1: each history's positive against its K negatives.
    positive_scores (B,); negative_scores (B, K), [b, k] = history b's score for its k-th negative; same_item (B, K)
    bool, True where that negative is history b's positive (the candidate is dropped). With K = 1 this is BPR:
    -log(e^p / (e^p + e^n)) = -log sigmoid(p - n)."""
    logits = torch.cat([positive_scores[:, None], negative_scores.masked_fill(same_item, float("-inf"))], 1)  # (B, 1+K)
    return -torch.log_softmax(logits, 1)[:, 0].sum()


def gaussian_potential(x, y, t=2.0):
    """G(x, y) = exp(-t ||x - y||^2) for every pair of rows: (n, d), (m, d) -> (n, m). The kernel of eqs. 4-5."""
    return torch.exp(-t * torch.cdist(x, y).square())


def uniformity_loss(h, i, j, beta=0.05, t=2.0, *, normalize=True, rec=True, hom=True, het=True):
    """Eq. 6 with beta1 = beta2 = beta:  L = L_rec + beta * L_hom + beta * L_het.

    h, i, j: (B, d) vectors of the histories, positives and negatives of a batch of triplets (u, i, j). The keywords
    switch parts off for the ablation of Table 2 (normalize=False scores and regularises the raw vectors).
      L_rec  eq. 2 on cosines: BCE of each history's score for its positive and for its negative, no temperature.
      L_hom  eq. 4: G summed over unordered pairs of the B histories, plus over unordered pairs of the 2B items D_I
             (positives and negatives together). Pairs of batch slots: an item twice in a batch is two slots.
      L_het  eq. 5: G summed over all B x B pairs (history x, negative y), each history's own negative included.
    """
    if normalize:                                                            # eq. 3
        unit = torch.nn.functional.normalize
        h, i, j = unit(h, dim=-1), unit(i, dim=-1), unit(j, dim=-1)
    loss = h.new_zeros(())
    if rec:
        loss = loss + bce_loss(score(h, i), score(h, j))
    if hom:                                                                  # eq. 4; triu(1): pairs x < y
        items = torch.cat([i, j])                                            # D_I: (2B, d)
        loss = loss + beta * (gaussian_potential(h, h, t).triu(1).sum()
                              + gaussian_potential(items, items, t).triu(1).sum())
    if het:                                                                  # eq. 5
        loss = loss + beta * gaussian_potential(h, j, t).sum()
    return loss


def infonce_candidates(batch_size, k, device):
    """(B, K) batch slots of each history's InfoNCE negatives: its own, then the next K - 1 (cyclically). The batch
    is in random order, so these are K random negatives of the batch."""
    return (torch.arange(batch_size, device=device)[:, None] + torch.arange(k, device=device)) % batch_size


def batch_loss(model, h, positives, negatives, config):
    """The configured loss of one batch of triplets: h (B, d) history vectors; positives, negatives (B,) item ids."""
    i, j = model.output_items()(torch.cat([positives, negatives])).chunk(2)  # (B, d) each; one lookup, one gradient
    if config["loss"] == "uniform":
        return uniformity_loss(h, i, j, config["beta"], config["t"], normalize=config["normalize"],
                               rec=config["rec"], hom=config["hom"], het=config["het"])
    if config["loss"] == "bce":                                              # eq. 1 on raw vectors from here on
        return bce_loss(score(h, i), score(h, j))
    if config["loss"] == "bpr":
        return bpr_loss(score(h, i), score(h, j))
    k = config["infonce_negatives"]
    if k is None or k >= len(h):                                             # all B negatives of the batch: (B, B)
        return infonce_loss(score(h, i), score(h[:, None], j), positives[:, None] == negatives[None, :])
    chosen = infonce_candidates(len(h), k, h.device)                         # (B, K) batch slots
    return infonce_loss(score(h, i), score(h[:, None], j[chosen]), positives[:, None] == negatives[chosen])


def scores_are_cosines(config):
    """Whether `score` takes cosines, in training and so in ranking: with the uniformity loss (eq. 3), unless row
    (g) of Table 2 ablates its normalization."""
    return config["loss"] == "uniform" and config["normalize"]


# =============================================================================================================
# 4. Evaluation (section 5.1; spec §5): rank the target against ALL items, for ALL users; Figure 1's statistics
# =============================================================================================================

def rank_of_targets(scores, targets):
    """Number of items other than the target scoring >= the target (ties count against it): (B, N+1), (B,) -> (B,).
    A target masked to -inf cannot be recommended: its rank is inf, never a hit."""
    target_scores = scores.gather(1, targets[:, None])                      # (B, 1)
    ranks = ((scores >= target_scores).sum(1) - 1).double()                 # minus the target itself
    return ranks.masked_fill(target_scores[:, 0] == float("-inf"), float("inf"))


def metrics_from_ranks(ranks, ks=(5, 10, 20)):
    """HR@K = [rank < K]; NDCG@K = 1 / log2(rank + 2) when rank < K, else 0; averaged over users."""
    result = {}
    for k in ks:
        hit = ranks < k
        result[f"HR@{k}"] = hit.double().mean().item()
        result[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).mean().item()
    return result


def evaluation_batches(flat, starts, lengths, max_len, split, batch_size=1024):
    """The fixed (histories, users, targets) batches of one split; users sorted by history length so each pads
    little."""
    ends, history_lengths = evaluation_examples(starts, lengths, max_len, split)
    order = torch.argsort(history_lengths, stable=True)                    # user ids, shortest history first
    batches = []
    for users in order.split(batch_size):
        width = int(history_lengths[users].max())
        batches.append((gather_histories(flat, ends[users], history_lengths[users], width), users, flat[ends[users]]))
    return batches


@torch.no_grad()
def evaluate(model, batches, cosine, mask_seen=False):
    """HR@5/10/20 and NDCG@5/10/20 over the given batches, every item scored by `score` (cosines where training
    scored cosines): one matrix product per batch on the model's device. mask_seen: items of the history score -inf
    (a target that repeats a history item then cannot be hit)."""
    was_training = model.training
    model.eval()
    table = model.output_items().weight                                     # (N + 1, d)
    ranks, all_finite = [], True
    for histories, users, targets in batches:
        scores = score(model.encode(histories, users=users)[:, None], table, cosine)  # (B, N + 1)
        all_finite = all_finite & torch.isfinite(scores[:, 1:].sum(1)).all()  # a row sum is finite iff every score is
        scores[:, 0] = float("-inf")                                        # padding is no item
        if mask_seen:
            scores.scatter_(1, histories, float("-inf"))
        ranks.append(rank_of_targets(scores, targets))
    model.train(was_training)
    if not bool(all_finite):
        raise FloatingPointError("the model produced non-finite scores during evaluation")
    return metrics_from_ranks(torch.cat(ranks))


def statistics_sample(flat, starts, lengths, num_items, max_len, size=1000):
    """A fixed sample (seed 0) for embedding_statistics(): validation histories of `size` users, `size` item ids,
    and `size` training pairs (history, positive)."""
    generator = torch.Generator().manual_seed(0)
    users = torch.randperm(len(lengths), generator=generator)[:size].to(flat.device)
    histories = gather_histories(flat, *evaluation_examples(starts[users], lengths[users], max_len, "valid"), max_len)
    items = (torch.randperm(num_items, generator=generator)[:size] + 1).to(flat.device)
    ends, history_lengths, pair_users = training_examples(starts, lengths, max_len)
    pairs = torch.randperm(len(ends), generator=generator)[:size].to(flat.device)
    return {"histories": histories, "users": users, "items": items, "pair_users": pair_users[pairs],
            "pair_histories": gather_histories(flat, ends[pairs], history_lengths[pairs], max_len),
            "positives": flat[ends[pairs]]}


@torch.no_grad()
def embedding_statistics(model, sample, bins=40):
    """On the fixed sample of statistics_sample(), in Wang & Isola's terms: the pairwise cosine similarities of
    history vectors and of item vectors (mean and histogram over [-1, 1], Figure 1), their uniformity
    log mean_{x<y} exp(-2 ||x - y||^2), and the alignment mean ||h - i||^2 of normalized training pairs (history,
    its positive). Lower is better for both: aligned pairs, uniformly spread vectors."""
    was_training = model.training
    model.eval()
    result = {}
    history_vectors = model.encode(sample["histories"], users=sample["users"])  # (S, d)
    for name, vectors in (("history", history_vectors), ("item", model.output_items()(sample["items"]))):
        unit = F.normalize(vectors, dim=-1)
        upper = torch.triu_indices(len(unit), len(unit), 1, device=unit.device)
        cosines = (unit @ unit.T)[upper[0], upper[1]]
        result[f"{name}_mean_cosine"] = cosines.mean().item()
        result[f"{name}_uniformity"] = torch.log(torch.exp(-2 * (2 - 2 * cosines)).mean()).item()
        result[f"{name}_cosine_histogram"] = torch.histc(cosines.float(), bins, -1, 1).long().tolist()
    h = F.normalize(model.encode(sample["pair_histories"], users=sample["pair_users"]), dim=-1)  # (S, d)
    i = F.normalize(model.output_items()(sample["positives"]), dim=-1)     # (S, d)
    result["alignment"] = (h - i).square().sum(-1).mean().item()
    model.train(was_training)
    return result


# =============================================================================================================
# 5. Training (appendix B; spec §6): Adam, batches of triplets, early stopping on validation NDCG@10
# =============================================================================================================

def epoch_seed(seed, epoch):
    """Every random draw of an epoch (order, negatives, dropout) follows from (seed, epoch), so a resumed run
    repeats an uninterrupted one exactly. Modulo 2**64, as torch takes any seed it accepts (-2**63 .. 2**64 - 1):
    the same seeds as without it wherever torch accepted them, and no overflow for a large --seed."""
    return (seed * 1_000_003 + epoch) % 2 ** 64


# Length groups, a speed path: a batch is a random set of B triplets as always, but inside it the histories are
# sorted by length and encoded in `length_groups` groups, each padded only to its own longest history. Every loss sums
# over the batch, so this changes nothing but float rounding and far less padding is computed (docs/measurements.md).
# The three functions below are all of it.


def group_sizes(batch_size, groups):
    """Sizes of `groups` consecutive, near-equal groups of a batch (fewer when the batch is smaller)."""
    groups = min(groups, batch_size)
    return [batch_size // groups + (g < batch_size % groups) for g in range(groups)]


def epoch_batches(order, history_lengths, batch_size, groups):
    """Cut a random order into batches of `batch_size` examples, each sorted by history length and cut into `groups`
    groups. Returns [(example ids, group sizes, group widths)] with a single host-device synchronisation."""
    batches = [b[torch.argsort(history_lengths[b], stable=True)] for b in order.split(batch_size)]
    sizes = [group_sizes(len(b), groups) for b in batches]
    last_of_group = torch.tensor([start + sum(s[:g + 1]) - 1 for start, s in
                                  zip(range(0, len(order), batch_size), sizes) for g in range(len(s))])
    widths = iter(history_lengths[torch.cat(batches)[last_of_group.to(order.device)]].tolist())
    return [(b, s, [next(widths) for _ in s]) for b, s in zip(batches, sizes)]


def encode_batch(model, flat, ends, history_lengths, sizes, widths, users=None):
    """History vectors (B, d) of a length-sorted batch, one group at a time, each padded only to its own longest
    history. A sequence model gets the item vectors of all groups from one lookup, since the gradient of each lookup
    is a whole (N + 1, d) table (docs/measurements.md); Caser, which reads only its last L items, encodes each group
    as it is."""
    histories = [gather_histories(flat, group_ends, group_lengths, width) for group_ends, group_lengths, width
                 in zip(ends.split(sizes), history_lengths.split(sizes), widths)]  # G groups of (B_g, T_g) item ids
    if len(histories) == 1:
        return model.encode(histories[0], users=users)
    if not hasattr(model, "sequence_states"):                               # Caser
        users = [None] * len(sizes) if users is None else users.split(sizes)
        return torch.cat([model.encode(group, users=u) for group, u in zip(histories, users)])
    vectors = model.items(torch.cat([group.flatten() for group in histories]))  # (sum of B_g * T_g, d)
    vectors = vectors.split([group.numel() for group in histories])
    return torch.cat([last_real_state(model.sequence_states(x.view(*group.shape, -1), group), group)
                      for group, x in zip(histories, vectors)])


def train_epoch(model, optimizer, data, config, epoch, progress=None):
    """One pass over the training examples in a fresh random order with fresh negatives.
    Returns a tensor with the loss of every step (no host-device synchronisation inside the loop).
    progress: a ProgressLine, told of every step."""
    flat, ends, history_lengths, users, keys, num_items = data
    device = flat.device
    torch.manual_seed(epoch_seed(config["seed"], epoch))                    # dropout
    generator = torch.Generator(device).manual_seed(epoch_seed(config["seed"], epoch))
    order = torch.randperm(len(ends), device=device, generator=generator)  # (E,)
    negatives = sample_negatives(users, keys, num_items, generator)         # (E,) item ids, one per example
    batches = epoch_batches(order, history_lengths, config["batch_size"], config["length_groups"])
    losses = torch.zeros(len(batches), device=device)
    for step, (batch, sizes, widths) in enumerate(batches):
        h = encode_batch(model, flat, ends[batch], history_lengths[batch], sizes, widths, users[batch])  # (B, d)
        loss = batch_loss(model, h, flat[ends[batch]], negatives[batch], config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        if progress is not None:
            progress.step(step + 1, len(batches))
    return losses


def adam(model, lr, device):
    """Adam; its fused kernel where torch has one (CPU, CUDA): the same update, one kernel instead of ~10 per tensor."""
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))


def history_limit(config, lengths):
    """The longest history a run reads: --max-len, capped at the longest user's test history (n - 1 items)."""
    # So SASRec's position table gets only rows that can be read (not 10**9 for --max-len 10**9); the benchmarks'
    # longest histories (203 to 549 items) never reach a --max-len of 50, so their random draws are as before the cap.
    return min(config["max_len"], int(lengths.max()) - 1)


def model_of(config, num_items, num_users, max_len):
    """The backbone a run's configuration describes, freshly initialized."""
    return build_model(config["model"], num_items, config["dim"], config["layers"], config["heads"],
                       config["dropout"], max_len, config["caser_window"], config["caser_activation"],
                       num_users if config["caser_users"] else 0, config["caser_output_table"])


def train(config, sequences, run_dir, log=print):
    """Train on `sequences` (lists of item ids) until validation NDCG@10 has not improved for `patience` epochs (or
    for `epochs` epochs), then test once with the best state. Writes log.jsonl, checkpoint.pt and metrics.json
    into run_dir, and resumes from its checkpoint.pt when there is one. The checkpoint holds no random-number
    state because none is needed: every epoch re-seeds from (seed, epoch)."""
    device = torch.device(config["device"])
    flat, starts, lengths, num_items = flatten_sequences(sequences, device)
    max_len = history_limit(config, lengths)
    data = training_data(flat, starts, lengths, num_items, max_len)
    valid = evaluation_batches(flat, starts, lengths, max_len, "valid")
    sample = statistics_sample(flat, starts, lengths, num_items, max_len)
    torch.manual_seed(config["seed"])
    model = model_of(config, num_items, len(lengths), max_len).to(device)
    optimizer = adam(model, config["lr"], device)
    cosine = scores_are_cosines(config)
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    state, best_model = restore(checkpoint_path, model, optimizer)
    if state["epoch"]:
        log(f"resuming {run_dir} after epoch {state['epoch']} (best so far: epoch {state['best_epoch']})")
    log(f"{config['data']}: {len(lengths):,} users, {num_items:,} items, {len(data.ends):,} training examples; "
        f"{config['model']} + {config['loss']} on {device}; run folder {run_dir}")

    progress = ProgressLine()                                               # a terminal only: no log file gets it
    while state["epoch"] < config["epochs"] and state["epoch"] - state["best_epoch"] < config["patience"]:
        epoch = state["epoch"] + 1
        started = time.time()
        progress.start(f"epoch {epoch}")
        try:
            losses = train_epoch(model, optimizer, data, config, epoch, progress if progress.enabled else None)
        finally:
            progress.clear()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise TrainingStopped(f"non-finite loss at epoch {epoch}, step {int(bad[0]) + 1}; the run folder keeps "
                                  f"the checkpoint of epoch {state['epoch']}")
        train_seconds = time.time() - started
        metrics = evaluate(model, valid, cosine, config["mask_seen"])
        row = {"epoch": epoch, "loss": losses.sum().item() / len(data.ends), "train_seconds": round(train_seconds, 2),
               "eval_seconds": round(time.time() - started - train_seconds, 2),
               **{f"valid_{k}": v for k, v in metrics.items()},
               **embedding_statistics(model, sample)}
        state["history"].append(row)
        state["epoch"] = epoch
        if metrics["NDCG@10"] > state["best_ndcg"]:
            state["best_epoch"], state["best_ndcg"] = epoch, metrics["NDCG@10"]
            best_model = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                             "best_model": best_model}, checkpoint_path)
        except RunFolderError as err:
            raise RunFolderError(f"{err}; the run folder keeps the checkpoint of epoch {epoch - 1}") from None
        save_atomically("".join(json.dumps(r) + "\n" for r in state["history"]), os.path.join(run_dir, "log.jsonl"))
        log(f"epoch {epoch:3d}  loss {row['loss']:.4f}  valid HR@10 {metrics['HR@10']:.4f} NDCG@10 "
            f"{metrics['NDCG@10']:.4f}  best epoch {state['best_epoch']}  {train_seconds:.1f}s + "
            f"{row['eval_seconds']:.1f}s")

    model.load_state_dict(best_model)
    test = evaluate(model, evaluation_batches(flat, starts, lengths, max_len, "test"), cosine, config["mask_seen"])
    best_row = state["history"][state["best_epoch"] - 1] if state["best_epoch"] else {}
    result = {"test": test, "valid": {k[6:]: v for k, v in best_row.items() if k.startswith("valid_")},
              "best_epoch": state["best_epoch"], "epochs": state["epoch"],
              "train_seconds": round(sum(r["train_seconds"] for r in state["history"]), 1),
              "device": str(device), "config": config}
    save_atomically(json.dumps(result, indent=2) + "\n", os.path.join(run_dir, "metrics.json"))
    log(f"test (best epoch {state['best_epoch']}): " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
    return result


# =============================================================================================================
# 6. Run folders: configuration, checkpoint and resume; one-line errors; the progress line
# =============================================================================================================

class ConfigError(ValueError):
    """A command line the paper's setting cannot use; the message is one line naming the problem."""


class RunFolderError(ConfigError):
    """A run folder that cannot be created or written (full disk, no permission), or whose files are damaged; the
    message is one line naming the file and the problem, and nothing in the folder is changed."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (a non-finite loss); the run folder keeps the last good checkpoint."""


def one_line(err, limit=200):
    """An exception as one short line, for messages that quote it."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def read_json(path, what):
    """A run folder's JSON file (config.json, metrics.json), or a RunFolderError naming it."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as err:                                    # JSONDecodeError, UnicodeDecodeError
        raise RunFolderError(f"{path} is damaged or unreadable ({one_line(err)}); {what}") from None
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} is damaged (not a JSON object); {what}")
    return value


def save_atomically(obj, path):
    """Write to a temporary file in the same folder, then rename: a kill at any moment leaves the old or the new.
    So does a failed write (a full disk, a folder that cannot be written): the partial file is removed, the old one
    stays, and a RunFolderError says why."""
    partial = path + ".partial"
    try:
        if path.endswith(".pt"):
            torch.save(obj, partial)
        else:
            with open(partial, "w") as f:
                f.write(obj)
        os.replace(partial, path)
        return
    except (OSError, RuntimeError) as err:           # torch.save reports a full disk as a RuntimeError, no errno
        reason = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)
    try:                                             # (after the except clause, which kept torch's writer open)
        os.remove(partial)
    except OSError:
        pass
    try:
        free = f"; {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free:,} bytes free on its disk"
    except OSError:
        free = ""
    raise RunFolderError(f"cannot write {path} ({reason}){free}")


def restore(checkpoint_path, model, optimizer):
    """Load the last checkpoint into model and optimizer, if any. Returns (early-stopping state, best model)."""
    if not os.path.exists(checkpoint_path):
        state = {"epoch": 0, "best_epoch": 0, "best_ndcg": -1.0, "history": []}  # history: the log rows so far
        return state, {k: v.clone() for k, v in model.state_dict().items()}
    try:  # map_location: a checkpoint written on any device (a GPU, the CPU) loads onto this run's device
        checkpoint = torch.load(checkpoint_path, map_location=next(model.parameters()).device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        return checkpoint["state"], checkpoint["best_model"]
    except Exception as err:  # whatever a truncated, foreign or garbled file raises (zip, pickle, key, shape errors)
        raise RunFolderError(f"{checkpoint_path} is damaged or not this run's checkpoint ({one_line(err)}); nothing "
                             f"was changed: remove it to train this run from its start") from None


def prepare_run_dir(config, run_dir):
    """Create the run folder, or check that an existing one holds this same configuration."""
    saved_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(saved_path):
        saved = read_json(saved_path, "choose another --out, or remove the folder to start over")
        differing = [k for k in config if k not in RUN_ONLY_KEYS and saved.get(k, LATER_KEYS.get(k)) != config[k]]
        if differing:
            key = differing[0]
            raise ConfigError(f"{run_dir} holds a run with --{key.replace('_', '-')} {saved.get(key)}, not "
                              f"{config[key]}; choose another --out")
    elif os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunFolderError(f"{run_dir} is a file, not a run folder; choose another --out")
    else:
        missing = []                                                        # the folders this call creates
        folder = os.path.abspath(run_dir)
        while not os.path.exists(folder) and folder != os.path.dirname(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(run_dir, exist_ok=True)
            save_atomically(json.dumps(config, indent=2) + "\n", saved_path)
        except (OSError, RunFolderError) as err:
            for folder in missing:                                          # innermost first; only if still empty
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
            if isinstance(err, RunFolderError):
                raise
            raise RunFolderError(f"cannot create the run folder {run_dir} ({err.strerror or err})") from None


def lock_run_dir(run_dir):
    """An exclusive lock on the run folder for as long as the returned file stays open; the operating system
    releases it when the process ends, however it ends. (No lock where fcntl does not exist, as on Windows.)"""
    try:
        handle = open(os.path.join(run_dir, ".lock"), "w")
    except OSError as err:
        raise RunFolderError(f"cannot write in the run folder {run_dir} ({err.strerror or err})") from None
    if fcntl:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(f"{run_dir} is in use by another running process") from None
    return handle


class ProgressLine:
    """`epoch 3: 412/695 steps, 0:12 left` on one terminal line that rewrites itself (carriage return) at most once
    every `interval` seconds, on `stream` (stderr) only when it is a terminal: log files and pipes get nothing.
    `step(done, total)` reads only the clock, never a tensor, so it adds no host-device synchronisation (on a GPU the
    count is of steps queued, a few ahead of those finished)."""

    def __init__(self, stream=None, interval=1.0):
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(getattr(self.stream, "isatty", None)) and self.stream.isatty()
        self.interval, self.width, self.label, self.clock = interval, 0, "", time.monotonic

    def start(self, label):
        self.label, self.started = label, self.clock()
        self.next_update = self.started + self.interval

    def step(self, done, total):
        now = self.clock()
        if now >= self.next_update:
            self.next_update = now + self.interval
            left = round((now - self.started) / done * (total - done))
            self.show(f"{self.label}: {done:,}/{total:,} steps, {left // 60}:{left % 60:02d} left")

    def show(self, text):
        if self.enabled:
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)

    def clear(self):
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


# =============================================================================================================
# 7. Command line
# =============================================================================================================

class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only for flags that take a value and have a default (not for --no-hom and the like)."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser():
    parser = OneLineErrorParser(
        prog="uniform_seqrec.py",
        formatter_class=DefaultsHelpFormatter,
        description="Train a sequential recommender (GRU4Rec, Caser, SASRec) with BCE, BPR, InfoNCE or the "
                    "paper's uniformity loss, early-stopped on validation NDCG@10, and report test HR/NDCG@5/10/20 "
                    "ranking every item for every user.",
        epilog="Ablations of the paper's Table 2 (with --loss uniform): (b) --no-hom --no-het, (c) --no-het, "
               "(d) --no-hom, (e) nothing, (f) --no-rec, (g) --no-normalize; row (a) is --loss bce. "
               "A run writes config.json, log.jsonl, checkpoint.pt and metrics.json into its run folder; running "
               "the same command again resumes it.")
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", choices=["gru4rec", "caser", "sasrec"], default="sasrec", help="backbone")
    what.add_argument("--loss", choices=["bce", "bpr", "infonce", "uniform"], default="uniform",
                      help="training objective; 'uniform' is the paper's eq. 6")
    what.add_argument("--data", default="beauty",
                      help=f"benchmark ({', '.join(BENCHMARKS)}) or the path of a one-line-per-user file")
    what.add_argument("--data-dir", default=default_data_dir(),
                      help="folder holding the benchmark files (environment variable UNIFORM_SEQREC_DATA)")
    model = parser.add_argument_group("model (paper appendix B grid: dim 32/64/128, layers and heads 1/2/3)")
    model.add_argument("--dim", type=int, default=64, help="embedding size d")
    model.add_argument("--layers", type=int,
                       help="SASRec blocks / GRU4Rec GRU layers (default: the original's, 2 for SASRec, 1 for "
                            "GRU4Rec)")
    model.add_argument("--heads", type=int, default=2, help="SASRec attention heads (must divide --dim)")
    model.add_argument("--dropout", type=float, default=0.5, help="dropout rate")
    model.add_argument("--max-len", type=int, default=50, help="histories keep their last MAX_LEN items")
    model.add_argument("--caser-window", type=int, default=5, help="Caser: the last L items it convolves")
    model.add_argument("--caser-activation", choices=["relu", "none"], default="relu",
                       help="Caser: activation of its fully connected layer (the original's ReLU, or none)")
    model.add_argument("--caser-users", action="store_true", default=False,
                       help="Caser: add the original's user embedding (joined by a second layer, as RecBole does)")
    model.add_argument("--caser-output-table", action="store_true", default=False,
                       help="Caser: score items with a table of their own, as the original does, not the input table")
    loss = parser.add_argument_group("uniformity loss (eq. 6) and its ablations (Table 2)")
    loss.add_argument("--beta", type=float, default=0.05, help="weight beta1 = beta2 of L_hom and L_het")
    loss.add_argument("--t", type=float, default=2.0, help="Gaussian potential exp(-t ||x - y||^2)")
    loss.add_argument("--no-normalize", dest="normalize", action="store_false", default=True,
                      help="score and regularise raw vectors (row g)")
    loss.add_argument("--no-rec", dest="rec", action="store_false", default=True, help="drop L_rec (row f)")
    loss.add_argument("--no-hom", dest="hom", action="store_false", default=True, help="drop L_hom")
    loss.add_argument("--no-het", dest="het", action="store_false", default=True, help="drop L_het")
    loss.add_argument("--infonce-negatives", type=int, metavar="K",
                      help="InfoNCE: each history's own negative and the next K-1 of the batch; 1 makes InfoNCE "
                           "equal to BPR (default: all the batch's negatives)")
    fit = parser.add_argument_group("training")
    fit.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (grid: 1e-4, 2e-4, 3e-4)")
    fit.add_argument("--batch-size", type=int, default=256, help="triplets per batch")
    fit.add_argument("--epochs", type=int, default=300, help="at most this many epochs")
    fit.add_argument("--patience", type=int, default=20, help="stop after this many epochs without a better "
                                                              "validation NDCG@10")
    fit.add_argument("--length-groups", type=int,
                     help="encode each batch in this many length-sorted groups, each padded only to its own "
                          "longest history; speed only (default 8, and 1 for Caser, which reads only its last "
                          "L items)")
    fit.add_argument("--seed", type=int, default=42, help="every random draw follows from it")
    fit.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or a torch device")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--mask-seen", action="store_true", default=False,
                            help="never recommend items of the user's history (S3-Rec style; off in the paper "
                                 "reproduction, so that repeated Yelp targets stay reachable)")
    runs = parser.add_argument_group("run folder")
    runs.add_argument("--out", help="run folder (default: runs/<data>-<model>-<loss>-<hash of the configuration>)")
    runs.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved configuration")
    return parser


# keys of the configuration that do not change the result, so may differ when a run is resumed
RUN_ONLY_KEYS = ("device", "data_dir", "data_path", "out", "resume")
# Keys added after runs had been recorded, with the value that every earlier run had without saying so. At that value
# a key stays out of the configuration's hash, so the run folders of earlier configurations keep their names.
LATER_KEYS = {"infonce_negatives": None, "caser_activation": "none", "caser_users": False,
              "caser_output_table": False}
# The number of layers of each backbone's original (Kang & McAuley: 2 blocks; Hidasi et al.: 1 GRU layer). Caser
# has no such depth; its value is only recorded.
ORIGINAL_LAYERS = {"sasrec": 2, "gru4rec": 1, "caser": 1}


SEE_DEVICES = ("see which there are with: python -c \"import torch; print(torch.cuda.device_count(), 'CUDA', "
               "torch.backends.mps.is_available(), 'MPS')\"")


def resolve_device(name):
    """'auto' -> cuda, then mps, then cpu; any other name must be a device torch knows and this machine has."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device '{name}' is not a device name torch knows (auto, cpu, cuda, cuda:N, "
                          f"mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            built = "" if torch.version.cuda else f", and this torch ({torch.__version__}) is built without CUDA"
            raise ConfigError(f"--device {name}: CUDA is not available on this machine{built}; {SEE_DEVICES}")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                              f"{SEE_DEVICES}")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"--device {name}: MPS (Apple silicon) is not available on this machine; {SEE_DEVICES}")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if not (hasattr(backend, "is_available") and backend.is_available()):
            raise ConfigError(f"--device {name}: there is no {device.type} device to train on here (auto, cpu, cuda, "
                              f"cuda:N, mps); {SEE_DEVICES}")
    return name


MAX_INT = 2 ** 63 - 1  # torch's int64


def check_config(config):
    """One-line errors for values the paper's setting cannot use. (Values that fit these checks but not the
    machine's memory are refused by check_memory, which needs the data.)"""
    for key in ("lr", "batch_size", "max_len", "dim", "patience", "epochs", "caser_window", "layers", "heads",
                "length_groups"):
        if not config[key] > 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be positive (got {config[key]})")
        if key != "lr" and config[key] > MAX_INT:
            raise ConfigError(f"--{key.replace('_', '-')} {config[key]} is too large (integers go up to 2**63 - 1)")
    if math.isinf(config["lr"]):
        raise ConfigError(f"--lr must be finite (got {config['lr']})")
    if not -2 ** 63 <= config["seed"] < 2 ** 64:
        raise ConfigError(f"--seed must be from -2**63 to 2**64 - 1, the seeds torch takes (got {config['seed']})")
    for key in ("beta", "t"):
        if not config[key] >= 0 or math.isinf(config[key]):
            raise ConfigError(f"--{key} must be a finite number >= 0 (got {config[key]})")
    if not 0 <= config["dropout"] < 1:
        raise ConfigError(f"--dropout must be in [0, 1) (got {config['dropout']})")
    if config["model"] == "sasrec" and config["dim"] % config["heads"]:
        raise ConfigError(f"--heads {config['heads']} does not divide --dim {config['dim']}")
    ablated = [flag for flag, key in (("--no-normalize", "normalize"), ("--no-rec", "rec"), ("--no-hom", "hom"),
                                      ("--no-het", "het")) if not config[key]]
    if ablated and config["loss"] != "uniform":
        raise ConfigError(f"{ablated[0]} only applies to --loss uniform")
    if not (config["rec"] or config["hom"] or config["het"]):
        raise ConfigError("--no-rec, --no-hom and --no-het together leave no loss to train")
    if config["infonce_negatives"] is not None:
        if config["loss"] != "infonce":
            raise ConfigError("--infonce-negatives only applies to --loss infonce")
        if not config["infonce_negatives"] > 0:
            raise ConfigError(f"--infonce-negatives must be positive (got {config['infonce_negatives']})")


def device_memory(device):
    """Bytes of memory of a torch.device: the GPU's own, or the machine's (CPU, and MPS, which shares it); None
    where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):                            # no sysconf on Windows
        return None


def memory_estimate(config, sequences):
    """The largest terms of training's memory in bytes, as {what: bytes}: rough (float32; the factors count the
    copies autograd, Adam, the best state and the evaluation keep), only to refuse with one line what could never
    fit (--dim 10**9, --batch-size 10**12, --layers 10**9) rather than exhaust the machine's memory or hang
    (docs/measurements.md compares it with a measured peak)."""
    d, window, layers = config["dim"], config["caser_window"], config["layers"]
    rows = max(max(s) for s in sequences) + 1                               # ids index the item table
    T = min(config["max_len"], max(len(s) for s in sequences) - 1)          # the widest history (see train)
    B = min(config["batch_size"], sum(len(s) - 3 for s in sequences))       # one batch: at most every example
    if config["model"] == "sasrec":
        weights, activations = T * d + layers * 6 * d * d, layers * B * T * (20 * d + 4 * config["heads"] * T)
        flags = f"--layers {layers}, --dim {d}"
    elif config["model"] == "gru4rec":
        weights, activations, flags = layers * 6 * d * d, layers * B * T * 10 * d, f"--layers {layers}, --dim {d}"
    else:
        weights = 8 * window * (window + 1) * d + (4 * d + 16 * window) * d   # horizontal filters of heights 1..L
        activations, flags = B * (4 * window * d + 16 * window * window), f"--caser-window {window}, --dim {d}"
    pairs = {"uniform": 40 * B * B, "infonce": 10 * B * B}.get(config["loss"], 0)  # (2B)^2 and B^2 potentials
    return {f"the item table ({rows:,} rows, one per id up to the largest, x --dim {d})": 4 * 6 * rows * d,
            f"the model's weights ({flags})": 4 * 6 * weights,
            f"one batch ({B:,} triplets, histories of up to {T} items; --batch-size {config['batch_size']}, {flags})":
                4 * (activations + pairs),
            f"evaluation (1,024 users x {rows:,} scores)": 12 * 1024 * rows}


def check_memory(config, sequences):
    """One line, before any folder exists, when training could never fit the device's memory."""
    available = device_memory(torch.device(config["device"]))
    terms = memory_estimate(config, sequences)
    if available and sum(terms.values()) > available:
        biggest, gib = max(terms, key=terms.get), sum(terms.values()) / 2 ** 30
        table, _, _, scores = terms                                        # the terms that grow with the ids
        largest, distinct = max(max(s) for s in sequences), len({i for s in sequences for i in s})
        sparse = ""
        if biggest in (table, scores) and largest > 2 * distinct:
            sparse = f" (item ids run up to {largest:,} for {distinct:,} items: number them 1..{distinct:,})"
        raise ConfigError(f"training would need about {gib:,.{1 if gib < 100 else 0}f} GiB, more than the "
                          f"{available / 2 ** 30:,.1f} GiB of {config['device']}; most of it for {biggest}{sparse}")


def data_path_of(config):
    """--data is a benchmark name (looked up in --data-dir) or a path."""
    if config["data"] in BENCHMARKS:
        path = benchmark_path(config["data"], config["data_dir"])
        if not os.path.isfile(path):
            raise DataError(f"{path} not found; get it with: python data_prep.py {config['data']} "
                            f"--data-dir {config['data_dir']}")
        return path
    if os.path.exists(config["data"]):
        return config["data"]
    if os.sep in config["data"] or "." in config["data"]:
        raise DataError(f"no such data file: {config['data']}")
    raise ConfigError(f"unknown dataset '{config['data']}': not one of {', '.join(BENCHMARKS)} and no such file")


def configuration_id(config):
    """Short hash of everything that changes the result: equal configurations share a default run folder."""
    kept = {k: v for k, v in sorted(config.items())
            if k not in RUN_ONLY_KEYS and not (k in LATER_KEYS and v == LATER_KEYS[k])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def configure(argv):
    """Parse the command line into the resolved configuration and its run folder."""
    config = vars(build_parser().parse_args(argv))
    typed_only = build_parser()
    typed_only.set_defaults(**dict.fromkeys(config))                        # a typed flag never parses to None
    given = {k: v for k, v in vars(typed_only.parse_args(argv)).items() if v is not None}
    if config["resume"]:
        saved_path = os.path.join(config["resume"], "config.json")
        if not os.path.isfile(saved_path):
            raise ConfigError(f"--resume {config['resume']}: no config.json there, not a run folder")
        saved = {**LATER_KEYS, **read_json(saved_path, "this folder cannot be resumed")}
        for key, value in given.items():
            if key not in RUN_ONLY_KEYS and saved.get(key) != value:
                raise ConfigError(f"--resume {config['resume']}: that run has --{key.replace('_', '-')} "
                                  f"{saved.get(key)}, this command asks for {value}")
        config = {**saved, **{k: v for k, v in given.items() if k in RUN_ONLY_KEYS},
                  "resume": config["resume"]}
        config.setdefault("data_dir", default_data_dir())
    if config["length_groups"] is None:
        config["length_groups"] = 1 if config["model"] == "caser" else 8
    if config["layers"] is None:
        config["layers"] = ORIGINAL_LAYERS[config["model"]]
    if config["model"] != "caser":
        typed = [key for key in ("caser_activation", "caser_users", "caser_output_table") if key in given]
        if typed:
            raise ConfigError(f"--{typed[0].replace('_', '-')} only applies to --model caser")
        config["caser_activation"] = LATER_KEYS["caser_activation"]         # no Caser, no activation of its
    if config["infonce_negatives"] is not None and config["infonce_negatives"] >= config["batch_size"]:
        config["infonce_negatives"] = None                                  # the whole batch: the default's run
    check_config(config)
    config["data_path"] = data_path_of(config)
    config["device"] = resolve_device(config["device"])
    name = config["data"] if config["data"] in BENCHMARKS else os.path.splitext(os.path.basename(config["data"]))[0]
    run_dir = config["resume"] or config["out"] or os.path.join(
        "runs", f"{name}-{config['model']}-{config['loss']}-{configuration_id(config)}")
    return config, run_dir


def main(argv=None):
    try:
        config, run_dir = configure(argv)
        sequences = read_sequences(config["data_path"])                     # bad data fails before any folder exists
        check_memory(config, sequences)
        prepare_run_dir(config, run_dir)
        lock = lock_run_dir(run_dir)                                        # noqa: F841 - held until main returns
        metrics_path = os.path.join(run_dir, "metrics.json")
        if os.path.isfile(metrics_path):
            test = read_json(metrics_path, "remove it to test the run's best state again").get("test")
            if not isinstance(test, dict):
                raise RunFolderError(f"{metrics_path} has no test results; remove it to test the run's best state "
                                     f"again")
            print(f"{run_dir} is finished: test " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
            return 0
        train(config, sequences, run_dir, log=lambda line: print(line, flush=True))
    except (DataError, ConfigError) as err:
        print(f"uniform_seqrec.py: error: {err}", file=sys.stderr)
        return 2
    except (TrainingStopped, FloatingPointError) as err:
        print(f"uniform_seqrec.py: stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; the run folder keeps the last finished epoch (run the same command to resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
