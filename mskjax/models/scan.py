"""Variables between the unscanned layout and the `scan_blocks` layout of ResNet and EfficientNet.

A model built with `scan_blocks=True` runs each stage's blocks after its first as one `nn.scan`;
its variables hold those blocks stacked: where the unscanned model has

    params["stage2_block1"] = {...leaf (shape S)...}, params["stage2_block2"] = {...}

the scanned one has params["stage2_blocks"] = {...leaf (2, *S)...} (block 1 first). Every other
entry is the same. `model.scan_groups()` says which blocks are stacked under which name
({"stage2_blocks": ("stage2_block1", "stage2_block2"), ...}); the functions below take that
mapping, so they are pure and do not depend on a model instance:

    groups = model.scan_groups()
    scanned = to_scanned(variables, groups)        # {"params": ..., "batch_stats": ...}
    assert tree_equal(to_unscanned(scanned, groups), variables)

Both directions are exact (stacking and indexing copy values). They work on numpy arrays (the
result is numpy) and on jax arrays, also under `jax.jit` (the result is jax). Checkpoints
(`mskjax.checkpoint`) and weight imports always use the unscanned layout.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Groups = Mapping[str, Sequence[str]]


def _stack(leaves: Sequence[Any]) -> Any:
    if all(isinstance(a, np.ndarray) for a in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _is_collections(tree: Mapping[str, Any], groups: Groups) -> bool:
    """True when `tree` maps collection names ("params", "batch_stats", ...) to module trees,
    False when it is one module tree (its keys include a group's or a block's name)."""
    names = set(groups) | {b for blocks in groups.values() for b in blocks}
    return not (set(tree) & names)


def stack_blocks(tree: Mapping[str, Any], groups: Groups) -> dict:
    """One collection's module tree (e.g. variables["params"]) in the unscanned layout -> the
    scanned layout: for each group, the blocks' subtrees (same structure, leaves of shape S) are
    replaced by one subtree under the group's name with leaves (len(blocks), *S), same dtype.
    A collection that holds none of a group's blocks (e.g. batch_stats of a model without
    BatchNorm) leaves that group out; one that holds only some of them is an error."""
    out = dict(tree)
    for group, blocks in groups.items():
        present = [b for b in blocks if b in out]
        if not present:
            continue
        if len(present) != len(blocks):
            raise ValueError(f"{group}: blocks {sorted(set(blocks) - set(present))} are missing "
                             f"(have {present})")
        if group in out:
            raise ValueError(f"{group}: both the stacked entry and its blocks are present")
        subtrees = [out.pop(b) for b in blocks]
        structure = jax.tree.structure(subtrees[0])
        for b, t in zip(blocks, subtrees):
            if jax.tree.structure(t) != structure:
                raise ValueError(f"{group}: {b} has another structure than {blocks[0]}")
        out[group] = jax.tree.map(lambda *leaves: _stack(leaves), *subtrees)
    return out


def unstack_blocks(tree: Mapping[str, Any], groups: Groups) -> dict:
    """The inverse of `stack_blocks`: each group's stacked subtree (leaves (n, *S)) becomes its n
    blocks' subtrees (leaves S), block i from index i. The leading axis must equal the number of
    blocks in the group."""
    out = dict(tree)
    for group, blocks in groups.items():
        if group not in out:
            continue
        stacked = out.pop(group)
        for leaf in jax.tree.leaves(stacked):
            if leaf.shape[:1] != (len(blocks),):
                raise ValueError(f"{group}: leading axis {leaf.shape[:1]} is not the {len(blocks)} blocks")
        for i, b in enumerate(blocks):
            if b in out:
                raise ValueError(f"{group}: both the stacked entry and block {b} are present")
            out[b] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return out


def to_scanned(variables: Mapping[str, Any], groups: Groups) -> dict:
    """Variables ({collection: module tree}, e.g. {"params", "batch_stats"}) or one module tree
    (e.g. params alone), unscanned -> scanned layout (`stack_blocks` on each collection)."""
    if _is_collections(variables, groups):
        return {k: stack_blocks(v, groups) if isinstance(v, Mapping) else v for k, v in variables.items()}
    return stack_blocks(variables, groups)


def to_unscanned(variables: Mapping[str, Any], groups: Groups) -> dict:
    """The inverse of `to_scanned` (`unstack_blocks` on each collection)."""
    if _is_collections(variables, groups):
        return {k: unstack_blocks(v, groups) if isinstance(v, Mapping) else v for k, v in variables.items()}
    return unstack_blocks(variables, groups)


def groups_of(model) -> dict[str, tuple[str, ...]]:
    """`model.scan_groups()` for a model built with `scan_blocks=True`, {} for any other model
    (whose variables need no conversion)."""
    if getattr(model, "scan_blocks", False):
        return model.scan_groups()
    return {}
