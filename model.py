"""The configurable 3D U-Net and its checkpoints (and export.py's ONNX model of one, for backend: onnxruntime).

The network follows the 3D U-Net of Cicek et al. (2016): per resolution level two 3x3x3
convolutions, each followed by a normalization and an activation; max-pooling on the way down,
transposed convolutions on the way up, and skip connections that concatenate the encoder's
features with the upsampled ones. `features` lists the channels per level, the last entry is the
bottleneck: the paper's widths are `64,128,256,512,1024`, the default `16,32,64,128` trains on a
laptop CPU.

Checkpoints hold plain tensors and Python values only and are read with
`torch.load(weights_only=True)`, so loading a checkpoint from the internet cannot run code.
"""
import glob
import json
import math
import pickle
import random
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import conventions
from files import atomic_write

# Settings a network was trained with: predictions follow the checkpoint's, not the current file's.
TRAINED_SETTINGS = ("channel_names", "patch_size", "crop_margin", "target")
ONNX_NAME = "model.onnx"  # what export.py writes beside a checkpoint, and backend: onnxruntime reads


def make_norm(norm, channels):
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "group":
        # 8 groups where the width allows it (16 -> 8 groups of 2); fewer for odd widths
        return nn.GroupNorm(math.gcd(8, channels), channels)
    raise ValueError(f"norm must be instance, batch or group, got {norm!r}")


class ConvBlock(nn.Sequential):
    """Two (3x3x3 conv -> norm -> LeakyReLU); the spatial size is kept (padding 1).

    The convolutions have no bias: the normalization right after them subtracts the mean anyway.
    LeakyReLU (slope 0.01, as in nnU-Net) instead of the paper's ReLU keeps a gradient for
    negative pre-activations, so no channel can die after a bad early update.
    """

    def __init__(self, in_channels, out_channels, norm):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            make_norm(norm, out_channels),
            nn.LeakyReLU(0.01, inplace=True),
        )


class UpBlock(nn.Module):
    """2x transposed conv (halves the channels), concatenate the skip, then a ConvBlock."""

    def __init__(self, in_channels, out_channels, norm):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = ConvBlock(2 * out_channels, out_channels, norm)

    def forward(self, x, skip):
        x = self.up(x)  # (B, out, 2X, 2Y, 2Z)
        x = torch.cat([skip, x], dim=1)  # (B, 2*out, 2X, 2Y, 2Z)
        return self.conv(x)  # (B, out, 2X, 2Y, 2Z)


def size_problem(sides, features):
    """Why spatial sides do not fit a U-Net with these level widths ('' when they do): every side must halve
    cleanly at each pooling, since padding silently would shift the outputs."""
    factor = 2 ** (len(features) - 1)
    for axis, side in zip("xyz", sides):
        if side % factor:
            below, above = side // factor * factor, (side // factor + 1) * factor
            nearest = f"{below} or {above}" if below else f"{above}"
            return (f"side {axis} is {side}, not a multiple of {factor} (2^{len(features) - 1} for "
                    f"{len(features) - 1} poolings); nearest valid sizes: {nearest}")
    return ""


class UNet3D(nn.Module):
    def __init__(self, in_channels, out_channels, features=(16, 32, 64, 128), norm="instance",
                 deep_supervision=False):
        super().__init__()
        features = [int(f) for f in features]
        if len(features) < 2 or min(features) < 1:
            raise ValueError(f"features needs at least two positive widths (levels + bottleneck), got {features}")
        self.features = features
        self.deep_supervision = deep_supervision
        self.encoders = nn.ModuleList(
            ConvBlock(c_in, c_out, norm) for c_in, c_out in zip([in_channels] + features[:-1], features))
        self.decoders = nn.ModuleList(
            UpBlock(c_in, c_out, norm) for c_in, c_out in zip(features[:0:-1], features[-2::-1]))
        # 1x1x1 heads, full resolution first; with deep supervision one per decoder level but the lowest,
        # which nnU-Net's loss weighs 0 (an output nobody trains is not computed here)
        num_heads = max(len(features) - 2, 1) if deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv3d(f, out_channels, kernel_size=1) for f in features[:num_heads])

    def check_input_size(self, x):
        problem = size_problem(x.shape[2:], self.features)
        if problem:
            raise ValueError(f"input {problem}")

    def forward(self, x):  # x: (B, in, X, Y, Z)
        if x.ndim != 5:
            raise ValueError(f"input must be (batch, channels, x, y, z), got shape {tuple(x.shape)}")
        self.check_input_size(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = F.max_pool3d(x, kernel_size=2)  # (B, c, X/2^level, ...)
            x = encoder(x)  # (B, features[level], X/2^level, ...)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        decoded = []
        for decoder in self.decoders:
            x = decoder(x, skips.pop())
            decoded.append(x)  # lowest resolution first
        if self.deep_supervision and self.training:
            # [(B, out, X, Y, Z), (B, out, X/2, Y/2, Z/2), ...]
            return [head(d) for head, d in zip(self.heads, reversed(decoded))]
        return self.heads[0](x)  # (B, out, X, Y, Z) logits


def model_args(hp):
    """Everything UNet3D needs, as plain values: stored in checkpoints to rebuild the network."""
    return {
        "in_channels": len(hp.channel_names),
        "out_channels": conventions.num_outputs(hp.data_format, hp.target),  # 3 regions, 4 labels; 2024: 4, 5
        "features": [int(f) for f in hp.features],
        "norm": hp.norm,
        "deep_supervision": bool(hp.deep_supervision),
    }


def check_patch_size(hp):
    """ValueError naming patch_size when the training window does not fit the network of hp.features."""
    problem = size_problem(hp.patch_size, hp.features)
    if problem:
        raise ValueError(f"patch_size {', '.join(map(str, hp.patch_size))}: {problem} "
                         f"(features {', '.join(map(str, hp.features))})")


def build_model(hp):
    return UNet3D(**model_args(hp))


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def non_finite_weights(model):
    """Names of the parameters and buffers that hold NaN or Inf (a diverged run)."""
    return [name for name, value in [*model.named_parameters(), *model.named_buffers()]
            if value.is_floating_point() and not torch.isfinite(value).all()]


# ---------------------------------------------------------------- checkpoints

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
