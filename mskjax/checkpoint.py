"""The model checkpoint contract: a directory any mskjax tool can use on its own.

    DIR/variables/   Orbax checkpoint of the model's variable collections (float32): classifiers
                     {"params", "batch_stats"}, SAM {"params", "buffers"}, LiteMedSAM {"params",
                     "batch_stats", "buffers"}
    DIR/mskjax.json  metadata: format, version, kind ("classifier" | "sam"), arch, variant
                     settings, num_classes, in_channels, input_size, normalization, source
                     (classifiers); arch, img_size, preprocessing, source (kind "sam": SAM's
                     vit_b/l/h/tiny, or arch "lite_medsam" for LiteMedSAM)

`mskjax.json` is written last, so a directory without it is an unfinished write. Readers build
the model from the metadata alone (`load_model`) and check the stored tree against it, naming
missing/unexpected leaves and shape mismatches.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from mskjax import distributed
from mskjax.models import create
from mskjax.models.sam import build_segmenter, segmenter_variable_shapes
from mskjax.weights.mapping import CheckpointMismatch

FORMAT = "mskjax.checkpoint"
VERSION = 1
METADATA_FILE = "mskjax.json"
VARIABLES_DIR = "variables"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def classifier_metadata(arch: str, num_classes: int, in_channels: int, input_size: int,
                        variant: dict[str, Any], normalization: dict[str, Any],
                        source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metadata of a classifier checkpoint. `variant` holds JSON-able settings for
    `mskjax.models.create` (dtype as a string); `normalization` says what input the model expects:
    {"input_range": [lo, hi], "mean": [...], "std": [...]} applied as (x - mean) / std after scaling
    pixels to input_range (mean 0 / std 1 when the model takes [0, 1] images as they are); with
    "per_image": true each image is first standardised to mean 0, std 1 (`mskjax.classifier.prepare_images`)."""
    variant = {k: (jnp.dtype(v).name if k == "dtype" else v) for k, v in variant.items()}
    return {"kind": "classifier", "arch": arch, "num_classes": int(num_classes),
            "in_channels": int(in_channels), "input_size": int(input_size), "variant": variant,
            "normalization": normalization, "source": source or {}}


def save(directory: str | Path, variables: dict, metadata: dict[str, Any], overwrite: bool = False) -> Path:
    """Writes `variables` and `metadata` to `directory` (see module docstring).

    In a multi-process run every process must call this (Orbax's write is collective); only
    process 0 removes an existing directory and writes the metadata, with barriers between, so
    processes sharing a filesystem never delete each other's files."""
    directory = Path(directory).absolute()
    primary = distributed.is_main_process()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"checkpoint directory already exists: {directory} (pass overwrite=True)")
    distributed.barrier(f"mskjax_save_checked:{directory}")
    if primary:
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
    distributed.barrier(f"mskjax_save_prepared:{directory}")
    tree = jax.tree.map(lambda x: np.asarray(x, dtype=np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x),
                        _plain(variables))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(directory / VARIABLES_DIR, tree)
    ckpt.wait_until_finished()
    if primary:
        meta = {"format": FORMAT, "version": VERSION, **metadata,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        tmp = directory / (METADATA_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, directory / METADATA_FILE)
    distributed.barrier(f"mskjax_save_done:{directory}")
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    path = directory / METADATA_FILE
    if not path.is_file():
        raise CheckpointMismatch(f"{directory} is not a complete mskjax checkpoint: {METADATA_FILE} is missing "
                                 "(an interrupted write, or not a checkpoint made by mskjax)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointMismatch(f"{path} is not valid JSON: {e}") from e
    if meta.get("format") != FORMAT:
        raise CheckpointMismatch(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise CheckpointMismatch(f"{path}: version {meta.get('version')!r}, this mskjax reads version {VERSION}")
    return meta


def restore(directory: str | Path) -> tuple[dict, dict[str, Any]]:
    """(variables as numpy float32, metadata). Raises CheckpointMismatch for a damaged directory."""
    directory = Path(directory).absolute()
    meta = read_metadata(directory)
    vdir = directory / VARIABLES_DIR
    if not vdir.is_dir():
        raise CheckpointMismatch(f"{directory}: {VARIABLES_DIR}/ is missing")
    try:
        variables = ocp.StandardCheckpointer().restore(vdir)
    except Exception as e:  # Orbax/TensorStore raise many types for damaged files
        raise CheckpointMismatch(f"cannot read {vdir}: {type(e).__name__}: {e}") from e
    return jax.tree.map(np.asarray, variables), meta


def check_tree(variables: dict, expected: dict, where: str) -> None:
    """Raises CheckpointMismatch listing leaves missing from / unexpected in `variables`, and shapes."""
    got = traverse_util.flatten_dict(_plain(variables))
    want = traverse_util.flatten_dict(_plain(expected))
    missing = ["/".join(k) for k in want if k not in got]
    unexpected = ["/".join(k) for k in got if k not in want]
    shapes = [f"{'/'.join(k)}: stored {tuple(np.shape(got[k]))} vs model {tuple(want[k].shape)}"
              for k in want if k in got and tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"{where} does not match its model:"]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
            if items:
                lines.append(f"  {label} ({len(items)}): " + "; ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointMismatch("\n".join(lines))


def model_from_metadata(meta: dict[str, Any]):
    """The linen Module a classifier checkpoint's metadata describes."""
    if meta.get("kind") != "classifier":
        raise CheckpointMismatch(f"checkpoint kind {meta.get('kind')!r} is not a classifier")
    return create(meta["arch"], num_classes=meta["num_classes"], **meta.get("variant", {}))


def load_model(directory: str | Path):
    """(model, variables, metadata) of a classifier checkpoint, checked leaf by leaf."""
    variables, meta = restore(directory)
    model = model_from_metadata(meta)
    c = meta.get("in_channels", 3)
    side = int(meta.get("input_size", 64))  # shapes only (eval_shape); a TinyViT takes its own size alone
    expected = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, side, side, c)), train=False))
    check_tree(variables, expected, f"checkpoint {directory}")
    return model, variables, meta


