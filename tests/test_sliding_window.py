"""Sliding-window inference: exact reconstruction, border coverage, blending weights, MONAI agreement."""
import math

import pytest
import torch

from bratsunet.inference import sliding_window, window_starts

SHAPES = [(2, 37, 41, 29), (1, 10, 20, 7), (1, 16, 33, 16)]  # axes not a multiple of, smaller than, equal to 16


def identity(batch):
    return batch.clone()


def test_window_starts_cover_axis_and_end_at_border():
    assert window_starts(155, 64, 32) == [0, 32, 64, 91]  # last window flush with slice 154
    assert window_starts(64, 64, 32) == [0]
    assert window_starts(10, 16, 8) == [0]
    assert window_starts(37, 16, 16) == [0, 16, 21]
    assert window_starts(20, 4, 1) == list(range(17))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("gaussian", [True, False])
def test_identity_model_gives_back_the_input(shape, overlap, gaussian):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(0))  # in [0, 1) like probabilities
    output = sliding_window(identity, image, (16, 16, 16), overlap=overlap, batch_size=3, gaussian=gaussian)
    assert output.shape == image.shape and output.dtype == torch.float32
    # float32 rounding grows with the windows summed per voxel: up to 8 at overlap 0.5, 125 at 0.8;
    # a seam or an uncovered border would be off by ~1 (or NaN).
    assert torch.allclose(output, image, atol=2e-6 if overlap <= 0.5 else 1e-5, rtol=0)


def test_constant_model_gives_constant_output_with_its_channel_count():
    def constant(batch):  # (B, 2, ...) -> (B, 3, ...) in bfloat16, as under autocast
        return torch.full((batch.shape[0], 3, *batch.shape[2:]), 2.5, dtype=torch.bfloat16)

    output = sliding_window(constant, torch.zeros(2, 37, 41, 29), (16, 16, 16), overlap=0.5)
    assert output.shape == (3, 37, 41, 29) and output.dtype == torch.float32
    assert torch.allclose(output, torch.full_like(output, 2.5), atol=1e-5, rtol=0)  # float32 sums


def test_gaussian_blend_of_two_windows_matches_hand_computation():
    # Two windows along x (starts 0 and 8); each "predicts" its own constant: 1.0 and 3.0.
    def window_constant(batch):
        sees_positive = batch.amax(dim=(1, 2, 3, 4), keepdim=True) > 0  # (B, 1, 1, 1, 1)
        return (1.0 + 2.0 * sees_positive).expand(-1, 1, *batch.shape[2:]).clone()

    image = torch.zeros(1, 24, 1, 1)
    image[0, 16:] = 1  # only the second window sees positive voxels
    output = sliding_window(window_constant, image, (16, 1, 1), overlap=0.5, batch_size=1)

    def weight(i):  # float64 Gaussian, sigma = 16 / 8 around the window centre 7.5, floor 1e-3
        return max(math.exp(-0.5 * ((i - 7.5) / 2.0) ** 2), 1e-3)

    for x in range(24):
        first = weight(x) if x < 16 else 0.0
        second = weight(x - 8) if x >= 8 else 0.0
        expected = (1.0 * first + 3.0 * second) / (first + second)
        assert output[0, x, 0, 0].item() == pytest.approx(expected, abs=1e-5)


def test_batch_size_does_not_change_the_result():
    image = torch.randn(2, 37, 41, 29, generator=torch.Generator().manual_seed(1))
    net = small_net()
    one = sliding_window(net, image, (16, 16, 16), batch_size=1)
    five = sliding_window(net, image, (16, 16, 16), batch_size=5)
    assert torch.allclose(one, five, atol=1e-5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        sliding_window(identity, torch.zeros(1, 8, 8, 8), (4, 4, 4), overlap=1.0)
    with pytest.raises(ValueError, match="C, X, Y, Z"):
        sliding_window(identity, torch.zeros(1, 1, 8, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="predict_fn returned"):
        sliding_window(lambda b: b[:, :, :2], torch.zeros(1, 8, 8, 8), (4, 4, 4))


def small_net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 3, padding=1))
    return net.eval()


@pytest.mark.parametrize("shape", [(2, 37, 41, 29), (2, 12, 41, 20)])
@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.7])
@pytest.mark.parametrize("gaussian", [True, False])
def test_agrees_with_monai_sliding_window_inference(shape, overlap, gaussian):
    # MONAI places windows the same way (stride int(window * (1 - overlap)), last window shifted back
    # to the border), pads small volumes evenly on both sides, and its Gaussian uses
    # sigma = sigma_scale * window with a 1e-3 floor: sigma_scale 1/8 is our sigma = window / 8.
    monai_inferers = pytest.importorskip("monai.inferers")
    net = small_net()
    image = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    ours = sliding_window(net, image, (16, 16, 16), overlap=overlap, batch_size=2, gaussian=gaussian)
    with torch.no_grad():
        theirs = monai_inferers.sliding_window_inference(
            image[None], (16, 16, 16), 2, net, overlap=overlap,
            mode="gaussian" if gaussian else "constant", sigma_scale=0.125)[0]
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, torch.as_tensor(theirs), atol=1e-4, rtol=0)
