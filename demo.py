"""The main job on generated data: generate -> prepare -> train -> predict -> evaluate -> render.

    python demo.py                 (or `make demo`; any key=value override works, e.g. epochs=4)

Everything lands in the folders of hyperparameters.txt (data/, runs/demo/); the render is a PNG in
run_dir so that the demo never waits on a window.
"""
import time

import numpy as np

from bratsunet import anatomy, generator, settings_text
from bratsunet.cases import CaseError
from bratsunet.conventions import REGION_NAMES

import evaluate
import predict
import prepare_dataset
import rendering
import train


# What run_demo() reads: keys, and groups of hyperparameters.txt for all their keys (--help lists them).
SETTINGS = ("data", "generated data", "model", "loss", "training", "inference", "evaluation", "rendering")


def run_demo(hp):
    """Run every step on hp's generated data; returns {step: seconds} and the evaluation rows."""
    seconds = {}

    def timed(step, work):
        print(f"\n==== {step} ====")
        start = time.perf_counter()
        result = work()
        seconds[step] = time.perf_counter() - start
        return result

    maps = anatomy.label_maps(hp.anatomy_dir) if hp.synthetic_style == "anatomy" else None
    timed("generate", lambda: generator.generate_dataset(hp.raw_data_dir, hp.synthetic_cases, hp.synthetic_shape,
                                                         hp.seed, hp.synthetic_compress, True, hp.data_format,
                                                         hp.synthetic_style, maps))
    timed("prepare", lambda: prepare_dataset.prepare_dataset(hp))
    timed("train", lambda: train.train(hp.replace(overwrite=True)))  # a demo run starts over (or resume=True)
    # a new training run makes earlier predictions stale
    timed("predict", lambda: predict.predict(hp.replace(overwrite=True)))
    rows = timed("evaluate", lambda: evaluate.evaluate(hp))
    render_to = hp.render_output or hp.run_dir / "render.png"
    timed("render", lambda: rendering.render(hp.replace(render_output=render_to)))
    return seconds, rows


def print_report(seconds, rows):
    print("\n==== demo summary ====")
    print("| step | seconds |\n| --- | --- |")
    for step, value in seconds.items():
        print(f"| {step} | {value:.0f} |")
    print(f"| total | {sum(seconds.values()):.0f} |")
    dice = {r: np.mean([row[f"dice_{r}"] for row in rows]) for r in REGION_NAMES}
    print(f"\ntest Dice over the {len(rows)} generated cases of the test split, never trained, selected or tuned on "
          "(predict.py + evaluate.py, full grid): " + ", ".join(f"{r} {d:.3f}" for r, d in dice.items()))


def main():
    hp = settings_text.from_command_line(__doc__, SETTINGS)
    try:
        seconds, rows = run_demo(hp)
    except (CaseError, OSError, ValueError) as error:  # a bad setting (a device it lacks), a full disk: one line
        raise SystemExit(f"error: {error}") from None
    print_report(seconds, rows)


if __name__ == "__main__":
    main()
