"""EfficientNet-B0..B7 as torchvision builds them (compound scaling, MBConv with
squeeze-excitation, SiLU, stochastic depth, dropout before the classifier).

Input NHWC float, normalised as the checkpoint expects. Segments: "stem" (stride 2),
"stage1".."stage7" (strides 2, 4, 8, 16, 16, 32, 32), "top" (1x1 conv to 4 x the last stage's
width, the usual CAM layer); "features" is "top". Head: global average pool -> dropout ->
"classifier".

Variants are configuration: `padding` ("symmetric" for torchvision/timm, "same" for TF/Keras
weights), BatchNorm epsilon and momentum (torchvision uses 1e-5/0.1 for B0-B4 and 1e-3/0.01 for
B5-B7: `torchvision_bn` gives them), compute `dtype`, and the depthwise implementation.
`scan_blocks` runs each stage's repeated blocks as one `nn.scan` with their variables stacked
(`mskjax.models.scan` converts); on XLA:CPU it does not compile faster (docs/BENCHMARKS.md,
"Compile time").
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mskjax.models.layers import BatchNorm, Conv, DepthwiseConv, StochasticDepth
from mskjax.models.split import SplitModel

# (expand_ratio, kernel, stride, in_channels, out_channels, layers) of B0, before scaling.
BASE_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)

# name: (width_mult, depth_mult, dropout, native resolution)
SCALING = {
    "b0": (1.0, 1.0, 0.2, 224),
    "b1": (1.0, 1.1, 0.2, 240),
    "b2": (1.1, 1.2, 0.3, 260),
    "b3": (1.2, 1.4, 0.3, 300),
    "b4": (1.4, 1.8, 0.4, 380),
    "b5": (1.6, 2.2, 0.4, 456),
    "b6": (1.8, 2.6, 0.5, 528),
    "b7": (2.0, 3.1, 0.5, 600),
}


def torchvision_bn(variant: str) -> tuple[float, float]:
    """(epsilon, momentum) of torchvision's efficientnet_<variant> BatchNorm layers."""
    return (1e-3, 0.01) if variant in ("b5", "b6", "b7") else (1e-5, 0.1)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never more than 10% down (the TF rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def stage_settings(width_mult: float, depth_mult: float):
    """Scaled (expand, kernel, stride, in, out, layers) per stage."""
    return tuple(
        (e, k, s, make_divisible(i * width_mult), make_divisible(o * width_mult), int(math.ceil(n * depth_mult)))
        for e, k, s, i, o, n in BASE_STAGES)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise (stride) -> SE -> 1x1 project [+ residual]."""

    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel: int
    stride: int
    drop_rate: float
    bn: Any
    conv: Any
    padding: str
    depthwise_impl: str | None
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        return _mbconv(self, x, train, None)


class MBConvScanBody(MBConv):
    """One step of `nn.scan` over a stage's blocks after its first (input channels = output
    channels, stride 1, so every step has the same shapes): (x, rate) -> (x, None).

    x (B, H, W, C) in `dtype`; rate a float32 scalar, this block's stochastic-depth rate (the
    rates rise block by block, so they are scanned over instead of being one static attribute).
    `train` is static; `stochastic` False skips stochastic depth (all rates of the stage are 0)."""

    train: bool = False
    stochastic: bool = True

    @nn.compact
    def __call__(self, x, rate):
        return _mbconv(self, x, self.train, rate if self.stochastic else None), None


def _traced_stochastic_depth(y: jax.Array, rate: jax.Array, key: jax.Array) -> jax.Array:
    """`StochasticDepth` with a traced rate: y (B, H, W, C), rate float32 scalar in [0, 1)."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (y.shape[0], 1, 1, 1))
    return y * mask.astype(y.dtype) / keep.astype(y.dtype)


