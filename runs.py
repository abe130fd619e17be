"""Running the method of uniform_seqrec.py: the command line and its checks, run folders, checkpoints and resume.

    python uniform_seqrec.py --model sasrec --loss uniform --data beauty

uniform_seqrec.py holds the paper; this file holds what a run needs around it:
  1. One-line errors   bad input is refused with one line naming the problem, never a traceback
  2. Run folders       RunFolder (what train() saves and resumes from), atomic writes, the lock, the progress line
  3. Statistics        what each epoch's log row keeps beside the loss and validation: Figure 1's statistics
  4. Command line      the parser, the checks of its values, the device, the memory estimate, the run folder's name
  5. main

A run folder holds config.json (the resolved configuration), log.jsonl (one line per epoch), checkpoint.pt (model,
optimizer, early-stopping state and best state, the device it was written on, written atomically after every epoch)
and metrics.json (the result, and the device and settings that trained it).
Its default name is runs/<data>-<model>-<loss>-<hash of the configuration>, where a data file counts by its absolute
path (tiny.txt, ./tiny.txt and /abs/tiny.txt are one folder; a folder named by a path as typed, as earlier ones were,
is still found) and a benchmark by its name.
"""
import argparse
import errno
import glob
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, fields

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # before torch's import: see uniform_seqrec.py
import torch

import uniform_seqrec as U
from data_prep import (BENCHMARKS, DataError, OneLineErrorParser, benchmark_path, default_data_dir, download,
                       read_sequences, sha256_of)


# =============================================================================================================
# 1. One-line errors
# =============================================================================================================

class ConfigError(ValueError):
    """A command line the paper's setting cannot use; the message is one line naming the problem."""


class RunFolderError(ConfigError):
    """A run folder that cannot be created or written (full disk, no permission), or whose files are damaged; the
    message is one line naming the file and the problem, and nothing in the folder is changed."""


def one_line(err, limit=200):
    """An exception as one short line, for messages that quote it."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def say(line):
    """Print a line of a run's output. A closed output (`uniform_seqrec.py ... | head -1`) ends the output, not the
    run: what follows goes to /dev/null, and training goes on to its result."""
    try:
        print(line, flush=True)
    except BrokenPipeError:                     # Python ignores SIGPIPE, so a write to a closed pipe raises this
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the buffered rest and later lines too
        except (OSError, ValueError):
            pass


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
        reason = err.strerror if isinstance(err, OSError) and err.strerror else None
        failure = one_line(err)
    try:                                             # before the partial file is removed, which frees its space
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        free = None
    try:                                             # (after the except clause, which kept torch's writer open)
        os.remove(partial)
    except OSError:
        pass
    if reason is None:                               # torch's own words ("[enforce fail at inline_container.cc...")
        reason = (os.strerror(errno.ENOSPC) if free is not None and free < FULL_DISK_BYTES else
                  f"torch could not write it: {failure}")
    raise RunFolderError(f"cannot write {path} ({reason})" + (f"; {free:,} bytes free on its disk" if free is not None
                                                              else ""))


# Free space below which a write that failed without saying why (torch.save's RuntimeError) is a full disk: less than
# a checkpoint of the smallest model would need.
FULL_DISK_BYTES = 1 << 20


# =============================================================================================================
# 2. Run folders: what train() saves and resumes from; atomic writes, the lock, the progress line
# =============================================================================================================

class Paused(Exception):
    """A run stopped by --pause-after: its folder holds every epoch up to the checkpoint's, and nothing was tested."""


class PastPause(Exception):
    """A finished run asked for more epochs or patience with --pause-after N at or below the epochs it trained: its
    folder is left as it is (prepare_run_dir); args[0]: those epochs."""


