"""Class activation maps as pure JAX functions: (model, variables, images, targets) -> maps.

Every method takes a `SplitModel` classifier (see `mskjax.models.split`), its `variables`, a batch of
model-ready images (B, H, W, 3) float (normalised as the checkpoint expects) and returns maps
(B, H, W) float32 in [0, 1] in the **model-input frame** (move them to the original image with
`mskjax.geometry.map_to_original`). All functions are traceable: wrap them in `jax.jit` with the model closed over
(or use `make_cam_fn`). Nothing loops over the batch in Python; gradients come from `jax.vjp` of the
model's head with respect to the chosen stage's activation (no hooks).

Semantics follow pytorch-grad-cam 1.5 (`pytorch_grad_cam`), which the parity tests compare against:

* activations A and gradients G = d score / d A at stage `layer` (default: the last feature map);
  per image, the score is the target logit; the batch's scores are summed before differentiating,
  which gives per-image gradients because images do not interact in eval mode;
* a raw map per method, at the stage's resolution (h, w):
  - `cam` (Zhou et al. 2016): sum_c W[c, t] A_c with W the head's Dense kernel (last stage only);
  - `grad_cam`: sum_c mean_hw(G_c) A_c;
  - `grad_cam_plus_plus`: sum_c w_c A_c, w_c = sum_hw relu(G) a, a = G^2 / (2 G^2 + sum_hw(A) G^3
    + 1e-6), a = 0 where G == 0 (pytorch-grad-cam's form: raw-logit gradients, not exp(score));
  - `hires_cam`: sum_c G_c A_c;  `layer_cam`: sum_c relu(G_c) A_c;
  - `xgrad_cam`: sum_c w_c A_c, w_c = sum_hw(G_c A_c) / (sum_hw(A_c) + 1e-7);
  - `eigen_cam`: projection of A on its first principal component (no gradients, no target);
  - `score_cam`: sum_c softmax_c(s_c) A_c, s_c = the target logit of the image multiplied by
    channel c's activation, upsampled (bilinear, align_corners=True) and min-max scaled
    (epsilon 1e-8);
* `eigen_smooth=True` replaces the channel sum by the first-principal-component projection of the
  weighted activations (`get_2d_projection`: per image, (h*w, C) rows centred per channel, SVD,
  project on the top right-singular vector);
* post-processing (`BaseCAM.forward` + `scale_cam_image`): ReLU, per-image min-max scaling
  (m - min) / (max(m - min) + 1e-7), bilinear resize to the input size (cv2.INTER_LINEAR:
  half-pixel centres, edge clamp, no antialiasing — done here with exact interpolation matrices;
  `jax.image.resize(..., "bilinear")` agrees with cv2 when upsampling but antialiases when
  shrinking, so it is not used),
  then ReLU and min-max scaling once more (pytorch-grad-cam's layer aggregation rescales the
  resized map, whose minimum is usually no longer 0);
* `aug_smooth=True` (pytorch-grad-cam's default test-time augmentation, `ttach`): the map is the
  mean of 6 maps, over horizontal flip {no, yes} x **intensity** factor {0.9, 1.0, 1.1} applied to
  the input tensor (ttach `Multiply`: the pixel values are multiplied, the image is not rescaled);
  flipped maps are flipped back; the mean is not re-normalised. The 6 variants run as one batch
  of 6B images. With `targets=None` each variant uses its own argmax, as the reference does.

Targets. `targets` is an int array (B,) of class indices (or None: the argmax of each image's
logits). This is pytorch-grad-cam's `ClassifierOutputTarget(c)`: the score is logit c (pre-softmax).
For a binary classifier with a single logit (num_classes=1) the only valid index is 0 and "class 0"
**is the abnormal logit itself** (argmax is always 0): the score is the logit z with
P(abnormal) = sigmoid(z). That equals `ClassifierOutputTarget(0)` and
`BinaryClassifierOutputTarget(1)` (which returns +z for category 1); `BinaryClassifierOutputTarget(0)`
(the *normal* class) returns -z — pass `score_fn=lambda logits, t: -logits[:, 0]` for that.
`score_fn(logits (B, K), targets (B,)) -> (B,)` replaces the target-logit score in general.

EigenCAM sign. An SVD's singular vectors have arbitrary sign, so the principal-component
projection p (which sums to 0 because the rows are centred) is flipped here, per image, so that
its inner product with the *uncentred* channel sum of the projected activations (for EigenCAM
sum_c A_c; for eigen_smooth the method's un-smoothed raw map) is >= 0: the component points where
the (weighted) activation is high. pytorch-grad-cam leaves the sign to LAPACK; the parity test
applies the same rule to its projection before comparing.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

GRADIENT_METHODS = ("grad_cam", "grad_cam_plus_plus", "hires_cam", "xgrad_cam", "layer_cam")
METHODS = ("cam",) + GRADIENT_METHODS + ("eigen_cam", "score_cam")

# pytorch-grad-cam's constants (read from its source, 1.5.x).
NORM_EPS = 1e-7          # scale_cam_image: img / (1e-7 + max)
GRADCAM_PP_EPS = 1e-6    # GradCAMPlusPlus.get_cam_weights
XGRAD_EPS = 1e-7         # XGradCAM.get_cam_weights
SCORECAM_EPS = 1e-8      # ScoreCAM.get_cam_weights, per-channel mask scaling
AUG_FLIPS = (False, True)             # ttach.HorizontalFlip
AUG_FACTORS = (0.9, 1.0, 1.1)         # ttach.Multiply(factors=[0.9, 1, 1.1])

_HI = jax.lax.Precision.HIGHEST


class CamError(ValueError):
    """Bad CAM request: unknown method or layer, targets of the wrong shape or range."""


# --------------------------------------------------------------------------------------------
# Resizing and normalisation
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def interpolation_matrix(out_size: int, in_size: int, align_corners: bool = False) -> np.ndarray:
    """(out_size, in_size) float32 weights of 1-D linear interpolation, no antialiasing.

    align_corners=False: output pixel o samples input coordinate (o + 0.5) * in / out - 0.5,
    clamped to [0, in - 1] (cv2.INTER_LINEAR, torch `interpolate(align_corners=False)`).
    align_corners=True: o * (in - 1) / (out - 1) (torch `UpsamplingBilinear2d`).
    """
    if out_size < 1 or in_size < 1:
        raise CamError(f"interpolation sizes must be positive, got out={out_size}, in={in_size}")
    o = np.arange(out_size, dtype=np.float64)
    if align_corners:
        src = o * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros_like(o)
    else:
        src = (o + 0.5) * (in_size / out_size) - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    i0 = np.floor(src).astype(np.int64)
    frac = src - i0
    i1 = np.minimum(i0 + 1, in_size - 1)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), i0), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), i1), frac)
    return m.astype(np.float32)


def resize_maps(maps: Array, out_hw: tuple[int, int], align_corners: bool = False) -> jax.Array:
    """Bilinear resize of (B, h, w) maps to (B, H, W) (or (B, h, w, C) to (B, H, W, C)), float32.

    Equals cv2.resize(..., INTER_LINEAR) on float32 maps for align_corners=False, up or down
    (no antialiasing when shrinking)."""
    m = jnp.asarray(maps, jnp.float32)
    ry = jnp.asarray(interpolation_matrix(int(out_hw[0]), m.shape[1], align_corners))
    rx = jnp.asarray(interpolation_matrix(int(out_hw[1]), m.shape[2], align_corners))
    if m.ndim == 3:
        return jnp.einsum("Hh,bhw,Ww->bHW", ry, m, rx, precision=_HI)
    if m.ndim == 4:
        return jnp.einsum("Hh,bhwc,Ww->bHWc", ry, m, rx, precision=_HI)
    raise CamError(f"maps must be (B, h, w) or (B, h, w, C); got shape {m.shape}")


def minmax_scale(maps: Array, eps: float = NORM_EPS) -> jax.Array:
    """Per-image (m - min) / (max(m - min) + eps) over the last two axes, as scale_cam_image."""
    m = jnp.asarray(maps, jnp.float32)
    m = m - jnp.min(m, axis=(-2, -1), keepdims=True)
    return m / (eps + jnp.max(m, axis=(-2, -1), keepdims=True))


def postprocess(raw: Array, out_hw: tuple[int, int]) -> jax.Array:
    """Raw maps (B, h, w) at the stage's resolution -> (B, H, W) in [0, 1], pytorch-grad-cam's way:
    ReLU, min-max, bilinear resize to out_hw, ReLU, min-max."""
    m = minmax_scale(jnp.maximum(raw, 0.0))
    m = resize_maps(m, out_hw)
    return minmax_scale(jnp.maximum(m, 0.0))


def first_component_projection(x: Array, anchor: Array | None = None) -> jax.Array:
    """get_2d_projection: (B, h, w, C) -> (B, h, w) projection on the first principal component.

    Per image: NaN -> 0, rows (h*w, C) centred per channel, SVD, rows @ v1 (top right-singular
    vector). Sign: flipped so that <projection, anchor> >= 0, anchor (B, h, w) defaulting to the
    uncentred channel sum of x (see the module docstring).
    """
    x = jnp.asarray(x, jnp.float32)
    x = jnp.where(jnp.isnan(x), 0.0, x)
    b, h, w, c = x.shape
    rows = x.reshape(b, h * w, c)
    rows = rows - rows.mean(axis=1, keepdims=True)
    _, _, vt = jnp.linalg.svd(rows, full_matrices=False)
    proj = jnp.einsum("bnc,bc->bn", rows, vt[:, 0, :], precision=_HI)
    if anchor is None:
        anchor = x.sum(axis=-1)
    dot = jnp.sum(proj * jnp.asarray(anchor, jnp.float32).reshape(b, h * w), axis=1, keepdims=True)
    proj = jnp.where(dot < 0, -proj, proj)
    return proj.reshape(b, h, w)


# --------------------------------------------------------------------------------------------
# Targets, activations, gradients
# --------------------------------------------------------------------------------------------

def _check_targets(targets, batch: int, num_classes: int | None):
    """Concrete targets: shape (B,) integers in [0, num_classes). Traced ones pass unchecked."""
    if targets is None or isinstance(targets, jax.core.Tracer):
        return
    t = np.asarray(targets)
    if t.shape != (batch,):
        raise CamError(f"targets must have shape ({batch},) (one class index per image); got {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise CamError(f"targets must be integer class indices; got dtype {t.dtype}")
    if num_classes is not None and t.size and (t.min() < 0 or t.max() >= num_classes):
        hint = " (a single-logit binary head has only class 0: the abnormal logit)" if num_classes == 1 else ""
        raise CamError(f"targets must lie in [0, {num_classes}); got {t.tolist()}{hint}")


def _target_scores(logits: jax.Array, targets, score_fn: Callable | None):
    """(B,) scores and the (B,) int32 targets used (argmax when targets is None)."""
    t = jnp.argmax(logits, axis=-1).astype(jnp.int32) if targets is None else jnp.asarray(targets, jnp.int32)
    if score_fn is not None:
        return jnp.asarray(score_fn(logits, t), jnp.float32), t
    return jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0].astype(jnp.float32), t


def _check_images(images):
    if getattr(images, "ndim", None) != 4 or images.shape[-1] != 3:
        raise CamError(f"images must be (B, H, W, 3) model inputs; got shape {getattr(images, 'shape', None)}")


def activations_and_gradients(model, variables, images: Array, targets: Array | None = None,
                              layer: str | None = None, *, with_gradients: bool = True,
                              score_fn: Callable | None = None):
    """Activation of stage `layer` and the gradient of the target scores with respect to it.

    Args:
      model: a SplitModel (e.g. `mskjax.models.create("resnet50", num_classes=5)`).
      variables: its variables ({"params", "batch_stats"}); eval mode is used.
      images: (B, H, W, 3) float model inputs.
      targets: (B,) int class indices, or None for each image's argmax.
      layer: a name in `model.segments` (None / "features": the last).
      with_gradients: False skips the backward pass (grads returned as None).
      score_fn: optional (logits (B, K), targets (B,)) -> (B,) score to differentiate.

    Returns:
      (acts (B, h, w, C) float32, grads (B, h, w, C) float32 or None, logits (B, K) float32,
      targets (B,) int32 actually used).
    """
    _check_images(images)
    _check_targets(targets, images.shape[0], getattr(model, "num_classes", None))
    acts = model.apply(variables, images, method="features", layer=layer)

    def head_score(h):
        logits = model.apply(variables, h, method="head", layer=layer).astype(jnp.float32)
        scores, t = _target_scores(logits, targets, score_fn)
        return jnp.sum(scores), (logits, t)

    if with_gradients:
        (_, (logits, t)), grads = jax.value_and_grad(head_score, has_aux=True)(acts)
        grads = grads.astype(jnp.float32)
    else:
        _, (logits, t) = head_score(acts)
        grads = None
    return acts.astype(jnp.float32), grads, logits, t


def head_dense_kernel(model, variables, channels: int) -> jax.Array:
    """The classifier's Dense kernel (C, num_classes) that follows global average pooling
    (ResNet "fc", EfficientNet "classifier"). Raises CamError when none fits `channels`."""
    params = variables["params"]
    for name in ("fc", "classifier", "head"):
        p = params.get(name) if hasattr(params, "get") else None
        if p is not None and "kernel" in p and p["kernel"].ndim == 2 and p["kernel"].shape[0] == channels:
            return jnp.asarray(p["kernel"], jnp.float32)
    raise CamError(f"CAM needs a global-average-pool + Dense head over {channels} channels; no Dense "
                   f"kernel of shape ({channels}, K) named fc/classifier/head in params {list(params)}")


def _last_layer(model) -> str:
    return list(model.segments)[-1]


# --------------------------------------------------------------------------------------------
# Raw maps per method
# --------------------------------------------------------------------------------------------

def _channel_weights(method: str, acts, grads):
    """(B, C) channel weights for the weight-based gradient methods, or None for elementwise ones."""
    if method == "grad_cam":
        return grads.mean(axis=(1, 2))
    if method == "grad_cam_plus_plus":
        g2 = grads ** 2
        g3 = g2 * grads
        sum_a = acts.sum(axis=(1, 2), keepdims=True)
        a = g2 / (2 * g2 + sum_a * g3 + GRADCAM_PP_EPS)
        a = jnp.where(grads != 0, a, 0.0)
        return (jnp.maximum(grads, 0.0) * a).sum(axis=(1, 2))
    if method == "xgrad_cam":
        sum_a = acts.sum(axis=(1, 2), keepdims=True)
        return (grads * acts / (sum_a + XGRAD_EPS)).sum(axis=(1, 2))
    return None


def weighted_activations(method: str, acts, grads, cam_weights=None) -> jax.Array:
    """(B, h, w, C) activations times the method's weights (before the channel sum)."""
    if method == "cam":
        return acts * cam_weights[:, None, None, :]
    if method == "hires_cam":
        return grads * acts
    if method == "layer_cam":
        return jnp.maximum(grads, 0.0) * acts
    w = _channel_weights(method, acts, grads)
    if w is None:
        raise CamError(f"unknown gradient method {method!r}")
    return w[:, None, None, :] * acts


