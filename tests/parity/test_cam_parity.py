"""Parity of mskjax.cam with pytorch-grad-cam on identical weights.

torchvision models with random weights and randomised BatchNorm statistics are imported into Flax
with `mskjax.weights.from_state_dict`; both sides get the same (B=2, non-square 96 x 64) inputs,
the same layer (resnet50: layer4; efficientnet_b3: features[-1] = our "top") and explicit targets
of a 5-class head. Tolerance: max |difference| <= 1e-3 on the final maps, which both sides
normalise to [0, 1] (ReLU, min-max, resize, min-max). The input is non-square so that a swapped
height/width anywhere would show.

EigenCAM and eigen_smooth: the principal component's sign is arbitrary in pytorch-grad-cam (LAPACK
decides); its `get_2d_projection` is wrapped here to apply our documented rule (flip so that the
projection's inner product with the uncentred channel sum of its input is >= 0) before comparing.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import pytorch_grad_cam
import pytorch_grad_cam.base_cam
import pytorch_grad_cam.eigen_cam
from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputTarget

from mskjax import cam as C
from mskjax.models import create
from mskjax.weights import from_state_dict, variant_for

H, W = 96, 64
NUM_CLASSES = 5
TARGETS = np.array([3, 1], np.int32)
TOL = 1e-3
METHODS = {
    "grad_cam": pytorch_grad_cam.GradCAM,
    "grad_cam_plus_plus": pytorch_grad_cam.GradCAMPlusPlus,
    "hires_cam": pytorch_grad_cam.HiResCAM,
    "xgrad_cam": pytorch_grad_cam.XGradCAM,
    "layer_cam": pytorch_grad_cam.LayerCAM,
    "eigen_cam": pytorch_grad_cam.EigenCAM,
}


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


def torch_layer(tmodel, name: str):
    return tmodel.features[-1] if name == "top" else getattr(tmodel, name) if name != "stem" else tmodel.maxpool


@contextlib.contextmanager
def aligned_eigen_sign():
    """Apply mskjax's sign rule to pytorch-grad-cam's projections (its sign is arbitrary)."""
    original = pytorch_grad_cam.base_cam.get_2d_projection

    def aligned(batch):
        proj = original(batch)
        anchor = np.where(np.isnan(batch), 0, batch).sum(axis=1)
        flip = (proj * anchor).sum(axis=(1, 2)) < 0
        return np.where(flip[:, None, None], -proj, proj).astype(np.float32)

    mods = (pytorch_grad_cam.base_cam, pytorch_grad_cam.eigen_cam)
    for m in mods:
        m.get_2d_projection = aligned
    try:
        yield
    finally:
        for m in mods:
            m.get_2d_projection = original


def reference(cls, tmodel, layer, x, targets, **kw):
    with cls(model=tmodel, target_layers=[layer]) as method:
        return method(input_tensor=x, targets=targets, **kw)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The references are tiny; torch's thread pool only spins on a shared 2-core machine (25x
    slower than one thread there). Restored afterwards for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def build(arch: str, layer: str):
    """Torch model, Flax twin with the same weights, and one input batch (built once per module)."""
    tmodel = randomised_torch_model(arch, NUM_CLASSES)
    variables = from_state_dict("torchvision", arch, tmodel.state_dict())
    model = create(arch, num_classes=NUM_CLASSES, **variant_for("torchvision", arch))
    x = torch.from_numpy(np.random.RandomState(1).randn(2, 3, H, W).astype(np.float32))
    xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    return dict(arch=arch, layer=layer, tmodel=tmodel, model=model, variables=variables, x=x, xj=xj)


@pytest.fixture(scope="module", params=[("resnet50", "layer4"), ("efficientnet_b3", "top")],
                ids=["resnet50", "efficientnet_b3"])
def pair(request):
    return build(*request.param)


@pytest.fixture(scope="module")
def ours(pair):
    """All six methods from one jitted forward + backward per architecture."""
    model, layer = pair["model"], pair["layer"]
    fn = jax.jit(lambda v, x, t: C.cam_maps(model, v, x, t, layer, methods=tuple(METHODS)))
    return {k: np.asarray(v) for k, v in fn(pair["variables"], pair["xj"], jnp.asarray(TARGETS)).items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_method_matches_pytorch_grad_cam(pair, ours, method):
    targets = [ClassifierOutputTarget(int(t)) for t in TARGETS]
    with aligned_eigen_sign():
        ref = reference(METHODS[method], pair["tmodel"], torch_layer(pair["tmodel"], pair["layer"]),
                        pair["x"], targets)
    got = ours[method]
    assert got.shape == ref.shape == (2, H, W)
    assert ref.max() > 0.5  # a real map, not an all-zero one that would match anything small
    diff = np.abs(got - ref).max()
    assert diff <= TOL, f"{pair['arch']} {method}: max |diff| {diff:.2e}"


def test_eigen_smooth_and_aug_smooth_match():
    """Grad-CAM with eigen_smooth, and with aug_smooth (6 flip x intensity variants), resnet50."""
    pair = build("resnet50", "layer4")
    model, layer, v, xj = pair["model"], pair["layer"], pair["variables"], pair["xj"]
    tl = torch_layer(pair["tmodel"], layer)
    targets = [ClassifierOutputTarget(int(t)) for t in TARGETS]
    with aligned_eigen_sign():
        ref_eig = reference(pytorch_grad_cam.GradCAM, pair["tmodel"], tl, pair["x"], targets, eigen_smooth=True)
    ref_aug = reference(pytorch_grad_cam.GradCAM, pair["tmodel"], tl, pair["x"], targets, aug_smooth=True)
    fn = jax.jit(lambda v, x, t, e, a: C.grad_cam(model, v, x, t, layer, eigen_smooth=e, aug_smooth=a),
                 static_argnums=(3, 4))
    got_eig = np.asarray(fn(v, xj, jnp.asarray(TARGETS), True, False))
    got_aug = np.asarray(fn(v, xj, jnp.asarray(TARGETS), False, True))
    assert np.abs(got_eig - ref_eig).max() <= TOL
    assert np.abs(got_aug - ref_aug).max() <= TOL


def test_binary_head_targets_the_abnormal_logit():
    """num_classes=1: our targets=None (and index 0) equal ClassifierOutputTarget(0) and
    BinaryClassifierOutputTarget(1); -logit via score_fn equals BinaryClassifierOutputTarget(0)."""
    tmodel = randomised_torch_model("resnet50", 1, seed=3)
    variables = from_state_dict("torchvision", "resnet50", tmodel.state_dict())
    model = create("resnet50", num_classes=1, **variant_for("torchvision", "resnet50"))
    x = torch.from_numpy(np.random.RandomState(4).randn(2, 3, H, W).astype(np.float32))
    xj = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    ref_none = reference(pytorch_grad_cam.GradCAM, tmodel, tmodel.layer4, x, None)
    ref_pos = reference(pytorch_grad_cam.GradCAM, tmodel, tmodel.layer4, x, [BinaryClassifierOutputTarget(1)] * 2)
    ref_neg = reference(pytorch_grad_cam.GradCAM, tmodel, tmodel.layer4, x, [BinaryClassifierOutputTarget(0)] * 2)
    np.testing.assert_allclose(ref_none, ref_pos, atol=1e-6)
    assert np.abs(ref_pos - ref_neg).max() > 0.1  # the sign of the score matters

    fn = jax.jit(lambda v, x: (C.grad_cam(model, v, x, None, "layer4"),
                               C.grad_cam(model, v, x, jnp.zeros(2, jnp.int32), "layer4"),
                               C.grad_cam(model, v, x, None, "layer4", score_fn=lambda z, t: -z[:, 0])))
    got_none, got_zero, got_neg = (np.asarray(m) for m in fn(variables, xj))
    assert np.abs(got_none - ref_pos).max() <= TOL
    assert np.abs(got_zero - ref_pos).max() <= TOL
    assert np.abs(got_neg - ref_neg).max() <= TOL


def test_score_cam_matches_on_resnet50_stem():
    """Score-CAM on resnet50's 64-channel stem at 64 x 48 (128 masked forwards per side keep this
    fast); 64 is not a multiple of the chunk size, so the padded last chunk is exercised too."""
    pair = build("resnet50", "layer4")
    x = pair["x"][:, :, :64, :48].contiguous()
    targets = [ClassifierOutputTarget(int(t)) for t in TARGETS]
    ref = reference(pytorch_grad_cam.ScoreCAM, pair["tmodel"], pair["tmodel"].maxpool, x, targets)
    model = pair["model"]
    got = jax.jit(lambda v, x, t: C.score_cam(model, v, x, t, "stem", chunk_size=24))(
        pair["variables"], jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(TARGETS))
    assert np.abs(np.asarray(got) - ref).max() <= TOL
