"""Generate BraTS-format cases: the project's embedded default data.

A skull-stripped brain (folded cortex, white matter, deep grey nuclei, CSF) with a lumpy tumor (necrotic core 1 in
an enhancing rim 4 in edema 2), real scans' contrasts, a bias field and Rician noise. Style "phantom" (the demo)
keeps anatomy, contrasts and scanner alike in every case; "randomized" draws them from STYLES' ranges (domain
randomisation as SynthSeg's). Files as data_format lays them out (BraTS 2020: int16, uint8 labels, 1 mm, its affine).

    python synthetic.py     # hp.synthetic_cases cases of hp.synthetic_shape into hp.raw_data_dir
"""
import gzip
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from bratsunet import conventions
from bratsunet.console import progress_bar
from bratsunet.files import atomic_write

MODALITIES = ("flair", "t1", "t1ce", "t2")
SEG_NAME = "seg"
FULL_SHAPE = (240, 240, 155)
# Anatomy is laid out in the millimetres of a full-size case and scaled to the requested shape.
BRAIN_CENTER = (118.0, 130.0, 72.0)  # voxel position of the brain centre in a full-size case (as in real data)
BRAIN_AXES = (68.0, 82.0, 62.0)  # semi-axes in mm: right-left, front-back, down-up
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
}}
STYLES["phantom"] = dict.fromkeys(STYLES["randomized"], 0)
MARK = b"BraTS-format phantom from synthetic.py"  # in each file's header: never overwrite files without it


def case_kind(index):
    """Kind of case number `index`: any 10 consecutive numbers (and cases 1-6) hold each kind, most "tumor"."""
    return {3: "healthy", 5: "no_enhancing"}.get(index % 10, "tumor")


def brats_affine(shape):
    """The BraTS 2020 orientation: x and y flipped, 1 mm voxels, y offset to the last row (as in real files)."""
    return np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, shape[1] - 1], [0, 0, 1.0, 0], [0, 0, 0, 1]])


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


# ---- anatomy and tumor: fractions of each tissue at the N brain voxels ----

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


def _outline(x, y, z, axes):
    """Radius (< 1 inside) of a rounded-box brain, narrower in front (y < 0) and towards the skull base (z < 0)."""
    u, v, w = x / axes[0], y / axes[1], z / axes[2]
    below = np.minimum(w, 0) ** 2
    u, v = np.abs(u / ((1 + 0.06 * v) * (1 - 0.3 * below))), np.abs(v / (1 - 0.12 * below))
    return np.sqrt((u ** 2.2 + v ** 2.2) ** (2 / 2.2) + w ** 2)  # flatter sides than an ellipsoid


def _blob(x, y, z, centre, semi_axes):
    """Ellipsoidal radius around `centre` (mm), < 1 inside."""
    return np.sqrt(sum(((c - m) / s) ** 2 for c, m, s in zip((x, y, z), centre, semi_axes)))


def _warp(rng, x, y, z, vox, deform_mm, push):
    """Coordinates moved smoothly (std deform_mm) and pushed away from push's centre as by a ball of its radius."""
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    x, y, z = (np.broadcast_to(g, shape) + deform_mm * smooth_noise(rng, shape, vox, 40.0) for g in (x, y, z))
    if push is not None:
        push = (push[0].astype(np.float32), np.float32(push[1]))
        offset = np.stack([x - push[0][0], y - push[0][1], z - push[0][2]])  # (3, X, Y, Z)
        r = np.sqrt((offset ** 2).sum(axis=0)) + 1e-3
        shrink = np.cbrt(np.maximum(r ** 3 - push[1] ** 3, 0)) / r  # the volume of each shell is kept
        x, y, z = (c + o * shrink for c, o in zip(push[0], offset))
    return x, y, z


