"""Training patches and validation volumes read from a small prepared_dir written by hand."""
import json

import numpy as np
import pytest
import torch

from bratsunet import loader
from bratsunet.loader import PatchDataset, VolumeDataset
from bratsunet.manifest import split_cases, read_manifest


def write_prepared(folder, cases):
    """cases: name -> (image (C, x, y, z), seg (x, y, z) or None, split), in prepare_dataset's layout."""
    entries = {}
    for name, (image, seg, split) in cases.items():
        np.save(folder / f"{name}.npy", image.astype(np.float16))
        if seg is not None:
            np.save(folder / f"{name}_seg.npy", seg.astype(np.uint8))
        entries[name] = {
            "image": f"{name}.npy", "seg": f"{name}_seg.npy" if seg is not None else None, "split": split,
            "crop_box": [[0, s] for s in image.shape[1:]], "original_shape": list(image.shape[1:]),
            "affine": np.eye(4).tolist(), "source_files": {}, "shape": list(image.shape),
            "tumor_voxels": int(np.count_nonzero(seg)) if seg is not None else 0}
    manifest = {"version": 1, "channel_names": [f"c{i}" for i in range(image.shape[0])], "settings": {},
                "cases": entries, "filtered": {}, "skipped": {}}
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder


def position_volume(shape, rng):
    """Channels x+1, y+1, z+1 (every voxel nonzero, so a patch tells where it came from) and random labels."""
    image = np.stack(np.meshgrid(*(np.arange(1, s + 1) for s in shape), indexing="ij")).astype(np.float32)
    return image, rng.integers(0, 4, shape).astype(np.uint8)


def assert_patch_is_crop(patch, labels, image, seg, patch_size):
    """The patch is one box of the volume, translated, with zeros (image and labels) around it."""
    patch, labels = patch.numpy(), labels.numpy()
    assert patch.shape == (image.shape[0], *patch_size) and labels.shape == tuple(patch_size)
    inside = patch[0] > 0  # (px, py, pz)
    assert inside.sum() == np.prod([min(s, p) for s, p in zip(seg.shape, patch_size)])
    positions = np.stack([patch[axis][inside] for axis in range(3)], axis=1).astype(int) - 1  # (N, 3)
    offsets = positions - np.argwhere(inside)
    assert (offsets == offsets[0]).all()
    x, y, z = positions.T
    np.testing.assert_array_equal(patch[:, inside], image[:, x, y, z])
    np.testing.assert_array_equal(labels[inside], seg[x, y, z])
    assert not patch[:, ~inside].any() and not labels[~inside].any()


@pytest.fixture
def position_cases(tmp_path):
    rng = np.random.default_rng(0)
    big, big_seg = position_volume((30, 25, 20), rng)
    small, small_seg = position_volume((6, 10, 5), rng)  # smaller than the patch on x and z
    healthy, _ = position_volume((12, 7, 12), rng)
    cases = {"big": (big, big_seg, "train"), "small": (small, small_seg, "train"),
             "healthy": (healthy, np.zeros((12, 7, 12)), "train")}
    return write_prepared(tmp_path, cases), cases


def test_split_cases_keeps_labelled_cases_of_each_split(tmp_path):
    image, seg = np.ones((1, 4, 4, 4)), np.zeros((4, 4, 4))
    write_prepared(tmp_path, {"b": (image, seg, "train"), "a": (image, seg, "train"), "v": (image, seg, "val"),
                              "u": (image, None, "unlabeled")})
    assert split_cases(read_manifest(tmp_path)) == (["a", "b"], ["v"])


