"""Official SAM checkpoint import: key mapping for every arch, strict errors, .pth loading, metadata."""
from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from mskjax.weights.sam import (
    SamCheckpointError,
    expected_state_dict_shapes,
    load_sam_checkpoint,
    sam_metadata,
    sam_variables_from_state_dict,
)


@pytest.mark.parametrize("arch", ["vit_b", "vit_l", "vit_h"])
def test_keys_and_shapes_match_official_builders(arch):
    """Every key of the official 1024 px model (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        ref = sam_model_registry[arch]()
    official = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert expected_state_dict_shapes(arch) == official


def tiny_official_state_dict(seed=0):
    torch.manual_seed(seed)
    ref = Sam(
        image_encoder=ImageEncoderViT(
            depth=6, embed_dim=192, img_size=256, mlp_ratio=4, num_heads=3, patch_size=16,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=[2, 5], window_size=8, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(16, 16),
                                     input_image_size=(256, 256), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3, transformer_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)))
    return ref.state_dict()


@pytest.fixture(scope="module")
def tiny_sd():
    return tiny_official_state_dict()


def test_values_land_where_expected(tiny_sd):
    v = sam_variables_from_state_dict(tiny_sd, "vit_tiny", 256)
    p = v["params"]
    np.testing.assert_array_equal(p["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"],
                                  tiny_sd["image_encoder.blocks.0.attn.qkv.weight"].numpy().T)
    np.testing.assert_array_equal(p["image_encoder"]["patch_embed"]["proj"]["kernel"],
                                  tiny_sd["image_encoder.patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["mask_decoder"]["output_upscaling_0"]["kernel"],
                                  tiny_sd["mask_decoder.output_upscaling.0.weight"].numpy().transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(p["prompt_encoder"]["point_embeddings_2"]["embedding"],
                                  tiny_sd["prompt_encoder.point_embeddings.2.weight"].numpy())
    np.testing.assert_array_equal(
        v["buffers"]["prompt_encoder"]["pe_layer"]["positional_encoding_gaussian_matrix"],
        tiny_sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].numpy())
    # Numpy input and half-precision tensors are accepted too.
    as_np = sam_variables_from_state_dict({k: t.numpy() for k, t in tiny_sd.items()}, "vit_tiny", 256)
    assert as_np["params"]["mask_decoder"]["iou_token"]["embedding"].shape == (1, 256)
    half = sam_variables_from_state_dict({k: t.to(torch.bfloat16) for k, t in tiny_sd.items()},
                                         "vit_tiny", 256)
    assert half["params"]["image_encoder"]["pos_embed"].dtype == np.float32


def test_strict_errors_name_the_keys(tiny_sd):
    sd = dict(tiny_sd)
    del sd["mask_decoder.iou_token.weight"]
    sd["image_encoder.blocks.9.attn.qkv.weight"] = torch.zeros(3)
    sd["image_encoder.pos_embed"] = torch.zeros(1, 64, 64, 192)
    with pytest.raises(SamCheckpointError) as err:
        sam_variables_from_state_dict(sd, "vit_tiny", 256)
    msg = str(err.value)
    assert "missing keys (1): mask_decoder.iou_token.weight" in msg
    assert "unexpected keys (1): image_encoder.blocks.9.attn.qkv.weight" in msg
    assert "shape mismatch for image_encoder.pos_embed: checkpoint (1, 64, 64, 192)" in msg
    # A vit_tiny state dict is not a vit_b one.
    with pytest.raises(SamCheckpointError, match="missing keys"):
        sam_variables_from_state_dict(tiny_sd, "vit_b", 256)
    with pytest.raises(ValueError, match="unknown SAM arch"):
        sam_variables_from_state_dict(tiny_sd, "vit_x")


def test_load_checkpoint_roundtrip(tiny_sd, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sd, path)
    v = load_sam_checkpoint(path, "vit_tiny", 256)
    direct = sam_variables_from_state_dict(tiny_sd, "vit_tiny", 256)
    np.testing.assert_array_equal(v["params"]["image_encoder"]["neck_2"]["kernel"],
                                  direct["params"]["image_encoder"]["neck_2"]["kernel"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_sam_checkpoint(tmp_path / "nope.pth", "vit_tiny", 256)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SamCheckpointError, match="bad.pth"):
        load_sam_checkpoint(bad, "vit_tiny", 256)


def test_metadata():
    meta = sam_metadata("vit_b", 1024)
    assert json.loads(json.dumps(meta)) == meta
    assert meta == {"kind": "sam", "arch": "vit_b", "img_size": 1024,
                    "pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375],
                    "mask_threshold": 0.0}
    with pytest.raises(ValueError, match="multiple of 16"):
        sam_metadata("vit_tiny", 250)
