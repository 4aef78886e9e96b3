import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mskjax.models import create


@pytest.fixture(scope="module")
def resnet():
    model = create("resnet18", num_classes=2)
    x = jnp.asarray(np.random.RandomState(0).rand(2, 64, 64, 3), jnp.float32)
    v = model.init(jax.random.PRNGKey(0), x)
    return model, v, x


@pytest.mark.parametrize("layer", ["stem", "layer1", "layer2", "layer3", "layer4", "features", None])
def test_any_stage_is_a_split_point(resnet, layer):
    model, v, x = resnet
    full = model.apply(v, x)
    h = model.apply(v, x, method="features", layer=layer)
    np.testing.assert_allclose(model.apply(v, h, method="head", layer=layer), full, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda h: model.apply(v, h, method="head", layer=layer)[:, 1].sum())(h)
    assert g.shape == h.shape and np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


def test_feature_map_shapes():
    for arch, c, stride in [("resnet50", 2048, 32), ("efficientnet_b0", 1280, 32)]:
        m = create(arch)
        shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 96, 96, 3))))
        f = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((3, 96, 96, 3)), method="features"), shapes)
        assert f.shape == (3, 96 // stride, 96 // stride, c)
        out = jax.eval_shape(lambda v: m.apply(v, jnp.zeros((3, 96, 96, 3))), shapes)
        assert out.shape == (3, 1)  # a single abnormality logit by default


def test_one_channel_stem_accepted():
    m = create("efficientnet_b0", num_classes=1)
    v = jax.jit(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1))))()
    assert v["params"]["stem_conv"]["kernel"].shape == (3, 3, 1, 32)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown architecture"):
        create("resnet51")
    with pytest.raises(ValueError, match="unknown variant setting"):
        create("resnet18", bn_eps=1e-3)
    with pytest.raises(ValueError, match="padding"):
        create("resnet18", padding="valid")
    with pytest.raises(ValueError, match="unknown layer"):
        m = create("resnet18")
        v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
        jax.eval_shape(lambda v: m.apply(v, jnp.zeros((1, 32, 32, 3)), method="features", layer="layer9"), v)


def test_efficientnet_bn_settings_follow_torchvision():
    assert (create("efficientnet_b3").bn_epsilon, create("efficientnet_b3").bn_momentum) == (1e-5, 0.1)
    assert (create("efficientnet_b6").bn_epsilon, create("efficientnet_b6").bn_momentum) == (1e-3, 0.01)


def test_train_mode_uses_dropout_rng_and_bfloat16_keeps_float32_params():
    m = create("efficientnet_b0", num_classes=1, dtype="bfloat16")
    x = jnp.ones((2, 32, 32, 3))
    v = jax.jit(lambda: m.init(jax.random.PRNGKey(0), x))()
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v))
    out, upd = jax.jit(lambda v, k: m.apply(v, x, train=True, rngs={"dropout": k}, mutable=["batch_stats"]))(
        v, jax.random.PRNGKey(1))
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(upd))
