"""bratsunet/augmentation.py: nnU-Net's transforms, their probabilities and ranges, hand-computed geometry, batchgeneratorsv2
(nnU-Net's own library) as the reference for the intensity transforms, and determinism."""
import math

import numpy as np
import pytest
import torch

from bratsunet import augmentation, hyperparameters
from bratsunet.loader import PatchDataset, crop_padded
from test_dataset import write_prepared

ALL_ON = dict.fromkeys(augmentation.PROBABILITIES, 1.0)
ONLY_SPATIAL = {**dict.fromkeys(augmentation.PROBABILITIES, 0.0), "rotation": 1.0, "scaling": 1.0}


def labelled_volume(shape=(40, 36, 30), seed=0):
    """A float16 image (3, ...) that is nonzero inside a box ('brain') and labels 0, 1, 3 inside it."""
    rng = np.random.default_rng(seed)
    image = np.zeros((3, *shape), dtype=np.float16)
    image[:, 4:-4, 4:-4, 3:-3] = rng.standard_normal((3, shape[0] - 8, shape[1] - 8, shape[2] - 6))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[10:25, 10:20, 8:20] = 1
    labels[14:20, 12:18, 10:16] = 3
    return image, labels


def make_patch(image, labels, start, patch, params):
    corner, size, params["centre"] = augmentation.source_box(params, start, patch, labels.shape)
    box = torch.from_numpy(crop_padded(image, corner, size, np.float16))
    box_labels = torch.from_numpy(crop_padded(labels, corner, size, np.uint8))
    return box, box_labels, params


@pytest.mark.parametrize("seed", range(4))
def test_every_transform_keeps_shape_dtype_and_label_values(seed):
    image, labels = labelled_volume()
    patch = (16, 24, 16)
    params = augmentation.draw_nnunet(np.random.default_rng(seed), 3, ALL_ON)
    out, out_labels = augmentation.augment_patch(*make_patch(image, labels, [8, 6, 6], patch, params), patch)
    assert out.shape == (3, *patch) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out_labels.shape == patch and out_labels.dtype == torch.int64
    assert set(out_labels.unique().tolist()) <= {0, 1, 3} and (out_labels > 0).any()
    assert not out[:, out_labels > 0].eq(0).all(0).any()  # tumor voxels lie in the brain: never zeroed
    assert out[:, (out != 0).any(0)].std() > 0.1


def test_identity_rotation_and_scale_give_the_crop_back():
    image, labels = labelled_volume()
    params = augmentation.draw_nnunet(np.random.default_rng(0), 3, dict.fromkeys(augmentation.PROBABILITIES, 0.0))
    params.update(spatial=True, affine=np.eye(3, dtype=np.float32))  # resampled, through the identity
    box, box_labels, params = make_patch(image, labels, [5, 7, 3], (16, 16, 16), params)
    assert list(box.shape[1:]) != [16, 16, 16]  # the larger region was cut, the patch read from inside it
    out, out_labels = augmentation.augment_patch(box, box_labels, params, (16, 16, 16))
    crop = crop_padded(image, [5, 7, 3], (16, 16, 16), np.float32)
    np.testing.assert_allclose(out.numpy(), crop, atol=1e-5)
    np.testing.assert_array_equal(out_labels.numpy(), crop_padded(labels, [5, 7, 3], (16, 16, 16), np.int64))


def test_90_degree_rotation_lands_where_computed_by_hand():
    """A voxel 2 along x from the centre, turned +90 deg about z (x -> y): patch voxel u reads centre + R u,
    R u = (-u_y, u_x, u_z) = (2, 0, 0) for u = (0, -2, 0), so it lands 2 below the centre along y."""
    volume = np.zeros((1, 9, 9, 9), dtype=np.float16)
    volume[0, 6, 4, 4] = 5  # centre (4, 4, 4) + (2, 0, 0)
    labels = (volume[0] > 0).astype(np.uint8) * 2
    params = augmentation.draw_nnunet(np.random.default_rng(0), 1, dict.fromkeys(augmentation.PROBABILITIES, 0.0))
    params.update(spatial=True, affine=augmentation.rotation_matrix([0, 0, math.pi / 2]).astype(np.float32))
    out, out_labels = augmentation.augment_patch(*make_patch(volume, labels, [0, 0, 0], (9, 9, 9), params), (9, 9, 9))
    expected = np.zeros((9, 9, 9))
    expected[4, 2, 4] = 5
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(out_labels.numpy(), (expected > 0) * 2)


