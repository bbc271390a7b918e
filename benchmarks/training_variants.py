"""Two training details measured on the demo's data in short runs: the deep-supervision targets (the labels at the
centre of each cell, as nnU-Net, against the cell's first voxel, the rule before) and the patch sampling
(patch_sampling per_patch against nnunet). Each run trains the demo's network for the demo's 12 epochs of 40
steps, validating once at the end, and reports the seconds of a training epoch (median of epochs 2 to 12, wall
and CPU) and the validation Dice of the last epoch.
    python benchmarks/training_variants.py [work_dir [seed ...]]     (default seeds 1 2)
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare_dataset
import train
from bratsunet import generator, hyperparameters, losses, training
from bratsunet.conventions import REGION_NAMES

VARIANTS = {  # name: (settings, the deep-supervision targets' rule)
    "deep supervision, targets at each cell's first voxel (before)": ({"deep_supervision": True}, "first"),
    "deep supervision, targets at each cell's centre": ({"deep_supervision": True}, "centre"),
    "patch_sampling per_patch": ({"patch_sampling": "per_patch"}, "centre"),
    "patch_sampling nnunet": ({"patch_sampling": "nnunet"}, "centre"),
}


def first_voxel(labels, shape):
    """The rule before: the first voxel of each cell, 0.5, 1.5 and 3.5 voxels off its centre at 1/2, 1/4, 1/8."""
    steps = [full // low for full, low in zip(labels.shape[1:], shape)]
    return labels[:, ::steps[0], ::steps[1], ::steps[2]]


def run(hp, rule):
    """Train hp -> (median wall and CPU seconds of epochs 2.., the last epoch's metrics row)."""
    wall, cpu, train_epoch, centre = [], [], training.train_epoch, losses.downsample_labels

    def timed(*args):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = train_epoch(*args)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        return result

    training.train_epoch, losses.downsample_labels = timed, first_voxel if rule == "first" else centre
    try:
        row = train.train(hp)
    finally:
        training.train_epoch, losses.downsample_labels = train_epoch, centre
    return statistics.median(wall[1:]), statistics.median(cpu[1:]), row


def main(work, seeds):
    work = Path(work)
    hp = hyperparameters.load(overrides={"raw_data_dir": work / "raw", "prepared_dir": work / "prepared",
                                         "val_every": 12})  # the demo's settings, validated at the end only
    if not (hp.prepared_dir / "dataset.json").is_file():
        generator.generate_dataset(hp.raw_data_dir, hp.synthetic_cases, hp.synthetic_shape, hp.seed, progress=True)
        prepare_dataset.prepare_dataset(hp)
    rows = []
    for name, (settings, rule) in VARIANTS.items():
        for seed in seeds:
            run_hp = hp.replace(seed=seed, run_dir=work / f"run_{len(rows)}", overwrite=True, **settings)
            rows.append((name, seed, *run(run_hp, rule)))
    print(f"\n{hp.epochs} epochs x {hp.steps_per_epoch} steps, batch {hp.batch_size}, patch {hp.patch_size[0]}^3, "
          f"the demo's network and data (split seed {hp.seed}); validation Dice of the last epoch\n")
    print("| variant | seed | s/epoch wall | s/epoch CPU | Dice WT | Dice TC | Dice ET | Dice mean |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, seed, wall, cpu, row in rows:
        print(f"| {name} | {seed} | {wall:.1f} | {cpu:.1f} | "
              + " | ".join(f"{row[f'dice_{r}']:.3f}" for r in REGION_NAMES) + f" | {row['dice_mean']:.3f} |")


if __name__ == "__main__":
    seeds = [int(seed) for seed in sys.argv[2:]] or [1, 2]
    if len(sys.argv) > 1:
        main(sys.argv[1], seeds)
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(folder, seeds)
