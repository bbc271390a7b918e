"""Whole-volume inference of one full-size case: predict.py against MONAI's sliding_window_inference and
against ONNX Runtime running export.py's model.onnx through the same sliding window, and float32 against
our default precision. Prints a markdown table.

    python benchmarks/predict_bench.py [key=value ...]      # e.g. device=cuda features=32,64,128,256

Both paths get the same network and weights (hyperparameters.txt's model, seeded and untrained: speed and
agreement do not depend on training), the same window (patch_size), overlap (sw_overlap), windows per
batch (sw_batch_size) and Gaussian blending (MONAI's sigma_scale 0.125 is our sigma = window / 8), and
return probabilities. Timed: the sliding-window inference of the cropped, normalized volume, after a
warm-up, best of REPEATS runs (single runs vary by 10% on a busy CPU); then our whole
predict.py path for the case (read the NIfTI files, preprocess, infer, write the label map). The case
is the real sample when ../shared/data/brats_sample is there, else a generated full-size case. The ONNX
row needs requirements-onnx.txt (make bench installs it); ONNX Runtime picks its own number of threads.
"""
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bratsunet.cases import find_cases, load_case
from bratsunet import checkpoints, devices, generator, hyperparameters, inference, losses, network, preprocessing
import export  # noqa: E402

REPEATS = 3
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats_sample"


def find_case(hp, tmp):
    """The real sample case, or a generated full-size one written to tmp."""
    if SAMPLE_DIR.is_dir():
        cases, _ = find_cases(SAMPLE_DIR, hp.channel_names, hp.seg_channel_name)
        if cases:
            return cases[0], "real BraTS sample"
    images, seg = generator.generate_case(generator.FULL_SHAPE, seed=0)
    generator.write_case(tmp, "BraTS20_Training_001", images, seg, compress=True)
    return find_cases(tmp, hp.channel_names, hp.seg_channel_name)[0][0], "generated case"


def best_time(run, device):
    """(seconds of the fastest of REPEATS runs, the last output)."""
    times = []
    for _ in range(REPEATS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        output = run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), output


def monai_inference(net, image, hp, device):
    """MONAI's sliding_window_inference on the same volume, under the autocast that hp.precision selects."""
    from monai.inferers import sliding_window_inference
    dtype, _, channels_last = devices.run_settings(hp.precision, hp.channels_last, device)

    def predictor(windows):  # (B, C, wx, wy, wz) -> probabilities (B, C_out, wx, wy, wz)
        if channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return losses.logits_to_probabilities(net(windows).float(), hp.target)

    with torch.no_grad():
        return sliding_window_inference(image[None], hp.patch_size, hp.sw_batch_size, predictor, hp.sw_overlap,
                                        mode="gaussian", sigma_scale=0.125)[0]


def onnx_row(checkpoint, volume, hp, device, reference):
    """ONNX Runtime on the exported checkpoint, through inference.predict_case (float32, on the CPU)."""
    export.export_checkpoint(checkpoint, checkpoint.with_suffix(".onnx"))
    predictor, _ = checkpoints.onnx_predictor(checkpoint.with_suffix(".onnx"), device)
    volume = volume.cpu()
    inference.predict_case(predictor, volume[:, :hp.patch_size[0], :hp.patch_size[1], :hp.patch_size[2]], hp, hp.target)
    seconds, output = best_time(lambda: inference.predict_case(predictor, volume, hp, hp.target), device)
    return ("ONNX Runtime: export.py's model through inference.predict_case", "fp32", False, seconds,
            (output.float() - reference.cpu()).abs().max().item())


def main():
    hp = hyperparameters.from_command_line()
    device = devices.resolve_device(hp.device)
    dtype, _ = devices.autocast_settings("auto", device.type, devices.bf16_supported(device))
    default = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]
    with tempfile.TemporaryDirectory() as tmp:
        case, source = find_case(hp, Path(tmp))
        image, _, _ = load_case(case)
        normalized, box = preprocessing.preprocess(image, hp.crop_margin)
        volume = torch.from_numpy(normalized).to(device)  # (C, x, y, z)
        torch.manual_seed(hp.seed)
        net = network.build_model(hp).to(device).eval()
        print(f"{source} {case.name}: crop {tuple(volume.shape[1:])} of {image.shape[1:]}, {device}, "
              f"{torch.get_num_threads()} CPU threads, model {list(hp.features)}, window {hp.patch_size}, "
              f"overlap {hp.sw_overlap}, {hp.sw_batch_size} windows per batch")
        devices.use_device(device)  # as predict.py: cuDNN times its kernels once for the one window size

        checkpoint = Path(tmp) / "checkpoint.pt"
        checkpoints.save_checkpoint({"model_args": network.model_args(hp), "model": net.state_dict(),
                               "hyperparameters": hp.to_dict()}, checkpoint)
        rows, reference = [], None
        for precision in ("fp32", default):
            # float32 plain; the default with hyperparameters.txt's memory format, for both paths alike
            layout = hp.channels_last if precision == default else False
            settings = hp.replace(precision=precision, channels_last=layout)
            channels_last = devices.run_settings(precision, settings.channels_last, device)[2]
            net = net.to(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
            corner = volume[:, :hp.patch_size[0], :hp.patch_size[1], :hp.patch_size[2]]
            inference.predict_case(net, corner, settings, hp.target)  # warm-up: kernels chosen for this precision
            runs = (("ours: inference.predict_case", lambda: inference.predict_case(net, volume, settings, hp.target)),
                    ("MONAI sliding_window_inference", lambda: monai_inference(net, volume, settings, device)))
            for path, run in runs:
                seconds, output = best_time(run, device)
                reference = output if reference is None else reference  # ours in float32
                rows.append((path, precision, channels_last, seconds,
                             (output.float() - reference).abs().max().item()))
            if precision == "fp32":
                rows.append(onnx_row(checkpoint, volume, settings, device, reference))

        whole = hp.replace(checkpoint=checkpoint, prediction_dir=Path(tmp) / "predictions", overwrite=True)
        seconds, _ = best_time(lambda: inference.predict_cases(whole, [case]), device)
        rows.append(("ours: whole case (read, preprocess, infer, write)", default, channels_last, seconds, None))

    print("\n| path | precision | channels_last | seconds | max abs probability difference vs ours fp32 |\n|---|---|---|---|---|")
    for path, precision, channels_last, seconds, difference in rows:
        print(f"| {path} | {precision} | {channels_last} | {seconds:.2f} | {'' if difference is None else f'{difference:.2e}'} |")
    ours_fp32, monai_fp32, onnx_fp32, ours_default, monai_default = (row[3] for row in rows[:5])
    print(f"\nMONAI / ours: {monai_fp32 / ours_fp32:.2f}x in fp32, {monai_default / ours_default:.2f}x in {default}; "
          f"ONNX Runtime / ours in fp32: {onnx_fp32 / ours_fp32:.2f}x; ours fp32 / {default}: "
          f"{ours_fp32 / ours_default:.2f}x")


if __name__ == "__main__":
    main()
