"""The GPU and Mac paths, tested on the CPU (issue 24): what no machine here has run.

On this CPU: nothing the training or the evaluation computes on the device is float64 (MPS has none), and every op
they dispatch has an MPS kernel in this torch; a device error mid-run is one line, exit 1, keeping the last
checkpoint; CUDA gets its deterministic settings, once, before training, and every run records what trained it;
a checkpoint of another device resumes with this device's Adam and says so; bench.py and the memory check read
the device they are about. At the end, smoke tests that run only where there is a CUDA GPU or an MPS device: one
short epoch there, the evaluation there against the CPU's, the run resumed on the CPU.
"""
import collections
import json
import os
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

import bench as B
import runs as R
import uniform_seqrec as U
from data_prep import read_sequences

SIZE = ["--dim", "16", "--layers", "1", "--heads", "1", "--lr", "1e-3"]
SMALL = ["--model", "sasrec", *SIZE, "--device", "cpu"]
ON_A_DEVICE = {torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8,
               torch.uint8, torch.bool}                                 # what MPS has (no float64, no complex)


def small_data(tmp_path, users=40, items=30):
    path = tmp_path / "small.txt"
    path.write_text("".join(f"{u} " + " ".join(str(1 + (u * 7 + k * 11) % items) for k in range(5 + u % 9)) + "\n"
                            for u in range(1, users + 1)))
    return str(path)


class Dispatched(TorchDispatchMode):
    """Every op torch dispatches (backward and the optimizer's included) and the dtypes of the tensors it makes;
    `host` pauses the record (what runs on the host by design)."""

    def __init__(self):
        super().__init__()
        self.made, self.ops, self.host = collections.defaultdict(set), collections.Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.host:
            name = func._schema.name + (f".{func._schema.overload_name}" if func._schema.overload_name else "")
            self.ops[name] += 1
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.made[t.dtype].add(name)
        return out


class FreshRun:
    """The `run` of uniform_seqrec.train() without a folder (and with the statistics a run folder logs)."""

    def __init__(self, statistics=lambda model: {}):
        self.statistics = statistics

    def resume(self, model, optimizer):
        return R.restore("/nonexistent/checkpoint.pt", model, optimizer)[:2]

    def save(self, *args):
        pass

    def log(self, line):
        pass

    def step(self, *args):
        pass


def dispatched_by_training(tmp_path, monkeypatch, model, loss, *flags):
    """A whole uniform_seqrec.train() of 2 epochs (data, negatives, training steps, validation, Figure 1's statistics,
    the test), recorded but for metrics_from_ranks after its .cpu(), which is on the host by design."""
    data = small_data(tmp_path)
    config, _ = R.configure(["--data", data, "--model", model, "--loss", loss, "--dim", "8", "--heads", "1",
                             "--device", "cpu", "--epochs", "2", *flags])
    mode, real_metrics, ranks = Dispatched(), U.metrics_from_ranks, []

    def metrics_on_the_host(found, *args, **kwargs):
        ranks.append(found.dtype)
        mode.host = True
        try:
            return real_metrics(found, *args, **kwargs)
        finally:
            mode.host = False

    monkeypatch.setattr(U, "metrics_from_ranks", metrics_on_the_host)
    with mode:
        sequences = read_sequences(data)
        U.train(config, sequences, FreshRun(R.epoch_statistics(config, sequences)))
    assert ranks and set(ranks) == {torch.float32}
    return mode


BACKBONES_AND_LOSSES = [(m, loss) for m in ("sasrec", "gru4rec", "caser") for loss in ("bce", "bpr", "infonce",
                                                                                        "uniform", "ce")]


