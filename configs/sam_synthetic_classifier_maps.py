"""configs/sam_synthetic.py, trained on the prompts the pipeline will give it: the classifier's own
maps (issue 18, part 4; the demo's SAM since 2026-12-06).

    python -m mskjax.train --config configs/sam_synthetic_classifier_maps.py --workdir runs/sam_maps \
        [--config.data.map_prompts=CLASSIFIER_DIR] [--config.data.root=runs/demo/data ...]

Before training, the classifier named by data.map_prompts (default: the demo's) draws its map
(layer2 LayerCAM, the mean over the image and its three flips: data.map_flips "hv",
`PipelineConfig.map_flips`) on every training image, and the box the pipeline puts around the map's peak
(64 px at its 128 px input; `mskjax.pipeline.MapPrompter`, the pipeline's own first half). Every
training image's first prompt is that box with the map inside it as the dense mask prompt
(`mskjax.sam.map_prompt`), scored against the union of the image's lesions; the other prompt slot
keeps the usual tight, jittered ground-truth box (what the pipeline's refine pass gives). The
checkpoint records the map and box (metadata "map_prompt"), and `mskjax.segment` must be run with
the same (`--cam layer_cam --cam-layer layer2 --box-side 64 --map-flips hv`, and the demo adds
`--mirror-average`); `python -m mskjax.demo` passes them.

Measured on the demo's data and classifier (README, "The classifier's own maps as SAM's prompt"):
valid Dice from map-derived prompts (one refine pass) 0.301 with configs/sam_synthetic_map_prompts.py
(the demo's SAM before), 0.354 with half the images on the maps, 0.371 with all, 0.430 with all and
10 epochs, 0.409 with all and the prompt encoder trained (7 epochs), 0.394 with all, 10 epochs and
the prompt encoder trained. Learning rate, two seeds each (10 epochs, every image): 8e-4 0.430 /
0.482, 1.6e-3 0.330 (seed 0), 4e-4 0.503 / 0.498; without the refine pass (the demo's segment
stage since) 0.445 / 0.501 at 8e-4 and 0.509 / 0.521 at 4e-4. Then (2026-12-06, night; README "Flipped
maps and a mirrored view for SAM"), with SAM's mirrored view averaged in (segment --mirror-average):
0.533 / 0.528 for the two 4e-4 seeds, 0.570 for 13 epochs, 0.578 for 12 epochs on hv maps; with
the demo's segment stage of 2026-12-06 late (probability over flips, study gate) 0.609 for 12 epochs
and 0.628 for 16 (the trainer's valid map Dice 0.614 / 0.650). This
config: every image, hv maps, 16 epochs on the default job's (= the demo's) data, evaluated every
third epoch, the prompt encoder frozen, 4e-4. The run scores valid with these prompts at every
evaluation ("valid/map_dice": every image, no refine pass, no mirrored view) and keeps the best
model by it.
As the demo's SAM with 8e-4 and one refine pass (2026-12-06, 14 min 38 s idle on a 2-core AMD
EPYC): test Dice from map-derived prompts 0.388 (0.294 with the SAM before), 0.764 with ground-truth
boxes; with 4e-4 and no refine pass (16 min 26 s idle, the same machine): 0.466 (0.526 with every
abnormal image prompted), 0.770 with ground-truth boxes; with hv maps, 12 epochs and the mirrored
view (19 min 55 s idle, the same machine): 0.533 (0.611 with every abnormal image prompted), 0.800
with ground-truth boxes; with 16 epochs, the probability over flips and the study gate (2026-12-07,
18 min 40 s idle, the same machine): 0.620 (the trainer's own figure, every abnormal image without
the mirrored view, 0.636), 0.806 with ground-truth boxes.
"""
from mskjax.train.config import config_beside


def get_config():
    c = config_beside(__file__, "sam_synthetic.py")
    c.data.map_prompts = "runs/demo/classifier/best"  # the classifier whose maps the pipeline will use
    c.data.map_prompt_share = 1.0
    c.data.map_cam = "layer_cam"
    c.data.map_cam_layer = "layer2"
    c.data.map_box_side = 64.0
    # The maps as the mean over the image and its three flips (PipelineConfig.map_flips): valid
    # pointing at 15 px 0.647 -> 0.807 (lesion), 0.740 -> 0.857 (evidence)
    c.data.map_flips = "hv"
    # train.train_prompt_encoder: 0.409 against 0.371 at 7 epochs, but 0.394 against 0.430 at 10 (valid): off
    # The default job's dataset (configs/synthetic.py; the demo's, which passes it anyway), on
    # which the classifier whose maps it learns was trained.
    c.data.root = "data/synthetic_arm"
    c.data.synthetic_studies = 600
    c.data.synthetic_parts = "XR_FOREARM,XR_HUMERUS"
    c.data.synthetic_conspicuity = "high"
    # valid map Dice still rising at 10 (0.561); 13 epochs gave 0.624, 12 0.614 (the demo's until
    # 2026-12-06), 16 0.650 (best at epoch 15; segment's valid Dice with the demo's settings 0.609 -> 0.628)
    c.train.epochs = 16
    c.eval.every_epochs = 3  # ~15 s each: 4 evaluations instead of 12 (the best is the last so far)
    c.train.learning_rate = 4e-4  # valid, two seeds: 0.503 / 0.498 against 0.430 / 0.482 at 8e-4
    return c
