"""Generate BraTS-format phantom cases: the project's embedded default data.

A skull-stripped brain (folded cortex over white matter, deep grey nuclei, CSF in sulci and ventricles) with
a lumpy tumor: necrotic core (label 1) in an enhancing rim (4) in edema (2), each with its contrast in real
scans, a bias field and Rician noise. Laid out like BraTS 2020: BraTS20_Training_NNN/BraTS20_Training_NNN_
{flair,t1,t1ce,t2,seg}.nii (.nii.gz when compressed), int16 images, uint8 labels, 1 mm, the BraTS affine; or
as another data_format of conventions.py. MARK in the header lets them be smaller than the BraTS grid.

    python synthetic.py                 # hp.synthetic_cases cases of hp.synthetic_shape into hp.raw_data_dir
    python synthetic.py --comparison    # also Images/synthetic_vs_real.png (needs ../shared/data/brats_sample)
"""
import gzip
import os
import sys
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

import conventions
import hyperparameters

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
    "edema": (270, 240, 330, 460),
    "necrosis": (240, 150, 215, 680),
    "enhancing": (295, 225, 480, 470),
    "nonenhancing": (310, 190, 270, 580),  # tumor core without enhancement (low-grade-like)
}
DISK_LABEL = {"necrosis": 1, "nonenhancing": 1, "edema": 2, "enhancing": 4}
NOISE_SIGMA = (7.0, 10.0, 10.0, 12.0)  # sigma of each Rician component, per modality
MARK = b"BraTS-format phantom from synthetic.py"  # in each file's header: never overwrite files without it
ROOT = Path(__file__).resolve().parent
SAMPLE_CASE = ROOT.parent / "shared/data/brats_sample/BraTS20_Training_TCGA-FG-6692"


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
    """Random field with zero mean and unit variance on a grid, features about 2-3x `spacing_mm` across."""
    bx, by, bz = (_bumps(n, c, spacing_mm, spacing_mm, 2 * spacing_mm)[0] for n, c in zip(shape, cell_mm))
    # Along each axis the squared bumps sum to sqrt(pi) at any position: unit variance everywhere.
    weights = rng.standard_normal((bx.shape[1], by.shape[1], bz.shape[1]), dtype=np.float32) / np.pi ** 0.75
    return _separable(weights, bx, by, bz)


def labyrinth_at(rng, points, width_mm, voxel_mm):
    """Band-pass random field and its gradient magnitude at points (3, N) mm, read from a grid.

    A difference of Gaussians keeps one band of wavelengths: the zero set is a labyrinth of evenly spaced sheets
    and |field| / slope approximates the mm to the nearest one (a low-pass field has broad flats near zero).
    """
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


def brain_tissues(rng, shape):
    """A random brain: fractions of white and grey matter, deep grey nuclei and CSF at each voxel."""
    vox = np.array(FULL_SHAPE) / np.array(shape)  # mm per voxel in the virtual full-size head
    center = np.array(BRAIN_CENTER) + rng.normal(0, 2.0, 3)
    axes = (np.array(BRAIN_AXES) * rng.uniform(0.97, 1.07) * (1 + rng.normal(0, 0.02, 3))).astype(np.float32)
    lo = np.clip(np.floor((center - 1.1 * axes) / vox), 0, shape).astype(int)
    hi = np.clip(np.ceil((center + 1.1 * axes) / vox) + 1, 0, shape).astype(int)
    grid = [(np.arange(a, b) * v - c).astype(np.float32) for a, b, v, c in zip(lo, hi, vox, center)]
    outline = _outline(grid[0][:, None, None], grid[1][None, :, None], grid[2][None, None, :], axes)  # (X, Y, Z)
    bumps = smooth_noise(rng, outline.shape, vox, 16.0)  # a slightly irregular surface
    mask = outline * (1 + 0.02 * bumps) < 1
    inside = np.nonzero(mask)
    points = np.stack([g[i] for g, i in zip(grid, inside)])  # (3, N)
    x, y, z = points
    outline, bumps = outline[inside], bumps[inside]
    depth = (1 - outline * (1 + 0.02 * bumps)) * 68.0  # about mm below the brain surface
    step = float(vox.max())  # partial-volume width: one voxel

    # Sulci: sheets running in from the surface along a labyrinth on the surface. Each voxel reads the
    # labyrinth at its projection onto the outline, shifted by a smooth displacement that bends sulci as
    # they run deeper. Grey matter lines the sulci and the surface, white matter fills the gyri below.
    outer = depth < 30.0  # deeper voxels have no folds
    bend = np.stack([smooth_noise(rng, mask.shape, vox, 10.0)[inside][outer] for _ in range(3)])  # (3, n)
    folds, slope = labyrinth_at(rng, points[:, outer] / outline[outer] + 4.0 * bend, 4.0, step)
    to_sulcus = np.full(depth.shape, 99.0, np.float32)
    to_sulcus[outer] = np.abs(folds) / (slope + 1e-6) * outline[outer]  # mm
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
    gm = (1 - csf) * cortex
    deep = (1 - csf - gm) * deep
    tissues = {"wm": 1 - csf - gm - deep, "gm": gm, "deep_gm": deep, "csf": csf}
    return Brain(tuple(slice(a, b) for a, b in zip(lo, hi)), mask, inside, points, vox, tissues)