@pytest.mark.parametrize("model,loss", BACKBONES_AND_LOSSES, ids=[f"{m}-{l}" for m, l in BACKBONES_AND_LOSSES])
def test_training_and_evaluation_make_nothing_mps_lacks(tmp_path, monkeypatch, model, loss):
    """MPS has no float64: every tensor training and evaluation make (forward, backward, Adam, negatives, ranks,
    statistics) is a dtype MPS has. Only metrics_from_ranks goes to float64, after moving the ranks to the host."""
    made = dispatched_by_training(tmp_path, monkeypatch, model, loss).made
    assert set(made) <= ON_A_DEVICE, {str(d): sorted(ops) for d, ops in made.items() if d not in ON_A_DEVICE}


def test_the_ablations_and_the_caser_switches_make_nothing_mps_lacks(tmp_path, monkeypatch):
    for model, flags in (("sasrec", ["--no-normalize"]), ("sasrec", ["--no-rec", "--mask-seen"]),
                         ("sasrec", ["--block", "original"]),
                         ("caser", ["--caser-users", "--caser-output-table", "--caser-activation", "none"]),
                         ("gru4rec", ["--layers", "2"])):
        made = dispatched_by_training(tmp_path, monkeypatch, model, "uniform", *flags).made
        assert set(made) <= ON_A_DEVICE, (model, flags, {str(d): sorted(o) for d, o in made.items()})


def native_functions():
    """This torch's native_functions.yaml: every aten op and the backends with a kernel for it."""
    yaml = pytest.importorskip("yaml")
    torchgen = pytest.importorskip("torchgen")
    path = os.path.join(os.path.dirname(torchgen.__file__), "packaged", "ATen", "native", "native_functions.yaml")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found")
    with open(path) as f:
        return {e["func"].split("(")[0]: e for e in yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))}


def mps_kernel(table, name):
    """'mps', 'composite' (works on any backend through other ops) or what the op has instead."""
    entry = table.get(name)
    if entry is None:
        return "not in native_functions.yaml"
    if "structured_delegate" in entry:
        return mps_kernel(table, entry["structured_delegate"])
    if entry.get("dispatch") is None:
        return "composite"                                              # CompositeImplicitAutograd
    keys = {key.strip() for keys in entry["dispatch"] for key in keys.split(",")}
    if "MPS" in keys:
        return "mps"
    if keys & {"CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional", "CompositeImplicitAutograd"}:
        return "composite"
    return "only " + ", ".join(sorted(keys))


def test_every_op_of_training_and_evaluation_has_an_mps_kernel_in_this_torch(tmp_path, monkeypatch):
    """Each aten op that training and evaluation dispatch on the CPU has an MPS kernel, or a composite one, in this
    torch's native_functions.yaml. What this cannot see: ops the CPU does not take (cuDNN's GRU is CUDA's only),
    ops inside composite ones, and a kernel that exists but lacks a dtype on an old macOS; the MPS smoke test at the
    end runs them for real."""
    table = native_functions()
    ops = collections.Counter()
    for model in ("sasrec", "gru4rec", "caser"):
        for loss, flags in (("uniform", ["--mask-seen"]), ("infonce", ["--infonce-negatives", "3"]), ("bce", [])):
            ops.update(dispatched_by_training(tmp_path, monkeypatch, model, loss, *flags).ops)
    aten = sorted(op.split("::")[1] for op in ops if op.startswith("aten::"))
    assert "_fused_adam_" in aten and "histc" in aten and "searchsorted.Tensor" in aten     # it saw the whole path
    lacking = {op: mps_kernel(table, op) for op in aten if mps_kernel(table, op) not in ("mps", "composite")}
    assert not lacking, lacking


