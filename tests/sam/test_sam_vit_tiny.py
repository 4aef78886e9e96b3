"""vit_tiny: builds at 256 px (and other sizes), runs under jit, trains (gradients), pads prompts."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mskjax import sam as samfn
from mskjax import passes
from mskjax.passes import default_images_per_pass
from mskjax.models.sam import build_sam, init_sam_variables, sam_config, sam_variable_shapes

jit_embed = jax.jit(samfn.embed, static_argnums=0)
jit_decode = jax.jit(samfn.decode, static_argnums=0, static_argnames=("multimask", "return_masks"))


@pytest.fixture(scope="module")
def tiny():
    model = build_sam("vit_tiny", 256)
    variables = init_sam_variables(model, jax.random.key(0))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 256, 256, 3)), jnp.float32)
    return model, variables, images


def test_config():
    c = sam_config("vit_tiny", 256)
    assert (c.embed_dim, c.depth, c.num_heads, c.window_size) == (192, 6, 3, 8)
    assert c.embedding_size == 16 and c.low_res_size == 64
    with pytest.raises(ValueError, match="unknown SAM arch"):
        sam_config("vit_s")


def test_embed_and_decode_shapes_under_jit(tiny):
    model, variables, images = tiny
    assert set(variables) == {"params", "buffers"}
    emb = jit_embed(model, variables, images)
    assert emb.shape == (2, 16, 16, 256) and emb.dtype == jnp.float32
    assert bool(jnp.isfinite(emb).all())
    boxes = jnp.asarray([[[10, 10, 100, 120], [0, 0, 255, 255], [0, 0, 0, 0]]] * 2, jnp.float32)
    valid = jnp.asarray([[True, True, False], [True, False, False]])
    out = jit_decode(model, variables, emb, boxes=boxes, prompt_valid=valid, return_masks=True)
    assert out["low_res_logits"].shape == (2, 3, 3, 64, 64)
    assert out["iou_predictions"].shape == (2, 3, 3)
    assert out["masks"].shape == (2, 3, 3, 256, 256) and out["masks"].dtype == jnp.bool_
    assert not bool(out["masks"][1, 1:].any())  # invalid prompts give empty masks
    single = jit_decode(model, variables, emb, boxes=boxes, multimask=False)
    assert single["low_res_logits"].shape == (2, 3, 1, 64, 64)


@pytest.mark.parametrize("per_pass", [1, 2])
def test_embed_in_passes_equals_the_whole_batch(tiny, per_pass):
    """`embed` mapping the encoder over chunks (1 image: the CPU default; 2 of 3: a padded last
    chunk) gives each image the embedding the whole batch gives it."""
    model, variables, images = tiny
    three = jnp.concatenate([images, images[:1] * 0.5], axis=0)
    whole = jax.jit(lambda v, x: samfn.embed(model, v, x, images_per_pass=0))(variables, three)
    parts = jax.jit(lambda v, x: samfn.embed(model, v, x, images_per_pass=per_pass))(variables, three)
    assert parts.shape == whole.shape == (3, 16, 16, 256)
    np.testing.assert_allclose(np.asarray(parts), np.asarray(whole), rtol=0, atol=1e-5)
    assert default_images_per_pass() == (1 if jax.device_count() == 1 else 0)  # CPU tests


def test_encoder_compiler_options(tiny, monkeypatch):
    """On CPU the encoder options are given exactly when this jaxlib compiles with them (an unknown
    option would be an error at every pipeline's first call), and an encoder compiled with them
    gives the default compile's embeddings to float rounding."""
    model, variables, images = tiny
    try:
        jax.jit(lambda x: x * 2).lower(images).compile(dict(passes.CPU_ENCODER_OPTIONS))
        known = True
    except Exception:  # noqa: BLE001 - XLA's own error type for an unknown option
        known = False
    opts = passes.encoder_compiler_options()
    assert opts == (dict(passes.CPU_ENCODER_OPTIONS) if known else {})
    with_opts = jax.jit(lambda v, x: samfn.embed(model, v, x), compiler_options=opts or None)(variables, images)
    default = jax.jit(lambda v, x: samfn.embed(model, v, x))(variables, images)
    scale = float(jnp.abs(default).max())
    np.testing.assert_allclose(np.asarray(with_opts), np.asarray(default), rtol=0, atol=1e-5 * max(1.0, scale))
    monkeypatch.setattr(passes, "_cpu_options_known", lambda options: False)
    assert passes.encoder_compiler_options() == {}


def test_prompts_are_independent_of_padding(tiny):
    """A prompt's output does not depend on how many other (padded) prompts share the batch."""
    model, variables, images = tiny
    emb = jit_embed(model, variables, images)
    rng = np.random.default_rng(1)
    pts = jnp.asarray(rng.uniform(0, 256, size=(2, 4, 2, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(-1, 2, size=(2, 4, 2)), jnp.int32)
    full = jit_decode(model, variables, emb, points=pts, point_labels=labels)
    first = jit_decode(model, variables, emb, points=pts[:, :1], point_labels=labels[:, :1])
    np.testing.assert_allclose(np.asarray(full["low_res_logits"][:, :1]),
                               np.asarray(first["low_res_logits"]), atol=1e-4, rtol=0)
    # Each image's prompts see that image's embedding.
    assert float(jnp.abs(full["low_res_logits"][0] - full["low_res_logits"][1]).max()) > 1e-3


def test_other_input_size():
    """img_size sets the token grid, the prompt frame and the low-res size (shapes only: no compile)."""
    model = build_sam("vit_tiny", 512)
    variables = sam_variable_shapes(model)
    assert variables["params"]["image_encoder"]["pos_embed"].shape == (1, 32, 32, 192)
    emb = jax.eval_shape(partial(samfn.embed, model), variables, jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))
    assert emb.shape == (1, 32, 32, 256)
    out = jax.eval_shape(partial(samfn.decode, model, mask_input=jnp.zeros((1, 2, 128, 128))), variables, emb)
    assert out["low_res_logits"].shape == (1, 2, 3, 128, 128)


def test_init_scheme(tiny):
    _, variables, _ = tiny
    enc = variables["params"]["image_encoder"]
    assert float(jnp.abs(enc["pos_embed"]).max()) == 0.0
    assert float(jnp.abs(enc["blocks_0"]["attn"]["rel_pos_h"]).max()) == 0.0
    assert bool((enc["blocks_0"]["norm1"]["scale"] == 1).all())
    assert bool((enc["blocks_0"]["mlp"]["lin1"]["bias"] == 0).all())
    kernel = enc["blocks_0"]["mlp"]["lin2"]["kernel"]  # fan_in 768
    assert abs(float(jnp.std(kernel)) * np.sqrt(768) - 1.0) < 0.05
    a, b = enc["blocks_0"]["attn"]["qkv"]["kernel"], enc["blocks_1"]["attn"]["qkv"]["kernel"]
    assert float(jnp.abs(a - b).max()) > 0.1  # distinct draws per leaf


def test_gradients_reach_decoder_and_encoder(tiny):
    """Fine-tuning path: a Dice-like loss differentiates w.r.t. every trainable tensor."""
    model, variables, images = tiny
    boxes = jnp.asarray([[[30, 40, 150, 200]], [[60, 10, 250, 90]]], jnp.float32)
    target = jnp.zeros((2, 1, 1, 64, 64)).at[..., 10:40, 10:40].set(1.0)

    def loss(params):
        v = {**variables, "params": params}
        out = samfn.decode(model, v, samfn.embed(model, v, images), boxes=boxes,
                           multimask=False)
        prob = jax.nn.sigmoid(out["low_res_logits"])
        return 1 - 2 * (prob * target).sum() / (prob.sum() + target.sum())

    grads = jax.jit(jax.grad(loss))(variables["params"])
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert all(bool(jnp.isfinite(g).all()) for _, g in leaves)
    assert float(jnp.abs(grads["mask_decoder"]["output_upscaling_3"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["image_encoder"]["patch_embed"]["proj"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["prompt_encoder"]["point_embeddings_2"]["embedding"]).sum()) > 0
    assert "buffers" not in grads and "pe_layer" not in grads["prompt_encoder"]


def test_bad_inputs(tiny):
    model, variables, images = tiny
    emb = jit_embed(model, variables, images)
    with pytest.raises(ValueError, match="at least one prompt"):
        samfn.decode(model, variables, emb)
    with pytest.raises(ValueError, match="boxes must start with"):
        samfn.decode(model, variables, emb, boxes=jnp.zeros((3, 1, 4)))
    with pytest.raises(ValueError, match="go together"):
        samfn.decode(model, variables, emb, points=jnp.zeros((2, 1, 1, 2)))
    with pytest.raises(ValueError, match="mask input must be"):
        samfn.decode(model, variables, emb, mask_input=jnp.zeros((2, 1, 32, 32)))
    with pytest.raises(ValueError, match="expects"):
        samfn.embed(model, variables, jnp.zeros((1, 224, 224, 3)))
    with pytest.raises(ValueError, match="within img_size"):
        samfn.postprocess(jnp.zeros((64, 64)), (300, 10), (30, 1), 256)
