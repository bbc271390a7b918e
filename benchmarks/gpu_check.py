"""The Python half of benchmarks/gpu_check.sh: each command measures one thing and appends its rows (JSON
lines) to a results file; `table` prints them all as one markdown table.

    python benchmarks/gpu_check.py steps RESULTS [--steps N] --hp FILE [key=value ...]
    python benchmarks/gpu_check.py loader|predict RESULTS --hp FILE [key=value ...]
    python benchmarks/gpu_check.py pytest|torchrun RESULTS --rc RC --log LOG [--processes N] --hp FILE [...]
    python benchmarks/gpu_check.py failed RESULTS --check NAME --log LOG
    python benchmarks/gpu_check.py table RESULTS

On a GPU the settings are hyperparameters_brats2020_gpu.txt's (its widths, 128^3 patches, num_workers);
gpu_check.sh's GPU_CHECK_TINY=1 runs the same commands on the CPU with a tiny model and patch.
"""
import argparse
import csv
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bratsunet.cases import find_cases, load_case
from bratsunet.loader import EpochSampler, PatchDataset, foreground_classes, start_loader
from bratsunet import augmentation, checkpoints, devices, hyperparameters, inference, losses, manifest, network, training

WARMUP_STEPS = 3  # cuDNN's kernel search (cudnn.benchmark) and the caching allocator settle in these
CHOSEN = " (train.py's choice)"  # marks the setting that train.py takes for hyperparameters_brats2020_gpu.txt
TIMED_SECONDS = 10  # per setting at most, however many --steps: a slow GPU stays within the 8 minutes


def add_row(results, check, setting, result, **extra):
    with open(results, "a") as file:
        file.write(json.dumps({"check": check, "setting": setting, "result": result, **extra}) + "\n")


