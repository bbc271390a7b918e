"""Where and how the network runs: device resolution, autocast and its dtype, the memory format, the
process group under torchrun.

train.py and predict.py (and the benchmarks) share these; they import no project file. The CUDA
decisions read their facts (capability, device count, NCCL) from torch at call time, so tests fake them.
"""
import os
import sys
import traceback

import torch
import torch.distributed as dist


class DeviceError(ValueError, RuntimeError):
    """A device setting this machine cannot serve: a bad setting (ValueError, one line from every script) met at
    run time (RuntimeError, as PyTorch would raise)."""


def visible_devices(cuda_available, mps_available):
    """'cpu, cuda:0, cuda:1': the devices this PyTorch sees, for messages about a device it does not."""
    gpus = [f"cuda:{index}" for index in range(torch.cuda.device_count())] if cuda_available else []
    return ", ".join(["cpu", *gpus, *["mps"] * bool(mps_available)])


def resolve_device(name, local_rank=0, world_size=1, cuda_available=None, mps_available=None):
    """hp.device -> torch.device. Under torchrun process k takes GPU LOCAL_RANK (choose GPUs with
    CUDA_VISIBLE_DEVICES). Without CUDA, auto falls back to Apple's GPU (MPS), then the CPU. A device this
    PyTorch does not see: DeviceError naming the setting and the devices it sees."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    mps_available = torch.backends.mps.is_available() if mps_available is None else mps_available
    sees = f"it sees: {visible_devices(cuda_available, mps_available)}"
    if name == "auto":
        name = "cuda" if cuda_available else "mps" if mps_available else "cpu"
    if name.startswith("cuda"):
        if not cuda_available:
            raise DeviceError(f"device: {name}, but this PyTorch sees no CUDA GPU ({sees}; a CPU-only build of "
                              "PyTorch, or no driver): use device: auto or cpu")
        if ":" in name and world_size > 1:
            raise ValueError(f"device: {name} names one GPU, but torchrun started {world_size} processes: "
                             "use device: cuda or auto (process k takes GPU LOCAL_RANK)")
        device = torch.device(name) if ":" in name else torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:
            which = f"device: {name}" if ":" in name else f"torchrun process LOCAL_RANK {local_rank}"
            raise DeviceError(f"{which} needs GPU {device.index}, but this machine shows {count} GPU(s) "
                              f"(CUDA_VISIBLE_DEVICES, --nproc_per_node; {sees})")
        return device
    if name == "mps" and not mps_available:
        raise DeviceError(f"device: mps, but this PyTorch sees no Apple GPU ({sees}): use device: auto or cpu")
    return torch.device(name)


def use_device(device):
    """Make a GPU this process's current one (NCCL, object collectives, pinned memory and the CUDA
    random state follow it; device: cuda:1 alone would leave them on GPU 0), and let cuDNN time its
    kernels once: training and inference run one patch size."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------- precision and memory format

def cpu_supports_bf16():
    """True when the CPU has native bfloat16 instructions (AVX512-BF16 or AMX), the ones oneDNN's bf16
    kernels use. A trial bf16 convolution would prove nothing: autocast runs on any CPU, but without
    these instructions bf16 is emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def cuda_supports_bf16(device):
    """True when this GPU computes bfloat16 natively: compute capability 8.0 (Ampere) or newer.
    torch.cuda.is_bf16_supported() also says True on a V100 or T4, where bf16 is emulated and slower than
    float16 with loss scaling, and it asks the current GPU rather than this one."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def bf16_supported(device):
    """Native bfloat16 on this device (emulation does not count); False on MPS."""
    if device.type == "cuda":
        return cuda_supports_bf16(device)
    return device.type == "cpu" and cpu_supports_bf16()


