"""uniform-seqrec: reference implementation of "Leveraging Uniformity of Normalized Embeddings for Sequential
Recommendation" (Chung & Kim).

    python uniform_seqrec.py --model sasrec --loss uniform --data beauty

This file is the paper's method, top to bottom; `runs.py` runs it (command line, run folders, checkpoints, resume).
From Python: `train(Config(model="sasrec", loss="uniform"), sequences)` (Config, part 5, holds the defaults).
The file has five parts; beside each, the paper's sections it follows (§: the paper's; "spec §": docs/spec.md's):
  1. Data            leave-one-out split, training triplets (u, i, j), negatives          (appendix A, §4)
  2. Backbones       GRU4Rec, Caser, SASRec: encode(histories) -> (B, d)                  (§2, §5.1)
  3. Scores, losses  score (eqs. 1, 3), BCE (eq. 2), BPR, InfoNCE, uniformity loss        (§2-§4)
                     and, beyond the paper, CE: softmax over every item
  4. Evaluation      HR@K and NDCG@K ranking every item, under two protocols              (§5.1)
  5. Training        batches of triplets, early stopping, the best state tested           (appendix B)

Where the paper is silent, docs/spec.md decides ("spec §n"); docs/measurements.md has the numbers behind our own
choices. Item ids: `histories` (B, T), `positives`, `negatives`, `targets` (B,); vectors: h, i, j (B, d) of the
histories, positives and negatives (the paper's h'_u, i'_i, i'_j).

Some code is written for speed. On a first read take each as its plain version, named in parentheses: in part 2
`Dropout` (nn.Dropout), the attention written out (F.scaled_dot_product_attention) and the `item_vectors` hook (one
lookup per history); in part 3 `score_all`'s one matrix product and its `out` (score); in part 4 `rank_of_targets`'
in-place count (a sum of comparisons); in part 5 the length groups and packing (the whole batch as one padded
tensor) and fused Adam (Adam). What they compute differs from the plain version only in
  - float rounding;
  - which random numbers make the dropout masks;
  - with length groups and --infonce-negatives under B, which candidates an InfoNCE history meets;
  - with --pack, the dropout rate, rounded to a multiple of 2**-16 (0.5 exactly).
Skip outright the per-user regime (`--examples users`, not the paper's and not measured for quality yet): part 5's
user_windows, user_batches, grouped_states and train_epoch's `per_user` branch. At import nothing runs but one
warnings filter.
"""
import sys

if __name__ == "__main__":                     # program start-up, not the method: before torch loads (data_prep.py)
    from data_prep import start_program
    start_program("uniform_seqrec.py")
import time
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

# Before torch's import: without numpy (not a dependency) torch warns, a second line under every one-line error.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch
import torch.nn as nn
import torch.nn.functional as F

from data_prep import DataError


# =============================================================================================================
# 1. Data: leave-one-out split and training triplets (paper appendix A and §4; spec §1-2)
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
# (target_at, history length): its target is flat[target_at] and its history the `length` items just before it,
# flat[target_at - length : target_at]. Histories are cut to the last `max_len` items and right-padded with 0 (spec
# §1), to the width of their batch (in training, to the width of their length group or packed slot, part 5:
# histories are sorted or packed within each batch, so which triplets share a batch is unchanged). `lengths` are the
# users' sequence lengths n, `history_lengths` the examples'; E is the number of training examples; N the largest
# item id (the benchmark files number their items 1..N). Appendix A's 5-core filter is applied where the data files
# are made (data_prep.py, K_CORE): the sequences read here are already 5-core.


def flatten_sequences(sequences, device):
    """Lists of item ids, one per user, as one flat tensor: returns (flat, starts, lengths, num_items), the tensors on
    `device`; user u's items are flat[starts[u] : starts[u] + lengths[u]]; num_items is N, the largest id."""
    lengths = torch.tensor([len(s) for s in sequences])
    starts = 1 + torch.cumsum(lengths, 0) - lengths                        # flat[0] is the padding sentinel
    flat = torch.tensor([0] + [i for s in sequences for i in s])
    num_items = int(flat.max())
    return flat.to(device), starts.to(device), lengths.to(device), num_items


def training_examples(starts, lengths, max_len):
    """Every prefix of every user's training part. Returns (target_at, history_lengths, users), each (E,)."""
    examples_per_user = (lengths - 3).clamp(min=0)                         # t = 1 .. n-3
    users = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), examples_per_user)
    first = torch.cumsum(examples_per_user, 0) - examples_per_user
    t = torch.arange(len(users), device=lengths.device) - first[users] + 1  # 1 .. n-3 within each user
    return starts[users] + t, t.clamp(max=max_len), users


def evaluation_examples(starts, lengths, max_len, split):
    """One example per user, its target s[n-2] (valid) or s[n-1] (test). Returns (target_at, history_lengths)."""
    if split not in ("valid", "test"):
        raise ValueError(f"split is 'valid' or 'test', not {split!r}")
    history_length = lengths - 2 if split == "valid" else lengths - 1
    return starts + history_length, history_length.clamp(max=max_len)


def gather_histories(flat, target_at, history_lengths, width):
    """(B,) target positions and history lengths -> (B, width) item ids of the histories, right-padded with 0."""
    offsets = torch.arange(width, device=flat.device)                      # (width,)
    index = target_at[:, None] - history_lengths[:, None] + offsets        # (B, width)
    real = offsets < history_lengths[:, None]
    return flat[torch.where(real, index, 0)]                               # flat[0] == 0: padding


def training_item_codes(flat, starts, lengths, num_items):
    """Sorted codes user * (N + 1) + item of each user's training items s[:n-2] (sample_negatives looks them up)."""
    users = torch.repeat_interleave(torch.arange(len(lengths), device=flat.device), lengths - 2)
    first = torch.cumsum(lengths - 2, 0) - (lengths - 2)
    position = torch.arange(len(users), device=flat.device) - first[users]
    items = flat[starts[users] + position]
    return torch.unique(users * (num_items + 1) + items)                   # unique() also sorts


def sample_negatives(owners, avoided, num_items, generator):
    """One negative item id per example, uniform over 1..N but never an item its owner avoids; `avoided` are the sorted
    codes owner * (N + 1) + item of those (owner, item) pairs. By default (spec §2) an example's owner is its user
    and `avoided` training_item_codes(): never a training item of the user. The paper's j is any item "unobserved"
    by u; the user's validation and test items stay drawable, because excluding them would let held-out data shape
    training (spec §2). (training_data's "any" makes each example its own owner). Vectorised rejection sampling:
    only the rejected slots are redrawn, until none is left."""
    negatives = torch.randint(1, num_items + 1, owners.shape, device=owners.device, generator=generator)
    while True:
        query = owners * (num_items + 1) + negatives
        at = torch.searchsorted(avoided, query).clamp(max=len(avoided) - 1)   # clamp: a query past the last code
        found = avoided[at] == query
        if not found.any():
            return negatives
        negatives[found] = torch.randint(1, num_items + 1, (int(found.sum()),), device=owners.device,
                                         generator=generator)


class TrainingData(NamedTuple):
    """What every epoch needs, on the training device. E examples, example e being history -> positive."""
    flat: torch.Tensor               # all users' items, flat[0] = 0 (padding)
    target_at: torch.Tensor          # (E,) example e's positive is flat[target_at[e]], its history the items before
    history_lengths: torch.Tensor    # (E,) history lengths, at most max_len
    users: torch.Tensor              # (E,) the user of each example
    owners: torch.Tensor             # (E,) whose items an example's negative avoids (sample_negatives)
    avoided: torch.Tensor            # sorted codes owner * (N + 1) + item: each (owner, item) a negative avoids
    num_items: int                   # N
    window_ends: Optional[torch.Tensor] = None  # (W,) examples="users" only: the example ending each window
                                                # (user_windows, part 5)
    widest: int = 0                  # the longest history (and window): the packed rows' width