def read_rows(results):
    path = Path(results)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def last_line(log):
    lines = [line.strip() for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- measurements

def time_steps(hp, device, steps):
    """(optimizer steps per second, peak memory text) of training.train_epoch on one random batch of
    hp.patch_size patches, held in pinned CPU memory as the DataLoader delivers it."""
    dtype, use_scaler, _ = devices.run_settings(hp.precision, hp.channels_last, device)
    net, train_model = training.build_for_training(hp, device, 1, False)
    optimizer = training.make_optimizer(net, hp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    loss_fn = losses.make_loss(hp)
    image = torch.randn(hp.batch_size, len(hp.channel_names), *hp.patch_size)  # (B, C, px, py, pz)
    labels = torch.randint(0, 4, (hp.batch_size, *hp.patch_size))  # (B, px, py, pz)
    if device.type == "cuda":
        image, labels = image.pin_memory(), labels.pin_memory()
        torch.cuda.reset_peak_memory_stats(device)

    def run(steps):
        training.train_epoch(train_model, [(image, labels)] * steps, optimizer, scheduler, scaler, loss_fn,
                          hp.replace(steps_per_epoch=steps), device, dtype, 1, 1, False)

    run(min(WARMUP_STEPS, steps))
    synchronize(device)
    start, done = time.perf_counter(), 0
    while done < steps and time.perf_counter() - start < TIMED_SECONDS:
        run(1)
        synchronize(device)  # train_epoch reads its totals once per call: the step is timed whole
        done += 1
    rate = done / (time.perf_counter() - start)
    memory = "n/a (CPU)" if device.type != "cuda" else f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    return rate, memory


def measure_steps(hp, device, results, steps):
    """Rows: steps/s and peak memory for bf16 / fp16 / fp32 x channels_last off / on; the row with train.py's
    choice for hp (precision and channels_last as set) is marked and keeps its patches/s for `loader`."""
    chosen = devices.run_settings(hp.precision, hp.channels_last, device)
    check = f"training step, {network.count_parameters(network.build_model(hp)):,} parameters, " \
            f"patch {'x'.join(map(str, hp.patch_size))}, batch {hp.batch_size}"
    for precision in ("bf16", "fp16", "fp32"):
        for channels_last in (False, True):
            settings = hp.replace(precision=precision, channels_last=channels_last)
            default = devices.run_settings(precision, channels_last, device) == chosen
            setting = f"{precision}, channels_last {'on' if channels_last else 'off'}" + CHOSEN * default
            try:
                rate, memory = time_steps(settings, device, steps)
            except torch.OutOfMemoryError:
                add_row(results, check, setting, "out of memory")
            else:
                patches = rate * hp.batch_size
                add_row(results, check, setting, f"{rate:.2f} steps/s, {patches:.1f} patches/s, peak {memory}",
                        patches_per_s=patches, default=default)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def measure_loader(hp, device, results):
    """Rows: patches/s of training's DataLoader (hp.num_workers workers) against the GPU's patches/s, and
    where train.py augments the batch on the device (augment nnunet), the seconds that takes per batch."""
    train_names, _ = manifest.split_cases(manifest.read_manifest(hp.prepared_dir, hp.data_format))
    batches = 10 * max(hp.num_workers, 2)  # well past what the workers prefetch while the first batch loads
    on_device = augmentation.runs_on_device(hp.augment, hp.augment_on, device)  # as train.py decides
    patches = PatchDataset(hp.prepared_dir, train_names, hp.patch_size, hp.foreground_fraction, hp.augment, hp.seed,
                           (batches + 1) * hp.batch_size, on_device, hp.patch_sampling, hp.batch_size,
                           foreground_classes(hp.patch_sampling, hp.data_format, hp.target))  # as train.py does
    sampler = EpochSampler(batches + 1, hp.batch_size, 0, 1)
    sampler.set_epoch(1)
    loader = iter(start_loader(patches, sampler, hp.batch_size, hp.num_workers, device))
    first = next(loader)  # workers started
    start = time.perf_counter()
    for _ in loader:
        pass
    rate = batches * hp.batch_size / (time.perf_counter() - start)
    gpu = [row["patches_per_s"] for row in read_rows(results) if row.get("default")]
    if on_device:
        measure_device_augmentation(hp, device, results, first, gpu)
    if not gpu:
        verdict = "the step rate was not measured"
    elif rate >= gpu[0]:
        verdict = f"not loader-bound: {rate / gpu[0]:.1f}x the {gpu[0]:.1f} patches/s that training takes"
    else:
        verdict = f"LOADER-BOUND: training waits, the loader gives {rate / gpu[0]:.0%} of its {gpu[0]:.1f} patches/s"
    add_row(results, "data loader, patches of the prepared generated cases", f"num_workers {hp.num_workers}",
            f"{rate:.1f} patches/s; {verdict}")


def measure_device_augmentation(hp, device, results, batch, gpu):
    """Row: seconds per batch of augmentation.to_device (nnunet, all patches at once) and its share of a step."""
    augmentation.to_device(batch, device, hp.patch_size)  # warm-up: kernels chosen, memory cached
    synchronize(device)
    start, done = time.perf_counter(), 0
    while done < 10 and time.perf_counter() - start < TIMED_SECONDS:
        augmentation.to_device(batch, device, hp.patch_size)
        synchronize(device)
        done += 1
    seconds = (time.perf_counter() - start) / done
    share = f", {seconds * gpu[0] / hp.batch_size:.0%} of a training step" if gpu else ""
    add_row(results, f"augment {hp.augment} on the {device.type.upper()}, batched after the loader",
            f"batch {hp.batch_size}, patch {'x'.join(map(str, hp.patch_size))}", f"{seconds:.3f} s per batch{share}")


def measure_predict(hp, device, results):
    """Rows: seconds of inference.predict_cases for one whole raw case, without and with mirror TTA (the
    network seeded and untrained: the time does not depend on the weights)."""
    cases, _ = find_cases(hp.raw_data_dir, hp.channel_names, hp.seg_channel_name,
                                          data_format=hp.data_format)
    torch.manual_seed(hp.seed)
    net = network.build_model(hp)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint.pt"
        checkpoints.save_checkpoint({"model_args": network.model_args(hp), "model": net.state_dict(),
                               "hyperparameters": hp.to_dict()}, checkpoint)
        settings = hp.replace(checkpoint=checkpoint, prediction_dir=Path(tmp), overwrite=True)
        net, settings = inference.load_for_inference(settings, device)
        shape = "x".join(map(str, load_case(cases[0])[0].shape[1:]))
        check = f"predict one whole case ({shape}: read, infer, write), sw_batch_size {hp.sw_batch_size}"
        for tta, setting in ((False, None), (False, "no TTA"), (True, "mirror TTA (8 passes)")):  # 1st: warm-up
            synchronize(device)
            start = time.perf_counter()
            inference.predict_cases(settings.replace(tta_mirror=tta), cases[:1], net)
            synchronize(device)
            if setting:
                add_row(results, check, setting, f"{time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------- rows from gpu_check.sh's commands

def pytest_row(results, rc, log):
    """Row: pytest's closing counts ("2 failed, 5 passed in 30.1s" -> "2 failed, 5 passed")."""
    count = r"\d+ (?:passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)"
    lines = [line for line in Path(log).read_text(errors="replace").splitlines() if re.search(rf"{count}.* in ", line)]
    summary = ", ".join(re.findall(count, lines[-1])) if lines else last_line(log)
    add_row(results, "pytest -m cuda", "", f"{'ok' if rc == 0 else 'FAILED'}: {summary}")


def torchrun_row(hp, device, results, rc, log, processes):
    """Row: the outcome of train.py under torchrun (2 epochs) and the seconds of its second epoch."""
    metrics = hp.run_dir / "metrics.csv"
    rows = list(csv.DictReader(metrics.open())) if metrics.is_file() else []
    backend = devices.process_group_backend(device) if processes > 1 else "no process group (1 process)"
    setting = f"{processes} process(es), {backend}, steps_per_epoch {hp.steps_per_epoch}"
    if rc != 0 or len(rows) < 2:
        add_row(results, "torchrun train.py, 2 epochs", setting, f"FAILED (exit {rc}): {last_line(log)}")
    else:
        add_row(results, "torchrun train.py, 2 epochs", setting,
                f"ok: epoch 2 took {float(rows[1]['seconds']):.1f} s with validation")


def print_table(results):
    if os.environ.get("GPU_CHECK_TINY") == "1":
        where = "the CPU at tiny sizes (GPU_CHECK_TINY=1: a check of the script, not a measurement)"
    elif torch.cuda.is_available():
        capability = ".".join(map(str, torch.cuda.get_device_capability()))
        where = (f"{torch.cuda.get_device_name()} (compute capability {capability}) x {torch.cuda.device_count()}, "
                 f"CUDA {torch.version.cuda}")
    else:
        where = "a machine without a CUDA GPU"
    print(f"\ngpu_check on {where}, torch {torch.__version__}\n")
    print("| check | setting | result |\n| --- | --- | --- |")
    for row in read_rows(results):
        print(f"| {row['check']} | {row['setting']} | {row['result']} |")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("steps", "loader", "predict", "pytest", "torchrun", "failed", "table"))
    parser.add_argument("results")
    parser.add_argument("--hp")
    parser.add_argument("--rc", type=int, default=0)
    parser.add_argument("--log")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per setting")
    parser.add_argument("--check")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.command == "table":
        return print_table(args.results)
    if args.command == "failed":
        return add_row(args.results, args.check, "", f"FAILED: {last_line(args.log)}")
    if args.command == "pytest":
        return pytest_row(args.results, args.rc, args.log)
    hp = hyperparameters.load(args.hp, overrides=args.overrides)
    device = devices.resolve_device(hp.device)
    devices.use_device(device)
    if args.command == "torchrun":
        return torchrun_row(hp, device, args.results, args.rc, args.log, args.processes)
    if args.command == "steps":
        return measure_steps(hp, device, args.results, args.steps)
    {"loader": measure_loader, "predict": measure_predict}[args.command](hp, device, args.results)


if __name__ == "__main__":
    main(sys.argv[1:])
