"""A trained checkpoint -> an ONNX model that runs without this repository (C++, C#, 3D Slicer, ONNX Runtime).

    pip install -r requirements-onnx.txt            # onnx, onnxscript (the exporter), onnxruntime (the check)
    python export.py                                # run_dir/checkpoint_final.pt -> run_dir/model.onnx (each fold's)
    python export.py "checkpoint=runs/cv/fold_*/checkpoint_best.pt"   # each fold: runs/cv/fold_K/model.onnx

The model.onnx is written beside its checkpoint (several checkpoints in one folder are refused: they would
share the name), atomically, and checked against PyTorch with ONNX Runtime on one window. It maps a float32
`image` (batch, channels, x, y, z) to float32 `logits` (batch, outputs, x, y, z); batch and the three
spatial sides are dynamic, each side any multiple of 2^poolings (`input_multiple`). The network is exported
with torch.onnx.export(dynamo=True), PyTorch's default exporter since 2.9 (the TorchScript one is deprecated).

What a user needs besides the weights is in the model's metadata_props (JSON values; onnx.load(path).
metadata_props, or InferenceSession(path).get_modelmeta().custom_metadata_map):
  channel_names    input channel order, e.g. ["flair", "t1", "t1ce", "t2"]; file_suffixes: of the case's files
  normalization    how an input volume is prepared: crop to the brain, z-score per channel over the brain
  crop_margin      voxels kept around the brain's bounding box
  patch_size       the window the network was trained on: run it window by window (sliding_window)
  sw_overlap, input_multiple, target, output_activation, output_channels, brats_labels (the label values on
  disk of data_format), regions, labels_rule (outputs -> labels on disk)
  model_args, epoch, dice_mean, source_checkpoint (path, epoch and weights_sha256 of the checkpoint: predict.py's
  backend: onnxruntime uses a model.onnx only for the checkpoint it was exported from)
"""
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from bratsunet import hyperparameters, settings_text
from bratsunet.checkpoints import load_model, onnx_path, onnx_source, trained_settings
from bratsunet.conventions import ALL_REGIONS, CONVENTIONS, file_suffix, output_names
from bratsunet.files import atomic_write
from bratsunet.inference import checkpoint_paths

OPSET = 18  # ONNX Runtime 1.14 (2023) and newer run it
NORMALIZATION = ("channels in channel_names order, float32, axes (x, y, z) as stored in the NIfTI; crop to the "
                 "bounding box of the voxels where any channel is non-zero (the brain of a skull-stripped scan) "
                 "plus crop_margin voxels; z-score per channel over those brain voxels of the whole volume (subtract "
                 "their mean, divide by their standard deviation), the background stays 0")


# What export() reads: keys, and groups of hyperparameters.txt for all their keys (--help lists them).
SETTINGS = ("checkpoint", "run_dir", "num_folds")


def labels_rule(target, disk_labels):
    """How the outputs become the label values on disk (losses.probabilities_to_labels), in words."""
    if target == "labels":
        return "softmax; the argmax channel k is label brats_labels[k] on disk"
    d = disk_labels
    rule = (f"sigmoid; background {d[0]} unless WT > 0.5; inside WT label {d[2]} (edema), where TC > 0.5 too "
            f"{d[1]} (core), where ET > 0.5 too {d[3]} (enhancing)")
    return rule + (f"; label {d[4]} (resection cavity) where RC > 0.5 outside WT" if len(d) > 4 else "")


