"""The BraTS conventions (2020/2021, 2023, 2024): labels, file names by meaning, folders of another or mixed
convention, and the grid check on reading (spacing, shape, orientation, skull) with allow_any_grid."""
import json

import nibabel as nib
import numpy as np
import pytest
import torch

import prepare_dataset
from bratsunet import checkpoints, conventions, generator, inference, network, synthesis
from bratsunet.cases import CaseError, find_cases, load_case
from bratsunet.conventions import brats_to_internal, internal_to_brats

CHANNELS = ("flair", "t1", "t1ce", "t2")


def write_convention_case(folder, name, data_format, seed=1, shape=(40, 40, 32)):
    """A phantom case named and labelled as data_format; returns its internal labels."""
    images, seg = generator.generate_case(shape, seed, "tumor")
    internal = brats_to_internal(seg)
    generator.write_case(folder, name, images, internal_to_brats(internal, data_format), data_format=data_format)
    return internal


def test_label_tables_of_each_convention():
    internal = np.array([0, 1, 2, 3, 4], np.uint8)
    assert internal_to_brats(internal[:4], "brats2020").tolist() == [0, 1, 2, 4]
    assert internal_to_brats(internal[:4], "brats2023").tolist() == [0, 1, 2, 3]
    assert internal_to_brats(internal, "brats2024").tolist() == [0, 1, 2, 3, 4]
    assert internal_to_brats(internal, "brats2020").tolist() == [0, 1, 2, 4, 0]  # no cavity in 2020: background
    for data_format, disk in (("brats2020", [0, 1, 2, 4]), ("brats2023", [0, 1, 2, 3]), ("brats2024", [0, 1, 2, 3, 4])):
        assert brats_to_internal(np.array(disk), data_format).tolist() == list(range(len(disk)))
    with pytest.raises(ValueError, match=r"unexpected label values \[3\]; .* \(the labels of data_format: brats2023\)"):
        brats_to_internal(np.array([0, 1, 2, 3]))  # BraTS 2023 labels read as 2020
    with pytest.raises(ValueError, match=r"unexpected label values \[4\]; expected \[0, 1, 2, 3\] .*brats2024"):
        brats_to_internal(np.array([0, 3, 4]), "brats2023")
    # regions: WT {1,2,3}, TC {1,3}, ET {3}, and the cavity on its own
    regions = conventions.labels_to_regions(internal, ("WT", "TC", "ET", "RC"))
    assert regions.astype(int).tolist() == [[0, 1, 1, 1, 0], [0, 1, 0, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert conventions.num_outputs("brats2020", "regions") == conventions.num_outputs("brats2023", "regions") == 3
    assert conventions.num_outputs("brats2024", "regions") == 4 and conventions.num_outputs("brats2024", "labels") == 5


def test_modalities_match_by_meaning():
    stems = [f"BraTS-GLI-00000-000-{s}" for s in ("t1c", "t1n", "t2f", "t2w", "seg")]
    images, seg = conventions.match_case_files(stems, CHANNELS, "seg", "brats2023")
    assert images == [stems[2], stems[1], stems[0], stems[3]] and seg == stems[4]  # flair, t1, t1ce, t2
    images, _ = conventions.match_case_files(stems, ("t2f", "t1n", "t1c", "t2w"), "seg", "brats2024")
    assert images == [stems[2], stems[1], stems[0], stems[3]]
    # BraTS 2021 names are 2020's convention
    stems = [f"BraTS2021_00000_{s}" for s in (*CHANNELS, "seg")]
    assert conventions.match_case_files(stems, CHANNELS, "seg", "brats2020") == (stems[:4], stems[4])


def test_2021_case_is_found_and_read_as_2020(tmp_path):
    internal = write_convention_case(tmp_path / "raw", "BraTS2021_00000", "brats2020")
    case = find_cases(tmp_path / "raw", CHANNELS, "seg")[0][0]
    assert [p.name for p in case.image_paths] == [f"BraTS2021_00000_{c}.nii" for c in CHANNELS]
    image, labels, _ = load_case(case)
    assert np.array_equal(labels, internal) and image.shape == (4, 40, 40, 32)


def test_2023_named_copy_of_the_real_sample_is_found_and_read(sample_case, tmp_path):
    name = "BraTS-GLI-00000-000"
    folder = tmp_path / "raw" / name
    folder.mkdir(parents=True)
    for old, new in zip(CHANNELS, ("t2f", "t1n", "t1c", "t2w")):
        (folder / f"{name}-{new}.nii.gz").symlink_to(sample_case / f"{sample_case.name}_{old}.nii.gz")
    seg_image = nib.load(sample_case / f"{sample_case.name}_seg.nii.gz")
    truth = brats_to_internal(np.asanyarray(seg_image.dataobj))
    nib.save(nib.Nifti1Image(internal_to_brats(truth, "brats2023"), seg_image.affine, seg_image.header),
             folder / f"{name}-seg.nii")  # uncompressed: faster
    with pytest.raises(CaseError, match="named as in BraTS 2023.*set data_format: brats2023 or brats2024") as error:
        find_cases(tmp_path / "raw", CHANNELS, "seg")  # the default setting, brats2020
    assert "\n" not in str(error.value) and "missing modality" not in str(error.value)
    cases, problems = find_cases(tmp_path / "raw", CHANNELS, "seg", data_format="brats2023")
    assert not problems and cases[0].name == name and cases[0].data_format == "brats2023"
    assert [p.name[len(name):] for p in cases[0].image_paths] == ["-t2f.nii.gz", "-t1n.nii.gz", "-t1c.nii.gz",
                                                                  "-t2w.nii.gz"]  # flair, t1, t1ce, t2
    image, labels, _ = load_case(cases[0])  # in the BraTS grid: no allow_any_grid needed
    assert np.array_equal(labels, truth) and (labels == 3).sum() == (np.asanyarray(seg_image.dataobj) == 4).sum()
    assert image.shape == (4, 240, 240, 155)


def test_a_mixed_folder_is_reported_and_nothing_is_prepared(tmp_path, tiny_hp):
    write_convention_case(tmp_path / "raw", "BraTS20_Training_001", "brats2020")
    write_convention_case(tmp_path / "raw", "BraTS-GLI-00002-000", "brats2023", seed=2)
    hp = tiny_hp.replace(raw_data_dir=tmp_path / "raw")
    with pytest.raises(CaseError, match=r"mixes conventions: 1 case folder\(s\) named as data_format brats2020 "
                                        r"expects, 1 otherwise .*BraTS-GLI-00002-000.*set data_format"):
        prepare_dataset.prepare_dataset(hp)
    assert not (hp.prepared_dir / "dataset.json").exists()
    # one case folder mixing the names of two conventions is skipped, saying so
    folder = tmp_path / "raw" / "BraTS20_Training_001"
    (folder / "BraTS20_Training_001_t2.nii").rename(folder / "BraTS20_Training_001-t2w.nii")
    (tmp_path / "raw" / "BraTS-GLI-00002-000").rename(tmp_path / "elsewhere")
    cases, problems = find_cases(tmp_path / "raw", CHANNELS, "seg")
    assert not cases and "mixes the file names of data_format brats2020 and brats2023 or brats2024" in problems[0][1]


def save_scan(folder, name, volumes, affine, descrip=b""):
    """Write {suffix: array} as folder/name/name_{suffix}.nii with affine (no phantom MARK unless given)."""
    case = folder / name
    case.mkdir(parents=True)
    for suffix, array in volumes.items():
        image = nib.Nifti1Image(array, affine)
        image.header["descrip"] = descrip
        nib.save(image, case / f"{name}_{suffix}.nii")


def off_grid_cases(folder):
    """{case name: expected message part} of cases that differ from the BraTS grid in one way each (a phantom
    resampled, reoriented, or with a head around it), and one phantom that is in the grid."""
    images, seg = generator.generate_case((40, 40, 32), 5, "tumor")
    volumes = {**images, "seg": seg}
    brats = generator.brats_affine((40, 40, 32))
    cases = {}

    def add(name, message, volumes=volumes, affine=brats, descrip=generator.MARK):
        save_scan(folder, name, volumes, affine, descrip)
        cases[name] = message

    add("phantom", None)
    add("anisotropic", "spacing 0.5 x 0.5 x 5 mm, shape 40 x 40 x 32: not in the BraTS grid",
        affine=np.diag([-0.5, -0.5, 5.0, 1.0]), descrip=b"")
    add("ras", "orientation RAS (expected: LPS): not in the BraTS grid", affine=np.eye(4))
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    add("oblique", "oblique axes (nearest orientation", affine=brats @ rotation)
    rng = np.random.default_rng(0)  # an unstripped scan: noise in the air, a skull around the brain
    skull = {m: np.where(image > 0, image, rng.integers(5, 40, image.shape)).astype(np.int16)
             for m, image in images.items()}
    add("skull", "not skull-stripped (100% of the border voxels and 100% of all voxels non-zero)",
        volumes={**skull, "seg": seg})
    return cases


def test_each_off_grid_case_gets_its_message_is_skipped_and_listed(tmp_path, tiny_hp):
    expected = off_grid_cases(tmp_path / "raw")
    hp = tiny_hp.replace(raw_data_dir=tmp_path / "raw", val_fraction=0.0)
    manifest = prepare_dataset.prepare_dataset(hp)
    assert list(manifest["cases"]) == ["phantom"]
    for name, message in expected.items():
        if message is not None:
            reason = manifest["skipped"][name]
            assert message in reason and "allow_any_grid: True" in reason and "\n" not in reason
            assert f"{name}/{name}_flair.nii" in reason  # names the file
    assert json.loads((hp.prepared_dir / "dataset.json").read_text())["settings"]["allow_any_grid"] is False
    everything = prepare_dataset.prepare_dataset(hp.replace(allow_any_grid=True))
    assert sorted(everything["cases"]) == sorted(expected) and not everything["skipped"]


def test_the_real_sample_is_in_the_grid_and_a_padded_copy_is_not(sample_case):
    case = find_cases(sample_case.parent, CHANNELS, "seg")[0][0]
    image, _, nifti = load_case(case)
    head = (image != 0).any(axis=0)
    assert conventions.grid_differences(head, nifti.header.get_zooms(), nifti.affine) == []
    padded = np.pad(head, ((0, 0), (0, 0), (0, 10)))
    assert conventions.grid_differences(padded, (1, 1, 1), nifti.affine) == ["shape 240 x 240 x 165"]


# ---------------------------------------------------------------- every script, in each convention

def add_cavity(folder, name, data_format="brats2024"):
    """Give a written phantom a resection cavity (label 4): a fluid-filled ball in healthy brain, off the tumor."""
    paths = generator.case_paths(folder, name, data_format=data_format)
    images = {m: np.asanyarray(nib.load(paths[m]).dataobj) for m in generator.MODALITIES}
    seg = np.asanyarray(nib.load(paths["seg"]).dataobj).copy()
    healthy = (images["flair"] > 0) & (seg == 0)
    distance = np.linalg.norm(np.indices(seg.shape) - np.argwhere(healthy).mean(0)[:, None, None, None], axis=0)
    ball = healthy & (distance < 4)
    seg[ball] = 4
    for m, modality in enumerate(generator.MODALITIES):
        images[modality] = np.where(ball, synthesis.INTENSITY["csf"][m], images[modality]).astype(np.int16)
    generator.write_case(folder, name, images, seg, data_format=data_format)
    return int(ball.sum())


@pytest.mark.parametrize("data_format", ["brats2024"])  # 2024 has 2023's names; 2020: test_train, test_predict
def test_generated_cases_of_each_convention_run_through_every_script(tmp_path, tiny_hp, data_format):
    import evaluate
    import predict
    import train
    raw = tmp_path / "raw"
    names = generator.generate_dataset(raw, 3, (32, 32, 24), seed=3, data_format=data_format)
    assert names[0] == conventions.CONVENTIONS[data_format].case_name.format(1)
    if data_format == "brats2024":
        assert all(add_cavity(raw, name) > 20 for name in names)
    hp = tiny_hp.replace(raw_data_dir=raw, data_format=data_format, epochs=1, steps_per_epoch=1, sw_overlap=0,
                         precision="fp32", channels_last=False)  # fastest for a tiny network on a CPU
    manifest = prepare_dataset.prepare_dataset(hp)
    # case 3 is healthy; with a cavity (a post-treatment case without tumor) it is kept
    assert len(manifest["cases"]) == (3 if data_format == "brats2024" else 2)
    assert manifest["settings"]["data_format"] == data_format
    train.train(hp)
    checkpoint = checkpoints.load_checkpoint(hp.run_dir / "checkpoint_best.pt")
    assert checkpoint["model_args"]["out_channels"] == (4 if data_format == "brats2024" else 3)
    written = predict.predict(hp)
    disk_labels = conventions.CONVENTIONS[data_format].disk_labels
    for path in written:
        assert path.parent.name == "predictions" and path.name[:-len(".nii.gz")] in manifest["cases"]
        assert set(np.unique(np.asanyarray(nib.load(path).dataobj)).tolist()) <= set(disk_labels)
    rows = evaluate.evaluate(hp)
    regions = conventions.CONVENTIONS[data_format].regions
    assert len(rows) == len(written) and all(f"dice_{region}" in rows[0] for region in regions)
    assert ("dice_RC" in rows[0]) == (data_format == "brats2024")
    if data_format == "brats2024":
        assert all(row["volume_true_RC"] > 20 for row in rows)  # the cavity is read as label 4, scored on its own
    with pytest.raises(ValueError, match=f"prepared with data_format {data_format}.*set data_format: {data_format}"):
        train.train(hp.replace(data_format="brats2024" if data_format != "brats2024" else "brats2020"))


def test_a_2020_model_predicts_2023_files_in_their_convention(tmp_path, tiny_hp):
    from test_predict import ChannelSigns, write_encoded_case

    import predict
    from bratsunet import inference
    write_encoded_case(tmp_path / "2020", "BraTS20_Training_001")
    old = tmp_path / "2020" / "BraTS20_Training_001"
    new = tmp_path / "2023" / "BraTS-GLI-00001-000"
    new.mkdir(parents=True)
    for channel, suffix in zip(CHANNELS, ("t2f", "t1n", "t1c", "t2w")):
        (new / f"{new.name}-{suffix}.nii").symlink_to(old / f"{old.name}_{channel}.nii")
    network = ChannelSigns("regions")
    outputs = {}
    for data_format, folder in (("brats2020", tmp_path / "2020"), ("brats2023", tmp_path / "2023")):
        hp = tiny_hp.replace(data_format=data_format, predict_input_dir=folder, prediction_dir=tmp_path / data_format)
        cases = predict.cases_to_predict(hp)
        assert [c.data_format for c in cases] == [data_format]
        outputs[data_format] = np.asanyarray(nib.load(inference.predict_cases(hp, cases, network)[0]).dataobj)
    assert set(np.unique(outputs["brats2020"])) == {0, 1, 2, 4} and set(np.unique(outputs["brats2023"])) == {0, 1, 2, 3}
    assert np.array_equal(outputs["brats2023"], internal_to_brats(brats_to_internal(outputs["brats2020"]), "brats2023"))
    assert (tmp_path / "brats2023" / "BraTS-GLI-00001-000.nii.gz").is_file()  # named as the input case


def test_a_checkpoint_from_before_the_conventions_still_loads_and_predicts(tmp_path, tiny_hp):
    import predict
    write_convention_case(tmp_path / "raw", "BraTS20_Training_001", "brats2020")
    old_settings = {k: v for k, v in tiny_hp.to_dict().items()
                    if k not in ("data_format", "allow_any_grid", "lesion_wise", "lesion_wise_task")}
    net = network.build_model(tiny_hp)
    checkpoints.save_checkpoint({"model_args": network.model_args(tiny_hp), "model": net.state_dict(),
                           "hyperparameters": old_settings}, tmp_path / "old.pt")
    for data_format in ("brats2020", "brats2024"):  # a 3-region network writes a 2024 case without a cavity
        hp = tiny_hp.replace(checkpoint=tmp_path / "old.pt", predict_input_dir=tmp_path / "raw",
                             data_format=data_format, prediction_dir=tmp_path / data_format, sw_overlap=0)
        if data_format == "brats2024":
            generator.generate_dataset(tmp_path / "raw2024", 1, (40, 40, 32), seed=1, data_format=data_format)
            hp = hp.replace(predict_input_dir=tmp_path / "raw2024")
        loaded, trained = inference.load_for_inference(hp, torch.device("cpu"))
        assert trained.target == "regions" and trained.data_format == data_format
        assert len(inference.predict_cases(trained, predict.cases_to_predict(trained), loaded)) == 1
