"""The configurable 3D U-Net: its blocks, the sizes it accepts, and the arguments that rebuild it.

The network follows the 3D U-Net of Cicek et al. (2016): per resolution level two 3x3x3
convolutions, each followed by a normalization and an activation; max-pooling on the way down (or, as
nnU-Net's PlainConvUNet, a first convolution of stride 2 in each lower level: `downsampling: conv`),
transposed convolutions on the way up, and skip connections that concatenate the encoder's
features with the upsampled ones. `features` lists the channels per level, the last entry is the
bottleneck: the paper's widths are `64,128,256,512,1024`, the default `16,32,64,128` trains on a
laptop CPU.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from bratsunet import conventions


NORMS = ("instance", "batch", "group")  # the norm setting's choices
DOWNSAMPLING = ("maxpool", "conv")  # the downsampling setting's choices


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
    """Two (3x3x3 conv -> norm -> LeakyReLU); the spatial size is kept (padding 1), or halved by a first
    convolution of stride 2.

    The convolutions have no bias: the normalization right after them subtracts the mean anyway.
    LeakyReLU (slope 0.01, as in nnU-Net) instead of the paper's ReLU keeps a gradient for
    negative pre-activations, so no channel can die after a bad early update.
    """

    def __init__(self, in_channels, out_channels, norm, stride=1):
        super().__init__(
            nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
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
                 deep_supervision=False, downsampling="maxpool"):
        super().__init__()
        features = [int(f) for f in features]
        if len(features) < 2 or min(features) < 1:
            raise ValueError(f"features needs at least two positive widths (levels + bottleneck), got {features}")
        if downsampling not in DOWNSAMPLING:
            raise ValueError(f"downsampling must be one of {', '.join(DOWNSAMPLING)}, got {downsampling!r}")
        self.features = features
        self.deep_supervision = deep_supervision
        self.pool = downsampling == "maxpool"
        self.encoders = nn.ModuleList(
            ConvBlock(c_in, c_out, norm, stride=1 if level == 0 or self.pool else 2)
            for level, (c_in, c_out) in enumerate(zip([in_channels] + features[:-1], features)))
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
            if level > 0 and self.pool:
                x = F.max_pool3d(x, kernel_size=2)  # (B, c, X/2^level, ...)
            x = encoder(x)  # (B, features[level], X/2^level, ...): a strided first convolution halves it
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
    """Everything UNet3D needs, as plain values: stored in checkpoints to rebuild the network. downsampling only
    where it is not max-pooling, so that checkpoints from before the setting resume and compare as they were."""
    args = {
        "in_channels": len(hp.channel_names),
        "out_channels": conventions.num_outputs(hp.data_format, hp.target),  # 3 regions, 4 labels; 2024: 4, 5
        "features": [int(f) for f in hp.features],
        "norm": hp.norm,
        "deep_supervision": bool(hp.deep_supervision),
    }
    return args if hp.downsampling == "maxpool" else {**args, "downsampling": hp.downsampling}


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
    """Names of the parameters and buffers that hold NaN or Inf (a diverged run). One read from the device when
    all are finite: checked every epoch, it must not wait on the GPU once per tensor."""
    values = [(name, value) for name, value in [*model.named_parameters(), *model.named_buffers()]
              if value.is_floating_point()]
    if torch.stack([torch.isfinite(value).all() for _, value in values]).all():
        return []
    return [name for name, value in values if not torch.isfinite(value).all()]


