"""What each idea of the generator does for a model on a real scan: one table.

Each recipe generates its cases (generator.generate_dataset with STYLES["randomized"], some ranges changed or
switched off; "anatomy" > 0: STYLES["anatomy"] on the training label maps of ../shared/data/anatomy/synthseg), then
runs prepare_dataset.py, train.py, predict.py and evaluate.py with hyperparameters_synthetic.txt plus the recipe's
overrides, each as its own process, and reports
  - Dice WT / TC / ET on the real sample ../shared/data/brats_sample (predict.py + evaluate.py),
  - mean WT Dice on the generated validation split (anatomy recipes: ANATOMY_TEST full-size cases of the
    validation label maps, anatomy never trained on) and on 4 full-size phantom-style cases (never trained on),
    over the cases with a tumor (a healthy case scores 0 or 1),
  - the CPU seconds of training (user + sys, DataLoader workers included) and its wall-clock seconds.
The real case both chooses among the recipes and reports them: its numbers are optimistic (docs/synthetic-data.md).

    python benchmarks/synth_to_real.py                        # every recipe (many hours on 2 cores)
    python benchmarks/synth_to_real.py randomized no_hindbrain
    python benchmarks/synth_to_real.py --table                # the table of the recipes run so far
    python benchmarks/synth_to_real.py --comparison [STYLE]   # Images/synthetic_vs_real.png (default randomized)
    python benchmarks/synth_to_real.py --comparison anatomy   # Images/anatomy_vs_real.png: 2 anatomy cases
    python benchmarks/synth_to_real.py --ship runs/synth_to_real/anatomy_deep_wm/checkpoint_best.pt  # models/anatomy.pt

Outputs: data/synth_to_real/ (generated and prepared cases per style), runs/synth_to_real/RECIPE/ (run_dir,
predictions, evaluations, result.json). Seeds are fixed: a recipe run twice gives the same numbers on a CPU
with the same number of threads.
"""
import csv
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bratsunet import anatomy, generator, hyperparameters, phantom, pictures, synthesis
from bratsunet.conventions import brats_to_internal
from bratsunet.files import atomic_write

SETTINGS = ROOT / "hyperparameters_synthetic.txt"
SAMPLE = ROOT.parent / "shared/data/brats_sample/BraTS20_Training_TCGA-FG-6692"
DATA, RUNS = ROOT / "data/synth_to_real", ROOT / "runs/synth_to_real"
PHANTOM_TEST = 4  # full-size phantom-style cases, seed PHANTOM_SEED, that no recipe trains on
PHANTOM_SEED = 2024
ANATOMY = ROOT.parent / "shared/data/anatomy/synthseg"
ANATOMY_TEST = 8  # full-size cases of the validation label maps, seed PHANTOM_SEED
STEPS_2400 = ["epochs=8", "steps_per_epoch=300", "val_every=4"]

