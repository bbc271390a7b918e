import itertools

import numpy as np
import pytest
import torch

from bratsunet import hyperparameters, losses
from bratsunet.conventions import REGIONS, brats_to_internal, labels_to_regions
from bratsunet.losses import (deep_supervision_weights, logits_to_probabilities, make_loss, one_hot_targets, probabilities_to_labels)
from bratsunet.metrics import HD95_EMPTY, accuracy, dice_per_region, hd95, region_metrics
from conftest import SAMPLE_DIR, monai_scores

REFERENCE_DIR = SAMPLE_DIR / "reference_segmentations"
LOSSES = ["dice_ce", "dice", "modified_dice"]
TARGETS = ["regions", "labels"]


def loss_fn(loss, target):
    return make_loss(hyperparameters.load(overrides={"loss": loss, "target": target}))


def random_batch(target, shape=(2, 4, 4, 4), seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, shape, generator=generator)
    channels = 3 if target == "regions" else 4
    logits = 2 * torch.randn(shape[0], channels, *shape[1:], generator=generator, dtype=dtype)
    return logits, labels


# ------------------------------------------------------------------ float64 numpy reference
def reference_loss(logits, labels, loss, target, batch_dice=True, smooth=1.0):
    x, labels = logits.detach().double().numpy(), labels.numpy()
    if target == "regions":
        g = np.stack([np.isin(labels, members) for members in REGIONS.values()], axis=1).astype(float)
        p = 1 / (1 + np.exp(-x))
        ce = np.mean(np.maximum(x, 0) - x * g + np.log1p(np.exp(-np.abs(x))))
        dice_p, dice_g = p, g
    else:
        g = (labels[:, None] == np.arange(4)[None, :, None, None, None]).astype(float)
        e = np.exp(x - x.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        ce = -np.mean(np.sum(g * np.log(p), axis=1))
        dice_p, dice_g = p[:, 1:], g[:, 1:]  # background is left out of Dice for softmax
    axes = (0, 2, 3, 4) if batch_dice else (2, 3, 4)  # per patch: a Dice per (patch, channel), all averaged
    tp = (dice_p * dice_g).sum(axes)
    if loss == "modified_dice":
        return 1 - np.mean(2 * tp / ((dice_p ** 2).sum(axes) + (dice_g ** 2).sum(axes) + 1e-5))
    dice = 1 - np.mean((2 * tp + smooth) / (dice_p.sum(axes) + dice_g.sum(axes) + smooth))
    return dice + ce if loss == "dice_ce" else dice


@pytest.mark.parametrize("loss, target", list(itertools.product(LOSSES, TARGETS)))
def test_loss_matches_float64_reference(loss, target):
    logits, labels = random_batch(target)
    value = loss_fn(loss, target)(logits, labels)
    assert value.dtype == torch.float32 and value.ndim == 0
    assert value.item() == pytest.approx(reference_loss(logits, labels, loss, target), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss, target", list(itertools.product(LOSSES, TARGETS)))
def test_per_patch_dice_with_nnunets_smoothing_matches_float64_reference(loss, target):
    logits, labels = random_batch(target, shape=(3, 4, 4, 4), seed=4)
    labels[1] = 0  # a patch without tumor: per patch its Dice is 1 only where nothing is predicted
    hp = hyperparameters.load(overrides={"loss": loss, "target": target, "batch_dice": False, "dice_smooth": 1e-5})
    value = make_loss(hp)(logits, labels).item()
    assert value == pytest.approx(reference_loss(logits, labels, loss, target, False, 1e-5), rel=1e-5, abs=1e-6)
    assert value != pytest.approx(reference_loss(logits, labels, loss, target), rel=1e-3)  # not the batch Dice


@pytest.mark.parametrize("loss, target", list(itertools.product(LOSSES, TARGETS)))
def test_loss_gradient_matches_finite_differences(loss, target):
    logits, labels = random_batch(target, shape=(1, 2, 2, 2), dtype=torch.float64)
    fn = loss_fn(loss, target)
    assert torch.autograd.gradcheck(lambda x: fn(x, labels), (logits.requires_grad_(),))


@pytest.mark.parametrize("loss, target", list(itertools.product(LOSSES, TARGETS)))
def test_perfect_prediction_scores_about_zero(loss, target):
    labels = torch.arange(4).repeat_interleave(16).reshape(1, 4, 4, 4)  # every label (and region) present
    targets = one_hot_targets(labels, target)
    logits = 30 * (2 * targets - 1)
    assert loss_fn(loss, target)(logits, labels).item() == pytest.approx(0, abs=1e-4)
    assert loss_fn(loss, target)(-logits, labels).item() > 0.9  # and a wrong one does not


@pytest.mark.parametrize("loss, target", list(itertools.product(LOSSES, TARGETS)))
def test_loss_is_float32_under_bf16_autocast(loss, target):
    x, labels = random_batch(target, seed=1)
    conv = torch.nn.Conv3d(x.shape[1], x.shape[1], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(x)
        assert logits.dtype == torch.bfloat16
        value = loss_fn(loss, target)(logits, labels)
    assert value.dtype == torch.float32
    expected = reference_loss(logits.float(), labels, loss, target)  # same bf16 logits, float64 math
    assert value.item() == pytest.approx(expected, rel=1e-4)


def nearest_exact(labels, shape):
    """The labels at a lower resolution as nnU-Net makes its deep-supervision targets (batchgeneratorsv2's
    DownsampleSegForDSTransform: torch's nearest-exact interpolation)."""
    return torch.nn.functional.interpolate(labels[:, None].float(), size=tuple(shape), mode="nearest-exact")[:, 0].long()


def test_deep_supervision_loss_weights_halve_per_level():
    labels = torch.randint(0, 4, (2, 16, 16, 8), generator=torch.Generator().manual_seed(2))
    logits = [torch.randn(2, 3, 16 // 2 ** i, 16 // 2 ** i, 8 // 2 ** i) for i in range(4)]
    fn = loss_fn("dice_ce", "regions")
    lower = [nearest_exact(labels, level.shape[2:]) for level in logits]
    expected = sum(w * fn(l, lab) for w, l, lab in zip([8 / 15, 4 / 15, 2 / 15, 1 / 15], logits, lower))
    assert fn(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_deep_supervision_targets_are_the_centres_of_their_cells():
    """A tumor on the odd voxels only: at 1/2 resolution every cell of 2^3 voxels has it at its centre (the upper
    middle voxel, offset 1), so the target is all tumor; the cell's first voxel would see none of it."""
    labels = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    labels[:, 1::2, 1::2, 1::2] = 3  # enhancing tumor, on the odd voxels of every axis
    # in the loss: outputs that predict tumor everywhere at 1/2 resolution are right there
    right = [30 * (2 * one_hot_targets(level, "regions") - 1) for level in (labels, torch.full((1, 4, 4, 4), 3))]
    assert loss_fn("dice", "regions")(right, labels).item() == pytest.approx(0, abs=1e-4)
    half = losses.downsample_labels(labels, (4, 4, 4))
    assert (half == 3).all()
    assert torch.equal(half, nearest_exact(labels, (4, 4, 4)))
    # at 1/4 and 1/8 the voxels at offsets 2 and 4 of each cell, by hand and as nearest-exact picks them
    labels = torch.randint(0, 4, (2, 16, 16, 16), generator=torch.Generator().manual_seed(5))
    for step in (2, 4, 8):
        low = losses.downsample_labels(labels, [16 // step] * 3)
        assert torch.equal(low, labels[:, step // 2::step, step // 2::step, step // 2::step])
        assert torch.equal(low, nearest_exact(labels, low.shape[1:]))


def test_deep_supervision_weights_are_nnunets():
    """nnU-Net (nnUNetTrainer._build_loss): 1 / 2^i per decoder level, the lowest set to 0, normalized. Our
    network makes no lowest-level output, so its weights are nnU-Net's without that 0."""
    for decoder_levels in (2, 3, 5):
        nnunet = np.array([1 / 2 ** i for i in range(decoder_levels)])
        nnunet[-1] = 0
        nnunet = nnunet / nnunet.sum()
        assert deep_supervision_weights(decoder_levels - 1) == pytest.approx(nnunet[:-1].tolist(), abs=1e-12)


# ------------------------------------------------------------------ labels <-> regions <-> probabilities
def test_region_targets_match_numpy_table():
    labels = torch.randint(0, 4, (2, 5, 4, 3))
    regions = one_hot_targets(labels, "regions")
    assert regions.shape == (2, 3, 5, 4, 3)
    assert np.array_equal(regions.numpy().astype(bool), labels_to_regions(labels.numpy()).transpose(1, 0, 2, 3, 4))


@pytest.mark.parametrize("target", TARGETS)
def test_labels_round_trip_through_probabilities(target):
    labels = torch.randint(0, 4, (2, 5, 4, 3))
    probs = one_hot_targets(labels, target) * 0.8 + 0.1  # soft but on the right side of 0.5 / the argmax
    assert torch.equal(probabilities_to_labels(probs, target), labels.to(torch.uint8))
    assert torch.equal(probabilities_to_labels(probs[1], target), labels[1].to(torch.uint8))  # (C, X, Y, Z)


def test_region_probabilities_nest():
    # voxels: nothing, WT only, WT+TC, WT+TC+ET, ET without WT, WT+ET without TC
    wt, tc, et = [0, 1, 1, 1, 0, 1], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]
    probs = torch.tensor([wt, tc, et], dtype=torch.float32).reshape(3, 6, 1, 1) * 0.98 + 0.01
    assert probabilities_to_labels(probs, "regions").flatten().tolist() == [0, 2, 1, 3, 0, 3]


def test_logits_to_probabilities():
    logits = torch.randn(2, 4, 3, 3, 3, dtype=torch.bfloat16)
    probs = logits_to_probabilities(logits, "labels")
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(1), torch.ones(2, 3, 3, 3))
    assert torch.allclose(logits_to_probabilities(logits[0], "labels"), probs[0])  # (C, X, Y, Z) too
    assert torch.allclose(logits_to_probabilities(logits, "regions"), torch.sigmoid(logits.float()))


# ------------------------------------------------------------------ metrics: hand cases and empty rules
def cube_pair():
    pred = np.zeros((5, 5, 5), np.uint8)
    pred[1:3, 1:3, 1:3] = 3  # 8 voxels of ET
    truth = pred.copy()
    truth[2, 2, 2] = 2  # one voxel edema instead
    return pred, truth


def test_metrics_hand_computed():
    pred, truth = cube_pair()
    assert dice_per_region(pred, truth) == {"WT": 1.0, "TC": pytest.approx(14 / 15), "ET": pytest.approx(14 / 15)}
    assert accuracy(pred, truth) == pytest.approx(124 / 125)
    # pred surface -> truth surface: seven 0s and one 1; linear interpolation at 95%: 0.95 * 7 = 6.65 -> 0.65
    assert hd95(pred == 3, truth == 3) == pytest.approx(0.65)
    metrics = region_metrics(torch.from_numpy(pred), truth, spacing=(1.0, 2.0, 0.5))
    assert metrics["ET"] == {"dice": pytest.approx(14 / 15), "hd95": pytest.approx(0.65 * 0.5),
                             "sensitivity": 1.0, "specificity": pytest.approx(117 / 118),
                             "volume_pred": 8.0, "volume_true": 7.0}


def test_hd95_single_voxels_with_anisotropic_spacing():
    a, b = np.zeros((3, 3, 8), bool), np.zeros((3, 3, 8), bool)
    a[1, 1, 1], b[1, 2, 5] = True, True
    assert hd95(a, b, spacing=(1.0, 3.0, 2.0)) == pytest.approx(np.hypot(3.0, 8.0))


def test_empty_conventions():
    empty, tumor = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)
    tumor[1:3, 1:3, 1:3] = 2  # edema only: WT present, TC and ET empty in both
    assert dice_per_region(empty, empty) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    assert dice_per_region(tumor, empty) == {"WT": 0.0, "TC": 1.0, "ET": 1.0}
    assert dice_per_region(empty, tumor)["WT"] == 0.0
    assert hd95(empty, empty) == 0.0
    assert hd95(tumor > 0, empty > 0) == hd95(empty > 0, tumor > 0) == HD95_EMPTY == 373.13
    metrics = region_metrics(empty, tumor)
    assert metrics["WT"]["hd95"] == 373.13 and metrics["WT"]["sensitivity"] == 0.0
    assert metrics["ET"] == {"dice": 1.0, "hd95": 0.0, "sensitivity": 1.0, "specificity": 1.0,
                             "volume_pred": 0.0, "volume_true": 0.0}


def test_accuracy_counts_all_labels():
    truth = np.array([[[0, 1, 2, 3]]])
    assert accuracy(np.array([[[0, 1, 3, 3]]]), truth) == 0.75
    with pytest.raises(ValueError, match="shape"):
        accuracy(truth[..., :3], truth)


# ------------------------------------------------------------------ metrics against MONAI
def ball(shape, center, radius, spacing=(1, 1, 1)):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, center, spacing)) <= radius ** 2


def generated_pair(seed):
    """Two label maps of nested shapes (edema ball, core box, enhancing ball) that disagree by offsets."""
    rng = np.random.default_rng(seed)
    shape = (40, 36, 28)
    maps = []
    for shift in (np.zeros(3), rng.uniform(-3, 3, 3)):
        center = np.array([20, 18, 14]) + shift
        labels = np.zeros(shape, np.uint8)
        labels[ball(shape, center, 10 + rng.uniform(-2, 2))] = 2
        lo, hi = (center - 5).astype(int), (center + 4).astype(int)
        labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
        labels[ball(shape, center + rng.uniform(-1, 1, 3), 3)] = 3
        maps.append(labels)
    return maps


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.7, 1.3, 2.5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_monai_on_generated_shapes(seed, spacing):
    pred, truth = generated_pair(seed)
    dice, hd = monai_scores(pred, truth, spacing)
    ours = region_metrics(pred, truth, spacing)
    for region in REGIONS:
        assert ours[region]["dice"] == pytest.approx(dice[region], rel=1e-6)
        assert ours[region]["hd95"] == pytest.approx(hd[region], rel=1e-5) and ours[region]["hd95"] > 0


def test_background_channel_handling_matches_monai():
    from monai.metrics import DiceMetric
    pred, truth = generated_pair(3)
    # a [background, WT] one-hot pair: include_background=False must drop channel 0 and leave WT
    p, t = (torch.from_numpy(np.stack([m == 0, m > 0]))[None].float() for m in (pred, truth))
    monai_wt = DiceMetric(include_background=False, reduction="none")(p, t)
    assert monai_wt.shape == (1, 1)
    assert dice_per_region(pred, truth)["WT"] == pytest.approx(monai_wt.item(), rel=1e-6)


def test_metrics_match_monai_on_real_segmentations():
    files = sorted(REFERENCE_DIR.glob("*.nii.gz"))
    if len(files) < 3:
        pytest.skip("real reference segmentations not found in ../shared/data/brats_sample")
    import nibabel as nib
    segs = [brats_to_internal(np.asanyarray(nib.load(f).dataobj)) for f in files[:3]]
    # MONAI is slow on 240 x 240 x 155: it gets the tumors' bounding box (same scores), ours the full volume
    box = tuple(slice(max(i.min() - 2, 0), i.max() + 3) for i in np.nonzero(sum(s > 0 for s in segs)))
    for (pred, truth), spacing in zip(itertools.combinations(segs, 2), [(1.0, 1.0, 1.0), (0.9, 1.1, 2.0),
                                                                         (1.2, 0.8, 1.0)]):
        dice, hd = monai_scores(pred[box], truth[box], spacing)
        ours = region_metrics(pred, truth, spacing)
        for region in REGIONS:
            assert ours[region]["dice"] == pytest.approx(dice[region], rel=1e-6)
            assert ours[region]["hd95"] == pytest.approx(hd[region], rel=1e-5)
