"""predict.py: labels land back in the input's grid (no shift or flip from cropping), the written files,
mirror test-time augmentation, ET postprocessing, the model's own settings, skipping and bad cases."""
import itertools
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import predict
from bratsunet.manifest import read_manifest
from bratsunet import checkpoints, conventions, generator, hyperparameters, inference, losses, network, preprocessing


class ChannelSigns(torch.nn.Module):
    """A stand-in network: the WT, TC and ET logits are input channels 0, 1 and 2 scaled up, so a region is
    predicted exactly where its channel is above the channel's brain mean. Inputs that encode the truth
    that way must come back as the truth, wherever windows, crops and flips move them."""

    def __init__(self, target):
        super().__init__()
        self.target = target
        self.scale = torch.nn.Parameter(torch.tensor(20.0))  # predict_case reads the device from the parameters

    def forward(self, x):  # (B, C, X, Y, Z) -> (B, 3 or 4, X, Y, Z)
        regions = self.scale * x[:, :3]
        if self.target == "regions":
            return regions
        wt, tc, et = (regions > 0).unbind(1)  # one-hot labels as the regions nest: ET in TC in WT
        labels = torch.stack([~wt, wt & tc & ~et, wt & ~tc & ~et, wt & et], dim=1)
        return self.scale * labels.float()


def nested_labels(wt, tc, et):
    """Boolean regions -> internal labels, nested as losses.probabilities_to_labels nests them (numpy)."""
    return np.where(wt & et, 3, np.where(wt & tc, 1, np.where(wt, 2, 0))).astype(np.uint8)


def write_encoded_case(folder, name, shape=(40, 44, 32), seed=3):
    """A generated case whose flair, t1 and t1ce are 200 inside WT, TC and ET and 100 elsewhere in the brain
    (t2 is 100), with no brain on the first third of x, so the crop box is far from centred."""
    images, seg = generator.generate_case(shape, seed, "tumor")
    brain = images["flair"] > 0
    brain[: shape[0] // 3] = False
    seg = np.where(brain, seg, 0).astype(np.uint8)
    regions = conventions.labels_to_regions(conventions.brats_to_internal(seg))  # (3, X, Y, Z) WT, TC, ET
    encoded = [np.where(brain, 100 + 100 * region, 0).astype(np.int16) for region in regions]
    encoded.append(np.where(brain, 100, 0).astype(np.int16))
    generator.write_case(folder, name, dict(zip(generator.MODALITIES, encoded)), seg)
    return seg, brain


@pytest.mark.parametrize("target, tta_mirror", [("regions", False), ("labels", True)])
def test_prediction_lands_on_the_truth_in_the_full_grid(tmp_path, tiny_hp, target, tta_mirror):
    seg, brain = write_encoded_case(tmp_path / "input", "BraTS20_Validation_001")
    assert set(np.unique(seg)) == {0, 1, 2, 4}
    box = preprocessing.crop_box(brain, 0)
    assert box[0][0] >= 13 and box[0][0] > 40 - box[0][1] + 5  # far from centred along x
    hp = tiny_hp.replace(predict_input_dir=tmp_path / "input", target=target, tta_mirror=tta_mirror,
                         patch_size="16, 16, 16", sw_overlap=0.5)
    cases = predict.cases_to_predict(hp)
    written = inference.predict_cases(hp, cases, model=ChannelSigns(target))
    assert written == [hp.prediction_dir / "BraTS20_Validation_001.nii.gz"]
    out, flair = nib.load(written[0]), nib.load(cases[0].image_paths[0])
    assert out.get_data_dtype() == np.uint8 and out.shape == seg.shape
    assert np.array_equal(out.affine, flair.affine) and not np.allclose(out.affine, np.eye(4))
    for code in ("qform_code", "sform_code"):
        assert out.header[code] == flair.header[code]
    assert np.array_equal(np.asanyarray(out.dataobj), seg)


def test_prediction_lands_back_on_the_real_sample(tmp_path, tiny_hp, sample_case):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / sample_case.name).symlink_to(sample_case)
    hp = tiny_hp.replace(predict_input_dir=tmp_path / "input", patch_size="64, 64, 64", sw_overlap=0.25)
    written = inference.predict_cases(hp, predict.cases_to_predict(hp), model=ChannelSigns("regions"))
    flair_path = sample_case / f"{sample_case.name}_flair.nii.gz"
    flair, out = nib.load(flair_path), nib.load(written[0])
    assert out.shape == (240, 240, 155) and out.get_data_dtype() == np.uint8
    assert np.array_equal(out.affine, flair.affine)
    # expected: the regions' signs on the whole uncropped volume, z-scored independently of predict.py's crop
    image = np.stack([np.asanyarray(nib.load(sample_case / f"{sample_case.name}_{c}.nii.gz").dataobj)
                      for c in hp.channel_names])
    positive = preprocessing.zscore_brain(image)[:3] > 0
    expected = conventions.internal_to_brats(nested_labels(*positive))
    predicted = np.asanyarray(out.dataobj)
    assert set(np.unique(predicted)) == {0, 1, 2, 4}
    assert np.array_equal(predicted, expected)