def tumor_fractions(rng, brain, kind):
    """Fractions (N,) of each compartment of a lumpy random tumor: a union of blobs deformed by noise."""
    x, y, z = brain.points
    step = float(brain.vox.max())
    while True:  # a centre well inside the brain
        centre = np.array([rng.choice([-1, 1]) * rng.uniform(12, 45), rng.uniform(-50, 45), rng.uniform(-12, 38)])
        if np.sum((centre / BRAIN_AXES) ** 2) < 0.45:
            break
    radius = max(rng.uniform(8, 20) if kind == "tumor" else rng.uniform(8, 16), 3.5 * step)  # core, mm
    t = np.inf  # distance in units of the blob radii, < 1 inside a blob
    for k in range(rng.integers(1, 5)):
        offset = rng.normal(0, 1, 3) * radius * 0.45 * (k > 0)
        semi_axes = radius * (1.0 if k == 0 else rng.uniform(0.5, 0.9)) * rng.uniform(0.8, 1.2, 3)
        t = np.minimum(t, _blob(x, y, z, (centre + offset).tolist(), semi_axes.tolist()))
    core_t = t + 0.12 * brain_noise(rng, brain, 3.0)
    edema_t = t + 0.45 * brain_noise(rng, brain, 6.0)
    tissues = brain.tissues
    reach = rng.uniform(1.3, 2.2) * (0.4 + 0.6 * (tissues["wm"] + tissues["deep_gm"]))  # edema follows white matter
    solid = 1 - tissues["csf"]
    core = soft((1 - core_t) * radius, step) * solid
    edema = soft((reach - edema_t) * radius, 8.0) * solid * (1 - core)  # edema fades out over several mm
    if kind == "no_enhancing":
        return {"nonenhancing": core, "edema": edema}
    rim = max(min(rng.uniform(4, 9), 0.55 * radius), 1.3 * step)  # enhancing rim thickness, mm
    necrosis = soft((1 - core_t) * radius - rim, step) * solid
    return {"necrosis": necrosis, "enhancing": core - necrosis, "edema": edema}


