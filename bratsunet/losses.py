"""The training losses (soft Dice, the V-Net modified Dice, Dice + cross-entropy, deep supervision) and the rule from
outputs to probabilities to labels that inference shares; the label/region table lives in conventions.py."""
import torch
import torch.nn.functional as F

from bratsunet.conventions import ALL_REGIONS, BRATS_LABELS, INTERNAL_LABEL_NAMES, REGION_NAMES

# ------------------------------------------------------------------ losses (torch, float32)
# Tensors are (B, C, X, Y, Z); labels are internal labels (B, X, Y, Z). target "regions": sigmoid
# channels WT, TC, ET (and RC for BraTS 2024); target "labels": softmax channels for the internal labels
# 0..3 (0..4 for BraTS 2024). The channel count of the network's output says which.
LOSSES = ("dice_ce", "dice", "modified_dice")
TARGETS = ("regions", "labels")

# (4 regions, 5 labels): 1 where a label belongs to a region; indexing it with labels gives region targets
_REGION_TABLE = torch.tensor([[label in members for label in range(len(INTERNAL_LABEL_NAMES))]
                              for members in ALL_REGIONS.values()], dtype=torch.float32)


def one_hot_targets(labels, target, channels=None):
    """Internal labels (B, X, Y, Z) -> float32 targets (B, C, X, Y, Z): the first C regions (default 3: WT, TC,
    ET) or a one-hot of C labels (default 4)."""
    labels = labels.long()
    if target == "regions":
        table = _REGION_TABLE[:channels or len(REGION_NAMES)].to(labels.device)
        return table[:, labels].movedim(0, 1)  # (C, B, ...) -> (B, C, ...)
    return F.one_hot(labels, channels or len(BRATS_LABELS)).movedim(-1, 1).float()  # (B, C, X, Y, Z)


def at_least_float32(tensor):
    """bf16/fp16 -> float32 (sums over millions of voxels need it, even under autocast); float64 stays."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def logits_to_probabilities(logits, target):
    """Probabilities in float32 (or float64); the channel axis is the 4th from the end, so (C, X, Y, Z)
    and (B, C, X, Y, Z) both work."""
    logits = at_least_float32(logits)
    return torch.sigmoid(logits) if target == "regions" else torch.softmax(logits, dim=-4)


def probabilities_to_labels(probs, target):
    """Probabilities (C, X, Y, Z) or (B, C, X, Y, Z) -> internal labels uint8 (X, Y, Z) or (B, X, Y, Z).

    Regions nest: background unless WT > 0.5; inside WT label 2 (edema), where TC is also > 0.5
    label 1 (core), where ET is also > 0.5 label 3 (enhancing). A fourth region channel (RC, BraTS 2024)
    gives label 4 where RC > 0.5 outside WT: the tumor wins where both are predicted.
    """
    if target == "regions":
        wt, tc, et, *cavity = (probs > 0.5).unbind(-4)
        labels = torch.where(wt & et, 3, torch.where(wt & tc, 1, torch.where(wt, 2, 0)))
        if cavity:
            labels = torch.where(cavity[0] & ~wt, 4, labels)
    else:
        labels = probs.argmax(-4)
    return labels.to(torch.uint8)


def dice_sum_dims(batch_dice):
    """The axes the Dice sums over: the batch and space (one Dice per channel: batch Dice), or space alone (one per
    patch and channel, nnU-Net's choice for BraTS at full resolution)."""
    return (0, 2, 3, 4) if batch_dice else (2, 3, 4)


def soft_dice_loss(probs, targets, smooth=1.0, batch_dice=True):
    """1 - (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth), averaged over channels (and patches without
    batch_dice)."""
    dims = dice_sum_dims(batch_dice)
    dice = (2 * (probs * targets).sum(dims) + smooth) / (probs.sum(dims) + targets.sum(dims) + smooth)
    return 1 - dice.mean()


def modified_dice_loss(probs, targets, eps=1e-5, batch_dice=True):
    """The V-Net loss: 1 - 2 sum(p g) / (sum(p^2) + sum(g^2) + eps), averaged over channels (and patches without
    batch_dice).

    A channel absent from both target and prediction scores 1 (Dice 0) and gives no gradient.
    """
    dims = dice_sum_dims(batch_dice)
    dice = 2 * (probs * targets).sum(dims) / ((probs ** 2).sum(dims) + (targets ** 2).sum(dims) + eps)
    return 1 - dice.mean()


def single_resolution_loss(logits, labels, hp):
    logits = at_least_float32(logits)
    targets = one_hot_targets(labels, hp.target, logits.shape[1]).to(logits.dtype)  # (B, C, X, Y, Z)
    probs = logits_to_probabilities(logits, hp.target)
    if hp.target == "labels":  # Dice on the tumor labels only: background Dice is ~1 and says little
        probs, dice_targets = probs[:, 1:], targets[:, 1:]
    else:
        dice_targets = targets
    if hp.loss == "modified_dice":
        return modified_dice_loss(probs, dice_targets, batch_dice=hp.batch_dice)
    value = soft_dice_loss(probs, dice_targets, hp.dice_smooth, hp.batch_dice)
    if hp.loss == "dice_ce":
        if hp.target == "regions":
            value = value + F.binary_cross_entropy_with_logits(logits, targets)
        else:
            value = value + F.cross_entropy(logits, labels.long())
    return value


def downsample_labels(labels, shape):
    """Labels (B, X, Y, Z) -> (B, *shape) for a lower-resolution output: in each cell of s voxels the one at offset
    s // 2, the voxel at the cell's centre (its upper middle voxel for even s), as nnU-Net's nearest-exact
    interpolation picks it. The cell's first voxel would lie 0.5, 1.5 and 3.5 voxels off-centre at 1/2, 1/4, 1/8."""
    steps = [full // low for full, low in zip(labels.shape[1:], shape)]
    return labels[:, steps[0] // 2::steps[0], steps[1] // 2::steps[1], steps[2] // 2::steps[2]]


def deep_supervision_weights(levels):
    """nnU-Net's weights: halving per level (full resolution first), normalized to sum 1. nnU-Net also gives
    the lowest decoder level weight 0; model.UNet3D does not make that output, so `levels` excludes it."""
    weights = [0.5 ** level for level in range(levels)]
    return [w / sum(weights) for w in weights]


def make_loss(hp):
    """fn(logits, labels) -> float32 scalar; logits (B, C, X, Y, Z) or, with deep supervision, a list of
    them at decreasing resolutions (full first), each scored against the labels at the centres of its cells."""
    if hp.loss not in LOSSES or hp.target not in TARGETS:
        raise ValueError(f"loss must be one of {LOSSES} and target one of {TARGETS}, got {hp.loss!r}, {hp.target!r}")

    def loss_fn(logits, labels):
        if isinstance(logits, torch.Tensor):
            return single_resolution_loss(logits, labels, hp)
        total = 0.0
        for weight, level_logits in zip(deep_supervision_weights(len(logits)), logits):
            level_labels = downsample_labels(labels, level_logits.shape[2:])
            total = total + weight * single_resolution_loss(level_logits, level_labels, hp)
        return total

    return loss_fn


