"""Properties of mskjax.cam that hold for any weights (parity with pytorch-grad-cam lives in
tests/parity/test_cam_parity.py). A randomly initialised resnet18 with a 4-class head on
non-square 96 x 64 inputs keeps compiles short; a swapped height/width would show."""
from __future__ import annotations

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mskjax import cam as C
from mskjax.geometry import letterbox_geometry, map_to_original
from mskjax.models import create

H, W = 96, 64
K = 4


@pytest.fixture(scope="module")
def net():
    model = create("resnet18", num_classes=K)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, H, W, 3)))
    # Non-zero BatchNorm shifts: fresh statistics would make stage outputs suspiciously tidy.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
        if "bias" in str(p[-1]) else x, variables)
    images = jax.random.normal(jax.random.PRNGKey(1), (3, H, W, 3))
    return model, variables, images


@pytest.fixture(scope="module")
def all_maps(net):
    model, v, x = net
    methods = tuple(m for m in C.METHODS if m != "score_cam")
    fn = jax.jit(lambda v, x, t: C.cam_maps(model, v, x, t, methods=methods))
    return {k: np.asarray(m) for k, m in fn(v, x, jnp.array([0, 2, 3])).items()}


def test_maps_are_in_unit_range_with_input_shape(all_maps):
    assert set(all_maps) == set(C.METHODS) - {"score_cam"}
    for name, m in all_maps.items():
        assert m.shape == (3, H, W) and m.dtype == np.float32, name
        assert m.min() >= 0.0 and m.max() <= 1.0, name
        assert m.max() > 0.9, name  # normalised: every map reaches (almost) 1


def test_cam_equals_grad_cam_for_gap_linear_head(net, all_maps):
    """For GAP -> Dense, dlogit_t/dA = W[:, t] / (h w) everywhere: Grad-CAM's weights are CAM's
    divided by h*w, so the raw maps are proportional and the normalised maps equal."""
    model, v, _ = net
    assert np.abs(all_maps["cam"] - all_maps["grad_cam"]).max() < 1e-5
    raw = jax.jit(lambda v, x, t: _raw_pair(model, v, x, t))
    for seed in range(3):  # several inputs and targets
        x = jax.random.normal(jax.random.PRNGKey(10 + seed), (2, H, W, 3))
        t = jnp.array([seed % K, (seed + 1) % K])
        r_cam, r_grad, hw = raw(v, x, t)
        np.testing.assert_allclose(np.asarray(r_cam), np.asarray(r_grad) * int(hw), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(r_cam).max()))


def _raw_pair(model, v, x, t):
    acts, grads, _, used = C.activations_and_gradients(model, v, x, t)
    w = jnp.take(C.head_dense_kernel(model, v, acts.shape[-1]), used, axis=1).T
    return (C.raw_map("cam", acts, cam_weights=w), C.raw_map("grad_cam", acts, grads),
            acts.shape[1] * acts.shape[2])


def test_jit_matches_eager(net, all_maps):
    model, v, x = net
    eager = np.asarray(C.hires_cam(model, v, x, jnp.array([0, 2, 3])))
    np.testing.assert_allclose(eager, all_maps["hires_cam"], atol=1e-5)
    jitted = C.make_cam_fn("hires_cam", model)
    np.testing.assert_allclose(np.asarray(jitted(v, x, jnp.array([0, 2, 3]))), eager, atol=1e-5)


def test_targets_none_uses_argmax(net):
    model, v, x = net
    logits = model.apply(v, x)
    pred = jnp.argmax(logits, axis=-1)
    fn = jax.jit(lambda v, x, t: C.grad_cam(model, v, x, t))
    fn_none = jax.jit(lambda v, x: C.grad_cam(model, v, x))
    got = np.asarray(fn_none(v, x))
    np.testing.assert_allclose(got, np.asarray(fn(v, x, pred)), atol=1e-6)
    other = np.asarray(fn(v, x, (pred + 1) % K))
    assert np.abs(got - other).max() > 1e-2  # the target matters, so the check above could fail