def generate_case(shape=FULL_SHAPE, seed=0, kind="tumor"):
    """One phantom case: ({modality: int16 (X, Y, Z)}, seg uint8 (X, Y, Z) with BraTS labels {0, 1, 2, 4}).

    kind: "tumor" (necrosis, enhancing rim, edema), "no_enhancing" (core without label 4) or "healthy".
    seed: anything numpy.random.default_rng takes; the same shape, seed and kind give identical arrays.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"case shape {shape}: expected 3 sizes of at least 16 voxels")
    if kind not in ("tumor", "no_enhancing", "healthy"):
        raise ValueError(f"unknown case kind {kind!r}: expected tumor, no_enhancing or healthy")
    rng = np.random.default_rng(seed)
    brain = brain_tissues(rng, shape)
    lesion = {} if kind == "healthy" else tumor_fractions(rng, brain, kind)
    healthy = 1 - sum(lesion.values()) if lesion else np.ones(brain.points.shape[1], np.float32)
    # Each voxel gets the label of its largest fraction (healthy tissue counts as one).
    labels, largest = np.zeros_like(healthy, np.uint8), healthy
    for name, fraction in lesion.items():
        labels[fraction > largest] = DISK_LABEL[name]
        largest = np.maximum(largest, fraction)
    seg = np.zeros(shape, np.uint8)
    seg[brain.box][brain.mask] = labels
    # Mean signal per modality: intensities (M, T) @ fractions (T, N) -> (M, N), with tissue inhomogeneity.
    mix = lambda parts: np.array([INTENSITY[n] for n in parts], np.float32).T @ np.stack(list(parts.values()))
    texture = brain_noise(rng, brain, 3.0)
    signal = mix(brain.tissues) * ((1 + 0.04 * texture) * healthy)
    if lesion:
        signal += mix(lesion) * (1 + 0.1 * texture)
    images = {}
    for m, modality in enumerate(MODALITIES):
        # Each scan has its own smooth bias field and gain; then Rician noise (magnitude of a complex signal).
        clean = signal[m] * np.exp(0.1 * brain_noise(rng, brain, 50.0)) * rng.uniform(0.85, 1.15)
        noise = rng.standard_normal((2, clean.size), dtype=np.float32) * NOISE_SIGMA[m]
        image = np.zeros(shape, np.int16)  # background stays exactly 0, brain voxels are >= 1
        image[brain.box][brain.mask] = np.clip(np.rint(np.sqrt((clean + noise[0]) ** 2 + noise[1] ** 2)), 1, 32767)
        images[modality] = image
    return images, seg


# ---- files ----

def save_nifti(array, path, affine):
    """Write a NIfTI file like the BraTS ones (1 mm, scanner qform/sform), atomically and byte-reproducibly."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = MARK
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    data = image.to_bytes()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, compresslevel=1, mtime=0)  # mtime=0: the same bytes on every run
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden: no case finder sees it
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def case_paths(out_dir, name, compress=False, data_format="brats2020"):
    """{channel: path} of one case folder named as data_format names files, channels MODALITIES then "seg"."""
    extension = ".nii.gz" if compress else ".nii"
    return {c: Path(out_dir) / name / f"{name}{conventions.file_suffix(c, data_format)}{extension}"
            for c in (*MODALITIES, SEG_NAME)}


def _phantom_shape(path):
    """Shape of a phantom file this script wrote, else None (missing, unreadable or someone else's file)."""
    try:
        image = nib.load(path)
        return image.shape if image.header["descrip"] == MARK else None
    except Exception:
        return None


def write_case(out_dir, name, images, seg, compress=False, data_format="brats2020"):
    """Write out_dir/name/name_{flair,t1,t1ce,t2,seg}.nii[.gz] named as data_format (seg in its labels) -> the folder.
    Refuses to replace files it did not write: real BraTS cases have the same names."""
    paths = case_paths(out_dir, name, compress, data_format)
    for path in (*paths.values(), *case_paths(out_dir, name, not compress, data_format).values()):
        if path.exists() and _phantom_shape(path) is None:
            raise FileExistsError(f"{path}: not written by synthetic.py; refusing to overwrite it "
                                  "(choose another folder)")
    paths[SEG_NAME].parent.mkdir(parents=True, exist_ok=True)
    for channel, path in paths.items():
        save_nifti(seg if channel == SEG_NAME else images[channel], path, brats_affine(seg.shape))
        # A leftover copy with the other extension would make the case ambiguous.
        Path(str(path)[:-3] if compress else str(path) + ".gz").unlink(missing_ok=True)
    return paths[SEG_NAME].parent


def case_is_complete(out_dir, name, shape, compress=False, data_format="brats2020"):
    """True when all five phantom files of the case exist with the expected shape (they are written atomically)."""
    return all(_phantom_shape(p) == tuple(shape) for p in case_paths(out_dir, name, compress, data_format).values())