def raw_map(method: str, acts, grads=None, *, eigen_smooth: bool = False, cam_weights=None) -> jax.Array:
    """(B, h, w) un-normalised map of `method` from activations/gradients (B, h, w, C).

    `cam_weights` (B, C): the CAM method's per-image class weights W[:, t]. eigen_cam ignores
    grads and eigen_smooth (it is always a projection), as pytorch-grad-cam's EigenCAM does."""
    if method == "eigen_cam":
        return first_component_projection(acts)
    wa = weighted_activations(method, acts, grads, cam_weights)
    summed = wa.sum(axis=-1)
    if eigen_smooth:
        return first_component_projection(wa, anchor=summed)
    return summed


# --------------------------------------------------------------------------------------------
# Public methods
# --------------------------------------------------------------------------------------------

def _validate(model, methods: Sequence[str], layer: str | None):
    unknown = [m for m in methods if m not in METHODS or m == "score_cam"]
    if unknown:
        raise CamError(f"unknown method(s) {unknown} for cam_maps: expected some of "
                       f"{[m for m in METHODS if m != 'score_cam']} (score_cam has its own function)")
    names = list(model.segments)
    if layer is not None and layer != "features" and layer not in names:
        raise CamError(f"unknown layer {layer!r}: expected one of {names + ['features']}")
    if "cam" in methods and layer not in (None, "features", names[-1]):
        raise CamError(f"method 'cam' uses the head's Dense weights, so it needs the last stage "
                       f"({names[-1]!r}); got layer={layer!r}")


