"""export.py and predict.py's backend: onnxruntime: ONNX Runtime against PyTorch on random windows of several
sizes and on the whole real case, another architecture's shapes, the metadata, and the one-line errors."""
import json
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import export
import predict
from bratsunet import checkpoints, hyperparameters, inference, network, training

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -r requirements-onnx.txt)")
onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (requirements-onnx.txt)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (requirements-onnx.txt)")

# The small default network; and another: one more level (inputs multiple of 8), softmax labels, batch norm
# with running statistics, deep supervision heads that inference does not use, channels in another order.
SMALL = {"features": "4, 8, 16", "patch_size": "64, 64, 64"}
OTHER = {"features": "4, 8, 16, 32", "patch_size": "48, 48, 48", "target": "labels", "norm": "batch",
         "deep_supervision": True, "channel_names": "t1, t1ce, t2, flair", "crop_margin": 2}


def write_checkpoint(folder, settings, seed=0):
    """A checkpoint of train.py's form with seeded random weights (batch norm statistics made non-trivial)."""
    hp = hyperparameters.load(overrides={"run_dir": folder, **settings})
    torch.manual_seed(seed)
    net = network.build_model(hp)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    state = {"model_args": network.model_args(hp), "model": net.state_dict(), "hyperparameters": hp.to_dict(),
             "epoch": 7, "best_score": 0.5}
    checkpoints.save_checkpoint(state, folder / "checkpoint_final.pt")  # export.py's default
    return hp, net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (hp, network, path of model.onnx)} for SMALL and OTHER, each exported by export.py's export()."""
    models = {}
    for name, settings in (("small", SMALL), ("other", OTHER)):
        folder = tmp_path_factory.mktemp(name)
        hp, net = write_checkpoint(folder, settings)
        assert export.export(hp) == [folder / "model.onnx"]
        models[name] = hp, net, folder / "model.onnx"
    return models


def onnx_shapes(path):
    proto = onnx.load(str(path))
    return [[d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in (proto.graph.input[0], proto.graph.output[0])]


@pytest.mark.parametrize("shape", [(1, 4, 16, 16, 16), (2, 4, 32, 8, 24), (1, 4, 12, 40, 20)])
def test_onnx_runtime_agrees_with_pytorch_on_random_inputs(exported, shape):
    _, net, path = exported["small"]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.no_grad():
        expected = net(image).numpy()
    logits = session.run(None, {"image": image.numpy()})[0]
    assert logits.shape == (shape[0], 3, *shape[2:])
    assert np.abs(logits - expected).max() < 1e-4


def test_another_architecture_exports_with_its_own_shapes_and_metadata(exported):
    hp, net, path = exported["other"]
    assert onnx_shapes(path) == [["batch", 4, "8*x", "8*y", "8*z"], ["batch", 4, "8*x", "8*y", "8*z"]]
    assert onnx_shapes(exported["small"][2]) == [["batch", 4, "4*x", "4*y", "4*z"], ["batch", 3, "4*x", "4*y", "4*z"]]
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    metadata = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    assert metadata["channel_names"] == ["t1", "t1ce", "t2", "flair"] and metadata["patch_size"] == [48, 48, 48]
    assert metadata["crop_margin"] == 2 and metadata["input_multiple"] == 8 and metadata["target"] == "labels"
    assert metadata["output_activation"] == "softmax" and metadata["brats_labels"] == [0, 1, 2, 4]
    assert metadata["regions"] == {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]} and metadata["data_format"] == "brats2020"
    assert metadata["file_suffixes"] == ["_t1", "_t1ce", "_t2", "_flair"]
    assert metadata["output_channels"] == ["background", "necrotic and non-enhancing core", "edema", "enhancing tumor"]
    assert metadata["model_args"] == network.model_args(hp) and metadata["epoch"] == 7
    assert "z-score" in metadata["normalization"]
    image = torch.randn(2, 4, 16, 24, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(image).numpy()  # eval mode: one head, the running batch statistics
    assert np.abs(session.run(None, {"image": image.numpy()})[0] - expected).max() < 1e-4
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint_final.pt", "model.onnx"]  # no leftovers


def test_onnx_backend_predicts_the_real_case_as_pytorch_does(exported, sample_case, tmp_path):
    hp, _, _ = exported["small"]
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / sample_case.name).symlink_to(sample_case)
    # 27 windows of 64^3 over the 145 x 171 x 130 crop; settings unlike the trained ones, which the model restores
    hp = hp.replace(predict_input_dir=tmp_path / "input", sw_overlap=0, precision="fp32", channels_last=False,
                    channel_names="t2, t1, t1ce, flair", patch_size="32, 32, 32", target="labels")
    cases = predict.cases_to_predict(hp)
    maps = {}
    for backend in ("torch", "onnxruntime"):
        [written] = inference.predict_cases(hp.replace(backend=backend, prediction_dir=tmp_path / backend), cases)
        maps[backend] = np.asanyarray(nib.load(written).dataobj)
    assert maps["torch"].shape == (240, 240, 155) and np.count_nonzero(maps["torch"] == 2) > 100_000  # not trivial
    differing = maps["torch"] != maps["onnxruntime"]
    print(f"{np.count_nonzero(differing)} of {differing.size} voxels differ between the backends")  # 17 here
    assert np.count_nonzero(differing) <= 50
    # each of them lies on a boundary between labels, where a probability is within rounding of 0.5
    boundary = ndimage.maximum_filter(maps["torch"], size=3) != ndimage.minimum_filter(maps["torch"], size=3)
    assert boundary[differing].all()


