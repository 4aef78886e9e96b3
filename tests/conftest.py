"""Shared pytest fixtures: where the real data lives, and JAX settings for reproducible tests."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# The CLIs the tests run (in process and as subprocesses) use mskjax.compile_cache: keep the
# tests' compiled programs out of the user's cache, in one folder for the whole session.
os.environ.setdefault("MSKJAX_CACHE_DIR", tempfile.mkdtemp(prefix="mskjax-test-jax-cache-"))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repository (FracAtlas and the input-quirk files).

    Fails, rather than skips, when it is missing: CI lays it out beside every checkout.
    """
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def _build_official_sam(arch: str, img_size: int, seed: int, randomise: bool = True):
    """The official `segment_anything` Sam with `arch`'s encoder layout (as our `sam_config`) at
    img_size, torch-initialised from `seed`. randomise: also draw the position embeddings and
    relative-position tables (zero at initialisation, which would leave them untested) and the
    norm scales/biases, from `seed + 1000`."""
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from mskjax.models.sam import sam_config

    c = sam_config(arch, img_size)
    torch.manual_seed(seed)
    e = img_size // 16
    ref = Sam(
        image_encoder=ImageEncoderViT(
            depth=c.depth, embed_dim=c.embed_dim, img_size=img_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c.num_heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(c.global_attn_indexes),
            window_size=c.window_size, out_chans=256),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(e, e),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
    ).eval()
    if not randomise:
        return ref
    g = torch.Generator().manual_seed(seed + 1000)
    norm_like = ("norm", "neck.1", "neck.3", "upscaling.1", "downscaling.1", "downscaling.4")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("pos_embed") or "rel_pos" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and any(k in name for k in norm_like):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return ref


@pytest.fixture(scope="session")
def build_official_sam():
    """`build_official_sam(arch, img_size, seed, randomise=True)` -> a random official Sam (torch,
    eval mode) for parity tests; see `_build_official_sam`."""
    return _build_official_sam