def _aug_smooth(fn: Callable, images, targets):
    """pytorch-grad-cam's test-time augmentation around fn(images, targets) -> {name: (B, H, W)}.

    The 6 (flip, factor) variants are stacked into one batch of 6B images."""
    b = images.shape[0]
    variants = []
    for flip in AUG_FLIPS:
        for factor in AUG_FACTORS:
            x = images[:, :, ::-1, :] if flip else images
            variants.append(x * factor if factor != 1.0 else x)
    stacked = jnp.concatenate(variants, axis=0)
    n = len(variants)
    t = None if targets is None else jnp.tile(jnp.asarray(targets, jnp.int32), n)
    maps = fn(stacked, t)
    out = {}
    for name, m in maps.items():
        m = m.reshape((n, b) + m.shape[1:])
        flips = np.repeat(np.array(AUG_FLIPS), len(AUG_FACTORS))
        m = jnp.where(flips[:, None, None, None], m[..., ::-1], m)
        out[name] = m.mean(axis=0)
    return out


# `flip_mean`'s choices: the flips (axes of a (B, S, S, C) input; the same axes of its (B, S, S)
# maps) averaged with the input as given.
FLIPS = {"none": (), "h": ((2,),), "hv": ((2,), (1,), (1, 2))}


def flip_mean(map_fn: Callable, images: Array, flips: str = "none", content: Array | None = None):
    """The mean of a map over an input and its flips, each view's map flipped back.

    map_fn(images (B, S, S, C)) -> maps (B, S, S) in the input frame, or a dict of them.
    flips: "none" (map_fn(images) alone), "h" (also flipped left-right) or "hv" (left-right,
    up-down and both: four views). content: (B, S, S) bool or None; the maps are multiplied by it
    (zero on letterbox padding). With flips, each mean map is then scaled to a maximum of 1 (a
    positive map stays in [0, 1]); "none" returns map_fn's maps as they are (times content).

    Why: a network that knows where it is in the frame (zero padding, no augmentation) adds a
    pattern fixed to the frame to its maps (issue 18); a fixed pattern does not move with the
    image, so in the mean of mirrored views its odd part cancels while evidence that moves with the
    image adds up. Unlike `cam_maps(aug_smooth=True)` (pytorch-grad-cam's left-right flips and
    brightness factors) the views are only mirrors, and up-down ones too.
    """
    if flips not in FLIPS:
        raise CamError(f"unknown flips {flips!r}: expected one of {list(FLIPS)}")
    keep = (lambda m: m) if content is None else (lambda m: m * content)
    maps = map_fn(images)
    if not FLIPS[flips]:
        return jax.tree.map(keep, maps)
    for axes in FLIPS[flips]:
        maps = jax.tree.map(lambda a, b: a + jnp.flip(b, axes), maps, map_fn(jnp.flip(images, axes)))
    return jax.tree.map(lambda m: keep(m) / jnp.maximum(jnp.max(keep(m), axis=(1, 2), keepdims=True), NORM_EPS), maps)


