"""Batch augmentation: affine resample parity with torch grid_sample, exact cases, randomness, jit."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mskjax.data.augment import (
    AugmentConfig, augment, ellipse_masks, random_affine, random_fill, random_flip, random_photometric, sample_affine,
    warp_affine)

GEOMETRIC_ONLY = dataclasses.replace(AugmentConfig(), gamma_prob=0.0, contrast_prob=0.0, brightness_prob=0.0)
NOTHING = AugmentConfig.identity()


# One shape almost everywhere, so each jitted function compiles once per config for the file.
B, H, W, C = 4, 12, 17, 2


def _images(b=B, h=H, w=W, c=C, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((b, h, w, c), dtype=np.float32))


def _torch_warp(images: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """Same resample via torch affine_grid + grid_sample (bilinear, zeros, align_corners=False)."""
    b, h, w, c = images.shape
    d = np.diag([w / 2.0, h / 2.0])
    thetas = []
    for m in matrices.astype(np.float64):
        a, o = m[:, :2], m[:, 2]
        lin = np.linalg.inv(d) @ a @ d
        off = np.linalg.inv(d) @ (a @ d @ np.ones(2) + o) - 1.0
        thetas.append(np.concatenate([lin, off[:, None]], 1))
    theta = torch.tensor(np.stack(thetas), dtype=torch.float32)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.numpy().transpose(0, 2, 3, 1)


def test_warp_matches_torch_grid_sample():
    images = _images()
    cfg = dataclasses.replace(GEOMETRIC_ONLY, max_rotate_deg=30.0, scale_range=(0.7, 1.3),
                              translate_prob=1.0, max_translate=0.1)
    m = sample_affine(jax.random.key(1), B, H, W, cfg)
    got = np.asarray(warp_affine(images, m))
    np.testing.assert_allclose(got, _torch_warp(np.asarray(images), np.asarray(m)), atol=2e-5)


def test_rotation_by_90_degrees_is_rot90():
    # Square images; output->input map of a +90 degree (counter-clockwise on screen) rotation.
    images = _images(w=H)
    a = np.array([[0.0, -1.0], [1.0, 0.0]])
    c = np.array([H / 2, H / 2])
    m = np.concatenate([a, (c - a @ c)[:, None]], 1)[None].repeat(B, 0).astype(np.float32)
    got = np.asarray(warp_affine(images, jnp.asarray(m)))
    np.testing.assert_allclose(got, np.rot90(np.asarray(images), axes=(1, 2)), atol=1e-5)


def test_flip_is_exact_through_both_paths():
    images = _images()
    want = np.asarray(images)[:, :, ::-1]
    np.testing.assert_array_equal(np.asarray(random_flip(jax.random.key(0), images, prob=1.0)), want)
    cfg = dataclasses.replace(NOTHING, flip_prob=1.0)
    np.testing.assert_allclose(np.asarray(random_affine(jax.random.key(0), images, cfg)), want, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(random_flip(jax.random.key(0), images, prob=0.0)), images)


def test_identity_config_returns_input():
    images = _images()
    assert not NOTHING.geometric
    np.testing.assert_array_equal(np.asarray(augment(jax.random.key(3), images, NOTHING)), images)
    m = sample_affine(jax.random.key(3), B, H, W, NOTHING)
    np.testing.assert_array_equal(np.asarray(warp_affine(images, m)), images)  # exact at pixel centres


def test_zoom_out_pads_with_zero():
    ones = jnp.ones((B, 20, 20, C), jnp.float32)
    cfg = dataclasses.replace(NOTHING, scale_prob=1.0, scale_range=(0.5, 0.5))
    out = np.asarray(random_affine(jax.random.key(0), ones, cfg))
    np.testing.assert_allclose(out[:, 6:14, 6:14], 1.0, atol=1e-6)  # content: centre 10 x 10
    assert np.all(out[:, :4] == 0) and np.all(out[:, :, :4] == 0) and np.all(out[:, 16:] == 0)


def test_augment_draws_per_image_is_deterministic_and_traceable():
    same = jnp.broadcast_to(_images(b=1), (B, H, W, C))
    cfg = AugmentConfig()
    a = np.asarray(augment(jax.random.key(7), same, cfg))
    for i in range(B):
        for j in range(i + 1, B):
            assert not np.allclose(a[i], a[j]), (i, j)  # independent parameters per image
    np.testing.assert_array_equal(a, np.asarray(augment(jax.random.key(7), same, cfg)))
    assert not np.allclose(a, np.asarray(augment(jax.random.key(8), same, cfg)))
    jaxpr = jax.make_jaxpr(lambda k, x: augment(k, x, cfg))(jax.random.key(7), same)  # traces inside jit
    assert jaxpr.out_avals[0].shape == same.shape
    assert a.shape == same.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0


def test_rotation_stays_within_its_range():
    cfg = dataclasses.replace(NOTHING, rotate_prob=1.0, max_rotate_deg=10.0)
    m = np.asarray(sample_affine(jax.random.key(0), 512, 32, 32, cfg))
    angles = np.degrees(np.arctan2(m[:, 1, 0], m[:, 0, 0]))
    assert np.all(np.abs(angles) <= 10.0 + 1e-4)
    assert np.abs(angles).max() > 9.0 and np.std(angles) > 4.0  # spread over the range
    np.testing.assert_allclose(np.linalg.det(m[:, :, :2]), 1.0, atol=1e-5)  # no scale drawn


def test_flip_probability_is_per_image():
    cfg = dataclasses.replace(NOTHING, flip_prob=0.5)
    m = np.asarray(sample_affine(jax.random.key(0), 400, 8, 8, cfg))
    frac = np.mean(m[:, 0, 0] < 0)
    assert 0.4 < frac < 0.6


def test_gamma_contrast_brightness():
    x = jnp.asarray(np.random.default_rng(0).uniform(0.3, 0.7, (B, H, W, C)).astype(np.float32))
    only = lambda **kw: dataclasses.replace(NOTHING, **kw)
    g = random_photometric(jax.random.key(0), x, only(gamma_prob=1.0, gamma_range=(2.0, 2.0)))
    np.testing.assert_allclose(np.asarray(g), np.asarray(x) ** 2, rtol=1e-5)
    c = random_photometric(jax.random.key(0), x, only(contrast_prob=1.0, contrast_range=(1.2, 1.2)))
    np.testing.assert_allclose(np.asarray(c).mean(axis=(1, 2, 3)), np.asarray(x).mean(axis=(1, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(c).std(axis=(1, 2, 3)), 1.2 * np.asarray(x).std(axis=(1, 2, 3)), rtol=1e-4)
    b = np.asarray(random_photometric(jax.random.key(0), x, only(brightness_prob=1.0, max_brightness=0.2)))
    delta = (b - np.asarray(x)).reshape(B, -1)
    np.testing.assert_allclose(delta, delta[:, :1].repeat(delta.shape[1], 1), atol=1e-6)  # one shift per image
    assert np.all(np.abs(delta) <= 0.2 + 1e-6) and np.ptp(delta[:, 0]) > 0
    clipped = random_photometric(jax.random.key(0), jnp.ones_like(x), only(brightness_prob=1.0, max_brightness=0.5))
    assert float(jnp.max(clipped)) <= 1.0


@pytest.mark.parametrize("kwargs", [dict(flip_prob=1.5), dict(scale_range=(1.1, 0.9)), dict(gamma_range=(0.0, 1.0)),
                                    dict(max_brightness=-0.1), dict(scale_range=(1.0,)), dict(fill_size_range=(0.0, 0.1)),
                                    dict(fill_prob=2.0)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


def test_config_is_hashable_and_rejects_bad_rank():
    assert hash(AugmentConfig()) == hash(AugmentConfig())
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        augment(jax.random.key(0), jnp.zeros((8, 8, 1)), AugmentConfig())


def test_ellipse_mask_hand_case():
    m = np.asarray(ellipse_masks(jnp.asarray([[20.0, 10.0]]), jnp.asarray([[6.0, 3.0]]), jnp.asarray([0.0]), 24, 40))
    assert m.shape == (1, 24, 40)
    assert m[0, 9, 19] and m[0, 9, 14] and not m[0, 9, 13] and not m[0, 6, 19]  # x half-axis 6, y half-axis 3
    assert abs(int(m.sum()) - np.pi * 18) < 8
    r = np.asarray(ellipse_masks(jnp.asarray([[20.0, 10.0]]), jnp.asarray([[6.0, 3.0]]), jnp.asarray([np.pi / 2]),
                                 24, 40))
    assert r[0, 5, 19] and not r[0, 9, 14]  # turned a quarter: the long axis is vertical


def test_fill_changes_one_patch_and_leaves_the_other_draws_alone():
    x = _images(b=8, h=32, w=32, c=1, seed=3)
    key = jax.random.key(5)
    with_fill = dataclasses.replace(GEOMETRIC_ONLY, fill_prob=1.0)
    a = np.asarray(augment(key, x, GEOMETRIC_ONLY))
    b = np.asarray(augment(key, x, with_fill))
    changed = np.abs(a - b)[..., 0] > 0
    for i in range(8):  # each image: one connected patch changed, well short of the whole image
        assert 0 < changed[i].sum() < 0.5 * 32 * 32
        ys, xs = np.nonzero(changed[i])
        assert (ys.max() - ys.min()) <= 2 * 0.15 * 32 + 2 and (xs.max() - xs.min()) <= 2 * 0.15 * 32 + 2
    assert np.array_equal(a[~changed], b[~changed])  # everything else is the draw without fill
    half = np.asarray(random_fill(jax.random.key(1), _images(b=64, h=16, w=16, c=1), dataclasses.replace(NOTHING, fill_prob=0.5)))
    hit = (np.abs(half - np.asarray(_images(b=64, h=16, w=16, c=1))) > 0).any(axis=(1, 2, 3))
    assert 16 < hit.sum() < 48  # per image, about half
    assert np.array_equal(np.asarray(augment(key, x, NOTHING)), np.asarray(x))
