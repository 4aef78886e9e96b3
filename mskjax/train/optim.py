"""Optimizers for training: AdamW or SGD-momentum, warm-up + cosine schedule, no weight decay on
norms and biases, gradient clipping, and an optional EMA of the parameters.
"""
from __future__ import annotations

from typing import Any

import jax
import optax
from flax import traverse_util


def decay_mask(params) -> Any:
    """True for leaves that get weight decay: convolution and dense kernels (ndim > 1). Norm scales
    and biases (ndim 1) get none, nor do the placeholders optax.multi_transform puts in place of
    parameters another transform owns (no ndim)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: getattr(v, "ndim", 0) > 1 for k, v in flat.items()})


def schedule(base_lr: float, total_steps: int, warmup_steps: int, end_fraction: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 to `base_lr` over `warmup_steps`, then cosine to end_fraction x base_lr."""
    warmup_steps = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=base_lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=base_lr * end_fraction)


def make_optimizer(name: str, lr: optax.Schedule, weight_decay: float, momentum: float = 0.9,
                   grad_clip: float = 0.0, mask=decay_mask) -> optax.GradientTransformation:
    """name "adamw" or "sgd" (Nesterov-free momentum, decoupled L2 added to the gradient).
    mask: which leaves get weight decay (a pytree of bools or a function of the params)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    if name == "adamw":
        parts.append(optax.adamw(lr, weight_decay=weight_decay, mask=mask))
    elif name == "sgd":
        if weight_decay:
            parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
        parts.append(optax.sgd(lr, momentum=momentum))
    else:
        raise ValueError(f"unknown optimizer {name!r}: expected 'adamw' or 'sgd'")
    return optax.chain(*parts)


def ema_update(ema, params, decay: float):
    """Exponential moving average of parameters: ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


def apply_gradients(tx, grads, opt_state, params):
    """One optimizer step: (new params, new opt_state, the gradients' global L2 norm as a float32
    scalar, for the log). A `tx` with its own `apply_gradients(grads, opt_state, params)` method
    takes the step itself (tools/compile_time.py's ravelled optimizer does)."""
    own = getattr(tx, "apply_gradients", None)
    if own is not None:
        return own(grads, opt_state, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)
