import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bratsunet import hyperparameters
from bratsunet.checkpoints import load_checkpoint, load_model, save_checkpoint
from bratsunet.network import UNet3D, build_model, count_parameters, model_args


def hand_count(in_channels, out_channels, features, deep_supervision=False):
    """Parameters of the U-Net counted from its definition: bias-free 3x3x3 convs, 2 affine
    parameters per channel and norm, 2x2x2 transposed convs and 1x1x1 heads with bias."""
    def block(c_in, c_out):  # conv, norm, conv, norm
        return 27 * c_in * c_out + 2 * c_out + 27 * c_out * c_out + 2 * c_out
    total = sum(block(c_in, c_out) for c_in, c_out in zip([in_channels] + features[:-1], features))
    for low, high in zip(features[:-1], features[1:]):  # decoder levels
        total += 8 * high * low + low + block(2 * low, low)
    heads = max(len(features) - 2, 1) if deep_supervision else 1  # the lowest decoder level has no head
    return total + sum(f * out_channels + out_channels for f in features[:heads])


def tiny_hp(**overrides):
    return hyperparameters.load(overrides={"features": [4, 8], **overrides})


@pytest.mark.parametrize("features", [[4, 8], [4, 8, 16], [2, 4, 8, 16]])
@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_output_shape(features, norm):
    model = UNet3D(4, 3, features, norm)
    factor = 2 ** (len(features) - 1)
    x = torch.randn(2, 4, factor, 2 * factor, 3 * factor)
    assert model(x).shape == (2, 3, factor, 2 * factor, 3 * factor)
    model.eval()
    assert model(x[:1]).shape == (1, 3, factor, 2 * factor, 3 * factor)


def test_parameter_count_matches_hand_count():
    # features [4, 8], 4 -> 3 channels, written out: encoder 880, bottleneck 2624, decoder 1572, head 15
    assert hand_count(4, 3, [4, 8]) == 880 + 2624 + 1572 + 15 == 5091
    for norm in ("instance", "batch", "group"):
        assert count_parameters(UNet3D(4, 3, [4, 8], norm)) == 5091
    assert count_parameters(UNet3D(4, 4, [3, 6, 12], deep_supervision=True)) == hand_count(4, 4, [3, 6, 12], True)


def test_paper_configuration_builds_without_memory():
    with torch.device("meta"):  # shapes only, no weights allocated
        model = UNet3D(4, 3, [64, 128, 256, 512, 1024])
    assert count_parameters(model) == hand_count(4, 3, [64, 128, 256, 512, 1024]) == 90_303_875
    print(f"paper configuration 64,128,256,512,1024: {count_parameters(model):,} parameters")


def test_strided_convolutions_downsample_as_nnunets_plain_unet(monkeypatch):
    """downsampling: conv (nnU-Net's PlainConvUNet): the first 3x3x3 convolution of every lower level has stride 2
    and no max-pooling runs; the same shapes and parameter count as with max-pooling, and checkpoints rebuild it."""
    hp = tiny_hp(features=[2, 4, 8, 16], downsampling="conv", deep_supervision=True)
    model = build_model(hp)
    strides = [encoder[0].stride for encoder in model.encoders]
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert all(encoder[3].stride == (1, 1, 1) for encoder in model.encoders)  # the second convolution
    monkeypatch.setattr(torch.nn.functional, "max_pool3d", lambda *args, **kwargs: pytest.fail("max-pooled"))
    outputs = model(torch.randn(1, 4, 16, 16, 8))
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 16, 16, 8), (1, 3, 8, 8, 4)]
    assert count_parameters(model) == hand_count(4, 3, [2, 4, 8, 16], True)
    assert model_args(hp)["downsampling"] == "conv" and "downsampling" not in model_args(tiny_hp())
    rebuilt = UNet3D(**model_args(hp))
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.encoders[1][0].stride == (2, 2, 2)


def test_parameter_counts_written_in_the_docs_are_the_counted_ones():
    repo = Path(__file__).resolve().parents[1]
    default = count_parameters(build_model(hyperparameters.load()))
    gpu = build_model(hyperparameters.load(repo / "hyperparameters_brats2020_gpu.txt"))
    print(f"default network: {default:,} parameters; GPU settings: {count_parameters(gpu):,}")
    for path in ("README.md", "docs/training.md"):
        assert f"{default:,} parameters" in (repo / path).read_text(), path
    for path in ("docs/training.md", "docs/gpus.md"):
        assert f"{count_parameters(gpu):,} parameters" in (repo / path).read_text(), path


def test_build_model_from_hyperparameters():
    hp = tiny_hp(target="labels", norm="group", deep_supervision=True)
    assert model_args(hp) == {"in_channels": 4, "out_channels": 4, "features": [4, 8], "norm": "group",
                              "deep_supervision": True}
    model = build_model(tiny_hp(channel_names=["flair", "t1ce"]))
    assert model(torch.randn(1, 2, 4, 4, 4)).shape == (1, 3, 4, 4, 4)


def test_deep_supervision_outputs():
    model = UNet3D(4, 3, [2, 4, 8, 16], deep_supervision=True)
    x = torch.randn(1, 4, 16, 16, 8)
    outputs = model(x)
    # 3 decoder levels; the lowest (4, 4, 2), which nnU-Net's loss weighs 0, makes no output
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 16, 16, 8), (1, 3, 8, 8, 4)]
    model.eval()
    full = model(x)
    assert isinstance(full, torch.Tensor) and full.shape == (1, 3, 16, 16, 8)


