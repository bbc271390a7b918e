"""What every style of the generator shares: tissue intensities, the tumor, the scanner, smooth random fields.

A style (STYLES: phantom, randomized, anatomy) lays out a brain as fractions of tissues at its voxels (a Brain);
here are the rest of a case's making: the tumor's compartments around a centre (nested as BraTS labels them), the
mean intensity of each tissue per modality with its texture, and the scanner (bias field, blur, thick slices,
Rician noise) that turns the signal into the int16 images of a case.
"""
from typing import NamedTuple

import numpy as np
from scipy import ndimage

MODALITIES = ("flair", "t1", "t1ce", "t2")
FULL_SHAPE = (240, 240, 155)
# Mean intensity of each tissue in MODALITIES order, close to the real BraTS sample (raw scanner units).
INTENSITY = {
    "wm": (180, 310, 335, 270),
    "gm": (215, 230, 295, 380),
    "deep_gm": (195, 270, 320, 320),
    "csf": (55, 95, 160, 820),
    "vessel": (130, 250, 650, 260),  # enhancing vessels and choroid plexus: bright in T1ce only
    "spot": (265, 265, 320, 450),  # FLAIR-bright white-matter spots and caps that are not tumor
    "edema": (270, 240, 330, 460),
    "necrosis": (240, 150, 215, 680),
    "enhancing": (295, 225, 480, 470),
    "nonenhancing": (310, 190, 270, 580),  # tumor core without enhancement (low-grade-like)
}
DISK_LABEL = {"necrosis": 1, "nonenhancing": 1, "edema": 2, "enhancing": 4}
NOISE_SIGMA = (7.0, 10.0, 10.0, 12.0)  # sigma of each Rician component, per modality
# Randomisation ranges per style; 0 switches an idea off, so "phantom" is "randomized" with all of them off.
STYLES = {"randomized": {
    "hindbrain": 1,  # 1: cerebellum, brainstem and temporal lobes under the cerebrum; 0: an egg-shaped brain
    "deform_mm": 3.0,  # std of a smooth random displacement of the whole anatomy (asymmetric shapes)
    "contrast": 0.3,  # contrasts to white matter raised to a power exp(+-contrast), jittered by contrast / 4
    "texture": 0.08,  # largest amplitude of the tissue texture, relative to the mean
    "bias": 0.15,  # the std of the log bias field grows from 0.1 by up to this
    "slice_mm": 6.0,  # thickest slices: scans acquired with thick slices along one axis, resampled to 1 mm
    "blur_mm": 1.0,  # largest std of an isotropic blur
    "noise": 2.0,  # noise scaled by a factor between 1 / noise and noise
    "distractors": 0,  # enhancing vessels, FLAIR-bright spots, a skull-strip rim (1: lower WT on the real case)
    "spread": 1.0,  # tumors also near the surface, smaller and larger, with satellites (0: one, deep)
    "mass_effect": 0.6,  # largest push of the anatomy away from the tumor, in core radii
    "anatomy": 0,  # > 0: brains of real label maps (anatomy.py), each structure's intensity jittered by this log std
    "coverage": 0,  # (anatomy) a quarter of the scans miss the brain up to this many mm from its top or bottom
    "faint_edema": 0,  # (anatomy) the edema's contrast to white matter scaled by 1 - this .. 1 (fainter edema)
}}
STYLES["phantom"] = dict.fromkeys(STYLES["randomized"], 0)
STYLES["anatomy"] = {**STYLES["randomized"], "anatomy": 0.1, "coverage": 20.0}


def style_ranges(style):
    """A style's name, or a dict of some of its ranges (the others off) -> the full dict of ranges."""
    if isinstance(style, dict):
        unknown = set(style) - set(STYLES["phantom"])
        if unknown:
            raise ValueError(f"unknown style ranges {sorted(unknown)}: expected some of {sorted(STYLES['phantom'])}")
        return {**STYLES["phantom"], **style}
    if style not in STYLES:
        raise ValueError(f"unknown synthetic style {style!r}: expected {' or '.join(STYLES)}")
    return STYLES[style]


# ---- smooth random fields: sums of separable Gaussian bumps (smooth, no interpolation kinks, fast) ----