def training_data(flat, starts, lengths, num_items, max_len, negatives_from="unseen", examples="prefixes"):
    """TrainingData of every user's training part; a DataError when a user leaves no item to draw as a negative.
    negatives_from (Config.negatives): "unseen", none of the user's training items (spec §2); "any", any item but
    the example's own positive, as RecBole and the authors' production code (jovis-model's L2Rec, an archive that
    does not run as published; shared/docs/anchors.md §3) draw them (the user's other items included).
    examples: "users" adds the per-user regime's windows (part 5)."""
    target_at, history_lengths, users = training_examples(starts, lengths, max_len)
    windows = user_windows(users, len(lengths), max_len) if examples == "users" else None
    if not len(target_at):
        raise DataError("no user has more than 3 items, so there is no training example (the last two items of each "
                        "user are held out, and the first has no history)")
    if negatives_from == "any":                # owner: the example itself; one code each, in order, so sorted
        owners = torch.arange(len(target_at), device=flat.device)
        return TrainingData(flat, target_at, history_lengths, users, owners, owners * (num_items + 1) +
                            flat[target_at], num_items, windows, int(history_lengths.max()))
    if negatives_from != "unseen":
        raise ValueError(f"negatives are 'unseen' or 'any', not {negatives_from!r}")
    avoided = training_item_codes(flat, starts, lengths, num_items)
    full_users = (torch.bincount(avoided // (num_items + 1), minlength=len(lengths)) == num_items).nonzero()
    if len(full_users):
        raise DataError(f"user on line {int(full_users[0]) + 1} has every item in training: no negative can be drawn")
    return TrainingData(flat, target_at, history_lengths, users, users, avoided, num_items, windows,
                        int(history_lengths.max()))


# =============================================================================================================
# 2. Backbones (paper §2, §5.1): item ids in, one vector h'_u per history out, one item table for inputs and scoring
# =============================================================================================================

# Every embedding table (items, SASRec's positions, Caser's users and output items) starts with std 0.02, as in
# S3-Rec and BERT: small vectors turn quickly under Adam, and learning was faster than from std 1/sqrt(d) (0.125 at
# d = 64; docs/measurements.md). Every other layer keeps torch's default initialization.
EMBEDDING_INIT_STD = 0.02


def item_table(num_items, dim):
    """An (N + 1, d) embedding of the item ids, row 0 (padding) zero and never trained."""
    table = nn.Embedding(num_items + 1, dim, padding_idx=0)
    nn.init.normal_(table.weight, std=EMBEDDING_INIT_STD)
    with torch.no_grad():
        table.weight[0].zero_()
    return table


class Backbone(nn.Module):
    """The contract: `items` is the (N + 1, d) item table (row 0 padding, kept at zero); `encode(histories, users)`
    maps (B, T) right-padded item ids to (B, d) history vectors, the same however far a history is padded. Only a
    Caser with a user embedding reads `users` (B,), the histories' user ids; the others take them so that every
    backbone is called alike. `output_items()` is the table items are scored with: the input table, but for a
    Caser with its own output table."""

    # Whether encode() also takes `item_vectors`, its histories' item vectors looked up already: part 5's length
    # groups then look up every group's items at once (speed only). SequenceBackbone's do; Caser's does not.
    takes_item_vectors = False

    def __init__(self, num_items, dim):
        super().__init__()
        self.items = item_table(num_items, dim)

    def encode(self, histories, users=None):
        """(B, T) right-padded item ids (and, for a Caser with a user embedding, (B,) user ids) -> (B, d)."""
        raise NotImplementedError("each backbone encodes its own way")

    def output_items(self):
        return self.items


class Dropout(nn.Dropout):
    """Speed only: nn.Dropout's inverted dropout, the mask drawn by comparing uniform numbers, faster on CPU than
    torch's Bernoulli sampler (docs/measurements.md). With `from_bits` (train() sets it on every Dropout when the
    packed path of part 5 is on) the mask comes from random 16-bit integers instead, four to a random 64-bit
    word: fewer random draws, and p is rounded to a multiple of 2**-16 (0.5 exactly). The default path keeps its
    uniform numbers: other draws there would change every seeded run's numbers."""

    from_bits = False

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if self.from_bits:
            return x * (random_keep(x.shape, self.p, x.device) * (1 / (1 - self.p)))
        return x * torch.rand_like(x).ge_(self.p).div_(1 - self.p)         # kept: 1 / (1 - p), dropped: 0


def random_keep(shape, p, device):
    """A bool tensor of `shape`, each entry True with probability 1 - p (p rounded to a multiple of 2**-16): each
    random 64-bit word is read as four int16 values, compared with a threshold."""
    if torch.device(device).type not in ("cpu", "cuda"):                  # MPS: 64-bit random words not promised
        return torch.rand(shape, device=device) >= p
    count = 1
    for size in shape:
        count *= size
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)  # all 64 bits
    # int16 is signed, uniform over -2**15 .. 2**15 - 1: P(value >= round(p * 2**16) - 2**15) is 1 - p, rounded
    return words.view(torch.int16)[:count].view(shape) >= round(p * 2 ** 16) - 2 ** 15


def last_real_state(states, histories):
    """(B, T, d) per-position states -> (B, d) state at each history's last real (non-padding) position."""
    last = (histories > 0).sum(1) - 1                                      # (B,)
    return states[torch.arange(len(states), device=states.device), last]


class SequenceBackbone(Backbone):
    """GRU4Rec and SASRec: the history vector is the state at the last real position. `item_vectors`, when given,
    is self.items(histories) looked up already: the length groups of part 5 look up all their groups at once."""

    takes_item_vectors = True

    def encode(self, histories, users=None, item_vectors=None):             # (B, T) item ids -> (B, d)
        x = self.items(histories) if item_vectors is None else item_vectors   # (B, T, d)
        return last_real_state(self.sequence_states(x, histories), histories)

    def sequence_states(self, x, histories):
        """(B, T, d) item vectors of the (B, T) right-padded histories -> (B, T, d) a state per position, each
        computed from its own and earlier positions only (so padding, which comes after, changes no real state)."""
        raise NotImplementedError("GRU4Rec and SASRec each compute their states")


class GRU4Rec(SequenceBackbone):
    """Hidasi et al.: item embedding, dropout, a GRU; the history vector is the state after the last item."""

    def __init__(self, num_items, dim=64, layers=1, dropout=0.5):
        super().__init__(num_items, dim)
        self.dropout = Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)

    def sequence_states(self, x, histories):                                # (B, T, d) item vectors -> (B, T, d)
        return self.gru(self.dropout(x))[0]                                # right padding comes after every real state