class OnDevice(torch.Tensor):
    """A tensor as if on a device without float64: what an op makes of it stays OnDevice, and float64 fails; .cpu()
    brings it to the host as a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.cpu:
            return out.as_subclass(torch.Tensor)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype not in ON_A_DEVICE:
                raise AssertionError(f"{getattr(func, '__name__', func)} made {t.dtype} on the device")
        return tree_map(lambda t: t.as_subclass(cls) if isinstance(t, torch.Tensor) else t, out)


def test_the_ranks_leave_the_device_before_any_float64(tmp_path, monkeypatch):
    """The ranks (float32, on the device) are joined on the device and moved to the host before metrics_from_ranks
    takes them to float64: the same metrics as without the check."""
    with pytest.raises(AssertionError, match="float64 on the device"):                 # the check works
        torch.ones(2).as_subclass(OnDevice).double()
    sequences = read_sequences(small_data(tmp_path))
    flat, starts, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    torch.manual_seed(0)
    model = U.build_model({"model": "sasrec", "dim": 8, "layers": 1, "heads": 1, "dropout": 0.5}, num_items, 40, 20)
    batches = U.evaluation_batches(flat, starts, lengths, 20, "test")
    expected = U.evaluate_protocols(model, batches, cosine=True)
    real = U.rank_of_targets
    monkeypatch.setattr(U, "rank_of_targets", lambda *args: real(*args).as_subclass(OnDevice))
    assert U.evaluate_protocols(model, batches, cosine=True) == expected
    assert U.evaluate(model, batches, cosine=False) is not None


# ----------------------------------------------------------------------------------------------------------------
# A device error once training has started: one line, exit 1, the last checkpoint kept
# ----------------------------------------------------------------------------------------------------------------

DEVICE_ERRORS = [
    ("cuda error", RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be "
                                "asynchronously reported at some other API call"),
     "stopped: cpu failed (RuntimeError: CUDA error: an illegal memory access was encountered CUDA kernel errors"),
    ("out of memory", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                             "capacity of 79.10 GiB of which 3.12 GiB is free."),
     "stopped: cpu ran out of memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has "
     "a total capacity of 79.10 GiB of which 3.12 GiB is free.); a smaller --batch-size or --dim needs less"),
    ("an op mps lacks", NotImplementedError(
        "The operator 'aten::_unique2' is not currently implemented for the MPS device. If you want this op to be "
        "considered for addition please comment on https://github.com/pytorch/pytorch/issues/141287 and mention "
        "use-case, that resulted in missing op as well as commit hash 1234567. As a temporary fix, you can set the "
        "environment variable `PYTORCH_ENABLE_MPS_FALLBACK=1` to use the CPU as a fallback for this op. WARNING: "
        "this will be slower than running natively on MPS."),
     "stopped: cpu cannot run an op of this torch (NotImplementedError: The operator 'aten::_unique2' is not "
     "currently implemented for the MPS device."),
    ("accelerator error", getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: device-side assert "
                                                                          "triggered"),
     "stopped: cpu failed ("),
]


@pytest.mark.parametrize("error,expected", [(e, x) for _, e, x in DEVICE_ERRORS], ids=[n for n, _, _ in DEVICE_ERRORS])
@pytest.mark.parametrize("where", ["training", "evaluation"])
def test_a_device_error_during_a_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch,
                                                                               error, expected, where):
    """Raised in epoch 2 (training or validation): one line naming the device and the error, exit 1; the folder
    keeps epoch 1's checkpoint, from which the same command resumes."""
    target = "train_epoch" if where == "training" else "evaluate"
    real, calls = getattr(U, target), []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise type(error)(*error.args)                     # a fresh one: a raised one would keep main's frame
        return real(*args, **kwargs)

    monkeypatch.setattr(U, target, failing)
    run = tmp_path / "run"
    args = ["--data", small_data(tmp_path), "--out", str(run), *SMALL, "--epochs", "3"]
    code = R.main(args)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("uniform_seqrec.py: " + expected), err
    assert err.rstrip().endswith("; the run folder keeps the checkpoint of epoch 1"), err
    if "MPS" in str(error):
        assert "PYTORCH_ENABLE_MPS_FALLBACK=1 runs it on the CPU instead, or train with --device cpu" in err
    assert torch.load(run / "checkpoint.pt", weights_only=False)["state"]["epoch"] == 1
    monkeypatch.setattr(U, target, real)
    assert R.main(args) == 0 and "resuming" in capsys.readouterr().out