def test_nnunet_brats_network_on_128_cubed_patches():
    """The GPU settings' network: nnU-Net's 6 stages, a 4^3 bottleneck for 128^3 patches, 4 supervised outputs."""
    hp = hyperparameters.load(Path(__file__).resolve().parents[1] / "hyperparameters_brats2020_gpu.txt")
    assert list(hp.features) == [32, 64, 128, 256, 320, 320] and hp.patch_size == (128, 128, 128)
    with torch.device("meta"):  # shapes only
        model = build_model(hp)
        bottleneck = []
        model.encoders[-1].register_forward_hook(lambda module, inputs, output: bottleneck.append(output.shape))
        outputs = model(torch.empty(2, 4, *hp.patch_size))
    assert bottleneck == [(2, 320, 4, 4, 4)]
    assert [tuple(o.shape[2:]) for o in outputs] == [(128,) * 3, (64,) * 3, (32,) * 3, (16,) * 3]
    assert count_parameters(model) == hand_count(4, 3, list(hp.features), True) == 31_194_188


def test_invalid_size_names_side_and_nearest_sizes():
    model = UNet3D(4, 3, [2, 4, 8, 16])
    with pytest.raises(ValueError, match=r"side y is 30, not a multiple of 8.*nearest valid sizes: 24 or 32"):
        model(torch.randn(1, 4, 16, 30, 16))
    with pytest.raises(ValueError, match=r"side z is 5.*nearest valid sizes: 8"):
        model(torch.randn(1, 4, 16, 16, 5))


def make_state(model):
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 4, 4, 4, 4)).sum().backward()
    optimizer.step()
    return {"model_args": {"in_channels": 4, "out_channels": 3, "features": [4, 8], "norm": "instance",
                           "deep_supervision": False},
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "best_score": 0.5,
            "rng": {"torch": torch.get_rng_state()}, "hyperparameters": tiny_hp().to_dict()}


def test_checkpoint_round_trip(tmp_path):
    model = UNet3D(4, 3, [4, 8])
    state = make_state(model)
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(state, path)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["best_score"] == 0.5 and loaded["hyperparameters"] == state["hyperparameters"]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    restored, checkpoint = load_model(path, "cpu")
    x = torch.randn(1, 4, 4, 4, 4)
    assert not restored.training and torch.equal(restored(x), model.eval()(x))


def test_save_refuses_non_plain_values_and_leaves_no_file(tmp_path):
    with pytest.raises(TypeError, match=r"state\['rng'\]\['numpy'\].*numpy.ndarray"):
        save_checkpoint({"rng": {"numpy": np.zeros(3)}}, tmp_path / "c.pt")
    with pytest.raises(TypeError, match="best_score"):
        save_checkpoint({"best_score": np.float64(0.5)}, tmp_path / "c.pt")  # would not load with weights_only
    assert list(tmp_path.iterdir()) == []


def test_save_failure_removes_temporary_file(tmp_path, monkeypatch):
    def broken_save(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 1}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


class CreatesFile:
    """Unpickling this would call open(target, "w"): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_load_refuses_code_in_checkpoint(tmp_path, writer):
    target, path = tmp_path / "pwned.txt", tmp_path / "evil.pt"
    payload = {"model": CreatesFile(target)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ValueError, match=r"code objects \(io.open\)") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not target.exists()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    for content in (b"this is not a checkpoint" * 10, b"garbage" * 10, b""):
        garbage.write_bytes(content)
        with pytest.raises(ValueError, match=r"garbage\.pt: corrupt or truncated checkpoint"):
            load_checkpoint(garbage)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(make_state(UNet3D(4, 3, [4, 8])), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"truncated\.pt: corrupt or truncated checkpoint"):
        load_checkpoint(truncated)
    not_dict = tmp_path / "list.pt"
    save_checkpoint([1, 2], not_dict)
    with pytest.raises(ValueError, match=r"list\.pt: not a checkpoint"):
        load_checkpoint(not_dict)


def test_load_model_strips_wrapper_prefixes(tmp_path):
    model = UNet3D(4, 3, [4, 8]).eval()
    state = make_state(model)
    state["model"] = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(state, tmp_path / "c.pt")
    restored, _ = load_model(tmp_path / "c.pt", "cpu")
    x = torch.randn(1, 4, 4, 4, 4)
    assert torch.equal(restored(x), model(x))


def test_load_model_mismatch_lists_keys_and_differing_args(tmp_path):
    state = make_state(UNet3D(4, 3, [4, 16]))  # weights of a wider net, model_args say [4, 8]
    state["model"].pop("heads.0.bias")
    state["model"]["extra.weight"] = torch.zeros(1)
    save_checkpoint(state, tmp_path / "c.pt")
    with pytest.raises(ValueError) as error:
        load_model(tmp_path / "c.pt", "cpu", hp=tiny_hp(features=[4, 16], norm="batch"))
    message = str(error.value)
    assert "c.pt" in message and "\n" not in message
    assert "missing: heads.0.bias" in message and "unexpected: extra.weight" in message
    assert "wrong shape (checkpoint vs model): encoders.1.0.weight (16, 4, 3, 3, 3) vs (8, 4, 3, 3, 3)" in message
    assert "(+" in message  # more wrong-shape keys than listed
    assert "features [4, 8] (checkpoint) vs [4, 16] (now)" in message and "norm instance (checkpoint) vs batch" in message
