"""The Decathlon layout: the Medical Segmentation Decathlon's Task01_BrainTumour (data_format: msd) and nnU-Net's raw
datasets such as Dataset137_BraTS2021 (data_format: nnunet), built here from BraTS 2020 cases as the MSD's files and
nnU-Net's conversion script lay them out; their dataset.json read, every step run, folders of another format named."""
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

import crossval
import evaluate
import predict
import prepare_dataset
import train
from bratsunet import conventions, decathlon, hyperparameters
from bratsunet.cases import CaseError, find_cases, label_convention, load_case, load_channels
from bratsunet.inference import write_labels
from bratsunet.manifest import read_manifest, split_cases

MODALITIES = ("flair", "t1", "t1ce", "t2")  # the BraTS 2020 files of a case
# The dataset.json of Task01_BrainTumour, and the one nnU-Net's Dataset137_BraTS21.py writes
MSD_JSON = {"name": "BRATS", "tensorImageSize": "4D",
            "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
NNUNET_JSON = {"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"},
               "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
               "file_ending": ".nii.gz", "regions_class_order": [1, 2, 3]}
# BraTS 2020 labels (1 necrotic and non-enhancing core, 2 edema, 4 enhancing) -> theirs, written out by hand: both
# have 1 edema, 2 non-enhancing tumor (nnU-Net: necrosis), 3 enhancing
FROM_2020 = {0: 0, 1: 2, 2: 1, 4: 3}
TINY = {"features": "4, 8, 16", "patch_size": "16, 16, 16", "batch_size": 2, "epochs": 1, "steps_per_epoch": 2,
        "num_workers": 0, "precision": "fp32", "channels_last": False, "sw_overlap": 0}


def brats_file(folder, modality):
    return next(folder.glob(f"{folder.name}_{modality}.nii*"))


def relabel(seg):
    out = np.zeros(seg.shape, np.uint8)
    for brats, theirs in FROM_2020.items():
        out[seg == brats] = theirs
    return out


def write_dataset(root, data_format, labelled, unlabelled=()):
    """BraTS 2020 case folders -> a dataset of data_format: the MSD's 4D images (FLAIR, T1w, t1gd, T2w) with the
    identity affine, or nnU-Net's {case}_0000..0003 (T1, T1ce, T2, Flair), labels relabelled -> {folder: case}."""
    names = {}
    for index, folder in enumerate([*labelled, *unlabelled], start=1):
        name = names[folder] = conventions.CONVENTIONS[data_format].case_name.format(index)
        images = root / ("imagesTr" if folder in labelled else "imagesTs")
        images.mkdir(parents=True, exist_ok=True)
        seg = nib.load(brats_file(folder, "seg"))
        if data_format == "msd":
            first = nib.load(brats_file(folder, "flair"))
            volume = np.stack([np.asanyarray(nib.load(brats_file(folder, m)).dataobj) for m in MODALITIES], axis=-1)
            image = nib.Nifti1Image(volume.astype(np.float32), np.eye(4))  # (X, Y, Z, 4)
            image.header["descrip"] = first.header["descrip"]  # generated phantoms keep their mark
            nib.save(image, images / f"{name}.nii.gz")
            affine, header = np.eye(4), None
        else:
            for index_, modality in enumerate(("t1", "t1ce", "t2", "flair")):
                nib.save(nib.load(brats_file(folder, modality)), images / f"{name}_{index_:04d}.nii.gz")
            affine, header = seg.affine, seg.header
        if folder in labelled:
            (root / "labelsTr").mkdir(exist_ok=True)
            labels = nib.Nifti1Image(relabel(np.asanyarray(seg.dataobj)), affine, header)
            labels.set_data_dtype(np.uint8)
            nib.save(labels, root / "labelsTr" / f"{name}.nii.gz")
    content = {**(MSD_JSON if data_format == "msd" else NNUNET_JSON), "numTraining": len(labelled)}
    (root / "dataset.json").write_text(json.dumps(content, indent=4))
    return names


