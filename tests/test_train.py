"""The training loop on tiny generated data: outputs, checkpoints, resume, the finite-loss guard, precision."""
import collections
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np

import pytest
import torch

import train
from bratsunet.loader import EpochSampler, PatchDataset, start_loader
from bratsunet import (checkpoints, devices, hyperparameters, inference, losses, manifest, network, training,
                       training_log)

EPOCHS = 4


def tiny_settings(prepared_dir, run_dir, **changes):
    settings = {"prepared_dir": prepared_dir, "run_dir": run_dir, "num_workers": 0, "features": "4, 8, 16",
                "patch_size": "16, 16, 16", "batch_size": 2, "epochs": EPOCHS, "steps_per_epoch": 4,
                "val_every": 2, "learning_rate": 3e-3, "sw_batch_size": 4, "seed": 3}
    return hyperparameters.load(overrides={**settings, **changes})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_prepared):
    """An uninterrupted 4-epoch run -> (hp, result of train())."""
    hp = tiny_settings(tiny_prepared, tmp_path_factory.mktemp("full_run"))
    return hp, train.train(hp)


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def without_seconds(rows):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def test_training_loss_falls_and_metrics_csv_has_a_row_per_epoch(full_run):
    hp, result = full_run
    rows = read_csv(hp.run_dir / "metrics.csv")
    assert list(rows[0]) == list(training_log.METRIC_COLUMNS)
    assert [int(row["epoch"]) for row in rows] == list(range(1, EPOCHS + 1))
    losses = [float(row["train_loss"]) for row in rows]
    assert losses[-1] < losses[0]
    # validation every 2nd epoch: empty cells in between, Dice/accuracy in [0, 1] when validated
    assert [row["dice_mean"] == "" for row in rows] == [True, False, True, False]
    for row in rows[1::2]:
        values = [float(row[c]) for c in ("dice_WT", "dice_TC", "dice_ET", "accuracy")]
        assert all(0 <= v <= 1 for v in values)
        assert float(row["dice_mean"]) == pytest.approx(sum(values[:3]) / 3, abs=1e-5)
    assert float(rows[-1]["dice_mean"]) == pytest.approx(result["dice_mean"], rel=1e-5)
    assert (hp.run_dir / "curves.png").stat().st_size > 10_000
    assert sorted(p.name for p in hp.run_dir.iterdir()) == [
        "checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_last.pt", "curves.png", "log.txt", "metrics.csv",
        "settings.txt", "validation"]  # no temporary files
    # the validation cases predicted with the final checkpoint, probabilities too: the out-of-fold predictions
    val_names = manifest.split_cases(manifest.read_manifest(hp.prepared_dir))[1]
    assert sorted(p.name for p in (hp.run_dir / "validation").iterdir()) == sorted(
        [f"{name}{suffix}" for name in val_names for suffix in (".nii.gz", "_probabilities.npz")]
        + ["predicted_with.json"])
    assert json.loads((hp.run_dir / "validation" / "predicted_with.json").read_text()) == {
        "checkpoint": "checkpoint_final.pt", "epoch": EPOCHS}


def test_checkpoint_holds_plain_unwrapped_state(full_run):
    hp, result = full_run
    checkpoint = torch.load(hp.run_dir / "checkpoint_last.pt", weights_only=True)
    assert {"model_args", "model", "optimizer", "scheduler", "scaler", "epoch", "best_score", "metrics", "rng",
            "hyperparameters"} <= set(checkpoint)
    assert not [key for key in checkpoint["model"] if key.startswith(("module.", "_orig_mod."))]
    assert checkpoint["epoch"] == EPOCHS and len(checkpoint["metrics"]) == EPOCHS
    assert checkpoint["hyperparameters"] == hp.to_dict()
    assert checkpoint["scheduler"]["last_epoch"] == EPOCHS * hp.steps_per_epoch
    best = torch.load(hp.run_dir / "checkpoint_best.pt", weights_only=True)
    assert best["epoch"] == result["best_epoch"] and best["best_score"] == result["best_dice_mean"]
    assert result["best_dice_mean"] == max(row["dice_mean"] for row in checkpoint["metrics"] if row["dice_mean"])
    net, _ = checkpoints.load_model(hp.run_dir / "checkpoint_last.pt")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in checkpoint["model"].items())


