"""Training data: patch sampling and the datasets over the arrays that prepare_dataset.py writes, and the DataLoader.

PatchDataset gives random training patches (part of them centred on tumor, augmented by augmentation.py), each
inside the volume: a patch centred on a voxel near the border is shifted inwards (nnU-Net lets such a patch
reach past the volume's far side, padded), and only a volume smaller than the patch is padded, with zeros;
VolumeDataset gives whole prepared volumes for validation. Both memory-map the .npy files when an
item is read, never in __init__, so a dataset object is small to pickle (DataLoader workers started
with spawn on Windows/macOS) and each worker process reads only the voxels it needs.

Randomness: item `index` of epoch `epoch` is drawn from np.random.default_rng([seed, epoch, index]),
so the same (seed, epoch, index) always gives the same patch, whatever the number of DataLoader
workers or torchrun processes. Either call set_epoch(epoch) (fine without persistent workers) or index
with (epoch, index) pairs, as EpochSampler below does.
"""
import pickle
from pathlib import Path

import numpy as np
import torch

from bratsunet import augmentation, conventions
from bratsunet.augmentation import MODES as AUGMENT_MODES
from bratsunet.manifest import labelled_entries, open_array

# Voxels remembered per case and class for centring patches: an evenly spaced subset of all of them,
# so a worker holds at most 80 kB per case and class instead of a list of up to ~10^5 voxels.
MAX_FOREGROUND_VOXELS = 10_000
# The patch_sampling setting's choices. per_patch: each patch is centred on a tumor voxel with probability
# foreground_fraction, the voxel uniform over the tumor. nnunet (nnU-Net's data loader): the last
# round(global batch x foreground_fraction) patches of every step are centred, on a class (region or label)
# chosen first among those in the case, then on one of its voxels, so a small enhancing tumor is as often
# the centre as the large edema.
SAMPLING = ("per_patch", "nnunet")


def foreground_classes(sampling, data_format, target):
    """Classes a centred patch chooses from, as tuples of internal labels: any tumor label (per_patch), or
    (nnunet) the regions the network predicts (WT, TC, ET, ...) or its labels but background."""
    labels = range(1, len(conventions.CONVENTIONS[data_format].disk_labels))
    if sampling == "per_patch":
        return (tuple(labels),)
    if target == "regions":
        return tuple(conventions.ALL_REGIONS[name] for name in conventions.CONVENTIONS[data_format].regions)
    return tuple((label,) for label in labels)


def open_case(prepared_dir, entry):
    """Memory-mapped (image float16 (C, x, y, z), seg uint8 (x, y, z)) of one case, shapes checked."""
    image_path, seg_path = Path(prepared_dir) / entry["image"], Path(prepared_dir) / entry["seg"]
    image, seg = open_array(image_path), open_array(seg_path)
    if image.ndim != 4 or image.shape[1:] != seg.shape:
        raise ValueError(f"{seg_path}: shape {seg.shape} does not match image {image_path.name} {image.shape}")
    return image, seg


def crop_padded(array, start, size, dtype):
    """array[..., start:start + size] over the last three axes, zeros where the box leaves the array."""
    out = np.zeros(array.shape[:-3] + tuple(size), dtype=dtype)
    source = tuple(slice(max(b, 0), min(b + n, s)) for b, n, s in zip(start, size, array.shape[-3:]))
    target = tuple(slice(src.start - b, src.stop - b) for src, b in zip(source, start))
    out[(..., *target)] = array[(..., *source)]
    return out