def metadata(checkpoint, path):
    """The metadata_props of the ONNX model: everything needed to use it, as JSON text per key."""
    trained, args = checkpoint.get("hyperparameters", {}), checkpoint["model_args"]
    defaults = hyperparameters.load().to_dict()  # for checkpoints that predate a setting
    setting = lambda key: trained.get(key, defaults[key])  # noqa: E731
    target = trained_settings(checkpoint)["target"]
    data_format = setting("data_format")
    convention = CONVENTIONS[data_format]
    disk = tuple(checkpoint.get("disk_labels", convention.disk_labels))  # msd, nnunet: those of the dataset.json
    values = {
        "channel_names": list(setting("channel_names")), "data_format": data_format,
        "file_suffixes": [file_suffix(channel, data_format) for channel in setting("channel_names")]
        if convention.layout == "case folders" else None,  # the Decathlon layout names files by dataset.json
        "normalization": NORMALIZATION, "crop_margin": setting("crop_margin"),
        "patch_size": list(setting("patch_size")), "sw_overlap": setting("sw_overlap"),
        "input_multiple": 2 ** (len(args["features"]) - 1),
        "target": target, "output_activation": "sigmoid" if target == "regions" else "softmax",
        "output_channels": list(output_names(target, args["out_channels"])),
        "brats_labels": list(disk), "labels_rule": labels_rule(target, disk),
        "regions": {name: [disk[label] for label in ALL_REGIONS[name]] for name in convention.regions},
        "model_args": args, "epoch": checkpoint.get("epoch"),
        "dice_mean": checkpoint.get("best_score"), "source_checkpoint": onnx_source(checkpoint, path),
    }
    return {key: json.dumps(value) for key, value in values.items()}


def to_onnx(net, example):
    """The network as an onnx.ModelProto: input `image`, output `logits`, batch and spatial sides dynamic."""
    multiple = 2 ** (len(net.features) - 1)
    sides = {axis: multiple * torch.export.Dim(name, min=2, max=4096 // multiple)  # min 2: a bottleneck of
             for axis, name in zip((2, 3, 4), "xyz")}                                  # 1 voxel cannot be normalized
    with warnings.catch_warnings():  # the exporter's notes on its own internals are not the user's business
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(net, (example,), dynamo=True, opset_version=OPSET, verbose=False,
                                    input_names=["image"], output_names=["logits"],
                                    dynamic_shapes=({0: torch.export.Dim("batch"), **sides},))
    return program.model_proto


def largest_difference(path, net, example):
    """Max |ONNX Runtime - PyTorch| of the logits on example, or None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"image": example.numpy()})[0]
    with torch.no_grad():
        return float(np.abs(onnx_logits - net(example).numpy()).max())


def export_checkpoint(checkpoint_path, output):
    """Export one checkpoint to output (.onnx) -> the largest difference to PyTorch on one window (or None)."""
    import onnx
    net, checkpoint = load_model(checkpoint_path, "cpu")
    props = metadata(checkpoint, checkpoint_path)
    torch.manual_seed(0)
    window = json.loads(props["patch_size"])
    example = torch.randn(1, checkpoint["model_args"]["in_channels"], *window)  # (1, C, px, py, pz)
    proto = to_onnx(net, example)
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = (f"3D U-Net for BraTS from {Path(checkpoint_path).name}: image (batch, "
                        f"{len(json.loads(props['channel_names']))}, x, y, z) float32 -> logits; see metadata_props")
    onnx.checker.check_model(proto)
    atomic_write(output, lambda tmp: onnx.save(proto, str(tmp)))
    return largest_difference(output, net, example)


def export(hp):
    """Export each checkpoint of hp (see checkpoint_paths) to model.onnx beside it -> the paths written."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ValueError(f"export.py needs the {error.name} package: pip install -r requirements-onnx.txt") from None
    checkpoints = checkpoint_paths(hp)
    outputs = [onnx_path(path) for path in checkpoints]
    shared = sorted({str(out) for out in outputs if outputs.count(out) > 1})
    if shared:
        raise ValueError(f"several checkpoints would be exported to {shared[0]}: export them one at a time from "
                         f"folders of their own (checkpoint: {hp.checkpoint})")
    for checkpoint, output in zip(checkpoints, outputs):
        difference = export_checkpoint(checkpoint, output)
        check = "" if difference is None else f"; ONNX Runtime agrees with PyTorch to {difference:.1e} on one window"
        print(f"exported {checkpoint} -> {output}{check}")
    return outputs


def main():
    hp = settings_text.from_command_line(__doc__, SETTINGS)
    try:
        export(hp)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
