"""Does a classifier use the abnormality? Occlusion probes on the abnormal images of a labelled split.

    python tools/occlusion_probe.py --classifier runs/synthetic/best --data data/synthetic_arm \
        [--split test] [--json probe.json]

For every abnormal image with a ground-truth mask (synthetic / MURA layout, `masks/`), the
classifier's probability of abnormal on:
  orig             the image as it is
  inpaint_gt       the abnormality's own mask (dilated by `--dilate` px) inpainted from its
                   surroundings (OpenCV Telea): the abnormality removed, the image still natural
  inpaint_shifted  the same mask moved to a random place in the image (off the abnormality) and
                   inpainted there: the control for "any inpainting changes the probability"
  median_box       each ground-truth box filled with the image's median (a flat box: an artefact
                   of its own, reported because it misleads)
  median_box_shifted  the same boxes, each at a random place
Prints the mean probability per probe (overall and per abnormality type) and the fraction of the
images called abnormal (p >= --threshold) that each probe turns normal; --json writes them.
Preprocessing (size, resize/letterbox, normalisation) is the checkpoint's own. Needs OpenCV
(`cv2`), which the test extras bring (`pip install -e '.[test]'`, through grad-cam).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROBES = ("orig", "inpaint_gt", "inpaint_shifted", "median_box", "median_box_shifted")


def _shift(rng, h: int, w: int) -> tuple[int, int]:
    return int(rng.integers(-h // 3, h // 3 + 1)), int(rng.integers(-w // 3, w // 3 + 1))


def probe_images(image: np.ndarray, mask: np.ndarray, boxes, rng, dilate: int) -> dict[str, np.ndarray]:
    """uint8 (H, W) image, bool (H, W) mask, boxes [(x0, y0, x1, y1)] in pixels -> {probe: uint8 image}."""
    import cv2
    h, w = image.shape
    m = mask.astype(np.uint8)
    if dilate > 0:
        m = cv2.dilate(m, np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8))
    dy, dx = _shift(rng, h, w)
    shifted = np.roll(np.roll(m, dy, 0), dx, 1) * (1 - m)
    fill = np.uint8(np.median(image))
    box_img, box_shift = image.copy(), image.copy()
    for x0, y0, x1, y1 in boxes:
        xa, ya, xb, yb = int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))
        box_img[ya:yb, xa:xb] = fill
        bw, bh = xb - xa, yb - ya
        x, y = int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - bh)))
        box_shift[y:y + bh, x:x + bw] = fill
    return {"orig": image, "inpaint_gt": cv2.inpaint(image, m, 5, cv2.INPAINT_TELEA),
            "inpaint_shifted": cv2.inpaint(image, shifted.astype(np.uint8), 5, cv2.INPAINT_TELEA),
            "median_box": box_img, "median_box_shifted": box_shift}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classifier", required=True, help="classifier checkpoint (e.g. WORKDIR/best)")
    ap.add_argument("--data", required=True, help="MURA-layout folder with masks/ (a synthetic dataset)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--dilate", type=int, default=2, help="mask dilation in pixels before inpainting")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from PIL import Image

    from mskjax.data.mura import read_mura
    from mskjax.data.preprocess import preprocess
    from mskjax.checkpoint import load_classifier
    from mskjax.classifier import normalization_from_metadata, prepare_images, probabilities

    model, variables, meta = load_classifier(args.classifier)
    data = meta.get("data", {})
    size, mode = int(data.get("image_size", meta["input_size"])), data.get("mode", "resize")
    channels = int(meta.get("in_channels", 1))
    norm = normalization_from_metadata(meta.get("normalization") or {})
    records, _ = read_mura(args.data, args.split)
    records = [r for r in records if r.label and r.mask_path and Path(r.mask_path).is_file()]
    if not records:
        print(f"no abnormal images with masks in {args.data} split {args.split!r}", file=sys.stderr)
        return 2
    predict = jax.jit(lambda x: probabilities(model.apply(variables, prepare_images(x, norm, channels), train=False)))

    def prob(u8: np.ndarray) -> float:
        out = preprocess(u8.astype(np.float32) / 255.0, size=size, mode=mode, channels=1)
        x = np.asarray(out[0] if isinstance(out, tuple) else out, np.float32).reshape(1, size, size, 1)
        return float(predict(jnp.asarray(x))[0])

    rng = np.random.default_rng(args.seed)
    probs = {k: [] for k in PROBES}
    types = []
    for r in records:
        image = np.asarray(Image.open(r.path).convert("L"))
        mask = np.asarray(Image.open(r.mask_path)) > 0
        for k, im in probe_images(image, mask, r.boxes, rng, args.dilate).items():
            probs[k].append(prob(im))
        types.append(r.box_types[0] if r.box_types else "unknown")
    p = {k: np.array(v) for k, v in probs.items()}
    types = np.array(types)
    called = p["orig"] >= args.threshold

    def summary(sel) -> dict:
        return {k: float(v[sel].mean()) for k, v in p.items()} | {"n": int(sel.sum())}

    result = {"classifier": str(args.classifier), "data": str(args.data), "split": args.split,
              "dilate_px": args.dilate, "threshold": args.threshold, "seed": args.seed,
              "mean_probability": summary(np.ones(len(types), bool)),
              "by_type": {t: summary(types == t) for t in sorted(set(types))},
              "called_abnormal": int(called.sum()),
              "turned_normal_fraction": {k: float((p[k][called] < args.threshold).mean()) if called.any() else None
                                         for k in PROBES[1:]}}
    print(f"{len(types)} abnormal images with masks; mean probability of abnormal:")
    for name, s in [("all", result["mean_probability"])] + list(result["by_type"].items()):
        print(f"  {name:<9} n={s['n']:<4} " + "  ".join(f"{k} {s[k]:.3f}" for k in PROBES))
    print(f"of the {result['called_abnormal']} called abnormal, turned normal by: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result["turned_normal_fraction"].items() if v is not None))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