def test_gradients_at_an_intermediate_stage(net):
    """The layer3 gradient is per image and for that image's target: <G, D> equals the
    forward-mode derivative of logit[b, t_b] along a direction D that touches image b only.
    layer3 maps have the input size and differ from layer4's."""
    model, v, x = net
    t = jnp.array([1, 0, 2])
    acts, grads, _, _ = jax.jit(lambda v, x: C.activations_and_gradients(model, v, x, t, "layer3"))(v, x)
    assert acts.shape == grads.shape == (3, H // 16, W // 16, 256)
    d = jax.random.normal(jax.random.PRNGKey(5), acts.shape).at[jnp.array([0, 2])].set(0.0)

    def logit_1(a):  # image 1's target logit only
        return model.apply(v, a, method="head", layer="layer3")[1, t[1]]

    _, forward = jax.jit(lambda a, d: jax.jvp(logit_1, (a,), (d,)))(acts, d)
    analytic = jnp.sum(grads * d)
    assert abs(float(forward) - float(analytic)) <= 1e-4 * max(1.0, abs(float(analytic)))
    assert float(jnp.abs(grads[1]).max()) > 0
    fn = jax.jit(lambda v, x, layer: C.grad_cam(model, v, x, t, layer), static_argnums=2)
    m3, m4 = np.asarray(fn(v, x, "layer3")), np.asarray(fn(v, x, "layer4"))
    assert m3.shape == m4.shape == (3, H, W)
    assert np.abs(m3 - m4).max() > 1e-2
    m1 = np.asarray(fn(v, x, "stem"))  # the earliest split point works too
    assert m1.shape == (3, H, W) and 0 <= m1.min() and m1.max() <= 1


def test_aug_smooth_and_eigen_smooth_change_the_map(net, all_maps):
    """Both smoothings run and change LayerCAM; with aug_smooth a mirror-symmetric image gets a
    mirror-symmetric map (each flipped variant is flipped back)."""
    model, v, x = net
    sym = jnp.concatenate([x[:, :, : W // 2], x[:, :, : W // 2][:, :, ::-1]], axis=2)
    batch = jnp.concatenate([x, sym], axis=0)
    t = jnp.array([0, 2, 3, 0, 1, 2])
    fn = jax.jit(lambda v, x, a, e: C.layer_cam(model, v, x, t, aug_smooth=a, eigen_smooth=e),
                 static_argnums=(2, 3))
    plain = all_maps["layer_cam"]
    for a, e in [(True, False), (False, True)]:
        m = np.asarray(fn(v, batch, a, e))
        assert m.shape == (6, H, W) and m.min() >= 0 and m.max() <= 1
        assert np.abs(m[:3] - plain).max() > 1e-2, (a, e)
        if a:
            np.testing.assert_allclose(m[3:], m[3:, :, ::-1], atol=1e-5)


def test_score_cam_chunked_equals_unchunked(net):
    model, v, x = net
    x = x[:2, :32, :32]
    t = jnp.array([1, 3])
    fn = jax.jit(lambda v, x, chunk, mc: C.score_cam(model, v, x, t, "stem", chunk_size=chunk, max_channels=mc),
                 static_argnums=(2, 3))
    whole = np.asarray(fn(v, x, 64, None))  # resnet18 stem: 64 channels, one chunk
    chunked = np.asarray(fn(v, x, 9, None))  # 8 chunks, the last padded
    assert whole.shape == (2, 32, 32) and whole.min() >= 0 and whole.max() <= 1 and whole.max() > 0.9
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    # max_channels = C keeps every channel (a permutation of them): same map.
    np.testing.assert_allclose(np.asarray(fn(v, x, 16, 64)), whole, atol=1e-5)
    fewer = np.asarray(fn(v, x, 16, 8))
    assert fewer.shape == (2, 32, 32) and np.abs(fewer - whole).max() > 1e-3


def test_resize_maps_equals_cv2_inter_linear():
    rng = np.random.RandomState(0)
    for h, w, oh, ow in [(3, 2, 96, 64), (7, 7, 224, 224), (5, 9, 17, 40), (20, 30, 7, 11)]:
        m = rng.rand(2, h, w).astype(np.float32)
        ref = np.stack([cv2.resize(a, (ow, oh), interpolation=cv2.INTER_LINEAR) for a in m])
        np.testing.assert_allclose(np.asarray(C.resize_maps(m, (oh, ow))), ref, atol=1e-6)


def test_resize_align_corners_hits_the_corners():
    m = np.random.RandomState(1).rand(1, 3, 4).astype(np.float32)
    up = np.asarray(C.resize_maps(m, (7, 10), align_corners=True))
    np.testing.assert_allclose(up[0, ::3, ::3], m[0], atol=1e-6)


def test_first_component_projection_matches_numpy_svd_with_our_sign():
    x = np.random.RandomState(2).randn(2, 5, 4, 16).astype(np.float32) + 1.0
    got = np.asarray(C.first_component_projection(x))
    for b in range(2):
        rows = x[b].reshape(20, 16)
        rows = rows - rows.mean(axis=0)
        ref = (rows @ np.linalg.svd(rows)[2][0]).reshape(5, 4)
        sign = np.sign(np.sum(ref * x[b].sum(-1)))
        np.testing.assert_allclose(got[b], sign * ref, atol=1e-4)
        assert np.sum(got[b] * x[b].sum(-1)) >= 0
    # The sign is a property of the data, not of the SVD routine: negating nothing changes nothing,
    # and the result is deterministic across calls.
    np.testing.assert_array_equal(got, np.asarray(C.first_component_projection(x)))


def test_bad_requests_raise_clear_errors(net):
    model, v, x = net
    with pytest.raises(C.CamError, match="shape"):
        C.grad_cam(model, v, x, jnp.array([0, 1]))
    with pytest.raises(C.CamError, match=r"\[0, 4\)"):
        C.grad_cam(model, v, x, np.array([0, 1, 4]))
    with pytest.raises(C.CamError, match="unknown layer"):
        C.grad_cam(model, v, x, None, "layer9")
    with pytest.raises(C.CamError, match="last stage"):
        C.cam(model, v, x, None, "layer3")
    with pytest.raises(C.CamError, match="unknown method"):
        C.make_cam_fn("gradcam", model)
    with pytest.raises(C.CamError, match=r"\(B, H, W, 3\)"):
        C.grad_cam(model, v, x[0])
    binary = create("resnet18", num_classes=1)
    with pytest.raises(C.CamError, match="abnormal logit"):
        C.grad_cam(binary, v, x, np.array([1, 1, 1]))


def test_maps_to_original_undoes_letterbox():
    geom = letterbox_geometry((120, 60), 64)  # content 64 x 32, centred with 16 px side padding
    maps = jnp.zeros((1, 64, 64)).at[:, :, 16:48].set(
        jnp.linspace(0.0, 1.0, 64)[None, :, None] * jnp.ones((1, 64, 32)))
    got = np.asarray(map_to_original(maps[0], geom))
    assert got.shape == (120, 60)
    # Rows run 0 -> 1 top to bottom: the padding was cropped, not stretched into the image.
    assert got[0].max() < 0.02 and got[-1].min() > 0.98


def test_raw_maps_and_baseline_subtraction(net):
    model, v, x = net
    t = jnp.array([0, 2, 3])
    raw = C.cam_maps(model, v, x, t, methods=("grad_cam",), raw=True)["grad_cam"]
    assert raw.shape[0] == 3 and raw.shape[1:] != (H, W)  # the stage's resolution
    # Subtracting nothing changes nothing; subtracting a map shifts the raw map by exactly it.
    base = jnp.asarray(np.random.default_rng(0).normal(size=raw.shape[1:]), jnp.float32)
    shifted = C.cam_maps(model, v, x, t, methods=("grad_cam",), raw=True, baseline={"grad_cam": base})["grad_cam"]
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(raw - base), atol=1e-5)
    plain = C.cam_maps(model, v, x, t, methods=("grad_cam",))["grad_cam"]
    np.testing.assert_allclose(np.asarray(C.postprocess(raw, (H, W))), np.asarray(plain), atol=1e-6)
    post = C.cam_maps(model, v, x, t, methods=("grad_cam",), baseline=base)["grad_cam"]
    np.testing.assert_allclose(np.asarray(post), np.asarray(C.postprocess(raw - base, (H, W))), atol=1e-6)


class _PatchScore:
    """A 'classifier' whose single logit is the sum of channel 0 inside rows 20..35, cols 8..23: an
    occlusion map must light up that square and nothing else."""

    num_classes = 1

    def apply(self, variables, x, train=False):
        return x[:, 20:36, 8:24, 0].sum(axis=(1, 2))[:, None]


def test_occlusion_finds_the_region_the_score_depends_on():
    x = jnp.asarray(np.random.default_rng(1).random((2, 48, 40, 3)), jnp.float32) * 4.0
    m = np.asarray(jax.jit(lambda x: C.occlusion(_PatchScore(), None, x, jnp.zeros(2, jnp.int32),
                                                 patch=8, stride=4, blur_sigma=3.0, chunk_size=7))(x))
    assert m.shape == (2, 48, 40) and m.min() >= 0.0 and m.max() <= 1.0 + 1e-6
    inside = np.zeros((48, 40), bool)
    inside[20:36, 8:24] = True
    far = np.ones((48, 40), bool)
    far[12:44, 0:32] = False  # farther than one patch from the square
    for i in range(2):
        # Occluding where the score does not look changes nothing - up to float32 rounding of the
        # score's 256-pixel sum, which XLA:CPU may order differently for the occluded copies (on
        # one 2026-12-06 machine 5.4e-6 of the map's maximum; a leak would be of the order of the
        # inside's 0.05).
        assert m[i][far].max() <= 1e-5
        assert m[i][inside].mean() > 0.05
    # chunk_size does not change the map (the padded positions of the last chunk count for nothing).
    m2 = np.asarray(C.occlusion(_PatchScore(), None, x, jnp.zeros(2, jnp.int32), patch=8, stride=4,
                                blur_sigma=3.0, chunk_size=64))
    np.testing.assert_allclose(m, m2, atol=1e-5)


def test_fused_maps_average_the_stages_maps(net):
    model, v, x = net
    t = jnp.array([0, 2, 3])
    fused = C.fused_maps(model, v, x, t, ("layer3", "layer4"), methods=("layer_cam", "grad_cam"))
    for m in ("layer_cam", "grad_cam"):
        a = C.cam_maps(model, v, x, t, "layer3", methods=(m,))[m]
        b = C.cam_maps(model, v, x, t, "layer4", methods=(m,))[m]
        np.testing.assert_allclose(np.asarray(fused[m]), np.asarray(C.minmax_scale((a + b) / 2)), atol=1e-6)
    with pytest.raises(C.CamError, match="at least one"):
        C.fused_maps(model, v, x, t, ())


def test_flip_mean_cancels_a_pattern_fixed_to_the_frame():
    """flip_mean: a map made of the image's own evidence plus an odd pattern fixed to the frame (a
    ramp across it) comes back as the evidence alone, scaled to max 1; "none" leaves the map as it is
    (times the content mask); dicts of maps go through whole; unknown flips are refused."""
    from mskjax.cam import CamError, flip_mean
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0.1, 1.0, (2, 8, 8, 3)).astype(np.float32))
    ramp_w = jnp.linspace(-1.0, 1.0, 8)[None, None, :]
    ramp_h = jnp.linspace(-0.5, 0.5, 8)[None, :, None]
    evidence = x[..., 0] / jnp.max(x[..., 0], axis=(1, 2), keepdims=True)
    got = flip_mean(lambda v: v[..., 0] + ramp_w, x, "h")
    np.testing.assert_allclose(np.asarray(got), np.asarray(evidence), atol=1e-6)
    got = flip_mean(lambda v: {"a": v[..., 0] + ramp_w + ramp_h}, x, "hv")
    np.testing.assert_allclose(np.asarray(got["a"]), np.asarray(evidence), atol=1e-6)
    left = flip_mean(lambda v: v[..., 0] + ramp_w + ramp_h, x, "h")  # left-right views keep the up-down ramp
    assert not np.allclose(np.asarray(left), np.asarray(evidence), atol=1e-3)
    content = jnp.zeros((2, 8, 8), bool).at[:, :, :6].set(True)
    np.testing.assert_array_equal(np.asarray(flip_mean(lambda v: v[..., 1], x, "none", content)),
                                  np.asarray(x[..., 1] * content))
    assert float(jnp.max(flip_mean(lambda v: v[..., 1], x, "hv", content)[:, :, 6:])) == 0.0
    with pytest.raises(CamError, match="flips"):
        flip_mean(lambda v: v[..., 0], x, "diagonal")
