"""Whole-volume inference: the sliding window with Gaussian blending, mirroring, checkpoint ensembles, the
enhancing-tumor postprocessing, and writing label maps into the input's grid. Training's validation, predict.py,
export.py and crossval.py share it."""
import itertools
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from bratsunet.cases import CaseError, load_case
from bratsunet.checkpoints import (FINAL_CHECKPOINT, checkpoint_files, load_model, onnx_path, onnx_predictor,
                                   trained_settings)
from bratsunet.console import progress_bar
from bratsunet.conventions import internal_to_brats, output_names
from bratsunet.devices import on_rank0, resolve_device, run_settings, use_device
from bratsunet.files import WriteError, atomic_write, output_folder
from bratsunet.losses import logits_to_probabilities, probabilities_to_labels
from bratsunet.manifest import fold_dir, labels_convention, open_array, read_manifest
from bratsunet.preprocessing import preprocess

VALIDATION_RECORD = "predicted_with.json"  # in run_dir/validation: the checkpoint and epoch of the predictions


def window_starts(size, window, stride):
    """Window offsets along one axis: every `stride` voxels, the last window flush with the far end."""
    if size <= window:
        return [0]
    count = -(-(size - window) // stride) + 1  # ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(count)]


def importance_weights(window, gaussian, device):
    """(wx, wy, wz) blending weights. Gaussian: sigma = window / 8 around the window centre (as in
    nnU-Net), at least 1e-3 so that every voxel keeps a weight; otherwise all ones."""
    if not gaussian:
        return torch.ones(window, dtype=torch.float32, device=device)
    profiles = []
    for n in window:
        offset = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        profiles.append(torch.exp(-0.5 * (offset / (n / 8)) ** 2))
    weights = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return weights.clamp(min=1e-3).to(device=device, dtype=torch.float32)


def pad_to_window(image, window):
    """Zero-pad spatial axes shorter than the window, evenly on both sides -> (padded image, offsets)."""
    before = [max(w - s, 0) // 2 for w, s in zip(window, image.shape[1:])]
    after = [max(w - s, 0) - b for w, s, b in zip(window, image.shape[1:], before)]
    if not any(before) and not any(after):
        return image, before
    pad = [v for b, a in zip(reversed(before), reversed(after)) for v in (b, a)]  # last axis first
    return torch.nn.functional.pad(image, pad), before


@torch.no_grad()
def sliding_window(predict_fn, image, window, overlap=0.5, batch_size=2, gaussian=True):
    """Predict a whole volume image (C, X, Y, Z) window by window -> (C_out, X, Y, Z) float32.

    predict_fn maps (B, C, wx, wy, wz) -> (B, C_out, wx, wy, wz), e.g. a model in eval mode.
    Windows overlap by `overlap` (stride = window * (1 - overlap), at least 1 voxel); their outputs
    are averaged with Gaussian (or uniform) weights. Accumulation is float32 on image's device.
    """
    if image.ndim != 4:
        raise ValueError(f"sliding_window expects an image (C, X, Y, Z), got shape {tuple(image.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    window = tuple(int(w) for w in window)
    size = tuple(image.shape[1:])
    image, offset = pad_to_window(image, window)
    padded = tuple(image.shape[1:])
    strides = [max(int(round(w * (1 - overlap), 6)), 1) for w in window]
    corners = list(itertools.product(*(window_starts(s, w, d) for s, w, d in zip(padded, window, strides))))
    weights = importance_weights(window, gaussian, image.device)  # (wx, wy, wz)

    total = None  # (C_out, X, Y, Z), allocated once the output channel count is known
    weight_sum = torch.zeros(padded, dtype=torch.float32, device=image.device)
    for first in range(0, len(corners), batch_size):
        boxes = [tuple(slice(c, c + w) for c, w in zip(corner, window))
                 for corner in corners[first:first + batch_size]]
        batch = torch.stack([image[(slice(None), *box)] for box in boxes])  # (B, C, wx, wy, wz)
        output = predict_fn(batch)
        if output.ndim != 5 or output.shape[0] != len(boxes) or tuple(output.shape[2:]) != window:
            raise ValueError(f"predict_fn returned shape {tuple(output.shape)} for windows {tuple(batch.shape)}")
        if total is None:
            total = torch.zeros((output.shape[1], *padded), dtype=torch.float32, device=image.device)
        for box, window_output in zip(boxes, output.float()):
            total[(slice(None), *box)] += window_output * weights
            weight_sum[box] += weights
    total /= weight_sum
    return total[(slice(None), *(slice(o, o + s) for o, s in zip(offset, size)))].contiguous()


def mirror_flips(tta_mirror):
    """Spatial axes of a (B, C, X, Y, Z) batch to flip besides the plain prediction: none, or the 7
    non-empty combinations of x, y and z."""
    if not tta_mirror:
        return []
    return [axes for n in range(1, 4) for axes in itertools.combinations((2, 3, 4), n)]


def predict_case(model, image, hp, target):
    """Probabilities (C_out, X, Y, Z) float32, on the model's device, of a preprocessed image (C, X, Y, Z).

    Uses hp.patch_size (the window), sw_overlap, sw_batch_size, precision (autocast as in training) and
    tta_mirror: each window is then also predicted flipped along every combination of axes, flipped
    back, and the 8 probabilities averaged."""
    # a network, or a function of windows such as onnx_predictor's, which takes and gives CPU tensors
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    dtype, _, channels_last = run_settings(hp.precision, hp.channels_last, device)
    flips = mirror_flips(hp.tta_mirror)

    def probabilities(windows):  # (B, C, wx, wy, wz) -> (B, C_out, wx, wy, wz) float32
        if channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(windows)
        return logits_to_probabilities(logits.float(), target)

    def predict_fn(windows):
        total = probabilities(windows)
        for axes in flips:
            total += probabilities(windows.flip(axes)).flip(axes)
        if flips:
            total /= 1 + len(flips)
        return total

    image = torch.as_tensor(image, dtype=torch.float32).to(device)
    return sliding_window(predict_fn, image, hp.patch_size, hp.sw_overlap, hp.sw_batch_size)


def labels_in_input_grid(labels_cropped, box, original_shape):
    """Labels (x, y, z) of the crop box -> uint8 (X, Y, Z) in the full input grid, background outside the box."""
    full = np.zeros(original_shape, dtype=np.uint8)
    full[tuple(slice(start, stop) for start, stop in box)] = labels_cropped
    return full


def postprocess_et(labels, et_min_voxels):
    """Internal labels whose enhancing tumor (3) has fewer than et_min_voxels voxels: it becomes necrotic core (1)."""
    enhancing = labels == 3
    if et_min_voxels and 0 < np.count_nonzero(enhancing) < et_min_voxels:
        return np.where(enhancing, np.uint8(1), labels)
    return labels


def write_labels(labels, reference, path, data_format="brats2020"):
    """Internal labels -> uint8 disk labels of data_format (2020: 0/1/2/4) with the reference image's affine
    and header, atomically."""
    image = nib.Nifti1Image(internal_to_brats(labels, data_format), reference.affine, reference.header)
    image.set_data_dtype(np.uint8)  # stored as is: nibabel writes no intensity scaling for uint8 labels
    image.header["cal_min"], image.header["cal_max"] = 0, 4  # display range of the labels
    atomic_write(path, lambda tmp: nib.save(image, tmp))


def write_probabilities(probabilities, box, original_shape, target, path):
    arrays = {"probabilities": probabilities.astype(np.float16), "crop_box": np.array(box),
              "original_shape": np.array(original_shape),
              "channels": np.array(output_names(target, len(probabilities)))}
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def output_paths(hp, name):
    """[label map, probabilities if asked]; the label map is written last and marks a case as done."""
    paths = [hp.prediction_dir / f"{name}.nii.gz"]
    return paths + [hp.prediction_dir / f"{name}_probabilities.npz"] if hp.save_probabilities else paths


def ensemble_probabilities(members, image):
    """Mean probabilities (C_out, X, Y, Z) of the networks of members [(network, its hp)] on a preprocessed image."""
    total = None
    for net, hp in members:
        probabilities = predict_case(net, image, hp, hp.target)  # (C_out, X, Y, Z)
        total = probabilities if total is None else total.add_(probabilities)
    return total.div_(len(members))


def write_prediction(probabilities, box, original_shape, reference, hp, name, data_format):
    """Probabilities (C_out, x, y, z) over the crop box -> labels of data_format in the full grid of reference,
    written with the probabilities when asked -> the label map's path."""
    labels = probabilities_to_labels(probabilities, hp.target).cpu().numpy()  # (x, y, z) internal
    labels = postprocess_et(labels_in_input_grid(labels, box, original_shape), hp.et_min_voxels)  # (X, Y, Z)
    paths = output_paths(hp, name)
    if hp.save_probabilities:
        write_probabilities(probabilities.cpu().numpy(), box, original_shape, hp.target, paths[1])
    write_labels(labels, reference, paths[0], data_format)
    return paths[0]


def predict_file(members, case, hp):
    """Predict one raw case with the networks of members [(network, its hp)] and write its outputs -> the label
    map's path. CaseError for a bad case."""
    image, _, reference = load_case(case._replace(seg_path=None), hp.allow_any_grid)  # the truth plays no part
    normalized, box = preprocess(image, hp.crop_margin)  # (C, x, y, z) float32 cropped to the brain
    probabilities = ensemble_probabilities(members, normalized)  # (C_out, x, y, z)
    if not torch.isfinite(probabilities).all():  # never a NaN map written as background
        raise CaseError(f"{case.folder}: the network gave NaN or Inf probabilities; nothing written")
    return write_prediction(probabilities, box, image.shape[1:], reference, hp, case.name,
                            case.data_format)  # in the input's convention


def check_fold_count(hp):
    """ValueError when run_dir holds the runs of other folds than num_folds names: an ensemble of some of the
    folds (or of one, with num_folds 1) is not the k-fold model, and crossval.py refuses the same."""
    folds = sorted(int(path.name[5:]) for path in Path(hp.run_dir).glob("fold_*")
                   if re.fullmatch(r"fold_\d+", path.name) and path.is_dir())
    if folds and folds != list(range(hp.num_folds)):
        lacking = sorted(set(range(hp.num_folds)) - set(folds))
        todo = f"train fold {', '.join(map(str, lacking))} first" if lacking else f"set num_folds: {max(folds) + 1}"
        raise ValueError(f"{hp.run_dir}: holds the runs of folds {', '.join(map(str, folds))}, but num_folds is "
                         f"{hp.num_folds}: {todo}, or name the checkpoints (checkpoint: ...)")


def checkpoint_paths(hp):
    """The files of hp.checkpoint (paths and globs, each file once), or the final checkpoint (the last epoch) of
    run_dir, of every fold: as nnU-Net, no checkpoint chosen on the cases it is scored on."""
    if hp.checkpoint is None:
        check_fold_count(hp)
        return [fold_dir(hp, fold) / FINAL_CHECKPOINT for fold in range(hp.num_folds)]
    return checkpoint_files(hp.checkpoint if isinstance(hp.checkpoint, tuple) else [hp.checkpoint])


def load_for_inference(hp, device, path=None):
    """(network in eval mode on device, hp with the settings it was trained with) from the checkpoint at path
    (default: the one checkpoint of hp). With backend onnxruntime the network is the checkpoint's ONNX model
    (onnx_path), run in float32, and the settings come from its metadata."""
    if path is None:
        paths = checkpoint_paths(hp)
        if len(paths) > 1:
            raise ValueError(f"checkpoint names {len(paths)} files; one is needed here")
        path = paths[0]
    if hp.backend == "onnxruntime":
        model, settings = onnx_predictor(path, device)
        path = onnx_path(path)
        hp = hp.replace(precision="fp32", channels_last=False)  # the exported model is float32
    else:
        model, checkpoint = load_model(path, device, hp)
        use_device(device)
        if run_settings(hp.precision, hp.channels_last, device)[2]:
            model = model.to(memory_format=torch.channels_last_3d)
        settings = trained_settings(checkpoint)
    current = hp.to_dict()
    changed = [f"{key}={value}" for key, value in settings.items() if current[key] != value]
    trained = hp.updated(settings, f"{path}: the settings it was trained with")  # checked as settings are
    if changed:
        print(f"{path.name} was trained with {', '.join(changed)}: predicting with those")
    return model, trained


def postprocessing_file(paths):
    """crossval.py's postprocessing.json beside the checkpoints, or in the run folder above fold_K folders."""
    folder = Path(os.path.commonpath([path.parent for path in paths]))
    candidates = [folder, folder.parent] if re.fullmatch(r"fold_\d+", folder.name) else [folder]
    return next((c / "postprocessing.json" for c in candidates if (c / "postprocessing.json").is_file()), None)


def load_ensemble(hp, device):
    """([(network, its hp)] of every checkpoint of hp, hp of the ensemble: the first network's settings and
    et_min_voxels, from postprocessing.json when it is not set)."""
    paths = checkpoint_paths(hp)
    members = [load_for_inference(hp, device, path) for path in paths]
    first = members[0][1]
    for path, (_, member) in zip(paths[1:], members[1:]):
        differ = [f"{key} {getattr(member, key)} vs {getattr(first, key)}" for key in ("target", "channel_names",
                                                                                     "crop_margin")
                  if getattr(member, key) != getattr(first, key)]
        if differ:
            raise ValueError(f"{path}: its network differs from that of {paths[0]} ({', '.join(differ)}); an "
                             "ensemble averages one target, from the same channels, over the same crop")
    if len(members) > 1:
        print(f"ensemble of {len(members)} checkpoints: {', '.join(str(path) for path in paths)}")
    path = postprocessing_file(paths) if hp.et_min_voxels is None else None
    if path:
        try:
            first = first.replace(et_min_voxels=json.loads(path.read_text())["et_min_voxels"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: unreadable postprocessing file ({error}); set et_min_voxels") from None
        print(f"et_min_voxels {first.et_min_voxels} from {path} (set et_min_voxels to override)")
    return members, first


def predict_cases(hp, cases, model=None):
    """Predict cases into hp.prediction_dir -> paths of the label maps written now.

    model: a network to use instead of hp's checkpoint(s), or a list of (network, its hp) from load_ensemble;
    hp then gives the target, channel_names, crop margin, window and et_min_voxels."""
    if model is None:
        model, hp = load_ensemble(hp, resolve_device(hp.device))
    members = model if isinstance(model, list) else [(model, hp)]
    output_folder(hp.prediction_dir, "prediction_dir")
    written, already, failed = [], [], {}
    for case in progress_bar(cases, description="predict", unit="case"):
        if not hp.overwrite and all(path.is_file() for path in output_paths(hp, case.name)):
            already.append(case.name)
            continue
        try:
            written.append(predict_file(members, case, hp))
        except (CaseError, OSError) as error:
            if isinstance(error, WriteError):
                raise  # a full disk: every later case would fail the same way, after all its work
            failed[case.name] = str(error)
            tqdm.write(f"skipped {case.name}: {error}")
    print(f"predicted {len(written)} case(s) into {hp.prediction_dir}"
          + (f", {len(already)} already there (overwrite: True redoes them)" if already else "")
          + (f", {len(failed)} failed:" if failed else ""))
    for name, reason in failed.items():
        print(f"  failed {name}: {reason}")
    return written


def predict_validation(hp, names, net, epoch, rank=0, world_size=1, overwrite=False):
    """The out-of-fold predictions of the fold whose run is in hp.run_dir: its validation cases `names`, from their
    prepared arrays as validation saw them (prepared_dir is all a fold needs), with net, the network of the fold's
    checkpoint_final.pt (the weights of its last epoch, `epoch`), into run_dir/validation: label maps in the raw grid
    (crop box, shape and affine from dataset.json) and probabilities, no postprocessing (crossval.py tunes it on them),
    and VALIDATION_RECORD, the checkpoint that made them; those of another checkpoint are made again. Under torchrun
    every process predicts its share and process 0 writes them all, a case per process at a time, so that no
    process waits longer than that -> the names predicted now."""
    hp = hp.replace(prediction_dir=hp.run_dir / "validation", save_probabilities=True, et_min_voxels=0)
    record, source = hp.prediction_dir / VALIDATION_RECORD, {"checkpoint": FINAL_CHECKPOINT, "epoch": epoch}

    def to_do():  # process 0's files decide
        redo = overwrite or not record.is_file() or json.loads(record.read_text()) != source
        return [name for name in names if redo or not all(path.is_file() for path in output_paths(hp, name))]

    todo = on_rank0(to_do)
    if todo and rank == 0:
        output_folder(hp.prediction_dir, "run_dir")
        record.unlink(missing_ok=True)  # written again when every case is
    manifest = read_manifest(hp.prepared_dir)
    cases, data_format = manifest["cases"], labels_convention(manifest)  # the labels of the raw data
    net.eval()
    for first in progress_bar(range(0, len(todo), world_size), description="predict validation", unit="case",
                              disable=rank != 0):
        mine = todo[first + rank] if first + rank < len(todo) else None
        probabilities = None if mine is None else ensemble_probabilities(
            [(net, hp)], open_array(hp.prepared_dir / cases[mine]["image"]).astype(np.float32))  # (C_out, x, y, z)
        results = [(mine, probabilities)]
        if world_size > 1:
            results = [None] * world_size if rank == 0 else None
            dist.gather_object((mine, None if mine is None else probabilities.cpu()), results, dst=0)
        for name, probabilities in (results if rank == 0 else []):
            if name is not None:
                reference = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), np.array(cases[name]["affine"]))
                write_prediction(probabilities, cases[name]["crop_box"], cases[name]["original_shape"], reference,
                                 hp, name, data_format)
    if rank == 0:
        if todo:
            atomic_write(record, lambda tmp: tmp.write_text(json.dumps(source)))
        print(f"predicted {len(todo)} validation case(s) into {hp.prediction_dir} with {FINAL_CHECKPOINT} (epoch "
              f"{epoch})" + f", {len(names) - len(todo)} already there" * (len(todo) < len(names)))
    return todo
