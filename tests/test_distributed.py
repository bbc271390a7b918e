"""train.py under torchrun with Gloo on CPU: the same training as one process, one set of outputs, resume with
another process count, and no hanging when one process fails. Skipped where Gloo cannot start."""
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import prepare_dataset
import train
from bratsunet import checkpoints, hyperparameters, loader, manifest, network, training

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120  # seconds for one launch; a hang fails the test instead of the suite

# Runs train.train under torchrun or alone, with two test-only changes, and saves each process's weights:
# the loss is the mean of per-patch losses (the batch Dice of losses.py is over a process's own patches, so
# only a per-patch loss is the same whether 2 patches are on one process or one on each of two), and the
# loss of step 2 is NaN on process NAN_RANK (all processes must skip that step together).
HELPER = """
import os, sys
import torch
sys.path.insert(0, {repo!r})
import train
from bratsunet import devices, hyperparameters, losses, network

nets, build_model, make_loss = [], network.build_model, losses.make_loss
network.build_model = lambda hp: nets.append(build_model(hp)) or nets[-1]

def per_patch_loss(hp):
    loss_fn, calls = make_loss(hp), []
    def mean_of_patches(logits, labels):
        calls.append(1)
        value = torch.stack([loss_fn(logits[i:i + 1], labels[i:i + 1]) for i in range(len(labels))]).mean()
        nan = len(calls) == 2 and os.environ.get("RANK", "0") == os.environ["NAN_RANK"]
        return value * float("nan") if nan else value
    return mean_of_patches

losses.make_loss = per_patch_loss
train.train(hyperparameters.load(sys.argv[1], overrides=sys.argv[3:]))
torch.save(nets[0].state_dict(), os.path.join(sys.argv[2], "rank" + os.environ.get("RANK", "0") + ".pt"))
if "WORLD_SIZE" in os.environ:
    devices.end_torchrun_process(0)  # as train.py's main does
"""


@pytest.fixture(scope="module", autouse=True)
def gloo():
    """Skip the module where a Gloo process group cannot start (no loopback networking, a sandbox)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this PyTorch has no Gloo backend")
    try:
        store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=10))
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        dist.all_reduce(torch.zeros(1))
        dist.destroy_process_group()
    except (RuntimeError, OSError, ValueError) as error:
        pytest.skip(f"Gloo cannot start here: {error}")


@pytest.fixture
def prepared(tmp_path, tiny_prepared):
    """tiny_prepared with 3 validation cases (an odd count: 2 processes must neither pad nor repeat one)."""
    folder = Path(shutil.copytree(tiny_prepared, tmp_path / "prepared"))
    manifest = json.loads((folder / "dataset.json").read_text())
    labelled = sorted(name for name, case in manifest["cases"].items() if case["seg"])
    assert len(labelled) >= 5
    for i, name in enumerate(labelled):
        manifest["cases"][name]["split"] = "val" if i < 3 else "train"
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder


def write_settings(path, prepared_dir, run_dir, **changes):
    settings = {"prepared_dir": prepared_dir, "run_dir": run_dir, "num_workers": 0, "features": "4, 8, 16",
                "patch_size": "16, 16, 16", "batch_size": 1, "epochs": 2, "steps_per_epoch": 3,
                "learning_rate": 3e-3, "sw_batch_size": 4, "precision": "fp32", "seed": 5, **changes}
    path.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    return path


def environment():
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}


def run(args, processes=None, **env):
    """python ARGS, or torchrun with `processes` processes; -> the finished process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes else [sys.executable]) + [str(a) for a in args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env={**environment(), **env})