def test_a_device_that_fails_as_its_settings_are_read_is_one_line(tmp_path, capsys, monkeypatch):
    def fails(device):
        raise RuntimeError("CUDA error: no CUDA-capable device is detected")

    monkeypatch.setattr(R, "device_settings", fails)
    assert R.main(["--data", small_data(tmp_path), "--out", str(tmp_path / "run"), *SMALL]) == 1
    err = capsys.readouterr().err
    assert err == ("uniform_seqrec.py: stopped: cpu failed (RuntimeError: CUDA error: no CUDA-capable device is "
                   "detected); no epoch had finished\n")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_runtime_error_before_training_is_not_taken_for_the_devices(tmp_path, monkeypatch):
    """Only errors once training has started are the device's: one before is a bug, and keeps its traceback."""
    def bug(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(R, "check_memory", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        R.main(["--data", small_data(tmp_path), "--out", str(tmp_path / "run"), *SMALL])


# ----------------------------------------------------------------------------------------------------------------
# Same seed, same numbers: the settings, set once before training, recorded in every run
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def global_settings(monkeypatch):
    """Put back whatever device_settings() changes in this process."""
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    filters = list(warnings.filters)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = flags[:4]
    torch.use_deterministic_algorithms(flags[4], warn_only=flags[5])
    warnings.filters[:] = filters


def cpu_flags():
    return (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
            torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
            torch.get_float32_matmul_precision(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def test_on_cuda_the_settings_turn_off_tf32_and_nondeterminism(global_settings, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 90100)
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = True, True          # cuDNN's defaults, and worse
    torch.backends.cuda.matmul.allow_tf32 = True
    settings = R.device_settings("cuda")
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (False, False)
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert settings == {"device": "cuda", "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "cpu": R.cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        "float32_matmul_precision": "highest", "cudnn_allow_tf32": False,
                        "cuda_matmul_allow_tf32": False, "name": "NVIDIA H100 80GB HBM3", "cuda": torch.version.cuda,
                        "cudnn": 90100, "cudnn_deterministic": True, "cudnn_benchmark": False,
                        "deterministic_algorithms": True, "deterministic_warn_only": True,
                        "cublas_workspace_config": ":4096:8"}
    assert json.loads(json.dumps(settings)) == settings
    with warnings.catch_warnings(record=True) as shown:
        warnings.warn("_histc_cuda does not have a deterministic implementation, but you set "
                      "'torch.use_deterministic_algorithms(True, warn_only=True)'.", UserWarning)
        warnings.warn("index_add_cuda_ does not have a deterministic implementation, but you set "
                      "'torch.use_deterministic_algorithms(True, warn_only=True)'.", UserWarning)
    assert [str(w.message).split()[0] for w in shown] == ["index_add_cuda_"]   # histc's counts are exact; others show


def test_a_workspace_config_of_the_users_own_is_kept(global_settings, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    assert R.device_settings("cuda:0")["cublas_workspace_config"] == ":16:8"


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_on_the_cpu_and_mps_the_settings_change_nothing(global_settings, monkeypatch, device):
    """The CPU's numbers stay as they were (no deterministic mode, whose other CPU kernels and NaN-filled empty
    tensors would change its speed, and could change its rounding); MPS has no such switches."""
    monkeypatch.setattr("platform.mac_ver", lambda: ("15.1", ("", "", ""), "arm64"))
    before = cpu_flags()
    settings = R.device_settings(device)
    assert cpu_flags() == before
    assert settings == {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "float32_matmul_precision": "highest", "cpu": R.cpu_model(),
                        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                        **({"macos": "15.1"} if device == "mps" else {})}


def test_settings_are_set_once_before_training_and_recorded_in_metrics_json(tmp_path, monkeypatch):
    """metrics.json says what trained the run (device_settings, resumed_on: [] when one device trained it all); the
    configuration, and so the run folder's name, has none of it."""
    events, real_settings, real_train = [], R.device_settings, U.train
    monkeypatch.setattr(R, "device_settings", lambda device: events.append(("settings", device)) or
                        real_settings(device))
    monkeypatch.setattr(U, "train", lambda *args: events.append(("train",)) or real_train(*args))
    run = tmp_path / "run"
    assert R.main(["--data", small_data(tmp_path), "--out", str(run), *SMALL, "--epochs", "2"]) == 0
    assert events == [("settings", "cpu"), ("train",)]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["device_settings"] == real_settings("cpu") and metrics["resumed_on"] == []
    config = json.loads((run / "config.json").read_text())
    assert not {"device_settings", "resumed_on"} & set(config) and metrics["config"] == config
    assert torch.load(run / "checkpoint.pt", weights_only=False)["device"] == "cpu"


def test_importing_runs_sets_nothing():
    import subprocess
    import sys
    code = ("import torch; before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, "
            "torch.are_deterministic_algorithms_enabled()); import runs, bench; import os; "
            "assert before == (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, "
            "torch.are_deterministic_algorithms_enabled()); assert 'CUBLAS_WORKSPACE_CONFIG' not in os.environ")
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.abspath(__file__)), env=env)


# ----------------------------------------------------------------------------------------------------------------
# Resume on another device: this device's Adam, one line, recorded
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def one_epoch(tmp_path):
    """A run folder after one epoch on the CPU, and the arguments that continue it to 2."""
    run = tmp_path / "run"
    args = ["--data", small_data(tmp_path), "--out", str(run), *SMALL]
    assert R.main([*args, "--epochs", "1"]) == 0
    (run / "metrics.json").unlink()
    return run, [*args, "--epochs", "2"]


def rewrite_checkpoint(run, **changes):
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    groups = changes.pop("param_groups", {})
    for group in checkpoint["optimizer"]["param_groups"]:
        group.update(groups)
    checkpoint.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del checkpoint[key]
    torch.save(checkpoint, run / "checkpoint.pt")


def test_a_checkpoint_of_a_gpu_resumes_on_the_cpu_with_the_cpus_adam_and_says_so(one_epoch, capsys, monkeypatch):
    """As written on a GPU whose Adam was foreach (fused=False, foreach=True): resumed here, the optimizer is the
    CPU's fused one, a line says the random streams differ from epoch 2 on, and metrics.json records it."""
    run, args = one_epoch
    rewrite_checkpoint(run, device="cuda:0", param_groups={"fused": False, "foreach": True})
    groups, real_resume = [], R.RunFolder.resume

    def resume(self, model, optimizer):
        result = real_resume(self, model, optimizer)
        groups.extend({k: g[k] for k in ("fused", "foreach")} for g in optimizer.param_groups)
        steps = [s["step"] for s in optimizer.state.values()]
        assert steps and all(s.dtype == torch.float32 and s.device.type == "cpu" and s == 1 for s in steps)
        return result

    monkeypatch.setattr(R.RunFolder, "resume", resume)
    capsys.readouterr()
    assert R.main(args) == 0
    out = capsys.readouterr().out
    assert groups and all(g == {"fused": True, "foreach": None} for g in groups)
    assert ("its checkpoint was written on cuda:0, and this run continues on cpu: the random streams (order, "
            "negatives, dropout) differ from epoch 2 on, so its numbers will be neither device's uninterrupted ones "
            "(recorded in metrics.json, resumed_on)\n") in out
    expected = [{"after_epoch": 1, "from": "cuda:0", "to": "cpu"}]
    assert json.loads((run / "metrics.json").read_text())["resumed_on"] == expected
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    assert checkpoint["device"] == "cpu" and checkpoint["resumed_on"] == expected
    assert all(g["fused"] is True for g in checkpoint["optimizer"]["param_groups"])


@pytest.mark.parametrize("device", ["cpu", None], ids=["same device", "before checkpoints named it"])
def test_a_checkpoint_of_this_device_or_of_none_named_resumes_without_a_word(one_epoch, capsys, device):
    run, args = one_epoch
    rewrite_checkpoint(run, device=device)
    assert R.main(args) == 0
    assert "random streams" not in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["resumed_on"] == []


@pytest.mark.parametrize("change", ["cpu model", "threads", "nothing"])
def test_a_run_resumed_on_another_machine_records_each_session(tmp_path, capsys, monkeypatch, change):
    """Epochs 1-2 on one machine, 3-4 on another of the same kind (another CPU model, or another number of threads):
    a line says that the numbers from epoch 3 on are this machine's, and metrics.json keeps both sessions, its
    device_settings the last's. One machine throughout: no line, no sessions (so records stay as they were)."""
    args = ["--data", small_data(tmp_path), "--out", str(tmp_path / "run"), *SMALL]
    a, b = "Fake CPU A (family 1, model 2)", "Fake CPU B (family 3, model 4)"
    machines = {"first": (a, 1), "second": {"cpu model": (b, 1), "threads": (a, 2), "nothing": (a, 1)}[change]}
    described = {}
    for session, epochs in (("first", "2"), ("second", "4")):
        cpu, threads = machines[session]
        monkeypatch.setattr(R, "cpu_model", lambda: cpu)
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)    # what device_settings records
        described[session] = R.machine(R.device_settings("cpu"))
        assert R.main([*args, "--epochs", epochs]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["device_settings"]["cpu"] == machines["second"][0]
    assert metrics["device_settings"]["threads"] == machines["second"][1]
    if change == "nothing":
        assert "sessions" not in metrics and "this machine's" not in out
        return
    assert metrics["sessions"] == [{"first_epoch": 1, "last_epoch": 2, "machine": described["first"]},
                                   {"first_epoch": 3, "last_epoch": 4, "machine": described["second"]}]
    assert (f"its epochs 1-2 were trained on {R.machine_label(described['first'])}, and this run continues on "
            f"{R.machine_label(described['second'])}: its numbers from epoch 3 on are this machine's, neither's "
            f"uninterrupted ones (recorded in metrics.json, sessions)\n") in out


def test_the_current_devices_adam_wins_in_both_directions(one_epoch):
    """A fused checkpoint (CPU, CUDA) into a foreach Adam (MPS where torch has no fused Adam): foreach it stays, and
    the step counts live on the host, as a foreach Adam keeps them."""
    run, _ = one_epoch
    config = json.loads((run / "config.json").read_text())
    sequences = read_sequences(config["data_path"])
    _, _, lengths, num_items = U.flatten_sequences(sequences, "cpu")
    model = U.build_model(config, num_items, len(lengths), U.history_limit(config, lengths))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    state, _, recorded = R.restore(str(run / "checkpoint.pt"), model, optimizer)
    assert state["epoch"] == 1 and recorded == {"device": "cpu", "resumed_on": [], "sessions": [
        {"first_epoch": 1, "last_epoch": 1, "machine": R.machine(R.device_settings("cpu"))}]}
    assert all((g["fused"], g["foreach"]) == (None, True) for g in optimizer.param_groups)
    assert all(s["step"].device.type == "cpu" and s["step"].dtype == torch.float32 for s in optimizer.state.values())
    optimizer.step()                                                      # and it steps


def test_a_checkpoint_naming_no_device_torch_knows_is_damaged(one_epoch, capsys):
    run, args = one_epoch
    rewrite_checkpoint(run, device="gpu9")
    assert R.main(args) == 2
    assert "is damaged or not this run's checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Adam's fused kernel, bench.py and the memory check on the device they are about
# ----------------------------------------------------------------------------------------------------------------

def test_adam_is_fused_on_cpu_and_cuda_and_on_mps_where_torch_has_it(monkeypatch):
    model = torch.nn.Linear(3, 2)
    for device in ("cpu", "cuda"):
        assert U.adam(model, 1e-3, torch.device(device)).param_groups[0]["fused"] is True
    assert U.adam(model, 1e-3, torch.device("xpu")).param_groups[0]["fused"] is False       # as before
    assert U.adam(model, 1e-3, torch.device("mps")).param_groups[0]["fused"] is True        # this torch has it
    real = torch.optim.Adam

    class WithoutFusedMps(real):
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   "supported devices: ['cuda', 'cpu'] but mps and torch.float32")
            super().__init__(params, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", WithoutFusedMps)
    optimizer = U.adam(model, 1e-3, torch.device("mps"))
    assert not optimizer.param_groups[0]["fused"] and len(optimizer.param_groups[0]["params"]) == 2


def test_bench_waits_for_and_measures_the_device_it_times(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("cuda", device)))
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append(("mps",)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append(("peak", device))
                        or 3 * 2 ** 20)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 5 * 2 ** 20)
    cuda, mps, cpu = torch.device("cuda:1"), torch.device("mps"), torch.device("cpu")
    for device in (cuda, mps, cpu):
        B.synchronize(device)
    assert calls == [("cuda", cuda), ("mps",)]
    B.reset_peak(cuda)
    assert B.peak_megabytes(cuda) == 3 and calls[-2:] == [("reset", cuda), ("peak", cuda)]
    B.reset_peak(mps)
    assert B.peak_megabytes(mps) == 5
    assert B.peak_megabytes(cpu) > 10                                       # this process's resident set


def test_the_memory_check_counts_free_cuda_memory_and_what_metal_recommends(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (7 * 2 ** 30, 80 * 2 ** 30))
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 12 * 2 ** 30, raising=False)
    assert R.device_memory(torch.device("cuda")) == 7 * 2 ** 30
    assert R.device_memory(torch.device("mps")) == 12 * 2 ** 30
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert R.device_memory(torch.device("cpu")) == machine
    monkeypatch.delattr(torch.mps, "recommended_max_memory")              # a torch without it: the machine's
    assert R.device_memory(torch.device("mps")) == machine

    def fails(device=None):
        raise RuntimeError("CUDA error: out of memory")
    monkeypatch.setattr(torch.cuda, "mem_get_info", fails)
    assert R.device_memory(torch.device("cuda")) is None                   # no check; training says what fails
    sequences = [[1 + (u * 7 + k * 13) % 500 for k in range(13)] for u in range(2000)]
    config = R.build_parser().parse_args(["--batch-size", str(10 ** 12), "--device", "cuda"])
    config = {**vars(config), "layers": 2, "length_groups": 8}
    for device, words in (("cuda", "free on cuda"), ("mps", "that Metal recommends at most for mps")):
        monkeypatch.setattr(R, "device_memory", lambda device: 16 * 2 ** 30)
        with pytest.raises(R.ConfigError, match=f"more than the 16.0 GiB {words}; most of it for one batch"):
            R.check_memory({**config, "device": device}, sequences)