# name -> (what it tests, the style: "phantom" or changes to STYLES["randomized"] (with "anatomy": to
# STYLES["anatomy"]), settings overrides)
RECIPES = {
    "phantom": ("the demo's phantom style at full size", "phantom", []),
    "randomized": ("STYLES['randomized'] as shipped (hyperparameters_synthetic.txt)", {}, []),
    "no_hindbrain": ("randomized, an egg-shaped brain (no cerebellum, brainstem, temporal lobes)", {"hindbrain": 0}, []),
    "distractors": ("randomized, with enhancing vessels, FLAIR-bright spots and a skull-strip rim", {"distractors": 1.0}, []),
    "no_scanner": ("randomized, no thick slices, blur, noise or bias-field changes",
                   {"slice_mm": 0, "blur_mm": 0, "noise": 0, "bias": 0}, []),
    "no_contrast": ("randomized, the phantom's contrasts and texture", {"contrast": 0, "texture": 0}, []),
    "nnunet_augment": ("randomized, nnU-Net's augmentation (bratsunet/augmentation.py)", {}, ["augment=nnunet"]),
    "no_tumor_variety": ("randomized, tumors as in the phantoms (deep, no mass effect), no deformation",
                         {"spread": 0, "mass_effect": 0, "deform_mm": 0}, []),
    # the training side, at twice the steps of the rows above (or as many CPU seconds)
    "longer": ("randomized, 2400 steps", {}, ["epochs=8", "steps_per_epoch=300", "val_every=4"]),
    "wider": ("randomized, widths 16-128, as many CPU seconds as 'longer'", {},
              ["epochs=8", "steps_per_epoch=130", "val_every=4", "features=16,32,64,128"]),
    "patch64": ("randomized, 64^3 patches, as many CPU seconds as 'longer'", {},
                ["epochs=8", "steps_per_epoch=130", "val_every=4", "patch_size=64,64,64"]),
    "more_tumor_patches": ("randomized, 2400 steps, half the patches centred on tumor", {},
                           ["epochs=8", "steps_per_epoch=300", "val_every=4", "foreground_fraction=0.5"]),
    "more_cases": ("randomized, 2400 steps, 48 cases", {},
                   ["epochs=8", "steps_per_epoch=300", "val_every=4", "synthetic_cases=48"]),
    # real anatomy (bratsunet/anatomy.py): the label maps of real brains instead of the generator's own brain
    "anatomy": ("anatomy style: SynthSeg's training label maps (15 of 20), 24 cases, 1200 steps", {"anatomy": 0.1}, []),
    "anatomy_2400": ("anatomy, 2400 steps", {"anatomy": 0.1}, STEPS_2400),
    "anatomy_dura": ("anatomy, 2400 steps: falx and tentorium bright on T1ce, hippocampus and amygdala FLAIR-bright, "
                     "a quarter of the scans miss up to 20 mm of the brain's top or bottom", {"anatomy": 0.1},
                     STEPS_2400),
    "anatomy_deep_wm": ("anatomy_dura, tumors start 4-6 mm or more inside white matter (more edema around the core)",
                        {"anatomy": 0.1}, STEPS_2400),
    "anatomy_4800": ("anatomy_deep_wm, 4800 steps", {"anatomy": 0.1},
                     ["epochs=16", "steps_per_epoch=300", "val_every=4"]),
    "anatomy_faint_edema": ("anatomy_deep_wm, edema fainter: its contrast to white matter scaled by 0.5-1",
                            {"anatomy": 0.1, "faint_edema": 0.5}, STEPS_2400),
    "anatomy_no_coverage": ("anatomy, 2400 steps, every scan covers the whole brain", {"anatomy": 0.1, "coverage": 0},
                            STEPS_2400),
}


def style_ranges(style):
    """"phantom", or a recipe's changes to STYLES["randomized"] (with "anatomy": to STYLES["anatomy"]) -> the full
    dict of ranges."""
    if style == "phantom":
        return synthesis.STYLES["phantom"]
    return {**synthesis.STYLES["anatomy" if style.get("anatomy") else "randomized"], **style}


def style_folder(style):
    """data/synth_to_real/<phantom | randomized | anatomy>-<hash of the generator and the ranges>: a folder of cases
    per style."""
    ranges = style_ranges(style)
    kind = "phantom" if style == "phantom" else "anatomy" if ranges["anatomy"] else "randomized"
    code = b"".join(Path(module.__file__).read_bytes() for module in (generator, synthesis, phantom, anatomy))
    digest = hashlib.sha1(code + json.dumps(ranges, sort_keys=True).encode()).hexdigest()[:8]
    return DATA / f"{kind}-{digest}"


def generate(folder, n_cases, shape, seed, compress, style, split="training"):
    """generator.generate_dataset of a recipe's style; anatomy styles on the `split` label maps of ANATOMY."""
    ranges = style_ranges(style)
    maps = anatomy.label_maps(ANATOMY, split) if ranges["anatomy"] else None
    generator.generate_dataset(folder, n_cases, shape, seed, compress,
                               style="phantom" if style == "phantom" else ranges, label_maps=maps)