def test_labels_in_input_grid_puts_the_crop_back_at_its_box():
    cropped = np.arange(1, 25, dtype=np.uint8).reshape(2, 3, 4)
    full = inference.labels_in_input_grid(cropped, ((5, 7), (0, 3), (2, 6)), (9, 4, 7))
    assert full.shape == (9, 4, 7) and full.dtype == np.uint8
    assert np.array_equal(full[5:7, 0:3, 2:6], cropped)
    assert full.sum() == cropped.sum()  # zero everywhere else
    assert full[5, 0, 2] == 1 and full[6, 2, 5] == 24


def test_postprocess_et_relabels_only_small_enhancing_tumor():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:6, 2:6, 2:6] = 2
    labels[3:5, 3:5, 3:5] = 3  # 8 voxels of ET
    small = inference.postprocess_et(labels, 9)
    assert np.count_nonzero(small == 3) == 0 and np.count_nonzero(small == 1) == 8
    assert np.array_equal(small == 2, labels == 2)
    assert np.array_equal(inference.postprocess_et(labels, 8), labels)  # not smaller than the threshold
    assert np.array_equal(inference.postprocess_et(labels, 0), labels)  # 0: off
    assert labels[3, 3, 3] == 3  # the input is not changed


class Ramps(torch.nn.Module):
    """Logits that grow along x, y and z inside the window, whatever the input: not symmetric under any flip."""

    def __init__(self):
        super().__init__()
        self.slope = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x):  # (B, C, X, Y, Z) -> (B, 3, X, Y, Z)
        ramp = sum(torch.arange(n, dtype=torch.float32).reshape([-1 if a == axis else 1 for a in range(3)]) * 2 ** axis
                   for axis, n in enumerate(x.shape[2:]))  # x + 2 y + 4 z
        return (self.slope * ramp).expand(x.shape[0], 3, *x.shape[2:])


def test_mirror_tta_averages_the_flipped_back_predictions():
    hp = hyperparameters.load(overrides={"patch_size": "8, 6, 4", "precision": "fp32"})
    image = torch.zeros(4, 8, 6, 4)  # one window
    sigmoid = lambda v: 1 / (1 + math.exp(-0.1 * v))  # noqa: E731
    plain = inference.predict_case(Ramps(), image, hp, "regions")
    mirrored = inference.predict_case(Ramps(), image, hp.replace(tta_mirror=True), "regions")
    for x, y, z in itertools.product(range(8), range(6), range(4)):
        assert plain[0, x, y, z].item() == pytest.approx(sigmoid(x + 2 * y + 4 * z), abs=1e-6)
        # a flip of an axis, flipped back, reads that axis's ramp from the other end
        expected = np.mean([sigmoid(fx + 2 * fy + 4 * fz) for fx, fy, fz in
                            itertools.product((x, 7 - x), (y, 5 - y), (z, 3 - z))])
        assert mirrored[2, x, y, z].item() == pytest.approx(expected, abs=1e-6)
    assert len(set(inference.mirror_flips(True))) == 7 and inference.mirror_flips(False) == []