def test_two_processes_train_like_one_process_with_the_same_global_batch(tmp_path, prepared):
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER.format(repo=str(REPO)))
    results = {}
    for processes, batch_size in ((2, 1), (None, 2)):
        out = tmp_path / f"out{processes}"
        out.mkdir()
        settings = write_settings(tmp_path / f"hp{processes}.txt", prepared, tmp_path / f"run{processes}",
                                  batch_size=batch_size)
        done = run([helper, settings, out], processes, NAN_RANK="1" if processes else "0")
        assert done.returncode == 0, done.stderr[-3000:]
        results[processes] = done, out
    (two, two_out), (_, one_out) = results[2], results[None]
    rank0, rank1 = (torch.load(two_out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(one_out / "rank0.pt", weights_only=True)
    torch.manual_seed(5)
    initial = network.build_model(hyperparameters.load(overrides={"features": "4, 8, 16"})).state_dict()
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), f"{key} differs between the processes"
        torch.testing.assert_close(value, single[key], rtol=0, atol=1e-4, msg=f"{key} differs from one process")
    assert any(not torch.equal(value, initial[key]) for key, value in rank0.items() if value.is_floating_point())
    # one set of outputs: only rank 0 prints epochs and writes files; the NaN step was skipped by both
    assert two.stdout.count("epoch 2/2  loss") == 1
    assert two.stdout.count("non-finite loss at epoch 1 step 2: skipped") == 1
    assert sorted(p.name for p in (tmp_path / "run2").iterdir()) == [
        "checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_last.pt", "curves.png", "log.txt", "metrics.csv",
        "settings.txt", "validation"]
    log = (tmp_path / "run2" / "log.txt").read_text()  # rank 0's console, once
    assert log.count("epoch 2/2  loss") == 1 and log.count("non-finite loss at epoch 1 step 2: skipped") == 1
    rows = {p: torch.load(tmp_path / f"run{p}" / "checkpoint_last.pt", weights_only=True)["metrics"] for p in (2, None)}
    assert [row["skipped_steps"] for row in rows[2]] == [row["skipped_steps"] for row in rows[None]] == [1, 0]
    for row2, row1 in zip(rows[2], rows[None]):
        assert row2["train_loss"] == pytest.approx(row1["train_loss"], rel=1e-5)


def test_a_torchrun_process_ends_without_interpreter_shutdown(monkeypatch, capsys):
    """Gloo frees a collective's tensors a moment after it returns; inside interpreter shutdown that aborted
    the process (SIGABRT) in 4 of 112 runs of the resume test below, and torchrun reported a failed run."""
    exits = []

    def exit_now(code):
        exits.append(code)
        raise SystemExit(code)  # os._exit does not return
    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setattr(train, "train", lambda hp: print("trained"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    train.main()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        train.main()
    assert exits == [0]  # only under torchrun, and after the output is flushed
    assert capsys.readouterr().out == "trained\ntrained\n"

    def fail(hp):
        raise ValueError("bad case")
    monkeypatch.setattr(train, "train", fail)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        train.main()
    assert exits == [0, 1]
    assert "rank 1 failed: ValueError: bad case" in capsys.readouterr().err


def test_killed_run_resumes_under_torchrun_with_another_process_count(tmp_path, prepared):
    run_dir = tmp_path / "run"
    settings = write_settings(tmp_path / "hp.txt", prepared, run_dir, batch_size=2, epochs=100)
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--hp", str(settings)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment())
    deadline = time.monotonic() + TIMEOUT
    while not (run_dir / "checkpoint_last.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    epochs = killed["epoch"] + 2

    done = run([REPO / "train.py", "--hp", settings, "resume=True", f"epochs={epochs}", "batch_size=1"], processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {run_dir / 'checkpoint_last.pt'} after epoch {killed['epoch']}" in done.stdout
    resumed = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    assert resumed["epoch"] == epochs and resumed["world_size"] == 2
    assert [row["epoch"] for row in resumed["metrics"]] == list(range(1, epochs + 1))
    assert resumed["metrics"][:killed["epoch"]] == killed["metrics"]
    assert resumed["scheduler"]["last_epoch"] == epochs * 3
    for epoch in range(killed["epoch"] + 1, epochs + 1):
        assert done.stdout.count(f"epoch {epoch}/{epochs}  loss") == 1
    with open(run_dir / "metrics.csv") as file:
        assert [line.split(",")[0] for line in file.read().splitlines()[1:]] == [str(e) for e in range(1, epochs + 1)]
    # log.txt: what the killed run printed (each line written as printed; it was killed as its checkpoint
    # appeared, before or after that epoch's line), then the resumed run's, appended
    log = (run_dir / "log.txt").read_text().splitlines()
    resuming = next(i for i, line in enumerate(log)  # "...; changed: epochs 100 -> 3, batch_size 2 -> 1"
                    if line.startswith(f"resuming {run_dir / 'checkpoint_last.pt'} after epoch {killed['epoch']};"))
    assert log[0].startswith("training on cpu x 1 process(es)") and resuming > 0
    before = [line.split()[1] for line in log[:resuming] if line.startswith("epoch ")]
    assert before == [f"{epoch}/100" for epoch in range(1, len(before) + 1)] and len(before) >= killed["epoch"] - 1
    assert log[resuming + 1].startswith("training on cpu x 2 process(es)")
    assert [line.split()[1] for line in log[resuming:] if line.startswith("epoch ")] == [
        f"{epoch}/{epochs}" for epoch in range(killed["epoch"] + 1, epochs + 1)]

    # validation split over 2 processes (cases 0, 2 and 1) gives the numbers of one process on the same weights
    hp = hyperparameters.load(settings)
    net, _ = checkpoints.load_model(run_dir / "checkpoint_last.pt")
    volumes = loader.VolumeDataset(prepared, manifest.split_cases(manifest.read_manifest(prepared))[1])
    single, _ = training.validate(net, volumes, hp, torch.device("cpu"))
    for key, value in single.items():
        assert resumed["metrics"][-1][key] == pytest.approx(value, abs=1e-6), key


# crossval.py under torchrun where process 1 runs on a machine of its own: its disk holds none of the files that
# process 0 writes into run_dir (node-local disks). Each process counts the out-of-fold cases it predicts.
NODE_LOCAL_HELPER = """
import json, os, pathlib, sys
sys.path.insert(0, {repo!r})
import crossval
from bratsunet import checkpoints, devices, hyperparameters, inference

run_dir, counts = pathlib.Path(sys.argv[2]).resolve(), []
if os.environ["RANK"] == "1":
    is_file, load = pathlib.Path.is_file, checkpoints.load_checkpoint
    elsewhere = lambda path: run_dir in pathlib.Path(path).resolve().parents
    pathlib.Path.is_file = lambda path: False if elsewhere(path) else is_file(path)
    def load_here(path, *args, **kwargs):
        if elsewhere(path):
            raise FileNotFoundError(f"{{path}}: not on this machine")
        return load(path, *args, **kwargs)
    checkpoints.load_checkpoint = load_here
    def write_elsewhere(*args, **kwargs):
        raise AssertionError("process 1 wrote a prediction into a run_dir only process 0 reads")
    inference.write_prediction = write_elsewhere
ensemble = inference.ensemble_probabilities
inference.ensemble_probabilities = lambda members, image: counts.append(1) or ensemble(members, image)
crossval.crossval(hyperparameters.load(sys.argv[1]))
(run_dir.parent / ("predicted_rank" + os.environ["RANK"])).write_text(json.dumps(len(counts)))
devices.end_torchrun_process(0)
"""


def test_crossval_runs_its_folds_in_one_process_group_under_torchrun(tmp_path, tiny_raw):
    """Each fold once started a new process group after destroying the last; under torchrun's store the
    second fold's group then hung until the 10-minute timeout. Process 0 alone predicted each fold's validation
    cases while the others waited in the next collective; and each process decided from its own disk whether to
    resume a fold, so on node-local disks they disagreed and hung."""
    settings = write_settings(tmp_path / "hp.txt", tmp_path / "prepared", tmp_path / "run", batch_size=1,
                              raw_data_dir=tiny_raw, num_folds=2, test_fraction=0)
    prepare_dataset.prepare_dataset(hyperparameters.load(settings))
    helper = tmp_path / "node_local.py"
    helper.write_text(NODE_LOCAL_HELPER.format(repo=str(REPO)))
    done = run([helper, settings, tmp_path / "run"], processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    for fold in (0, 1):
        assert done.stdout.count(f"==== fold {fold} of 2 ====") == 1  # printed by rank 0 only
        checkpoint = torch.load(tmp_path / "run" / f"fold_{fold}" / "checkpoint_last.pt", weights_only=True)
        assert checkpoint["world_size"] == 2 and checkpoint["epoch"] == 2
    with open(tmp_path / "run" / "crossval.csv") as file:
        assert len(file.read().splitlines()) == 1 + 5  # every labelled case, out of fold
    assert json.loads((tmp_path / "run" / "postprocessing.json").read_text())["num_folds"] == 2
    # the 5 out-of-fold cases (folds of 3 and 2) were predicted 2 at a time: 3 by process 0, 2 by process 1
    assert [json.loads((tmp_path / f"predicted_rank{rank}").read_text()) for rank in (0, 1)] == [3, 2]
    # again: process 0's disk says both folds are done; process 1, which sees no run, follows it
    again = run([helper, settings, tmp_path / "run"], processes=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("has trained 2 epochs already") == 2 and "starting from scratch" not in again.stdout
    assert [json.loads((tmp_path / f"predicted_rank{rank}").read_text()) for rank in (0, 1)] == [0, 0]


def test_a_failing_process_stops_the_others(tmp_path, prepared):
    val_names = manifest.split_cases(manifest.read_manifest(prepared))[1]
    image = prepared / f"{val_names[1]}.npy"  # validation case 1 belongs to process 1
    image.write_bytes(image.read_bytes()[:200])  # truncated
    settings = write_settings(tmp_path / "hp.txt", prepared, tmp_path / "run", epochs=1)
    start = time.monotonic()
    done = run([REPO / "train.py", "--hp", settings], processes=2)
    assert done.returncode != 0
    assert "rank 1 failed: " in done.stderr
    assert time.monotonic() - start < 60


# Stands in for a run on GPUs, where the process group must accept every collective (NCCL refuses tensors in
# CPU memory), with the CPU playing each process's GPU. A tensor counts as in GPU memory when it was moved or
# made there (.to(device), device=device) or computed from one that was; tensors made without a device, and
# .cpu() results, are in CPU memory. Each tensor collective of train.py is checked against the backend that
# devices.process_group_backend gives a CUDA process: NCCL takes GPU tensors of its dtypes, Gloo CPU tensors.
# Object collectives are not checked: they travel in CPU memory where the group has a Gloo part, and on the
# current GPU otherwise, which devices.use_device sets first (tests/test_devices.py).
GPU_RULES_HELPER = """
import json, os, sys
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
sys.path.insert(0, {repo!r})
import train
from bratsunet import devices, hyperparameters

NCCL_DTYPES = {{torch.int8, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
               torch.float64}}
dist.is_nccl_available = lambda: True  # a Linux GPU machine
BACKEND = devices.process_group_backend(torch.device("cuda", int(os.environ["LOCAL_RANK"])))
SERVES = dict(part.split(":") for part in BACKEND.split(",")) if ":" in BACKEND else (
    {{"cuda": "nccl"}} if BACKEND == "nccl" else {{"cpu": BACKEND, "cuda": BACKEND}})
calls = {{}}


def in_gpu_memory(value):
    return isinstance(value, torch.Tensor) and getattr(value, "on_gpu", False)


class GpuMemory(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {{}}
        out = func(*args, **kwargs)
        values = [*args, *kwargs.values()]
        values += [v for value in values if isinstance(value, (list, tuple)) for v in value]  # torch.stack([...])
        if getattr(func, "__name__", "") == "cpu":
            on_gpu = False
        elif any(isinstance(value, torch.device) for value in values):
            on_gpu = True  # train.py's device (the CPU here) named: the GPU in a GPU run
        else:
            on_gpu = any(in_gpu_memory(value) for value in values)
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(tensor, torch.Tensor):
                tensor.on_gpu = on_gpu
        return out


def checked(name, collective):
    def check(tensor, *args, **kwargs):
        memory = "cuda" if in_gpu_memory(tensor) else "cpu"
        where = "GPU" if memory == "cuda" else "CPU"
        if memory not in SERVES:
            raise RuntimeError(f"{{name}} of a {{tensor.dtype}} tensor in {{where}} memory: the process group "
                               f"{{BACKEND!r}} of a GPU run has no backend for it (NCCL takes only GPU tensors)")
        if SERVES[memory] == "nccl" and tensor.dtype not in NCCL_DTYPES:
            raise RuntimeError(f"{{name}} of a {{tensor.dtype}} tensor: NCCL has no such type")
        calls[name] = calls.get(name, 0) + 1
        return collective(tensor, *args, **kwargs)
    return check


for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter_tensor",
             "all_to_all_single", "gather", "scatter", "send", "recv"):
    setattr(dist, name, checked(name, getattr(dist, name)))
with GpuMemory():
    train.train(hyperparameters.load(sys.argv[1]))
with open(os.path.join(sys.argv[2], "collectives_rank" + os.environ["RANK"] + ".json"), "w") as file:
    json.dump(calls, file)
devices.end_torchrun_process(0)  # as train.py's main does
"""


def test_every_collective_is_valid_in_the_process_group_of_a_gpu_run(tmp_path, prepared):
    helper = tmp_path / "gpu_rules.py"
    helper.write_text(GPU_RULES_HELPER.format(repo=str(REPO)))
    settings = write_settings(tmp_path / "hp.txt", prepared, tmp_path / "run", device="cpu", epochs=1)
    done = run([helper, settings, tmp_path], processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):  # nothing per step; per epoch the loss totals and skipped steps (CPU memory)
        calls = json.loads((tmp_path / f"collectives_rank{rank}.json").read_text())
        assert calls == {"all_reduce": 1}