def test_rotated_and_scaled_patches_have_no_empty_corners_inside_the_volume():
    image = np.ones((1, 80, 80, 80), dtype=np.float16)
    labels = np.ones((80, 80, 80), dtype=np.uint8)
    for seed in range(6):
        params = augmentation.draw_nnunet(np.random.default_rng(seed), 1, ONLY_SPATIAL)
        out, out_labels = augmentation.augment_patch(*make_patch(image, labels, [24, 24, 24], (32, 32, 32), params),
                                                (32, 32, 32))
        assert out.min() > 0.999 and out_labels.min() == 1  # a patch-sized crop would leave zero corners


def test_probabilities_and_ranges_are_nnunets():
    draws = [augmentation.draw_nnunet(np.random.default_rng([5, i]), 4) for i in range(4000)]
    p = augmentation.PROBABILITIES

    def share(hits, expected, n=len(draws)):
        assert abs(np.mean(hits) - expected) <= 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9

    zoom = np.array([np.cbrt(abs(np.linalg.det(d["affine"]))) for d in draws])
    share(zoom != 1, p["scaling"])  # (rotation and mirroring keep the determinant's size)
    assert zoom.min() >= 0.7 - 1e-5 and zoom.max() <= 1.4 + 1e-5
    rotated = [not np.allclose(np.abs(d["affine"]), np.eye(3) * z, atol=1e-6) for d, z in zip(draws, zoom)]
    share(rotated, p["rotation"])
    share([d["spatial"] for d in draws], 1 - (1 - p["rotation"]) * (1 - p["scaling"]))
    share(np.concatenate([d["mirror"] for d in draws]), p["mirror"], 3 * len(draws))
    noise = np.array([d["noise_std"] for d in draws])
    share(noise > 0, p["noise"])
    assert noise.max() <= 0.1
    for name, low, high in (("brightness", 0.75, 1.25), ("contrast", 0.75, 1.25), ("gamma", 0.7, 1.5),
                            ("gamma_inverted", 0.7, 1.5)):
        factors = np.stack([d[name] for d in draws])  # (draws, channels)
        drawn = (factors != 1).any(1)
        share(drawn, p[name])
        assert (factors[drawn] != 1).all()  # every channel, each its own factor
        assert factors.min() >= low and factors.max() <= high
        share(factors[drawn] < 1, 0.5, factors[drawn].size)  # half below 1 (nnU-Net's BGContrast)
    for name, low, high in (("blur_sigma", 0.5, 1.0), ("low_resolution", 0.5, 1.0)):
        values = np.stack([d[name] for d in draws])
        changed = (values != 0) if name == "blur_sigma" else (values != 1)
        changed = changed.any(-1) if name == "blur_sigma" else changed  # (draws, channels)
        drawn = changed.any(1)
        # drawn when the transform is (p) and at least one of 4 channels is (per channel p 0.5)
        share(drawn, p[name.split("_sigma")[0]] * (1 - 0.5 ** 4))
        share(changed[drawn], 0.5 / (1 - 0.5 ** 4), changed[drawn].size)
        chosen = values[changed] if name == "blur_sigma" else values[changed]
        assert chosen.min() >= low and chosen.max() <= high