# ----------------------------------------------------------------------------------------------------------------
# On a real GPU or Mac: skipped here
# ----------------------------------------------------------------------------------------------------------------

DEVICES = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
           pytest.param("mps", marks=pytest.mark.skipif(
               not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
               reason="no MPS device"))]


def trained_model(run, device):
    """The best state of a run folder's checkpoint on `device`, with its data and configuration."""
    config = json.loads((run / "config.json").read_text())
    flat, starts, lengths, num_items = U.flatten_sequences(read_sequences(config["data_path"]), device)
    max_len = U.history_limit(config, lengths)
    model = U.build_model(config, num_items, len(lengths), max_len).to(device)
    model.load_state_dict(torch.load(run / "checkpoint.pt", map_location=device, weights_only=False)["best_model"])
    return model, U.evaluation_batches(flat, starts, lengths, max_len, "test"), config


@pytest.mark.parametrize("device", DEVICES)
def test_smoke_a_short_run_on_the_device_evaluates_as_the_cpu_and_resumes_there(tmp_path, capsys, global_settings,
                                                                                 device):
    """One short epoch there; its evaluation there against the CPU's; the same run resumed on the CPU."""
    data = small_data(tmp_path, users=300, items=200)
    flags = ["--data", data, *SIZE, "--batch-size", "64"]
    for model in ("sasrec", "gru4rec", "caser"):
        run = tmp_path / model
        args = [*flags, "--model", model, "--out", str(run)]
        assert R.main([*args, "--device", device, "--epochs", "1"]) == 0, capsys.readouterr().err
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["device_settings"]["device"] == device and metrics["resumed_on"] == []
        checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
        assert torch.device(checkpoint["device"]).type == device

        on_device, batches, config = trained_model(run, device)
        on_cpu, cpu_batches, _ = trained_model(run, "cpu")
        with torch.no_grad():
            for (h, u, _), (h_cpu, u_cpu, _) in zip(batches, cpu_batches):
                vectors = on_device.eval().encode(h, users=u).cpu()
                assert torch.allclose(vectors, on_cpu.eval().encode(h_cpu, users=u_cpu), atol=1e-4, rtol=1e-4)
        cosine = U.scores_are_cosines(config)
        ranks = U.target_ranks(on_device, batches, cosine)[0].cpu()
        cpu_ranks = U.target_ranks(on_cpu, cpu_batches, cosine)[0]
        assert (ranks - cpu_ranks).abs().le(2).float().mean() >= 0.99       # near-ties may swap, nothing more
        for name, value in U.evaluate_protocols(on_cpu, cpu_batches, cosine)["all_items"].items():
            assert metrics["protocols"]["all_items"]["test"][name] == pytest.approx(value, abs=0.02), name

        (run / "metrics.json").unlink()
        capsys.readouterr()
        assert R.main([*args, "--device", "cpu", "--epochs", "2"]) == 0
        assert ", and this run continues on cpu: the random streams" in capsys.readouterr().out
        assert json.loads((run / "metrics.json").read_text())["resumed_on"][0]["to"] == "cpu"


