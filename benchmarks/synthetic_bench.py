"""Seconds per generated full-size case (240 x 240 x 155), phantom and randomized style, median over cases.

    python benchmarks/synthetic_bench.py [cases]        (default 5 cases per style; kinds as in a dataset)

CPU seconds count every thread of this process; wall seconds are what a user waits (writing the files not
included: about 0.1 s per case as .nii, 1 s as .nii.gz).
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bratsunet import generator


def main():
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print("| style | cases | CPU s / case | wall s / case |\n| --- | --- | --- | --- |")
    for style in ("phantom", "randomized"):
        cpu, wall = [], []
        for index in range(1, cases + 1):
            start_cpu, start = time.process_time(), time.perf_counter()
            generator.generate_case(seed=(0, index), kind=generator.case_kind(index), style=style)
            cpu.append(time.process_time() - start_cpu)
            wall.append(time.perf_counter() - start)
        print(f"| {style} | {cases} | {np.median(cpu):.2f} | {np.median(wall):.2f} |")


if __name__ == "__main__":
    main()