class PatchDataset(torch.utils.data.Dataset):
    """samples_per_epoch random patches: (image float32 (C, px, py, pz), labels int64 (px, py, pz)); with
    augment nnunet and on_device, what augmentation.to_device finishes: (box image float16, box labels uint8,
    parameters), the box being the patch or the larger region that its rotation and scaling read.
    augment: none | light | nnunet (True and False, from settings before the three modes: light, none)."""

    def __init__(self, prepared_dir, case_names, patch_size, foreground_fraction, augment, seed,
                 samples_per_epoch, on_device=False, sampling="per_patch", global_batch=1, classes=None):
        if len(patch_size) != 3 or min(patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
        if not 0 <= foreground_fraction <= 1:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}")
        self.prepared_dir = Path(prepared_dir)
        self.case_names = list(case_names)
        self.entries = labelled_entries(prepared_dir, self.case_names)
        self.patch_size = tuple(int(p) for p in patch_size)
        # foreground_fraction: the share of patches centred on a random tumor voxel; the others are
        # uniform over the volume, so they contain tumor only as often as tumor fills the volume.
        # Tumor is a few percent of a brain: without this, most patches teach only "background".
        self.foreground_fraction = float(foreground_fraction)
        if sampling not in SAMPLING:
            raise ValueError(f"patch_sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")
        self.sampling, self.global_batch = sampling, int(global_batch)
        self.random_per_step = round(self.global_batch * (1 - self.foreground_fraction))  # nnunet: the first ones
        if sampling == "nnunet" and self.foreground_fraction > 0 and self.random_per_step >= self.global_batch:
            raise ValueError(f"patch_sampling nnunet with a global batch of {self.global_batch}: round("
                             f"{self.global_batch} x (1 - foreground_fraction {self.foreground_fraction})) leaves no "
                             "patch centred on tumor (as in nnU-Net); use a batch of 2 or more, or per_patch")
        self.classes = classes or (tuple(range(1, len(conventions.INTERNAL_LABEL_NAMES))),)  # any tumor label
        self.augment = {True: "light", False: "none"}.get(augment, augment)
        if self.augment not in AUGMENT_MODES:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_MODES)}, got {augment!r}")
        self.on_device = bool(on_device) and self.augment == "nnunet"
        self.seed = int(seed)
        self.samples_per_epoch = int(samples_per_epoch)
        self.epoch = 0
        self.foreground = {}  # case index -> per class, flat indices of (a subset of) its voxels, per process

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.samples_per_epoch

    def __getstate__(self):
        state = self.__dict__.copy()
        state["foreground"] = {}  # each worker rebuilds the cases it meets; keeps pickling cheap
        return state

    def class_voxels(self, case, seg):
        """Per class, the flat indices of its voxels in a case (an evenly spaced subset), found on first use."""
        if case not in self.foreground:
            flat = np.asarray(seg).reshape(-1)
            self.foreground[case] = []
            for labels in self.classes:
                voxels = np.flatnonzero(np.isin(flat, labels))
                step = -(-len(voxels) // MAX_FOREGROUND_VOXELS)  # ceil; 0 for a class not in the case
                self.foreground[case].append(voxels[::max(step, 1)].astype(np.int64))
        return self.foreground[case]

    def centred(self, index, rng):
        """Whether sample `index` of the epoch is centred on a class: by its own coin (per_patch), or (nnunet) by
        its place in the step's global batch, the same for any number of processes."""
        if self.sampling == "nnunet":
            return index % self.global_batch >= self.random_per_step
        return rng.random() < self.foreground_fraction

    def patch_start(self, case, seg, rng, centred):
        """Corner of the patch in the volume; negative or past the end where the volume is smaller."""
        shape = seg.shape
        low = [min(0, s - p) for s, p in zip(shape, self.patch_size)]  # < 0: volume smaller than the patch
        high = [max(0, s - p) for s, p in zip(shape, self.patch_size)]
        present = [voxels for voxels in self.class_voxels(case, seg) if len(voxels)] if centred else []
        if present:
            voxels = present[rng.integers(len(present))] if len(present) > 1 else present[0]  # the class first
            centre = np.unravel_index(voxels[rng.integers(len(voxels))], shape)
            start = [c - p // 2 for c, p in zip(centre, self.patch_size)]
            return [int(np.clip(b, lo, hi)) for b, lo, hi in zip(start, low, high)]  # shifted into the volume
        return [int(rng.integers(lo, hi + 1)) for lo, hi in zip(low, high)]

    def __getitem__(self, index):
        """index: an int (of the epoch set by set_epoch) or an (epoch, index) pair, which reaches
        persistent DataLoader workers without set_epoch."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        rng = np.random.default_rng([self.seed, epoch, index])
        case = int(rng.integers(len(self.entries)))
        image, seg = open_case(self.prepared_dir, self.entries[case])
        start = self.patch_start(case, seg, rng, self.centred(index, rng))
        if self.augment == "nnunet":
            return self.nnunet_item(image, seg, start, rng)
        image = crop_padded(image, start, self.patch_size, np.float32)  # (C, px, py, pz)
        labels = crop_padded(seg, start, self.patch_size, np.int64)  # (px, py, pz)
        if self.augment == "light":
            image, labels = augmentation.light(image, labels, rng)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(labels))

    def nnunet_item(self, image, seg, start, rng):
        """Crop the box the patch reads; finish the patch here, or leave it to the training device."""
        params = augmentation.draw_nnunet(rng, image.shape[0])
        corner, size, params["centre"] = augmentation.source_box(params, start, self.patch_size, seg.shape)
        box = torch.from_numpy(crop_padded(image, corner, size, np.float16))  # (C, bx, by, bz), as stored
        box_labels = torch.from_numpy(crop_padded(seg, corner, size, np.uint8))  # (bx, by, bz)
        if self.on_device:
            return box, box_labels, params
        return augmentation.augment_patch(box, box_labels, params, self.patch_size)


class VolumeDataset(torch.utils.data.Dataset):
    """Whole prepared cases: (name, image float32 (C, x, y, z), labels int64 (x, y, z))."""

    def __init__(self, prepared_dir, case_names):
        self.prepared_dir = Path(prepared_dir)
        self.case_names = list(case_names)
        self.entries = labelled_entries(prepared_dir, self.case_names)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        image, seg = open_case(self.prepared_dir, self.entries[index])
        image = torch.from_numpy(np.asarray(image, dtype=np.float32))
        labels = torch.from_numpy(np.asarray(seg, dtype=np.int64))
        return self.case_names[index], image, labels


# ---------------------------------------------------------------- loading

class EpochSampler(torch.utils.data.Sampler):
    """This process's (epoch, index) pairs. Step s of the global batch holds the indices
    s*B*W ... (s+1)*B*W - 1 (B per process, W processes), and process r takes B consecutive ones, so a
    step's patches do not depend on how many processes share them. The sampler runs in the main
    process: the epoch reaches persistent worker processes inside the (epoch, index) pairs."""

    def __init__(self, steps, batch_size, rank, world_size):
        self.steps, self.batch_size, self.rank, self.world_size = steps, batch_size, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.steps * self.batch_size

    def __iter__(self):
        for step in range(self.steps):
            first = (step * self.world_size + self.rank) * self.batch_size
            yield from ((self.epoch, index) for index in range(first, first + self.batch_size))


def start_loader(patches, sampler, batch_size, num_workers, device):
    """A DataLoader whose workers have delivered a batch, or on a CPU one loading in this process where worker
    processes cannot start (a script without a __main__ guard on Windows, a sandbox without shared memory). On a
    GPU that would leave it waiting on one process's loading: ValueError with the cause and the fix instead."""
    def make_loader(patches, sampler, batch_size, workers, device):
        return torch.utils.data.DataLoader(patches, batch_size, sampler=sampler, num_workers=workers,
                                           persistent_workers=workers > 0, pin_memory=device.type == "cuda",
                                           collate_fn=augmentation.collate if patches.on_device else None)

    loader = make_loader(patches, sampler, batch_size, num_workers, device)
    if num_workers > 0:
        try:
            next(iter(loader))
        except (RuntimeError, OSError, EOFError, AttributeError, pickle.PickleError) as error:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            if device.type == "cuda":
                raise ValueError(f"DataLoader workers could not start ({reason}); loading in the main process would "
                                 "leave the GPU waiting. In a container, give it more shared memory (docker run "
                                 "--shm-size=16g, or --ipc=host); or set fewer num_workers (0 loads in the main "
                                 "process, slowly)") from None
            print(f"DataLoader workers could not start ({reason}); loading in the main process (num_workers: 0)")
            loader = make_loader(patches, sampler, batch_size, 0, device)
    return loader
