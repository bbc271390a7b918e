"""Checkpoints: saving them, loading them with weights_only=True (a checkpoint from the internet cannot run code),
rebuilding their network, the settings they were trained with, their ONNX model, and the random states they keep."""
import glob
import json
import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from bratsunet.files import atomic_write
from bratsunet.network import UNet3D, model_args, non_finite_weights

# Settings a network was trained with: predictions follow the checkpoint's, not the current file's.
TRAINED_SETTINGS = ("channel_names", "patch_size", "crop_margin", "target")


ONNX_NAME = "model.onnx"  # what export.py writes beside a checkpoint, and backend: onnxruntime reads

# The last epoch's weights: the fold ensemble and the out-of-fold predictions use them (checkpoint_best.pt was
# chosen on the validation cases, so scores on them would be optimistic).
FINAL_CHECKPOINT = "checkpoint_final.pt"


# what torch.load(weights_only=True) accepts; anything else would make the checkpoint unloadable
_PLAIN_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.device, torch.dtype)


def check_plain(value, where="state"):
    """Raise TypeError naming the first entry that is not a plain tensor or Python value."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_LEAVES:
        return
    if type(value) in (dict, OrderedDict):
        for key, item in value.items():
            check_plain(key, f"{where} key {key!r}")
            check_plain(item, f"{where}[{key!r}]")
    elif type(value) in (list, tuple, set, torch.Size):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    else:
        raise TypeError(f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__qualname__}; "
                        "store plain tensors and Python values (e.g. torch.from_numpy(a), a.tolist(), str(path))")


def save_checkpoint(state, path):
    """torch.save to a temporary file in the same folder, then rename: never a half-written checkpoint.
    The file gets the permissions the umask gives, as any other output (a group can share a run)."""
    check_plain(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def checkpoint_files(patterns):
    """Paths and glob patterns (runs/x/fold_*/checkpoint_best.pt) -> the checkpoint files, in order, each once."""
    paths = []
    for pattern in patterns:
        found = sorted(Path(p) for p in glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [Path(pattern)]
        if not found:
            raise FileNotFoundError(f"checkpoint {pattern}: no file matches (train a model with train.py first)")
        paths += [path for path in found if path not in paths]
    return paths


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict with weights_only=True; one-line errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (train a model with train.py first)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # damaged bytes fail in many ways inside the unpickler
        code = re.search(r"GLOBAL (\S+)", str(err))  # the refused import: a function or class to run
        if isinstance(err, pickle.UnpicklingError) and code:
            raise ValueError(f"{path}: checkpoint contains code objects ({code.group(1)}), not only tensors and "
                             "plain values, and was not loaded; only load checkpoints written by train.py") from None
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def strip_wrapper_prefixes(state_dict):
    """Remove the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes, in any nesting."""
    def clean(key):
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        return key
    return {clean(key): value for key, value in state_dict.items()}


def _few(items, limit=4):
    items = list(items)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def describe_mismatch(model, state_dict):
    """'missing ...; unexpected ...; wrong shape ...' for keys that do not fit, '' if all fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
                   for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    parts = [f"{name}: {_few(keys)}" for name, keys in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape (checkpoint vs model)", wrong_shape))
             if keys]
    return "; ".join(parts)


def describe_args_difference(saved, current):
    """'features [4, 8] (checkpoint) vs [4, 16] (now), ...' for the model arguments that differ, '' if none."""
    return ", ".join(f"{key} {saved.get(key)} (checkpoint) vs {value} (now)"
                     for key, value in current.items() if saved.get(key) != value)


def load_model(path, device="cpu", hp=None):
    """Rebuild the network from checkpoint["model_args"] and load its weights -> (model in eval mode, checkpoint).

    `hp` (optional, the current hyperparameters) only improves the error message on a mismatch.
    """
    checkpoint = load_checkpoint(path)
    missing = [key for key in ("model_args", "model") if key not in checkpoint]
    if missing:
        raise ValueError(f"{path}: checkpoint has no {' or '.join(missing)} entry; save it with train.py")
    args = checkpoint["model_args"]
    try:
        model = UNet3D(**args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: model_args {args} do not build a UNet3D ({err})") from None
    state_dict = strip_wrapper_prefixes(checkpoint["model"])
    problems = describe_mismatch(model, state_dict)
    if problems:
        message = f"{path}: weights do not fit the network built from its model_args: {problems}"
        differ = describe_args_difference(args, model_args(hp)) if hp is not None else ""
        if differ:
            message += f"; model_args differ from the current hyperparameters: {differ}"
        raise ValueError(message)
    model.load_state_dict(state_dict)
    diverged = non_finite_weights(model)
    if diverged:
        raise ValueError(f"{path}: weights hold NaN or Inf ({', '.join(diverged[:3])}): the run diverged")
    return model.to(device).eval(), checkpoint


def trained_settings(checkpoint):
    """The TRAINED_SETTINGS a checkpoint holds; target from its outputs where it predates the setting."""
    trained = checkpoint.get("hyperparameters", {})
    settings = {key: trained[key] for key in TRAINED_SETTINGS if key in trained}
    settings.setdefault("target", "regions" if checkpoint["model_args"]["out_channels"] == 3 else "labels")
    return settings


def onnx_path(checkpoint):
    """The ONNX model of a checkpoint: model.onnx in its folder, or the file itself when it is one (.onnx)."""
    return Path(checkpoint) if Path(checkpoint).suffix == ".onnx" else Path(checkpoint).parent / ONNX_NAME


def onnx_predictor(path, device):
    """(export.py's ONNX model at path in ONNX Runtime as predict_case's network, a function windows -> logits
    on CPU tensors; the settings it was trained with, from its metadata). The package is needed only here."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("backend: onnxruntime needs the onnxruntime package: "
                         "pip install -r requirements-onnx.txt") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ONNX model (python export.py writes it beside the checkpoint)")
    wanted = ["CUDAExecutionProvider"] * (device.type == "cuda") + ["CPUExecutionProvider"]
    try:
        session = onnxruntime.InferenceSession(str(path), providers=[
            p for p in wanted if p in onnxruntime.get_available_providers()])
    except Exception as error:  # ONNX Runtime's own exception types, e.g. for a damaged file
        raise ValueError(f"{path}: not a readable ONNX model ({(str(error).splitlines() or ['?'])[0]})") from None
    metadata = session.get_modelmeta().custom_metadata_map

    def logits(windows):  # (B, C, wx, wy, wz) -> (B, C_out, wx, wy, wz) float32
        return torch.from_numpy(session.run(None, {"image": np.ascontiguousarray(windows.cpu().numpy())})[0])
    return logits, {key: json.loads(metadata[key]) for key in TRAINED_SETTINGS if key in metadata}


def rng_state():
    """Random states as tensors and plain values, so that a weights_only load restores them."""
    _, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(python_state), gauss],
             "numpy": [torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if torch.cuda.is_initialized():  # this process's GPU only: touching the others would put a context on each
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, python_state, gauss = state["python"]
    random.setstate((version, tuple(python_state), gauss))
    keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
