"""The phantom and randomized styles of the generator: a brain drawn from shapes.

A rounded brain with folded cortex, white matter, deep grey nuclei, ventricles and CSF (with "hindbrain": the
cerebellum, brainstem and temporal lobes beneath), deformed smoothly and pushed aside by a tumor anywhere in it.
Style "phantom" (the demo) keeps anatomy, contrasts and scanner alike in every case; "randomized" draws them from
STYLES' ranges (domain randomisation as SynthSeg's).
"""
import numpy as np
from scipy import ndimage

from bratsunet.synthesis import (FULL_SHAPE, Brain, blob, intensity_table, labyrinth_at, lesion_labels, mix,
                                 scanned_images, smooth_noise, soft, textured_signal, tumor_blobs, tumor_fractions)

# Anatomy is laid out in the millimetres of a full-size case and scaled to the requested shape.
BRAIN_CENTER = (118.0, 130.0, 72.0)  # voxel position of the brain centre in a full-size case (as in real data)
BRAIN_AXES = (68.0, 82.0, 62.0)  # semi-axes in mm: right-left, front-back, down-up


def _outline(x, y, z, axes):
    """Radius (< 1 inside) of a rounded-box brain, narrower in front (y < 0) and towards the skull base (z < 0)."""
    u, v, w = x / axes[0], y / axes[1], z / axes[2]
    below = np.minimum(w, 0) ** 2
    u, v = np.abs(u / ((1 + 0.06 * v) * (1 - 0.3 * below))), np.abs(v / (1 - 0.12 * below))
    return np.sqrt((u ** 2.2 + v ** 2.2) ** (2 / 2.2) + w ** 2)  # flatter sides than an ellipsoid


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
    cerebellum = blob(x, y, np.minimum(z + 0.58 * az, 0), (0, 0.52 * ay, 0), (0.72 * ax, 0.37 * ay, 0.4 * az))
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
            radius = blob(x, y, z, (side * centre[0], *centre[1:]), semi_axes)
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
    return tumor_blobs(rng, centre, kind, ranges, vox)


def generate_case(shape, seed, kind, ranges):
    """generator.generate_case for the ranges of a style drawn from shapes: (images, seg)."""
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
    seg = np.zeros(shape, np.uint8)
    seg[brain.box][brain.mask] = lesion_labels(lesion, healthy)
    table = intensity_table(rng, ranges)
    signal = textured_signal(rng, brain, ranges, table, mix(table, brain.tissues), lesion, healthy)
    return scanned_images(rng, signal, brain, shape, ranges), seg