@pytest.mark.parametrize("foreground_fraction", [0.0, 1.0])
def test_patches_are_crops_of_the_volume_padded_with_zeros(position_cases, foreground_fraction):
    folder, cases = position_cases
    patch_size = (8, 8, 8)
    data = PatchDataset(folder, list(cases), patch_size, foreground_fraction, augment=False, seed=1,
                        samples_per_epoch=60)
    assert len(data) == 60
    seen = set()
    for index in range(len(data)):
        patch, labels = data[index]
        assert patch.dtype == torch.float32 and labels.dtype == torch.int64
        # which case: told by the extent of the non-padding part (the shapes differ)
        inside = patch[0].numpy() > 0
        extent = tuple(int(inside.any(axis=tuple(a for a in range(3) if a != k)).sum()) for k in range(3))
        name = {(8, 8, 8): "big", (6, 8, 5): "small", (8, 7, 8): "healthy"}[extent]
        image, seg, _ = cases[name]
        assert_patch_is_crop(patch, labels, image, seg, patch_size)
        seen.add(name)
    assert seen == {"big", "small", "healthy"}


def tumor_cube_dataset(folder, foreground_fraction, samples):
    seg = np.zeros((40, 40, 40), dtype=np.uint8)
    seg[20:22, 20:22, 20:22] = 3
    write_prepared(folder, {"cube": (np.ones((1, 40, 40, 40)), seg, "train")})
    return PatchDataset(folder, ["cube"], (8, 8, 8), foreground_fraction, augment=False, seed=3,
                        samples_per_epoch=samples)


@pytest.mark.parametrize("foreground_fraction", [0.0, 0.33, 1.0])
def test_share_of_patches_with_tumor_follows_foreground_fraction(tmp_path, foreground_fraction):
    data = tumor_cube_dataset(tmp_path, foreground_fraction, samples=1000)
    share = np.mean([data[i][1].any().item() for i in range(len(data))])
    # A uniform 8^3 patch (33 starts per axis) holds part of the 2^3 cube for 9 starts per axis.
    natural = (9 / 33) ** 3
    expected = foreground_fraction + (1 - foreground_fraction) * natural
    sigma = np.sqrt(expected * (1 - expected) / len(data))
    assert abs(share - expected) <= 4 * sigma + 1e-9


def nnunet_forced(sample, batch_size, oversample_foreground_percent):
    """nnU-Net's rule (nnUNetDataLoader._oversample_last_XX_percent), written out: whether sample `sample` of a
    batch must hold foreground."""
    return not sample < round(batch_size * (1 - oversample_foreground_percent))


def edema_and_small_enhancing_tumor(folder):
    """A 40^3 case: 20^3 voxels of edema in one corner, 2^3 of enhancing tumor (no necrosis) in the other."""
    seg = np.zeros((40, 40, 40), dtype=np.uint8)
    seg[:20, :20, :20] = 2
    seg[36:38, 36:38, 36:38] = 3
    write_prepared(folder, {"case": (np.ones((1, 40, 40, 40)), seg, "train")})
    return folder


@pytest.mark.parametrize("global_batch", [2, 3, 4, 6])
def test_nnunet_sampling_centres_the_last_third_of_every_step_on_a_class_chosen_first(tmp_path, global_batch):
    """nnU-Net centres the last round(B x 0.33) patches of a batch (1 of 2: half, not a third) and draws a class
    first (WT, TC, ET), then a voxel of it: the small ET is the centre of about 2/3 of those patches (TC is the
    ET here), where centring on any tumor voxel hits it 8 times in 8008."""
    folder = edema_and_small_enhancing_tumor(tmp_path)
    classes = loader.foreground_classes("nnunet", "brats2020", "regions")
    assert classes == ((1, 2, 3), (1, 3), (3,))  # WT, TC, ET as internal labels
    steps = 120
    nnunet = PatchDataset(folder, ["case"], (8, 8, 8), 0.33, False, 0, steps * global_batch, sampling="nnunet",
                          global_batch=global_batch, classes=classes)
    per_patch = PatchDataset(folder, ["case"], (8, 8, 8), 0.33, False, 0, steps * global_batch)
    centred_on_et = []
    for index in range(steps * global_batch):
        labels = nnunet[index][1].numpy()
        if nnunet_forced(index % global_batch, global_batch, 0.33):
            assert labels.any()  # every patch the rule forces holds tumor
            centred_on_et.append(labels[4, 4, 4] == 3 or (labels == 3).sum() == 8)  # shifted inwards at the border
        else:
            centred_on_et.append(None)
    forced = [hit for hit in centred_on_et if hit is not None]
    assert len(forced) == steps * sum(nnunet_forced(k, global_batch, 0.33) for k in range(global_batch))
    assert 0.55 < np.mean(forced) < 0.8
    assert np.mean([(per_patch[i][1].numpy() == 3).any() for i in range(300)]) < 0.05


