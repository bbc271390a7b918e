"""The effect of nnU-Net's augmentation, measured: the same training on generated phantoms with `augment: light`
and with `augment: nnunet` (same seed, steps and network), each scored by predict.py + evaluate.py on
generated test phantoms (another seed, never trained on) and on the real BraTS sample case.
    python benchmarks/augment_effect.py [work_dir [mode]]   (mode light or nnunet: only that run; default both)
"""
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate
import predict
import prepare_dataset
import train
from bratsunet import generator, hyperparameters
from bratsunet.conventions import REGION_NAMES

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats_sample" / "BraTS20_Training_TCGA-FG-6692"
SHAPE = (128, 128, 80)  # the phantoms' full-size head in 1.9 mm voxels: the real sample's brain looks 1.9x larger
SETTINGS = {"synthetic_cases": 32, "synthetic_shape": SHAPE, "val_fraction": 0.15, "patch_size": (48, 48, 48),
            "epochs": 20, "steps_per_epoch": 50, "val_every": 5, "num_workers": 2, "seed": 42}


def scores(hp, input_dir, name):
    """Mean Dice and HD95 per region of hp's last checkpoint (both runs the same steps) on the cases of input_dir."""
    hp = hp.replace(predict_input_dir=input_dir, raw_data_dir=input_dir, overwrite=True,
                    prediction_dir=hp.run_dir / f"predictions_{name}", checkpoint=hp.run_dir / "checkpoint_last.pt")
    predict.predict(hp)
    rows = evaluate.evaluate(hp)  # evaluation.csv beside the predictions_{name}
    return {f"{metric}_{region}": float(np.mean([row[f"{metric}_{region}"] for row in rows]))
            for metric in ("dice", "hd95") for region in REGION_NAMES}, len(rows)


def main(work, modes=("light", "nnunet")):
    work = Path(work)
    hp = hyperparameters.load(overrides={**SETTINGS, "raw_data_dir": work / "raw", "prepared_dir": work / "prepared"})
    generator.generate_dataset(hp.raw_data_dir, hp.synthetic_cases, SHAPE, hp.seed, progress=True)
    generator.generate_dataset(work / "test", 8, SHAPE, seed=1000, progress=True)  # never trained or selected on
    prepare_dataset.prepare_dataset(hp)
    real = work / "real"
    real.mkdir(exist_ok=True)
    if SAMPLE.is_dir() and not (real / SAMPLE.name).exists():
        (real / SAMPLE.name).symlink_to(SAMPLE)
    results = {}
    for mode in modes:
        run = hp.replace(augment=mode, run_dir=work / f"run_{mode}")
        if not (run.run_dir / "checkpoint_last.pt").is_file():
            train.train(run)
        results[mode, "generated test phantoms"] = scores(run, work / "test", "test")
        if SAMPLE.is_dir():
            results[mode, "real sample"] = scores(run, real, "real")
    print(f"\n{SETTINGS['epochs']} epochs x {SETTINGS['steps_per_epoch']} steps, "
          f"patch {SETTINGS['patch_size'][0]}^3, batch 2, "
          f"{SETTINGS['synthetic_cases']} phantoms of {SHAPE}; mean over the cases\n")
    print("| augment | evaluated on | cases | Dice WT | Dice TC | Dice ET | HD95 WT | HD95 TC | HD95 ET |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (mode, data), (values, cases) in results.items():
        print(f"| {mode} | {data} | {cases} | " + " | ".join(f"{values[f'dice_{r}']:.3f}" for r in REGION_NAMES)
              + " | " + " | ".join(f"{values[f'hd95_{r}']:.1f}" for r in REGION_NAMES) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1], sys.argv[2:] or ("light", "nnunet"))
    else:
        with tempfile.TemporaryDirectory() as folder:
            main(folder)
