"""Seconds per training step and peak memory: our default precision and memory format, the same precision
without channels_last, the same model in float32, and MONAI's BasicUNet of similar size, at one patch and
batch size.

Each row runs in its own process, so its peak memory (max RSS) is its own.
    python benchmarks/train_bench.py [patch] [batch] [steps]        (defaults: hyperparameters.txt, 10 steps)
"""
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bratsunet import devices, hyperparameters, losses, network

# "default": the precision and memory format of hyperparameters.txt; "contiguous": its precision without
# channels_last; "float32": plain float32, contiguous
ROWS = ("ours, default", "ours, default precision, contiguous", "ours, float32", "MONAI BasicUNet, float32",
        "MONAI BasicUNet, default")


def build(row, hp):
    if row.startswith("ours"):
        return network.build_model(hp)
    from monai.networks.nets import BasicUNet
    # BasicUNet has 5 levels + a top; widths scaled to about our parameter count
    return BasicUNet(spatial_dims=3, in_channels=len(hp.channel_names), out_channels=3,
                     features=(8, 8, 16, 32, 64, 8), norm=("instance", {"affine": True}))


def time_steps(row, patch, batch, steps):
    """Child process: time `steps` optimizer steps after 2 warm-up steps; print one JSON line."""
    hp = hyperparameters.load()
    torch.manual_seed(0)
    net = build(row, hp)
    layout = hp.channels_last if row.endswith("default") else False
    dtype, _, channels_last = devices.run_settings("fp32" if "float32" in row else hp.precision, layout,
                                                   torch.device("cpu"))
    optimizer = torch.optim.AdamW(net.parameters(), lr=hp.learning_rate)
    loss_fn = losses.make_loss(hp)
    image = torch.randn(batch, len(hp.channel_names), *patch)
    if channels_last:
        net, image = net.to(memory_format=torch.channels_last_3d), image.contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(0, 4, (batch, *patch))
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = net(image)
        value = loss_fn(logits.float(), labels)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    times = sorted(times[2:])
    print(json.dumps({"seconds": times[len(times) // 2], "parameters": network.count_parameters(net),
                      "dtype": str(dtype or torch.float32),
                      "channels_last": image.is_contiguous(memory_format=torch.channels_last_3d), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv):
    hp = hyperparameters.load()
    patch = (int(argv[0]),) * 3 if argv else hp.patch_size
    batch = int(argv[1]) if len(argv) > 1 else hp.batch_size
    steps = int(argv[2]) if len(argv) > 2 else 10
    print(f"training step, patch {patch}, batch {batch}, median of {steps} steps, {torch.get_num_threads()} threads, "
          f"CPU bf16 instructions: {devices.cpu_supports_bf16()}\n")
    print("| model | autocast | channels_last | parameters | s/step | peak memory (MB) |\n| --- | --- | --- | --- | --- | --- |")
    results = {}
    for row in ROWS:
        child = subprocess.run([sys.executable, __file__, "--child", row, ",".join(map(str, patch)), str(batch),
                                str(steps)], check=True, capture_output=True, text=True)
        r = results[row] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"| {row} | {r['dtype']} | {r['channels_last']} | {r['parameters']:,} | {r['seconds']:.3f} | {r['peak_mb']:.0f} |")
    default = results["ours, default"]
    ratio = results["ours, float32"]["seconds"] / default["seconds"]
    layout = results["ours, default precision, contiguous"]["seconds"] / default["seconds"]
    print(f"\nour default ({hp.precision} precision, channels_last {hp.channels_last}: {default['channels_last']}) is "
          f"{ratio:.2f}x faster per step than plain float32 of the same model, and {layout:.2f}x faster than its "
          "precision without channels_last")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        time_steps(sys.argv[2], tuple(int(s) for s in sys.argv[3].split(",")), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main(sys.argv[1:])
