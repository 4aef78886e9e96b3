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


def _plain_batch_norm(x, scale, bias, eps):
    """Training-mode BatchNorm as a formula that autodiff differentiates (the reference)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean((0, 1, 2))
    var = jnp.square(xf - mean).mean((0, 1, 2))
    return (xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias, mean, var


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_train_backward_equals_autodiff(dtype):
    """The closed-form backward pass of training-mode BatchNorm gives autodiff's gradients for x,
    scale and bias, with cotangents on all three outputs (the mean and variance ones nonzero here,
    so their terms are checked too); the values are the formula's."""
    from mskjax.models.layers import batch_norm_train
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(4, 5, 6, 7) * 3 + 1, dtype)
    scale = jnp.asarray(rng.rand(7) + 0.5, jnp.float32)
    bias = jnp.asarray(rng.randn(7), jnp.float32)
    w = jnp.asarray(rng.randn(4, 5, 6, 7), jnp.float32)
    wm, wv = jnp.asarray(rng.randn(7), jnp.float32), jnp.asarray(rng.randn(7), jnp.float32)

    def loss(fn):
        def f(x, s, b):
            y, m, v = fn(x, s, b, 1e-3)
            return jnp.sum(jax.nn.relu(y) * w) + jnp.sum(m * wm) + jnp.sum(v * wv)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    (l_ours, g_ours), (l_ref, g_ref) = loss(batch_norm_train)(x, scale, bias), loss(_plain_batch_norm)(x, scale, bias)
    np.testing.assert_allclose(float(l_ours), float(l_ref), rtol=1e-6)
    for name, a, b in zip(("x", "scale", "bias"), g_ours, g_ref):
        assert a.dtype == b.dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the cast of dx to bfloat16
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * np.abs(b).max(), err_msg=name)
    y, m, v = batch_norm_train(x, scale, bias, 1e-3)
    y_ref, m_ref, v_ref = _plain_batch_norm(x, scale, bias, 1e-3)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(m), np.asarray(m_ref), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(v), np.asarray(v_ref), rtol=1e-5)


def test_max_pool_matches_torch_values_and_gradients_with_ties():
    """`max_pool` (3x3, stride 2, padding 1: ResNet's stem) against torch's max_pool2d, values and
    input gradients, on inputs with many exact ties (small integers): torch sends a window's
    gradient to its first maximum in row-major order, and so must we. Forward mode gives the
    transpose of the same linear map (<jvp(t), g> = <t, vjp(g)>)."""
    torch = pytest.importorskip("torch")
    from mskjax.models.layers import max_pool
    rng = np.random.RandomState(0)
    for shape in [(2, 9, 9, 3), (2, 10, 11, 4)]:
        x = rng.randint(0, 3, shape).astype(np.float32)
        x[0, 0] = -5.0  # a row of negatives on the border: the -inf padding never wins
        out_shape = max_pool(jnp.asarray(x), 3, 2, 1).shape
        g = rng.randn(*out_shape).astype(np.float32)
        y, vjp = jax.vjp(lambda a: max_pool(a, 3, 2, 1), jnp.asarray(x))
        (dx,) = vjp(jnp.asarray(g))
        xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
        yt.backward(torch.tensor(g).permute(0, 3, 1, 2))
        np.testing.assert_array_equal(np.asarray(y), yt.detach().permute(0, 2, 3, 1).numpy())
        np.testing.assert_array_equal(np.asarray(dx), xt.grad.permute(0, 2, 3, 1).numpy())
        t = jnp.asarray(rng.randn(*shape), jnp.float32)
        _, ty = jax.jvp(lambda a: max_pool(a, 3, 2, 1), (jnp.asarray(x),), (t,))
        np.testing.assert_allclose(float(jnp.sum(ty * g)), float(jnp.sum(t * dx)), rtol=1e-5)