def _bumps(n, cell_mm, spacing_mm, width_mm, margin_mm):
    """(n, centres) Gaussian bumps of std `width_mm` every `spacing_mm` along one axis, and their derivatives."""
    centres = np.arange(-margin_mm, n * cell_mm + margin_mm, spacing_mm, dtype=np.float32)
    offset = (np.arange(n, dtype=np.float32)[:, None] * cell_mm - centres) / width_mm
    bumps = np.exp(-0.5 * offset ** 2)
    return bumps.astype(np.float32), (-offset / width_mm * bumps).astype(np.float32)


def _separable(weights, bx, by, bz):
    """sum_abc weights[a,b,c] bx[x,a] by[y,b] bz[z,c] as three small matrix products -> (X, Y, Z)."""
    field = np.tensordot(bz, weights, axes=(1, 2))  # (Z, a, b)
    field = np.tensordot(by, field, axes=(1, 2))  # (Y, Z, a)
    return np.tensordot(bx, field, axes=(1, 2))  # (X, Y, Z)


def smooth_noise(rng, shape, cell_mm, spacing_mm):
    """Random field, zero mean, unit variance, features about 2-3x `spacing_mm` across."""
    bx, by, bz = (_bumps(n, c, spacing_mm, spacing_mm, 2 * spacing_mm)[0] for n, c in zip(shape, cell_mm))
    # Along each axis the squared bumps sum to sqrt(pi) at any position: unit variance everywhere.
    weights = rng.standard_normal((bx.shape[1], by.shape[1], bz.shape[1]), dtype=np.float32) / np.pi ** 0.75
    return _separable(weights, bx, by, bz)


def labyrinth_at(rng, points, width_mm, voxel_mm):
    """Band-pass field and its gradient magnitude at points (3, N) mm: |field| / slope ~ mm to the nearest sheet."""
    lo = points.min(axis=1, keepdims=True)
    cell, spacing = max(width_mm / 2, voxel_mm), width_mm / 1.5
    shape = np.ceil((points.max(axis=1) - lo[:, 0]) / cell).astype(int) + 2
    narrow = [_bumps(n, cell, spacing, width_mm, 4 * width_mm) for n in shape]
    wide = [_bumps(n, cell, spacing, 1.6 * width_mm, 4 * width_mm) for n in shape]
    weights = rng.standard_normal([b.shape[1] for b, _ in narrow], dtype=np.float32)

    def dog(derivative_axis):  # difference of Gaussians, or its derivative along one axis
        pick = [[b[int(axis == derivative_axis)] for axis, b in enumerate(bumps)] for bumps in (narrow, wide)]
        return _separable(weights, *pick[0]) - 1.6 ** -3 * _separable(weights, *pick[1])

    index = (points - lo) / cell
    slope = np.sqrt(sum(dog(axis) ** 2 for axis in range(3)))
    return ndimage.map_coordinates(dog(None), index, order=1), ndimage.map_coordinates(slope, index, order=1)


def soft(distance_mm, width_mm):
    """Partial-volume fraction of a voxel whose centre lies `distance_mm` inside a boundary."""
    return np.clip(0.5 + distance_mm / width_mm, 0.0, 1.0)


# ---- a brain: fractions of each tissue at its N voxels ----

class Brain(NamedTuple):
    box: tuple  # slices of the case array that hold the brain
    mask: np.ndarray  # bool (X, Y, Z) over the box
    inside: tuple  # np.nonzero(mask): the N brain voxels
    points: np.ndarray  # (3, N) mm from the brain centre, in a virtual full-size head
    vox: np.ndarray  # mm per voxel of that virtual head
    tissues: dict  # name -> fraction (N,)


def brain_noise(rng, brain, spacing_mm):
    """smooth_noise over the brain's box, read at its N voxels."""
    return smooth_noise(rng, brain.mask.shape, brain.vox, spacing_mm)[brain.inside]

def blob(x, y, z, centre, semi_axes):
    """Ellipsoidal radius around `centre` (mm), < 1 inside."""
    return np.sqrt(sum(((c - m) / s) ** 2 for c, m, s in zip((x, y, z), centre, semi_axes)))


# ---- the tumor: necrosis in an enhancing rim in edema, or a core without enhancement, in edema ----

