"""Import official Segment Anything checkpoints (sam_vit_{b,l,h}_*.pth) into `mskjax.models.sam`.

Every checkpoint key maps to exactly one Flax leaf and back: `image_encoder.blocks.0.attn.qkv.weight`
-> params/image_encoder/blocks_0/attn/qkv/kernel (transposed), `...point_embeddings.2.weight` ->
params/prompt_encoder/point_embeddings_2/embedding, `prompt_encoder.pe_layer.positional_encoding_
gaussian_matrix` -> buffers/prompt_encoder/pe_layer/positional_encoding_gaussian_matrix.
Layouts: Linear (out, in) -> (in, out); Conv2d (O, I, kh, kw) -> (kh, kw, I, O); ConvTranspose2d
(I, O, kh, kw) -> (kh, kw, I, O); LayerNorm/LayerNorm2d weight -> scale; Embedding weight ->
embedding; pos_embed, rel_pos_* and the gaussian matrix unchanged.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mskjax.models.sam.sam import MASK_THRESHOLD, PIXEL_MEAN, PIXEL_STD, build_sam, sam_config, sam_variable_shapes
from mskjax.weights.mapping import CheckpointMismatch, read_torch_checkpoint


class SamCheckpointError(ValueError):
    """A state dict that does not match the SAM architecture it is loaded into."""


_LIST_ITEM = re.compile(r"^(.+)_(\d+)$")
# Modules holding ConvTranspose2d weights (torch layout (I, O, kh, kw)).
_CONV_TRANSPOSE = ("mask_decoder", "output_upscaling_0"), ("mask_decoder", "output_upscaling_3")


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax path (collection dropped) -> the official state-dict key."""
    *modules, leaf = path
    parts = []
    for m in modules:
        hit = _LIST_ITEM.match(m)
        parts.extend([hit.group(1), hit.group(2)] if hit else [m])
    parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(parts)


def _to_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if value.ndim == 2:  # Linear
        return value.T
    if value.ndim == 4:
        if tuple(path[-3:-1]) in _CONV_TRANSPOSE:
            return value.transpose(2, 3, 0, 1)
        return value.transpose(2, 3, 1, 0)  # Conv2d
    raise SamCheckpointError(f"unexpected {value.ndim}-d kernel at {'/'.join(path)}")


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """Inverse of `_to_flax_layout` on shapes."""
    if path[-1] != "kernel":
        return tuple(shape)
    if len(shape) == 2:
        return (shape[1], shape[0])
    kh, kw, cin, cout = shape
    if tuple(path[-3:-1]) in _CONV_TRANSPOSE:
        return (cin, cout, kh, kw)
    return (cout, cin, kh, kw)


def expected_state_dict_shapes(arch: str, img_size: int = 1024) -> dict[str, tuple[int, ...]]:
    """The official state-dict keys and tensor shapes that `build_sam(arch, img_size)` takes."""
    expected = flatten_dict(sam_variable_shapes(build_sam(arch, img_size)))
    return {_torch_key(path[1:]): _torch_shape(path, tuple(v.shape)) for path, v in expected.items()}


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, possibly bf16/fp16 or on a GPU
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def sam_variables_from_state_dict(state_dict: Mapping[str, Any], arch: str,
                                  img_size: int = 1024) -> dict:
    """Flax variables {"params", "buffers"} for `build_sam(arch, img_size)` from an official
    segment_anything state dict (numpy arrays or torch tensors).

    Strict: raises SamCheckpointError naming every missing key, every unexpected key and every
    shape mismatch. img_size other than 1024 only fits state dicts of models built at that size
    (pos_embed and the global-attention rel_pos tables depend on it).
    """
    model = build_sam(arch, img_size)
    expected = flatten_dict(sam_variable_shapes(model))
    by_key = {_torch_key(path[1:]): path for path in expected}
    if len(by_key) != len(expected):
        raise AssertionError("two Flax leaves map to the same checkpoint key")
    missing = sorted(set(by_key) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(by_key))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    flat = {}
    for key, path in by_key.items():
        if key not in state_dict:
            continue
        raw = _as_numpy(state_dict[key])
        want = tuple(expected[path].shape)
        value = _to_flax_layout(path, raw) if raw.ndim == len(want) else raw
        if value.shape != want:
            problems.append(f"shape mismatch for {key}: checkpoint {tuple(raw.shape)} gives "
                            f"{value.shape} for {'/'.join(path)}, which needs {want}")
            continue
        flat[path] = np.ascontiguousarray(value)
    if problems:
        raise SamCheckpointError(
            f"state dict does not fit SAM {arch} at img_size {img_size}:\n  " + "\n  ".join(problems))
    return unflatten_dict(flat)


def load_sam_checkpoint(path: str | os.PathLike, arch: str, img_size: int = 1024) -> dict:
    """Reads an official .pth and converts it (see `sam_variables_from_state_dict`). The file is
    read without torch (`mskjax.weights.mapping.read_torch_checkpoint`: a restricted unpickler, no
    code from the file runs); only a legacy pre-1.6 file would need torch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    try:
        state_dict = read_torch_checkpoint(path)
    except CheckpointMismatch as e:
        raise SamCheckpointError(f"cannot read SAM checkpoint {path}: {e}") from e
    if not isinstance(state_dict, Mapping):
        raise SamCheckpointError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    try:
        return sam_variables_from_state_dict(state_dict, arch, img_size)
    except SamCheckpointError as e:
        raise SamCheckpointError(f"{path}: {e}") from e


def sam_metadata(arch: str, img_size: int = 1024) -> dict:
    """JSON-able description of a converted SAM: what the predictor functions need besides weights."""
    sam_config(arch, img_size)  # validates arch and img_size
    return {
        "kind": "sam",
        "arch": arch,
        "img_size": int(img_size),
        "pixel_mean": [float(v) for v in PIXEL_MEAN],
        "pixel_std": [float(v) for v in PIXEL_STD],
        "mask_threshold": float(MASK_THRESHOLD),
    }