def test_brightness_contrast_gamma_and_low_resolution_agree_with_batchgeneratorsv2():
    pytest.importorskip("batchgeneratorsv2")
    from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
    from batchgeneratorsv2.transforms.intensity.contrast import ContrastTransform
    from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
    from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
    image = torch.randn(1, 3, 20, 18, 16, generator=torch.Generator().manual_seed(1)).double()
    brightness, contrast = torch.tensor([[0.8, 1.2, 1.0]]), torch.tensor([[1.25, 0.9, 1.0]])
    ours = augmentation.brightness_contrast(image.clone(), brightness, contrast)[0]
    everything = torch.arange(3)
    theirs = MultiplicativeBrightnessTransform(1, False)._apply_to_image(
        image[0].clone(), apply_to_channel=everything, multipliers=brightness[0].double())
    theirs = ContrastTransform(1, True, False)._apply_to_image(theirs, apply_to_channel=everything,
                                                               multipliers=contrast[0].double())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)  # the factors are float32
    for invert in (False, True):
        gammas = torch.tensor([[0.7, 1.0, 1.5]])
        ours = augmentation.gamma(image.clone(), gammas, invert)[0]
        theirs = GammaTransform(1, float(invert), False, 1, 1)._apply_to_image(
            image[0].clone(), apply_to_channel=torch.tensor([0, 2]), retain_stats=torch.tensor([True, True]),
            invert_image=torch.tensor([invert, invert]), gamma=gammas[0, [0, 2]].double())
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)  # the factors are float32
    factors = torch.tensor([[0.5, 1.0, 0.77]])
    ours = augmentation.simulate_low_resolution(image.clone(), factors)[0]
    theirs = SimulateLowResolutionTransform(1, False, True, None)._apply_to_image(
        image[0].clone(), apply_to_channel=[0, 2], scales=torch.tensor([[0.5] * 3, [0.77] * 3]))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)  # the factors are float32


def test_blur_matches_a_float64_gaussian_filter_inside():
    """Against scipy's Gaussian filter (independent code); edges differ by padding (nnU-Net reflects, we
    replicate), so the comparison keeps away from them."""
    from scipy import ndimage
    image = torch.randn(1, 2, 24, 20, 22, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([[[0.5, 0.8, 1.0], [0.0, 0.0, 0.0]]])
    out = augmentation.gaussian_blur(image.clone(), sigma)[0]
    reference = ndimage.gaussian_filter(image[0, 0].double().numpy(), [0.5, 0.8, 1.0], truncate=3 / 0.5)
    inner = (slice(4, -4),) * 3
    np.testing.assert_allclose(out[0].numpy()[inner], reference[inner], atol=2e-3)
    assert torch.equal(out[1], image[0, 1])  # sigma 0: untouched


def test_noise_has_the_drawn_std_and_follows_its_seed():
    image = torch.zeros(2, 2, 32, 32, 32)
    out = augmentation.add_noise(image.clone(), torch.tensor([0.05, 0.0]), torch.tensor([7, 8]))
    assert out[0].std().item() == pytest.approx(0.05, rel=0.02) and not out[1].any()
    assert torch.equal(out, augmentation.add_noise(image.clone(), torch.tensor([0.05, 0.0]), torch.tensor([7, 8])))


def test_patches_are_the_same_per_patch_and_batched_and_follow_the_seed(tmp_path):
    image, labels = labelled_volume()
    write_prepared(tmp_path, {"a": (image, labels, "train"), "b": (image[:, ::-1].copy(), labels[::-1], "train")})
    settings = dict(patch_size=(16, 16, 16), foreground_fraction=0.5, augment="nnunet", samples_per_epoch=8)
    workers = PatchDataset(tmp_path, ["a", "b"], seed=3, **settings)
    device = PatchDataset(tmp_path, ["a", "b"], seed=3, on_device=True, **settings)
    again, other = PatchDataset(tmp_path, ["a", "b"], seed=3, **settings), PatchDataset(tmp_path, ["a", "b"], seed=4, **settings)
    batch = augmentation.to_device(augmentation.collate([device[(2, i)] for i in range(8)]), torch.device("cpu"), (16,) * 3)
    for i in range(8):
        patch, patch_labels = workers[(2, i)]
        torch.testing.assert_close(batch[0][i], patch, rtol=1e-5, atol=1e-5)
        assert torch.equal(batch[1][i], patch_labels)
        assert all(torch.equal(x, y) for x, y in zip(patch_labels, again[(2, i)][1]))
        assert torch.equal(patch, again[(2, i)][0])
    assert sum(not torch.equal(workers[(2, i)][0], other[(2, i)][0]) for i in range(8)) >= 7


def test_augment_setting_takes_the_three_modes_and_the_old_booleans():
    assert hyperparameters.load(overrides={"augment": "nnunet"}).augment == "nnunet"
    assert hyperparameters.load(overrides={"augment": "True"}).augment == "light"
    assert hyperparameters.load(overrides={"augment": "False"}).augment == "none"
    with pytest.raises(hyperparameters.HyperparameterError, match=r"'augment' must be none \| light \| nnunet"):
        hyperparameters.load(overrides={"augment": "strong"})