def cam_maps(model, variables, images: Array, targets: Array | None = None, layer: str | None = None,
             *, methods: Sequence[str] = ("grad_cam",), aug_smooth: bool = False,
             eigen_smooth: bool = False, score_fn: Callable | None = None, baseline=None,
             raw: bool = False) -> dict[str, jax.Array]:
    """Several CAM methods from one forward and one backward pass.

    Args: as `grad_cam`; `methods` a subset of METHODS without "score_cam".
      baseline: optional raw map to subtract before post-processing, (h, w) or (B, h, w) at the
        stage's resolution, or {method: map}: e.g. the mean raw map of normal images
        (`mskjax.cam` extension, not in pytorch-grad-cam; None keeps its semantics exactly). A
        network that knows where the frame is gives every image the same positional pattern;
        subtracting it leaves what the image itself adds.
      raw: return the raw (B, h, w) maps (baseline subtracted) instead of post-processed ones.
    Returns: {method: (B, H, W) float32 in [0, 1]} at the input size (H, W), or raw maps.
    """
    methods = tuple(methods)
    _check_images(images)
    _validate(model, methods, layer)
    _check_targets(targets, images.shape[0], getattr(model, "num_classes", None))
    out_hw = images.shape[1:3]
    need_grads = any(m in GRADIENT_METHODS for m in methods)

    def run(x, t):
        acts, grads, _, used = activations_and_gradients(model, variables, x, t, layer,
                                                         with_gradients=need_grads, score_fn=score_fn)
        cw = None
        if "cam" in methods:
            kernel = head_dense_kernel(model, variables, acts.shape[-1])
            cw = jnp.take(kernel, used, axis=1).T  # (B, C)
        out = {}
        for m in methods:
            r = raw_map(m, acts, grads, eigen_smooth=eigen_smooth, cam_weights=cw)
            base = baseline.get(m) if isinstance(baseline, dict) else baseline
            if base is not None:
                r = r - jnp.asarray(base, jnp.float32)
            out[m] = r if raw else postprocess(r, out_hw)
        return out

    if aug_smooth:
        if raw:
            raise CamError("raw maps are per augmentation variant: aug_smooth and raw do not combine")
        return _aug_smooth(run, images, targets)
    return run(images, targets)