def _hindbrain(rng, x, y, z, axes, step, bumps):
    """(cerebellum radius, brainstem radius (< 1 inside), base of the cerebrum in mm, the tentorium's CSF sheet)."""
    ax, ay, az = (float(a) for a in axes * rng.uniform(0.92, 1.08, 3))
    tentorium = -az * (0.2 + 0.25 * np.maximum(y, 0) / ay + 0.12 * np.abs(x) / ax)
    footprint = soft((1 - np.sqrt((x / (0.72 * ax)) ** 2 + ((y - 0.52 * ay) / (0.37 * ay)) ** 2)) * 30.0, 4.0)
    # The base rises to the front (orbits), low at the sides (temporal lobes), high on the tentorium.
    temporal = soft(np.abs(x) - 0.4 * ax, 10.0) * soft(y + 0.55 * ay, 10.0)
    sides = -az * (0.4 + 0.25 * np.minimum(y, 0) / ay + 0.34 * temporal)
    cerebellum = _blob(x, y, np.minimum(z + 0.58 * az, 0), (0, 0.52 * ay, 0), (0.72 * ax, 0.37 * ay, 0.4 * az))
    cerebellum = np.maximum(cerebellum, 1 + (z - tentorium) / 25.0)
    stem = np.sqrt((x / (0.16 * ax)) ** 2 + ((y - 0.06 * ay + 0.15 * z) / (0.15 * ay)) ** 2)
    stem = np.maximum(stem, 1 + np.maximum(-0.98 * az - z, z + 0.2 * az) / 10.0)  # from the midbrain down
    sheet = soft(0.8 - np.abs(z - tentorium), step) * footprint
    return cerebellum, stem, footprint * tentorium + (1 - footprint) * (sides + 5.0 * bumps), sheet


