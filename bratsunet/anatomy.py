"""The anatomy style of the generator: BraTS-format cases on the label maps of real brains.

As SynthSeg does (Billot et al., "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution without
retraining", Medical Image Analysis 2023), a case starts from a whole-head label map in FreeSurfer's classification:
SynthSeg publishes 20 such maps (its repository's data/training_label_maps, Apache 2.0), the folder the setting
anatomy_dir names. The map is brought onto the BraTS grid (its cerebrum where that of a brain registered to the
SRI-24 atlas lies), turned, scaled, mirrored and deformed smoothly, skull-stripped (the tissues outside the brain
removed, a random rim of the CSF around it kept) and cut below the cerebellum as BraTS brains are. Each structure
(the dura of falx and tentorium among them) gets a mean intensity per modality: a blend of the case's tissue
intensities (synthesis.INTENSITY with the style's contrast ranges) with a Gaussian jitter per structure, as SynthSeg
draws a Gaussian per label. A tumor (synthesis.py's compartments and contrasts) grows from deep cerebral white matter
and pushes the anatomy aside; the texture, a field of view that may miss the brain's top or bottom, and the scanner
(bias field, blur, thick slices, Rician noise) of synthesis.py finish the case.

The maps are split by file name: every fourth one only generates validation cases (label_maps(folder, "validation")),
so that validation measures how a model does on anatomy it never saw.
"""
import functools
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from bratsunet import synthesis

# Centroid (voxel = mm) and long axis of the cerebrum (white matter and cortex) on the BraTS grid, where those of a
# brain registered to the SRI-24 atlas lie: measured on 19 of the 20 SynthSeg maps, each moved so that the moments
# of its brain (brainstem excluded) matched those of the SRI-24 brain mask (pitch 1.8 +- 2.0 degrees, nose down).
TARGET_CENTRE = np.array([119.1, 130.9, 85.4])
TARGET_PITCH_DEG = -1.8
VALIDATION_EVERY = 4  # every fourth map (by file name) generates validation cases only
CSF_RIM_MM = 3  # largest rim of outer CSF kept by the skull strip (0-3 mm, drawn per case)
ROTATE_DEG, SCALE, SHIFT_MM = 4.0, 0.05, 2.0  # std of the random turn, log size and shift of each case's brain
BRAINSTEM_BELOW_CEREBELLUM_MM = (0, 6)  # the brain mask ends this far below the cerebellum, as in BraTS
# (FreeSurfer labels, intensity as a blend of synthesis.INTENSITY's tissues): a mean per structure and modality.
STRUCTURES = (
    ((2, 41), {"wm": 1.0}),  # cerebral white matter: tumors grow here
    ((3, 42), {"gm": 1.0}),  # cerebral cortex
    ((17, 18, 53, 54), {"gm": 0.6, "spot": 0.4}),  # hippocampus, amygdala: brighter than cortex on FLAIR
    ((7, 46), {"wm": 1.0}),  # cerebellar white matter
    ((8, 47), {"gm": 1.0}),  # cerebellar cortex
    ((10, 49), {"deep_gm": 0.6, "wm": 0.4}),  # thalamus
    ((11, 50, 26, 58), {"deep_gm": 1.0}),  # caudate, accumbens
    ((12, 51), {"deep_gm": 1.0}),  # putamen
    ((13, 52), {"deep_gm": 0.4, "wm": 0.6}),  # pallidum
    ((16, 28, 60, 85), {"wm": 0.7, "deep_gm": 0.3}),  # brainstem, ventral diencephalon, optic chiasm
    ((4, 5, 14, 15, 43, 44, 72), {"csf": 1.0}),  # ventricles
    ((30, 62, 136, 137, 163, 164), {"vessel": 1.0}),  # vessels and choroid plexus: bright on T1ce
    ((25, 57, 77), {"wm": 1.0}),  # white-matter lesions: FLAIR-bright spots with ranges["distractors"]
    ((), {"vessel": 0.5, "csf": 0.5}),  # dura (falx, tentorium) and its sinuses, found in the CSF: bright on T1ce
    ((24,), {"csf": 1.0}),  # CSF of the sulci and around the brain (last: the codes of its outer rim follow)
)
WHITE_MATTER, CEREBRUM, CEREBELLUM, WM_LESION, DURA = 1, (1, 2), (4, 5), 13, 14  # codes: 1 + index in STRUCTURES
HEMISPHERES, CEREBELLUM_LABELS = ((2, 3), (41, 42)), (7, 8, 46, 47)  # FreeSurfer labels
CSF = len(STRUCTURES)  # code of CSF inside the brain's hull; CSF + k: outer CSF k mm from the hull
CODES = CSF + CSF_RIM_MM + 1
TISSUE = {"wm": "wm", "spot": "wm", "gm": "gm", "deep_gm": "deep_gm", "csf": "csf", "vessel": "csf"}