class RunFolder:
    """The `run` of uniform_seqrec.train() kept in a folder: the checkpoint after every epoch, the log beside it,
    and what the user sees (each line through `log`, the progress line on a terminal). pause_after: the last epoch
    to train before stopping without a test (Paused), as --pause-after asks; None trains to the end. machine: what
    trains it (machine()), and commit: the code's (cells.py knows it), kept for the epochs this process trains in the
    checkpoint's `sessions` (None: none kept)."""

    def __init__(self, path, log=print, progress=None, statistics=lambda model: {}, pause_after=None, machine=None,
                 commit=None):
        self.path, self.print, self.statistics = path, log, statistics
        self.progress = ProgressLine() if progress is None else progress
        self.pause_after = pause_after
        self.saved_epoch = 0                                                # the epoch checkpoint.pt holds
        self.machine, self.commit, self.sessions, self.in_session = machine, commit, [], False
        self.resumed_on = []

    def __str__(self):
        return f"run folder {self.path}"

    def file(self, name):
        return os.path.join(self.path, name)

    def resume(self, model, optimizer):
        """restore() the checkpoint, if any. One that was written on another kind of device than this run's (a GPU's
        checkpoint resumed on the CPU) gets a line saying so and an entry in the run's resumed_on (metrics.json):
        the random streams of the epochs from there on are another device's, so the run's numbers are neither
        device's uninterrupted ones. (A checkpoint from before checkpoints named their device says nothing.) One
        whose last session (sessions) was another machine of the same kind, by its model, threads or torch, gets a line
        too: a CPU run's numbers repeat only on one machine with one number of threads."""
        state, best_weights, recorded = restore(self.file("checkpoint.pt"), model, optimizer)
        self.saved_epoch = state["epoch"]
        self.resumed_on = list(recorded.get("resumed_on", []))              # [{after_epoch, from, to}]
        self.sessions = list(recorded.get("sessions", []))      # [{first_epoch, last_epoch, machine, commit}]
        for name in ("checkpoint.pt.partial", "log.jsonl.partial", "metrics.json.partial", "stopped.json.partial"):
            if os.path.exists(self.file(name)):
                os.remove(self.file(name))
        if state["epoch"]:
            # log.jsonl is written after the checkpoint, so a kill between the two leaves it an epoch short; the
            # checkpoint holds every row
            self.write_log(state["history"])
            self.log(f"resuming {self.path} after epoch {state['epoch']} (best so far: epoch {state['best_epoch']})")
            written_on, here = recorded.get("device"), str(next(model.parameters()).device)
            if isinstance(written_on, str) and torch.device(written_on).type != torch.device(here).type:
                self.resumed_on.append({"after_epoch": state["epoch"], "from": written_on, "to": here})
                self.log(f"its checkpoint was written on {written_on}, and this run continues on {here}: the random "
                         f"streams (order, negatives, dropout) differ from epoch {state['epoch'] + 1} on, so its "
                         f"numbers will be neither device's uninterrupted ones (recorded in metrics.json, resumed_on)")
            elif self.sessions and self.machine and not same_machine(self.sessions[-1].get("machine"), self.machine):
                self.log(f"its epochs {self.sessions[-1]['first_epoch']}-{state['epoch']} were trained on "
                         f"{machine_label(self.sessions[-1].get('machine'))}, and this run continues on "
                         f"{machine_label(self.machine)}: its numbers from epoch {state['epoch'] + 1} on are this "
                         f"machine's, neither's uninterrupted ones (recorded in metrics.json, sessions)")
        return state, best_weights

    def save(self, model, optimizer, state, best_weights):
        self.unmark()                           # an epoch past the one that stopped the run: before the checkpoint
        self.note_session(state["epoch"])
        try:                                    # "best_model": the best weights' key since the first checkpoint
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                             "best_model": best_weights, "device": str(next(model.parameters()).device),
                             "resumed_on": self.resumed_on, "sessions": self.sessions}, self.file("checkpoint.pt"))
        except RunFolderError as err:
            kept = (f"the run folder keeps the checkpoint of epoch {self.saved_epoch}" if self.saved_epoch else
                    "no epoch's checkpoint was written yet, so the same command starts the run from its beginning")
            raise RunFolderError(f"{err}; {kept}") from None
        self.saved_epoch = state["epoch"]
        self.write_log(state["history"])

    def note_session(self, epoch):
        """Count `epoch` in this process's session: the last of `sessions`, or a new one. A session that continues
        the one before it on the same machine and commit (a pause, a kill) extends it, so that the list holds each
        stretch of epochs that one machine and commit trained."""
        if self.machine is None:
            return
        here = {"machine": self.machine, **({"commit": self.commit} if self.commit else {})}
        last = self.sessions[-1] if self.sessions else None
        if last and (self.in_session or (session_key(last) == session_key(here) and last["last_epoch"] == epoch - 1)):
            last["last_epoch"] = epoch
        else:
            self.sessions.append({"first_epoch": epoch, "last_epoch": epoch, **here})
        self.in_session = True

    def unmark(self):
        """Remove stopped.json, before the write that supersedes it (a checkpoint, metrics.json): a kill in between
        leaves a folder that a resume continues, never a marker that outlived its epoch."""
        if os.path.exists(self.file("stopped.json")):
            os.remove(self.file("stopped.json"))

    def stopped(self, err):
        """Mark the folder as stopped by non-finite numbers in its first epoch (a FloatingPointError before any
        checkpoint; after one, train() tests the best state and its result says why it stopped): stopped.json,
        {"reason", "epoch", "error"}. Epochs re-seed from (seed, epoch), so a resume stops there again (and rewrites
        it); one that gets past that epoch removes it (save). tuning.py's halving reads it."""
        reason = "non-finite loss" if str(err).startswith("non-finite loss") else "non-finite scores"
        try:
            save_atomically(json.dumps({"reason": reason, "epoch": self.saved_epoch + 1, "error": str(err)}) + "\n",
                            self.file("stopped.json"))
        except RunFolderError:
            pass                                    # the line main prints says why the run stopped all the same

    def write_log(self, history):
        save_atomically("".join(json.dumps(row) + "\n" for row in history), self.file("log.jsonl"))

    def log(self, line):
        self.progress.clear()
        self.print(line)

    def step(self, epoch, done, total):
        if done == 0 and self.pause_after is not None and epoch > self.pause_after:
            # An epoch past pause_after is about to start, its checkpoint saved: stop here, before any step. train()
            # starts an epoch only while early stopping lets it, so a run that stops by itself by pause_after is
            # tested as usual, and the stopping rule stays train()'s alone.
            raise Paused(f"paused after epoch {self.saved_epoch}")
        if done == 0:
            self.progress.start(f"epoch {epoch}")
        elif done == total:
            self.progress.clear()
        elif self.progress.enabled:
            self.progress.step(done, total)

    def finish(self, result, config, device_settings=None):
        """Write metrics.json: the result of train(), with the device, what device_settings() set on it, the
        resumes on another device (resumed_on; empty when every epoch ran on one kind) and the configuration (which
        holds the data file's fingerprint); `stopped` where non-finite numbers ended training (train()), and
        `sessions` where more than one machine or commit trained its epochs (note_session)."""
        result = {**result, "device": config["device"], "device_settings": device_settings,
                  "resumed_on": self.resumed_on, "config": config}
        if len({session_key(session) for session in self.sessions}) > 1:    # another machine or commit trained some
            result["sessions"] = self.sessions
        self.unmark()                                       # a marker left by code from before train() stopped so
        save_atomically(json.dumps(result, indent=2) + "\n", self.file("metrics.json"))
        stopped = f"; training stopped: {result['stopped']}" if "stopped" in result else ""
        self.log(f"test (best epoch {result['best_epoch']}{stopped}): " +
                 "  ".join(f"{k} {v:.4f}" for k, v in result["test"].items()))
        other = "all_items" if config["mask_seen"] else "history_excluded"
        self.log(f"  ({'every item ranked' if config['mask_seen'] else 'the history excluded'}: " +
                 "  ".join(f"{k} {v:.4f}" for k, v in result["protocols"][other]["test"].items()) + ")")
        self.log(f"its result: {self.file('metrics.json')}")


def read_checkpoint(checkpoint_path, device):
    """What a run folder's checkpoint.pt holds (RunFolder.save writes it): {"model", "optimizer", "state" (early
    stopping), "best_model", and where written since, "device", "resumed_on" and "sessions"}, loaded onto `device`
    (map_location: a checkpoint written on any device, a GPU or the CPU, loads onto any). The one reader of the file:
    restore() and experiments' re-ranking of a finished run (cells.best_state) read it here, and each names in one
    line whatever a truncated, foreign or garbled file raises."""
    return torch.load(checkpoint_path, map_location=device, weights_only=False)