def fused_maps(model, variables, images: Array, targets: Array | None = None, layers: Sequence[str] = (),
               *, methods: Sequence[str] = ("layer_cam",), score_fn: Callable | None = None) -> dict[str, jax.Array]:
    """Maps of several stages fused (LayerCAM's multi-layer fusion, Jiang et al. 2021): each stage's
    post-processed map (in [0, 1] at the input size), averaged over `layers`, min-max scaled again.
    Coarse stages say which region, fine ones where in it. Returns {method: (B, H, W)}."""
    if not layers:
        raise CamError("fused_maps needs at least one layer")
    per = [cam_maps(model, variables, images, targets, layer, methods=methods, score_fn=score_fn) for layer in layers]
    return {m: minmax_scale(sum(p[m] for p in per) / len(per)) for m in methods}


def occlusion(model, variables, images: Array, targets: Array | None = None, *, patch: int = 16,
              stride: int = 8, blur_sigma: float = 6.0, chunk_size: int = 32,
              score_fn: Callable | None = None) -> jax.Array:
    """Occlusion sensitivity (Zeiler & Fergus 2014): how much the target score drops when a square
    patch of the image is replaced by a blurred copy of itself.

    Patches of `patch` px on a grid of `stride` px (the last row/column aligned to the border) are
    filled with the image blurred by a Gaussian of `blur_sigma` px (a local fill: unlike a constant,
    it adds no edge of its own, so what is measured is the loss of fine structure - a fracture
    line, a lesion's margin, a fragment's edge). The map at a pixel is the mean score drop over the
    patches that cover it, then ReLU and min-max scaled to [0, 1]. Batched and jitted: the P patch
    positions run `chunk_size` at a time under `lax.map` (B x chunk_size forwards per step), so one
    compiled function serves every batch. Cost: P = ceil((H - patch) / stride + 1)^2 forwards per
    image (225 at 128 px with 16/8).

    Args: images (B, H, W, C) model inputs; targets as `grad_cam` (None: each image's argmax).
    Returns: (B, H, W) float32 in [0, 1] in the model-input frame.
    """
    x = jnp.asarray(images, jnp.float32)
    b, h, w, c = x.shape
    if not (0 < patch <= min(h, w)) or stride < 1:
        raise CamError(f"occlusion needs 0 < patch <= {min(h, w)} and stride >= 1; got patch={patch}, stride={stride}")
    _check_targets(targets, b, getattr(model, "num_classes", None))
    logits = model.apply(variables, x, train=False).astype(jnp.float32)
    base, used = _target_scores(logits, targets, score_fn)

    def starts(n):
        s = list(range(0, n - patch + 1, stride))
        if s[-1] != n - patch:
            s.append(n - patch)
        return np.asarray(s, np.int32)

    ys, xs = starts(h), starts(w)
    pos = np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)  # (P, 2) (y0, x0)
    n_pos = len(pos)
    k = min(chunk_size, n_pos)
    n_chunks = -(-n_pos // k)
    pos_padded = np.concatenate([pos, np.repeat(pos[-1:], n_chunks * k - n_pos, 0)]).reshape(n_chunks, k, 2)
    real = (np.arange(n_chunks * k) < n_pos).reshape(n_chunks, k)  # the last chunk's padding counts for nothing
    # Separable Gaussian blur with edge clamping, as exact matrices (no FFT, no padding artefacts).
    radius = max(1, int(3 * blur_sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / blur_sigma) ** 2)
    taps /= taps.sum()

    def blur_matrix(n):
        m = np.zeros((n, n), np.float32)
        for i in range(n):
            for t, wt in zip(range(-radius, radius + 1), taps):
                m[i, min(max(i + t, 0), n - 1)] += wt
        return jnp.asarray(m)

    blurred = jnp.einsum("Yy,byxc,Xx->bYXc", blur_matrix(h), x, blur_matrix(w), precision=_HI)
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]

    def chunk(args):  # p (k, 2) patch origins, ok (k,) real positions
        p, ok = args
        inside = ((rows >= p[:, 0, None, None]) & (rows < p[:, 0, None, None] + patch)
                  & (cols >= p[:, 1, None, None]) & (cols < p[:, 1, None, None] + patch))  # (k, H, W)
        occluded = jnp.where(inside[None, :, :, :, None], blurred[:, None], x[:, None])  # (B, k, H, W, C)
        out = model.apply(variables, occluded.reshape((b * k, h, w, c)), train=False).astype(jnp.float32)
        s = _target_scores(out, jnp.repeat(used, k), score_fn)[0].reshape(b, k)
        drop = base[:, None] - s  # (B, k)
        cover = inside.astype(jnp.float32) * ok[:, None, None]
        return jnp.einsum("bk,khw->bhw", drop, cover), cover.sum(0)

    sums, counts = jax.lax.map(chunk, (jnp.asarray(pos_padded), jnp.asarray(real, jnp.float32)))
    total = sums.sum(0)
    cover = counts.sum(0)
    m = total / jnp.maximum(cover, 1.0)[None]
    return minmax_scale(jnp.maximum(m, 0.0))


