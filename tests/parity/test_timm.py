"""Parity of the Flax backbones with timm, through the timm weight import (mskjax.weights.timm).

timm models are built with `pretrained=False` (nothing is downloaded), with random weights and
*randomised* BatchNorm statistics and affine parameters. Tolerance: eval-mode logits and pre-pool
feature maps (`forward_features`) within 1e-4 x max(1, max |reference|) in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from timm.models import get_pretrained_cfg

from mskjax import checkpoint, convert
from mskjax.models import create
from mskjax.weights import (CheckpointMismatch, from_state_dict, load, model_arch, normalization_for,
                            variant_for)
from mskjax.weights import timm as timm_weights

NAMES = ["resnet50", "efficientnet_b3", "tf_efficientnet_b3"]
SIDE = 80  # even, so TF 'SAME' padding is asymmetric on every stride-2 layer


def randomised_timm_model(name: str, num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.bias is not None:
                mod.bias.normal_(0.0, 0.2)  # timm zero-initialises some biases
    return model.eval()


@functools.lru_cache(maxsize=None)
def built(name: str):
    """(name, timm model, our model, variables, our (features, logits), timm's (features, logits)),
    built once per test session (one jit per model)."""
    tmodel = randomised_timm_model(name, num_classes=7)
    variables = from_state_dict("timm", name, tmodel.state_dict())
    model = create(model_arch("timm", name), num_classes=7, **variant_for("timm", name))
    x = np.random.RandomState(1).randn(2, 3, SIDE, SIDE).astype(np.float32)
    with torch.no_grad():
        ref_feat = tmodel.forward_features(torch.from_numpy(x))
        ref_logits = tmodel.forward_head(ref_feat).numpy()
        ref_feat = ref_feat.numpy().transpose(0, 2, 3, 1)

    @jax.jit
    def run(v, x):
        f = model.apply(v, x, method="features")
        return f, model.apply(v, f, method="head")

    feat, logits = run(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    return name, tmodel, model, variables, (np.asarray(feat), np.asarray(logits)), (ref_feat, ref_logits)


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    return built(request.param)


def test_eval_logits_and_features(pair):
    name, _, _, _, (feat, logits), (ref_feat, ref_logits) = pair
    assert logits.shape == ref_logits.shape == (2, 7)
    assert feat.shape == ref_feat.shape
    tol_l = 1e-4 * max(1.0, np.abs(ref_logits).max())
    tol_f = 1e-4 * max(1.0, np.abs(ref_feat).max())
    assert np.abs(logits - ref_logits).max() <= tol_l, name
    assert np.abs(feat - ref_feat).max() <= tol_f, name


def test_trainable_parameter_counts_equal_timm(pair):
    name, tmodel, _, variables, _, _ = pair
    want = sum(p.numel() for p in tmodel.parameters() if p.requires_grad)
    assert sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(variables["params"])) == want


def test_variant_read_from_the_timm_model(pair):
    """BatchNorm epsilon/momentum and padding of the variant are the timm model's own."""
    name, tmodel, model, _, _, _ = pair
    bns = [m for m in tmodel.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in bns} == {(model.bn_epsilon, model.bn_momentum)}
    same = any(type(m).__name__ == "Conv2dSame" for m in tmodel.modules())
    assert model.padding == ("same" if same else "symmetric")


def test_normalization_follows_timm_pretrained_cfg():
    for name in list(timm_weights.DEFAULT_TAG_MEAN_STD) + ["tf_efficientnet_b3.ap_in1k", "resnet50.tv_in1k"]:
        cfg = get_pretrained_cfg(name)
        got = normalization_for("timm", name)
        assert got["input_range"] == [0.0, 1.0]
        np.testing.assert_allclose(got["mean"], cfg.mean, err_msg=name)
        np.testing.assert_allclose(got["std"], cfg.std, err_msg=name)
        if "." not in name:  # the table used without timm agrees with timm's default tags
            np.testing.assert_allclose(timm_weights.DEFAULT_TAG_MEAN_STD[name], (cfg.mean, cfg.std), err_msg=name)
    assert normalization_for("timm", "tf_efficientnet_b3.ap_in1k")["mean"] == [0.5, 0.5, 0.5]


def test_names_and_errors():
    assert model_arch("timm", "tf_efficientnet_b3.ns_jft_in1k") == "efficientnet_b3"
    assert variant_for("timm", "tf_efficientnet_b0")["padding"] == "same"
    with pytest.raises(ValueError, match="resnet50d"):
        model_arch("timm", "resnet50d")


def test_wrong_architecture_names_keys():
    _, tmodel, _, _, _, _ = built("efficientnet_b3")
    with pytest.raises(CheckpointMismatch) as e:
        from_state_dict("timm", "efficientnet_b0", tmodel.state_dict())
    msg = str(e.value)
    assert "timm efficientnet_b0" in msg and "blocks.0.1.conv_dw.weight" in msg and "shape mismatches" in msg


def test_convert_cli_round_trip(tmp_path):
    name, tmodel, _, variables, _, _ = built("tf_efficientnet_b3")
    from safetensors.torch import save_file
    src = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tmodel.state_dict().items()}, str(src))
    out = tmp_path / "ckpt"
    assert convert.main(["--source", "timm", "--arch", name, str(src), str(out)]) == 0
    model, restored, meta = checkpoint.load_model(out)
    assert meta["arch"] == "efficientnet_b3" and meta["num_classes"] == 7
    assert meta["variant"] == {"padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.1}
    assert meta["source"]["name"] == name and meta["source"]["format"] == "timm"
    assert meta["normalization"] == normalization_for("timm", name)
    assert model.padding == "same" and model.bn_epsilon == 1e-3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
    gray = load("timm", name, src, in_channels=1)  # the safetensors reader through `load`
    np.testing.assert_allclose(gray["params"]["stem_conv"]["kernel"][:, :, 0],
                               variables["params"]["stem_conv"]["kernel"].sum(axis=2), rtol=1e-6)