def restore(checkpoint_path, model, optimizer):
    """Load the last checkpoint into model and optimizer, if any. Returns (early-stopping state, best model, what
    the checkpoint records of its devices: {"device": where it was written, "resumed_on": [...], "sessions": [...]},
    empty when there is no checkpoint or it is from before checkpoints recorded them).

    The optimizer keeps the implementation this device's adam() chose (fused, foreach): load_state_dict would put
    back the saved param_groups' flags, another device's choice (MPS without a fused Adam, say, resumed on CUDA),
    and Adam's step counts go where that choice keeps them (fused: on the device; otherwise on the host)."""
    if not os.path.exists(checkpoint_path):
        return U.early_stopping_state(), {k: v.clone() for k, v in model.state_dict().items()}, {}
    chosen = [{k: group[k] for k in ("fused", "foreach", "capturable") if k in group} for group in
              optimizer.param_groups]
    try:  # map_location: a checkpoint written on any device (a GPU, the CPU) loads onto this run's device
        checkpoint = read_checkpoint(checkpoint_path, next(model.parameters()).device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group, choice in zip(optimizer.param_groups, chosen):
            group.update(choice)
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor):
                    optimizer.state[p]["step"] = step.to(p.device if on_device else "cpu",
                                                         torch.float32 if on_device else torch.get_default_dtype())
        recorded = {}
        if isinstance(checkpoint.get("device"), str):
            torch.device(checkpoint["device"])                              # a name torch knows, or "damaged"
            recorded["device"] = checkpoint["device"]
        for key in ("resumed_on", "sessions"):
            if isinstance(checkpoint.get(key), list):
                recorded[key] = checkpoint[key]
        epochs_of = lambda session: [session.get(k) for k in ("first_epoch", "last_epoch")] if isinstance(
            session, dict) else [None]
        if not all(isinstance(e, int) for session in recorded.get("sessions", []) for e in epochs_of(session)):
            raise ValueError("its sessions are not a list of {first_epoch, last_epoch, machine}")
        return checkpoint["state"], checkpoint["best_model"], recorded
    except Exception as err:  # whatever a truncated, foreign or garbled file raises (zip, pickle, key, shape errors)
        raise RunFolderError(f"{checkpoint_path} is damaged or not this run's checkpoint ({one_line(err)}); nothing "
                             f"was changed: remove it to train this run from its start") from None


def prepare_run_dir(config, run_dir, log=print, pause_after=None):
    """Create the run folder, or check that an existing one holds this same configuration, trained on the same data.
    A run asked for more epochs or patience than its folder has is extended: the folder's config.json takes the
    larger values (and `config` too; a run is never shortened). Returns the folder's lock (lock_run_dir), held
    before anything in the folder changes: a folder that another process is training is refused as it is, without
    an "extending" line or a rewritten config.json (which would have made that run's finished result look short).
    pause_after: a finished run that would be extended but has trained that many epochs already raises PastPause,
    its folder untouched (metrics.json kept, config.json as it was)."""
    saved_path = os.path.join(run_dir, "config.json")
    config["data_fingerprint"] = data_fingerprint(config["data_path"])
    if os.path.isfile(saved_path):
        lock = lock_run_dir(run_dir)
        try:
            extend_run_dir(config, run_dir, saved_path, log, pause_after)
        except BaseException:
            lock.close()
            raise
        return lock
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunFolderError(f"{run_dir} is a file, not a run folder; choose another --out")
    missing = []                                                            # the folders this call creates
    folder = os.path.abspath(run_dir)
    while not os.path.exists(folder) and folder != os.path.dirname(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    lock = None
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = lock_run_dir(run_dir)              # a folder without config.json: another process may be starting it
        if os.path.isfile(saved_path):            # ...and has written it meanwhile: judge it as an existing run's
            extend_run_dir(config, run_dir, saved_path, log, pause_after)
        else:
            save_atomically(json.dumps(config, indent=2) + "\n", saved_path)
        return lock
    except (OSError, ConfigError) as err:
        if lock is not None:
            lock.close()
            if missing:                                                     # a folder this call made: leave none
                try:
                    os.remove(os.path.join(run_dir, ".lock"))
                except OSError:
                    pass
        for folder in missing:                                              # innermost first; only if still empty
            try:
                os.rmdir(folder)
            except OSError:
                pass
        if isinstance(err, ConfigError):
            raise
        raise RunFolderError(f"cannot create the run folder {run_dir} ({err.strerror or err})") from None


def extend_run_dir(config, run_dir, saved_path, log, pause_after=None):
    """prepare_run_dir for a folder that holds a run, its lock held: the same configuration and data, or a one-line
    ConfigError; more epochs or patience are written into its config.json, unless the run has finished and trained
    pause_after epochs or more (PastPause: nothing written)."""
    saved = read_json(saved_path, "choose another --out, or remove the folder to start over")
    differing = [k for k in config if k not in RUN_ONLY_KEYS + EXTENDABLE_KEYS
                 and not same_setting(k, saved.get(k, LATER_KEYS.get(k)), config[k])]
    if differing:
        key = differing[0]
        raise ConfigError(f"{run_dir} holds a run with --{key.replace('_', '-')} {saved.get(key)}, not "
                          f"{config[key]}; choose another --out")
    check_same_data(config, saved, run_dir)
    config["data"] = saved["data"]                  # the folder's own spelling of its file: its name's hash stays
    limits = {k: saved[k] for k in EXTENDABLE_KEYS if isinstance(saved.get(k), int) and saved[k] > config[k]}
    config.update(limits)                                                   # never shortened
    extended = [k for k in EXTENDABLE_KEYS if saved.get(k) != config[k]]
    if pause_after is not None and extended:
        trained = finished_epochs(run_dir)
        if trained is not None and trained >= pause_after:
            raise PastPause(trained)
    if extended or saved.get("data_fingerprint") != config["data_fingerprint"]:
        if extended:
            log(f"extending {run_dir} to " + ", ".join(f"--{k} {config[k]} (was {saved.get(k)})" for k in extended))
        save_atomically(json.dumps({**saved, **{k: config[k] for k in EXTENDABLE_KEYS + ("data_fingerprint",)}},
                                   indent=2) + "\n", saved_path)


def finished_epochs(run_dir):
    """The epochs a run folder's metrics.json says its finished run trained, or None (no such file, or not a number:
    main judges a damaged one)."""
    try:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            epochs = json.load(f).get("epochs")
    except (OSError, ValueError, AttributeError):
        return None
    return epochs if isinstance(epochs, int) and not isinstance(epochs, bool) else None


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
# 3. Figure 1's statistics, logged every epoch (Wang & Isola's alignment and uniformity, the cosine histograms)
# =============================================================================================================

def statistics_sample(flat, starts, lengths, num_items, max_len, size=1000):
    """A fixed sample (seed 0) for embedding_statistics(): validation histories of `size` users, `size` item ids,
    and `size` training pairs (history, positive)."""
    generator = torch.Generator().manual_seed(0)
    users = torch.randperm(len(lengths), generator=generator)[:size].to(flat.device)
    histories = U.gather_histories(flat, *U.evaluation_examples(starts[users], lengths[users], max_len, "valid"),
                                   max_len)
    items = (torch.randperm(num_items, generator=generator)[:size] + 1).to(flat.device)
    target_at, history_lengths, pair_users = U.training_examples(starts, lengths, max_len)
    pairs = torch.randperm(len(target_at), generator=generator)[:size].to(flat.device)
    return {"histories": histories, "users": users, "items": items, "pair_users": pair_users[pairs],
            "pair_histories": U.gather_histories(flat, target_at[pairs], history_lengths[pairs], max_len),
            "positives": flat[target_at[pairs]]}


@torch.no_grad()
def embedding_statistics(model, sample, bins=40, t=2.0):
    """On the fixed sample of statistics_sample(), in Wang & Isola's terms: the pairwise cosine similarities of
    history vectors and of item vectors (mean and histogram over [-1, 1], Figure 1), their uniformity
    log mean_{x<y} exp(-t ||x - y||^2), and the alignment mean ||h - i||^2 of normalized training pairs (history,
    its positive). Lower is better for both: aligned pairs, uniformly spread vectors. t = 2 is Wang & Isola's
    choice, kept whatever the loss's t, so that every run is measured alike."""
    was_training = model.training
    model.eval()
    result = {}
    history_vectors = model.encode(sample["histories"], users=sample["users"])  # (S, d)
    for name, vectors in (("history", history_vectors), ("item", model.output_items()(sample["items"]))):
        unit = torch.nn.functional.normalize(vectors, dim=-1)
        upper = torch.triu_indices(len(unit), len(unit), 1, device=unit.device)
        cosines = (unit @ unit.T)[upper[0], upper[1]]
        result[f"{name}_mean_cosine"] = cosines.mean().item()
        result[f"{name}_uniformity"] = torch.log(torch.exp(-t * (2 - 2 * cosines)).mean()).item()  # ||x-y||^2 = 2-2cos
        result[f"{name}_cosine_histogram"] = torch.histc(cosines.float(), bins, -1, 1).long().tolist()
    unit = torch.nn.functional.normalize
    h = unit(model.encode(sample["pair_histories"], users=sample["pair_users"]), dim=-1)  # (S, d)
    i = unit(model.output_items()(sample["positives"]), dim=-1)                           # (S, d)
    result["alignment"] = (h - i).square().sum(-1).mean().item()
    model.train(was_training)
    return result


def epoch_statistics(config, sequences):
    """The function that RunFolder.statistics calls each epoch: embedding_statistics on a fixed sample of this
    run's data, on its device and with its history length (as train() reads them)."""
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, torch.device(config["device"]))
    sample = statistics_sample(flat, starts, lengths, num_items, U.history_limit(config, lengths))
    return lambda model: embedding_statistics(model, sample)


