"""Can the map's box find the lesion among SAM's candidates, and what would pick it? (issue 18, part 4)

For the abnormal images of a synthetic split: the pipeline's peak box (layer2 LayerCAM by default,
`--box-side` at the classifier input), SAM prompted with it and with sub-boxes tiling it
(`mskjax.deletion_choice.candidate_boxes`), and for every candidate: its Dice against the lesion
mask (original frame), SAM's predicted IoU, the map's mean / max / share of mass inside it, and the
classifier's probability with the candidate filled in from its surroundings (`mskjax.fill`). Prints
the Dice of the first candidate (the map's box itself), of the best candidate (an oracle, not a
method), and of each selection rule; `--fill-truth` also fills the ground-truth lesion and evidence
masks themselves (does removing the abnormality lower the classifier's probability?). JSON out.

    python tools/candidate_masks.py --classifier runs/demo/classifier/best --sam runs/lms_mapp/best \
        --data runs/demo/data --split valid --limit 64 --fill-truth --json docs/x.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mskjax import deletion_choice as dc  # noqa: E402
from mskjax import sam as samfn  # noqa: E402
from mskjax.classifier import prepare_images, probabilities  # noqa: E402
from mskjax.data.images import decode_image  # noqa: E402
from mskjax.data.preprocess import preprocess  # noqa: E402
from mskjax.fill import fill_masked  # noqa: E402
from mskjax.inputs import items_from_dataset  # noqa: E402
from mskjax.pipeline import Pipeline, PipelineConfig, content_mask, read_mask  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--sam", required=True)
    ap.add_argument("--data", required=True, help="a synthetic dataset folder (masks and evidence masks)")
    ap.add_argument("--split", default="valid")
    ap.add_argument("--limit", type=int, default=64, help="first N abnormal images")
    ap.add_argument("--cam", default="layer_cam")
    ap.add_argument("--cam-layer", default="layer2")
    ap.add_argument("--box-side", type=float, default=64.0)
    ap.add_argument("--scales", default="1,0.5,0.33")
    ap.add_argument("--embedding-cache", default="runs/embedding_cache")
    ap.add_argument("--fill-truth", action="store_true")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    t0 = time.time()
    scales = tuple(float(v) for v in args.scales.split(","))
    pipe = Pipeline.from_directories(args.classifier, args.sam,
                                     PipelineConfig(cam=args.cam, cam_layer=args.cam_layer, box_side=args.box_side),
                                     embedding_cache=args.embedding_cache)
    items = [it for it in items_from_dataset(f"synthetic:{args.data}:{args.split}")[0] if it.label == 1][:args.limit]
    img, s = pipe.sam_img_size, pipe.input_size
    cls, sm = pipe.classifier, pipe.sam_model
    classify = jax.jit(lambda cv, x: probabilities(cls.apply(cv, prepare_images(x, pipe.normalization, pipe.channels),
                                                             train=False).astype(jnp.float32)))

    @jax.jit
    def candidates(cv, sv, emb, images, boxes_sam, geom, hw):
        cands = dc.candidate_boxes(boxes_sam, scales)
        b, c = cands.shape[:2]
        mi = samfn.box_mask_prompt(cands, img, sm.config.low_res_size) if pipe.box_mask_prompt else None
        dec = samfn.decode(sm, sv, emb, boxes=cands, mask_input=mi, multimask=False,
                           prompt_valid=jnp.ones((b, c), bool))
        low = dec["low_res_logits"][:, :, 0]
        inside = (dc.logits_in_input_frame(low, geom, hw, img) > 0) & content_mask(geom)[:, None]
        filled = fill_masked(images[..., 0], inside)
        removed = classify(cv, filled.reshape(b * c, s, s, 1)).reshape(b, c)
        return low, inside, removed, dec["iou_predictions"][:, :, 0]

    rows, truth = [], []
    for i in range(0, len(items), 8):
        chunk = items[i:i + 8]
        ims = [decode_image(it.path).image for it in chunk]
        batch = pipe.prepare(ims, 8)
        out = pipe.step(batch)
        low, inside, removed, ioup = (np.asarray(a) for a in candidates(
            pipe.classifier_variables, pipe.sam_variables, pipe.image_embeddings(batch), batch["images"],
            out["boxes_sam"][:, 0], batch["geometry"], batch["original_hw"]))
        for j, (it, im) in enumerate(zip(chunk, ims)):
            gt = read_mask(it.mask_path, im.shape)
            cam = out["cam"][j]
            for c in range(low.shape[1]):
                m = samfn.postprocess_host(low[j, c][None], batch["sam_input_sizes"][j], im.shape, img)[0]
                inn = inside[j, c]
                rows.append({"image": i + j, "candidate": c, "probability": float(out["probability"][j]),
                             "removed_probability": float(removed[j, c]), "area": float(inn.mean()),
                             "dice": float(2 * (m & gt).sum() / max(m.sum() + gt.sum(), 1)),
                             "predicted_iou": float(ioup[j, c]),
                             "cam_mean": float(cam[inn].mean()) if inn.any() else 0.0,
                             "cam_max": float(cam[inn].max()) if inn.any() else 0.0,
                             "cam_mass": float(cam[inn].sum() / max(cam.sum(), 1e-6))})
            if args.fill_truth:
                x = batch["images"][j:j + 1]
                entry = {"probability": float(out["probability"][j])}
                for kind, path in (("lesion", it.mask_path), ("evidence", it.evidence_path)):
                    mi, _ = preprocess(read_mask(path, im.shape).astype(np.float32), s, pipe.mode, channels=1)
                    filled = fill_masked(jnp.asarray(x[..., 0]), jnp.asarray(mi[None, None, ..., 0] > 0.25))
                    entry[kind] = float(classify(pipe.classifier_variables, filled.reshape(1, s, s, 1))[0])
                truth.append(entry)

    n, c = len(items), len(rows) // max(len(items), 1)
    g = {k: np.array([r[k] for r in rows]).reshape(n, c) for k in rows[0] if k not in ("image", "candidate")}
    d, area = g["dice"], g["area"]

    def chosen(score):
        score = np.where(area > 0, score, -np.inf)
        return float(d[np.arange(n), score.argmax(1)].mean())

    drop = g["probability"] - g["removed_probability"]
    summary = {
        "images": n, "candidates": c, "scales": scales, "first": float(d[:, 0].mean()),
        "best_candidate_oracle": float(d.max(1).mean()),
        "choose_by": {"deletion, area penalty 0": chosen(drop), "deletion, area penalty 1": chosen(drop - area),
                      "predicted IoU": chosen(g["predicted_iou"]), "map mean inside": chosen(g["cam_mean"]),
                      "map max inside": chosen(g["cam_max"]), "map mass inside": chosen(g["cam_mass"])},
        "drop_at_best_candidate": float(drop[np.arange(n), d.argmax(1)].mean()),
        "max_drop_mean": float(drop.max(1).mean()),
    }
    if truth:
        summary["fill_truth"] = {k: float(np.mean([t[k] for t in truth])) for k in truth[0]}
    summary["seconds"] = round(time.time() - t0, 1)
    summary["command"] = " ".join(sys.argv)
    print(json.dumps(summary, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows, "fill_truth": truth}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
