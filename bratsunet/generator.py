"""Generate BraTS-format cases: the project's embedded default data, written as a BraTS dataset.

A skull-stripped brain with a lumpy tumor (necrotic core 1 in an enhancing rim 4 in edema 2), real scans' contrasts,
a bias field and Rician noise, in one of three styles (synthetic_style): "phantom" (the demo) keeps anatomy,
contrasts and scanner alike in every case and "randomized" draws them from STYLES' ranges (phantom.py: a brain drawn
from shapes); "anatomy" builds the brain from the label maps of real brains (anatomy.py, anatomy_dir). What the
styles share is in synthesis.py. Files as data_format lays them out (BraTS 2020: int16, uint8 labels, 1 mm, its
affine).

    python synthetic.py     # hp.synthetic_cases cases of hp.synthetic_shape into hp.raw_data_dir
"""
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from bratsunet import anatomy, conventions, phantom
from bratsunet.console import progress_bar
from bratsunet.files import atomic_write
from bratsunet.synthesis import FULL_SHAPE, MODALITIES, style_ranges

SEG_NAME = "seg"
MARK = b"BraTS-format phantom from synthetic.py"  # in each file's header: never overwrite files without it


def case_kind(index):
    """Kind of case number `index`: any 10 consecutive numbers (and cases 1-6) hold each kind, most "tumor"."""
    return {3: "healthy", 5: "no_enhancing"}.get(index % 10, "tumor")


def brats_affine(shape):
    """The BraTS 2020 orientation: x and y flipped, 1 mm voxels, y offset to the last row (as in real files)."""
    return np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, shape[1] - 1], [0, 0, 1.0, 0], [0, 0, 0, 1]])


def generate_case(shape=FULL_SHAPE, seed=0, kind="tumor", style="phantom", label_maps=None):
    """({modality: int16 (X, Y, Z)}, seg uint8 (X, Y, Z) labels 0/1/2/4); the same arguments, the same arrays.
    label_maps: the label map files that the anatomy style draws each case's brain from (anatomy.label_maps)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"case shape {shape}: expected 3 sizes of at least 16 voxels")
    if kind not in ("tumor", "no_enhancing", "healthy"):
        raise ValueError(f"unknown case kind {kind!r}: expected tumor, no_enhancing or healthy")
    ranges = style_ranges(style)
    if ranges["anatomy"]:
        return anatomy.generate_case(shape, seed, kind, ranges, label_maps)
    return phantom.generate_case(shape, seed, kind, ranges)


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
                     data_format="brats2020", style="phantom", label_maps=None):
    """Cases 1..n_cases into out_dir (complete ones skipped) -> names; case i depends only on (seed, i, style) (and
    label_maps, the anatomy style's maps)."""
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
            images, seg = generate_case(shape, (seed, index), case_kind(index), style, label_maps)
            seg = conventions.internal_to_brats(conventions.brats_to_internal(seg), data_format)  # (X, Y, Z)
            write_case(out_dir, name, images, seg, compress, data_format, mark)
    return names
