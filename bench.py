"""Speed of uniform_seqrec.py on the device it runs on; prints one table.

    python bench.py                    # all sections, on the default device (cuda, then mps, then cpu)
    python bench.py --device cpu --steps 40 --sections loss,train,eval
    python bench.py --device cuda --sections train --length-groups 1   # against --length-groups 8 (the default)
    python bench.py --device cpu --sections recbole --threads 1 --rounds 3   # RecBole installed (it says how)

  loss   uniformity_loss forward + backward at B = 256, d = 64: batched (torch.cdist) against an obviously-correct
         Python loop over pairs, and against the same sums written with explicit (B, B, d) differences
  train  training throughput of each backbone with each loss on real Beauty (batch 256, max length 50, d 64,
         each backbone at its default depth, 2 heads), from `--steps` real batches; seconds per epoch = examples /
         throughput; SASRec also packed (--pack). Beside each, its bound: the epoch's matrix products and
         convolutions (FLOPs counted by torch over 10 real steps), each call timed alone on this device on tensors
         of the same layout, and the epoch's time as a multiple of that
  eval   full-ranking evaluation of every Beauty user, against its bare lower bound: the same matrix product and
         comparison on history vectors already computed and on the device
  memory peak memory of training (SASRec, uniformity loss) and of evaluation: on CUDA what torch allocated at most;
         on MPS what Metal's driver holds after the work (MPS has no peak; its allocator keeps what it took, so
         about the peak); on the CPU the process's peak resident set
  progress  (only when named) train_epoch with the progress line, drawn on a pseudo-terminal, against without it
  profile   (only when named) where a SASRec + uniform step's time goes, by kind of work (torch's profiler), with
         length groups and packed (--pack)
  regime    (only when named) seconds per epoch of train_epoch itself, per-prefix (--examples prefixes) against
         per-user (--examples users), `--rounds` interleaved rounds, SASRec + BCE and + uniform, GRU4Rec + BCE: each
         epoch's batching, then `--steps` real steps after 3 to warm up, scaled to the epoch's steps
  recbole   (only when named; CPU; needs RecBole 1.2.1, optional, not in requirements.txt: without it one line says
         how to install it) one SASRec + BPR training epoch on Beauty, RecBole's against ours (length groups 8, and
         packed) at the same settings, in `--rounds` interleaved rounds: seconds, RecBole's over ours per round, and
         the medians; both sides' training examples must match. `--steps` cuts each epoch to its first steps

Timings are medians of repeated runs where a section is cheap enough to repeat; ratios are measured side by side.
Every section runs under the settings a training run sets on the device (runs.device_settings: on CUDA no TF32,
cuDNN's deterministic algorithms, no cuDNN benchmarking), so that it times what trains.
"""
import argparse
import collections
import dataclasses
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from unittest import mock

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # before torch: see uniform_seqrec.py
import torch
import torch.utils._pytree as pytree
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import runs as R
import uniform_seqrec as U
from data_prep import DataError, OneLineErrorParser, default_data_dir, read_sequences


