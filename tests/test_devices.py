"""The branches that only a GPU (or a Mac) would take, run on a CPU with the CUDA facts faked: the bf16
choice, channels_last, GPU counts, the process group and its order, SyncBatchNorm, the MPS fall-back; and
what runs on a CPU as it would on a GPU: float16 with loss scaling, torch.compile."""
import math

import pytest
import torch
import torch.distributed as dist

import train
from bratsunet import checkpoints, devices, loader, losses, manifest, network, training
from test_train import NaNGradient, tiny_settings

BF16, FP16 = torch.bfloat16, torch.float16


@pytest.fixture
def fake_gpus(monkeypatch):
    """install(capability, count, nccl): this machine has `count` CUDA GPUs of that compute capability.
    Returns the list of recorded calls: ("capability", device), ("set_device", device)."""
    calls = []

    def install(capability=(8, 0), count=2, nccl=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None: calls.append(("capability", device)) or capability)
        # what it answers on a V100 or T4 too: bf16 works there, emulated
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
        monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
        return calls
    return install


@pytest.mark.parametrize("capability, dtype, scaler", [
    ((7, 0), FP16, True),  # V100
    ((7, 5), FP16, True),  # T4, RTX 20xx
    ((8, 0), BF16, False),  # A100
    ((9, 0), BF16, False),  # H100
])
def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it_natively(fake_gpus, capability, dtype, scaler):
    calls = fake_gpus(capability)
    gpu = torch.device("cuda", 1)
    assert devices.run_settings("auto", "auto", gpu) == (dtype, scaler, False)
    assert calls == [("capability", gpu)]  # this GPU's capability, not the current GPU's
    assert devices.run_settings("fp32", "auto", gpu) == (None, False, False)
    assert devices.run_settings("fp16", True, gpu) == (FP16, True, True)


def test_channels_last_auto_is_on_for_native_bf16_on_a_cpu_only(fake_gpus, monkeypatch):
    cpu, mps = torch.device("cpu"), torch.device("mps")
    for native in (True, False):
        monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: native)
        assert devices.run_settings("auto", "auto", cpu) == ((BF16, False, True) if native else (None, False, False))
        assert devices.run_settings("fp32", "auto", cpu) == (None, False, False)  # float32: not measured
        assert devices.run_settings("bf16", "auto", cpu) == (BF16, False, native)  # emulated bf16: not measured
        assert devices.run_settings("auto", False, cpu)[2] is False
        assert devices.run_settings("auto", "auto", mps) == (None, False, False)
    fake_gpus((9, 0))
    assert devices.run_settings("auto", "auto", torch.device("cuda", 0)) == (BF16, False, False)
    assert devices.run_settings("auto", True, torch.device("cuda", 0)) == (BF16, False, True)


def test_resolve_device_counts_the_gpus(fake_gpus):
    fake_gpus(count=2)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert devices.resolve_device("auto", local_rank=1, world_size=2) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device: cuda:2 needs GPU 2, but this machine shows 2 GPU\(s\)"):
        devices.resolve_device("cuda:2")
    with pytest.raises(ValueError, match="LOCAL_RANK 2 needs GPU 2, but this machine shows 2 GPU"):
        devices.resolve_device("cuda", local_rank=2, world_size=3)  # --nproc_per_node=3 on 2 GPUs


def test_process_group_backend_serves_cpu_and_gpu_tensors(fake_gpus):
    fake_gpus(nccl=True)
    assert devices.process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert devices.process_group_backend(torch.device("cpu")) == "gloo"
    fake_gpus(nccl=False)  # Windows
    assert devices.process_group_backend(torch.device("cuda", 0)) == "gloo"


def test_without_cuda_auto_falls_back_to_mps(monkeypatch, tiny_prepared):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    mps = devices.resolve_device("auto")
    assert mps == torch.device("mps")
    assert devices.run_settings("auto", "auto", mps) == (None, False, False)  # float32, contiguous
    with pytest.raises(ValueError, match="device: mps under torchrun: no process-group backend"):
        devices.process_group_backend(mps)
    names = manifest.split_cases(manifest.read_manifest(tiny_prepared))[0]
    patches = loader.PatchDataset(tiny_prepared, names, (16, 16, 16), 0.5, False, 0, 2)
    assert not loader.start_loader(patches, loader.EpochSampler(1, 2, 0, 1), 2, 0, mps).pin_memory
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no Apple GPU"):
        devices.resolve_device("mps")


class ProcessGroupStarted(Exception):
    pass


