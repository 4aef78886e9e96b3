import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from mskjax import checkpoint, convert
from mskjax.models import create
from mskjax.weights import CheckpointMismatch, from_state_dict, load


@pytest.fixture(scope="module")
def tv_resnet18():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.3)
                mod.running_var.uniform_(0.5, 2)
    return m


def test_one_channel_stem_sums_kernel(tv_resnet18):
    v3 = from_state_dict("torchvision", "resnet18", tv_resnet18.state_dict())
    v1 = from_state_dict("torchvision", "resnet18", tv_resnet18.state_dict(), in_channels=1)
    m = create("resnet18", num_classes=10)
    gray = jnp.asarray(np.random.RandomState(0).rand(2, 64, 64, 1), jnp.float32)
    a = m.apply(v1, gray)
    b = m.apply(v3, jnp.repeat(gray, 3, axis=-1))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_new_head_keeps_backbone(tv_resnet18):
    v = from_state_dict("torchvision", "resnet18", tv_resnet18.state_dict(), num_classes=1)
    assert v["params"]["fc"]["kernel"].shape == (512, 1)
    ref = tv_resnet18.state_dict()["layer1.0.conv1.weight"].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(v["params"]["layer1_block0"]["conv1"]["kernel"], ref)


def test_wrong_architecture_names_keys(tv_resnet18):
    with pytest.raises(CheckpointMismatch) as e:
        from_state_dict("torchvision", "resnet34", tv_resnet18.state_dict())
    assert "missing" in str(e.value) and "layer1_block2" in str(e.value)
    sd = dict(tv_resnet18.state_dict())
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    sd["extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatch) as e:
        from_state_dict("torchvision", "resnet18", sd)
    msg = str(e.value)
    assert "extra.weight" in msg and "layer1.0.conv1.weight" in msg and "(3, 3, 64, 64)" in msg


def test_truncated_pth_is_a_clear_error(tmp_path, tv_resnet18):
    path = tmp_path / "r18.pth"
    torch.save(tv_resnet18.state_dict(), path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatch, match="cut.pth"):
        load("torchvision", "resnet18", tmp_path / "cut.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load("torchvision", "resnet18", tmp_path / "nope.pth")


def test_convert_cli_round_trip(tmp_path, tv_resnet18):
    path = tmp_path / "r18.pth"
    torch.save(tv_resnet18.state_dict(), path)
    out = tmp_path / "ckpt"
    assert convert.main(["--source", "torchvision", "--arch", "resnet18", str(path), str(out)]) == 0
    model, variables, meta = checkpoint.load_model(out)
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 10 and meta["in_channels"] == 3
    assert meta["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["source"]["sha256"] == checkpoint.file_sha256(path)
    x = np.random.RandomState(0).rand(1, 3, 64, 64).astype(np.float32)
    with torch.no_grad():
        ref = tv_resnet18(torch.from_numpy(x)).numpy()
    got = model.apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # A second conversion into the same place is refused unless asked.
    assert convert.main(["--source", "torchvision", "--arch", "resnet18", str(path), str(out)]) == 2
    # Fine-tuning head and one-channel stem are recorded in the metadata.
    out1 = tmp_path / "ckpt1"
    assert convert.main(["--source", "torchvision", "--arch", "resnet18", str(path), str(out1),
                         "--num_classes", "1", "--in_channels", "1"]) == 0
    _, v1, meta1 = checkpoint.load_model(out1)
    assert meta1["num_classes"] == 1 and meta1["in_channels"] == 1 and meta1["source"]["new_head"]
    assert v1["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)


def test_damaged_checkpoint_directories(tmp_path):
    m = create("resnet18", num_classes=2)
    v = jax.jit(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))()
    meta = checkpoint.classifier_metadata("resnet18", 2, 3, 224, {"padding": "symmetric"}, {})
    good = checkpoint.save(tmp_path / "good", v, meta)
    checkpoint.load_model(good)
    (good / checkpoint.METADATA_FILE).unlink()
    with pytest.raises(CheckpointMismatch, match="mskjax.json is missing"):
        checkpoint.load_model(good)
    with pytest.raises(FileNotFoundError):
        checkpoint.load_model(tmp_path / "absent")
    wrong = checkpoint.save(tmp_path / "wrong", v, {**meta, "arch": "resnet34"})
    with pytest.raises(CheckpointMismatch, match="missing"):
        checkpoint.load_model(wrong)
