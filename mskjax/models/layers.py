"""Layers shared by the classifier backbones.

All tensors are NHWC. Convolution kernels are HWIO (torch's OIHW transposed); depthwise kernels
are (k, k, 1, C). Parameters and BatchNorm statistics are float32 whatever the compute dtype.
"""
from __future__ import annotations

import functools

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any


def conv_padding(size: int, kernel: int, stride: int, dilation: int, mode: str) -> tuple[int, int]:
    """(low, high) padding of one spatial dimension.

    mode "symmetric": (k - 1) // 2 * dilation on both sides, as torchvision and timm's non-`tf_`
    models do. mode "same": TensorFlow's 'SAME' — output ceil(size / stride), any odd extra pixel
    on the high side (asymmetric for stride 2 on even sizes), as TF/Keras checkpoints expect.
    """
    effective = (kernel - 1) * dilation + 1
    if mode == "symmetric":
        p = (effective - 1) // 2
        return p, p
    if mode == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + effective - size, 0)
        return total // 2, total - total // 2
    raise ValueError(f"unknown padding mode {mode!r}: expected 'symmetric' or 'same'")


def _pads(x: jax.Array, kernel: Sequence[int], strides: Sequence[int], dilation: int, mode: str):
    return [conv_padding(x.shape[1 + i], kernel[i], strides[i], dilation, mode) for i in range(2)]


def pointwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """1x1 convolution as one matmul over channels: x (B, H, W, Cin), kernel (1, 1, Cin, Cout)
    -> (B, ceil(H / stride), ceil(W / stride), Cout).

    A 1x1 kernel never pads (in 'symmetric' and in 'same' mode), so a stride is a strided slice.
    Same result as `conv_general_dilated`; XLA on CPU (jaxlib 0.10) runs the matmul 1.5-3x faster
    forward and 2-4x faster forward + backward (docs/BENCHMARKS.md)."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    b, h, w, c = x.shape
    y = jax.lax.dot_general(x.reshape(b * h * w, c), kernel.reshape(c, kernel.shape[-1]),
                            (((1,), (0,)), ((), ())))
    return y.reshape(b, h, w, kernel.shape[-1])


def default_pointwise_impl() -> str:
    """"matmul" on CPU (XLA's CPU convolutions are slower than its matmuls), "conv" elsewhere."""
    return "matmul" if jax.default_backend() == "cpu" else "conv"


class Conv(nn.Module):
    """2-D convolution with torch-style symmetric or TF-style 'SAME' padding.

    Input (B, H, W, Cin) -> (B, H', W', features). Kernel (kh, kw, Cin, features).
    `pointwise_impl` for 1x1 kernels: "conv" (`conv_general_dilated`) or "matmul"
    (`pointwise_conv`); None picks per backend at trace time (`default_pointwise_impl`).
    """

    features: int
    kernel_size: int
    stride: int = 1
    use_bias: bool = False
    padding: str = "symmetric"
    dtype: Dtype = jnp.float32
    pointwise_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = (self.kernel_size, self.kernel_size)
        s = (self.stride, self.stride)
        kernel = self.param(
            "kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            (*k, x.shape[-1], self.features), jnp.float32)
        x = x.astype(self.dtype)
        impl = self.pointwise_impl or default_pointwise_impl()
        if impl not in ("conv", "matmul"):
            raise ValueError(f"unknown pointwise implementation {impl!r}: expected 'conv' or 'matmul'")
        if self.kernel_size == 1 and impl == "matmul":
            y = pointwise_conv(x, kernel.astype(self.dtype), self.stride)
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel.astype(self.dtype), window_strides=s, padding=_pads(x, k, s, 1, self.padding),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int,
                   pads: Sequence[tuple[int, int]], impl: str) -> jax.Array:
    """Depthwise convolution: x (B, H, W, C), kernel (k, k, 1, C) -> (B, H', W', C).

    impl "grouped" is `conv_general_dilated(feature_group_count=C)`; impl "shifted" sums k*k
    strided slices of the padded input times one kernel tap each. Same result (to float
    rounding); XLA on CPU runs "shifted" several times faster, forward and backward.
    """
    c = x.shape[-1]
    if impl == "grouped":
        return jax.lax.conv_general_dilated(
            x, kernel, window_strides=(stride, stride), padding=pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    if impl != "shifted":
        raise ValueError(f"unknown depthwise implementation {impl!r}: expected 'grouped' or 'shifted'")
    pads = (tuple(int(v) for v in pads[0]), tuple(int(v) for v in pads[1]))
    return _shifted_depthwise(x, kernel, int(stride), pads)


def _shifted_sum(xp: jax.Array, kernel: jax.Array, stride: int, out_h: int, out_w: int) -> jax.Array:
    """sum over taps (i, j) of xp[:, i::stride, j::stride, :][:out_h, :out_w] * kernel[i, j, 0]."""
    kh, kw = kernel.shape[:2]
    b, c = xp.shape[0], xp.shape[-1]
    y = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(xp, (0, i, j, 0), (b, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, c),
                                (1, stride, stride, 1))
            term = tap * kernel[i, j, 0]
            y = term if y is None else y + term
    return y


def _shifted_forward(x, kernel, stride, pads):
    kh, kw = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h = (xp.shape[1] - kh) // stride + 1
    out_w = (xp.shape[2] - kw) // stride + 1
    return _shifted_sum(xp, kernel, stride, out_h, out_w)


# The shifted sum's own autodiff transposes every tap's slice into a full-size padded gradient and
# keeps them alive together (~k*k activation-sized temporaries per layer: EfficientNet-B3 @ 300,
# batch 32, asked XLA:CPU for 25 GB). This VJP keeps about one: d input is the same shifted sum over
# the stride-dilated, padded output gradient with the kernel flipped; d kernel is a scan over the
# taps, one product and reduction at a time (a 5x5 layer at (8, 112, 112, 144): 1.3 GB of
# temporaries -> 0.12 GB, and faster).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _shifted_depthwise(x, kernel, stride, pads):
    return _shifted_forward(x, kernel, stride, pads)


def _shifted_depthwise_fwd(x, kernel, stride, pads):
    return _shifted_forward(x, kernel, stride, pads), (x, kernel)


def _shifted_depthwise_bwd(stride, pads, res, g):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    b, h, w, c = x.shape
    (pt, pb), (pl, pr) = pads
    hp, wp = h + pt + pb, w + pl + pr
    out_h, out_w = g.shape[1], g.shape[2]
    g = g.astype(x.dtype)
    # d xp[p] = sum_taps g[(p - tap) / stride] * k[tap]: place g on the stride grid of xp (interior
    # padding), pad by k - 1 around, then correlate with the flipped kernel.
    zero = jnp.zeros((), g.dtype)
    gd = jax.lax.pad(g, zero, ((0, 0, 0),
                               (kh - 1, hp - ((out_h - 1) * stride + 1), stride - 1),
                               (kw - 1, wp - ((out_w - 1) * stride + 1), stride - 1),
                               (0, 0, 0)))
    dxp = _shifted_sum(gd, kernel[::-1, ::-1], 1, hp, wp)
    dx = jax.lax.slice(dxp, (0, pt, pl, 0), (b, pt + h, pl + w, c)).astype(x.dtype)
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1

    def tap_grad(_, t):  # one tap at a time: XLA:CPU would otherwise materialise all k*k products
        win = jax.lax.dynamic_slice(xp, (0, t // kw, t % kw, 0), (b, span_h, span_w, c))
        tap = jax.lax.slice(win, (0, 0, 0, 0), win.shape, (1, stride, stride, 1))
        return None, jnp.sum((tap * g).astype(jnp.float32), axis=(0, 1, 2))

    _, dk = jax.lax.scan(tap_grad, None, jnp.arange(kh * kw))
    return dx, dk.reshape(kh, kw, 1, c).astype(kernel.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


def default_depthwise_impl() -> str:
    """"shifted" on CPU (XLA's grouped convolution is slow there), "grouped" elsewhere."""
    return "shifted" if jax.default_backend() == "cpu" else "grouped"


class DepthwiseConv(nn.Module):
    """Depthwise k x k convolution (no bias). Kernel (k, k, 1, C), Flax's grouped-conv layout.

    impl None picks per backend at trace time (`default_depthwise_impl`).
    """

    kernel_size: int
    stride: int = 1
    padding: str = "symmetric"
    impl: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = (self.kernel_size, self.kernel_size)
        kernel = self.param(
            "kernel", nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            (*k, 1, x.shape[-1]), jnp.float32)
        x = x.astype(self.dtype)
        pads = _pads(x, k, (self.stride, self.stride), 1, self.padding)
        return depthwise_conv(x, kernel.astype(self.dtype), self.stride, pads,
                              self.impl or default_depthwise_impl())


class BatchNorm(nn.Module):
    """BatchNorm over N, H, W of NHWC input, with torch's conventions.

    `momentum` is torch's: the weight of the new batch statistic in the running average
    (torch 0.1; Keras' 0.99 is momentum 0.01 here). In training the output uses the biased batch
    variance and the running variance is updated with the unbiased one, as torch does.
    Statistics are computed in float32; the output is cast to `dtype`. Under `jax.jit` with a
    batch sharded over devices, the mean and variance are over the global batch.
    Variables: params {scale, bias}; batch_stats {mean, var}, all (C,) float32.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        if train:
            y, mean, var = batch_norm_train(x, scale, bias, float(self.epsilon))
            if not self.is_initializing():
                n = x.size // c
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * mean
                ra_var.value = (1 - m) * ra_var.value + m * unbiased
            return y.astype(self.dtype)
        return _normalize(x.astype(jnp.float32), scale, bias, ra_mean.value, ra_var.value,
                          self.epsilon).astype(self.dtype)


def _normalize(xf, scale, bias, mean, var, epsilon):
    mul = scale * jax.lax.rsqrt(var + epsilon)
    return xf * mul + (bias - mean * mul)


def _batch_stats(xf):
    axes = tuple(range(xf.ndim - 1))
    mean = jnp.mean(xf, axes)
    return mean, jnp.mean(jnp.square(xf - mean), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float):
    """Training-mode BatchNorm over every axis but the last, with a closed-form backward pass.

    x (..., C) any float dtype; scale, bias (C,) float32 -> (y (..., C) float32, mean (C,), biased
    variance (C,)), statistics in float32. Same values as differentiating the two-pass formula;
    the backward pass is the textbook one (two channel sums, one elementwise pass), which XLA
    runs 1.4-1.8x faster than what it derives from the formula (docs/BENCHMARKS.md). Reverse mode
    only (a `custom_vjp`): forward-mode derivatives of a training-mode BatchNorm are not defined.
    """
    return _batch_norm_train(x, scale, bias, epsilon)


def _batch_norm_train(x, scale, bias, epsilon):
    xf = x.astype(jnp.float32)
    mean, var = _batch_stats(xf)
    return _normalize(xf, scale, bias, mean, var, epsilon), mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    y, mean, var = _batch_norm_train(x, scale, bias, epsilon)
    return (y, mean, var), (x, scale, mean, var)


def _batch_norm_train_bwd(epsilon, res, cts):
    x, scale, mean, var = res
    g, g_mean, g_var = cts
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    rstd = jax.lax.rsqrt(var + epsilon)
    # xhat as x * rstd - mean * rstd, not (x - mean) * rstd: the forward pass's x - mean would
    # otherwise be shared with this one and written out whole between them (a slower pass).
    xhat = x.astype(jnp.float32) * rstd - mean * rstd
    gf = g.astype(jnp.float32)
    sum_g, sum_gxhat = jnp.sum(gf, axes), jnp.sum(gf * xhat, axes)
    # y = scale * xhat + bias; the mean and variance outputs (running statistics) get their own
    # cotangents, zero in a loss that does not use them.
    dx = (scale * rstd) * (gf - sum_g / n - xhat * (sum_gxhat / n)) \
        + g_mean / n + (2.0 / n) * g_var * xhat * jnp.sqrt(var + epsilon)
    return dx.astype(x.dtype), sum_gxhat, sum_g


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """Max pooling of NHWC input over a window x window patch, padded with -inf on each side as
    torch's `max_pool2d` pads: (B, H, W, C) -> (B, (H + 2p - k) // s + 1, ..., C).

    Its derivative sends each output's tangent / cotangent to the first maximum of its window in
    row-major order, as torch's backward does on ties (a window holding NaN outputs NaN and passes
    no derivative on; torch's passes it to the window's last NaN, and either way the loss is NaN,
    which the trainers stop on). Written as a `custom_jvp` over the k*k
    strided slices because XLA:CPU lowers `reduce_window`'s own backward (select-and-scatter) to
    index arrays that cost 2.5x more (docs/BENCHMARKS.md); the forward pass is `reduce_window`.
    """
    return _max_pool(x, int(window), int(stride), int(padding))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, padding):
    return nn.max_pool(x, (window, window), (stride, stride),
                       padding=((padding, padding), (padding, padding)))


@_max_pool.defjvp
def _max_pool_jvp(window, stride, padding, primals, tangents):
    (x,), (tx,) = primals, tangents
    y = _max_pool(x, window, stride, padding)
    b, _, _, c = x.shape
    _, oh, ow, _ = y.shape
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    xp = jnp.pad(x, pads, constant_values=-jnp.inf)
    tp = jnp.pad(tx, pads)
    taken = jnp.zeros(y.shape, bool)
    ty = jnp.zeros(y.shape, tx.dtype)
    for i in range(window):
        for j in range(window):
            start, limit = (0, i, j, 0), (b, i + (oh - 1) * stride + 1, j + (ow - 1) * stride + 1, c)
            strides = (1, stride, stride, 1)
            hit = (jax.lax.slice(xp, start, limit, strides) == y) & ~taken
            taken = taken | hit
            ty = ty + jnp.where(hit, jax.lax.slice(tp, start, limit, strides), 0)
    return y, ty


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per sample with probability `rate` in training
    (torchvision's StochasticDepth "row" mode), scaling kept samples by 1 / (1 - rate).
    Uses the 'dropout' RNG stream."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
        return x * mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)
