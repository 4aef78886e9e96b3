"""ResNet18/34/50/101/152 as torchvision builds them (v1.5: the stride of a bottleneck sits on its
3x3 conv).

Input NHWC float, already normalised as the checkpoint expects (torchvision: [0, 1] then ImageNet
mean/std). Segments, each a split point for CAM methods: "stem" (conv-bn-relu-maxpool, stride 4),
"layer1".."layer4" (strides 4, 8, 16, 32); "features" is "layer4"; the head is
global average pool -> "fc".
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mskjax.models.layers import BatchNorm, Conv
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
        residual = x
        y = self.conv(self.features, 3, self.stride, name="conv1")(x)
        y = nn.relu(self.bn(name="bn1")(y, train))
        y = self.conv(self.features, 3, 1, name="conv2")(y)
        y = self.bn(name="bn2")(y, train)
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = self.conv(self.features, 1, self.stride, name="downsample_conv")(x)
            residual = self.bn(name="downsample_bn")(residual, train)
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
        out = self.features * 4
        residual = x
        s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        y = nn.relu(self.bn(name="bn1")(self.conv(self.features, 1, s1, name="conv1")(x), train))
        y = nn.relu(self.bn(name="bn2")(self.conv(self.features, 3, s3, name="conv2")(y), train))
        y = self.bn(name="bn3")(self.conv(out, 1, 1, name="conv3")(y), train)
        if self.stride != 1 or x.shape[-1] != out:
            residual = self.conv(out, 1, self.stride, name="downsample_conv")(x)
            residual = self.bn(name="downsample_bn")(residual, train)
        return nn.relu(y + residual.astype(y.dtype))


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

    @property
    def segments(self) -> Sequence[str]:
        return ("stem", "layer1", "layer2", "layer3", "layer4")

    def _layers(self):
        bn = partial(BatchNorm, epsilon=self.bn_epsilon, momentum=self.bn_momentum, dtype=self.dtype)

        def conv(features, kernel, stride, name):
            return Conv(features, kernel, stride, use_bias=self.conv_bias, padding=self.padding, dtype=self.dtype,
                        name=name)
        return bn, conv

    def run_segment(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"unknown ResNet depth {self.depth}: expected one of {sorted(STAGE_SIZES)}")
        bn, conv = self._layers()
        if name == "stem":
            x = conv(64, 7, 2, "conv1")(x)
            x = nn.relu(bn(name="bn1")(x, train))
            # torch pads max-pool input with -inf; reduce_window's init value does the same.
            return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        kind, sizes = STAGE_SIZES[self.depth]
        block = BasicBlock if kind == "basic" else partial(Bottleneck, stride_in_1x1=self.stride_in_1x1)
        i = int(name[len("layer"):]) - 1
        features = 64 * 2 ** i
        for j in range(sizes[i]):
            stride = 2 if (j == 0 and i > 0) else 1
            x = block(features, stride, bn, conv, name=f"{name}_block{j}")(x, train)
        return x

    def run_head(self, x: jax.Array, train: bool) -> jax.Array:
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(x)
