"""The split-point interface every classifier backbone implements.

A backbone is a chain of named segments followed by a head:

    image -> seg[0] -> seg[1] -> ... -> seg[-1] (the "features") -> head -> logits

`model.apply(v, x, method="features", layer=NAME)` returns the output of segment NAME (default:
the last), and `model.apply(v, h, method="head", layer=NAME)` continues from that output to the
logits, so `jax.grad` with respect to any stage's activation is one function away:

    h = model.apply(v, x, method="features", layer="layer3")
    g = jax.grad(lambda h: model.apply(v, h, method="head", layer="layer3")[:, 0].sum())(h)

Every submodule is created with an explicit name, so which segments run does not change names.
"""
from __future__ import annotations

from typing import Sequence

import jax
from flax import linen as nn


class SplitModel(nn.Module):
    """Base class: subclasses define `segments`, `run_segment(name, x, train)`, `run_head(x, train)`."""

    @property
    def segments(self) -> Sequence[str]:
        raise NotImplementedError

    def run_segment(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        raise NotImplementedError

    def run_head(self, x: jax.Array, train: bool) -> jax.Array:
        raise NotImplementedError

    def _index(self, layer: str | None) -> int:
        names = list(self.segments)
        if layer is None or layer == "features":
            return len(names) - 1
        if layer not in names:
            raise ValueError(f"unknown layer {layer!r} for {type(self).__name__}: "
                             f"expected one of {names + ['features']}")
        return names.index(layer)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, start: str | None = None,
                 stop: str | None = "logits") -> jax.Array:
        """Runs from after segment `start` (None: from the image) up to `stop` (a segment name,
        "features", or "logits")."""
        names = list(self.segments)
        first = 0 if start is None else self._index(start) + 1
        last = len(names) - 1 if stop == "logits" else self._index(stop)
        for name in names[first:last + 1]:
            x = self.run_segment(name, x, train)
        if stop == "logits":
            x = self.run_head(x, train)
        return x

    def features(self, x: jax.Array, train: bool = False, layer: str | None = None) -> jax.Array:
        """Image (B, H, W, Cin) -> output of `layer` (default the last feature map), (B, h, w, C)."""
        return self(x, train, start=None, stop=layer or "features")

    def head(self, h: jax.Array, train: bool = False, layer: str | None = None) -> jax.Array:
        """Output of `layer` (default the last feature map) -> logits (B, num_classes) float32."""
        return self(h, train, start=layer or "features", stop="logits")