# =============================================================================================================
# 4. Command line
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
                    "paper's uniformity loss (or, beyond the paper, cross-entropy over every item), early-stopped on "
                    "validation NDCG@10, and report test HR/NDCG@5/10/20 ranking every item for every user.",
        epilog="Ablations of the paper's Table 2 (with --loss uniform): (b) --no-hom --no-het, (c) --no-het, "
               "(d) --no-hom, (e) nothing, (f) --no-rec, (g) --no-normalize; row (a) is --loss bce. "
               "A run writes config.json, log.jsonl, checkpoint.pt and metrics.json into its run folder; running "
               "the same command again resumes it.")
    what = parser.add_argument_group("what to train")
    what.add_argument("--model", choices=["gru4rec", "caser", "sasrec"], help="backbone")
    what.add_argument("--loss", choices=["bce", "bpr", "infonce", "uniform", "ce"],
                      help="training objective; 'uniform' is the paper's eq. 6; 'ce', beyond the paper, is softmax "
                           "cross-entropy of the positive over every item (RecBole's SASRec default), no negatives")
    what.add_argument("--data", help=f"benchmark ({', '.join(BENCHMARKS)}) or the path of a one-line-per-user file")
    what.add_argument("--data-dir", default=default_data_dir(),
                      help="folder holding the benchmark files (environment variable UNIFORM_SEQREC_DATA)")
    model = parser.add_argument_group("model (paper appendix B grid: dim 32/64/128, layers and heads 1/2/3)")
    model.add_argument("--dim", type=int, help="embedding size d")
    model.add_argument("--layers", type=int,
                       help="SASRec blocks / GRU4Rec GRU layers (default: the original's, 2 for SASRec, 1 for "
                            "GRU4Rec)")
    model.add_argument("--heads", type=int, help="SASRec attention heads (must divide --dim)")
    model.add_argument("--dropout", type=float, help="dropout rate")
    model.add_argument("--max-len", type=int, help="histories keep their last MAX_LEN items")
    model.add_argument("--block", choices=["pre-ln", "original"],
                       help="SASRec: its blocks as GPT-2's pre-LayerNorm x + f(LN(x)) (pre-ln), or as the original "
                            "SASRec's (original: LayerNorm on the attention's queries only, keys and values from the "
                            "unnormalized input, residuals adding the normalized input, LN(x) + f(LN(x)))")
    model.add_argument("--caser-window", type=int, help="Caser: the last L items it convolves")
    model.add_argument("--caser-activation", choices=["relu", "none"],
                       help="Caser: activation of its fully connected layer (the original's ReLU, or none)")
    model.add_argument("--caser-users", action="store_true",
                       help="Caser: add the original's user embedding (joined by a second layer, as RecBole does)")
    model.add_argument("--caser-output-table", action="store_true",
                       help="Caser: score items with a table of their own, as the original does, not the input table")
    loss = parser.add_argument_group("uniformity loss (eq. 6) and its ablations (Table 2)")
    loss.add_argument("--beta", type=float, help="weight beta1 = beta2 of L_hom and L_het")
    loss.add_argument("--t", type=float, help="Gaussian potential exp(-t ||x - y||^2)")
    loss.add_argument("--no-normalize", dest="normalize", action="store_false",
                      help="score and regularise raw vectors (row g)")
    loss.add_argument("--no-rec", dest="rec", action="store_false", help="drop L_rec (row f)")
    loss.add_argument("--no-hom", dest="hom", action="store_false", help="drop L_hom")
    loss.add_argument("--no-het", dest="het", action="store_false", help="drop L_het")
    loss.add_argument("--infonce-negatives", type=int, metavar="K",
                      help="InfoNCE: each history's own negative and the next K-1 of the batch; 1 makes InfoNCE "
                           "equal to BPR (default: all the batch's negatives)")
    fit = parser.add_argument_group("training")
    fit.add_argument("--lr", type=float, help="Adam learning rate (grid: 1e-4, 2e-4, 3e-4)")
    fit.add_argument("--negatives", choices=["unseen", "any"],
                     help="what a negative may be: none of the user's training items (unseen, as S3-Rec), or any "
                          "item but the example's own positive (any, as RecBole and the authors' code)")
    fit.add_argument("--batch-size", type=int, help="triplets per batch")
    fit.add_argument("--epochs", type=int, help="at most this many epochs")
    fit.add_argument("--patience", type=int, help="stop after this many epochs without a better validation NDCG@10")
    fit.add_argument("--length-groups", type=int,
                     help="encode each batch in this many length-sorted groups, each padded only to its own "
                          "longest history; speed only (default 8, and 1 for Caser, which reads only its last "
                          "L items)")
    fit.add_argument("--pack", action="store_true",
                     help="SASRec: lay each batch's histories end to end, several to a row, each attending only "
                          "to its own; speed only (an epoch about 1.4x faster on a CPU; the loss is the same, its "
                          "float rounding and dropout draws differ; see docs/performance.md)")
    fit.add_argument("--examples", choices=["prefixes", "users"],
                     help="prefixes: one triplet per prefix of each user's training part, each encoded alone (the "
                          "paper's authors' reading; every recorded cell); users: GRU4Rec and SASRec read each "
                          "user's training part in one causal pass, a triplet at every position (the same pairs, "
                          "windows of MAX_LEN inputs, batches of whole users of about BATCH_SIZE triplets; with "
                          "SASRec add --pack; faster, quality not measured yet: README, \"Train\")")
    fit.add_argument("--seed", type=int, help="every random draw follows from it")
    fit.add_argument("--device", help="auto (cuda, then mps, then cpu), or a torch device")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--mask-seen", action="store_true",
                            help="never recommend items of the user's history (S3-Rec style; off in the paper "
                                 "reproduction, so that repeated Yelp targets stay reachable)")
    runs = parser.add_argument_group("run folder")
    runs.add_argument("--out", help="run folder (default: runs/<data>-<model>-<loss>-<hash of the configuration>)")
    runs.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its saved configuration")
    runs.add_argument("--pause-after", type=int, metavar="EPOCH",
                      help="stop once epoch EPOCH is trained and saved, without testing (no metrics.json); the same "
                           "command without it, or with a larger EPOCH, continues the run as an interrupted one "
                           "resumes. Not part of the configuration: the run folder is the same. A run that early "
                           "stopping ends by EPOCH finishes as usual")
    parser.set_defaults(**CONFIG_DEFAULTS)
    return parser