def brain_tissues(rng, shape, ranges, push=None):
    """A random brain: each tissue's fraction at each voxel. push: (centre, mm) of a tumor's mass effect, or None."""
    vox = np.array(FULL_SHAPE) / np.array(shape)  # mm per voxel in the virtual full-size head
    center = np.array(BRAIN_CENTER) + rng.normal(0, 2.0, 3)
    axes = (np.array(BRAIN_AXES) * rng.uniform(0.97, 1.07) * (1 + rng.normal(0, 0.02, 3))).astype(np.float32)
    reach = 1.1 * axes + 2.5 * ranges["deform_mm"]
    lo = np.clip(np.floor((center - reach) / vox), 0, shape).astype(int)
    hi = np.clip(np.ceil((center + reach) / vox) + 1, 0, shape).astype(int)
    x, y, z = np.meshgrid(*((np.arange(a, b) * v - c).astype(np.float32) for a, b, v, c in zip(lo, hi, vox, center)),
                          indexing="ij", sparse=True)  # (X, 1, 1), (1, Y, 1), (1, 1, Z)
    if ranges["deform_mm"] or push is not None:
        x, y, z = _warp(rng, x, y, z, vox, ranges["deform_mm"], push)
    outline = _outline(x, y, z, axes)  # (X, Y, Z)
    bumps = smooth_noise(rng, outline.shape, vox, 16.0)  # a slightly irregular surface
    radius = outline * (1 + 0.02 * bumps)
    parts = [radius]  # radii (< 1 inside) of the cerebrum (and cerebellum and brainstem) and their depth scales
    if ranges["hindbrain"]:
        cerebellum, stem, base, tentorium = _hindbrain(rng, x, y, z, axes, float(vox.max()), bumps)
        parts = [np.maximum(radius, 1 + (base - z) / 68.0), cerebellum, stem]
    mask = np.minimum.reduce(parts) < 1
    inside = np.nonzero(mask)
    points = np.stack([np.broadcast_to(g, mask.shape)[inside] for g in (x, y, z)])  # (3, N)
    outline, bumps, parts = outline[inside], bumps[inside], [part[inside] for part in parts]
    depth = (1 - parts[0]) * 68.0  # about mm below the surface of the egg-shaped brain
    if ranges["hindbrain"]:  # mm to the background, from a distance map at half resolution
        half = ndimage.distance_transform_edt(mask[::2, ::2, ::2], sampling=2 * vox).astype(np.float32)
        depth = ndimage.map_coordinates(half, np.array(inside) / 2.0, order=1) + 0.5 * float(vox.max())
        tentorium = np.broadcast_to(tentorium, mask.shape)[inside]
    x, y, z = points
    step = float(vox.max())  # partial-volume width: one voxel

    # Sulci: sheets in from the surface along a labyrinth read at each voxel's projection onto the outline, bent
    # as they run deeper. Grey matter lines the sulci and the surface, white matter fills the gyri below.
    outer = depth < 30.0  # deeper voxels have no folds
    bend = np.stack([smooth_noise(rng, mask.shape, vox, 10.0)[inside][outer] for _ in range(3)])  # (3, n)
    surface = np.maximum(outline[outer], 0.55)  # (deep under the surface only at the base of the cerebrum)
    folds, slope = labyrinth_at(rng, points[:, outer] / surface + 4.0 * bend, 4.0, step)
    to_sulcus = np.full(depth.shape, 99.0, np.float32)
    to_sulcus[outer] = np.abs(folds) / (slope + 1e-6) * surface  # mm
    fundus = 15.0 + 4.0 * bumps  # sulcal depth, mm
    blur = 1.5 * step  # the grey-white boundary is blurred in real scans
    cortex = np.maximum(soft(2.6 - to_sulcus, blur) * soft(fundus - depth, blur), soft(2.6 - depth, blur))
    sulcus = soft(0.4 - to_sulcus, step) * soft(fundus - 2.5 - depth, step)
    surface_csf = soft(0.6 + 0.8 * bumps - depth, step)
    # Interhemispheric fissure, from the top down to the corpus callosum (and ventricles) in the middle.
    midline = np.abs(x - 2.0 * bumps)
    callosum = np.sqrt(((y + 10) / (0.55 * axes[1])) ** 2 + (z / (0.38 * axes[2])) ** 2)  # < 1 below it
    above_callosum = soft((callosum - 1) * 20.0, step)
    fissure = soft(1.0 - midline, step) * above_callosum
    cortex = np.maximum(cortex, soft(3.6 - midline, step) * above_callosum)

    # Lateral ventricles: seen from above, front horns diverge forward and atria backward; septum between.
    size = rng.uniform(0.75, 1.3)
    ventricles = 0
    for side in (-1, 1):
        centre_x = side * (5.5 + np.where(y < -20.0, np.float32(0.01), np.float32(0.005)) * (y + 20.0) ** 2)
        centre_z = 12.0 - 0.004 * (y + 15.0) ** 2  # an arch, highest over the thalamus
        half_width = size * (6.0 + 0.04 * np.maximum(y + 25.0, 0))
        radius = np.sqrt(((x - centre_x) / half_width) ** 2 + ((y + 13) / 42.0) ** 4
                         + ((z - centre_z) / (12.0 * size)) ** 2)
        ventricles = np.maximum(ventricles, soft((1 - radius) * 6.0, step))
    ventricles = ventricles * soft(np.abs(x) - 1.5, step)
    deep = 0  # thalamus and lentiform nuclei
    for centre, semi_axes in (((10, 8, 0), (8, 14, 8)), ((24, -10, 2), (6, 15, 9))):
        for side in (-1, 1):
            radius = _blob(x, y, z, (side * centre[0], *centre[1:]), semi_axes)
            deep = np.maximum(deep, soft((1 - radius) * 6.0, step))

    csf = np.maximum(np.maximum(sulcus, surface_csf), np.maximum(fissure, ventricles))
    if ranges["hindbrain"]:  # Sylvian fissures over the temporal lobes; folia of the cerebellum; the brainstem
        sylvian = soft(1.2 - np.abs(z + 0.12 * axes[2] - 0.1 * y), step) * soft(np.abs(x) - 0.45 * axes[0], 6.0)
        csf = np.maximum(csf, sylvian * soft(0.1 * axes[1] - y, 8.0) * soft(y + 0.45 * axes[1], 8.0))
        csf = np.maximum(csf, tentorium)
        part = np.argmin(parts, axis=0)  # 0 cerebrum, 1 cerebellum, 2 brainstem
        small = part == 1
        folia, slope = labyrinth_at(rng, points[:, small], 2.5, step)
        csf[small] = np.maximum(soft(0.3 - np.abs(folia) / (slope + 1e-6), step) * soft(14.0 - depth[small], step),
                                soft(0.6 - depth[small], step))
        cortex[small], deep[small] = soft(10.0 - depth[small], 4.0), 0  # grey folia over a white core
        cortex[part == 2], deep[part == 2] = 0, 0.35
        csf[part == 2] = soft(0.8 - depth[part == 2], step)
    gm = (1 - csf) * cortex
    deep = (1 - csf - gm) * deep
    tissues = {"wm": 1 - csf - gm - deep, "gm": gm, "deep_gm": deep, "csf": csf}
    if ranges["distractors"]:  # enhancing vessels in part of the CSF, FLAIR-bright spots, a rim at the edge
        amount = ranges["distractors"]
        patches = smooth_noise(rng, mask.shape, vox, 6.0)[inside]
        tissues["vessel"] = csf * soft(patches - rng.uniform(0.3, 1.5) / amount, 1.0)
        tissues["spot"] = tissues["wm"] * soft((smooth_noise(rng, mask.shape, vox, 4.0)[inside]
                                                 - rng.uniform(1.8, 3.0) / amount) * 2.0, 1.0)
        tissues["csf"], tissues["wm"] = csf - tissues["vessel"], tissues["wm"] - tissues["spot"]
        rim = soft(rng.uniform(0, 2.5) * amount - depth, step)
        tissues = {**{name: (1 - rim) * fraction for name, fraction in tissues.items()}, "rim": rim}
    return Brain(tuple(slice(a, b) for a, b in zip(lo, hi)), mask, inside, points, vox, tissues)