def test_out_of_fold_predictions_come_from_the_final_weights_not_the_best(tiny_prepared, tmp_path, monkeypatch):
    """checkpoint_best.pt is chosen on the validation cases: predictions of it there would be optimistic. The
    fold's validation/ holds the predictions of checkpoint_final.pt, the last epoch, as nnU-Net scores them."""
    validate, scores = training.validate, iter([0.9, 0.5])  # epoch 2 the best, epoch 4 worse

    def falling(*args, **kwargs):
        metrics, labels = validate(*args, **kwargs)
        return {**metrics, "dice_mean": next(scores)}, labels

    monkeypatch.setattr(training, "validate", falling)
    hp = tiny_settings(tiny_prepared, tmp_path, precision="fp32", channels_last=False)
    train.train(hp)
    best, final, last = (torch.load(tmp_path / f"checkpoint_{name}.pt", weights_only=True)
                         for name in ("best", "final", "last"))
    assert best["epoch"] == 2 and final["epoch"] == last["epoch"] == EPOCHS
    assert all(torch.equal(final["model"][key], value) for key, value in last["model"].items())
    name = manifest.split_cases(manifest.read_manifest(tiny_prepared))[1][0]
    image = np.load(tiny_prepared / f"{name}.npy").astype(np.float32)

    def probabilities(checkpoint):
        net = checkpoints.load_model(tmp_path / checkpoint)[0]
        return inference.predict_case(net, image, hp, hp.target).numpy().astype(np.float16)

    with np.load(tmp_path / "validation" / f"{name}_probabilities.npz") as saved:
        assert np.array_equal(saved["probabilities"], probabilities("checkpoint_final.pt"))
        assert not np.array_equal(saved["probabilities"], probabilities("checkpoint_best.pt"))
    assert inference.checkpoint_paths(hp) == [tmp_path / "checkpoint_final.pt"]  # predict.py's default


