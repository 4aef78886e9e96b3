import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mskjax.models.layers import BatchNorm, conv_padding, depthwise_conv


@pytest.mark.parametrize("size,k,s", [(15, 3, 1), (16, 3, 2), (15, 5, 2), (16, 5, 2), (7, 3, 2)])
def test_same_padding_matches_lax_same(size, k, s):
    x = jnp.asarray(np.random.RandomState(0).randn(1, size, size, 2), jnp.float32)
    w = jnp.asarray(np.random.RandomState(1).randn(k, k, 2, 3), jnp.float32)
    ours = jax.lax.conv_general_dilated(x, w, (s, s), [conv_padding(size, k, s, 1, "same")] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ref = jax.lax.conv_general_dilated(x, w, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_symmetric_padding_is_torch_style():
    assert conv_padding(16, 3, 2, 1, "symmetric") == (1, 1)
    assert conv_padding(16, 5, 2, 1, "symmetric") == (2, 2)
    assert conv_padding(16, 3, 2, 1, "same") == (0, 1)  # TF puts the odd pixel at the end
    with pytest.raises(ValueError, match="padding mode"):
        conv_padding(16, 3, 1, 1, "valid")


@pytest.mark.parametrize("k,s,mode", [(3, 1, "symmetric"), (3, 2, "symmetric"), (5, 2, "same"), (5, 1, "same"),
                                      (5, 2, "symmetric"), (3, 2, "same")])
def test_depthwise_shifted_equals_grouped(k, s, mode):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(2, 13, 12, 8), jnp.float32)
    w = jnp.asarray(rng.randn(k, k, 1, 8), jnp.float32)
    pads = [conv_padding(13, k, s, 1, mode), conv_padding(12, k, s, 1, mode)]
    a = depthwise_conv(x, w, s, pads, "grouped")
    b = depthwise_conv(x, w, s, pads, "shifted")
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=1e-5)
    # Gradients with respect to input and kernel: the shifted form's own VJP against autodiff of
    # the grouped convolution (a random cotangent, so no gradient entry is trivially zero).
    cot = jnp.asarray(rng.randn(*a.shape), jnp.float32)
    ga = jax.grad(lambda x, w: jnp.sum(depthwise_conv(x, w, s, pads, "grouped") * cot), argnums=(0, 1))(x, w)
    gb = jax.grad(lambda x, w: jnp.sum(depthwise_conv(x, w, s, pads, "shifted") * cot), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(ga[0], gb[0], atol=1e-4)
    np.testing.assert_allclose(ga[1], gb[1], rtol=1e-5, atol=1e-4)


def test_batchnorm_train_updates_with_unbiased_variance():
    x = jnp.asarray(np.random.RandomState(0).randn(4, 3, 3, 5) * 2 + 1, jnp.float32)
    bn = BatchNorm(momentum=0.1, epsilon=1e-5)
    v = bn.init(jax.random.PRNGKey(0), x, train=False)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 5).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 5).std(0), 1, atol=1e-3)


@pytest.mark.parametrize("size,stride,padding", [(7, 1, "symmetric"), (8, 2, "same"), (9, 2, "symmetric")])
def test_pointwise_matmul_equals_conv(size, stride, padding):
    from mskjax.models.layers import Conv
    x = jnp.asarray(np.random.RandomState(0).randn(2, size, size, 5), jnp.float32)
    a = Conv(4, 1, stride, padding=padding, pointwise_impl="conv")
    b = Conv(4, 1, stride, padding=padding, pointwise_impl="matmul")
    v = a.init(jax.random.PRNGKey(0), x)
    ya, yb = a.apply(v, x), b.apply(v, x)
    assert ya.shape == yb.shape
    np.testing.assert_allclose(np.asarray(yb), np.asarray(ya), atol=1e-5)
