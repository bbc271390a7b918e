"""The cost of reading a compressed NIfTI file to its end (gzip's CRC checked) against nibabel alone, which stops
where the voxels end. On the real sample case (five .nii.gz files, 240 x 240 x 155), or generated files of the
same size when it is absent.

    python benchmarks/nifti_read_bench.py [repeats]
"""
import gzip
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bratsunet import generator  # noqa: E402
from bratsunet.cases import load_nifti  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats_sample" / "BraTS20_Training_TCGA-FG-6692"


def nibabel_alone(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def decompressed_twice(path):  # nibabel, then the whole stream again for the CRC
    array = nibabel_alone(path)
    with gzip.open(path) as file:
        while file.read(2 ** 24):
            pass
    return array


def ours(path):
    return load_nifti(path)[0]


def measure(read, paths, repeats):
    """(median CPU seconds (user + sys), median wall seconds, peak traced MB) of reading every path once."""
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        for path in paths:
            read(path)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    tracemalloc.start()
    for path in paths:
        read(path)
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return statistics.median(cpu), statistics.median(wall), peak


def main(repeats=7):
    with tempfile.TemporaryDirectory() as tmp:
        if SAMPLE.is_dir():
            paths, what = sorted(SAMPLE.glob("*.nii.gz")), f"the real sample case {SAMPLE.name}"
        else:
            generator.generate_dataset(Path(tmp), n_cases=1, shape=(240, 240, 155), seed=0)
            paths = []
            for path in sorted(Path(tmp).rglob("*.nii")):
                paths.append(path.with_name(path.name + ".gz"))
                paths[-1].write_bytes(gzip.compress(path.read_bytes()))
            what = "a generated 240 x 240 x 155 case"
        size = sum(path.stat().st_size for path in paths) / 2 ** 20
        print(f"{len(paths)} .nii.gz files of {what}, {size:.1f} MB compressed; median of {repeats} runs\n")
        print("| reading | CPU s (user + sys) | wall s | peak traced MB |\n| --- | --- | --- | --- |")
        results = {}
        for name, read in (("nibabel alone (no CRC check)", nibabel_alone), ("nibabel, then gzip to the end (twice)",
                                                                              decompressed_twice),
                           ("load_nifti: once, to the end (CRC checked)", ours)):
            results[name] = measure(read, paths, repeats)
            print(f"| {name} | {results[name][0]:.3f} | {results[name][1]:.3f} | {results[name][2]:.0f} |")
        (base, *_), (twice, *_), (checked, *_) = results.values()
        print(f"\nCPU time against nibabel alone: {100 * (twice / base - 1):+.0f}% decompressing twice, "
              f"{100 * (checked / base - 1):+.0f}% load_nifti")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:]))