def label_maps(folder, split="training"):
    """Sorted label map files of `folder` that generate `split` ("training" or "validation") cases."""
    if folder is None:
        raise ValueError("synthetic_style anatomy needs anatomy_dir: a folder of whole-head label maps "
                         "(FreeSurfer labels, as SynthSeg's data/training_label_maps)")
    folder = Path(folder)
    files = sorted(path for path in folder.glob("*.nii*") if path.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise ValueError(f"{folder}: no label maps (.nii or .nii.gz files) found (anatomy_dir)")
    validation = [k % VALIDATION_EVERY == VALIDATION_EVERY - 1 for k in range(len(files))]
    chosen = [path for path, held_out in zip(files, validation) if held_out == (split == "validation")]
    if not chosen:
        raise ValueError(f"{folder}: {len(files)} label map(s), none left for {split} cases "
                         f"(every {VALIDATION_EVERY}th map generates validation cases)")
    return chosen


# ---- a label map, read once per process: structure codes on a 1 mm LPS grid, its centre and axes ----

class LabelMap(NamedTuple):
    codes: np.ndarray  # uint8 (X, Y, Z), 1 mm, LPS (the BraTS array order), cropped with a border of 0
    centre: np.ndarray  # voxel position of the cerebrum's centroid
    axes: np.ndarray  # (3, 3) the cerebrum's principal axes as columns, nearest to x, y, z
    white_matter: np.ndarray  # (3, K) a sample of the voxels of deep cerebral white matter


def _rotation(angles_deg):
    """Rotation matrix of turns about x, then y, then z (degrees)."""
    (cx, cy, cz), (sx, sy, sz) = np.cos(np.radians(angles_deg)), np.sin(np.radians(angles_deg))
    turn_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    turn_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    turn_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return turn_z @ turn_y @ turn_x


TARGET_AXES = _rotation([TARGET_PITCH_DEG, 0, 0])


def _code_table():
    """FreeSurfer label -> structure code; 0 for background, the tissues outside the brain (>= 500) and unknowns."""
    table = np.zeros(1024, np.uint8)
    for code, (labels, _) in enumerate(STRUCTURES, start=1):
        table[list(labels)] = code
    return table


def principal_axes(voxels):
    """(centroid, axes) of a (3, K) voxel cloud; the axes None when they are ambiguous (two similar spreads)."""
    centre = voxels.mean(axis=1)
    _, vectors = np.linalg.eigh(np.cov(voxels))
    nearest = np.abs(vectors).argmax(axis=0)  # the grid axis closest to each principal axis
    if sorted(nearest) != [0, 1, 2]:
        return centre, None
    axes = np.zeros((3, 3))
    for k, axis in enumerate(nearest):
        axes[:, axis] = vectors[:, k] * np.sign(vectors[axis, k])
    turn = np.degrees(np.arccos(np.clip((np.trace(axes @ TARGET_AXES.T) - 1) / 2, -1, 1)))
    return centre, axes if np.linalg.det(axes) > 0 and turn < 30 else None


def _coarse(mask):
    """A mask at 2 mm voxels: a voxel is set where any of its 8 voxels of 1 mm is."""
    even = mask[:mask.shape[0] // 2 * 2, :mask.shape[1] // 2 * 2, :mask.shape[2] // 2 * 2]
    return even.reshape(even.shape[0] // 2, 2, even.shape[1] // 2, 2, even.shape[2] // 2, 2).any(axis=(1, 3, 5))


def _fine(coarse, shape):
    """An array at 2 mm voxels back on the 1 mm grid of `shape` (each value repeated, odd last planes 0)."""
    fine = np.zeros(shape, coarse.dtype)
    repeated = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    fine[:repeated.shape[0], :repeated.shape[1], :repeated.shape[2]] = repeated
    return fine


def _hull(tissue):
    """The brain's outline with its sulci and fissures filled: a closing by 8 mm at 2 mm voxels, holes filled."""
    coarse = np.pad(_coarse(tissue), 5)
    return _fine(ndimage.binary_fill_holes(ndimage.binary_closing(coarse, iterations=4))[5:-5, 5:-5, 5:-5],
                 tissue.shape)


def _between(first, second):
    """Where the dura lies between two parts of the brain (the hemispheres; cerebrum and cerebellum): midway
    between them, at most 10 mm from both (distances at 2 mm voxels)."""
    far = [ndimage.distance_transform_edt(~_coarse(mask)) * 2 for mask in (first, second)]
    return _fine((np.abs(far[0] - far[1]) <= 2) & (far[0] + far[1] <= 10), first.shape)


def bounds(array):
    """(lo, hi) of the box of an array's non-zero voxels."""
    occupied = [np.flatnonzero(array.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))]
    return np.array([a[0] for a in occupied]), np.array([a[-1] + 1 for a in occupied])


def _read_labels(path):
    """FreeSurfer labels (int16, 0-1023) of a label map file on a 1 mm LPS grid (its header turns it)."""
    try:
        image = nib.as_closest_canonical(nib.load(path))
        labels = np.asarray(image.dataobj)
    except Exception as error:
        raise ValueError(f"{path}: not a readable label map ({error})") from None
    if labels.ndim != 3 or not np.allclose(image.header.get_zooms()[:3], 1.0, atol=0.05):
        raise ValueError(f"{path}: expected a 3D label map of 1 mm voxels, got shape {labels.shape}, "
                         f"voxels {image.header.get_zooms()}")
    return np.clip(labels[::-1, ::-1], 0, 1023).astype(np.int16)  # RAS -> LPS


@functools.lru_cache(maxsize=None)
def load_map(path):
    """The LabelMap of a label map file (1 mm, any orientation)."""
    labels = _read_labels(path)
    codes = _code_table()[labels]
    lo, hi = bounds(codes)  # the brain and its CSF, with room for the outer bands
    crop = tuple(slice(max(a - 8, 0), b + 8) for a, b in zip(lo, hi))
    labels, codes = labels[crop], codes[crop]
    tissue = (codes > 0) & (codes != CSF)
    if np.count_nonzero(tissue) < 500_000:
        raise ValueError(f"{path}: {np.count_nonzero(tissue)} brain voxels; expected a whole brain in "
                         "FreeSurfer labels (2/41 white matter, 3/42 cortex, ...)")
    band = _hull(tissue)
    outer_csf = (codes == CSF) & ~band
    codes[outer_csf] = 0
    codes[band & (codes == 0)] = CSF  # unlabelled voxels inside the brain
    part = np.zeros(1024, np.uint8)
    part[list(HEMISPHERES[0])], part[list(HEMISPHERES[1])], part[list(CEREBELLUM_LABELS)] = 1, 2, 3
    part = part[labels]
    dura = _between(part == 1, part == 2) | _between((part == 1) | (part == 2), part == 3)
    codes[dura & (codes == CSF)] = DURA
    for k in range(1, CSF_RIM_MM + 1):  # outer CSF in 1 mm bands around the hull, kept by the skull strip or not
        grown = ndimage.binary_dilation(band)
        codes[grown & ~band & outer_csf] = CSF + k
        band = grown
    pieces, _ = ndimage.label(codes)
    codes[pieces != np.argmax(np.bincount(pieces.ravel())[1:]) + 1] = 0  # stray voxels apart from the brain
    lo, hi = bounds(codes)
    codes = np.pad(codes[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], 1)  # a border of 0 reads outside as background
    centre, axes = principal_axes(np.argwhere(np.isin(codes, CEREBRUM)).T.astype(float))
    deep = _fine(ndimage.binary_erosion(_coarse(codes == WHITE_MATTER), iterations=3), codes.shape)
    white_matter = np.argwhere(deep & (codes == WHITE_MATTER))[::37].T  # 4-6 mm or more inside white matter
    return LabelMap(codes, centre, TARGET_AXES if axes is None else axes, white_matter)


# ---- one case: the map placed on the grid, skull-stripped, its tumor and intensities ----

def placement(rng, source):
    """(matrix, offset) that take a position on the BraTS grid (mm) to a voxel of the map: turned, scaled, shifted
    and (half of the cases) mirrored left-right about the brain's centre."""
    scale = np.exp(rng.normal(0, SCALE) + rng.normal(0, SCALE / 3, 3))  # > 1: a larger brain than the map's
    mirror = np.diag([rng.choice([-1.0, 1.0]), 1.0, 1.0])
    turn = _rotation(rng.normal(0, ROTATE_DEG, 3))
    matrix = source.axes @ np.diag(1 / scale) @ turn @ mirror @ TARGET_AXES.T
    offset = source.centre - matrix @ (TARGET_CENTRE + rng.normal(0, SHIFT_MM, 3))
    return matrix.astype(np.float32), offset.astype(np.float32)


def grid_box(source, matrix, offset, shape, vox, margin_mm):
    """(lo, hi) voxel bounds on the case grid of the map's box, margin_mm around it."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in source.codes.shape], indexing="ij")).reshape(3, -1)
    mm = np.linalg.solve(matrix, corners - offset[:, None])
    lo = np.clip(np.floor((mm.min(axis=1) - margin_mm) / vox), 0, shape).astype(int)
    hi = np.clip(np.ceil((mm.max(axis=1) + margin_mm) / vox) + 1, 0, shape).astype(int)
    return lo, hi


def _pushed(grid, centre, radius_mm):
    """Displacement (3, ...) that moves grid positions (mm) towards `centre` as if a ball of radius_mm grew there
    (the volume of each shell kept): reading the anatomy there pushes it away from the tumor."""
    offset = [g - c for g, c in zip(grid, centre.astype(np.float32))]
    r = np.sqrt(sum(o ** 2 for o in offset)) + np.float32(1e-3)
    shrink = np.cbrt(np.maximum(r ** 3 - np.float32(radius_mm) ** 3, 0)) / r
    return [o * (shrink - 1) for o in offset]


def sample_codes(rng, source, matrix, offset, box, vox, ranges, push):
    """Structure codes on the case grid's box: the map read at each voxel's position (nearest voxel), after the
    placement, a smooth random deformation (std ranges["deform_mm"]) and the tumor's push (centre, radius)."""
    lo, hi = box
    axes_mm = [np.arange(a, b, dtype=np.float32) * np.float32(v) for a, b, v in zip(lo, hi, vox)]
    grid = np.meshgrid(*axes_mm, indexing="ij", sparse=True)
    shape = tuple(hi - lo)
    position = [matrix[k, 0] * grid[0] + matrix[k, 1] * grid[1] + matrix[k, 2] * grid[2] + offset[k]
                for k in range(3)]
    if ranges["deform_mm"]:
        for k in range(3):
            position[k] += np.float32(ranges["deform_mm"]) * synthesis.smooth_noise(rng, shape, vox, 40.0)
    if push is not None:  # the push fades as 1/r^2: computed within 5 radii of the tumor
        near = tuple(slice(int(max((c - 5 * push[1]) / v - a, 0)), int(max((c + 5 * push[1]) / v - a + 1, 0)))
                     for c, v, a in zip(push[0], vox, lo))
        moved = _pushed([g[tuple(s if g.shape[k] > 1 else slice(None) for k, s in enumerate(near))]
                         for g in grid], push[0], push[1])
        for k in range(3):
            position[k][near] += sum(matrix[k, j] * moved[j] for j in range(3))
    size = source.codes.shape
    index = [np.clip(np.rint(p), 0, n - 1).astype(np.int32) for p, n in zip(position, size)]
    return source.codes.ravel()[(index[0] * size[1] + index[1]) * size[2] + index[2]]


def skull_strip(rng, codes):
    """Brain mask of the codes: structures, CSF inside the hull and a random rim of the outer CSF, cut off a few mm
    below the cerebellum."""
    kept = np.zeros(256, bool)
    kept[1:CSF + 1 + rng.integers(0, CSF_RIM_MM + 1)] = True
    pieces, _ = ndimage.label(kept[codes])
    mask = pieces == np.argmax(np.bincount(pieces.ravel())[1:]) + 1  # no specks of CSF apart from the brain
    cerebellum = np.isin(codes, CEREBELLUM).any(axis=(0, 1))
    if cerebellum.any():
        floor = int(np.argmax(cerebellum)) - rng.integers(*BRAINSTEM_BELOW_CEREBELLUM_MM, endpoint=True)
        mask[:, :, :max(floor, 0)] = False
    return mask


def tumor_centre(rng, source, matrix, offset, shape, vox):
    """A position (mm on the case grid) in deep cerebral white matter, where the tumor starts (gliomas grow in white
    matter; from a voxel near the cortex most of the core would lie in cortex and sulci, with little edema)."""
    for _ in range(100):
        voxel = source.white_matter[:, rng.integers(source.white_matter.shape[1])]
        centre = np.linalg.solve(matrix, voxel - offset)
        if np.all((centre >= 0) & (centre < np.array(shape) * vox)):
            return centre
    raise ValueError("no white matter of the label map falls on the case grid")


def structure_means(rng, table, ranges):
    """(CODES, M) mean intensity per code and modality: each structure's blend of the case's tissue intensities,
    times a Gaussian jitter of its own (log std ranges["anatomy"])."""
    means = np.zeros((CODES, len(synthesis.MODALITIES)), np.float32)
    for code, (_, blend) in enumerate(STRUCTURES, start=1):
        mean = sum(weight * table[tissue] for tissue, weight in blend.items())
        means[code] = mean * np.exp(rng.normal(0, ranges["anatomy"], means.shape[1]))
    spots = ranges["distractors"] * rng.uniform(0, 1)  # white-matter lesions from white matter to FLAIR-bright
    means[WM_LESION] += spots * (table["spot"] - table["wm"])
    means[CSF + 1:] = means[CSF]  # outer CSF as the CSF of the sulci
    return means


def tissue_fractions(codes):
    """{wm, gm, deep_gm, csf: fraction (N,)} of brain voxels' codes, as synthesis.tumor_fractions reads them."""
    fractions = {name: np.zeros(CODES, np.float32) for name in ("wm", "gm", "deep_gm", "csf")}
    for code, (_, blend) in enumerate(STRUCTURES, start=1):
        for tissue, weight in blend.items():
            fractions[TISSUE[tissue]][code] += weight
    for name in fractions:
        fractions[name][CSF + 1:] = fractions[name][CSF]
    return {name: table[codes] for name, table in fractions.items()}


def partial_coverage(rng, signal, brain, ranges):
    """Signal (M, N) without what a scan's field of view missed: in a quarter of the scans, the brain beyond an
    oblique plane up to ranges["coverage"] mm below its top (or, less often, above its bottom) gets no signal, as
    where a sequence covered less than the brain and registration tilted the edge (the real sample's FLAIR, T1
    and T2 miss its top 10 mm)."""
    for m in range(len(signal) if ranges["coverage"] else 0):
        if rng.random() < 0.25:
            tilt = rng.normal(0, 0.15, 2)
            height = brain.points[2] + tilt[0] * brain.points[0] + tilt[1] * brain.points[1]
            depth = rng.uniform(0, ranges["coverage"])
            kept = height.max() - depth - height if rng.random() < 0.7 else height - height.min() - depth
            signal[m] *= synthesis.soft(kept, 2.0)
    return signal


def generate_case(shape, seed, kind, ranges, maps):
    """generator.generate_case for ranges with "anatomy" > 0: a case on one of the label map files `maps`."""
    if not maps:
        raise ValueError("synthetic_style anatomy needs label maps (setting anatomy_dir)")
    rng = np.random.default_rng(seed)
    vox = np.array(synthesis.FULL_SHAPE) / np.array(shape)
    source = load_map(str(maps[rng.integers(len(maps))]))
    matrix, offset = placement(rng, source)
    plan = push = None
    if kind != "healthy":  # the tumor first: the anatomy makes room for it
        plan = synthesis.tumor_blobs(rng, tumor_centre(rng, source, matrix, offset, shape, vox), kind, ranges, vox)
        push = (plan[0], plan[1] * rng.uniform(0, ranges["mass_effect"]))
    box = grid_box(source, matrix, offset, shape, vox, 3 * ranges["deform_mm"] + 2)
    codes = sample_codes(rng, source, matrix, offset, box, vox, ranges, push)
    mask = skull_strip(rng, codes)
    # The box shrunk to the brain (filters and noise cost per voxel of the box).
    lo, hi = bounds(mask)
    codes, mask = (a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] for a in (codes, mask))
    lo, hi = box[0] + lo, box[0] + hi
    inside = np.nonzero(mask)
    points = np.stack([(i + a).astype(np.float32) * np.float32(v) for i, a, v in zip(inside, lo, vox)])
    brain = synthesis.Brain(tuple(slice(a, b) for a, b in zip(lo, hi)), mask, inside, points, vox,
                            tissue_fractions(codes[inside]))
    lesion = {} if kind == "healthy" else synthesis.tumor_fractions(rng, brain, kind, plan, ranges)
    healthy = 1 - sum(lesion.values()) if lesion else np.ones(points.shape[1], np.float32)
    seg = np.zeros(shape, np.uint8)
    seg[brain.box][mask] = synthesis.lesion_labels(lesion, healthy)
    table = synthesis.intensity_table(rng, ranges)
    if ranges["faint_edema"]:
        table["edema"] = table["wm"] + rng.uniform(1 - ranges["faint_edema"], 1) * (table["edema"] - table["wm"])
    healthy_signal = structure_means(rng, table, ranges)[codes[inside]].T  # (M, N)
    signal = synthesis.textured_signal(rng, brain, ranges, table, healthy_signal, lesion, healthy)
    return synthesis.scanned_images(rng, partial_coverage(rng, signal, brain, ranges), brain, shape, ranges), seg