def autocast_settings(precision, device_type, bf16_supported):
    """hp.precision -> (autocast dtype, None for float32; whether a GradScaler is needed)."""
    if precision == "auto":
        if device_type == "cuda":
            precision = "bf16" if bf16_supported else "fp16"
        else:  # CPUs with native bf16; MPS and other CPUs stay in float32
            precision = "bf16" if device_type == "cpu" and bf16_supported else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    # float16 has 5 exponent bits: small gradients underflow unless the loss is scaled up; bfloat16 has 8
    return dtype, dtype == torch.float16


def use_channels_last(setting, device_type, dtype, bf16_native):
    """hp.channels_last (auto | True | False) -> whether the network and its inputs use channels_last_3d.
    auto: on where it was measured faster, a CPU running native bfloat16 (oneDNN's bf16 convolutions
    want it; docs/benchmarks.md: training step); off on CUDA, where InstanceNorm3d makes channels-last inputs
    contiguous again, so each block may convert the layout twice (benchmarks/gpu_check.sh measures it),
    off in float32 and on MPS (not measured)."""
    if setting != "auto":
        return setting
    return device_type == "cpu" and dtype == torch.bfloat16 and bf16_native


def run_settings(precision, channels_last, device):
    """hp.precision and hp.channels_last on device -> (autocast dtype or None, GradScaler needed, channels_last)."""
    native = bf16_supported(device)
    dtype, use_scaler = autocast_settings(precision, device.type, native)
    return dtype, use_scaler, use_channels_last(channels_last, device.type, dtype, native)


# ---------------------------------------------------------------- torchrun

def process_group_backend(device):
    """The torch.distributed backend for processes computing on device. On GPUs one group serves both:
    NCCL for CUDA tensors (gradients, the per-step finite flag) and Gloo for tensors and objects in CPU
    memory (loss totals, validation results), which NCCL refuses. NCCL is missing on Windows: Gloo then
    carries the CUDA tensors too."""
    if device.type == "cuda":
        return "cpu:gloo,cuda:nccl" if dist.is_nccl_available() else "gloo"
    if device.type == "cpu":
        return "gloo"
    raise ValueError(f"device: {device.type} under torchrun: no process-group backend serves it; "
                     "use device: cpu (Gloo) or CUDA GPUs (NCCL)")


def start_process_group(device, timeout):
    """Join torchrun's process group; call use_device first. On a GPU the group is bound to it
    (device_id), so NCCL connects at once instead of guessing the GPU at the first collective."""
    dist.init_process_group(process_group_backend(device), timeout=timeout,
                            device_id=device if device.type == "cuda" else None)


def process_device(name, timeout):
    """(rank, world size, this process's device, made current). Under torchrun the process group is joined once:
    crossval.py's folds share it."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(name, int(os.environ.get("LOCAL_RANK", 0)), world_size)
    use_device(device)
    if world_size > 1 and not dist.is_initialized():
        start_process_group(device, timeout)
    return rank, world_size, device


def on_rank0(job):
    """job() in process 0, its result given to every process: under torchrun, what process 0's disk holds decides
    (node-local disks may differ, and processes that decide apart wait for each other for good)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return job()
    value = [job() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(value, src=0)
    return value[0]


def end_torchrun_process(code):
    """Exit a torchrun process now, without the interpreter's shutdown. Gloo's worker threads free the
    tensors of a collective a moment after it returns, which takes the interpreter lock; when that moment
    falls into the shutdown the thread is killed inside a C++ destructor and the process aborts (SIGABRT),
    so torchrun reports a finished run as failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_torchrun_process(job, hp):
    """job(hp) in a torchrun process, then the process ends (this never returns): 0 when job returns; on an
    error its traceback and rank, and 1 at once, so that torchrun stops the other processes, which would
    otherwise wait in their next collective until the timeout."""
    try:
        job(hp)
    except Exception as error:
        traceback.print_exc()
        print(f"rank {os.environ.get('RANK')} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        end_torchrun_process(1)
    end_torchrun_process(0)