def test_export_of_a_corrupt_checkpoint_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "checkpoint_final.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    monkeypatch.setattr(sys, "argv", ["export.py", f"run_dir={tmp_path}"])
    with pytest.raises(SystemExit) as stop:
        export.main()
    message = str(stop.value.code)
    assert message.startswith(f"error: {tmp_path / 'checkpoint_final.pt'}: corrupt or truncated checkpoint")
    assert "\n" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_final.pt"]


def test_checkpoint_globs_export_one_model_per_folder_and_refuse_a_shared_one(tmp_path):
    for fold in range(3):
        (tmp_path / f"fold_{fold}").mkdir()
        (tmp_path / f"fold_{fold}" / "checkpoint_best.pt").touch()
    hp = hyperparameters.load(overrides={"checkpoint": tmp_path / "fold_*" / "checkpoint_best.pt"})
    paths = inference.checkpoint_paths(hp)
    assert paths == [tmp_path / f"fold_{k}" / "checkpoint_best.pt" for k in range(3)]
    assert [checkpoints.onnx_path(p) for p in paths] == [tmp_path / f"fold_{k}" / "model.onnx" for k in range(3)]
    (tmp_path / "fold_0" / "checkpoint_last.pt").touch()
    with pytest.raises(ValueError, match=r"several checkpoints would be exported to .*fold_0/model\.onnx"):
        export.export(hp.replace(checkpoint=tmp_path / "fold_0" / "*.pt"))
    with pytest.raises(FileNotFoundError, match="no file matches"):
        inference.checkpoint_paths(hp.replace(checkpoint=tmp_path / "fold_9*" / "checkpoint_best.pt"))


def test_onnx_backend_names_what_is_missing(tmp_path, monkeypatch):
    hp = hyperparameters.load(overrides={"run_dir": tmp_path, "backend": "onnxruntime"})
    with pytest.raises(FileNotFoundError, match=r"model\.onnx: no ONNX model \(python export\.py writes it"):
        inference.load_for_inference(hp, torch.device("cpu"))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07 damaged")
    with pytest.raises(ValueError, match=r"model\.onnx: not a readable ONNX model \("):
        inference.load_for_inference(hp, torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ValueError, match=r"^export\.py needs the onnxscript package: pip install -r "
                                         r"requirements-onnx\.txt$"):
        export.export(hp)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ValueError, match=r"^backend: onnxruntime needs the onnxruntime package: pip install -r "
                                         r"requirements-onnx\.txt$"):
        inference.load_for_inference(hp, torch.device("cpu"))


