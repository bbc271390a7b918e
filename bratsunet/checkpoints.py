"""Checkpoints: saving them, loading them with weights_only=True (a checkpoint from the internet cannot run code),
rebuilding their network, the settings they were trained with, their ONNX model, and the random states they keep."""
import glob
import hashlib
import json
import pickle
import random
import re
import warnings
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

    def write(tmp):
        try:
            torch.save(state, tmp)
        except RuntimeError as error:  # its zip writer's failed write (a full disk) says no errno
            raise OSError((str(error).splitlines() or ["torch.save failed"])[0]) from error
    atomic_write(path, write)


def checkpoint_files(patterns):
    """Paths and glob patterns (runs/x/fold_*/checkpoint_best.pt) -> the checkpoint files, in order, each once.
    An existing file is taken as named (runs/exp[1]/checkpoint_best.pt), and a pattern that matches nothing is
    tried again with its brackets taken literally (runs/exp[1]/fold_*/checkpoint_best.pt)."""
    paths = []
    for pattern in map(str, patterns):
        found = [Path(pattern)]
        if glob.has_magic(pattern) and not Path(pattern).is_file():
            literal = re.sub(r"[\[\]]", lambda bracket: f"[{bracket.group()}]", pattern)
            found = sorted(Path(p) for p in glob.glob(pattern) or glob.glob(literal))
        if not found:
            raise FileNotFoundError(f"checkpoint {pattern}: no file matches (train a model with train.py first)")
        paths += [path for path in found if path not in paths]
    return paths


def _is_pickle(path):
    """True when the file starts as a pickle of protocol 2 or newer does (pickle.dump, torch.save's old format)."""
    with open(path, "rb") as file:
        return file.read(1) == pickle.PROTO


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint dict with weights_only=True; one-line errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (train a model with train.py first)")
    try:
        with warnings.catch_warnings():  # a pickle of another protocol: refused below if it is not plain
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # damaged bytes fail in many ways inside the unpickler
        code = re.search(r"GLOBAL (\S+)", str(err))  # the refused import: a function or class to run
        if isinstance(err, pickle.UnpicklingError) and code:
            raise ValueError(f"{path}: checkpoint contains code objects ({code.group(1)}), not only tensors and "
                             "plain values, and was not loaded; only load checkpoints written by train.py") from None
        refused = re.search(r"WeightsUnpickler error:\s*(.+)", str(err))  # PyTorch's advice around it is not ours
        if isinstance(err, pickle.UnpicklingError) and refused and _is_pickle(path):
            raise ValueError(f"{path}: refused as unsafe: a pickle that the safe loader (weights_only) cannot read "
                             f"as tensors and plain values ({refused.group(1).strip()}), and was not loaded; only "
                             "load checkpoints written by train.py") from None
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


def weights_digest(state_dict):
    """SHA-256 of a network's weights (names, types, shapes and values, in name order; wrapper prefixes dropped):
    which network a checkpoint holds, whatever its file is called or wherever it was moved."""
    digest = hashlib.sha256()
    for key, value in sorted(strip_wrapper_prefixes(state_dict).items()):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key} {tensor.dtype} {tuple(value.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def onnx_source(checkpoint, path):
    """What export.py records of the checkpoint a model.onnx is made from (metadata source_checkpoint)."""
    return {"path": str(Path(path).resolve()), "epoch": checkpoint.get("epoch"),
            "weights_sha256": weights_digest(checkpoint["model"])}


def onnx_settings(path, metadata):
    """The TRAINED_SETTINGS of export.py's metadata (JSON values) -> {key: value}; ValueError for a model
    without them (not exported by export.py), naming the file."""
    missing = [key for key in (*TRAINED_SETTINGS, "source_checkpoint") if key not in metadata]
    if missing:
        raise ValueError(f"{path}: no metadata of export.py ({', '.join(missing)} missing): not a model exported by "
                         "this project, whose settings (channels, window, crop) it would have to guess; export the "
                         "checkpoint with python export.py")
    try:
        return {key: json.loads(metadata[key]) for key in TRAINED_SETTINGS}
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: metadata that is not JSON ({error})") from None


def check_onnx_source(path, metadata, checkpoint_path):
    """ValueError naming both files unless the ONNX model at path was exported from the network of checkpoint_path."""
    try:
        source = json.loads(metadata["source_checkpoint"])
    except json.JSONDecodeError:
        source = None
    if not isinstance(source, dict) or "weights_sha256" not in source:
        raise ValueError(f"{path}: does not record the weights of its checkpoint (an older export.py); export "
                         f"{checkpoint_path} again with python export.py")
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"{checkpoint_path}: checkpoint not found, so {path} cannot be checked against it; "
                                "name the ONNX model itself (checkpoint: .../model.onnx) to use it alone")
    checkpoint = load_checkpoint(checkpoint_path)
    if "model" not in checkpoint or weights_digest(checkpoint["model"]) != source["weights_sha256"]:
        raise ValueError(f"{path}: exported from {source.get('path')} (epoch {source.get('epoch')}), not from the "
                         f"checkpoint asked for, {checkpoint_path} (epoch {checkpoint.get('epoch')}): another network; "
                         f"export it with python export.py checkpoint={checkpoint_path}")


def onnx_predictor(checkpoint_path, device):
    """(export.py's ONNX model of the checkpoint at checkpoint_path, or the .onnx file it names, in ONNX Runtime as
    predict_case's network, a function windows -> logits on CPU tensors; the settings it was trained with, from its
    metadata). A model.onnx beside a checkpoint must hold that checkpoint's network. The package is needed only here."""
    try:
        import onnxruntime
    except ImportError:
        raise ValueError("backend: onnxruntime needs the onnxruntime package: "
                         "pip install -r requirements-onnx.txt") from None
    path = onnx_path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no ONNX model (python export.py writes it beside the checkpoint)")
    wanted = ["CUDAExecutionProvider"] * (device.type == "cuda") + ["CPUExecutionProvider"]
    try:
        session = onnxruntime.InferenceSession(str(path), providers=[
            p for p in wanted if p in onnxruntime.get_available_providers()])
    except Exception as error:  # ONNX Runtime's own exception types, e.g. for a damaged file
        raise ValueError(f"{path}: not a readable ONNX model ({(str(error).splitlines() or ['?'])[0]})") from None
    metadata = session.get_modelmeta().custom_metadata_map
    settings = onnx_settings(path, metadata)
    if path != Path(checkpoint_path):
        check_onnx_source(path, metadata, checkpoint_path)

    def logits(windows):  # (B, C, wx, wy, wz) -> (B, C_out, wx, wy, wz) float32
        return torch.from_numpy(session.run(None, {"image": np.ascontiguousarray(windows.cpu().numpy())})[0])
    return logits, settings


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