def _mbconv(m: MBConv, x: jax.Array, train: bool, rate: jax.Array | None) -> jax.Array:
    """The block's computation, shared by `MBConv` (rate None: its static `drop_rate`) and
    `MBConvScanBody` (rate: a traced scalar). Submodules are created in `m`; their names are
    the same in both, so one block's variables have the same tree in both layouts."""
    expanded = make_divisible(m.in_channels * m.expand_ratio)
    y = x
    if expanded != m.in_channels:
        y = nn.silu(m.bn(name="expand_bn")(m.conv(expanded, 1, 1, name="expand_conv")(y), train))
    y = DepthwiseConv(m.kernel, m.stride, padding=m.padding, impl=m.depthwise_impl,
                      dtype=m.dtype, name="dw_conv")(y)
    y = nn.silu(m.bn(name="dw_bn")(y, train))
    # Squeeze-excitation: squeeze width is a quarter of the block's *input* channels.
    squeeze = max(1, m.in_channels // 4)
    s = jnp.mean(y.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(m.dtype)
    s = nn.silu(Conv(squeeze, 1, use_bias=True, dtype=m.dtype, name="se_reduce")(s))
    s = nn.sigmoid(Conv(expanded, 1, use_bias=True, dtype=m.dtype, name="se_expand")(s))
    y = y * s
    y = m.bn(name="project_bn")(m.conv(m.out_channels, 1, 1, name="project_conv")(y), train)
    if m.stride == 1 and m.in_channels == m.out_channels:
        if rate is None:
            y = StochasticDepth(m.drop_rate)(y, train)
        elif train:
            y = _traced_stochastic_depth(y, rate, m.make_rng("dropout"))
        y = y + x.astype(y.dtype)
    return y


class EfficientNet(SplitModel):
    """torchvision EfficientNet-`variant` ("b0".."b7").

    Variables named "stem_conv", "stem_bn", "stage{s}_block{b}/{expand,dw,project}_{conv,bn}",
    ".../se_reduce", ".../se_expand", "top_conv", "top_bn", "classifier". Logits (B, num_classes)
    float32. Dropout and stochastic depth use the 'dropout' RNG stream in training.

    With `scan_blocks`, "stage{s}_block{b}" for b >= 1 become "stage{s}_blocks" with every leaf
    stacked on a new leading axis (`scan_groups()` names them). Logits and gradients are the same
    on converted variables; in training the stochastic-depth masks of the scanned blocks are drawn
    from other keys of the 'dropout' stream (same rates, same distribution, different draws), the
    head's dropout mask is the same.
    """

    variant: str = "b0"
    num_classes: int = 1
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.1
    padding: str = "symmetric"
    stochastic_depth: float = 0.2
    dropout: float | None = None  # None: the variant's own rate
    depthwise_impl: str | None = None  # None: per backend
    dtype: Any = jnp.float32
    # True: each stage's blocks after its first run as one `nn.scan` step (`MBConvScanBody`), their
    # variables stacked under "stage{s}_blocks" (leading axis: block 1..n-1). Same function, each
    # repeated block traced once; `mskjax.models.scan` maps variables between the layouts.
    scan_blocks: bool = False

    @property
    def segments(self) -> Sequence[str]:
        return ("stem",) + tuple(f"stage{i}" for i in range(1, 8)) + ("top",)

    def _scaling(self):
        if self.variant not in SCALING:
            raise ValueError(f"unknown EfficientNet variant {self.variant!r}: expected one of {sorted(SCALING)}")
        return SCALING[self.variant]

    def scan_groups(self) -> dict[str, tuple[str, ...]]:
        """{"stage{s}_blocks": ("stage{s}_block1", ..., "stage{s}_block{n-1}")} for every stage
        with more than one block: the blocks `scan_blocks` stacks, in order."""
        width, depth, _, _ = self._scaling()
        return {f"stage{s + 1}_blocks": tuple(f"stage{s + 1}_block{b}" for b in range(1, st[5]))
                for s, st in enumerate(stage_settings(width, depth)) if st[5] > 1}

    def run_segment(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        width, depth, _, _ = self._scaling()
        stages = stage_settings(width, depth)
        bn = partial(BatchNorm, epsilon=self.bn_epsilon, momentum=self.bn_momentum, dtype=self.dtype)

        def conv(features, kernel, stride, name):
            return Conv(features, kernel, stride, padding=self.padding, dtype=self.dtype, name=name)

        if name == "stem":
            x = conv(stages[0][3], 3, 2, "stem_conv")(x)
            return nn.silu(bn(name="stem_bn")(x, train))
        if name == "top":
            x = conv(4 * stages[-1][4], 1, 1, "top_conv")(x)
            return nn.silu(bn(name="top_bn")(x, train))
        s = int(name[len("stage"):]) - 1
        total = sum(st[5] for st in stages)
        block_id = sum(st[5] for st in stages[:s])
        e, k, stride, cin, cout, n = stages[s]
        for b in range(1 if self.scan_blocks else n):
            x = MBConv(cin if b == 0 else cout, cout, e, k, stride if b == 0 else 1,
                       self.stochastic_depth * block_id / total, bn, conv, self.padding,
                       self.depthwise_impl, self.dtype, name=f"{name}_block{b}")(x, train)
            block_id += 1
        if self.scan_blocks and n > 1:
            rates = jnp.asarray([self.stochastic_depth * (block_id + b) / total for b in range(n - 1)], jnp.float32)
            body = nn.scan(MBConvScanBody, variable_axes={"params": 0, "batch_stats": 0},
                           split_rngs={"params": True, "dropout": True}, in_axes=0, length=n - 1)
            x, _ = body(cout, cout, e, k, 1, 0.0, bn, conv, self.padding, self.depthwise_impl, self.dtype,
                        train=train, stochastic=self.stochastic_depth > 0, name=f"{name}_blocks")(x, rates)
        return x

    def run_head(self, x: jax.Array, train: bool) -> jax.Array:
        _, _, default_dropout, _ = self._scaling()
        rate = default_dropout if self.dropout is None else self.dropout
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dropout(rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(x)
