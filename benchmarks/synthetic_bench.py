"""Seconds per generated full-size case (240 x 240 x 155) of each style, median over cases; the anatomy style's parts.

    python benchmarks/synthetic_bench.py [cases]        (default 5 cases per style; kinds as in a dataset)
    OMP_NUM_THREADS=1 python benchmarks/synthetic_bench.py      (one core)

CPU seconds count every thread of this process; wall seconds are what a user waits (writing the files not
included: about 0.1 s per case as .nii, 1 s as .nii.gz). The anatomy style (its label maps in
../shared/data/anatomy/synthseg, else skipped) reads each map once per process (reported apart) and keeps it: its
cases are timed with the maps read.
"""
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bratsunet import anatomy, generator

MAPS = ROOT.parent / "shared/data/anatomy/synthseg"
# The anatomy style's parts: function name -> what it does
PARTS = {"sample_codes": "label map onto the grid: placement, deformation, push (nearest voxel)",
         "skull_strip": "skull strip, cut below the cerebellum",
         "tumor_fractions": "tumor compartments",
         "textured_signal": "intensities with texture",
         "partial_coverage": "partial coverage",
         "acquire": "scanner: blur, thick slices",
         "scan": "scanner: all (bias field, acquire, Rician noise)"}


def time_cases(style, cases, maps=None):
    """Median (CPU s, wall s) per case of `style`."""
    cpu, wall = [], []
    for index in range(1, cases + 1):
        start_cpu, start = time.process_time(), time.perf_counter()
        generator.generate_case(seed=(0, index), kind=generator.case_kind(index), style=style, label_maps=maps)
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    return np.median(cpu), np.median(wall)


def anatomy_parts(cases, maps):
    """{part: CPU s per case} of the anatomy style, from a profile of `cases` tumor cases."""
    profile = cProfile.Profile(time.process_time)  # CPU seconds, as the table
    profile.enable()
    for index in range(1, cases + 1):
        generator.generate_case(seed=(1, index), kind="tumor", style="anatomy", label_maps=maps)
    profile.disable()
    stats = pstats.Stats(profile).stats
    return {name: sum(entry[3] for (_, _, function), entry in stats.items() if function == name) / cases
            for name in PARTS}


def main():
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print("| style | cases | CPU s / case | wall s / case |\n| --- | --- | --- | --- |")
    for style in ("phantom", "randomized"):
        cpu, wall = time_cases(style, cases)
        print(f"| {style} | {cases} | {cpu:.2f} | {wall:.2f} |")
    if not MAPS.is_dir():
        print(f"(anatomy style skipped: no label maps in {MAPS})")
        return
    maps = anatomy.label_maps(MAPS)
    start = time.process_time()
    for path in maps:
        anatomy.load_map(str(path))
    reading = (time.process_time() - start) / len(maps)
    cpu, wall = time_cases("anatomy", cases, maps)
    print(f"| anatomy (maps read) | {cases} | {cpu:.2f} | {wall:.2f} |\n\nanatomy style, CPU s per tumor case:")
    print(f"  {reading:.2f}  reading a label map (once per map and process)")
    for name, seconds in anatomy_parts(cases, maps).items():
        print(f"  {seconds:.2f}  {PARTS[name]}")


if __name__ == "__main__":
    main()
