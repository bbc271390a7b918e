"""Seconds per augmented batch: ours (bratsunet/augmentation.py) against nnU-Net's own library, batchgeneratorsv2, with the
same transforms, probabilities and ranges, from the same memory-mapped volume to a (B, C, px, py, pz) batch.

Each batch counts the crop from the volume (for batchgeneratorsv2 the larger box that nnU-Net's loader cuts
for every patch, so that rotations find content; ours cuts that box only for the patches that rotate or
scale, and only its part inside the volume), the transforms and the stacking. The rows take turns batch by
batch, so a busy machine slows them alike. Two settings: nnU-Net's probabilities (the mean over many
batches, since a rotated batch costs more than a plain one), and every transform drawn (the median).
    python benchmarks/augment_bench.py [batches] [--device cuda]      (defaults: 20 batches, cpu)
With --device cuda our batched row runs on the GPU, and one training step of the GPU settings' network
(hyperparameters_brats2020_gpu.txt) is timed beside it.
"""
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bratsunet import augmentation, devices, hyperparameters, loader, losses, network, training

BATCH, CHANNELS, PATCH = 2, 4, (128, 128, 128)
VOLUME = (145, 171, 130)  # the real sample's brain box after prepare_dataset's crop


def brain_volume(seed=0):
    """A float16 (C, x, y, z) z-scored 'brain' (an ellipsoid, 0 outside) and uint8 labels, as prepared."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*(np.linspace(-1, 1, s) for s in VOLUME), indexing="ij")
    brain = sum(g ** 2 for g in grid) < 1
    image = (rng.standard_normal((CHANNELS, *VOLUME)) * brain).astype(np.float16)
    labels = np.zeros(VOLUME, dtype=np.uint8)
    labels[(grid[0] ** 2 + grid[1] ** 2 + (grid[2] - 0.2) ** 2) < 0.1] = 2
    labels[(grid[0] ** 2 + grid[1] ** 2 + (grid[2] - 0.2) ** 2) < 0.03] = 3
    return image, labels


def nnunet_box(patch, rotation=augmentation.ROTATION, smallest_scale=0.85):
    """nnU-Net's larger box (get_patch_size): the patch's size vector rotated by the largest angle about each
    axis (either way), the largest extent per axis kept, divided by its smallest scale (0.85, a leftover of nnU-Net v1)."""
    patch = np.asarray(patch, dtype=float)
    size = patch.copy()
    cos, sin = math.cos(rotation), math.sin(rotation)
    for axis in range(3):
        a, b = [k for k in range(3) if k != axis]
        turned = [cos * patch[a] + sin * patch[b], sin * patch[a] + cos * patch[b]]  # by +angle or -angle
        size[a], size[b] = max(size[a], turned[0]), max(size[b], turned[1])
    return [int(s / smallest_scale) for s in size]


def library_pipeline(p, seg_mode):
    """nnU-Net's training transforms (nnUNetTrainer.get_training_transforms, 3D, no cascade) in
    batchgeneratorsv2, with the probabilities p (augmentation.PROBABILITIES or all 1)."""
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
    from batchgeneratorsv2.transforms.utils.random import RandomTransform
    angle = (-augmentation.ROTATION, augmentation.ROTATION)
    return ComposeTransforms([
        SpatialTransform(PATCH, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
                         p_rotation=p["rotation"], rotation=angle, p_scaling=p["scaling"], scaling=augmentation.SCALING,
                         p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False, mode_seg=seg_mode),
        RandomTransform(GaussianNoiseTransform(noise_variance=augmentation.NOISE_STD, p_per_channel=1,
                                               synchronize_channels=True), apply_probability=p["noise"]),
        RandomTransform(GaussianBlurTransform(blur_sigma=augmentation.BLUR_SIGMA, synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=p["blur_channel"],
                                              benchmark=True), apply_probability=p["blur"]),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast(augmentation.BRIGHTNESS),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=p["brightness"]),
        RandomTransform(ContrastTransform(contrast_range=BGContrast(augmentation.CONTRAST), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1), apply_probability=p["contrast"]),
        RandomTransform(SimulateLowResolutionTransform(scale=augmentation.LOW_RESOLUTION, synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None, allowed_channels=None,
                                                       p_per_channel=p["low_resolution_channel"]),
                        apply_probability=p["low_resolution"]),
        RandomTransform(GammaTransform(gamma=BGContrast(augmentation.GAMMA), p_invert_image=1, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=p["gamma_inverted"]),
        RandomTransform(GammaTransform(gamma=BGContrast(augmentation.GAMMA), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=p["gamma"]),
        MirrorTransform(allowed_axes=(0, 1, 2)),
    ])


def library_batch(pipeline, image, labels, starts):
    """As nnU-Net's loader and workers: cut the larger box around each patch, transform, stack."""
    box = nnunet_box(PATCH)
    images, segs = [], []
    for start in starts:
        corner = [s + p // 2 - b // 2 for s, p, b in zip(start, PATCH, box)]
        out = pipeline(image=torch.from_numpy(loader.crop_padded(image, corner, box, np.float32)),
                       segmentation=torch.from_numpy(loader.crop_padded(labels, corner, box, np.int16))[None])
        images.append(out["image"])
        segs.append(out["segmentation"])
    return torch.stack(images), torch.stack(segs)


def our_items(image, labels, starts, rngs, p, on_device):
    """What loader.PatchDataset does in a worker: draw, crop the box, and (per patch) finish the patch."""
    items = []
    for start, rng in zip(starts, rngs):
        params = augmentation.draw_nnunet(rng, CHANNELS, p)
        corner, size, params["centre"] = augmentation.source_box(params, start, PATCH, labels.shape)
        box = torch.from_numpy(loader.crop_padded(image, corner, size, np.float16))
        box_labels = torch.from_numpy(loader.crop_padded(labels, corner, size, np.uint8))
        items.append((box, box_labels, params) if on_device else augmentation.augment_patch(box, box_labels, params, PATCH))
    return items


def our_batch(image, labels, starts, rngs, p, device):
    """device None: per patch, as in loader workers; else batched on that device after the loader."""
    if device is None:
        return torch.utils.data.default_collate(our_items(image, labels, starts, rngs, p, False))
    batch = augmentation.to_device(augmentation.collate(our_items(image, labels, starts, rngs, p, True)), device, PATCH)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch


def step_seconds(device, steps=5):
    """Median seconds of one training step of the GPU settings' network on a 2 x 4 x 128^3 batch."""
    hp = hyperparameters.load(Path(__file__).resolve().parents[1] / "hyperparameters_brats2020_gpu.txt")
    net = network.build_model(hp).to(device).to(memory_format=torch.channels_last_3d)
    optimizer, loss_fn = training.make_optimizer(net, hp), losses.make_loss(hp)
    dtype, _ = devices.autocast_settings(hp.precision, device.type, devices.bf16_supported(device))
    image = torch.randn(BATCH, CHANNELS, *PATCH, device=device).contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(0, 4, (BATCH, *PATCH), device=device)
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = net(image)
        loss_fn([o.float() for o in outputs], labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:]))