def generate_dataset(out_dir, n_cases, shape=FULL_SHAPE, seed=0, compress=False, progress=False,
                     data_format="brats2020"):
    """Write cases 1..n_cases (kinds from case_kind) into out_dir, skipping complete ones; returns their names.

    Case i depends only on (seed, i): adding cases or rerunning after an interruption changes no other case.
    data_format: the convention of the names and labels (the phantoms have no resection cavity)."""
    names = [conventions.CONVENTIONS[data_format].case_name.format(index) for index in range(1, n_cases + 1)]
    for index, name in enumerate(tqdm(names, desc="synthetic cases", disable=not progress), start=1):
        if not case_is_complete(out_dir, name, shape, compress, data_format):
            images, seg = generate_case(shape, seed=(seed, index), kind=case_kind(index))
            seg = conventions.internal_to_brats(conventions.brats_to_internal(seg), data_format)  # (X, Y, Z)
            write_case(out_dir, name, images, seg, compress, data_format)
    return names


# ---- picture and command line ----

def save_comparison_png(path=ROOT / "Images/synthetic_vs_real.png", real_case=SAMPLE_CASE, seed=0):
    """Axial slices through the largest tumor-core section of a full-size phantom (case 1 of `seed`) and of
    a real case: 4 modalities and the labels over FLAIR, 2 rows x 5 columns."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    real_case = Path(real_case)
    if not real_case.is_dir():
        raise FileNotFoundError(f"{real_case}: real BraTS case folder not found (needed for the comparison)")
    channels = (*MODALITIES, SEG_NAME)
    real = {c: np.asanyarray(nib.load(next(real_case.glob(f"*_{c}.nii*"))).dataobj) for c in channels}
    images, seg = generate_case(FULL_SHAPE, seed=(seed, 1), kind="tumor")
    rows = {f"phantom case 1, seed {seed}": {**images, SEG_NAME: seg}, f"real {real_case.name}": real}
    colours = np.array([[0, 0, 0, 0], [1, 0.2, 0.2, 0.6], [0.2, 0.9, 0.2, 0.45], [0, 0, 0, 0], [1, 0.9, 0, 0.6]])
    crop = np.s_[20:230, 35:225]  # (x, y) around the brain
    figure, axes = plt.subplots(2, 5, figsize=(20, 9.4), facecolor="black")
    for row, (title, volume) in zip(axes, rows.items()):
        z = int(np.argmax(np.isin(volume[SEG_NAME], (1, 4)).sum(axis=(0, 1))))
        for ax, channel in zip(row, channels):
            # Rows: y, front at the top; columns: x, the patient's right on the left (radiological view).
            gray = volume["flair" if channel == SEG_NAME else channel]
            ax.imshow(gray[crop + (z,)].T, cmap="gray", vmin=0, vmax=np.percentile(gray[gray != 0], 99.5))
            if channel == SEG_NAME:
                ax.imshow(colours[volume[SEG_NAME][crop + (z,)].T.astype(int)])
            ax.set_title("labels 1 red, 2 green, 4 yellow" if channel == SEG_NAME else f"{channel}, z = {z}", color="w")
            ax.axis("off")
        row[0].text(-0.04, 0.5, title, transform=row[0].transAxes, rotation=90, va="center", ha="right",
                    color="white", fontsize=12)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    figure.savefig(temporary, dpi=72, facecolor="black")
    plt.close(figure)
    os.replace(temporary, path)
    return path


def main():
    argv = sys.argv[1:]
    comparison = "--comparison" in argv
    if comparison:
        argv.remove("--comparison")
    hp = hyperparameters.from_command_line(argv)
    try:
        names = generate_dataset(hp.raw_data_dir, hp.synthetic_cases, hp.synthetic_shape, hp.seed,
                                 hp.synthetic_compress, progress=True, data_format=hp.data_format)
        print(f"{len(names)} phantom cases of shape {tuple(hp.synthetic_shape)} in {hp.raw_data_dir}")
        if comparison:
            print(f"wrote {save_comparison_png()}")
    except (FileExistsError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
