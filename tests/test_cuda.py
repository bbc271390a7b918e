"""What only a CUDA GPU shows (`pytest -m cuda`, skipped without one; benchmarks/gpu_check.sh runs them):
training and resume on the GPU, predict on the GPU against the CPU, float16 with loss scaling, channels_last
on and off, torch.compile's default backend, and the process group's collectives on GPU and CPU tensors.
CUDA_TESTS_DEVICE=cpu runs them on the CPU instead: a check of the tests themselves."""
import datetime
import math
import os
import socket

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.distributed as dist

import train
from bratsunet import cases, devices, hyperparameters, inference, losses, network, preprocessing, training
from test_train import tiny_settings

DEVICE = os.environ.get("CUDA_TESTS_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def watch_output_dtypes(monkeypatch):
    """-> the set that collects the dtype of every output of the networks train.py builds."""
    dtypes, build_model = set(), network.build_model

    def build_and_watch(hp):
        net = build_model(hp)
        net.heads[0].register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
        return net

    monkeypatch.setattr(network, "build_model", build_and_watch)
    return dtypes


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_training_and_resume_on_the_gpu(tiny_prepared, tmp_path, monkeypatch, capsys):
    dtypes = watch_output_dtypes(monkeypatch)
    hp = tiny_settings(tiny_prepared, tmp_path, device=DEVICE, epochs=2)
    train.train(hp)
    assert f"training on {DEVICE}" in capsys.readouterr().out
    device = devices.resolve_device(DEVICE)
    assert dtypes == {devices.run_settings("auto", "auto", device)[0] or torch.float32}
    first = load(tmp_path / "checkpoint_last.pt")
    assert first["epoch"] == 2 and ("cuda" in first["rng"]) == (device.type == "cuda")
    assert all(torch.isfinite(value).all() for value in first["model"].values())

    train.train(hp.replace(epochs=3, resume=True))
    resumed = load(tmp_path / "checkpoint_last.pt")
    assert [row["epoch"] for row in resumed["metrics"]] == [1, 2, 3]
    assert resumed["metrics"][:2] == first["metrics"]
    assert resumed["scheduler"]["last_epoch"] == 3 * hp.steps_per_epoch
    assert 0 <= resumed["metrics"][-1]["dice_mean"] <= 1


def test_predict_on_the_gpu_equals_predict_on_the_cpu(tiny_prepared, tiny_raw, tmp_path):
    hp = tiny_settings(tiny_prepared, tmp_path / "run", device="cpu", precision="fp32", raw_data_dir=tiny_raw,
                       epochs=2)
    train.train(hp)  # a trained network: untrained probabilities sit near 0.5, where any rounding flips a label
    case = cases.find_cases(tiny_raw, hp.channel_names, hp.seg_channel_name)[0][0]
    image, _ = preprocessing.preprocess(cases.load_case(case)[0], hp.crop_margin)  # (C, x, y, z)
    probabilities, labels = {}, {}
    for run, (device, precision) in enumerate((("cpu", "fp32"), (DEVICE, "fp32"), (DEVICE, "auto"))):
        settings = hp.replace(device=device, precision=precision, prediction_dir=tmp_path / f"predictions_{run}")
        net, settings = inference.load_for_inference(settings, devices.resolve_device(device))
        probabilities[device, precision] = inference.predict_case(net, image, settings, settings.target).cpu()
        path, = inference.predict_cases(settings, [case], net)
        labels[device, precision] = np.asarray(nib.load(path).dataobj)
    cpu = probabilities["cpu", "fp32"]
    # float32 on a GPU convolves in TF32 (10-bit mantissa) by default; bf16 keeps 8 bits, float16 11. On the
    # CPU bf16 moved these probabilities by at most 3.3e-3 and 0.02% of the labels (CUDA_TESTS_DEVICE=cpu)
    torch.testing.assert_close(probabilities[DEVICE, "fp32"], cpu, atol=1e-2, rtol=0)
    torch.testing.assert_close(probabilities[DEVICE, "auto"], cpu, atol=5e-2, rtol=0)
    for key in ((DEVICE, "fp32"), (DEVICE, "auto")):
        assert np.mean(labels[key] != labels["cpu", "fp32"]) < 2e-3, key


def test_float16_with_loss_scaling_on_the_gpu(tiny_prepared, tmp_path, monkeypatch, capsys):
    dtypes = watch_output_dtypes(monkeypatch)
    result = train.train(tiny_settings(tiny_prepared, tmp_path, device=DEVICE, precision="fp16", epochs=1))
    assert "torch.float16 with loss scaling" in capsys.readouterr().out
    assert dtypes == {torch.float16}
    checkpoint = load(tmp_path / "checkpoint_last.pt")
    assert checkpoint["scaler"]["scale"] == 2.0 ** 16 * 0.5 ** result["skipped_steps"]
    assert result["skipped_steps"] < 4 and math.isfinite(result["train_loss"])
    assert all(torch.isfinite(value).all() for value in checkpoint["model"].values())


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_channels_last_on_and_off_give_the_same_outputs(precision):
    hp = hyperparameters.load(overrides={"features": "8, 16, 32", "device": DEVICE, "precision": precision,
                                         "patch_size": "32, 32, 32", "sw_batch_size": 2})
    device = devices.resolve_device(DEVICE)
    torch.manual_seed(1)
    image = torch.randn(2, 4, 32, 32, 32)  # (B, C, X, Y, Z)
    volume = torch.randn(4, 48, 40, 36)  # (C, X, Y, Z): 8 windows
    outputs, gradients, probabilities = {}, {}, {}
    for channels_last in (False, True):
        settings = hp.replace(channels_last=channels_last)
        dtype, _, layout = devices.run_settings(precision, channels_last, device)
        net, _ = training.build_for_training(settings, device, 1, True)  # the same seeded weights for both
        weight = net.encoders[0][0].weight
        assert layout == channels_last == weight.is_contiguous(memory_format=torch.channels_last_3d)
        x = image.to(device)
        x = x.contiguous(memory_format=torch.channels_last_3d) if layout else x
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            output = net(x)  # (B, 3, X, Y, Z)
        output.float().square().mean().backward()
        outputs[channels_last], gradients[channels_last] = output.float().cpu(), weight.grad.float().cpu()
        probabilities[channels_last] = inference.predict_case(net.eval(), volume, settings, settings.target).cpu()
    tolerance = 1e-2 if precision == "fp32" else 5e-2  # other convolution algorithms per layout; TF32 in fp32
    torch.testing.assert_close(outputs[True], outputs[False], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(gradients[True], gradients[False], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(probabilities[True], probabilities[False], atol=tolerance, rtol=0)


def test_compile_trains_like_eager_on_the_gpu(tiny_prepared, tmp_path):
    """torch.compile's default backend (Inductor: Triton kernels on a GPU)."""
    results = [train.train(tiny_settings(tiny_prepared, tmp_path / f"compile_{flag}", device=DEVICE, compile=flag,
                                         epochs=1, steps_per_epoch=2)) for flag in (False, True)]
    assert results[1]["train_loss"] == pytest.approx(results[0]["train_loss"], rel=0.05)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_process_group_of_a_gpu_run_takes_its_collectives(tmp_path, monkeypatch):
    """One process (NCCL refuses two processes on one GPU) in the group torchrun's processes start, DDP
    around the network: train_epoch's collective (the epoch's loss totals and skipped steps, in CPU memory)
    and validation's object gather."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "RANK": 0, "WORLD_SIZE": 1}.items():
        monkeypatch.setenv(key, str(value))
    device = devices.resolve_device(DEVICE)
    devices.use_device(device)
    devices.start_process_group(device, datetime.timedelta(minutes=2))
    try:
        hp = tiny_settings(tmp_path, tmp_path, device=DEVICE, patch_size="16, 16, 16", steps_per_epoch=2)
        net, ddp = training.build_for_training(hp, device, world_size=2, main_process=True)  # wrapped as under torchrun
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        dtype, use_scaler, _ = devices.run_settings(hp.precision, hp.channels_last, device)
        optimizer = training.make_optimizer(net, hp)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        batch = torch.randn(2, 4, 16, 16, 16), torch.randint(0, 4, (2, 16, 16, 16))
        mean, skipped = training.train_epoch(ddp, [batch] * 2, optimizer, scheduler, torch.amp.GradScaler(
            device.type, enabled=use_scaler), losses.make_loss(hp), hp, device, dtype, 1, 2, True)
        assert math.isfinite(mean) and skipped == 0
        gathered = [None]
        dist.all_gather_object(gathered, [(0, [0.5, 0.5, 0.5], 0.9)])
        assert gathered == [[(0, [0.5, 0.5, 0.5], 0.9)]]
        dist.barrier()
    finally:
        dist.destroy_process_group()