def _metadata_of_kind(directory: Path, kind: str, name: str, example: str) -> dict[str, Any]:
    """The metadata of a checkpoint directory that must hold `kind`; errors name the directory."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{name} checkpoint not found: {directory} (expected a directory with "
                                f"mskjax.json and variables/, e.g. {example})")
    meta = read_metadata(directory)
    if meta.get("kind") != kind:
        raise CheckpointMismatch(f"{directory} holds a {meta.get('kind')!r} checkpoint, not a {name}")
    return meta


def load_classifier(directory: str | os.PathLike):
    """(model, variables, metadata) of a classifier checkpoint directory (WORKDIR/best of a training
    run, or `mskjax.convert` output); errors name the directory."""
    directory = Path(directory)
    _metadata_of_kind(directory, "classifier", "classifier", "WORKDIR/best from mskjax.train")
    return load_model(directory)


def load_sam(directory: str | os.PathLike):
    """(model, variables as numpy, metadata) of an mskjax SAM checkpoint (kind "sam":
    `mskjax.convert --source sam` or `--source litemedsam` output, or WORKDIR/best of a SAM
    training run), checked leaf by leaf against
    `mskjax.models.sam.build_segmenter(metadata["arch"], metadata["img_size"])`: a `Sam` with
    variables {"params", "buffers"}, or for arch "lite_medsam" a `LiteMedSam` with {"params",
    "batch_stats", "buffers"}. Either drives `mskjax.sam`'s functions and the pipeline
    (`mskjax.sam.preprocessing_of(model)` names its input recipe)."""
    directory = Path(directory)
    meta = _metadata_of_kind(directory, "sam", "SAM", "WORKDIR/best from configs/sam_synthetic.py")
    for key in ("arch", "img_size"):
        if key not in meta:
            raise CheckpointMismatch(f"{directory / METADATA_FILE}: SAM metadata lacks {key!r}")
    variables, meta = restore(directory)
    try:
        model = build_segmenter(meta["arch"], int(meta["img_size"]))
    except ValueError as e:  # unknown arch, bad img_size
        raise CheckpointMismatch(f"{directory / METADATA_FILE}: {e}") from e
    check_tree(variables, segmenter_variable_shapes(model), f"SAM checkpoint {directory}")
    return model, variables, meta


def _plain(tree):
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    if isinstance(tree, dict):
        return {k: _plain(v) for k, v in tree.items()}
    return tree