def run(command, log):
    """Run a project script; returns (CPU seconds of it and its children, wall seconds). Output goes to log."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as file:
        subprocess.run([sys.executable, *command], cwd=ROOT, stdout=file, stderr=subprocess.STDOUT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return cpu, time.perf_counter() - start


def mean_dice(evaluation_csv):
    """{region: mean Dice} of an evaluation.csv that evaluate.py wrote."""
    with open(evaluation_csv) as file:
        rows = list(csv.DictReader(file))
    rows = [row for row in rows if float(row["volume_true_WT"]) > 0] or rows  # healthy cases score 0 or 1
    return {region: float(np.mean([float(row[f"dice_{region}"]) for row in rows])) for region in ("WT", "TC", "ET")}


def phantom_test_cases():
    folder = DATA / "phantom_test"
    generator.generate_dataset(folder, PHANTOM_TEST, generator.FULL_SHAPE, PHANTOM_SEED, compress=True)
    return folder


def run_recipe(name):
    _, style, overrides = RECIPES[name]
    out = RUNS / name
    out.mkdir(parents=True, exist_ok=True)
    cases = style_folder(style)
    settings = ["--hp", str(SETTINGS), f"raw_data_dir={cases / 'raw'}", f"prepared_dir={cases / 'prepared'}",
                f"run_dir={out}", *overrides]
    if style_ranges(style)["anatomy"]:  # what the checkpoint's settings record
        settings += ["synthetic_style=anatomy", f"anatomy_dir={ANATOMY}"]
    hp = hyperparameters.load(SETTINGS, settings[2:])
    print(f"{name}: generating {hp.synthetic_cases} cases into {cases / 'raw'}", flush=True)
    generate(cases / "raw", hp.synthetic_cases, hp.synthetic_shape, hp.seed, hp.synthetic_compress, style)
    run(["prepare_dataset.py", *settings], out / "prepare.log")
    print(f"{name}: training (log: {out / 'train.log'})", flush=True)
    cpu, wall = run(["train.py", *settings, "overwrite=True"], out / "train.log")  # a rerun starts over
    real = DATA / "real"  # a folder holding only the real case (its neighbour reference_segmentations/ is no case)
    real.mkdir(parents=True, exist_ok=True)
    if not (real / SAMPLE.name).exists():
        (real / SAMPLE.name).symlink_to(SAMPLE)
    scores = {}
    tests = {"real": [f"predict_input_dir={real}"], "generated": []}
    if style_ranges(style)["anatomy"]:  # the generated validation: anatomy no model trained on
        held_out = cases.parent / f"{cases.name}-validation"
        generate(held_out, ANATOMY_TEST, generator.FULL_SHAPE, PHANTOM_SEED, True, style, "validation")
        tests["generated"] = [f"predict_input_dir={held_out}", f"raw_data_dir={held_out}"]
    phantoms = phantom_test_cases()  # their names are those of the training cases: their own raw_data_dir
    tests["phantoms"] = [f"predict_input_dir={phantoms}", f"raw_data_dir={phantoms}"]
    for test, inputs in tests.items():
        test_settings = [*settings, f"prediction_dir={out / test}", "overwrite=True", *inputs]
        run(["predict.py", *test_settings], out / f"predict_{test}.log")
        run(["evaluate.py", *test_settings], out / f"evaluate_{test}.log")
        scores[test] = mean_dice(out / test / "evaluation.csv")  # evaluate.py writes it beside the predictions
    result = {"recipe": name, "what": RECIPES[name][0], "real": scores["real"], "generated_WT": scores["generated"]["WT"],
              "phantoms_WT": scores["phantoms"]["WT"], "train_cpu_s": cpu, "train_wall_s": wall,
              "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def save_comparison_png(path=ROOT / "Images/synthetic_vs_real.png", real_case=SAMPLE, seed=0, style="randomized",
                        cases=1):
    """Axial slices through the largest tumor-core section of full-size generated cases (cases 1.. `cases` of
    `seed`; anatomy: on the training label maps) and of a real case: 4 modalities and the labels over FLAIR in the
    colours of every picture, a row each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    from matplotlib.patches import Patch
    real_case = Path(real_case)
    if not real_case.is_dir():
        raise FileNotFoundError(f"{real_case}: real BraTS case folder not found (needed for the comparison)")
    channels = (*generator.MODALITIES, "seg")
    real = {c: np.asanyarray(nib.load(next(real_case.glob(f"*_{c}.nii*"))).dataobj) for c in channels}
    maps = anatomy.label_maps(ANATOMY) if synthesis.style_ranges(style)["anatomy"] else None
    rows = {}
    for index in range(1, cases + 1):
        images, seg = generator.generate_case(generator.FULL_SHAPE, (seed, index), "tumor", style, maps)
        rows[f"{generator.style_name(style).decode() or 'phantom'} case {index}, seed {seed}"] = {**images, "seg": seg}
    rows[f"real {real_case.name}"] = real
    colours = np.zeros((5, 4))  # RGBA per internal label: the pictures' colours at their opacity, background clear
    for label, colour in pictures.LABEL_COLORS.items():
        colours[label] = (*colour, pictures.ALPHA)
    crop = np.s_[20:230, 35:225]  # (x, y) around the brain
    figure, axes = plt.subplots(len(rows), 5, figsize=(12, 3.1 * len(rows)), facecolor="black")
    for row, (title, volume) in zip(axes, rows.items()):
        z = int(np.argmax(np.isin(volume["seg"], (1, 4)).sum(axis=(0, 1))))
        for ax, channel in zip(row, channels):
            # Rows: y, front at the top; columns: x, the patient's right on the left (radiological view).
            gray = volume["flair" if channel == "seg" else channel]
            ax.imshow(gray[crop + (z,)].T, cmap="gray", vmin=0, vmax=np.percentile(gray[gray != 0], 99.5))
            if channel == "seg":
                ax.imshow(colours[brats_to_internal(volume["seg"][crop + (z,)]).T])
            ax.set_title("labels over flair" if channel == "seg" else f"{channel}, z = {z}", color="w", fontsize=9)
            ax.axis("off")
        row[0].text(-0.04, 0.5, title, transform=row[0].transAxes, rotation=90, va="center", ha="right",
                    color="white", fontsize=9)
    key = pictures.label_key([brats_to_internal(volume["seg"]) for volume in rows.values()])
    figure.legend(handles=[Patch(facecolor=colour, label=name) for name, colour in key], loc="lower center",
                  ncol=len(key), frameon=False, labelcolor="white", fontsize=9)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=pictures.DPI, facecolor="black"))
    plt.close(figure)
    return path