def tumor_blobs(rng, centre, kind, ranges, vox):
    """(centre mm, core radius mm, blobs [(centre, semi-axes)]) of a tumor around `centre`: 1-4 blobs (with spread:
    a satellite)."""
    spread = ranges["spread"]
    radius = rng.uniform(8 - 3 * spread, (20 if kind == "tumor" else 16) + 2 * spread)
    radius = max(radius, 3.5 * float(vox.max()))  # core, mm
    blobs = []
    for k in range(rng.integers(1, 5)):
        offset = rng.normal(0, 1, 3) * radius * 0.45 * (k > 0)
        blobs.append((centre + offset, radius * (1.0 if k == 0 else rng.uniform(0.5, 0.9)) * rng.uniform(0.8, 1.2, 3)))
    if spread and rng.random() < 0.25 * spread:
        direction = rng.normal(0, 1, 3)
        blobs.append((centre + direction / np.linalg.norm(direction) * radius * rng.uniform(1.8, 3.0),
                      radius * rng.uniform(0.3, 0.6, 3)))
    return centre, radius, blobs


def tumor_fractions(rng, brain, kind, plan, ranges):
    """Fractions (N,) of each compartment of the tumor of `plan`: its blobs deformed by noise."""
    x, y, z = brain.points
    step = float(brain.vox.max())
    _, radius, blobs = plan
    t = np.inf  # distance in units of the blob radii, < 1 inside a blob
    for centre, semi_axes in blobs:
        t = np.minimum(t, blob(x, y, z, centre.tolist(), semi_axes.tolist()))
    core_t = t + 0.12 * brain_noise(rng, brain, 3.0)
    edema_t = t + 0.45 * brain_noise(rng, brain, 6.0)
    if ranges["spread"]:  # edema all around the core, as in nearly every glioma
        edema_t = np.minimum(edema_t, core_t - 0.3)
    tissues = brain.tissues
    spread = ranges["spread"]
    reach = rng.uniform(1.3 - 0.2 * spread, 2.2 + 0.1 * spread) * (0.4 + 0.6 * (tissues["wm"] + tissues["deep_gm"]))
    solid = 1 - tissues["csf"]  # edema follows white matter and spares CSF
    filled = 1 if ranges["mass_effect"] else solid  # a core that pushes the brain aside fills sulci, too
    core = soft((1 - core_t) * radius, step) * filled
    edema = soft((reach - edema_t) * radius, 8.0) * solid * (1 - core)  # edema fades out over several mm
    if kind == "no_enhancing":
        return {"nonenhancing": core, "edema": edema}
    rim = max(min(rng.uniform(4 - 2 * spread, 9), 0.55 * radius), 1.3 * step)  # enhancing rim thickness, mm
    necrosis = soft((1 - core_t) * radius - rim, step) * filled
    return {"necrosis": necrosis, "enhancing": core - necrosis, "edema": edema}


# ---- the scanner: contrasts, bias field, resolution and noise ----

def intensity_table(rng, ranges):
    """Mean intensity per tissue: INTENSITY, or (contrast) its ratio to white matter to a random power, jittered."""
    table = {name: np.array(value, np.float64) for name, value in INTENSITY.items()}
    if ranges["contrast"]:
        table["necrosis"] += rng.uniform(0, 1) * (table["nonenhancing"] - table["necrosis"])
        table["enhancing"] = table["edema"] + rng.uniform(0.5, 1.3) * (table["enhancing"] - table["edema"])
        power, wm = np.exp(rng.uniform(-ranges["contrast"], ranges["contrast"], 4)), table["wm"]
        table = {name: wm * (value / wm) ** power * np.exp(rng.normal(0, ranges["contrast"] / 4, 4))
                 for name, value in table.items()}
    if ranges["distractors"]:
        table["rim"] = table["wm"] * np.exp(rng.normal(0, 0.4, 4))  # what skull stripping left: dark or bright
    return table


def _resample(array, positions, axis):
    """array read at fractional indices along one axis, by linear interpolation (clamped at the ends)."""
    n = array.shape[axis]
    positions = np.clip(positions, 0, n - 1)
    low = np.minimum(positions.astype(int), max(n - 2, 0))
    weight = np.expand_dims((positions - low).astype(np.float32), [a for a in range(array.ndim) if a != axis])
    return np.take(array, low, axis) * (1 - weight) + np.take(array, np.minimum(low + 1, n - 1), axis) * weight