# The defaults of the flags that set the method's Config are its fields' (None: resolved by Config from the others)
CONFIG_DEFAULTS = {field.name: field.default for field in fields(U.Config)}


# keys of the configuration that do not change the result, so may differ when a run is resumed
RUN_ONLY_KEYS = ("device", "data_dir", "data_path", "data_fingerprint", "out", "resume", "pause_after")
# keys a run can be extended in: asked for more, a run continues from its checkpoint in its own folder
EXTENDABLE_KEYS = ("epochs", "patience")
# Keys added after runs had been recorded, with the value that every earlier run had without saying so. At that value
# a key stays out of the configuration's hash, so the run folders of earlier configurations keep their names.
LATER_KEYS = {"infonce_negatives": None, "caser_activation": "none", "caser_users": False,
              "caser_output_table": False, "negatives": "unseen", "block": "pre-ln", "pack": False,
              "examples": "prefixes"}


SEE_DEVICES = ("see which there are with: python -c \"import torch; print(torch.cuda.device_count(), 'CUDA', "
               "torch.backends.mps.is_available(), 'MPS')\"")


def resolve_device(name):
    """'auto' -> cuda, then mps, then cpu; any other name must be a device torch knows and this machine has."""
    if name == "auto":
        return U.auto_device()
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


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's model as the system names it (Linux: the first processor's "model name" in /proc/cpuinfo, with its
    family and model numbers, since a virtual machine may name only "AMD EPYC"; elsewhere what platform says), or
    None when neither says. A CPU run's numbers repeat exactly only on the same machine: another one may round floats
    otherwise, and that compounds over the epochs (docs/results.md, "What counts as a win")."""
    fields = {}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():                                        # the first processor's block ends
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if not fields.get("model name"):
        return platform.processor() or None
    numbers = [f"{label} {fields[key]}" for label, key in (("family", "cpu family"), ("model", "model"))
               if fields.get(key)]
    return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")


def device_settings(device):
    """Set what "same command, same seed, same numbers" needs on `device`, and return what trains the run, for its
    metrics.json. Called once, before training; importing this file sets nothing.

    The CPU needs nothing: its kernels repeat given the same threads (recorded). CUDA's defaults do not repeat, so
    on CUDA: no TF32 (cuDNN allows it by default for Caser's convolutions and the GRU; off for matrix products, and
    kept off), cuDNN's deterministic algorithms and no benchmarking (which picks algorithms by timing them), cuBLAS
    with a fixed workspace (CUBLAS_WORKSPACE_CONFIG, unless already set; cuBLAS reads it at its first use, after
    this), and torch.use_deterministic_algorithms, which picks the deterministic version of an op where torch has
    one (index_put with accumulation, scatter) and warns, naming the op, where it has none (warn_only: it would
    otherwise stop the run). One such warning is silenced: histc's, whose atomic additions add 1.0 to counts far
    below 2**24, exact in any order. MPS has no TF32 and no such switches: nothing is set. What this does not
    promise: the CPU's numbers on a GPU (other random generators, other kernels); the same numbers on another GPU
    model or another CUDA, cuDNN or torch version; or a run that resumes on another device than the one its
    checkpoint was written on (see RunFolder.resume)."""
    device = torch.device(device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        with warnings.catch_warnings():                                     # a torch that deprecates the flags
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        warnings.filterwarnings("ignore", message=r"\S*histc\S* does not have a deterministic implementation")
    settings = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "float32_matmul_precision": torch.get_float32_matmul_precision(), "cpu": cpu_model(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # the vector kernels torch runs (AVX2...)
    if device.type == "cuda":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            settings.update({"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                             "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32})
        settings.update({
            "name": torch.cuda.get_device_name(device) if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")})
    elif device.type == "mps":
        settings["macos"] = platform.mac_ver()[0] or None
    return settings


def machine(settings):
    """The machine that device_settings() describes, as a run's sessions and its cell's record name it: {"device",
    "name" (the GPU's name on CUDA, else the CPU's model; None where a run's settings predate naming it), "torch",
    "threads", "cpu_capability" (the vector kernels torch ran on the CPU)}, or None without settings."""
    if not isinstance(settings, dict):
        return None
    on_gpu = str(settings.get("device", "")).startswith("cuda")
    return {"device": settings.get("device"), "name": settings.get("name" if on_gpu else "cpu"),
            "torch": settings.get("torch"), "threads": settings.get("threads"),
            "cpu_capability": settings.get("cpu_capability")}


def session_key(session):
    """What tells two sessions (RunFolder.note_session) apart: their machine, its device by kind (cuda:0 and cuda:1
    alike), and their commit."""
    described = session.get("machine")
    kind = {**described, "device": str(described.get("device")).split(":")[0]} if isinstance(described, dict) else None
    return json.dumps([kind, session.get("commit")], sort_keys=True)


def same_machine(first, second):
    """Whether two machine() descriptions are one machine for a run's numbers: the same kind of device, model, torch,
    threads and vector kernels."""
    return session_key({"machine": first}) == session_key({"machine": second})


def machine_label(machine):
    """A machine() description in a few words: 'AMD EPYC (family 25, model 17), AVX512, torch 2.13.0, 1 thread' (a
    GPU: its name and torch); what a run did not record is said, never filled in from this machine."""
    if not isinstance(machine, dict):
        return "machine not recorded"
    on_cpu = not str(machine.get("device")).startswith("cuda")
    threads, capability = machine.get("threads"), machine.get("cpu_capability")
    return ", ".join([machine.get("name") or f"{machine.get('device')} (model not recorded)",
                      *([capability] if on_cpu and capability else []),
                      f"torch {machine.get('torch') or 'not recorded'}",
                      *([f"{threads} thread{'s' * (threads != 1)}"] if on_cpu and isinstance(threads, int) else [])])


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
    if config.get("pause_after") is not None and not 0 < config["pause_after"] <= MAX_INT:
        raise ConfigError(f"--pause-after must be an epoch from 1 to 2**63 - 1 (got {config['pause_after']})")
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
    if config["loss"] == "ce" and config["negatives"] != "unseen":   # CE reads no negatives: the same run, renamed
        raise ConfigError("--negatives only applies to losses with sampled negatives, not --loss ce (it scores "
                          "every item)")
    if config["infonce_negatives"] is not None:
        if config["loss"] != "infonce":
            raise ConfigError("--infonce-negatives only applies to --loss infonce")
        if not config["infonce_negatives"] > 0:
            raise ConfigError(f"--infonce-negatives must be positive (got {config['infonce_negatives']})")


def device_memory(device):
    """Bytes of memory a run on a torch.device can count on: a CUDA GPU's free memory (torch.cuda.mem_get_info:
    what other processes hold is not there to take), the most Metal recommends for MPS
    (torch.mps.recommended_max_memory, where this torch has it), or the machine's memory (CPU, and MPS in a torch
    without it; MPS shares the machine's memory); None where that cannot be told (a device that fails to answer
    fails again, with one line, when training starts)."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
            return torch.mps.recommended_max_memory()
    except RuntimeError:
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):                            # no sysconf on Windows
        return None