def _single(method: str):
    def fn(model, variables, images, targets=None, layer=None, *, aug_smooth=False, eigen_smooth=False,
           score_fn=None):
        return cam_maps(model, variables, images, targets, layer, methods=(method,),
                        aug_smooth=aug_smooth, eigen_smooth=eigen_smooth, score_fn=score_fn)[method]
    return fn


_SIGNATURE_DOC = """

    Args:
      model: a SplitModel classifier (`mskjax.models.create(...)`).
      variables: its variables; the model runs in eval mode.
      images: (B, H, W, 3) float model inputs (normalised as the weights expect).
      targets: (B,) int class indices, or None for each image's argmax. A single-logit binary head
        has only index 0, the abnormal logit (see the module docstring).
      layer: stage name from `model.segments` (None / "features": the last feature map).
      aug_smooth: mean over pytorch-grad-cam's 6 test-time augmentations (flip x intensity 0.9/1/1.1).
      eigen_smooth: first-principal-component projection of the weighted activations.
      score_fn: optional (logits, targets) -> (B,) score replacing the target logit.

    Returns:
      (B, H, W) float32 maps in [0, 1] in the model-input frame.
    """


def _make(method: str, summary: str):
    fn = _single(method)
    fn.__name__ = fn.__qualname__ = method
    fn.__doc__ = summary + _SIGNATURE_DOC
    return fn