class Caser(Backbone):
    """Tang & Wang: the last L item vectors as an L x d "image"; vertical (L x 1) and horizontal convolutions (h x d,
    h = 1..L, max-pooled over time); dropout; a fully connected layer to d with the original's ReLU. Three switches,
    each at Config's default unless set. Two restore features of the original that we leave out: its user embedding
    (`num_users` > 0; joined by a second layer, RecBole's form, so vectors stay d-wide), because the paper's eq. 1
    scores a history vector alone; and its output item table W2 (`output_table`), because spec §3 (the paper is
    silent) uses one item table for inputs and scoring. The third departs from the original: activation "none"
    drops the ReLU of the fully connected layer (the horizontal convolutions keep theirs). docs/decisions.md
    measures all three against the original."""

    def __init__(self, num_items, dim=64, dropout=0.5, window=5, vertical_filters=4, horizontal_filters=16,
                 activation="relu", num_users=0, output_table=False):
        super().__init__(num_items, dim)
        self.window = window
        self.vertical = nn.Conv2d(1, vertical_filters, (window, 1))
        self.horizontal = nn.ModuleList(nn.Conv2d(1, horizontal_filters, (h, dim)) for h in range(1, window + 1))
        self.dropout = Dropout(dropout)
        self.project = nn.Linear(vertical_filters * dim + horizontal_filters * window, dim)
        self.activation = nn.ReLU() if activation == "relu" else nn.Identity()
        self.user_table = self.join_user = self.scored_items = None           # the switches' parts, when off
        if num_users:
            self.user_table = nn.Embedding(num_users, dim)
            nn.init.normal_(self.user_table.weight, std=EMBEDDING_INIT_STD)
            self.join_user = nn.Linear(2 * dim, dim)
        if output_table:
            self.scored_items = item_table(num_items, dim)

    def output_items(self):
        return self.items if self.scored_items is None else self.scored_items

    def last_items(self, histories):
        """(B, T) right-padded -> (B, L) the last L items, left-padded with 0 when the history is shorter."""
        history_lengths = (histories > 0).sum(1, keepdim=True)             # (B, 1)
        index = history_lengths - self.window + torch.arange(self.window, device=histories.device)  # (B, L)
        return torch.where(index >= 0, histories.gather(1, index.clamp(min=0)), 0)

    def encode(self, histories, users=None):                                # (B, T) item ids -> (B, d)
        image = self.items(self.last_items(histories)).unsqueeze(1)        # (B, 1, L, d)
        vertical_features = self.vertical(image).flatten(1)                # (B, 4d) with 4 vertical filters
        horizontal_features = [F.relu(conv(image)).squeeze(3).amax(2) for conv in self.horizontal]  # L x (B, 16)
        z = self.activation(self.project(self.dropout(torch.cat([vertical_features, *horizontal_features], 1))))
        if self.user_table is not None:
            z = self.activation(self.join_user(torch.cat([z, self.user_table(users)], 1)))  # (B, 2d) -> (B, d)
        return z                                                           # (B, d)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position j attends to positions 0..j only. Written out rather than
    F.scaled_dot_product_attention so that the attention weights get the faster Dropout above. `context`, when
    given, is what keys and values are read from (queries from x): the original SASRec's block needs the two apart."""

    def __init__(self, dim, heads, dropout):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.dropout = Dropout(dropout)                                    # on the attention weights
        self.out = nn.Linear(dim, dim)

    def forward(self, x, blocked, context=None):                           # (B, T, d) -> (B, T, d)
        """blocked: bool, True where position i may not attend to position j: (T, T) the causal mask's future, or
        (B, 1, T, T) when each row has a mask of its own (the packed path of part 5, where other histories of a
        row are blocked too). context: what keys and values are computed from, when not x (the original block's)."""
        B, T, d = x.shape
        h = self.heads
        if context is None:
            q, k, v = self.qkv(x).view(B, T, 3, h, d // h).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d/h)
        else:                                                              # the same weights: q's rows read x only
            weight, bias = self.qkv.weight, self.qkv.bias
            q = F.linear(x, weight[:d], bias[:d]).view(B, T, h, d // h).transpose(1, 2)           # (B, h, T, d/h)
            k, v = F.linear(context, weight[d:], bias[d:]).view(B, T, 2, h, d // h).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2) / (d // h) ** 0.5).masked_fill(blocked, float("-inf"))  # (B, h, T, T)
        y = self.dropout(scores.softmax(-1)) @ v                           # (B, h, T, d/h)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class TransformerBlock(nn.Module):
    """Attention and a point-wise feed-forward net (SASRec's: d -> d -> d with ReLU, SASRec's dropouts), each as x +
    f(LN(x)): GPT-2's pre-LayerNorm arrangement, our default (not the original SASRec's: every result on the results
    page was trained with this block, and the two blocks have not been compared yet; docs/decisions.md).
    original=True builds the original SASRec's block instead (Kang & McAuley's code, model.py and modules.py, and
    its PyTorch port pmixer/SASRec.pytorch before the port's norm_first switch): the attention's queries are LN(x)
    while its keys and values come from the unnormalized x, and each residual adds the normalized input, LN(x) +
    f(...): y = LN(x) + attention(LN(x), x), then LN(y) + feed_forward(LN(y)). (Kang's TensorFlow code also zeroes
    padded positions after each block and has no output projection after the heads; neither is copied: under right
    padding and the causal mask no real position reads a padded one, and the projection is kept so that both blocks
    have the same weights.)
    Dropout where the original has it: on the attention weights and twice in the feed-forward net, not on the
    attention's output (one more there slowed learning; docs/measurements.md)."""

    def __init__(self, dim, heads, dropout, original=False):
        super().__init__()
        self.original = original
        self.attention_norm, self.attention = nn.LayerNorm(dim), CausalSelfAttention(dim, heads, dropout)
        self.feed_forward_norm = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), Dropout(dropout), nn.Linear(dim, dim),
                                          Dropout(dropout))

    def forward(self, x, blocked):                                          # (B, T, d) -> (B, T, d)
        if self.original:                                                  # SASRec's: LN(x) + f(LN(x), x)
            queries = self.attention_norm(x)
            x = self.feed_forward_norm(queries + self.attention(queries, blocked, context=x))
            return x + self.feed_forward(x)
        x = x + self.attention(self.attention_norm(x), blocked)
        return x + self.feed_forward(self.feed_forward_norm(x))


class SASRec(SequenceBackbone):
    """Kang & McAuley: item vectors times sqrt(d) (the original's) plus learned position embeddings, causal
    self-attention blocks, a final LayerNorm, the output at the last real position. Positions count back from the
    most recent item (0), so padding never changes a history's meaning; under the causal mask a real position sees
    only real items. block: "pre-ln" (GPT-2's, the default) or "original" (SASRec's own; see TransformerBlock)."""

    def __init__(self, num_items, dim=64, layers=2, heads=2, dropout=0.5, max_len=50, block="pre-ln"):
        super().__init__(num_items, dim)
        self.scale = dim ** 0.5
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.positions.weight, std=EMBEDDING_INIT_STD)
        self.dropout = Dropout(dropout)
        if block not in ("pre-ln", "original"):
            raise ValueError(f"block is 'pre-ln' or 'original', not {block!r}")
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, dropout, original=block == "original")
                                    for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)

    def sequence_states(self, x, histories):                                # (B, T, d) item vectors -> (B, T, d)
        T = histories.shape[1]
        history_lengths = (histories > 0).sum(1, keepdim=True)             # (B, 1)
        steps_back = (history_lengths - 1 - torch.arange(T, device=histories.device)).clamp(min=0)  # (B, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # [i, j] = j > i
        return self.states(x, steps_back, future)

    def states(self, x, steps_back, blocked):
        """(B, T, d) item vectors, (B, T) each position's steps back from its history's last item, and the attention
        mask `blocked` (CausalSelfAttention) -> (B, T, d) states."""
        x = self.dropout(x * self.scale + self.positions(steps_back))      # (B, T, d)
        for block in self.blocks:
            x = block(x, blocked)
        return self.final_norm(x)


def build_model(config, num_items, num_users, max_len):
    """The backbone a run's configuration names, freshly initialized (the caller seeds torch first)."""
    if config["model"] == "gru4rec":
        return GRU4Rec(num_items, config["dim"], config["layers"], config["dropout"])
    if config["model"] == "caser":
        return Caser(num_items, config["dim"], config["dropout"], window=config["caser_window"],
                     activation=config["caser_activation"], num_users=num_users if config["caser_users"] else 0,
                     output_table=config["caser_output_table"])
    if config["model"] == "sasrec":
        return SASRec(num_items, config["dim"], config["layers"], config["heads"], config["dropout"], max_len,
                      config.get("block", "pre-ln"))                     # run folders from before --block have none
    raise ValueError(f"unknown model {config['model']!r}")


# =============================================================================================================
# 3. Scores and losses (paper §2-§4, eqs. 1-6; spec §4)
# =============================================================================================================
#
# Eq. 1 scores a history and an item by the dot product of their vectors; on unit vectors (eq. 3) that is their
# cosine. Every loss sums over the batch (no mean), as the paper writes them. `score`, `score_all`, the paper's four
# losses, `ce_loss` (a fifth, beyond the paper: softmax over every item) and `gaussian_potential` need only `import
# torch` (hence torch.nn.functional spelled out), so that they can be copied into another project alone; what to
# know before using uniformity_loss elsewhere is in its docstring.


def score(h, items, cosine=False):
    """Eq. 1: h . i, or with cosine=True their cosine (eq. 3). (h * items).sum(-1) as the product broadcasts:
    (B, d), (B, d) -> (B,); (B, 1, d), (B, K, d) -> (B, K), K items per history; (B, 1, d), (M, d) -> (B, M), the
    same M items for every history, which score_all computes."""
    if h.dim() == 3 and h.shape[1] == 1 and items.dim() == 2:                # (B, 1, d), (M, d): one matrix product,
        return score_all(h[:, 0], items, cosine)                             # never a (B, M, d) tensor
    if cosine:
        h, items = torch.nn.functional.normalize(h, dim=-1), torch.nn.functional.normalize(items, dim=-1)
    return (h * items).sum(-1)


def score_all(h, items, cosine=False, out=None):
    """Eq. 1 (or eq. 3) of every history with every one of the same M items: (B, d), (M, d) -> (B, M), as score()
    of (B, 1, d) and (M, d) would broadcast it, but one matrix product (never a (B, M, d) tensor), written into
    `out` when given: evaluation reuses one (B, M) tensor rather than allocate one per batch (docs/measurements.md)."""
    if cosine:
        h, items = torch.nn.functional.normalize(h, dim=-1), torch.nn.functional.normalize(items, dim=-1)
    return torch.matmul(h, items.T, out=out)                                 # (B, M)


def bce_loss(positive_scores, negative_scores):
    """Eq. 2: -sum_b [ log sigmoid(s_ui) + log(1 - sigmoid(s_uj)) ].  (B,), (B,) -> scalar."""
    logsigmoid = torch.nn.functional.logsigmoid
    return -(logsigmoid(positive_scores) + logsigmoid(-negative_scores)).sum()  # log(1 - sigmoid(s)) = logsigmoid(-s)


def bpr_loss(positive_scores, negative_scores):
    """BPR (Rendle et al.): -sum_b log sigmoid(s_ui - s_uj).  (B,), (B,) -> scalar."""
    return -torch.nn.functional.logsigmoid(positive_scores - negative_scores).sum()