@pytest.mark.parametrize("world_size, device", [(2, "auto"), (1, "cuda:1")])
def test_train_sets_the_gpu_before_the_process_group_starts(fake_gpus, monkeypatch, tmp_path, world_size, device):
    calls = fake_gpus((8, 0), count=2)

    def init_process_group(backend, **options):
        calls.append(("init_process_group", backend, options))
        raise ProcessGroupStarted

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(train, "run_settings", lambda *args: (_ for _ in ()).throw(ProcessGroupStarted()))
    for key, value in {"WORLD_SIZE": world_size, "RANK": 1, "LOCAL_RANK": 1}.items():
        monkeypatch.setenv(key, str(value))
    with pytest.raises(ProcessGroupStarted):
        train.train(tiny_settings(tmp_path, tmp_path, device=device))
    gpu = torch.device("cuda", 1)
    expected = [("set_device", gpu)]
    if world_size > 1:
        expected.append(("init_process_group", "cpu:gloo,cuda:nccl",
                         {"timeout": training.PROCESS_GROUP_TIMEOUT, "device_id": gpu}))
    assert calls == expected
    assert torch.backends.cudnn.benchmark


def test_batch_norm_is_synchronised_across_gpus_under_ddp(fake_gpus, monkeypatch, tmp_path, capsys):
    fake_gpus((8, 0))
    monkeypatch.setattr(torch.nn.Module, "to", lambda module, *args, **kwargs: module)  # stays on the CPU
    wrapped = []
    monkeypatch.setattr(training, "DistributedDataParallel",
                        lambda module, device_ids: wrapped.append(device_ids) or module)
    hp = tiny_settings(tmp_path, tmp_path, norm="batch")

    def norms(net):
        return {type(m).__name__ for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}

    net, train_model = training.build_for_training(hp, torch.device("cuda", 1), world_size=2, main_process=True)
    assert norms(train_model) == norms(net) == {"SyncBatchNorm"} and wrapped == [[1]]
    net, train_model = training.build_for_training(hp, torch.device("cpu"), world_size=2, main_process=True)
    assert norms(train_model) == {"BatchNorm3d"} and wrapped[1] is None
    assert "batch statistics stay per process" in capsys.readouterr().out


def skip_validation(net, volumes, hp, device, rank=0, world_size=1):
    return dict.fromkeys(("dice_WT", "dice_TC", "dice_ET", "dice_mean", "accuracy"), 0.5), None


def test_float16_loss_scaling_skips_overflowing_steps_and_resumes_its_scale(tiny_prepared, tmp_path, monkeypatch,
                                                                             capsys):
    """precision: fp16 as on a V100 (autocast float16 + GradScaler), run on the CPU, where both work the same."""
    make_loss, calls = losses.make_loss, []

    def inf_gradient_at_step_2(hp):
        loss_fn = make_loss(hp)

        def faulty(logits, labels):
            calls.append(1)
            value = loss_fn(logits, labels)
            return NaNGradient.apply(value) if len(calls) == 2 else value
        return faulty

    monkeypatch.setattr(losses, "make_loss", inf_gradient_at_step_2)
    monkeypatch.setattr(training, "validate", skip_validation)  # float16 convolutions are slow on a CPU
    hp = tiny_settings(tiny_prepared, tmp_path, precision="fp16", epochs=1, steps_per_epoch=3, patch_size="8, 8, 8",
                       batch_size=1)
    result = train.train(hp)
    output = capsys.readouterr().out
    assert "float16 with loss scaling" in output
    assert "non-finite gradients at epoch 1 step 2: skipped" in output
    skipped = result["skipped_steps"]
    assert skipped >= 1 and math.isfinite(result["train_loss"])
    first = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    assert first["scaler"]["scale"] == 2.0 ** 16 * 0.5 ** skipped  # halved at each overflow, from 2^16
    assert {float(s["step"]) for s in first["optimizer"]["state"].values()} == {3.0 - skipped}
    assert all(torch.isfinite(v).all() for v in first["model"].values())

    train.train(hp.replace(epochs=2, resume=True))
    resumed = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    skipped_2 = resumed["metrics"][1]["skipped_steps"]
    assert resumed["scaler"]["scale"] == first["scaler"]["scale"] * 0.5 ** skipped_2  # continued, not reset


def test_compile_trains_the_same_as_eager(tiny_prepared, tmp_path, monkeypatch):
    """compile: True through the same training; aot_eager traces forward and backward as the default
    backend does but skips its C++ code generation (40 s here; benchmarks/gpu_check.sh runs it on a GPU)."""
    compiled, compile = [], torch.compile

    def compile_aot_eager(module):
        compiled.append(type(module).__name__)
        return compile(module, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    monkeypatch.setattr(training, "validate", skip_validation)  # validation runs the network uncompiled
    results = [train.train(tiny_settings(tiny_prepared, tmp_path / f"compile_{flag}", compile=flag, epochs=1,
                                         steps_per_epoch=2, patch_size="8, 8, 8", precision="fp32"))
               for flag in (False, True)]
    assert compiled == ["UNet3D"]
    assert results[1]["train_loss"] == pytest.approx(results[0]["train_loss"], rel=1e-5)
    checkpoint = torch.load(tmp_path / "compile_True" / "checkpoint_last.pt", weights_only=True)
    assert not [key for key in checkpoint["model"] if key.startswith(("_orig_mod.", "module."))]
    net, _ = checkpoints.load_model(tmp_path / "compile_True" / "checkpoint_last.pt")
    assert isinstance(net, network.UNet3D)