def rows_for(p, device):
    """name -> function(image, labels, starts, rngs) making one batch, for probabilities p."""
    linear, nearest = library_pipeline(p, "bilinear"), library_pipeline(p, "nearest")
    return {
        "batchgeneratorsv2, nnU-Net's configuration (labels resampled linearly per label)":
            lambda image, labels, starts, rngs: library_batch(linear, image, labels, starts),
        "batchgeneratorsv2, labels nearest-neighbour (as ours)":
            lambda image, labels, starts, rngs: library_batch(nearest, image, labels, starts),
        "ours, per patch (as in loader workers)":
            lambda image, labels, starts, rngs: our_batch(image, labels, starts, rngs, p, None),
        f"ours, batched on the {device.type.upper()} (after the loader)":
            lambda image, labels, starts, rngs: our_batch(image, labels, starts, rngs, p, device),
    }


def time_rows(rows, image, labels, batches, seed):
    """Seconds per batch of each row; the rows take turns, each batch with the same patch corners."""
    rng = np.random.default_rng(seed)
    seconds = {name: [] for name in rows}
    for index in range(batches + 1):  # batch 0 warms up (library kernel choices, allocations)
        starts = [[int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(labels.shape, PATCH)] for _ in range(BATCH)]
        for name, make in rows.items():
            rngs = [np.random.default_rng([seed, index, b]) for b in range(BATCH)]
            start = time.perf_counter()
            make(image, labels, starts, rngs)
            if index:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def main(argv):
    device = torch.device(argv[argv.index("--device") + 1]) if "--device" in argv else torch.device("cpu")
    batches = int(argv[0]) if argv and not argv[0].startswith("--") else 20
    torch.set_num_threads(2)
    np.random.seed(0)  # batchgeneratorsv2 draws from the global generators
    torch.manual_seed(0)
    print(f"augmentation of a {BATCH} x {CHANNELS} x {'x'.join(map(str, PATCH))} batch from a {VOLUME} volume, "
          f"{batches} batches per setting, {torch.get_num_threads()} threads, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "") + "\n")
    print("| pipeline | setting | s/batch | ours batched is x faster |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        image, labels = brain_volume()
        np.save(Path(folder) / "image.npy", image)
        np.save(Path(folder) / "labels.npy", labels)
        image, labels = np.load(Path(folder) / "image.npy", mmap_mode="r"), np.load(Path(folder) / "labels.npy", mmap_mode="r")
        ours = None
        for setting, p, summary in (("nnU-Net's probabilities", augmentation.PROBABILITIES, np.mean),
                                    ("every transform drawn", dict.fromkeys(augmentation.PROBABILITIES, 1.0), np.median)):
            seconds = time_rows(rows_for(p, device), image, labels, batches, seed=1)
            values = {name: float(summary(times)) for name, times in seconds.items()}
            ours = values[list(values)[-1]] if ours is None else ours
            for name, value in values.items():
                print(f"| {name} | {setting} ({summary.__name__}) | {value:.3f} | {value / values[list(values)[-1]]:.1f} |")
    if device.type == "cuda":
        step = step_seconds(device)
        print(f"\ntraining step of the GPU settings' network (2 x 4 x 128^3, SGD, autocast): {step:.3f} s; "
              f"our batched augmentation with nnU-Net's probabilities is {100 * ours / step:.1f}% of it")


if __name__ == "__main__":
    main(sys.argv[1:])
