"""ResNet18/34/50/101/152 as torchvision builds them (v1.5: the stride of a bottleneck sits on its
3x3 conv).

Input NHWC float, already normalised as the checkpoint expects (torchvision: [0, 1] then ImageNet
mean/std). Segments, each a split point for CAM methods: "stem" (conv-bn-relu-maxpool, stride 4),
"layer1".."layer4" (strides 4, 8, 16, 32); "features" is "layer4"; the head is
global average pool -> "fc". `scan_blocks` runs each stage's blocks after its first as one
`nn.scan` with stacked variables (`mskjax.models.scan` converts; on XLA:CPU not faster to compile,
docs/BENCHMARKS.md "Compile time").
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mskjax.models.layers import BatchNorm, Conv, max_pool
from mskjax.models.split import SplitModel

STAGE_SIZES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class BasicBlock(nn.Module):
    """Two 3x3 convs; the first carries the stride. Output channels = `features`."""

    features: int
    stride: int
    bn: Any
    conv: Any

    @nn.compact
    def __call__(self, x, train: bool):
        return _basic(self, x, train)


def _basic(m, x: jax.Array, train: bool) -> jax.Array:
    residual = x
    y = m.conv(m.features, 3, m.stride, name="conv1")(x)
    y = nn.relu(m.bn(name="bn1")(y, train))
    y = m.conv(m.features, 3, 1, name="conv2")(y)
    y = m.bn(name="bn2")(y, train)
    if m.stride != 1 or x.shape[-1] != m.features:
        residual = m.conv(m.features, 1, m.stride, name="downsample_conv")(x)
        residual = m.bn(name="downsample_bn")(residual, train)
    return nn.relu(y + residual.astype(y.dtype))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand to 4 x `features`. `stride_in_1x1` puts the
    stride on the first 1x1 conv instead (ResNet v1 as Keras and Caffe build it)."""

    features: int
    stride: int
    bn: Any
    conv: Any
    stride_in_1x1: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        return _bottleneck(self, x, train)


def _bottleneck(m, x: jax.Array, train: bool) -> jax.Array:
    out = m.features * 4
    residual = x
    s1, s3 = (m.stride, 1) if m.stride_in_1x1 else (1, m.stride)
    y = nn.relu(m.bn(name="bn1")(m.conv(m.features, 1, s1, name="conv1")(x), train))
    y = nn.relu(m.bn(name="bn2")(m.conv(m.features, 3, s3, name="conv2")(y), train))
    y = m.bn(name="bn3")(m.conv(out, 1, 1, name="conv3")(y), train)
    if m.stride != 1 or x.shape[-1] != out:
        residual = m.conv(out, 1, m.stride, name="downsample_conv")(x)
        residual = m.bn(name="downsample_bn")(residual, train)
    return nn.relu(y + residual.astype(y.dtype))


class BlockScanBody(nn.Module):
    """One step of `nn.scan` over a stage's blocks after its first (stride 1, input channels =
    output channels: every step has the same shapes): x (B, H, W, C) -> (x, None). `kind` "basic"
    or "bottleneck"; submodule names as in `BasicBlock` / `Bottleneck`."""

    kind: str
    features: int
    bn: Any
    conv: Any
    stride_in_1x1: bool = False
    train: bool = False
    stride: int = 1

    @nn.compact
    def __call__(self, x, _):
        return (_basic if self.kind == "basic" else _bottleneck)(self, x, self.train), None


class ResNet(SplitModel):
    """torchvision ResNet. `depth` in {18, 34, 50, 101, 152}.

    Variables: params and batch_stats named after torchvision's modules ("conv1", "bn1",
    "layer1/block0/conv1", ..., "fc"). Logits (B, num_classes) float32.
    """

    depth: int = 50
    num_classes: int = 1
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.1
    padding: str = "symmetric"
    stride_in_1x1: bool = False  # True: ResNet v1 (Keras' ResNet50): bottleneck stride on the first 1x1
    conv_bias: bool = False  # True: every conv has a bias (Keras' ResNet50)
    dtype: Any = jnp.float32
    # True: each stage's blocks after its first run as one `nn.scan` (`BlockScanBody`), their
    # variables stacked under "layer{i}_blocks" (`scan_groups()`; `mskjax.models.scan` converts).
    scan_blocks: bool = False

    @property
    def segments(self) -> Sequence[str]:
        return ("stem", "layer1", "layer2", "layer3", "layer4")

    def _layers(self):
        bn = partial(BatchNorm, epsilon=self.bn_epsilon, momentum=self.bn_momentum, dtype=self.dtype)

        def conv(features, kernel, stride, name):
            return Conv(features, kernel, stride, use_bias=self.conv_bias, padding=self.padding, dtype=self.dtype,
                        name=name)
        return bn, conv

    def scan_groups(self) -> dict[str, tuple[str, ...]]:
        """{"layer{i}_blocks": ("layer{i}_block1", ..., "layer{i}_block{n-1}")} for every stage
        with more than one block: the blocks `scan_blocks` stacks, in order."""
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"unknown ResNet depth {self.depth}: expected one of {sorted(STAGE_SIZES)}")
        _, sizes = STAGE_SIZES[self.depth]
        return {f"layer{i + 1}_blocks": tuple(f"layer{i + 1}_block{j}" for j in range(1, n))
                for i, n in enumerate(sizes) if n > 1}

    def run_segment(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"unknown ResNet depth {self.depth}: expected one of {sorted(STAGE_SIZES)}")
        bn, conv = self._layers()
        if name == "stem":
            x = conv(64, 7, 2, "conv1")(x)
            x = nn.relu(bn(name="bn1")(x, train))
            return max_pool(x, 3, 2, 1)
        kind, sizes = STAGE_SIZES[self.depth]
        block = BasicBlock if kind == "basic" else partial(Bottleneck, stride_in_1x1=self.stride_in_1x1)
        i = int(name[len("layer"):]) - 1
        features = 64 * 2 ** i
        n = sizes[i]
        for j in range(1 if self.scan_blocks else n):
            stride = 2 if (j == 0 and i > 0) else 1
            x = block(features, stride, bn, conv, name=f"{name}_block{j}")(x, train)
        if self.scan_blocks and n > 1:
            body = nn.scan(BlockScanBody, variable_axes={"params": 0, "batch_stats": 0},
                           split_rngs={"params": True}, in_axes=0, length=n - 1)
            x, _ = body(kind, features, bn, conv, self.stride_in_1x1, train, name=f"{name}_blocks")(
                x, jnp.arange(n - 1))
        return x

    def run_head(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(x)