def test_nnunet_sampling_with_a_global_batch_of_one_is_refused(tmp_path):
    folder = edema_and_small_enhancing_tumor(tmp_path)
    with pytest.raises(ValueError, match=r"patch_sampling nnunet with a global batch of 1: .* leaves no patch centred"):
        PatchDataset(folder, ["case"], (8, 8, 8), 0.33, False, 0, 4, sampling="nnunet", global_batch=1)
    PatchDataset(folder, ["case"], (8, 8, 8), 0.0, False, 0, 4, sampling="nnunet", global_batch=1)  # no centring asked


def test_same_seed_epoch_index_gives_same_patch_and_other_epochs_differ(position_cases):
    folder, cases = position_cases

    def dataset(seed):
        return PatchDataset(folder, list(cases), (8, 8, 8), 0.5, augment=True, seed=seed, samples_per_epoch=20)

    first, again, other_seed = dataset(7), dataset(7), dataset(8)
    for index in range(20):
        for a, b in zip(first[index], again[index]):
            assert torch.equal(a, b)
    epoch0 = [first[i][0] for i in range(20)]
    first.set_epoch(1)
    epoch1 = [first[i][0] for i in range(20)]
    assert sum(not torch.equal(a, b) for a, b in zip(epoch0, epoch1)) >= 18
    assert sum(not torch.equal(a, other_seed[i][0]) for i, a in enumerate(epoch0)) >= 18


def test_augmentation_flips_image_and_labels_together(tmp_path):
    rng = np.random.default_rng(4)
    shape = (20, 18, 12)
    positions, _ = position_volume(shape, rng)
    labels = rng.integers(0, 4, shape)
    brain = np.zeros(shape, dtype=bool)
    brain[2:-2, 2:-2, 1:-1] = True
    labels[~brain] = 0
    # channel 0 encodes the label (2 * label + 1), so labels are a function of the image
    image = np.concatenate([(2 * labels + 1)[None], positions]) * brain
    write_prepared(tmp_path, {"case": (image, labels, "train")})
    settings = dict(patch_size=(12, 12, 16), foreground_fraction=0.5, seed=5, samples_per_epoch=24)
    plain = PatchDataset(tmp_path, ["case"], augment=False, **settings)
    augmented = PatchDataset(tmp_path, ["case"], augment=True, **settings)
    flip_counts = np.zeros(3)
    for index in range(len(plain)):
        reference, reference_labels = (t.numpy() for t in plain[index])
        patch, patch_labels = (t.numpy() for t in augmented[index])
        on = reference[1] > 0  # brain voxels of the unaugmented patch, padding excluded
        # an axis is flipped when the position channel of that axis decreases along it
        voxels = np.argwhere(patch[1] != 0)  # (N, 3) brain voxels of the augmented patch
        flipped = tuple(axis for axis in range(3)
                        if np.corrcoef(voxels[:, axis], patch[1 + axis][patch[1] != 0])[0, 1] < 0)
        flip_counts[list(flipped)] += 1
        expected_labels = np.flip(reference_labels, flipped)
        expected = np.flip(reference, [a + 1 for a in flipped])
        np.testing.assert_array_equal(patch_labels, expected_labels)
        inside = np.flip(on, flipped)
        assert not patch[:, ~inside].any()  # background and padding stay 0
        for channel in range(4):  # value = scale * original + shift, scale in [0.9, 1.1], shift in [-0.1, 0.1]
            scale, shift = np.polyfit(expected[channel][inside], patch[channel][inside], 1)
            assert 0.9 <= scale <= 1.1 and -0.1 <= shift <= 0.1
            np.testing.assert_allclose(patch[channel][inside], scale * expected[channel][inside] + shift, atol=1e-4)
        np.testing.assert_array_equal(np.rint((patch[0][inside] - 1) / 2), patch_labels[inside])
    assert all(0 < count < len(plain) for count in flip_counts)


