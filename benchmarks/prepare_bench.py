"""Prepare full-size generated .nii cases two ways and print a comparison table.

ours:  prepare_dataset.prepare_case (int16 read, crop to the brain, z-score, float16 + uint8 .npy)
naive: nibabel get_fdata (float64), no crop, float64 .npy for images and labels

Each approach runs in its own process, so its peak memory (max RSS) is its own.
    python benchmarks/prepare_bench.py [n_cases]
"""
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare_dataset
from bratsunet.cases import find_cases
from bratsunet import generator, hyperparameters


def prepare_naive(case, out_dir):
    images = np.stack([nib.load(str(p)).get_fdata() for p in case.image_paths])
    np.save(out_dir / f"{case.name}.npy", images)
    np.save(out_dir / f"{case.name}_seg.npy", nib.load(str(case.seg_path)).get_fdata())


def prepare_ours(case, out_dir):
    hp = hyperparameters.load()
    settings = prepare_dataset._settings(hp.replace(bg_threshold=1.0))
    prepare_dataset.prepare_case(case, settings, out_dir)


def run_approach(name, raw_dir, out_dir):
    """Child process: prepare every case, print seconds per case, peak RSS and bytes written."""
    cases, _ = find_cases(raw_dir, ("flair", "t1", "t1ce", "t2"), "seg")
    prepare = {"ours": prepare_ours, "naive": prepare_naive}[name]
    start = time.perf_counter()
    for case in cases:
        prepare(case, Path(out_dir))
    seconds = (time.perf_counter() - start) / len(cases)
    written = sum(p.stat().st_size for p in Path(out_dir).glob("*.npy"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds_per_case": seconds, "peak_mb": peak_mb, "bytes_written": written}))


def main(n_cases=4):
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        generator.generate_dataset(raw, n_cases=n_cases, shape=(240, 240, 155), seed=0)
        # healthy cases have nothing to crop around tumor-wise but are prepared the same way
        raw_bytes = sum(p.stat().st_size for p in raw.rglob("*.nii"))
        results = {}
        for name in ("naive", "ours"):
            out = Path(tmp) / name
            out.mkdir()
            child = subprocess.run([sys.executable, __file__, "--child", name, str(raw), str(out)],
                                   check=True, capture_output=True, text=True)
            results[name] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"{n_cases} generated cases of 240x240x155 (.nii, int16), {raw_bytes / 1e6:.0f} MB raw, one process\n")
    print("| approach | s/case | peak memory (MB) | written (MB) | written / raw |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['seconds_per_case']:.2f} | {r['peak_mb']:.0f} | {r['bytes_written'] / 1e6:.0f} "
              f"| {r['bytes_written'] / raw_bytes:.0%} |")
    speedup = results["naive"]["seconds_per_case"] / results["ours"]["seconds_per_case"]
    print(f"\nours is {speedup:.1f}x faster per case than naive")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_approach(*sys.argv[2:5])
    else:
        main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