# What device_memory's number is, in check_memory's line: "more than the 7.5 GiB free on cuda"
MEMORY_WORDS = {"cuda": "free on", "mps": "that Metal recommends at most for"}


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
    # CE's B x (N + 1) logits: 5 copies at its peak (the logits, the softmax's exponentials, their gradients; the
    # peak resident set of ce_loss's forward and backward, measured with B = 4,096 and Yelp's 20,034 ids)
    logits = 5 * B * rows if config["loss"] == "ce" else 0
    of_logits = f", and its {B:,} x {rows:,} logits (--loss ce)" if logits else ""
    return {f"the item table ({rows:,} rows, one per id up to the largest, x --dim {d})": 4 * 6 * rows * d,
            f"the model's weights ({flags})": 4 * 6 * weights,
            f"one batch ({B:,} triplets, histories of up to {T} items; --batch-size {config['batch_size']}, {flags})"
            f"{of_logits}": 4 * (activations + pairs + logits),
            f"evaluation (1,024 users x {rows:,} scores)": 12 * 1024 * rows}


def check_memory(config, sequences):
    """One line, before any folder exists, when training could never fit the device's memory."""
    available = device_memory(torch.device(config["device"]))
    terms = memory_estimate(config, sequences)
    if available and sum(terms.values()) > available:
        biggest, gib = max(terms, key=terms.get), sum(terms.values()) / 2 ** 30
        table, _, batch, scores = terms                                    # the terms that grow with the ids
        largest, distinct = max(max(s) for s in sequences), len({i for s in sequences for i in s})
        sparse = ""
        if (biggest in (table, scores) or biggest == batch and config["loss"] == "ce") and largest > 2 * distinct:
            sparse = f" (item ids run up to {largest:,} for {distinct:,} items: number them 1..{distinct:,})"
        words = MEMORY_WORDS.get(torch.device(config["device"]).type, "of")
        raise ConfigError(f"training would need about {gib:,.{1 if gib < 100 else 0}f} GiB, more than the "
                          f"{available / 2 ** 30:,.1f} GiB {words} {config['device']}; most of it for {biggest}"
                          f"{sparse}")


def data_fingerprint(path):
    """Size and SHA-256 of a data file: what a run folder records of the data it was trained on. Only of a regular
    file: a pipe read a second time gives nothing, and "0 bytes" would let a run on other data pass for this one."""
    if not os.path.isfile(path):
        raise DataError(f"{path} is not a regular file, so its data cannot be fingerprinted; save it to a file")
    try:
        return {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err})") from None