def tumor_plan(rng, kind, ranges, vox):
    """(centre mm, core radius mm, blobs [(centre, semi-axes)]): 1-4 blobs (with spread: anywhere, a satellite)."""
    spread = ranges["spread"]
    while True:
        centre = np.array([rng.choice([-1, 1]) * rng.uniform(12 - 9 * spread, 45 + 15 * spread),
                           rng.uniform(-50 - 20 * spread, 45 + 20 * spread),
                           rng.uniform(-12 - 6 * spread, 38 + 8 * spread)])
        if np.sum((centre / BRAIN_AXES) ** 2) < 0.45 + 0.35 * spread:
            break
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
        t = np.minimum(t, _blob(x, y, z, centre.tolist(), semi_axes.tolist()))
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


def generate_case(shape=FULL_SHAPE, seed=0, kind="tumor", style="phantom"):
    """({modality: int16 (X, Y, Z)}, seg uint8 (X, Y, Z) labels 0/1/2/4); the same arguments, the same arrays."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"case shape {shape}: expected 3 sizes of at least 16 voxels")
    if kind not in ("tumor", "no_enhancing", "healthy"):
        raise ValueError(f"unknown case kind {kind!r}: expected tumor, no_enhancing or healthy")
    ranges = style_ranges(style)
    rng = np.random.default_rng(seed)
    vox = np.array(FULL_SHAPE) / np.array(shape)
    plan, push = None, None
    if kind != "healthy" and ranges["mass_effect"]:  # the tumor first: the anatomy makes room for it
        plan = tumor_plan(rng, kind, ranges, vox)
        push = (plan[0], plan[1] * rng.uniform(0, ranges["mass_effect"]))
    brain = brain_tissues(rng, shape, ranges, push)
    if kind != "healthy" and plan is None:
        plan = tumor_plan(rng, kind, ranges, vox)
    lesion = {} if kind == "healthy" else tumor_fractions(rng, brain, kind, plan, ranges)
    healthy = 1 - sum(lesion.values()) if lesion else np.ones(brain.points.shape[1], np.float32)
    # Each voxel gets the label of its largest fraction (healthy tissue counts as one).
    labels, largest = np.zeros_like(healthy, np.uint8), healthy
    for name, fraction in lesion.items():
        labels[fraction > largest] = DISK_LABEL[name]
        largest = np.maximum(largest, fraction)
    seg = np.zeros(shape, np.uint8)
    seg[brain.box][brain.mask] = labels
    # Mean signal per modality: intensities (M, T) @ fractions (T, N) -> (M, N), with tissue inhomogeneity.
    table = intensity_table(rng, ranges)
    mix = lambda parts: np.array([table[n] for n in parts], np.float32).T @ np.stack(list(parts.values()))
    fine = brain_noise(rng, brain, 3.0)
    healthy_texture, lesion_texture = 0.04 * fine, 0.1 * fine
    if ranges["texture"]:  # texture of random strength at two scales: patches of brighter and darker tissue
        coarse = brain_noise(rng, brain, 10.0)
        healthy_texture = rng.uniform(0.01, ranges["texture"]) * fine + rng.uniform(0, ranges["texture"]) * coarse
        lesion_texture = rng.uniform(0.03, 2 * ranges["texture"]) * fine + rng.uniform(0, ranges["texture"]) * coarse
    signal = mix(brain.tissues) * ((1 + healthy_texture) * healthy)
    if lesion:
        signal += mix(lesion) * (1 + lesion_texture)
    images = {}
    for m, modality in enumerate(MODALITIES):
        image = np.zeros(shape, np.int16)  # background stays exactly 0, brain voxels are >= 1
        image[brain.box][brain.mask] = scan(rng, signal[m], brain, NOISE_SIGMA[m], ranges)
        images[modality] = image
    return images, seg


# ---- files ----

def style_name(style):
    """The header's aux_file of a style's files: empty for the phantom (as before styles), else its name."""
    return b"" if style == "phantom" else (style if isinstance(style, str) else "custom").encode()


def save_nifti(array, path, affine, style=b""):
    """Write a NIfTI file like the BraTS ones (1 mm, scanner qform/sform), atomically and byte-reproducibly."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = MARK
    image.header["aux_file"] = style
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    data = image.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)  # mtime=0: the same bytes on every run
    atomic_write(path, lambda tmp: tmp.write_bytes(data))  # a hidden name first: no case finder sees it