def print_table():
    print("| recipe | what | WT real | TC real | ET real | WT generated | WT phantoms | train CPU s | train wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in RECIPES:
        path = RUNS / name / "result.json"
        if path.is_file():
            r = json.loads(path.read_text())
            print(f"| {name} | {r['what']} | {r['real']['WT']:.3f} | {r['real']['TC']:.3f} | {r['real']['ET']:.3f} "
                  f"| {r['generated_WT']:.3f} | {r['phantoms_WT']:.3f} | {r['train_cpu_s']:.0f} | {r['train_wall_s']:.0f} |")


def ship(source, target=ROOT / "models/anatomy.pt"):
    """A trained checkpoint as the shipped model: what predicting needs (the network, its settings, its epoch and
    metrics), not what only resuming needs (optimizer, scheduler, loss scaler, random states); the folders of the
    machine it trained on replaced by hyperparameters_anatomy.txt's; its cases named generated/NAME, so that no
    real BraTS case of the same name counts as trained on."""
    import torch
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    folders = hyperparameters.load(ROOT / "hyperparameters_anatomy.txt")
    settings = {**checkpoint["hyperparameters"], **{key: os.path.relpath(getattr(folders, key), ROOT) for key in (
        "raw_data_dir", "prepared_dir", "run_dir", "prediction_dir", "anatomy_dir")}}
    split = {**checkpoint["split"], **{part: [f"generated/{name}" for name in checkpoint["split"][part]]
                                       for part in ("train", "val")}}
    kept = {key: checkpoint[key] for key in ("model_args", "model", "epoch", "best_score", "metrics", "world_size")}
    atomic_write(Path(target), lambda tmp: torch.save({**kept, "hyperparameters": settings, "split": split}, tmp))
    return target


def main():
    names = sys.argv[1:] or list(RECIPES)
    if names[0] == "--ship":
        print(f"wrote {ship(names[1])}")
        return
    if names[0] == "--comparison":
        style = names[1] if len(names) > 1 else "randomized"
        path, cases = (ROOT / "Images/anatomy_vs_real.png", 2) if style == "anatomy" else \
            (ROOT / "Images/synthetic_vs_real.png", 1)
        try:
            print(f"wrote {save_comparison_png(path, style=style, cases=cases)}")
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        return
    if names != ["--table"]:
        unknown = [name for name in names if name not in RECIPES]
        if unknown:
            raise SystemExit(f"error: unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
        if not SAMPLE.is_dir():
            raise SystemExit(f"error: {SAMPLE}: the real sample case is needed")
        for name in names:
            run_recipe(name)
    print_table()


if __name__ == "__main__":
    main()
