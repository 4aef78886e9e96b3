"""mskjax.deletion_choice (candidate boxes, SAM logits in the classifier frame, the score) and mskjax.fill."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mskjax import deletion_choice as dc
from mskjax import geometry as G
from mskjax.fill import fill_masked


def test_candidate_boxes_tile_the_box_at_each_scale():
    box = jnp.asarray([[10.0, 20.0, 50.0, 100.0]])  # 40 wide, 80 high
    assert dc.grid_counts((1.0, 0.5, 0.33, 0.25)) == (1, 3, 5, 7)
    c = np.asarray(dc.candidate_boxes(box, (1.0, 0.5)))
    assert c.shape == (1, 1 + 9, 4)
    np.testing.assert_allclose(c[0, 0], box[0])  # scale 1: the box itself
    sub = c[0, 1:]
    np.testing.assert_allclose(sub[:, 2] - sub[:, 0], 20.0)
    np.testing.assert_allclose(sub[:, 3] - sub[:, 1], 40.0)
    np.testing.assert_allclose(sub[0], [10, 20, 30, 60])   # top-left corner
    np.testing.assert_allclose(sub[4], [20, 40, 40, 80])   # centre
    np.testing.assert_allclose(sub[8], [30, 60, 50, 100])  # bottom-right corner
    assert (sub[:, 0] >= 10).all() and (sub[:, 2] <= 50).all() and (sub[:, 1] >= 20).all() and (sub[:, 3] <= 100).all()


def test_sam_logits_land_where_the_geometry_puts_them():
    # Original 100 x 200 (H, W); classifier input 64 x 64 (squashed); SAM input 256, low-res 64.
    hw = (100, 200)
    geom = G.stack_geometries([G.resize_geometry(hw, (64, 64))])
    low = np.full((1, 1, 64, 64), -5.0, np.float32)
    # SAM frame box (64, 32)-(128, 96) px = low-res cells 16..32 x 8..24; SAM scale 256/200 = 1.28,
    # so original (50, 25)-(100, 75) and classifier (16, 16)-(32, 48).
    low[0, 0, 8:24, 16:32] = 5.0
    out = np.asarray(dc.logits_in_input_frame(jnp.asarray(low), geom, jnp.asarray([hw], jnp.float32), 256))
    assert out.shape == (1, 1, 64, 64)
    inside = out[0, 0] > 0
    expected = np.zeros((64, 64), bool)
    expected[16:48, 16:32] = True
    # Pixels next to the box's edges may go either way (bilinear between cells); all others agree.
    core = np.zeros_like(expected)
    core[18:46, 18:30] = True
    far = ~np.pad(np.ones((36, 20), bool), ((14, 14), (14, 30)))
    assert inside[core].all() and not inside[far].any()
    assert abs(int(inside.sum()) - int(expected.sum())) <= 2 * (32 + 16)


def test_fill_replaces_the_masked_structure_by_its_surroundings():
    img = np.full((1, 64, 64), 0.3, np.float32)
    img[0, 28:36, 28:36] = 1.0  # a bright square on a flat background
    mask = np.zeros((1, 2, 64, 64), bool)
    mask[0, 0, 28:36, 28:36] = True          # candidate 0: the square
    mask[0, 1, 0:8, 0:8] = True              # candidate 1: background only
    out = np.asarray(fill_masked(jnp.asarray(img), jnp.asarray(mask)))
    assert out.shape == (1, 2, 64, 64)
    np.testing.assert_allclose(out[0, 0, 28:36, 28:36], 0.3, atol=1e-4)  # the square is gone
    keep = np.ones((64, 64), bool)
    keep[27:37, 27:37] = False  # the mask grown by one pixel
    np.testing.assert_array_equal(out[0, 0][keep], img[0][keep])  # nothing else changes
    np.testing.assert_allclose(out[0, 1][28:36, 28:36], 1.0)  # the other candidate leaves the square
    # A mask over the whole image falls back to nothing left to fill from: finite, not NaN.
    full = np.asarray(fill_masked(jnp.asarray(img), jnp.ones((1, 1, 64, 64), bool)))
    assert np.isfinite(full).all()


def test_deletion_scores_prefer_the_drop_less_the_area():
    p = jnp.asarray([0.9])
    removed = jnp.asarray([[0.2, 0.1, 0.8]])
    masks = np.zeros((1, 3, 10, 10), bool)
    masks[0, 0, :1] = True   # 10% of the input
    masks[0, 1, :5] = True   # 50%
    masks[0, 2, :1] = True
    s = np.asarray(dc.deletion_scores(p, removed, jnp.asarray(masks), area_penalty=1.0))
    np.testing.assert_allclose(s, [[0.6, 0.3, 0.0]], atol=1e-6)
    s0 = np.asarray(dc.deletion_scores(p, removed, jnp.asarray(masks), area_penalty=0.0))
    assert int(np.argmax(s0)) == 1 and int(np.argmax(s)) == 0


@pytest.mark.parametrize("scales", [(), (0.0,), (1.5,)])
def test_pipeline_config_rejects_bad_scales(scales):
    from mskjax.pipeline import PipelineConfig, PipelineError
    with pytest.raises(PipelineError, match="choice_scales"):
        PipelineConfig(choose="deletion", choice_scales=scales)