@pytest.mark.parametrize("device", DEVICES[:1])
def test_smoke_same_seed_same_numbers_on_cuda(tmp_path, global_settings, device):
    """The promise of device_settings(): two runs of one command on one GPU end with the same numbers."""
    data = small_data(tmp_path, users=300, items=200)
    results = []
    for model in ("sasrec", "gru4rec", "caser"):
        for copy in ("a", "b"):
            run = tmp_path / f"{model}-{copy}"
            assert R.main(["--data", data, *SIZE, "--model", model, "--device", device, "--epochs", "2",
                           "--out", str(run)]) == 0
            metrics = json.loads((run / "metrics.json").read_text())
            results.append((metrics["protocols"], [r["loss"] for r in metrics_log(run)]))
        assert results[-1] == results[-2], model


def metrics_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_the_cpu_model_is_read_from_cpuinfo_or_platform(tmp_path, monkeypatch):
    """metrics.json names the CPU model (a CPU run repeats its numbers only on the same model): /proc/cpuinfo's
    first "model name", else what platform says, else None."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: Some CPU\n\n"
                       "processor\t: 1\nmodel name\t: Other\n")
    assert R.cpu_model(str(cpuinfo)) == "Some CPU (family 25, model 17)"
    cpuinfo.write_text("model name\t: Some CPU 1234\n")                       # no numbers: the name alone
    assert R.cpu_model(str(cpuinfo)) == "Some CPU 1234"
    monkeypatch.setattr("platform.processor", lambda: "arm")
    assert R.cpu_model(str(tmp_path / "none")) == "arm"
    monkeypatch.setattr("platform.processor", lambda: "")
    assert R.cpu_model(str(tmp_path / "none")) is None
