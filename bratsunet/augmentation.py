"""Training augmentations: `light` (flips and an intensity jitter) and `nnunet` (nnU-Net's default set).

nnunet, with nnU-Net's probabilities and ranges (nnUNetTrainer.get_training_transforms): rotation about
each axis (+-30 deg, p 0.2) and scaling (0.7-1.4, p 0.2), read from the region of the volume that the
rotated and scaled patch covers, so no empty corners enter where the volume goes on; Gaussian noise (p 0.1),
Gaussian blur (p 0.2), multiplicative brightness (p 0.15), contrast (p 0.15), low-resolution simulation
(p 0.25), gamma of the inverted image (p 0.1), gamma (p 0.3), mirroring of each axis (p 0.5). Labels are
resampled nearest-neighbour, so no label value appears that was not there. Images are z-scored with the
background at 0, and the background stays 0, as at inference (nnU-Net masks it the same way).

Where it runs: loader.py draws every parameter of a patch (and the seed of its noise field) from the
patch's own generator np.random.default_rng([seed, epoch, index]) and crops the box the patch reads
(source_box). Then either the loader worker finishes the patch (augment_patch), or the training loop
finishes the whole batch on the training device (to_device). Both run augment_batch on the same
parameters, so a patch is the same wherever it is made, with any number of workers, and after a resume.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("none", "light", "nnunet")
PLACES = ("auto", "device", "workers")

# nnU-Net's probabilities; "..._channel": the share of channels that a drawn transform changes
PROBABILITIES = {"rotation": 0.2, "scaling": 0.2, "noise": 0.1, "blur": 0.2, "blur_channel": 0.5,
                 "brightness": 0.15, "contrast": 0.15, "low_resolution": 0.25, "low_resolution_channel": 0.5,
                 "gamma_inverted": 0.1, "gamma": 0.3, "mirror": 0.5}
ROTATION = math.radians(30)  # +- about each axis
SCALING = (0.7, 1.4)  # > 1 reads a wider region: structures shrink
NOISE_STD = (0.0, 0.1)  # in units of the channel's std (z-scored); nnU-Net calls it variance but uses it as std
BLUR_SIGMA = (0.5, 1.0)  # voxels, drawn per channel and axis
BLUR_RADIUS = 3  # kernel taps on each side: 3 sigma at the largest sigma
BRIGHTNESS = CONTRAST = (0.75, 1.25)
LOW_RESOLUTION = (0.5, 1.0)  # downsampling factor, the same for the three axes
GAMMA = (0.7, 1.5)


def runs_on_device(mode, place, device):
    """True when nnunet batches are finished on the training device (place auto: on a GPU), False when the
    loader workers finish each patch (auto on a CPU: the workers run beside the training step)."""
    return mode == "nnunet" and (place == "device" or (place == "auto" and device.type == "cuda"))


# ---------------------------------------------------------------- light (numpy, per patch)

def light(image, labels, rng):
    """Random flips of each axis (image and labels alike) and a per-channel intensity scale in
    [0.9, 1.1] and shift in [-0.1, 0.1] (images are z-scored, so in units of the channel's std)
    on brain voxels only: background and padding stay 0, as at inference. Changes image in place."""
    flips = [axis for axis in range(3) if rng.random() < 0.5]
    channels = image.shape[0]
    scale = rng.uniform(0.9, 1.1, channels).astype(np.float32)[:, None, None, None]
    shift = rng.uniform(-0.1, 0.1, channels).astype(np.float32)[:, None, None, None]
    brain = np.any(image != 0, axis=0)  # (px, py, pz)
    image *= scale
    image += shift
    image *= brain
    return np.flip(image, [axis + 1 for axis in flips]), np.flip(labels, flips)


# ---------------------------------------------------------------- nnunet: parameters (numpy, per patch)

def below_or_above_one(rng, low, high, size):
    """Factors in [low, high], half of them below 1 and half above (nnU-Net's BGContrast): as many
    darkening as brightening draws although the range reaches further above 1."""
    below = rng.random(size) < 0.5
    return np.where(below, rng.uniform(low, 1, size), rng.uniform(1, high, size)).astype(np.float32)


def rotation_matrix(angles):
    """Rotations about axes 0, 1 and 2 of the array, applied in that order."""
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        a, b = [k for k in range(3) if k != axis]
        rotation = np.eye(3)
        rotation[a, a] = rotation[b, b] = math.cos(angle)
        rotation[a, b], rotation[b, a] = -math.sin(angle), math.sin(angle)
        matrix = rotation @ matrix
    return matrix


def draw_nnunet(rng, channels, p=PROBABILITIES):
    """One patch's parameters: plain arrays, with the identity (sigma 0, factor 1) where a transform is not
    drawn. "affine" maps a patch voxel, centred, to the position it reads (mirroring folded in)."""
    on = {name: rng.random() < p[name] for name in ("rotation", "scaling", "noise", "blur", "brightness",
                                                   "contrast", "low_resolution", "gamma_inverted", "gamma")}
    angles = rng.uniform(-ROTATION, ROTATION, 3) if on["rotation"] else np.zeros(3)
    zoom = rng.uniform(*SCALING) if on["scaling"] else 1.0  # one factor for the three axes, as nnU-Net
    mirror = rng.random(3) < p["mirror"]
    ones = np.ones(channels, dtype=np.float32)

    def per_channel(name, draw, identity):
        if not on[name]:
            return identity
        chosen = rng.random(channels) < p.get(f"{name}_channel", 1.0)
        return np.where(chosen[:, None] if identity.ndim == 2 else chosen, draw(), identity).astype(np.float32)

    return {
        "spatial": bool(on["rotation"] or on["scaling"]),
        "affine": (rotation_matrix(angles) * zoom * np.where(mirror, -1.0, 1.0)).astype(np.float32),
        "mirror": mirror,
        "noise_std": np.float32(rng.uniform(*NOISE_STD) if on["noise"] else 0.0),
        "noise_seed": np.int64(rng.integers(2 ** 62)),
        "blur_sigma": per_channel("blur", lambda: rng.uniform(*BLUR_SIGMA, (channels, 3)),
                                  np.zeros((channels, 3), dtype=np.float32)),
        "brightness": per_channel("brightness", lambda: below_or_above_one(rng, *BRIGHTNESS, channels), ones),
        "contrast": per_channel("contrast", lambda: below_or_above_one(rng, *CONTRAST, channels), ones),
        "low_resolution": per_channel("low_resolution", lambda: rng.uniform(*LOW_RESOLUTION, channels), ones),
        "gamma_inverted": per_channel("gamma_inverted", lambda: below_or_above_one(rng, *GAMMA, channels), ones),
        "gamma": per_channel("gamma", lambda: below_or_above_one(rng, *GAMMA, channels), ones),
    }


def source_box(params, start, patch_size, volume_shape):
    """-> (corner, size, centre): the box of the volume to crop for this patch, and the patch centre in it.
    The patch itself, or for a rotated or scaled patch every voxel inside the volume that it reads (plus the
    neighbours that linear interpolation weighs), so its corners hold the volume's content, not padding."""
    half = (np.asarray(patch_size, dtype=np.float64) - 1) / 2
    centre = np.asarray(start) + half  # the patch's centre in the volume
    if not params["spatial"]:
        return list(start), list(patch_size), half
    reach = np.abs(params["affine"].astype(np.float64)) @ half + 1
    low = np.maximum(np.floor(centre - reach), 0).astype(int)
    high = np.maximum(np.minimum(np.ceil(centre + reach) + 1, volume_shape).astype(int), low + 2)
    return low.tolist(), (high - low).tolist(), centre - low


# ---------------------------------------------------------------- nnunet: transforms (torch, batched)

def sampling_grid(affine, centre, box_size, patch_size, device):
    """(1, px, py, pz, 3) grid for F.grid_sample (align_corners=True): patch voxel u, centred, reads box
    position centre + affine @ u. Built from three broadcast axes, not a (px*py*pz, 3) matrix product."""
    axes = [torch.arange(p, device=device, dtype=torch.float32) - (p - 1) / 2 for p in patch_size]
    axes = [axes[0].view(-1, 1, 1), axes[1].view(1, -1, 1), axes[2].view(1, 1, -1)]
    coordinates = []
    for row, c, n in zip(affine, centre, box_size):  # position along box axis j, scaled to [-1, 1]
        k = 2 / max(n - 1, 1)
        coordinates.append((c * k - 1) + (row[0] * k) * axes[0] + (row[1] * k) * axes[1] + (row[2] * k) * axes[2])
    return torch.stack(coordinates[::-1], dim=-1)[None]  # grid_sample wants (z, y, x) order: last axis first


def place_patch(out, out_labels, image, labels, params, b, patch_size):
    """Write one patch into out (C, px, py, pz) and out_labels (px, py, pz) from its cropped box (C, bx, by, bz):
    resampled through its affine, or only mirrored (a copy, no interpolation)."""
    if not params["spatial"][b]:
        axes = [axis for axis in range(3) if params["mirror"][b, axis]]
        out.copy_(image.flip([a + 1 for a in axes]) if axes else image)  # float16 -> float32 in the copy
        out_labels.copy_(labels.flip(axes) if axes else labels)
        return
    grid = sampling_grid(params["affine"][b].tolist(), params["centre"][b].tolist(), image.shape[1:],
                         patch_size, image.device)
    out[None] = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out_labels.copy_(F.grid_sample(labels[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                                   align_corners=True)[0, 0])


def chosen_channels(identity_differs):
    """(batch indices, channel indices) of the (B, C) entries where a transform is drawn."""
    return identity_differs.nonzero(as_tuple=True)


def add_noise(image, std, seeds):
    """Gaussian noise of standard deviation std[b] in every channel of patch b, from a generator of its seed."""
    for b in (std > 0).nonzero().flatten().tolist():
        generator = torch.Generator(image.device).manual_seed(int(seeds[b]))
        noise = torch.randn(image.shape[1:], generator=generator, device=image.device)
        image[b].add_(noise, alpha=float(std[b]))
    return image


def blur_axis(x, sigma, axis):
    """x (N, X, Y, Z) smoothed along axis 1 + `axis` with a Gaussian of sigma (N,) voxels, edges replicated:
    a sum of shifted copies, in place with scalar weights (no temporaries; conv3d was slower on a CPU)."""
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (taps / sigma.double()[:, None]) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).tolist()  # (N, taps)
    size = x.shape[axis + 1]
    edges_repeated = torch.arange(-BLUR_RADIUS, size + BLUR_RADIUS, device=x.device).clamp_(0, size - 1)
    padded = x.index_select(axis + 1, edges_repeated)  # (F.pad's replicate mode was slower on a CPU)
    out = torch.empty_like(x)
    for n, row in enumerate(weights):
        torch.mul(padded[n].narrow(axis, 0, size), row[0], out=out[n])
        for k, weight in enumerate(row[1:], start=1):
            out[n].add_(padded[n].narrow(axis, k, size), alpha=weight)
    return out


def gaussian_blur(image, sigma):
    """sigma (B, C, 3) voxels per channel and axis; channels with sigma 0 stay as they are."""
    for b, c in zip(*chosen_channels((sigma > 0).any(-1))):
        x = image[b, c][None]  # (1, X, Y, Z); one channel at a time stays in the CPU's cache
        for axis in range(3):
            x = blur_axis(x, sigma[b, c, axis, None], axis)
        image[b, c] = x[0]
    return image


def brightness_contrast(image, brightness, contrast):
    """Multiply each channel by its brightness factor, then stretch it about its mean by its contrast
    factor, clipped to the channel's range before the stretch; one pass over the image. (B, C) factors."""
    if bool((brightness == 1).all() and (contrast == 1).all()):
        return image
    view = image.shape[:2] + (1, 1, 1)
    brightness, contrast = brightness.to(image.device), contrast.to(image.device)
    if bool((contrast == 1).all()):
        return image.mul_(brightness.view(view))
    flat = image.flatten(2)
    mean = flat.mean(-1) * brightness
    low, high = (v * brightness for v in flat.aminmax(dim=-1))
    stretched = contrast != 1
    low = torch.where(stretched, low, -math.inf).view(view)
    high = torch.where(stretched, high, math.inf).view(view)
    scale, shift = (brightness * contrast).view(view), ((1 - contrast) * mean).view(view)
    return torch.clamp(image.mul_(scale).add_(shift), low, high)


def simulate_low_resolution(image, factor):
    """Channels with factor < 1: down to that share of the voxels (nearest), back up (trilinear)."""
    shape = image.shape[2:]
    for b, c in zip(*chosen_channels(factor < 1)):
        small = [max(1, round(s * float(factor[b, c]))) for s in shape]
        x = F.interpolate(image[b, c][None, None], size=small, mode="nearest-exact")
        image[b, c] = F.interpolate(x, size=shape, mode="trilinear")[0, 0]
    return image


def mean_std(x):
    """Mean and (unbiased) std of all of x, from its sum and its dot product with itself: two fast passes
    (torch.std_mean's one-pass kernel was slower on a CPU)."""
    flat = x.reshape(-1)
    n = flat.numel()
    mean = flat.sum() / n
    variance = (torch.dot(flat, flat) - n * mean * mean) / max(n - 1, 1)
    return mean, variance.clamp_min(0).sqrt()


def gamma(image, gammas, invert):
    """x -> ((x - min) / range)^gamma * range + min per channel (gamma 1: unchanged), keeping the channel's
    mean and std (nnU-Net's retain_stats). invert: on -x, which bends the bright end instead of the dark one.
    The rescalings fold into one multiply-add after the power: four passes over each channel."""
    for b, c in zip(*chosen_channels(gammas != 1)):
        x = image[b, c]  # a view: changed in place
        mean, std = mean_std(x)
        low, high = x.aminmax()
        span = (high - low).clamp_min(1e-7)
        # z in [0, 1]: (x - min) / range, or (-x - min(-x)) / range of -x when inverted
        z = (high - x).div_(span) if invert else (x - low).div_(span)
        z.pow_(float(gammas[b, c]))
        z_mean, z_std = mean_std(z)
        scale = std / z_std.clamp_min(1e-7)  # the stretch back to the channel's std, and its mean
        sign = -1.0 if invert else 1.0
        torch.add(z.mul_(sign * scale), sign * (mean * sign - z_mean * scale), out=x)
    return image


def augment_batch(images, labels, params, patch_size):
    """Cropped boxes (C, bx, by, bz) and their labels, with the collated parameters of draw_nnunet and
    source_box -> (image (B, C, px, py, pz) float32, labels (B, px, py, pz) int64), in nnU-Net's order."""
    device = images[0].device
    image = torch.empty(len(images), images[0].shape[0], *patch_size, device=device)  # (B, C, px, py, pz)
    label_patches = torch.empty(len(images), *patch_size, dtype=torch.long, device=device)  # (B, px, py, pz)
    for b, (box, box_labels) in enumerate(zip(images, labels)):
        place_patch(image[b], label_patches[b], box, box_labels, params, b, patch_size)
    brain = (image != 0).any(1, keepdim=True)  # (B, 1, px, py, pz)
    image = add_noise(image, params["noise_std"], params["noise_seed"])
    image = gaussian_blur(image, params["blur_sigma"])
    image = brightness_contrast(image, params["brightness"], params["contrast"])
    image = simulate_low_resolution(image, params["low_resolution"])
    image = gamma(image, params["gamma_inverted"], invert=True)
    image = gamma(image, params["gamma"], invert=False)
    return image.mul_(brain), label_patches


def collate(items):
    """DataLoader collate of (box image, box labels, parameters) items: boxes differ in size, so they stay lists."""
    images, labels, params = zip(*items)
    return list(images), list(labels), torch.utils.data.default_collate(list(params))


def augment_patch(image, labels, params, patch_size):
    """One patch, as a loader worker makes it: (image (C, px, py, pz) float32, labels (px, py, pz) int64)."""
    image, labels = augment_batch([image], [labels], collate([(image, labels, params)])[2], patch_size)
    return image[0], labels[0]


def to_device(batch, device, patch_size):
    """A loader batch on the training device: (image (B, C, px, py, pz) float32, labels (B, px, py, pz) int64).
    A batch of cropped boxes and parameters (nnunet on the device) is augmented there, all patches at once."""
    if len(batch) == 2:
        image, labels = batch
        return image.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    images, labels, params = batch
    images = [image.to(device, non_blocking=True) for image in images]
    labels = [label.to(device, non_blocking=True) for label in labels]
    return augment_batch(images, labels, params, patch_size)
