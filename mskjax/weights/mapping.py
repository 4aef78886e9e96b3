"""Strict mapping of a foreign flat state dict onto a Flax variables tree.

A key map turns each foreign key into a `Target` (collection, module path, leaf) or None for a key
it does not know. Every foreign key must map (or be explicitly ignored), every expected leaf must be
filled, and every shape must match: otherwise `CheckpointMismatch` lists all problems at once.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np
from flax import traverse_util

from mskjax.weights.pth import LegacyFormatError, PthFormatError, read_pth


class CheckpointMismatch(ValueError):
    """A checkpoint does not fit the model: names missing/unexpected keys and shape mismatches."""


@dataclasses.dataclass(frozen=True)
class Target:
    collection: str
    module: tuple[str, ...]
    leaf: str  # "kernel_or_scale" resolves to whichever of kernel/scale the module has

    IGNORE = None  # set below


Target.IGNORE = Target("", (), "")  # a key deliberately dropped (e.g. num_batches_tracked)
TorchKey = str


def to_numpy(value: Any) -> np.ndarray:
    """torch.Tensor / array -> float32 numpy (bfloat16, as torch or ml_dtypes, and float16 upcast)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        value = value.numpy()
    arr = np.asarray(value)
    return arr.astype(np.float32) if arr.dtype.kind == "f" or arr.dtype == ml_dtypes.bfloat16 else arr


def map_state_dict(state_dict: Mapping[str, Any], key_map: Callable, relayout: Callable,
                   expected: Mapping, source: str) -> dict:
    flat_expected = traverse_util.flatten_dict(_unfreeze(expected))
    has = {path[1:-1] for path in flat_expected}

    def tree_has(*module):
        return tuple(module) in has

    out: dict[tuple, np.ndarray] = {}
    unexpected, shape_errors = [], []
    for key, value in state_dict.items():
        target = key_map(key, tree_has)
        if target is Target.IGNORE:
            continue
        if target is None:
            unexpected.append(key)
            continue
        leaf = target.leaf
        if leaf == "kernel_or_scale":
            leaf = "kernel" if (target.collection, *target.module, "kernel") in flat_expected else "scale"
        path = (target.collection, *target.module, leaf)
        if path not in flat_expected:
            unexpected.append(f"{key} (-> {'/'.join(path)}, not in the model)")
            continue
        arr = relayout(to_numpy(value), leaf)
        want = tuple(flat_expected[path].shape)
        if tuple(arr.shape) != want:
            shape_errors.append(f"{key}: checkpoint {tuple(arr.shape)} vs model {'/'.join(path)} {want}")
            continue
        out[path] = arr
    missing = ["/".join(p) for p in flat_expected if p not in out]
    if unexpected or missing or shape_errors:
        lines = [f"{source} checkpoint does not match the model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
        if shape_errors:
            lines.append(f"  shape mismatches ({len(shape_errors)}): " + "; ".join(shape_errors[:20]))
        raise CheckpointMismatch("\n".join(lines))
    return traverse_util.unflatten_dict(out)


def _unfreeze(tree):
    if hasattr(tree, "unfreeze"):
        return tree.unfreeze()
    return dict(tree)


def read_torch_checkpoint(path: str | Path) -> Any:
    """What a torch.save file holds, tensors as NumPy arrays, without torch: `mskjax.weights.pth`
    (a restricted unpickler: no code from the file runs). Only a file in torch's legacy (pre-1.6)
    format, which that reader does not parse, goes to `torch.load(weights_only=True)`, when torch
    is installed. Raises FileNotFoundError, or CheckpointMismatch naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return read_pth(path)
    except LegacyFormatError as e:
        try:
            import torch  # optional: only torch reads its legacy (pre-1.6) format
        except ImportError:
            raise CheckpointMismatch(f"{e} (or install torch, which reads it)") from e
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e2:  # torch raises several types for truncated / foreign files
            raise CheckpointMismatch(f"cannot read {path} as a PyTorch checkpoint: {type(e2).__name__}: {e2}") from e2
    except PthFormatError as e:  # not a torch.save archive, damaged, or unsafe (could run code)
        raise CheckpointMismatch(f"cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from e


def read_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A `.pth` file -> flat {key: float32 numpy}. Accepts a bare state dict or one wrapped under
    "state_dict" / "model". Read without torch (`read_torch_checkpoint`: no code from the file
    runs); only a legacy pre-1.6 file needs torch."""
    path = Path(path)
    obj = read_torch_checkpoint(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise CheckpointMismatch(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: to_numpy(v) for k, v in obj.items()}