def case_paths(out_dir, name, compress=False, data_format="brats2020"):
    """{channel: path} of one case folder named as data_format names files, channels MODALITIES then "seg"."""
    extension = ".nii.gz" if compress else ".nii"
    return {c: Path(out_dir) / name / f"{name}{conventions.file_suffix(c, data_format)}{extension}"
            for c in (*MODALITIES, SEG_NAME)}


def _our_file(path):
    """(shape, style name) of a file this script wrote, else None (missing, unreadable or someone else's file)."""
    try:
        image = nib.load(path)
        return (image.shape, image.header["aux_file"].item()) if image.header["descrip"] == MARK else None
    except Exception:
        return None


def write_case(out_dir, name, images, seg, compress=False, data_format="brats2020", style=b""):
    """Write the case's five files -> its folder; never replaces a file it did not write (as real cases' files)."""
    paths = case_paths(out_dir, name, compress, data_format)
    for path in (*paths.values(), *case_paths(out_dir, name, not compress, data_format).values()):
        if path.exists() and _our_file(path) is None:
            raise FileExistsError(f"{path}: not written by synthetic.py; refusing to overwrite it "
                                  "(choose another folder)")
    paths[SEG_NAME].parent.mkdir(parents=True, exist_ok=True)
    for channel, path in paths.items():
        save_nifti(seg if channel == SEG_NAME else images[channel], path, brats_affine(seg.shape), style)
        # A leftover copy with the other extension would make the case ambiguous.
        Path(str(path)[:-3] if compress else str(path) + ".gz").unlink(missing_ok=True)
    return paths[SEG_NAME].parent


def generate_dataset(out_dir, n_cases, shape=FULL_SHAPE, seed=0, compress=False, progress=False,
                     data_format="brats2020", style="phantom"):
    """Cases 1..n_cases into out_dir (complete ones skipped) -> names; case i depends only on (seed, i, style)."""
    style_ranges(style)  # an unknown style fails before any file is written
    if conventions.CONVENTIONS[data_format].layout != "case folders":
        raise ValueError(f"data_format {data_format}: generated cases are written in the BraTS layouts (brats2020, "
                         "brats2023, brats2024) only")
    names = [conventions.CONVENTIONS[data_format].case_name.format(index) for index in range(1, n_cases + 1)]
    mark = style_name(style)
    for index, name in enumerate(progress_bar(names, description="synthetic cases", disable=not progress), start=1):
        # Files are written atomically: a case is complete when all five are ours, of this shape and style.
        paths = case_paths(out_dir, name, compress, data_format).values()
        if not all(_our_file(path) == (tuple(shape), mark) for path in paths):
            images, seg = generate_case(shape, seed=(seed, index), kind=case_kind(index), style=style)
            seg = conventions.internal_to_brats(conventions.brats_to_internal(seg), data_format)  # (X, Y, Z)
            write_case(out_dir, name, images, seg, compress, data_format, mark)
    return names