def test_tumor_subset_of_large_tumors_still_centres_patches_on_tumor(tmp_path, monkeypatch):
    monkeypatch.setattr("bratsunet.loader.MAX_FOREGROUND_VOXELS", 3)  # the 8 cube voxels -> every 3rd one
    data = tumor_cube_dataset(tmp_path, 1.0, samples=50)
    assert all(data[i][1].any() for i in range(len(data)))
    assert [len(voxels) for voxels in data.foreground[0]] == [3]  # one class: any tumor voxel


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_give_the_same_batches_as_the_main_process(position_cases, context):
    if context not in torch.multiprocessing.get_all_start_methods():
        pytest.skip(f"{context} is not available here")
    folder, cases = position_cases
    data = PatchDataset(folder, list(cases), (8, 8, 8), 0.5, augment=True, seed=9, samples_per_epoch=12)
    data.set_epoch(2)

    def batches(workers):
        loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=workers,
                                             multiprocessing_context=context if workers else None)
        return list(loader)

    in_main, in_workers = batches(0), batches(2)
    assert len(in_main) == len(in_workers) == 4
    for (image, labels), (worker_image, worker_labels) in zip(in_main, in_workers):
        assert torch.equal(image, worker_image) and torch.equal(labels, worker_labels)
    assert torch.equal(in_main[0][0][1], data[1][0])  # and the epoch set before iterating was used


def test_volume_dataset_gives_whole_cases(position_cases):
    folder, cases = position_cases
    data = VolumeDataset(folder, ["small", "big"])
    assert len(data) == 2
    name, image, labels = data[1]
    assert name == "big" and image.dtype == torch.float32 and labels.dtype == torch.int64
    np.testing.assert_array_equal(image.numpy(), cases["big"][0])
    np.testing.assert_array_equal(labels.numpy(), cases["big"][1])


def test_unknown_or_unlabelled_cases_are_refused_naming_the_manifest(tmp_path):
    image = np.ones((1, 4, 4, 4))
    write_prepared(tmp_path, {"a": (image, np.zeros((4, 4, 4)), "train"), "u": (image, None, "unlabeled")})
    with pytest.raises(ValueError, match=r"dataset.json: no case named 'b'"):
        VolumeDataset(tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match=r"dataset.json: case 'u' has no segmentation"):
        PatchDataset(tmp_path, ["u"], (4, 4, 4), 0.3, False, 0, 10)


def test_mismatched_arrays_are_refused_naming_the_file(tmp_path):
    write_prepared(tmp_path, {"a": (np.ones((1, 4, 4, 4)), np.zeros((4, 4, 4)), "train")})
    np.save(tmp_path / "a_seg.npy", np.zeros((4, 4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"a_seg.npy: shape \(4, 4, 5\) does not match image a.npy"):
        VolumeDataset(tmp_path, ["a"])[0]


def test_datasets_read_what_prepare_dataset_writes(tiny_prepared):
    manifest = read_manifest(tiny_prepared)
    train, val = split_cases(manifest)
    assert train and val and not set(train) & set(val)
    all_with_tumor = all(manifest["cases"][name]["tumor_voxels"] for name in train)
    patches = PatchDataset(tiny_prepared, train, (16, 16, 16), 1.0, augment=True, seed=0, samples_per_epoch=8)
    for index in range(len(patches)):
        image, labels = patches[index]
        assert image.shape == (len(manifest["channel_names"]), 16, 16, 16) and labels.shape == (16, 16, 16)
        assert labels.max() <= 3 and (labels.any() or not all_with_tumor)
    name, image, labels = VolumeDataset(tiny_prepared, val)[0]
    assert name == val[0] and list(image.shape) == manifest["cases"][name]["shape"]
    np.testing.assert_array_equal(labels.numpy(), np.load(tiny_prepared / manifest["cases"][name]["seg"]))
