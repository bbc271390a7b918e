"""Our BraTS 2020 metrics next to the official lesion-wise package on the real sample, with the time each takes.

    .venv/bin/python benchmarks/lesion_wise_bench.py      (needs ../shared/data/brats_sample and brats-evaluation)

Each of the five algorithms' segmentations in reference_segmentations/ is scored against the sample's fused
segmentation, full grid (240 x 240 x 155): Dice and HD95 of WT, TC and ET from evaluation.evaluate_pair (ours)
and the package's global Dice and HD95 (evaluation.lesion_wise_metrics, configuration gli), seconds per case.
"""
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bratsunet import evaluation

SAMPLE = ROOT.parent / "shared/data/brats_sample"


def main():
    truth = next((SAMPLE / "BraTS20_Training_TCGA-FG-6692").glob("*_seg.nii.gz"))
    print("| segmentation | region | Dice ours | Dice package (global) | HD95 ours (mm) | HD95 package (global, mm) "
          "| s/case ours | s/case package |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for pred in sorted((SAMPLE / "reference_segmentations").glob("*.nii.gz")):
        start = time.perf_counter()
        ours = evaluation.evaluate_pair(pred, truth)
        middle = time.perf_counter()
        official = evaluation.lesion_wise_metrics({"case": (pred, truth)}, [], "gli")["case"]
        end = time.perf_counter()
        name = pred.name.split("_")[-1][:-len(".nii.gz")]
        for region in ("WT", "TC", "ET"):
            key = region.lower()
            print(f"| {name} | {region} | {ours[region]['dice']:.4f} | {official[f'global_dsc_{key}']:.4f} | "
                  f"{ours[region]['hd95']:.2f} | {official[f'global_hd95_{key}']:.2f} | {middle - start:.2f} | "
                  f"{end - middle:.2f} |")


if __name__ == "__main__":
    main()