def acquire(rng, values, brain, ranges):
    """Brain values (N,) blurred and, in 70% of scans, as thick slices along one axis resampled to 1 mm."""
    blur = rng.uniform(0, ranges["blur_mm"])
    thick = rng.uniform(1, max(ranges["slice_mm"], 1)) if rng.random() < 0.7 else 1.0
    axis = 2 if rng.random() < 0.7 else int(rng.integers(2))
    sigma = np.full(3, blur) / brain.vox
    sigma[axis] = max(sigma[axis], 0.4 * thick / brain.vox[axis])  # the slice profile
    mask = brain.mask.astype(np.float32)
    volume = np.zeros(mask.shape, np.float32)
    volume[brain.inside] = values
    # Divided by the blurred mask, the brain's edge keeps its intensity instead of fading into the background.
    volume = ndimage.gaussian_filter(volume, sigma, truncate=2.5) / np.maximum(
        ndimage.gaussian_filter(mask, sigma, truncate=2.5), 1e-3)
    slices = thick / brain.vox[axis]  # slice distance in voxels
    if slices > 1.2:
        centres = np.arange(rng.uniform(0, slices), mask.shape[axis], slices)
        back = (np.arange(mask.shape[axis]) - centres[0]) / slices
        volume = _resample(_resample(volume, centres, axis), back, axis)
    return volume[brain.inside]


def scan(rng, signal, brain, noise_sigma, ranges):
    """One modality as a scanner records the mean signal (N,): bias field and gain, resolution, Rician noise."""
    bias = rng.uniform(0.1, 0.1 + ranges["bias"]) if ranges["bias"] else 0.1
    clean = signal * np.exp(bias * brain_noise(rng, brain, 50.0)) * rng.uniform(0.85, 1.15)
    if ranges["slice_mm"] or ranges["blur_mm"]:
        clean = acquire(rng, clean, brain, ranges)
    if ranges["noise"]:
        noise_sigma *= ranges["noise"] ** rng.uniform(-1, 1)
    noise = rng.standard_normal((2, clean.size), dtype=np.float32) * noise_sigma  # magnitude of a complex signal
    return np.clip(np.rint(np.sqrt((clean + noise[0]) ** 2 + noise[1] ** 2)), 1, 32767)


# ---- a case's labels and images from its tissue and tumor fractions ----

def lesion_labels(lesion, healthy):
    """Disk label (N,) of each voxel: that of its largest fraction (healthy tissue counts as one)."""
    labels, largest = np.zeros_like(healthy, np.uint8), healthy
    for name, fraction in lesion.items():
        labels[fraction > largest] = DISK_LABEL[name]
        largest = np.maximum(largest, fraction)
    return labels


def mix(table, parts):
    """Mean signal per modality: intensities (M, T) @ fractions (T, N) -> (M, N)."""
    return np.array([table[n] for n in parts], np.float32).T @ np.stack(list(parts.values()))


def textured_signal(rng, brain, ranges, table, healthy_signal, lesion, healthy):
    """Signal (M, N) of healthy tissue and tumor compartments, each with its inhomogeneity (texture)."""
    fine = brain_noise(rng, brain, 3.0)
    healthy_texture, lesion_texture = 0.04 * fine, 0.1 * fine
    if ranges["texture"]:  # texture of random strength at two scales: patches of brighter and darker tissue
        coarse = brain_noise(rng, brain, 10.0)
        healthy_texture = rng.uniform(0.01, ranges["texture"]) * fine + rng.uniform(0, ranges["texture"]) * coarse
        lesion_texture = rng.uniform(0.03, 2 * ranges["texture"]) * fine + rng.uniform(0, ranges["texture"]) * coarse
    signal = healthy_signal * ((1 + healthy_texture) * healthy)
    if lesion:
        signal += mix(table, lesion) * (1 + lesion_texture)
    return signal


def scanned_images(rng, signal, brain, shape, ranges):
    """{modality: int16 (X, Y, Z)}: each modality's signal as the scanner records it, background exactly 0."""
    images = {}
    for m, modality in enumerate(MODALITIES):
        image = np.zeros(shape, np.int16)  # background stays exactly 0, brain voxels are >= 1
        image[brain.box][brain.mask] = scan(rng, signal[m], brain, NOISE_SIGMA[m], ranges)
        images[modality] = image
    return images