@pytest.mark.parametrize("data_format", ["msd", "nnunet"])
def test_the_regions_of_the_real_case_survive_the_round_trip(data_format, sample_case, tmp_path):
    root = tmp_path / "dataset"
    name = write_dataset(root, data_format, [sample_case])[sample_case]
    brats = np.asanyarray(nib.load(brats_file(sample_case, "seg")).dataobj)
    volumes = {"WT": np.isin(brats, (1, 2, 4)).sum(), "TC": np.isin(brats, (1, 4)).sum(), "ET": (brats == 4).sum()}
    (case,), problems = find_cases(root, MODALITIES, "seg", data_format=data_format)
    assert not problems and case.name == name and case.data_format.disk_labels == (0, 2, 1, 3)
    image, labels, reference = load_case(case)  # the grid check passes: the MSD's RAS, nnU-Net's LPS
    for channel, modality in enumerate(MODALITIES):  # each channel read from where dataset.json says it is
        assert np.array_equal(image[channel], np.asanyarray(nib.load(brats_file(sample_case, modality)).dataobj))
    regions = conventions.labels_to_regions(labels)
    assert dict(zip(("WT", "TC", "ET"), regions.sum(axis=(1, 2, 3)).tolist())) == volumes
    path = tmp_path / "pred" / f"{name}.nii.gz"
    path.parent.mkdir()
    write_labels(labels, reference, path, case.data_format)  # as predict.py writes a prediction of the case
    written, truth = nib.load(path), nib.load(root / "labelsTr" / f"{name}.nii.gz")
    assert written.shape == (240, 240, 155) and written.get_data_dtype() == np.uint8
    assert np.array_equal(written.affine, truth.affine)
    on_disk = np.asanyarray(written.dataobj)
    assert np.array_equal(on_disk, np.asanyarray(truth.dataobj))
    # the regions as the dataset.json's labels define them (MONAI's tutorial takes label 2 for ET: the MSD says 3)
    assert {"WT": np.isin(on_disk, (1, 2, 3)).sum(), "TC": np.isin(on_disk, (2, 3)).sum(),
            "ET": (on_disk == 3).sum()} == volumes
    hp = hyperparameters.load(overrides={"raw_data_dir": root, "prediction_dir": path.parent,
                                         "data_format": data_format, "prepared_dir": tmp_path / "prepared"})
    (row,) = evaluate.evaluate(hp)
    assert all(row[f"dice_{region}"] == 1 and row[f"volume_true_{region}"] == volumes[region] for region in volumes)


@pytest.mark.parametrize("data_format", ["msd", "nnunet"])
def test_prepare_train_predict_evaluate_a_dataset_in_the_decathlon_layout(data_format, tiny_raw, tmp_path):
    root = tmp_path / "Dataset"
    folders = sorted(path for path in tiny_raw.iterdir() if path.is_dir())
    names = write_dataset(root, data_format, folders[:5], folders[5:])
    hp = hyperparameters.load(overrides={**TINY, "raw_data_dir": root, "prepared_dir": tmp_path / "prepared",
                                         "run_dir": tmp_path / "run", "prediction_dir": tmp_path / "predictions",
                                         "data_format": data_format})
    manifest = prepare_dataset.prepare_dataset(hp)
    assert manifest["settings"]["disk_labels"] == [0, 2, 1, 3]
    assert list(manifest["unlabeled"]) == [names[folders[5]]]  # imagesTs: predicted, never trained on
    train.train(hp)
    rows, not_evaluated, *_ = crossval.out_of_fold_rows(hp, read_manifest(hp.prepared_dir),
                                                       label_convention(data_format, [root]))  # the dataset's labels
    assert [row["case"] for row in rows] == split_cases(manifest)[1] and not not_evaluated  # validation/
    written = predict.predict(hp)  # the test split
    assert written and sorted(path.name for path in written) == sorted(
        f"{name}.nii.gz" for name, case in manifest["cases"].items() if case["split"] == "test")
    for path in written:
        prediction = nib.load(path)
        truth = nib.load(root / "labelsTr" / path.name)
        assert prediction.shape == truth.shape and np.array_equal(prediction.affine, truth.affine)
        assert set(np.unique(np.asanyarray(prediction.dataobj)).tolist()) <= {0, 1, 2, 3}
    rows = evaluate.evaluate(hp)
    assert [row["case"] for row in rows] == sorted(path.name[:-len(".nii.gz")] for path in written)
    unlabelled = predict.predict(hp.replace(predict_input_dir=root / "imagesTs", prediction_dir=tmp_path / "ts"))
    assert [path.name for path in unlabelled] == [f"{names[folders[5]]}.nii.gz"]
    assert nib.load(unlabelled[0]).ndim == 3
    with pytest.raises(CaseError, match="no label map .* in labelsTs"):  # its images are never taken for label maps
        evaluate.evaluate(hp.replace(predict_input_dir=root / "imagesTs", prediction_dir=tmp_path / "ts"))