def infonce_loss(positive_scores, negative_scores, same_item):
    """InfoNCE (van den Oord et al.), temperature 1: each history's positive against its K negatives.
    positive_scores (B,); negative_scores (B, K), history b's score for its k-th negative; same_item (B, K) bool,
    True where that negative is b's positive (dropped). With K = 1 it is BPR, -log(e^p / (e^p + e^n)), but for a
    negative that is the positive (then 0)."""
    logits = torch.cat([positive_scores[:, None], negative_scores.masked_fill(same_item, float("-inf"))], 1)  # (B, 1+K)
    return -torch.log_softmax(logits, 1)[:, 0].sum()


def ce_loss(all_scores, positives):
    """Beyond the paper: full-softmax cross-entropy, each history's positive against every item, temperature 1:
    sum_b [ log sum_{n=1..N} e^{s_bn} - s_b,pos ].  all_scores (B, N + 1), history b's score for every id, column 0
    the padding id (never a class: left out of the softmax); positives (B,) item ids in 1..N -> scalar.
    Here because it is what practitioners train SASRec with: RecBole's SASRec default (loss_type "CE"; unlike ours,
    its softmax keeps the padding id as a class, of score 0), and Klenitskiy & Vasilev (RecSys 2023, "Turning Dross
    Into Gold Loss") found it lifts SASRec far above its BCE form. It needs no sampled negatives, but B x N logits
    and their gradient (256 x 20,033 on Yelp)."""
    return (torch.logsumexp(all_scores[:, 1:], 1) - all_scores.gather(1, positives[:, None])[:, 0]).sum()


def gaussian_potential(x, y, t=2.0):
    """G(x, y) = exp(-t ||x - y||^2) for every pair of rows: (n, d), (m, d) -> (n, m). The kernel of eqs. 4-5.
    cdist never builds the (n, m, d) differences; its gradient stays finite at distance 0, where an item appears
    twice in a batch (tested)."""
    return torch.exp(-t * torch.cdist(x, y).square())