def tiny_net(target, seed=0):
    torch.manual_seed(seed)
    return network.UNet3D(4, 3 if target == "regions" else 4, (4, 8, 16)).eval()


@pytest.mark.parametrize("target", ["regions", "labels"])
def test_predict_case_in_one_window_is_the_networks_probabilities(target):
    net = tiny_net(target)
    image = torch.randn(4, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    hp = hyperparameters.load(overrides={"patch_size": "16, 16, 16", "precision": "fp32"})
    with torch.no_grad():
        expected = losses.logits_to_probabilities(net(image[None]), target)[0]
    assert torch.allclose(inference.predict_case(net, image, hp, target), expected, atol=1e-6, rtol=0)
    reduced = inference.predict_case(net, image, hp.replace(precision="bf16"), target)
    assert 1e-3 < (reduced - expected).abs().max() < 0.05  # bfloat16 autocast: close, not float32


def save_tiny_checkpoint(hp, path, target):
    """An untrained tiny network with the checkpoint keys that predict.py reads."""
    trained = hp.replace(target=target, patch_size="16, 16, 16")
    net = tiny_net(target)
    checkpoints.save_checkpoint({"model_args": network.model_args(trained), "model": net.state_dict(),
                           "hyperparameters": trained.to_dict()}, path)


def test_predict_validation_cases_with_a_checkpoint(tmp_path, tiny_hp, tiny_prepared, capsys):
    checkpoint = tmp_path / "tiny.pt"
    save_tiny_checkpoint(tiny_hp, checkpoint, "labels")  # trained for labels, while the settings say regions
    hp = tiny_hp.replace(prepared_dir=tiny_prepared, checkpoint=checkpoint, save_probabilities=True,
                         patch_size="32, 32, 32")
    assert hp.target == "regions"
    manifest = read_manifest(tiny_prepared)
    validation = sorted(name for name, case in manifest["cases"].items() if case["split"] == "val")
    assert len(validation) >= 2
    written = predict.predict(hp)
    assert written == [hp.prediction_dir / f"{name}.nii.gz" for name in validation]
    assert "trained with" in capsys.readouterr().out  # it says which settings came from the checkpoint
    for name, path in zip(validation, written):
        flair = nib.load(hp.raw_data_dir / name / f"{name}_flair.nii")
        out = nib.load(path)
        assert out.shape == flair.shape and out.get_data_dtype() == np.uint8
        assert np.array_equal(out.affine, flair.affine)
        assert set(np.unique(np.asanyarray(out.dataobj))) <= {0, 1, 2, 4}
        with np.load(hp.prediction_dir / f"{name}_probabilities.npz") as saved:
            # the checkpoint's target (4 softmax channels) and prepare_dataset's crop box
            assert saved["probabilities"].dtype == np.float16
            assert list(saved["channels"]) == list(conventions.LABEL_NAMES)
            assert saved["crop_box"].tolist() == manifest["cases"][name]["crop_box"]
            box_shape = [stop - start for start, stop in saved["crop_box"]]
            assert saved["probabilities"].shape == (4, *box_shape)
            assert np.allclose(saved["probabilities"].astype(np.float32).sum(0), 1, atol=3e-3)
    assert sorted(p.name for p in hp.prediction_dir.iterdir()) == sorted(
        [f"{n}.nii.gz" for n in validation] + [f"{n}_probabilities.npz" for n in validation])  # no temporary files
    before = written[0].stat().st_mtime_ns
    assert predict.predict(hp) == []  # already predicted: skipped
    assert "already there" in capsys.readouterr().out and written[0].stat().st_mtime_ns == before
    assert predict.predict(hp.replace(overwrite=True)) == written


def test_a_bad_case_is_reported_and_the_others_are_predicted(tmp_path, tiny_hp, tiny_raw, capsys):
    checkpoint = tmp_path / "tiny.pt"
    save_tiny_checkpoint(tiny_hp, checkpoint, "regions")
    good, broken = sorted(p.name for p in tiny_raw.iterdir() if p.is_dir())[:2]
    inputs = tmp_path / "input"
    shutil.copytree(tiny_raw / good, inputs / good)
    shutil.copytree(tiny_raw / broken, inputs / broken)
    (inputs / broken / f"{broken}_t1ce.nii").write_bytes(b"")  # a download cut short
    (inputs / "incomplete").mkdir()
    shutil.copy(tiny_raw / good / f"{good}_t1.nii", inputs / "incomplete" / "incomplete_t1.nii")
    hp = tiny_hp.replace(predict_input_dir=inputs, checkpoint=checkpoint)
    assert predict.predict(hp) == [hp.prediction_dir / f"{good}.nii.gz"]
    out = capsys.readouterr().out
    assert f"{broken}_t1ce.nii: empty file" in out and "1 failed" in out
    assert "incomplete: missing modality flair, t1ce, t2" in out


def test_missing_inputs_say_which_script_to_run(tmp_path, tiny_hp, monkeypatch):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        predict.predict(tiny_hp)
    save_tiny_checkpoint(tiny_hp, tiny_hp.run_dir / "checkpoint_final.pt", "regions")
    with pytest.raises(FileNotFoundError, match="run prepare_dataset.py first"):
        predict.predict(tiny_hp)
    monkeypatch.setattr("sys.argv", ["predict.py", f"run_dir={tiny_hp.run_dir}", f"prepared_dir={tmp_path / 'none'}"])
    with pytest.raises(SystemExit, match="^error: .*run prepare_dataset.py first"):
        predict.main()


def test_a_checkpoint_alone_segments_scans_as_in_a_fresh_clone(tmp_path, tiny_hp, tiny_raw, monkeypatch):
    # A shipped model (models/anatomy.pt) in a fresh clone: no dataset.json, prepared arrays or run folder here, and
    # the folders the checkpoint was trained with are another machine's.
    trainer = tmp_path / "trainer"  # never created
    trained = tiny_hp.replace(raw_data_dir=trainer / "raw", prepared_dir=trainer / "prepared", run_dir=trainer / "run",
                              target="regions", patch_size="16, 16, 16")
    checkpoint = tmp_path / "models" / "shipped.pt"
    checkpoints.save_checkpoint({"model_args": network.model_args(trained), "model": tiny_net("regions").state_dict(),
                                 "hyperparameters": trained.to_dict(),
                                 "split": {"fold": 0, "train": ["BraTS20_Training_001"], "val": []}}, checkpoint)
    name = sorted(p.name for p in tiny_raw.iterdir() if p.is_dir())[0]
    shutil.copytree(tiny_raw / name, tmp_path / "scans" / name)
    absent = {key: tmp_path / "absent" / key for key in ("raw_data_dir", "prepared_dir", "run_dir")}
    arguments = [f"checkpoint={checkpoint}", f"predict_input_dir={tmp_path / 'scans'}",
                 f"prediction_dir={tmp_path / 'out'}"]
    monkeypatch.setattr("sys.argv", ["predict.py", *arguments, *(f"{key}={path}" for key, path in absent.items())])
    predict.main()
    out = nib.load(tmp_path / "out" / f"{name}.nii.gz")
    assert out.shape == nib.load(tmp_path / "scans" / name / f"{name}_flair.nii").shape
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{name}.nii.gz"]
    assert not trainer.exists() and not (tmp_path / "absent").exists()  # nothing made there
