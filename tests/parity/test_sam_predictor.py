"""SAM pre/postprocessing parity against segment_anything's SamPredictor path.

Preprocessing: ResizeLongestSide.apply_image (PIL resize on uint8) + Sam.preprocess (normalise,
pad) as in SamPredictor.set_image, within 1 grey level (compared in pixel units, i.e. after
multiplying by pixel_std). Coordinates: ResizeLongestSide.apply_boxes / apply_coords within 1e-4 px.
Postprocessing: Sam.postprocess_masks (bilinear up to img_size, crop, bilinear to original) within
1e-4 on logits.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from mskjax import sam as samfn
from mskjax.models.sam import PIXEL_STD


def official_shell(img_size: int) -> Sam:
    """An official Sam whose encoder is one tiny block: only preprocess/postprocess_masks are used."""
    e = img_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(img_size=img_size, embed_dim=48, depth=1, num_heads=1,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, window_size=8, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(e, e),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            transformer_dim=256,
            transformer=TwoWayTransformer(depth=1, embedding_dim=256, mlp_dim=64, num_heads=8)),
    ).eval()


def official_set_image(ref: Sam, image_rgb: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """What SamPredictor.set_image feeds the encoder, as NHWC, and its input size."""
    resized = ResizeLongestSide(ref.image_encoder.img_size).apply_image(image_rgb)
    t = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
    with torch.no_grad():
        x = ref.preprocess(t)
    return x.permute(0, 2, 3, 1).numpy(), tuple(t.shape[-2:])


def to_rgb(image):
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)


SHAPES = [(200, 300), (300, 200, 3), (512, 400), (17, 1000, 3), (256, 256), (1000, 999), (31, 5)]


@pytest.mark.parametrize("img_size", [256, 1024])
def test_preprocess_random_images(img_size):
    ref = official_shell(img_size)
    rng = np.random.default_rng(img_size)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in SHAPES]
    batch = samfn.preprocess(images, img_size)
    assert batch.images.shape == (len(SHAPES), img_size, img_size, 3)
    assert batch.images.dtype == np.float32
    for i, im in enumerate(images):
        x, input_size = official_set_image(ref, to_rgb(im))
        assert tuple(batch.input_sizes[i]) == input_size
        assert tuple(batch.original_sizes[i]) == im.shape[:2]
        grey_levels = np.abs(batch.images[i] - x[0]) * np.asarray(PIXEL_STD, np.float32)
        assert grey_levels.max() <= 1.0, f"image {i} {im.shape}: {grey_levels.max()} grey levels"
        # Padding stays exactly zero after normalisation.
        h, w = input_size
        assert not batch.images[i, h:].any() and not batch.images[i, :, w:].any()


def test_preprocess_real_radiographs(shared_data):
    """Real FracAtlas radiographs (8-bit grayscale JPEGs, and the full-size 2304 x 2880 one)."""
    files = sorted((shared_data / "fracatlas").rglob("*.jpg"))[:3]
    files.append(shared_data / "quirks" / "large_2304x2880.jpg")
    ref = official_shell(1024)
    for f in files:
        gray = np.asarray(Image.open(f).convert("L"))
        batch = samfn.preprocess(gray, 1024)
        x, input_size = official_set_image(ref, to_rgb(gray))
        assert tuple(batch.input_sizes[0]) == input_size, f
        grey_levels = np.abs(batch.images[0] - x[0]) * np.asarray(PIXEL_STD, np.float32)
        assert grey_levels.max() <= 1.0, f


def test_preprocess_batch_array_and_errors():
    rng = np.random.default_rng(0)
    gray_batch = rng.integers(0, 256, size=(2, 40, 60), dtype=np.uint8)
    a = samfn.preprocess(gray_batch, 256)
    b = samfn.preprocess([gray_batch[0][..., None], to_rgb(gray_batch[1])], 256)
    np.testing.assert_array_equal(a.images, b.images)
    with pytest.raises(ValueError, match="uint8"):
        samfn.preprocess(gray_batch.astype(np.uint16), 256)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        samfn.preprocess([np.zeros((10, 10, 4), np.uint8)], 256)
    with pytest.raises(ValueError, match="no images"):
        samfn.preprocess([], 256)


@pytest.mark.parametrize("original_size", [(200, 300), (2880, 2304), (17, 1000), (333, 333)])
def test_transform_boxes_and_points(original_size):
    rng = np.random.default_rng(sum(original_size))
    h, w = original_size
    boxes = rng.uniform(0, 1, size=(5, 4)) * np.array([w, h, w, h])
    points = rng.uniform(0, 1, size=(5, 3, 2)) * np.array([w, h])
    t = ResizeLongestSide(1024)
    np.testing.assert_allclose(samfn.transform_boxes(boxes, original_size, 1024),
                               t.apply_boxes(boxes, original_size), atol=1e-4, rtol=0)
    np.testing.assert_allclose(samfn.transform_points(points, original_size, 1024),
                               t.apply_coords(points, original_size), atol=1e-4, rtol=0)
    # JAX inputs: float32, jit-able, same numbers.
    jb = jax.jit(samfn.transform_boxes, static_argnums=2)(jnp.asarray(boxes, jnp.float32),
                                                          jnp.asarray(original_size), 1024)
    np.testing.assert_allclose(np.asarray(jb), t.apply_boxes(boxes, original_size), atol=1e-3, rtol=0)


def test_transform_boxes_batched_sizes():
    sizes = np.array([[200, 300], [512, 100]])
    boxes = np.array([[[0, 0, 300, 200], [10, 20, 30, 40]], [[0, 0, 100, 512], [5, 6, 7, 8]]], float)
    out = samfn.transform_boxes(boxes, sizes, 1024)
    for b in range(2):
        np.testing.assert_allclose(out[b], ResizeLongestSide(1024).apply_boxes(boxes[b], tuple(sizes[b])),
                                   atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="prefix"):
        samfn.transform_boxes(boxes, np.array([[1, 2], [3, 4], [5, 6]]), 1024)


@pytest.mark.parametrize("img_size,original_size", [(256, (200, 300)), (256, (300, 200)),
                                                    (1024, (2880, 2304)), (1024, (100, 60)),
                                                    (1024, (1024, 1024))])
def test_postprocess_matches_official(img_size, original_size):
    ref = official_shell(img_size)
    input_size = samfn.sam_input_size(original_size, img_size)
    low = img_size // 4
    logits = (3.0 * np.random.default_rng(img_size).normal(size=(2, 3, low, low))).astype(np.float32)
    with torch.no_grad():
        expected = ref.postprocess_masks(torch.from_numpy(logits), input_size, original_size).numpy()
    ours = np.asarray(samfn.postprocess(jnp.asarray(logits), input_size, original_size, img_size,
                                        return_logits=True))
    assert ours.shape == expected.shape == (2, 3, *original_size)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    masks = np.asarray(samfn.postprocess(jnp.asarray(logits), input_size, original_size, img_size))
    assert masks.dtype == bool
    decided = np.abs(expected) > 1e-4
    np.testing.assert_array_equal(masks[decided], expected[decided] > 0)


def test_upscale_logits_matches_torch_interpolate():
    x = np.random.default_rng(1).normal(size=(2, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], (256, 256), mode="bilinear",
                                              align_corners=False)[0].numpy()
    np.testing.assert_allclose(np.asarray(samfn.upscale_logits(jnp.asarray(x), 256)), ref,
                               atol=1e-5, rtol=0)