def write_json(root, content):
    root.mkdir(parents=True, exist_ok=True)
    (root / "imagesTr").mkdir(exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(content))
    return root


@pytest.mark.parametrize("labels, order, expected", [
    (MSD_JSON["labels"], None, (0, 2, 1, 3)),
    (NNUNET_JSON["labels"], [1, 2, 3], (0, 2, 1, 3)),
    ({"background": 0, "whole tumor": [1, 2, 3], "tumor core": [1, 3], "enhancing tumor": 3}, [2, 1, 3], (0, 1, 2, 3)),
    ({"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}, None, (0, 1, 2, 3)),  # BraTS 2023's names
    ({"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}, None, (0, 2, 1, 3)),  # MSD in v2
])
def test_the_labels_come_from_dataset_json(tmp_path, labels, order, expected):
    content = {"channel_names": {"0": "FLAIR", "1": "T1", "2": "T1ce", "3": "T2"}, "labels": labels,
               **({"regions_class_order": order} if order else {})}
    convention = decathlon.read_convention(write_json(tmp_path, content), "nnunet")
    assert convention.disk_labels == expected and convention.channels == MODALITIES


@pytest.mark.parametrize("labels, order, said", [
    (NNUNET_JSON["labels"], [3, 2, 1], "regions_class_order [3, 2, 1] does not write each region's own label"),
    ({"background": 0, "tumor": 1}, None, "not background 0 and the three BraTS tumor labels"),
    ({"background": 0, "edema": 1, "enhancing": 2, "cavity": 3}, None, "not background 0 and the three"),
    ({"background": 0, "whole tumor": [1, 2], "tumor core": [2, 3], "enhancing tumor": 3}, None, "not the three"),
])
def test_labels_that_are_not_the_brats_regions_are_refused(tmp_path, labels, order, said):
    content = {**NNUNET_JSON, "labels": labels, "regions_class_order": order}
    with pytest.raises(ValueError, match=re.escape(said)):
        decathlon.read_convention(write_json(tmp_path, content), "nnunet")


def test_channel_files_follow_the_order_dataset_json_gives(tiny_raw, tmp_path):
    folder = tiny_raw / "BraTS20_Training_001"
    root = tmp_path / "Dataset500_Mine"
    write_dataset(root, "nnunet", [folder])
    order = ("t2", "flair", "t1ce", "t1")  # another order than Dataset137's: the files follow dataset.json
    for index, modality in enumerate(order):
        nib.save(nib.load(brats_file(folder, modality)), root / "imagesTr" / f"BraTS2021_00001_{index:04d}.nii.gz")
    content = json.loads((root / "dataset.json").read_text())
    content["channel_names"] = {str(index): modality.upper() for index, modality in enumerate(order)}
    (root / "dataset.json").write_text(json.dumps(content))
    (case,), _ = find_cases(root, MODALITIES, "seg", data_format="nnunet")
    image, _, _ = load_case(case)
    for channel, modality in enumerate(MODALITIES):
        assert np.array_equal(image[channel], np.asanyarray(nib.load(brats_file(folder, modality)).dataobj))
    [(_, t2, _)] = load_channels(case, [3])  # rendering's one modality
    assert np.array_equal(t2, image[3])


def test_a_folder_in_another_format_says_which_and_the_setting(tiny_raw, tmp_path):
    folders = sorted(path for path in tiny_raw.iterdir() if path.is_dir())[:2]
    for data_format in ("msd", "nnunet"):
        root = tmp_path / data_format / "Dataset"
        write_dataset(root, data_format, folders)
        for setting in ("brats2020", "brats2023"):  # today: "missing modality flair, t1, t1ce, t2" for imagesTr
            with pytest.raises(CaseError, match=f"set data_format: {data_format}$"):
                find_cases(tmp_path / data_format, MODALITIES, "seg", data_format=setting)
        other = "nnunet" if data_format == "msd" else "msd"
        with pytest.raises(CaseError, match=f"not as data_format {other} reads it: set data_format: {data_format}"):
            find_cases(root, MODALITIES, "seg", data_format=other)
    with pytest.raises(CaseError, match=r"no dataset.json .*named as BraTS 2020 and 2021 \(e.g. BraTS20_Training_\d+_"
                                        r"flair\): set data_format: brats2020"):
        find_cases(tiny_raw, MODALITIES, "seg", data_format="msd")


def test_a_dataset_folder_is_found_below_and_its_images_folders_alone(tiny_raw, tmp_path):
    folders = sorted(path for path in tiny_raw.iterdir() if path.is_dir())
    names = write_dataset(tmp_path / "nnUNet_raw" / "Dataset137_BraTS2021", "nnunet", folders[:2], folders[2:3])
    found, _ = find_cases(tmp_path, MODALITIES, "seg", data_format="nnunet")  # an unpacked archive, nnUNet_raw
    assert sorted(case.name for case in found) == sorted(names.values())
    assert [case.seg_path is None for case in found] == [False, False, True]
    imagesTs, _ = find_cases(tmp_path / "nnUNet_raw" / "Dataset137_BraTS2021" / "imagesTs", MODALITIES, "seg",
                             data_format="nnunet")
    assert [case.name for case in imagesTs] == [names[folders[2]]]
    shutil.copytree(tmp_path / "nnUNet_raw" / "Dataset137_BraTS2021", tmp_path / "nnUNet_raw" / "Dataset001_Other")
    with pytest.raises(CaseError, match="holds 2 datasets .*: set raw_data_dir to one of them"):
        find_cases(tmp_path, MODALITIES, "seg", data_format="nnunet")


def test_a_case_with_a_missing_channel_file_is_skipped_and_named(tiny_raw, tmp_path):
    folders = sorted(path for path in tiny_raw.iterdir() if path.is_dir())[:2]
    names = write_dataset(tmp_path, "nnunet", folders)
    (tmp_path / "imagesTr" / f"{names[folders[1]]}_0002.nii.gz").unlink()
    found, problems = find_cases(tmp_path, MODALITIES, "seg", data_format="nnunet")
    assert [case.name for case in found] == [names[folders[0]]]
    assert problems[0][1].endswith(f"missing channel file(s) {names[folders[1]]}_0002 (t2)")


def test_the_grid_check_expects_the_orientation_of_each_format():
    head = np.zeros((240, 240, 155), bool)
    head[60:180, 50:190, 20:140] = True  # a skull-stripped brain: the border is background
    brats, msd = np.diag([-1.0, -1.0, 1.0, 1.0]), np.eye(4)  # BraTS's affine, the MSD's identity
    expected = {("brats2020", "LPS"): [], ("brats2020", "RAS"): ["orientation RAS (expected: LPS)"],
                ("msd", "LPS"): ["orientation LPS (expected: RAS)"], ("msd", "RAS"): [],
                ("nnunet", "LPS"): [], ("nnunet", "RAS"): []}  # Dataset137 copies BraTS's files; Dataset001 the MSD's
    for (data_format, codes), differences in expected.items():
        orientations = conventions.CONVENTIONS[data_format].orientations
        affine = brats if codes == "LPS" else msd
        assert conventions.grid_differences(head, (1, 1, 1), affine, False, orientations) == differences
