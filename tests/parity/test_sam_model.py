"""SAM parity: our Flax port against the official segment_anything model, end to end.

The official model is built with the official classes at a reduced img_size (vit_b's encoder at
256 and 320 px, and our vit_tiny layout at 256 px), randomly initialised with several seeds, with
its zero-initialised pos_embed and relative-position tables (and LayerNorm affines) randomised so
those code paths are exercised. Our port gets its weights through `sam_variables_from_state_dict`.
Both sides get the same preprocessed input tensors. Tolerances: 1e-3 absolute (float32) on image
embeddings, low-res logits and IoU predictions; binary masks at the original size agree wherever
the reference logit is more than 1e-2 from the threshold.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import get_rel_pos as ref_get_rel_pos
from segment_anything.modeling.image_encoder import window_partition as ref_window_partition

from mskjax import sam as samfn
from mskjax.models.sam import build_sam
from mskjax.models.sam.common import ConvTranspose2x2
from mskjax.models.sam.image_encoder import get_rel_pos, window_partition, window_unpartition
from mskjax.weights.sam import sam_variables_from_state_dict

TOL = 1e-3
MASK_MARGIN = 1e-2

jit_embed = jax.jit(samfn.embed, static_argnums=0)
jit_decode = jax.jit(samfn.decode, static_argnums=0, static_argnames=("multimask", "return_masks"))


CASES = [("vit_b", 256, 0), ("vit_b", 320, 1), ("vit_tiny", 256, 2)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{s}px-seed{r}" for a, s, r in CASES])
def pair(request, build_official_sam):
    arch, img_size, seed = request.param
    ref = build_official_sam(arch, img_size, seed)
    variables = sam_variables_from_state_dict(ref.state_dict(), arch, img_size)
    model = build_sam(arch, img_size)
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, img_size, img_size, 3)).astype(np.float32)
    with torch.no_grad():
        ref_emb = ref.image_encoder(torch.from_numpy(images).permute(0, 3, 1, 2))
    emb = jit_embed(model, variables, jnp.asarray(images))
    return dict(ref=ref, model=model, variables=variables, img_size=img_size, rng=rng,
                images=images, ref_emb=ref_emb, emb=emb)


def reference_decode(ref: Sam, ref_emb: torch.Tensor, image: int, boxes=None, points=None,
                     labels=None, masks=None, multimask=True):
    """Official prompt encoder + mask decoder for a batch of prompts on one image (as
    SamPredictor.predict_torch)."""
    t = lambda x, dt=torch.float: None if x is None else torch.as_tensor(np.asarray(x), dtype=dt)
    pts = None if points is None else (t(points), t(labels, torch.int))
    with torch.no_grad():
        sparse, dense = ref.prompt_encoder(points=pts, boxes=t(boxes), masks=t(masks))
        logits, iou = ref.mask_decoder(
            image_embeddings=ref_emb[image:image + 1], image_pe=ref.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask)
    return logits.numpy(), iou.numpy()


def random_boxes(rng, n, size):
    xy0 = rng.uniform(0, size * 0.6, size=(n, 2))
    wh = rng.uniform(8, size * 0.4, size=(n, 2))
    return np.concatenate([xy0, xy0 + wh], axis=1).astype(np.float32)


def assert_close(ours, ref, what):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = np.abs(ours - ref).max()
    assert err < TOL, f"{what}: max abs error {err:.2e} (reference scale {np.abs(ref).max():.2e})"


def test_image_embeddings(pair):
    ref_emb = pair["ref_emb"].permute(0, 2, 3, 1).numpy()
    e = pair["img_size"] // 16
    assert ref_emb.shape == (2, e, e, 256)
    assert_close(pair["emb"], ref_emb, "image embeddings")


@pytest.mark.parametrize("multimask", [True, False])
def test_box_prompts(pair, multimask):
    rng, s = pair["rng"], pair["img_size"]
    boxes = np.stack([random_boxes(rng, 3, s) for _ in range(2)])  # (B=2, P=3, 4)
    valid = np.array([[True, True, True], [True, True, False]])
    out = jit_decode(pair["model"], pair["variables"], pair["emb"], boxes=jnp.asarray(boxes),
                     multimask=multimask, prompt_valid=jnp.asarray(valid))
    m = 3 if multimask else 1
    assert out["low_res_logits"].shape == (2, 3, m, s // 4, s // 4)
    assert out["iou_predictions"].shape == (2, 3, m)
    for b in range(2):
        n = int(valid[b].sum())
        ref_logits, ref_iou = reference_decode(pair["ref"], pair["ref_emb"], b, boxes=boxes[b, :n],
                                               multimask=multimask)
        assert_close(out["low_res_logits"][b, :n], ref_logits, f"box logits, image {b}")
        assert_close(out["iou_predictions"][b, :n], ref_iou, f"box IoU, image {b}")
    assert np.all(np.asarray(out["low_res_logits"][1, 2]) == samfn.INVALID_PROMPT_LOGIT)
    assert np.all(np.asarray(out["iou_predictions"][1, 2]) == 0.0)


def test_point_prompts(pair):
    rng, s = pair["rng"], pair["img_size"]
    points = rng.uniform(0, s, size=(2, 2, 3, 2)).astype(np.float32)  # (B, P, N, 2)
    labels = np.array([[[1, 0, 1], [1, -1, -1]], [[0, 1, -1], [1, 1, 0]]], np.int32)
    out = jit_decode(pair["model"], pair["variables"], pair["emb"], points=jnp.asarray(points),
                     point_labels=jnp.asarray(labels))
    for b in range(2):
        ref_logits, ref_iou = reference_decode(pair["ref"], pair["ref_emb"], b, points=points[b],
                                               labels=labels[b])
        assert_close(out["low_res_logits"][b], ref_logits, f"point logits, image {b}")
        assert_close(out["iou_predictions"][b], ref_iou, f"point IoU, image {b}")


def test_points_boxes_and_mask_input(pair):
    rng, s = pair["rng"], pair["img_size"]
    boxes = np.stack([random_boxes(rng, 2, s) for _ in range(2)])
    points = rng.uniform(0, s, size=(2, 2, 1, 2)).astype(np.float32)
    labels = np.ones((2, 2, 1), np.int32)
    masks = (4.0 * rng.normal(size=(2, 2, s // 4, s // 4))).astype(np.float32)
    out = jit_decode(pair["model"], pair["variables"], pair["emb"], boxes=jnp.asarray(boxes),
                     points=jnp.asarray(points), point_labels=jnp.asarray(labels),
                     mask_input=jnp.asarray(masks), multimask=False)
    for b in range(2):
        ref_logits, ref_iou = reference_decode(
            pair["ref"], pair["ref_emb"], b, boxes=boxes[b], points=points[b], labels=labels[b],
            masks=masks[b][:, None], multimask=False)
        assert_close(out["low_res_logits"][b], ref_logits, f"box+point+mask logits, image {b}")
        assert_close(out["iou_predictions"][b], ref_iou, f"box+point+mask IoU, image {b}")


def test_masks_at_original_size(pair):
    """Our decode + postprocess against the official decoder + postprocess_masks, as booleans."""
    rng, s = pair["rng"], pair["img_size"]
    original_size = (300, 451)  # a landscape image: input size (170, 256) at 256 px
    input_size = samfn.sam_input_size(original_size, s)
    boxes = random_boxes(rng, 2, min(input_size))[None].repeat(2, axis=0)
    out = jit_decode(pair["model"], pair["variables"], pair["emb"], boxes=jnp.asarray(boxes),
                     return_masks=True)
    ref_logits, _ = reference_decode(pair["ref"], pair["ref_emb"], 0, boxes=boxes[0])
    with torch.no_grad():
        ref_full = pair["ref"].postprocess_masks(torch.from_numpy(ref_logits), input_size,
                                                 original_size).numpy()
    ours = np.asarray(samfn.postprocess(out["low_res_logits"][0], input_size, original_size, s))
    assert ours.shape == ref_full.shape == (2, 3, *original_size)
    decided = np.abs(ref_full) > MASK_MARGIN
    # Not vacuous: most pixels are decided, and both classes occur.
    assert decided.mean() > 0.5 and 0.0 < (ref_full > 0).mean() < 1.0
    assert np.array_equal(ours[decided], (ref_full > 0)[decided])
    # decode's own masks are in the padded SAM input frame.
    with torch.no_grad():
        ref_padded = torch.nn.functional.interpolate(
            torch.from_numpy(ref_logits), (s, s), mode="bilinear", align_corners=False).numpy()
    decided = np.abs(ref_padded) > MASK_MARGIN
    assert np.array_equal(np.asarray(out["masks"][0])[decided], (ref_padded > 0)[decided])


def test_rel_pos_zero_vs_random_matters(pair):
    """The randomised tables change the embeddings: the rel-pos path is really exercised."""
    params = jax.tree_util.tree_map(lambda x: x, pair["variables"])
    enc = dict(params["params"]["image_encoder"])
    for name in list(enc):
        if name.startswith("blocks_"):
            attn = dict(enc[name]["attn"])
            attn["rel_pos_h"] = np.zeros_like(attn["rel_pos_h"])
            enc[name] = {**enc[name], "attn": attn}
    params = {**params, "params": {**params["params"], "image_encoder": enc}}
    zeroed = jit_embed(pair["model"], params, jnp.asarray(pair["images"]))
    assert float(jnp.abs(pair["emb"] - zeroed).max()) > 10 * TOL


@pytest.mark.parametrize("q_size,k_size,table", [(14, 14, 27), (16, 16, 31), (8, 8, 27), (14, 14, 9),
                                                  (6, 12, 23), (12, 5, 23), (7, 3, 11)])
def test_get_rel_pos_matches_official(q_size, k_size, table):
    """Index arithmetic for q != k and linear interpolation of tables of another length."""
    rel = np.random.default_rng(table).normal(size=(table, 5)).astype(np.float32)
    ref = ref_get_rel_pos(q_size, k_size, torch.from_numpy(rel)).numpy()
    ours = np.asarray(get_rel_pos(q_size, k_size, jnp.asarray(rel)))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("h,w,window", [(16, 16, 14), (20, 20, 14), (16, 16, 8), (9, 13, 4)])
def test_window_partition_matches_official(h, w, window):
    x = np.random.default_rng(h * w).normal(size=(2, h, w, 3)).astype(np.float32)
    ref, ref_pad = ref_window_partition(torch.from_numpy(x), window)
    ours, pad = window_partition(jnp.asarray(x), window)
    assert pad == tuple(ref_pad)
    np.testing.assert_array_equal(np.asarray(ours), ref.numpy())
    np.testing.assert_array_equal(np.asarray(window_unpartition(ours, window, pad, (h, w))), x)


def test_conv_transpose_matches_torch():
    """Kernel orientation: torch ConvTranspose2d (Cin, Cout, 2, 2) weight -> our (2, 2, Cin, Cout)."""
    torch.manual_seed(0)
    conv = torch.nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2)
    x = np.random.default_rng(0).normal(size=(2, 5, 7, 6)).astype(np.float32)
    with torch.no_grad():
        ref = conv(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    params = {"kernel": conv.weight.detach().numpy().transpose(2, 3, 0, 1),
              "bias": conv.bias.detach().numpy()}
    ours = ConvTranspose2x2(4).apply({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_vit_b_full_size_encoder(build_official_sam):
    """vit_b at the real 1024 px (64 x 64 tokens, windows padded 64 -> 70): embeddings within 1e-3."""
    ref = build_official_sam("vit_b", 1024, 3)
    variables = sam_variables_from_state_dict(ref.state_dict(), "vit_b", 1024)
    x = np.random.default_rng(3).normal(size=(1, 1024, 1024, 3)).astype(np.float32)
    with torch.no_grad():
        ref_emb = ref.image_encoder(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    emb = jit_embed(build_sam("vit_b"), variables, jnp.asarray(x))
    assert_close(emb, ref_emb.numpy(), "vit_b 1024 px embeddings")


@pytest.mark.parametrize("block", [0, 2], ids=["windowed-padded", "global"])
def test_encoder_block_gradients_match_official(build_official_sam, block):
    """Forward and backward of one encoder block against segment_anything's `Block` under torch
    autograd: vit_b at 256 px, a 16 x 16 token grid, so the windowed block (0) pads to two 14 x 14
    windows per side. Our windowed attention projects only the real tokens and fills the padding
    with the qkv bias, and folds the relative terms into the logits' matmul; the gradients of the
    input, the qkv bias (which the padded tokens' keys and values carry), the qkv kernel and the
    relative-position tables must still be the official ones."""
    from mskjax.models.sam.image_encoder import EncoderBlock

    ref = build_official_sam("vit_b", 256, 3)
    variables = sam_variables_from_state_dict(ref.state_dict(), "vit_b", 256)
    params = variables["params"]["image_encoder"][f"blocks_{block}"]
    rng = np.random.default_rng(block)
    x = rng.normal(size=(2, 16, 16, 768)).astype(np.float32)
    cot = rng.normal(size=x.shape).astype(np.float32)

    tblock = ref.image_encoder.blocks[block]
    tx = torch.from_numpy(x).requires_grad_(True)
    tout = tblock(tx)
    (tout * torch.from_numpy(cot)).sum().backward()

    window = 14 if block == 0 else 0
    module = EncoderBlock(12, window, (16, 16))

    def loss(p, xx):
        out = module.apply({"params": p}, xx)
        return jnp.sum(out * cot), out

    (_, out), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, jnp.asarray(x))
    assert_close(out, tout.detach().numpy(), "block output")

    def close(ours, theirs, what):
        ours, theirs = np.asarray(ours), theirs.detach().numpy()
        scale = max(1.0, float(np.abs(theirs).max()))
        err = float(np.abs(ours - theirs).max())
        assert err < 1e-4 * scale, f"{what}: max abs error {err:.2e} (scale {scale:.2e})"

    close(gx, tx.grad, "d input")
    close(gp["attn"]["qkv"]["bias"], tblock.attn.qkv.bias.grad, "d qkv bias")
    close(gp["attn"]["qkv"]["kernel"], tblock.attn.qkv.weight.grad.T, "d qkv kernel")
    close(gp["attn"]["proj"]["kernel"], tblock.attn.proj.weight.grad.T, "d proj kernel")
    close(gp["attn"]["rel_pos_h"], tblock.attn.rel_pos_h.grad, "d rel_pos_h")
    close(gp["attn"]["rel_pos_w"], tblock.attn.rel_pos_w.grad, "d rel_pos_w")
