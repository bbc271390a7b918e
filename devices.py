"""Where and in which precision the network runs: device resolution, autocast and its dtype.

train.py and predict.py (and the benchmarks) share these; they import no project file.
"""
import torch


def resolve_device(name, local_rank=0, world_size=1, cuda_available=None, mps_available=None):
    """hp.device -> torch.device. Under torchrun process k takes GPU LOCAL_RANK (choose GPUs with
    CUDA_VISIBLE_DEVICES)."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    mps_available = torch.backends.mps.is_available() if mps_available is None else mps_available
    if name == "auto":
        name = "cuda" if cuda_available else "mps" if mps_available else "cpu"
    if name.startswith("cuda"):
        if not cuda_available:
            raise RuntimeError(f"device: {name}, but this PyTorch sees no CUDA GPU (use device: auto or cpu)")
        if ":" in name and world_size > 1:
            raise ValueError(f"device: {name} names one GPU, but torchrun started {world_size} processes: "
                             "use device: cuda or auto (process k takes GPU LOCAL_RANK)")
        return torch.device(name) if ":" in name else torch.device("cuda", local_rank)
    if name == "mps" and not mps_available:
        raise RuntimeError("device: mps, but this PyTorch sees no Apple GPU (use device: auto or cpu)")
    return torch.device(name)


def cpu_supports_bf16():
    """True when the CPU has native bfloat16 instructions (AVX512-BF16 or AMX), the ones oneDNN's bf16
    kernels use. A trial bf16 convolution would prove nothing: autocast runs on any CPU, but without
    these instructions bf16 is emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


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


def bf16_supported(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_bf16()
