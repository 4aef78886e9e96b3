"""The mirrored view (mskjax.sam.mirror_columns / mirror_boxes / mirror_points): content reversed
inside the image, padding kept, prompts moving with their pixels, and the same rule the SAM's
training flips with (mskjax.train.sam.hflip)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mskjax import sam as samfn
from mskjax.train import sam as train_sam


def test_mirror_columns_reverses_the_content_and_keeps_the_padding():
    x = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
    got = samfn.mirror_columns(x, [5, 8])
    np.testing.assert_array_equal(got[0, :, :5], x[0, :, :5][:, ::-1])
    np.testing.assert_array_equal(got[0, :, 5:], x[0, :, 5:])  # padding stays at the right
    np.testing.assert_array_equal(got[1], x[1, :, ::-1])
    np.testing.assert_array_equal(samfn.mirror_columns(got, [5, 8]), x)  # twice: back
    np.testing.assert_array_equal(np.asarray(jax.jit(samfn.mirror_columns)(jnp.asarray(x), jnp.asarray([5, 8]))), got)
    rgb = np.random.default_rng(0).normal(size=(2, 6, 8, 3)).astype(np.float32)  # (B, T, T, C): columns at -2
    np.testing.assert_array_equal(samfn.mirror_columns(rgb, [5, 8], axis=-2)[0, :, :5], rgb[0, :, :5][:, ::-1])


def test_mirrored_boxes_and_points_cover_the_mirrored_pixels():
    t, w = 32, 27
    boxes = np.asarray([[[3.25, 4.0, 10.5, 9.0], [0.0, 0.0, 27.0, 12.0]]], np.float32)  # (1, 2, 4)
    cover = np.asarray(samfn.box_coverage(jnp.asarray(boxes), t, t))  # one cell per pixel
    mirrored = np.asarray(samfn.box_coverage(jnp.asarray(samfn.mirror_boxes(boxes, [w])), t, t))
    np.testing.assert_allclose(mirrored, samfn.mirror_columns(cover, [w]), atol=1e-6)
    np.testing.assert_allclose(samfn.mirror_boxes(samfn.mirror_boxes(boxes, [w]), [w]), boxes)
    pts = np.asarray([[[[2.5, 7.0]], [[26.9, 1.0]]]], np.float32)  # (1, 2, 1, 2): pixels 2 and 26
    got = samfn.mirror_points(pts, [w])
    np.testing.assert_allclose(got[0, :, 0], [[24.5, 7.0], [0.1, 1.0]], atol=1e-5)  # pixels w-1-2, w-1-26
    np.testing.assert_allclose(np.asarray(samfn.mirror_points(jnp.asarray(pts), jnp.asarray([w]))), got)


def test_training_flips_by_the_same_rule():
    """hflip (training) and the mirrored view (the pipeline's mirror_average) move images and boxes
    alike, so the view a SAM is given at test time is one it trained on."""
    rng = np.random.default_rng(1)
    b, s = 8, 16
    images = rng.integers(0, 255, (b, s, s)).astype(np.uint8)
    masks = rng.integers(0, 255, (b, 1, s, s)).astype(np.uint8)
    boxes = np.tile(np.asarray([[[1.0, 2.0, 9.5, 11.0]]], np.float32), (b, 1, 1))
    sizes = np.asarray([[16, 12]] * b, np.int32)
    im, m, bx = (np.asarray(a) for a in train_sam.hflip(jax.random.PRNGKey(0), jnp.asarray(images),
                                                         jnp.asarray(masks), jnp.asarray(boxes), jnp.asarray(sizes)))
    flipped = [not np.array_equal(im[i], images[i]) for i in range(b)]
    assert 0 < sum(flipped) < b
    mi, mm, mb = (samfn.mirror_columns(images, sizes[:, 1]), samfn.mirror_columns(masks, sizes[:, 1]),
                  samfn.mirror_boxes(boxes, sizes[:, 1]))
    for i in range(b):
        if flipped[i]:
            np.testing.assert_array_equal(im[i], mi[i])
            np.testing.assert_array_equal(m[i], mm[i])
            np.testing.assert_allclose(bx[i], mb[i])