cam = _make("cam", "CAM (Zhou et al. 2016): class weights of the head's Dense layer times the last "
                   "feature map (last stage only; for a GAP-linear head it equals Grad-CAM up to scale).")
grad_cam = _make("grad_cam", "Grad-CAM: channel weights = spatial mean of the gradient.")
grad_cam_plus_plus = _make("grad_cam_plus_plus", "Grad-CAM++ (pytorch-grad-cam's form, Eq. 19 with "
                                                 "raw-logit gradients).")
hires_cam = _make("hires_cam", "HiResCAM: elementwise gradient x activation, summed over channels.")
xgrad_cam = _make("xgrad_cam", "XGrad-CAM: weights sum(G A) / (sum(A) + 1e-7) per channel.")
layer_cam = _make("layer_cam", "LayerCAM: elementwise relu(gradient) x activation.")
eigen_cam = _make("eigen_cam", "EigenCAM: first principal component of the activations (targets "
                               "and eigen_smooth are ignored; no backward pass).")


def score_cam(model, variables, images: Array, targets: Array | None = None, layer: str | None = None,
              *, aug_smooth: bool = False, eigen_smooth: bool = False, chunk_size: int = 16,
              max_channels: int | None = None, score_fn: Callable | None = None) -> jax.Array:
    """Score-CAM: channel weights = softmax over channels of the target score of the image masked
    by each channel's upsampled, min-max-scaled activation.

    One masked forward per (image, channel): B x C forwards (2,048 channels for ResNet50's layer4).
    They run `chunk_size` channels at a time (B x chunk_size images per forward) under `lax.map`,
    so memory is bounded by one chunk; C need not divide by chunk_size (the last chunk is padded
    and the padding discarded). To limit the cost, pass fewer images (a subset of the batch) and/or
    `max_channels`: then only the `max_channels` channels with the highest spatial-mean activation
    of each image are scored and the softmax runs over those (other channels get weight 0) —
    an approximation pytorch-grad-cam does not make; None (default) scores every channel, as it does.

    Memory: one step holds B x chunk_size masked images and their forward pass (at 224 px,
    resnet50 needs roughly 25 MB per image), so shrink chunk_size for large batches.

    Args: as `grad_cam`, plus chunk_size (channels per step) and max_channels.
    Returns: (B, H, W) float32 maps in [0, 1] in the model-input frame.
    """
    _check_images(images)
    _validate(model, (), layer)
    _check_targets(targets, images.shape[0], getattr(model, "num_classes", None))
    if chunk_size < 1:
        raise CamError(f"chunk_size must be >= 1; got {chunk_size}")
    if max_channels is not None and max_channels < 1:
        raise CamError(f"max_channels must be >= 1 or None; got {max_channels}")
    out_hw = images.shape[1:3]

    def run(x, t):
        acts, _, logits, used = activations_and_gradients(model, variables, x, t, layer,
                                                          with_gradients=False, score_fn=score_fn)
        b, h, w, c = acts.shape
        if max_channels is not None and max_channels < c:
            _, idx = jax.lax.top_k(acts.mean(axis=(1, 2)), max_channels)  # (B, M)
            acts = jnp.take_along_axis(acts, idx[:, None, None, :], axis=3)
            c = max_channels
        k = min(chunk_size, c)
        n_chunks = -(-c // k)
        ry = jnp.asarray(interpolation_matrix(out_hw[0], h, align_corners=True))
        rx = jnp.asarray(interpolation_matrix(out_hw[1], w, align_corners=True))

        def chunk_scores(i):
            ch = jnp.minimum(i * k + jnp.arange(k), c - 1)
            a = jnp.take(acts, ch, axis=3)  # (B, h, w, k)
            up = jnp.einsum("Hh,bhwk,Ww->bkHW", ry, a, rx, precision=_HI)
            lo = up.min(axis=(2, 3), keepdims=True)
            hi = up.max(axis=(2, 3), keepdims=True)
            masks = (up - lo) / (hi - lo + SCORECAM_EPS)
            masked = x[:, None].astype(jnp.float32) * masks[..., None]  # (B, k, H, W, 3)
            out = model.apply(variables, masked.reshape((b * k,) + masked.shape[2:]).astype(x.dtype))
            out = out.astype(jnp.float32).reshape(b, k, -1)
            s = jax.vmap(lambda o, tt: _target_scores(o, jnp.full((k,), tt), score_fn)[0])(out, used)
            return s  # (B, k)

        scores = jax.lax.map(chunk_scores, jnp.arange(n_chunks))  # (n_chunks, B, k)
        scores = jnp.moveaxis(scores, 0, 1).reshape(b, n_chunks * k)[:, :c]
        weights = jax.nn.softmax(scores, axis=-1)
        wa = weights[:, None, None, :] * acts
        summed = wa.sum(axis=-1)
        raw = first_component_projection(wa, anchor=summed) if eigen_smooth else summed
        return {"score_cam": postprocess(raw, out_hw)}

    if aug_smooth:
        return _aug_smooth(run, images, targets)["score_cam"]
    return run(images, targets)["score_cam"]


def make_cam_fn(method: str, model, layer: str | None = None, **options) -> Callable:
    """A jitted `fn(variables, images, targets=None) -> (B, H, W)` for one method and model.

    `options` are the method's keyword arguments (aug_smooth, eigen_smooth, chunk_size, ...)."""
    if method not in METHODS:
        raise CamError(f"unknown method {method!r}: expected one of {list(METHODS)}")
    fn = score_cam if method == "score_cam" else _single(method)

    @jax.jit
    def run(variables, images, targets=None):
        return fn(model, variables, images, targets, layer, **options)
    return run


__all__ = [
    "FLIPS", "METHODS", "GRADIENT_METHODS", "CamError", "flip_mean", "activations_and_gradients", "cam", "cam_maps",
    "eigen_cam", "first_component_projection", "grad_cam", "grad_cam_plus_plus", "head_dense_kernel",
    "fused_maps", "hires_cam", "interpolation_matrix", "layer_cam", "make_cam_fn", "occlusion",
    "minmax_scale", "postprocess", "raw_map", "resize_maps", "score_cam", "weighted_activations",
    "xgrad_cam",
]
