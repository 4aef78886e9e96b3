"""Running a per-image function over a batch in passes of a few images (a `lax.map` over chunks),
and the XLA:CPU options an image encoder (compiled on its own) and a classifier's training and
evaluation steps are compiled with.

Big encoders on a CPU are faster one image at a time than on a whole batch: at batch 1 their
activations stay in cache (`tools/bench_encoder_passes.py`, docs/BENCHMARKS.md). `mskjax.sam.embed`
and the trainer's TinyViT inference share this. Traceable (static shapes, jit-able).
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

# XLA:CPU hands dots, convolutions and reductions to YNNPACK by default (jaxlib 0.10). For an
# image encoder compiled on its own, Eigen is faster for all of them: SAM ViT-B at 512 px 1.14x per
# image, and the pipeline with its encoder so compiled 1.08-1.25x (ViT-B) and 1.14-1.18x
# (LiteMedSAM) in same-process rounds, mask logits within 3e-6 / 4e-5 (docs/BENCHMARKS.md, "the
# pipeline's encoder compiled apart").
CPU_ENCODER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# For the classifiers (ResNet, EfficientNet): convolutions on Eigen, dots and reductions still on
# YNNPACK. YNNPACK's convolution backward pass (the kernel gradient above all) is the slow part of
# ResNet training on CPU; Eigen's is 2-4x faster on ResNet50's 3x3 convolutions, while Eigen's
# reductions (BatchNorm's statistics) would be slower than YNNPACK's. ResNet50 @ 224 batch 8
# training step 1.26x, ResNet18 @ 128 batch 32 1.6x (eval 1.5x); EfficientNet-B3 unchanged (its
# depthwise convolutions are not convolutions on CPU). Float rounding only (docs/BENCHMARKS.md,
# "ResNet training on CPU").
CPU_CLASSIFIER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                          "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}

CPU_CONVOLUTIONS = ("eigen", "ynnpack")


def default_images_per_pass() -> int:
    """Images per pass when not given: 1 on a single CPU device, 0 (the whole batch) otherwise. On this
    project's 2-core CPU one image at a time is faster per image than a batch of 8
    (`tools/bench_encoder_passes.py`, idle: LiteMedSAM's TinyViT 1.56x, bit-identical; SAM ViT-B at
    512 px 1.15x, within 5e-6; vit_tiny at 256 the same speed). With several devices the batch is
    sharded, which a sequential map over it would undo."""
    return 1 if jax.default_backend() == "cpu" and jax.device_count() == 1 else 0


@functools.lru_cache(maxsize=None)
def _cpu_options_known(options: tuple) -> bool:
    """Whether this jaxlib's XLA:CPU accepts these compiler options (an unknown one is an error)."""
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((2,), jnp.float32)).compile(dict(options))
    except Exception:  # noqa: BLE001 - XLA raises its own runtime error type for an unknown option
        return False
    return True


def _cpu_options(options: dict) -> dict:
    if jax.default_backend() != "cpu" or not _cpu_options_known(tuple(sorted(options.items()))):
        return {}
    return dict(options)


def encoder_compiler_options() -> dict:
    """XLA compiler options for jitting an image encoder alone (`jax.jit(..., compiler_options=)`):
    CPU_ENCODER_OPTIONS on CPU when this jaxlib knows them, else none. They change float rounding
    only (summation order inside the dots)."""
    return _cpu_options(CPU_ENCODER_OPTIONS)


def classifier_compiler_options(convolutions: str = "eigen") -> dict:
    """XLA compiler options for jitting a classifier's training or evaluation step
    (`jax.jit(..., compiler_options=)`). convolutions "eigen": CPU_CLASSIFIER_OPTIONS on CPU when
    this jaxlib knows them (else none); "ynnpack": none, XLA's default. Other backends: none.
    Float rounding only."""
    if convolutions not in CPU_CONVOLUTIONS:
        raise ValueError(f"unknown CPU convolution library {convolutions!r}: expected one of {CPU_CONVOLUTIONS}")
    return _cpu_options(CPU_CLASSIFIER_OPTIONS) if convolutions == "eigen" else {}


def in_passes(fn: Callable[[jax.Array], jax.Array], images: jax.Array, images_per_pass: int) -> jax.Array:
    """fn over `images` (B, ...) -> (B, ...), fn taking and returning a leading batch axis whose
    rows depend on their own input row alone. images_per_pass k: fn runs on k images at a time as a
    `lax.map` over chunks (the batch zero-padded to a multiple of k, the padding dropped); k <= 0 or
    k >= B runs the whole batch in one call."""
    k, n = int(images_per_pass), images.shape[0]
    if k <= 0 or k >= n:
        return fn(images)
    pad = (-n) % k
    x = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1)) if pad else images
    out = jax.lax.map(fn, x.reshape((-1, k) + images.shape[1:]))
    return out.reshape((-1,) + out.shape[2:])[:n]


__all__ = ["CPU_CLASSIFIER_OPTIONS", "CPU_CONVOLUTIONS", "CPU_ENCODER_OPTIONS", "classifier_compiler_options",
           "default_images_per_pass", "encoder_compiler_options", "in_passes"]