# ---------------------------------------------------------------- a model.onnx stands for exactly its checkpoint

def copy_of_small(exported, tmp_path):
    """(settings with backend onnxruntime, a copy of the small model's folder: checkpoint_final.pt, model.onnx)."""
    hp, _, path = exported["small"]
    folder = tmp_path / "run"
    shutil.copytree(path.parent, folder)
    return hp.replace(run_dir=folder, backend="onnxruntime"), folder


def test_an_onnx_model_exported_from_another_checkpoint_is_refused_naming_both(exported, tmp_path, monkeypatch,
                                                                               tiny_raw):
    hp, folder = copy_of_small(exported, tmp_path)
    source = exported["small"][2].parent / "checkpoint_final.pt"
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["source_checkpoint"]) == {
        "path": str(source), "epoch": 7,
        "weights_sha256": checkpoints.weights_digest(torch.load(source, weights_only=True)["model"])}
    inference.load_for_inference(hp, torch.device("cpu"))  # a moved folder: the same network, still its model
    # export.py checkpoint=run/checkpoint_last.pt, and another network became checkpoint_final.pt
    shutil.copy(folder / "checkpoint_final.pt", folder / "checkpoint_last.pt")
    write_checkpoint(folder, SMALL, seed=1)
    final = folder / "checkpoint_final.pt"
    monkeypatch.setattr(sys, "argv", ["predict.py", f"run_dir={folder}", "backend=onnxruntime",
                                      f"predict_input_dir={tiny_raw}", f"prediction_dir={tmp_path / 'p'}"])
    with pytest.raises(SystemExit) as stop:
        predict.main()
    assert str(stop.value.code) == (f"error: {folder / 'model.onnx'}: exported from {source} (epoch 7), not from the "
                                    f"checkpoint asked for, {final} (epoch 7): another network; export it with python "
                                    f"export.py checkpoint={final}")
    assert not (tmp_path / "p").exists()
    inference.load_for_inference(hp.replace(checkpoint=folder / "checkpoint_last.pt"), torch.device("cpu"))
    inference.load_for_inference(hp.replace(checkpoint=folder / "model.onnx"), torch.device("cpu"))  # named itself


def test_the_weights_digest_tells_networks_apart_whatever_their_wrapper(exported):
    weights = exported["small"][1].state_dict()
    digest = checkpoints.weights_digest(weights)
    assert checkpoints.weights_digest({f"module.{k}": v for k, v in weights.items()}) == digest  # DDP's names
    changed = {k: v.clone() for k, v in weights.items()}
    next(iter(changed.values())).view(-1)[0] += 1e-6
    assert checkpoints.weights_digest(changed) != digest


def test_train_overwrite_removes_the_old_runs_onnx_model(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "metrics.csv", "model.onnx"):
        (run_dir / name).write_bytes(b"the old run's")
    training.start_run_dir(run_dir, hyperparameters.load(overrides={"overwrite": True}))
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("change, expected", [
    ("no metadata", ": no metadata of export.py (channel_names, patch_size, crop_margin, target, source_checkpoint "
                    "missing): not a model exported by this project"),
    ("a window of 100000^3", ": the settings it was trained with: 'patch_size' must be each between 1 and 512, got "
                             "[100000, 100000, 100000]"),
    ("an older export", ": does not record the weights of its checkpoint (an older export.py); export "),
])
def test_an_onnx_model_without_the_projects_metadata_or_with_bad_values_is_refused(exported, tmp_path, change,
                                                                                   expected):
    hp, folder = copy_of_small(exported, tmp_path)
    proto = onnx.load(str(folder / "model.onnx"))
    props = {prop.key: prop.value for prop in proto.metadata_props}
    props = {} if change == "no metadata" else {**props, **({"patch_size": json.dumps([100000] * 3)} if "window" in
                                                            change else {"source_checkpoint": '"checkpoint_best.pt"'})}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(folder / "model.onnx"))
    with pytest.raises(ValueError) as error:
        inference.load_for_inference(hp, torch.device("cpu"))
    assert str(error.value).startswith(f"{folder / 'model.onnx'}{expected}")