def uniformity_loss(h, i, j, beta=0.05, t=2.0, *, normalize=True, rec=True, hom=True, het=True):
    """Eq. 6 with beta1 = beta2 = beta:  L = L_rec + beta * L_hom + beta * L_het.

    h, i, j: (B, d) vectors of the histories, positives and negatives of a batch of triplets (u, i, j); the keywords
    switch parts off for Table 2's ablation (normalize=False scores and regularises the raw vectors).
      L_rec  eq. 2 on cosines: BCE of each history's score for its positive and for its negative, no temperature.
      L_hom  eq. 4: G summed over unordered pairs of the B histories, plus over unordered pairs of the 2B items D_I
             (positives and negatives together); an item twice in a batch is two slots.
      L_het  eq. 5: G summed over all B x B pairs (history, negative), each history's own negative included.
    Worth knowing before using it elsewhere:
    - Eq. 4's sum over x, y is read as unordered pairs of distinct slots, as the authors' code computes it
      (torch.pdist: each pair once, no diagonal; spec §4, shared/docs/anchors.md §3). Read literally, over ordered
      pairs with self-pairs, it would be 2 * L_hom + 3B (each self-pair exp(0) = 1, a constant): the same optimum,
      with the gradients of 2 * beta.
    - The authors' code (their production code, jovis-model's L2Rec: an archive that does not run as published, a
      statement of intent) sums L_hom over the positives and over the negatives as two sets (about 3B^2/2 pairs,
      against 5B^2/2 here): the same beta weighs L_hom more here.
    - L_rec has 2B terms, L_hom about 5B^2/2, L_het B^2: beta's weight grows with B (the paper's 0.05 is for B = 256).
    - Rank a model trained on cosines by cosines: the loss sees only the directions of h, i and j, so their lengths
      carry nothing it trained for ranking (an item row's length matters only as an encoder input).
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
    """(B, K) batch slots of each history's InfoNCE negatives: its own, then the next K - 1 (cyclically). Every
    slot's negative is an independent uniform draw, so these are K random negatives whatever the slots' order, but
    for one thing: each was drawn to avoid its own example's user's training items, so another slot's may be one of
    this user's (only a candidate equal to the positive is masked, spec §4), and which users' items the K avoid
    depends on the order: after length groups sort a batch, a history's next K - 1 slots hold examples of similar
    history lengths (in the per-user regime, often the same user's other prefixes), not a random mix of users. With
    the default K = B the order does not matter."""
    return (torch.arange(batch_size, device=device)[:, None] + torch.arange(k, device=device)) % batch_size


def batch_loss(model, h, positives, negatives, config):
    """The configured loss of one batch of triplets: h (B, d) history vectors; positives, negatives (B,) item ids
    (CE reads no negatives: it scores every item)."""
    if config["loss"] == "ce":                                               # (B, N + 1): one matrix product
        return ce_loss(score_all(h, model.output_items().weight), positives)
    i, j = model.output_items()(torch.cat([positives, negatives])).chunk(2)  # (B, d) each; one lookup, one gradient
    if config["loss"] == "uniform":
        return uniformity_loss(h, i, j, config["beta"], config["t"], normalize=config["normalize"],
                               rec=config["rec"], hom=config["hom"], het=config["het"])
    if config["loss"] == "bce":                                              # eq. 1 on raw vectors from here on
        return bce_loss(score(h, i), score(h, j))
    if config["loss"] == "bpr":
        return bpr_loss(score(h, i), score(h, j))
    if config["loss"] != "infonce":
        raise ValueError(f"unknown loss {config['loss']!r}")
    k = config["infonce_negatives"]
    if k is None or k >= len(h):                                             # all B negatives of the batch: (B, B)
        return infonce_loss(score(h, i), score_all(h, j), positives[:, None] == negatives[None, :])
    chosen = infonce_candidates(len(h), k, h.device)                         # (B, K) batch slots
    return infonce_loss(score(h, i), score(h[:, None], j[chosen]), positives[:, None] == negatives[chosen])


def scores_are_cosines(config):
    """Whether ranking scores cosines: where training did, with the uniformity loss (eq. 3; uniformity_loss
    normalizes its inputs), unless row (g) of Table 2 ablates its normalization."""
    return config["loss"] == "uniform" and config["normalize"]


# =============================================================================================================
# 4. Evaluation (paper §5.1; spec §5): rank the target against every item, for ALL users
# =============================================================================================================
#
# The paper ranks "the entire item pool" and does not say whether the items of the user's history take part. Both
# protocols are computed from one scoring pass:
# - "all_items": every item ranked.
# - "history_excluded": the items of the history given to encode() (its last max_len items, even for Caser, which
#   reads only its last L) are scored -inf first, so a target that repeats one of them can never be a hit.
#   S3-Rec's code instead sets the scores of all of the user's earlier items to 0: the same items but for the few
#   histories longer than max_len, and a score of 0 can still rank above items that score below 0.
# Training's early stopping, and the `test` and `valid` that train() returns, use every item ranked unless
# mask_seen: the README says why every item ranked is the protocol the evidence favours as the paper's.
PROTOCOLS = {"all_items": False, "history_excluded": True}                 # name -> mask_seen


def rank_of_targets(scores, targets):
    """Number of items other than the target scoring >= the target (ties count against it): (B, N+1), (B,) -> (B,).
    A target masked to -inf cannot be recommended: its rank is inf, never a hit. In float32, which every device has
    (MPS has no float64), and exact for up to 2**24 items. Overwrites `scores` with the comparison (1.0 where an item
    scores >= the target), for speed: no new tensor to allocate and sum (docs/measurements.md)."""
    target_scores = scores.gather(1, targets[:, None])                      # (B, 1)
    ranks = scores.ge_(target_scores).sum(1) - 1                            # minus the target itself
    return ranks.masked_fill(target_scores[:, 0] == float("-inf"), float("inf"))


def metrics_from_ranks(ranks, ks=(5, 10, 20)):
    """HR@K = [rank < K], NDCG@K = [rank < K] / log2(rank + 2), averaged over users; on the host (float64)."""
    ranks = ranks.cpu().double()
    result = {}
    for k in ks:
        hit = ranks < k
        result[f"HR@{k}"] = hit.double().mean().item()
        result[f"NDCG@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2.0), 0.0).mean().item()
    return result


def evaluation_batches(flat, starts, lengths, max_len, split, batch_size=1024):
    """The fixed (histories, users, targets) batches of one split, users sorted by history length (little padding)."""
    target_at, history_lengths = evaluation_examples(starts, lengths, max_len, split)
    order = torch.argsort(history_lengths, stable=True)                    # user ids, shortest history first
    batches = []
    for users in order.split(batch_size):
        width = int(history_lengths[users].max())
        batches.append((gather_histories(flat, target_at[users], history_lengths[users], width), users,
                        flat[target_at[users]]))
    return batches


@torch.no_grad()
def target_ranks(model, batches, cosine, masks=(False,)):
    """Every user's target rank in the batches' order, one (U,) tensor per entry of `masks` (True: the history's
    items score -inf), from one scoring pass by `score_all` (cosines where training scored cosines)."""
    was_training = model.training
    model.eval()
    table = model.output_items().weight                                     # (N + 1, d)
    ranks, all_finite = [[] for _ in masks], True                           # ranks[m]: each batch's, under masks[m]
    buffer = table.new_empty(max(len(histories) for histories, _, _ in batches), len(table))
    for histories, users, targets in batches:
        scores = score_all(model.encode(histories, users=users), table, cosine, out=buffer[:len(histories)])
        low, high = torch.aminmax(scores)                                   # a NaN or an inf anywhere reaches these;
        all_finite = all_finite & torch.isfinite(low) & torch.isfinite(high)  # read once at the end: no sync here
        scores[:, 0] = float("-inf")                                        # padding is no item
        # every masked copy is made before rank_of_targets overwrites `scores` (and each copy) with its comparison
        by_mask = {mask: scores.scatter(1, histories, float("-inf")) if mask else scores for mask in set(masks)}
        by_mask = {mask: rank_of_targets(each, targets) for mask, each in by_mask.items()}
        for ranks_under_mask, mask in zip(ranks, masks):
            ranks_under_mask.append(by_mask[mask])
    model.train(was_training)
    if not bool(all_finite):
        raise FloatingPointError("the model produced non-finite scores during evaluation")
    return [torch.cat(ranks_under_mask) for ranks_under_mask in ranks]


def evaluate(model, batches, cosine, mask_seen=False):
    """HR@5/10/20 and NDCG@5/10/20 over the given batches; mask_seen: the history's items excluded."""
    return metrics_from_ranks(target_ranks(model, batches, cosine, (mask_seen,))[0])


def evaluate_protocols(model, batches, cosine):
    """evaluate() under each of the PROTOCOLS, from one scoring pass: {protocol name: metrics}."""
    ranks = target_ranks(model, batches, cosine, tuple(PROTOCOLS.values()))
    return {name: metrics_from_ranks(protocol_ranks) for name, protocol_ranks in zip(PROTOCOLS, ranks)}


# =============================================================================================================
# 5. Training (paper appendix B; spec §6): batches of triplets, early stopping, the best state tested once
# =============================================================================================================
#
# Appendix B names the batch (256), the history length (50), dropout (0.5), the grids, and early stopping when
# validation "does not improve for more than 20 epochs" (ours stops at the 20th); no optimizer and no validation
# metric: Adam and NDCG@10 are ours.

# The number of layers of each backbone's original (Kang & McAuley: 2 blocks; Hidasi et al.: 1 GRU layer). Caser
# has no such depth; its value is only recorded. Its names are the backbones there are: Config refuses any other
# model.
ORIGINAL_LAYERS = {"sasrec": 2, "gru4rec": 1, "caser": 1}


@dataclass
class Config:
    """Every setting the method reads, with the paper's defaults (appendix B). Config() is the README's command with
    no flag: runs.py's parser takes its defaults from here, and each flag sets the field of its name (--max-len sets
    max_len). Where the paper names a grid, the default is a point of it: lr 3e-4, d 64, 2 heads, beta 0.05 (its best
    in Table 3). Making a Config refuses an unknown model, pack=True but for SASRec and examples="users" for Caser
    (a field only another backbone reads is accepted and ignored), and fills in (__post_init__):
      - layers None: the original's depth (ORIGINAL_LAYERS); length_groups None: 8, and 1 for Caser;
      - device "auto": cuda, then mps, then cpu;
      - one value for a setting that can be said two ways, so that equal runs share a run folder: a GRU4Rec's or
        SASRec's caser_activation is set to "none" (those models ignore it, and "none" is what runs.py assumes for
        run folders written before the field existed), an infonce_negatives of the whole batch or more becomes None.
    runs.configure() builds the command line's configuration through a Config too: both give the same one."""
    # what to train
    model: str = "sasrec"                 # gru4rec, caser, sasrec
    loss: str = "uniform"                 # bce, bpr, infonce, uniform (the paper's eq. 6); ce (beyond the paper)
    data: str = "beauty"                  # the data's name, only for the log line (train() is given the sequences)
    # the backbone
    dim: int = 64                         # d
    layers: Optional[int] = None          # SASRec blocks, GRU4Rec GRU layers; None: the original's (ORIGINAL_LAYERS)
    heads: int = 2                        # SASRec attention heads (must divide dim)
    dropout: float = 0.5
    max_len: int = 50                     # histories keep their last max_len items
    block: str = "pre-ln"                 # SASRec: GPT-2's pre-LayerNorm arrangement, or "original" (TransformerBlock)
    caser_window: int = 5                 # Caser: the last L items it convolves
    caser_activation: str = "relu"        # Caser: the original's "relu", or "none" (docs/decisions.md)
    caser_users: bool = False             # Caser: the original's user embedding
    caser_output_table: bool = False      # Caser: an output item table of its own, as the original's W2
    # the uniformity loss (eq. 6) and its ablations (Table 2; rows (f) and (g) are rec=False and normalize=False)
    beta: float = 0.05                    # beta1 = beta2
    t: float = 2.0                        # of the Gaussian potential
    normalize: bool = True
    rec: bool = True
    hom: bool = True
    het: bool = True
    infonce_negatives: Optional[int] = None  # InfoNCE: each history's own negative and K - 1 more; None: all B
    # training
    lr: float = 3e-4                      # Adam's
    negatives: str = "unseen"             # which items a negative is drawn from: "unseen" (spec §2) or "any"
                                          # (training_data); not the (B,) `negatives` item ids of batch_loss
    batch_size: int = 256                 # triplets per batch
    epochs: int = 300                     # at most
    patience: int = 20                    # stop after this many epochs without a better validation NDCG@10
    length_groups: Optional[int] = None   # speed only (below); None: 8, and 1 for Caser
    pack: bool = False                    # SASRec's packed path, speed only (below)
    examples: str = "prefixes"            # "prefixes" (spec §2), or "users": GRU4Rec, SASRec (user_windows)
    seed: int = 42                        # every random draw follows from it
    device: str = "auto"                  # a torch device; "auto": cuda, then mps, then cpu
    # evaluation
    mask_seen: bool = False               # the history's items excluded in early stopping and in train()'s test/valid

    def __post_init__(self):
        if self.model not in ORIGINAL_LAYERS:
            raise ValueError(f"unknown model {self.model!r}: one of {', '.join(ORIGINAL_LAYERS)}")
        if self.layers is None:
            self.layers = ORIGINAL_LAYERS[self.model]
        if self.examples not in ("prefixes", "users"):
            raise ValueError(f"examples are 'prefixes' or 'users', not {self.examples!r}")
        if self.examples == "users" and self.model == "caser":
            raise ValueError("examples='users' only applies to GRU4Rec and SASRec (Caser reads only its last L items)")
        if self.pack and self.model != "sasrec":
            raise ValueError("pack=True only applies to SASRec (GRU4Rec's recurrence cannot share a row; Caser reads "
                             "only its last L items)")
        if self.length_groups is None:                   # Caser reads only its last L items: no padding to save
            self.length_groups = 1 if self.model == "caser" else 8
        # Only Caser reads caser_activation. Run folders written before the field existed are read as "none"
        # (runs.LATER_KEYS: the first Caser had no activation); GRU4Rec and SASRec, which ignore it, get that same
        # value so that identical runs match those folders.
        if self.model != "caser":
            self.caser_activation = "none"
        if self.infonce_negatives is not None and self.infonce_negatives >= self.batch_size:
            self.infonce_negatives = None                # the whole batch, as the default (one run folder for both)
        if self.device == "auto":
            self.device = auto_device()


def auto_device():
    """The device "auto" names: cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def epoch_seed(seed, epoch):
    """Every random draw of an epoch (order, negatives, dropout) follows from (seed, epoch), so a resumed run
    repeats an uninterrupted one exactly. Modulo 2**64: any seed torch takes (-2**63 .. 2**64 - 1), no overflow."""
    return (seed * 1_000_003 + epoch) % 2 ** 64


# Length groups, a speed path (the next five functions): a batch is a random set of B triplets as always, but its
# histories are sorted by length and encoded in `length_groups` groups, each padded only to its own longest. Every
# loss sums over the batch: the loss is the same (but for InfoNCE with --infonce-negatives K < B, whose K slots are
# other draws once the batch is sorted: nearly the same distribution, infonce_candidates), its float rounding and
# the dropout masks' draws are not, and far less padding is computed (docs/measurements.md).


def group_sizes(batch_size, groups):
    """Sizes of `groups` consecutive, near-equal groups of a batch (fewer when the batch is smaller)."""
    groups = min(groups, batch_size)
    return [batch_size // groups + (g < batch_size % groups) for g in range(groups)]


def epoch_batches(order, history_lengths, batch_size, groups):
    """Cut a random order into batches of `batch_size` examples, each sorted by history length and cut into `groups`
    groups. Returns [(example ids, group sizes, group widths)] with a single host-device synchronisation."""
    batches = [b[torch.argsort(history_lengths[b], stable=True)] for b in order.split(batch_size)]
    sizes = [group_sizes(len(b), groups) for b in batches]
    # a group's width is the length of its last history, its longest (each batch is sorted by length)
    last_of_group = torch.tensor([start + sum(s[:g + 1]) - 1 for start, s in
                                  zip(range(0, len(order), batch_size), sizes) for g in range(len(s))])
    widths = iter(history_lengths[torch.cat(batches)[last_of_group.to(order.device)]].tolist())
    return [(b, s, [next(widths) for _ in s]) for b, s in zip(batches, sizes)]


def encode_batch(model, flat, target_at, history_lengths, sizes, widths, users=None):
    """History vectors (B, d) of a length-sorted batch, group by group through model.encode. A sequence model gets
    all groups' item vectors from one lookup (each lookup's gradient is a whole (N + 1, d) table); Caser reads only
    its last L items and looks up its own."""
    groups = group_histories(flat, target_at, history_lengths, sizes, widths)
    group_users = [None] * len(groups) if users is None else users.split(sizes)
    if not model.takes_item_vectors:
        return torch.cat([model.encode(group, users=u) for group, u in zip(groups, group_users)])
    return torch.cat([model.encode(group, users=u, item_vectors=x)
                      for group, u, x in zip(groups, group_users, group_item_vectors(model, groups))])


def group_histories(flat, target_at, history_lengths, sizes, widths):
    """The G groups of a length-sorted batch as (B_g, T_g) right-padded item ids, group g padded to widths[g]."""
    return [gather_histories(flat, group_at, group_lengths, width) for group_at, group_lengths, width
            in zip(target_at.split(sizes), history_lengths.split(sizes), widths)]


def group_item_vectors(model, groups):
    """Each group's (B_g, T_g, d) item vectors from one lookup: each lookup's gradient is a whole (N + 1, d) table."""
    vectors = model.items(torch.cat([group.flatten() for group in groups])).split([g.numel() for g in groups])
    return [x.view(*group.shape, -1) for group, x in zip(groups, vectors)]


# Packing, a speed path for SASRec (--pack; the next five functions): a batch is the same random set of B triplets,
# but its histories are laid end to end in rows of `width` cells, several short ones to a row, and each position
# attends only to the positions of its own history before it. Nothing is padded but the few cells a history leaves
# of its slot, all of the batch is one pass through the blocks (length groups cost a pass each), and the loss is
# the same; its float rounding and the dropout masks' draws are not (docs/performance.md, "Against the bound").


def slot_sizes(width):
    """The slot sizes a row of `width` cells may be cut into, ascending: width // k for k = 1 .. width, so that a
    row of slots of size s holds width // s of them and a history of length l takes the smallest s >= l."""
    return sorted({width // k for k in range(1, width + 1)})


def packed_batches(order, history_lengths, batch_size, width):
    """Cut a random order into batches of `batch_size` examples and give each example's history a slot in its
    batch's rows of `width` cells, each row holding slots of one size. Returns [(example ids, first cells, rows)]:
    example b's history fills cells first[b] .. first[b] + length - 1 of the batch's rows * width cells, counted row
    by row. A single host-device synchronisation."""
    position = torch.arange(len(order), device=order.device)
    first, rows = packed_slots(position // batch_size, history_lengths[order], -(-len(order) // batch_size), width)
    return list(zip(order.split(batch_size), first.split(batch_size), rows.sum(1).tolist()))


def packed_slots(batch_index, history_lengths, num_batches, width):
    """The slots of H histories of `history_lengths` (H,), history h in batch batch_index[h] (ascending, 0 ..
    num_batches - 1), in rows of `width` cells, each row holding slots of one size: returns (first, rows): first (H,)
    each history's first cell, counted row by row from its batch's first row; rows (num_batches, slot sizes) the rows
    of each size in each batch."""
    device = history_lengths.device
    sizes = torch.tensor(slot_sizes(width), device=device)
    per_row = width // sizes                                               # slots in a row of each size
    position = torch.arange(len(history_lengths), device=device)
    size_index = torch.searchsorted(sizes, history_lengths)                # each history's slot size, as an index
    group = batch_index * len(sizes) + size_index                          # its (batch, slot size) as one number
    group_count = torch.bincount(group, minlength=num_batches * len(sizes))
    by_group = torch.argsort(group, stable=True)
    nth = torch.empty_like(group)                                          # its place among its group's histories
    nth[by_group] = position - (torch.cumsum(group_count, 0) - group_count)[group[by_group]]
    rows = (group_count.view(-1, len(sizes)) + per_row - 1) // per_row     # (num_batches, sizes) rows of each size
    first_row = (torch.cumsum(rows, 1) - rows).flatten()[group] + nth // per_row[size_index]
    return first_row * width + nth % per_row[size_index] * sizes[size_index], rows


def encode_packed(model, flat, target_at, history_lengths, first, rows, width):
    """History vectors (B, d) of one packed batch (packed_batches) through a SASRec: each cell's item and steps
    back, and an attention mask that keeps every position within its own history, causally."""
    states = packed_states(model, flat, target_at, history_lengths, first, rows, width)
    return states[first + history_lengths - 1]                             # each history's last position


def packed_states(model, flat, target_at, history_lengths, first, rows, width):
    """(rows * width, d) the SASRec states of every cell of one packed batch, row by row (encode_packed)."""
    cells = torch.arange(rows * width, device=flat.device)
    # a cell's slot starts at the last first cell at or before it in its row (cummax); owner: that slot's example
    slot_start = torch.full_like(cells, -1).index_put_((first,), first).view(rows, width).cummax(1).values.flatten()
    owner = torch.zeros_like(cells).index_put_((first,), torch.arange(len(first), device=flat.device))[slot_start]
    within = cells - slot_start                                            # offset in its slot (a row starts one)
    length = history_lengths[owner]
    real = within < length                                                 # the rest of a slot is padding
    cell_items = flat[torch.where(real, target_at[owner] - length + within, 0)].view(rows, width)  # flat[0] == 0
    steps_back = (length - 1 - within).clamp(min=0).view(rows, width)
    # each cell's example; padding -1, an owner of its own: it sees itself, so no softmax row is all -inf (NaN)
    cell_owner = torch.where(real, owner, -1).view(rows, width)
    future = torch.ones(width, width, dtype=torch.bool, device=flat.device).triu(1)
    blocked = (cell_owner[:, :, None] != cell_owner[:, None, :]) | future   # (rows, width, width)
    states = model.states(model.items(cell_items), steps_back, blocked[:, None])  # (rows, width, d)
    return states.flatten(0, 1)


# The per-user regime (--examples users; the next three functions), beyond the paper and not used by any result
# on the results page: spec §2 admits "all
# prefixes of a user in one causal pass" only once a side-by-side run shows validation metrics unchanged, and that
# comparison has not been made yet (README, "Train"); a first read can skip to train_epoch. A user's training
# part s[0 .. n-3] is read once, inputs s[0 .. n-4], and the state at every input position p is a history vector,
# its positive s[p + 1]: the same (history, positive) pairs as the prefixes t = 1 .. n-3, each once an epoch, each
# with its own negative (drawn per example as in the per-prefix regime), the loss summed over a batch's triplets by
# the same loss functions. What changes:
# - A user with more than max_len inputs (n - 3 > max_len) is cut into windows of max_len consecutive inputs,
#   counted back from its last one: the last window is the original SASRec's input (its last max_len items), the
#   first may be shorter, and every prefix is still trained once an epoch. A state sees only its own window's
#   earlier items: prefix t's history is s[:t] cut at its window's start, so up to max_len items but as few as one
#   at a later window's start, where the per-prefix example has the last max_len (on Beauty 127 users, 0.6%, have
#   more than one window; 7,301 of the 131,413 examples, 5.6%, see fewer items than per-prefix). The alternative,
#   the original's last max_len inputs only, would drop 3,382 examples (2.6%) from every epoch.
# - A window is exactly the history of the example at its end (its history lengths are the window's), so the
#   windows are those examples, and a window's states come from the same code as a history's: packed rows (--pack)
#   or length groups, every real position's state read instead of only the last.
# - SASRec's positions count back from the window's last input, which gets position 0. The per-prefix regime and
#   evaluation read only position 0 (a history's last item), so training and evaluation share one position table
#   and one convention. The original SASRec counts the same way (its input left-padded to max_len, positions
#   absolute in the padded row). An earlier state is read while the later positions of its window exist: under the
#   causal mask it never sees a later item (their ids, vectors, or anything computed from them), but its own items'
#   positions count back from the window's end, so they carry how many inputs of the window come after it (their
#   number, never which). Its vector therefore differs from the per-prefix vector of the same history by the
#   position vectors only (tested: equal with the position table zeroed). GRU4Rec has no positions: its state is
#   the per-prefix vector itself, within the window.
# - A batch is whole windows in a random order; a window whose triplets would cross the next multiple of
#   batch_size opens the next batch: about batch_size triplets (the paper's batch of triplets, between
#   batch_size - max_len + 1 and batch_size + max_len - 1) and about as many steps an epoch as per-prefix. The
#   triplets of one user share the batch and one dropout mask per input position, so the in-batch terms change
#   too: L_hom and L_het (and InfoNCE's batch negatives) now meet one user's successive prefixes in one batch.


def user_windows(users, num_users, max_len):
    """(W,) the example ending each window of the per-user regime: each user's examples (in order) cut into windows of
    max_len, counted back from its last example. Such an example's history is its window's inputs: the first window
    has at most max_len (its end's history is all of the user's items before it), the others max_len."""
    examples_per_user = torch.bincount(users, minlength=num_users)
    first = torch.cumsum(examples_per_user, 0) - examples_per_user
    position = torch.arange(len(users), device=users.device) - first[users]      # its place among its user's examples
    later = examples_per_user[users] - 1 - position                               # its user's examples after it
    return (later % max_len == 0).nonzero().squeeze(1)


def user_batches(windows, history_lengths, batch_size, width, groups=None):
    """--examples users: cut `windows` (the examples ending them, user_windows, in a random order) into batches of
    whole windows of about `batch_size` triplets (a window belongs to the batch its last triplet falls in, so one
    that crosses a multiple of batch_size opens the next batch) and lay each batch out: packed rows of `width` cells
    (groups None; packed_slots) or each batch sorted by length and cut into `groups` length groups (as
    epoch_batches). Returns [(windows, first, examples, cells, layout)]: the batch's windows (the examples ending
    them; in group order when grouped), each window's first cell, and for each of its triplets its example (its
    positive and negative) and the cell whose state is its history vector, cells counted over the batch's rows
    (packed) or its groups' cells one group after the other, each row by row; layout is (rows,) packed, (sizes,
    widths) grouped. A single host-device synchronisation, no loop over windows."""
    device = windows.device
    window_triplets = history_lengths[windows]                            # (W,) each window's triplets
    examples_total = len(history_lengths)                                 # the windows hold every example once
    num_batches = -(-examples_total // batch_size)
    batch_index = (torch.cumsum(window_triplets, 0) - 1) // batch_size    # (W,) ascending; an empty batch is skipped
    count = torch.bincount(batch_index, minlength=num_batches)            # windows per batch
    if groups is None:
        first, rows = packed_slots(batch_index, window_triplets, num_batches, width)
        shape = [rows.sum(1)]
    else:                                      # within each batch, by length; near-equal groups (group_sizes)
        by_length = torch.argsort(batch_index * (width + 1) + window_triplets, stable=True)
        windows, batch_index, window_triplets = windows[by_length], batch_index[by_length], window_triplets[by_length]
        position = torch.arange(len(windows), device=device)
        rank = position - (torch.cumsum(count, 0) - count)[batch_index]  # its place in its batch
        k = count[batch_index]                                            # its batch's size
        g = k.clamp(max=groups)
        small, bigger = k // g, k % g                                     # the first `bigger` groups hold one more
        group = torch.where(rank < (small + 1) * bigger, rank // (small + 1), bigger + (rank - (small + 1) * bigger)
                            // small)
        group = batch_index * groups + group                              # ascending, as the windows are sorted
        group_count = torch.bincount(group, minlength=num_batches * groups)
        group_width = torch.zeros_like(group_count).scatter_reduce_(0, group, window_triplets, "amax")  # its longest
        group_cells = (group_count * group_width).view(num_batches, groups)
        offset = (torch.cumsum(group_cells, 1) - group_cells).flatten()   # a group's first cell in its batch
        first = offset[group] + (position - (torch.cumsum(group_count, 0) - group_count)[group]) * group_width[group]
        shape = [group_count, group_width]
    start = torch.cumsum(window_triplets, 0) - window_triplets
    within = torch.arange(examples_total, device=device) - torch.repeat_interleave(start, window_triplets,
                                                                                   output_size=examples_total)
    cells = torch.repeat_interleave(first, window_triplets, output_size=examples_total) + within
    examples = torch.repeat_interleave(windows - window_triplets + 1, window_triplets,
                                       output_size=examples_total) + within
    triplets = torch.zeros_like(count).index_add_(0, batch_index, window_triplets)
    host = torch.cat([count, triplets, *shape]).tolist()                  # the one synchronisation
    count, triplets, shape = host[:num_batches], host[num_batches:2 * num_batches], host[2 * num_batches:]
    if groups is None:
        layouts = [(rows,) for rows in shape]
    else:
        sizes, widths = shape[:num_batches * groups], shape[num_batches * groups:]
        layouts = [([c for c in sizes[b * groups:(b + 1) * groups] if c],
                    [w for c, w in zip(sizes[b * groups:(b + 1) * groups], widths[b * groups:(b + 1) * groups]) if c])
                   for b in range(num_batches)]
    parts = zip(windows.split(count), first.split(count), examples.split(triplets), cells.split(triplets), layouts)
    return [(w, f, e, c, layout) for (w, f, e, c, layout), n in zip(parts, count) if n]


def grouped_states(model, flat, target_at, history_lengths, sizes, widths):
    """--examples users only: (cells, d) the states of every cell of a batch of windows in length groups (GRU4Rec,
    SASRec), one group's (B_g, T_g) cells after the other, each row by row; one item lookup for all groups, as
    encode_batch, which reads only each history's last state."""
    groups = group_histories(flat, target_at, history_lengths, sizes, widths)
    return torch.cat([model.sequence_states(x, group).flatten(0, 1)
                      for group, x in zip(groups, group_item_vectors(model, groups))])


def train_epoch(model, optimizer, data, config, epoch, progress=None):
    """One pass over the examples in a fresh random order with fresh negatives. Returns every step's loss (no
    host-device synchronisation in the loop); progress(done, total) is called before the first step and after each."""
    flat, target_at, history_lengths, users, owners, avoided, num_items = data[:7]          # TrainingData's first seven
    device = flat.device
    # Dropout draws from torch's global generator, the order and the negatives from their own, both seeded alike,
    # so the two streams are made of the same random words. Harmless: each use reads a word its own way, and a
    # word's two uses concern unrelated things (a mask entry in the first batches; the shuffle step or negative of
    # an example in any batch); docs/measurements.md ("Randomness") finds no correlation. Seeding them apart would
    # change every seeded run's numbers, so it stays.
    torch.manual_seed(epoch_seed(config["seed"], epoch))                    # dropout
    generator = torch.Generator(device).manual_seed(epoch_seed(config["seed"], epoch))
    # .get, here and in train(): a configuration dict made by hand (tests, bench.py) or read from a run folder
    # written before --examples and --pack existed may lack these keys (as build_model's "block")
    per_user = config.get("examples", "prefixes") == "users"
    # (E,) the examples, or (W,) the per-user regime's windows (user_windows), in a random order
    order = torch.randperm(len(data.window_ends if per_user else target_at), device=device, generator=generator)
    # (E,) item ids, one per example. Drawn for CE too, which reads none: every loss's epoch then takes the same
    # draws from the generator, and a loss added beside the others moves none of their random streams.
    negatives = sample_negatives(owners, avoided, num_items, generator)
    # encode(example ids, *layout): the layout is what the batching gave, (first, rows) packed or (sizes, widths)
    if per_user:                               # batch: (its windows, their first cells, each triplet's example)
        pack = config.get("pack", False)
        batches = [((windows, first, examples), cells, *layout) for windows, first, examples, cells, layout in
                   user_batches(data.window_ends[order], history_lengths, config["batch_size"], data.widest,
                                None if pack else config["length_groups"])]

        def encode(batch, cells, *layout):
            windows, first, _ = batch
            if pack:
                states = packed_states(model, flat, target_at[windows], history_lengths[windows], first, *layout,
                                       data.widest)
            else:
                states = grouped_states(model, flat, target_at[windows], history_lengths[windows], *layout)
            return states[cells]                                             # (triplets, d)
    elif config.get("pack", False):
        batches = packed_batches(order, history_lengths, config["batch_size"], data.widest)
        encode = lambda batch, first, rows: encode_packed(model, flat, target_at[batch], history_lengths[batch],
                                                          first, rows, data.widest)
    else:
        batches = epoch_batches(order, history_lengths, config["batch_size"], config["length_groups"])
        encode = lambda batch, sizes, widths: encode_batch(model, flat, target_at[batch], history_lengths[batch],
                                                           sizes, widths, users[batch])
    losses = torch.zeros(len(batches), device=device)
    if progress:
        progress(0, len(batches))
    for step, (batch, *layout) in enumerate(batches):
        h = encode(batch, *layout)                                           # (B, d)
        example_ids = batch[2] if per_user else batch                        # (B,) the triplets' examples
        loss = batch_loss(model, h, flat[target_at[example_ids]], negatives[example_ids], config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses[step] = loss.detach()
        if progress:
            progress(step + 1, len(batches))
    return losses


def adam(model, lr, device):
    """Adam, with its fused kernel (the same update in one kernel) on CPU, CUDA and MPS where torch has it. torch's
    defaults otherwise (betas 0.9 / 0.999, eps 1e-8, no weight decay; the original SASRec used beta2 0.98), and no
    gradient clipping: the paper names none of these."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda", "mps"))
    except RuntimeError:                                                     # "fused=True requires ... devices"
        return torch.optim.Adam(model.parameters(), lr=lr)


def history_limit(config, lengths):
    """The longest history a run reads: --max-len, capped at the longest user's test history (n - 1 items)."""
    # SASRec's position table gets only readable rows; no change on the benchmarks (longest test history: 203 to 549).
    return min(config["max_len"], int(lengths.max()) - 1)


def early_stopping_state():
    """The early-stopping state of a run that has trained no epoch; `history` holds the log rows so far."""
    return {"epoch": 0, "best_epoch": 0, "best_ndcg": -1.0, "history": []}


class PrintedRun:
    """train()'s `run` when none is given: it keeps nothing (an interrupted call starts over) and hands each line to
    `log` (print; None: nothing is shown)."""

    def __init__(self, log=print):
        self.log = log or (lambda line: None)

    def __str__(self):
        return "no run folder"

    def resume(self, model, optimizer):
        return early_stopping_state(), {k: v.clone() for k, v in model.state_dict().items()}

    def save(self, model, optimizer, state, best_weights):
        pass

    def step(self, epoch, done, total):
        pass

    def statistics(self, model):
        return {}


def train(config, sequences, run=None):
    """Train on `sequences` (lists of item ids, one per user) until validation NDCG@10 (under the run's own
    protocol, mask_seen) has not improved for `patience` epochs, at most `epochs` epochs; then rank the best state
    under both protocols. Returns {test, valid (own protocol), protocols (both), best_epoch, epochs, train_seconds},
    and `stopped` (why) when non-finite numbers ended training after an epoch had finished: that epoch is not kept,
    and the best state so far is tested as usual. A FloatingPointError when the first epoch already has them.
    `config` is a Config, or the dict of one that runs.py resolves from the command line.

    `run` keeps what must survive an interruption (runs.RunFolder keeps it in a folder; by default a PrintedRun
    keeps nothing and prints a line per epoch):
      run.resume(model, optimizer) -> (state, best_weights)  the early-stopping state and the best state's weights
                                                             so far (fresh ones without a checkpoint); the
                                                             checkpoint loaded into model and optimizer
      run.save(model, optimizer, state, best_weights)        after every epoch
      run.log(line), run.step(epoch, done, total)            what the user sees: a line per epoch, a progress line
      run.statistics(model) -> {name: value}                 more for each epoch's log row: Figure 1's cosines, etc.
    No random-number state needs saving: every epoch re-seeds from (seed, epoch)."""
    if isinstance(config, Config):
        config = asdict(config)                      # the method reads config["key"], as runs.py's dicts hold them
    run = PrintedRun() if run is None else run
    device = torch.device(config["device"])
    flat, starts, lengths, num_items = flatten_sequences(sequences, device)
    max_len = history_limit(config, lengths)
    data = training_data(flat, starts, lengths, num_items, max_len, config["negatives"],
                         config.get("examples", "prefixes"))
    valid = evaluation_batches(flat, starts, lengths, max_len, "valid")
    torch.manual_seed(config["seed"])
    model = build_model(config, num_items, len(lengths), max_len).to(device)
    if config.get("pack", False):                     # the packed path's dropout masks from random bits (Dropout)
        for module in model.modules():
            if isinstance(module, Dropout):
                module.from_bits = True
    optimizer = adam(model, config["lr"], device)
    cosine = scores_are_cosines(config)
    state, best_weights = run.resume(model, optimizer)
    run.log(f"{config['data']}: {len(lengths):,} users, {num_items:,} items, {len(data.target_at):,} training "
            f"examples; {config['model']} + {config['loss']} on {device}; {run}")
    occurring = len(torch.unique(flat[1:]))                                # flat[0] is the padding
    if occurring < num_items:    # every id up to N gets a row, is drawn as a negative and ranked, occurring or not
        run.log(f"{num_items - occurring:,} of the item ids 1..{num_items:,} never occur in {config['data']} (it has "
                f"{occurring:,} distinct items); they are trained and ranked as items all the same (number the items "
                f"1..{occurring:,} to leave them out)")

    stopped = None                                   # why non-finite numbers ended training, if they did
    while state["epoch"] < config["epochs"] and state["epoch"] - state["best_epoch"] < config["patience"]:
        epoch = state["epoch"] + 1
        started = time.time()
        try:
            losses = train_epoch(model, optimizer, data, config, epoch,
                                 lambda done, total: run.step(epoch, done, total))
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {int(bad[0]) + 1}")
            train_seconds = time.time() - started
            metrics = evaluate(model, valid, cosine, config["mask_seen"])
        except FloatingPointError as err:                                  # the loss's, or evaluate()'s scores
            # The epoch re-seeds from (seed, epoch), so training it again would break it again: it ends training as
            # early stopping does, and the best state of the epochs before is tested. Without one, nothing can be.
            if not state["epoch"]:
                raise
            stopped = str(err) if "epoch" in str(err) else f"non-finite validation scores at epoch {epoch}"
            run.log(f"stopped: {stopped}; the best state (epoch {state['best_epoch']}) is tested")
            break
        row = {"epoch": epoch, "loss": losses.sum().item() / len(data.target_at),  # the epoch's loss per example
               "train_seconds": round(train_seconds, 2),
               "eval_seconds": round(time.time() - started - train_seconds, 2),
               **{f"valid_{k}": v for k, v in metrics.items()}, **run.statistics(model)}
        state["history"].append(row)
        state["epoch"] = epoch
        if metrics["NDCG@10"] > state["best_ndcg"]:
            state["best_epoch"], state["best_ndcg"] = epoch, metrics["NDCG@10"]
            best_weights = {k: v.clone() for k, v in model.state_dict().items()}
        run.save(model, optimizer, state, best_weights)
        run.log(f"epoch {epoch:3d}  loss {row['loss']:.4f}  valid HR@10 {metrics['HR@10']:.4f} NDCG@10 "
                f"{metrics['NDCG@10']:.4f}  best epoch {state['best_epoch']}  {train_seconds:.1f}s + "
                f"{row['eval_seconds']:.1f}s")

    model.load_state_dict(best_weights)
    test = evaluation_batches(flat, starts, lengths, max_len, "test")
    on_test, on_valid = evaluate_protocols(model, test, cosine), evaluate_protocols(model, valid, cosine)
    protocols = {name: {"test": on_test[name], "valid": on_valid[name]} for name in PROTOCOLS}
    own = protocols["history_excluded" if config["mask_seen"] else "all_items"]
    return {"test": own["test"], "valid": own["valid"], "protocols": protocols, "best_epoch": state["best_epoch"],
            "epochs": state["epoch"], "train_seconds": round(sum(r["train_seconds"] for r in state["history"]), 1),
            **({"stopped": stopped} if stopped else {})}


if __name__ == "__main__":
    # runs.py's `import uniform_seqrec` gets this module, run as the program, instead of loading the file a second
    # time as another module (a second copy of every function and class)
    sys.modules["uniform_seqrec"] = sys.modules["__main__"]
    import runs                                                             # the command line and the run folders
    sys.exit(runs.main())