def test_save_every_writes_the_checkpoint_and_curves_every_n_epochs_and_resume_continues_from_there(
        full_run, tmp_path, monkeypatch):
    hp = full_run[0].replace(run_dir=tmp_path, save_every=3)
    saved, plotted = [], []
    save, plot, write_csv = checkpoints.save_checkpoint, training_log.plot_curves, training_log.write_metrics_csv
    monkeypatch.setattr(checkpoints, "save_checkpoint",
                        lambda state, path: saved.append((Path(path).name, state["epoch"])) or save(state, path))
    monkeypatch.setattr(training_log, "plot_curves",
                        lambda rows, path, show=False: plotted.append(rows[-1]["epoch"]) or plot(rows, path, show))

    def stop_after_epoch_2(rows, path):  # killed after epoch 2, one epoch before the next checkpoint_last.pt
        write_csv(rows, path)
        if rows[-1]["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training_log, "write_metrics_csv", stop_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.train(hp.replace(save_every=1))  # a checkpoint_last.pt at epoch 1 to resume from
    monkeypatch.setattr(training_log, "write_metrics_csv", write_csv)
    assert [row["epoch"] for row in read_csv(tmp_path / "metrics.csv")] == ["1", "2"]
    saved.clear(), plotted.clear()
    train.train(hp.replace(resume=True))  # resumes after epoch 1: epochs 2 to 4 again, saved at 3 and the end
    assert [epoch for name, epoch in saved if name == "checkpoint_last.pt"] == [3, 4]
    assert [epoch for name, epoch in saved if name == "checkpoint_final.pt"] == [4]
    assert plotted == [3, 4]
    uninterrupted = torch.load(full_run[0].run_dir / "checkpoint_last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert without_seconds(resumed["metrics"]) == without_seconds(uninterrupted["metrics"])
    assert without_seconds(read_csv(tmp_path / "metrics.csv")) == without_seconds(
        read_csv(full_run[0].run_dir / "metrics.csv"))  # each epoch once
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_a_training_step_leaves_the_device_running(tiny_prepared, tmp_path, monkeypatch):
    """Reading a tensor's value (item, bool, float, ...) makes the host wait until the GPU has done all it was
    given: once per step, the GPU then idles while the host prepares the next. Counted here on the CPU."""
    reads, counting = collections.Counter(), [False]
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"):
        def read(tensor, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            reads[_name] += counting[0]
            return _original(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)
    train_epoch = training.train_epoch

    def counted(*args):
        counting[0] = True
        try:
            return train_epoch(*args)
        finally:
            counting[0] = False

    monkeypatch.setattr(training, "train_epoch", counted)
    steps = 30
    result = train.train(tiny_settings(tiny_prepared, tmp_path, epochs=1, steps_per_epoch=steps, optimizer="sgd",
                                       learning_rate=1e-2))
    assert math.isfinite(result["train_loss"]) and result["skipped_steps"] == 0
    # per epoch: the DataLoader's seed (CPU), the epoch's totals (cpu, tolist); the progress bar's loss at steps 1, 26
    assert sum(reads.values()) / steps < 0.2, reads


def test_resume_after_a_stop_gives_the_uninterrupted_run(full_run, tmp_path, monkeypatch):
    hp, _ = full_run
    hp = hp.replace(run_dir=tmp_path)
    plot = training_log.plot_curves

    def stop_after_epoch_2(rows, path, show=False):  # an interrupt once epoch 2 is saved
        plot(rows, path, show)
        if rows[-1]["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training_log, "plot_curves", stop_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.train(hp)
    assert torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["epoch"] == 2
    monkeypatch.setattr(training_log, "plot_curves", plot)
    train.train(hp.replace(resume=True))

    resumed = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    uninterrupted = torch.load(full_run[0].run_dir / "checkpoint_last.pt", weights_only=True)
    assert without_seconds(resumed["metrics"]) == without_seconds(uninterrupted["metrics"])
    assert without_seconds(read_csv(tmp_path / "metrics.csv")) == without_seconds(
        read_csv(full_run[0].run_dir / "metrics.csv"))
    assert resumed["best_score"] == uninterrupted["best_score"]
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert resumed["scheduler"]["last_epoch"] == uninterrupted["scheduler"]["last_epoch"]


def test_resume_with_nnunet_augmentation_on_the_device_gives_the_uninterrupted_weights(tiny_prepared, tmp_path,
                                                                                       monkeypatch):
    """nnU-Net's augmentation, batched after the loader with SGD: a run stopped after epoch 1 and resumed
    ends with the weights of an uninterrupted run (every parameter and noise field comes from the seed)."""
    hp = tiny_settings(tiny_prepared, tmp_path / "full", epochs=2, steps_per_epoch=2, val_every=10, augment="nnunet",
                       augment_on="device", optimizer="sgd", learning_rate=1e-2)
    train.train(hp)
    plot = training_log.plot_curves

    def stop_after_epoch_1(rows, path, show=False):
        plot(rows, path, show)
        raise KeyboardInterrupt

    monkeypatch.setattr(training_log, "plot_curves", stop_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train.train(hp.replace(run_dir=tmp_path / "resumed"))
    monkeypatch.setattr(training_log, "plot_curves", plot)
    train.train(hp.replace(run_dir=tmp_path / "resumed", resume=True))
    uninterrupted = torch.load(tmp_path / "full" / "checkpoint_last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)
    assert resumed["epoch"] == 2
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    momentum = [state["momentum_buffer"] for state in resumed["optimizer"]["state"].values()]
    assert momentum and all(torch.isfinite(m).all() for m in momentum)  # SGD (Nesterov) state kept


def test_optimizer_choice():
    net = torch.nn.Linear(2, 2)
    sgd = training.make_optimizer(net, hyperparameters.load(overrides={"optimizer": "sgd", "learning_rate": 1e-2,
                                                                   "weight_decay": 3e-5}))
    assert isinstance(sgd, torch.optim.SGD)
    assert {k: sgd.defaults[k] for k in ("lr", "momentum", "nesterov", "weight_decay")} == {
        "lr": 1e-2, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}  # nnU-Net's
    assert isinstance(training.make_optimizer(net, hyperparameters.load()), torch.optim.AdamW)


def test_resume_refuses_a_checkpoint_of_another_network(full_run, tmp_path):
    hp, _ = full_run
    shutil.copy(hp.run_dir / "checkpoint_last.pt", tmp_path / "checkpoint_last.pt")
    with pytest.raises(ValueError, match="checkpoint_last.pt: the network was"):
        train.train(hp.replace(run_dir=tmp_path, resume=True, features="4, 8, 32"))


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def test_non_finite_loss_or_gradients_skip_the_step(tiny_prepared, tmp_path, monkeypatch, capsys):
    make_loss = losses.make_loss

    def faulty_loss(hp):
        loss_fn, calls = make_loss(hp), []

        def faulty(logits, labels):
            calls.append(1)
            value = loss_fn(logits, labels)
            return value * math.nan if len(calls) == 2 else NaNGradient.apply(value) if len(calls) == 3 else value
        return faulty

    monkeypatch.setattr(losses, "make_loss", faulty_loss)
    hp = tiny_settings(tiny_prepared, tmp_path, epochs=1)
    result = train.train(hp)
    output = capsys.readouterr()
    assert "non-finite loss at epoch 1 step 2: skipped" in output.out + output.err
    assert "non-finite gradients at epoch 1 step 3: skipped" in output.out + output.err
    assert result["skipped_steps"] == 2 and math.isfinite(result["train_loss"])
    checkpoint = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    adam_steps = {float(state["step"]) for state in checkpoint["optimizer"]["state"].values()}
    assert adam_steps == {2.0}  # 4 steps, 2 skipped
    assert checkpoint["scheduler"]["last_epoch"] == 4  # the schedule still advanced on skipped steps


def test_autocast_settings_for_each_device():
    bf16, fp16 = torch.bfloat16, torch.float16
    assert devices.autocast_settings("auto", "cuda", True) == (bf16, False)
    assert devices.autocast_settings("auto", "cuda", False) == (fp16, True)  # e.g. V100, T4: fp16 + GradScaler
    assert devices.autocast_settings("auto", "cpu", True) == (bf16, False)
    assert devices.autocast_settings("auto", "cpu", False) == (None, False)
    assert devices.autocast_settings("auto", "mps", False) == (None, False)
    assert devices.autocast_settings("fp32", "cuda", True) == (None, False)
    assert devices.autocast_settings("fp16", "cuda", True) == (fp16, True)
    assert devices.autocast_settings("bf16", "cpu", False) == (bf16, False)


def cpu_has_bf16_instructions():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to read the CPU flags from")
    return bool({"avx512_bf16", "amx_bf16"} & set(cpuinfo.read_text().split()))


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_training_runs_in_bf16_exactly_on_cpus_with_bf16_instructions(tiny_prepared, tmp_path, monkeypatch, precision):
    native = cpu_has_bf16_instructions()
    assert devices.cpu_supports_bf16() == native
    dtypes, build_model = set(), network.build_model

    def build_and_watch(hp):  # record the dtype of every output of the network, in training and validation
        net = build_model(hp)
        net.heads[0].register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
        return net

    monkeypatch.setattr(network, "build_model", build_and_watch)
    train.train(tiny_settings(tiny_prepared, tmp_path, epochs=1, steps_per_epoch=1, precision=precision))
    assert dtypes == {torch.bfloat16 if precision == "auto" and native else torch.float32}


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    resolve = devices.resolve_device
    assert resolve("auto", cuda_available=False, mps_available=False) == torch.device("cpu")
    assert resolve("auto", cuda_available=False, mps_available=True) == torch.device("mps")
    gpu_3 = resolve("auto", local_rank=3, world_size=4, cuda_available=True, mps_available=False)
    assert gpu_3 == torch.device("cuda:3")
    assert resolve("cuda", local_rank=1, world_size=2, cuda_available=True) == torch.device("cuda:1")
    assert resolve("cuda:2", cuda_available=True) == torch.device("cuda:2")
    assert resolve("cpu", cuda_available=True) == torch.device("cpu")
    with pytest.raises(ValueError, match="torchrun started 2 processes"):
        resolve("cuda:0", world_size=2, cuda_available=True)
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        resolve("cuda", cuda_available=False)


def test_learning_rate_schedules():
    hp = hyperparameters.load(overrides={"epochs": 10, "steps_per_epoch": 10, "warmup_epochs": 0})
    assert training.lr_factor(0, hp) == 1.0
    assert training.lr_factor(50, hp) == pytest.approx(0.5 ** 0.9)  # nnU-Net's poly rule at half way
    assert training.lr_factor(99, hp) == pytest.approx(0.01 ** 0.9)
    cosine = hp.replace(lr_schedule="cosine", warmup_epochs=2)
    assert [training.lr_factor(s, cosine) for s in (0, 9, 19)] == pytest.approx([0.05, 0.5, 1.0])  # linear warm-up
    assert training.lr_factor(60, cosine) == pytest.approx(0.5)  # half way through the 80 steps after warm-up
    assert training.lr_factor(57, hp.replace(lr_schedule="constant")) == 1.0


def test_a_step_sees_the_same_patches_however_many_processes_share_it():
    one = list(EpochSampler(steps=3, batch_size=4, rank=0, world_size=1))
    shards = [list(EpochSampler(steps=3, batch_size=1, rank=r, world_size=4)) for r in range(4)]
    for step in range(3):
        assert sorted(shard[step] for shard in shards) == one[4 * step:4 * step + 4]
    sampler = EpochSampler(steps=2, batch_size=2, rank=1, world_size=2)
    sampler.set_epoch(5)
    assert list(sampler) == [(5, 2), (5, 3), (5, 6), (5, 7)]


def test_persistent_workers_follow_the_epoch(tiny_prepared):
    train_names, _ = manifest.split_cases(manifest.read_manifest(tiny_prepared))
    patches = PatchDataset(tiny_prepared, train_names, (16, 16, 16), 0.5, True, 0, 4)
    batches = {}
    for workers in (0, 2):
        sampler = EpochSampler(steps=2, batch_size=2, rank=0, world_size=1)
        loader = start_loader(patches, sampler, 2, workers, torch.device("cpu"))
        for epoch in (1, 2):
            sampler.set_epoch(epoch)
            batches[workers, epoch] = torch.cat([image for image, _ in loader])
    assert torch.equal(batches[0, 1], batches[2, 1]) and torch.equal(batches[0, 2], batches[2, 2])
    assert not torch.equal(batches[0, 1], batches[0, 2])


def test_loader_falls_back_to_the_main_process_when_workers_cannot_start(tiny_prepared, monkeypatch, capsys):
    train_names, _ = manifest.split_cases(manifest.read_manifest(tiny_prepared))
    patches = PatchDataset(tiny_prepared, train_names, (16, 16, 16), 0.5, False, 0, 2)

    def refuse(loader):
        if loader.num_workers:
            raise RuntimeError("DataLoader worker (pid 123) exited unexpectedly")
        return original(loader)

    original = torch.utils.data.DataLoader.__iter__
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", refuse)
    loader = start_loader(patches, EpochSampler(1, 2, 0, 1), 2, 2, torch.device("cpu"))
    assert loader.num_workers == 0 and len(list(loader)) == 1
    assert "workers could not start (DataLoader worker (pid 123) exited unexpectedly)" in capsys.readouterr().out


def test_on_a_gpu_a_loader_whose_workers_fail_stops_with_the_cause_and_the_fix(tiny_prepared, monkeypatch):
    """Loading in the main process would leave a GPU waiting on it: on CUDA (faked here) the run stops instead."""
    train_names, _ = manifest.split_cases(manifest.read_manifest(tiny_prepared))
    patches = PatchDataset(tiny_prepared, train_names, (16, 16, 16), 0.5, False, 0, 2)
    original = torch.utils.data.DataLoader.__iter__

    def no_shared_memory(loader):
        if loader.num_workers:
            raise RuntimeError("unable to write to file </torch_123_456>: No space left on device (28)")
        return original(loader)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", no_shared_memory)
    with pytest.raises(ValueError, match=r"^DataLoader workers could not start \(unable to write to file .*\); "
                                         r"loading in the main process would leave the GPU waiting\. .*--shm-size=16g"
                                         r".*fewer num_workers") as error:
        start_loader(patches, EpochSampler(1, 2, 0, 1), 2, 2, torch.device("cuda", 0))
    assert "\n" not in str(error.value)
    assert start_loader(patches, EpochSampler(1, 2, 0, 1), 2, 2, torch.device("cpu")).num_workers == 0  # CPU: on


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    import random
    import numpy as np
    torch.save(checkpoints.rng_state(), tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    checkpoints.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and (first[1] == second[1]).all() and first[2] == second[2]


def test_a_settings_file_that_predicts_with_onnx_runtime_still_trains_and_predicts_its_validation_cases(
        tmp_path, tiny_prepared):
    # backend onnxruntime is for predict.py on an exported model; the run's own validation predictions use its
    # network in memory (no model.onnx exists yet)
    hp = tiny_settings(tiny_prepared, tmp_path / "run", epochs=1, val_every=1, backend="onnxruntime")
    train.train(hp)
    val_names = manifest.split_cases(manifest.read_manifest(hp.prepared_dir))[1]
    assert sorted(p.name for p in (hp.run_dir / "validation").glob("*.nii.gz")) == sorted(
        f"{name}.nii.gz" for name in val_names)
    assert not (hp.run_dir / "model.onnx").exists()