def check_same_data(config, saved, run_dir):
    """One line when the run in run_dir was trained on other data than config's data file. A folder from before
    runs recorded their data is accepted when the file is the published benchmark it names."""
    current, recorded = config["data_fingerprint"], saved.get("data_fingerprint")
    if recorded is None:
        if current["sha256"] != BENCHMARKS.get(config["data"], ("", ""))[1]:
            raise ConfigError(f"{run_dir} does not record the data it was trained on, and {config['data_path']} is "
                              f"not the published {config['data']} file it could be checked against; choose another "
                              f"--out")
    elif recorded != current:
        raise ConfigError(f"{run_dir} was trained on other data than {config['data_path']} ({recorded.get('bytes')} "
                          f"bytes, SHA-256 {str(recorded.get('sha256'))[:12]}..., against {current['bytes']} bytes, "
                          f"{current['sha256'][:12]}...); choose another --out, or give it the file it was trained on")


def names_a_file(data):
    """--data is a path (any spelling of it), not a benchmark's name."""
    return isinstance(data, str) and data not in BENCHMARKS


def same_setting(key, saved, value):
    """A run folder's saved setting and a command's are the same: equal, or for --data two paths, however spelled
    (tiny.txt, ./tiny.txt, its absolute path, or another copy of the file): whether they hold the same data is the
    data fingerprint's to say (check_same_data), not the spelling's."""
    return saved == value or (key == "data" and names_a_file(saved) and names_a_file(value))


def extended_folder(config, run_dir):
    """The folder of a run of this same configuration started with fewer epochs or less patience, which the run
    continues in (so that asking for more extends a run instead of starting over); run_dir when there is none. A
    data file is the same when the folder's was the same file (its data_path), whatever the spelling of --data."""
    if os.path.exists(run_dir):
        return run_dir
    same = lambda saved: all(saved.get(k, LATER_KEYS.get(k)) == v or (
        k == "data" and same_setting(k, saved.get(k), v) and saved.get("data_path") == config["data_path"])
        for k, v in config.items() if k not in RUN_ONLY_KEYS + EXTENDABLE_KEYS)
    for path in sorted(glob.glob(os.path.join(os.path.dirname(run_dir), "*", "config.json"))):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            continue                                                        # not ours to judge here
        if isinstance(saved, dict) and same(saved) and all(
                isinstance(saved.get(k), int) and saved[k] <= config[k] for k in EXTENDABLE_KEYS):
            return os.path.dirname(path)
    return run_dir


def data_path_of(config, fetch=False):
    """--data is a benchmark name (looked up in --data-dir) or a path. fetch: a missing benchmark is downloaded as
    `python data_prep.py NAME` does it (checksum-verified, nothing half-written), saying so in one line."""
    if config["data"] in BENCHMARKS:
        path = benchmark_path(config["data"], config["data_dir"])
        if not os.path.isfile(path) and fetch:
            return download(config["data"], config["data_dir"], log=say)
        if not os.path.isfile(path):
            raise DataError(f"{path} not found; get it with: python data_prep.py {config['data']} "
                            f"--data-dir {config['data_dir']}")
        return path
    if os.path.exists(config["data"]):
        if not (os.path.isfile(config["data"]) or os.path.isdir(config["data"])):  # folders: read_sequences
            raise DataError(f"{config['data']} is not a regular file (a pipe, socket or device): a run's data is read "
                            f"to train and again for its fingerprint, which a pipe cannot give twice; save it to a "
                            f"file and give that")
        return config["data"]
    if os.sep in config["data"] or "." in config["data"]:
        raise DataError(f"no such data file: {config['data']}")
    raise ConfigError(f"unknown dataset '{config['data']}': not one of {', '.join(BENCHMARKS)} and no such file")


def check_saved_config(saved, path):
    """A run folder's config.json holds every setting of the command line, each of the type (and among the
    choices) the command line would have given it: else a one-line ConfigError naming the key."""
    for action in build_parser()._actions:
        key = action.dest
        if key in RUN_ONLY_KEYS + ("help",):
            continue
        value = saved.get(key, ...)
        if key in ("layers", "length_groups", "infonce_negatives") and value is None:
            continue                                                        # resolved later, or "the whole batch"
        if action.nargs == 0:
            kind = bool
        else:
            kind = {int: int, float: (int, float)}.get(action.type, str)
        fits = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if not fits or (action.choices and value not in action.choices):
            what = "is missing" if value is ... else f"is {value!r}, not " + (
                f"one of {', '.join(action.choices)}" if action.choices and fits else
                {bool: "true or false", int: "a whole number", str: "text"}.get(kind, "a number"))
            raise ConfigError(f"{path}: '{key}' {what}; this folder cannot be resumed (remove it to start over)")


def configuration_id(config):
    """Short hash of everything that changes the result: equal configurations share a default run folder."""
    kept = {k: v for k, v in sorted(config.items())
            if k not in RUN_ONLY_KEYS and not (k in LATER_KEYS and v == LATER_KEYS[k])}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def configure(argv, fetch=False):
    """Parse the command line into the resolved configuration and its run folder; fetch: download a missing
    benchmark (data_path_of)."""
    config = vars(build_parser().parse_args(argv))
    typed_only = build_parser()
    typed_only.set_defaults(**dict.fromkeys(config))                        # a typed flag never parses to None
    given = {k: v for k, v in vars(typed_only.parse_args(argv)).items() if v is not None}
    if config["resume"]:
        saved_path = os.path.join(config["resume"], "config.json")
        if not os.path.isfile(saved_path):
            raise ConfigError(f"--resume {config['resume']}: no config.json there, not a run folder")
        saved = {**LATER_KEYS, **read_json(saved_path, "this folder cannot be resumed")}
        check_saved_config(saved, saved_path)
        for key, value in given.items():
            if key not in RUN_ONLY_KEYS + EXTENDABLE_KEYS and not same_setting(key, saved.get(key), value):
                raise ConfigError(f"--resume {config['resume']}: that run has --{key.replace('_', '-')} "
                                  f"{saved.get(key)}, this command asks for {value}")
        config = {**saved, **{k: v for k, v in given.items() if k in RUN_ONLY_KEYS + EXTENDABLE_KEYS + ("data",)},
                  "resume": config["resume"]}                  # --data: where its file is now (its fingerprint checked)
        config.setdefault("data_dir", default_data_dir())
    if config["model"] != "caser":
        typed = [key for key in ("caser_activation", "caser_users", "caser_output_table") if key in given]
        if typed:
            raise ConfigError(f"--{typed[0].replace('_', '-')} only applies to --model caser")
    if config["pack"] and config["model"] != "sasrec":
        raise ConfigError("--pack only applies to --model sasrec (GRU4Rec's recurrence cannot share a row; Caser "
                          "reads only its last L items)")
    if config["examples"] == "users" and config["model"] not in ("gru4rec", "sasrec"):
        raise ConfigError("--examples users only applies to GRU4Rec and SASRec")
    if config["model"] != "sasrec" and "block" in given:
        raise ConfigError("--block only applies to --model sasrec")
    # the method's settings resolved as a notebook's Config resolves them (layers, length groups, Caser's activation,
    # InfoNCE's whole batch, the device "auto"): the command line and a Config give one configuration
    config.update(asdict(U.Config(**{key: config[key] for key in CONFIG_DEFAULTS})))
    check_config(config)
    try:
        config["data_path"] = os.path.abspath(data_path_of(config, fetch))
    except (DataError, ConfigError):
        started_with = config.get("data_path") if config["resume"] and not {"data", "data_dir"} & set(given) else None
        if not (isinstance(started_with, str) and os.path.isabs(started_with) and os.path.isfile(started_with)):
            raise
        config["data_path"] = started_with                # --resume from another working directory: the same file
    as_typed = config["data"]
    if names_a_file(as_typed):            # one file, one hash: tiny.txt, ./tiny.txt and /abs/tiny.txt alike
        config["data"] = config["data_path"]
    config["device"] = resolve_device(config["device"])
    name = as_typed if as_typed in BENCHMARKS else os.path.splitext(os.path.basename(as_typed))[0]
    default = lambda data: os.path.join(
        "runs", f"{name}-{config['model']}-{config['loss']}-{configuration_id({**config, 'data': data})}")
    if config["resume"] or config["out"]:
        return config, config["resume"] or config["out"]
    run_dir = default(config["data"])
    if not os.path.exists(run_dir) and os.path.exists(default(as_typed)):
        run_dir = default(as_typed)       # a folder named by --data as typed, from before a file's paths were one
    return config, run_dir


