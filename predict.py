"""Whole-volume inference.

sliding_window() runs a network trained on patches over a whole volume: overlapping windows,
the last one on each axis flush with the far border (the 155-slice axis of BraTS is not a multiple
of any window), outputs blended with Gaussian weights so that the poorly informed window borders
count less.
"""
import itertools

import torch


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
