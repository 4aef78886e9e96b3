"""Parity of the Flax backbones with torchvision, through the torchvision weight import.

Random weights and *randomised* BatchNorm statistics (fresh ones are 0/1 and would hide errors in
their use). Tolerances: eval-mode logits and pre-pool feature maps within
1e-4 x max(1, max |reference|) in float32; train mode (batch statistics) within 1e-3, and the
running-statistic updates (torch's unbiased variance) within 1e-4 relative.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

from mskjax.models import create
from mskjax.weights import from_state_dict, variant_for

ARCHS = ["resnet18", "resnet50", "efficientnet_b0", "efficientnet_b3"]
SIDE = 96  # small inputs prove the port; CI time matters


def randomised_torch_model(arch: str, num_classes: int, seed: int = 0):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1.0, 0.2)
                mod.bias.normal_(0.0, 0.2)
    return model.eval()


def torch_features(model, x):
    if isinstance(model, torchvision.models.ResNet):
        m = model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))
    return model.features(x)


def to_nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    arch = request.param
    tmodel = randomised_torch_model(arch, num_classes=7)
    variables = from_state_dict("torchvision", arch, tmodel.state_dict())
    model = create(arch, num_classes=7, **variant_for("torchvision", arch))
    return arch, tmodel, model, variables


def test_eval_logits_and_features(pair):
    arch, tmodel, model, variables = pair
    x = torch.from_numpy(np.random.RandomState(1).randn(2, 3, SIDE, SIDE).astype(np.float32))
    with torch.no_grad():
        ref_logits = tmodel(x).numpy()
        ref_feat = torch_features(tmodel, x).numpy().transpose(0, 2, 3, 1)

    @jax.jit
    def run(v, x):
        f = model.apply(v, x, method="features")
        return f, model.apply(v, f, method="head")

    feat, logits = run(variables, to_nhwc(x))
    tol_l = 1e-4 * max(1.0, np.abs(ref_logits).max())
    tol_f = 1e-4 * max(1.0, np.abs(ref_feat).max())
    assert np.abs(np.asarray(logits) - ref_logits).max() <= tol_l, arch
    assert np.abs(np.asarray(feat) - ref_feat).max() <= tol_f, arch


def test_train_mode_outputs_and_running_stats(pair):
    arch, tmodel, model, variables = pair
    tmodel = randomised_torch_model(arch, num_classes=7)  # a fresh copy: train() mutates statistics
    flax_model = model.clone(**({"dropout": 0.0, "stochastic_depth": 0.0} if "efficientnet" in arch else {}))
    tmodel.train()
    for mod in tmodel.modules():  # deterministic comparison: no dropout / stochastic depth in torch
        if isinstance(mod, (torch.nn.Dropout, torchvision.ops.StochasticDepth)):
            mod.eval()
    x = torch.from_numpy(np.random.RandomState(2).randn(4, 3, SIDE, SIDE).astype(np.float32))
    with torch.no_grad():
        ref = tmodel(x).numpy()
    out, updates = jax.jit(lambda v, x: flax_model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, to_nhwc(x))
    assert np.abs(np.asarray(out) - ref).max() <= 1e-3 * max(1.0, np.abs(ref).max()), arch
    expected = from_state_dict("torchvision", arch, tmodel.state_dict())["batch_stats"]
    got = traverse_util.flatten_dict(jax.tree.map(np.asarray, updates["batch_stats"]))
    for k, want in traverse_util.flatten_dict(expected).items():
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=1e-4, err_msg=f"{arch} {'/'.join(k)}")


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameter_counts_equal_torchvision(arch):
    tmodel = getattr(torchvision.models, arch)(num_classes=1000)
    want = sum(p.numel() for p in tmodel.parameters() if p.requires_grad)
    model = create(arch, num_classes=1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"])) == want


def test_bfloat16_compute_close_to_float32():
    """bfloat16 compute (float32 parameters and statistics): logits within 5e-2 x max(1, max |logit|)
    of the float32 reference on resnet18 (documented tolerance for bf16's 8-bit mantissa)."""
    tmodel = randomised_torch_model("resnet18", num_classes=5)
    variables = from_state_dict("torchvision", "resnet18", tmodel.state_dict())
    x = torch.from_numpy(np.random.RandomState(3).randn(2, 3, SIDE, SIDE).astype(np.float32))
    with torch.no_grad():
        ref = tmodel(x).numpy()
    model = create("resnet18", num_classes=5, dtype="bfloat16")
    out = jax.jit(model.apply)(variables, to_nhwc(x))
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - ref).max() <= 5e-2 * max(1.0, np.abs(ref).max())