# =============================================================================================================
# 5. main
# =============================================================================================================

def device_failure(err, device):
    """One line for an error torch raised while training on `device`: out of memory (CUDA, MPS, the CPU's
    allocator), an op this torch lacks for MPS (NotImplementedError, a RuntimeError), a CUDA or MPS error, and the
    remedy where there is one."""
    text = one_line(err, limit=300)
    if isinstance(err, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in text.lower():
        return f"{device} ran out of memory ({text}); a smaller --batch-size or --dim needs less (another run)"
    if isinstance(err, NotImplementedError) and "MPS" in text:
        return (f"{device} cannot run an op of this torch ({text}); PYTORCH_ENABLE_MPS_FALLBACK=1 runs it on the "
                f"CPU instead, or train with --device cpu")
    return f"{device} failed ({text})"


def main(argv=None, commit=None):
    """The command line; commit: the code's commit where the caller knows it (cells.run_cell), for the sessions."""
    signal.signal(signal.SIGINT, signal.default_int_handler)               # Ctrl-C is KeyboardInterrupt again
    run = config = None
    on_device = False                              # from here a RuntimeError is the device's; before it, a bug's
    try:
        config, run_dir = configure(argv, fetch=True)
        pause_after = config.pop("pause_after", None)      # how far to train now, not the run's: not in config.json
        if not (config["out"] or config["resume"]):
            run_dir = extended_folder(config, run_dir)
        sequences = read_sequences(config["data_path"])                     # bad data fails before any folder exists
        check_memory(config, sequences)
        lock = prepare_run_dir(config, run_dir, log=say, pause_after=pause_after)  # noqa: F841 - held till return
        metrics_path = os.path.join(run_dir, "metrics.json")
        if os.path.isfile(metrics_path):
            finished = read_json(metrics_path, "remove it to test the run's best state again")
            test, done, best = finished.get("test"), finished.get("epochs"), finished.get("best_epoch")
            number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
            if not (isinstance(test, dict) and test and all(number(v) for v in test.values())
                    and isinstance(done, int) and isinstance(best, int)):
                raise RunFolderError(f"{metrics_path} has no test results; remove it to test the run's best state "
                                     f"again")
            stopped = finished.get("stopped")      # non-finite numbers ended it: a resume would stop there again
            if done >= config["epochs"] or done - best >= config["patience"] or isinstance(stopped, str):
                why = f" (training stopped: {stopped})" if isinstance(stopped, str) else ""
                say(f"{run_dir} is finished{why}: test " + "  ".join(f"{k} {v:.4f}" for k, v in test.items()))
                say(f"its result: {metrics_path}")
                return 0
            os.remove(metrics_path)                                         # extended: a new result will replace it
        on_device = True                                   # epoch_statistics copies the data to the device
        run = RunFolder(run_dir, log=say, statistics=epoch_statistics(config, sequences), pause_after=pause_after,
                        commit=commit)
        settings = device_settings(config["device"])                        # once, before training
        run.machine = machine(settings)
        run.finish(U.train(config, sequences, run), config, settings)
    except PastPause as past:
        say(f"{run_dir} is already past --pause-after {pause_after} (finished: {past.args[0]} epochs); left as it is")
        return 0
    except Paused:
        run.progress.clear()
        past = f" (already past --pause-after {pause_after})" if run.saved_epoch > pause_after else ""
        say(f"{run_dir}: paused after epoch {run.saved_epoch}{past}, not tested yet; the same command without "
            f"--pause-after, or with a larger one, continues it")
        return 0
    except (DataError, ConfigError) as err:
        print(f"uniform_seqrec.py: error: {err}", file=sys.stderr)
        return 2
    except (FloatingPointError, RuntimeError) as err:  # non-finite numbers; torch's own, from the device
        if not on_device:                          # a bug before anything reached the device keeps its traceback
            raise
        saved = run.saved_epoch if run is not None else 0  # None: before training (copying the data to the device)
        if run is not None:
            run.progress.clear()
        kept = (f"the run folder keeps the checkpoint of epoch {saved}" if saved else "no epoch had finished"
                if run is not None else "training had not started, and its run folder keeps what it held")
        if isinstance(err, FloatingPointError) and run is not None and not saved:
            run.stopped(err)                       # the first epoch's; later ones end in train()'s test of the best
        # a string, not err: a local holding err would hold its traceback, whose frames hold this one's (the lock)
        why = str(err) if isinstance(err, FloatingPointError) else device_failure(err, config["device"] if config
                                                                                  else "torch")
        print(f"uniform_seqrec.py: stopped: {why}; {kept}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if run is not None:
            run.progress.clear()
        print("\ninterrupted; the run folder keeps the last finished epoch (run the same command to resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