def synchronize(device):
    """Wait for the device's queued work (CUDA and MPS run asynchronously; the CPU has nothing to wait for)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(function, device, repeats=5, warmup=1):
    """Median wall seconds of `function()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# 1. The loss: batched against a loop over pairs and against explicit differences
# ---------------------------------------------------------------------------------------------------------------

def uniformity_loss_pair_loop(history, positives, negatives, beta=0.05, t=2.0):
    """Eq. 6 one pair at a time: the obviously-correct version the batched one must beat."""
    h, p, n = (torch.nn.functional.normalize(v, dim=-1) for v in (history, positives, negatives))
    items = torch.cat([p, n])
    loss = U.bce_loss((h * p).sum(-1), (h * n).sum(-1))
    potential = lambda x, y: torch.exp(-t * (x - y).square().sum())
    for group in (h, items):
        for x in range(len(group)):
            for y in range(x + 1, len(group)):
                loss = loss + beta * potential(group[x], group[y])
    for x in range(len(h)):
        for y in range(len(n)):
            loss = loss + beta * potential(h[x], n[y])
    return loss


def uniformity_loss_differences(history, positives, negatives, beta=0.05, t=2.0):
    """Eq. 6 with explicit (B, B, d) differences instead of torch.cdist."""
    h, p, n = (torch.nn.functional.normalize(v, dim=-1) for v in (history, positives, negatives))
    items = torch.cat([p, n])
    potential = lambda x, y: torch.exp(-t * (x[:, None, :] - y[None, :, :]).square().sum(-1))
    loss = U.bce_loss((h * p).sum(-1), (h * n).sum(-1))
    loss = loss + beta * (potential(h, h).triu(1).sum() + potential(items, items).triu(1).sum())
    return loss + beta * potential(h, n).sum()


def bench_loss(device, rows):
    g = torch.Generator().manual_seed(0)
    h, p, n = (torch.randn(256, 64, generator=g).to(device).requires_grad_() for _ in range(3))
    step = lambda loss_function: lambda: loss_function(h, p, n).backward()
    batched = timed(step(U.uniformity_loss), device, repeats=20, warmup=3)
    differences = timed(step(uniformity_loss_differences), device, repeats=10, warmup=2)
    loop = timed(step(uniformity_loss_pair_loop), device, repeats=1, warmup=0)
    rows.append(("loss", "uniformity_loss fwd+bwd, B=256 d=64, batched (cdist)", f"{batched * 1e3:.2f} ms", ""))
    rows.append(("loss", "  same sums, explicit (B, B, d) differences", f"{differences * 1e3:.2f} ms",
                 f"batched {differences / batched:.1f}x faster"))
    rows.append(("loss", "  same sums, Python loop over pairs", f"{loop:.1f} s",
                 f"batched {loop / batched:,.0f}x faster"))


def bench_dropout(device, rows):
    """uniform_seqrec.Dropout (mask from uniform numbers) against torch's nn.Dropout, forward + backward."""
    x = torch.randn(256, 9, 64, device=device, requires_grad=True)          # one Beauty batch: 256 x ~9 x d
    ours, theirs = U.Dropout(0.5), torch.nn.Dropout(0.5)
    ours_time = timed(lambda: ours(x).sum().backward(), device, repeats=50, warmup=5)
    theirs_time = timed(lambda: theirs(x).sum().backward(), device, repeats=50, warmup=5)
    rows.append(("dropout", "Dropout(0.5) fwd+bwd on (256, 9, 64): torch.nn.Dropout", f"{theirs_time * 1e3:.2f} ms",
                 ""))
    rows.append(("dropout", "  uniform_seqrec.Dropout (mask from uniform numbers)", f"{ours_time * 1e3:.2f} ms",
                 f"{theirs_time / ours_time:.1f}x faster"))


# ---------------------------------------------------------------------------------------------------------------
# 2. Training throughput on real Beauty
# ---------------------------------------------------------------------------------------------------------------

PAPER_MODEL = {"dim": 64, "heads": 2, "dropout": 0.5, "caser_window": 5, "caser_activation": "relu",
               "caser_users": False, "caser_output_table": False}  # what the backbones read, at the paper's settings


def paper_model(name, num_items, device):
    """A freshly initialized backbone at the paper's settings and its original's depth, on `device`."""
    config = {**PAPER_MODEL, "model": name, "layers": U.ORIGINAL_LAYERS[name]}
    return U.build_model(config, num_items, 0, 50).to(device)


def training_setup(path, device):
    flat, starts, lengths, num_items = U.flatten_sequences(read_sequences(path), device)
    ends, history_lengths, users = U.training_examples(starts, lengths, 50)
    codes = U.training_item_codes(flat, starts, lengths, num_items)
    return flat, starts, lengths, num_items, ends, history_lengths, users, codes


def training_step(setup, device, model_name, loss, length_groups, pack=False, batches=43):
    """A freshly initialized backbone and `run(some)`, which trains it on some of `batches` real Beauty batches of a
    random epoch order (batch 256), laid out as training lays them out: in length groups, or packed."""
    flat, _, _, num_items, ends, history_lengths, users, codes = setup
    torch.manual_seed(0)
    model = paper_model(model_name, num_items, device)
    for module in model.modules():                                         # as uniform_seqrec.train sets it
        if isinstance(module, U.Dropout):
            module.from_bits = pack
    optimizer = U.adam(model, 1e-3, device)
    config = {"loss": loss, "beta": 0.05, "t": 2.0, "normalize": True, "rec": True, "hom": True, "het": True,
              "infonce_negatives": None}
    generator = torch.Generator(device).manual_seed(0)
    order = torch.randperm(len(ends), device=device, generator=generator)[:256 * batches]
    negatives = U.sample_negatives(users, codes, num_items, generator)
    width = int(history_lengths.max())
    if pack:
        layout = U.packed_batches(order, history_lengths, 256, width)
        encode = lambda batch, first, rows: U.encode_packed(model, flat, ends[batch], history_lengths[batch], first,
                                                            rows, width)
    else:
        layout = U.epoch_batches(order, history_lengths, 256, length_groups)
        encode = lambda batch, sizes, widths: U.encode_batch(model, flat, ends[batch], history_lengths[batch],
                                                             sizes, widths)

    def run(some):
        for batch, *where in some:
            value = U.batch_loss(model, encode(batch, *where), flat[ends[batch]], negatives[batch], config)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()

    return layout, run


def train_steps(setup, device, model_name, loss, steps, length_groups, pack=False):
    """Seconds per training example over `steps` real batches of a random epoch order (after 3 to warm up)."""
    batches, run = training_step(setup, device, model_name, loss, length_groups, pack, steps + 3)
    run(batches[:3])                                                       # warm-up
    synchronize(device)
    started = time.perf_counter()
    run(batches[3:])
    synchronize(device)
    return (time.perf_counter() - started) / (256 * steps)


# The bound an epoch is measured against: the arithmetic it cannot skip. The ops that torch's FLOP counter knows
# (matrix products, convolutions, their backward) are recorded call by call with their tensors' shapes and strides
# while real steps train; each call is then timed alone on fresh tensors of the same layout. The sum is what the
# epoch's arithmetic costs this device with nothing around it: no other op, no autograd, no Python.

class ArithmeticCalls(TorchDispatchMode):
    """Counts each call of an op in torch's FLOP registry by (op, its arguments' layout)."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.specs = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in flop_counter.flop_registry:
            spec = pytree.tree_map(lambda a: ("tensor", tuple(a.shape), a.stride(), a.dtype, a.storage_offset())
                                   if isinstance(a, torch.Tensor) else a, (args, kwargs))
            key = (func, repr(spec))
            self.calls[key] += 1
            self.specs[key] = spec
        return func(*args, **kwargs)


def fresh_tensor(spec, device):
    """A tensor of the recorded layout, on random numbers (stride 0 and overlapping strides included)."""
    _, shape, stride, dtype, offset = spec
    size = offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    base = torch.randn(size, device=device) if dtype.is_floating_point else torch.zeros(size, device=device)
    return base.to(dtype).as_strided(shape, stride, offset)


def arithmetic_bound(run, batches, device):
    """(FLOPs, seconds) of the counted ops of training on `batches`, the seconds as each call takes alone."""
    counter, recorder = flop_counter.FlopCounterMode(display=False), ArithmeticCalls()
    with counter, recorder:
        run(batches)
    synchronize(device)
    seconds = 0.0
    for key, count in recorder.calls.items():
        func = key[0]
        is_spec = lambda a: isinstance(a, tuple) and bool(a) and a[0] == "tensor"    # a recorded tensor's layout
        args, kwargs = pytree.tree_map(lambda a: fresh_tensor(a, device) if is_spec(a) else a, recorder.specs[key],
                                       is_leaf=is_spec)
        seconds += count * timed(lambda: func(*args, **kwargs), device, repeats=5)
    return counter.get_total_flops(), seconds


def train_row(setup, device, model_name, loss, steps, length_groups, pack=False, bound_steps=10):
    """One row of the train section: throughput, seconds per epoch, and the epoch against its arithmetic bound."""
    examples = len(setup[4])
    per_example = train_steps(setup, device, model_name, loss, steps, length_groups, pack)
    batches, run = training_step(setup, device, model_name, loss, length_groups, pack, bound_steps + 1)
    run(batches[:1])                                                       # warm-up
    flops, seconds = arithmetic_bound(run, batches[1:], device)
    per_epoch = examples / (256 * bound_steps)
    epoch_seconds, bound_seconds = per_example * examples, seconds * per_epoch
    how = "packed" if pack else f"length groups {length_groups}"
    return ("train", f"{model_name} + {loss} ({how})", f"{1 / per_example:,.0f} samples/s",
            f"{epoch_seconds:.1f} s/epoch; {flops * per_epoch / 1e9:,.0f} GFLOP at {flops / seconds / 1e9:.0f} "
            f"GFLOP/s: bound {bound_seconds:.1f} s, {epoch_seconds / bound_seconds:.2f}x")


def bench_train(setup, device, steps, rows, length_groups=None):
    """length_groups: every backbone's (None: training's defaults, 8 and 1 for Caser, and one more row of SASRec +
    uniform with 1); SASRec is measured packed too (--pack)."""
    for model_name in ("sasrec", "gru4rec", "caser"):
        groups = length_groups or (1 if model_name == "caser" else 8)
        for loss in ("bce", "bpr", "infonce", "uniform"):
            rows.append(train_row(setup, device, model_name, loss, steps, groups))
        if model_name == "sasrec":
            for loss in ("bce", "bpr", "infonce", "uniform"):
                rows.append(train_row(setup, device, model_name, loss, steps, groups, pack=True))
    if length_groups:
        return
    row = train_row(setup, device, "sasrec", "uniform", steps, 1)
    rows.append((row[0], "sasrec + uniform, whole batch padded to its longest (length groups 1)", *row[2:]))


def bench_progress(path, device, rows, pairs=4, users=3000):
    """Seconds of train_epoch on the first `users` Beauty users (SASRec + uniform, paper settings) with the progress
    line (at its interval of 1 s, and at every step) and without it, in interleaved pairs (ABBA order); the ratio is
    the median of the pairs'."""
    flat, starts, lengths, num_items = U.flatten_sequences(read_sequences(path)[:users], device)
    data = U.training_data(flat, starts, lengths, num_items, 50)
    config = {"seed": 1, "batch_size": 256, "length_groups": 8, "loss": "uniform", "beta": 0.05, "t": 2.0,
              "normalize": True, "rec": True, "hom": True, "het": True}
    torch.manual_seed(0)
    model = paper_model("sasrec", num_items, device)
    optimizer = U.adam(model, 1e-3, device)
    leader, follower = os.openpty()                                        # a terminal, so the line is written
    os.set_blocking(leader, False)
    terminal = os.fdopen(follower, "w")
    epochs = iter(range(1, 10 ** 6))

    def epoch(interval):
        progress = None
        if interval is not None:
            progress = R.ProgressLine(terminal, interval)
            assert progress.enabled
            progress.start("epoch")
        synchronize(device)
        started = time.perf_counter()
        U.train_epoch(model, optimizer, data, config, next(epochs),
                      progress and (lambda done, total: done and progress.step(done, total)))
        synchronize(device)
        seconds = time.perf_counter() - started
        if progress:
            progress.clear()
        try:
            while os.read(leader, 1 << 16):                                # drain what the terminal received
                pass
        except BlockingIOError:
            pass
        return seconds

    epoch(None)                                                            # warm-up
    steps = -(-len(data.target_at) // 256)
    for interval, label in ((1.0, "updated at most once a second (as in training)"), (0.0, "updated every step")):
        without, with_line = [], []
        for pair in range(pairs):
            first, second = (None, interval) if pair % 2 == 0 else (interval, None)
            times = {first: epoch(first)}
            times[second] = epoch(second)
            without.append(times[None])
            with_line.append(times[interval])
        ratios = [w / o for w, o in zip(with_line, without)]
        rows.append(("progress", f"train_epoch, {users:,} Beauty users ({steps} steps): without the line",
                     f"{statistics.median(without):.2f} s", ""))
        rows.append(("progress", f"  with the line, {label}", f"{statistics.median(with_line):.2f} s",
                     f"ratio {statistics.median(ratios):.3f} (pairs: {', '.join(f'{r:.3f}' for r in ratios)})"))


# Where an epoch's time goes: torch's profiler over real steps, each op's own time put under one kind of work;
# what no op accounts for (autograd's bookkeeping, Python, the profiler's own cost) is the last row.
WORK_KINDS = [
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
                         "aten::convolution_backward", "aten::_convolution", "aten::mkldnn_rnn",
                         "aten::_cdist_forward", "aten::_cdist_backward")),
    ("softmax and masks (attention, InfoNCE)", ("aten::_softmax", "aten::_softmax_backward_data",
                                                "aten::_log_softmax", "aten::_log_softmax_backward_data",
                                                "aten::masked_fill_", "aten::masked_fill", "aten::where",
                                                "aten::eq", "aten::ne", "aten::bitwise_or", "aten::triu",
                                                "aten::cummax")),
    ("random numbers (dropout, negatives)", ("aten::uniform_", "aten::random_", "aten::bernoulli_",
                                             "aten::ge_", "aten::ge")),
    ("layer norms", ("aten::native_layer_norm", "aten::native_layer_norm_backward")),
    ("embedding lookups and their backward", ("aten::embedding_dense_backward", "aten::index_select",
                                              "aten::index_add_", "aten::index", "aten::index_put_",
                                              "aten::_index_put_impl_", "aten::embedding")),
    ("Adam", ("aten::_fused_adam_",)),
    ("copies and zero fills", ("aten::copy_", "aten::_to_copy", "aten::fill_", "aten::zero_", "aten::clone",
                               "aten::cat")),
]


def work_profile(setup, device, model_name, loss, length_groups, pack=False, steps=20):
    """[(kind of work, seconds per step)] of training, from torch's profiler (CPU time of each op)."""
    from torch.profiler import ProfilerActivity, profile
    batches, run = training_step(setup, device, model_name, loss, length_groups, pack, steps + 3)
    run(batches[:3])
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        run(batches[3:])
        synchronize(device)
        wall = time.perf_counter() - started
    own = collections.Counter()
    for event in profiler.key_averages():
        if event.key.startswith("aten::"):
            kind = next((k for k, names in WORK_KINDS if event.key in names), "other element-wise ops")
            own[kind] += event.self_cpu_time_total / 1e6
    kinds = [k for k, _ in WORK_KINDS] + ["other element-wise ops"]
    rows = [(k, own[k] / steps) for k in kinds]
    return rows + [("autograd, Python and the profiler (no op)", (wall - sum(own.values())) / steps)], wall / steps


def bench_profile(setup, device, rows):
    """SASRec + uniform, a step as training takes it by default (length groups 8) and packed, by kind of work."""
    for pack in (False, True):
        kinds, step = work_profile(setup, device, "sasrec", "uniform", 8, pack)
        how = "packed" if pack else "length groups 8"
        rows.append(("profile", f"sasrec + uniform ({how}): one step under the profiler", f"{step * 1e3:.1f} ms",
                     ""))
        for kind, seconds in kinds:
            rows.append(("profile", f"  {kind}", f"{seconds * 1e3:.1f} ms", f"{seconds / step:.0%}"))


# ---------------------------------------------------------------------------------------------------------------
# 3. Evaluation against its lower bound
# ---------------------------------------------------------------------------------------------------------------

def bench_eval(setup, device, rows):
    flat, starts, lengths, num_items, *_ = setup
    torch.manual_seed(0)
    model = paper_model("sasrec", num_items, device).eval()
    batches = U.evaluation_batches(flat, starts, lengths, 50, "test")
    full = timed(lambda: U.evaluate(model, batches, cosine=True), device, repeats=3)
    with torch.no_grad():
        history = torch.cat([torch.nn.functional.normalize(model.encode(h), dim=-1) for h, _, _ in batches])
        targets = torch.cat([t for _, _, t in batches])
        items = torch.nn.functional.normalize(model.output_items().weight, dim=-1)

    buffer = torch.empty(1024, len(items), device=device)

    def lower_bound():                                                     # into one buffer, counted in place
        with torch.no_grad():
            for h, t in zip(history.split(1024), targets.split(1024)):
                scores = torch.matmul(h, items.T, out=buffer[:len(h)])
                scores.ge_(scores.gather(1, t[:, None])).sum(1)

    bound = timed(lower_bound, device, repeats=3)
    users = len(lengths)
    rows.append(("eval", f"evaluate(): all {users:,} users x {num_items:,} items", f"{full:.2f} s",
                 f"{full / bound:.2f}x the lower bound"))
    rows.append(("eval", "  lower bound: matrix product + comparison, vectors ready", f"{bound:.2f} s", ""))
    return model, batches


# ---------------------------------------------------------------------------------------------------------------
# 4. Peak memory
# ---------------------------------------------------------------------------------------------------------------

def reset_peak(device):
    """Start a new peak: CUDA's allocator statistics, or Linux's peak resident set size of this process (MPS has no
    peak to reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type != "mps" and os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_megabytes(device):
    """MiB: on CUDA the most torch allocated on the device since reset_peak; on MPS what Metal's driver holds for
    this process now (torch.mps has no peak); on the CPU the process's peak resident set (Linux's VmHWM, else
    getrusage's ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2 ** 20
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss                # bytes on macOS, KiB elsewhere
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def memory_probe(what, path, device, steps, length_groups=None):
    """Run in a fresh process (a process's peak cannot be lowered once the loss section has grown it)."""
    setup = training_setup(path, device)
    synchronize(device)
    before = peak_megabytes(device) if device.type != "cuda" else 0.0
    reset_peak(device)
    if what == "train":
        train_steps(setup, device, "sasrec", "uniform", steps, length_groups or 8)
    else:
        flat, starts, lengths, num_items, *_ = setup
        model = paper_model("sasrec", num_items, device)
        U.evaluate(model, U.evaluation_batches(flat, starts, lengths, 50, "test"), cosine=True)
    synchronize(device)
    print(f"{peak_megabytes(device):.0f} {before:.0f}")


MEMORY_MEASURE = {"cuda": "the most allocated by torch on the device",
                  "mps": "held by Metal's driver after the work, about its peak"}


def bench_memory(args, device, rows):
    what = MEMORY_MEASURE.get(device.type, "peak resident set of a fresh process")
    flags = ["--length-groups", str(args.length_groups)] if args.length_groups else []
    flags += ["--threads", str(args.threads)] if args.threads else []
    for probe, label in (("train", "training sasrec + uniform"), ("eval", "evaluation of every user")):
        result = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-probe", probe, "--device",
                                 str(device), "--data-dir", args.data_dir, "--steps", str(min(args.steps, 20)),
                                 *flags], capture_output=True, text=True, check=True)
        peak, before = result.stdout.split()
        extra = {"cuda": "", "mps": f"{before} MiB after loading the data"}.get(
            device.type, f"{before} MiB after loading torch and the data")
        rows.append(("memory", f"{label} ({what})", f"{int(peak):,} MiB", extra))


def epoch_trainer(model_name, num_items, device, pack=False, **config):
    """(model, optimizer, config) for U.train_epoch: a freshly initialized backbone at the paper's settings, its Adam
    (lr 1e-3) and U.Config's defaults but for `config` and --pack, set up as uniform_seqrec.train sets them."""
    config = dataclasses.asdict(U.Config(model=model_name, pack=pack, lr=1e-3, seed=1, device=str(device), **config))
    torch.manual_seed(0)
    model = paper_model(model_name, num_items, device)
    for module in model.modules():                                         # as uniform_seqrec.train sets it
        if isinstance(module, U.Dropout):
            module.from_bits = pack
    return model, U.adam(model, 1e-3, device), config


class EnoughSteps(Exception):
    """Raised by the regime and recbole sections' progress callbacks to end train_epoch after the steps they time."""


def epoch_seconds(model, optimizer, data, config, epoch, device, steps, warmup=3):
    """(seconds per epoch, steps per epoch) of U.train_epoch: the time to its first step (order, negatives, the
    batching) plus its mean step over `steps` steps after `warmup`, times its steps."""
    marks = {}

    def progress(done, total):
        synchronize(device)
        marks[done], marks["total"] = time.perf_counter(), total
        if done == warmup + steps:
            raise EnoughSteps

    synchronize(device)
    started = time.perf_counter()
    try:
        U.train_epoch(model, optimizer, data, config, epoch, progress)
    except EnoughSteps:
        pass
    per_step = (marks[warmup + steps] - marks[warmup]) / steps
    return marks[0] - started + per_step * marks["total"], marks["total"]


# bench_regime's rows: (backbone, loss, --pack, --examples), each per-user one after the per-prefix ones it is set
# against (its ratio is to the first of them: training's default layout)
REGIMES = [("sasrec", "bce", False, "prefixes"), ("sasrec", "bce", True, "prefixes"), ("sasrec", "bce", True, "users"),
           ("sasrec", "uniform", False, "prefixes"), ("sasrec", "uniform", True, "prefixes"),
           ("sasrec", "uniform", True, "users"), ("gru4rec", "bce", False, "prefixes"),
           ("gru4rec", "bce", False, "users")]


def bench_regime(path, device, steps, rows, rounds=3):
    """Seconds per Beauty epoch (batch 256, paper settings) of each of REGIMES, through train_epoch, in `rounds`
    interleaved rounds (every regime once a round, each round a new epoch); the median of the rounds, and each
    per-user regime's ratio to the per-prefix default of the same backbone and loss, per round."""
    flat, starts, lengths, num_items = U.flatten_sequences(read_sequences(path), device)
    data = U.training_data(flat, starts, lengths, num_items, 50, examples="users")  # the per-user rows read windows
    trainers = [epoch_trainer(model_name, num_items, device, pack, loss=loss, examples=examples)
                for model_name, loss, pack, examples in REGIMES]
    seconds = [[] for _ in REGIMES]
    epoch_steps = [0] * len(REGIMES)
    for epoch in range(1, rounds + 1):
        for r, (model, optimizer, config) in enumerate(trainers):
            took, epoch_steps[r] = epoch_seconds(model, optimizer, data, config, epoch, device, steps)
            seconds[r].append(took)
    baseline = None
    for (model_name, loss, pack, examples), times, count in zip(REGIMES, seconds, epoch_steps):
        how = f"{'packed' if pack else 'length groups 8'}, {examples}"
        ratio = ""
        if examples == "prefixes" and not pack:
            baseline = times
        else:
            ratios = [b / t for b, t in zip(baseline, times)]
            ratio = f"{statistics.median(ratios):.2f}x faster (rounds: {', '.join(f'{x:.2f}' for x in ratios)})"
        rows.append(("regime", f"{model_name} + {loss} ({how}; {count} steps)",
                     f"{statistics.median(times):.1f} s/epoch", ratio))


# ---------------------------------------------------------------------------------------------------------------
# 5. RecBole's SASRec side by side (RecBole is optional: not in requirements.txt)
# ---------------------------------------------------------------------------------------------------------------

# RecBole 1.2.1 without its pinned dependencies (ray, plotly, ...), then what importing and training it needs
RECBOLE_INSTALL = ("pip install --no-deps recbole==1.2.1 && pip install pandas scipy scikit-learn pyyaml tqdm colorlog "
                   "colorama texttable tensorboard")

# RecBole's SASRec at our settings (PAPER_MODEL, SASRec's 2 layers, batch 256, lr 1e-3, BPR with one uniform negative,
# max length 50, Adam without weight decay or clipping), its feed-forward as ours (width d, ReLU); the training part
# as ours: leave-one-out by user (the LS split), each user's items in file order (the timestamps are positions)
RECBOLE_SASREC = {
    "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "MAX_ITEM_LIST_LENGTH": 50,
    "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
    "train_neg_sample_args": {"distribution": "uniform", "sample_num": 1, "alpha": 1.0, "dynamic": False,
                              "candidate_num": 0},
    "loss_type": "BPR", "n_layers": U.ORIGINAL_LAYERS["sasrec"], "n_heads": PAPER_MODEL["heads"],
    "hidden_size": PAPER_MODEL["dim"], "inner_size": PAPER_MODEL["dim"], "hidden_act": "relu",
    "hidden_dropout_prob": PAPER_MODEL["dropout"], "attn_dropout_prob": PAPER_MODEL["dropout"],
    "layer_norm_eps": 1e-12, "initializer_range": 0.02, "train_batch_size": 256, "learning_rate": 1e-3,
    "learner": "adam", "weight_decay": 0.0, "clip_grad_norm": None, "epochs": 1, "gpu_id": "", "worker": 0,
    "show_progress": False, "seed": 2020, "reproducibility": True, "state": "WARNING", "shuffle": True,
}


def import_recbole(device):
    """The recbole package, its parts the recbole section uses imported, or a one-line ConfigError saying how to
    install it (it is not in requirements.txt) or that the section runs on the CPU only."""
    if device.type != "cpu":
        raise R.ConfigError(f"the recbole section runs on the CPU only (--device cpu; got {device})")
    try:
        import recbole.config, recbole.data, recbole.model.sequential_recommender, recbole.trainer, recbole.utils
        import numpy as np                     # after recbole: without it, the line names recbole, not numpy
    except ImportError as err:
        raise R.ConfigError(f"the recbole section needs RecBole 1.2.1, an optional package (no module "
                            f"'{str(err.name).split('.')[0]}'): {RECBOLE_INSTALL}") from None
    torch.autograd.set_detect_anomaly(False)   # RecBole's sine.py switches it on at import: it would slow every epoch
    for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if not hasattr(np, old):               # numpy 2 removed them; RecBole 1.2.1's Config reads them
            setattr(np, old, new)
    return recbole


def recbole_trainer(recbole, sequences):
    """RecBole's SASRec Trainer and training DataLoader on `sequences`, set up in a temporary folder (the atomic
    file RecBole reads, the TensorBoard log its Trainer opens in the working folder), with the command line (its
    Config reads --key=value arguments) and the environment (it sets CUDA_VISIBLE_DEVICES) restored after."""
    with tempfile.TemporaryDirectory() as folder, mock.patch.object(sys, "argv", sys.argv[:1]), \
            mock.patch.dict(os.environ):
        os.makedirs(os.path.join(folder, "beauty"))
        with open(os.path.join(folder, "beauty", "beauty.inter"), "w") as f:
            f.write("user_id:token\titem_id:token\ttimestamp:float\n")
            f.writelines(f"{user}\t{item}\t{at}\n" for user, items in enumerate(sequences, 1)
                         for at, item in enumerate(items))
        config = recbole.config.Config(model="SASRec", dataset="beauty",
                                       config_dict={**RECBOLE_SASREC, "data_path": folder, "checkpoint_dir": folder})
        recbole.utils.init_seed(config["seed"], config["reproducibility"])
        loader = recbole.data.data_preparation(config, recbole.data.create_dataset(config))[0]
        cwd = os.getcwd()
        os.chdir(folder)                                                       # its TensorBoard log
        try:
            trainer = recbole.trainer.Trainer(config, recbole.model.sequential_recommender.SASRec(config,
                                                                                                  loader.dataset))
        finally:
            os.chdir(cwd)
        trainer.tensorboard.close()
        trainer.eval_collector.data_collect(loader)                            # as Trainer.fit does before epochs
    return trainer, loader


def bench_recbole(recbole, setup, path, device, rounds, rows, steps=None):
    """Seconds of one SASRec + BPR training epoch on Beauty, RecBole's (Trainer._train_epoch) against ours
    (train_epoch: length groups 8, training's default, and packed), at the same settings (RECBOLE_SASREC), in
    `rounds` interleaved rounds (each trains on: round r is its epoch r); RecBole's time over ours per round, and
    the medians. steps: each epoch cut to its first `steps` steps (a smoke check), else whole epochs."""
    flat, starts, lengths, num_items = setup[:4]
    data = U.training_data(flat, starts, lengths, num_items, 50)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="recbole")                # pandas' and torch's deprecations
        trainer, loader = recbole_trainer(recbole, read_sequences(path))
        examples, ours = len(loader.dataset), len(data.target_at)
        if examples != ours:
            raise DataError(f"RecBole's epoch has {examples:,} examples, ours {ours:,}: not the same training part "
                            f"(a user with fewer than 4 items?), no comparison")
        counts = {"recbole": len(loader)}

        def our_epoch(pack):
            model, optimizer, config = epoch_trainer("sasrec", num_items, device, pack, loss="bpr")

            def progress(done, total):                                     # the epoch's steps; its end at `steps`
                counts[pack] = total
                if done == steps:
                    raise EnoughSteps
            return lambda epoch: U.train_epoch(model, optimizer, data, config, epoch, progress)

        epochs = {"recbole": lambda epoch: trainer._train_epoch(loader if steps is None else
                                                                itertools.islice(loader, steps), epoch),
                  False: our_epoch(False), True: our_epoch(True)}
        seconds = {side: [] for side in epochs}
        for epoch in range(1, rounds + 1):
            for side, run in epochs.items():
                started = time.perf_counter()
                try:
                    run(epoch)
                except EnoughSteps:
                    pass
                seconds[side].append(time.perf_counter() - started)
    names = {"recbole": f"RecBole {recbole.__version__} SASRec + BPR, {examples:,} examples (ours {ours:,})",
             False: "  ours, length groups 8 (training's default)", True: "  ours, packed (--pack)"}
    for side, times in seconds.items():
        count = counts[side]
        cut = steps is not None and steps < count
        what = f"{names[side]}: {f'first {steps} of ' if cut else ''}{count} steps"
        per_round = ", ".join(f"{t:.{2 if cut else 1}f}" for t in times)
        ratio = f"rounds: {per_round} s"
        if side != "recbole":
            ratios = [r / t for r, t in zip(seconds["recbole"], times)]
            ratio = (f"RecBole / ours {statistics.median(ratios):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)}"
                     f"; {per_round} s)")
        rows.append(("recbole", what, f"{statistics.median(times):.{2 if cut else 1}f} s{'' if cut else '/epoch'}",
                     ratio))


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS, macOS {platform.mac_ver()[0]}"
    return f"{os.cpu_count()} CPU cores"


SECTIONS = ["loss", "train", "eval", "memory", "progress", "profile", "regime", "recbole"]


def parse_arguments(argv=None):
    """The command line, every value checked: a bad one is one line (exit 2), as for the other commands."""
    parser = OneLineErrorParser(prog="bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--steps", type=int, help="timed training batches per backbone and loss (default 40); "
                        "the recbole section: each epoch cut to its first STEPS (default: whole epochs)")
    parser.add_argument("--sections", default="loss,train,eval,memory",
                        help=f"comma-separated, of {', '.join(SECTIONS)} (progress, profile, regime and recbole only "
                             f"when named)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the regime and recbole sections")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's)")
    parser.add_argument("--length-groups", type=int,
                        help="train every backbone with this many length groups (default: training's, 8 and 1 for "
                             "Caser); on a GPU, compare 1 against 8")
    parser.add_argument("--memory-probe", choices=["train", "eval"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "threads"):                            # per-step times divide by steps
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be positive (got {getattr(args, name)})")
    args.epoch_steps, args.steps = args.steps, args.steps or 40            # recbole's (None: whole epochs), others

    if args.length_groups is not None and args.length_groups < 1:          # 0 was read as "the default"
        parser.error(f"--length-groups must be positive (got {args.length_groups})")
    unknown = [name for name in args.sections.split(",") if name not in SECTIONS]
    if unknown:                                                            # an empty table, exit 0, before
        parser.error(f"--sections: unknown section '{unknown[0]}' (known: {', '.join(SECTIONS)})")
    return args


def checked_device_and_data(args):
    """The torch.device to measure on and the Beauty file's path, or a one-line ConfigError / DataError: a device
    that is not there, a missing or malformed Beauty.txt (every section but the loss's reads it)."""
    device = torch.device(R.resolve_device(args.device))
    path = os.path.join(args.data_dir, "Beauty.txt")
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; get it with: python data_prep.py beauty --data-dir {args.data_dir}")
    read_sequences(path)                                                   # a malformed file: its one line
    return device, path


def main(argv=None):
    args = parse_arguments(argv)
    try:
        device, path = checked_device_and_data(args)
        recbole = import_recbole(device) if "recbole" in args.sections.split(",") else None
    except (R.ConfigError, DataError) as err:
        print(f"bench.py: error: {err}", file=sys.stderr)
        return 2
    R.device_settings(device)                                              # as a training run sets them
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args.memory_probe, path, device, args.steps, args.length_groups)
    sections = args.sections.split(",")
    setup = training_setup(path, device)
    rows = []
    if "loss" in sections:
        bench_loss(device, rows)
        bench_dropout(device, rows)
    if "train" in sections:
        bench_train(setup, device, args.steps, rows, args.length_groups)
    if "eval" in sections:
        bench_eval(setup, device, rows)
    if "memory" in sections:
        bench_memory(args, device, rows)
    if "progress" in sections:
        bench_progress(path, device, rows)
    if "profile" in sections:
        bench_profile(setup, device, rows)
    if "regime" in sections:
        bench_regime(path, device, args.steps, rows, args.rounds)
    if "recbole" in sections:
        try:
            bench_recbole(recbole, setup, path, device, args.rounds, rows, args.epoch_steps)
        except DataError as err:                       # the other sections' rows are printed all the same
            print_rows(device, rows)
            print(f"bench.py: error: {err}", file=sys.stderr)
            return 2
    print_rows(device, rows)


def print_rows(device, rows):
    """The table of the sections' rows (none: nothing), under a line naming the device, torch and the threads."""
    if not rows:
        return
    print(f"device: {device} ({device_name(device)}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| section | what | time | ratio |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
